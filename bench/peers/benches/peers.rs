//! The peers' workload (`research/peers.md` §7) through Spectral's evaluation, `regorus` (Rego:
//! its interpreter and its RVM) and `cedar-policy`, in one criterion run, each from the same
//! JSON text and with what it compiled kept.
//!
//! Run: `cd bench/peers && cargo bench`. Figures are recorded in `bench/RESULTS.md`. In this
//! build serde_json has `preserve_order` (Cedar needs it); `cargo bench --bench evaluate` runs
//! Spectral's rows with the features the service ships with.

#![expect(
    clippy::panic,
    reason = "a benchmark that cannot set up has nothing to measure: failing loudly is right here"
)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use spectral::sandbox::Sandbox;

#[path = "../../../benches/support/peers.rs"]
mod peers;
use peers::PEERS_CONTEXT;

fn benches(c: &mut Criterion) {
    let sandbox = Sandbox::default();
    let mut group = c.benchmark_group("peers_workload");
    peers::spectral_rows(&mut group, &sandbox);
    regorus_and_cedar(&mut group);
    group.finish();
}

/// The peers' predicate in Rego, as OPA users write it.
const PEERS_REGO: &str = r#"
package peers
import rego.v1

default allow := false

allow if {
    input.amount < 1000
    input.user.country == "US"
    input.user.tier == "gold"
}
"#;

/// The peers' predicate in Cedar, with the attributes in the request's context.
const PEERS_CEDAR: &str = r#"
permit(principal, action, resource)
when { context.amount < 1000 && context.user.country == "US" && context.user.tier == "gold" };
"#;

/// The peers' workload through regorus and Cedar, from the same context text. Each engine
/// keeps what it compiled; what a request costs is parsing its JSON into the engine's own
/// values and evaluating. The `*_prepared` rows leave out the parse.
fn regorus_and_cedar(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    use regorus::languages::rego::compiler::Compiler;
    use regorus::rvm::vm::RegoVM;

    let mut engine = regorus::Engine::new();
    if let Err(e) = engine.add_policy("peers.rego".into(), PEERS_REGO.into()) {
        panic!("{e}");
    }
    let rule = "data.peers.allow".to_string();
    let allowed = |v: Result<regorus::Value, _>| match v {
        Ok(v) => v == regorus::Value::from(true),
        Err(e) => panic!("{e}"),
    };
    let input = |text: &str| match regorus::Value::from_json_str(text) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    };
    engine.set_input(input(PEERS_CONTEXT));
    assert!(allowed(engine.eval_rule(rule.clone())), "regorus allows");
    group.bench_function("regorus_interpreter_json_text", |b| {
        b.iter(|| {
            engine.set_input(input(black_box(PEERS_CONTEXT)));
            black_box(allowed(engine.eval_rule(rule.clone())))
        })
    });

    let compiled = match engine.compile_with_entrypoint(&"data.peers.allow".into()) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let program = match Compiler::compile_from_policy(&compiled, &["data.peers.allow"]) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    let mut vm = RegoVM::new();
    vm.load_program(program);
    vm.set_input(input(PEERS_CONTEXT));
    assert!(
        allowed(vm.execute().map_err(|e| anyhow::anyhow!("{e}"))),
        "the RVM allows"
    );
    group.bench_function("regorus_rvm_json_text", |b| {
        b.iter(|| {
            vm.set_input(input(black_box(PEERS_CONTEXT)));
            black_box(allowed(vm.execute().map_err(|e| anyhow::anyhow!("{e}"))))
        })
    });
    let parsed = input(PEERS_CONTEXT);
    group.bench_function("regorus_rvm_prepared", |b| {
        b.iter(|| {
            vm.set_input(black_box(parsed.clone()));
            black_box(allowed(vm.execute().map_err(|e| anyhow::anyhow!("{e}"))))
        })
    });

    let policies: cedar_policy::PolicySet = match PEERS_CEDAR.parse() {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    let uid = |s: &str| match s.parse::<cedar_policy::EntityUid>() {
        Ok(u) => u,
        Err(e) => panic!("{e}"),
    };
    let (principal, action, resource) = (
        uid(r#"User::"u1""#),
        uid(r#"Action::"purchase""#),
        uid(r#"Order::"o1""#),
    );
    let authorizer = cedar_policy::Authorizer::new();
    let entities = cedar_policy::Entities::empty();
    let request = |context: cedar_policy::Context| match cedar_policy::Request::new(
        principal.clone(),
        action.clone(),
        resource.clone(),
        context,
        None,
    ) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    let context = |text: &str| match cedar_policy::Context::from_json_str(text, None) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let allow = |r: &cedar_policy::Request| {
        authorizer.is_authorized(r, &policies, &entities).decision()
            == cedar_policy::Decision::Allow
    };
    assert!(allow(&request(context(PEERS_CONTEXT))), "Cedar allows");
    group.bench_function("cedar_json_text", |b| {
        b.iter(|| black_box(allow(&request(context(black_box(PEERS_CONTEXT))))))
    });
    let prepared = request(context(PEERS_CONTEXT));
    group.bench_function("cedar_prepared", |b| {
        b.iter(|| black_box(allow(black_box(&prepared))))
    });
}

criterion_group!(peers_run, benches);
criterion_main!(peers_run);

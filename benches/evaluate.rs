//! Criterion benches of the decide hot path without HTTP: evaluation of a cached module with a
//! fresh scope, JSON parsing and context conversion included, and context conversion alone;
//! and, in the same run, the peers' workload through `regorus` (Rego: its interpreter and its
//! RVM) and `cedar-policy`, each from the same JSON text and with what it compiled kept.
//!
//! Run: `cargo bench --bench evaluate`. Figures are recorded in `bench/RESULTS.md`.

#![expect(
    clippy::panic,
    reason = "a benchmark that cannot set up has nothing to measure: failing loudly is right here"
)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::Map;
use spectral::sandbox::Sandbox;
use spectral::worlds::context::{self, SystemValues};
use spectral::worlds::model::{
    Action, AttrType, Attribute, Case, Rule, Severity, Status, WorldModel,
};
use spectral::worlds::{compile, evaluate, load, ContextJson, Request};

/// The workload the peers are measured on, here and in `research/peers.md` §7.
const PEERS_CONTEXT: &str = r#"{"user":{"id":"u1","tier":"gold","country":"US"},"amount":250,"action":"purchase","tags":["a","b"]}"#;
const PEERS_PREDICATE: &str =
    r#"context.amount < 1000 && context.user.country == "US" && context.user.tier == "gold""#;

fn peers_world() -> WorldModel {
    let mut user = Attribute::of(AttrType::Object);
    for field in ["id", "tier", "country"] {
        user.fields
            .insert(field.into(), Attribute::of(AttrType::String));
    }
    let context: BTreeMap<String, Attribute> = [
        ("amount".to_string(), Attribute::of(AttrType::Number)),
        ("user".to_string(), user),
    ]
    .into_iter()
    .collect();
    WorldModel {
        record_context: Default::default(),
        world: "peers".into(),
        description: String::new(),
        context,
        config: BTreeMap::new(),
        actions: vec![Action {
            name: "purchase".into(),
            description: String::new(),
            aggregation: Default::default(),
            work_frames: BTreeMap::new(),
            rules: vec![Rule {
                id: "gold-us-small".into(),
                text: "Small purchases by gold users in the US.".into(),
                severity: Severity::T2,
                outcome: Status::Green,
                inputs: vec!["amount".into(), "user".into()],
                applies_when: None,
                predicate: PEERS_PREDICATE.into(),
                work_frame: None,
                provenance: None,
                cases: vec![Case {
                    name: String::new(),
                    context: Map::new(),
                    matches: true,
                }],
            }],
        }],
    }
}

fn system() -> SystemValues {
    SystemValues {
        request_time: 1_772_465_400,
        request_id: "00000000-0000-7000-8000-000000000001".into(),
        caller: "bench".into(),
    }
}

#[path = "../examples/support/workload.rs"]
mod workload;
use workload::typical_context;

fn benches(c: &mut Criterion) {
    let sandbox = Sandbox::default();

    let peers = match compile(&peers_world(), 1, &sandbox) {
        Ok(w) => w,
        Err(p) => panic!("{p:?}"),
    };
    let module = &peers.modules[0];
    let mut group = c.benchmark_group("peers_workload");
    group.bench_function("evaluate_json_text", |b| {
        b.iter(|| {
            let request = Request {
                context: ContextJson::Text(black_box(PEERS_CONTEXT)),
                system: system(),
                correlation_id: None,
                explain: false,
            };
            black_box(evaluate(&sandbox, module, &request))
        })
    });
    group.bench_function("context_conversion_only", |b| {
        b.iter(|| {
            black_box(context::bind_str(
                &module.attrs,
                black_box(PEERS_CONTEXT),
                Some(&system()),
                sandbox.limits(),
            ))
        })
    });
    regorus_and_cedar(&mut group);
    group.finish();

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("predicates");
    let mut worlds: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    worlds.sort();
    let mut group = c.benchmark_group("example_worlds");
    for path in worlds.iter().filter(|p| p.join("world.toml").is_file()) {
        let world = match load::load(path, &sandbox) {
            Ok(w) => w,
            Err(e) => panic!("{e}"),
        };
        // The action with the most rules is the world's typical heavy action.
        let Some(module) = world.modules.iter().max_by_key(|m| m.rules.len()) else {
            continue;
        };
        let text = typical_context(&world.model, &module.manifest.action).to_string();
        let name = format!(
            "{}/{} ({} rules)",
            world.model.world,
            module.manifest.action,
            module.rules.len()
        );
        group.bench_function(format!("evaluate {name}"), |b| {
            b.iter(|| {
                let request = Request {
                    context: ContextJson::Text(black_box(&text)),
                    system: system(),
                    correlation_id: None,
                    explain: false,
                };
                black_box(evaluate(&sandbox, module, &request))
            })
        });
        group.bench_function(format!("convert {name}"), |b| {
            b.iter(|| {
                black_box(context::bind_str(
                    &module.attrs,
                    black_box(&text),
                    Some(&system()),
                    sandbox.limits(),
                ))
            })
        });
    }
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

criterion_group!(evaluation, benches);
criterion_main!(evaluation);

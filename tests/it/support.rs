//! Shared fixtures: a one-rule world built in code, the example worlds, waiting for what has
//! no signal, and the `spectral` process harness.

pub mod process;

pub use process::Process;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};
use spectral::sandbox::{Limits, Sandbox};
use spectral::worlds::context::SystemValues;
use spectral::worlds::model::{
    Action, AttrType, Attribute, Case, Rule, Severity, Status, WorldModel,
};
use spectral::worlds::{self, CompiledWorld, ContextJson, Decision, Request};

/// The folder of the example worlds.
pub fn predicates_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("predicates")
}

/// Every example world's folder.
pub fn example_worlds() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(predicates_dir())
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.join("world.toml").is_file())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// The schema of the hostile world: one attribute of every shape an attack needs.
pub fn hostile_schema() -> BTreeMap<String, Attribute> {
    let mut m = BTreeMap::new();
    m.insert("n".into(), Attribute::of(AttrType::Integer));
    m.insert("s".into(), Attribute::of(AttrType::String));
    m.insert("list".into(), Attribute::of(AttrType::List));
    m.insert("m".into(), Attribute::of(AttrType::Object));
    m.insert("m2".into(), Attribute::of(AttrType::Object));
    let mut t = Attribute::of(AttrType::Timestamp);
    t.required = false;
    m.insert("t".into(), t);
    m
}

/// A world with one action `probe.run` whose one T2 `GREEN` rule has this predicate.
pub fn one_rule_world(predicate: &str, inputs: &[&str]) -> WorldModel {
    WorldModel {
        record_context: Default::default(),
        world: "hostile".into(),
        description: String::new(),
        context: hostile_schema(),
        config: [("limit".to_string(), json!(10))].into_iter().collect(),
        actions: vec![Action {
            name: "probe.run".into(),
            description: String::new(),
            aggregation: Default::default(),
            work_frames: BTreeMap::new(),
            rules: vec![Rule {
                id: "probe".into(),
                text: "an attack".into(),
                severity: Severity::T2,
                outcome: Status::Green,
                inputs: inputs.iter().map(|s| s.to_string()).collect(),
                applies_when: None,
                predicate: predicate.into(),
                work_frame: None,
                provenance: None,
                cases: vec![Case {
                    name: String::new(),
                    context: serde_json::Map::new(),
                    matches: true,
                }],
            }],
        }],
    }
}

/// Compile a world or panic with its problems.
pub fn compile(model: &WorldModel, sandbox: &Sandbox) -> CompiledWorld {
    match worlds::compile(model, 1, sandbox) {
        Ok(w) => w,
        Err(problems) => panic!(
            "world does not compile:\n{}",
            problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

/// Fixed system values, so decisions are reproducible.
pub fn system() -> SystemValues {
    SystemValues {
        request_time: 1_772_465_400,
        request_id: "00000000-0000-7000-8000-000000000001".into(),
        caller: "test".into(),
    }
}

/// Decide an action of a compiled world with a context, with the per-rule trace.
pub fn decide(world: &CompiledWorld, sandbox: &Sandbox, action: &str, context: &Value) -> Decision {
    decide_with(world, sandbox, action, context, true)
}

/// Decide an action, with or without the trace. Without it, the rules run as one batch; with
/// it, one by one.
pub fn decide_with(
    world: &CompiledWorld,
    sandbox: &Sandbox,
    action: &str,
    context: &Value,
    explain: bool,
) -> Decision {
    let module = world
        .module(action)
        .unwrap_or_else(|| panic!("no action {action}"));
    let request = Request {
        context: ContextJson::Value(context),
        system: system(),
        correlation_id: None,
        explain,
    };
    worlds::evaluate(sandbox, module, &request).unwrap_or_else(|e| panic!("{e}"))
}

/// The parts of a decision that must not depend on how the rules were run.
pub fn verdict(d: &Decision) -> (spectral::worlds::Status, Value, Value, Value) {
    (
        d.status,
        serde_json::to_value(&d.work_frame).unwrap_or_default(),
        serde_json::to_value(&d.decision_metadata.matched_rules).unwrap_or_default(),
        serde_json::to_value(&d.decision_metadata.errors).unwrap_or_default(),
    )
}

/// The sandbox for tests of semantics rather than of the deadline: default limits with a
/// deadline generous enough for an unoptimized build on a busy machine, where a 5 ms wall
/// clock can run out while the thread waits for a core.
pub fn sandbox() -> Sandbox {
    sandbox_with(|l| {
        l.deadline_us = 500_000;
        l.decision_deadline_us = 5_000_000;
    })
}

/// A sandbox with default limits changed by `f`.
pub fn sandbox_with(f: impl FnOnce(&mut Limits)) -> Sandbox {
    let mut limits = Limits::default();
    f(&mut limits);
    Sandbox::new(limits)
}

/// Resident memory of this process, in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Poll `probe` until it yields a value, backing off from 1 ms to 50 ms, and fail with `what`
/// once `within` has passed: for what the code under test announces by no signal (a row in
/// another process's database, a clock that must pass).
pub async fn eventually<T, F, Fut>(within: std::time::Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + within;
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
    }
}

//! What the fuzz targets feed and what they assert, one function a target. Each input goes
//! through the functions the service itself calls, through the library's public API only;
//! an `Err` is a fine answer, a panic or a broken invariant is a crash. The invariants are the
//! service's promises: a decision does not depend on how the rules were run, a draft that
//! verifies can be stored, published and loaded back, a predicate stays within its limits.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spectral::sandbox::{Input, Limits, Sandbox};
use spectral::service::{decode_draft, verify_model, ServiceError};
use spectral::worlds::context::SystemValues;
use spectral::worlds::{self, CompiledWorld, ContextJson, Decision, Module, Request, Status};

/// The example worlds of `predicates/`, which the decide bodies are bound against.
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../predicates");

/// The service's sandbox: the default limits, as `spectral serve` has them unconfigured.
fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(Sandbox::default)
}

/// Every example world, loaded once; a world that does not load is a broken tree.
fn examples() -> &'static [CompiledWorld] {
    static WORLDS: OnceLock<Vec<CompiledWorld>> = OnceLock::new();
    WORLDS.get_or_init(|| {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(EXAMPLES)
            .unwrap_or_else(|e| panic!("{EXAMPLES}: {e}"))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("world.toml").is_file())
            .collect();
        dirs.sort();
        assert!(!dirs.is_empty(), "no example world under {EXAMPLES}");
        dirs.iter()
            .map(|d| {
                worlds::load::load(d, sandbox()).unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            })
            .collect()
    })
}

/// Fixed system values, so that a crash reproduces.
fn system() -> SystemValues {
    SystemValues {
        request_time: 1_772_465_400,
        request_id: "00000000-0000-7000-8000-000000000001".into(),
        caller: "fuzz".into(),
    }
}

/// Whether a decision's answer may depend on the clock: a rule or the decision ran out of
/// time. Everything else about it is determined by the module and the context.
fn timed(d: &Decision) -> bool {
    d.decision_metadata
        .errors
        .iter()
        .any(|e| e.kind == "deadline_exceeded")
}

/// The parts of a decision that must not depend on how the rules were run.
fn verdict(d: &Decision) -> (Status, Value, Value, Value) {
    (
        d.status,
        to_json(&d.work_frame),
        to_json(&d.decision_metadata.matched_rules),
        to_json(&d.decision_metadata.errors),
    )
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or_else(|e| panic!("does not serialize: {e}"))
}

/// What every decision must be, whatever the context.
fn check_decision(d: &Decision, module: &Module, limits: &Limits) {
    let meta = &d.decision_metadata;
    assert_eq!(meta.world, module.manifest.world);
    assert_eq!(meta.action, module.manifest.action);
    assert_eq!(meta.module_hash, module.hash());
    // An error anywhere is never answered green; missing evidence is YELLOW.
    if !meta.errors.is_empty() {
        assert!(
            d.status >= Status::Yellow,
            "an error, yet {:?}: {meta:?}",
            d.status
        );
    }
    // The status is a matched rule's, or GREEN (or YELLOW, for errors) when none matched.
    if meta.matched_rules.is_empty() {
        assert!(
            d.status == Status::Green || (d.status == Status::Yellow && !meta.errors.is_empty()),
            "no rule matched, yet {:?}",
            d.status
        );
    } else {
        assert!(
            meta.matched_rules.iter().any(|r| r.outcome == d.status)
                || (d.status == Status::Yellow && !meta.errors.is_empty()),
            "{:?} is no matched rule's outcome: {:?}",
            d.status,
            meta.matched_rules
        );
    }
    assert!(
        d.operations <= limits.decision_max_operations,
        "a decision used {} operations, over its budget of {}",
        d.operations,
        limits.decision_max_operations
    );
    if let Some(trace) = &meta.trace {
        // Missing evidence stops a decision before any rule runs; otherwise each rule is traced.
        if meta.errors.iter().any(|e| e.kind == "missing_evidence") {
            assert!(trace.is_empty(), "rules ran on missing evidence: {trace:?}");
        } else {
            assert_eq!(trace.len(), module.rules.len());
        }
        for entry in trace {
            assert!(
                entry.operations <= limits.max_operations,
                "rule {} used {} operations, over the limit of {}",
                entry.rule,
                entry.operations,
                limits.max_operations
            );
        }
    }
    // The answer is sent as JSON.
    let _ = to_json(d);
}

/// `decide_body`: the bytes of a `POST /api/decide` body, through the handler's decoding
/// (duplicate keys, the typed parse of an object, the length checks), the world and action
/// lookup among the example worlds, and evaluation of the context against the action's
/// schema and rules.
///
/// Asserts: a decision satisfies [`check_decision`]; with and without the trace (the rules
/// run one by one, or as one batch) the verdict is the same unless the clock stopped a rule;
/// the context bound from its text and from its parsed value is accepted alike and decided
/// alike.
pub fn decide_body(data: &[u8]) {
    let Ok(input) = spectral::http::fuzzing::decide_body(data) else {
        return;
    };
    if input.check_lengths().is_err() {
        return;
    }
    let examples = examples();
    // An operator key names the world; a world-bound key's is its own (here the first).
    let world = match input.world.as_deref() {
        None => &examples[0],
        Some(name) => match examples.iter().find(|w| w.model.world == name) {
            Some(w) => w,
            None => return,
        },
    };
    let Some(module) = world.module(&input.action) else {
        return;
    };
    let sandbox = sandbox();
    let text = input.context.get();
    let request = Request {
        context: ContextJson::Text(text),
        system: system(),
        correlation_id: input.correlation_id.clone(),
        explain: input.explain,
    };
    let first = worlds::evaluate(sandbox, module, &request);
    let other = worlds::evaluate(
        sandbox,
        module,
        &Request {
            explain: !input.explain,
            ..request.clone()
        },
    );
    let first = match (first, other) {
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "refused differently with and without the trace");
            None
        }
        (Ok(a), Ok(b)) => {
            check_decision(&a, module, sandbox.limits());
            check_decision(&b, module, sandbox.limits());
            assert_eq!(a.decision_metadata.trace.is_some(), input.explain);
            if !timed(&a) && !timed(&b) {
                assert_eq!(verdict(&a), verdict(&b), "the trace changed the verdict");
            }
            Some(a)
        }
        (a, b) => panic!("accepted in one mode only: {a:?} / {b:?}"),
    };
    // The same context as a parsed value, the form cases and the CLI use.
    if let Ok(value) = serde_json::from_str::<Value>(text) {
        let by_value = worlds::evaluate(
            sandbox,
            module,
            &Request {
                context: ContextJson::Value(&value),
                ..request
            },
        );
        match (first, by_value) {
            (None, Err(_)) => {}
            (Some(a), Ok(b)) => {
                check_decision(&b, module, sandbox.limits());
                if !timed(&a) && !timed(&b) {
                    assert_eq!(verdict(&a), verdict(&b), "text and value decided apart");
                }
            }
            (a, b) => panic!("text and value bound apart: {a:?} / {b:?}"),
        }
    }
}

/// `draft_world`: the body of `PUT /api/worlds/{world}/draft`, through the body checks, the
/// decoding as a model of its world, and verification (validation, compilation with the
/// sandbox's static checks, every case run).
///
/// Asserts: a problem list is never empty; a model that verifies is stored as JSON and
/// decodes back to itself (as publish reads it), has one module per action, and each
/// module's stored form loads back under its hash (as the cache loads a deployed version)
/// with the same hash.
pub fn draft_world(data: &[u8]) {
    if spectral::http::fuzzing::json_body(data).is_err() {
        return;
    }
    // The world is the path's; take the one the body names, so the check is the body's.
    let world = serde_json::from_slice::<Value>(data)
        .ok()
        .and_then(|v| v.get("world").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_default();
    let Ok(model) = decode_draft(&world, data) else {
        return;
    };
    let sandbox = sandbox();
    match verify_model(&model, sandbox) {
        Err(ServiceError::Invalid { problems, message }) => {
            assert!(!problems.is_empty(), "invalid with no problem: {message}");
            for p in &problems {
                let _ = p.to_string();
            }
        }
        Err(e) => panic!("verification failed with no problem list: {e:?}"),
        Ok(compiled) => check_published(&model, &compiled, sandbox),
    }
}

/// What must hold of a model that verified: it can be stored, published and deployed.
fn check_published(model: &worlds::WorldModel, compiled: &CompiledWorld, sandbox: &Sandbox) {
    let stored = serde_json::to_value(model).unwrap_or_else(|e| panic!("draft unstorable: {e}"));
    let read: worlds::WorldModel = serde_json::from_value(stored)
        .unwrap_or_else(|e| panic!("the stored draft does not decode: {e}"));
    assert_eq!(&read, model, "the stored draft decodes to another model");
    assert_eq!(compiled.modules.len(), model.actions.len());
    for module in &compiled.modules {
        let loaded = Module::load(module.canonical_json(), module.hash(), 2, sandbox)
            .unwrap_or_else(|e| panic!("a published module does not load: {e}"));
        assert_eq!(loaded.hash(), module.hash());
    }
}

/// Most files one `world_toml` input may write: the manifest and its predicates.
const MAX_FILES: usize = 16;

/// `world_toml`: a world folder as text, `world.toml` first and then each predicate file
/// after a line `--- <relative path>`, written to a scratch folder and loaded with the folder
/// loader (parse, line numbers, predicate files read inside the folder, compilation).
///
/// Asserts: a refusal lists at least one problem, each with its file; a world that loads
/// also verifies as a draft the same way (the folder and the API take the same models), and
/// what [`check_published`] asserts.
pub fn world_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut sections = text.split("\n--- ");
    let manifest = sections.next().unwrap_or_default();
    let mut files = vec![(PathBuf::from("world.toml"), manifest)];
    for section in sections {
        let (name, body) = section.split_once('\n').unwrap_or((section, ""));
        let name = Path::new(name.trim());
        // Only paths inside the folder are written; the loader's own checks see the rest.
        if name.as_os_str().is_empty()
            || !name.components().all(|c| matches!(c, Component::Normal(_)))
            || files.len() >= MAX_FILES
        {
            return;
        }
        files.push((name.to_path_buf(), body));
    }
    let dir = scratch();
    for (name, body) in &files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            if std::fs::create_dir_all(parent).is_err() {
                return;
            }
        }
        if std::fs::write(&path, body).is_err() {
            return;
        }
    }
    let sandbox = sandbox();
    match worlds::load::load(&dir, sandbox) {
        Err(e) => {
            assert!(!e.0.is_empty(), "refused with no problem");
            for p in &e.0 {
                assert!(p.file.is_some(), "a problem with no file: {p}");
                let _ = p.to_string();
            }
        }
        Ok(compiled) => {
            let body = serde_json::to_vec(&compiled.model)
                .unwrap_or_else(|e| panic!("a loaded model does not serialize: {e}"));
            let model = decode_draft(&compiled.model.world, &body)
                .unwrap_or_else(|e| panic!("a loaded model is no draft: {e:?}"));
            assert_eq!(model, compiled.model);
            // Cases are not run by the loader; compilation must agree, cases may fail.
            match verify_model(&model, sandbox) {
                Ok(verified) => check_published(&model, &verified, sandbox),
                Err(ServiceError::Invalid { problems, .. }) => assert!(
                    problems
                        .iter()
                        .all(|p| matches!(p.locus, worlds::problem::Locus::Case { .. })),
                    "loaded from its folder but invalid as a draft: {problems:?}"
                ),
                Err(e) => panic!("{e:?}"),
            }
        }
    }
}

/// This process's scratch world folder, emptied for each input.
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spectral-fuzz-world-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// The context every `predicate` input is evaluated against: the hostile suite's.
fn predicate_context() -> &'static (BTreeMap<String, Value>, Value) {
    static CONTEXT: OnceLock<(BTreeMap<String, Value>, Value)> = OnceLock::new();
    CONTEXT.get_or_init(|| {
        let config = [
            ("limit".to_string(), json!(10)),
            ("big".to_string(), json!((0..256).collect::<Vec<i64>>())),
            ("names".to_string(), json!(["a", "b", "c"])),
        ]
        .into_iter()
        .collect();
        let context = json!({
            "n": 5,
            "x": 2.5,
            "s": "abc",
            "list": [1, 2, 3],
            "names": ["x", "y"],
            "m": {"a": 1},
            "m2": {"b": 2},
            "t": 1_772_465_400,
            "b": true
        });
        (config, context)
    })
}

/// Longest a predicate may take to compile or to evaluate here: far above the sandbox's
/// deadline (an instrumented build on a busy machine is slow), far below a hang.
const BOUND: Duration = Duration::from_secs(2);

/// `predicate`: predicate source compiled by the sandbox with its static checks and, when it
/// compiles, evaluated against a fixed context with the service's limits.
///
/// Asserts: compiling with exactly the inputs it reads succeeds whenever compiling without
/// the input check does; an evaluation is a bool or a typed failure within the operation
/// limit and in bounded time; two evaluations agree unless the clock stopped one.
pub fn predicate(data: &[u8]) {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let sandbox = sandbox();
    let limits = sandbox.limits();
    let (config, context) = predicate_context();
    let started = Instant::now();
    let reads = sandbox
        .compile_reads(source, config)
        .map(|p| p.reads().clone());
    let inputs: Vec<String> = match &reads {
        Ok(r) => r.context.iter().cloned().collect(),
        Err(_) => Vec::new(),
    };
    let compiled = sandbox.compile(source, &inputs, config);
    assert!(
        started.elapsed() < BOUND,
        "compiling took {:?}",
        started.elapsed()
    );
    let program = match (reads, compiled) {
        (Err(a), Err(b)) => {
            assert_eq!(a.kind, b.kind, "{a} / {b}");
            return;
        }
        (Ok(_), Ok(p)) => p,
        (a, b) => panic!("the input check disagrees with what it reads: {a:?} / {b:?}"),
    };
    let mut input = Input::new();
    for name in &inputs {
        // An attribute the context lacks stays unbound: reading it fails closed.
        if let Some(value) = context.get(name) {
            if let Err(e) = input.insert(name, value, limits) {
                panic!("the fixed context does not bind: {e}");
            }
        }
    }
    let mut bindings = input.seal();
    let run = |bindings: &mut _| {
        let started = Instant::now();
        let result = sandbox.eval(&program, bindings);
        assert!(
            started.elapsed() < BOUND,
            "evaluation took {:?}",
            started.elapsed()
        );
        let operations = match &result {
            Ok(o) => o.operations,
            Err(f) => f.operations,
        };
        assert!(
            operations <= limits.max_operations,
            "{operations} operations, over the limit of {}",
            limits.max_operations
        );
        result
    };
    let first = run(&mut bindings);
    let second = run(&mut bindings);
    let clock = |r: &Result<_, spectral::sandbox::Failure>| matches!(r, Err(f) if f.error.kind == spectral::sandbox::ErrorKind::DeadlineExceeded);
    if !clock(&first) && !clock(&second) {
        assert_eq!(
            first, second,
            "the same predicate and context answered twice apart"
        );
    }
}

//! The hostile-predicate suite: predicates are written by an LLM and treated as hostile. One
//! test per attack, each asserting the exact error kind and that compilation or evaluation
//! came back within its bound. Attacks that compile must fail closed in a decision: a status
//! of at least YELLOW with the error in the metadata. The findings F1–F11 are the known ways
//! out of a rhai 1.27 sandbox, and ARCHITECTURE.md (`src/sandbox`) says how each is closed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spectral::sandbox::{ErrorKind, Sandbox};
use spectral::worlds::Status;

use crate::support::{
    compile, decide, decide_with, one_rule_world, rss_kib, sandbox_with, verdict,
};

/// Generous bounds: the point is "milliseconds, not seconds", on a shared, noisy machine.
const COMPILE_BOUND: Duration = Duration::from_millis(250);

fn config() -> BTreeMap<String, Value> {
    [("limit".to_string(), json!(10))].into_iter().collect()
}

fn context() -> Value {
    json!({
        "n": 5,
        "s": "abc",
        "list": [1, 2, 3],
        "m": {"a": 1},
        "m2": {"b": 2},
        "t": "2026-03-02T15:30:00Z"
    })
}

/// The attack must be rejected when compiled, with this kind, quickly.
fn rejected_at_compile(sandbox: &Sandbox, predicate: &str, inputs: &[&str], kind: ErrorKind) {
    let before = rss_kib();
    let inputs: Vec<String> = inputs.iter().map(|s| s.to_string()).collect();
    let started = Instant::now();
    let result = sandbox.compile(predicate, &inputs, &config());
    let took = started.elapsed();
    let err = match result {
        Ok(_) => panic!("compiled, but expected {kind}: {}", preview(predicate)),
        Err(e) => e,
    };
    assert_eq!(err.kind, kind, "{err}");
    assert!(took < COMPILE_BOUND, "compile took {took:?}");
    assert_memory_bounded(before);

    // The same attack inside a world is a validation problem that names the rule.
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let model = one_rule_world(predicate, &inputs);
    let problems = spectral::worlds::compile(&model, 1, sandbox)
        .err()
        .unwrap_or_default();
    assert!(
        problems
            .iter()
            .any(|p| p.kind == Some(kind)
                && p.to_string().contains("action 'probe.run' rule 'probe'")),
        "{problems:?}"
    );
}

/// The attack compiles but fails closed when evaluated, with this kind, within `bound`.
fn fails_closed(
    sandbox: &Sandbox,
    predicate: &str,
    inputs: &[&str],
    context: &Value,
    kind: ErrorKind,
    bound: Duration,
) {
    let before = rss_kib();
    let world = compile(&one_rule_world(predicate, inputs), sandbox);
    let started = Instant::now();
    let decision = decide(&world, sandbox, "probe.run", context);
    let took = started.elapsed();
    assert!(
        decision.status >= Status::Yellow,
        "a failing predicate answered {}",
        decision.status
    );
    let errors = &decision.decision_metadata.errors;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].kind, kind.as_str(), "{errors:?}");
    assert_eq!(errors[0].rule.as_deref(), Some("probe"));
    assert!(took < bound, "evaluation took {took:?}, bound {bound:?}");
    // The fast path (all rules in one call) falls back and fails closed the same way.
    let started = Instant::now();
    let fast = decide_with(&world, sandbox, "probe.run", context, false);
    assert!(started.elapsed() < bound * 2, "{:?}", started.elapsed());
    assert_eq!(verdict(&fast), verdict(&decision));
    assert_memory_bounded(before);
}

/// Resident memory grew by less than 32 MiB over one attack (the process itself is a few MB;
/// the unguarded attacks allocate gigabytes).
fn assert_memory_bounded(before_kib: u64) {
    let after = rss_kib();
    assert!(
        after.saturating_sub(before_kib) < 32 * 1024,
        "resident memory grew from {before_kib} KiB to {after} KiB"
    );
}

fn preview(s: &str) -> String {
    s.chars().take(80).collect()
}

fn quick() -> Duration {
    Duration::from_millis(100)
}

// ---------------------------------------------------------------- F1: blocking `sleep`

#[test]
fn f1_sleep_by_name_is_not_registered() {
    let sandbox = crate::support::sandbox();
    fails_closed(
        &sandbox,
        "sleep(3) == ()",
        &[],
        &context(),
        ErrorKind::FunctionNotFound,
        quick(),
    );
}

#[test]
fn f1_sleep_through_a_function_pointer_is_forbidden() {
    rejected_at_compile(
        &crate::support::sandbox(),
        r#"Fn("sle" + "ep").call(3) == ()"#,
        &[],
        ErrorKind::ForbiddenSymbol,
    );
}

#[test]
fn f1_call_and_curry_are_forbidden_too() {
    let sandbox = crate::support::sandbox();
    rejected_at_compile(
        &sandbox,
        r#"call(Fn("abs"), -1) == 1"#,
        &[],
        ErrorKind::ForbiddenSymbol,
    );
    rejected_at_compile(
        &sandbox,
        r#"Fn("abs").curry(1).call() == 1"#,
        &[],
        ErrorKind::ForbiddenSymbol,
    );
}

// ---------------------------------------------------------------- F2: file imports

#[test]
fn f2_import_of_a_file_is_a_syntax_error() {
    rejected_at_compile(
        &crate::support::sandbox(),
        r#"import "/etc/passwd" as secret; true"#,
        &[],
        ErrorKind::Syntax,
    );
}

// ---------------------------------------------------------------- F3: closures escape the op count

#[test]
fn f3_closures_passed_to_map_are_a_syntax_error() {
    rejected_at_compile(
        &crate::support::sandbox(),
        "context.list.map(|x| x + 1).len() > 0",
        &["list"],
        ErrorKind::Syntax,
    );
}

#[test]
fn f3_function_pointers_passed_to_map_are_forbidden() {
    rejected_at_compile(
        &crate::support::sandbox(),
        r#"context.list.map(Fn("abs")).len() > 0"#,
        &["list"],
        ErrorKind::ForbiddenSymbol,
    );
}

// ---------------------------------------------------------------- F4: index assignment growth

#[test]
fn f4_index_assignment_is_a_syntax_error() {
    rejected_at_compile(
        &crate::support::sandbox(),
        r#"context.m["k"] = "x""#,
        &["m"],
        ErrorKind::Syntax,
    );
}

// ---------------------------------------------------------------- F5: one-call allocations

#[test]
fn f5_pad_of_gigabytes_in_one_call_is_refused() {
    fails_closed(
        &crate::support::sandbox(),
        r#"(context.s + "").pad(2000000000, "y").len() > 0"#,
        &["s"],
        &context(),
        ErrorKind::DataTooLarge,
        quick(),
    );
}

// ---------------------------------------------------------------- F6: compile-time folding

#[test]
fn f6_constant_calls_are_not_run_at_compile_time() {
    // `config` is folded into the AST, so every call below has constant arguments. Under full
    // optimisation each would run while compiling, where no deadline applies. Here compiling
    // costs a small fraction of evaluating, and evaluation is what the deadline stops.
    let big: Vec<i64> = (0..256).collect();
    let other: Vec<i64> = (1000..1256).collect();
    let config: BTreeMap<String, Value> = [
        ("big".to_string(), json!(big)),
        ("other".to_string(), json!(other)),
    ]
    .into_iter()
    .collect();
    // 50 calls: a chain of `||` counts against the parse-time depth limit of 64.
    let predicate = vec!["any_in(config.big, config.other)"; 50].join(" || ");
    // Operation limits out of the way (each call is charged 4,096 operations). The charge is
    // made when a call runs, so what evaluation is charged shows where the calls ran: folded
    // at compile time, evaluation would read one constant for a handful of operations.
    let unhurried = sandbox_with(|l| {
        l.deadline_us = 5_000_000;
        l.decision_deadline_us = 5_000_000;
        l.max_operations = 10_000_000;
        l.decision_max_operations = 100_000_000;
    });
    let program = unhurried
        .compile(&predicate, &[], &config)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut bindings = spectral::sandbox::Input::new().seal();
    let outcome = unhurried
        .eval(&program, &mut bindings)
        .unwrap_or_else(|f| panic!("{}", f.error));
    assert!(!outcome.value);
    assert!(
        outcome.operations >= 50 * 4_096,
        "evaluation was charged {} operations: the calls ran at compile time",
        outcome.operations
    );
    // With the default operation limit the same predicate fails closed: its helper calls are
    // charged past it, however fast the machine (the deadline is the tests' generous one, so
    // a busy machine's clock does not decide the kind).
    let sandbox = crate::support::sandbox();
    let program = sandbox
        .compile(&predicate, &[], &config)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut bindings = spectral::sandbox::Input::new().seal();
    let failure = sandbox
        .eval(&program, &mut bindings)
        .err()
        .map(|f| f.error.kind);
    assert_eq!(failure, Some(ErrorKind::TooManyOperations));
}

// ---------------------------------------------------------------- F7: the interner lock

#[test]
fn f7_the_string_interner_is_off() {
    assert_eq!(Sandbox::default().strings_interned_limit(), 0);
}

// ---------------------------------------------------------------- F8: depth

#[test]
fn f8_nesting_a_million_deep_is_refused_before_parsing() {
    let predicate = format!("{}true{}", "(".repeat(1_000_000), ")".repeat(1_000_000));
    rejected_at_compile(
        &crate::support::sandbox(),
        &predicate,
        &[],
        ErrorKind::SourceTooLarge,
    );
}

#[test]
fn f8_nesting_a_million_deep_hits_the_depth_limit_even_without_a_source_cap() {
    let sandbox = sandbox_with(|l| l.max_source_bytes = 4 << 20);
    let predicate = format!("{}true{}", "(".repeat(1_000_000), ")".repeat(1_000_000));
    rejected_at_compile(&sandbox, &predicate, &[], ErrorKind::ExpressionTooDeep);
}

#[test]
fn f8_deep_nesting_within_the_source_cap_hits_the_depth_limit() {
    let sandbox = crate::support::sandbox();
    for (open, close) in [("(", ")"), ("[", "]"), ("!", ""), ("abs(", ")")] {
        let predicate = format!("{}1{} == 1", open.repeat(500), close.repeat(500));
        rejected_at_compile(&sandbox, &predicate, &[], ErrorKind::ExpressionTooDeep);
    }
}

#[test]
fn f8_long_operator_chains_hit_the_depth_limit() {
    let predicate = format!("context.n{} > 0", " + 1".repeat(500));
    rejected_at_compile(
        &crate::support::sandbox(),
        &predicate,
        &["n"],
        ErrorKind::ExpressionTooDeep,
    );
}

#[test]
fn source_of_one_megabyte_is_refused() {
    let predicate = format!("true || {}", "1 == 1 || ".repeat(100_000)) + "false";
    assert!(predicate.len() > 1_000_000);
    rejected_at_compile(
        &crate::support::sandbox(),
        &predicate,
        &[],
        ErrorKind::SourceTooLarge,
    );
}

// ---------------------------------------------------------------- F9: expensive single operations

#[test]
fn f9_pad_chain_is_stopped_by_the_deadline() {
    // 220 calls, each allocating just under the string limit: few operations, much CPU.
    let sandbox = Sandbox::default();
    // 220 calls in groups of 40, because one chain of `||` counts against the depth limit.
    let one = "(\"a\"+context.s).pad(9999,\"a\")==\"\"";
    let groups: Vec<String> = [40, 40, 40, 40, 40, 20]
        .iter()
        .map(|&n| format!("({})", vec![one; n].join(" || ")))
        .collect();
    let predicate = groups.join(" || ");
    assert!(predicate.len() <= sandbox.limits().max_source_bytes);
    fails_closed(
        &sandbox,
        &predicate,
        &["s"],
        &context(),
        ErrorKind::DeadlineExceeded,
        Duration::from_millis(200),
    );
}

#[test]
fn f9_pad_with_an_empty_padding_returns() {
    // Found by the `predicate` fuzz target: Rhai's own `pad` loops forever, within a single
    // operation, when the padding is empty. The sandbox's `pad` leaves the string as it is,
    // and the rule after it is evaluated as usual.
    let sandbox = crate::support::sandbox();
    let predicate = r#"("a" + context.s).pad(9999, "") == () && (context.s + "b").len() == 4"#;
    let world = compile(&one_rule_world(predicate, &["s"]), &sandbox);
    let decision = decide(&world, &sandbox, "probe.run", &context());
    assert_eq!(decision.decision_metadata.errors, vec![], "{decision:?}");
    let matched: Vec<&str> = decision
        .decision_metadata
        .matched_rules
        .iter()
        .map(|r| r.id.as_str())
        .collect();
    assert_eq!(matched, ["probe"], "{decision:?}");
}

// ---------------------------------------------------------------- F10: container growth

#[test]
fn f10_large_array_literal_is_refused_at_compile_time() {
    let predicate = format!("[{}].len() > 0", vec!["1"; 2000].join(","));
    let sandbox = sandbox_with(|l| l.max_source_bytes = 64 * 1024);
    rejected_at_compile(&sandbox, &predicate, &[], ErrorKind::LiteralTooLarge);
}

#[test]
fn f10_array_growth_at_runtime_hits_the_size_limit() {
    let list: Vec<i64> = (0..600).collect();
    fails_closed(
        &crate::support::sandbox(),
        "(context.list + context.list).len() > 0",
        &["list"],
        &json!({"list": list}),
        ErrorKind::DataTooLarge,
        quick(),
    );
}

#[test]
fn f10_map_growth_at_runtime_hits_the_size_limit() {
    let a: serde_json::Map<String, Value> = (0..600).map(|i| (format!("a{i}"), json!(i))).collect();
    let b: serde_json::Map<String, Value> = (0..600).map(|i| (format!("b{i}"), json!(i))).collect();
    fails_closed(
        &crate::support::sandbox(),
        "(context.m + context.m2).len() > 0",
        &["m", "m2"],
        &json!({"m": a, "m2": b}),
        ErrorKind::DataTooLarge,
        quick(),
    );
}

#[test]
fn string_growth_at_runtime_hits_the_size_limit() {
    fails_closed(
        &crate::support::sandbox(),
        "(context.s + context.s).len() > 0",
        &["s"],
        &json!({"s": "x".repeat(10_000)}),
        ErrorKind::DataTooLarge,
        quick(),
    );
}

// ---------------------------------------------------------------- F11: host panics

#[test]
fn f11_helpers_return_errors_instead_of_panicking() {
    let sandbox = crate::support::sandbox();
    fails_closed(
        &sandbox,
        r#"hour_in(9223372036854775807, "UTC") == 1"#,
        &[],
        &context(),
        ErrorKind::Helper,
        quick(),
    );
    fails_closed(
        &sandbox,
        r#"hour_in(context.t, "Mars/Olympus") == 1"#,
        &["t"],
        &context(),
        ErrorKind::Helper,
        quick(),
    );
    fails_closed(
        &sandbox,
        r#"days_between(-9223372036854775807, 9223372036854775807) > 0"#,
        &[],
        &context(),
        ErrorKind::Helper,
        quick(),
    );
}

// ---------------------------------------------------------------- the language itself

#[test]
fn loops_are_a_syntax_error() {
    let sandbox = crate::support::sandbox();
    for predicate in [
        "loop {}",
        "while true {}",
        "for x in context.list {}",
        "do {} while true",
    ] {
        let inputs: &[&str] = if predicate.contains("list") {
            &["list"]
        } else {
            &[]
        };
        rejected_at_compile(&sandbox, predicate, inputs, ErrorKind::Syntax);
    }
}

#[test]
fn let_is_a_syntax_error() {
    rejected_at_compile(
        &crate::support::sandbox(),
        "let x = 1; x == 1",
        &[],
        ErrorKind::Syntax,
    );
}

#[test]
fn fn_definitions_are_a_syntax_error() {
    rejected_at_compile(
        &crate::support::sandbox(),
        "fn f() { f() } f()",
        &[],
        ErrorKind::Syntax,
    );
}

#[test]
fn eval_is_disabled() {
    let sandbox = crate::support::sandbox();
    rejected_at_compile(&sandbox, r#"eval("true")"#, &[], ErrorKind::Syntax);
    rejected_at_compile(
        &sandbox,
        r#"Fn("ev" + "al").call("true")"#,
        &[],
        ErrorKind::ForbiddenSymbol,
    );
}

#[test]
fn undeclared_attribute_is_refused() {
    rejected_at_compile(
        &crate::support::sandbox(),
        "context.n > 1 && context.s == \"x\"",
        &["n"],
        ErrorKind::UndeclaredInput,
    );
}

#[test]
fn computed_attribute_names_are_refused() {
    rejected_at_compile(
        &crate::support::sandbox(),
        r#"context["s" + ""] == "x""#,
        &["s"],
        ErrorKind::UndeclaredInput,
    );
}

#[test]
fn reading_the_whole_context_is_refused() {
    rejected_at_compile(
        &crate::support::sandbox(),
        "context.len() > 0",
        &[],
        ErrorKind::UndeclaredInput,
    );
}

#[test]
fn unknown_config_is_refused() {
    rejected_at_compile(
        &crate::support::sandbox(),
        "context.n > config.nope",
        &["n"],
        ErrorKind::UnknownConfig,
    );
}

#[test]
fn integer_overflow_fails_closed() {
    fails_closed(
        &crate::support::sandbox(),
        "context.n + 9223372036854775807 > 0",
        &["n"],
        &context(),
        ErrorKind::Arithmetic,
        quick(),
    );
}

#[test]
fn division_by_zero_fails_closed() {
    fails_closed(
        &crate::support::sandbox(),
        "context.n / (context.n - 5) > 0",
        &["n"],
        &context(),
        ErrorKind::Arithmetic,
        quick(),
    );
}

#[test]
fn non_bool_result_fails_closed() {
    fails_closed(
        &crate::support::sandbox(),
        "context.n + 1",
        &["n"],
        &context(),
        ErrorKind::NonBoolResult,
        quick(),
    );
}

#[test]
fn a_constant_non_bool_is_refused_at_compile_time() {
    rejected_at_compile(
        &crate::support::sandbox(),
        r#""yes""#,
        &[],
        ErrorKind::NotBool,
    );
}

#[test]
fn operation_limit_fails_closed() {
    let sandbox = sandbox_with(|l| l.max_operations = 50);
    let predicate = vec!["context.n * 2 > 0"; 40].join(" && ");
    fails_closed(
        &sandbox,
        &predicate,
        &["n"],
        &context(),
        ErrorKind::TooManyOperations,
        quick(),
    );
}

#[test]
fn call_depth_cannot_be_reached_by_nesting_calls() {
    // Predicates cannot define functions, so the only way to nest calls is to nest call
    // expressions, which the parser's depth limit stops first.
    let sandbox = sandbox_with(|l| l.max_call_levels = 2);
    let predicate = format!("{}context.n{} > 0", "abs(".repeat(100), ")".repeat(100));
    rejected_at_compile(&sandbox, &predicate, &["n"], ErrorKind::ExpressionTooDeep);
}

#[test]
fn reading_an_absent_optional_attribute_fails_closed() {
    fails_closed(
        &crate::support::sandbox(),
        "hour_in(context.t, \"UTC\") > 3",
        &["t"],
        &json!({}),
        ErrorKind::PropertyNotFound,
        quick(),
    );
}

#[test]
fn the_server_keeps_working_after_every_attack() {
    // One sandbox through a run of attacks, then an ordinary predicate still answers.
    let sandbox = crate::support::sandbox();
    for predicate in [
        r#"(context.s + "").pad(2000000000, "y").len() > 0"#,
        "context.n + 9223372036854775807 > 0",
        "sleep(3) == ()",
    ] {
        let inputs: &[&str] = if predicate.contains("context.s") {
            &["s"]
        } else if predicate.contains("context.n") {
            &["n"]
        } else {
            &[]
        };
        let world = compile(&one_rule_world(predicate, inputs), &sandbox);
        let d = decide(&world, &sandbox, "probe.run", &context());
        assert!(d.status >= Status::Yellow);
    }
    let world = compile(&one_rule_world("context.n == 5", &["n"]), &sandbox);
    let d = decide(&world, &sandbox, "probe.run", &context());
    assert_eq!(d.status, Status::Green);
    assert_eq!(d.decision_metadata.matched_rules.len(), 1);
    assert!(d.decision_metadata.errors.is_empty());
}

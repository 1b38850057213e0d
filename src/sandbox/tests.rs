//! Unit tests of the sandbox: compilation, static checks and evaluation.

use std::collections::BTreeMap;

use super::*;

fn config() -> BTreeMap<String, serde_json::Value> {
    [
        ("limit".to_string(), serde_json::json!(10)),
        ("countries".to_string(), serde_json::json!(["US", "CA"])),
    ]
    .into_iter()
    .collect()
}

fn inputs(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn eval_with(source: &str, names: &[&str], ctx: serde_json::Value) -> Result<bool, ErrorKind> {
    let sandbox = Sandbox::default();
    let program = sandbox
        .compile(source, &inputs(names), &config())
        .map_err(|e| e.kind)?;
    let mut input = Input::new();
    if let serde_json::Value::Object(map) = ctx {
        for (k, v) in &map {
            input
                .insert(k, v, sandbox.limits())
                .map_err(|_| ErrorKind::DataTooLarge)?;
        }
    }
    let mut bindings = input.seal();
    sandbox
        .eval(&program, &mut bindings)
        .map(|o| o.value)
        .map_err(|f| f.error.kind)
}

#[test]
fn reads_are_collected_from_every_access_form() {
    let sandbox = Sandbox::default();
    let p = sandbox
        .compile_reads(
            r#"context.a > 1 && context["b"] == "x" && "c" in context && context.d.e == 2 && context.f[0] == 1 && context.n in config.countries"#,
            &config(),
        )
        .map_err(|e| e.to_string());
    let reads = p.map(|p| p.reads().clone());
    let reads = reads.unwrap_or_default();
    assert_eq!(
        reads.context.iter().map(String::as_str).collect::<Vec<_>>(),
        ["a", "b", "c", "d", "f", "n"]
    );
    assert_eq!(
        reads.config.iter().map(String::as_str).collect::<Vec<_>>(),
        ["countries"]
    );
}

#[test]
fn declared_inputs_must_equal_the_reads() {
    let sandbox = Sandbox::default();
    let err = sandbox
        .compile("context.a > 1", &inputs(&["a", "b"]), &config())
        .err();
    assert_eq!(
        err.as_ref().map(|e| e.kind),
        Some(ErrorKind::UndeclaredInput)
    );
    assert!(err.is_some_and(|e| e
        .message
        .contains("declares input(s) 'b' but never reads them")));
    assert!(sandbox
        .compile("context.a > 1", &inputs(&["a"]), &config())
        .is_ok());
}

#[test]
fn config_constants_are_folded_into_the_ast() {
    // `config` is not bound at evaluation, so this only works if the constant was folded.
    assert_eq!(
        eval_with(
            "context.n > config.limit",
            &["n"],
            serde_json::json!({"n": 11})
        ),
        Ok(true)
    );
    assert_eq!(
        eval_with(
            "context.c in config.countries",
            &["c"],
            serde_json::json!({"c": "MX"})
        ),
        Ok(false)
    );
}

#[test]
fn config_cannot_be_indexed_or_called_through() {
    for src in [
        "(config.countries).len() > 1",
        "config.countries[0] == \"US\"",
        "config.len() > 0",
    ] {
        let err = Sandbox::default().compile(src, &[], &config()).err();
        assert_eq!(err.map(|e| e.kind), Some(ErrorKind::UnknownConfig), "{src}");
    }
}

#[test]
fn integers_and_floats_compare_by_value() {
    let ctx = serde_json::json!({"x": 250.5, "y": 250});
    assert_eq!(eval_with("context.x < 1000", &["x"], ctx.clone()), Ok(true));
    assert_eq!(
        eval_with("context.y < 1000.0", &["y"], ctx.clone()),
        Ok(true)
    );
    assert_eq!(eval_with("context.y == 250.0", &["y"], ctx), Ok(true));
}

#[test]
fn membership_in_context_guards_optional_attributes() {
    let src = r#"!("tag" in context) || context.tag == "vip""#;
    assert_eq!(eval_with(src, &["tag"], serde_json::json!({})), Ok(true));
    assert_eq!(
        eval_with(src, &["tag"], serde_json::json!({"tag": "x"})),
        Ok(false)
    );
    // Reading it unguarded fails rather than comparing `()`.
    assert_eq!(
        eval_with("context.tag == \"vip\"", &["tag"], serde_json::json!({})),
        Err(ErrorKind::PropertyNotFound)
    );
}

#[test]
fn operations_are_counted_per_evaluation() {
    let sandbox = Sandbox::default();
    let program = sandbox
        .compile(
            "context.a > 1 && context.a < 10",
            &inputs(&["a"]),
            &config(),
        )
        .map_err(|e| e.to_string());
    let program = program.unwrap_or_else(|e| unreachable!("{e}"));
    let mut input = Input::new();
    input.insert_int("a", 5);
    let mut bindings = input.seal();
    let first = sandbox.eval(&program, &mut bindings).map(|o| o.operations);
    let second = sandbox.eval(&program, &mut bindings).map(|o| o.operations);
    assert!(first.as_ref().is_ok_and(|&n| n > 2), "{first:?}");
    assert_eq!(first, second);
}

#[test]
fn errors_carry_their_position() {
    let err = Sandbox::default()
        .compile("context.a >\n  ) 1", &inputs(&["a"]), &config())
        .err();
    assert_eq!(err.as_ref().map(|e| e.kind), Some(ErrorKind::Syntax));
    assert_eq!(err.and_then(|e| e.position).map(|p| p.line), Some(2));
}

#[test]
fn values_beyond_the_size_limits_are_refused_on_input() {
    let sandbox = Sandbox::new(Limits {
        max_array_len: 3,
        max_string_bytes: 8,
        ..Limits::default()
    });
    let mut input = Input::new();
    assert!(input
        .insert("a", &serde_json::json!([1, 2, 3]), sandbox.limits())
        .is_ok());
    assert!(input
        .insert("b", &serde_json::json!([1, 2, 3, 4]), sandbox.limits())
        .is_err());
    assert!(input
        .insert("c", &serde_json::json!([[1, 2], [3, 4]]), sandbox.limits())
        .is_err());
    assert!(input
        .insert("d", &serde_json::json!("0123456789"), sandbox.limits())
        .is_err());
    assert!(input
        .insert(
            "e",
            &serde_json::json!({"k": ["abcd", "efgh", "i"]}),
            sandbox.limits()
        )
        .is_err());
}

#[test]
fn deadline_is_cleared_after_each_evaluation() {
    // A failing evaluation must not leave a stale deadline that aborts the next one.
    // Operation limits out of the way: the clock is what must stop the slow predicate.
    let sandbox = Sandbox::new(Limits {
        deadline_us: 1_000,
        max_operations: 10_000_000,
        decision_max_operations: 100_000_000,
        ..Limits::default()
    });
    let slow = vec!["any_in(config.big, config.other)"; 40].join(" || ");
    let big: Vec<i64> = (0..256).collect();
    let other: Vec<i64> = (1000..1256).collect();
    let cfg: BTreeMap<String, serde_json::Value> = [
        ("big".to_string(), serde_json::json!(big)),
        ("other".to_string(), serde_json::json!(other)),
    ]
    .into_iter()
    .collect();
    let slow = sandbox.compile(&slow, &[], &cfg).map_err(|e| e.to_string());
    // Not foldable, and long enough that the clock is read: a stale deadline would stop it.
    let fast = vec!["any_in([1, 2], [3, 4])"; 24].join(" || ");
    let fast = sandbox.compile(&fast, &[], &cfg).map_err(|e| e.to_string());
    let (Ok(slow), Ok(fast)) = (slow, fast) else {
        unreachable!("both compile")
    };
    let mut bindings = Input::new().seal();
    let err = sandbox
        .eval(&slow, &mut bindings)
        .err()
        .map(|f| f.error.kind);
    assert_eq!(err, Some(ErrorKind::DeadlineExceeded));
    std::thread::sleep(std::time::Duration::from_millis(2));
    assert_eq!(
        sandbox.eval(&fast, &mut bindings).map(|o| o.value).ok(),
        Some(false)
    );
}

fn program(sandbox: &Sandbox, source: &str, names: &[&str]) -> Program {
    match sandbox.compile(source, &inputs(names), &config()) {
        Ok(p) => p,
        Err(e) => unreachable!("{source} compiles: {e}"),
    }
}

#[test]
fn a_batch_gives_way_on_a_unit_result_and_marks_only_guards_that_did_not_hold() {
    let sandbox = Sandbox::default();
    let guard = program(&sandbox, "context.n > 100", &["n"]);
    let yes = program(&sandbox, "context.n > 1", &["n"]);
    let unit = program(&sandbox, "if context.n > 100 { false }", &["n"]);
    let mut input = Input::new();
    input.insert_int("n", 5);
    let mut bindings = input.seal();
    let budget = sandbox.budget();
    // A guard that does not hold is the marker; a predicate's own () is not.
    let batch = sandbox.batch(&[(Some(&guard), &yes), (None, &yes)]);
    let outcome = batch.and_then(|b| sandbox.eval_batch(&b, &mut bindings, &budget, 2_000));
    assert_eq!(outcome.map(|o| o.results), Some(vec![None, Some(true)]));
    let batch = sandbox.batch(&[(None, &yes), (None, &unit)]);
    let outcome = batch.and_then(|b| sandbox.eval_batch(&b, &mut bindings, &budget, 2_000));
    assert_eq!(outcome, None);
    // One by one, the same () fails closed.
    let err = sandbox
        .eval(&unit, &mut bindings)
        .err()
        .map(|f| f.error.kind);
    assert_eq!(err, Some(ErrorKind::NonBoolResult));
}

#[test]
fn every_rule_of_a_decision_draws_on_one_budget() {
    let sandbox = Sandbox::new(Limits {
        decision_max_operations: 600,
        ..Limits::default()
    });
    // 64×64 comparisons are charged as 256 operations, plus the engine's own.
    let heavy = program(&sandbox, "any_in(context.a, context.b)", &["a", "b"]);
    let list: Vec<i64> = (0..64).collect();
    let other: Vec<i64> = (100..164).collect();
    let mut input = Input::new();
    let limits = sandbox.limits().clone();
    assert!(input.insert("a", &serde_json::json!(list), &limits).is_ok());
    assert!(input
        .insert("b", &serde_json::json!(other), &limits)
        .is_ok());
    let mut bindings = input.seal();
    let mut budget = sandbox.budget();
    let first = sandbox.eval_within(&heavy, &mut bindings, &mut budget);
    let used = first.as_ref().map(|o| o.operations).unwrap_or(0);
    assert!(
        used >= 256,
        "the helper's comparisons were charged: {first:?}"
    );
    assert!(sandbox
        .eval_within(&heavy, &mut bindings, &mut budget)
        .is_ok());
    let third = sandbox.eval_within(&heavy, &mut bindings, &mut budget);
    assert_eq!(
        third.err().map(|f| f.error.kind),
        Some(ErrorKind::BudgetExceeded)
    );
    assert_eq!(budget.operations, 0);
    // Spent is spent: the next rule fails at once.
    let fourth = sandbox.eval_within(&heavy, &mut bindings, &mut budget);
    assert_eq!(
        fourth.map_err(|f| (f.error.kind, f.operations)).err(),
        Some((ErrorKind::BudgetExceeded, 0))
    );
    // Each rule alone has its own budget.
    assert!(sandbox.eval(&heavy, &mut bindings).is_ok());
}

#[test]
fn folding_a_constant_into_many_places_is_refused_before_folding() {
    let big: Vec<i64> = (0..1024).collect();
    let config: BTreeMap<String, serde_json::Value> = [("big".to_string(), serde_json::json!(big))]
        .into_iter()
        .collect();
    let sandbox = Sandbox::default();
    let few = format!("[{}].len() > 0", ["config.big"; 4].join(", "));
    assert!(sandbox.compile(&few, &[], &config).is_ok());
    let many = format!("[{}].len() > 0", ["config.big"; 80].join(", "));
    let err = sandbox.compile(&many, &[], &config).err().map(|e| e.kind);
    assert_eq!(err, Some(ErrorKind::ModuleTooLarge));
}

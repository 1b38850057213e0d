//! The differential property test of evaluation: generated worlds and contexts, decided on
//! the production path (rules batched into one engine call), on the explain path (rules one
//! by one, timed) and by the case runner (one rule at a time, its own inputs only). All three
//! must give the same status, the same matched rules and the same error kinds.
//!
//! The generator leans on what once broke the batch: predicates that return `()` (`if`
//! without `else`, `switch` without a default), other non-bool results, runtime errors, and
//! sources that begin or end with comments of every kind (line, block, nested, unterminated)
//! next to rules whose strings hold comment and bracket tokens.
//!
//! It was checked against both bugs it exists for, each restored in a scratch build: reading a
//! `()` batch result as "the guard did not hold" fails it at once (a rule `if … { false }`
//! answered GREEN on the batch, YELLOW with `non_bool_result` one by one), and so does joining
//! the rules' source text into one program (an unterminated comment swallowed a matching rule).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use spectral::sandbox::Sandbox;
use spectral::worlds::context::{self, Bound};
use spectral::worlds::model::{
    Action, AttrType, Attribute, Case, Rule, Severity, Status, WorldModel,
};
use spectral::worlds::{self, ContextJson, Request};

use crate::support::system;

/// A piece of predicate source and the context attributes it reads.
#[derive(Debug, Clone)]
struct Source {
    text: String,
    reads: BTreeSet<&'static str>,
}

fn src(text: impl Into<String>, reads: &[&'static str]) -> Source {
    Source {
        text: text.into(),
        reads: reads.iter().copied().collect(),
    }
}

/// Expressions that evaluate to a bool.
fn boolean() -> impl Strategy<Value = Source> {
    let leaf = prop_oneof![
        (0i64..8).prop_map(|k| src(format!("context.n < {k}"), &["n"])),
        Just(src("context.n >= config.limit", &["n"])),
        Just(src("context.flag", &["flag"])),
        Just(src("!context.flag", &["flag"])),
        prop_oneof![Just("x"), Just("y")]
            .prop_map(|v| src(format!("context.s == \"{v}\""), &["s"])),
        Just(src("context.s in config.names", &["s"])),
        Just(src("\"a\" in context.list", &["list"])),
        // Strings that hold comment and bracket tokens.
        Just(src("\"*/ && false), (false //\" == \"\"", &[])),
        Just(src("\"*/ */ ) ] } //\" != \"\"", &[])),
        Just(src("\"/* ( [ {\" == \"x\"", &[])),
    ];
    leaf.prop_recursive(2, 6, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| join(&a, " && ", &b)),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| join(&a, " || ", &b)),
            inner.prop_map(|a| src(format!("!({})", a.text), &[]).with(&a)),
        ]
    })
}

/// Expressions that do not always evaluate to a bool, or fail at run time.
fn non_boolean() -> impl Strategy<Value = Source> {
    prop_oneof![
        boolean().prop_map(|b| src(format!("if {} {{ false }}", b.text), &[]).with(&b)),
        boolean()
            .prop_map(|b| src(format!("if {} {{ true }} else {{ () }}", b.text), &[]).with(&b)),
        Just(src(
            r#"switch context.s { "x" => true, "y" => false }"#,
            &["s"]
        )),
        boolean().prop_map(
            |b| src(format!("if {} {{ \"yes\" }} else {{ false }}", b.text), &[]).with(&b)
        ),
        boolean().prop_map(|b| src(format!("if {} {{ 1 }} else {{ true }}", b.text), &[]).with(&b)),
        Just(src("context.n / (context.n - 3) > 0", &["n"])),
        Just(src("context.list[1] == \"a\"", &["list"])),
    ]
}

fn expression() -> impl Strategy<Value = Source> {
    prop_oneof![3 => boolean(), 2 => non_boolean()]
}

/// Comments around a source: at the start, at the end, unterminated, nested.
fn wrapped(inner: impl Strategy<Value = Source>) -> impl Strategy<Value = Source> {
    (inner, 0usize..8).prop_map(|(s, how)| {
        let text = match how {
            0 => format!("/* leading ) ] }} */ {}", s.text),
            1 => format!("// leading ) ] }}\n{}", s.text),
            2 => format!("{} // trailing ( [ {{", s.text),
            3 => format!("{} /*", s.text),
            4 => format!("{} /* outer /* inner */", s.text),
            5 => format!("/* a /* nested */ one */ {}\n", s.text),
            _ => s.text.clone(),
        };
        Source { text, ..s }
    })
}

fn join(a: &Source, op: &str, b: &Source) -> Source {
    src(format!("({}){op}({})", a.text, b.text), &[])
        .with(a)
        .with(b)
}

impl Source {
    fn with(mut self, other: &Source) -> Self {
        self.reads.extend(other.reads.iter().copied());
        self
    }
}

#[derive(Debug, Clone)]
struct GenRule {
    severity: Severity,
    outcome: Status,
    guard: Option<Source>,
    predicate: Source,
}

fn rule() -> impl Strategy<Value = GenRule> {
    (
        prop_oneof![Just(Severity::T1), Just(Severity::T2), Just(Severity::T3)],
        prop_oneof![
            Just(Status::Green),
            Just(Status::GreenSkip),
            Just(Status::Yellow),
            Just(Status::Red)
        ],
        prop::option::weighted(0.3, wrapped(expression())),
        wrapped(expression()),
    )
        .prop_map(|(severity, outcome, guard, predicate)| GenRule {
            severity,
            outcome,
            guard,
            predicate,
        })
}

fn schema() -> BTreeMap<String, Attribute> {
    let mut m = BTreeMap::new();
    m.insert("n".into(), Attribute::of(AttrType::Integer));
    m.insert("flag".into(), Attribute::of(AttrType::Bool));
    m.insert("s".into(), Attribute::of(AttrType::String));
    m.insert("list".into(), Attribute::of(AttrType::List));
    m
}

fn context() -> impl Strategy<Value = Value> {
    (
        0i64..8,
        any::<bool>(),
        prop_oneof![Just("x"), Just("y"), Just("z")],
        prop::collection::vec(prop_oneof![Just("a"), Just("b")], 0..3),
    )
        .prop_map(|(n, flag, s, list)| json!({"n": n, "flag": flag, "s": s, "list": list}))
}

/// A world of the generated rules that compile alone (as an author's would, one by one).
fn world(sandbox: &Sandbox, rules: &[GenRule]) -> WorldModel {
    let config: BTreeMap<String, Value> = [
        ("limit".to_string(), json!(4)),
        ("names".to_string(), json!(["x", "z"])),
    ]
    .into_iter()
    .collect();
    let compiles = |s: &Source| sandbox.compile_reads(&s.text, &config).is_ok();
    let rules = rules
        .iter()
        .filter(|r| compiles(&r.predicate) && r.guard.as_ref().is_none_or(compiles))
        .enumerate()
        .map(|(i, r)| {
            let mut inputs = r.predicate.reads.clone();
            if let Some(g) = &r.guard {
                inputs.extend(g.reads.iter().copied());
            }
            Rule {
                id: format!("rule-{i}"),
                text: "generated".into(),
                severity: r.severity,
                outcome: r.outcome,
                inputs: inputs.into_iter().map(String::from).collect(),
                applies_when: r.guard.as_ref().map(|g| g.text.clone()),
                predicate: r.predicate.text.clone(),
                work_frame: None,
                provenance: None,
                cases: vec![Case {
                    name: String::new(),
                    context: Map::new(),
                    matches: true,
                }],
            }
        })
        .collect();
    WorldModel {
        record_context: Default::default(),
        world: "generated".into(),
        description: String::new(),
        context: schema(),
        config,
        actions: vec![Action {
            name: "probe.run".into(),
            description: String::new(),
            aggregation: Default::default(),
            work_frames: BTreeMap::new(),
            rules,
        }],
    }
}

/// What must not depend on the path: status, matched rules, and (rule, error kind) pairs.
type Verdict = (Status, Vec<String>, Vec<(String, String)>);

fn verdict(d: &spectral::worlds::Decision) -> Verdict {
    let m = &d.decision_metadata;
    (
        d.status,
        m.matched_rules.iter().map(|r| r.id.clone()).collect(),
        m.errors
            .iter()
            .map(|e| (e.rule.clone().unwrap_or_default(), e.kind.clone()))
            .collect(),
    )
}

fn sandbox() -> &'static Sandbox {
    static SANDBOX: std::sync::OnceLock<Sandbox> = std::sync::OnceLock::new();
    SANDBOX.get_or_init(crate::support::sandbox)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn production_explain_and_case_runner_agree(
        rules in prop::collection::vec(rule(), 1..6),
        contexts in prop::collection::vec(context(), 1..4),
    ) {
        let sandbox = sandbox();
        let model = world(sandbox, &rules);
        let Ok(compiled) = worlds::compile(&model, 1, sandbox) else {
            // Every rule compiled alone; a world of them must too.
            return Err(TestCaseError::fail(format!("{model:#?} does not compile")));
        };
        let Some(module) = compiled.module("probe.run") else {
            return Err(TestCaseError::fail("no module"));
        };
        for ctx in &contexts {
            let decide = |explain| {
                let request = Request {
                    context: ContextJson::Value(ctx),
                    system: system(),
                    correlation_id: None,
                    explain,
                };
                worlds::evaluate(sandbox, module, &request).map(|d| verdict(&d))
            };
            let production = decide(false).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let explained = decide(true).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&production, &explained, "context {}", ctx);

            // The case runner's view of each rule: what `run_cases` computes for a case with
            // this context, the rule's own inputs bound and nothing else.
            let (_, matched, errors) = &production;
            for (index, rule) in module.rules.iter().enumerate() {
                let attrs: Vec<(String, Attribute)> = module
                    .attrs
                    .iter()
                    .filter(|(name, _)| rule.source.inputs.contains(name))
                    .cloned()
                    .collect();
                let Bound::Ready(mut bindings) =
                    context::bind_value(&attrs, ctx, None, sandbox.limits())
                else {
                    return Err(TestCaseError::fail("a generated context binds"));
                };
                let run = module.run_rule(sandbox, index, &mut bindings);
                let id = &rule.source.id;
                prop_assert_eq!(run.matched, matched.contains(id), "rule {} on {}", id, ctx);
                let kind = errors.iter().find(|(r, _)| r == id).map(|(_, k)| k.as_str());
                prop_assert_eq!(
                    run.error.as_ref().map(|e| e.kind.as_str()),
                    kind,
                    "rule {} on {}",
                    id,
                    ctx
                );
            }
            // Where no rule fails, the batch itself must have answered, and the same: the
            // test would otherwise only compare the one-by-one path with itself.
            if errors.is_empty() {
                let Bound::Ready(mut bindings) =
                    context::bind_value(&module.attrs, ctx, Some(&system()), sandbox.limits())
                else {
                    return Err(TestCaseError::fail("a generated context binds"));
                };
                let Some(batch) = module.run_batch(sandbox, &mut bindings) else {
                    return Err(TestCaseError::fail(format!("the batch gave way on {ctx}")));
                };
                let batch_matched: Vec<&String> = module
                    .rules
                    .iter()
                    .zip(&batch.runs)
                    .filter(|(_, run)| run.matched)
                    .map(|(rule, _)| &rule.source.id)
                    .collect();
                let mut sorted = matched.iter().collect::<Vec<_>>();
                sorted.sort();
                let mut batch_sorted = batch_matched.clone();
                batch_sorted.sort();
                prop_assert_eq!(sorted, batch_sorted, "context {}", ctx);
            }
            // Fail closed: an error anywhere is never green.
            if !errors.is_empty() {
                prop_assert!(production.0 >= Status::Yellow, "{:?}", production);
            }
        }
    }
}

//! The `verify` node of the authoring graph: deterministic, no model. A candidate rule is put
//! into its action beside the rules already there and the whole world is compiled with the
//! same static checks as a publish; then the candidate's derived cases and every existing case
//! of the action run in the same sandbox. Failures are classified so that `repair` knows what to
//! fix: *mechanical* (the rule does not compile, reads what it did not declare, hits a limit, a
//! case does not fit the schema) or *semantic* (it compiles and runs, and disagrees with a case).

use serde::Serialize;

use crate::sandbox::{ErrorKind, Sandbox};
use crate::worlds::cases::{self, CaseFailure};
use crate::worlds::compile;
use crate::worlds::model::{Case, Rule, WorldModel};
use crate::worlds::problem::{Locus, Which};

/// What kind of fix a failure asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The rule cannot be run as written: it does not compile, breaks a static check or a limit,
    /// or a case cannot be bound to the schema.
    Mechanical,
    /// The rule runs and disagrees with one of its cases.
    Semantic,
}

/// One problem found by verification, in words fit to show an operator and to send back to
/// the model that wrote the rule.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Diagnostic {
    pub class: FailureClass,
    /// Where: `rule`, `predicate`, `applies_when`, `case 3`, `rule <id> case 2`.
    pub at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    pub message: String,
}

/// Whose case a check ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "of")]
pub enum CaseOrigin {
    /// A case derived for the candidate, independently of its predicate.
    Derived,
    /// A case of a rule already in the action.
    Existing { rule: String },
}

/// One case run against the world with the candidate in it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Check {
    #[serde(flatten)]
    pub origin: CaseOrigin,
    /// 1-based, in the order of the rule's cases.
    pub case: usize,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub name: String,
    pub expected: bool,
    /// `matched`, `not matched`, or why the rule could not run.
    pub actual: String,
    pub passed: bool,
}

/// The outcome of verifying one candidate.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Verification {
    pub checks: Vec<Check>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Verification {
    /// The candidate compiled, every check passed, and nothing else was wrong.
    pub fn passed(&self) -> bool {
        self.diagnostics.is_empty() && self.checks.iter().all(|c| c.passed)
    }

    /// `n/m checks passed`, for the evidence bundle and the terminal.
    pub fn summary(&self) -> String {
        let passed = self.checks.iter().filter(|c| c.passed).count();
        format!("{passed}/{} checks passed", self.checks.len())
    }

    /// Only failures of this class.
    pub fn of_class(&self, class: FailureClass) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(move |d| d.class == class)
    }
}

/// Verify `rule` as a new rule of `action` in `world`, against `derived` cases. The rule's
/// own `cases` are ignored: the cases that count are the derived ones.
///
/// A rule's cases must show it both matching and not matching; a set of cases that cannot tell
/// a rule that always matches from the candidate verifies nothing.
pub fn verify(
    world: &WorldModel,
    action: &str,
    rule: &Rule,
    derived: &[Case],
    sandbox: &Sandbox,
) -> Verification {
    let mut diagnostics = Vec::new();
    let mut model = world.clone();
    let Some(target) = model.actions.iter_mut().find(|a| a.name == action) else {
        diagnostics.push(mechanical(
            "rule",
            None,
            format!("the world has no action '{action}'"),
        ));
        return Verification {
            checks: Vec::new(),
            diagnostics,
        };
    };
    if target.rules.iter().any(|r| r.id == rule.id) {
        diagnostics.push(mechanical(
            "rule",
            None,
            format!(
                "action '{action}' already has a rule '{}'; choose another id",
                rule.id
            ),
        ));
        return Verification {
            checks: Vec::new(),
            diagnostics,
        };
    }
    let mut candidate = rule.clone();
    // The cases were written from the statement, so they may set attributes the rule does not
    // read; its answer cannot depend on those, and a case that varies one expecting another
    // answer still fails on its own.
    candidate.cases = derived
        .iter()
        .map(|case| {
            let mut case = case.clone();
            case.context.retain(|name, _| rule.inputs.contains(name));
            case
        })
        .collect();
    target.rules.push(candidate);

    if !derived.iter().any(|c| c.matches) || !derived.iter().any(|c| !c.matches) {
        diagnostics.push(mechanical(
            "cases",
            None,
            "the derived cases must include at least one context where the rule matches and \
             one where it does not",
        ));
    }

    // The version number does not matter to a module's decisions.
    let compiled = match compile::compile(&model, 1, sandbox) {
        Ok(compiled) => compiled,
        Err(problems) => {
            for problem in problems {
                diagnostics.push(Diagnostic {
                    class: FailureClass::Mechanical,
                    at: locate(&problem.locus, action, &rule.id),
                    kind: problem.kind,
                    message: problem.message,
                });
            }
            return Verification {
                checks: Vec::new(),
                diagnostics,
            };
        }
    };

    let mut checks = Vec::new();
    for result in cases::run_cases(&compiled, sandbox) {
        if result.action != action {
            continue;
        }
        let origin = if result.rule == rule.id {
            CaseOrigin::Derived
        } else {
            CaseOrigin::Existing {
                rule: result.rule.clone(),
            }
        };
        if !result.passed {
            let at = match &origin {
                CaseOrigin::Derived => format!("case {}", result.case),
                CaseOrigin::Existing { rule } => format!("rule {rule} case {}", result.case),
            };
            let diagnostic = match &result.failure {
                Some(CaseFailure::Rule(error)) => Diagnostic {
                    class: FailureClass::Mechanical,
                    at,
                    kind: Some(error.kind),
                    message: format!("the rule failed on this case: {}", error.message),
                },
                Some(CaseFailure::Context(reason)) => Diagnostic {
                    class: FailureClass::Mechanical,
                    at,
                    kind: None,
                    message: format!("the case does not fit the world's schema: {reason}"),
                },
                None => Diagnostic {
                    class: FailureClass::Semantic,
                    at,
                    kind: None,
                    message: format!(
                        "expected the rule {}, but it {} for context {}",
                        if result.expected {
                            "to match"
                        } else {
                            "not to match"
                        },
                        if result.expected {
                            "did not match"
                        } else {
                            "matched"
                        },
                        serde_json::Value::Object(result.context.clone())
                    ),
                },
            };
            diagnostics.push(diagnostic);
        }
        checks.push(Check {
            origin,
            case: result.case,
            name: result.name,
            expected: result.expected,
            actual: result.actual,
            passed: result.passed,
        });
    }
    Verification {
        checks,
        diagnostics,
    }
}

fn mechanical(at: &str, kind: Option<ErrorKind>, message: impl Into<String>) -> Diagnostic {
    Diagnostic {
        class: FailureClass::Mechanical,
        at: at.to_string(),
        kind,
        message: message.into(),
    }
}

/// Where a compile problem is, relative to the candidate where it is in it.
fn locate(locus: &Locus, action: &str, rule: &str) -> String {
    match locus {
        Locus::Rule {
            action: a,
            rule: r,
            field,
        } if a == action && r == rule => (*field).to_string(),
        Locus::Predicate {
            action: a,
            rule: r,
            which,
        } if a == action && r == rule => match which {
            Which::AppliesWhen => "applies_when".into(),
            Which::Predicate => "predicate".into(),
        },
        Locus::Case {
            action: a,
            rule: r,
            case,
        } if a == action && r == rule => format!("case {}", case + 1),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worlds::model::{Severity, Status};

    /// Default limits, with a wall-clock deadline an unoptimized build on a busy machine keeps.
    fn sandbox() -> Sandbox {
        Sandbox::new(crate::sandbox::Limits {
            deadline_us: 500_000,
            decision_deadline_us: 5_000_000,
            ..Default::default()
        })
    }

    fn world() -> WorldModel {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("predicates/globex-support");
        crate::worlds::load::load_model(&dir).expect("the example world loads")
    }

    fn rule(predicate: &str, inputs: &[&str]) -> Rule {
        Rule {
            id: "large-store-credit".into(),
            text: "A store-credit refund over 500 EUR needs review.".into(),
            severity: Severity::T2,
            outcome: Status::Yellow,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            applies_when: None,
            predicate: predicate.into(),
            work_frame: None,
            provenance: None,
            cases: Vec::new(),
        }
    }

    fn case(amount: f64, method: &str, matches: bool) -> Case {
        let mut context = serde_json::Map::new();
        context.insert("refund_amount".into(), amount.into());
        context.insert("refund_method".into(), method.into());
        Case {
            name: String::new(),
            context,
            matches,
        }
    }

    fn cases() -> Vec<Case> {
        vec![
            case(600.0, "store_credit", true),
            case(400.0, "store_credit", false),
            case(600.0, "bank_transfer", false),
        ]
    }

    const INPUTS: [&str; 2] = ["refund_amount", "refund_method"];

    #[test]
    fn a_rule_that_agrees_with_its_cases_verifies_beside_the_existing_rules() {
        let w = world();
        let r = rule(
            r#"context.refund_method == "store_credit" && context.refund_amount > 500.0"#,
            &INPUTS,
        );
        let v = verify(&w, "refund.issue", &r, &cases(), &sandbox());
        assert!(v.passed(), "{:#?}", v.diagnostics);
        let derived = v
            .checks
            .iter()
            .filter(|c| c.origin == CaseOrigin::Derived)
            .count();
        assert_eq!(derived, 3);
        assert!(
            v.checks.len() > derived,
            "the action's existing cases ran too"
        );
        assert_eq!(
            v.summary(),
            format!("{0}/{0} checks passed", v.checks.len())
        );
    }

    #[test]
    fn disagreeing_with_a_case_is_semantic() {
        let w = world();
        // Forgets the method: matches the bank transfer too.
        let r = rule("context.refund_amount > 500.0", &["refund_amount"]);
        let only_amount: Vec<Case> = cases()
            .into_iter()
            .map(|mut c| {
                c.context.remove("refund_method");
                c
            })
            .collect();
        let v = verify(&w, "refund.issue", &r, &only_amount, &sandbox());
        assert!(!v.passed());
        let semantic: Vec<_> = v.of_class(FailureClass::Semantic).collect();
        assert_eq!(semantic.len(), 1, "{:#?}", v.diagnostics);
        assert_eq!(semantic[0].at, "case 3");
        assert_eq!(v.of_class(FailureClass::Mechanical).count(), 0);
        assert_eq!(
            v.summary(),
            format!("{}/{} checks passed", v.checks.len() - 1, v.checks.len())
        );
    }

    #[test]
    fn reading_an_undeclared_attribute_is_mechanical() {
        let w = world();
        let r = rule(
            r#"context.refund_method == "store_credit" && context.order_total > 500.0"#,
            &INPUTS,
        );
        let v = verify(&w, "refund.issue", &r, &cases(), &sandbox());
        assert!(!v.passed());
        assert!(
            v.checks.is_empty(),
            "nothing runs when the world does not compile"
        );
        let mechanical: Vec<_> = v.of_class(FailureClass::Mechanical).collect();
        assert!(
            mechanical
                .iter()
                .any(|d| d.at == "inputs" && d.kind == Some(ErrorKind::UndeclaredInput)),
            "{mechanical:#?}"
        );
    }

    #[test]
    fn syntax_errors_and_forbidden_symbols_are_mechanical() {
        let w = world();
        for (source, kind) in [
            ("context.refund_amount >", ErrorKind::Syntax),
            ("{ let x = 1; x > 0 }", ErrorKind::Syntax),
        ] {
            let r = rule(source, &["refund_amount"]);
            let v = verify(&w, "refund.issue", &r, &cases(), &sandbox());
            assert!(
                v.of_class(FailureClass::Mechanical)
                    .any(|d| d.at == "predicate" && d.kind == Some(kind)),
                "{source}: {:#?}",
                v.diagnostics
            );
        }
    }

    #[test]
    fn a_runtime_limit_on_a_case_is_mechanical() {
        let w = world();
        // Compiles and passes the static checks, then exceeds the operation limit when run.
        let r = rule(
            r#"context.refund_method == "store_credit" && context.refund_amount > 0.0 && (context.refund_method + "").pad(2000000000, "y").len() > 0"#,
            &INPUTS,
        );
        let v = verify(&w, "refund.issue", &r, &cases(), &sandbox());
        assert!(!v.passed());
        let limits: Vec<_> = v
            .of_class(FailureClass::Mechanical)
            .filter(|d| d.at.starts_with("case ") && d.kind.is_some())
            .collect();
        assert!(!limits.is_empty(), "{:#?}", v.diagnostics);
    }

    #[test]
    fn a_case_outside_the_schema_is_mechanical() {
        let w = world();
        let r = rule(
            r#"context.refund_method == "store_credit" && context.refund_amount > 500.0"#,
            &INPUTS,
        );
        let mut derived = cases();
        derived[1]
            .context
            .insert("refund_method".into(), "cheque".into());
        let v = verify(&w, "refund.issue", &r, &derived, &sandbox());
        let d: Vec<_> = v.of_class(FailureClass::Mechanical).collect();
        assert_eq!(d.len(), 1, "{:#?}", v.diagnostics);
        assert_eq!(d[0].at, "case 2");
        assert!(d[0].message.contains("schema"), "{}", d[0].message);
    }

    #[test]
    fn attributes_the_rule_does_not_read_are_left_out_of_its_cases() {
        let w = world();
        let r = rule("context.refund_amount > 500.0", &["refund_amount"]);
        // The method varies, the answer expected does not: the rule may ignore it.
        let derived = vec![
            case(600.0, "store_credit", true),
            case(600.0, "bank_transfer", true),
            case(400.0, "store_credit", false),
        ];
        let v = verify(&w, "refund.issue", &r, &derived, &sandbox());
        assert!(v.passed(), "{:#?}", v.diagnostics);
        // Where the method decides, ignoring it is caught as a disagreement.
        let v = verify(&w, "refund.issue", &r, &cases(), &sandbox());
        let semantic: Vec<_> = v.of_class(FailureClass::Semantic).collect();
        assert_eq!(semantic.len(), 1, "{:#?}", v.diagnostics);
    }

    #[test]
    fn one_sided_cases_verify_nothing() {
        let w = world();
        let r = rule("true", &[]);
        let always: Vec<Case> = vec![Case {
            name: String::new(),
            context: serde_json::Map::new(),
            matches: true,
        }];
        let v = verify(&w, "refund.issue", &r, &always, &sandbox());
        assert!(!v.passed());
        assert!(
            v.diagnostics.iter().any(|d| d.at == "cases"),
            "{:#?}",
            v.diagnostics
        );
    }

    #[test]
    fn an_id_already_taken_or_an_unknown_action_is_refused() {
        let w = world();
        let mut r = rule("true", &[]);
        r.id = w.action("refund.issue").expect("action").rules[0]
            .id
            .clone();
        let v = verify(&w, "refund.issue", &r, &cases(), &sandbox());
        assert!(v.diagnostics[0].message.contains("already has a rule"));
        let v = verify(&w, "refund.nope", &rule("true", &[]), &cases(), &sandbox());
        assert!(v.diagnostics[0].message.contains("no action"));
    }
}

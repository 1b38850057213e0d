//! Running every rule's cases: the verification step of authoring and publishing.

use serde::Serialize;

use super::compile::CompiledWorld;
use super::context::{self, Bound};
use super::model::Attribute;
use crate::sandbox::{Sandbox, SandboxError};

/// Why a case could not be judged.
#[derive(Debug, Clone, PartialEq)]
pub enum CaseFailure {
    /// The rule failed on the case's context (an error or a limit).
    Rule(SandboxError),
    /// The case's context does not bind to the schema.
    Context(String),
}

/// The result of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub action: String,
    pub rule: String,
    /// 1-based, in declaration order.
    pub case: usize,
    pub name: String,
    pub context: serde_json::Map<String, serde_json::Value>,
    pub expected: bool,
    /// What happened: `matched`, `not matched`, or why the rule could not run.
    pub actual: String,
    pub passed: bool,
    /// Why the rule could not run, when it could not; `None` when it ran.
    #[serde(skip)]
    pub failure: Option<CaseFailure>,
}

/// Run every case of every rule of a compiled world.
pub fn run_cases(world: &CompiledWorld, sandbox: &Sandbox) -> Vec<CaseResult> {
    let mut results = Vec::new();
    for action in &world.model.actions {
        let Some(module) = world.module(&action.name) else {
            continue;
        };
        for rule in &action.rules {
            let Some(index) = module.rules.iter().position(|r| r.source.id == rule.id) else {
                continue;
            };
            // A case binds only the rule's own inputs, and supplies system attributes itself.
            let attrs: Vec<(String, Attribute)> = module
                .attrs
                .iter()
                .filter(|(name, _)| rule.inputs.contains(name))
                .cloned()
                .collect();
            for (i, case) in rule.cases.iter().enumerate() {
                let value = serde_json::Value::Object(case.context.clone());
                let actual = match context::bind_value(&attrs, &value, None, sandbox.limits()) {
                    Bound::Ready(mut bindings) => {
                        let run = module.run_rule(sandbox, index, &mut bindings);
                        match run.error {
                            Some(e) => Err((format!("error: {e}"), CaseFailure::Rule(e))),
                            None => Ok(run.matched),
                        }
                    }
                    Bound::Missing(evidence) => {
                        let reason = evidence
                            .iter()
                            .map(|e| format!("{}: {}", e.attribute, e.reason))
                            .collect::<Vec<_>>()
                            .join("; ");
                        Err((format!("evidence: {reason}"), CaseFailure::Context(reason)))
                    }
                    Bound::NotAnObject(e) => {
                        Err((format!("context: {e}"), CaseFailure::Context(e)))
                    }
                };
                let passed = actual.as_ref().is_ok_and(|m| *m == case.matches);
                let (actual, failure) = match actual {
                    Ok(true) => ("matched".to_string(), None),
                    Ok(false) => ("not matched".to_string(), None),
                    Err((text, failure)) => (text, Some(failure)),
                };
                results.push(CaseResult {
                    action: action.name.clone(),
                    rule: rule.id.clone(),
                    case: i + 1,
                    name: case.name.clone(),
                    context: case.context.clone(),
                    expected: case.matches,
                    actual,
                    passed,
                    failure,
                });
            }
        }
    }
    results
}

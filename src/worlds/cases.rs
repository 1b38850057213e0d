//! Running every rule's cases: the verification step of authoring and publishing.

use serde::Serialize;

use super::compile::CompiledWorld;
use super::context::{self, Bound};
use super::model::Attribute;
use crate::sandbox::Sandbox;

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
                            Some(e) => Err(format!("error: {e}")),
                            None => Ok(run.matched),
                        }
                    }
                    Bound::Missing(evidence) => Err(format!(
                        "evidence: {}",
                        evidence
                            .iter()
                            .map(|e| format!("{}: {}", e.attribute, e.reason))
                            .collect::<Vec<_>>()
                            .join("; ")
                    )),
                    Bound::NotAnObject(e) => Err(format!("context: {e}")),
                };
                let passed = actual.as_ref().is_ok_and(|m| *m == case.matches);
                results.push(CaseResult {
                    action: action.name.clone(),
                    rule: rule.id.clone(),
                    case: i + 1,
                    name: case.name.clone(),
                    context: case.context.clone(),
                    expected: case.matches,
                    actual: match actual {
                        Ok(true) => "matched".into(),
                        Ok(false) => "not matched".into(),
                        Err(e) => e,
                    },
                    passed,
                });
            }
        }
    }
    results
}

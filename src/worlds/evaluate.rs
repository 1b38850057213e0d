//! The evaluator: (module, context) → decision, as docs/predicates.md ("How the rules of an
//! action are evaluated") describes.
//!
//! It never fails and never panics: bad evidence is a `YELLOW` asking for it, and a predicate
//! that errors fails closed. Only the caller's own faults (a context that is not a JSON
//! object) are reported as errors, because they are not decisions.

use std::time::Instant;

use serde::Serialize;

use super::context::{self, Bound, SystemValues};
use super::model::{Severity, Status, WorkFrame};
use super::module::Module;
use crate::sandbox::Sandbox;

/// The context of a request, as text (the fast path) or already parsed.
#[derive(Debug, Clone, Copy)]
pub enum ContextJson<'a> {
    Text(&'a str),
    Value(&'a serde_json::Value),
}

/// A decide request against one module.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub context: ContextJson<'a>,
    /// System attribute values; `request_id` doubles as the decision id.
    pub system: SystemValues,
    pub correlation_id: Option<String>,
    /// Include the per-rule trace.
    pub explain: bool,
}

/// The answer to a decide request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub status: Status,
    pub work_frame: WorkFrame,
    pub decision_metadata: Metadata,
    /// Sandbox operations the rules used; not part of the answer.
    #[serde(skip)]
    pub operations: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metadata {
    pub decision_id: String,
    pub correlation_id: Option<String>,
    pub world: String,
    pub world_model_version: u64,
    pub action: String,
    pub module_hash: String,
    pub matched_rules: Vec<MatchedRule>,
    pub errors: Vec<DecisionError>,
    pub trace: Option<Vec<TraceEntry>>,
    pub eval_us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MatchedRule {
    pub id: String,
    pub severity: Severity,
    pub outcome: Status,
}

/// A problem that shaped the decision: a rule that failed closed, or evidence that is
/// missing or invalid.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecisionError {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribute: Option<String>,
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceEntry {
    pub rule: String,
    pub severity: Severity,
    pub applied: bool,
    pub matched: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub operations: u64,
    pub us: u64,
}

/// The context is not a JSON object: the caller's fault, not a decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("context must be a JSON object: {0}")]
pub struct BadContext(pub String);

/// Evaluate a request against a module.
pub fn evaluate(
    sandbox: &Sandbox,
    module: &Module,
    request: &Request<'_>,
) -> Result<Decision, BadContext> {
    let started = Instant::now();
    let bound = match request.context {
        ContextJson::Text(text) => {
            context::bind_str(&module.attrs, text, Some(&request.system), sandbox.limits())
        }
        ContextJson::Value(value) => context::bind_value(
            &module.attrs,
            value,
            Some(&request.system),
            sandbox.limits(),
        ),
    };
    let mut bindings = match bound {
        Bound::Ready(b) => b,
        Bound::NotAnObject(e) => return Err(BadContext(e)),
        Bound::Missing(evidence) => {
            let mut frame = module.source.work_frames.yellow.clone();
            frame.mode = "hold".into();
            frame.next_action = "gather_evidence_and_retry".into();
            frame.allowed_actions = vec!["gather_evidence_and_retry".into()];
            frame.required_output = vec![];
            frame.missing_evidence = evidence.iter().map(|e| e.attribute.clone()).collect();
            let errors = evidence
                .into_iter()
                .map(|e| DecisionError {
                    rule: None,
                    attribute: Some(e.attribute),
                    kind: "missing_evidence".into(),
                    message: e.reason,
                })
                .collect();
            return Ok(decision(
                module,
                request,
                Status::Yellow,
                frame,
                vec![],
                errors,
                request.explain.then(Vec::new),
                started,
                0,
            ));
        }
    };

    let mut matched = Vec::new();
    let mut errors = Vec::new();
    let mut trace = request
        .explain
        .then(|| Vec::with_capacity(module.rules.len()));
    // The winner so far: (severity, effective outcome, rule index).
    let mut winner: Option<(Severity, Status, usize)> = None;
    let runs = module.run_rules(sandbox, &mut bindings, request.explain);
    let operations = runs.operations;
    for (index, (rule, run)) in module.rules.iter().zip(runs.runs).enumerate() {
        let source = &rule.source;
        // A failing predicate counts as matched with at least YELLOW.
        let outcome = match run.error {
            Some(_) => source.outcome.max(Status::Yellow),
            None => source.outcome,
        };
        if let Some(e) = &run.error {
            errors.push(DecisionError {
                rule: Some(source.id.clone()),
                attribute: None,
                kind: e.kind.as_str().into(),
                message: e.message.clone(),
            });
        }
        if run.matched {
            matched.push(MatchedRule {
                id: source.id.clone(),
                severity: source.severity,
                outcome,
            });
            // Rules run in severity order, so the first matched rule has the highest
            // severity; within it, the most restrictive outcome wins.
            let better = match winner {
                None => true,
                Some((sev, out, _)) => source.severity == sev && outcome > out,
            };
            if better {
                winner = Some((source.severity, outcome, index));
            }
        }
        if let Some(trace) = trace.as_mut() {
            trace.push(TraceEntry {
                rule: source.id.clone(),
                severity: source.severity,
                applied: run.applied,
                matched: run.matched,
                error: run.error.as_ref().map(|e| e.kind.as_str().to_string()),
                operations: run.operations,
                us: run.us.unwrap_or(0),
            });
        }
    }

    let (mut status, mut frame) = match winner {
        None => (Status::Green, module.source.work_frames.green.clone()),
        Some((_, outcome, index)) => {
            let base = module.source.work_frames.of(outcome).clone();
            let frame = match &module.rules[index].source.work_frame {
                Some(patch) => base.patched(patch),
                None => base,
            };
            (outcome, frame)
        }
    };
    // An error anywhere is never answered with a green status, even when a more severe rule
    // matched green: a hard floor bounds how permissive the answer can be, not how strict.
    if !errors.is_empty() && status < Status::Yellow {
        status = Status::Yellow;
        frame = module.source.work_frames.yellow.clone();
    }
    Ok(decision(
        module, request, status, frame, matched, errors, trace, started, operations,
    ))
}

#[expect(
    clippy::too_many_arguments,
    reason = "every part of a decision is computed by the caller; a struct would only name them twice"
)]
fn decision(
    module: &Module,
    request: &Request<'_>,
    status: Status,
    work_frame: WorkFrame,
    matched_rules: Vec<MatchedRule>,
    errors: Vec<DecisionError>,
    trace: Option<Vec<TraceEntry>>,
    started: Instant,
    operations: u64,
) -> Decision {
    Decision {
        operations,
        status,
        work_frame,
        decision_metadata: Metadata {
            decision_id: request.system.request_id.clone(),
            correlation_id: request.correlation_id.clone(),
            world: module.manifest.world.clone(),
            world_model_version: module.manifest.version,
            action: module.manifest.action.clone(),
            module_hash: module.manifest.source_digest.clone(),
            matched_rules,
            errors,
            trace,
            eval_us: started.elapsed().as_micros() as u64,
        },
    }
}

//! Modules: the compiled, deployable unit of one (world, version, action).
//!
//! A [`ModuleSource`] is the canonical content of a module: everything that determines its
//! decisions and nothing else. Its `sha256:` hash over the canonical JSON form addresses it;
//! the same content always gives the same hash and any change gives another. A [`Module`] is a
//! source compiled by the sandbox, ready to evaluate.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::model::{
    Aggregation, Attribute, Rule, Severity, Status, WorkFramePatch, WorkFrames, WorldModel,
};
use super::problem::{Locus, Problem, Which};
use crate::sandbox::{Batch, Bindings, Budget, ErrorKind, Failure, Program, Sandbox, SandboxError};

/// The canonical content of a module. Field order and `BTreeMap`s make its JSON form
/// canonical.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleSource {
    pub world: String,
    pub action: String,
    pub aggregation: Aggregation,
    /// The attributes the action's rules read, with their schema.
    pub schema: BTreeMap<String, Attribute>,
    /// The config constants the action's rules read.
    pub config: BTreeMap<String, serde_json::Value>,
    /// The resolved work frame of every status.
    pub work_frames: WorkFrames,
    /// The rules in evaluation order: by severity, then by declaration.
    pub rules: Vec<RuleSource>,
}

/// One rule as it is evaluated (its cases are authoring material, not module content).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSource {
    pub id: String,
    pub text: String,
    pub severity: Severity,
    pub outcome: Status,
    pub inputs: Vec<String>,
    pub applies_when: Option<String>,
    pub predicate: String,
    pub work_frame: Option<WorkFramePatch>,
}

impl ModuleSource {
    /// Build the source of one action of a model. The version is not part of the content, so
    /// an action that did not change between versions keeps its module and its hash.
    pub fn of(model: &WorldModel, action_index: usize) -> Option<Self> {
        let action = model.actions.get(action_index)?;
        let mut rules: Vec<&Rule> = action.rules.iter().collect();
        // A stable sort keeps declaration order within a severity.
        rules.sort_by_key(|r| r.severity);
        let mut schema = BTreeMap::new();
        for rule in &rules {
            for input in &rule.inputs {
                if let Some(attr) = model.context.get(input) {
                    schema.insert(input.clone(), attr.clone());
                }
            }
        }
        let mut config = BTreeMap::new();
        for rule in &rules {
            for source in rule.applies_when.iter().chain([&rule.predicate]) {
                for (name, value) in &model.config {
                    // A textual over-approximation is enough here: the hash must change when
                    // a constant a rule could read changes, and an unread constant that
                    // happens to share a name costs nothing.
                    if source.contains(&format!("config.{name}")) {
                        config.insert(name.clone(), value.clone());
                    }
                }
            }
        }
        let work_frames = WorkFrames::resolve(&action.name, &action.work_frames);
        Some(Self {
            world: model.world.clone(),
            action: action.name.clone(),
            aggregation: action.aggregation,
            schema,
            config,
            work_frames,
            rules: rules
                .into_iter()
                .map(|r| RuleSource {
                    id: r.id.clone(),
                    text: r.text.clone(),
                    severity: r.severity,
                    outcome: r.outcome,
                    inputs: r.inputs.clone(),
                    applies_when: r.applies_when.clone(),
                    predicate: r.predicate.clone(),
                    work_frame: r.work_frame.clone(),
                })
                .collect(),
        })
    }

    /// The canonical JSON form.
    pub fn canonical_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// `sha256:` and the hex digest of the canonical form.
    pub fn hash(&self) -> Result<String, serde_json::Error> {
        Ok(hash_bytes(&self.canonical_json()?))
    }
}

/// `sha256:` and the hex digest of bytes.
pub fn hash_bytes(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The manifest of a module: what it is and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    pub world: String,
    pub version: u64,
    pub action: String,
    /// The hash of the canonical source.
    pub source_digest: String,
}

/// A compiled rule.
#[derive(Debug)]
pub struct CompiledRule {
    pub source: RuleSource,
    pub applies_when: Option<Program>,
    pub predicate: Program,
}

/// What one rule did in one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleRun {
    /// `applies_when` held (or there is none).
    pub applied: bool,
    /// The predicate was true, or an error made the rule count as matched.
    pub matched: bool,
    pub error: Option<SandboxError>,
    /// Operations used; counted when rules run one by one, 0 when they ran as a batch.
    pub operations: u64,
    /// Microseconds the rule took, when timed.
    pub us: Option<u64>,
}

/// A compiled module, ready to evaluate.
#[derive(Debug)]
pub struct Module {
    pub manifest: Manifest,
    pub source: Arc<ModuleSource>,
    /// The schema in a fixed order, for binding contexts.
    pub attrs: Vec<(String, Attribute)>,
    pub rules: Vec<CompiledRule>,
    /// The canonical form of `source`, the bytes its digest is of and the bytes stored.
    canonical: Vec<u8>,
    /// Every rule in one program, the fast path of a decision.
    batch: Option<Batch>,
    /// Set once a decision of this module cost more than the sandbox's `offload_operations`
    /// or ran into an operation limit: its later decisions run off the API threads, one rule
    /// at a time.
    expensive: AtomicBool,
}

/// Every rule's run in one decision, and what they cost together.
#[derive(Debug, Clone, PartialEq)]
pub struct Runs {
    pub runs: Vec<RuleRun>,
    /// Operations the decision used: the batch's, or the sum of the rules run one by one.
    pub operations: u64,
}

/// Loading a stored module failed.
#[derive(Debug, thiserror::Error)]
pub enum ModuleLoadError {
    #[error("module content hashes to {actual}, not the expected {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("module content is not a valid module source: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("module does not compile: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Compile(Vec<Problem>),
}

impl Module {
    /// Load a module of `version` from its stored canonical bytes: verify the hash first,
    /// then compile.
    pub fn load(
        bytes: &[u8],
        expected_hash: &str,
        version: u64,
        sandbox: &Sandbox,
    ) -> Result<Self, ModuleLoadError> {
        let actual = hash_bytes(bytes);
        if actual != expected_hash {
            return Err(ModuleLoadError::HashMismatch {
                expected: expected_hash.to_string(),
                actual,
            });
        }
        let source: ModuleSource = serde_json::from_slice(bytes)?;
        Self::compile(source, version, sandbox).map_err(ModuleLoadError::Compile)
    }

    /// Compile a module source as part of `version`; every problem is reported.
    pub fn compile(
        source: ModuleSource,
        version: u64,
        sandbox: &Sandbox,
    ) -> Result<Self, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut rules = Vec::with_capacity(source.rules.len());
        for rule in &source.rules {
            let locus = |which| Locus::Predicate {
                action: source.action.clone(),
                rule: rule.id.clone(),
                which,
            };
            let applies_when = match &rule.applies_when {
                Some(text) => match sandbox.compile_reads(text, &source.config) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        problems.push(Problem::sandbox(locus(Which::AppliesWhen), e));
                        continue;
                    }
                },
                None => None,
            };
            let predicate = match sandbox.compile_reads(&rule.predicate, &source.config) {
                Ok(p) => p,
                Err(e) => {
                    problems.push(Problem::sandbox(locus(Which::Predicate), e));
                    continue;
                }
            };
            let mut reads = predicate.reads().clone();
            if let Some(a) = &applies_when {
                reads.extend(a.reads());
            }
            if let Err(e) = crate::sandbox::inputs_match(&reads, &rule.inputs) {
                problems.push(Problem::sandbox(
                    Locus::Rule {
                        action: source.action.clone(),
                        rule: rule.id.clone(),
                        field: "inputs",
                    },
                    e,
                ));
                continue;
            }
            rules.push(CompiledRule {
                source: rule.clone(),
                applies_when,
                predicate,
            });
        }
        let folded: usize = rules
            .iter()
            .map(|r| {
                r.predicate.folded_bytes() + r.applies_when.as_ref().map_or(0, |a| a.folded_bytes())
            })
            .sum();
        if folded > sandbox.limits().max_module_bytes {
            problems.push(Problem::sandbox(
                Locus::Action {
                    action: source.action.clone(),
                },
                SandboxError {
                    kind: ErrorKind::ModuleTooLarge,
                    message: format!(
                        "the rules of this action fold {folded} bytes of config constants \
                         together, over the limit of {}",
                        sandbox.limits().max_module_bytes
                    ),
                    position: None,
                },
            ));
        }
        let canonical = match source.canonical_json() {
            Ok(bytes) => bytes,
            Err(e) => {
                problems.push(Problem::new(
                    Locus::Action {
                        action: source.action.clone(),
                    },
                    format!("the module has no canonical form to hash: {e}"),
                ));
                Vec::new()
            }
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        let manifest = Manifest {
            world: source.world.clone(),
            version,
            action: source.action.clone(),
            source_digest: hash_bytes(&canonical),
        };
        let attrs = source
            .schema
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let parts: Vec<(Option<&Program>, &Program)> = rules
            .iter()
            .map(|r| (r.applies_when.as_ref(), &r.predicate))
            .collect();
        let batch = sandbox.batch(&parts);
        Ok(Self {
            manifest,
            source: Arc::new(source),
            attrs,
            rules,
            canonical,
            batch,
            expensive: AtomicBool::new(false),
        })
    }

    /// The module's content hash.
    pub fn hash(&self) -> &str {
        &self.manifest.source_digest
    }

    /// The canonical form of the module's source, whose digest [`Module::hash`] is.
    pub fn canonical_json(&self) -> &[u8] {
        &self.canonical
    }

    /// Run every rule in evaluation order, all of them drawing on one decision budget.
    ///
    /// Untimed runs try the batch first, one engine call for all rules, capped at the
    /// sandbox's `offload_operations`. If anything in it fails, or when timing is wanted, the
    /// rules run one by one with the whole budget, so that each failure is attributed to its
    /// rule. The batch answers only where the rules run one by one answer the same: same
    /// trees, same order, same scope, and no error anywhere.
    pub(crate) fn run_rules(
        &self,
        sandbox: &Sandbox,
        bindings: &mut Bindings,
        timed: bool,
    ) -> Runs {
        // The batch of a module seen to be expensive would only give way again.
        if !timed && !self.is_expensive() {
            if let Some(runs) = self.run_batch(sandbox, bindings) {
                return runs;
            }
        }
        let mut budget = sandbox.budget();
        let mut operations = 0u64;
        let mut over_budget = false;
        let runs = (0..self.rules.len())
            .map(|index| {
                let started = timed.then(std::time::Instant::now);
                let mut run = self.run_rule_within(sandbox, index, bindings, &mut budget);
                run.us = started.map(|t| t.elapsed().as_micros() as u64);
                operations += run.operations;
                // Operations only: a clock that ran out under load says nothing of the
                // module, and the mark is for good.
                over_budget |= run.error.as_ref().is_some_and(|e| {
                    matches!(
                        e.kind,
                        ErrorKind::BudgetExceeded | ErrorKind::TooManyOperations
                    )
                });
                run
            })
            .collect();
        if over_budget || operations > sandbox.limits().offload_operations {
            self.expensive.store(true, Ordering::Relaxed);
        }
        Runs { runs, operations }
    }

    /// Every rule in one engine call, capped at the sandbox's `offload_operations`: the runs,
    /// or `None` when anything failed and the rules must run one by one.
    pub fn run_batch(&self, sandbox: &Sandbox, bindings: &mut Bindings) -> Option<Runs> {
        let cap = sandbox.limits().offload_operations;
        let outcome = sandbox.eval_batch(self.batch.as_ref()?, bindings, &sandbox.budget(), cap)?;
        let runs = outcome
            .results
            .into_iter()
            .map(|r| RuleRun {
                applied: r.is_some(),
                matched: r == Some(true),
                error: None,
                operations: 0,
                us: None,
            })
            .collect();
        Some(Runs {
            runs,
            operations: outcome.operations,
        })
    }

    /// Whether a decision of this module was seen to be expensive: its decisions should run
    /// off the API threads.
    pub(crate) fn is_expensive(&self) -> bool {
        self.expensive.load(Ordering::Relaxed)
    }

    /// Whether the module could be compiled into a single batch program.
    pub fn has_batch(&self) -> bool {
        self.batch.is_some()
    }

    /// Run one rule with a decision budget of its own: what the case runner does.
    pub fn run_rule(&self, sandbox: &Sandbox, index: usize, bindings: &mut Bindings) -> RuleRun {
        self.run_rule_within(sandbox, index, bindings, &mut sandbox.budget())
    }

    /// Run one rule: `applies_when`, then the predicate, both drawing on `budget`. An error
    /// in either fails closed: the rule counts as matched.
    pub(crate) fn run_rule_within(
        &self,
        sandbox: &Sandbox,
        index: usize,
        bindings: &mut Bindings,
        budget: &mut Budget,
    ) -> RuleRun {
        let Some(rule) = self.rules.get(index) else {
            return RuleRun {
                applied: false,
                matched: false,
                error: None,
                operations: 0,
                us: None,
            };
        };
        let mut operations = 0;
        if let Some(guard) = &rule.applies_when {
            match sandbox.eval_within(guard, bindings, budget) {
                Ok(o) => {
                    operations += o.operations;
                    if !o.value {
                        return RuleRun {
                            applied: false,
                            matched: false,
                            error: None,
                            operations,
                            us: None,
                        };
                    }
                }
                Err(Failure {
                    error,
                    operations: ops,
                }) => {
                    return RuleRun {
                        applied: true,
                        matched: true,
                        error: Some(SandboxError {
                            message: format!("applies_when: {}", error.message),
                            ..error
                        }),
                        operations: operations + ops,
                        us: None,
                    };
                }
            }
        }
        match sandbox.eval_within(&rule.predicate, bindings, budget) {
            Ok(o) => RuleRun {
                applied: true,
                matched: o.value,
                error: None,
                operations: operations + o.operations,
                us: None,
            },
            Err(Failure {
                error,
                operations: ops,
            }) => RuleRun {
                applied: true,
                matched: true,
                error: Some(error),
                operations: operations + ops,
                us: None,
            },
        }
    }
}

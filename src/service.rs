//! The decide service: what the API does, independent of HTTP. It authenticates callers,
//! resolves worlds and versions through the cache, evaluates, records decisions, and runs the
//! authoring flow (draft → publish → deploy).
//!
//! **Boundary:** no hyper or sqlx types; the HTTP layer turns requests into calls here and
//! [`ServiceError`]s into problem responses. The decide path never awaits anything but the
//! key cache (a store read on a miss), a pinned version's first load, and the decision
//! queue's bounded wait.

pub mod agent;
pub mod audit;
pub mod auth;
pub mod cache;
pub mod decision_log;
pub mod impact;
pub mod openapi;
pub mod ratelimit;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::sandbox::Sandbox;
use crate::store::{
    Deployment, KeyRecord, MatchedRule, NewDecision, NewModule, NewVersion, Scope, Store,
    StoreError, VersionRecord, WorldDetail, WorldSummary,
};
use crate::telemetry::Metrics;
use crate::worlds::cases::run_cases;
use crate::worlds::context::SystemValues;
use crate::worlds::model::RecordContext;
use crate::worlds::{self, ContextJson, Decision, Problem, Request, Status, WorldModel};
use auth::{Caller, Keys};
use cache::{Cache, VersionLoadError};
use decision_log::DecisionLog;
pub use impact::{ReplayInput, ShadowInput};

/// What went wrong, in terms a caller can act on. Each variant maps to one HTTP status in
/// `http::problem`, the one place errors become responses.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A retired version was named: it is out of service for good.
    #[error("{0}")]
    Retired(String),
    /// A world model that fails validation, with every problem.
    #[error("{message}")]
    Invalid {
        message: String,
        problems: Vec<Problem>,
    },
    /// Not ready, or a dependency is down.
    #[error("{0}")]
    Unavailable(String),
    /// A string the caller set is longer than its documented maximum.
    #[error("{field} is {len} characters long, over the limit of {max}")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// Every evaluation slot for expensive decisions is taken; retry shortly.
    #[error("{0}")]
    Overloaded(String),
    /// The decision's record could not be queued in time, so the decision is not answered.
    #[error("{0}")]
    LogUnavailable(String),
    /// A batch request spent its operations or its time before reaching this item.
    #[error("{0}")]
    BatchBudget(String),
    /// The World Agent has no model endpoint configured.
    #[error("{0}")]
    AgentUnconfigured(String),
    /// A world has as many agent runs running as it may.
    #[error("{0}")]
    TooManyRuns(String),
    /// The store failed; the cause is logged, never shown (docs/operations.md, "Errors").
    #[error("store unavailable: {0}")]
    Store(String),
    /// A fault of ours; the message is logged, never shown.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    pub(crate) fn from_store(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => Self::NotFound(what),
            StoreError::Conflict(what) | StoreError::Fenced(what) => Self::Conflict(what),
            StoreError::Database(_) => Self::Store(e.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}

/// The body of `POST /api/decide`, borrowing the context's JSON text so that only the
/// attributes the rules read are ever parsed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecideInput<'a> {
    pub action: String,
    #[serde(borrow)]
    pub context: &'a RawValue,
    #[serde(default)]
    pub world: Option<String>,
    #[serde(default, deserialize_with = "whole_number")]
    pub world_model_version: Option<u64>,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub explain: bool,
}

/// A version number as JSON Schema's `integer` has it: a whole number, `3` and `3.0` alike.
/// The literal is read from its text, since a parsed float may have lost the digits that
/// tell whether it was whole.
pub(crate) fn whole_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u64>, D::Error> {
    let Some(raw) = Option::<Box<RawValue>>::deserialize(d)? else {
        return Ok(None);
    };
    let text = raw.get().trim();
    text.parse::<u64>()
        .ok()
        .or_else(|| {
            text.parse::<f64>()
                .ok()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 18_446_744_073_709_551_616.0)
                .map(|f| f as u64)
        })
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::custom(format!("invalid value {text}, expected a whole number ≥ 0"))
        })
}

/// Longest `world` and `action` a request may name, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest `correlation_id` a request may carry, in characters (JSON Schema's `maxLength`);
/// it is stored with the decision.
pub const MAX_CORRELATION_ID_CHARS: usize = 256;

impl DecideInput<'_> {
    /// Every string the caller sets is within its documented maximum. The context's own
    /// strings are bounded by the schema and the sandbox, and only its digest is stored.
    pub fn check_lengths(&self) -> Result<(), ServiceError> {
        let fields = [
            ("action", Some(self.action.as_str()), MAX_NAME_CHARS),
            ("world", self.world.as_deref(), MAX_NAME_CHARS),
            (
                "correlation_id",
                self.correlation_id.as_deref(),
                MAX_CORRELATION_ID_CHARS,
            ),
        ];
        for (field, value, max) in fields {
            let len = value.map_or(0, |v| v.chars().count());
            if len > max {
                return Err(ServiceError::FieldTooLong { field, len, max });
            }
        }
        Ok(())
    }
}

/// Where decisions of expensive modules run: a bounded set of slots on tokio's blocking
/// threads, so that no API thread is held by a module that was seen to be expensive.
pub struct Evaluation {
    slots: Arc<tokio::sync::Semaphore>,
    pool: usize,
    /// Operations all the decisions of one batch request may use together.
    pub batch_max_operations: u64,
}

impl Evaluation {
    pub fn new(config: &crate::config::EvaluationConfig) -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(config.pool)),
            pool: config.pool,
            batch_max_operations: config.batch_max_operations,
        }
    }

    /// What `/health` shows: the slots, and how many are evaluating now.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "slots": self.pool,
            "busy": self.pool.saturating_sub(self.slots.available_permits()),
        })
    }
}

/// What the items of one batch request may still spend.
#[derive(Debug, Clone, Copy)]
pub struct BatchBudget {
    operations: u64,
    deadline: Instant,
}

/// Build identity, shown on `/version` and `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct BuildInfo {
    pub version: &'static str,
    pub git_sha: &'static str,
}

impl BuildInfo {
    pub fn current() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION"),
            git_sha: option_env!("SPECTRAL_GIT_SHA").unwrap_or("unknown"),
        }
    }
}

/// The body of `POST /api/worlds/{world}/webhooks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookInput {
    /// Where deliveries are POSTed; http or https.
    pub url: String,
    /// Event types to deliver; both world events by default.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// The HMAC key; generated (and returned once) when absent.
    #[serde(default)]
    pub secret: Option<String>,
}

/// A created webhook, with its secret shown this once.
#[derive(Debug, Serialize)]
pub struct CreatedWebhook {
    #[serde(flatten)]
    pub webhook: crate::store::Webhook,
    pub secret: String,
}

/// Decision statistics of a world.
#[derive(Debug, Serialize)]
pub struct WorldStats {
    pub world: String,
    /// Decisions by status.
    pub decisions: std::collections::BTreeMap<String, i64>,
    /// Per rule: matches by the decision's status.
    pub rules: std::collections::BTreeMap<String, std::collections::BTreeMap<String, i64>>,
}

/// The published version and its modules.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    pub world: String,
    pub version: u64,
    pub modules: Vec<(String, String)>,
}

/// A version just retired.
#[derive(Debug, Clone, Serialize)]
pub struct RetiredVersion {
    pub world: String,
    pub version: u64,
    pub retired: crate::store::Retirement,
}

/// The service and everything it owns.
pub struct App {
    pub sandbox: Arc<Sandbox>,
    pub store: Store,
    pub cache: Arc<Cache>,
    pub keys: Keys,
    pub log: DecisionLog,
    pub metrics: Arc<Metrics>,
    pub build: BuildInfo,
    pub started: Instant,
    /// Set by the supervisor once bootstrap and the first cache load are done; cleared when
    /// shutdown begins so that load balancers stop sending traffic.
    pub ready: AtomicBool,
    /// This deploy's generation, stamped on every event this process produces.
    pub generation: i64,
    /// The outbox consumer's wiring, `off` when no consumer runs in this process.
    pub outbox: Arc<crate::outbox::OutboxState>,
    /// Off-thread evaluation of expensive modules, and the batch budget.
    pub evaluation: Evaluation,
    /// Where webhooks may be delivered.
    pub egress: crate::egress::Egress,
    /// The World Agent's configuration and health, as the API sees them.
    pub agent: AgentState,
    /// Seals webhook secrets before they are stored (`src/seal.rs`).
    pub webhook_seal: crate::seal::Sealer,
    /// How long another generation's rows may stay pending before `/health` calls them
    /// stranded and turns `degraded` (`SPECTRAL_OUTBOX_STRANDED_AFTER_MS`).
    pub stranded_after: std::time::Duration,
    /// This instance's shadow evaluator (`service::impact`).
    pub shadows: Arc<crate::impact::Shadows>,
    pub impact: crate::config::ImpactConfig,
}

/// What the API knows of the World Agent.
pub struct AgentState {
    /// A model endpoint is configured (`/health`'s `agent`).
    pub configured: bool,
    pub config: crate::config::AgentConfig,
    /// The provider's health at the last call of this process's runner.
    pub health: Arc<crate::agent::runner::AgentHealth>,
    /// Event streams open at once (`SPECTRAL_AGENT_MAX_STREAMS`); more are answered 503.
    pub streams: Arc<tokio::sync::Semaphore>,
    /// What wakes the streams when another process writes their thread.
    pub wakes: Arc<agent::StreamWakes>,
}

impl AgentState {
    /// `unconfigured`, `configured`, or `degraded` (the provider was unreachable at the last
    /// call of this process's runner).
    pub fn status(&self) -> &'static str {
        if !self.configured {
            "unconfigured"
        } else if self.health.degraded() {
            "degraded"
        } else {
            "configured"
        }
    }
}

/// The longest reason a retirement keeps, in characters.
pub const MAX_RETIRE_REASON_CHARS: usize = 1_000;

/// The body of `PUT /api/worlds/{world}/draft` as a model of that world.
pub fn decode_draft(world: &str, body: &[u8]) -> Result<WorldModel, ServiceError> {
    let model: WorldModel = serde_json::from_slice(body)
        .map_err(|e| ServiceError::BadRequest(format!("world model: {e}")))?;
    if model.world != world {
        return Err(ServiceError::BadRequest(format!(
            "the model is for world '{}', not '{world}'",
            model.world
        )));
    }
    Ok(model)
}

/// Validate and compile a model and run every case of it: what a draft and a publish must
/// pass. Every problem is listed; blocking (it runs predicates).
pub fn verify_model(
    model: &WorldModel,
    sandbox: &Sandbox,
) -> Result<worlds::CompiledWorld, ServiceError> {
    let compiled = worlds::compile(model, 1, sandbox).map_err(|problems| {
        let first: Vec<String> = problems.iter().take(3).map(ToString::to_string).collect();
        ServiceError::Invalid {
            message: format!(
                "the world model has {} problem(s): {}",
                problems.len(),
                first.join("; ")
            ),
            problems,
        }
    })?;
    let failures: Vec<Problem> = run_cases(&compiled, sandbox)
        .into_iter()
        .filter(|r| !r.passed)
        .map(|r| {
            Problem::new(
                worlds::problem::Locus::Case {
                    action: r.action,
                    rule: r.rule,
                    case: r.case - 1,
                },
                format!(
                    "expected {}, got {}",
                    if r.expected { "matched" } else { "not matched" },
                    r.actual
                ),
            )
        })
        .collect();
    if failures.is_empty() {
        Ok(compiled)
    } else {
        let first: Vec<String> = failures.iter().take(3).map(ToString::to_string).collect();
        Err(ServiceError::Invalid {
            message: format!("{} case(s) fail: {}", failures.len(), first.join("; ")),
            problems: failures,
        })
    }
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl App {
    /// Decide one request.
    pub async fn decide(
        &self,
        caller: &Caller,
        input: &DecideInput<'_>,
    ) -> Result<Decision, ServiceError> {
        input.check_lengths()?;
        let world = caller.resolve_world(input.world.as_deref())?;
        caller.check(world, Scope::Decide)?;
        let loaded = match input.world_model_version {
            None => match self.cache.deployed(world) {
                Some(loaded) => loaded,
                None => {
                    // Deployed but not loadable is the service's fault, not the caller's.
                    if self.cache.failures().contains_key(world) {
                        return Err(ServiceError::Unavailable(format!(
                            "world '{world}' is deployed but its version failed to load; \
                             operators see why on /health"
                        )));
                    }
                    return Err(ServiceError::NotFound(format!(
                        "world '{world}' has no deployed version"
                    )));
                }
            },
            Some(v) => self.pinned(caller, world, v).await?,
        };
        let module = loaded.modules.get(&input.action).cloned().ok_or_else(|| {
            ServiceError::NotFound(format!(
                "world '{world}' version {} has no action '{}'",
                loaded.version, input.action
            ))
        })?;
        let request_id = uuid::Uuid::now_v7().to_string();
        // One clock reading: the time the rules see is the time the record carries.
        let now = chrono::Utc::now();
        let request = Request {
            context: ContextJson::Text(input.context.get()),
            system: SystemValues {
                request_time: now.timestamp(),
                request_id,
                caller: caller.key_id.clone(),
            },
            correlation_id: input.correlation_id.clone(),
            explain: input.explain,
        };
        let decision = if module.is_expensive() {
            self.evaluate_off_thread(module, request, input.context.get())
                .await?
        } else {
            worlds::evaluate(&self.sandbox, &module, &request)
        }
        .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        self.observe(&loaded.counters, &decision);
        let text = input.context.get();
        let (context_digest, context) = match loaded.model.record_context {
            RecordContext::None => (String::new(), None),
            RecordContext::Digest => (digest(text.as_bytes()), None),
            RecordContext::Full => {
                let kept = text.len() <= self.impact.context_max_bytes;
                self.metrics.impact.contexts[usize::from(!kept)].inc();
                (
                    digest(text.as_bytes()),
                    kept.then(|| Arc::<str>::from(text)),
                )
            }
        };
        let meta = &decision.decision_metadata;
        self.log
            .record(NewDecision {
                decision_id: meta.decision_id.clone(),
                world: meta.world.clone(),
                version: meta.world_model_version,
                action: meta.action.clone(),
                module_hash: meta.module_hash.clone(),
                status: decision.status.as_str().to_string(),
                matched_rules: meta
                    .matched_rules
                    .iter()
                    .map(|r| MatchedRule {
                        id: r.id.clone(),
                        outcome: r.outcome.as_str().to_owned(),
                        severity: r.severity.as_str().to_owned(),
                    })
                    .collect(),
                caller: caller.key_id.clone(),
                correlation_id: meta.correlation_id.clone(),
                context_digest,
                decided_at: now,
                context,
            })
            .await
            .map_err(|_| {
                ServiceError::LogUnavailable(
                    "the decision log cannot take this decision's record now; it was not \
                     answered, retry shortly"
                        .into(),
                )
            })?;
        // Recorded and about to be answered: a sampled share goes to the world's shadow,
        // evaluated on its own thread. Never awaited, never recorded.
        if let Some(shadow) = self.cache.shadow(world) {
            if shadow.record.sample > 0.0 && rand::random::<f64>() < shadow.record.sample {
                let record = &shadow.record;
                let queued =
                    self.shadows
                        .offer(&record.id, &record.world, || crate::impact::ShadowJob {
                            module: shadow.loaded.modules.get(&input.action).cloned(),
                            world: record.world.clone(),
                            shadow: record.id.clone(),
                            context: text.into(),
                            system: SystemValues {
                                request_time: now.timestamp(),
                                request_id: decision.decision_metadata.decision_id.clone(),
                                caller: caller.key_id.clone(),
                            },
                            answered: crate::impact::Answer::of(&decision),
                        });
                self.metrics.impact.shadow[usize::from(!queued)].inc();
            }
        }
        Ok(decision)
    }

    /// Evaluate on a blocking thread, in one of a bounded number of slots; shed with 503
    /// when every slot is taken, rather than queue work that would outlive its request.
    async fn evaluate_off_thread(
        &self,
        module: Arc<worlds::Module>,
        request: Request<'_>,
        context: &str,
    ) -> Result<Result<Decision, worlds::evaluate::BadContext>, ServiceError> {
        let slot = self
            .evaluation
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                ServiceError::Overloaded(
                    "every evaluation slot for expensive rules is busy; retry shortly".into(),
                )
            })?;
        let sandbox = self.sandbox.clone();
        let context = context.to_owned();
        let (system, correlation_id, explain) =
            (request.system, request.correlation_id, request.explain);
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let request = Request {
                context: ContextJson::Text(&context),
                system,
                correlation_id,
                explain,
            };
            worlds::evaluate(&sandbox, &module, &request)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("evaluation task failed: {e}")))
    }

    /// The budget of a batch request that must answer by `deadline`.
    pub fn batch_budget(&self, deadline: Instant) -> BatchBudget {
        BatchBudget {
            operations: self.evaluation.batch_max_operations,
            deadline,
        }
    }

    /// Decide one item of a batch request. An item starts only while the batch can still
    /// give it a whole decision budget and time, so every answered item is answered exactly
    /// as the same request alone would be; the rest are refused with 503.
    pub async fn decide_in_batch(
        &self,
        caller: &Caller,
        input: &DecideInput<'_>,
        budget: &mut BatchBudget,
    ) -> Result<Decision, ServiceError> {
        if budget.operations < self.sandbox.limits().decision_max_operations {
            return Err(ServiceError::BatchBudget(format!(
                "the batch used its budget of {} operations before this item",
                self.evaluation.batch_max_operations
            )));
        }
        if Instant::now() >= budget.deadline {
            return Err(ServiceError::BatchBudget(
                "the batch ran out of time before this item".into(),
            ));
        }
        let decision = self.decide(caller, input).await?;
        budget.operations = budget.operations.saturating_sub(decision.operations);
        Ok(decision)
    }

    /// The version a decide request names. The deployed version needs nothing more than
    /// `decide`; any other needs `pin`, and a retired one is refused to every key.
    async fn pinned(
        &self,
        caller: &Caller,
        world: &str,
        version: u64,
    ) -> Result<Arc<cache::LoadedVersion>, ServiceError> {
        if let Some(deployed) = self.cache.deployed(world).filter(|d| d.version == version) {
            return Ok(deployed);
        }
        caller.check(world, Scope::Pin).map_err(|e| match e {
            ServiceError::Forbidden(_) if caller.world.as_deref().is_none_or(|w| w == world) => {
                ServiceError::Forbidden(format!(
                    "key '{}' lacks the 'pin' scope: world_model_version {version} is not the \
                     deployed version of world '{world}', and naming any version but the \
                     deployed one needs 'pin' (or omit world_model_version)",
                    caller.key_id
                ))
            }
            other => other,
        })?;
        self.cache
            .version(world, version)
            .await
            .map_err(|e| match e {
                VersionLoadError::NotFound { .. } => ServiceError::NotFound(e.to_string()),
                VersionLoadError::Retired { .. } => ServiceError::Retired(e.to_string()),
                VersionLoadError::Failed { .. } => ServiceError::Unavailable(e.to_string()),
            })
    }

    fn observe(&self, counters: &crate::telemetry::WorldCounters, decision: &Decision) {
        let index = Status::ALL
            .iter()
            .position(|s| *s == decision.status)
            .unwrap_or(0);
        counters.add(index);
        for e in &decision.decision_metadata.errors {
            if e.rule.is_some() {
                self.metrics.sandbox_error(&e.kind);
            }
        }
    }

    /// Replace a world's draft with a whole model, validated with every problem listed.
    pub async fn put_draft(
        &self,
        caller: &Caller,
        world: &str,
        body: &[u8],
    ) -> Result<WorldModel, ServiceError> {
        caller.check(world, Scope::Author)?;
        let model = decode_draft(world, body)?;
        self.verify(&model).await?;
        let json =
            serde_json::to_value(&model).map_err(|e| ServiceError::Internal(e.to_string()))?;
        self.store
            .put_draft(world, &json)
            .await
            .map_err(ServiceError::from_store)?;
        Ok(model)
    }

    /// Validate, compile and run every case of a model, off the request threads.
    async fn verify(&self, model: &WorldModel) -> Result<worlds::CompiledWorld, ServiceError> {
        let sandbox = self.sandbox.clone();
        let model = model.clone();
        tokio::task::spawn_blocking(move || verify_model(&model, &sandbox))
            .await
            .map_err(|e| ServiceError::Internal(format!("verification task failed: {e}")))?
    }

    /// Publish the world's draft as its next version.
    pub async fn publish(&self, caller: &Caller, world: &str) -> Result<Published, ServiceError> {
        caller.check(world, Scope::Author)?;
        let draft = self
            .store
            .draft(world)
            .await
            .map_err(ServiceError::from_store)?
            .ok_or_else(|| ServiceError::NotFound(format!("world '{world}' has no draft")))?;
        let model: WorldModel = serde_json::from_value(draft.clone())
            .map_err(|e| ServiceError::Internal(format!("stored draft does not decode: {e}")))?;
        self.publish_model(&caller.key_id, &model, draft).await
    }

    async fn publish_model(
        &self,
        by: &str,
        model: &WorldModel,
        json: serde_json::Value,
    ) -> Result<Published, ServiceError> {
        let compiled = self.verify(model).await?;
        let modules: Vec<NewModule> = compiled
            .modules
            .iter()
            .map(|m| NewModule {
                action: m.manifest.action.clone(),
                hash: m.hash().to_string(),
                content: m.canonical_json().to_vec(),
            })
            .collect();
        let listed = modules
            .iter()
            .map(|m| (m.action.clone(), m.hash.clone()))
            .collect();
        let version = self
            .store
            .publish(&NewVersion {
                world: model.world.clone(),
                model: json,
                modules,
                published_by: by.to_string(),
            })
            .await
            .map_err(ServiceError::from_store)?;
        tracing::info!(world = model.world, version, by, "version published");
        Ok(Published {
            world: model.world.clone(),
            version,
            modules: listed,
        })
    }

    /// Deploy (or roll back to) a published version; this instance serves it before
    /// answering, others within the configured bound.
    pub async fn deploy(
        &self,
        caller: &Caller,
        world: &str,
        version: u64,
    ) -> Result<Deployment, ServiceError> {
        caller.check(world, Scope::Deploy)?;
        // Load first: a version that cannot be served is not deployed.
        self.cache
            .version(world, version)
            .await
            .map_err(|e| match e {
                VersionLoadError::NotFound { .. } => ServiceError::NotFound(e.to_string()),
                VersionLoadError::Retired { .. } | VersionLoadError::Failed { .. } => {
                    ServiceError::Conflict(e.to_string())
                }
            })?;
        let deployment = self
            .store
            .deploy(world, version, &caller.key_id)
            .await
            .map_err(ServiceError::from_store)?;
        self.cache
            .refresh()
            .await
            .map_err(ServiceError::from_store)?;
        tracing::info!(world, version, by = caller.key_id, "version deployed");
        Ok(deployment)
    }

    /// Retire a version for good: no key may pin it any more (not even with `pin`) and it is
    /// never deployed again. The deployed version cannot be retired; roll back first. This
    /// instance refuses the version before answering, others on their next refresh (at once
    /// on Postgres notifications, within the poll interval otherwise).
    pub async fn retire(
        &self,
        caller: &Caller,
        world: &str,
        version: u64,
        reason: Option<&str>,
    ) -> Result<RetiredVersion, ServiceError> {
        caller.check(world, Scope::Deploy)?;
        let len = reason.map_or(0, |r| r.chars().count());
        if len > MAX_RETIRE_REASON_CHARS {
            return Err(ServiceError::FieldTooLong {
                field: "reason",
                len,
                max: MAX_RETIRE_REASON_CHARS,
            });
        }
        let retired = self
            .store
            .retire(world, version, &caller.key_id, reason)
            .await
            .map_err(ServiceError::from_store)?;
        self.cache
            .refresh()
            .await
            .map_err(ServiceError::from_store)?;
        tracing::info!(world, version, by = caller.key_id, "version retired");
        Ok(RetiredVersion {
            world: world.to_string(),
            version,
            retired,
        })
    }

    /// The worlds a caller may read.
    pub async fn worlds(&self, caller: &Caller) -> Result<Vec<WorldSummary>, ServiceError> {
        let all = self
            .store
            .list_worlds()
            .await
            .map_err(ServiceError::from_store)?;
        Ok(all
            .into_iter()
            .filter(|w| caller.check(&w.world, Scope::Read).is_ok())
            .collect())
    }

    pub async fn world(&self, caller: &Caller, world: &str) -> Result<WorldDetail, ServiceError> {
        caller.check(world, Scope::Read)?;
        self.store
            .world(world)
            .await
            .map_err(ServiceError::from_store)?
            .ok_or_else(|| ServiceError::NotFound(format!("world '{world}' does not exist")))
    }

    pub async fn version(
        &self,
        caller: &Caller,
        world: &str,
        version: u64,
    ) -> Result<VersionRecord, ServiceError> {
        caller.check(world, Scope::Read)?;
        self.store
            .version(world, version)
            .await
            .map_err(ServiceError::from_store)?
            .ok_or_else(|| {
                ServiceError::NotFound(format!("world '{world}' has no version {version}"))
            })
    }

    /// The OpenAPI document of the deployed version's actions.
    pub async fn actions(
        &self,
        caller: &Caller,
        world: &str,
    ) -> Result<serde_json::Value, ServiceError> {
        caller.check(world, Scope::Read)?;
        let loaded = self.cache.deployed(world).ok_or_else(|| {
            ServiceError::NotFound(format!("world '{world}' has no deployed version"))
        })?;
        Ok(openapi::document(&loaded.model, loaded.version))
    }

    /// The deployed actions of the caller's world with the schemas of their evidence, as
    /// the MCP tool `spectral.list_actions` answers.
    pub async fn action_catalog(
        &self,
        caller: &Caller,
        world: Option<&str>,
    ) -> Result<serde_json::Value, ServiceError> {
        let world = caller.resolve_world(world)?;
        caller.check(world, Scope::Read)?;
        let loaded = self.cache.deployed(world).ok_or_else(|| {
            ServiceError::NotFound(format!("world '{world}' has no deployed version"))
        })?;
        Ok(openapi::catalog(&loaded.model, loaded.version))
    }

    /// Decision statistics, as the `decision.recorded` handler has counted them so far.
    pub async fn stats(&self, caller: &Caller, world: &str) -> Result<WorldStats, ServiceError> {
        caller.check(world, Scope::Read)?;
        let rows = self
            .store
            .stats(world)
            .await
            .map_err(ServiceError::from_store)?;
        let mut stats = WorldStats {
            world: world.to_string(),
            decisions: Default::default(),
            rules: Default::default(),
        };
        for r in rows {
            if r.rule == "*" {
                stats.decisions.insert(r.status, r.count);
            } else {
                stats
                    .rules
                    .entry(r.rule)
                    .or_default()
                    .insert(r.status, r.count);
            }
        }
        Ok(stats)
    }

    /// Subscribe a URL to a world's events.
    pub async fn create_webhook(
        &self,
        caller: &Caller,
        world: &str,
        input: WebhookInput,
    ) -> Result<CreatedWebhook, ServiceError> {
        caller.check(world, Scope::Author)?;
        let url = reqwest::Url::parse(&input.url)
            .map_err(|e| ServiceError::BadRequest(format!("url '{}': {e}", input.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ServiceError::BadRequest(format!(
                "url '{}' must be http or https",
                input.url
            )));
        }
        self.egress
            .check_url(&url)
            .map_err(|why| ServiceError::BadRequest(format!("url '{}': {why}", input.url)))?;
        let known = [
            crate::store::events::VERSION_PUBLISHED,
            crate::store::events::MODULE_DEPLOYED,
            crate::store::events::VERSION_RETIRED,
        ];
        // Retirements only when asked for: subscribers from before they existed keep receiving
        // what they did.
        let events = input
            .events
            .unwrap_or_else(|| known[..2].iter().map(|e| e.to_string()).collect());
        if let Some(bad) = events.iter().find(|e| !known.contains(&e.as_str())) {
            return Err(ServiceError::BadRequest(format!(
                "unknown event '{bad}'; webhooks receive {}",
                known.join(", ")
            )));
        }
        if self
            .store
            .world(world)
            .await
            .map_err(ServiceError::from_store)?
            .is_none()
        {
            return Err(ServiceError::NotFound(format!(
                "world '{world}' does not exist"
            )));
        }
        if input
            .secret
            .as_deref()
            .is_some_and(|s| s.starts_with(crate::seal::SEALED_PREFIX))
        {
            return Err(ServiceError::BadRequest(format!(
                "a webhook secret may not start with '{}'",
                crate::seal::SEALED_PREFIX
            )));
        }
        let secret = input.secret.unwrap_or_else(|| auth::generate().1);
        let id = format!("wh_{}", uuid::Uuid::now_v7().simple());
        // Stored sealed, shown in plain this once.
        let sealed = self
            .webhook_seal
            .seal(&id, &secret)
            .map_err(|e| ServiceError::Unavailable(format!("webhooks cannot be created: {e}")))?;
        let mut webhook = crate::store::Webhook {
            id,
            world: world.to_string(),
            url: url.to_string(),
            secret: sealed,
            events,
            created_at: chrono::Utc::now(),
        };
        self.store
            .create_webhook(&webhook)
            .await
            .map_err(ServiceError::from_store)?;
        webhook.secret = secret.clone();
        Ok(CreatedWebhook { webhook, secret })
    }

    /// Publish and deploy every world folder under `dir` that the store does not have yet.
    /// Used by `spectral serve` so that a fresh install answers decisions at once.
    pub async fn seed(&self, dir: &Path) -> Result<Vec<Published>, ServiceError> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| ServiceError::Internal(format!("cannot read {}: {e}", dir.display())))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.join(worlds::load::MANIFEST).is_file())
            .collect();
        entries.sort();
        let existing = self
            .store
            .list_worlds()
            .await
            .map_err(ServiceError::from_store)?;
        let mut done = Vec::new();
        for path in entries {
            let model = worlds::load::load_model(&path).map_err(|e| ServiceError::Invalid {
                message: format!("{} does not load", path.display()),
                problems: e.0,
            })?;
            if existing.iter().any(|w| w.world == model.world) {
                continue;
            }
            let json =
                serde_json::to_value(&model).map_err(|e| ServiceError::Internal(e.to_string()))?;
            self.store
                .put_draft(&model.world, &json)
                .await
                .map_err(ServiceError::from_store)?;
            let published = self.publish_model("bootstrap", &model, json).await?;
            self.store
                .deploy(&model.world, published.version, "bootstrap")
                .await
                .map_err(ServiceError::from_store)?;
            tracing::info!(
                world = model.world,
                version = published.version,
                "seeded world"
            );
            done.push(published);
        }
        self.cache
            .refresh()
            .await
            .map_err(ServiceError::from_store)?;
        Ok(done)
    }

    /// What the public `/health` shows: readiness and the state of every feature, as the
    /// deploy gate needs them, and nothing per tenant (docs/operations.md, "Public and
    /// admin ports").
    pub async fn public_health(&self) -> (bool, serde_json::Value) {
        let (ready, detailed) = self.health().await;
        (ready, public_view(&detailed))
    }

    /// Readiness and the wiring of every feature, in detail: the admin listener's `/health`.
    pub async fn health(&self) -> (bool, serde_json::Value) {
        let store_ok = self.store.ping().await.is_ok();
        let loaded = self.cache.loaded();
        let failed = self.cache.failures();
        // A workers runtime that died leaves this process's events unhandled: not ready.
        let workers_ok = self.outbox.wiring() != crate::outbox::Wiring::Failed;
        let ready =
            self.ready.load(Ordering::Acquire) && store_ok && failed.is_empty() && workers_ok;
        let rows = self.store.outbox_counts(self.generation).await.ok();
        // Rows another generation left pending past the configured age: nothing handles them
        // until an operator adopts them, so the service is degraded (still ready: it decides).
        let stranded = self
            .store
            .stranded(self.generation, self.stranded_after)
            .await
            .ok();
        let degraded = stranded.as_ref().is_some_and(|s| s.rows > 0);
        let status = match (ready, degraded) {
            (false, _) => "unavailable",
            (true, true) => "degraded",
            (true, false) => "ok",
        };
        let stranded = stranded.map(|s| {
            serde_json::json!({
                "rows": s.rows,
                "oldest_age_ms": s.oldest_age_ms,
                "after_ms": u64::try_from(self.stranded_after.as_millis()).unwrap_or(u64::MAX),
            })
        });
        let body = serde_json::json!({
            "status": status,
            "version": self.build.version,
            "git_sha": self.build.git_sha,
            "generation": self.generation,
            "uptime_s": self.started.elapsed().as_secs(),
            "features": {
                "store": {"backend": self.store.backend(), "reachable": store_ok},
                "deployments": self.cache.watch_mode(),
                "worlds": {"loaded": loaded, "failed": failed},
                "decision_log": self.log.status(),
                "evaluation": self.evaluation.status(),
                "outbox": self.outbox.wiring(),
                "outbox_rows": rows,
                "outbox_stranded": stranded,
                "agent": self.agent.status(),
            }
        });
        (ready, body)
    }

    // The life cycle of keys, and webhook management.

    /// Every key (id, world, scopes, label, times); never a secret or its hash. Operators
    /// only.
    pub async fn list_keys(&self, caller: &Caller) -> Result<Vec<KeyRecord>, ServiceError> {
        operator_only(caller)?;
        self.store
            .list_keys()
            .await
            .map_err(ServiceError::from_store)
    }

    /// Revoke a key for good: refused at once here, and on every other instance as soon as
    /// it hears of it (Postgres NOTIFY), or when its cached lookup expires (the key cache's
    /// TTL). Operators only.
    pub async fn revoke_key(&self, caller: &Caller, id: &str) -> Result<KeyRecord, ServiceError> {
        operator_only(caller)?;
        let revoked = self
            .store
            .revoke_key(id)
            .await
            .map_err(ServiceError::from_store)?;
        self.keys.forget(id);
        tracing::info!(key = %id, by = %caller.key_id, "API key revoked");
        Ok(revoked)
    }

    /// Give a key a new secret, shown this once; the one it had stays valid for the
    /// configured overlap. Operators only.
    pub async fn rotate_key(&self, caller: &Caller, id: &str) -> Result<RotatedKey, ServiceError> {
        operator_only(caller)?;
        let (_, secret) = auth::generate();
        let overlap = chrono::TimeDelta::from_std(self.keys.rotation_overlap())
            .map_err(|e| ServiceError::Internal(format!("rotation overlap: {e}")))?;
        let key = self
            .store
            .rotate_key(
                id,
                &auth::hash_secret(&secret),
                chrono::Utc::now() + overlap,
            )
            .await
            .map_err(ServiceError::from_store)?;
        self.keys.forget(id);
        tracing::info!(key = %id, by = %caller.key_id, "API key rotated");
        Ok(RotatedKey { key, secret })
    }

    /// A world's webhooks, without their secrets; for keys of that world with the author
    /// scope (the one that creates them) and operators.
    pub async fn webhooks(
        &self,
        caller: &Caller,
        world: &str,
    ) -> Result<Vec<crate::store::Webhook>, ServiceError> {
        caller.check(world, Scope::Author)?;
        self.store
            .webhooks(world)
            .await
            .map_err(ServiceError::from_store)
    }

    /// Delete a world's webhook: nothing more is delivered to it (a delivery already queued
    /// fails for good, saying the webhook no longer exists).
    pub async fn delete_webhook(
        &self,
        caller: &Caller,
        world: &str,
        id: &str,
    ) -> Result<(), ServiceError> {
        caller.check(world, Scope::Author)?;
        self.store
            .delete_webhook(world, id)
            .await
            .map_err(ServiceError::from_store)
    }
}

/// Refuse a key bound to a world: only operator keys manage keys.
fn operator_only(caller: &Caller) -> Result<(), ServiceError> {
    match &caller.world {
        None => Ok(()),
        Some(_) => Err(ServiceError::Forbidden(format!(
            "key '{}' is bound to a world; only an operator key manages keys",
            caller.key_id
        ))),
    }
}

/// A rotated key, with its new secret shown this once.
#[derive(Debug, Serialize)]
pub struct RotatedKey {
    #[serde(flatten)]
    pub key: KeyRecord,
    pub secret: String,
}

/// The public view of a detailed health report: the build, the status and each feature's
/// state; no world names or versions, no counts, no error text.
pub fn public_view(detailed: &serde_json::Value) -> serde_json::Value {
    let f = &detailed["features"];
    let failing = f["worlds"]["failed"]
        .as_object()
        .is_some_and(|failed| !failed.is_empty());
    serde_json::json!({
        "status": detailed["status"],
        "version": detailed["version"],
        "git_sha": detailed["git_sha"],
        "generation": detailed["generation"],
        "uptime_s": detailed["uptime_s"],
        "features": {
            "store": {
                "backend": f["store"]["backend"],
                "reachable": f["store"]["reachable"],
            },
            "deployments": f["deployments"],
            "worlds": {"state": if failing { "failing" } else { "ok" }},
            "decision_log": {
                "overflow": f["decision_log"]["overflow"],
                "durability": f["decision_log"]["durability"],
            },
            "outbox": f["outbox"],
            "agent": f["agent"],
        }
    })
}

#[cfg(test)]
mod public_health_tests {
    use super::public_view;
    use serde_json::json;

    #[test]
    fn the_public_view_names_no_world_and_counts_nothing() {
        let detailed = json!({
            "status": "unavailable", "version": "1", "git_sha": "abc", "generation": 3,
            "uptime_s": 5,
            "features": {
                "store": {"backend": "postgres", "reachable": true},
                "deployments": "listening",
                "worlds": {"loaded": {"acme": 2}, "failed": {"globex": "hashes to sha256:00"}},
                "decision_log": {"queue_depth": 7, "written": 99, "overflow": "block", "durability": "commit"},
                "evaluation": {"slots": 4, "busy": 1},
                "outbox": "wired",
                "outbox_rows": {"pending": 12},
                "agent": "unconfigured",
            }
        });
        let public = public_view(&detailed);
        let text = public.to_string();
        for secret in [
            "acme",
            "globex",
            "sha256",
            "99",
            "12",
            "queue_depth",
            "busy",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(public["features"]["worlds"]["state"], "failing");
        assert_eq!(public["features"]["store"]["backend"], "postgres");
        assert_eq!(public["status"], "unavailable");
    }
}

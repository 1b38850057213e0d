//! Durable state behind one seam with two backends: SQLite (the embedded default, a file in a
//! data directory) and PostgreSQL (`DATABASE_URL=postgres://…`, Supabase-compatible).
//!
//! **Boundary:** the only module that contains SQL or names `sqlx` types. All SQL for Postgres
//! is in `store/postgres.rs`, all SQL for SQLite in `store/sqlite.rs`; this file holds the
//! shared types and the dispatch. Callers never see which backend they talk to, except through
//! [`Store::backend`] for reporting.
//!
//! **Invariants:** world-model versions are immutable once published; modules are write-once,
//! addressed by the sha256 of their content; each world's decision records form a hash chain
//! (every record carries the hash of the previous record of its world), appended under a
//! per-world lock so that several API instances on one Postgres extend one chain.

mod postgres;
mod sqlite;

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How to reach the store.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// `postgres://…` to use PostgreSQL; `None` for SQLite under `data_dir`.
    pub database_url: Option<String>,
    /// Where the SQLite database lives (`spectral.db` inside it).
    pub data_dir: PathBuf,
    /// Connections in the pool.
    pub max_connections: u32,
    /// Apply pending migrations when connecting.
    pub migrate_on_start: bool,
}

impl std::fmt::Debug for StoreConfig {
    // The URL may carry a password: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field(
                "database_url",
                &self.database_url.as_ref().map(|_| "<redacted>"),
            )
            .field("data_dir", &self.data_dir)
            .field("max_connections", &self.max_connections)
            .field("migrate_on_start", &self.migrate_on_start)
            .finish()
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            database_url: None,
            data_dir: PathBuf::from("data"),
            max_connections: 8,
            migrate_on_start: true,
        }
    }
}

/// Which backend a store uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing asked for does not exist (a world, a version).
    #[error("{0} not found")]
    NotFound(String),
    /// The change conflicts with what is stored (a duplicate key id, …).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database could not be reached or answered with an error.
    #[error("database error: {0}")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migration(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

/// A scope an API key may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Decide,
    Read,
    Author,
    Deploy,
    /// Decide with a version other than the deployed one (`world_model_version`), for replays
    /// and canaries. Without it a key decides only with the deployed version, so a rollback
    /// takes a bad version out of every decide-only key's reach.
    Pin,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Self::Decide,
        Self::Read,
        Self::Author,
        Self::Deploy,
        Self::Pin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Decide => "decide",
            Self::Read => "read",
            Self::Author => "author",
            Self::Deploy => "deploy",
            Self::Pin => "pin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// A new API key to store. Only the sha256 of the secret is ever stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    /// Public identifier (shown in logs and decision records).
    pub id: String,
    /// Lower-case hex sha256 of the secret.
    pub secret_hash: String,
    /// The one world the key is bound to; `None` for an operator key (all worlds).
    pub world: Option<String>,
    pub scopes: Vec<Scope>,
    pub label: String,
}

/// A stored API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub world: Option<String>,
    pub scopes: Vec<Scope>,
    pub label: String,
    pub created_at: DateTime<Utc>,
}

/// A module to store with a new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewModule {
    pub action: String,
    /// `sha256:<hex>` of `content`.
    pub hash: String,
    /// The canonical module source.
    pub content: Vec<u8>,
}

/// A version to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct NewVersion {
    pub world: String,
    /// The whole world model as JSON.
    pub model: serde_json::Value,
    pub modules: Vec<NewModule>,
    /// Who published it (a key id).
    pub published_by: String,
}

/// A published version, summarised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionSummary {
    pub version: u64,
    pub published_at: DateTime<Utc>,
    pub published_by: String,
    /// Set once the version is retired; `null` while it may be pinned and deployed.
    pub retired: Option<Retirement>,
}

/// Why, when and by whom a version was retired: no key may pin it any more and it is never
/// deployed again. Retirement is permanent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retirement {
    pub retired_at: DateTime<Utc>,
    /// The key id that retired it.
    pub retired_by: String,
    pub reason: Option<String>,
}

/// A published version in full.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionRecord {
    pub world: String,
    pub version: u64,
    pub model: serde_json::Value,
    /// `(action, module hash)` in the model's action order.
    pub modules: Vec<(String, String)>,
    pub published_at: DateTime<Utc>,
    pub published_by: String,
    /// Set once the version is retired.
    pub retired: Option<Retirement>,
}

/// One deployment in a world's history. Rollback is a deployment of an older version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deployment {
    /// Increases with every deployment of the world.
    pub seq: u64,
    pub version: u64,
    pub deployed_at: DateTime<Utc>,
    pub deployed_by: String,
}

/// A world in the list of worlds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorldSummary {
    pub world: String,
    pub deployed_version: Option<u64>,
    pub latest_version: Option<u64>,
}

/// A world in detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorldDetail {
    pub world: String,
    pub deployed_version: Option<u64>,
    pub has_draft: bool,
    /// Oldest first.
    pub versions: Vec<VersionSummary>,
    /// Oldest first.
    pub deployments: Vec<Deployment>,
}

/// A decision to record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewDecision {
    pub decision_id: String,
    pub world: String,
    pub version: u64,
    pub action: String,
    pub module_hash: String,
    pub status: String,
    /// The matched rules as the decision reported them.
    pub matched_rules: serde_json::Value,
    /// The key id that asked.
    pub caller: String,
    pub correlation_id: Option<String>,
    /// `sha256:<hex>` of the context the caller sent.
    pub context_digest: String,
    pub decided_at: DateTime<Utc>,
}

/// A recorded decision, with its place in its world's chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// 1, 2, 3 … within the world.
    pub seq: u64,
    #[serde(flatten)]
    pub decision: NewDecision,
    /// The previous record's hash (`GENESIS` for the first).
    pub prev_hash: String,
    pub hash: String,
}

/// The `prev_hash` of a world's first decision record.
pub const GENESIS: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of a decision record: sha256 over the previous hash, the sequence number and
/// the canonical JSON of the decision. Both backends and the auditor use this one function.
pub fn chain_hash(prev_hash: &str, seq: u64, decision: &NewDecision) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(seq.to_string().as_bytes());
    h.update(b"\n");
    // Serializing a struct of strings, numbers and a JSON value cannot fail.
    h.update(serde_json::to_vec(decision).unwrap_or_default());
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Notifications pushed by Postgres `LISTEN`: of deployments (payload: the world's slug) or
/// of outbox inserts (payload: the row id).
pub struct Listener {
    inner: postgres::Listener,
}

impl Listener {
    /// Wait for the next notification's payload. An error means the connection was lost:
    /// callers fall back to polling and listen again later.
    pub async fn next(&mut self) -> Result<String, StoreError> {
        self.inner.next().await
    }

    /// Check the listening connection is alive; a silently dead connection would otherwise
    /// leave the caller waiting for notifications that never come.
    pub async fn ping(&mut self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

/// The store: a pool for one backend.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $body:expr) => {
        match $self {
            Store::Sqlite($s) => $body,
            Store::Postgres($s) => $body,
        }
    };
}

impl Store {
    /// Connect as configured (and migrate when `migrate_on_start`).
    pub async fn connect(config: &StoreConfig) -> Result<Self, StoreError> {
        let store = match &config.database_url {
            Some(url) => {
                Store::Postgres(postgres::PgStore::connect(url, config.max_connections).await?)
            }
            None => Store::Sqlite(
                sqlite::SqliteStore::open(&config.data_dir, config.max_connections).await?,
            ),
        };
        if config.migrate_on_start {
            store.migrate().await?;
        }
        Ok(store)
    }

    /// A second store on the same database for another runtime of this process (the
    /// workers'): a pool of its own, named `name` on Postgres (`application_name`), that
    /// shares `peer`'s stamp, so that a commit through either wakes a consumer waiting on the
    /// other's [`Store::local_wake`] (SQLite has no NOTIFY; ARCHITECTURE.md, "Supervisor").
    pub async fn connect_beside(
        config: &StoreConfig,
        peer: &Store,
        name: &str,
    ) -> Result<Self, StoreError> {
        let mut config = config.clone();
        if let Some(url) = config.database_url.as_mut() {
            if let Ok(mut parsed) = url::Url::parse(url) {
                if !parsed.query_pairs().any(|(k, _)| k == "application_name") {
                    parsed
                        .query_pairs_mut()
                        .append_pair("application_name", name);
                    *url = parsed.to_string();
                }
            }
        }
        let mut store = Store::connect(&config).await?;
        match (&mut store, peer) {
            (Store::Sqlite(s), Store::Sqlite(p)) => s.stamp = p.stamp.clone(),
            (Store::Postgres(s), Store::Postgres(p)) => s.stamp = p.stamp.clone(),
            _ => {}
        }
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        match self {
            Store::Sqlite(_) => Backend::Sqlite,
            Store::Postgres(_) => Backend::Postgres,
        }
    }

    /// The decision-log writer's store: one connection of its own to the same database,
    /// producing events under this store's generation. Open it on the writer's own
    /// runtime and thread. On SQLite its commits are durable against a crash of the process,
    /// not always against a power cut (`synchronous=NORMAL`).
    pub async fn log_writer(&self) -> Result<Self, StoreError> {
        Ok(match self {
            Store::Sqlite(s) => Store::Sqlite(s.log_writer().await?),
            Store::Postgres(s) => Store::Postgres(s.log_writer().await?),
        })
    }

    /// Apply pending forward-only migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.migrate().await)
    }

    /// Check the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping().await)
    }

    /// Close the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        dispatch!(self, s => s.close().await)
    }

    /// Replace a world's draft (creating the world on first use).
    pub async fn put_draft(
        &self,
        world: &str,
        model: &serde_json::Value,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_draft(world, model).await)
    }

    pub async fn draft(&self, world: &str) -> Result<Option<serde_json::Value>, StoreError> {
        dispatch!(self, s => s.draft(world).await)
    }

    /// Store a new version as the world's latest number + 1, with its modules (write-once:
    /// a module already stored under its hash is kept as it is), in one transaction. Returns
    /// the new version number.
    pub async fn publish(&self, version: &NewVersion) -> Result<u64, StoreError> {
        let r = dispatch!(self, s => s.publish(version).await);
        // Events were appended: wake a consumer in this process (SQLite has no NOTIFY).
        self.local_wake().notify_waiters();
        r
    }

    /// Make `version` the deployed version of `world` and append it to the history, in one
    /// transaction; on Postgres, `NOTIFY` every instance. `NotFound` when the version does not
    /// exist, `Conflict` when it is retired.
    pub async fn deploy(
        &self,
        world: &str,
        version: u64,
        deployed_by: &str,
    ) -> Result<Deployment, StoreError> {
        let r = dispatch!(self, s => s.deploy(world, version, deployed_by).await);
        // Events were appended: wake a consumer in this process (SQLite has no NOTIFY).
        self.local_wake().notify_waiters();
        r
    }

    /// Retire a version for good, with an outbox event, in one transaction; on Postgres,
    /// `NOTIFY` every instance on the deployments channel so that their caches stop serving it.
    /// `NotFound` when the version does not exist; `Conflict` when it is the deployed version
    /// or already retired.
    pub async fn retire(
        &self,
        world: &str,
        version: u64,
        retired_by: &str,
        reason: Option<&str>,
    ) -> Result<Retirement, StoreError> {
        let r = dispatch!(self, s => s.retire(world, version, retired_by, reason).await);
        // Events were appended: wake a consumer in this process (SQLite has no NOTIFY).
        self.local_wake().notify_waiters();
        r
    }

    /// Every retired version, as `(world, version)`.
    pub async fn retired(&self) -> Result<Vec<(String, u64)>, StoreError> {
        dispatch!(self, s => s.retired().await)
    }

    pub async fn list_worlds(&self) -> Result<Vec<WorldSummary>, StoreError> {
        dispatch!(self, s => s.list_worlds().await)
    }

    pub async fn world(&self, world: &str) -> Result<Option<WorldDetail>, StoreError> {
        dispatch!(self, s => s.world(world).await)
    }

    pub async fn version(
        &self,
        world: &str,
        version: u64,
    ) -> Result<Option<VersionRecord>, StoreError> {
        dispatch!(self, s => s.version(world, version).await)
    }

    /// A module's canonical content by its hash.
    pub async fn module(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        dispatch!(self, s => s.module(hash).await)
    }

    /// Every world's deployed version.
    pub async fn deployed(&self) -> Result<Vec<(String, u64)>, StoreError> {
        dispatch!(self, s => s.deployed().await)
    }

    /// Listen for deployment notifications; `None` on SQLite, which has no such channel.
    pub async fn listen_deployments(&self) -> Result<Option<Listener>, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(s) => Ok(Some(Listener {
                inner: s.listen().await?,
            })),
        }
    }

    /// `Conflict` when the id is taken.
    pub async fn create_key(&self, key: &NewKey) -> Result<(), StoreError> {
        dispatch!(self, s => s.create_key(key).await)
    }

    pub async fn key_by_hash(&self, secret_hash: &str) -> Result<Option<KeyRecord>, StoreError> {
        dispatch!(self, s => s.key_by_hash(secret_hash).await)
    }

    pub async fn has_operator_key(&self) -> Result<bool, StoreError> {
        dispatch!(self, s => s.has_operator_key().await)
    }

    /// Append decisions to their worlds' chains in one transaction (group commit). Each
    /// world's chain head is locked for the transaction, so concurrent writers serialize.
    pub async fn append_decisions(&self, decisions: &[NewDecision]) -> Result<(), StoreError> {
        let r = dispatch!(self, s => s.append_decisions(decisions).await);
        // Events were appended: wake a consumer in this process (SQLite has no NOTIFY).
        self.local_wake().notify_waiters();
        r
    }

    /// A world's decision records with `seq > after`, in order, at most `limit`.
    pub async fn decisions(
        &self,
        world: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<DecisionRecord>, StoreError> {
        dispatch!(self, s => s.decisions(world, after, limit).await)
    }

    /// The generation stamped on events this store produces.
    pub fn generation(&self) -> i64 {
        dispatch!(self, s => s.stamp.generation.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Set the generation stamped on events this store (and its clones) produce.
    pub fn set_generation(&self, generation: i64) {
        dispatch!(self, s => s.stamp.generation.store(generation, std::sync::atomic::Ordering::Relaxed))
    }

    /// Woken after this process commits events; a consumer in the same process waits on it.
    pub fn local_wake(&self) -> &tokio::sync::Notify {
        dispatch!(self, s => &s.stamp.wake)
    }

    /// Allocate a new deploy generation.
    pub async fn allocate_generation(&self, git_sha: &str, note: &str) -> Result<i64, StoreError> {
        dispatch!(self, s => s.allocate_generation(git_sha, note).await)
    }

    /// Append events outside any other change (tests, and producers with no change of
    /// their own).
    pub async fn enqueue(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        let r = dispatch!(self, s => s.enqueue(events).await);
        self.local_wake().notify_waiters();
        r
    }

    /// Claim up to `limit` pending rows of `generation` that are due, oldest first, for
    /// `worker`. Concurrent claimers never get the same row.
    pub async fn claim(
        &self,
        generation: i64,
        worker: &str,
        limit: u32,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        dispatch!(self, s => s.claim(generation, worker, limit).await)
    }

    /// Record that `handler` handled the row, apply its effect and mark the row delivered,
    /// all in one transaction.
    pub async fn complete(
        &self,
        row: &OutboxRow,
        worker: &str,
        handler: &str,
        effect: &Effect,
    ) -> Result<Completion, StoreError> {
        let r = dispatch!(self, s => s.complete(row, worker, handler, effect).await);
        if matches!(effect, Effect::Enqueue(_)) {
            self.local_wake().notify_waiters();
        }
        r
    }

    /// Record a failed attempt: back to pending at `retry_at`, or failed when `terminal`.
    /// Returns the row's new status (`None` when the row was no longer this worker's).
    pub async fn fail(
        &self,
        row: &OutboxRow,
        worker: &str,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<Option<OutboxStatus>, StoreError> {
        dispatch!(self, s => s.fail(row, worker, error, retry_at).await)
    }

    /// Return rows claimed by `worker` but not started to pending, undoing their attempt.
    pub async fn release(&self, worker: &str, ids: &[i64]) -> Result<u64, StoreError> {
        dispatch!(self, s => s.release(worker, ids).await)
    }

    /// Return rows of `generation` whose claim is older than `lease` to pending: their
    /// worker died.
    pub async fn rescue(
        &self,
        generation: i64,
        lease: std::time::Duration,
    ) -> Result<u64, StoreError> {
        dispatch!(self, s => s.rescue(generation, lease).await)
    }

    pub async fn outbox_row(&self, id: i64) -> Result<Option<OutboxRow>, StoreError> {
        dispatch!(self, s => s.outbox_row(id).await)
    }

    /// Rows by status (and generation), newest first, at most `limit`.
    pub async fn outbox_list(
        &self,
        status: Option<OutboxStatus>,
        generation: Option<i64>,
        limit: u32,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        dispatch!(self, s => s.outbox_list(status, generation, limit).await)
    }

    /// Put a failed row back to pending, keeping its failure history. `NotFound` unless the
    /// row exists and has failed.
    pub async fn replay(&self, id: i64) -> Result<(), StoreError> {
        let r = dispatch!(self, s => s.replay(id).await);
        self.local_wake().notify_waiters();
        r
    }

    /// Move every undelivered row of generation `from` to generation `to`; in-flight rows
    /// (their worker is gone with its generation) become pending. Returns the count.
    pub async fn adopt(&self, from: i64, to: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.adopt(from, to).await)
    }

    pub async fn outbox_counts(&self, generation: i64) -> Result<OutboxCounts, StoreError> {
        dispatch!(self, s => s.outbox_counts(generation).await)
    }

    /// Listen for outbox inserts; `None` on SQLite.
    pub async fn listen_outbox(&self) -> Result<Option<Listener>, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(s) => Ok(Some(Listener {
                inner: s.listen_channel(OUTBOX_CHANNEL).await?,
            })),
        }
    }

    /// A world's decision statistics: `(rule, status, count)`, rule `*` for decisions.
    pub async fn stats(&self, world: &str) -> Result<Vec<StatDelta>, StoreError> {
        dispatch!(self, s => s.stats(world).await)
    }

    pub async fn create_webhook(&self, hook: &Webhook) -> Result<(), StoreError> {
        dispatch!(self, s => s.create_webhook(hook).await)
    }

    pub async fn webhooks(&self, world: &str) -> Result<Vec<Webhook>, StoreError> {
        dispatch!(self, s => s.webhooks(world).await)
    }

    pub async fn webhook(&self, id: &str) -> Result<Option<Webhook>, StoreError> {
        dispatch!(self, s => s.webhook(id).await)
    }
}

// ---------------------------------------------------------------------------------------------
// The outbox (SPEC §6).

/// The NOTIFY channel outbox rows signal on insert.
pub const OUTBOX_CHANNEL: &str = "spectral_outbox";

/// Event types produced by the service.
pub mod events {
    /// A world version was published; payload `{world, version, modules, published_by}`.
    pub const VERSION_PUBLISHED: &str = "worldmodel.version.published";
    /// A version was deployed (or rolled back to); payload `{world, version, seq, deployed_by}`.
    pub const MODULE_DEPLOYED: &str = "module.deployed";
    /// A version was retired; payload `{world, version, retired_at, retired_by, reason}`.
    pub const VERSION_RETIRED: &str = "world.version.retired";
    /// A batch of decisions of one world was recorded; one event per world per group commit,
    /// payload `{world, first_seq, last_seq, counts: [{rule, status, count}]}` (rule `*`: all
    /// decisions of the batch). Rows written by earlier builds carry
    /// `decisions: [{decision_id, action, status, rules}]` instead; the handler reads both.
    pub const DECISION_RECORDED: &str = "decision.recorded";
    /// The World Agent was asked to author a rule.
    pub const AGENT_TASK_CREATED: &str = "agent.task.created";
    /// One webhook delivery to one subscriber; payload `{webhook_id, event_type, body}`.
    pub const WEBHOOK_DELIVERY: &str = "webhook.delivery";
}

/// An event to append to the outbox, in the transaction of the change it describes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    pub event_type: String,
    pub world: Option<String>,
    pub payload: serde_json::Value,
    /// Unique per event type; a second insert with the same key is ignored.
    pub idempotency_key: String,
    /// The handler the event is for; `None` for the event type's handler.
    pub target: Option<String>,
}

/// The status of an outbox row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxStatus {
    Pending,
    InFlight,
    Delivered,
    Failed,
}

impl OutboxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InFlight => "in_flight",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::InFlight, Self::Delivered, Self::Failed]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

/// A row of the outbox.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxRow {
    pub id: i64,
    pub event_type: String,
    pub event_version: i32,
    pub occurred_at: DateTime<Utc>,
    pub source: String,
    pub target: Option<String>,
    pub channel: String,
    pub generation: i64,
    pub world: Option<String>,
    pub payload: serde_json::Value,
    pub idempotency_key: String,
    pub trace_context: Option<String>,
    pub status: OutboxStatus,
    pub attempts: i32,
    pub available_at: DateTime<Utc>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub claimed_by: Option<String>,
    pub last_error: Option<String>,
    pub failure_history: serde_json::Value,
    pub first_failed_at: Option<DateTime<Utc>>,
}

/// Counts for `/health`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OutboxCounts {
    pub pending: i64,
    pub in_flight: i64,
    pub failed: i64,
    /// Pending, in-flight or failed rows that other generations left behind.
    pub other_generations: i64,
}

/// One increment of the decision statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatDelta {
    pub world: String,
    /// A rule id, or `*` for whole decisions.
    pub rule: String,
    pub status: String,
    pub count: i64,
}

/// What a handler changes in the store, applied in the transaction that records the event
/// as handled. Handlers describe effects as data because only the store holds SQL.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Nothing in the store (the handler's work was outside, e.g. an HTTP delivery).
    None,
    /// Add to the decision statistics.
    Stats(Vec<StatDelta>),
    /// Append further events (a fan-out).
    Enqueue(Vec<NewEvent>),
}

/// What became of a handled row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The effect was applied and the row delivered.
    Applied,
    /// The handler had already handled this idempotency key; the row is delivered with no
    /// second effect.
    Duplicate,
    /// The row was no longer claimed by this worker (its lease expired and another took it);
    /// nothing was changed.
    Lost,
}

/// A webhook subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Webhook {
    pub id: String,
    pub world: String,
    pub url: String,
    #[serde(skip_serializing)]
    pub secret: String,
    pub events: Vec<String>,
    pub created_at: DateTime<Utc>,
}

/// The outbox events a publish produces.
fn published_event(version: &NewVersion, number: u64) -> NewEvent {
    NewEvent {
        event_type: events::VERSION_PUBLISHED.into(),
        world: Some(version.world.clone()),
        payload: serde_json::json!({
            "world": version.world,
            "version": number,
            "modules": version.modules.iter().map(|m| serde_json::json!({"action": m.action, "hash": m.hash})).collect::<Vec<_>>(),
            "published_by": version.published_by,
        }),
        idempotency_key: format!("{}:{number}", version.world),
        target: None,
    }
}

fn deployed_event(world: &str, d: &Deployment) -> NewEvent {
    NewEvent {
        event_type: events::MODULE_DEPLOYED.into(),
        world: Some(world.to_string()),
        payload: serde_json::json!({
            "world": world,
            "version": d.version,
            "seq": d.seq,
            "deployed_by": d.deployed_by,
        }),
        idempotency_key: format!("{world}:{}", d.seq),
        target: None,
    }
}

fn retired_event(world: &str, version: u64, r: &Retirement) -> NewEvent {
    NewEvent {
        event_type: events::VERSION_RETIRED.into(),
        world: Some(world.to_string()),
        payload: serde_json::json!({
            "world": world,
            "version": version,
            "retired_at": r.retired_at,
            "retired_by": r.retired_by,
            "reason": r.reason,
        }),
        idempotency_key: format!("{world}:{version}"),
        target: None,
    }
}

/// A version's retirement from the columns of a `LEFT JOIN` on the retired versions: `None`
/// when the join found no row.
fn retirement(
    at: Option<DateTime<Utc>>,
    by: Option<String>,
    reason: Option<String>,
) -> Option<Retirement> {
    Some(Retirement {
        retired_at: at?,
        retired_by: by?,
        reason,
    })
}

/// The conflict of deploying a retired version.
fn retired_conflict(world: &str, version: u64) -> StoreError {
    StoreError::Conflict(format!(
        "world '{world}' version {version} is retired and cannot be deployed"
    ))
}

/// One `decision.recorded` event per world per group commit: a handler then updates the
/// statistics once per batch rather than once per decision, which keeps the outbox from
/// growing as fast as the decision log. The payload names the range of records and counts
/// them by status, overall (rule `*`) and per matched rule, so its size follows the rules
/// that matched, not the size of the batch; the records themselves are in the log.
fn recorded_event(world: &str, chained: &[ChainedDecision]) -> Option<NewEvent> {
    let first = chained.first()?.seq;
    let last = chained.last()?.seq;
    let mut counts: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
    for c in chained {
        let d = &c.record.decision;
        *counts.entry(("*", d.status.as_str())).or_default() += 1;
        let rules = d.matched_rules.as_array().into_iter().flatten();
        for rule in rules.filter_map(|r| r.get("id")?.as_str()) {
            *counts.entry((rule, d.status.as_str())).or_default() += 1;
        }
    }
    let counts = counts
        .into_iter()
        .map(|((rule, status), n)| (rule, status, n));
    Some(decision_recorded(world, first, last, counts))
}

/// A `decision.recorded` event for records `first_seq..=last_seq` of `world`, with their
/// counts as `(rule, status, count)`, rule `*` counting every decision.
pub fn decision_recorded<'a>(
    world: &str,
    first_seq: i64,
    last_seq: i64,
    counts: impl IntoIterator<Item = (&'a str, &'a str, u64)>,
) -> NewEvent {
    let counts: Vec<serde_json::Value> = counts
        .into_iter()
        .map(|(rule, status, count)| {
            serde_json::json!({"rule": rule, "status": status, "count": count})
        })
        .collect();
    NewEvent {
        event_type: events::DECISION_RECORDED.into(),
        world: Some(world.to_string()),
        payload: serde_json::json!({
            "world": world,
            "first_seq": first_seq,
            "last_seq": last_seq,
            "counts": counts,
        }),
        idempotency_key: format!("{world}:{first_seq}-{last_seq}"),
        target: None,
    }
}

/// Who produces events: stamped on every row.
#[derive(Debug)]
struct Stamp {
    /// The deploy generation of this process; consumers claim only their own.
    generation: std::sync::atomic::AtomicI64,
    /// Signalled after a commit that appended events, so a consumer in the same process
    /// wakes at once (SQLite has no NOTIFY).
    wake: tokio::sync::Notify,
}

impl Default for Stamp {
    fn default() -> Self {
        Self {
            generation: std::sync::atomic::AtomicI64::new(0),
            wake: tokio::sync::Notify::new(),
        }
    }
}

fn source() -> String {
    format!("spectral/{}", env!("CARGO_PKG_VERSION"))
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by both backends. They hold no SQL; they keep the two backends agreeing on
// how values are converted, so that a record reads back the same from either.

/// Map a sqlx error: a unique violation is the caller's conflict, anything else the server's.
fn db_error(e: sqlx::Error) -> StoreError {
    match e.as_database_error() {
        Some(d) if d.is_unique_violation() => StoreError::Conflict(d.message().to_lowercase()),
        _ => StoreError::Database(Box::new(e)),
    }
}

/// Like [`db_error`], but with a conflict message that names the caller's value instead of
/// the database's constraint.
fn db_error_or_conflict(e: sqlx::Error, conflict: impl FnOnce() -> String) -> StoreError {
    match db_error(e) {
        StoreError::Conflict(_) => StoreError::Conflict(conflict()),
        other => other,
    }
}

fn migrate_error(e: sqlx::migrate::MigrateError) -> StoreError {
    StoreError::Migration(Box::new(e))
}

/// Both databases keep microseconds. Truncating before anything is stored or hashed makes a
/// stored time read back equal to what was written, so hashes recompute.
fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// The current time as it will be stored.
fn now() -> DateTime<Utc> {
    truncate_micros(Utc::now())
}

/// Micros since the epoch back to a time (SQLite stores times as integer microseconds).
fn from_micros(micros: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StoreError::Corrupt(format!("timestamp {micros} µs is out of range")))
}

/// Version numbers, sequence numbers and limits are `u64` in the API and `BIGINT` in both
/// databases. A number beyond `i64::MAX` cannot have been stored, so lookups treat it as absent.
fn to_i64(n: u64) -> Option<i64> {
    i64::try_from(n).ok()
}

fn to_u64(n: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("{what} {n} is negative")))
}

fn parse_json(text: &str, what: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn to_json_text(value: &serde_json::Value) -> Result<String, StoreError> {
    // A `Value` always serializes; the error arm only keeps this free of `unwrap`.
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("json: {e}")))
}

fn parse_scopes<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Vec<Scope>, StoreError> {
    items
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(|s| Scope::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown scope '{s}'"))))
        .collect()
}

/// A decision in the exact form it is stored in, so that the hash computed before the insert
/// is the hash an auditor recomputes from what [`Store::decisions`] returns.
struct StoredDecision {
    decision: NewDecision,
    /// `matched_rules` as stored: the text of its JSON. Text rather than `jsonb`, because
    /// `jsonb` normalizes numbers (`-0.0` becomes `0.0`) and would change the hashed bytes.
    matched_rules: String,
    /// `decision.version` as stored.
    version: i64,
}

/// The batch grouped by world, in the form it will be stored in. Worlds come out in sorted
/// order: every writer locks chain heads in that order, so two batches never deadlock.
fn group_by_world(
    batch: &[NewDecision],
) -> Result<std::collections::BTreeMap<&str, Vec<StoredDecision>>, StoreError> {
    let mut worlds: std::collections::BTreeMap<&str, Vec<StoredDecision>> = Default::default();
    for d in batch {
        let matched_rules = to_json_text(&d.matched_rules)?;
        let decision = NewDecision {
            // Parsed back from the stored text, because that is what a reader will see (a
            // float need not read back bit for bit).
            matched_rules: parse_json(&matched_rules, "matched rules")?,
            decided_at: truncate_micros(d.decided_at),
            ..d.clone()
        };
        worlds
            .entry(d.world.as_str())
            .or_default()
            .push(StoredDecision {
                version: bigint(d.version, "version")?,
                decision,
                matched_rules,
            });
    }
    Ok(worlds)
}

/// A decision with its place in the chain, ready to insert.
struct ChainedDecision {
    record: DecisionRecord,
    /// `record.seq` as stored.
    seq: i64,
    matched_rules: String,
    version: i64,
}

/// Extend a chain whose head is `(seq, hash)` (`(0, GENESIS)` for an empty chain) by
/// `decisions`, in order.
fn extend_chain(
    head: (i64, String),
    decisions: Vec<StoredDecision>,
) -> Result<Vec<ChainedDecision>, StoreError> {
    let (mut seq, mut prev_hash) = head;
    decisions
        .into_iter()
        .map(|d| {
            seq = seq
                .checked_add(1)
                .ok_or_else(|| StoreError::Corrupt(format!("chain head seq {seq} cannot grow")))?;
            let seq_u64 = to_u64(seq, "chain head seq")?;
            let hash = chain_hash(&prev_hash, seq_u64, &d.decision);
            let record = DecisionRecord {
                seq: seq_u64,
                decision: d.decision,
                prev_hash: std::mem::replace(&mut prev_hash, hash.clone()),
                hash,
            };
            Ok(ChainedDecision {
                record,
                seq,
                matched_rules: d.matched_rules,
                version: d.version,
            })
        })
        .collect()
}

/// The modules of a version once each, in hash order: publishers insert shared modules in the
/// same order, so two concurrent publishes never wait on each other in a cycle.
fn unique_modules(modules: &[NewModule]) -> Vec<&NewModule> {
    let mut unique: Vec<&NewModule> = modules.iter().collect();
    unique.sort_by(|a, b| a.hash.cmp(&b.hash));
    unique.dedup_by(|a, b| a.hash == b.hash);
    unique
}

/// A number the caller gives that must fit a `BIGINT` column.
fn bigint(n: u64, what: &str) -> Result<i64, StoreError> {
    to_i64(n).ok_or_else(|| StoreError::Conflict(format!("{what} {n} is too large to store")))
}

/// Split rows into `INSERT`s of a few fixed sizes, largest first: every statement then has one
/// of a handful of texts, which each connection prepares once and keeps, instead of a new
/// text (and a new prepare) for every batch size. 128 rows of 14 parameters stay well under
/// both databases' bind-parameter limits.
fn insert_chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    const SIZES: [usize; 4] = [128, 32, 8, 1];
    std::iter::from_fn(move || {
        let size = SIZES.into_iter().find(|&s| s <= rows.len())?;
        let (chunk, rest) = rows.split_at(size);
        rows = rest;
        Some(chunk)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn inserts_come_in_a_few_fixed_sizes_and_cover_every_row() {
        for n in [0usize, 1, 7, 8, 9, 31, 32, 127, 128, 129, 300, 1000] {
            let rows: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = insert_chunks(&rows).collect();
            assert!(
                chunks.iter().all(|c| [128, 32, 8, 1].contains(&c.len())),
                "{n}"
            );
            assert_eq!(chunks.concat(), rows, "{n}: every row once, in order");
            // Largest first: a smaller chunk is never followed by a larger one.
            assert!(chunks.windows(2).all(|w| w[0].len() >= w[1].len()), "{n}");
        }
    }

    #[test]
    fn unknown_scopes_are_corrupt_data() {
        assert_eq!(
            parse_scopes("decide,read".split(',')).unwrap(),
            vec![Scope::Decide, Scope::Read]
        );
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
        }
        assert_eq!(Scope::parse("pin"), Some(Scope::Pin));
        // An empty list is stored as an empty string.
        assert_eq!(parse_scopes("".split(',')).unwrap(), vec![]);
        let err = parse_scopes(["decide", "admin"]).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m == "unknown scope 'admin'"),
            "{err:?}"
        );
    }

    #[test]
    fn times_are_truncated_to_microseconds() {
        let t = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        let stored = truncate_micros(t);
        assert_eq!(stored.timestamp_subsec_nanos(), 123_456_000);
        assert_eq!(from_micros(stored.timestamp_micros()).unwrap(), stored);
        let before_epoch = DateTime::from_timestamp(-1, 999_999_999).unwrap();
        assert_eq!(
            truncate_micros(before_epoch),
            DateTime::from_timestamp(-1, 999_999_000).unwrap()
        );
    }

    #[test]
    fn a_chain_continues_from_its_head() {
        let d = NewDecision {
            decision_id: "d".into(),
            world: "w".into(),
            version: 1,
            action: "a".into(),
            module_hash: "sha256:00".into(),
            status: "GREEN".into(),
            matched_rules: serde_json::json!([]),
            caller: "k".into(),
            correlation_id: None,
            context_digest: "sha256:11".into(),
            decided_at: DateTime::from_timestamp(0, 1).unwrap(),
        };
        let batch = [d.clone(), d.clone()];
        let grouped = group_by_world(&batch).unwrap();
        let batch = grouped.into_values().next().unwrap();
        let chained = extend_chain((7, "sha256:head".into()), batch).unwrap();
        assert_eq!(chained[0].seq, 8);
        assert_eq!(chained[0].record.prev_hash, "sha256:head");
        assert_eq!(chained[1].record.prev_hash, chained[0].record.hash);
        // The hash covers the decision as stored, with its time truncated.
        let stored = NewDecision {
            decided_at: DateTime::from_timestamp(0, 0).unwrap(),
            ..d
        };
        assert_eq!(
            chained[0].record.hash,
            chain_hash("sha256:head", 8, &stored)
        );
    }
}

//! The store the rest of the service holds: one enum over the two backends, each call
//! running the operation's protocol (`protocol.rs`) over that backend's dialect.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::impact::{self, ImpactDialect};
use super::protocol::{self, Dialect};
use super::ThreadChanged;
use super::{postgres, sqlite, OUTBOX_CHANNEL};
use super::{
    CandidateRecord, CheckpointRecord, NewCandidate, NewCheckpoint, NewThread, NewThreadEvent,
    Pruned, RecordedRun, Review, Saved, ThreadEvent, ThreadKind, ThreadRecord, Usage,
};
use super::{ChainCheckpoint, ExportRecord, NewExport, PrunedDecisions, StrandedRows};
use super::{
    Completion, DecisionRecord, Deployment, Effect, Handled, KeyRecord, NewDecision, NewEvent,
    NewKey, NewVersion, OutboxCounts, OutboxRow, OutboxStatus, Retirement, StatDelta, StoreError,
    VersionRecord, Webhook, WorldDetail, WorldSummary,
};
use super::{NewReplay, RecordedContext, ReplayRecord, ShadowRecord};

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

/// Notifications pushed by Postgres `LISTEN`: of deployments (payload: the world's slug), of
/// outbox inserts (payload: the row id), of key changes (the key's id) or of agent threads (the
/// thread's id).
pub struct Notifications {
    inner: postgres::PgNotifications,
}

impl Notifications {
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

/// Run `$body` with `$s` bound to the backend, whichever it is.
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

    /// Wake a consumer in this process after a commit that appended events (SQLite has no
    /// NOTIFY), and pass the operation's result on.
    fn woke<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        self.local_wake().notify_waiters();
        r
    }

    /// Replace a world's draft (creating the world on first use).
    pub async fn put_draft(
        &self,
        world: &str,
        model: &serde_json::Value,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => protocol::put_draft(s, world, model).await)
    }

    pub async fn draft(&self, world: &str) -> Result<Option<serde_json::Value>, StoreError> {
        dispatch!(self, s => s.draft(world).await)
    }

    /// Store a new version as the world's latest number + 1, with its modules (write-once:
    /// a module already stored under its hash is kept as it is), in one transaction. Returns
    /// the new version number.
    pub async fn publish(&self, version: &NewVersion) -> Result<u64, StoreError> {
        self.woke(dispatch!(self, s => protocol::publish(s, version).await))
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
        self.woke(dispatch!(self, s => protocol::deploy(s, world, version, deployed_by).await))
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
        let r = dispatch!(self, s => protocol::retire(s, world, version, retired_by, reason).await);
        self.woke(r)
    }

    /// Every retired version, as `(world, version)`.
    pub async fn retired(&self) -> Result<Vec<(String, u64)>, StoreError> {
        dispatch!(self, s => protocol::retired(s).await)
    }

    pub async fn list_worlds(&self) -> Result<Vec<WorldSummary>, StoreError> {
        dispatch!(self, s => protocol::list_worlds(s).await)
    }

    pub async fn world(&self, world: &str) -> Result<Option<WorldDetail>, StoreError> {
        dispatch!(self, s => protocol::world(s, world).await)
    }

    pub async fn version(
        &self,
        world: &str,
        version: u64,
    ) -> Result<Option<VersionRecord>, StoreError> {
        dispatch!(self, s => protocol::version(s, world, version).await)
    }

    /// A module's canonical content by its hash.
    pub async fn module(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        dispatch!(self, s => s.module(hash).await)
    }

    /// Every world's deployed version.
    pub async fn deployed(&self) -> Result<Vec<(String, u64)>, StoreError> {
        dispatch!(self, s => protocol::deployed(s).await)
    }

    /// Listen for deployment notifications; `None` on SQLite, which has no such channel.
    pub async fn listen_deployments(&self) -> Result<Option<Notifications>, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(s) => Ok(Some(Notifications {
                inner: s.listen(postgres::DEPLOYMENTS_CHANNEL).await?,
            })),
        }
    }

    /// `Conflict` when the id is taken.
    pub async fn create_key(&self, key: &NewKey) -> Result<(), StoreError> {
        dispatch!(self, s => protocol::create_key(s, key).await)
    }

    pub async fn key_by_hash(&self, secret_hash: &str) -> Result<Option<KeyRecord>, StoreError> {
        dispatch!(self, s => protocol::key_by_hash(s, secret_hash).await)
    }

    pub async fn has_operator_key(&self) -> Result<bool, StoreError> {
        dispatch!(self, s => s.has_operator_key().await)
    }

    /// Append decisions to their worlds' chains in one transaction (group commit). Each
    /// world's chain head is locked for the transaction, so concurrent writers serialize.
    pub async fn append_decisions(&self, decisions: &[NewDecision]) -> Result<(), StoreError> {
        self.woke(dispatch!(self, s => protocol::append_decisions(s, decisions).await))
    }

    /// A world's decision records with `seq > after`, in order, at most `limit`.
    pub async fn decisions(
        &self,
        world: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<DecisionRecord>, StoreError> {
        dispatch!(self, s => protocol::decisions(s, world, after, limit).await)
    }

    /// The generation stamped on events this store produces.
    pub fn generation(&self) -> i64 {
        dispatch!(self, s => s.stamp().generation.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Set the generation stamped on events this store (and its clones) produce.
    pub fn set_generation(&self, generation: i64) {
        dispatch!(self, s => s.stamp().generation.store(generation, std::sync::atomic::Ordering::Relaxed))
    }

    /// Woken after this process commits events; a consumer in the same process waits on it.
    pub fn local_wake(&self) -> &tokio::sync::Notify {
        dispatch!(self, s => &s.stamp().wake)
    }

    /// The agent threads changed from now on (see [`ThreadChanged`]): by this process's
    /// commits through this store or any store beside it, and whatever is announced.
    pub fn thread_changes(&self) -> tokio::sync::broadcast::Receiver<ThreadChanged> {
        dispatch!(self, s => s.stamp().threads.subscribe())
    }

    /// Tell the streams of this process that `thread` changed (`notified`: another process
    /// said so through Postgres).
    pub fn announce_thread(&self, thread: &str, notified: bool) {
        let change = ThreadChanged {
            thread: thread.into(),
            notified,
        };
        // Nobody following is not an error.
        let _ = dispatch!(self, s => s.stamp().threads.send(change));
    }

    /// Announce a change of `thread` by this process, and pass the operation's result on.
    fn changed<T>(&self, thread: &str, r: Result<T, StoreError>) -> Result<T, StoreError> {
        self.announce_thread(thread, false);
        r
    }

    /// Allocate a new deploy generation.
    pub async fn allocate_generation(&self, git_sha: &str, note: &str) -> Result<i64, StoreError> {
        dispatch!(self, s => protocol::allocate_generation(s, git_sha, note).await)
    }

    /// The generation of the build `git_sha`: the newest allocated for it, or a new one;
    /// `true` when an existing one was resumed.
    pub async fn generation_for_build(
        &self,
        git_sha: &str,
        note: &str,
    ) -> Result<(i64, bool), StoreError> {
        dispatch!(self, s => protocol::generation_for_build(s, git_sha, note).await)
    }

    /// Append events outside any other change (tests, and producers with no change of
    /// their own).
    pub async fn enqueue(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        self.woke(dispatch!(self, s => protocol::enqueue(s, events).await))
    }

    /// Claim up to `limit` pending rows of `generation` that are due, oldest first, for
    /// `worker`. Concurrent claimers never get the same row.
    pub async fn claim(
        &self,
        generation: i64,
        worker: &str,
        limit: u32,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        dispatch!(self, s => protocol::claim(s, generation, worker, limit).await)
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
        let r = dispatch!(self, s => protocol::complete(s, row, worker, handler, effect).await);
        if matches!(effect, Effect::Enqueue(_)) {
            self.local_wake().notify_waiters();
        }
        r
    }

    /// Complete rows handled by `worker` in one transaction, as [`Store::complete`] does each:
    /// the outcome of each, in `batch`'s order. Any error rolls back the whole batch, and the
    /// caller may then complete its rows one at a time.
    pub async fn complete_batch(
        &self,
        worker: &str,
        batch: &[Handled<'_>],
    ) -> Result<Vec<Completion>, StoreError> {
        let r = dispatch!(self, s => protocol::complete_batch(s, worker, batch).await);
        if batch.iter().any(|h| matches!(h.effect, Effect::Enqueue(_))) {
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
        dispatch!(self, s => protocol::fail(s, row, worker, error, retry_at).await)
    }

    /// Return rows claimed by `worker` but not started to pending, undoing their attempt.
    pub async fn release(&self, worker: &str, ids: &[i64]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        dispatch!(self, s => s.release(worker, ids).await)
    }

    /// Return rows of `generation` whose claim is older than `lease` to pending: their
    /// worker died.
    pub async fn rescue(
        &self,
        generation: i64,
        lease: std::time::Duration,
    ) -> Result<u64, StoreError> {
        dispatch!(self, s => protocol::rescue(s, generation, lease).await)
    }

    pub async fn outbox_row(&self, id: i64) -> Result<Option<OutboxRow>, StoreError> {
        dispatch!(self, s => protocol::outbox_row(s, id).await)
    }

    /// Rows by status (and generation), newest first, at most `limit`.
    pub async fn outbox_list(
        &self,
        status: Option<OutboxStatus>,
        generation: Option<i64>,
        limit: u32,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        dispatch!(self, s => protocol::outbox_list(s, status, generation, limit).await)
    }

    /// Put a failed row back to pending, keeping its failure history. `NotFound` unless the
    /// row exists and has failed.
    pub async fn replay(&self, id: i64) -> Result<(), StoreError> {
        self.woke(dispatch!(self, s => protocol::replay(s, id).await))
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
    pub async fn listen_outbox(&self) -> Result<Option<Notifications>, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(s) => Ok(Some(Notifications {
                inner: s.listen(OUTBOX_CHANNEL).await?,
            })),
        }
    }

    /// A world's decision statistics: `(rule, status, count)`, rule `*` for decisions.
    pub async fn stats(&self, world: &str) -> Result<Vec<StatDelta>, StoreError> {
        dispatch!(self, s => s.stats(world).await)
    }

    pub async fn create_webhook(&self, hook: &Webhook) -> Result<(), StoreError> {
        dispatch!(self, s => protocol::create_webhook(s, hook).await)
    }

    pub async fn webhooks(&self, world: &str) -> Result<Vec<Webhook>, StoreError> {
        dispatch!(self, s => protocol::webhooks(s, world).await)
    }

    pub async fn webhook(&self, id: &str) -> Result<Option<Webhook>, StoreError> {
        dispatch!(self, s => protocol::webhook(s, id).await)
    }
    /// Create an agent thread, `running`, with no lease. `Conflict` when the id is taken.
    pub async fn create_thread(&self, thread: &NewThread) -> Result<(), StoreError> {
        dispatch!(self, s => protocol::create_thread(s, thread).await)
    }

    pub async fn thread(&self, id: &str) -> Result<Option<ThreadRecord>, StoreError> {
        dispatch!(self, s => protocol::thread(s, id).await)
    }

    /// Take a running thread's lease for `ttl` when it is unowned, expired or already
    /// `owner`'s. Every acquisition bumps the thread's fence, which is returned: the writes of
    /// whoever held an older fence are refused from now on. `None` when another worker holds
    /// the lease or the thread is not running.
    pub async fn acquire_lease(
        &self,
        thread: &str,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<u64>, StoreError> {
        dispatch!(self, s => protocol::acquire_lease(s, thread, owner, ttl).await)
    }

    /// Extend the lease `owner` holds under `fence` to `ttl` from now. `Fenced` when it no
    /// longer holds it.
    pub async fn renew_lease(
        &self,
        thread: &str,
        owner: &str,
        fence: u64,
        ttl: std::time::Duration,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => protocol::renew_lease(s, thread, owner, fence, ttl).await)
    }

    /// In one transaction: check `fence` still holds the thread (`Fenced` if not), store the
    /// checkpoint unless its step is stored, and only then append the step's events to the
    /// thread's log and set its usage (the totals after the step). A step saved again (a re-run
    /// after a crash) writes nothing: `Saved::written` is `false`.
    pub async fn save_checkpoint(
        &self,
        thread: &str,
        fence: u64,
        checkpoint: &NewCheckpoint,
        events: &[NewThreadEvent],
        usage: &Usage,
    ) -> Result<Saved, StoreError> {
        // A stream of this thread in this process looks at once.
        let r = dispatch!(self, s => protocol::save_checkpoint(s, thread, fence, checkpoint, events, usage).await);
        self.changed(thread, r)
    }

    /// The thread's checkpoint with the highest step.
    pub async fn latest_checkpoint(
        &self,
        thread: &str,
    ) -> Result<Option<CheckpointRecord>, StoreError> {
        dispatch!(self, s => protocol::latest_checkpoint(s, thread).await)
    }

    pub async fn checkpoint(
        &self,
        thread: &str,
        step: u64,
    ) -> Result<Option<CheckpointRecord>, StoreError> {
        dispatch!(self, s => protocol::checkpoint(s, thread, step).await)
    }

    /// The thread's events with `seq > after`, in order, at most `limit`.
    pub async fn events_after(
        &self,
        thread: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<ThreadEvent>, StoreError> {
        dispatch!(self, s => protocol::events_after(s, thread, after, limit).await)
    }

    /// Store the run's rule candidate, in its world, with a `worlds.rule_candidate.proposed`
    /// outbox event, in one transaction under the lease (`Fenced` when `fence` lost it). A run
    /// has at most one candidate: proposing again writes nothing and returns the first's id.
    pub async fn propose(
        &self,
        thread: &str,
        fence: u64,
        candidate: &NewCandidate,
    ) -> Result<String, StoreError> {
        let r =
            self.woke(dispatch!(self, s => protocol::propose(s, thread, fence, candidate).await));
        self.changed(thread, r)
    }

    /// A world's rule candidates, newest first.
    pub async fn candidates(&self, world: &str) -> Result<Vec<CandidateRecord>, StoreError> {
        dispatch!(self, s => protocol::candidates(s, world).await)
    }

    /// End the thread with a final `status` and release its lease, under the lease
    /// (`Fenced` when `fence` lost it).
    pub async fn finish(&self, thread: &str, fence: u64, status: &str) -> Result<(), StoreError> {
        let r = dispatch!(self, s => protocol::finish(s, thread, fence, status).await);
        self.changed(thread, r)
    }

    /// Create a `running` thread with an `agent.task.created` outbox row, in one transaction,
    /// so that a worker takes it up. `Conflict` when the id is taken.
    pub async fn start_thread(&self, thread: &NewThread) -> Result<(), StoreError> {
        let r = self.woke(dispatch!(self, s => protocol::start_thread(s, thread).await));
        self.changed(&thread.id, r)
    }

    /// Append an event from outside a step (a user's chat message) to a thread of `world`,
    /// set the thread `running` again and tell the workers, in one transaction; the event's
    /// seq. `NotFound` when the thread is not `world`'s.
    pub async fn post_to_thread(
        &self,
        thread: &str,
        world: &str,
        event: &NewThreadEvent,
    ) -> Result<u64, StoreError> {
        let r = self
            .woke(dispatch!(self, s => protocol::post_to_thread(s, thread, world, event).await));
        self.changed(thread, r)
    }

    /// End a thread held under `fence` with `status` unless events newer than `last_seen`
    /// arrived (a message was posted): then nothing changes and `false` is returned.
    pub async fn finish_if_quiet(
        &self,
        thread: &str,
        fence: u64,
        status: &str,
        last_seen: u64,
    ) -> Result<bool, StoreError> {
        let r = dispatch!(self, s => protocol::finish_if_quiet(s, thread, fence, status, last_seen).await);
        self.changed(thread, r)
    }

    /// Under the lease of `parent`, record a run that ended inside it as a finished child run
    /// thread with its final checkpoint and candidate (and the candidate's outbox row), in one
    /// transaction; the candidate's id. Recording the same run again writes nothing.
    pub async fn record_run(
        &self,
        parent: &str,
        fence: u64,
        run: &RecordedRun,
    ) -> Result<Option<String>, StoreError> {
        let r = self.woke(dispatch!(self, s => protocol::record_run(s, parent, fence, run).await));
        self.announce_thread(&run.thread.id, false);
        self.changed(parent, r)
    }

    pub async fn candidate(&self, id: &str) -> Result<Option<CandidateRecord>, StoreError> {
        dispatch!(self, s => protocol::candidate(s, id).await)
    }

    /// Record a verdict on a proposed candidate of the review's world and, for an approval,
    /// replace the world's draft with `draft`, in one transaction. `Conflict` when it was
    /// already reviewed, `NotFound` when it is not the world's.
    pub async fn review(
        &self,
        review: &Review,
        draft: Option<&serde_json::Value>,
    ) -> Result<CandidateRecord, StoreError> {
        dispatch!(self, s => protocol::review(s, review, draft).await)
    }

    /// How many threads of a kind are running in a world.
    pub async fn running_threads(&self, world: &str, kind: ThreadKind) -> Result<u64, StoreError> {
        dispatch!(self, s => protocol::running_threads(s, world, kind).await)
    }

    /// A world's threads of a kind, newest first, at most `limit`.
    pub async fn world_threads(
        &self,
        world: &str,
        kind: ThreadKind,
        limit: u32,
    ) -> Result<Vec<ThreadRecord>, StoreError> {
        dispatch!(self, s => protocol::world_threads(s, world, kind, limit).await)
    }

    /// Running threads whose lease expired or was never taken: what a worker resumes.
    pub async fn expired_runs(&self, limit: u32) -> Result<Vec<ThreadRecord>, StoreError> {
        dispatch!(self, s => protocol::expired_runs(s, limit).await)
    }

    /// Remove the history of threads that finished before `before`, `batch` threads per
    /// transaction: their events and every checkpoint but the last. The thread rows (with
    /// their final status and usage), their final state and their candidates stay.
    pub async fn prune(&self, before: DateTime<Utc>, batch: u32) -> Result<Pruned, StoreError> {
        dispatch!(self, s => protocol::prune(s, before, batch).await)
    }

    /// Every key, oldest first; never a secret or its hash.
    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        dispatch!(self, s => protocol::list_keys(s).await)
    }

    pub async fn key_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        dispatch!(self, s => protocol::key_by_id(s, id).await)
    }

    /// Revoke a key for good (its secrets then match nothing) and notify every instance;
    /// `NotFound` when there is no such key. Revoking twice keeps the first time.
    pub async fn revoke_key(&self, id: &str) -> Result<KeyRecord, StoreError> {
        dispatch!(self, s => protocol::revoke_key(s, id).await)
    }

    /// Give a key the secret hashed as `secret_hash`; the secret it had is still accepted
    /// until `previous_valid_until` (a secret replaced earlier is dropped). `Conflict` when
    /// the key is revoked, `NotFound` when there is none.
    pub async fn rotate_key(
        &self,
        id: &str,
        secret_hash: &str,
        previous_valid_until: DateTime<Utc>,
    ) -> Result<KeyRecord, StoreError> {
        dispatch!(self, s => protocol::rotate_key(s, id, secret_hash, previous_valid_until).await)
    }

    /// Record that a key was used now.
    pub async fn touch_key(&self, id: &str) -> Result<(), StoreError> {
        dispatch!(self, s => protocol::touch_key(s, id).await)
    }

    /// Listen for revocations and rotations (payload: the key's id); `None` on SQLite, which
    /// has no such channel.
    pub async fn listen_keys(&self) -> Result<Option<Notifications>, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(s) => Ok(Some(Notifications {
                inner: s.listen(postgres::KEYS_CHANNEL).await?,
            })),
        }
    }

    /// Listen for new agent thread events and thread status changes (payload: the thread's
    /// id); `None` on SQLite, which has no such channel.
    pub async fn listen_agent(&self) -> Result<Option<Notifications>, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(None),
            Store::Postgres(s) => Ok(Some(Notifications {
                inner: s.listen(postgres::AGENT_CHANNEL).await?,
            })),
        }
    }

    /// Delete webhook `id` of `world`; `NotFound` when the world has no such webhook.
    pub async fn delete_webhook(&self, world: &str, id: &str) -> Result<(), StoreError> {
        dispatch!(self, s => protocol::delete_webhook(s, world, id).await)
    }

    // Retention (`retention.rs`).

    /// Rows of generations other than `generation` still pending or in flight that occurred
    /// more than `after` ago: stranded, since no consumer of theirs is left to handle them.
    pub async fn stranded(
        &self,
        generation: i64,
        after: std::time::Duration,
    ) -> Result<StrandedRows, StoreError> {
        dispatch!(self, s => protocol::stranded(s, generation, after).await)
    }

    /// Delete at most `batch` delivered outbox rows that occurred before `before`, with their
    /// `event_handled` entries, in one short transaction; how many rows went.
    pub async fn prune_outbox(&self, before: DateTime<Utc>, batch: u32) -> Result<u64, StoreError> {
        dispatch!(self, s => protocol::prune_outbox(s, before, batch).await)
    }

    // Impact analysis (`impact.rs`).

    /// Start (or replace) `world`'s shadow; every instance learns of it as of a deployment.
    pub async fn start_shadow(&self, shadow: &ShadowRecord) -> Result<(), StoreError> {
        dispatch!(self, s => impact::start_shadow(s, shadow).await)
    }

    /// End `world`'s shadow; the shadow that ended, if there was one.
    pub async fn end_shadow(&self, world: &str) -> Result<Option<ShadowRecord>, StoreError> {
        dispatch!(self, s => impact::end_shadow(s, world).await)
    }

    /// Every world's shadow.
    pub async fn shadows(&self) -> Result<Vec<ShadowRecord>, StoreError> {
        dispatch!(self, s => impact::shadows(s).await)
    }

    pub async fn shadow(&self, world: &str) -> Result<Option<ShadowRecord>, StoreError> {
        dispatch!(self, s => impact::shadow(s, world).await)
    }

    /// Store what `instance` has counted for a shadow (a JSON report), replacing what it
    /// stored before.
    pub async fn put_shadow_report(
        &self,
        shadow_id: &str,
        instance: &str,
        world: &str,
        report: &str,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_shadow_report(shadow_id, instance, world, report).await)
    }

    /// Every instance's report of a shadow.
    pub async fn shadow_reports(&self, shadow_id: &str) -> Result<Vec<String>, StoreError> {
        dispatch!(self, s => s.shadow_reports(shadow_id).await)
    }

    /// Recorded decisions of `world` with their kept contexts, newest first: those before
    /// `before_seq`, decided at or after `since`, at most `limit`.
    pub async fn recorded_contexts(
        &self,
        world: &str,
        before_seq: u64,
        since: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Vec<RecordedContext>, StoreError> {
        dispatch!(self, s => impact::recorded_contexts(s, world, before_seq, since, limit).await)
    }

    /// How many contexts `world` keeps.
    pub async fn context_count(&self, world: &str) -> Result<u64, StoreError> {
        let n = dispatch!(self, s => s.context_count(world).await)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Delete at most `batch` of the oldest contexts decided before `before`; how many went.
    /// The chain is untouched.
    pub async fn prune_contexts(
        &self,
        before: DateTime<Utc>,
        batch: u32,
    ) -> Result<u64, StoreError> {
        dispatch!(self, s => s.prune_contexts(before, i64::from(batch)).await)
    }

    /// Queue a replay; `Conflict` when its world has [`super::MAX_UNFINISHED_REPLAYS`] unfinished.
    pub async fn queue_replay(&self, replay: &NewReplay) -> Result<(), StoreError> {
        dispatch!(self, s => impact::queue_replay(s, replay).await)
    }

    pub async fn replay_record(&self, id: &str) -> Result<Option<ReplayRecord>, StoreError> {
        dispatch!(self, s => impact::replay(s, id).await)
    }

    /// Take the oldest queued replay, or a running one whose worker has not written since
    /// `stale_before`; its id.
    pub async fn claim_replay(
        &self,
        worker: &str,
        stale_before: DateTime<Utc>,
    ) -> Result<Option<String>, StoreError> {
        let Some(id) = dispatch!(self, s => s.claimable_replay(stale_before).await)? else {
            return Ok(None);
        };
        let at = Utc::now();
        let taken = dispatch!(self, s => s.claim_replay(&id, worker, at, stale_before).await)?;
        Ok((taken == 1).then_some(id))
    }

    /// Write a running replay's progress; `Fenced` when `worker` no longer holds it.
    pub async fn replay_progress(
        &self,
        id: &str,
        worker: &str,
        processed: u64,
        report: &str,
    ) -> Result<(), StoreError> {
        let processed = i64::try_from(processed).unwrap_or(i64::MAX);
        let n = dispatch!(self, s => s.replay_progress(id, worker, processed, report).await)?;
        fenced(n, id)
    }

    /// End a running replay as `done` or `failed`; `Fenced` when `worker` no longer holds it.
    pub async fn finish_replay(
        &self,
        id: &str,
        worker: &str,
        status: &str,
        processed: u64,
        report: Option<&str>,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let processed = i64::try_from(processed).unwrap_or(i64::MAX);
        let at = Utc::now();
        let n = dispatch!(self, s => {
            s.finish_replay(id, worker, status, processed, report, error, at).await
        })?;
        fenced(n, id)
    }

    /// Delete replays that finished before `before`; how many.
    pub async fn prune_replays(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        dispatch!(self, s => s.prune_replays(before).await)
    }

    /// `world`'s chain head: the seq and hash of the newest record written, kept apart from
    /// the records, so that removing the newest ones is seen.
    pub async fn chain_head(&self, world: &str) -> Result<Option<ChainCheckpoint>, StoreError> {
        dispatch!(self, s => protocol::chain_head(s, world).await)
    }

    /// The last link pruned from `world`'s chain, if any was.
    pub async fn chain_checkpoint(
        &self,
        world: &str,
    ) -> Result<Option<ChainCheckpoint>, StoreError> {
        dispatch!(self, s => protocol::chain_checkpoint(s, world).await)
    }

    /// The last seq of the run of `world`'s records after `after` that were decided at or
    /// before `until` (`after` when there is none).
    pub async fn decisions_through(
        &self,
        world: &str,
        after: u64,
        until: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        dispatch!(self, s => protocol::decisions_through(s, world, after, until).await)
    }

    /// Record that a range of a world's chain was exported: what a prune requires.
    pub async fn record_export(&self, export: &NewExport) -> Result<(), StoreError> {
        dispatch!(self, s => protocol::record_export(s, export).await)
    }

    /// A world's recorded exports, oldest first.
    pub async fn exports(&self, world: &str) -> Result<Vec<ExportRecord>, StoreError> {
        dispatch!(self, s => protocol::exports(s, world).await)
    }

    /// The database's plans for the outbox queries `/health` runs, by query name.
    pub async fn health_query_plans(
        &self,
        generation: i64,
    ) -> Result<Vec<(&'static str, String)>, StoreError> {
        dispatch!(self, s => protocol::health_query_plans(s, generation).await)
    }

    /// Remove `world`'s records up to `through`, keeping a checkpoint of its link; `Conflict`
    /// unless every record from the current checkpoint to `through` was exported. Deletes
    /// `batch` records per transaction.
    pub async fn prune_decisions(
        &self,
        world: &str,
        through: u64,
        batch: u32,
    ) -> Result<PrunedDecisions, StoreError> {
        dispatch!(self, s => protocol::prune_decisions(s, world, through, batch).await)
    }
}

/// A write under a replay's claim that changed nothing: another worker holds it now.
fn fenced(rows: u64, replay: &str) -> Result<(), StoreError> {
    if rows == 1 {
        Ok(())
    } else {
        Err(StoreError::Fenced(format!(
            "replay '{replay}' is no longer held by this worker"
        )))
    }
}

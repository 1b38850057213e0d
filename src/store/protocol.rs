//! Every store operation written once, over a [`Dialect`]: which statements run, in which
//! transaction and in which order, which outbox rows go with them, and how rows become
//! records. The dialects (`postgres.rs`, `sqlite.rs`) hold single statements and say only how
//! their database spells them and how it takes a lock.
//!
//! Locks: a write that reads first (the next version, the next deployment, a chain head)
//! begins with [`Dialect::begin_write`] and then takes the row lock its dialect offers
//! ([`Dialect::lock_world`], [`Dialect::lock_chain_head`]). On PostgreSQL those are row locks
//! under READ COMMITTED, so a writer that waited reads what the previous holder committed; on
//! SQLite `begin_write` already holds the database's one write lock. Chain heads are locked in
//! sorted world order, and modules inserted in hash order, so that two writers never wait on
//! each other in a cycle.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

use super::chain::{extend_chain, group_by_world, insert_chunks, ChainedDecision};
use super::impact::{end_shadow_of_version, ImpactDialect};
use super::outbox::{Handled, OutboxDbRow, Stamp};
use super::records::{
    bigint, convert, now, to_i64, to_u64, DecisionRow, DeploymentRow, KeyRow, VersionModelRow,
    VersionRow, WebhookRow, WorldHeadRow, WorldRow, WorldVersionRow,
};
use super::retention::{
    ChainCheckpoint, ExportRecord, ExportRow, NewExport, PrunedDecisions, RetentionSql,
    StrandedRows,
};
use super::statements::Sql;
use super::threads::{
    CandidateRecord, CandidateRow, CheckpointRecord, CheckpointRow, NewCandidate, NewCheckpoint,
    NewThread, NewThreadEvent, Pruned, RecordedRun, Review, Saved, ThreadEvent, ThreadEventRow,
    ThreadKind, ThreadLockRow, ThreadRecord, ThreadRow, Usage, RUNNING,
};
use super::{
    Completion, DecisionRecord, Deployment, Effect, KeyRecord, NewDecision, NewEvent, NewKey,
    NewModule, NewVersion, OutboxCounts, OutboxRow, OutboxStatus, Retirement, StatDelta,
    StoreError, VersionRecord, VersionSummary, Webhook, WorldDetail, WorldSummary,
};
use crate::outbox::{
    AgentTaskCreated, DecisionRecorded, Event, ModuleDeployed, PublishedModule, RecordedBatch,
    RuleCandidateProposed, RuleCount, VersionPublished, VersionRetired,
};

/// A transaction of dialect `D`.
pub(crate) type Tx<D> = sqlx::Transaction<'static, <D as Dialect>::Db>;

/// One database's statements. Each method is one statement (or, where a dialect lacks one,
/// the nearest it has); none decides what runs next.
pub(crate) trait Dialect: Sync + Sized {
    type Db: sqlx::Database;

    /// The text of the statements whose Rust side both dialects share (`statements.rs`).
    const SQL: Sql;

    /// Who this store's events are stamped by.
    fn stamp(&self) -> &Stamp;

    /// A transaction for a write that reads before it writes.
    async fn begin_write(&self) -> Result<Tx<Self>, StoreError>;
    /// A read-only transaction whose reads see one snapshot.
    async fn begin_read(&self) -> Result<Tx<Self>, StoreError>;

    // Worlds and versions.
    async fn put_draft(
        &self,
        world: &str,
        model: &serde_json::Value,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    async fn draft(&self, world: &str) -> Result<Option<serde_json::Value>, StoreError>;
    async fn ensure_world(
        tx: &mut Tx<Self>,
        world: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Lock the world's row until commit; its deployed version, `None` when there is no world.
    async fn lock_world(tx: &mut Tx<Self>, world: &str) -> Result<Option<Option<i64>>, StoreError>;
    async fn next_version(tx: &mut Tx<Self>, world: &str) -> Result<i64, StoreError>;
    async fn insert_version(
        tx: &mut Tx<Self>,
        world: &str,
        version: i64,
        model: &serde_json::Value,
        at: DateTime<Utc>,
        by: &str,
    ) -> Result<(), StoreError>;
    /// Store a module unless one is stored under its hash (modules are write-once).
    async fn insert_module(
        tx: &mut Tx<Self>,
        module: &NewModule,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    async fn insert_version_module(
        tx: &mut Tx<Self>,
        world: &str,
        version: i64,
        position: i32,
        module: &NewModule,
    ) -> Result<(), StoreError>;
    /// `None` when the version does not exist, else when it was retired.
    async fn version_retired_at(
        tx: &mut Tx<Self>,
        world: &str,
        version: i64,
    ) -> Result<Option<Option<DateTime<Utc>>>, StoreError>;
    async fn next_deployment(tx: &mut Tx<Self>, world: &str) -> Result<i64, StoreError>;
    async fn set_deployed(tx: &mut Tx<Self>, world: &str, version: i64) -> Result<(), StoreError>;
    async fn insert_deployment(
        tx: &mut Tx<Self>,
        world: &str,
        seq: i64,
        version: i64,
        at: DateTime<Utc>,
        by: &str,
    ) -> Result<(), StoreError>;
    async fn insert_retirement(
        tx: &mut Tx<Self>,
        world: &str,
        version: i64,
        retired: &Retirement,
    ) -> Result<(), StoreError>;
    /// Tell every instance, on commit, that `world`'s deployed or servable versions changed
    /// (nothing where the database cannot notify).
    async fn notify_deployments(tx: &mut Tx<Self>, world: &str) -> Result<(), StoreError>;
    async fn world_head(tx: &mut Tx<Self>, world: &str)
        -> Result<Option<WorldHeadRow>, StoreError>;
    async fn versions(tx: &mut Tx<Self>, world: &str) -> Result<Vec<VersionRow>, StoreError>;
    async fn deployments(tx: &mut Tx<Self>, world: &str) -> Result<Vec<DeploymentRow>, StoreError>;
    async fn version_row(
        tx: &mut Tx<Self>,
        world: &str,
        version: i64,
    ) -> Result<Option<VersionModelRow>, StoreError>;
    /// `(action, module hash)` in the model's action order.
    async fn version_modules(
        tx: &mut Tx<Self>,
        world: &str,
        version: i64,
    ) -> Result<Vec<(String, String)>, StoreError>;
    async fn list_worlds(&self) -> Result<Vec<WorldRow>, StoreError>;
    async fn retired(&self) -> Result<Vec<WorldVersionRow>, StoreError>;
    async fn deployed(&self) -> Result<Vec<WorldVersionRow>, StoreError>;
    async fn module(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError>;

    // Keys.
    async fn create_key(&self, key: &NewKey, at: DateTime<Utc>) -> Result<(), StoreError>;
    async fn key_by_hash(&self, secret_hash: &str) -> Result<Option<KeyRow>, StoreError>;
    async fn has_operator_key(&self) -> Result<bool, StoreError>;

    // Decisions.
    /// Lock the world's chain head until commit and read it (`(0, GENESIS)` when empty).
    async fn lock_chain_head(tx: &mut Tx<Self>, world: &str) -> Result<(i64, String), StoreError>;
    async fn insert_decisions(
        tx: &mut Tx<Self>,
        chunk: &[ChainedDecision],
    ) -> Result<(), StoreError>;
    async fn set_chain_head(
        tx: &mut Tx<Self>,
        world: &str,
        seq: i64,
        hash: &str,
    ) -> Result<(), StoreError>;
    async fn decisions(
        &self,
        world: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<DecisionRow>, StoreError>;

    // The outbox.
    async fn allocate_generation(
        tx: &mut Tx<Self>,
        git_sha: &str,
        note: &str,
        at: DateTime<Utc>,
    ) -> Result<i64, StoreError>;
    /// The newest generation allocated for `git_sha`.
    async fn latest_generation(tx: &mut Tx<Self>, git_sha: &str)
        -> Result<Option<i64>, StoreError>;
    /// Hold the generations against other allocators until commit.
    async fn lock_generations(tx: &mut Tx<Self>) -> Result<(), StoreError>;
    async fn insert_event(
        tx: &mut Tx<Self>,
        event: &NewEvent,
        generation: i64,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Claim due pending rows of `generation`, oldest first; concurrent claimers never get
    /// one row twice.
    async fn claim(
        &self,
        generation: i64,
        worker: &str,
        limit: i64,
        at: DateTime<Utc>,
    ) -> Result<Vec<OutboxDbRow>, StoreError>;
    /// Lock, in id order, the rows of `ids` still in flight under `worker`; their ids.
    async fn lock_claimed(
        tx: &mut Tx<Self>,
        ids: &[i64],
        worker: &str,
    ) -> Result<Vec<i64>, StoreError>;
    /// Record that `handlers[i]` handled `keys[i]` (row `ids[i]`), in one statement; the ids
    /// of the rows whose key was recorded for the first time.
    async fn insert_handled(
        tx: &mut Tx<Self>,
        handlers: Vec<String>,
        keys: Vec<String>,
        ids: Vec<i64>,
        at: DateTime<Utc>,
    ) -> Result<Vec<i64>, StoreError>;
    /// Add to the statistics, in one statement; no two deltas may name the same counter.
    async fn add_stats(tx: &mut Tx<Self>, deltas: &[StatDelta]) -> Result<(), StoreError>;
    async fn mark_delivered(tx: &mut Tx<Self>, ids: Vec<i64>) -> Result<(), StoreError>;
    /// Record a failed attempt; the row's new status, `None` when it was not `worker`'s.
    async fn fail(
        &self,
        id: i64,
        worker: &str,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    ) -> Result<Option<String>, StoreError>;
    async fn release(&self, worker: &str, ids: &[i64]) -> Result<u64, StoreError>;
    async fn rescue(&self, generation: i64, cutoff: DateTime<Utc>) -> Result<u64, StoreError>;
    async fn outbox_row(&self, id: i64) -> Result<Option<OutboxDbRow>, StoreError>;
    async fn outbox_list(
        &self,
        status: Option<&str>,
        generation: Option<i64>,
        limit: i64,
    ) -> Result<Vec<OutboxDbRow>, StoreError>;
    async fn replay(&self, id: i64, at: DateTime<Utc>) -> Result<u64, StoreError>;
    async fn adopt(&self, from: i64, to: i64) -> Result<u64, StoreError>;
    async fn outbox_counts(&self, generation: i64) -> Result<OutboxCounts, StoreError>;
    async fn stats(&self, world: &str) -> Result<Vec<StatDelta>, StoreError>;
    async fn create_webhook(&self, hook: &Webhook) -> Result<(), StoreError>;
    async fn webhooks(&self, world: &str) -> Result<Vec<WebhookRow>, StoreError>;
    async fn webhook(&self, id: &str) -> Result<Option<WebhookRow>, StoreError>;

    // The World Agent's threads.
    async fn create_thread(
        tx: &mut Tx<Self>,
        t: &NewThread,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    async fn thread(&self, id: &str) -> Result<Option<ThreadRow>, StoreError>;
    /// Take the lease of a running thread that is unowned, expired or already `owner`'s,
    /// bumping its fence; the new fence, `None` when another worker holds it.
    async fn acquire_lease(
        &self,
        id: &str,
        owner: &str,
        at: DateTime<Utc>,
        expires: DateTime<Utc>,
    ) -> Result<Option<i64>, StoreError>;
    /// Extend the lease `owner` holds under `fence`; whether it still did.
    async fn renew_lease(
        &self,
        id: &str,
        owner: &str,
        fence: i64,
        at: DateTime<Utc>,
        expires: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// Lock the thread's row until commit and read what a write under a lease checks.
    async fn lock_thread(tx: &mut Tx<Self>, id: &str) -> Result<Option<ThreadLockRow>, StoreError>;
    /// Insert a checkpoint unless its step is stored; whether it was inserted.
    async fn insert_checkpoint(
        tx: &mut Tx<Self>,
        thread: &str,
        step: i64,
        parent_step: Option<i64>,
        node: &str,
        state: &serde_json::Value,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// The seq of the thread's last event, 0 when it has none.
    async fn last_event_seq(tx: &mut Tx<Self>, thread: &str) -> Result<i64, StoreError>;
    async fn insert_thread_event(
        tx: &mut Tx<Self>,
        thread: &str,
        seq: i64,
        step: i64,
        event: &NewThreadEvent,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    async fn set_usage(
        tx: &mut Tx<Self>,
        thread: &str,
        calls: i64,
        prompt_tokens: i64,
        completion_tokens: i64,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    async fn finish_thread(
        tx: &mut Tx<Self>,
        thread: &str,
        status: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    async fn latest_checkpoint(&self, thread: &str) -> Result<Option<CheckpointRow>, StoreError>;
    async fn checkpoint(
        &self,
        thread: &str,
        step: i64,
    ) -> Result<Option<CheckpointRow>, StoreError>;
    async fn thread_events(
        &self,
        thread: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<ThreadEventRow>, StoreError>;
    /// Running runs whose lease expired or was never taken, oldest lease first.
    async fn expired_runs(
        &self,
        at: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<ThreadRow>, StoreError>;
    /// Insert a candidate unless its run has one (or its id is taken); whether it was.
    async fn insert_candidate(
        tx: &mut Tx<Self>,
        thread: &str,
        world: &str,
        candidate: &NewCandidate,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    async fn candidate_of_run(
        tx: &mut Tx<Self>,
        thread: &str,
    ) -> Result<Option<CandidateRow>, StoreError>;
    async fn candidates(&self, world: &str) -> Result<Vec<CandidateRow>, StoreError>;
    /// Finished threads not yet pruned that finished before `cutoff`, oldest first.
    async fn prunable(
        tx: &mut Tx<Self>,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<String>, StoreError>;
    /// Delete a thread's checkpoints but its last; how many.
    async fn prune_checkpoints(tx: &mut Tx<Self>, thread: &str) -> Result<u64, StoreError>;
    async fn prune_events(tx: &mut Tx<Self>, thread: &str) -> Result<u64, StoreError>;
    async fn mark_pruned(
        tx: &mut Tx<Self>,
        thread: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Set a finished thread `running` again (a chat that was posted to).
    async fn reopen_thread(
        tx: &mut Tx<Self>,
        thread: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// `put_draft` inside a transaction.
    async fn put_draft_in(
        tx: &mut Tx<Self>,
        world: &str,
        model: &serde_json::Value,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    async fn candidate(&self, id: &str) -> Result<Option<CandidateRow>, StoreError>;
    /// The candidate of a run thread.
    async fn candidate_of(&self, thread: &str) -> Result<Option<CandidateRow>, StoreError>;
    /// Record a verdict on a `proposed` candidate of `world`; whether one was.
    async fn review_candidate(
        tx: &mut Tx<Self>,
        review: &Review,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// A world's running threads of a kind.
    async fn running_threads(&self, world: &str, kind: &str) -> Result<i64, StoreError>;
    /// A world's threads of a kind, newest first.
    async fn world_threads(
        &self,
        world: &str,
        kind: &str,
        limit: i64,
    ) -> Result<Vec<ThreadRow>, StoreError>;

    // The life cycle of keys, and webhook management.
    async fn list_keys(&self) -> Result<Vec<KeyRow>, StoreError>;
    async fn key_by_id(&self, id: &str) -> Result<Option<KeyRow>, StoreError>;
    /// Mark a key revoked and make its secrets match nothing; how many rows (0 or 1).
    async fn revoke_key(tx: &mut Tx<Self>, id: &str, at: DateTime<Utc>) -> Result<u64, StoreError>;
    /// Give an unrevoked key a new secret, keeping the current one until
    /// `previous_valid_until`; how many rows (0 or 1).
    async fn rotate_key(
        tx: &mut Tx<Self>,
        id: &str,
        secret_hash: &str,
        previous_valid_until: DateTime<Utc>,
    ) -> Result<u64, StoreError>;
    async fn touch_key(&self, id: &str, at: DateTime<Utc>) -> Result<(), StoreError>;
    /// Tell every instance, on commit, that key `id` changed (nothing where the database
    /// cannot notify).
    async fn notify_keys(tx: &mut Tx<Self>, id: &str) -> Result<(), StoreError>;
    async fn delete_webhook(&self, world: &str, id: &str) -> Result<u64, StoreError>;

    // Retention (`retention.rs`).
    /// The text of the retention statements whose Rust side both dialects share.
    const RETENTION: RetentionSql;
    /// Rows of other generations pending or in flight that occurred before `before`.
    async fn stranded(
        &self,
        generation: i64,
        before: DateTime<Utc>,
    ) -> Result<StrandedRows, StoreError>;
    /// Delivered rows that occurred before `before`, oldest first, at most `limit`.
    async fn prunable_outbox(
        tx: &mut Tx<Self>,
        before: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<i64>, StoreError>;
    /// Delete the `event_handled` entries written by the rows `ids`; how many.
    async fn delete_handled(tx: &mut Tx<Self>, ids: &[i64]) -> Result<u64, StoreError>;
    /// Delete the delivered rows among `ids`; how many.
    async fn delete_outbox(tx: &mut Tx<Self>, ids: &[i64]) -> Result<u64, StoreError>;
    async fn chain_checkpoint(
        tx: &mut Tx<Self>,
        world: &str,
    ) -> Result<Option<(i64, String)>, StoreError>;
    /// The world's chain head (its newest record's seq and hash), if it has one.
    async fn chain_head(
        tx: &mut Tx<Self>,
        world: &str,
    ) -> Result<Option<(i64, String)>, StoreError>;
    /// Insert (`first`) or advance the world's checkpoint.
    async fn set_chain_checkpoint(
        tx: &mut Tx<Self>,
        world: &str,
        seq: i64,
        hash: &str,
        at: DateTime<Utc>,
        first: bool,
    ) -> Result<(), StoreError>;
    async fn decision_hash(
        tx: &mut Tx<Self>,
        world: &str,
        seq: i64,
    ) -> Result<Option<String>, StoreError>;
    /// The last seq of the run of records after `after` decided at or before `until`.
    async fn decisions_through(
        tx: &mut Tx<Self>,
        world: &str,
        after: i64,
        until: DateTime<Utc>,
    ) -> Result<Option<i64>, StoreError>;
    /// How far exports that start at or before `from` reach.
    async fn exported_through(
        tx: &mut Tx<Self>,
        world: &str,
        from: i64,
    ) -> Result<Option<i64>, StoreError>;
    async fn insert_export(
        &self,
        export: &NewExport,
        first: i64,
        last: i64,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    async fn exports(&self, world: &str) -> Result<Vec<ExportRow>, StoreError>;
    async fn first_decision(tx: &mut Tx<Self>, world: &str) -> Result<Option<i64>, StoreError>;
    async fn delete_decisions(
        tx: &mut Tx<Self>,
        world: &str,
        from: i64,
        through: i64,
    ) -> Result<u64, StoreError>;
    /// The database's plan for `sql`, bound with `generation` and, when the statement takes
    /// it, `before`, one line per step.
    async fn plan(
        &self,
        sql: &str,
        generation: i64,
        before: Option<DateTime<Utc>>,
    ) -> Result<String, StoreError>;
}

fn generation<D: Dialect>(db: &D) -> i64 {
    db.stamp()
        .generation
        .load(std::sync::atomic::Ordering::Relaxed)
}

fn missing(world: &str, version: u64) -> StoreError {
    StoreError::NotFound(format!("world '{world}' version {version}"))
}

// ---------------------------------------------------------------------------------------------
// Worlds and versions.

pub(crate) async fn put_draft<D: Dialect>(
    db: &D,
    world: &str,
    model: &serde_json::Value,
) -> Result<(), StoreError> {
    db.put_draft(world, model, now()).await
}

pub(crate) async fn publish<D: Dialect>(db: &D, version: &NewVersion) -> Result<u64, StoreError> {
    let world = version.world.as_str();
    let at = now();
    let mut tx = db.begin_write().await?;
    D::ensure_world(&mut tx, world, at).await?;
    // The world's lock serializes publishers of one world, so no two read the same latest
    // version.
    D::lock_world(&mut tx, world).await?;
    let next = D::next_version(&mut tx, world).await?;
    D::insert_version(
        &mut tx,
        world,
        next,
        &version.model,
        at,
        &version.published_by,
    )
    .await?;
    for module in unique_modules(&version.modules) {
        D::insert_module(&mut tx, module, at).await?;
    }
    for (position, module) in (0_i32..).zip(&version.modules) {
        D::insert_version_module(&mut tx, world, next, position, module)
            .await
            .map_err(|e| {
                e.conflict_as(|| {
                    format!(
                        "action '{}' appears twice in the new version of world '{world}'",
                        module.action
                    )
                })
            })?;
    }
    let number = to_u64(next, "version")?;
    let event = Event::VersionPublished(VersionPublished {
        world: world.to_owned(),
        version: number,
        modules: version
            .modules
            .iter()
            .map(|m| PublishedModule {
                action: m.action.clone(),
                hash: m.hash.clone(),
            })
            .collect(),
        published_by: version.published_by.clone(),
    });
    let event = event.into_new(Some(world), format!("{world}:{number}"))?;
    D::insert_event(&mut tx, &event, generation(db), at).await?;
    tx.commit().await?;
    Ok(number)
}

/// The modules of a version once each, in hash order: publishers insert shared modules in the
/// same order, so two concurrent publishes never wait on each other in a cycle.
fn unique_modules(modules: &[NewModule]) -> Vec<&NewModule> {
    let mut unique: Vec<&NewModule> = modules.iter().collect();
    unique.sort_by(|a, b| a.hash.cmp(&b.hash));
    unique.dedup_by(|a, b| a.hash == b.hash);
    unique
}

pub(crate) async fn deploy<D: ImpactDialect>(
    db: &D,
    world: &str,
    version: u64,
    deployed_by: &str,
) -> Result<Deployment, StoreError> {
    let v = to_i64(version).ok_or_else(|| missing(world, version))?;
    let deployed_at = now();
    let mut tx = db.begin_write().await?;
    // The world's lock serializes deployers (and retirers) of one world, so each deployment
    // gets the next seq, the last committed deployment is the deployed version, and this reads
    // the last committed retirement.
    let locked = D::lock_world(&mut tx, world).await?;
    let retired = D::version_retired_at(&mut tx, world, v).await?;
    let (Some(_), Some(retired)) = (locked, retired) else {
        return Err(missing(world, version));
    };
    if retired.is_some() {
        return Err(StoreError::Conflict(format!(
            "world '{world}' version {version} is retired and cannot be deployed"
        )));
    }
    let seq = D::next_deployment(&mut tx, world).await?;
    D::set_deployed(&mut tx, world, v).await?;
    D::insert_deployment(&mut tx, world, seq, v, deployed_at, deployed_by).await?;
    // Deploying a world's shadow version ends the shadow: it is what is served now.
    end_shadow_of_version::<D>(&mut tx, world, v).await?;
    let deployment = Deployment {
        seq: to_u64(seq, "deployment seq")?,
        version,
        deployed_at,
        deployed_by: deployed_by.to_owned(),
    };
    let event = Event::ModuleDeployed(ModuleDeployed {
        world: world.to_owned(),
        version,
        seq: deployment.seq,
        deployed_by: deployment.deployed_by.clone(),
    });
    let event = event.into_new(Some(world), format!("{world}:{}", deployment.seq))?;
    D::insert_event(&mut tx, &event, generation(db), deployed_at).await?;
    D::notify_deployments(&mut tx, world).await?;
    tx.commit().await?;
    Ok(deployment)
}

pub(crate) async fn retire<D: Dialect>(
    db: &D,
    world: &str,
    version: u64,
    retired_by: &str,
    reason: Option<&str>,
) -> Result<Retirement, StoreError> {
    let v = to_i64(version).ok_or_else(|| missing(world, version))?;
    let retired = Retirement {
        retired_at: now(),
        retired_by: retired_by.to_owned(),
        reason: reason.map(str::to_owned),
    };
    let mut tx = db.begin_write().await?;
    // The world's lock, as deploy takes it: no deployment commits between the check of the
    // deployed version and the insert.
    let locked = D::lock_world(&mut tx, world).await?;
    let already = D::version_retired_at(&mut tx, world, v).await?;
    let (Some(deployed), Some(already)) = (locked, already) else {
        return Err(missing(world, version));
    };
    if deployed == Some(v) {
        return Err(StoreError::Conflict(format!(
            "world '{world}' version {version} is the deployed version; deploy another \
             version before retiring it"
        )));
    }
    if already.is_some() {
        return Err(StoreError::Conflict(format!(
            "world '{world}' version {version} is already retired"
        )));
    }
    D::insert_retirement(&mut tx, world, v, &retired).await?;
    let event = Event::VersionRetired(VersionRetired {
        world: world.to_owned(),
        version,
        retired_at: retired.retired_at,
        retired_by: retired.retired_by.clone(),
        reason: retired.reason.clone(),
    });
    let event = event.into_new(Some(world), format!("{world}:{version}"))?;
    D::insert_event(&mut tx, &event, generation(db), retired.retired_at).await?;
    // Every instance refreshes on this, as on a deployment, and stops serving the version.
    D::notify_deployments(&mut tx, world).await?;
    tx.commit().await?;
    Ok(retired)
}

pub(crate) async fn world<D: Dialect>(
    db: &D,
    world: &str,
) -> Result<Option<WorldDetail>, StoreError> {
    // One snapshot for the three reads.
    let mut tx = db.begin_read().await?;
    let Some(head) = D::world_head(&mut tx, world).await? else {
        return Ok(None);
    };
    let versions = D::versions(&mut tx, world).await?;
    let deployments = D::deployments(&mut tx, world).await?;
    tx.commit().await?;
    Ok(Some(WorldDetail {
        world: world.to_owned(),
        deployed_version: head
            .deployed_version
            .map(|v| to_u64(v, "version"))
            .transpose()?,
        has_draft: head.has_draft,
        versions: convert::<_, VersionSummary>(versions)?,
        deployments: convert(deployments)?,
    }))
}

pub(crate) async fn version<D: Dialect>(
    db: &D,
    world: &str,
    version: u64,
) -> Result<Option<VersionRecord>, StoreError> {
    let Some(v) = to_i64(version) else {
        return Ok(None);
    };
    let mut tx = db.begin_read().await?;
    let Some(row) = D::version_row(&mut tx, world, v).await? else {
        return Ok(None);
    };
    let modules = D::version_modules(&mut tx, world, v).await?;
    tx.commit().await?;
    VersionRecord::from_rows(world, row, modules).map(Some)
}

pub(crate) async fn list_worlds<D: Dialect>(db: &D) -> Result<Vec<WorldSummary>, StoreError> {
    convert(db.list_worlds().await?)
}

pub(crate) async fn retired<D: Dialect>(db: &D) -> Result<Vec<(String, u64)>, StoreError> {
    convert(db.retired().await?)
}

pub(crate) async fn deployed<D: Dialect>(db: &D) -> Result<Vec<(String, u64)>, StoreError> {
    convert(db.deployed().await?)
}

// ---------------------------------------------------------------------------------------------
// Keys.

pub(crate) async fn create_key<D: Dialect>(db: &D, key: &NewKey) -> Result<(), StoreError> {
    db.create_key(key, now())
        .await
        .map_err(|e| e.conflict_as(|| format!("api key '{}' or its secret already exists", key.id)))
}

pub(crate) async fn key_by_hash<D: Dialect>(
    db: &D,
    secret_hash: &str,
) -> Result<Option<KeyRecord>, StoreError> {
    db.key_by_hash(secret_hash)
        .await?
        .map(KeyRecord::try_from)
        .transpose()
}

// ---------------------------------------------------------------------------------------------
// Decisions.

pub(crate) async fn append_decisions<D: ImpactDialect>(
    db: &D,
    decisions: &[NewDecision],
) -> Result<(), StoreError> {
    if decisions.is_empty() {
        return Ok(());
    }
    let worlds = group_by_world(decisions)?;
    let at = now();
    let mut tx = db.begin_write().await?;
    for (world, batch) in worlds {
        // A writer on any instance that reaches this point for the same world waits here,
        // and then reads the head this transaction committed.
        let head = D::lock_chain_head(&mut tx, world).await?;
        let chained = extend_chain(head, batch)?;
        for chunk in insert_chunks(&chained) {
            D::insert_decisions(&mut tx, chunk).await.map_err(|e| {
                e.conflict_as(|| {
                    format!("a decision id in the batch for world '{world}' is already recorded")
                })
            })?;
            // The contexts kept for replay commit with their records, outside the chain.
            D::insert_contexts(&mut tx, chunk).await?;
        }
        if let Some(event) = recorded_event(world, &chained)? {
            D::insert_event(&mut tx, &event, generation(db), at).await?;
        }
        if let Some(last) = chained.last() {
            D::set_chain_head(&mut tx, world, last.seq, &last.record.hash).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// One `decision.recorded` event per world per group commit: a handler then updates the
/// statistics once per batch rather than once per decision, which keeps the outbox from
/// growing as fast as the decision log. The event names the range of records and counts
/// them by status, overall (rule `*`) and per matched rule; the records themselves are in
/// the log.
fn recorded_event(
    world: &str,
    chained: &[ChainedDecision],
) -> Result<Option<NewEvent>, StoreError> {
    let (Some(first), Some(last)) = (chained.first(), chained.last()) else {
        return Ok(None);
    };
    let mut counts: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
    for c in chained {
        let d = &c.record.decision;
        *counts.entry(("*", d.status.as_str())).or_default() += 1;
        for rule in &d.matched_rules {
            *counts
                .entry((rule.id.as_str(), d.status.as_str()))
                .or_default() += 1;
        }
    }
    let counts = counts
        .into_iter()
        .map(|((rule, status), n)| (rule, status, n));
    decision_recorded(world, first.seq, last.seq, counts).map(Some)
}

/// A `decision.recorded` event for records `first_seq..=last_seq` of `world`, with their
/// counts as `(rule, status, count)`, rule `*` counting every decision.
pub fn decision_recorded<'a>(
    world: &str,
    first_seq: i64,
    last_seq: i64,
    counts: impl IntoIterator<Item = (&'a str, &'a str, u64)>,
) -> Result<NewEvent, StoreError> {
    let counts = counts
        .into_iter()
        .map(|(rule, status, count)| RuleCount {
            rule: rule.to_owned(),
            status: status.to_owned(),
            count,
        })
        .collect();
    let event = Event::DecisionRecorded(DecisionRecorded {
        world: world.to_owned(),
        batch: RecordedBatch::Counted {
            first_seq,
            last_seq,
            counts,
        },
    });
    event.into_new(Some(world), format!("{world}:{first_seq}-{last_seq}"))
}

pub(crate) async fn decisions<D: Dialect>(
    db: &D,
    world: &str,
    after: u64,
    limit: u32,
) -> Result<Vec<DecisionRecord>, StoreError> {
    // Nothing lies beyond the largest storable seq.
    let Some(after) = to_i64(after) else {
        return Ok(Vec::new());
    };
    convert(db.decisions(world, after, i64::from(limit)).await?)
}

// ---------------------------------------------------------------------------------------------
// The outbox.

pub(crate) async fn allocate_generation<D: Dialect>(
    db: &D,
    git_sha: &str,
    note: &str,
) -> Result<i64, StoreError> {
    let mut tx = db.begin_write().await?;
    let generation = D::allocate_generation(&mut tx, git_sha, note, now()).await?;
    tx.commit().await?;
    Ok(generation)
}

/// The generation of the build `git_sha`: the newest one allocated for it, or a new one when
/// there is none; `true` when it was resumed. A generation belongs to a deploy, not to a
/// process, so a restart of the same build (after a crash, say) goes on with the rows its
/// previous process left. Allocators are serialized, so instances of one build starting
/// together share one generation.
pub(crate) async fn generation_for_build<D: Dialect>(
    db: &D,
    git_sha: &str,
    note: &str,
) -> Result<(i64, bool), StoreError> {
    let mut tx = db.begin_write().await?;
    D::lock_generations(&mut tx).await?;
    if let Some(generation) = D::latest_generation(&mut tx, git_sha).await? {
        tx.commit().await?;
        return Ok((generation, true));
    }
    let generation = D::allocate_generation(&mut tx, git_sha, note, now()).await?;
    tx.commit().await?;
    Ok((generation, false))
}

pub(crate) async fn enqueue<D: Dialect>(db: &D, events: &[NewEvent]) -> Result<(), StoreError> {
    let at = now();
    let mut tx = db.begin_write().await?;
    for event in events {
        D::insert_event(&mut tx, event, generation(db), at).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(crate) async fn claim<D: Dialect>(
    db: &D,
    generation: i64,
    worker: &str,
    limit: u32,
) -> Result<Vec<OutboxRow>, StoreError> {
    let claimed = db
        .claim(generation, worker, i64::from(limit), now())
        .await?;
    let mut claimed: Vec<OutboxRow> = convert(claimed)?;
    claimed.sort_by_key(|r| r.id);
    Ok(claimed)
}

pub(crate) async fn complete<D: Dialect>(
    db: &D,
    row: &OutboxRow,
    worker: &str,
    handler: &str,
    effect: &Effect,
) -> Result<Completion, StoreError> {
    let one = Handled {
        row,
        handler,
        effect,
    };
    let done = complete_batch(db, worker, std::slice::from_ref(&one)).await?;
    done.into_iter()
        .next()
        .ok_or_else(|| StoreError::Corrupt("a completion without its outcome".into()))
}

/// Complete handled rows in one transaction, with a statement per step for all of them: lock
/// the rows still claimed by `worker`, record them in `event_handled`, apply the effects of
/// the rows handled for the first time (their statistics folded per world, rule and status
/// first), mark the held rows delivered. The outcome of each row, in `batch`'s order. Any
/// error rolls back the whole batch.
pub(crate) async fn complete_batch<D: Dialect>(
    db: &D,
    worker: &str,
    batch: &[Handled<'_>],
) -> Result<Vec<Completion>, StoreError> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let at = now();
    let ids: Vec<i64> = batch.iter().map(|h| h.row.id).collect();
    let mut tx = db.begin_write().await?;
    // Still ours? A lease that expired gave a row to someone else. The rows are locked in id
    // order, so two completers never wait on each other in a cycle.
    let held: BTreeSet<i64> = D::lock_claimed(&mut tx, &ids, worker)
        .await?
        .into_iter()
        .collect();
    if held.is_empty() {
        tx.rollback().await?;
        return Ok(vec![Completion::Lost; batch.len()]);
    }
    let mine: Vec<&Handled<'_>> = batch.iter().filter(|h| held.contains(&h.row.id)).collect();
    let handlers = mine.iter().map(|h| h.handler.to_owned()).collect();
    let keys = mine
        .iter()
        .map(|h| format!("{}:{}", h.row.event_type, h.row.idempotency_key))
        .collect();
    let held_ids: Vec<i64> = mine.iter().map(|h| h.row.id).collect();
    let first: BTreeSet<i64> = D::insert_handled(&mut tx, handlers, keys, held_ids.clone(), at)
        .await?
        .into_iter()
        .collect();
    // One upsert per counter for the whole batch, in one order for every writer, so that
    // concurrent upserts cannot deadlock.
    let mut stats: BTreeMap<(&str, &str, &str), i64> = BTreeMap::new();
    for h in mine.iter().filter(|h| first.contains(&h.row.id)) {
        match h.effect {
            Effect::None => {}
            Effect::Stats(deltas) => {
                for d in deltas {
                    let count = stats
                        .entry((d.world.as_str(), d.rule.as_str(), d.status.as_str()))
                        .or_insert(0);
                    *count = count.checked_add(d.count).ok_or_else(|| {
                        StoreError::Conflict(format!(
                            "the statistic {}/{}/{} overflows",
                            d.world, d.rule, d.status
                        ))
                    })?;
                }
            }
            Effect::Enqueue(events) => {
                for event in events {
                    D::insert_event(&mut tx, event, h.row.generation, at).await?;
                }
            }
        }
    }
    if !stats.is_empty() {
        let folded = stats
            .into_iter()
            .map(|((world, rule, status), count)| StatDelta {
                world: world.to_owned(),
                rule: rule.to_owned(),
                status: status.to_owned(),
                count,
            })
            .collect::<Vec<_>>();
        D::add_stats(&mut tx, &folded).await?;
    }
    D::mark_delivered(&mut tx, held_ids).await?;
    tx.commit().await?;
    Ok(batch
        .iter()
        .map(
            |h| match (held.contains(&h.row.id), first.contains(&h.row.id)) {
                (false, _) => Completion::Lost,
                (true, true) => Completion::Applied,
                (true, false) => Completion::Duplicate,
            },
        )
        .collect())
}

pub(crate) async fn fail<D: Dialect>(
    db: &D,
    row: &OutboxRow,
    worker: &str,
    error: &str,
    retry_at: Option<DateTime<Utc>>,
) -> Result<Option<OutboxStatus>, StoreError> {
    let status = db.fail(row.id, worker, error, retry_at, now()).await?;
    Ok(status.as_deref().and_then(OutboxStatus::parse))
}

pub(crate) async fn rescue<D: Dialect>(
    db: &D,
    generation: i64,
    lease: std::time::Duration,
) -> Result<u64, StoreError> {
    let cutoff = chrono::Duration::from_std(lease)
        .ok()
        .and_then(|lease| now().checked_sub_signed(lease))
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    db.rescue(generation, cutoff).await
}

pub(crate) async fn outbox_row<D: Dialect>(
    db: &D,
    id: i64,
) -> Result<Option<OutboxRow>, StoreError> {
    db.outbox_row(id)
        .await?
        .map(OutboxRow::try_from)
        .transpose()
}

pub(crate) async fn outbox_list<D: Dialect>(
    db: &D,
    status: Option<OutboxStatus>,
    generation: Option<i64>,
    limit: u32,
) -> Result<Vec<OutboxRow>, StoreError> {
    let status = status.map(OutboxStatus::as_str);
    convert(db.outbox_list(status, generation, i64::from(limit)).await?)
}

pub(crate) async fn replay<D: Dialect>(db: &D, id: i64) -> Result<(), StoreError> {
    if db.replay(id, now()).await? == 0 {
        return Err(StoreError::NotFound(format!("failed outbox row {id}")));
    }
    Ok(())
}

pub(crate) async fn create_webhook<D: Dialect>(db: &D, hook: &Webhook) -> Result<(), StoreError> {
    db.create_webhook(hook)
        .await
        .map_err(|e| e.conflict_as(|| format!("webhook id '{}' is taken", hook.id)))
}

pub(crate) async fn webhooks<D: Dialect>(db: &D, world: &str) -> Result<Vec<Webhook>, StoreError> {
    Ok(db
        .webhooks(world)
        .await?
        .into_iter()
        .map(Webhook::from)
        .collect())
}

pub(crate) async fn webhook<D: Dialect>(db: &D, id: &str) -> Result<Option<Webhook>, StoreError> {
    Ok(db.webhook(id).await?.map(Webhook::from))
}

// ---------------------------------------------------------------------------------------------
// The World Agent's threads. A worker advances a thread only under its lease; every write it
// makes checks, with the thread's row locked, that the fence it acquired is still the
// thread's, so that a worker that lost the lease (it stalled, another took over) writes
// nothing. Checkpoints are keyed by (thread, step) and written once: a step re-run after a
// crash writes no second checkpoint and no second copy of its events.

fn no_thread(id: &str) -> StoreError {
    StoreError::NotFound(format!("agent thread '{id}'"))
}

/// `now + ttl`, saturating at the largest time.
fn expiry(at: DateTime<Utc>, ttl: std::time::Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|ttl| at.checked_add_signed(ttl))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Lock the thread and check that `fence` still holds it; its world.
async fn hold_lease<D: Dialect>(
    tx: &mut Tx<D>,
    thread: &str,
    fence: u64,
) -> Result<String, StoreError> {
    let Some(row) = D::lock_thread(tx, thread).await? else {
        return Err(no_thread(thread));
    };
    if to_i64(fence) != Some(row.fence) {
        return Err(StoreError::Fenced(format!(
            "agent thread '{thread}' is held under fence {}, not {fence}: another worker \
             took it over",
            row.fence
        )));
    }
    if row.status != RUNNING {
        return Err(StoreError::Conflict(format!(
            "agent thread '{thread}' has finished ({})",
            row.status
        )));
    }
    Ok(row.world)
}

pub(crate) async fn create_thread<D: Dialect>(db: &D, t: &NewThread) -> Result<(), StoreError> {
    let mut tx = db.begin_write().await?;
    insert_thread::<D>(&mut tx, t, now()).await?;
    tx.commit().await?;
    Ok(())
}

async fn insert_thread<D: Dialect>(
    tx: &mut Tx<D>,
    t: &NewThread,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    D::create_thread(tx, t, at)
        .await
        .map_err(|e| e.conflict_as(|| format!("agent thread id '{}' is taken", t.id)))
}

/// The `agent.task.created` row that tells the workers a thread has work.
fn task_created(
    thread: &str,
    world: &str,
    kind: &str,
    key: String,
) -> Result<NewEvent, StoreError> {
    Event::AgentTaskCreated(AgentTaskCreated {
        world: world.to_owned(),
        thread: thread.to_owned(),
        kind: kind.to_owned(),
    })
    .into_new(Some(world), key)
}

pub(crate) async fn start_thread<D: Dialect>(db: &D, t: &NewThread) -> Result<(), StoreError> {
    let at = now();
    let mut tx = db.begin_write().await?;
    insert_thread::<D>(&mut tx, t, at).await?;
    let event = task_created(&t.id, &t.world, t.kind.as_str(), format!("{}:0", t.id))?;
    D::insert_event(&mut tx, &event, generation(db), at).await?;
    tx.commit().await?;
    Ok(())
}

pub(crate) async fn post_to_thread<D: Dialect>(
    db: &D,
    thread: &str,
    world: &str,
    event: &NewThreadEvent,
) -> Result<u64, StoreError> {
    let at = now();
    let mut tx = db.begin_write().await?;
    let Some(row) = D::lock_thread(&mut tx, thread).await? else {
        return Err(no_thread(thread));
    };
    if row.world != world {
        return Err(no_thread(thread));
    }
    let seq = D::last_event_seq(&mut tx, thread).await? + 1;
    D::insert_thread_event(&mut tx, thread, seq, 0, event, at).await?;
    if row.status != RUNNING {
        D::reopen_thread(&mut tx, thread, at).await?;
    }
    let task = task_created(
        thread,
        world,
        ThreadKind::Chat.as_str(),
        format!("{thread}:{seq}"),
    )?;
    D::insert_event(&mut tx, &task, generation(db), at).await?;
    tx.commit().await?;
    to_u64(seq, "seq")
}

pub(crate) async fn finish_if_quiet<D: Dialect>(
    db: &D,
    thread: &str,
    fence: u64,
    status: &str,
    last_seen: u64,
) -> Result<bool, StoreError> {
    let at = now();
    let mut tx = db.begin_write().await?;
    hold_lease::<D>(&mut tx, thread, fence).await?;
    // The lock on the thread holds posters off: nothing can arrive between this look and
    // the end of the thread.
    if to_u64(D::last_event_seq(&mut tx, thread).await?, "seq")? > last_seen {
        return Ok(false);
    }
    D::finish_thread(&mut tx, thread, status, at).await?;
    tx.commit().await?;
    Ok(true)
}

pub(crate) async fn record_run<D: Dialect>(
    db: &D,
    parent: &str,
    fence: u64,
    run: &RecordedRun,
) -> Result<Option<String>, StoreError> {
    let at = now();
    let mut tx = db.begin_write().await?;
    let world = hold_lease::<D>(&mut tx, parent, fence).await?;
    let thread = NewThread {
        world: world.clone(),
        parent: Some(parent.to_owned()),
        ..run.thread.clone()
    };
    match insert_thread::<D>(&mut tx, &thread, at).await {
        Ok(()) => {}
        // Recorded before a crash: the first record stands.
        Err(StoreError::Conflict(_)) => {
            return Ok(db.candidate_of(&thread.id).await?.map(|c| c.id));
        }
        Err(e) => return Err(e),
    }
    D::insert_checkpoint(&mut tx, &thread.id, 1, None, "end", &run.state, at).await?;
    let calls = bigint(run.usage.calls, "calls")?;
    let prompt = bigint(run.usage.prompt_tokens, "prompt tokens")?;
    let completion = bigint(run.usage.completion_tokens, "completion tokens")?;
    D::set_usage(&mut tx, &thread.id, calls, prompt, completion, at).await?;
    let mut proposed = None;
    if let Some(candidate) = &run.candidate {
        D::insert_candidate(&mut tx, &thread.id, &world, candidate, at).await?;
        let Some(stored) = D::candidate_of_run(&mut tx, &thread.id).await? else {
            return Err(StoreError::Conflict(format!(
                "rule candidate id '{}' is taken",
                candidate.id
            )));
        };
        let event = Event::RuleCandidateProposed(RuleCandidateProposed {
            world: world.clone(),
            candidate: stored.id.clone(),
            run_thread: thread.id.clone(),
            action: stored.action.clone(),
            model: stored.model.clone(),
        });
        let event = event.into_new(Some(&world), stored.id.clone())?;
        D::insert_event(&mut tx, &event, generation(db), at).await?;
        proposed = Some(stored.id);
    }
    D::finish_thread(&mut tx, &thread.id, &run.status, at).await?;
    tx.commit().await?;
    Ok(proposed)
}

pub(crate) async fn candidate<D: Dialect>(
    db: &D,
    id: &str,
) -> Result<Option<CandidateRecord>, StoreError> {
    Ok(db.candidate(id).await?.map(CandidateRecord::from))
}

pub(crate) async fn review<D: Dialect>(
    db: &D,
    review: &Review,
    draft: Option<&serde_json::Value>,
) -> Result<CandidateRecord, StoreError> {
    let at = now();
    let mut tx = db.begin_write().await?;
    if !D::review_candidate(&mut tx, review, at).await? {
        return Err(match db.candidate(&review.candidate).await? {
            Some(c) if c.world == review.world => StoreError::Conflict(format!(
                "rule candidate '{}' was already {}",
                review.candidate, c.status
            )),
            _ => StoreError::NotFound(format!("rule candidate '{}'", review.candidate)),
        });
    }
    if let Some(draft) = draft {
        D::put_draft_in(&mut tx, &review.world, draft, at).await?;
    }
    tx.commit().await?;
    db.candidate(&review.candidate)
        .await?
        .map(CandidateRecord::from)
        .ok_or_else(|| StoreError::NotFound(format!("rule candidate '{}'", review.candidate)))
}

pub(crate) async fn running_threads<D: Dialect>(
    db: &D,
    world: &str,
    kind: ThreadKind,
) -> Result<u64, StoreError> {
    to_u64(db.running_threads(world, kind.as_str()).await?, "count")
}

pub(crate) async fn world_threads<D: Dialect>(
    db: &D,
    world: &str,
    kind: ThreadKind,
    limit: u32,
) -> Result<Vec<ThreadRecord>, StoreError> {
    convert(
        db.world_threads(world, kind.as_str(), i64::from(limit))
            .await?,
    )
}

pub(crate) async fn thread<D: Dialect>(
    db: &D,
    id: &str,
) -> Result<Option<ThreadRecord>, StoreError> {
    db.thread(id).await?.map(ThreadRecord::try_from).transpose()
}

pub(crate) async fn acquire_lease<D: Dialect>(
    db: &D,
    thread: &str,
    owner: &str,
    ttl: std::time::Duration,
) -> Result<Option<u64>, StoreError> {
    let at = now();
    let fence = db.acquire_lease(thread, owner, at, expiry(at, ttl)).await?;
    fence.map(|f| to_u64(f, "fence")).transpose()
}

pub(crate) async fn renew_lease<D: Dialect>(
    db: &D,
    thread: &str,
    owner: &str,
    fence: u64,
    ttl: std::time::Duration,
) -> Result<(), StoreError> {
    let at = now();
    let held = match to_i64(fence) {
        Some(f) => {
            db.renew_lease(thread, owner, f, at, expiry(at, ttl))
                .await?
        }
        None => false,
    };
    if !held {
        return Err(StoreError::Fenced(format!(
            "agent thread '{thread}' is no longer held by '{owner}' under fence {fence}"
        )));
    }
    Ok(())
}

pub(crate) async fn save_checkpoint<D: Dialect>(
    db: &D,
    thread: &str,
    fence: u64,
    checkpoint: &NewCheckpoint,
    events: &[NewThreadEvent],
    usage: &Usage,
) -> Result<Saved, StoreError> {
    let step = bigint(checkpoint.step, "step")?;
    let parent = checkpoint
        .parent_step
        .map(|p| bigint(p, "parent step"))
        .transpose()?;
    let at = now();
    let mut tx = db.begin_write().await?;
    hold_lease::<D>(&mut tx, thread, fence).await?;
    let written = D::insert_checkpoint(
        &mut tx,
        thread,
        step,
        parent,
        &checkpoint.node,
        &checkpoint.state,
        at,
    )
    .await?;
    // The lock on the thread serializes writers, so the log's last seq cannot move under us.
    let mut seq = D::last_event_seq(&mut tx, thread).await?;
    if written {
        for event in events {
            seq += 1;
            D::insert_thread_event(&mut tx, thread, seq, step, event, at).await?;
        }
        let calls = bigint(usage.calls, "calls")?;
        let prompt = bigint(usage.prompt_tokens, "prompt tokens")?;
        let completion = bigint(usage.completion_tokens, "completion tokens")?;
        D::set_usage(&mut tx, thread, calls, prompt, completion, at).await?;
    }
    tx.commit().await?;
    Ok(Saved {
        written,
        last_seq: to_u64(seq, "event seq")?,
    })
}

pub(crate) async fn latest_checkpoint<D: Dialect>(
    db: &D,
    thread: &str,
) -> Result<Option<CheckpointRecord>, StoreError> {
    db.latest_checkpoint(thread)
        .await?
        .map(CheckpointRecord::try_from)
        .transpose()
}

pub(crate) async fn checkpoint<D: Dialect>(
    db: &D,
    thread: &str,
    step: u64,
) -> Result<Option<CheckpointRecord>, StoreError> {
    let Some(step) = to_i64(step) else {
        return Ok(None);
    };
    db.checkpoint(thread, step)
        .await?
        .map(CheckpointRecord::try_from)
        .transpose()
}

pub(crate) async fn events_after<D: Dialect>(
    db: &D,
    thread: &str,
    after: u64,
    limit: u32,
) -> Result<Vec<ThreadEvent>, StoreError> {
    let Some(after) = to_i64(after) else {
        return Ok(Vec::new());
    };
    convert(db.thread_events(thread, after, i64::from(limit)).await?)
}

pub(crate) async fn propose<D: Dialect>(
    db: &D,
    thread: &str,
    fence: u64,
    candidate: &NewCandidate,
) -> Result<String, StoreError> {
    let at = now();
    let mut tx = db.begin_write().await?;
    // The candidate belongs to the run's world, whatever the caller says.
    let world = hold_lease::<D>(&mut tx, thread, fence).await?;
    let inserted = D::insert_candidate(&mut tx, thread, &world, candidate, at).await?;
    let Some(stored) = D::candidate_of_run(&mut tx, thread).await? else {
        return Err(StoreError::Conflict(format!(
            "rule candidate id '{}' is taken",
            candidate.id
        )));
    };
    if inserted {
        let event = Event::RuleCandidateProposed(RuleCandidateProposed {
            world: world.clone(),
            candidate: stored.id.clone(),
            run_thread: thread.to_owned(),
            action: stored.action.clone(),
            model: stored.model.clone(),
        });
        let event = event.into_new(Some(&world), stored.id.clone())?;
        D::insert_event(&mut tx, &event, generation(db), at).await?;
    }
    tx.commit().await?;
    Ok(stored.id)
}

pub(crate) async fn candidates<D: Dialect>(
    db: &D,
    world: &str,
) -> Result<Vec<CandidateRecord>, StoreError> {
    Ok(db
        .candidates(world)
        .await?
        .into_iter()
        .map(CandidateRecord::from)
        .collect())
}

pub(crate) async fn finish<D: Dialect>(
    db: &D,
    thread: &str,
    fence: u64,
    status: &str,
) -> Result<(), StoreError> {
    if status == RUNNING || status.is_empty() {
        return Err(StoreError::Conflict(format!(
            "'{status}' is not a final status for agent thread '{thread}'"
        )));
    }
    let at = now();
    let mut tx = db.begin_write().await?;
    hold_lease::<D>(&mut tx, thread, fence).await?;
    D::finish_thread(&mut tx, thread, status, at).await?;
    tx.commit().await?;
    Ok(())
}

pub(crate) async fn expired_runs<D: Dialect>(
    db: &D,
    limit: u32,
) -> Result<Vec<ThreadRecord>, StoreError> {
    convert(db.expired_runs(now(), i64::from(limit)).await?)
}

pub(crate) async fn prune<D: Dialect>(
    db: &D,
    before: DateTime<Utc>,
    batch: u32,
) -> Result<Pruned, StoreError> {
    let batch = batch.max(1);
    let mut pruned = Pruned::default();
    // One transaction per batch of threads, so that no transaction grows with the backlog.
    loop {
        let at = now();
        let mut tx = db.begin_write().await?;
        let threads = D::prunable(&mut tx, before, i64::from(batch)).await?;
        for thread in &threads {
            pruned.checkpoints += D::prune_checkpoints(&mut tx, thread).await?;
            pruned.events += D::prune_events(&mut tx, thread).await?;
            D::mark_pruned(&mut tx, thread, at).await?;
        }
        tx.commit().await?;
        pruned.threads += threads.len() as u64;
        if threads.len() < batch as usize {
            return Ok(pruned);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The life cycle of keys, and webhook management. A revocation or rotation commits with a
// notification on the keys channel, so that every instance listening drops its cached copy
// at once; an instance that is not listening trusts its copy for the key cache's TTL at most.

pub(crate) async fn list_keys<D: Dialect>(db: &D) -> Result<Vec<KeyRecord>, StoreError> {
    db.list_keys()
        .await?
        .into_iter()
        .map(KeyRecord::try_from)
        .collect()
}

pub(crate) async fn key_by_id<D: Dialect>(
    db: &D,
    id: &str,
) -> Result<Option<KeyRecord>, StoreError> {
    db.key_by_id(id).await?.map(KeyRecord::try_from).transpose()
}

pub(crate) async fn revoke_key<D: Dialect>(db: &D, id: &str) -> Result<KeyRecord, StoreError> {
    let mut tx = db.begin_write().await?;
    if D::revoke_key(&mut tx, id, now()).await? == 0 {
        return Err(StoreError::NotFound(format!("API key '{id}'")));
    }
    D::notify_keys(&mut tx, id).await?;
    tx.commit().await?;
    key_by_id(db, id)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("API key '{id}'")))
}

pub(crate) async fn rotate_key<D: Dialect>(
    db: &D,
    id: &str,
    secret_hash: &str,
    previous_valid_until: DateTime<Utc>,
) -> Result<KeyRecord, StoreError> {
    let mut tx = db.begin_write().await?;
    if D::rotate_key(&mut tx, id, secret_hash, previous_valid_until)
        .await
        .map_err(|e| e.conflict_as(|| "the new secret is already taken".to_string()))?
        == 0
    {
        drop(tx);
        return Err(match key_by_id(db, id).await? {
            Some(_) => StoreError::Conflict(format!("API key '{id}' is revoked")),
            None => StoreError::NotFound(format!("API key '{id}'")),
        });
    }
    D::notify_keys(&mut tx, id).await?;
    tx.commit().await?;
    key_by_id(db, id)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("API key '{id}'")))
}

pub(crate) async fn touch_key<D: Dialect>(db: &D, id: &str) -> Result<(), StoreError> {
    db.touch_key(id, now()).await
}

/// Delete a world's webhook; `NotFound` when that world has none of that id.
pub(crate) async fn delete_webhook<D: Dialect>(
    db: &D,
    world: &str,
    id: &str,
) -> Result<(), StoreError> {
    if db.delete_webhook(world, id).await? == 0 {
        return Err(StoreError::NotFound(format!(
            "webhook '{id}' of world '{world}'"
        )));
    }
    Ok(())
}

// Retention (`retention.rs`): stranded rows, pruning delivered outbox rows, and the export and
// prune of decision records.

/// Rows of other generations pending or in flight for longer than `after`.
pub(crate) async fn stranded<D: Dialect>(
    db: &D,
    generation: i64,
    after: std::time::Duration,
) -> Result<StrandedRows, StoreError> {
    let before = chrono::Duration::from_std(after)
        .ok()
        .and_then(|after| now().checked_sub_signed(after))
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    db.stranded(generation, before).await
}

/// Delete at most `batch` delivered rows that occurred before `before`, with their
/// `event_handled` entries, in one short transaction; how many rows. A row is either gone with
/// its entries or kept with them, so a handler never sees a row it handled as new.
pub(crate) async fn prune_outbox<D: Dialect>(
    db: &D,
    before: DateTime<Utc>,
    batch: u32,
) -> Result<u64, StoreError> {
    let mut tx = db.begin_write().await?;
    let ids = D::prunable_outbox(&mut tx, before, i64::from(batch.max(1))).await?;
    if ids.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    D::delete_handled(&mut tx, &ids).await?;
    let removed = D::delete_outbox(&mut tx, &ids).await?;
    tx.commit().await?;
    Ok(removed)
}

pub(crate) async fn chain_head<D: Dialect>(
    db: &D,
    world: &str,
) -> Result<Option<ChainCheckpoint>, StoreError> {
    let mut tx = db.begin_read().await?;
    let head = D::chain_head(&mut tx, world).await?;
    tx.commit().await?;
    chain_link(head, "chain head seq")
}

/// A stored `(seq, hash)` link of a chain, checked.
fn chain_link(
    link: Option<(i64, String)>,
    what: &str,
) -> Result<Option<ChainCheckpoint>, StoreError> {
    link.map(|(seq, hash)| {
        Ok(ChainCheckpoint {
            seq: to_u64(seq, what)?,
            hash,
        })
    })
    .transpose()
}

pub(crate) async fn chain_checkpoint<D: Dialect>(
    db: &D,
    world: &str,
) -> Result<Option<ChainCheckpoint>, StoreError> {
    let mut tx = db.begin_read().await?;
    let checkpoint = D::chain_checkpoint(&mut tx, world).await?;
    tx.commit().await?;
    chain_link(checkpoint, "checkpoint seq")
}

/// The last seq of the run of `world`'s records after `after` decided at or before `until`;
/// `after` itself when there is none.
pub(crate) async fn decisions_through<D: Dialect>(
    db: &D,
    world: &str,
    after: u64,
    until: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let after_i = bigint(after, "seq")?;
    let mut tx = db.begin_read().await?;
    let through = D::decisions_through(&mut tx, world, after_i, until).await?;
    tx.commit().await?;
    match through {
        Some(t) if t > after_i => to_u64(t, "seq"),
        _ => Ok(after),
    }
}

pub(crate) async fn record_export<D: Dialect>(
    db: &D,
    export: &NewExport,
) -> Result<(), StoreError> {
    let first = bigint(export.first_seq, "first_seq")?;
    let last = bigint(export.last_seq, "last_seq")?;
    db.insert_export(export, first, last, now()).await
}

pub(crate) async fn exports<D: Dialect>(
    db: &D,
    world: &str,
) -> Result<Vec<ExportRecord>, StoreError> {
    convert(db.exports(world).await?)
}

/// Remove `world`'s records up to `through`, which must all have been exported: first the
/// checkpoint moves to record `through` (refused unless an export covers every record from the
/// current checkpoint to it), then the records at or below it go, `batch` per transaction. A
/// prune cut short leaves records at or below the checkpoint that verification skips and the
/// next prune removes.
pub(crate) async fn prune_decisions<D: Dialect>(
    db: &D,
    world: &str,
    through: u64,
    batch: u32,
) -> Result<PrunedDecisions, StoreError> {
    let through_i = bigint(through, "seq")?;
    let mut tx = db.begin_write().await?;
    // Prunes of one world run one at a time (the chain head's lock); appends wait only for
    // this short transaction.
    D::lock_chain_head(&mut tx, world).await?;
    let current = D::chain_checkpoint(&mut tx, world).await?;
    let (checkpoint, hash) = match &current {
        Some((seq, hash)) if *seq >= through_i => (*seq, hash.clone()),
        _ => {
            let from = current.as_ref().map_or(1, |(seq, _)| seq + 1);
            let exported = D::exported_through(&mut tx, world, from).await?;
            if exported.is_none_or(|e| e < through_i) {
                let reach = match exported {
                    Some(e) if e >= from => format!("exports reach record {e}"),
                    _ => format!("no export starts at or before record {from}"),
                };
                return Err(StoreError::Conflict(format!(
                    "records {from} to {through} of world '{world}' were not all exported \
                     ({reach}); export them with `spectral audit export` first"
                )));
            }
            let hash = D::decision_hash(&mut tx, world, through_i)
                .await?
                .ok_or_else(|| {
                    StoreError::NotFound(format!("record {through} of world '{world}'"))
                })?;
            D::set_chain_checkpoint(&mut tx, world, through_i, &hash, now(), current.is_none())
                .await?;
            (through_i, hash)
        }
    };
    tx.commit().await?;
    let batch = i64::from(batch.max(1));
    let mut removed = 0;
    loop {
        let mut tx = db.begin_write().await?;
        let Some(first) = D::first_decision(&mut tx, world).await? else {
            tx.rollback().await?;
            break;
        };
        if first > checkpoint {
            tx.rollback().await?;
            break;
        }
        let last = first.saturating_add(batch - 1).min(checkpoint);
        removed += D::delete_decisions(&mut tx, world, first, last).await?;
        tx.commit().await?;
    }
    Ok(PrunedDecisions {
        checkpoint: ChainCheckpoint {
            seq: to_u64(checkpoint, "checkpoint seq")?,
            hash,
        },
        removed,
    })
}

/// The plans of the queries `/health` runs on the outbox, by name: what an operator (and the
/// test suite) checks to see that they read an index, not the table.
pub(crate) async fn health_query_plans<D: Dialect>(
    db: &D,
    generation: i64,
) -> Result<Vec<(&'static str, String)>, StoreError> {
    Ok(vec![
        (
            "outbox_counts",
            db.plan(D::SQL.outbox_counts, generation, None).await?,
        ),
        (
            "stranded",
            db.plan(D::RETENTION.stranded, generation, Some(now()))
                .await?,
        ),
    ])
}

//! SQLite's statements: the embedded store, one database file (`spectral.db`) in the data
//! directory, so that the service runs with no database server to install.
//!
//! SQLite admits one writer at a time. Every write that reads first runs in a
//! `BEGIN IMMEDIATE` transaction ([`Dialect::begin_write`]), which takes the write lock
//! before the read: a second writer waits (`busy_timeout`) instead of reading the same head
//! and then failing to upgrade its lock. The row locks PostgreSQL needs are then plain reads.
//! This holds across pools and processes on one file, because the lock is SQLite's own.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteArgumentValue, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous, SqliteTypeInfo, SqliteValueRef,
};
use sqlx::{Decode, Encode, Sqlite, Type};

use super::chain::{decisions_insert, ChainedDecision, GENESIS};
use super::impact::{
    contexts_insert, impact_statements, ImpactDialect, ImpactSql, NewReplay, RecordedContextRow,
    ReplayRow, ShadowRecord, ShadowRow,
};
use super::outbox::{source, OutboxDbRow, Stamp};
use super::protocol::{Dialect, Tx};
use super::records::{
    from_micros, DecisionRow, DeploymentRow, Json, KeyRow, List, ScopeList, Time, VersionModelRow,
    VersionRow, WebhookRow, WorldHeadRow, WorldRow, WorldVersionRow,
};
use super::retention::{retention_statements, ExportRow, NewExport, RetentionSql, StrandedRows};
use super::statements::{decision_columns, key_columns, outbox_columns, shared_statements, Sql};
use super::threads::{
    candidate_columns, thread_columns, CandidateRow, CheckpointRow, NewCandidate, NewThread,
    NewThreadEvent, Review, ThreadEventRow, ThreadLockRow, ThreadRow,
};
use super::{
    NewEvent, NewKey, NewModule, OutboxCounts, Retirement, StatDelta, StoreError, Webhook,
    OUTBOX_CHANNEL,
};

// Migrations this build does not know are not an error: a rollback runs the previous build
// on the schema a newer one migrated, and expand/contract (docs/migrations.md) keeps that
// schema working for it.
static MIGRATOR: Migrator = {
    let mut migrator = sqlx::migrate!("./migrations/sqlite");
    migrator.ignore_missing = true;
    migrator
};

/// How long a writer waits for another connection's write transaction before giving up. Write
/// transactions here last milliseconds; a few seconds absorbs a burst of them.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite backend: a pool over one database file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    pub(super) stamp: Arc<Stamp>,
}

impl SqliteStore {
    /// Open (creating when missing) `spectral.db` in `data_dir`, creating the directory too.
    pub(super) async fn open(data_dir: &Path, max_connections: u32) -> Result<Self, StoreError> {
        tokio::fs::create_dir_all(data_dir).await.map_err(|e| {
            StoreError::Database(Box::new(std::io::Error::new(
                e.kind(),
                format!("cannot create data directory {}: {e}", data_dir.display()),
            )))
        })?;
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join("spectral.db"))
            .create_if_missing(true)
            // WAL lets readers proceed while a writer commits; the default `synchronous=FULL`
            // is kept so that a committed version, deployment or outbox row survives a power
            // cut (the decision log's own connection, with its records and their
            // `decision.recorded` events, relaxes it: see `log_writer`).
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        Self::pool(options, max_connections, Arc::default()).await
    }

    /// The decision-log writer's store: one connection of its own on the same file, opened by
    /// the caller (so its SQLite thread starts on the writer's thread), producing events under
    /// this store's generation. Its commits use `synchronous=NORMAL`: durable when the process
    /// crashes, not always when the power fails, like the records still queued in memory;
    /// it saves an fsync per batch.
    pub(super) async fn log_writer(&self) -> Result<Self, StoreError> {
        let options = (*self.pool.connect_options())
            .clone()
            .synchronous(SqliteSynchronous::Normal);
        Self::pool(options, 1, self.stamp.clone()).await
    }

    async fn pool(
        options: SqliteConnectOptions,
        max_connections: u32,
        stamp: Arc<Stamp>,
    ) -> Result<Self, StoreError> {
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options)
            .await?;
        Ok(Self { pool, stamp })
    }

    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        Ok(MIGRATOR.run(&self.pool).await?)
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        Ok(sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(drop)?)
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }
}

// How SQLite stores the shared column kinds: times as integer microseconds since the epoch,
// JSON and lists as text.

impl Type<Sqlite> for Time {
    fn type_info() -> SqliteTypeInfo {
        <i64 as Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <i64 as Type<Sqlite>>::compatible(ty)
    }
}

impl<'q> Encode<'q, Sqlite> for Time {
    fn encode_by_ref(&self, buf: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
        Encode::<Sqlite>::encode(self.0.timestamp_micros(), buf)
    }
}

impl Decode<'_, Sqlite> for Time {
    fn decode(value: SqliteValueRef<'_>) -> Result<Self, BoxDynError> {
        Ok(Self(from_micros(Decode::<Sqlite>::decode(value)?)?))
    }
}

impl Type<Sqlite> for Json {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <String as Type<Sqlite>>::compatible(ty)
    }
}

impl<'q> Encode<'q, Sqlite> for Json {
    fn encode_by_ref(&self, buf: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
        Encode::<Sqlite>::encode(serde_json::to_string(&self.0)?, buf)
    }
}

impl Decode<'_, Sqlite> for Json {
    fn decode(value: SqliteValueRef<'_>) -> Result<Self, BoxDynError> {
        let text: &str = Decode::<Sqlite>::decode(value)?;
        Ok(Self(serde_json::from_str(text)?))
    }
}

impl Type<Sqlite> for ScopeList {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
}

impl<'q> Encode<'q, Sqlite> for ScopeList {
    fn encode_by_ref(&self, buf: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
        Encode::<Sqlite>::encode(self.0.join(","), buf)
    }
}

impl Decode<'_, Sqlite> for ScopeList {
    fn decode(value: SqliteValueRef<'_>) -> Result<Self, BoxDynError> {
        let text: &str = Decode::<Sqlite>::decode(value)?;
        Ok(Self(text.split(',').map(str::to_owned).collect()))
    }
}

impl<T> Type<Sqlite> for List<T> {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
}

impl<'q, T: serde::Serialize> Encode<'q, Sqlite> for List<T> {
    fn encode_by_ref(&self, buf: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
        Encode::<Sqlite>::encode(serde_json::to_string(&self.0)?, buf)
    }
}

impl Dialect for SqliteStore {
    type Db = Sqlite;
    const SQL: Sql = SQL;

    fn stamp(&self) -> &Stamp {
        &self.stamp
    }

    async fn begin_write(&self) -> Result<Tx<Self>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn begin_read(&self) -> Result<Tx<Self>, StoreError> {
        // A read transaction: its reads see one snapshot of the WAL.
        Ok(self.pool.begin().await?)
    }

    async fn lock_generations(_: &mut Tx<Self>) -> Result<(), StoreError> {
        // `begin_write` already holds the database's one write lock.
        Ok(())
    }

    async fn notify_deployments(_: &mut Tx<Self>, _: &str) -> Result<(), StoreError> {
        // SQLite cannot notify; its one process polls.
        Ok(())
    }

    async fn lock_chain_head(tx: &mut Tx<Self>, world: &str) -> Result<(i64, String), StoreError> {
        // The write transaction already holds the lock; a world with no head yet starts at
        // the genesis.
        let sql = "SELECT seq, hash FROM decision_chain_heads WHERE world = ?1";
        let head = sqlx::query_as(sql)
            .bind(world)
            .fetch_optional(&mut **tx)
            .await?;
        Ok(head.unwrap_or_else(|| (0, GENESIS.to_owned())))
    }

    async fn claim(
        &self,
        generation: i64,
        worker: &str,
        limit: i64,
        at: DateTime<Utc>,
    ) -> Result<Vec<OutboxDbRow>, StoreError> {
        // One writer at a time: the UPDATE … RETURNING inside BEGIN IMMEDIATE is the claim,
        // and no other claimer can interleave with it.
        let sql = concat!(
            "UPDATE outbox
             SET status = 'in_flight', claimed_at = ?2, claimed_by = ?4, attempts = attempts + 1
             WHERE id IN (
                 SELECT id FROM outbox
                 WHERE generation = ?1 AND status = 'pending' AND available_at <= ?2
                 ORDER BY id LIMIT ?3
             )
             RETURNING ",
            outbox_columns!()
        );
        let mut tx = self.begin_write().await?;
        let q = sqlx::query_as(sql)
            .bind(generation)
            .bind(Time(at))
            .bind(limit)
            .bind(worker);
        let claimed = q.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(claimed)
    }

    async fn release(&self, worker: &str, ids: &[i64]) -> Result<u64, StoreError> {
        // No arrays to bind: one statement per row, in one transaction.
        let sql = "UPDATE outbox SET status = 'pending', attempts = MAX(attempts - 1, 0),
                       claimed_at = NULL, claimed_by = NULL
                   WHERE id = ?1 AND status = 'in_flight' AND claimed_by = ?2";
        let mut tx = self.begin_write().await?;
        let mut released = 0;
        for id in ids {
            let q = sqlx::query(sql).bind(id).bind(worker);
            released += q.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(released)
    }

    async fn notify_keys(_: &mut Tx<Self>, _: &str) -> Result<(), StoreError> {
        // SQLite cannot notify: another process sees a change when its cached copy expires.
        Ok(())
    }

    shared_statements!();

    // Retention.
    const RETENTION: RetentionSql = RETENTION;

    async fn delete_handled(tx: &mut Tx<Self>, ids: &[i64]) -> Result<u64, StoreError> {
        // No arrays to bind: the ids go as one JSON array.
        let sql = "DELETE FROM event_handled
                   WHERE outbox_id IN (SELECT value FROM json_each(?1))";
        let q = sqlx::query(sql).bind(json_ids(ids)?);
        Ok(q.execute(&mut **tx).await?.rows_affected())
    }

    async fn delete_outbox(tx: &mut Tx<Self>, ids: &[i64]) -> Result<u64, StoreError> {
        let sql = "DELETE FROM outbox
                   WHERE status = 'delivered' AND id IN (SELECT value FROM json_each(?1))";
        let q = sqlx::query(sql).bind(json_ids(ids)?);
        Ok(q.execute(&mut **tx).await?.rows_affected())
    }

    async fn plan(
        &self,
        sql: &str,
        generation: i64,
        before: Option<DateTime<Utc>>,
    ) -> Result<String, StoreError> {
        let explain = format!("EXPLAIN QUERY PLAN {sql}");
        let q = sqlx::query_as::<_, (i64, i64, i64, String)>(&explain).bind(generation);
        let q = match before {
            Some(t) => q.bind(Time(t)),
            None => q,
        };
        let rows = q.fetch_all(&self.pool).await?;
        Ok(rows
            .into_iter()
            .map(|(_, _, _, detail)| detail)
            .collect::<Vec<_>>()
            .join("\n"))
    }

    retention_statements!();
}

/// Row ids as the JSON array `json_each` reads.
fn json_ids(ids: &[i64]) -> Result<String, StoreError> {
    serde_json::to_string(ids).map_err(|e| StoreError::Corrupt(format!("row ids: {e}")))
}

/// The retention statements in SQLite. Each query that counts outbox rows repeats the partial
/// index's own condition (`status <> 'delivered'`): SQLite uses a partial index only for a
/// query whose WHERE clause contains that term.
const RETENTION: RetentionSql = RetentionSql {
    stranded: "SELECT COUNT(*) AS rows,
                      CAST(unixepoch('subsec') * 1000 AS INTEGER) - MIN(occurred_at) / 1000
                          AS oldest_age_ms
               FROM outbox
               WHERE status <> 'delivered' AND status <> 'failed'
                 AND generation <> ?1 AND occurred_at < ?2",
    prunable_outbox: "SELECT id FROM outbox
                      WHERE status = 'delivered' AND occurred_at < ?1
                      ORDER BY occurred_at, id LIMIT ?2",
    chain_checkpoint: "SELECT seq, hash FROM decision_checkpoints WHERE world = ?1",
    chain_head: "SELECT seq, hash FROM decision_chain_heads WHERE world = ?1",
    insert_chain_checkpoint: "INSERT INTO decision_checkpoints (world, seq, hash, pruned_at)
                              VALUES (?1, ?2, ?3, ?4)",
    update_chain_checkpoint: "UPDATE decision_checkpoints SET seq = ?2, hash = ?3, pruned_at = ?4
                              WHERE world = ?1",
    decision_hash: "SELECT hash FROM decisions WHERE world = ?1 AND seq = ?2",
    decisions_through: "SELECT COALESCE(
                            (SELECT MIN(seq) FROM decisions
                             WHERE world = ?1 AND seq > ?2 AND decided_at > ?3) - 1,
                            (SELECT MAX(seq) FROM decisions WHERE world = ?1))",
    exported_through: "SELECT MAX(last_seq) FROM decision_exports
                       WHERE world = ?1 AND first_seq <= ?2",
    insert_export: "INSERT INTO decision_exports
                        (world, first_seq, last_seq, last_hash, file_digest, exported_at)
                    VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    exports: "SELECT world, first_seq, last_seq, last_hash, file_digest, exported_at
              FROM decision_exports WHERE world = ?1 ORDER BY id",
    first_decision: "SELECT MIN(seq) FROM decisions WHERE world = ?1",
    delete_decisions: "DELETE FROM decisions WHERE world = ?1 AND seq >= ?2 AND seq <= ?3",
};

/// The shared statements in SQLite. The write transaction (`BEGIN IMMEDIATE`) already holds
/// the database's lock, so reads that precede a write need no lock of their own.
const SQL: Sql = Sql {
    put_draft: "INSERT INTO worlds (slug, draft, created_at) VALUES (?1, ?2, ?3)
                ON CONFLICT (slug) DO UPDATE SET draft = excluded.draft",
    draft: "SELECT draft FROM worlds WHERE slug = ?1",
    ensure_world: "INSERT INTO worlds (slug, created_at) VALUES (?1, ?2)
                   ON CONFLICT (slug) DO NOTHING",
    lock_world: "SELECT deployed_version FROM worlds WHERE slug = ?1",
    next_version: "SELECT COALESCE(MAX(version), 0) + 1 FROM world_versions WHERE world = ?1",
    insert_version: "INSERT INTO world_versions (world, version, model, published_at, published_by)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
    insert_module: "INSERT INTO modules (hash, content, created_at) VALUES (?1, ?2, ?3)
                    ON CONFLICT (hash) DO NOTHING",
    insert_version_module:
        "INSERT INTO version_modules (world, version, position, action, module_hash)
                            VALUES (?1, ?2, ?3, ?4, ?5)",
    version_retired_at: "SELECT (SELECT r.retired_at FROM retired_versions r
                                 WHERE r.world = v.world AND r.version = v.version)
                         FROM world_versions v WHERE v.world = ?1 AND v.version = ?2",
    next_deployment: "SELECT COALESCE(MAX(seq), 0) + 1 FROM world_deployments WHERE world = ?1",
    set_deployed: "UPDATE worlds SET deployed_version = ?2 WHERE slug = ?1",
    insert_deployment:
        "INSERT INTO world_deployments (world, seq, version, deployed_at, deployed_by)
                        VALUES (?1, ?2, ?3, ?4, ?5)",
    insert_retirement:
        "INSERT INTO retired_versions (world, version, retired_at, retired_by, reason)
                        VALUES (?1, ?2, ?3, ?4, ?5)",
    world_head: "SELECT deployed_version, draft IS NOT NULL AS has_draft FROM worlds
                 WHERE slug = ?1",
    versions:
        "SELECT v.version, v.published_at, v.published_by, r.retired_at, r.retired_by, r.reason
               FROM world_versions v
               LEFT JOIN retired_versions r ON r.world = v.world AND r.version = v.version
               WHERE v.world = ?1 ORDER BY v.version",
    deployments: "SELECT seq, version, deployed_at, deployed_by FROM world_deployments
                  WHERE world = ?1 ORDER BY seq",
    version_row: "SELECT v.model, v.version, v.published_at, v.published_by, r.retired_at,
                         r.retired_by, r.reason
                  FROM world_versions v
                  LEFT JOIN retired_versions r ON r.world = v.world AND r.version = v.version
                  WHERE v.world = ?1 AND v.version = ?2",
    version_modules: "SELECT action, module_hash FROM version_modules
                      WHERE world = ?1 AND version = ?2 ORDER BY position",
    list_worlds: "SELECT w.slug AS world, w.deployed_version,
                         (SELECT MAX(v.version) FROM world_versions v WHERE v.world = w.slug)
                             AS latest_version
                  FROM worlds w ORDER BY w.slug",
    retired: "SELECT world, version FROM retired_versions ORDER BY world, version",
    deployed: "SELECT slug AS world, deployed_version AS version FROM worlds
               WHERE deployed_version IS NOT NULL ORDER BY slug",
    module: "SELECT content FROM modules WHERE hash = ?1",
    create_key: "INSERT INTO api_keys (id, secret_hash, world, scopes, label, created_at,
                                       expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    // The current secret or, until its overlap ends, the one the last rotation replaced.
    key_by_hash: concat!(
        "SELECT ",
        key_columns!(),
        ", secret_hash <> ?1 AS found_by_previous FROM api_keys
         WHERE secret_hash = ?1 OR previous_secret_hash = ?1"
    ),
    has_operator_key: "SELECT EXISTS (SELECT 1 FROM api_keys WHERE world IS NULL)",
    decisions_table: "decisions",
    set_chain_head: "INSERT INTO decision_chain_heads (world, seq, hash) VALUES (?1, ?2, ?3)
                     ON CONFLICT (world) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
    decisions: concat!(
        "SELECT ",
        decision_columns!(),
        " FROM decisions WHERE world = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
    ),
    allocate_generation: "INSERT INTO generations (started_at, git_sha, note) VALUES (?1, ?2, ?3)
                          RETURNING generation",
    latest_generation: "SELECT MAX(generation) FROM generations WHERE git_sha = ?1",
    insert_event: "INSERT INTO outbox (event_type, occurred_at, source, target, channel,
                                       generation, world, payload, idempotency_key, available_at)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?2)
                   ON CONFLICT (event_type, idempotency_key) DO NOTHING",
    // Completing a batch: one statement per step for all its rows, over JSON arrays. An
    // INSERT … SELECT with an upsert clause needs a WHERE, or SQLite reads ON as a join's.
    lock_claimed: "SELECT id FROM outbox
                   WHERE id IN (SELECT value FROM json_each(?1))
                     AND status = 'in_flight' AND claimed_by = ?2
                   ORDER BY id",
    insert_handled: "INSERT INTO event_handled (handler, idempotency_key, outbox_id, handled_at)
                     SELECT h.value, k.value, i.value, ?4
                     FROM json_each(?1) h
                     JOIN json_each(?2) k ON k.key = h.key
                     JOIN json_each(?3) i ON i.key = h.key
                     WHERE true ORDER BY h.key
                     ON CONFLICT DO NOTHING
                     RETURNING outbox_id",
    add_stats: "INSERT INTO decision_stats (world, rule, status, count)
                SELECT w.value, r.value, s.value, c.value
                FROM json_each(?1) w
                JOIN json_each(?2) r ON r.key = w.key
                JOIN json_each(?3) s ON s.key = w.key
                JOIN json_each(?4) c ON c.key = w.key
                WHERE true ORDER BY w.key
                ON CONFLICT (world, rule, status) DO UPDATE SET count = count + excluded.count",
    mark_delivered: "UPDATE outbox SET status = 'delivered', last_error = NULL
                     WHERE id IN (SELECT value FROM json_each(?1))",
    fail: "UPDATE outbox SET
               status = CASE WHEN ?4 IS NULL THEN 'failed' ELSE 'pending' END,
               available_at = COALESCE(?4, available_at),
               last_error = ?3,
               failure_history = json_insert(failure_history, '$[#]', json_object(
                   'attempt', attempts,
                   'at', strftime('%Y-%m-%dT%H:%M:%fZ', ?5 / 1000000.0, 'unixepoch'),
                   'worker', ?2, 'error', ?3)),
               first_failed_at = COALESCE(first_failed_at, ?5),
               claimed_at = NULL, claimed_by = NULL
           WHERE id = ?1 AND status = 'in_flight' AND claimed_by = ?2
           RETURNING status",
    rescue: "UPDATE outbox SET status = 'pending',
                 last_error = 'lease expired: ' || COALESCE(claimed_by, 'unknown worker'),
                 claimed_at = NULL, claimed_by = NULL
             WHERE generation = ?1 AND status = 'in_flight' AND claimed_at < ?2",
    outbox_row: concat!("SELECT ", outbox_columns!(), " FROM outbox WHERE id = ?1"),
    outbox_list: concat!(
        "SELECT ",
        outbox_columns!(),
        " FROM outbox WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR generation = ?2)
          ORDER BY id DESC LIMIT ?3"
    ),
    replay:
        "UPDATE outbox SET status = 'pending', attempts = 0, available_at = ?2, last_error = NULL
             WHERE id = ?1 AND status = 'failed'",
    adopt: "UPDATE outbox SET generation = ?2,
                status = CASE WHEN status = 'in_flight' THEN 'pending' ELSE status END,
                claimed_at = NULL, claimed_by = NULL
            WHERE generation = ?1 AND status <> 'delivered'",
    outbox_counts: "SELECT COALESCE(SUM(generation = ?1 AND status = 'pending'), 0) AS pending,
                           COALESCE(SUM(generation = ?1 AND status = 'in_flight'), 0) AS in_flight,
                           COALESCE(SUM(generation = ?1 AND status = 'failed'), 0) AS failed,
                           COALESCE(SUM(generation <> ?1), 0) AS other_generations,
                           CAST(unixepoch('subsec') * 1000 AS INTEGER)
                               - MIN(CASE WHEN generation = ?1 AND status = 'pending'
                                          THEN occurred_at END) / 1000 AS oldest_pending_ms
                    FROM outbox WHERE status <> 'delivered'",
    stats: "SELECT world, rule, status, count FROM decision_stats WHERE world = ?1
            ORDER BY rule, status",
    create_webhook: "INSERT INTO webhooks (id, world, url, secret, events, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    webhooks: "SELECT id, world, url, secret, events, created_at FROM webhooks
               WHERE world = ?1 ORDER BY id",
    webhook: "SELECT id, world, url, secret, events, created_at FROM webhooks WHERE id = ?1",
    create_thread: "INSERT INTO agent_threads
                        (id, world, kind, parent_thread, created_by, status, task, created_at,
                         updated_at)
                    VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6, ?7, ?7)",
    thread: concat!(
        "SELECT ",
        thread_columns!(),
        " FROM agent_threads WHERE id = ?1"
    ),
    acquire_lease: "UPDATE agent_threads
                    SET lease_owner = ?2, lease_expires_at = ?4, fence = fence + 1,
                        updated_at = ?3
                    WHERE id = ?1 AND status = 'running'
                      AND (lease_owner IS NULL OR lease_owner = ?2
                           OR lease_expires_at IS NULL OR lease_expires_at <= ?3)
                    RETURNING fence",
    renew_lease: "UPDATE agent_threads SET lease_expires_at = ?5, updated_at = ?4
                  WHERE id = ?1 AND lease_owner = ?2 AND fence = ?3 AND status = 'running'",
    lock_thread: "SELECT world, fence, status FROM agent_threads WHERE id = ?1",
    insert_checkpoint: "INSERT INTO agent_checkpoints
                            (thread, step, parent_step, node, state, created_at)
                        VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                        ON CONFLICT (thread, step) DO NOTHING",
    last_event_seq: "SELECT COALESCE(MAX(seq), 0) FROM agent_events WHERE thread = ?1",
    insert_thread_event: "INSERT INTO agent_events (thread, seq, step, kind, data, created_at)
                          VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    set_usage: "UPDATE agent_threads
                SET calls = ?2, prompt_tokens = ?3, completion_tokens = ?4, updated_at = ?5
                WHERE id = ?1",
    finish_thread: "UPDATE agent_threads
                    SET status = ?2, finished_at = ?3, updated_at = ?3,
                        lease_owner = NULL, lease_expires_at = NULL
                    WHERE id = ?1",
    latest_checkpoint: "SELECT step, parent_step, node, state, created_at
                        FROM agent_checkpoints WHERE thread = ?1
                        ORDER BY step DESC LIMIT 1",
    checkpoint: "SELECT step, parent_step, node, state, created_at FROM agent_checkpoints
                 WHERE thread = ?1 AND step = ?2",
    thread_events: "SELECT seq, step, kind, data, created_at FROM agent_events
                    WHERE thread = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    expired_runs: concat!(
        "SELECT ",
        thread_columns!(),
        " FROM agent_threads
          WHERE status = 'running'
            AND (lease_expires_at IS NULL OR lease_expires_at <= ?1)
          ORDER BY lease_expires_at, created_at LIMIT ?2"
    ),
    insert_candidate: "INSERT INTO rule_candidates
                           (id, world, action, run_thread, rule, evidence, model,
                            prompt_versions, created_at)
                       VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                       ON CONFLICT DO NOTHING",
    candidate_of_run: concat!(
        "SELECT ",
        candidate_columns!(),
        " FROM rule_candidates WHERE run_thread = ?1"
    ),
    candidates: concat!(
        "SELECT ",
        candidate_columns!(),
        " FROM rule_candidates WHERE world = ?1 ORDER BY created_at DESC, id"
    ),
    prunable: "SELECT id FROM agent_threads
               WHERE finished_at IS NOT NULL AND pruned_at IS NULL AND finished_at < ?1
               ORDER BY finished_at LIMIT ?2
              ",
    prune_checkpoints: "DELETE FROM agent_checkpoints
                        WHERE thread = ?1 AND step < (SELECT MAX(step)
                                                      FROM agent_checkpoints
                                                      WHERE thread = ?1)",
    prune_events: "DELETE FROM agent_events WHERE thread = ?1",
    mark_pruned: "UPDATE agent_threads SET pruned_at = ?2 WHERE id = ?1",
    reopen_thread: "UPDATE agent_threads
                    SET status = 'running', finished_at = NULL, updated_at = ?2
                    WHERE id = ?1",
    candidate: concat!(
        "SELECT ",
        candidate_columns!(),
        " FROM rule_candidates WHERE id = ?1"
    ),
    review_candidate: "UPDATE rule_candidates
                       SET status = ?3, reviewer = ?4, rationale = ?5, reviewed_at = ?6
                       WHERE id = ?1 AND world = ?2 AND status = 'proposed'",
    running_threads: "SELECT COUNT(*) FROM agent_threads
                      WHERE world = ?1 AND kind = ?2 AND status = 'running'",
    world_threads: concat!(
        "SELECT ",
        thread_columns!(),
        " FROM agent_threads WHERE world = ?1 AND kind = ?2
          ORDER BY created_at DESC, id LIMIT ?3"
    ),
    list_keys: concat!(
        "SELECT ",
        key_columns!(),
        ", 0 AS found_by_previous FROM api_keys ORDER BY created_at, id"
    ),
    key_by_id: concat!(
        "SELECT ",
        key_columns!(),
        ", 0 AS found_by_previous FROM api_keys WHERE id = ?1"
    ),
    // No secret hashes to `revoked:<id>` (hashes are hex), so a build that knows nothing of
    // `revoked_at` refuses the key too; a second revocation keeps the first time.
    revoke_key: "UPDATE api_keys
                 SET revoked_at = COALESCE(revoked_at, ?2), secret_hash = 'revoked:' || id,
                     previous_secret_hash = NULL, previous_valid_until = NULL
                 WHERE id = ?1",
    rotate_key: "UPDATE api_keys
                 SET previous_secret_hash = secret_hash, previous_valid_until = ?3,
                     secret_hash = ?2
                 WHERE id = ?1 AND revoked_at IS NULL",
    touch_key: "UPDATE api_keys SET last_used_at = ?2 WHERE id = ?1",
    delete_webhook: "DELETE FROM webhooks WHERE world = ?1 AND id = ?2",
};

impl ImpactDialect for SqliteStore {
    const IMPACT: ImpactSql = IMPACT;
    impact_statements!();
}

/// The impact statements in SQLite.
const IMPACT: ImpactSql = ImpactSql {
    contexts_table: "decision_contexts",
    recorded_contexts: "SELECT d.seq, d.decision_id, d.version, d.action, d.status,
                               d.matched_rules, d.caller, d.decided_at, c.context
                        FROM decision_contexts c
                        JOIN decisions d ON d.world = c.world AND d.seq = c.seq
                        WHERE c.world = ?1 AND c.seq < ?2 AND (?3 IS NULL OR c.decided_at >= ?3)
                        ORDER BY c.seq DESC LIMIT ?4",
    prune_contexts: "DELETE FROM decision_contexts WHERE (world, seq) IN (
                         SELECT world, seq FROM decision_contexts WHERE decided_at < ?1
                         ORDER BY decided_at LIMIT ?2)",
    context_count: "SELECT COUNT(*) FROM decision_contexts WHERE world = ?1",
    upsert_shadow: "INSERT INTO shadows (world, id, version, sample, started_by, started_at)
                    VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                    ON CONFLICT (world) DO UPDATE SET id = excluded.id,
                        version = excluded.version, sample = excluded.sample,
                        started_by = excluded.started_by, started_at = excluded.started_at",
    delete_shadow: "DELETE FROM shadows WHERE world = ?1",
    delete_shadow_of_version: "DELETE FROM shadows WHERE world = ?1 AND version = ?2",
    shadows: "SELECT world, id, version, sample, started_by, started_at FROM shadows
              ORDER BY world",
    shadow: "SELECT world, id, version, sample, started_by, started_at FROM shadows
             WHERE world = ?1",
    put_shadow_report: "INSERT INTO shadow_reports (shadow_id, instance, world, report, updated_at)
                        VALUES (?1, ?2, ?3, ?4, ?5)
                        ON CONFLICT (shadow_id, instance) DO UPDATE SET
                            report = excluded.report, updated_at = excluded.updated_at",
    shadow_reports: "SELECT report FROM shadow_reports WHERE shadow_id = ?1 ORDER BY instance",
    delete_shadow_reports: "DELETE FROM shadow_reports WHERE shadow_id = ?1",
    insert_replay: "INSERT INTO replays (id, world, version, model, since, row_limit, status,
                                         requested_by, requested_at)
                    VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', ?7, ?8)",
    replay: "SELECT id, world, version, model, since, row_limit, status, processed, report,
                    error, requested_by, requested_at, finished_at
             FROM replays WHERE id = ?1",
    unfinished_replays: "SELECT COUNT(*) FROM replays
                         WHERE world = ?1 AND status IN ('queued', 'running')",
    claimable_replay: "SELECT id FROM replays
                       WHERE status = 'queued' OR (status = 'running' AND heartbeat_at < ?1)
                       ORDER BY requested_at LIMIT 1",
    claim_replay: "UPDATE replays SET status = 'running', claimed_by = ?2, heartbeat_at = ?3
                   WHERE id = ?1
                     AND (status = 'queued' OR (status = 'running' AND heartbeat_at < ?4))",
    replay_progress: "UPDATE replays SET processed = ?3, report = ?4, heartbeat_at = ?5
                      WHERE id = ?1 AND claimed_by = ?2 AND status = 'running'",
    finish_replay: "UPDATE replays SET status = ?3, processed = ?4, report = ?5, error = ?6,
                                       finished_at = ?7, heartbeat_at = ?7
                    WHERE id = ?1 AND claimed_by = ?2 AND status = 'running'",
    prune_replays: "DELETE FROM replays WHERE status IN ('done', 'failed') AND finished_at < ?1",
};

//! PostgreSQL's statements: the production store, shared by every API instance, with every
//! table in schema `core`, and the `LISTEN` side of notifications.
//!
//! Several instances write to one database, so every read-then-write locks a row first
//! (`FOR UPDATE`) and runs at the default READ COMMITTED isolation: a writer that waited for
//! a lock reads what the previous holder committed (`protocol.rs` says which rows, in which
//! order).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::migrate::Migrator;
use sqlx::postgres::{
    PgArgumentBuffer, PgConnectOptions, PgHasArrayType, PgListener, PgPool, PgPoolOptions,
    PgTypeInfo, PgValueRef,
};
use sqlx::{Decode, Encode, Postgres, Type};

use super::chain::{decisions_insert, ChainedDecision, GENESIS};
use super::impact::{
    contexts_insert, impact_statements, ImpactDialect, ImpactSql, NewReplay, RecordedContextRow,
    ReplayRow, ShadowRecord, ShadowRow,
};
use super::outbox::{source, OutboxDbRow, Stamp};
use super::protocol::{Dialect, Tx};
use super::records::{
    DecisionRow, DeploymentRow, Json, KeyRow, List, ScopeList, Time, VersionModelRow, VersionRow,
    WebhookRow, WorldHeadRow, WorldRow, WorldVersionRow,
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
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.ignore_missing = true;
    migrator
};

/// The channel deployments and retirements notify on commit; the payload is the world's slug.
pub(super) const DEPLOYMENTS_CHANNEL: &str = "spectral_deployments";

/// The channel revocations and rotations notify on commit; the payload is the key's id.
pub(super) const KEYS_CHANNEL: &str = "spectral_keys";

/// The channel new agent thread events and thread status changes notify on commit (by the
/// triggers of migration 0007); the payload is the thread's id.
pub(super) const AGENT_CHANNEL: &str = "spectral_agent";

/// The backend's process id, as text (the simple query protocol's format).
const BACKEND_PID: &str = "SELECT pg_backend_pid()::text";

/// Two sessions of this service were served by one Postgres process: the DSN leads to a
/// pooler in transaction or statement mode.
#[derive(Debug, thiserror::Error)]
#[error(
    "the database URL leads to a connection pooler in transaction or statement mode (two \
     sessions were served by one server process, pid {pid}); Spectral needs session mode: \
     set the pooler's pool_mode = session (Supabase: the session pooler, port 5432) or \
     connect to Postgres directly"
)]
pub struct TransactionPooler {
    /// The server process both sessions reached.
    pub pid: String,
}

/// The Postgres backend: a pool over one database.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    pub(super) stamp: Arc<Stamp>,
}

impl PgStore {
    /// Connect to `url`; fails when the database cannot be reached.
    pub(super) async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let store = Self::pool(url.parse()?, max_connections, Arc::default()).await?;
        store.refuse_transaction_pooling().await?;
        Ok(store)
    }

    /// Refuse a DSN that leads to a pooler in transaction (or statement) mode, such as
    /// PgBouncer's `pool_mode = transaction` or Supabase's port 6543: the store needs session
    /// state (named prepared statements, `LISTEN`, sqlx's migration lock), which such a
    /// pooler hands to whichever client runs next, so the service would fail later and
    /// obscurely. Two sessions held open at once never share a server process unless a
    /// pooler multiplexes them; a transaction-mode pooler hands the second the process the
    /// first has just released. The probe runs over the simple query protocol, which leaves
    /// no prepared statement behind on the shared process.
    async fn refuse_transaction_pooling(&self) -> Result<(), StoreError> {
        let probe = PgPoolOptions::new()
            .max_connections(2)
            .connect_with((*self.pool.connect_options()).clone())
            .await?;
        let mut first = probe.acquire().await?;
        let mut second = probe.acquire().await?;
        let pid = |row: sqlx::postgres::PgRow| -> Result<String, StoreError> {
            use sqlx::Row;
            Ok(row.try_get::<String, _>(0)?)
        };
        let a = pid(sqlx::raw_sql(BACKEND_PID).fetch_one(&mut *first).await?)?;
        let b = pid(sqlx::raw_sql(BACKEND_PID).fetch_one(&mut *second).await?)?;
        drop((first, second));
        probe.close().await;
        if a == b {
            return Err(StoreError::Database(Box::new(TransactionPooler { pid: a })));
        }
        Ok(())
    }

    /// The decision-log writer's store: one connection of its own, opened by the caller (on
    /// the writer's thread), producing events under this store's generation.
    pub(super) async fn log_writer(&self) -> Result<Self, StoreError> {
        let options = (*self.pool.connect_options()).clone();
        Self::pool(options, 1, self.stamp.clone()).await
    }

    async fn pool(
        options: PgConnectOptions,
        max_connections: u32,
        stamp: Arc<Stamp>,
    ) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options)
            .await?;
        Ok(Self { pool, stamp })
    }

    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        // sqlx holds an advisory lock while it migrates, so instances starting together apply
        // each migration once.
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

    /// Listen on `channel` on a connection of its own, outside the pool, so that a listener
    /// never takes a connection that queries need.
    pub(super) async fn listen(&self, channel: &str) -> Result<PgNotifications, StoreError> {
        let options = (*self.pool.connect_options()).clone();
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_with(options)
            .await?;
        let mut inner = PgListener::connect_with(&pool).await?;
        inner.listen(channel).await?;
        // The listener must tell a lost connection from silence; reconnecting by itself
        // would hide the notifications lost in between.
        inner.ignore_pool_close_event(false);
        Ok(PgNotifications { inner })
    }
}

/// Notifications from Postgres `LISTEN`, on a connection of their own.
pub(super) struct PgNotifications {
    inner: PgListener,
}

impl PgNotifications {
    /// The next notification's payload. A lost connection is an error even though the
    /// listener reconnects, because notifications sent meanwhile are gone and the caller must
    /// poll.
    pub(super) async fn next(&mut self) -> Result<String, StoreError> {
        match self.inner.try_recv().await? {
            Some(notification) => Ok(notification.payload().to_owned()),
            None => Err(StoreError::Database(
                "the notification connection was lost; notifications may have been missed".into(),
            )),
        }
    }

    pub(super) async fn ping(&mut self) -> Result<(), StoreError> {
        Ok(sqlx::query("SELECT 1")
            .execute(&mut self.inner)
            .await
            .map(drop)?)
    }
}

// How PostgreSQL stores the shared column kinds: native types throughout.

impl Type<Postgres> for Time {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for Time {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        Encode::<Postgres>::encode_by_ref(&self.0, buf)
    }
}

impl Decode<'_, Postgres> for Time {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        Ok(Self(Decode::<Postgres>::decode(value)?))
    }
}

impl Type<Postgres> for Json {
    fn type_info() -> PgTypeInfo {
        <serde_json::Value as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for Json {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        Encode::<Postgres>::encode_by_ref(&self.0, buf)
    }
}

impl Decode<'_, Postgres> for Json {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        Ok(Self(Decode::<Postgres>::decode(value)?))
    }
}

impl Type<Postgres> for ScopeList {
    fn type_info() -> PgTypeInfo {
        <Vec<String> as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for ScopeList {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        Encode::<Postgres>::encode_by_ref(&self.0, buf)
    }
}

impl Decode<'_, Postgres> for ScopeList {
    fn decode(value: PgValueRef<'_>) -> Result<Self, BoxDynError> {
        Ok(Self(Decode::<Postgres>::decode(value)?))
    }
}

impl<T> Type<Postgres> for List<T>
where
    T: Type<Postgres> + PgHasArrayType,
{
    fn type_info() -> PgTypeInfo {
        <Vec<T> as Type<Postgres>>::type_info()
    }
}

impl<'q, T> Encode<'q, Postgres> for List<T>
where
    T: Encode<'q, Postgres> + Type<Postgres> + PgHasArrayType,
{
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        Encode::<Postgres>::encode_by_ref(&self.0, buf)
    }
}

impl Dialect for PgStore {
    type Db = Postgres;
    const SQL: Sql = SQL;

    fn stamp(&self) -> &Stamp {
        &self.stamp
    }

    async fn begin_write(&self) -> Result<Tx<Self>, StoreError> {
        Ok(self.pool.begin().await?)
    }

    async fn begin_read(&self) -> Result<Tx<Self>, StoreError> {
        let snapshot = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
        Ok(self.pool.begin_with(snapshot).await?)
    }

    async fn lock_generations(tx: &mut Tx<Self>) -> Result<(), StoreError> {
        // A transaction-scoped advisory lock: released at commit, taken by no other statement.
        let q = sqlx::query("SELECT pg_advisory_xact_lock(hashtext('spectral.generations'))");
        q.execute(&mut **tx).await?;
        Ok(())
    }

    async fn notify_deployments(tx: &mut Tx<Self>, world: &str) -> Result<(), StoreError> {
        // Postgres delivers a notification when (and only if) the transaction commits.
        let q = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(DEPLOYMENTS_CHANNEL)
            .bind(world);
        Ok(q.execute(&mut **tx).await.map(drop)?)
    }

    async fn lock_chain_head(tx: &mut Tx<Self>, world: &str) -> Result<(i64, String), StoreError> {
        // Make sure the head row exists, then lock it until commit.
        let sql = "INSERT INTO core.decision_chain_heads (world, seq, hash) VALUES ($1, 0, $2)
                   ON CONFLICT (world) DO NOTHING";
        sqlx::query(sql)
            .bind(world)
            .bind(GENESIS)
            .execute(&mut **tx)
            .await?;
        let sql = "SELECT seq, hash FROM core.decision_chain_heads WHERE world = $1 FOR UPDATE";
        Ok(sqlx::query_as(sql).bind(world).fetch_one(&mut **tx).await?)
    }

    async fn claim(
        &self,
        generation: i64,
        worker: &str,
        limit: i64,
        at: DateTime<Utc>,
    ) -> Result<Vec<OutboxDbRow>, StoreError> {
        // SKIP LOCKED is the correctness primitive: a row one claimer holds is invisible to
        // the others, so no two workers ever get the same row.
        let sql = "WITH due AS (
                       SELECT id FROM core.outbox
                       WHERE generation = $1 AND status = 'pending' AND available_at <= $2
                       ORDER BY id LIMIT $3
                       FOR UPDATE SKIP LOCKED
                   )
                   UPDATE core.outbox o
                   SET status = 'in_flight', claimed_at = $2, claimed_by = $4,
                       attempts = o.attempts + 1
                   FROM due WHERE o.id = due.id
                   RETURNING o.*";
        let q = sqlx::query_as(sql)
            .bind(generation)
            .bind(at)
            .bind(limit)
            .bind(worker);
        Ok(q.fetch_all(&self.pool).await?)
    }

    async fn release(&self, worker: &str, ids: &[i64]) -> Result<u64, StoreError> {
        let sql = "UPDATE core.outbox SET status = 'pending', attempts = GREATEST(attempts - 1, 0),
                       claimed_at = NULL, claimed_by = NULL
                   WHERE id = ANY($1) AND status = 'in_flight' AND claimed_by = $2";
        let q = sqlx::query(sql).bind(ids).bind(worker);
        Ok(q.execute(&self.pool).await?.rows_affected())
    }

    async fn notify_keys(tx: &mut Tx<Self>, id: &str) -> Result<(), StoreError> {
        // Delivered when (and only if) the transaction commits, like deployments.
        let q = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(KEYS_CHANNEL)
            .bind(id);
        Ok(q.execute(&mut **tx).await.map(drop)?)
    }

    shared_statements!();

    // Retention.
    const RETENTION: RetentionSql = RETENTION;

    async fn delete_handled(tx: &mut Tx<Self>, ids: &[i64]) -> Result<u64, StoreError> {
        let sql = "DELETE FROM core.event_handled WHERE outbox_id = ANY($1)";
        let q = sqlx::query(sql).bind(ids);
        Ok(q.execute(&mut **tx).await?.rows_affected())
    }

    async fn delete_outbox(tx: &mut Tx<Self>, ids: &[i64]) -> Result<u64, StoreError> {
        let sql = "DELETE FROM core.outbox WHERE status = 'delivered' AND id = ANY($1)";
        let q = sqlx::query(sql).bind(ids);
        Ok(q.execute(&mut **tx).await?.rows_affected())
    }

    async fn plan(
        &self,
        sql: &str,
        generation: i64,
        before: Option<DateTime<Utc>>,
    ) -> Result<String, StoreError> {
        let explain = format!("EXPLAIN {sql}");
        let q = sqlx::query_scalar::<_, String>(&explain).bind(generation);
        let q = match before {
            Some(t) => q.bind(Time(t)),
            None => q,
        };
        Ok(q.fetch_all(&self.pool).await?.join("\n"))
    }

    retention_statements!();
}

/// The retention statements in PostgreSQL. Outbox counts filter on `status <> 'delivered'`,
/// the partial index's condition, so that they read the index of outstanding rows.
const RETENTION: RetentionSql = RetentionSql {
    stranded: "SELECT COUNT(*) AS rows,
                      (EXTRACT(EPOCH FROM now() - MIN(occurred_at)) * 1000)::bigint
                          AS oldest_age_ms
               FROM core.outbox
               WHERE status <> 'delivered' AND status <> 'failed'
                 AND generation <> $1 AND occurred_at < $2",
    // SKIP LOCKED: a row another transaction holds (an adoption, a replay) is left for the
    // next batch rather than waited for.
    prunable_outbox: "SELECT id FROM core.outbox
                      WHERE status = 'delivered' AND occurred_at < $1
                      ORDER BY occurred_at, id LIMIT $2
                      FOR UPDATE SKIP LOCKED",
    chain_checkpoint: "SELECT seq, hash FROM core.decision_checkpoints WHERE world = $1",
    chain_head: "SELECT seq, hash FROM core.decision_chain_heads WHERE world = $1",
    insert_chain_checkpoint: "INSERT INTO core.decision_checkpoints (world, seq, hash, pruned_at)
                              VALUES ($1, $2, $3, $4)",
    update_chain_checkpoint: "UPDATE core.decision_checkpoints
                              SET seq = $2, hash = $3, pruned_at = $4 WHERE world = $1",
    decision_hash: "SELECT hash FROM core.decisions WHERE world = $1 AND seq = $2",
    decisions_through: "SELECT COALESCE(
                            (SELECT MIN(seq) FROM core.decisions
                             WHERE world = $1 AND seq > $2 AND decided_at > $3) - 1,
                            (SELECT MAX(seq) FROM core.decisions WHERE world = $1))",
    exported_through: "SELECT MAX(last_seq) FROM core.decision_exports
                       WHERE world = $1 AND first_seq <= $2",
    insert_export: "INSERT INTO core.decision_exports
                        (world, first_seq, last_seq, last_hash, file_digest, exported_at)
                    VALUES ($1, $2, $3, $4, $5, $6)",
    exports: "SELECT world, first_seq, last_seq, last_hash, file_digest, exported_at
              FROM core.decision_exports WHERE world = $1 ORDER BY id",
    first_decision: "SELECT MIN(seq) FROM core.decisions WHERE world = $1",
    delete_decisions: "DELETE FROM core.decisions WHERE world = $1 AND seq >= $2 AND seq <= $3",
};

/// The shared statements in PostgreSQL: every table in schema `core`; `COLLATE "C"` sorts by
/// bytes, as SQLite does, whatever the database's locale; reads that precede a write lock
/// their row (`FOR UPDATE`).
const SQL: Sql = Sql {
    put_draft: "INSERT INTO core.worlds (slug, draft, created_at) VALUES ($1, $2, $3)
                ON CONFLICT (slug) DO UPDATE SET draft = excluded.draft",
    draft: "SELECT draft FROM core.worlds WHERE slug = $1",
    ensure_world: "INSERT INTO core.worlds (slug, created_at) VALUES ($1, $2)
                   ON CONFLICT (slug) DO NOTHING",
    lock_world: "SELECT deployed_version FROM core.worlds WHERE slug = $1 FOR UPDATE",
    next_version: "SELECT COALESCE(MAX(version), 0) + 1 FROM core.world_versions WHERE world = $1",
    insert_version: "INSERT INTO core.world_versions
                         (world, version, model, published_at, published_by)
                     VALUES ($1, $2, $3, $4, $5)",
    insert_module: "INSERT INTO core.modules (hash, content, created_at) VALUES ($1, $2, $3)
                    ON CONFLICT (hash) DO NOTHING",
    insert_version_module: "INSERT INTO core.version_modules
                                (world, version, position, action, module_hash)
                            VALUES ($1, $2, $3, $4, $5)",
    version_retired_at: "SELECT (SELECT r.retired_at FROM core.retired_versions r
                                 WHERE r.world = v.world AND r.version = v.version)
                         FROM core.world_versions v WHERE v.world = $1 AND v.version = $2",
    next_deployment: "SELECT COALESCE(MAX(seq), 0) + 1 FROM core.world_deployments
                      WHERE world = $1",
    set_deployed: "UPDATE core.worlds SET deployed_version = $2 WHERE slug = $1",
    insert_deployment: "INSERT INTO core.world_deployments
                            (world, seq, version, deployed_at, deployed_by)
                        VALUES ($1, $2, $3, $4, $5)",
    insert_retirement: "INSERT INTO core.retired_versions
                            (world, version, retired_at, retired_by, reason)
                        VALUES ($1, $2, $3, $4, $5)",
    world_head: "SELECT deployed_version, draft IS NOT NULL AS has_draft
                 FROM core.worlds WHERE slug = $1",
    versions: "SELECT v.version, v.published_at, v.published_by,
                      r.retired_at, r.retired_by, r.reason
               FROM core.world_versions v
               LEFT JOIN core.retired_versions r ON r.world = v.world AND r.version = v.version
               WHERE v.world = $1 ORDER BY v.version",
    deployments: "SELECT seq, version, deployed_at, deployed_by FROM core.world_deployments
                  WHERE world = $1 ORDER BY seq",
    version_row: "SELECT v.model, v.version, v.published_at, v.published_by,
                         r.retired_at, r.retired_by, r.reason
                  FROM core.world_versions v
                  LEFT JOIN core.retired_versions r ON r.world = v.world AND r.version = v.version
                  WHERE v.world = $1 AND v.version = $2",
    version_modules: "SELECT action, module_hash FROM core.version_modules
                      WHERE world = $1 AND version = $2 ORDER BY position",
    list_worlds: r#"SELECT w.slug AS world, w.deployed_version,
                           (SELECT MAX(v.version) FROM core.world_versions v
                            WHERE v.world = w.slug) AS latest_version
                    FROM core.worlds w ORDER BY w.slug COLLATE "C""#,
    retired: "SELECT world, version FROM core.retired_versions ORDER BY world, version",
    deployed: r#"SELECT slug AS world, deployed_version AS version FROM core.worlds
                 WHERE deployed_version IS NOT NULL ORDER BY slug COLLATE "C""#,
    module: "SELECT content FROM core.modules WHERE hash = $1",
    create_key: "INSERT INTO core.api_keys (id, secret_hash, world, scopes, label, created_at,
                                       expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
    // The current secret or, until its overlap ends, the one the last rotation replaced.
    key_by_hash: concat!(
        "SELECT ",
        key_columns!(),
        ", secret_hash <> $1 AS found_by_previous FROM core.api_keys
         WHERE secret_hash = $1 OR previous_secret_hash = $1"
    ),
    has_operator_key: "SELECT EXISTS (SELECT 1 FROM core.api_keys WHERE world IS NULL)",
    decisions_table: "core.decisions",
    set_chain_head: "UPDATE core.decision_chain_heads SET seq = $2, hash = $3 WHERE world = $1",
    decisions: concat!(
        "SELECT ",
        decision_columns!(),
        " FROM core.decisions WHERE world = $1 AND seq > $2 ORDER BY seq LIMIT $3"
    ),
    allocate_generation: "INSERT INTO core.generations (started_at, git_sha, note)
                          VALUES ($1, $2, $3) RETURNING generation",
    latest_generation: "SELECT MAX(generation) FROM core.generations WHERE git_sha = $1",
    // The insert trigger NOTIFYs the outbox channel on commit.
    insert_event: "INSERT INTO core.outbox (event_type, occurred_at, source, target, channel,
                                            generation, world, payload, idempotency_key,
                                            available_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $2)
                   ON CONFLICT (event_type, idempotency_key) DO NOTHING",
    // Completing a batch: one statement per step for all its rows, over arrays.
    lock_claimed: "SELECT id FROM core.outbox
                   WHERE id = ANY($1) AND status = 'in_flight' AND claimed_by = $2
                   ORDER BY id FOR UPDATE",
    insert_handled: "INSERT INTO core.event_handled
                         (handler, idempotency_key, outbox_id, handled_at)
                     SELECT h, k, i, $4::timestamptz
                     FROM UNNEST($1::text[], $2::text[], $3::bigint[])
                         AS t(h, k, i)
                     ON CONFLICT DO NOTHING
                     RETURNING outbox_id",
    // The rows are upserted in the arrays' order, which the caller sorts.
    add_stats: "INSERT INTO core.decision_stats (world, rule, status, count)
                SELECT w, r, s, c
                FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[]) AS t(w, r, s, c)
                ON CONFLICT (world, rule, status)
                DO UPDATE SET count = core.decision_stats.count + excluded.count",
    mark_delivered: "UPDATE core.outbox SET status = 'delivered', last_error = NULL
                     WHERE id = ANY($1)",
    fail: "UPDATE core.outbox SET
               status = CASE WHEN $4::timestamptz IS NULL THEN 'failed' ELSE 'pending' END,
               available_at = COALESCE($4, available_at),
               last_error = $3,
               failure_history = failure_history || jsonb_build_array(jsonb_build_object(
                   'attempt', attempts, 'at', $5::timestamptz, 'worker', $2::text,
                   'error', $3::text)),
               first_failed_at = COALESCE(first_failed_at, $5),
               claimed_at = NULL, claimed_by = NULL
           WHERE id = $1 AND status = 'in_flight' AND claimed_by = $2
           RETURNING status",
    rescue: "UPDATE core.outbox SET status = 'pending',
                 last_error = 'lease expired: ' || COALESCE(claimed_by, 'unknown worker'),
                 claimed_at = NULL, claimed_by = NULL
             WHERE generation = $1 AND status = 'in_flight' AND claimed_at < $2",
    outbox_row: concat!(
        "SELECT ",
        outbox_columns!(),
        " FROM core.outbox WHERE id = $1"
    ),
    outbox_list: concat!(
        "SELECT ",
        outbox_columns!(),
        " FROM core.outbox
          WHERE ($1::text IS NULL OR status = $1) AND ($2::bigint IS NULL OR generation = $2)
          ORDER BY id DESC LIMIT $3"
    ),
    replay: "UPDATE core.outbox SET status = 'pending', attempts = 0, available_at = $2,
                 last_error = NULL
             WHERE id = $1 AND status = 'failed'",
    adopt: "UPDATE core.outbox SET generation = $2,
                status = CASE WHEN status = 'in_flight' THEN 'pending' ELSE status END,
                claimed_at = NULL, claimed_by = NULL
            WHERE generation = $1 AND status <> 'delivered'",
    outbox_counts: "SELECT
                        COUNT(*) FILTER (WHERE generation = $1 AND status = 'pending') AS pending,
                        COUNT(*) FILTER (WHERE generation = $1 AND status = 'in_flight')
                            AS in_flight,
                        COUNT(*) FILTER (WHERE generation = $1 AND status = 'failed') AS failed,
                        COUNT(*) FILTER (WHERE generation <> $1 AND status <> 'delivered')
                            AS other_generations,
                        (EXTRACT(EPOCH FROM now() - MIN(occurred_at)
                            FILTER (WHERE generation = $1 AND status = 'pending')) * 1000)::bigint
                            AS oldest_pending_ms
                    FROM core.outbox WHERE status <> 'delivered'",
    stats: r#"SELECT world, rule, status, count FROM core.decision_stats WHERE world = $1
              ORDER BY rule COLLATE "C", status COLLATE "C""#,
    create_webhook: "INSERT INTO core.webhooks (id, world, url, secret, events, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6)",
    webhooks: "SELECT id, world, url, secret, events, created_at FROM core.webhooks
               WHERE world = $1 ORDER BY id",
    webhook: "SELECT id, world, url, secret, events, created_at FROM core.webhooks
              WHERE id = $1",
    create_thread: "INSERT INTO core.agent_threads
                        (id, world, kind, parent_thread, created_by, status, task, created_at,
                         updated_at)
                    VALUES ($1, $2, $3, $4, $5, 'running', $6, $7, $7)",
    thread: concat!(
        "SELECT ",
        thread_columns!(),
        " FROM core.agent_threads WHERE id = $1"
    ),
    acquire_lease: "UPDATE core.agent_threads
                    SET lease_owner = $2, lease_expires_at = $4, fence = fence + 1,
                        updated_at = $3
                    WHERE id = $1 AND status = 'running'
                      AND (lease_owner IS NULL OR lease_owner = $2
                           OR lease_expires_at IS NULL OR lease_expires_at <= $3)
                    RETURNING fence",
    renew_lease: "UPDATE core.agent_threads SET lease_expires_at = $5, updated_at = $4
                  WHERE id = $1 AND lease_owner = $2 AND fence = $3 AND status = 'running'",
    lock_thread: "SELECT world, fence, status FROM core.agent_threads WHERE id = $1 FOR UPDATE",
    insert_checkpoint: "INSERT INTO core.agent_checkpoints
                            (thread, step, parent_step, node, state, created_at)
                        VALUES ($1, $2, $3, $4, $5, $6)
                        ON CONFLICT (thread, step) DO NOTHING",
    last_event_seq: "SELECT COALESCE(MAX(seq), 0) FROM core.agent_events WHERE thread = $1",
    insert_thread_event: "INSERT INTO core.agent_events (thread, seq, step, kind, data, created_at)
                          VALUES ($1, $2, $3, $4, $5, $6)",
    set_usage: "UPDATE core.agent_threads
                SET calls = $2, prompt_tokens = $3, completion_tokens = $4, updated_at = $5
                WHERE id = $1",
    finish_thread: "UPDATE core.agent_threads
                    SET status = $2, finished_at = $3, updated_at = $3,
                        lease_owner = NULL, lease_expires_at = NULL
                    WHERE id = $1",
    latest_checkpoint: "SELECT step, parent_step, node, state, created_at
                        FROM core.agent_checkpoints WHERE thread = $1
                        ORDER BY step DESC LIMIT 1",
    checkpoint: "SELECT step, parent_step, node, state, created_at FROM core.agent_checkpoints
                 WHERE thread = $1 AND step = $2",
    thread_events: "SELECT seq, step, kind, data, created_at FROM core.agent_events
                    WHERE thread = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    expired_runs: concat!(
        "SELECT ",
        thread_columns!(),
        " FROM core.agent_threads
          WHERE status = 'running'
            AND (lease_expires_at IS NULL OR lease_expires_at <= $1)
          ORDER BY lease_expires_at NULLS FIRST, created_at LIMIT $2"
    ),
    insert_candidate: "INSERT INTO core.rule_candidates
                           (id, world, action, run_thread, rule, evidence, model,
                            prompt_versions, created_at)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                       ON CONFLICT DO NOTHING",
    candidate_of_run: concat!(
        "SELECT ",
        candidate_columns!(),
        " FROM core.rule_candidates WHERE run_thread = $1"
    ),
    candidates: concat!(
        "SELECT ",
        candidate_columns!(),
        " FROM core.rule_candidates WHERE world = $1 ORDER BY created_at DESC, id"
    ),
    prunable: "SELECT id FROM core.agent_threads
               WHERE finished_at IS NOT NULL AND pruned_at IS NULL AND finished_at < $1
               ORDER BY finished_at LIMIT $2
               FOR UPDATE",
    prune_checkpoints: "DELETE FROM core.agent_checkpoints
                        WHERE thread = $1 AND step < (SELECT MAX(step)
                                                      FROM core.agent_checkpoints
                                                      WHERE thread = $1)",
    prune_events: "DELETE FROM core.agent_events WHERE thread = $1",
    mark_pruned: "UPDATE core.agent_threads SET pruned_at = $2 WHERE id = $1",
    reopen_thread: "UPDATE core.agent_threads
                    SET status = 'running', finished_at = NULL, updated_at = $2
                    WHERE id = $1",
    candidate: concat!(
        "SELECT ",
        candidate_columns!(),
        " FROM core.rule_candidates WHERE id = $1"
    ),
    review_candidate: "UPDATE core.rule_candidates
                       SET status = $3, reviewer = $4, rationale = $5, reviewed_at = $6
                       WHERE id = $1 AND world = $2 AND status = 'proposed'",
    running_threads: "SELECT COUNT(*) FROM core.agent_threads
                      WHERE world = $1 AND kind = $2 AND status = 'running'",
    world_threads: concat!(
        "SELECT ",
        thread_columns!(),
        " FROM core.agent_threads WHERE world = $1 AND kind = $2
          ORDER BY created_at DESC, id LIMIT $3"
    ),
    list_keys: concat!(
        "SELECT ",
        key_columns!(),
        ", false AS found_by_previous FROM core.api_keys ORDER BY created_at, id"
    ),
    key_by_id: concat!(
        "SELECT ",
        key_columns!(),
        ", false AS found_by_previous FROM core.api_keys WHERE id = $1"
    ),
    // No secret hashes to `revoked:<id>` (hashes are hex), so a build that knows nothing of
    // `revoked_at` refuses the key too; a second revocation keeps the first time.
    revoke_key: "UPDATE core.api_keys
                 SET revoked_at = COALESCE(revoked_at, $2), secret_hash = 'revoked:' || id,
                     previous_secret_hash = NULL, previous_valid_until = NULL
                 WHERE id = $1",
    rotate_key: "UPDATE core.api_keys
                 SET previous_secret_hash = secret_hash, previous_valid_until = $3,
                     secret_hash = $2
                 WHERE id = $1 AND revoked_at IS NULL",
    touch_key: "UPDATE core.api_keys SET last_used_at = $2 WHERE id = $1",
    delete_webhook: "DELETE FROM core.webhooks WHERE world = $1 AND id = $2",
};

impl ImpactDialect for PgStore {
    const IMPACT: ImpactSql = IMPACT;
    impact_statements!();
}

/// The impact statements in PostgreSQL.
const IMPACT: ImpactSql = ImpactSql {
    contexts_table: "core.decision_contexts",
    recorded_contexts: "SELECT d.seq, d.decision_id, d.version, d.action, d.status,
                               d.matched_rules, d.caller, d.decided_at, c.context
                        FROM core.decision_contexts c
                        JOIN core.decisions d ON d.world = c.world AND d.seq = c.seq
                        WHERE c.world = $1 AND c.seq < $2
                          AND ($3::timestamptz IS NULL OR c.decided_at >= $3)
                        ORDER BY c.seq DESC LIMIT $4",
    prune_contexts: "DELETE FROM core.decision_contexts WHERE (world, seq) IN (
                         SELECT world, seq FROM core.decision_contexts WHERE decided_at < $1
                         ORDER BY decided_at LIMIT $2)",
    context_count: "SELECT COUNT(*) FROM core.decision_contexts WHERE world = $1",
    upsert_shadow: "INSERT INTO core.shadows (world, id, version, sample, started_by, started_at)
                    VALUES ($1, $2, $3, $4, $5, $6)
                    ON CONFLICT (world) DO UPDATE SET id = excluded.id,
                        version = excluded.version, sample = excluded.sample,
                        started_by = excluded.started_by, started_at = excluded.started_at",
    delete_shadow: "DELETE FROM core.shadows WHERE world = $1",
    delete_shadow_of_version: "DELETE FROM core.shadows WHERE world = $1 AND version = $2",
    shadows: "SELECT world, id, version, sample, started_by, started_at FROM core.shadows
              ORDER BY world",
    shadow: "SELECT world, id, version, sample, started_by, started_at FROM core.shadows
             WHERE world = $1 FOR UPDATE",
    put_shadow_report: "INSERT INTO core.shadow_reports
                            (shadow_id, instance, world, report, updated_at)
                        VALUES ($1, $2, $3, $4, $5)
                        ON CONFLICT (shadow_id, instance) DO UPDATE SET
                            report = excluded.report, updated_at = excluded.updated_at",
    shadow_reports: "SELECT report FROM core.shadow_reports WHERE shadow_id = $1
                     ORDER BY instance",
    delete_shadow_reports: "DELETE FROM core.shadow_reports WHERE shadow_id = $1",
    insert_replay: "INSERT INTO core.replays (id, world, version, model, since, row_limit,
                                              status, requested_by, requested_at)
                    VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8)",
    replay: "SELECT id, world, version, model, since, row_limit, status, processed, report,
                    error, requested_by, requested_at, finished_at
             FROM core.replays WHERE id = $1",
    unfinished_replays: "SELECT COUNT(*) FROM core.replays
                         WHERE world = $1 AND status IN ('queued', 'running')",
    claimable_replay: "SELECT id FROM core.replays
                       WHERE status = 'queued' OR (status = 'running' AND heartbeat_at < $1)
                       ORDER BY requested_at LIMIT 1",
    claim_replay: "UPDATE core.replays SET status = 'running', claimed_by = $2, heartbeat_at = $3
                   WHERE id = $1
                     AND (status = 'queued' OR (status = 'running' AND heartbeat_at < $4))",
    replay_progress: "UPDATE core.replays SET processed = $3, report = $4, heartbeat_at = $5
                      WHERE id = $1 AND claimed_by = $2 AND status = 'running'",
    finish_replay: "UPDATE core.replays SET status = $3, processed = $4, report = $5, error = $6,
                                            finished_at = $7, heartbeat_at = $7
                    WHERE id = $1 AND claimed_by = $2 AND status = 'running'",
    prune_replays: "DELETE FROM core.replays
                    WHERE status IN ('done', 'failed') AND finished_at < $1",
};

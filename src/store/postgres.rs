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
    PgArgumentBuffer, PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgTypeInfo, PgValueRef,
};
use sqlx::{Decode, Encode, Postgres, Type};

use super::chain::{decisions_insert, ChainedDecision, GENESIS};
use super::outbox::{source, OutboxDbRow, Stamp, OUTBOX_COLUMNS};
use super::protocol::{Dialect, Tx};
use super::records::{
    DecisionRow, DeploymentRow, Json, KeyRow, ScopeList, Time, VersionModelRow, VersionRow,
    WebhookRow, WorldHeadRow, WorldRow, WorldVersionRow, DECISION_COLUMNS,
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

/// A version with its retirement, as `VersionRow` reads it.
const VERSION_SELECT: &str =
    "SELECT v.version, v.published_at, v.published_by, r.retired_at, r.retired_by, r.reason
     FROM core.world_versions v
     LEFT JOIN core.retired_versions r ON r.world = v.world AND r.version = v.version";

/// The Postgres backend: a pool over one database.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    stamp: Arc<Stamp>,
}

impl PgStore {
    /// Connect to `url`; fails when the database cannot be reached.
    pub(super) async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Self::pool(url.parse()?, max_connections, Arc::default()).await
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

impl Dialect for PgStore {
    type Db = Postgres;

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

    async fn put_draft(
        &self,
        world: &str,
        model: &serde_json::Value,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let sql = "INSERT INTO core.worlds (slug, draft, created_at) VALUES ($1, $2, $3)
                   ON CONFLICT (slug) DO UPDATE SET draft = excluded.draft";
        let q = sqlx::query(sql).bind(world).bind(model).bind(at);
        Ok(q.execute(&self.pool).await.map(drop)?)
    }

    async fn draft(&self, world: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let sql = "SELECT draft FROM core.worlds WHERE slug = $1";
        let q = sqlx::query_scalar::<_, Option<serde_json::Value>>(sql).bind(world);
        Ok(q.fetch_optional(&self.pool).await?.flatten())
    }

    async fn ensure_world(
        tx: &mut Tx<Self>,
        world: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let sql = "INSERT INTO core.worlds (slug, created_at) VALUES ($1, $2)
                   ON CONFLICT (slug) DO NOTHING";
        let q = sqlx::query(sql).bind(world).bind(at);
        Ok(q.execute(&mut **tx).await.map(drop)?)
    }

    async fn lock_world(tx: &mut Tx<Self>, world: &str) -> Result<Option<Option<i64>>, StoreError> {
        let sql = "SELECT deployed_version FROM core.worlds WHERE slug = $1 FOR UPDATE";
        Ok(sqlx::query_scalar(sql)
            .bind(world)
            .fetch_optional(&mut **tx)
            .await?)
    }

    async fn next_version(tx: &mut Tx<Self>, world: &str) -> Result<i64, StoreError> {
        let sql = "SELECT COALESCE(MAX(version), 0) + 1 FROM core.world_versions WHERE world = $1";
        Ok(sqlx::query_scalar(sql)
            .bind(world)
            .fetch_one(&mut **tx)
            .await?)
    }

    async fn insert_version(
        tx: &mut Tx<Self>,
        world: &str,
        version: i64,
        model: &serde_json::Value,
        at: DateTime<Utc>,
        by: &str,
    ) -> Result<(), StoreError> {
        let sql =
            "INSERT INTO core.world_versions (world, version, model, published_at, published_by)
                   VALUES ($1, $2, $3, $4, $5)";
        let q = sqlx::query(sql).bind(world).bind(version).bind(model);
        Ok(q.bind(at).bind(by).execute(&mut **tx).await.map(drop)?)
    }

    async fn insert_module(
        tx: &mut Tx<Self>,
        module: &NewModule,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let sql = "INSERT INTO core.modules (hash, content, created_at) VALUES ($1, $2, $3)
                   ON CONFLICT (hash) DO NOTHING";
        let q = sqlx::query(sql).bind(&module.hash).bind(&module.content);
        Ok(q.bind(at).execute(&mut **tx).await.map(drop)?)
    }

    async fn insert_version_module(
        tx: &mut Tx<Self>,
        world: &str,
        version: i64,
        position: i32,
        module: &NewModule,
    ) -> Result<(), StoreError> {
        let sql = "INSERT INTO core.version_modules (world, version, position, action, module_hash)
                   VALUES ($1, $2, $3, $4, $5)";
        let q = sqlx::query(sql).bind(world).bind(version).bind(position);
        let q = q.bind(&module.action).bind(&module.hash);
        Ok(q.execute(&mut **tx).await.map(drop)?)
    }

    async fn version_retired_at(
        tx: &mut Tx<Self>,
        world: &str,
        version: i64,
    ) -> Result<Option<Option<DateTime<Utc>>>, StoreError> {
        let sql = "SELECT (SELECT r.retired_at FROM core.retired_versions r
                           WHERE r.world = v.world AND r.version = v.version)
                   FROM core.world_versions v WHERE v.world = $1 AND v.version = $2";
        let q = sqlx::query_scalar(sql).bind(world).bind(version);
        Ok(q.fetch_optional(&mut **tx).await?)
    }

    async fn next_deployment(tx: &mut Tx<Self>, world: &str) -> Result<i64, StoreError> {
        let sql = "SELECT COALESCE(MAX(seq), 0) + 1 FROM core.world_deployments WHERE world = $1";
        Ok(sqlx::query_scalar(sql)
            .bind(world)
            .fetch_one(&mut **tx)
            .await?)
    }

    async fn set_deployed(tx: &mut Tx<Self>, world: &str, version: i64) -> Result<(), StoreError> {
        let sql = "UPDATE core.worlds SET deployed_version = $2 WHERE slug = $1";
        let q = sqlx::query(sql).bind(world).bind(version);
        Ok(q.execute(&mut **tx).await.map(drop)?)
    }

    async fn insert_deployment(
        tx: &mut Tx<Self>,
        world: &str,
        seq: i64,
        version: i64,
        at: DateTime<Utc>,
        by: &str,
    ) -> Result<(), StoreError> {
        let sql =
            "INSERT INTO core.world_deployments (world, seq, version, deployed_at, deployed_by)
                   VALUES ($1, $2, $3, $4, $5)";
        let q = sqlx::query(sql).bind(world).bind(seq).bind(version);
        Ok(q.bind(at).bind(by).execute(&mut **tx).await.map(drop)?)
    }

    async fn insert_retirement(
        tx: &mut Tx<Self>,
        world: &str,
        version: i64,
        retired: &Retirement,
    ) -> Result<(), StoreError> {
        let sql =
            "INSERT INTO core.retired_versions (world, version, retired_at, retired_by, reason)
                   VALUES ($1, $2, $3, $4, $5)";
        let q = sqlx::query(sql)
            .bind(world)
            .bind(version)
            .bind(retired.retired_at);
        let q = q.bind(&retired.retired_by).bind(&retired.reason);
        Ok(q.execute(&mut **tx).await.map(drop)?)
    }

    async fn notify_deployments(tx: &mut Tx<Self>, world: &str) -> Result<(), StoreError> {
        // Postgres delivers a notification when (and only if) the transaction commits.
        let q = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(DEPLOYMENTS_CHANNEL)
            .bind(world);
        Ok(q.execute(&mut **tx).await.map(drop)?)
    }

    async fn world_head(
        tx: &mut Tx<Self>,
        world: &str,
    ) -> Result<Option<WorldHeadRow>, StoreError> {
        let sql = "SELECT deployed_version, draft IS NOT NULL AS has_draft
                   FROM core.worlds WHERE slug = $1";
        Ok(sqlx::query_as(sql)
            .bind(world)
            .fetch_optional(&mut **tx)
            .await?)
    }

    async fn versions(tx: &mut Tx<Self>, world: &str) -> Result<Vec<VersionRow>, StoreError> {
        let sql = format!("{VERSION_SELECT} WHERE v.world = $1 ORDER BY v.version");
        Ok(sqlx::query_as(&sql)
            .bind(world)
            .fetch_all(&mut **tx)
            .await?)
    }

    async fn deployments(tx: &mut Tx<Self>, world: &str) -> Result<Vec<DeploymentRow>, StoreError> {
        let sql = "SELECT seq, version, deployed_at, deployed_by FROM core.world_deployments
                   WHERE world = $1 ORDER BY seq";
        Ok(sqlx::query_as(sql).bind(world).fetch_all(&mut **tx).await?)
    }

    async fn version_row(
        tx: &mut Tx<Self>,
        world: &str,
        version: i64,
    ) -> Result<Option<VersionModelRow>, StoreError> {
        let select = VERSION_SELECT.replacen("SELECT", "SELECT v.model,", 1);
        let sql = format!("{select} WHERE v.world = $1 AND v.version = $2");
        let q = sqlx::query_as(&sql).bind(world).bind(version);
        Ok(q.fetch_optional(&mut **tx).await?)
    }

    async fn version_modules(
        tx: &mut Tx<Self>,
        world: &str,
        version: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let sql = "SELECT action, module_hash FROM core.version_modules
                   WHERE world = $1 AND version = $2 ORDER BY position";
        let q = sqlx::query_as(sql).bind(world).bind(version);
        Ok(q.fetch_all(&mut **tx).await?)
    }

    async fn list_worlds(&self) -> Result<Vec<WorldRow>, StoreError> {
        // COLLATE "C" sorts by bytes, as SQLite does, whatever the database's locale.
        let sql = r#"SELECT w.slug AS world, w.deployed_version,
                            (SELECT MAX(v.version) FROM core.world_versions v
                             WHERE v.world = w.slug) AS latest_version
                     FROM core.worlds w ORDER BY w.slug COLLATE "C""#;
        Ok(sqlx::query_as(sql).fetch_all(&self.pool).await?)
    }

    async fn retired(&self) -> Result<Vec<WorldVersionRow>, StoreError> {
        let sql = "SELECT world, version FROM core.retired_versions ORDER BY world, version";
        Ok(sqlx::query_as(sql).fetch_all(&self.pool).await?)
    }

    async fn deployed(&self) -> Result<Vec<WorldVersionRow>, StoreError> {
        let sql = r#"SELECT slug AS world, deployed_version AS version FROM core.worlds
                     WHERE deployed_version IS NOT NULL ORDER BY slug COLLATE "C""#;
        Ok(sqlx::query_as(sql).fetch_all(&self.pool).await?)
    }

    async fn module(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let sql = "SELECT content FROM core.modules WHERE hash = $1";
        Ok(sqlx::query_scalar(sql)
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn create_key(&self, key: &NewKey, at: DateTime<Utc>) -> Result<(), StoreError> {
        let sql = "INSERT INTO core.api_keys (id, secret_hash, world, scopes, label, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6)";
        let q = sqlx::query(sql)
            .bind(&key.id)
            .bind(&key.secret_hash)
            .bind(&key.world);
        let q = q.bind(ScopeList::of(&key.scopes)).bind(&key.label).bind(at);
        Ok(q.execute(&self.pool).await.map(drop)?)
    }

    async fn key_by_hash(&self, secret_hash: &str) -> Result<Option<KeyRow>, StoreError> {
        let sql = "SELECT id, world, scopes, label, created_at FROM core.api_keys
                   WHERE secret_hash = $1";
        let q = sqlx::query_as(sql).bind(secret_hash);
        Ok(q.fetch_optional(&self.pool).await?)
    }

    async fn has_operator_key(&self) -> Result<bool, StoreError> {
        let sql = "SELECT EXISTS (SELECT 1 FROM core.api_keys WHERE world IS NULL)";
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
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

    async fn insert_decisions(
        tx: &mut Tx<Self>,
        chunk: &[ChainedDecision],
    ) -> Result<(), StoreError> {
        let mut insert = decisions_insert::<Postgres>("core.decisions", chunk);
        Ok(insert.build().execute(&mut **tx).await.map(drop)?)
    }

    async fn set_chain_head(
        tx: &mut Tx<Self>,
        world: &str,
        seq: i64,
        hash: &str,
    ) -> Result<(), StoreError> {
        let sql = "UPDATE core.decision_chain_heads SET seq = $2, hash = $3 WHERE world = $1";
        let q = sqlx::query(sql).bind(world).bind(seq).bind(hash);
        Ok(q.execute(&mut **tx).await.map(drop)?)
    }

    async fn decisions(
        &self,
        world: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<DecisionRow>, StoreError> {
        let sql = format!(
            "SELECT {DECISION_COLUMNS} FROM core.decisions
             WHERE world = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        );
        let q = sqlx::query_as(&sql).bind(world).bind(after).bind(limit);
        Ok(q.fetch_all(&self.pool).await?)
    }

    async fn allocate_generation(
        &self,
        git_sha: &str,
        note: &str,
        at: DateTime<Utc>,
    ) -> Result<i64, StoreError> {
        let sql = "INSERT INTO core.generations (started_at, git_sha, note) VALUES ($1, $2, $3)
                   RETURNING generation";
        let q = sqlx::query_scalar(sql).bind(at).bind(git_sha).bind(note);
        Ok(q.fetch_one(&self.pool).await?)
    }

    async fn insert_event(
        tx: &mut Tx<Self>,
        e: &NewEvent,
        generation: i64,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        // The insert trigger NOTIFYs the outbox channel on commit.
        let sql = "INSERT INTO core.outbox (event_type, occurred_at, source, target, channel,
                                            generation, world, payload, idempotency_key,
                                            available_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $2)
                   ON CONFLICT (event_type, idempotency_key) DO NOTHING";
        let q = sqlx::query(sql)
            .bind(&e.event_type)
            .bind(at)
            .bind(source())
            .bind(&e.target);
        let q = q
            .bind(OUTBOX_CHANNEL)
            .bind(generation)
            .bind(&e.world)
            .bind(&e.payload);
        Ok(q.bind(&e.idempotency_key)
            .execute(&mut **tx)
            .await
            .map(drop)?)
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
        let returning: Vec<String> = OUTBOX_COLUMNS
            .split(", ")
            .map(|c| format!("o.{}", c.trim()))
            .collect();
        let sql = format!(
            "WITH due AS (
                 SELECT id FROM core.outbox
                 WHERE generation = $1 AND status = 'pending' AND available_at <= $2
                 ORDER BY id LIMIT $3
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE core.outbox o
             SET status = 'in_flight', claimed_at = $2, claimed_by = $4, attempts = o.attempts + 1
             FROM due WHERE o.id = due.id
             RETURNING {}",
            returning.join(", ")
        );
        let q = sqlx::query_as(&sql)
            .bind(generation)
            .bind(at)
            .bind(limit)
            .bind(worker);
        Ok(q.fetch_all(&self.pool).await?)
    }

    async fn lock_claimed(tx: &mut Tx<Self>, id: i64, worker: &str) -> Result<bool, StoreError> {
        let sql = "SELECT id FROM core.outbox
                   WHERE id = $1 AND status = 'in_flight' AND claimed_by = $2 FOR UPDATE";
        let q = sqlx::query_scalar::<_, i64>(sql).bind(id).bind(worker);
        Ok(q.fetch_optional(&mut **tx).await?.is_some())
    }

    async fn insert_handled(
        tx: &mut Tx<Self>,
        handler: &str,
        key: &str,
        id: i64,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let sql = "INSERT INTO core.event_handled (handler, idempotency_key, outbox_id, handled_at)
                   VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";
        let q = sqlx::query(sql).bind(handler).bind(key).bind(id).bind(at);
        Ok(q.execute(&mut **tx).await?.rows_affected() == 1)
    }

    async fn add_stat(tx: &mut Tx<Self>, d: &StatDelta) -> Result<(), StoreError> {
        let sql = "INSERT INTO core.decision_stats (world, rule, status, count)
                   VALUES ($1, $2, $3, $4)
                   ON CONFLICT (world, rule, status)
                   DO UPDATE SET count = core.decision_stats.count + excluded.count";
        let q = sqlx::query(sql)
            .bind(&d.world)
            .bind(&d.rule)
            .bind(&d.status)
            .bind(d.count);
        Ok(q.execute(&mut **tx).await.map(drop)?)
    }

    async fn mark_delivered(tx: &mut Tx<Self>, id: i64) -> Result<(), StoreError> {
        let sql = "UPDATE core.outbox SET status = 'delivered', last_error = NULL WHERE id = $1";
        Ok(sqlx::query(sql)
            .bind(id)
            .execute(&mut **tx)
            .await
            .map(drop)?)
    }

    async fn fail(
        &self,
        id: i64,
        worker: &str,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    ) -> Result<Option<String>, StoreError> {
        let sql = "UPDATE core.outbox SET
                 status = CASE WHEN $4::timestamptz IS NULL THEN 'failed' ELSE 'pending' END,
                 available_at = COALESCE($4, available_at),
                 last_error = $3,
                 failure_history = failure_history || jsonb_build_array(jsonb_build_object(
                     'attempt', attempts, 'at', $5::timestamptz, 'worker', $2::text, 'error', $3::text)),
                 first_failed_at = COALESCE(first_failed_at, $5),
                 claimed_at = NULL, claimed_by = NULL
             WHERE id = $1 AND status = 'in_flight' AND claimed_by = $2
             RETURNING status";
        let q = sqlx::query_scalar(sql).bind(id).bind(worker).bind(error);
        Ok(q.bind(retry_at).bind(at).fetch_optional(&self.pool).await?)
    }

    async fn release(&self, worker: &str, ids: &[i64]) -> Result<u64, StoreError> {
        let sql = "UPDATE core.outbox SET status = 'pending', attempts = GREATEST(attempts - 1, 0),
                       claimed_at = NULL, claimed_by = NULL
                   WHERE id = ANY($1) AND status = 'in_flight' AND claimed_by = $2";
        let q = sqlx::query(sql).bind(ids).bind(worker);
        Ok(q.execute(&self.pool).await?.rows_affected())
    }

    async fn rescue(&self, generation: i64, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        let sql = "UPDATE core.outbox SET status = 'pending',
                       last_error = 'lease expired: ' || COALESCE(claimed_by, 'unknown worker'),
                       claimed_at = NULL, claimed_by = NULL
                   WHERE generation = $1 AND status = 'in_flight' AND claimed_at < $2";
        let q = sqlx::query(sql).bind(generation).bind(cutoff);
        Ok(q.execute(&self.pool).await?.rows_affected())
    }

    async fn outbox_row(&self, id: i64) -> Result<Option<OutboxDbRow>, StoreError> {
        let sql = format!("SELECT {OUTBOX_COLUMNS} FROM core.outbox WHERE id = $1");
        Ok(sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn outbox_list(
        &self,
        status: Option<&str>,
        generation: Option<i64>,
        limit: i64,
    ) -> Result<Vec<OutboxDbRow>, StoreError> {
        let sql = format!(
            "SELECT {OUTBOX_COLUMNS} FROM core.outbox
             WHERE ($1::text IS NULL OR status = $1) AND ($2::bigint IS NULL OR generation = $2)
             ORDER BY id DESC LIMIT $3"
        );
        let q = sqlx::query_as(&sql)
            .bind(status)
            .bind(generation)
            .bind(limit);
        Ok(q.fetch_all(&self.pool).await?)
    }

    async fn replay(&self, id: i64, at: DateTime<Utc>) -> Result<u64, StoreError> {
        let sql = "UPDATE core.outbox SET status = 'pending', attempts = 0, available_at = $2,
                       last_error = NULL
                   WHERE id = $1 AND status = 'failed'";
        let q = sqlx::query(sql).bind(id).bind(at);
        Ok(q.execute(&self.pool).await?.rows_affected())
    }

    async fn adopt(&self, from: i64, to: i64) -> Result<u64, StoreError> {
        let sql = "UPDATE core.outbox SET generation = $2,
                       status = CASE WHEN status = 'in_flight' THEN 'pending' ELSE status END,
                       claimed_at = NULL, claimed_by = NULL
                   WHERE generation = $1 AND status <> 'delivered'";
        let q = sqlx::query(sql).bind(from).bind(to);
        Ok(q.execute(&self.pool).await?.rows_affected())
    }

    async fn outbox_counts(&self, generation: i64) -> Result<OutboxCounts, StoreError> {
        let sql = "SELECT
                 COUNT(*) FILTER (WHERE generation = $1 AND status = 'pending') AS pending,
                 COUNT(*) FILTER (WHERE generation = $1 AND status = 'in_flight') AS in_flight,
                 COUNT(*) FILTER (WHERE generation = $1 AND status = 'failed') AS failed,
                 COUNT(*) FILTER (WHERE generation <> $1 AND status <> 'delivered')
                     AS other_generations
             FROM core.outbox WHERE status <> 'delivered'";
        Ok(sqlx::query_as(sql)
            .bind(generation)
            .fetch_one(&self.pool)
            .await?)
    }

    async fn stats(&self, world: &str) -> Result<Vec<StatDelta>, StoreError> {
        let sql = r#"SELECT world, rule, status, count FROM core.decision_stats WHERE world = $1
                     ORDER BY rule COLLATE "C", status COLLATE "C""#;
        Ok(sqlx::query_as(sql)
            .bind(world)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn create_webhook(&self, hook: &Webhook) -> Result<(), StoreError> {
        let sql = "INSERT INTO core.webhooks (id, world, url, secret, events, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6)";
        let q = sqlx::query(sql)
            .bind(&hook.id)
            .bind(&hook.world)
            .bind(&hook.url);
        let q = q
            .bind(&hook.secret)
            .bind(hook.events.join(","))
            .bind(hook.created_at);
        Ok(q.execute(&self.pool).await.map(drop)?)
    }

    async fn webhooks(&self, world: &str) -> Result<Vec<WebhookRow>, StoreError> {
        let sql = "SELECT id, world, url, secret, events, created_at FROM core.webhooks
                   WHERE world = $1 ORDER BY id";
        Ok(sqlx::query_as(sql)
            .bind(world)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn webhook(&self, id: &str) -> Result<Option<WebhookRow>, StoreError> {
        let sql = "SELECT id, world, url, secret, events, created_at FROM core.webhooks
                   WHERE id = $1";
        Ok(sqlx::query_as(sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }
}

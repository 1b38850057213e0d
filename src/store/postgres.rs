//! All SQL for PostgreSQL: the production store, shared by every API instance, with every
//! table in schema `core`, and the `LISTEN` side of deployment notifications.
//!
//! Several instances write to one database, so every read-then-write locks a row first and
//! runs at the default READ COMMITTED isolation: a writer that waited for a lock reads what
//! the previous holder committed. Publishing and deploying lock the world's row; appending
//! decisions locks each world's chain-head row, worlds in sorted order so that two batches
//! never wait on each other in a cycle.

use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Postgres, QueryBuilder};

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::{
    db_error, db_error_or_conflict, deployed_event, extend_chain, group_by_world, insert_chunks,
    migrate_error, now, parse_json, parse_scopes, published_event, recorded_event,
    retired_conflict, retired_event, retirement, source, to_i64, to_u64, unique_modules,
    Completion, DecisionRecord, Deployment, Effect, KeyRecord, NewDecision, NewEvent, NewKey,
    NewVersion, OutboxCounts, OutboxRow, OutboxStatus, Retirement, Stamp, StatDelta, StoreError,
    VersionRecord, VersionSummary, Webhook, WorldDetail, WorldSummary, GENESIS, OUTBOX_CHANNEL,
};

// Migrations this build does not know are not an error: a rollback runs the previous build
// on the schema a newer one migrated, and expand/contract (docs/migrations.md) keeps that
// schema working for it.
static MIGRATOR: Migrator = {
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    migrator.ignore_missing = true;
    migrator
};

/// The channel `deploy` notifies on commit; the payload is the world's slug.
const DEPLOYMENTS_CHANNEL: &str = "spectral_deployments";

const DECISION_COLUMNS: &str = "seq, world, decision_id, version, action, module_hash, status, \
     matched_rules, caller, correlation_id, context_digest, decided_at, prev_hash, hash";

type DecisionRow = (
    i64,
    String,
    String,
    i64,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    DateTime<Utc>,
    String,
    String,
);

/// `model, published_at, published_by` with the retirement columns of a `LEFT JOIN`.
type VersionModelRow = (
    serde_json::Value,
    DateTime<Utc>,
    String,
    Option<DateTime<Utc>>,
    Option<String>,
    Option<String>,
);

/// `version, published_at, published_by` with the retirement columns of a `LEFT JOIN`.
type VersionRow = (
    i64,
    DateTime<Utc>,
    String,
    Option<DateTime<Utc>>,
    Option<String>,
    Option<String>,
);

/// `id, world, scopes, label, created_at` of `core.api_keys`.
type KeyRow = (String, Option<String>, Vec<String>, String, DateTime<Utc>);

/// The Postgres backend: a pool over one database.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    pub(super) stamp: Arc<Stamp>,
}

impl PgStore {
    /// Connect to `url`; fails when the database cannot be reached.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = url.parse().map_err(db_error)?;
        Self::pool(options, max_connections, Arc::default()).await
    }

    /// The decision-log writer's store: one connection of its own, opened by the caller (on
    /// the writer's thread), producing events under this store's generation.
    pub async fn log_writer(&self) -> Result<Self, StoreError> {
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
            .await
            .map_err(db_error)?;
        Ok(Self { pool, stamp })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        // sqlx holds an advisory lock while it migrates, so instances starting together apply
        // each migration once.
        MIGRATOR.run(&self.pool).await.map_err(migrate_error)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(db_error)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Listen for deployment notifications on a connection of its own, outside the pool, so a
    /// listener never takes a connection that queries need.
    pub async fn listen(&self) -> Result<Listener, StoreError> {
        self.listen_channel(DEPLOYMENTS_CHANNEL).await
    }

    /// Listen on a channel on a connection of its own.
    pub async fn listen_channel(&self, channel: &str) -> Result<Listener, StoreError> {
        let options = (*self.pool.connect_options()).clone();
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_with(options)
            .await
            .map_err(db_error)?;
        let mut inner = PgListener::connect_with(&pool).await.map_err(db_error)?;
        inner.listen(channel).await.map_err(db_error)?;
        // The listener must tell a lost connection from silence; reconnecting by itself
        // would hide the notifications lost in between.
        inner.ignore_pool_close_event(false);
        Ok(Listener { inner })
    }

    pub async fn put_draft(
        &self,
        world: &str,
        model: &serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO core.worlds (slug, draft, created_at) VALUES ($1, $2, $3)
             ON CONFLICT (slug) DO UPDATE SET draft = excluded.draft",
        )
        .bind(world)
        .bind(model)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    pub async fn draft(&self, world: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let row: Option<(Option<serde_json::Value>,)> =
            sqlx::query_as("SELECT draft FROM core.worlds WHERE slug = $1")
                .bind(world)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?;
        Ok(row.and_then(|(draft,)| draft))
    }

    pub async fn publish(&self, version: &NewVersion) -> Result<u64, StoreError> {
        let world = version.world.as_str();
        let at = now();
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        sqlx::query(
            "INSERT INTO core.worlds (slug, created_at) VALUES ($1, $2)
             ON CONFLICT (slug) DO NOTHING",
        )
        .bind(world)
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        // The world's row lock serializes publishers of one world, so no two read the same
        // latest version.
        sqlx::query("SELECT 1 FROM core.worlds WHERE slug = $1 FOR UPDATE")
            .bind(world)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        let (next,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM core.world_versions WHERE world = $1",
        )
        .bind(world)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        sqlx::query(
            "INSERT INTO core.world_versions (world, version, model, published_at, published_by)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(world)
        .bind(next)
        .bind(&version.model)
        .bind(at)
        .bind(&version.published_by)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        for module in unique_modules(&version.modules) {
            sqlx::query(
                "INSERT INTO core.modules (hash, content, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (hash) DO NOTHING",
            )
            .bind(&module.hash)
            .bind(&module.content)
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
        for (position, module) in (0_i32..).zip(&version.modules) {
            sqlx::query(
                "INSERT INTO core.version_modules (world, version, position, action, module_hash)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(world)
            .bind(next)
            .bind(position)
            .bind(&module.action)
            .bind(&module.hash)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                db_error_or_conflict(e, || {
                    format!(
                        "action '{}' appears twice in the new version of world '{world}'",
                        module.action
                    )
                })
            })?;
        }
        let number = to_u64(next, "version")?;
        insert_events(
            &mut tx,
            &[published_event(version, number)],
            self.generation(),
        )
        .await?;
        tx.commit().await.map_err(db_error)?;
        Ok(number)
    }

    pub async fn deploy(
        &self,
        world: &str,
        version: u64,
        deployed_by: &str,
    ) -> Result<Deployment, StoreError> {
        let missing = || StoreError::NotFound(format!("world '{world}' version {version}"));
        let v = to_i64(version).ok_or_else(missing)?;
        let deployed_at = now();
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        // The world's row lock serializes deployers of one world, so each deployment gets the
        // next seq and the last committed deployment is the deployed version.
        let locked: Option<(i32,)> =
            sqlx::query_as("SELECT 1 FROM core.worlds WHERE slug = $1 FOR UPDATE")
                .bind(world)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
        let exists: Option<(i32,)> =
            sqlx::query_as("SELECT 1 FROM core.world_versions WHERE world = $1 AND version = $2")
                .bind(world)
                .bind(v)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
        if locked.is_none() || exists.is_none() {
            return Err(missing());
        }
        // Retiring locks the world's row too, so this reads the last committed retirement.
        let retired: Option<(i32,)> =
            sqlx::query_as("SELECT 1 FROM core.retired_versions WHERE world = $1 AND version = $2")
                .bind(world)
                .bind(v)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
        if retired.is_some() {
            return Err(retired_conflict(world, version));
        }
        let (seq,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM core.world_deployments WHERE world = $1",
        )
        .bind(world)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        sqlx::query("UPDATE core.worlds SET deployed_version = $2 WHERE slug = $1")
            .bind(world)
            .bind(v)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        sqlx::query(
            "INSERT INTO core.world_deployments (world, seq, version, deployed_at, deployed_by)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(world)
        .bind(seq)
        .bind(v)
        .bind(deployed_at)
        .bind(deployed_by)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let deployment = Deployment {
            seq: to_u64(seq, "deployment seq")?,
            version,
            deployed_at,
            deployed_by: deployed_by.to_owned(),
        };
        insert_events(
            &mut tx,
            &[deployed_event(world, &deployment)],
            self.generation(),
        )
        .await?;
        // Postgres delivers a notification when (and only if) the transaction commits.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(DEPLOYMENTS_CHANNEL)
            .bind(world)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(deployment)
    }

    pub async fn list_worlds(&self) -> Result<Vec<WorldSummary>, StoreError> {
        // COLLATE "C" sorts by bytes, as SQLite does, whatever the database's locale.
        let rows: Vec<(String, Option<i64>, Option<i64>)> = sqlx::query_as(
            r#"SELECT w.slug, w.deployed_version,
                      (SELECT MAX(v.version) FROM core.world_versions v WHERE v.world = w.slug)
               FROM core.worlds w ORDER BY w.slug COLLATE "C""#,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.into_iter()
            .map(|(world, deployed, latest)| {
                Ok(WorldSummary {
                    world,
                    deployed_version: deployed.map(|v| to_u64(v, "version")).transpose()?,
                    latest_version: latest.map(|v| to_u64(v, "version")).transpose()?,
                })
            })
            .collect()
    }

    pub async fn world(&self, world: &str) -> Result<Option<WorldDetail>, StoreError> {
        // One snapshot for the three reads.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(db_error)?;
        let row: Option<(Option<i64>, bool)> = sqlx::query_as(
            "SELECT deployed_version, draft IS NOT NULL FROM core.worlds WHERE slug = $1",
        )
        .bind(world)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        let Some((deployed, has_draft)) = row else {
            return Ok(None);
        };
        let versions: Vec<VersionRow> = sqlx::query_as(
            "SELECT v.version, v.published_at, v.published_by, r.retired_at, r.retired_by, r.reason
             FROM core.world_versions v
             LEFT JOIN core.retired_versions r ON r.world = v.world AND r.version = v.version
             WHERE v.world = $1 ORDER BY v.version",
        )
        .bind(world)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        let deployments: Vec<(i64, i64, DateTime<Utc>, String)> = sqlx::query_as(
            "SELECT seq, version, deployed_at, deployed_by FROM core.world_deployments
             WHERE world = $1 ORDER BY seq",
        )
        .bind(world)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(Some(WorldDetail {
            world: world.to_owned(),
            deployed_version: deployed.map(|v| to_u64(v, "version")).transpose()?,
            has_draft,
            versions: versions
                .into_iter()
                .map(
                    |(version, published_at, published_by, retired_at, retired_by, reason)| {
                        Ok(VersionSummary {
                            version: to_u64(version, "version")?,
                            published_at,
                            published_by,
                            retired: retirement(retired_at, retired_by, reason),
                        })
                    },
                )
                .collect::<Result<_, StoreError>>()?,
            deployments: deployments
                .into_iter()
                .map(|(seq, version, deployed_at, deployed_by)| {
                    Ok(Deployment {
                        seq: to_u64(seq, "deployment seq")?,
                        version: to_u64(version, "version")?,
                        deployed_at,
                        deployed_by,
                    })
                })
                .collect::<Result<_, StoreError>>()?,
        }))
    }

    pub async fn version(
        &self,
        world: &str,
        version: u64,
    ) -> Result<Option<VersionRecord>, StoreError> {
        let Some(v) = to_i64(version) else {
            return Ok(None);
        };
        // A version and its modules are written in one transaction and never change, so two
        // plain reads agree without a snapshot. A retirement committed between them is
        // reported by the next read.
        let row: Option<VersionModelRow> = sqlx::query_as(
            "SELECT v.model, v.published_at, v.published_by, r.retired_at, r.retired_by, r.reason
             FROM core.world_versions v
             LEFT JOIN core.retired_versions r ON r.world = v.world AND r.version = v.version
             WHERE v.world = $1 AND v.version = $2",
        )
        .bind(world)
        .bind(v)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        let Some((model, published_at, published_by, retired_at, retired_by, reason)) = row else {
            return Ok(None);
        };
        let modules: Vec<(String, String)> = sqlx::query_as(
            "SELECT action, module_hash FROM core.version_modules
             WHERE world = $1 AND version = $2 ORDER BY position",
        )
        .bind(world)
        .bind(v)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(Some(VersionRecord {
            world: world.to_owned(),
            version,
            model,
            modules,
            published_at,
            published_by,
            retired: retirement(retired_at, retired_by, reason),
        }))
    }

    pub async fn retire(
        &self,
        world: &str,
        version: u64,
        retired_by: &str,
        reason: Option<&str>,
    ) -> Result<Retirement, StoreError> {
        let missing = || StoreError::NotFound(format!("world '{world}' version {version}"));
        let v = to_i64(version).ok_or_else(missing)?;
        let retired = Retirement {
            retired_at: now(),
            retired_by: retired_by.to_owned(),
            reason: reason.map(str::to_owned),
        };
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        // The world's row lock, as deploy takes it: no deployment commits between the check of
        // the deployed version and the insert.
        let locked: Option<(Option<i64>,)> =
            sqlx::query_as("SELECT deployed_version FROM core.worlds WHERE slug = $1 FOR UPDATE")
                .bind(world)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
        let row: Option<(Option<DateTime<Utc>>,)> = sqlx::query_as(
            "SELECT (SELECT r.retired_at FROM core.retired_versions r
                     WHERE r.world = v.world AND r.version = v.version)
             FROM core.world_versions v WHERE v.world = $1 AND v.version = $2",
        )
        .bind(world)
        .bind(v)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        let (Some((deployed,)), Some((already,))) = (locked, row) else {
            return Err(missing());
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
        sqlx::query(
            "INSERT INTO core.retired_versions (world, version, retired_at, retired_by, reason)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(world)
        .bind(v)
        .bind(retired.retired_at)
        .bind(&retired.retired_by)
        .bind(&retired.reason)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        insert_events(
            &mut tx,
            &[retired_event(world, version, &retired)],
            self.generation(),
        )
        .await?;
        // Every instance refreshes on this, as on a deployment, and stops serving the version.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(DEPLOYMENTS_CHANNEL)
            .bind(world)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(retired)
    }

    pub async fn retired(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT world, version FROM core.retired_versions ORDER BY world, version",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.into_iter()
            .map(|(world, v)| Ok((world, to_u64(v, "version")?)))
            .collect()
    }

    pub async fn module(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT content FROM core.modules WHERE hash = $1")
                .bind(hash)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?;
        Ok(row.map(|(content,)| content))
    }

    pub async fn deployed(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            r#"SELECT slug, deployed_version FROM core.worlds
               WHERE deployed_version IS NOT NULL ORDER BY slug COLLATE "C""#,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.into_iter()
            .map(|(world, v)| Ok((world, to_u64(v, "version")?)))
            .collect()
    }

    pub async fn create_key(&self, key: &NewKey) -> Result<(), StoreError> {
        let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
        sqlx::query(
            "INSERT INTO core.api_keys (id, secret_hash, world, scopes, label, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&key.id)
        .bind(&key.secret_hash)
        .bind(&key.world)
        .bind(scopes)
        .bind(&key.label)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(|e| {
            db_error_or_conflict(e, || {
                format!("api key '{}' or its secret already exists", key.id)
            })
        })?;
        Ok(())
    }

    pub async fn key_by_hash(&self, secret_hash: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT id, world, scopes, label, created_at FROM core.api_keys
                 WHERE secret_hash = $1",
        )
        .bind(secret_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.map(|(id, world, scopes, label, created_at)| {
            Ok(KeyRecord {
                id,
                world,
                scopes: parse_scopes(scopes.iter().map(String::as_str))?,
                label,
                created_at,
            })
        })
        .transpose()
    }

    pub async fn has_operator_key(&self) -> Result<bool, StoreError> {
        let (exists,): (bool,) =
            sqlx::query_as("SELECT EXISTS (SELECT 1 FROM core.api_keys WHERE world IS NULL)")
                .fetch_one(&self.pool)
                .await
                .map_err(db_error)?;
        Ok(exists)
    }

    pub async fn append_decisions(&self, decisions: &[NewDecision]) -> Result<(), StoreError> {
        if decisions.is_empty() {
            return Ok(());
        }
        let worlds = group_by_world(decisions)?;
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        for (world, batch) in worlds {
            // Make sure the head row exists, then lock it until commit: a writer on any
            // instance that reaches this point for the same world waits here, and then reads
            // the head this transaction committed.
            sqlx::query(
                "INSERT INTO core.decision_chain_heads (world, seq, hash) VALUES ($1, 0, $2)
                 ON CONFLICT (world) DO NOTHING",
            )
            .bind(world)
            .bind(GENESIS)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            let head: (i64, String) = sqlx::query_as(
                "SELECT seq, hash FROM core.decision_chain_heads WHERE world = $1 FOR UPDATE",
            )
            .bind(world)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
            let chained = extend_chain(head, batch)?;
            for chunk in insert_chunks(&chained) {
                let mut insert: QueryBuilder<Postgres> =
                    QueryBuilder::new(format!("INSERT INTO core.decisions ({DECISION_COLUMNS}) "));
                insert.push_values(chunk, |mut row, c| {
                    let d = &c.record.decision;
                    row.push_bind(c.seq)
                        .push_bind(d.world.as_str())
                        .push_bind(d.decision_id.as_str())
                        .push_bind(c.version)
                        .push_bind(d.action.as_str())
                        .push_bind(d.module_hash.as_str())
                        .push_bind(d.status.as_str())
                        .push_bind(c.matched_rules.as_str())
                        .push_bind(d.caller.as_str())
                        .push_bind(d.correlation_id.as_deref())
                        .push_bind(d.context_digest.as_str())
                        .push_bind(d.decided_at)
                        .push_bind(c.record.prev_hash.as_str())
                        .push_bind(c.record.hash.as_str());
                });
                insert.build().execute(&mut *tx).await.map_err(|e| {
                    db_error_or_conflict(e, || {
                        format!(
                            "a decision id in the batch for world '{world}' is already recorded"
                        )
                    })
                })?;
            }
            if let Some(event) = recorded_event(world, &chained) {
                insert_events(&mut tx, &[event], self.generation()).await?;
            }
            if let Some(last) = chained.last() {
                sqlx::query(
                    "UPDATE core.decision_chain_heads SET seq = $2, hash = $3 WHERE world = $1",
                )
                .bind(world)
                .bind(last.seq)
                .bind(&last.record.hash)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            }
        }
        tx.commit().await.map_err(db_error)
    }

    pub async fn decisions(
        &self,
        world: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<DecisionRecord>, StoreError> {
        // Nothing lies beyond the largest storable seq.
        let Some(after) = to_i64(after) else {
            return Ok(Vec::new());
        };
        let rows: Vec<DecisionRow> = sqlx::query_as(&format!(
            "SELECT {DECISION_COLUMNS} FROM core.decisions
             WHERE world = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ))
        .bind(world)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows.into_iter().map(decision_record).collect()
    }
}

fn decision_record(row: DecisionRow) -> Result<DecisionRecord, StoreError> {
    let (
        seq,
        world,
        decision_id,
        version,
        action,
        module_hash,
        status,
        matched_rules,
        caller,
        correlation_id,
        context_digest,
        decided_at,
        prev_hash,
        hash,
    ) = row;
    Ok(DecisionRecord {
        seq: to_u64(seq, "decision seq")?,
        decision: NewDecision {
            matched_rules: parse_json(
                &matched_rules,
                &format!("matched rules of decision '{decision_id}'"),
            )?,
            decision_id,
            world,
            version: to_u64(version, "version")?,
            action,
            module_hash,
            status,
            caller,
            correlation_id,
            context_digest,
            decided_at,
        },
        prev_hash,
        hash,
    })
}

/// Deployment notifications from Postgres `LISTEN`, on a connection of their own.
pub struct Listener {
    inner: PgListener,
}

impl Listener {
    /// The next notified world slug. A lost connection is an error even though the listener
    /// reconnects, because notifications sent meanwhile are gone and the caller must poll.
    pub async fn next(&mut self) -> Result<String, StoreError> {
        match self.inner.try_recv().await {
            Ok(Some(notification)) => Ok(notification.payload().to_owned()),
            Ok(None) => Err(StoreError::Database(
                "the notification connection was lost; notifications may have been missed".into(),
            )),
            Err(e) => Err(db_error(e)),
        }
    }

    pub async fn ping(&mut self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&mut self.inner)
            .await
            .map(drop)
            .map_err(db_error)
    }
}

// ---------------------------------------------------------------------------------------------
// The outbox.

const OUTBOX_COLUMNS: &str =
    "id, event_type, event_version, occurred_at, source, target, channel, \
     generation, world, payload, idempotency_key, trace_context, status, attempts, available_at, \
     claimed_at, claimed_by, last_error, failure_history, first_failed_at";

#[derive(sqlx::FromRow)]
struct OutboxDbRow {
    id: i64,
    event_type: String,
    event_version: i32,
    occurred_at: DateTime<Utc>,
    source: String,
    target: Option<String>,
    channel: String,
    generation: i64,
    world: Option<String>,
    payload: serde_json::Value,
    idempotency_key: String,
    trace_context: Option<String>,
    status: String,
    attempts: i32,
    available_at: DateTime<Utc>,
    claimed_at: Option<DateTime<Utc>>,
    claimed_by: Option<String>,
    last_error: Option<String>,
    failure_history: serde_json::Value,
    first_failed_at: Option<DateTime<Utc>>,
}

impl TryFrom<OutboxDbRow> for OutboxRow {
    type Error = StoreError;

    fn try_from(r: OutboxDbRow) -> Result<Self, StoreError> {
        Ok(OutboxRow {
            status: OutboxStatus::parse(&r.status)
                .ok_or_else(|| StoreError::Corrupt(format!("outbox status '{}'", r.status)))?,
            id: r.id,
            event_type: r.event_type,
            event_version: r.event_version,
            occurred_at: r.occurred_at,
            source: r.source,
            target: r.target,
            channel: r.channel,
            generation: r.generation,
            world: r.world,
            payload: r.payload,
            idempotency_key: r.idempotency_key,
            trace_context: r.trace_context,
            attempts: r.attempts,
            available_at: r.available_at,
            claimed_at: r.claimed_at,
            claimed_by: r.claimed_by,
            last_error: r.last_error,
            failure_history: r.failure_history,
            first_failed_at: r.first_failed_at,
        })
    }
}

fn rows(rows: Vec<OutboxDbRow>) -> Result<Vec<OutboxRow>, StoreError> {
    rows.into_iter().map(OutboxRow::try_from).collect()
}

/// Append events in the caller's transaction; the insert trigger NOTIFYs on commit.
async fn insert_events(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    events: &[NewEvent],
    generation: i64,
) -> Result<(), StoreError> {
    let at = now();
    for e in events {
        sqlx::query(
            "INSERT INTO core.outbox (event_type, occurred_at, source, target, channel, generation,
                                      world, payload, idempotency_key, available_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $2)
             ON CONFLICT (event_type, idempotency_key) DO NOTHING",
        )
        .bind(&e.event_type)
        .bind(at)
        .bind(source())
        .bind(&e.target)
        .bind(OUTBOX_CHANNEL)
        .bind(generation)
        .bind(&e.world)
        .bind(&e.payload)
        .bind(&e.idempotency_key)
        .execute(&mut **tx)
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

impl PgStore {
    fn generation(&self) -> i64 {
        self.stamp.generation.load(Relaxed)
    }

    pub async fn allocate_generation(&self, git_sha: &str, note: &str) -> Result<i64, StoreError> {
        let (g,): (i64,) = sqlx::query_as(
            "INSERT INTO core.generations (started_at, git_sha, note) VALUES ($1, $2, $3)
             RETURNING generation",
        )
        .bind(now())
        .bind(git_sha)
        .bind(note)
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(g)
    }

    pub async fn enqueue(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        insert_events(&mut tx, events, self.generation()).await?;
        tx.commit().await.map_err(db_error)
    }

    pub async fn claim(
        &self,
        generation: i64,
        worker: &str,
        limit: u32,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        // SKIP LOCKED is the correctness primitive: a row one claimer holds is invisible to
        // the others, so no two workers ever get the same row.
        let claimed: Vec<OutboxDbRow> = sqlx::query_as(&format!(
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
            OUTBOX_COLUMNS
                .split(", ")
                .map(|c| format!("o.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .bind(generation)
        .bind(now())
        .bind(i64::from(limit))
        .bind(worker)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        let mut claimed = rows(claimed)?;
        claimed.sort_by_key(|r| r.id);
        Ok(claimed)
    }

    pub async fn complete(
        &self,
        row: &OutboxRow,
        worker: &str,
        handler: &str,
        effect: &Effect,
    ) -> Result<Completion, StoreError> {
        let at = now();
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        // Still ours? A lease that expired gave the row to someone else.
        let owned: Option<(i64,)> = sqlx::query_as(
            "SELECT id FROM core.outbox WHERE id = $1 AND status = 'in_flight' AND claimed_by = $2
             FOR UPDATE",
        )
        .bind(row.id)
        .bind(worker)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        if owned.is_none() {
            return Ok(Completion::Lost);
        }
        let first = sqlx::query(
            "INSERT INTO core.event_handled (handler, idempotency_key, outbox_id, handled_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(handler)
        .bind(format!("{}:{}", row.event_type, row.idempotency_key))
        .bind(row.id)
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?
        .rows_affected()
            == 1;
        if first {
            match effect {
                Effect::None => {}
                Effect::Stats(deltas) => {
                    let mut sorted: Vec<&StatDelta> = deltas.iter().collect();
                    // One order for every writer, so concurrent upserts cannot deadlock.
                    sorted.sort_by(|a, b| {
                        (&a.world, &a.rule, &a.status).cmp(&(&b.world, &b.rule, &b.status))
                    });
                    for d in sorted {
                        sqlx::query(
                            "INSERT INTO core.decision_stats (world, rule, status, count)
                             VALUES ($1, $2, $3, $4)
                             ON CONFLICT (world, rule, status)
                             DO UPDATE SET count = core.decision_stats.count + excluded.count",
                        )
                        .bind(&d.world)
                        .bind(&d.rule)
                        .bind(&d.status)
                        .bind(d.count)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_error)?;
                    }
                }
                Effect::Enqueue(events) => {
                    insert_events(&mut tx, events, row.generation).await?;
                }
            }
        }
        sqlx::query("UPDATE core.outbox SET status = 'delivered', last_error = NULL WHERE id = $1")
            .bind(row.id)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(if first {
            Completion::Applied
        } else {
            Completion::Duplicate
        })
    }

    pub async fn fail(
        &self,
        row: &OutboxRow,
        worker: &str,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
    ) -> Result<Option<OutboxStatus>, StoreError> {
        let at = now();
        let status: Option<(String,)> = sqlx::query_as(
            "UPDATE core.outbox SET
                 status = CASE WHEN $4::timestamptz IS NULL THEN 'failed' ELSE 'pending' END,
                 available_at = COALESCE($4, available_at),
                 last_error = $3,
                 failure_history = failure_history || jsonb_build_array(jsonb_build_object(
                     'attempt', attempts, 'at', $5::timestamptz, 'worker', $2::text, 'error', $3::text)),
                 first_failed_at = COALESCE(first_failed_at, $5),
                 claimed_at = NULL, claimed_by = NULL
             WHERE id = $1 AND status = 'in_flight' AND claimed_by = $2
             RETURNING status",
        )
        .bind(row.id)
        .bind(worker)
        .bind(error)
        .bind(retry_at)
        .bind(at)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(status.and_then(|(s,)| OutboxStatus::parse(&s)))
    }

    pub async fn release(&self, worker: &str, ids: &[i64]) -> Result<u64, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let r = sqlx::query(
            "UPDATE core.outbox SET status = 'pending', attempts = GREATEST(attempts - 1, 0),
                 claimed_at = NULL, claimed_by = NULL
             WHERE id = ANY($1) AND status = 'in_flight' AND claimed_by = $2",
        )
        .bind(ids)
        .bind(worker)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(r.rows_affected())
    }

    pub async fn rescue(
        &self,
        generation: i64,
        lease: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let cutoff = now() - chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        let r = sqlx::query(
            "UPDATE core.outbox SET status = 'pending',
                 last_error = 'lease expired: ' || COALESCE(claimed_by, 'unknown worker'),
                 claimed_at = NULL, claimed_by = NULL
             WHERE generation = $1 AND status = 'in_flight' AND claimed_at < $2",
        )
        .bind(generation)
        .bind(cutoff)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(r.rows_affected())
    }

    pub async fn outbox_row(&self, id: i64) -> Result<Option<OutboxRow>, StoreError> {
        let row: Option<OutboxDbRow> = sqlx::query_as(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM core.outbox WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.map(OutboxRow::try_from).transpose()
    }

    pub async fn outbox_list(
        &self,
        status: Option<OutboxStatus>,
        generation: Option<i64>,
        limit: u32,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let found: Vec<OutboxDbRow> = sqlx::query_as(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM core.outbox
             WHERE ($1::text IS NULL OR status = $1) AND ($2::bigint IS NULL OR generation = $2)
             ORDER BY id DESC LIMIT $3"
        ))
        .bind(status.map(OutboxStatus::as_str))
        .bind(generation)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        rows(found)
    }

    pub async fn replay(&self, id: i64) -> Result<(), StoreError> {
        let r = sqlx::query(
            "UPDATE core.outbox SET status = 'pending', attempts = 0, available_at = $2,
                 last_error = NULL
             WHERE id = $1 AND status = 'failed'",
        )
        .bind(id)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("failed outbox row {id}")));
        }
        Ok(())
    }

    pub async fn adopt(&self, from: i64, to: i64) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "UPDATE core.outbox SET generation = $2,
                 status = CASE WHEN status = 'in_flight' THEN 'pending' ELSE status END,
                 claimed_at = NULL, claimed_by = NULL
             WHERE generation = $1 AND status <> 'delivered'",
        )
        .bind(from)
        .bind(to)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(r.rows_affected())
    }

    pub async fn outbox_counts(&self, generation: i64) -> Result<OutboxCounts, StoreError> {
        let (pending, in_flight, failed, other): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT
                 COUNT(*) FILTER (WHERE generation = $1 AND status = 'pending'),
                 COUNT(*) FILTER (WHERE generation = $1 AND status = 'in_flight'),
                 COUNT(*) FILTER (WHERE generation = $1 AND status = 'failed'),
                 COUNT(*) FILTER (WHERE generation <> $1 AND status <> 'delivered')
             FROM core.outbox WHERE status <> 'delivered'",
        )
        .bind(generation)
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(OutboxCounts {
            pending,
            in_flight,
            failed,
            other_generations: other,
        })
    }

    pub async fn stats(&self, world: &str) -> Result<Vec<StatDelta>, StoreError> {
        let found: Vec<(String, String, i64)> = sqlx::query_as(
            r#"SELECT rule, status, count FROM core.decision_stats WHERE world = $1
               ORDER BY rule COLLATE "C", status COLLATE "C""#,
        )
        .bind(world)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(found
            .into_iter()
            .map(|(rule, status, count)| StatDelta {
                world: world.to_string(),
                rule,
                status,
                count,
            })
            .collect())
    }

    pub async fn create_webhook(&self, hook: &Webhook) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO core.webhooks (id, world, url, secret, events, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&hook.id)
        .bind(&hook.world)
        .bind(&hook.url)
        .bind(&hook.secret)
        .bind(hook.events.join(","))
        .bind(hook.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error_or_conflict(e, || format!("webhook id '{}' is taken", hook.id)))?;
        Ok(())
    }

    pub async fn webhooks(&self, world: &str) -> Result<Vec<Webhook>, StoreError> {
        let found: Vec<WebhookRow> = sqlx::query_as(
            "SELECT id, world, url, secret, events, created_at FROM core.webhooks
             WHERE world = $1 ORDER BY id",
        )
        .bind(world)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(found.into_iter().map(webhook).collect())
    }

    pub async fn webhook(&self, id: &str) -> Result<Option<Webhook>, StoreError> {
        let found: Option<WebhookRow> = sqlx::query_as(
            "SELECT id, world, url, secret, events, created_at FROM core.webhooks WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(found.map(webhook))
    }
}

type WebhookRow = (String, String, String, String, String, DateTime<Utc>);

fn webhook((id, world, url, secret, events, created_at): WebhookRow) -> Webhook {
    Webhook {
        id,
        world,
        url,
        secret,
        events: events
            .split(',')
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect(),
        created_at,
    }
}

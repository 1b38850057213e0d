//! All SQL for SQLite: the embedded store, one database file (`spectral.db`) in the data
//! directory, so that the service runs with no database server to install.
//!
//! SQLite admits one writer at a time. Every write that reads first (the next version number,
//! the next deployment, a chain head) runs in a `BEGIN IMMEDIATE` transaction, which takes the
//! write lock before the read: a second writer waits (`busy_timeout`) instead of reading the
//! same head and then failing to upgrade its lock. This holds across pools and processes on
//! one file, because the lock is SQLite's own.

use std::path::Path;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{QueryBuilder, Sqlite};

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{
    db_error, db_error_or_conflict, deployed_event, extend_chain, from_micros, group_by_world,
    insert_chunks, migrate_error, now, parse_json, parse_scopes, published_event, recorded_event,
    retired_conflict, retired_event, retirement, source, to_i64, to_json_text, to_u64,
    unique_modules, Completion, DecisionRecord, Deployment, Effect, KeyRecord, NewDecision,
    NewEvent, NewKey, NewVersion, OutboxCounts, OutboxRow, OutboxStatus, Retirement, Stamp,
    StatDelta, StoreError, VersionRecord, VersionSummary, Webhook, WorldDetail, WorldSummary,
    GENESIS, OUTBOX_CHANNEL,
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

/// Starts a transaction that holds the write lock from its first statement.
const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

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
    i64,
    String,
    String,
);

/// The SQLite backend: a pool over one database file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    pub(super) stamp: Arc<Stamp>,
}

impl SqliteStore {
    /// Open (creating when missing) `spectral.db` in `data_dir`, creating the directory too.
    pub async fn open(data_dir: &Path, max_connections: u32) -> Result<Self, StoreError> {
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
    pub async fn log_writer(&self) -> Result<Self, StoreError> {
        let options = (*self.pool.connect_options())
            .clone()
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
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
            .await
            .map_err(db_error)?;
        Ok(Self { pool, stamp })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
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

    pub async fn put_draft(
        &self,
        world: &str,
        model: &serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO worlds (slug, draft, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (slug) DO UPDATE SET draft = excluded.draft",
        )
        .bind(world)
        .bind(to_json_text(model)?)
        .bind(now().timestamp_micros())
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    pub async fn draft(&self, world: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT draft FROM worlds WHERE slug = ?1")
                .bind(world)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?;
        row.and_then(|(draft,)| draft)
            .map(|text| parse_json(&text, &format!("draft of world '{world}'")))
            .transpose()
    }

    pub async fn publish(&self, version: &NewVersion) -> Result<u64, StoreError> {
        let world = version.world.as_str();
        let at = now().timestamp_micros();
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await.map_err(db_error)?;
        sqlx::query(
            "INSERT INTO worlds (slug, created_at) VALUES (?1, ?2) ON CONFLICT (slug) DO NOTHING",
        )
        .bind(world)
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let (next,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM world_versions WHERE world = ?1",
        )
        .bind(world)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        sqlx::query(
            "INSERT INTO world_versions (world, version, model, published_at, published_by)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(world)
        .bind(next)
        .bind(to_json_text(&version.model)?)
        .bind(at)
        .bind(&version.published_by)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        for module in unique_modules(&version.modules) {
            sqlx::query(
                "INSERT INTO modules (hash, content, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (hash) DO NOTHING",
            )
            .bind(&module.hash)
            .bind(&module.content)
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
        for (position, module) in (0_i64..).zip(&version.modules) {
            sqlx::query(
                "INSERT INTO version_modules (world, version, position, action, module_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
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
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await.map_err(db_error)?;
        let exists: Option<(i64,)> =
            sqlx::query_as("SELECT 1 FROM world_versions WHERE world = ?1 AND version = ?2")
                .bind(world)
                .bind(v)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
        if exists.is_none() {
            return Err(missing());
        }
        let retired: Option<(i64,)> =
            sqlx::query_as("SELECT 1 FROM retired_versions WHERE world = ?1 AND version = ?2")
                .bind(world)
                .bind(v)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
        if retired.is_some() {
            return Err(retired_conflict(world, version));
        }
        let (seq,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM world_deployments WHERE world = ?1",
        )
        .bind(world)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        sqlx::query("UPDATE worlds SET deployed_version = ?2 WHERE slug = ?1")
            .bind(world)
            .bind(v)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        sqlx::query(
            "INSERT INTO world_deployments (world, seq, version, deployed_at, deployed_by)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(world)
        .bind(seq)
        .bind(v)
        .bind(deployed_at.timestamp_micros())
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
        tx.commit().await.map_err(db_error)?;
        Ok(deployment)
    }

    pub async fn list_worlds(&self) -> Result<Vec<WorldSummary>, StoreError> {
        let rows: Vec<(String, Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT w.slug, w.deployed_version,
                    (SELECT MAX(v.version) FROM world_versions v WHERE v.world = w.slug)
             FROM worlds w ORDER BY w.slug",
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
        // One read transaction, so the three reads see one snapshot.
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let row: Option<(Option<i64>, bool)> = sqlx::query_as(
            "SELECT deployed_version, draft IS NOT NULL FROM worlds WHERE slug = ?1",
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
             FROM world_versions v
             LEFT JOIN retired_versions r ON r.world = v.world AND r.version = v.version
             WHERE v.world = ?1 ORDER BY v.version",
        )
        .bind(world)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        let deployments: Vec<(i64, i64, i64, String)> = sqlx::query_as(
            "SELECT seq, version, deployed_at, deployed_by FROM world_deployments
             WHERE world = ?1 ORDER BY seq",
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
                .map(|(version, at, by, retired_at, retired_by, reason)| {
                    Ok(VersionSummary {
                        version: to_u64(version, "version")?,
                        published_at: from_micros(at)?,
                        published_by: by,
                        retired: retired_from(retired_at, retired_by, reason)?,
                    })
                })
                .collect::<Result<_, StoreError>>()?,
            deployments: deployments
                .into_iter()
                .map(|(seq, version, at, by)| {
                    Ok(Deployment {
                        seq: to_u64(seq, "deployment seq")?,
                        version: to_u64(version, "version")?,
                        deployed_at: from_micros(at)?,
                        deployed_by: by,
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
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let row: Option<VersionModelRow> = sqlx::query_as(
            "SELECT v.model, v.published_at, v.published_by, r.retired_at, r.retired_by, r.reason
                 FROM world_versions v
                 LEFT JOIN retired_versions r ON r.world = v.world AND r.version = v.version
                 WHERE v.world = ?1 AND v.version = ?2",
        )
        .bind(world)
        .bind(v)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        let Some((model, published_at, published_by, retired_at, retired_by, reason)) = row else {
            return Ok(None);
        };
        let modules: Vec<(String, String)> = sqlx::query_as(
            "SELECT action, module_hash FROM version_modules
             WHERE world = ?1 AND version = ?2 ORDER BY position",
        )
        .bind(world)
        .bind(v)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok(Some(VersionRecord {
            world: world.to_owned(),
            version,
            model: parse_json(
                &model,
                &format!("model of world '{world}' version {version}"),
            )?,
            modules,
            published_at: from_micros(published_at)?,
            published_by,
            retired: retired_from(retired_at, retired_by, reason)?,
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
        // The write lock from the first statement: no deploy interleaves between the check of
        // the deployed version and the insert.
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await.map_err(db_error)?;
        let row: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT w.deployed_version,
                    (SELECT r.retired_at FROM retired_versions r
                     WHERE r.world = v.world AND r.version = v.version)
             FROM world_versions v JOIN worlds w ON w.slug = v.world
             WHERE v.world = ?1 AND v.version = ?2",
        )
        .bind(world)
        .bind(v)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        let Some((deployed, already)) = row else {
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
            "INSERT INTO retired_versions (world, version, retired_at, retired_by, reason)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(world)
        .bind(v)
        .bind(retired.retired_at.timestamp_micros())
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
        tx.commit().await.map_err(db_error)?;
        Ok(retired)
    }

    pub async fn retired(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT world, version FROM retired_versions ORDER BY world, version")
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
        rows.into_iter()
            .map(|(world, v)| Ok((world, to_u64(v, "version")?)))
            .collect()
    }

    pub async fn module(&self, hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row: Option<(Vec<u8>,)> = sqlx::query_as("SELECT content FROM modules WHERE hash = ?1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(row.map(|(content,)| content))
    }

    pub async fn deployed(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT slug, deployed_version FROM worlds
             WHERE deployed_version IS NOT NULL ORDER BY slug",
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
            "INSERT INTO api_keys (id, secret_hash, world, scopes, label, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&key.id)
        .bind(&key.secret_hash)
        .bind(&key.world)
        .bind(scopes.join(","))
        .bind(&key.label)
        .bind(now().timestamp_micros())
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
        let row: Option<(String, Option<String>, String, String, i64)> = sqlx::query_as(
            "SELECT id, world, scopes, label, created_at FROM api_keys WHERE secret_hash = ?1",
        )
        .bind(secret_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.map(|(id, world, scopes, label, created_at)| {
            Ok(KeyRecord {
                id,
                world,
                scopes: parse_scopes(scopes.split(','))?,
                label,
                created_at: from_micros(created_at)?,
            })
        })
        .transpose()
    }

    pub async fn has_operator_key(&self) -> Result<bool, StoreError> {
        let (exists,): (bool,) =
            sqlx::query_as("SELECT EXISTS (SELECT 1 FROM api_keys WHERE world IS NULL)")
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
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await.map_err(db_error)?;
        for (world, batch) in worlds {
            let head: Option<(i64, String)> =
                sqlx::query_as("SELECT seq, hash FROM decision_chain_heads WHERE world = ?1")
                    .bind(world)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_error)?;
            let head = head.unwrap_or_else(|| (0, GENESIS.to_owned()));
            let chained = extend_chain(head, batch)?;
            for chunk in insert_chunks(&chained) {
                let mut insert: QueryBuilder<Sqlite> =
                    QueryBuilder::new(format!("INSERT INTO decisions ({DECISION_COLUMNS}) "));
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
                        .push_bind(d.decided_at.timestamp_micros())
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
                    "INSERT INTO decision_chain_heads (world, seq, hash) VALUES (?1, ?2, ?3)
                     ON CONFLICT (world) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                )
                .bind(world)
                .bind(last.seq)
                .bind(&last.record.hash)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            }
        }
        tx.commit().await.map_err(db_error)?;
        Ok(())
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
            "SELECT {DECISION_COLUMNS} FROM decisions
             WHERE world = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
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
            decided_at: from_micros(decided_at)?,
        },
        prev_hash,
        hash,
    })
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
    event_version: i64,
    occurred_at: i64,
    source: String,
    target: Option<String>,
    channel: String,
    generation: i64,
    world: Option<String>,
    payload: String,
    idempotency_key: String,
    trace_context: Option<String>,
    status: String,
    attempts: i64,
    available_at: i64,
    claimed_at: Option<i64>,
    claimed_by: Option<String>,
    last_error: Option<String>,
    failure_history: String,
    first_failed_at: Option<i64>,
}

impl TryFrom<OutboxDbRow> for OutboxRow {
    type Error = StoreError;

    fn try_from(r: OutboxDbRow) -> Result<Self, StoreError> {
        Ok(OutboxRow {
            status: OutboxStatus::parse(&r.status)
                .ok_or_else(|| StoreError::Corrupt(format!("outbox status '{}'", r.status)))?,
            id: r.id,
            event_type: r.event_type,
            event_version: i32::try_from(r.event_version).unwrap_or(i32::MAX),
            occurred_at: from_micros(r.occurred_at)?,
            source: r.source,
            target: r.target,
            channel: r.channel,
            generation: r.generation,
            world: r.world,
            payload: parse_json(&r.payload, "outbox payload")?,
            idempotency_key: r.idempotency_key,
            trace_context: r.trace_context,
            attempts: i32::try_from(r.attempts).unwrap_or(i32::MAX),
            available_at: from_micros(r.available_at)?,
            claimed_at: r.claimed_at.map(from_micros).transpose()?,
            claimed_by: r.claimed_by,
            last_error: r.last_error,
            failure_history: parse_json(&r.failure_history, "outbox failure history")?,
            first_failed_at: r.first_failed_at.map(from_micros).transpose()?,
        })
    }
}

fn rows(rows: Vec<OutboxDbRow>) -> Result<Vec<OutboxRow>, StoreError> {
    rows.into_iter().map(OutboxRow::try_from).collect()
}

/// Append events in the caller's transaction.
async fn insert_events(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    events: &[NewEvent],
    generation: i64,
) -> Result<(), StoreError> {
    let at = now().timestamp_micros();
    for e in events {
        sqlx::query(
            "INSERT INTO outbox (event_type, occurred_at, source, target, channel, generation,
                                 world, payload, idempotency_key, available_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?2)
             ON CONFLICT (event_type, idempotency_key) DO NOTHING",
        )
        .bind(&e.event_type)
        .bind(at)
        .bind(source())
        .bind(&e.target)
        .bind(OUTBOX_CHANNEL)
        .bind(generation)
        .bind(&e.world)
        .bind(to_json_text(&e.payload)?)
        .bind(&e.idempotency_key)
        .execute(&mut **tx)
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

impl SqliteStore {
    fn generation(&self) -> i64 {
        self.stamp.generation.load(Relaxed)
    }

    pub async fn allocate_generation(&self, git_sha: &str, note: &str) -> Result<i64, StoreError> {
        let (g,): (i64,) = sqlx::query_as(
            "INSERT INTO generations (started_at, git_sha, note) VALUES (?1, ?2, ?3)
             RETURNING generation",
        )
        .bind(now().timestamp_micros())
        .bind(git_sha)
        .bind(note)
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(g)
    }

    pub async fn enqueue(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await.map_err(db_error)?;
        insert_events(&mut tx, events, self.generation()).await?;
        tx.commit().await.map_err(db_error)
    }

    pub async fn claim(
        &self,
        generation: i64,
        worker: &str,
        limit: u32,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        // SQLite has one writer at a time: the UPDATE … RETURNING inside BEGIN IMMEDIATE is
        // the claim, and no other claimer can interleave with it.
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await.map_err(db_error)?;
        let claimed: Vec<OutboxDbRow> = sqlx::query_as(&format!(
            "UPDATE outbox
             SET status = 'in_flight', claimed_at = ?2, claimed_by = ?4, attempts = attempts + 1
             WHERE id IN (
                 SELECT id FROM outbox
                 WHERE generation = ?1 AND status = 'pending' AND available_at <= ?2
                 ORDER BY id LIMIT ?3
             )
             RETURNING {OUTBOX_COLUMNS}"
        ))
        .bind(generation)
        .bind(now().timestamp_micros())
        .bind(i64::from(limit))
        .bind(worker)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
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
        let at = now().timestamp_micros();
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await.map_err(db_error)?;
        let owned: Option<(i64,)> = sqlx::query_as(
            "SELECT id FROM outbox WHERE id = ?1 AND status = 'in_flight' AND claimed_by = ?2",
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
            "INSERT INTO event_handled (handler, idempotency_key, outbox_id, handled_at)
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
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
                    for d in deltas {
                        sqlx::query(
                            "INSERT INTO decision_stats (world, rule, status, count)
                             VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT (world, rule, status)
                             DO UPDATE SET count = count + excluded.count",
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
                Effect::Enqueue(events) => insert_events(&mut tx, events, row.generation).await?,
            }
        }
        sqlx::query("UPDATE outbox SET status = 'delivered', last_error = NULL WHERE id = ?1")
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
        let at = now().timestamp_micros();
        let status: Option<(String,)> = sqlx::query_as(
            "UPDATE outbox SET
                 status = CASE WHEN ?4 IS NULL THEN 'failed' ELSE 'pending' END,
                 available_at = COALESCE(?4, available_at),
                 last_error = ?3,
                 failure_history = json_insert(failure_history, '$[#]', json_object(
                     'attempt', attempts, 'at', strftime('%Y-%m-%dT%H:%M:%fZ', ?5 / 1000000.0, 'unixepoch'),
                     'worker', ?2, 'error', ?3)),
                 first_failed_at = COALESCE(first_failed_at, ?5),
                 claimed_at = NULL, claimed_by = NULL
             WHERE id = ?1 AND status = 'in_flight' AND claimed_by = ?2
             RETURNING status",
        )
        .bind(row.id)
        .bind(worker)
        .bind(error)
        .bind(retry_at.map(|t| t.timestamp_micros()))
        .bind(at)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(status.and_then(|(s,)| OutboxStatus::parse(&s)))
    }

    pub async fn release(&self, worker: &str, ids: &[i64]) -> Result<u64, StoreError> {
        let mut released = 0;
        for id in ids {
            let r = sqlx::query(
                "UPDATE outbox SET status = 'pending', attempts = MAX(attempts - 1, 0),
                     claimed_at = NULL, claimed_by = NULL
                 WHERE id = ?1 AND status = 'in_flight' AND claimed_by = ?2",
            )
            .bind(id)
            .bind(worker)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
            released += r.rows_affected();
        }
        Ok(released)
    }

    pub async fn rescue(
        &self,
        generation: i64,
        lease: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let cutoff =
            now().timestamp_micros() - i64::try_from(lease.as_micros()).unwrap_or(i64::MAX);
        let r = sqlx::query(
            "UPDATE outbox SET status = 'pending',
                 last_error = 'lease expired: ' || COALESCE(claimed_by, 'unknown worker'),
                 claimed_at = NULL, claimed_by = NULL
             WHERE generation = ?1 AND status = 'in_flight' AND claimed_at < ?2",
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
            "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id = ?1"
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
            "SELECT {OUTBOX_COLUMNS} FROM outbox
             WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR generation = ?2)
             ORDER BY id DESC LIMIT ?3"
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
            "UPDATE outbox SET status = 'pending', attempts = 0, available_at = ?2, last_error = NULL
             WHERE id = ?1 AND status = 'failed'",
        )
        .bind(id)
        .bind(now().timestamp_micros())
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
            "UPDATE outbox SET generation = ?2,
                 status = CASE WHEN status = 'in_flight' THEN 'pending' ELSE status END,
                 claimed_at = NULL, claimed_by = NULL
             WHERE generation = ?1 AND status <> 'delivered'",
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
                 COALESCE(SUM(generation = ?1 AND status = 'pending'), 0),
                 COALESCE(SUM(generation = ?1 AND status = 'in_flight'), 0),
                 COALESCE(SUM(generation = ?1 AND status = 'failed'), 0),
                 COALESCE(SUM(generation <> ?1), 0)
             FROM outbox WHERE status <> 'delivered'",
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
            "SELECT rule, status, count FROM decision_stats WHERE world = ?1 ORDER BY rule, status",
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
            "INSERT INTO webhooks (id, world, url, secret, events, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&hook.id)
        .bind(&hook.world)
        .bind(&hook.url)
        .bind(&hook.secret)
        .bind(hook.events.join(","))
        .bind(hook.created_at.timestamp_micros())
        .execute(&self.pool)
        .await
        .map_err(|e| db_error_or_conflict(e, || format!("webhook id '{}' is taken", hook.id)))?;
        Ok(())
    }

    pub async fn webhooks(&self, world: &str) -> Result<Vec<Webhook>, StoreError> {
        let found: Vec<WebhookRow> = sqlx::query_as(
            "SELECT id, world, url, secret, events, created_at FROM webhooks
             WHERE world = ?1 ORDER BY id",
        )
        .bind(world)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        found.into_iter().map(webhook).collect()
    }

    pub async fn webhook(&self, id: &str) -> Result<Option<Webhook>, StoreError> {
        let found: Option<WebhookRow> = sqlx::query_as(
            "SELECT id, world, url, secret, events, created_at FROM webhooks WHERE id = ?1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        found.map(webhook).transpose()
    }
}

type WebhookRow = (String, String, String, String, String, i64);

/// `model, published_at, published_by` with the retirement columns of a `LEFT JOIN`.
type VersionModelRow = (
    String,
    i64,
    String,
    Option<i64>,
    Option<String>,
    Option<String>,
);

/// `version, published_at, published_by` with the retirement columns of a `LEFT JOIN`.
type VersionRow = (
    i64,
    i64,
    String,
    Option<i64>,
    Option<String>,
    Option<String>,
);

fn retired_from(
    at: Option<i64>,
    by: Option<String>,
    reason: Option<String>,
) -> Result<Option<Retirement>, StoreError> {
    Ok(retirement(at.map(from_micros).transpose()?, by, reason))
}

fn webhook(
    (id, world, url, secret, events, created_at): WebhookRow,
) -> Result<Webhook, StoreError> {
    Ok(Webhook {
        id,
        world,
        url,
        secret,
        events: events
            .split(',')
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect(),
        created_at: from_micros(created_at)?,
    })
}

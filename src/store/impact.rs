//! What impact analysis keeps (docs/impact.md): the contexts of decisions of worlds that keep
//! them, each world's shadow version with the difference reports of the instances evaluating
//! it, and replays of recorded contexts. The statements' Rust side is written once
//! ([`impact_statements`]), with each dialect's text in an [`ImpactSql`]; the operations'
//! protocols follow it.
//!
//! Contexts live beside the chain, never in it: a record's hash covers the context's digest,
//! not its text, so pruning contexts by age leaves every chain verifiable.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::chain::ChainedDecision;
use super::protocol::{Dialect, Tx};
use super::records::{bigint, convert, now, to_i64, to_u64, MatchedRule, Time};
use super::StoreError;

/// The text of the impact statements in one dialect; parameters are numbered in the order of
/// the method's arguments.
pub(crate) struct ImpactSql {
    /// The table contexts are inserted into.
    pub contexts_table: &'static str,
    /// `(world, before_seq, since, limit)` → [`RecordedContextRow`]s, newest first.
    pub recorded_contexts: &'static str,
    /// `(decided before, limit)` → deleted rows, oldest first.
    pub prune_contexts: &'static str,
    /// `(world)` → the number of contexts kept.
    pub context_count: &'static str,
    /// `(world, id, version, sample, by, at)`: start or replace the world's shadow.
    pub upsert_shadow: &'static str,
    /// `(world)` → deleted rows.
    pub delete_shadow: &'static str,
    /// `(world, version)` → deleted rows.
    pub delete_shadow_of_version: &'static str,
    /// `()` → [`ShadowRow`]s.
    pub shadows: &'static str,
    /// `(world)` → [`ShadowRow`].
    pub shadow: &'static str,
    /// `(shadow id, instance, world, report, at)`: upsert.
    pub put_shadow_report: &'static str,
    /// `(shadow id)` → report texts.
    pub shadow_reports: &'static str,
    /// `(shadow id)` → deleted rows.
    pub delete_shadow_reports: &'static str,
    /// `(id, world, version, model, since, limit, by, at)`.
    pub insert_replay: &'static str,
    /// `(id)` → [`ReplayRow`].
    pub replay: &'static str,
    /// `(world)` → replays queued or running.
    pub unfinished_replays: &'static str,
    /// `(stale before)` → the id of the oldest replay to take.
    pub claimable_replay: &'static str,
    /// `(id, worker, at, stale before)` → rows claimed.
    pub claim_replay: &'static str,
    /// `(id, worker, processed, report, at)` → rows updated.
    pub replay_progress: &'static str,
    /// `(id, worker, status, processed, report, error, at)` → rows updated.
    pub finish_replay: &'static str,
    /// `(finished before)` → deleted rows.
    pub prune_replays: &'static str,
}

/// A world's shadow: a published version evaluated beside the deployed one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShadowRecord {
    pub world: String,
    /// Names this shadow's report; a new shadow of the same world starts a new one.
    pub id: String,
    pub version: u64,
    /// The share of decisions also evaluated against the shadow, 0.0 to 1.0.
    pub sample: f64,
    pub started_by: String,
    pub started_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct ShadowRow {
    world: String,
    id: String,
    version: i64,
    sample: f64,
    started_by: String,
    started_at: Time,
}

impl TryFrom<ShadowRow> for ShadowRecord {
    type Error = StoreError;
    fn try_from(r: ShadowRow) -> Result<Self, StoreError> {
        Ok(Self {
            world: r.world,
            id: r.id,
            version: to_u64(r.version, "shadow version")?,
            sample: r.sample,
            started_by: r.started_by,
            started_at: r.started_at.0,
        })
    }
}

/// A recorded decision with the context it was decided on.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedContext {
    pub seq: u64,
    pub decision_id: String,
    pub version: u64,
    pub action: String,
    pub status: String,
    pub matched_rules: Vec<MatchedRule>,
    pub caller: String,
    pub decided_at: DateTime<Utc>,
    /// The context's JSON text, as the caller sent it.
    pub context: String,
}

#[derive(sqlx::FromRow)]
pub(crate) struct RecordedContextRow {
    seq: i64,
    decision_id: String,
    version: i64,
    action: String,
    status: String,
    matched_rules: String,
    caller: String,
    decided_at: Time,
    context: String,
}

impl TryFrom<RecordedContextRow> for RecordedContext {
    type Error = StoreError;
    fn try_from(r: RecordedContextRow) -> Result<Self, StoreError> {
        Ok(Self {
            seq: to_u64(r.seq, "decision seq")?,
            matched_rules: serde_json::from_str(&r.matched_rules).map_err(|e| {
                StoreError::Corrupt(format!("decision '{}' matched rules: {e}", r.decision_id))
            })?,
            decision_id: r.decision_id,
            version: to_u64(r.version, "decision version")?,
            action: r.action,
            status: r.status,
            caller: r.caller,
            decided_at: r.decided_at.0,
            context: r.context,
        })
    }
}

/// A replay to queue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewReplay {
    pub id: String,
    pub world: String,
    /// The published version replayed; `None` for the draft in `model`.
    pub version: Option<u64>,
    /// The model replayed (the version's or the draft's), as JSON text.
    pub model: String,
    pub since: Option<DateTime<Utc>>,
    pub limit: u64,
    pub requested_by: String,
}

/// A replay and how far it got.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayRecord {
    pub id: String,
    pub world: String,
    /// The version replayed; `null` for a draft.
    pub version: Option<u64>,
    #[serde(skip)]
    pub model: String,
    pub since: Option<DateTime<Utc>>,
    pub limit: u64,
    /// `queued`, `running`, `done` or `failed`.
    pub status: String,
    /// Recorded decisions evaluated so far.
    pub processed: u64,
    /// The difference report so far (JSON), as the service wrote it.
    #[serde(skip)]
    pub report: Option<String>,
    pub error: Option<String>,
    pub requested_by: String,
    pub requested_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct ReplayRow {
    id: String,
    world: String,
    version: Option<i64>,
    model: String,
    since: Option<Time>,
    row_limit: i64,
    status: String,
    processed: i64,
    report: Option<String>,
    error: Option<String>,
    requested_by: String,
    requested_at: Time,
    finished_at: Option<Time>,
}

impl TryFrom<ReplayRow> for ReplayRecord {
    type Error = StoreError;
    fn try_from(r: ReplayRow) -> Result<Self, StoreError> {
        Ok(Self {
            id: r.id,
            world: r.world,
            version: r.version.map(|v| to_u64(v, "replay version")).transpose()?,
            model: r.model,
            since: r.since.map(|t| t.0),
            limit: to_u64(r.row_limit, "replay limit")?,
            status: r.status,
            processed: to_u64(r.processed, "replay progress")?,
            report: r.report,
            error: r.error,
            requested_by: r.requested_by,
            requested_at: r.requested_at.0,
            finished_at: r.finished_at.map(|t| t.0),
        })
    }
}

/// The `INSERT` of the contexts kept with a chunk of chained decisions, for either dialect;
/// `None` when none of them keeps its context.
pub(crate) fn contexts_insert<'a, DB>(
    table: &str,
    chunk: &'a [ChainedDecision],
) -> Option<sqlx::QueryBuilder<'a, DB>>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Time: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let kept: Vec<(&ChainedDecision, &str)> = chunk
        .iter()
        .filter_map(|c| c.record.decision.context.as_deref().map(|t| (c, t)))
        .collect();
    if kept.is_empty() {
        return None;
    }
    let mut insert = sqlx::QueryBuilder::default();
    insert.push(format_args!(
        "INSERT INTO {table} (world, seq, decided_at, context) "
    ));
    insert.push_values(kept, |mut row, (c, text)| {
        let d = &c.record.decision;
        row.push_bind(d.world.as_str())
            .push_bind(c.seq)
            .push_bind(Time(d.decided_at))
            .push_bind(text);
    });
    Some(insert)
}

/// The impact statements of one database.
pub(crate) trait ImpactDialect: Dialect {
    const IMPACT: ImpactSql;

    async fn insert_contexts(
        tx: &mut Tx<Self>,
        chunk: &[ChainedDecision],
    ) -> Result<(), StoreError>;
    async fn recorded_contexts(
        &self,
        world: &str,
        before_seq: i64,
        since: Option<DateTime<Utc>>,
        limit: i64,
    ) -> Result<Vec<RecordedContextRow>, StoreError>;
    async fn prune_contexts(&self, before: DateTime<Utc>, limit: i64) -> Result<u64, StoreError>;
    async fn context_count(&self, world: &str) -> Result<i64, StoreError>;
    async fn upsert_shadow(tx: &mut Tx<Self>, s: &ShadowRecord) -> Result<(), StoreError>;
    async fn delete_shadow(tx: &mut Tx<Self>, world: &str) -> Result<u64, StoreError>;
    async fn delete_shadow_of_version(
        tx: &mut Tx<Self>,
        world: &str,
        version: i64,
    ) -> Result<u64, StoreError>;
    async fn shadows(&self) -> Result<Vec<ShadowRow>, StoreError>;
    async fn shadow_in(tx: &mut Tx<Self>, world: &str) -> Result<Option<ShadowRow>, StoreError>;
    async fn put_shadow_report(
        &self,
        shadow_id: &str,
        instance: &str,
        world: &str,
        report: &str,
    ) -> Result<(), StoreError>;
    async fn shadow_reports(&self, shadow_id: &str) -> Result<Vec<String>, StoreError>;
    async fn delete_shadow_reports(tx: &mut Tx<Self>, shadow_id: &str) -> Result<(), StoreError>;
    async fn insert_replay(
        tx: &mut Tx<Self>,
        r: &NewReplay,
        version: Option<i64>,
        limit: i64,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    async fn replay_row(&self, id: &str) -> Result<Option<ReplayRow>, StoreError>;
    async fn unfinished_replays(tx: &mut Tx<Self>, world: &str) -> Result<i64, StoreError>;
    async fn claimable_replay(
        &self,
        stale_before: DateTime<Utc>,
    ) -> Result<Option<String>, StoreError>;
    async fn claim_replay(
        &self,
        id: &str,
        worker: &str,
        at: DateTime<Utc>,
        stale_before: DateTime<Utc>,
    ) -> Result<u64, StoreError>;
    async fn replay_progress(
        &self,
        id: &str,
        worker: &str,
        processed: i64,
        report: &str,
    ) -> Result<u64, StoreError>;
    #[expect(clippy::too_many_arguments, reason = "one bound value per column")]
    async fn finish_replay(
        &self,
        id: &str,
        worker: &str,
        status: &str,
        processed: i64,
        report: Option<&str>,
        error: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError>;
    async fn prune_replays(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
}

/// The impact statements' methods of `impl ImpactDialect for …`, over `Self::IMPACT` and a
/// `pool` field, like `shared_statements!`.
macro_rules! impact_statements {
    () => {
        async fn insert_contexts(
            tx: &mut Tx<Self>,
            chunk: &[ChainedDecision],
        ) -> Result<(), StoreError> {
            let Some(mut insert) = contexts_insert::<Self::Db>(Self::IMPACT.contexts_table, chunk)
            else {
                return Ok(());
            };
            Ok(insert.build().execute(&mut **tx).await.map(drop)?)
        }

        async fn recorded_contexts(
            &self,
            world: &str,
            before_seq: i64,
            since: Option<DateTime<Utc>>,
            limit: i64,
        ) -> Result<Vec<RecordedContextRow>, StoreError> {
            let q = sqlx::query_as(Self::IMPACT.recorded_contexts)
                .bind(world)
                .bind(before_seq);
            let q = q.bind(since.map(Time)).bind(limit);
            Ok(q.fetch_all(&self.pool).await?)
        }

        async fn prune_contexts(
            &self,
            before: DateTime<Utc>,
            limit: i64,
        ) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::IMPACT.prune_contexts)
                .bind(Time(before))
                .bind(limit);
            Ok(q.execute(&self.pool).await?.rows_affected())
        }

        async fn context_count(&self, world: &str) -> Result<i64, StoreError> {
            let q = sqlx::query_scalar(Self::IMPACT.context_count).bind(world);
            Ok(q.fetch_one(&self.pool).await?)
        }

        async fn upsert_shadow(tx: &mut Tx<Self>, s: &ShadowRecord) -> Result<(), StoreError> {
            let version = super::records::bigint(s.version, "shadow version")?;
            let q = sqlx::query(Self::IMPACT.upsert_shadow)
                .bind(&s.world)
                .bind(&s.id)
                .bind(version);
            let q = q
                .bind(s.sample)
                .bind(&s.started_by)
                .bind(Time(s.started_at));
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn delete_shadow(tx: &mut Tx<Self>, world: &str) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::IMPACT.delete_shadow).bind(world);
            Ok(q.execute(&mut **tx).await?.rows_affected())
        }

        async fn delete_shadow_of_version(
            tx: &mut Tx<Self>,
            world: &str,
            version: i64,
        ) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::IMPACT.delete_shadow_of_version)
                .bind(world)
                .bind(version);
            Ok(q.execute(&mut **tx).await?.rows_affected())
        }

        async fn shadows(&self) -> Result<Vec<ShadowRow>, StoreError> {
            Ok(sqlx::query_as(Self::IMPACT.shadows)
                .fetch_all(&self.pool)
                .await?)
        }

        async fn shadow_in(
            tx: &mut Tx<Self>,
            world: &str,
        ) -> Result<Option<ShadowRow>, StoreError> {
            let q = sqlx::query_as(Self::IMPACT.shadow).bind(world);
            Ok(q.fetch_optional(&mut **tx).await?)
        }

        async fn put_shadow_report(
            &self,
            shadow_id: &str,
            instance: &str,
            world: &str,
            report: &str,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::IMPACT.put_shadow_report)
                .bind(shadow_id)
                .bind(instance);
            let q = q.bind(world).bind(report).bind(Time(super::records::now()));
            Ok(q.execute(&self.pool).await.map(drop)?)
        }

        async fn shadow_reports(&self, shadow_id: &str) -> Result<Vec<String>, StoreError> {
            let q = sqlx::query_scalar(Self::IMPACT.shadow_reports).bind(shadow_id);
            Ok(q.fetch_all(&self.pool).await?)
        }

        async fn delete_shadow_reports(
            tx: &mut Tx<Self>,
            shadow_id: &str,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::IMPACT.delete_shadow_reports).bind(shadow_id);
            Ok(q.execute(&mut **tx).await.map(drop)?)
        }

        async fn insert_replay(
            tx: &mut Tx<Self>,
            r: &NewReplay,
            version: Option<i64>,
            limit: i64,
            at: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::IMPACT.insert_replay)
                .bind(&r.id)
                .bind(&r.world)
                .bind(version);
            let q = q.bind(&r.model).bind(r.since.map(Time)).bind(limit);
            Ok(q.bind(&r.requested_by)
                .bind(Time(at))
                .execute(&mut **tx)
                .await
                .map(drop)?)
        }

        async fn replay_row(&self, id: &str) -> Result<Option<ReplayRow>, StoreError> {
            let q = sqlx::query_as(Self::IMPACT.replay).bind(id);
            Ok(q.fetch_optional(&self.pool).await?)
        }

        async fn unfinished_replays(tx: &mut Tx<Self>, world: &str) -> Result<i64, StoreError> {
            let q = sqlx::query_scalar(Self::IMPACT.unfinished_replays).bind(world);
            Ok(q.fetch_one(&mut **tx).await?)
        }

        async fn claimable_replay(
            &self,
            stale_before: DateTime<Utc>,
        ) -> Result<Option<String>, StoreError> {
            let q = sqlx::query_scalar(Self::IMPACT.claimable_replay).bind(Time(stale_before));
            Ok(q.fetch_optional(&self.pool).await?)
        }

        async fn claim_replay(
            &self,
            id: &str,
            worker: &str,
            at: DateTime<Utc>,
            stale_before: DateTime<Utc>,
        ) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::IMPACT.claim_replay).bind(id).bind(worker);
            let q = q.bind(Time(at)).bind(Time(stale_before));
            Ok(q.execute(&self.pool).await?.rows_affected())
        }

        async fn replay_progress(
            &self,
            id: &str,
            worker: &str,
            processed: i64,
            report: &str,
        ) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::IMPACT.replay_progress)
                .bind(id)
                .bind(worker);
            let q = q
                .bind(processed)
                .bind(report)
                .bind(Time(super::records::now()));
            Ok(q.execute(&self.pool).await?.rows_affected())
        }

        async fn finish_replay(
            &self,
            id: &str,
            worker: &str,
            status: &str,
            processed: i64,
            report: Option<&str>,
            error: Option<&str>,
            at: DateTime<Utc>,
        ) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::IMPACT.finish_replay)
                .bind(id)
                .bind(worker)
                .bind(status);
            let q = q.bind(processed).bind(report).bind(error).bind(Time(at));
            Ok(q.execute(&self.pool).await?.rows_affected())
        }

        async fn prune_replays(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::IMPACT.prune_replays).bind(Time(before));
            Ok(q.execute(&self.pool).await?.rows_affected())
        }
    };
}

pub(crate) use impact_statements;

// ---------------------------------------------------------------------------------------------
// The operations.

/// Replays a world may have queued or running at once.
pub const MAX_UNFINISHED_REPLAYS: i64 = 4;

/// Start (or replace) `world`'s shadow and tell every instance; the replaced shadow's report
/// goes with it.
pub(crate) async fn start_shadow<D: ImpactDialect>(
    db: &D,
    shadow: &ShadowRecord,
) -> Result<(), StoreError> {
    let mut tx = db.begin_write().await?;
    if let Some(old) = D::shadow_in(&mut tx, &shadow.world).await? {
        D::delete_shadow_reports(&mut tx, &old.id).await?;
    }
    D::upsert_shadow(&mut tx, shadow).await?;
    D::notify_deployments(&mut tx, &shadow.world).await?;
    tx.commit().await?;
    Ok(())
}

/// End `world`'s shadow, if it has one, and tell every instance; the shadow that ended.
pub(crate) async fn end_shadow<D: ImpactDialect>(
    db: &D,
    world: &str,
) -> Result<Option<ShadowRecord>, StoreError> {
    let mut tx = db.begin_write().await?;
    let Some(row) = D::shadow_in(&mut tx, world).await? else {
        return Ok(None);
    };
    let ended = ShadowRecord::try_from(row)?;
    D::delete_shadow_reports(&mut tx, &ended.id).await?;
    D::delete_shadow(&mut tx, world).await?;
    D::notify_deployments(&mut tx, world).await?;
    tx.commit().await?;
    Ok(Some(ended))
}

/// End the shadow of `world` if it is `version` (which is being deployed), in the deploy's
/// transaction.
pub(crate) async fn end_shadow_of_version<D: ImpactDialect>(
    tx: &mut Tx<D>,
    world: &str,
    version: i64,
) -> Result<(), StoreError> {
    match D::shadow_in(tx, world).await? {
        Some(row) if row.version == version => {
            D::delete_shadow_reports(tx, &row.id).await?;
            D::delete_shadow_of_version(tx, world, version)
                .await
                .map(drop)
        }
        _ => Ok(()),
    }
}

pub(crate) async fn shadows<D: ImpactDialect>(db: &D) -> Result<Vec<ShadowRecord>, StoreError> {
    convert(db.shadows().await?)
}

pub(crate) async fn shadow<D: ImpactDialect>(
    db: &D,
    world: &str,
) -> Result<Option<ShadowRecord>, StoreError> {
    let mut tx = db.begin_write().await?;
    let row = D::shadow_in(&mut tx, world).await?;
    tx.commit().await?;
    row.map(ShadowRecord::try_from).transpose()
}

/// Queue a replay; `Conflict` when the world has as many unfinished as it may.
pub(crate) async fn queue_replay<D: ImpactDialect>(
    db: &D,
    replay: &NewReplay,
) -> Result<(), StoreError> {
    let version = replay
        .version
        .map(|v| bigint(v, "replay version"))
        .transpose()?;
    let limit = bigint(replay.limit, "replay limit")?;
    let mut tx = db.begin_write().await?;
    D::lock_world(&mut tx, &replay.world).await?;
    let unfinished = D::unfinished_replays(&mut tx, &replay.world).await?;
    if unfinished >= MAX_UNFINISHED_REPLAYS {
        return Err(StoreError::Conflict(format!(
            "world '{}' has {unfinished} replays queued or running, as many as it may; wait \
             for one to finish",
            replay.world
        )));
    }
    D::insert_replay(&mut tx, replay, version, limit, now()).await?;
    tx.commit().await?;
    Ok(())
}

pub(crate) async fn recorded_contexts<D: ImpactDialect>(
    db: &D,
    world: &str,
    before_seq: u64,
    since: Option<DateTime<Utc>>,
    limit: u32,
) -> Result<Vec<RecordedContext>, StoreError> {
    let before = to_i64(before_seq).unwrap_or(i64::MAX);
    convert(
        db.recorded_contexts(world, before, since, i64::from(limit))
            .await?,
    )
}

pub(crate) async fn replay<D: ImpactDialect>(
    db: &D,
    id: &str,
) -> Result<Option<ReplayRecord>, StoreError> {
    db.replay_row(id)
        .await?
        .map(ReplayRecord::try_from)
        .transpose()
}

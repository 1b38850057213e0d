//! What keeps the store from growing without bound (docs/operations.md, "Retention"): rows an
//! old generation left pending too long (shown on `/health`), delivered outbox rows pruned a
//! batch at a time with their `event_handled` entries, and the controlled path by which
//! decision records leave the log: a range of a world's chain is exported first (recorded
//! here), then a checkpoint of its last link is kept, and only records at or below that
//! checkpoint may be deleted (migration 0006's triggers enforce it). The protocol is in
//! `protocol.rs`; the statements whose text alone differs are written once in
//! [`retention_statements`], with each dialect's text in a [`RetentionSql`].

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::records::{to_u64, Time};
use super::StoreError;

/// Rows another generation left pending or in flight for longer than the configured age:
/// nothing will handle them until an operator adopts them (`spectral outbox adopt`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct StrandedRows {
    /// How many.
    pub rows: i64,
    /// How long ago the oldest of them occurred, in milliseconds; `None` when there are none.
    pub oldest_age_ms: Option<i64>,
}

/// The last link removed from a world's chain: verification of what remains starts from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainCheckpoint {
    pub seq: u64,
    pub hash: String,
}

/// An export of records `first_seq..=last_seq` of a world's chain, to record in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewExport {
    pub world: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The hash of record `last_seq`.
    pub last_hash: String,
    /// `sha256:<hex>` of the file written.
    pub file_digest: String,
}

/// A recorded export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportRecord {
    pub world: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_hash: String,
    pub file_digest: String,
    pub exported_at: DateTime<Utc>,
}

/// What a prune of decision records did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrunedDecisions {
    /// The world's checkpoint after the prune.
    pub checkpoint: ChainCheckpoint,
    /// Records deleted by this call.
    pub removed: u64,
}

#[derive(sqlx::FromRow)]
pub(crate) struct ExportRow {
    world: String,
    first_seq: i64,
    last_seq: i64,
    last_hash: String,
    file_digest: String,
    exported_at: Time,
}

impl TryFrom<ExportRow> for ExportRecord {
    type Error = StoreError;

    fn try_from(r: ExportRow) -> Result<Self, StoreError> {
        Ok(ExportRecord {
            world: r.world,
            first_seq: to_u64(r.first_seq, "export first_seq")?,
            last_seq: to_u64(r.last_seq, "export last_seq")?,
            last_hash: r.last_hash,
            file_digest: r.file_digest,
            exported_at: r.exported_at.0,
        })
    }
}

/// The text of the retention statements in one dialect; parameters are numbered in the order
/// of the method's arguments.
pub(crate) struct RetentionSql {
    /// `(generation, occurred before)` → [`StrandedRows`].
    pub stranded: &'static str,
    /// `(occurred before, limit)` → ids of delivered rows, oldest first.
    pub prunable_outbox: &'static str,
    /// `(world)` → `(seq, hash)`.
    pub chain_checkpoint: &'static str,
    /// `(world)` → `(seq, hash)` of the chain's head, the newest record written.
    pub chain_head: &'static str,
    /// `(world, seq, hash, at)`.
    pub insert_chain_checkpoint: &'static str,
    /// `(world, seq, hash, at)`.
    pub update_chain_checkpoint: &'static str,
    /// `(world, seq)` → hash.
    pub decision_hash: &'static str,
    /// `(world, after, until)` → the last seq of the run of records after `after` decided at
    /// or before `until`; `after` or less when there is none.
    pub decisions_through: &'static str,
    /// `(world, from)` → the largest `last_seq` of an export that starts at or before `from`.
    pub exported_through: &'static str,
    /// `(world, first, last, last_hash, digest, at)`.
    pub insert_export: &'static str,
    /// `(world)` → export rows, oldest first.
    pub exports: &'static str,
    /// `(world)` → the lowest stored seq.
    pub first_decision: &'static str,
    /// `(world, from, through)` → deleted rows.
    pub delete_decisions: &'static str,
}

/// The retention statements' methods of `impl Dialect for …`, over `Self::RETENTION` and a
/// `pool` field, like `shared_statements!`.
macro_rules! retention_statements {
    () => {
        async fn stranded(
            &self,
            generation: i64,
            before: DateTime<Utc>,
        ) -> Result<StrandedRows, StoreError> {
            let q = sqlx::query_as(Self::RETENTION.stranded)
                .bind(generation)
                .bind(Time(before));
            Ok(q.fetch_one(&self.pool).await?)
        }

        async fn prunable_outbox(
            tx: &mut Tx<Self>,
            before: DateTime<Utc>,
            limit: i64,
        ) -> Result<Vec<i64>, StoreError> {
            let q = sqlx::query_scalar(Self::RETENTION.prunable_outbox)
                .bind(Time(before))
                .bind(limit);
            Ok(q.fetch_all(&mut **tx).await?)
        }

        async fn chain_checkpoint(
            tx: &mut Tx<Self>,
            world: &str,
        ) -> Result<Option<(i64, String)>, StoreError> {
            let q = sqlx::query_as(Self::RETENTION.chain_checkpoint).bind(world);
            Ok(q.fetch_optional(&mut **tx).await?)
        }

        async fn chain_head(
            tx: &mut Tx<Self>,
            world: &str,
        ) -> Result<Option<(i64, String)>, StoreError> {
            let q = sqlx::query_as(Self::RETENTION.chain_head).bind(world);
            Ok(q.fetch_optional(&mut **tx).await?)
        }

        async fn set_chain_checkpoint(
            tx: &mut Tx<Self>,
            world: &str,
            seq: i64,
            hash: &str,
            at: DateTime<Utc>,
            first: bool,
        ) -> Result<(), StoreError> {
            let sql = if first {
                Self::RETENTION.insert_chain_checkpoint
            } else {
                Self::RETENTION.update_chain_checkpoint
            };
            let q = sqlx::query(sql).bind(world).bind(seq).bind(hash);
            Ok(q.bind(Time(at)).execute(&mut **tx).await.map(drop)?)
        }

        async fn decision_hash(
            tx: &mut Tx<Self>,
            world: &str,
            seq: i64,
        ) -> Result<Option<String>, StoreError> {
            let q = sqlx::query_scalar(Self::RETENTION.decision_hash)
                .bind(world)
                .bind(seq);
            Ok(q.fetch_optional(&mut **tx).await?)
        }

        async fn decisions_through(
            tx: &mut Tx<Self>,
            world: &str,
            after: i64,
            until: DateTime<Utc>,
        ) -> Result<Option<i64>, StoreError> {
            let q = sqlx::query_scalar::<_, Option<i64>>(Self::RETENTION.decisions_through)
                .bind(world)
                .bind(after)
                .bind(Time(until));
            Ok(q.fetch_one(&mut **tx).await?)
        }

        async fn exported_through(
            tx: &mut Tx<Self>,
            world: &str,
            from: i64,
        ) -> Result<Option<i64>, StoreError> {
            let q = sqlx::query_scalar::<_, Option<i64>>(Self::RETENTION.exported_through)
                .bind(world)
                .bind(from);
            Ok(q.fetch_one(&mut **tx).await?)
        }

        async fn insert_export(
            &self,
            e: &NewExport,
            first: i64,
            last: i64,
            at: DateTime<Utc>,
        ) -> Result<(), StoreError> {
            let q = sqlx::query(Self::RETENTION.insert_export)
                .bind(&e.world)
                .bind(first)
                .bind(last);
            let q = q.bind(&e.last_hash).bind(&e.file_digest).bind(Time(at));
            Ok(q.execute(&self.pool).await.map(drop)?)
        }

        async fn exports(&self, world: &str) -> Result<Vec<ExportRow>, StoreError> {
            let q = sqlx::query_as(Self::RETENTION.exports).bind(world);
            Ok(q.fetch_all(&self.pool).await?)
        }

        async fn first_decision(tx: &mut Tx<Self>, world: &str) -> Result<Option<i64>, StoreError> {
            let q =
                sqlx::query_scalar::<_, Option<i64>>(Self::RETENTION.first_decision).bind(world);
            Ok(q.fetch_one(&mut **tx).await?)
        }

        async fn delete_decisions(
            tx: &mut Tx<Self>,
            world: &str,
            from: i64,
            through: i64,
        ) -> Result<u64, StoreError> {
            let q = sqlx::query(Self::RETENTION.delete_decisions)
                .bind(world)
                .bind(from)
                .bind(through);
            Ok(q.execute(&mut **tx).await?.rows_affected())
        }
    };
}

pub(crate) use retention_statements;

//! Each world's decision records form a hash chain: every record carries the hash of the
//! previous record of its world. This file computes the chain; `protocol.rs` appends it under
//! the per-world lock.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::records::{bigint, to_u64, truncate_micros, Time};
use super::statements::decision_columns;
use super::{DecisionRecord, NewDecision, StoreError};

/// The `prev_hash` of a world's first decision record.
pub const GENESIS: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of a decision record: sha256 over the previous hash, the sequence number and
/// the canonical JSON of the decision. Both backends and the auditor use this one function.
/// A decision that does not serialize has no hash: an empty preimage would hash to a value
/// that nothing could check.
pub fn chain_hash(prev_hash: &str, seq: u64, decision: &NewDecision) -> Result<String, StoreError> {
    let json = serde_json::to_vec(decision)
        .map_err(|e| StoreError::Corrupt(format!("decision '{}': {e}", decision.decision_id)))?;
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(seq.to_string().as_bytes());
    h.update(b"\n");
    h.update(json);
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// A decision in the exact form it is stored in, so that the hash computed before the insert
/// is the hash an auditor recomputes from what `Store::decisions` returns.
pub(crate) struct StoredDecision {
    decision: NewDecision,
    /// `matched_rules` as stored: the text of its JSON. Text rather than `jsonb`, because
    /// `jsonb` reorders and normalizes and would change the hashed bytes.
    matched_rules: String,
    /// `decision.version` as stored.
    version: i64,
}

/// The batch grouped by world, in the form it will be stored in. Worlds come out in sorted
/// order: every writer locks chain heads in that order, so two batches never deadlock.
pub(crate) fn group_by_world(
    batch: &[NewDecision],
) -> Result<BTreeMap<&str, Vec<StoredDecision>>, StoreError> {
    let mut worlds: BTreeMap<&str, Vec<StoredDecision>> = Default::default();
    for d in batch {
        let matched_rules = serde_json::to_string(&d.matched_rules)
            .map_err(|e| StoreError::Corrupt(format!("matched rules: {e}")))?;
        let decision = NewDecision {
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
pub(crate) struct ChainedDecision {
    pub record: DecisionRecord,
    /// `record.seq` as stored.
    pub seq: i64,
    pub matched_rules: String,
    pub version: i64,
}

/// Extend a chain whose head is `(seq, hash)` (`(0, GENESIS)` for an empty chain) by
/// `decisions`, in order.
pub(crate) fn extend_chain(
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
            let hash = chain_hash(&prev_hash, seq_u64, &d.decision)?;
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

/// The `INSERT` of a chunk of chained decisions into `table`, for either dialect: the columns
/// and their order are the same in both, only how a database spells a bound value differs.
pub(crate) fn decisions_insert<'a, DB>(
    table: &str,
    chunk: &'a [ChainedDecision],
) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<&'a str>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Time: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut insert = sqlx::QueryBuilder::default();
    insert.push(format_args!(
        "INSERT INTO {table} ({}) ",
        decision_columns!()
    ));
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
            .push_bind(Time(d.decided_at))
            .push_bind(c.record.prev_hash.as_str())
            .push_bind(c.record.hash.as_str());
    });
    insert
}

/// Split rows into `INSERT`s of a few fixed sizes, largest first: every statement then has one
/// of a handful of texts, which each connection prepares once and keeps, instead of a new
/// text (and a new prepare) for every batch size. 128 rows of 14 parameters stay well under
/// both databases' bind-parameter limits.
pub(crate) fn insert_chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
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

    use chrono::DateTime;

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
    fn a_chain_continues_from_its_head() {
        let d = NewDecision {
            decision_id: "d".into(),
            world: "w".into(),
            version: 1,
            action: "a".into(),
            module_hash: "sha256:00".into(),
            status: "GREEN".into(),
            matched_rules: vec![],
            caller: "k".into(),
            correlation_id: None,
            context_digest: "sha256:11".into(),
            decided_at: DateTime::from_timestamp(0, 1).unwrap(),
            context: None,
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
            chain_hash("sha256:head", 8, &stored).unwrap()
        );
    }
}

//! Verification of a world's decision chain: every record's hash is recomputed and linked to
//! the one before, so an auditor can tell that nothing was removed, inserted or altered.

use serde::Serialize;

use crate::store::{chain_hash, Store, StoreError, GENESIS};

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub world: String,
    /// Records checked.
    pub records: u64,
    /// The first broken link, if any.
    pub broken: Option<BrokenLink>,
}

/// Where and how a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokenLink {
    pub seq: u64,
    pub decision_id: String,
    pub reason: String,
}

/// Records read per page.
const PAGE: u32 = 1000;

/// Walk a world's chain from the first record.
pub async fn verify(store: &Store, world: &str) -> Result<Verification, StoreError> {
    let mut prev_hash = GENESIS.to_string();
    let mut expected_seq = 1;
    let mut records = 0;
    loop {
        let page = store.decisions(world, expected_seq - 1, PAGE).await?;
        if page.is_empty() {
            break;
        }
        for r in page {
            records += 1;
            let broken = |reason: String| BrokenLink {
                seq: r.seq,
                decision_id: r.decision.decision_id.clone(),
                reason,
            };
            let problem = if r.seq != expected_seq {
                Some(broken(format!(
                    "expected record {expected_seq}, found {}: records are missing",
                    r.seq
                )))
            } else if r.prev_hash != prev_hash {
                Some(broken(format!(
                    "prev_hash {} does not match the previous record's hash {prev_hash}",
                    r.prev_hash
                )))
            } else {
                let computed = chain_hash(&r.prev_hash, r.seq, &r.decision)?;
                (computed != r.hash).then(|| {
                    broken(format!(
                        "stored hash {} does not match the record's content ({computed})",
                        r.hash
                    ))
                })
            };
            if let Some(broken) = problem {
                return Ok(Verification {
                    world: world.to_string(),
                    records,
                    broken: Some(broken),
                });
            }
            prev_hash = r.hash;
            expected_seq += 1;
        }
    }
    Ok(Verification {
        world: world.to_string(),
        records,
        broken: None,
    })
}

//! The audit of a world's decision chain: verification in the store (every record's hash is
//! recomputed and linked to the one before, so an auditor can tell that nothing was removed,
//! inserted or altered), and retention without silent deletion: a range is exported to a file
//! that [`verify_file`] checks offline, and only exported ranges are pruned, leaving a
//! checkpoint of the last removed link from which the rest of the chain still verifies.
//!
//! An export is JSON lines: a header (the world, the checkpoint the range continues from), one
//! [`DecisionRecord`] per line with its chain links, and a closing line with the count and the
//! last link, so that a file cut short, a line removed, moved or changed fails verification.

use std::io::{BufRead, Write};
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{
    chain_hash, DecisionRecord, NewExport, PrunedDecisions, Store, StoreError, GENESIS,
};

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub world: String,
    /// Records checked.
    pub records: u64,
    /// The first broken link, if any.
    pub broken: Option<BrokenLink>,
    /// The last record pruned from the chain, which verification started after; `None` when
    /// nothing was pruned and it started from the first record.
    pub pruned_through: Option<u64>,
}

/// Where and how a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokenLink {
    pub seq: u64,
    /// The record found there; empty when the chain ends before it (truncated).
    pub decision_id: String,
    pub reason: String,
}

/// Records read per page.
const PAGE: u32 = 1000;

/// Records deleted per transaction by a prune.
const PRUNE_BATCH: u32 = 1000;

/// Why an export or a prune did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(String),
    /// The range asked for holds no record.
    #[error("{0}")]
    Nothing(String),
    /// The stored chain is broken inside the range: exporting it would vouch for it.
    #[error("world '{world}': the chain is broken at record {}: {}", .link.seq, .link.reason)]
    Broken { world: String, link: BrokenLink },
}

/// The first line of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportHeader {
    /// Always [`EXPORT_FORMAT`].
    pub format: String,
    pub world: String,
    /// The record the range continues from (0: the chain's start).
    pub after_seq: u64,
    /// That record's hash ([`GENESIS`] at the chain's start): the first record's `prev_hash`.
    pub prev_hash: String,
    /// Records decided at or before this time were asked for.
    pub until: DateTime<Utc>,
    pub exported_at: DateTime<Utc>,
}

/// The last line of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportEnd {
    pub records: u64,
    pub last_seq: u64,
    pub last_hash: String,
}

#[derive(Serialize, Deserialize)]
struct EndLine {
    end: ExportEnd,
}

/// The `format` of an export's header.
pub const EXPORT_FORMAT: &str = "spectral.audit.export/1";

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exported {
    pub world: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub last_hash: String,
    /// `sha256:<hex>` of the file.
    pub file_digest: String,
}

/// The outcome of an offline verification of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileVerification {
    pub world: String,
    /// The range the file claims, from its header and closing line.
    pub first_seq: u64,
    pub last_seq: u64,
    /// Records checked.
    pub records: u64,
    /// What is wrong with the file, naming its line; `None` when it verifies.
    pub problem: Option<String>,
}

/// Walk a world's chain from its checkpoint (or its first record, when nothing was pruned).
///
/// The walk is also held against the chain's head, which the writer keeps apart from the
/// records: a chain that ends before its head, or whose record at the head's seq is not the
/// head's, lost its newest records (records written after the head was read are walked too,
/// and are checked like the rest); a record past the head as it stands after the walk was
/// added behind the service's back.
pub async fn verify(store: &Store, world: &str) -> Result<Verification, StoreError> {
    // Read before the walk: the head only moves forward, so every record it names exists.
    let head = store.chain_head(world).await?;
    let checkpoint = store.chain_checkpoint(world).await?;
    let pruned_through = checkpoint.as_ref().map(|c| c.seq);
    let (mut expected_seq, mut prev_hash) =
        checkpoint.map_or((1, GENESIS.to_string()), |c| (c.seq + 1, c.hash));
    let mut records = 0;
    loop {
        let page = store.decisions(world, expected_seq - 1, PAGE).await?;
        if page.is_empty() {
            break;
        }
        for r in page {
            records += 1;
            if let Some(broken) = check_link(&r, expected_seq, &prev_hash)? {
                return Ok(Verification {
                    world: world.to_string(),
                    records,
                    broken: Some(broken),
                    pruned_through,
                });
            }
            if let Some(h) = head.as_ref().filter(|h| h.seq == r.seq && h.hash != r.hash) {
                let reason = format!(
                    "the chain head records hash {} for record {}, the record has {}",
                    h.hash, h.seq, r.hash
                );
                return Ok(Verification {
                    world: world.to_string(),
                    records,
                    broken: Some(BrokenLink {
                        seq: r.seq,
                        decision_id: r.decision.decision_id.clone(),
                        reason,
                    }),
                    pruned_through,
                });
            }
            prev_hash = r.hash;
            expected_seq += 1;
        }
    }
    let last = expected_seq - 1;
    // Every record the service wrote is at or before its head, read after the walk: a record
    // past it was put there by someone else, however well it links to the one before.
    let head_now = store.chain_head(world).await?;
    if last > head_now.as_ref().map_or(0, |h| h.seq) {
        let at = head_now.as_ref().map_or(0, |h| h.seq);
        let extra = store.decisions(world, at, 1).await?;
        return Ok(Verification {
            world: world.to_string(),
            records,
            broken: Some(BrokenLink {
                seq: at + 1,
                decision_id: extra
                    .first()
                    .map(|r| r.decision.decision_id.clone())
                    .unwrap_or_default(),
                reason: format!(
                    "record {} is past the chain head (record {at}): the service did not write it",
                    at + 1
                ),
            }),
            pruned_through,
        });
    }
    let truncated = head.filter(|h| h.seq > last).map(|h| BrokenLink {
        seq: last + 1,
        decision_id: String::new(),
        reason: format!(
            "the chain ends at record {last} but its head is record {}: the newest records were removed",
            h.seq
        ),
    });
    Ok(Verification {
        world: world.to_string(),
        records,
        broken: truncated,
        pruned_through,
    })
}

/// How record `r` fails to be record `expected_seq` following `prev_hash`, if it does.
fn check_link(
    r: &DecisionRecord,
    expected_seq: u64,
    prev_hash: &str,
) -> Result<Option<BrokenLink>, StoreError> {
    let broken = |reason: String| BrokenLink {
        seq: r.seq,
        decision_id: r.decision.decision_id.clone(),
        reason,
    };
    if r.seq != expected_seq {
        return Ok(Some(broken(format!(
            "expected record {expected_seq}, found {}: records are missing or out of order",
            r.seq
        ))));
    }
    if r.prev_hash != prev_hash {
        return Ok(Some(broken(format!(
            "prev_hash {} does not match the previous record's hash {prev_hash}",
            r.prev_hash
        ))));
    }
    let computed = chain_hash(&r.prev_hash, r.seq, &r.decision)?;
    Ok((computed != r.hash).then(|| {
        broken(format!(
            "stored hash {} does not match the record's content ({computed})",
            r.hash
        ))
    }))
}

/// Write `world`'s records from its checkpoint through the last one decided at or before
/// `until` to `out` (created; an existing file is refused), verifying each link as it goes,
/// then record the export in the store, which is what lets `prune` remove the range. The file
/// is synced to disk before the export is recorded.
pub async fn export(
    store: &Store,
    world: &str,
    until: DateTime<Utc>,
    out: &Path,
) -> Result<Exported, AuditError> {
    let checkpoint = store.chain_checkpoint(world).await?;
    let (after, start_hash) = checkpoint.map_or((0, GENESIS.to_string()), |c| (c.seq, c.hash));
    let through = store.decisions_through(world, after, until).await?;
    if through <= after {
        return Err(AuditError::Nothing(format!(
            "world '{world}' has no record after {after} decided at or before {until}: nothing \
             to export"
        )));
    }
    let io = |e: std::io::Error| AuditError::Io(format!("{}: {e}", out.display()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(io)?;
    let mut w = DigestWriter {
        inner: std::io::BufWriter::new(file),
        digest: Sha256::new(),
    };
    let header = ExportHeader {
        format: EXPORT_FORMAT.into(),
        world: world.into(),
        after_seq: after,
        prev_hash: start_hash.clone(),
        until,
        exported_at: Utc::now(),
    };
    write_line(&mut w, &header).map_err(io)?;
    let (mut expected_seq, mut prev_hash) = (after + 1, start_hash);
    'pages: while expected_seq <= through {
        let page = store.decisions(world, expected_seq - 1, PAGE).await?;
        if page.is_empty() {
            break;
        }
        for r in page {
            if r.seq > through {
                break 'pages;
            }
            if let Some(link) = check_link(&r, expected_seq, &prev_hash)? {
                drop(w);
                let _ = std::fs::remove_file(out);
                return Err(AuditError::Broken {
                    world: world.into(),
                    link,
                });
            }
            write_line(&mut w, &r).map_err(io)?;
            prev_hash = r.hash;
            expected_seq += 1;
        }
    }
    let last_seq = expected_seq - 1;
    let end = ExportEnd {
        records: last_seq - after,
        last_seq,
        last_hash: prev_hash,
    };
    write_line(&mut w, &EndLine { end: end.clone() }).map_err(io)?;
    let digest = format!("sha256:{}", hex::encode(w.digest.finalize_reset()));
    let file = w
        .inner
        .into_inner()
        .map_err(|e| AuditError::Io(format!("{}: {e}", out.display())))?;
    file.sync_all().map_err(io)?;
    let exported = Exported {
        world: world.into(),
        first_seq: after + 1,
        last_seq,
        records: end.records,
        last_hash: end.last_hash,
        file_digest: digest,
    };
    store
        .record_export(&NewExport {
            world: world.into(),
            first_seq: exported.first_seq,
            last_seq: exported.last_seq,
            last_hash: exported.last_hash.clone(),
            file_digest: exported.file_digest.clone(),
        })
        .await?;
    Ok(exported)
}

/// Remove `world`'s records decided at or before `until` (from its checkpoint on, up to the
/// first record decided later), which must all have been exported; a checkpoint of the last
/// removed link stays, and [`verify`] starts from it. Refused (`StoreError::Conflict`) when any
/// record of the range was not exported.
pub async fn prune(
    store: &Store,
    world: &str,
    until: DateTime<Utc>,
) -> Result<PrunedDecisions, AuditError> {
    let after = store.chain_checkpoint(world).await?.map_or(0, |c| c.seq);
    let through = store.decisions_through(world, after, until).await?;
    if through <= after {
        return Err(AuditError::Nothing(format!(
            "world '{world}' has no record after {after} decided at or before {until}: nothing \
             to prune"
        )));
    }
    Ok(store.prune_decisions(world, through, PRUNE_BATCH).await?)
}

/// Check an export offline: its header, every record's seq, link and hash, and its closing
/// line. `Err` only when the file cannot be read.
pub fn verify_file(path: &Path) -> Result<FileVerification, AuditError> {
    let file = std::fs::File::open(path)
        .map_err(|e| AuditError::Io(format!("{}: {e}", path.display())))?;
    let mut lines = std::io::BufReader::new(file).lines();
    let mut report = FileVerification {
        world: String::new(),
        first_seq: 0,
        last_seq: 0,
        records: 0,
        problem: None,
    };
    let fail = |mut report: FileVerification, problem: String| {
        report.problem = Some(problem);
        Ok(report)
    };
    let read = |line: Option<std::io::Result<String>>| {
        line.transpose()
            .map_err(|e| AuditError::Io(format!("{}: {e}", path.display())))
    };
    let Some(first) = read(lines.next())? else {
        return fail(report, "the file is empty: it is not an export".into());
    };
    let header: ExportHeader = match serde_json::from_str(&first) {
        Ok(h) => h,
        Err(e) => return fail(report, format!("line 1 is not an export header: {e}")),
    };
    if header.format != EXPORT_FORMAT {
        return fail(
            report,
            format!("line 1: format '{}' is not {EXPORT_FORMAT}", header.format),
        );
    }
    report.world = header.world.clone();
    report.first_seq = header.after_seq + 1;
    let (mut expected_seq, mut prev_hash) = (header.after_seq + 1, header.prev_hash.clone());
    let mut n: u64 = 1;
    loop {
        n += 1;
        let Some(line) = read(lines.next())? else {
            return fail(
                report,
                format!(
                    "the file ends at line {} without its closing line: it was cut short",
                    n - 1
                ),
            );
        };
        if let Ok(EndLine { end }) = serde_json::from_str::<EndLine>(&line) {
            report.last_seq = end.last_seq;
            let problem = if end.records != report.records {
                Some(format!(
                    "line {n}: the closing line counts {} records, the file holds {}: records \
                     were removed or added",
                    end.records, report.records
                ))
            } else if end.last_seq != expected_seq - 1 || end.last_hash != prev_hash {
                Some(format!(
                    "line {n}: the closing line names record {} ({}), the file ends on record {} \
                     ({prev_hash})",
                    end.last_seq,
                    end.last_hash,
                    expected_seq - 1
                ))
            } else if read(lines.next())?.is_some() {
                Some(format!("line {}: text after the closing line", n + 1))
            } else {
                None
            };
            return match problem {
                Some(p) => fail(report, p),
                None => Ok(report),
            };
        }
        let record: DecisionRecord = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => return fail(report, format!("line {n} is not a decision record: {e}")),
        };
        report.records += 1;
        if record.decision.world != header.world {
            return fail(
                report,
                format!(
                    "line {n}: record {} is of world '{}', not '{}'",
                    record.seq, record.decision.world, header.world
                ),
            );
        }
        if let Some(link) = check_link(&record, expected_seq, &prev_hash)? {
            return fail(
                report,
                format!(
                    "line {n}: record {} (decision {}): {}",
                    link.seq, link.decision_id, link.reason
                ),
            );
        }
        prev_hash = record.hash;
        expected_seq += 1;
    }
}

fn write_line<W: Write, T: Serialize>(w: &mut W, value: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

/// A writer that hashes what passes through it.
struct DigestWriter<W: Write> {
    inner: W,
    digest: Sha256,
}

impl<W: Write> Write for DigestWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.digest.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

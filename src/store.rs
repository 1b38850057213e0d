//! Durable state behind one seam with two backends: SQLite (the embedded default, a file in a
//! data directory) and PostgreSQL (`DATABASE_URL=postgres://…`, Supabase-compatible).
//!
//! **Boundary:** the only module that contains SQL or names `sqlx` types. The protocol of
//! every operation (which statements run in which transaction, with which outbox rows) is
//! written once, in `store/protocol.rs`, over a dialect; `store/postgres.rs` and
//! `store/sqlite.rs` hold each dialect's single statements. Callers never see which backend
//! they talk to, except through [`Store::backend`] for reporting.
//!
//! - `statements.rs`: the Rust side of the statements whose text is all that differs;
//! - `records.rs`: what is stored (versions, keys, decisions, …) and the rows it decodes from;
//! - `outbox.rs`: outbox rows and the effects a handled row commits with;
//! - `chain.rs`: the decision records' hash chain;
//! - `retention.rs`: stranded outbox rows, outbox pruning, and the export and prune of
//!   decision records behind a checkpoint;
//! - `threads.rs`: the World Agent's threads, checkpoints, event logs and rule candidates;
//! - `dispatch.rs`: [`Store`], the enum over the backends that the service holds;
//! - `error.rs`: [`StoreError`], and how a database error becomes one.
//!
//! **Invariants:** world-model versions are immutable once published; modules are write-once,
//! addressed by the sha256 of their content; each world's decision records form a hash chain
//! (every record carries the hash of the previous record of its world), appended under a
//! per-world lock so that several API instances on one Postgres extend one chain.

mod chain;
mod dispatch;
mod error;
mod impact;
mod outbox;
mod postgres;
mod protocol;
mod records;
mod retention;
mod sqlite;
mod statements;
mod threads;

pub use crate::outbox::events;
pub use chain::{chain_hash, GENESIS};
pub use dispatch::{Backend, Notifications, Store, StoreConfig};
pub use error::StoreError;
pub use impact::{NewReplay, RecordedContext, ReplayRecord, ShadowRecord, MAX_UNFINISHED_REPLAYS};
pub(crate) use outbox::OUTBOX_CHANNEL;
pub use outbox::{
    Completion, Effect, Handled, NewEvent, OutboxCounts, OutboxRow, OutboxStatus, ThreadChanged,
};
pub use protocol::decision_recorded;
/// The time now, as the store keeps times (to the microsecond).
pub(crate) use records::now as now_micros;
pub use records::{
    DecisionRecord, Deployment, KeyRecord, MatchedRule, NewDecision, NewKey, NewModule, NewVersion,
    Retirement, Scope, StatDelta, VersionRecord, VersionSummary, Webhook, WorldDetail,
    WorldSummary,
};
pub use retention::{ChainCheckpoint, ExportRecord, NewExport, PrunedDecisions, StrandedRows};
pub use threads::{
    CandidateRecord, CheckpointRecord, NewCandidate, NewCheckpoint, NewThread, NewThreadEvent,
    Pruned, RecordedRun, Review, Saved, ThreadEvent, ThreadKind, ThreadRecord, Usage, Verdict,
    RUNNING,
};

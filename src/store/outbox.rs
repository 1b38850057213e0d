//! The outbox as the store keeps it (ARCHITECTURE.md): rows appended in the transaction of the change
//! they describe, and what a consumer's handled row changes. What an event *says* is typed in
//! `crate::outbox::Event`; here it is a type name and a JSON payload, as the row stores it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::records::{Json, Time};
use super::{StatDelta, StoreError};

/// The NOTIFY channel outbox rows signal on insert.
pub(crate) const OUTBOX_CHANNEL: &str = "spectral_outbox";

/// An event to append to the outbox, in the transaction of the change it describes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    pub event_type: String,
    pub world: Option<String>,
    pub payload: serde_json::Value,
    /// Unique per event type; a second insert with the same key is ignored.
    pub idempotency_key: String,
    /// The handler the event is for; `None` for the event type's handler.
    pub target: Option<String>,
}

/// The status of an outbox row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxStatus {
    Pending,
    InFlight,
    Delivered,
    Failed,
}

impl OutboxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InFlight => "in_flight",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::InFlight, Self::Delivered, Self::Failed]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

/// A row of the outbox.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxRow {
    pub id: i64,
    pub event_type: String,
    pub event_version: i32,
    pub occurred_at: DateTime<Utc>,
    pub source: String,
    pub target: Option<String>,
    pub channel: String,
    pub generation: i64,
    pub world: Option<String>,
    pub payload: serde_json::Value,
    pub idempotency_key: String,
    pub trace_context: Option<String>,
    pub status: OutboxStatus,
    pub attempts: i32,
    pub available_at: DateTime<Utc>,
    pub claimed_at: Option<DateTime<Utc>>,
    pub claimed_by: Option<String>,
    pub last_error: Option<String>,
    pub failure_history: serde_json::Value,
    pub first_failed_at: Option<DateTime<Utc>>,
}

/// Counts for `/health`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct OutboxCounts {
    pub pending: i64,
    pub in_flight: i64,
    pub failed: i64,
    /// Pending, in-flight or failed rows that other generations left behind.
    pub other_generations: i64,
    /// How long ago the oldest pending row of the generation occurred, in milliseconds;
    /// `None` when none is pending. The consumer's lag, for `/metrics`.
    #[serde(skip)]
    pub oldest_pending_ms: Option<i64>,
}

/// What a handler changes in the store, applied in the transaction that records the event
/// as handled. Handlers describe effects as data because only the store holds SQL.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Nothing in the store (the handler's work was outside, e.g. an HTTP delivery).
    None,
    /// Add to the decision statistics.
    Stats(Vec<StatDelta>),
    /// Append further events (a fan-out).
    Enqueue(Vec<NewEvent>),
}

/// A row its handler has handled, to complete: which handler, and what the handling changes.
#[derive(Debug, Clone, Copy)]
pub struct Handled<'a> {
    pub row: &'a OutboxRow,
    /// The handler's name, under which `event_handled` records the row's key.
    pub handler: &'a str,
    pub effect: &'a Effect,
}

/// What became of a handled row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The effect was applied and the row delivered.
    Applied,
    /// The handler had already handled this idempotency key; the row is delivered with no
    /// second effect.
    Duplicate,
    /// The row was no longer claimed by this worker (its lease expired and another took it);
    /// nothing was changed.
    Lost,
}

/// Who produces events: stamped on every row.
#[derive(Debug)]
pub(crate) struct Stamp {
    /// The deploy generation of this process; consumers claim only their own.
    pub generation: std::sync::atomic::AtomicI64,
    /// Signalled after a commit that appended events, so a consumer in the same process
    /// wakes at once (SQLite has no NOTIFY).
    pub wake: tokio::sync::Notify,
    /// Told the id of each agent thread whose log or status a commit of this process changed
    /// (and, from the Postgres listener, of any process), so that only the streams following
    /// that thread look again.
    pub threads: tokio::sync::broadcast::Sender<ThreadChanged>,
}

/// Changes a slow stream may fall behind by before it is told it lagged (and looks).
const THREAD_CHANGES_BUFFERED: usize = 1024;

impl Default for Stamp {
    fn default() -> Self {
        Self {
            generation: std::sync::atomic::AtomicI64::new(0),
            wake: tokio::sync::Notify::new(),
            threads: tokio::sync::broadcast::channel(THREAD_CHANGES_BUFFERED).0,
        }
    }
}

/// An agent thread whose log or status changed.
#[derive(Debug, Clone)]
pub struct ThreadChanged {
    /// The thread's id, or `*` for every thread (changes may have been missed).
    pub thread: std::sync::Arc<str>,
    /// Learnt from a Postgres notification, rather than from a commit of this process.
    pub notified: bool,
}

/// The `source` of every row this build writes.
pub(crate) fn source() -> String {
    format!("spectral/{}", env!("CARGO_PKG_VERSION"))
}

#[derive(sqlx::FromRow)]
pub(crate) struct OutboxDbRow {
    id: i64,
    event_type: String,
    event_version: i32,
    occurred_at: Time,
    source: String,
    target: Option<String>,
    channel: String,
    generation: i64,
    world: Option<String>,
    payload: Json,
    idempotency_key: String,
    trace_context: Option<String>,
    status: String,
    attempts: i32,
    available_at: Time,
    claimed_at: Option<Time>,
    claimed_by: Option<String>,
    last_error: Option<String>,
    failure_history: Json,
    first_failed_at: Option<Time>,
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
            occurred_at: r.occurred_at.0,
            source: r.source,
            target: r.target,
            channel: r.channel,
            generation: r.generation,
            world: r.world,
            payload: r.payload.0,
            idempotency_key: r.idempotency_key,
            trace_context: r.trace_context,
            attempts: r.attempts,
            available_at: r.available_at.0,
            claimed_at: r.claimed_at.map(|t| t.0),
            claimed_by: r.claimed_by,
            last_error: r.last_error,
            failure_history: r.failure_history.0,
            first_failed_at: r.first_failed_at.map(|t| t.0),
        })
    }
}

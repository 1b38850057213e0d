//! The decision log: every decision is queued here and written in batches (group commit) by
//! one writer, off the request's critical path: on a thread of its own, at the background
//! priority, with a connection of its own.
//!
//! What happens when the writer cannot keep up is configured: by default wait briefly for
//! room, then refuse the decision (503) rather than answer it unrecorded; or, as an explicit
//! opt-in, drop the record at once. Both are counted in metrics and on `/health`.
//! Records still queued when the process is killed are lost; a graceful shutdown writes them.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{DecisionLogConfig, Durability, Overflow};
use crate::store::{NewDecision, Store};
use crate::telemetry::Metrics;

/// Attempts to write one batch before its records are counted as lost.
const WRITE_ATTEMPTS: u32 = 3;

/// A record in the queue, holding its share of the queue's byte budget until it is written.
struct Queued {
    decision: NewDecision,
    _room: OwnedSemaphorePermit,
    /// Under `durability = commit`, told whether the record's group commit committed.
    committed: Option<oneshot::Sender<bool>>,
}

/// Bytes a record holds while queued: its strings and a fixed share for the rest.
fn record_bytes(d: &NewDecision) -> u32 {
    const FIXED: usize = 256;
    const PER_MATCHED_RULE: usize = 96;
    let matched = d.matched_rules.len();
    let bytes = FIXED
        + d.decision_id.len()
        + d.world.len()
        + d.action.len()
        + d.module_hash.len()
        + d.status.len()
        + d.caller.len()
        + d.correlation_id.as_ref().map_or(0, String::len)
        + d.context_digest.len()
        + d.context.as_deref().map_or(0, str::len)
        + matched * PER_MATCHED_RULE;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// The sending side, shared by every request.
pub struct DecisionLog {
    /// Requests send; the writer receives.
    tx: mpsc::Sender<Queued>,
    /// The queue's bound in bytes, as permits: a record takes its size before it is queued
    /// and gives it back once written, so the queue is bounded in memory as well as in count.
    room: Arc<Semaphore>,
    max_bytes: u32,
    /// The supervisor cancels it once, after the HTTP server has drained; the writer then
    /// writes what is queued and exits.
    stop: CancellationToken,
    overflow: Overflow,
    durability: Durability,
    capacity: usize,
    metrics: Arc<Metrics>,
}

/// What `/health` shows of the log.
#[derive(Debug, Clone, Serialize)]
pub struct LogStatus {
    pub queue_depth: u64,
    pub capacity: usize,
    pub queued_bytes: u64,
    pub max_bytes: u64,
    pub overflow: &'static str,
    pub durability: &'static str,
    pub dropped: u64,
    /// Decisions refused (503) because their record could not be queued in time.
    pub refused: u64,
    pub written: u64,
    pub write_errors: u64,
}

/// A decision whose record could not be queued in time; under `block` it is not answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unrecorded;

/// Resolves when the writer has written what was queued at the stop and exited.
pub type Writer = oneshot::Receiver<()>;

impl DecisionLog {
    /// Start the writer on a thread of its own (`spectral-log`), `nice` steps below the
    /// caller's priority, writing through a pool of its own to `store`'s database.
    pub fn start(
        store: Store,
        config: &DecisionLogConfig,
        nice: u8,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Self, Writer)> {
        let (tx, rx) = mpsc::channel(config.capacity);
        let max_bytes = u32::try_from(config.max_bytes).unwrap_or(u32::MAX);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let (finished, writer) = oneshot::channel();
        let (batch_size, linger, thread_metrics) =
            (config.batch_size, config.linger, metrics.clone());
        crate::background::spawn("spectral-log", nice, move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    // The queue closes with `rx`: every record is then counted as dropped.
                    tracing::error!(error = %e, "decision log: cannot start its runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                match own_store(&store, &stopped).await {
                    Some(own) => {
                        write_loop(&own, rx, stopped, batch_size, linger, thread_metrics).await;
                        own.close().await;
                    }
                    // Stopped before a connection of its own could be opened: what is queued
                    // is written through the caller's pool, still open until the writer ends.
                    None => {
                        write_loop(&store, rx, stopped, batch_size, linger, thread_metrics).await
                    }
                }
            });
            let _ = finished.send(());
        })?;
        Ok((
            Self {
                tx,
                room: Arc::new(Semaphore::new(max_bytes as usize)),
                max_bytes,
                stop,
                overflow: config.overflow,
                durability: config.durability,
                capacity: config.capacity,
                metrics,
            },
            writer,
        ))
    }

    /// Queue a decision record. When the queue is full (in records or in bytes), `block`
    /// waits for room within its bound and then refuses: the decision must not be answered
    /// without its record. `drop`, an explicit opt-in, answers anyway and counts the loss.
    ///
    /// Under `durability = commit` it returns only once the group commit that holds the
    /// record has committed, and refuses the decision if that commit failed.
    pub async fn record(&self, decision: NewDecision) -> Result<(), Unrecorded> {
        let (committed, written) = match self.durability {
            Durability::Commit => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            Durability::Queued => (None, None),
        };
        if self.queue(decision, committed).await {
            return match written {
                None => Ok(()),
                // A writer that ends without saying has not committed it.
                Some(rx) => match rx.await {
                    Ok(true) => Ok(()),
                    Ok(false) | Err(_) => {
                        self.metrics.decision_log_refused.inc();
                        Err(Unrecorded)
                    }
                },
            };
        }
        match self.overflow {
            Overflow::Drop => {
                self.metrics.decision_log_dropped.inc();
                Ok(())
            }
            Overflow::Block(_) => {
                self.metrics.decision_log_refused.inc();
                Err(Unrecorded)
            }
        }
    }

    async fn queue(&self, decision: NewDecision, committed: Option<oneshot::Sender<bool>>) -> bool {
        let bytes = record_bytes(&decision).min(self.max_bytes);
        // One wait for both bounds, bytes and records.
        let until = match self.overflow {
            Overflow::Block(wait) => Some(tokio::time::Instant::now() + wait),
            Overflow::Drop => None,
        };
        let room = match self.room.clone().try_acquire_many_owned(bytes) {
            Ok(room) => room,
            Err(tokio::sync::TryAcquireError::Closed) => return false,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                let Some(until) = until else {
                    return false;
                };
                match tokio::time::timeout_at(until, self.room.clone().acquire_many_owned(bytes))
                    .await
                {
                    Ok(Ok(room)) => room,
                    _ => return false,
                }
            }
        };
        let item = Queued {
            decision,
            _room: room,
            committed,
        };
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(item)) => match until {
                None => false,
                Some(until) => matches!(
                    tokio::time::timeout_at(until, self.tx.send(item)).await,
                    Ok(Ok(()))
                ),
            },
        }
    }

    /// Bytes the queued records hold, by the estimate the byte bound uses.
    pub fn queued_bytes(&self) -> u64 {
        u64::from(self.max_bytes).saturating_sub(self.room.available_permits() as u64)
    }

    /// Ask the writer to write what is queued and stop.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Records waiting in the queue, read off the channel itself.
    pub fn depth(&self) -> u64 {
        (self.tx.max_capacity() - self.tx.capacity()) as u64
    }

    pub fn status(&self) -> LogStatus {
        LogStatus {
            queue_depth: self.depth(),
            capacity: self.capacity,
            queued_bytes: self.queued_bytes(),
            max_bytes: u64::from(self.max_bytes),
            overflow: match self.overflow {
                Overflow::Block(_) => "block",
                Overflow::Drop => "drop",
            },
            durability: match self.durability {
                Durability::Queued => "queued",
                Durability::Commit => "commit",
            },
            dropped: self.metrics.decision_log_dropped.get(),
            refused: self.metrics.decision_log_refused.get(),
            written: self.metrics.decision_log_written.get(),
            write_errors: self.metrics.decision_log_write_errors.get(),
        }
    }
}

/// The writer's own connection, opened here so that its database threads start at this
/// thread's priority; retried with backoff while the database is unreachable (records queue
/// meanwhile, under the overflow policy). `None` when the stop comes first.
async fn own_store(store: &Store, stopped: &CancellationToken) -> Option<Store> {
    let mut delay = Duration::from_millis(250);
    loop {
        match store.log_writer().await {
            Ok(own) => return Some(own),
            Err(e) => {
                tracing::warn!(error = %e, retry_ms = delay.as_millis() as u64, "decision log: cannot open its connection");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped.cancelled() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

async fn write_loop(
    store: &Store,
    mut rx: mpsc::Receiver<Queued>,
    stopped: CancellationToken,
    batch_size: usize,
    linger: Duration,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::with_capacity(batch_size);
    // A stop already seen (while the connection was being opened) goes straight to the drain.
    while !stopped.is_cancelled() {
        tokio::select! {
            biased;
            _ = stopped.cancelled() => break,
            n = rx.recv_many(&mut batch, batch_size) => {
                if n == 0 {
                    break;
                }
                // Let the batch fill for a moment: a commit (and its fsync) per record would
                // cost more than the records themselves. The writer sleeps rather than waits
                // on the queue, so the requests queueing records meanwhile do not each wake
                // it: one wake-up per batch, not per decision.
                if batch.len() < batch_size {
                    tokio::select! {
                        _ = tokio::time::sleep(linger) => {}
                        _ = stopped.cancelled() => {}
                    }
                    if !rx.is_empty() {
                        let room = batch_size - batch.len();
                        rx.recv_many(&mut batch, room).await;
                    }
                }
                write(store, &mut batch, &metrics).await;
                if stopped.is_cancelled() {
                    break;
                }
            }
        }
    }
    // Everything queued before the stop is written, batch by batch.
    rx.close();
    while rx.recv_many(&mut batch, batch_size).await > 0 {
        write(store, &mut batch, &metrics).await;
    }
    tracing::debug!("decision log writer stopped");
}

async fn write(store: &Store, queued: &mut Vec<Queued>, metrics: &Metrics) {
    // The records' room in the queue is given back only once they are written (or lost).
    let mut batch = Vec::with_capacity(queued.len());
    let mut held = Vec::with_capacity(queued.len());
    for q in queued.drain(..) {
        batch.push(q.decision);
        held.push((q._room, q.committed));
    }
    let n = batch.len() as u64;
    let mut committed = false;
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=WRITE_ATTEMPTS {
        match store.append_decisions(&batch).await {
            Ok(()) => {
                metrics.decision_log_written.inc_by(n);
                committed = true;
                break;
            }
            Err(e) if attempt < WRITE_ATTEMPTS => {
                tracing::warn!(error = %e, attempt, records = n, "decision log write failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 4;
            }
            Err(e) => {
                tracing::error!(error = %e, records = n, "decision log write failed; records lost");
                metrics.decision_log_write_errors.inc_by(n);
            }
        }
    }
    for (_room, waiter) in held {
        if let Some(waiter) = waiter {
            let _ = waiter.send(committed);
        }
    }
}

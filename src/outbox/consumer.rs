//! The consumer loop: wake on a notification, an in-process signal or a jittered poll; claim
//! a batch of this generation's due rows; handle them one at a time; on shutdown finish the
//! row in hand and release the rest.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use tokio::sync::watch;

use super::{HandlerError, Registry, RetryPolicy};
use crate::config::OutboxConfig;
use crate::store::{Completion, Notifications, OutboxRow, Store};

/// How the consumer learns of new rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Wiring {
    /// Postgres notifications, with polling behind them (or the in-process wake on SQLite).
    Wired,
    /// Polling alone: notifications are unavailable or their connection is down.
    Polling,
    /// No consumer runs in this process.
    Off,
}

/// The consumer's state, shared with `/health`.
#[derive(Debug)]
pub struct OutboxState {
    wiring: AtomicU8,
}

impl Default for OutboxState {
    fn default() -> Self {
        Self {
            wiring: AtomicU8::new(2),
        }
    }
}

impl OutboxState {
    pub fn wiring(&self) -> Wiring {
        match self.wiring.load(Ordering::Relaxed) {
            0 => Wiring::Wired,
            1 => Wiring::Polling,
            _ => Wiring::Off,
        }
    }

    fn set(&self, w: Wiring) {
        let n = match w {
            Wiring::Wired => 0,
            Wiring::Polling => 1,
            Wiring::Off => 2,
        };
        if self.wiring.swap(n, Ordering::Relaxed) != n {
            tracing::info!(wiring = ?w, "outbox consumer wiring changed");
        }
    }
}

/// How often a listening connection is checked when no notification arrives.
const LISTENER_PING: Duration = Duration::from_secs(15);

/// The consumer of one generation.
pub struct Consumer {
    store: Store,
    registry: Registry,
    config: OutboxConfig,
    generation: i64,
    /// Identifies this worker's claims.
    worker: String,
    state: Arc<OutboxState>,
}

impl Consumer {
    pub fn new(
        store: Store,
        registry: Registry,
        config: OutboxConfig,
        generation: i64,
        state: Arc<OutboxState>,
    ) -> Self {
        let worker = format!(
            "worker-{}-{:08x}",
            std::process::id(),
            rand::thread_rng().gen::<u32>()
        );
        Self {
            store,
            registry,
            config,
            generation,
            worker,
            state,
        }
    }

    /// This worker's id, as recorded on the rows it claims.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            base: self.config.retry_base,
            cap: self.config.retry_cap,
            max_attempts: self.config.max_attempts,
        }
    }

    fn jittered_poll(&self) -> Duration {
        let base = self.config.poll_interval.as_secs_f64();
        Duration::from_secs_f64(base * rand::thread_rng().gen_range(0.8..1.2))
    }

    /// Run until `stop` turns true. The row being handled when it does is finished and its
    /// result recorded; rows claimed but not started go back to pending.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut listener = None;
        let mut retry_listen = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(250);
        let mut next_rescue = tokio::time::Instant::now();
        self.state.set(Wiring::Polling);
        tracing::info!(generation = self.generation, worker = %self.worker, "outbox consumer started");
        while !*stop.borrow() {
            if listener.is_none()
                && self.config.listen
                && tokio::time::Instant::now() >= retry_listen
            {
                match self.store.listen_outbox().await {
                    Ok(Some(l)) => {
                        listener = Some(l);
                        backoff = Duration::from_millis(250);
                        self.state.set(Wiring::Wired);
                    }
                    // SQLite: the in-process wake is the notification.
                    Ok(None) => self.state.set(Wiring::Wired),
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox listener unavailable; polling");
                        self.state.set(Wiring::Polling);
                        retry_listen = tokio::time::Instant::now() + backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
            if tokio::time::Instant::now() >= next_rescue {
                match self.store.rescue(self.generation, self.config.lease).await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(rows = n, "rescued rows whose worker's lease expired"),
                    Err(e) => tracing::warn!(error = %e, "lease rescue failed"),
                }
                next_rescue = tokio::time::Instant::now() + self.config.lease / 2;
            }
            // Registered before the claim, so a commit that lands after the claim's snapshot
            // still wakes the wait below.
            let wake = self.store.local_wake().notified();
            let claimed = match self
                .store
                .claim(self.generation, &self.worker, self.config.batch_size)
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming outbox rows failed");
                    Vec::new()
                }
            };
            if !claimed.is_empty() {
                self.handle_batch(claimed, &stop).await;
                continue;
            }
            // Nothing due: wait for a reason to look again.
            tokio::select! {
                // A dropped sender means the supervisor is gone: stop as well.
                changed = stop.changed() => if changed.is_err() { break },
                _ = wake => {}
                _ = tokio::time::sleep(self.jittered_poll()) => {}
                // Time to try listening again.
                _ = tokio::time::sleep_until(retry_listen),
                    if listener.is_none() && self.config.listen && self.store.backend() == crate::store::Backend::Postgres => {}
                lost = wait_listener(&mut listener) => {
                    if let Err(e) = lost {
                        tracing::warn!(error = %e, "outbox listener lost; polling until it reconnects");
                        listener = None;
                        self.state.set(Wiring::Polling);
                        retry_listen = tokio::time::Instant::now() + backoff;
                    }
                }
            }
        }
        self.state.set(Wiring::Off);
        tracing::info!(worker = %self.worker, "outbox consumer stopped");
    }

    async fn handle_batch(&self, rows: Vec<OutboxRow>, stop: &watch::Receiver<bool>) {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        // Every row of the batch was claimed now, and its lease runs from now: a row is not
        // started once half of it has passed, or a slow batch would let another worker rescue
        // rows this one is still going to handle, and both would run them.
        let claimed = tokio::time::Instant::now();
        for (i, row) in rows.iter().enumerate() {
            let stopping = *stop.borrow();
            if stopping || claimed.elapsed() > self.config.lease / 2 {
                let rest = &ids[i..];
                match self.store.release(&self.worker, rest).await {
                    Ok(n) if stopping => {
                        tracing::info!(rows = n, "released claimed rows on shutdown")
                    }
                    Ok(n) => tracing::debug!(rows = n, "released the rest of a slow batch"),
                    Err(e) => {
                        tracing::warn!(error = %e, "releasing claimed rows failed; their lease will expire")
                    }
                }
                return;
            }
            self.handle(row).await;
        }
    }

    /// Handle one claimed row and record the outcome.
    pub async fn handle(&self, row: &OutboxRow) {
        let Some(handler) = self.registry.get(&row.event_type).cloned() else {
            let error = format!("no handler for event type '{}'", row.event_type);
            self.record_failure(row, &error, None).await;
            return;
        };
        let policy = handler.policy(self.policy());
        let span = tracing::info_span!("outbox", id = row.id, event = %row.event_type, handler = handler.name(), attempt = row.attempts);
        let _enter = span.enter();
        match handler.handle(row).await {
            Ok(effect) => {
                match self
                    .store
                    .complete(row, &self.worker, handler.name(), &effect)
                    .await
                {
                    Ok(Completion::Applied) => tracing::debug!("handled"),
                    Ok(Completion::Duplicate) => {
                        tracing::info!("already handled; delivered with no second effect")
                    }
                    Ok(Completion::Lost) => {
                        tracing::warn!("claim lost to a lease rescue; result discarded")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "recording the result failed; the row will be rescued")
                    }
                }
            }
            Err(HandlerError::Terminal(error)) => self.record_failure(row, &error, None).await,
            Err(HandlerError::Retryable(error)) => {
                let attempts = u32::try_from(row.attempts).unwrap_or(u32::MAX);
                let retry_at = (attempts < policy.max_attempts).then(|| {
                    chrono::Utc::now()
                        + chrono::Duration::from_std(policy.delay(attempts)).unwrap_or_default()
                });
                self.record_failure(row, &error, retry_at).await;
            }
        }
    }

    async fn record_failure(
        &self,
        row: &OutboxRow,
        error: &str,
        retry_at: Option<chrono::DateTime<chrono::Utc>>,
    ) {
        match self.store.fail(row, &self.worker, error, retry_at).await {
            Ok(Some(status)) => tracing::warn!(error, status = status.as_str(), "handler failed"),
            Ok(None) => tracing::warn!(error, "handler failed after its claim was lost"),
            Err(e) => {
                tracing::warn!(error = %e, "recording a failure failed; the row will be rescued")
            }
        }
    }
}

/// Notifications already received that one wake consumes at most (see [`wait_listener`]).
const DRAIN_AT_MOST: usize = 4096;

/// Wait for the listener to report a notification (`Ok`) or its loss (`Err`); never
/// resolves without a listener. A quiet connection is pinged so that a dead one is noticed.
///
/// Every row inserted sends a notification, and one claim serves all of them: the ones that
/// have already arrived are consumed with the first, so that a burst of N inserts costs one
/// claim rather than N. The bound keeps a steady stream of notifications from starving the
/// claim.
async fn wait_listener(
    listener: &mut Option<Notifications>,
) -> Result<(), crate::store::StoreError> {
    let Some(l) = listener.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        match tokio::time::timeout(LISTENER_PING, l.next()).await {
            Ok(result) => {
                result?;
                for _ in 0..DRAIN_AT_MOST {
                    // A zero timeout polls once: it yields a notification only if one is
                    // already there.
                    match tokio::time::timeout(Duration::ZERO, l.next()).await {
                        Ok(more) => drop(more?),
                        Err(_) => break,
                    }
                }
                return Ok(());
            }
            Err(_) => l.ping().await?,
        }
    }
}

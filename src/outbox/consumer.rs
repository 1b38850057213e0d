//! The consumer loop: wake on a notification, an in-process signal or a jittered poll; claim
//! a batch of this generation's due rows; run their handlers one at a time, then complete the
//! rows that succeeded in one transaction; on shutdown finish the row in hand, complete what
//! was handled and release the rest. Counts what it does in the workers' metrics
//! (`docs/operations.md`).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{HandlerError, Registry, RetryPolicy};
use crate::config::OutboxConfig;
use crate::store::{Completion, Effect, Handled, Notifications, OutboxRow, OutboxStatus, Store};
use crate::telemetry::Metrics;

/// How the consumer learns of new rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Wiring {
    /// Postgres notifications, with polling behind them; on SQLite, the in-process wake of
    /// the store the producers commit through.
    Wired,
    /// Polling alone: notifications are unavailable or their connection is down, or (SQLite)
    /// the producers run in another process.
    Polling,
    /// No consumer runs in this process.
    Off,
    /// The workers runtime ended without being asked to: the process is not ready.
    Failed,
}

impl Wiring {
    /// Its index in [`crate::telemetry::CONSUMER_STATES`] and in [`OutboxState`].
    fn index(self) -> u8 {
        match self {
            Wiring::Wired => 0,
            Wiring::Polling => 1,
            Wiring::Off => 2,
            Wiring::Failed => 3,
        }
    }
}

/// The consumer's state, shared with `/health`, and the metrics it counts in.
pub struct OutboxState {
    wiring: AtomicU8,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for OutboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxState")
            .field("wiring", &self.wiring())
            .finish_non_exhaustive()
    }
}

impl Default for OutboxState {
    /// A state whose metrics nobody exposes (tests, benchmarks).
    fn default() -> Self {
        Self::new(Arc::new(Metrics::default()))
    }
}

impl OutboxState {
    /// The metrics the state counts in.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// A consumer's state that counts in `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            wiring: AtomicU8::new(Wiring::Off.index()),
            metrics,
        }
    }

    pub fn wiring(&self) -> Wiring {
        match self.wiring.load(Ordering::Relaxed) {
            0 => Wiring::Wired,
            1 => Wiring::Polling,
            3 => Wiring::Failed,
            _ => Wiring::Off,
        }
    }

    /// Record a new wiring. `Failed` is final: a consumer stopping after it does not hide it.
    pub fn set(&self, w: Wiring) {
        let n = w.index();
        let before = self
            .wiring
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                (old != Wiring::Failed.index()).then_some(n)
            });
        if let Ok(old) = before {
            self.metrics.outbox.set_state(usize::from(n));
            if old != n {
                tracing::info!(wiring = ?w, "outbox consumer wiring changed");
            }
        }
    }
}

/// How often the consumer refreshes the row counts its metrics show.
const COUNT_EVERY: Duration = Duration::from_secs(5);

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
    /// Whether the producers commit through this consumer's store (or one sharing its
    /// wake): only then does the in-process wake reach it on SQLite.
    woken_in_process: bool,
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
            woken_in_process: true,
        }
    }

    /// Say whether the producers commit through a store that shares this consumer's wake
    /// (the default). A consumer in a process of its own is not: on SQLite it only polls.
    pub fn woken_in_process(mut self, yes: bool) -> Self {
        self.woken_in_process = yes;
        self
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

    /// Run until `stop` is cancelled. The row being handled then is finished and its result
    /// recorded; rows claimed but not started go back to pending.
    ///
    /// Fails when every claim for a whole lease has failed: the store is out of reach, the
    /// rows this worker holds are being rescued by others, and the process should say it
    /// cannot do its work rather than keep looking ready (ARCHITECTURE.md, "Supervisor").
    pub async fn run(self, stop: CancellationToken) -> Result<(), crate::store::StoreError> {
        let mut failing_since: Option<tokio::time::Instant> = None;
        let mut listener = None;
        let mut retry_listen = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(250);
        let mut next_rescue = tokio::time::Instant::now();
        self.state.set(Wiring::Polling);
        tracing::info!(generation = self.generation, worker = %self.worker, "outbox consumer started");
        let mut next_count = tokio::time::Instant::now();
        while !stop.is_cancelled() {
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
                    // SQLite: the in-process wake is the notification, when it reaches us.
                    Ok(None) if self.woken_in_process => self.state.set(Wiring::Wired),
                    Ok(None) => self.state.set(Wiring::Polling),
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
            if tokio::time::Instant::now() >= next_count {
                if let Ok(c) = self.store.outbox_counts(self.generation).await {
                    let outbox = &self.state.metrics.outbox;
                    outbox.set_rows(c.pending, c.in_flight, c.failed);
                    // Milliseconds to seconds; a clock skewed into the future reads as 0.
                    outbox
                        .oldest_pending_age
                        .set(c.oldest_pending_ms.unwrap_or(0).max(0) as f64 / 1000.0);
                }
                next_count = tokio::time::Instant::now() + COUNT_EVERY;
            }
            // Registered before the claim, so a commit that lands after the claim's snapshot
            // still wakes the wait below.
            let wake = self.store.local_wake().notified();
            let claimed = match self
                .store
                .claim(self.generation, &self.worker, self.config.batch_size)
                .await
            {
                Ok(rows) => {
                    failing_since = None;
                    rows
                }
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= self.config.lease {
                        tracing::error!(error = %e, lease_ms = self.config.lease.as_millis() as u64, "every claim failed for a whole lease; the consumer gives up");
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "claiming outbox rows failed");
                    Vec::new()
                }
            };
            let outbox = &self.state.metrics.outbox;
            for row in &claimed {
                outbox.claimed.with_label_values(&[&row.event_type]).inc();
            }
            if !claimed.is_empty() {
                self.handle_batch(claimed, &stop).await;
                continue;
            }
            // Nothing due: wait for a reason to look again.
            tokio::select! {
                _ = stop.cancelled() => break,
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
        Ok(())
    }

    async fn handle_batch(&self, rows: Vec<OutboxRow>, stop: &CancellationToken) {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        // Every row of the batch was claimed now, and its lease runs from now: a row is not
        // started once half of it has passed, or a slow batch would let another worker rescue
        // rows this one is still going to handle, and both would run them.
        let claimed = tokio::time::Instant::now();
        let mut done = Vec::with_capacity(rows.len());
        let mut unstarted = (&ids[ids.len()..], false);
        for (i, row) in rows.iter().enumerate() {
            let stopping = stop.is_cancelled();
            if stopping || claimed.elapsed() > self.config.lease / 2 {
                unstarted = (&ids[i..], stopping);
                break;
            }
            if let Some((handler, effect)) = self.run_handler(row).await {
                done.push((row, handler, effect));
            }
        }
        self.complete(&done).await;
        let (rest, stopping) = unstarted;
        if rest.is_empty() {
            return;
        }
        match self.store.release(&self.worker, rest).await {
            Ok(n) if stopping => tracing::info!(rows = n, "released claimed rows on shutdown"),
            Ok(n) => tracing::debug!(rows = n, "released the rest of a slow batch"),
            Err(e) => {
                tracing::warn!(error = %e, "releasing claimed rows failed; their lease will expire")
            }
        }
    }

    /// Handle one claimed row and record the outcome.
    pub async fn handle(&self, row: &OutboxRow) {
        if let Some((handler, effect)) = self.run_handler(row).await {
            self.complete(&[(row, handler, effect)]).await;
        }
    }

    /// Run the row's handler: its name and the effect to apply when it succeeded. A failure
    /// is recorded at once (a retry later, or the dead-letter queue).
    async fn run_handler(&self, row: &OutboxRow) -> Option<(&'static str, Effect)> {
        let Some(handler) = self.registry.get(&row.event_type).cloned() else {
            let error = format!("no handler for event type '{}'", row.event_type);
            self.record_failure(row, &error, None).await;
            return None;
        };
        let span = tracing::info_span!("outbox", id = row.id, event = %row.event_type, handler = handler.name(), attempt = row.attempts);
        async {
            let policy = handler.policy(self.policy());
            match handler.handle(row).await {
                Ok(effect) => Some((handler.name(), effect)),
                Err(HandlerError::Terminal(error)) => {
                    self.record_failure(row, &error, None).await;
                    None
                }
                Err(HandlerError::Retryable(error)) => {
                    let attempts = u32::try_from(row.attempts).unwrap_or(u32::MAX);
                    let retry_at = (attempts < policy.max_attempts).then(|| {
                        chrono::Utc::now()
                            + chrono::Duration::from_std(policy.delay(attempts)).unwrap_or_default()
                    });
                    self.record_failure(row, &error, retry_at).await;
                    None
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Complete the rows whose handlers succeeded, all in one transaction. When that fails,
    /// nothing of it was written, and the rows are completed one at a time: a row whose effect
    /// cannot be applied then fails alone and is rescued later, and the others are delivered.
    async fn complete(&self, done: &[(&OutboxRow, &'static str, Effect)]) {
        let batch: Vec<Handled<'_>> = done
            .iter()
            .map(|(row, handler, effect)| Handled {
                row,
                handler,
                effect,
            })
            .collect();
        if batch.is_empty() {
            return;
        }
        match self.store.complete_batch(&self.worker, &batch).await {
            Ok(outcomes) => {
                for (handled, outcome) in batch.iter().zip(outcomes) {
                    self.record_completion(handled, Ok(outcome));
                }
            }
            Err(e) if batch.len() == 1 => self.record_completion(&batch[0], Err(e)),
            Err(e) => {
                tracing::warn!(error = %e, rows = batch.len(), "completing a batch in one transaction failed; completing its rows one at a time");
                for handled in &batch {
                    let outcome = self
                        .store
                        .complete(handled.row, &self.worker, handled.handler, handled.effect)
                        .await;
                    self.record_completion(handled, outcome);
                }
            }
        }
    }

    fn record_completion(
        &self,
        handled: &Handled<'_>,
        outcome: Result<Completion, crate::store::StoreError>,
    ) {
        let row = handled.row;
        let _span = tracing::info_span!("outbox", id = row.id, event = %row.event_type, handler = handled.handler, attempt = row.attempts).entered();
        match outcome {
            Ok(Completion::Applied) => {
                self.count_handled(row);
                tracing::debug!("handled")
            }
            Ok(Completion::Duplicate) => {
                self.count_handled(row);
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

    fn count_handled(&self, row: &OutboxRow) {
        self.state
            .metrics
            .outbox
            .handled
            .with_label_values(&[&row.event_type])
            .inc();
    }

    async fn record_failure(
        &self,
        row: &OutboxRow,
        error: &str,
        retry_at: Option<chrono::DateTime<chrono::Utc>>,
    ) {
        let outbox = &self.state.metrics.outbox;
        let event_type: &[&str] = &[&row.event_type];
        outbox.failed.with_label_values(event_type).inc();
        match self.store.fail(row, &self.worker, error, retry_at).await {
            Ok(Some(status)) => {
                match status {
                    OutboxStatus::Failed => {
                        outbox.dead_lettered.with_label_values(event_type).inc()
                    }
                    _ => outbox.retried.with_label_values(event_type).inc(),
                }
                tracing::warn!(error, status = status.as_str(), "handler failed")
            }
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

//! Outbox retention: a task of the workers runtime that, every `prune_interval`, removes the
//! delivered rows whose event occurred more than `retention` ago, with their `event_handled`
//! entries, `prune_batch` rows per short transaction, so that the table stays bounded and no
//! producer ever waits behind a long delete. Counted in `spectral_outbox_pruned_total` and
//! logged (docs/operations.md, "Retention").

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::OutboxState;
use crate::config::OutboxConfig;
use crate::store::{Store, StoreError};

/// The retention task of one workers runtime.
pub struct Retention {
    store: Store,
    retention: Duration,
    interval: Duration,
    batch: u32,
    state: Arc<OutboxState>,
}

impl Retention {
    pub fn new(store: Store, config: &OutboxConfig, state: Arc<OutboxState>) -> Self {
        Self {
            store,
            retention: config.retention,
            interval: config.prune_interval,
            batch: config.prune_batch.max(1),
            state,
        }
    }

    /// Prune now and then every interval until `stop`. A failed pass is logged and tried
    /// again at the next interval: retention is never worth stopping the workers for.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            if let Err(e) = self.pass(&stop).await {
                tracing::warn!(error = %e, "outbox retention pass failed; trying again later");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// One pass: batches until one comes back short (or `stop`); the rows removed.
    pub async fn pass(&self, stop: &CancellationToken) -> Result<u64, StoreError> {
        // A retention longer than time itself keeps everything.
        let before = chrono::Duration::from_std(self.retention)
            .ok()
            .and_then(|keep| chrono::Utc::now().checked_sub_signed(keep))
            .unwrap_or(chrono::DateTime::<chrono::Utc>::UNIX_EPOCH);
        let mut total = 0;
        while !stop.is_cancelled() {
            let n = self.store.prune_outbox(before, self.batch).await?;
            total += n;
            self.state.metrics().outbox.pruned.inc_by(n);
            if n < u64::from(self.batch) {
                break;
            }
            // Between batches, let the consumer (on this runtime) run.
            tokio::task::yield_now().await;
        }
        if total > 0 {
            tracing::info!(
                rows = total,
                before = %before,
                "outbox retention removed delivered rows"
            );
        }
        Ok(total)
    }
}

//! The outbox consumer and its handlers (ARCHITECTURE.md): events written in the transaction of the
//! change they describe are claimed by the workers runtime, handled once in effect, retried
//! with backoff, and kept as a dead-letter queue when they fail for good.
//!
//! **Boundary:** no SQL (effects are data the store applies) and no HTTP server types; the
//! webhook handler is the one place that makes outbound HTTP calls.
//!
//! **Invariants:** a handler's effect and its `event_handled` row commit together, so a row
//! handled twice (after a crash, a lease rescue or a replay) has one effect; a consumer only
//! claims rows of its own generation.

mod consumer;
mod event;
pub mod handlers;
mod retention;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

pub use consumer::{Consumer, OutboxState, Wiring};
pub use event::{
    events, AgentTaskCreated, DecisionRecorded, Delivery, Event, EventError, ListedDecision,
    ModuleDeployed, PublishedModule, RecordedBatch, RuleCandidateProposed, RuleCount,
    VersionPublished, VersionRetired,
};
pub use retention::Retention;

use crate::store::{Effect, OutboxRow};

/// A future a handler returns.
pub type HandlerFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Effect, HandlerError>> + Send + 'a>>;

/// Why a handler could not handle a row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Worth trying again later (a subscriber is down, a timeout).
    #[error("{0}")]
    Retryable(String),
    /// Will never succeed (the payload is malformed, the subscriber refuses it): fail now.
    #[error("{0}")]
    Terminal(String),
}

/// How a handler's failures are retried: exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub cap: Duration,
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
            max_attempts: 5,
        }
    }
}

impl RetryPolicy {
    /// The delay before the attempt after `attempt` (1-based): uniform in
    /// `[0, min(cap, base × 2^(attempt-1))]`, so that many failing rows do not retry in step.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let ceiling = self.base.saturating_mul(1u32 << exp).min(self.cap);
        let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rand::thread_rng().gen_range(0..=micros))
    }
}

/// Something that handles one event type.
pub trait Handler: Send + Sync {
    /// The name under which handled events are recorded; stable across releases.
    fn name(&self) -> &'static str;

    /// Its retry policy; handlers may override the consumer's default.
    fn policy(&self, default: RetryPolicy) -> RetryPolicy {
        default
    }

    /// Handle a row, returning the effect to apply with it.
    fn handle<'a>(&'a self, row: &'a OutboxRow) -> HandlerFuture<'a>;
}

/// Handlers by event type.
#[derive(Clone, Default)]
pub struct Registry {
    by_type: HashMap<String, Arc<dyn Handler>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `handler` for `event_type`, replacing any other.
    pub fn register(&mut self, event_type: &str, handler: Arc<dyn Handler>) -> &mut Self {
        self.by_type.insert(event_type.to_string(), handler);
        self
    }

    pub fn get(&self, event_type: &str) -> Option<&Arc<dyn Handler>> {
        self.by_type.get(event_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_full_jitter() {
        let p = RetryPolicy::default();
        for attempt in 1..=12 {
            let ceiling = Duration::from_secs(1 << (attempt - 1)).min(Duration::from_secs(300));
            for _ in 0..50 {
                assert!(p.delay(attempt) <= ceiling, "attempt {attempt}");
            }
        }
        // Jitter: not every delay of an attempt is the same.
        let delays: std::collections::BTreeSet<Duration> = (0..20).map(|_| p.delay(8)).collect();
        assert!(delays.len() > 10);
        assert!(p.delay(u32::MAX) <= Duration::from_secs(300));
    }
}

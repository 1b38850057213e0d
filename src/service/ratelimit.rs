//! Rate limits per key and per world, so that one tenant's flood cannot take the capacity
//! another tenant's requests need (docs/operations.md, "Rate limits").
//!
//! Each limit is a GCRA token bucket from the `governor` crate, one state per key id or
//! world name, in a sharded map. A check of a known key or world hashes the name it is given
//! and does one compare-and-swap: no allocation, no lock held across the check. A name is
//! copied into the map once, the first time it is seen.
//!
//! [`RateLimiter::check`] is the reusable piece: any endpoint that acts for a key on a world
//! (decide, authoring, the agent's) asks it with the [`Kind`] of its work before doing it.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::RateConfig;
use crate::telemetry::Metrics;

/// The work a request asks for; each kind has its own buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Decisions (`/api/decide`, each item of `/api/decide/batch`).
    Decide,
    /// Calls that change or inspect a world's authoring state: drafts, publish, deploy,
    /// retire, webhooks, the World Agent.
    Authoring,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    DecidePerKey,
    DecidePerWorld,
    AuthoringPerKey,
    AuthoringPerWorld,
}

impl Limit {
    /// The stable name: the `limit` label of `spectral_rate_limited_total` and the problem's
    /// `limit` member.
    pub fn as_str(self) -> &'static str {
        crate::telemetry::RATE_LIMITS[self.index()]
    }

    fn index(self) -> usize {
        self as usize
    }

    fn per_key(self) -> bool {
        matches!(self, Self::DecidePerKey | Self::AuthoringPerKey)
    }
}

/// A request over a rate limit: which one, and when the same request would next be let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    pub limit: Limit,
    /// The limit's rate per second.
    pub per_second: u32,
    pub retry_after: Duration,
}

impl RateLimited {
    /// `Retry-After` in whole seconds, rounded up and at least 1 (the header has no fractions).
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

impl std::fmt::Display for RateLimited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let whose = if self.limit.per_key() {
            "this key"
        } else {
            "this world"
        };
        write!(
            f,
            "{whose} is over its rate of {} requests per second; retry in {} s",
            self.per_second,
            self.retry_after_secs()
        )
    }
}

/// A keyed bucket per name and its rate.
struct Bucket {
    limiter: DefaultKeyedRateLimiter<String>,
    per_second: u32,
    limit: Limit,
}

/// How many checks pass between two sweeps of names whose buckets are full again.
const SWEEP_EVERY: u32 = 1 << 16;

/// The process's rate limits. Cheap to share: hold it in an `Arc`.
pub struct RateLimiter {
    /// `None` when limits are off (`SPECTRAL_RATE_LIMITS=off`).
    buckets: Option<[Bucket; 4]>,
    clock: DefaultClock,
    metrics: Arc<Metrics>,
    checks: AtomicU32,
}

impl RateLimiter {
    /// The limits of `config`, counting refusals in `metrics`.
    pub fn new(config: &RateConfig, metrics: Arc<Metrics>) -> Self {
        let bucket = |limit: Limit, per_second: u32| {
            let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
            let burst =
                NonZeroU32::new(per_second.saturating_mul(config.burst_seconds)).unwrap_or(rate);
            Bucket {
                limiter: DefaultKeyedRateLimiter::dashmap(
                    Quota::per_second(rate).allow_burst(burst),
                ),
                per_second,
                limit,
            }
        };
        let buckets = config.enabled.then(|| {
            [
                bucket(Limit::DecidePerKey, config.decide_per_key),
                bucket(Limit::DecidePerWorld, config.decide_per_world),
                bucket(Limit::AuthoringPerKey, config.authoring_per_key),
                bucket(Limit::AuthoringPerWorld, config.authoring_per_world),
            ]
        });
        Self {
            buckets,
            clock: DefaultClock::default(),
            metrics,
            checks: AtomicU32::new(0),
        }
    }

    /// Take `n` requests of `kind` for key `key_id` and, when it is known, `world`; refused
    /// when either bucket lacks them. The key is checked first, so that a key over its own
    /// rate does not spend its world's.
    pub fn check(
        &self,
        kind: Kind,
        key_id: &String,
        world: Option<&String>,
        n: u32,
    ) -> Result<(), RateLimited> {
        let Some(buckets) = &self.buckets else {
            return Ok(());
        };
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(());
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            for b in buckets {
                b.limiter.retain_recent();
            }
        }
        let [decide_key, decide_world, authoring_key, authoring_world] = buckets;
        let (by_key, by_world) = match kind {
            Kind::Decide => (decide_key, decide_world),
            Kind::Authoring => (authoring_key, authoring_world),
        };
        self.take(by_key, key_id, n)?;
        if let Some(world) = world {
            self.take(by_world, world, n)?;
        }
        Ok(())
    }

    fn take(&self, bucket: &Bucket, name: &String, n: NonZeroU32) -> Result<(), RateLimited> {
        let refused = |retry_after: Duration| {
            self.metrics.rate_limited[bucket.limit.index()].inc();
            RateLimited {
                limit: bucket.limit,
                per_second: bucket.per_second,
                retry_after,
            }
        };
        match bucket.limiter.check_key_n(name, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(refused(not_until.wait_time_from(self.clock.now()))),
            // More at once than the bucket ever holds: a batch larger than the burst. It
            // can never pass whole; the caller is told to wait a second and send less.
            Err(_) => Err(refused(Duration::from_secs(1))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: u32) -> RateLimiter {
        let config = RateConfig {
            decide_per_key: per_second,
            decide_per_world: per_second * 2,
            burst_seconds: 1,
            ..RateConfig::default()
        };
        RateLimiter::new(&config, Arc::new(Metrics::new()))
    }

    #[test]
    fn a_key_over_its_rate_is_refused_and_another_key_is_not() {
        let l = limiter(5);
        let (a, b, w) = ("key_a".to_string(), "key_b".to_string(), "w".to_string());
        for _ in 0..5 {
            assert_eq!(l.check(Kind::Decide, &a, None, 1), Ok(()));
        }
        let refused = l
            .check(Kind::Decide, &a, None, 1)
            .expect_err("the sixth request passed");
        assert_eq!(refused.limit, Limit::DecidePerKey);
        assert_eq!(refused.retry_after_secs(), 1);
        assert_eq!(l.check(Kind::Decide, &b, Some(&w), 1), Ok(()));
        // Authoring has buckets of its own.
        assert_eq!(l.check(Kind::Authoring, &a, Some(&w), 1), Ok(()));
        assert_eq!(l.metrics.rate_limited[0].get(), 1);
    }

    #[test]
    fn a_world_is_limited_across_its_keys_and_a_batch_counts_its_items() {
        let l = limiter(100);
        let w = "w".to_string();
        // 200 per second for the world, 100 per key: two keys fill it.
        assert_eq!(l.check(Kind::Decide, &"k1".into(), Some(&w), 100), Ok(()));
        assert_eq!(l.check(Kind::Decide, &"k2".into(), Some(&w), 100), Ok(()));
        let third = l.check(Kind::Decide, &"k3".into(), Some(&w), 1);
        assert_eq!(third.map_err(|e| e.limit), Err(Limit::DecidePerWorld));
        // Another world is untouched.
        assert_eq!(
            l.check(Kind::Decide, &"k3".into(), Some(&"v".into()), 1),
            Ok(())
        );
        // More than a bucket holds can never pass.
        let big = l.check(Kind::Decide, &"k4".into(), None, 101);
        assert_eq!(big.map_err(|e| e.limit), Err(Limit::DecidePerKey));
    }

    #[test]
    fn limits_off_let_everything_through() {
        let config = RateConfig {
            enabled: false,
            decide_per_key: 1,
            ..RateConfig::default()
        };
        let l = RateLimiter::new(&config, Arc::new(Metrics::new()));
        for _ in 0..100 {
            assert_eq!(l.check(Kind::Decide, &"k".into(), None, 1), Ok(()));
        }
    }
}

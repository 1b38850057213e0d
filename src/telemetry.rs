//! Logs and metrics: tracing set-up, and the process's `prometheus` registry. Every label
//! handle the decide path touches is resolved before the first request (per route at start,
//! per world when its version is loaded), so a decision costs atomic adds and no lookup.
//!
//! **Boundary:** depends on nothing else in the crate; everything may depend on it.

use std::time::Duration;

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Install the global tracing subscriber: JSON lines in production, readable text otherwise.
/// Safe to call more than once (later calls are ignored).
pub fn init_tracing(json: bool, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// The routes latency is measured by. A closed set, so every histogram is a fixed array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Decide,
    DecideBatch,
    Draft,
    Publish,
    Deploy,
    Worlds,
    World,
    WorldVersion,
    Retire,
    Actions,
    Stats,
    Webhooks,
    Health,
    ServiceVersion,
    Metrics,
    OpenApi,
    Mcp,
    /// The World Agent's endpoints that answer at once.
    Agent,
    /// The World Agent's event streams (the time is the stream's whole life).
    AgentStream,
    NotFound,
    /// `/api/keys` and the revocations and rotations under it.
    Keys,
    /// Shadows and replays (`/api/worlds/{world}/shadow`, `…/replays`).
    Impact,
}

impl Route {
    pub const ALL: [Route; 22] = [
        Self::Decide,
        Self::DecideBatch,
        Self::Draft,
        Self::Publish,
        Self::Deploy,
        Self::Worlds,
        Self::World,
        Self::WorldVersion,
        Self::Retire,
        Self::Actions,
        Self::Stats,
        Self::Webhooks,
        Self::Health,
        Self::ServiceVersion,
        Self::Metrics,
        Self::OpenApi,
        Self::Mcp,
        Self::Agent,
        Self::AgentStream,
        Self::NotFound,
        Self::Keys,
        Self::Impact,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Decide => "decide",
            Self::DecideBatch => "decide_batch",
            Self::Draft => "draft",
            Self::Publish => "publish",
            Self::Deploy => "deploy",
            Self::Worlds => "worlds",
            Self::World => "world",
            Self::WorldVersion => "world_version",
            Self::Retire => "retire",
            Self::Actions => "actions",
            Self::Stats => "stats",
            Self::Webhooks => "webhooks",
            Self::Health => "health",
            Self::ServiceVersion => "version",
            Self::Metrics => "metrics",
            Self::OpenApi => "openapi",
            Self::Mcp => "mcp",
            Self::Agent => "agent",
            Self::AgentStream => "agent_stream",
            Self::NotFound => "not_found",
            Self::Keys => "keys",
            Self::Impact => "impact",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];

/// Names of the decision statuses, in the order of the per-world counters.
pub const STATUSES: [&str; 4] = ["GREEN", "GREEN-SKIP", "YELLOW", "RED"];

/// The status classes of responses, in the order of the per-route counters.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The rate limits, as the values of `spectral_rate_limited_total`'s `limit` label.
pub const RATE_LIMITS: [&str; 4] = [
    "decide_key",
    "decide_world",
    "authoring_key",
    "authoring_world",
];

/// The states of the outbox consumer, as the values of `spectral_outbox_consumer_state`'s
/// `state` label.
pub const CONSUMER_STATES: [&str; 4] = ["wired", "polling", "off", "failed"];

/// One route's handles: its latency histogram and its counter per status class.
struct RouteMetrics {
    latency: Histogram,
    responses: [IntCounter; 5],
}

/// One world's decision counters, one per status in the order of [`STATUSES`]; resolved when
/// a version of the world is loaded, so that counting a decision is one atomic add.
#[derive(Clone)]
pub struct WorldCounters([IntCounter; 4]);

impl std::fmt::Debug for WorldCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("WorldCounters")
            .field(&self.0.each_ref().map(IntCounter::get))
            .finish()
    }
}

impl WorldCounters {
    /// Count a decision; `status` is an index into [`STATUSES`].
    pub fn add(&self, status: usize) {
        self.0[status % STATUSES.len()].inc();
    }
}

/// The workers runtime's metrics, by event type.
pub struct OutboxMetrics {
    pub claimed: IntCounterVec,
    pub handled: IntCounterVec,
    pub failed: IntCounterVec,
    pub retried: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    /// One gauge per consumer state, 1 for the current one.
    state: [IntGauge; 4],
    /// How long ago the oldest pending event of the generation occurred, as last counted.
    pub oldest_pending_age: Gauge,
    /// This generation's rows by status, as the store last counted them.
    rows: IntGaugeVec,
    /// Delivered rows removed by retention.
    pub pruned: IntCounter,
}

impl OutboxMetrics {
    /// Show `state` (an index into [`CONSUMER_STATES`]) as the consumer's state.
    pub fn set_state(&self, state: usize) {
        for (i, gauge) in self.state.iter().enumerate() {
            gauge.set(i64::from(i == state));
        }
    }

    /// Show the store's counts of this generation's rows.
    pub fn set_rows(&self, pending: i64, in_flight: i64, failed: i64) {
        for (status, n) in [
            ("pending", pending),
            ("in_flight", in_flight),
            ("failed", failed),
        ] {
            self.rows.with_label_values(&[status]).set(n);
        }
    }
}

/// The World Agent's usage, per world (the admin listener's `/metrics` only, as every
/// per-world metric).
pub struct AgentMetrics {
    /// Model calls, by world.
    pub calls: IntCounterVec,
    /// Tokens, by world and `kind` (`prompt`, `completion`).
    pub tokens: IntCounterVec,
    /// Time spent waiting for the model, by world.
    pub call_seconds: prometheus::CounterVec,
    /// Runs ended, by world and final status.
    pub runs: IntCounterVec,
    /// What woke an agent event stream to look at the store: `notification` (Postgres, a
    /// thread event committed by any process), `commit` (one of this process's), or `poll`.
    pub stream_wakes: IntCounterVec,
}

impl AgentMetrics {
    #[expect(clippy::expect_used, reason = "constant names, help and labels")]
    fn new(r: &Registry) -> Self {
        let call_seconds = prometheus::CounterVec::new(
            Opts::new(
                "spectral_agent_llm_seconds_total",
                "Time the World Agent spent in model calls, by world.",
            ),
            &["world"],
        )
        .expect("a valid family");
        Self {
            calls: counter_vec(
                r,
                "spectral_agent_llm_calls_total",
                "Model calls made by the World Agent, by world.",
                &["world"],
            ),
            tokens: counter_vec(
                r,
                "spectral_agent_tokens_total",
                "Tokens the World Agent used, by world and kind (prompt, completion).",
                &["world", "kind"],
            ),
            call_seconds: register(r, call_seconds),
            runs: counter_vec(
                r,
                "spectral_agent_runs_total",
                "World Agent threads ended (runs) or turns answered (chats), by world and status.",
                &["world", "status"],
            ),
            stream_wakes: counter_vec(
                r,
                "spectral_agent_stream_wakes_total",
                "Agent event streams woken to read their thread, by cause (notification, commit, poll).",
                &["by"],
            ),
        }
    }
}

/// Impact analysis: contexts kept for replay, shadow evaluations and replays (docs/impact.md).
pub struct ImpactMetrics {
    /// Decisions of worlds that keep contexts: `[0]` kept, `[1]` not kept, too large.
    pub contexts: [IntCounter; 2],
    /// Contexts removed by age.
    pub contexts_pruned: IntCounter,
    /// Sampled decisions offered to a shadow: `[0]` queued, `[1]` skipped (queue full).
    pub shadow: [IntCounter; 2],
    /// Replays ended, by `status` (`done`, `failed`).
    pub replays: IntCounterVec,
}

impl ImpactMetrics {
    fn new(r: &Registry) -> Self {
        Self {
            contexts: {
                let v = counter_vec(
                    r,
                    "spectral_decision_contexts_total",
                    "Decisions of worlds that keep their contexts, by outcome (kept, too_large).",
                    &["outcome"],
                );
                ["kept", "too_large"].map(|o| v.with_label_values(&[o]))
            },
            contexts_pruned: counter(
                r,
                "spectral_decision_contexts_pruned_total",
                "Kept decision contexts removed by age.",
            ),
            shadow: {
                let v = counter_vec(
                    r,
                    "spectral_shadow_evaluations_total",
                    "Sampled decisions offered to a shadow version, by outcome (queued, skipped).",
                    &["outcome"],
                );
                ["queued", "skipped"].map(|o| v.with_label_values(&[o]))
            },
            replays: counter_vec(
                r,
                "spectral_replays_total",
                "Replays of recorded contexts ended, by status (done, failed).",
                &["status"],
            ),
        }
    }
}

/// The process's metrics, in a registry of their own (one per running service, so that
/// several services in one test process do not share counters).
pub struct Metrics {
    registry: Registry,
    routes: Vec<RouteMetrics>,
    decisions: IntCounterVec,
    sandbox_errors: IntCounterVec,
    cache_loads: [IntCounter; 2],
    queue_depth: IntGauge,
    pub decision_log_dropped: IntCounter,
    pub decision_log_refused: IntCounter,
    pub decision_log_written: IntCounter,
    pub decision_log_write_errors: IntCounter,
    pub connections_shed: IntCounter,
    /// Connections refused because their client address held its share already.
    pub connections_refused_per_address: IntCounter,
    /// Idle connections closed: `[0]` after the idle timeout, `[1]` to make room near the
    /// connection limit.
    pub connections_closed_idle: [IntCounter; 2],
    /// Requests answered 429, one counter per limit in the order of [`RATE_LIMITS`].
    pub rate_limited: [IntCounter; 4],
    pub outbox: OutboxMetrics,
    pub agent: AgentMetrics,
    pub impact: ImpactMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Register a collector. A refusal (a name registered twice) is a bug that the unit test
/// below catches; the metric then goes unexposed.
fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    if let Err(e) = registry.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "a metric could not be registered");
    }
    c
}

/// A counter family. Names, help texts and labels are constants of this file, which the unit
/// test below builds, so a refusal cannot reach a running service.
#[expect(
    clippy::expect_used,
    reason = "constant names, help and labels of this file"
)]
fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("a valid family"),
    )
}

#[expect(clippy::expect_used, reason = "constant names and help of this file")]
fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::new(name, help).expect("a valid counter"),
    )
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    #[expect(
        clippy::expect_used,
        reason = "constant names, help and labels of this file"
    )]
    let vec = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid family");
    register(registry, vec)
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        #[expect(
            clippy::expect_used,
            reason = "constant names, help, buckets and labels"
        )]
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "spectral_http_request_duration_seconds",
                "Time from request to response, by route.",
            )
            .buckets(BUCKETS.to_vec()),
            &["route"],
        )
        .expect("a valid histogram");
        let latency = register(r, latency);
        let responses = counter_vec(
            r,
            "spectral_http_responses_total",
            "Responses by route and status class.",
            &["route", "class"],
        );
        let routes = Route::ALL
            .iter()
            .map(|route| RouteMetrics {
                latency: latency.with_label_values(&[route.as_str()]),
                responses: CLASSES
                    .map(|class| responses.with_label_values(&[route.as_str(), class])),
            })
            .collect();
        let cache_loads = counter_vec(
            r,
            "spectral_cache_loads_total",
            "World versions loaded into the module cache.",
            &["result"],
        );
        let outbox_vec = |name: &str, help: &str| counter_vec(r, name, help, &["event_type"]);
        let state = gauge_vec(
            r,
            "spectral_outbox_consumer_state",
            "The outbox consumer's state in this process: 1 for the current one.",
            &["state"],
        );
        #[expect(clippy::expect_used, reason = "a constant name and help")]
        let oldest_pending_age = Gauge::with_opts(Opts::new(
            "spectral_outbox_oldest_pending_age_seconds",
            "Age of this generation's oldest pending outbox event, as last counted (0 when none is pending).",
        ))
        .expect("a valid gauge");
        let outbox = OutboxMetrics {
            claimed: outbox_vec(
                "spectral_outbox_claimed_total",
                "Outbox rows claimed, by event type.",
            ),
            handled: outbox_vec(
                "spectral_outbox_handled_total",
                "Outbox rows handled and recorded, by event type.",
            ),
            failed: outbox_vec(
                "spectral_outbox_failed_total",
                "Handler failures, retried or not, by event type.",
            ),
            retried: outbox_vec(
                "spectral_outbox_retried_total",
                "Failures scheduled for another attempt, by event type.",
            ),
            dead_lettered: outbox_vec(
                "spectral_outbox_dead_lettered_total",
                "Rows failed for good (the dead-letter queue), by event type.",
            ),
            state: CONSUMER_STATES.map(|s| state.with_label_values(&[s])),
            oldest_pending_age: register(r, oldest_pending_age),
            rows: gauge_vec(
                r,
                "spectral_outbox_rows",
                "This generation's undelivered outbox rows by status, as last counted.",
                &["status"],
            ),
            pruned: counter(
                r,
                "spectral_outbox_pruned_total",
                "Delivered outbox rows removed by retention, with their event_handled entries.",
            ),
        };
        // No consumer until one starts.
        outbox.set_state(2);
        #[expect(clippy::expect_used, reason = "a constant name and help")]
        let queue_depth = IntGauge::new(
            "spectral_decision_log_queue_depth",
            "Decision records waiting to be written.",
        )
        .expect("a valid gauge");
        #[cfg(target_os = "linux")]
        if let Err(e) = r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )) {
            tracing::error!(error = %e, "the process metrics could not be registered");
        }
        Self {
            routes,
            decisions: counter_vec(
                r,
                "spectral_decisions_total",
                "Decisions by world and status.",
                &["world", "status"],
            ),
            sandbox_errors: counter_vec(
                r,
                "spectral_sandbox_errors_total",
                "Predicate failures by kind.",
                &["kind"],
            ),
            cache_loads: [
                cache_loads.with_label_values(&["ok"]),
                cache_loads.with_label_values(&["error"]),
            ],
            queue_depth: register(r, queue_depth),
            decision_log_dropped: counter(
                r,
                "spectral_decision_log_dropped_total",
                "Decision records dropped because the writer could not keep up.",
            ),
            decision_log_refused: counter(
                r,
                "spectral_decision_log_refused_total",
                "Decisions answered 503 because their record could not be queued in time.",
            ),
            decision_log_written: counter(
                r,
                "spectral_decision_log_written_total",
                "Decision records written.",
            ),
            decision_log_write_errors: counter(
                r,
                "spectral_decision_log_write_errors_total",
                "Decision records lost to store errors.",
            ),
            connections_shed: counter(
                r,
                "spectral_connections_shed_total",
                "Connections refused because the connection limit was reached.",
            ),
            connections_refused_per_address: counter(
                r,
                "spectral_connections_refused_per_address_total",
                "Connections refused because their client address reached its connection cap.",
            ),
            connections_closed_idle: {
                let v = counter_vec(
                    r,
                    "spectral_connections_closed_idle_total",
                    "Idle connections closed, after the idle timeout or to make room near the limit.",
                    &["reason"],
                );
                [
                    v.with_label_values(&["timeout"]),
                    v.with_label_values(&["evicted"]),
                ]
            },
            rate_limited: {
                let v = counter_vec(
                    r,
                    "spectral_rate_limited_total",
                    "Requests answered 429 by a rate limit.",
                    &["limit"],
                );
                RATE_LIMITS.map(|limit| v.with_label_values(&[limit]))
            },
            outbox,
            agent: AgentMetrics::new(r),
            impact: ImpactMetrics::new(r),
            registry,
        }
    }

    /// A request finished on a route with a status code.
    pub fn request(&self, route: Route, code: u16, took: Duration) {
        let Some(m) = self.routes.get(route.index()) else {
            return;
        };
        m.latency.observe(took.as_secs_f64());
        let class = usize::from(code / 100).clamp(1, 5) - 1;
        m.responses[class].inc();
    }

    /// The decision counters of a world, resolved once (when its version is loaded).
    pub fn world(&self, world: &str) -> WorldCounters {
        WorldCounters(STATUSES.map(|status| self.decisions.with_label_values(&[world, status])))
    }

    /// A predicate failed with an error kind.
    pub fn sandbox_error(&self, kind: &str) {
        self.sandbox_errors.with_label_values(&[kind]).inc();
    }

    /// A world version was loaded into the cache, or failed to.
    pub fn cache_load(&self, ok: bool) {
        self.cache_loads[usize::from(!ok)].inc();
    }

    /// The Prometheus text exposition of every metric; `queue_depth` is the decision log's,
    /// which its channel knows and these counters do not.
    pub fn render(&self, queue_depth: u64) -> String {
        self.queue_depth
            .set(i64::try_from(queue_depth).unwrap_or(i64::MAX));
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# the metrics could not be encoded: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_histograms() {
        let m = Metrics::default();
        m.request(Route::Decide, 200, Duration::from_micros(80));
        m.request(Route::Decide, 503, Duration::from_millis(3));
        let acme = m.world("acme");
        acme.add(3);
        acme.add(3);
        m.sandbox_error("deadline_exceeded");
        m.cache_load(true);
        m.outbox
            .claimed
            .with_label_values(&["world.published"])
            .inc();
        m.outbox.set_state(0);
        let text = m.render(7);
        for line in [
            "spectral_http_request_duration_seconds_bucket{route=\"decide\",le=\"0.0001\"} 1",
            "spectral_http_request_duration_seconds_bucket{route=\"decide\",le=\"0.005\"} 2",
            "spectral_http_request_duration_seconds_count{route=\"decide\"} 2",
            "spectral_http_responses_total{class=\"5xx\",route=\"decide\"} 1",
            "spectral_decisions_total{status=\"RED\",world=\"acme\"} 2",
            "spectral_sandbox_errors_total{kind=\"deadline_exceeded\"} 1",
            "spectral_cache_loads_total{result=\"ok\"} 1",
            "spectral_decision_log_queue_depth 7",
            "spectral_decision_log_dropped_total 0",
            "spectral_connections_shed_total 0",
            "spectral_connections_refused_per_address_total 0",
            "spectral_connections_closed_idle_total{reason=\"evicted\"} 0",
            "spectral_rate_limited_total{limit=\"decide_world\"} 0",
            "spectral_outbox_claimed_total{event_type=\"world.published\"} 1",
            "spectral_outbox_consumer_state{state=\"wired\"} 1",
            "spectral_outbox_consumer_state{state=\"off\"} 0",
            "spectral_outbox_oldest_pending_age_seconds 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        #[cfg(target_os = "linux")]
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }
}

//! Logs and metrics: tracing set-up, and a small Prometheus registry whose hot-path updates
//! are single atomic adds.
//!
//! **Boundary:** depends on nothing else in the crate; everything may depend on it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::RwLock;
use std::time::Duration;

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
    NotFound,
}

impl Route {
    pub const ALL: [Route; 18] = [
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
        Self::NotFound,
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
            Self::NotFound => "not_found",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }
}

/// Counters keyed by one dynamic label, added to on the hot path with a read lock.
#[derive(Default)]
struct Family<const N: usize> {
    by_key: RwLock<HashMap<String, [AtomicU64; N]>>,
}

impl<const N: usize> Family<N> {
    fn add(&self, key: &str, index: usize) {
        if let Ok(map) = self.by_key.read() {
            if let Some(counters) = map.get(key) {
                counters[index % N].fetch_add(1, Relaxed);
                return;
            }
        }
        if let Ok(mut map) = self.by_key.write() {
            map.entry(key.to_string())
                .or_insert_with(|| std::array::from_fn(|_| AtomicU64::new(0)))[index % N]
                .fetch_add(1, Relaxed);
        }
    }

    fn snapshot(&self) -> Vec<(String, [u64; N])> {
        let mut out: Vec<(String, [u64; N])> = self
            .by_key
            .read()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), std::array::from_fn(|i| v[i].load(Relaxed))))
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// Names of the decision statuses, in the order of the per-world counters.
pub const STATUSES: [&str; 4] = ["GREEN", "GREEN-SKIP", "YELLOW", "RED"];

/// The process's metrics.
#[derive(Default)]
pub struct Metrics {
    latency: [Histogram; Route::ALL.len()],
    responses: Family<5>,
    decisions: Family<4>,
    sandbox_errors: Family<1>,
    cache_loads: Family<1>,
    pub decision_log_dropped: AtomicU64,
    pub decision_log_refused: AtomicU64,
    pub decision_log_written: AtomicU64,
    pub decision_log_write_errors: AtomicU64,
    pub connections_shed: AtomicU64,
}

impl Metrics {
    /// A request finished on a route with a status code.
    pub fn request(&self, route: Route, code: u16, took: Duration) {
        self.latency[route.index()].observe(took);
        let class = usize::from(code / 100).clamp(1, 5) - 1;
        self.responses.add(route.as_str(), class);
    }

    /// A decision was made; `status` is an index into [`STATUSES`].
    pub fn decision(&self, world: &str, status: usize) {
        self.decisions.add(world, status);
    }

    /// A predicate failed with an error kind.
    pub fn sandbox_error(&self, kind: &str) {
        self.sandbox_errors.add(kind, 0);
    }

    /// A world version was loaded into the cache, or failed to.
    pub fn cache_load(&self, ok: bool) {
        self.cache_loads.add(if ok { "ok" } else { "error" }, 0);
    }

    /// The Prometheus text exposition of every metric; `queue_depth` is the decision log's,
    /// which its channel knows and these counters do not.
    pub fn render(&self, queue_depth: u64) -> String {
        let mut out = String::with_capacity(8192);
        let _ = writeln!(
            out,
            "# HELP spectral_http_request_duration_seconds Time from request to response, by route.\n# TYPE spectral_http_request_duration_seconds histogram"
        );
        for route in Route::ALL {
            let h = &self.latency[route.index()];
            let mut cumulative = 0;
            for (i, bound) in BUCKETS.iter().enumerate() {
                cumulative += h.buckets[i].load(Relaxed);
                let _ = writeln!(
                    out,
                    "spectral_http_request_duration_seconds_bucket{{route=\"{}\",le=\"{bound}\"}} {cumulative}",
                    route.as_str()
                );
            }
            let count = h.count.load(Relaxed);
            let _ = writeln!(
                out,
                "spectral_http_request_duration_seconds_bucket{{route=\"{r}\",le=\"+Inf\"}} {count}\nspectral_http_request_duration_seconds_sum{{route=\"{r}\"}} {}\nspectral_http_request_duration_seconds_count{{route=\"{r}\"}} {count}",
                h.sum_ns.load(Relaxed) as f64 / 1e9,
                r = route.as_str()
            );
        }
        let _ = writeln!(
            out,
            "# HELP spectral_http_responses_total Responses by route and status class.\n# TYPE spectral_http_responses_total counter"
        );
        for (route, classes) in self.responses.snapshot() {
            for (i, n) in classes.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "spectral_http_responses_total{{route=\"{route}\",class=\"{}xx\"}} {n}",
                    i + 1
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP spectral_decisions_total Decisions by world and status.\n# TYPE spectral_decisions_total counter"
        );
        for (world, counts) in self.decisions.snapshot() {
            for (status, n) in STATUSES.iter().zip(counts) {
                let _ = writeln!(
                    out,
                    "spectral_decisions_total{{world=\"{world}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP spectral_sandbox_errors_total Predicate failures by kind.\n# TYPE spectral_sandbox_errors_total counter"
        );
        for (kind, [n]) in self.sandbox_errors.snapshot() {
            let _ = writeln!(out, "spectral_sandbox_errors_total{{kind=\"{kind}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP spectral_cache_loads_total World versions loaded into the module cache.\n# TYPE spectral_cache_loads_total counter"
        );
        for (result, [n]) in self.cache_loads.snapshot() {
            let _ = writeln!(out, "spectral_cache_loads_total{{result=\"{result}\"}} {n}");
        }
        for (name, help, kind, value) in [
            (
                "spectral_decision_log_queue_depth",
                "Decision records waiting to be written.",
                "gauge",
                queue_depth,
            ),
            (
                "spectral_decision_log_dropped_total",
                "Decision records dropped because the writer could not keep up.",
                "counter",
                self.decision_log_dropped.load(Relaxed),
            ),
            (
                "spectral_decision_log_refused_total",
                "Decisions answered 503 because their record could not be queued in time.",
                "counter",
                self.decision_log_refused.load(Relaxed),
            ),
            (
                "spectral_decision_log_written_total",
                "Decision records written.",
                "counter",
                self.decision_log_written.load(Relaxed),
            ),
            (
                "spectral_decision_log_write_errors_total",
                "Decision records lost to store errors.",
                "counter",
                self.decision_log_write_errors.load(Relaxed),
            ),
            (
                "spectral_connections_shed_total",
                "Connections refused because the connection limit was reached.",
                "counter",
                self.connections_shed.load(Relaxed),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        out
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
        m.decision("acme", 3);
        m.decision("acme", 3);
        m.sandbox_error("deadline_exceeded");
        m.cache_load(true);
        let text = m.render(7);
        assert!(text.contains(
            "spectral_http_request_duration_seconds_bucket{route=\"decide\",le=\"0.0001\"} 1"
        ));
        assert!(text.contains(
            "spectral_http_request_duration_seconds_bucket{route=\"decide\",le=\"0.005\"} 2"
        ));
        assert!(text.contains("spectral_http_request_duration_seconds_count{route=\"decide\"} 2"));
        assert!(text.contains("spectral_http_responses_total{route=\"decide\",class=\"5xx\"} 1"));
        assert!(text.contains("spectral_decisions_total{world=\"acme\",status=\"RED\"} 2"));
        assert!(text.contains("spectral_sandbox_errors_total{kind=\"deadline_exceeded\"} 1"));
        assert!(text.contains("spectral_cache_loads_total{result=\"ok\"} 1"));
        assert!(text.contains("spectral_decision_log_queue_depth 7"));
    }
}

//! Outbox throughput on Postgres: events produced per second (in batches, and one per
//! transaction) and events handled per second by one and by two consumers.
//!
//! Run: `cargo bench --bench outbox` (`SPECTRAL_OUTBOX_BATCH` sets the consumers' batch size,
//! 32 by default). It creates a fresh database on the server named by
//! `SPECTRAL_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) and
//! drops it at the end. Figures are recorded in `bench/RESULTS.md`.

#![expect(
    clippy::panic,
    clippy::expect_used,
    reason = "a benchmark that cannot set up has nothing to measure: failing loudly is right here"
)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use serde_json::json;
use spectral::config::OutboxConfig;
use spectral::outbox::handlers::DecisionStats;
use spectral::outbox::{Consumer, Handler, HandlerFuture, OutboxState, Registry};
use spectral::store::{events, Effect, NewEvent, OutboxRow, Store, StoreConfig};
use sqlx::{Connection, PgConnection};
use tokio::runtime::Runtime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Events handled per measured iteration.
const HANDLE_N: usize = 2_000;
const NOOP_EVENT: &str = "bench.noop";

/// The bench's own database, dropped at the end.
struct BenchDb {
    admin: String,
    name: String,
    url: String,
}

impl BenchDb {
    fn create(rt: &Runtime) -> Self {
        let admin = std::env::var("SPECTRAL_TEST_DATABASE_URL")
            .unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string());
        let name = format!("spectral_bench_outbox_{:08x}", rand::random::<u32>());
        rt.block_on(async {
            let mut conn = PgConnection::connect(&admin)
                .await
                .unwrap_or_else(|e| panic!("the outbox bench needs PostgreSQL: {e}"));
            sqlx::raw_sql(&format!(r#"CREATE DATABASE "{name}""#))
                .execute(&mut conn)
                .await
                .expect("create the bench database");
            let _ = conn.close().await;
        });
        // The database name replaces the admin URL's path, keeping any query string.
        let (base, query) = admin.split_once('?').unwrap_or((&admin, ""));
        let authority = base.find("://").map_or(0, |i| i + 3);
        let server = base[authority..]
            .find('/')
            .map_or(base, |slash| &base[..authority + slash]);
        let url = if query.is_empty() {
            format!("{server}/{name}")
        } else {
            format!("{server}/{name}?{query}")
        };
        Self { admin, name, url }
    }

    fn drop_with(&self, rt: &Runtime) {
        rt.block_on(async {
            if let Ok(mut conn) = PgConnection::connect(&self.admin).await {
                let _ = sqlx::raw_sql(&format!(
                    r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
                    self.name
                ))
                .execute(&mut conn)
                .await;
                let _ = conn.close().await;
            }
        });
    }
}

async fn store(url: &str) -> Store {
    Store::connect(&StoreConfig {
        database_url: Some(url.to_string()),
        max_connections: 4,
        migrate_on_start: true,
        ..StoreConfig::default()
    })
    .await
    .expect("store")
}

/// A `decision.recorded` event like the decision log's: two decisions, five statistics rows,
/// of one of `worlds` worlds.
fn recorded(tag: &str, i: usize, worlds: usize) -> NewEvent {
    let counts = [
        ("*", "GREEN", 1),
        ("*", "RED", 1),
        ("r1", "GREEN", 1),
        ("r2", "GREEN", 1),
        ("r3", "RED", 1),
    ];
    let world = format!("bench{}", i % worlds);
    NewEvent {
        // Unique across the samples of a run, which reuse `i`.
        idempotency_key: format!("{tag}:{i}"),
        ..spectral::store::decision_recorded(&world, i as i64, i as i64, counts)
            .expect("a decision.recorded event")
    }
}

fn noop(tag: &str, i: usize) -> NewEvent {
    NewEvent {
        event_type: NOOP_EVENT.into(),
        world: None,
        payload: json!({"i": i}),
        idempotency_key: format!("{tag}:{i}"),
        target: None,
    }
}

/// Counts the rows a handler was given, so the bench knows when the last one is in hand.
struct Counting {
    inner: Arc<dyn Handler>,
    seen: AtomicUsize,
    /// Signalled by the handler that is given the last row; the bench waits on it.
    last: Arc<Notify>,
}

impl Handler for Counting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn handle<'a>(&'a self, row: &'a OutboxRow) -> HandlerFuture<'a> {
        if self.seen.fetch_add(1, Ordering::Relaxed) + 1 == HANDLE_N {
            self.last.notify_one();
        }
        self.inner.handle(row)
    }
}

/// Handles anything with no effect but the `event_handled` row.
struct Noop;

impl Handler for Noop {
    fn name(&self) -> &'static str {
        "bench_noop"
    }

    fn handle<'a>(&'a self, _row: &'a OutboxRow) -> HandlerFuture<'a> {
        Box::pin(async { Ok(Effect::None) })
    }
}

/// Rows a consumer claims at once: `SPECTRAL_OUTBOX_BATCH` as the service reads it, else the
/// default.
fn batch_size(default: u32) -> u32 {
    std::env::var("SPECTRAL_OUTBOX_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Shared state of the benches: the producer's store, the consumers' stores (one pool each,
/// as separate worker processes would have), and the next unused generation.
struct Bench {
    producer: Store,
    consumers: Vec<Store>,
    generation: i64,
}

impl Bench {
    /// A generation of its own for each measured iteration, so no iteration sees another's
    /// rows.
    fn next_generation(&mut self) -> i64 {
        self.generation += 1;
        self.producer.set_generation(self.generation);
        self.generation
    }

    /// Enqueue `HANDLE_N` events (not timed), then time `consumers` consumers from their start
    /// until every event is delivered. The events are statistics of `worlds` worlds, or no-ops
    /// with `None`.
    async fn handle(&mut self, consumers: usize, worlds: Option<usize>) -> Duration {
        let generation = self.next_generation();
        let tag = format!("h{generation}");
        let events: Vec<NewEvent> = (0..HANDLE_N)
            .map(|i| match worlds {
                Some(w) => recorded(&tag, i, w),
                None => noop(&tag, i),
            })
            .collect();
        for chunk in events.chunks(500) {
            self.producer.enqueue(chunk).await.expect("enqueue");
        }
        let last = Arc::new(Notify::new());
        let (event_type, inner): (&str, Arc<dyn Handler>) = match worlds {
            Some(_) => (events::DECISION_RECORDED, Arc::new(DecisionStats)),
            None => (NOOP_EVENT, Arc::new(Noop)),
        };
        let mut registry = Registry::new();
        registry.register(
            event_type,
            Arc::new(Counting {
                inner,
                seen: AtomicUsize::new(0),
                last: last.clone(),
            }),
        );
        let defaults = OutboxConfig::default();
        let config = OutboxConfig {
            poll_interval: Duration::from_millis(20),
            listen: false,
            batch_size: batch_size(defaults.batch_size),
            ..defaults
        };
        let stop = CancellationToken::new();
        let started = Instant::now();
        let tasks: Vec<_> = self.consumers[..consumers]
            .iter()
            .map(|s| {
                let consumer = Consumer::new(
                    s.clone(),
                    registry.clone(),
                    config.clone(),
                    generation,
                    Arc::new(OutboxState::default()),
                );
                tokio::spawn(consumer.run(stop.clone()))
            })
            .collect();
        // The last row is in hand once the handler saw them all; then wait for its commit.
        last.notified().await;
        loop {
            let counts = self
                .producer
                .outbox_counts(generation)
                .await
                .expect("counts");
            if counts.pending + counts.in_flight == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let took = started.elapsed();
        stop.cancel();
        for t in tasks {
            t.await.expect("consumer").expect("the consumer ran");
        }
        took
    }
}

fn outbox(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let db = BenchDb::create(&rt);
    let mut bench = rt.block_on(async {
        Bench {
            producer: store(&db.url).await,
            consumers: vec![store(&db.url).await, store(&db.url).await],
            generation: 0,
        }
    });

    let mut g = c.benchmark_group("outbox/produce");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    g.throughput(Throughput::Elements(1_000));
    g.bench_function("batches_of_100", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let generation = bench.next_generation();
                    let events: Vec<NewEvent> = (0..1_000)
                        .map(|i| recorded(&format!("p{generation}"), i, 1))
                        .collect();
                    let started = Instant::now();
                    for chunk in events.chunks(100) {
                        bench.producer.enqueue(chunk).await.expect("enqueue");
                    }
                    total += started.elapsed();
                }
                total
            })
        })
    });
    g.throughput(Throughput::Elements(200));
    g.bench_function("one_per_transaction", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let generation = bench.next_generation();
                    let events: Vec<NewEvent> = (0..200)
                        .map(|i| recorded(&format!("s{generation}"), i, 1))
                        .collect();
                    let started = Instant::now();
                    for e in events.chunks(1) {
                        bench.producer.enqueue(e).await.expect("enqueue");
                    }
                    total += started.elapsed();
                }
                total
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("outbox/handle");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(30));
    g.throughput(Throughput::Elements(HANDLE_N as u64));
    // Statistics of one world are the worst case for two consumers: every event updates the
    // same counter rows, so their transactions take turns; eight worlds show the difference.
    for (name, consumers, worlds) in [
        ("stats/1_consumer", 1, Some(1)),
        ("stats/2_consumers", 2, Some(1)),
        ("stats_8_worlds/2_consumers", 2, Some(8)),
        ("noop/1_consumer", 1, None),
        ("noop/2_consumers", 2, None),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += bench.handle(consumers, worlds).await;
                    }
                    total
                })
            })
        });
    }
    g.finish();

    rt.block_on(async {
        bench.producer.close().await;
        for s in &bench.consumers {
            s.close().await;
        }
    });
    db.drop_with(&rt);
}

criterion_group!(benches, outbox);
criterion_main!(benches);

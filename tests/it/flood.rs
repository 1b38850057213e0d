//! The workers runtime does not slow the decide path: decide latency with the outbox consumer
//! idle, then again while it works through a flood of events.
//!
//! Release figures: `cargo test --release --test it flood -- --nocapture` (bench/RESULTS.md).

use std::time::{Duration, Instant};

use spectral::store::{NewEvent, Store};

use crate::app::{green_wire, test_config, Backend, Db, TestApp, OPERATOR};
use crate::support::eventually;

/// Events in the flood: far more than the consumer handles while latency is measured.
const FLOOD: usize = 20_000;
/// Each measurement takes at least this many sequential decisions, and at least `WINDOW`.
const SAMPLES: usize = 500;
/// Long enough for the consumer to handle hundreds of events meanwhile.
const WINDOW: Duration = Duration::from_millis(1500);

/// Sequential decisions for at least `SAMPLES` requests and `WINDOW`; their latencies.
async fn latencies(app: &TestApp) -> Vec<Duration> {
    let body = green_wire();
    let mut out = Vec::new();
    let started = Instant::now();
    while out.len() < SAMPLES || started.elapsed() < WINDOW {
        let sent = Instant::now();
        let (status, d) = app.decide(OPERATOR, &body).await;
        out.push(sent.elapsed());
        assert_eq!(status, 200, "{d}");
    }
    out
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// A `decision.recorded` event like the decision log's: five statistics upserts to handle.
fn recorded(i: usize) -> NewEvent {
    spectral::store::decision_recorded("flood", i as i64, i as i64, TWO_DECISIONS).unwrap()
}

/// The counts of two decisions: a GREEN one matching r1 and r2, a RED one matching r3.
const TWO_DECISIONS: [(&str, &str, u64); 5] = [
    ("*", "GREEN", 1),
    ("*", "RED", 1),
    ("r1", "GREEN", 1),
    ("r2", "GREEN", 1),
    ("r3", "RED", 1),
];

/// Flood events handled so far: each adds two decisions to the `flood` statistics.
async fn handled(store: &Store) -> i64 {
    let stats = store.stats("flood").await.expect("stats");
    stats
        .iter()
        .filter(|s| s.rule == "*")
        .map(|s| s.count)
        .sum::<i64>()
        / 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_outbox_work_does_not_slow_decisions() {
    let db = Db::fresh(Backend::Postgres).await;
    let app = TestApp::start(test_config(&db)).await;
    let generation = app.running.as_ref().expect("running").app.generation;
    // The flood is written first under a generation no consumer serves, so that writing it
    // does not disturb the quiet measurements; adopting it hands it to the consumer at once,
    // and adopting it back takes it away again.
    let parked = generation + 1_000;
    let producer = db.store().await;
    producer.set_generation(parked);
    let events: Vec<NewEvent> = (0..FLOOD).map(recorded).collect();
    for chunk in events.chunks(1_000) {
        producer.enqueue(chunk).await.expect("enqueue");
    }

    // Warm the connections and caches, then alternate: quiet, flooded, quiet, flooded, so
    // that neither side gets the advantage of going second.
    latencies(&app).await;
    let (mut quiet, mut flooded) = (Vec::new(), Vec::new());
    let (mut handled_meanwhile, mut flooded_for) = (0, Duration::ZERO);
    for _ in 0..2 {
        quiet.extend(latencies(&app).await);
        // Hand the flood to the consumer and wait until it is at work.
        let adopted = producer.adopt(parked, generation).await.expect("adopt");
        assert!(adopted > 0);
        let start = handled(&producer).await;
        eventually(
            Duration::from_secs(30),
            "the consumer starting on the flood",
            || async { (handled(&producer).await != start).then_some(()) },
        )
        .await;
        let before = handled(&producer).await;
        let measuring = Instant::now();
        flooded.extend(latencies(&app).await);
        flooded_for += measuring.elapsed();
        let after = handled(&producer).await;
        // The consumer worked all through the measurement.
        assert!(
            after > before,
            "the consumer made no progress: {before} → {after}"
        );
        assert!(
            after < FLOOD as i64,
            "the flood ran out before the measurement ended"
        );
        handled_meanwhile += after - before;
        // Park what is left: the consumer goes quiet again.
        producer.adopt(generation, parked).await.expect("adopt");
    }
    quiet.sort();
    flooded.sort();

    let (q50, q90) = (quantile(&quiet, 0.5), quantile(&quiet, 0.9));
    let (f50, f90) = (quantile(&flooded, 0.5), quantile(&flooded, 0.9));
    let ratio = f50.as_secs_f64() / q50.as_secs_f64();
    println!(
        "decide latency, sequential: quiet median {q50:?} p90 {q90:?} ({} requests); flooded \
         median {f50:?} p90 {f90:?} ({} requests); median ratio {ratio:.2}; the consumer \
         handled {} flood events ({:.0}/s) meanwhile",
        quiet.len(),
        flooded.len(),
        handled_meanwhile,
        handled_meanwhile as f64 / flooded_for.as_secs_f64()
    );
    assert!(
        f50 < q50 * 3 + Duration::from_millis(2),
        "the flood slowed decisions: median {q50:?} → {f50:?}"
    );
    producer.close().await;
    app.stop().await;
}

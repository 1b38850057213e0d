//! The outbox on both backends: events commit with their change, claims never overlap,
//! notifications are hints and polling is the guarantee, generations stay apart, retries back
//! off, failures can be replayed, a dead worker's rows are rescued, and a claimed batch is
//! completed in one transaction with each row's outcome exact.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use spectral::config::OutboxConfig;
use spectral::outbox::{
    Consumer, Handler, HandlerError, HandlerFuture, OutboxState, Registry, Wiring,
};
use spectral::store::{
    events, Completion, Effect, Handled, MatchedRule, NewDecision, NewEvent, OutboxRow,
    OutboxStatus, StatDelta, Store,
};
use tokio_util::sync::CancellationToken;

use crate::app::{Backend, Db};
use crate::support::eventually;

crate::both_backends!(
    events_commit_or_roll_back_with_their_change,
    two_consumers_never_handle_one_row_twice,
    a_generation_never_claims_another_generations_rows,
    retries_back_off_then_succeed,
    a_terminal_failure_is_kept_and_can_be_replayed,
    a_dead_workers_rows_are_rescued_and_handled_once,
    stored_rows_are_read_as_typed_events_or_dead_lettered,
    the_oldest_pending_event_is_aged_until_it_is_handled,
    a_batch_completes_fresh_duplicate_and_lost_rows_exactly,
    a_failing_effect_fails_alone_and_the_rest_of_its_batch_is_delivered,
);

/// A fresh store on its own pool.
async fn store(db: &Db) -> Store {
    db.store().await
}

const TEST_EVENT: &str = "test.event";

fn event(key: &str) -> NewEvent {
    NewEvent {
        event_type: TEST_EVENT.into(),
        world: Some("w".into()),
        payload: json!({"key": key}),
        idempotency_key: key.into(),
        target: None,
    }
}

/// A handler that counts its runs and adds one to the `w/*/GREEN` statistic per row, so
/// that effects can be counted in the store. It fails as told.
#[derive(Default)]
struct Probe {
    runs: Mutex<Vec<i64>>,
    /// Retryable failures left, per row.
    fail_first: AtomicU32,
    terminal: AtomicBool,
    /// Held while handling, to make a run slow.
    delay: Mutex<Duration>,
    /// Runs that returned.
    finished: AtomicU32,
}

impl Handler for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }

    fn handle<'a>(&'a self, row: &'a OutboxRow) -> HandlerFuture<'a> {
        Box::pin(async move {
            self.runs.lock().expect("lock").push(row.id);
            let delay = *self.delay.lock().expect("lock");
            // A slow handler is the behaviour under test, not a wait for something.
            tokio::time::sleep(delay).await;
            self.finished.fetch_add(1, Ordering::SeqCst);
            if self.terminal.load(Ordering::SeqCst) {
                return Err(HandlerError::Terminal("the payload is refused".into()));
            }
            let left = self.fail_first.load(Ordering::SeqCst);
            if u32::try_from(row.attempts).unwrap_or(0) <= left {
                return Err(HandlerError::Retryable(format!(
                    "attempt {} fails",
                    row.attempts
                )));
            }
            Ok(Effect::Stats(vec![StatDelta {
                world: "w".into(),
                rule: "*".into(),
                status: "GREEN".into(),
                count: 1,
            }]))
        })
    }
}

fn config() -> OutboxConfig {
    OutboxConfig {
        poll_interval: Duration::from_millis(50),
        retry_base: Duration::from_millis(10),
        retry_cap: Duration::from_millis(40),
        lease: Duration::from_secs(30),
        ..OutboxConfig::default()
    }
}

/// A consumer of `generation` running on the test runtime until the returned sender stops it.
fn consume(
    store: Store,
    probe: Arc<Probe>,
    config: OutboxConfig,
    generation: i64,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<()>,
    Arc<OutboxState>,
) {
    let mut registry = Registry::new();
    registry.register(TEST_EVENT, probe);
    let state = Arc::new(OutboxState::default());
    let consumer = Consumer::new(store, registry, config, generation, state.clone());
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        consumer.run(stopped).await.expect("the consumer ran");
    });
    (stop, task, state)
}

/// The `w/*/GREEN` statistic: how many effects were applied.
async fn effects(store: &Store) -> i64 {
    store
        .stats("w")
        .await
        .expect("stats")
        .iter()
        .find(|s| s.rule == "*")
        .map_or(0, |s| s.count)
}

/// Wait until `n` effects were applied, or fail after a generous bound.
async fn until_effects(store: &Store, n: i64) {
    eventually(Duration::from_secs(20), &format!("{n} effects"), || async {
        (effects(store).await >= n).then_some(())
    })
    .await;
}

async fn rows_of(store: &Store, event_type: &str) -> Vec<OutboxRow> {
    store
        .outbox_list(None, None, 10_000)
        .await
        .expect("list")
        .into_iter()
        .filter(|r| r.event_type == event_type)
        .collect()
}

async fn events_commit_or_roll_back_with_their_change(backend: Backend) {
    let db = Db::fresh(backend).await;
    let store = store(&db).await;
    store.set_generation(7);
    let model = serde_json::to_value(
        spectral::worlds::load::load_model(&crate::support::predicates_dir().join("acme-payments"))
            .expect("loads"),
    )
    .expect("json");
    let v = store
        .publish(&spectral::store::NewVersion {
            world: "acme-payments".into(),
            model,
            modules: vec![],
            published_by: "test".into(),
        })
        .await
        .expect("publish");
    let published = rows_of(&store, events::VERSION_PUBLISHED).await;
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].payload["version"], v);
    assert_eq!(published[0].generation, 7);
    assert_eq!(published[0].status, OutboxStatus::Pending);
    // A deploy that fails leaves no event; one that succeeds leaves one.
    assert!(store.deploy("acme-payments", 99, "test").await.is_err());
    assert!(rows_of(&store, events::MODULE_DEPLOYED).await.is_empty());
    store
        .deploy("acme-payments", v, "test")
        .await
        .expect("deploy");
    assert_eq!(rows_of(&store, events::MODULE_DEPLOYED).await.len(), 1);
    // A decision batch leaves one event per world; a batch that fails (a duplicate id)
    // leaves neither its records nor its event.
    let decision = |id: &str| NewDecision {
        decision_id: id.into(),
        world: "acme-payments".into(),
        version: v,
        action: "wire_transfer.release".into(),
        module_hash: "sha256:x".into(),
        status: "RED".into(),
        matched_rules: vec![MatchedRule {
            id: "sanctions-hit".into(),
            outcome: "RED".into(),
            severity: "T1".into(),
        }],
        caller: "key".into(),
        correlation_id: None,
        context_digest: "sha256:y".into(),
        decided_at: chrono::Utc::now(),
        context: None,
    };
    store
        .append_decisions(&[decision("d1"), decision("d2")])
        .await
        .expect("append");
    let recorded = rows_of(&store, events::DECISION_RECORDED).await;
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].payload["first_seq"], 1);
    assert_eq!(recorded[0].payload["last_seq"], 2);
    assert_eq!(
        recorded[0].payload["counts"],
        json!([
            {"rule": "*", "status": "RED", "count": 2},
            {"rule": "sanctions-hit", "status": "RED", "count": 2},
        ])
    );
    assert!(store
        .append_decisions(&[decision("d3"), decision("d1")])
        .await
        .is_err());
    assert_eq!(rows_of(&store, events::DECISION_RECORDED).await.len(), 1);
    assert_eq!(
        store
            .decisions("acme-payments", 0, 10)
            .await
            .expect("records")
            .len(),
        2
    );
    store.close().await;
}

async fn two_consumers_never_handle_one_row_twice(backend: Backend) {
    let db = Db::fresh(backend).await;
    let producer = store(&db).await;
    producer.set_generation(1);
    let batch: Vec<NewEvent> = (0..200).map(|i| event(&format!("k{i}"))).collect();
    producer.enqueue(&batch).await.expect("enqueue");
    let probe = Arc::new(Probe::default());
    let a = consume(store(&db).await, probe.clone(), config(), 1);
    let b = consume(store(&db).await, probe.clone(), config(), 1);
    until_effects(&producer, 200).await;
    for (stop, task, _) in [a, b] {
        stop.cancel();
        task.await.expect("consumer");
    }
    let runs = probe.runs.lock().expect("lock").clone();
    let unique: BTreeSet<i64> = runs.iter().copied().collect();
    assert_eq!(runs.len(), 200, "a row was handled twice");
    assert_eq!(unique.len(), 200);
    assert_eq!(effects(&producer).await, 200);
    let delivered = producer
        .outbox_list(Some(OutboxStatus::Delivered), Some(1), 1000)
        .await
        .expect("list");
    assert_eq!(delivered.len(), 200);
}

async fn a_generation_never_claims_another_generations_rows(backend: Backend) {
    let db = Db::fresh(backend).await;
    let old = store(&db).await;
    old.set_generation(3);
    old.enqueue(&[event("a"), event("b")])
        .await
        .expect("enqueue");
    // Generation 4 sees nothing to claim: its consumer handles a row of its own generation,
    // which it claims with the older rows in sight, and only that one.
    assert!(old.claim(4, "w4", 100).await.expect("claim").is_empty());
    let own = store(&db).await;
    own.set_generation(4);
    own.enqueue(&[event("own")]).await.expect("enqueue");
    let probe = Arc::new(Probe::default());
    let (stop, task, _) = consume(store(&db).await, probe.clone(), config(), 4);
    until_effects(&old, 1).await;
    assert_eq!(probe.runs.lock().expect("lock").len(), 1);
    let counts = old.outbox_counts(4).await.expect("counts");
    assert_eq!((counts.pending, counts.other_generations), (0, 2));
    // Adopted deliberately, they are handled by the new generation.
    assert_eq!(old.adopt(3, 4).await.expect("adopt"), 2);
    until_effects(&old, 3).await;
    stop.cancel();
    task.await.expect("consumer");
    assert_eq!(
        old.outbox_counts(4)
            .await
            .expect("counts")
            .other_generations,
        0
    );
}

async fn retries_back_off_then_succeed(backend: Backend) {
    let db = Db::fresh(backend).await;
    let s = store(&db).await;
    s.set_generation(1);
    s.enqueue(&[event("flaky")]).await.expect("enqueue");
    let probe = Arc::new(Probe::default());
    probe.fail_first.store(2, Ordering::SeqCst);
    let (stop, task, _) = consume(store(&db).await, probe.clone(), config(), 1);
    until_effects(&s, 1).await;
    stop.cancel();
    task.await.expect("consumer");
    let row = rows_of(&s, TEST_EVENT).await.remove(0);
    assert_eq!(row.status, OutboxStatus::Delivered);
    assert_eq!(row.attempts, 3);
    let history = row.failure_history.as_array().cloned().unwrap_or_default();
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[0]["error"], "attempt 1 fails");
    assert_eq!(history[1]["error"], "attempt 2 fails");
    assert!(row.first_failed_at.is_some());
    assert_eq!(probe.runs.lock().expect("lock").len(), 3);
}

async fn a_terminal_failure_is_kept_and_can_be_replayed(backend: Backend) {
    let db = Db::fresh(backend).await;
    let s = store(&db).await;
    s.set_generation(1);
    s.enqueue(&[event("poison")]).await.expect("enqueue");
    let probe = Arc::new(Probe::default());
    probe.terminal.store(true, Ordering::SeqCst);
    let (stop, task, _) = consume(store(&db).await, probe.clone(), config(), 1);
    let failed = eventually(Duration::from_secs(20), "the row failed", || async {
        let failed = s
            .outbox_list(Some(OutboxStatus::Failed), Some(1), 10)
            .await
            .expect("list");
        (!failed.is_empty()).then_some(failed)
    })
    .await;
    assert_eq!(failed[0].attempts, 1, "a terminal error is not retried");
    assert_eq!(
        failed[0].last_error.as_deref(),
        Some("the payload is refused")
    );
    assert_eq!(s.outbox_counts(1).await.expect("counts").failed, 1);
    // Fixed, then replayed in place: handled, with the failure still on record.
    probe.terminal.store(false, Ordering::SeqCst);
    s.replay(failed[0].id).await.expect("replay");
    until_effects(&s, 1).await;
    stop.cancel();
    task.await.expect("consumer");
    let row = s
        .outbox_row(failed[0].id)
        .await
        .expect("row")
        .expect("exists");
    assert_eq!(row.status, OutboxStatus::Delivered);
    assert_eq!(row.failure_history.as_array().map(Vec::len), Some(1));
    // Replaying a row that has not failed is refused.
    assert!(s.replay(row.id).await.is_err());
}

async fn a_dead_workers_rows_are_rescued_and_handled_once(backend: Backend) {
    let db = Db::fresh(backend).await;
    let s = store(&db).await;
    s.set_generation(1);
    s.enqueue(&[event("x"), event("y"), event("z")])
        .await
        .expect("enqueue");
    // A worker claims them and dies before handling any.
    let claimed = s.claim(1, "worker-that-died", 10).await.expect("claim");
    assert_eq!(claimed.len(), 3);
    let probe = Arc::new(Probe::default());
    let mut cfg = config();
    cfg.lease = Duration::from_millis(300);
    let (stop, task, _) = consume(store(&db).await, probe.clone(), cfg, 1);
    until_effects(&s, 3).await;
    // The dead worker comes back and tries to record a result: its claim is gone.
    let late = s
        .complete(
            &claimed[0],
            "worker-that-died",
            "probe",
            &Effect::Stats(vec![]),
        )
        .await
        .expect("complete");
    assert_eq!(late, spectral::store::Completion::Lost);
    stop.cancel();
    task.await.expect("consumer");
    assert_eq!(effects(&s).await, 3, "each row has one effect");
    for row in rows_of(&s, TEST_EVENT).await {
        assert_eq!(row.status, OutboxStatus::Delivered);
        assert_eq!(row.attempts, 2, "the dead worker's attempt counts");
    }
}

/// A lease that expires while a slow handler runs: the row is handled by a second worker
/// too, and the effect is still applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_run_twice_has_one_effect() {
    let db = Db::fresh(Backend::Postgres).await;
    let s = store(&db).await;
    s.set_generation(1);
    s.enqueue(&[event("slow")]).await.expect("enqueue");
    let slow = Arc::new(Probe::default());
    *slow.delay.lock().expect("lock") = Duration::from_millis(1500);
    let fast = Arc::new(Probe::default());
    let mut cfg = config();
    cfg.lease = Duration::from_millis(300);
    let a = consume(store(&db).await, slow.clone(), cfg.clone(), 1);
    // Let the slow worker claim the row, then start the second one: it rescues the row when
    // the lease runs out and handles it while the first is still busy.
    eventually(
        Duration::from_secs(10),
        "the slow worker's claim",
        || async { (!slow.runs.lock().expect("lock").is_empty()).then_some(()) },
    )
    .await;
    let b = consume(store(&db).await, fast.clone(), cfg, 1);
    until_effects(&s, 1).await;
    // Wait for the slow one to finish; stopping it then makes it try to record its result.
    eventually(Duration::from_secs(10), "the slow run's end", || async {
        (slow.finished.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    for (stop, task, _) in [a, b] {
        stop.cancel();
        task.await.expect("consumer");
    }
    assert_eq!(slow.runs.lock().expect("lock").len(), 1);
    assert!(!fast.runs.lock().expect("lock").is_empty());
    assert_eq!(effects(&s).await, 1, "two runs, one effect");
}

/// With notifications off, polling alone delivers every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_notification_is_handled_by_polling() {
    let db = Db::fresh(Backend::Postgres).await;
    let producer = store(&db).await;
    producer.set_generation(1);
    let probe = Arc::new(Probe::default());
    let mut cfg = config();
    cfg.listen = false;
    cfg.poll_interval = Duration::from_millis(200);
    // The consumer has a store of its own, so no in-process wake reaches it either.
    let (stop, task, state) = consume(store(&db).await, probe.clone(), cfg, 1);
    eventually(Duration::from_secs(10), "the consumer polling", || async {
        (state.wiring() == Wiring::Polling).then_some(())
    })
    .await;
    producer
        .enqueue(&[event("p1"), event("p2")])
        .await
        .expect("enqueue");
    until_effects(&producer, 2).await;
    stop.cancel();
    task.await.expect("consumer");
}

/// The listener's backend is terminated: the consumer notices, polls, reconnects, and is
/// woken by notifications again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_after_its_backend_is_terminated() {
    use sqlx::Connection;
    let db = Db::fresh(Backend::Postgres).await;
    let producer = store(&db).await;
    producer.set_generation(1);
    let probe = Arc::new(Probe::default());
    let mut cfg = config();
    // So slow that only a notification explains a prompt delivery.
    cfg.poll_interval = Duration::from_secs(120);
    let (stop, task, state) = consume(store(&db).await, probe.clone(), cfg, 1);
    let wait_wiring = |want: Wiring| {
        let state = state.clone();
        async move {
            eventually(Duration::from_secs(20), &format!("{want:?}"), || async {
                (state.wiring() == want).then_some(())
            })
            .await;
        }
    };
    wait_wiring(Wiring::Wired).await;
    producer.enqueue(&[event("before")]).await.expect("enqueue");
    until_effects(&producer, 1).await;

    let mut admin = sqlx::PgConnection::connect(db.postgres_url().expect("url"))
        .await
        .expect("connect");
    let killed: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut admin)
    .await
    .expect("terminate");
    assert!(!killed.is_empty(), "a listening backend exists");
    // Events written while the listener is down are not lost; the consumer reconnects and
    // delivers them without waiting for its two-minute poll.
    producer.enqueue(&[event("during")]).await.expect("enqueue");
    wait_wiring(Wiring::Wired).await;
    producer.enqueue(&[event("after")]).await.expect("enqueue");
    until_effects(&producer, 3).await;
    stop.cancel();
    task.await.expect("consumer");
}

/// A batch that takes longer than half its lease is not finished by its worker: the rest is
/// released and claimed afresh, so no second worker rescues rows the first will still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_batch_releases_what_it_has_not_started() {
    let db = Db::fresh(Backend::Sqlite).await;
    let s = store(&db).await;
    s.set_generation(1);
    let batch: Vec<NewEvent> = (0..6).map(|i| event(&format!("s{i}"))).collect();
    s.enqueue(&batch).await.expect("enqueue");
    let probe = Arc::new(Probe::default());
    *probe.delay.lock().expect("lock") = Duration::from_millis(200);
    let mut cfg = config();
    // Half the lease is 300 ms: two rows of 200 ms each fit, the third would not.
    cfg.lease = Duration::from_millis(600);
    let (stop, task, _) = consume(store(&db).await, probe.clone(), cfg, 1);
    until_effects(&s, 6).await;
    stop.cancel();
    task.await.expect("consumer");
    // Each row ran once; none was rescued from a live worker.
    let runs = probe.runs.lock().expect("lock").clone();
    assert_eq!(runs.len(), 6, "{runs:?}");
    for row in rows_of(&s, TEST_EVENT).await {
        assert_eq!(row.status, OutboxStatus::Delivered);
        assert_eq!(row.attempts, 1, "a released row's attempt is undone");
        assert!(row.last_error.is_none());
    }
}

/// Rows as the current build and earlier ones wrote them are handled through the typed
/// events; rows this build cannot read (an unknown type, a payload that does not decode)
/// go to the dead-letter queue, with an error that says why, and nothing else is changed.
async fn stored_rows_are_read_as_typed_events_or_dead_lettered(backend: Backend) {
    let db = Db::fresh(backend).await;
    let s = store(&db).await;
    s.set_generation(1);
    let row = |event_type: &str, key: &str, payload: serde_json::Value| NewEvent {
        event_type: event_type.into(),
        world: Some("w".into()),
        payload,
        idempotency_key: key.into(),
        target: None,
    };
    s.enqueue(&[
        // The layout the decision log writes today.
        row(
            events::DECISION_RECORDED,
            "w:1-2",
            json!({"world": "w", "first_seq": 1, "last_seq": 2,
                   "counts": [{"rule": "*", "status": "GREEN", "count": 2}]}),
        ),
        // The layout of earlier builds, which may still be pending after a deploy.
        row(
            events::DECISION_RECORDED,
            "w:listed",
            json!({"world": "w", "decisions": [
                {"decision_id": "a", "action": "pay", "status": "RED", "rules": ["r1"]}]}),
        ),
        row(events::DECISION_RECORDED, "w:bad", json!({"world": "w"})),
        row("thing.happened", "w:unknown", json!({"world": "w"})),
    ])
    .await
    .expect("enqueue");
    let mut registry = Registry::new();
    registry.register(
        events::DECISION_RECORDED,
        Arc::new(spectral::outbox::handlers::DecisionStats),
    );
    let state = Arc::new(OutboxState::default());
    let consumer = Consumer::new(store(&db).await, registry, config(), 1, state);
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        consumer.run(stopped).await.expect("the consumer ran");
    });
    let failed = crate::support::eventually(Duration::from_secs(20), "two dead letters", || {
        let s = s.clone();
        async move {
            let failed = s
                .outbox_list(Some(OutboxStatus::Failed), Some(1), 10)
                .await
                .expect("list");
            let pending = s.outbox_counts(1).await.expect("counts");
            (failed.len() == 2 && pending.pending == 0 && pending.in_flight == 0).then_some(failed)
        }
    })
    .await;
    stop.cancel();
    task.await.expect("consumer");
    let errors: BTreeSet<(String, String)> = failed
        .iter()
        .map(|r| {
            let error = r.last_error.clone().unwrap_or_default();
            (r.idempotency_key.clone(), error)
        })
        .collect();
    let error_of = |key: &str| {
        errors
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, e)| e.clone())
            .unwrap_or_default()
    };
    assert!(
        error_of("w:bad").starts_with("malformed 'decision.recorded' payload"),
        "{errors:?}"
    );
    assert_eq!(
        error_of("w:unknown"),
        "no handler for event type 'thing.happened'"
    );
    let stats: Vec<(String, String, i64)> = s
        .stats("w")
        .await
        .expect("stats")
        .into_iter()
        .map(|d| (d.rule, d.status, d.count))
        .collect();
    assert_eq!(
        stats,
        vec![
            ("*".into(), "GREEN".into(), 2),
            ("*".into(), "RED".into(), 1),
            ("r1".into(), "RED".into(), 1),
        ]
    );
}

async fn the_oldest_pending_event_is_aged_until_it_is_handled(backend: Backend) {
    let db = Db::fresh(backend).await;
    let s = store(&db).await;
    s.set_generation(1);
    assert_eq!(
        s.outbox_counts(1).await.expect("counts").oldest_pending_ms,
        None
    );
    s.enqueue(&[event("aged")]).await.expect("enqueue");
    let counts = s.outbox_counts(1).await.expect("counts");
    let age = counts.oldest_pending_ms.expect("a pending row has an age");
    assert!((0..60_000).contains(&age), "{age} ms");
    // Another generation's rows are not this consumer's lag.
    assert_eq!(
        s.outbox_counts(2).await.expect("counts").oldest_pending_ms,
        None
    );
    let probe = Arc::new(Probe::default());
    let (stop, task, _) = consume(store(&db).await, probe, config(), 1);
    until_effects(&s, 1).await;
    stop.cancel();
    task.await.expect("consumer");
    assert_eq!(
        s.outbox_counts(1).await.expect("counts").oldest_pending_ms,
        None
    );
}

/// Run `sql` on the test database directly, as someone with database access would; `{t}`
/// stands for the schema prefix of the backend's tables.
async fn raw(db: &Db, sql: &str) {
    use sqlx::Connection;
    match (db.sqlite_file(), db.postgres_url()) {
        (Some(file), _) => {
            let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display()))
                .await
                .expect("sqlite");
            sqlx::raw_sql(&sql.replace("{t}", ""))
                .execute(&mut c)
                .await
                .expect("raw sql");
        }
        (None, Some(url)) => {
            let mut c = sqlx::PgConnection::connect(url).await.expect("postgres");
            sqlx::raw_sql(&sql.replace("{t}", "core."))
                .execute(&mut c)
                .await
                .expect("raw sql");
        }
        _ => unreachable!(),
    }
}

/// An effect adding `count` to `world`'s `*/GREEN` statistic.
fn green(world: &str, count: i64) -> Effect {
    Effect::Stats(vec![StatDelta {
        world: world.into(),
        rule: "*".into(),
        status: "GREEN".into(),
        count,
    }])
}

/// One batch holds fresh rows, rows whose key a handler already recorded, and rows whose
/// claim went to another worker: each gets its own outcome, the fresh ones alone have an
/// effect, and a lost row writes nothing, so its new owner applies it once.
async fn a_batch_completes_fresh_duplicate_and_lost_rows_exactly(backend: Backend) {
    let db = Db::fresh(backend).await;
    let s = store(&db).await;
    s.set_generation(1);
    let batch: Vec<NewEvent> = (0..6).map(|i| event(&format!("k{i}"))).collect();
    s.enqueue(&batch).await.expect("enqueue");
    let rows = s.claim(1, "w1", 10).await.expect("claim");
    assert_eq!(rows.len(), 6);
    // k1, k3 and k5 were handled before (by an earlier run of the same handler).
    for key in ["k1", "k3", "k5"] {
        raw(
            &db,
            &format!(
                "INSERT INTO {{t}}event_handled (handler, idempotency_key, outbox_id, handled_at)
                 VALUES ('probe', 'test.event:{key}', 0, {})",
                match backend {
                    Backend::Sqlite => "0",
                    Backend::Postgres => "now()",
                }
            ),
        )
        .await;
    }
    // k4 and k5 went back to pending and another worker holds them now.
    let lost = [rows[4].id, rows[5].id];
    assert_eq!(s.release("w1", &lost).await.expect("release"), 2);
    let taken = s.claim(1, "w2", 10).await.expect("claim");
    assert_eq!(taken.iter().map(|r| r.id).collect::<Vec<_>>(), lost);
    // Row i adds 10^i to one counter, so the total says which rows had an effect; k2 also
    // fans out an event, and k3 (a duplicate) would.
    let fan_out = |key: &str| Effect::Enqueue(vec![event(&format!("fan-{key}"))]);
    let effects_of: Vec<Effect> = (0..6u32)
        .map(|i| match i {
            2 | 3 => fan_out(&format!("k{i}")),
            _ => green("w", 10i64.pow(i)),
        })
        .collect();
    let handled: Vec<Handled<'_>> = rows
        .iter()
        .zip(&effects_of)
        .map(|(row, effect)| Handled {
            row,
            handler: "probe",
            effect,
        })
        .collect();
    let outcomes = s.complete_batch("w1", &handled).await.expect("complete");
    assert_eq!(
        outcomes,
        vec![
            Completion::Applied,
            Completion::Duplicate,
            Completion::Applied,
            Completion::Duplicate,
            Completion::Lost,
            Completion::Lost,
        ]
    );
    assert_eq!(effects(&s).await, 1, "only k0's statistic");
    let fanned: Vec<String> = rows_of(&s, TEST_EVENT)
        .await
        .into_iter()
        .map(|r| r.idempotency_key)
        .filter(|k| k.starts_with("fan-"))
        .collect();
    assert_eq!(fanned, vec!["fan-k2".to_string()], "only k2's fan-out");
    for row in &rows {
        let now = s.outbox_row(row.id).await.expect("row").expect("exists");
        if lost.contains(&row.id) {
            assert_eq!(
                now.status,
                OutboxStatus::InFlight,
                "{}",
                row.idempotency_key
            );
            assert_eq!(now.claimed_by.as_deref(), Some("w2"));
        } else {
            assert_eq!(
                now.status,
                OutboxStatus::Delivered,
                "{}",
                row.idempotency_key
            );
        }
    }
    // The new owner completes the lost rows: k4 was never recorded, k5 was.
    let handled: Vec<Handled<'_>> = taken
        .iter()
        .zip(&effects_of[4..])
        .map(|(row, effect)| Handled {
            row,
            handler: "probe",
            effect,
        })
        .collect();
    let outcomes = s.complete_batch("w2", &handled).await.expect("complete");
    assert_eq!(outcomes, vec![Completion::Applied, Completion::Duplicate]);
    assert_eq!(effects(&s).await, 10_001);
    // A second completion of rows already delivered changes nothing.
    let again = s.complete_batch("w2", &handled).await.expect("complete");
    assert_eq!(again, vec![Completion::Lost, Completion::Lost]);
    assert_eq!(effects(&s).await, 10_001);
    s.close().await;
}

/// A handler that adds to the statistics of the world its row's key names.
struct PerWorld;

impl Handler for PerWorld {
    fn name(&self) -> &'static str {
        "per_world"
    }

    fn handle<'a>(&'a self, row: &'a OutboxRow) -> HandlerFuture<'a> {
        let world = row
            .idempotency_key
            .split('-')
            .next()
            .unwrap_or("w")
            .to_owned();
        Box::pin(async move { Ok(green(&world, 1)) })
    }
}

/// One row of a batch has an effect the database refuses (a trigger rejects its world): the
/// batch's transaction rolls back, its rows are completed one at a time, the others are
/// delivered with one effect each, and the refused row wrote nothing: once the database
/// accepts it, its effect is applied.
async fn a_failing_effect_fails_alone_and_the_rest_of_its_batch_is_delivered(backend: Backend) {
    let db = Db::fresh(backend).await;
    let s = store(&db).await;
    s.set_generation(1);
    let refuse = match backend {
        Backend::Sqlite => {
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON decision_stats
             WHEN NEW.world = 'poison' BEGIN SELECT RAISE(ABORT, 'poison refused'); END;"
        }
        Backend::Postgres => {
            "CREATE FUNCTION core.refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.world = 'poison' THEN RAISE EXCEPTION 'poison refused'; END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_poison BEFORE INSERT ON core.decision_stats
                 FOR EACH ROW EXECUTE FUNCTION core.refuse_poison();"
        }
    };
    raw(&db, refuse).await;
    let keys = ["w-0", "w-1", "poison-2", "w-3", "w-4"];
    let batch: Vec<NewEvent> = keys.iter().map(|k| event(k)).collect();
    s.enqueue(&batch).await.expect("enqueue");
    let mut registry = Registry::new();
    registry.register(TEST_EVENT, Arc::new(PerWorld));
    let consumer = Consumer::new(
        store(&db).await,
        registry,
        config(),
        1,
        Arc::new(OutboxState::default()),
    );
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        consumer.run(stopped).await.expect("the consumer ran");
    });
    until_effects(&s, 4).await;
    let status_of = |key: &str| {
        let s = s.clone();
        let key = key.to_owned();
        async move {
            rows_of(&s, TEST_EVENT)
                .await
                .into_iter()
                .find(|r| r.idempotency_key == key)
                .map(|r| r.status)
        }
    };
    for key in keys.iter().filter(|k| k.starts_with("w-")) {
        assert_eq!(status_of(key).await, Some(OutboxStatus::Delivered), "{key}");
    }
    // The refused row is left in flight for the lease rescue, with nothing recorded.
    assert_eq!(status_of("poison-2").await, Some(OutboxStatus::InFlight));
    assert!(s.stats("poison").await.expect("stats").is_empty());
    let accept = match backend {
        Backend::Sqlite => "DROP TRIGGER refuse_poison",
        Backend::Postgres => "DROP TRIGGER refuse_poison ON core.decision_stats",
    };
    raw(&db, accept).await;
    assert_eq!(
        s.rescue(1, Duration::ZERO).await.expect("rescue"),
        1,
        "only the refused row is in flight"
    );
    let poison = eventually(Duration::from_secs(20), "the refused row's effect", || {
        let s = s.clone();
        async move {
            let stats = s.stats("poison").await.expect("stats");
            (!stats.is_empty()).then_some(stats)
        }
    })
    .await;
    stop.cancel();
    task.await.expect("consumer");
    assert_eq!(poison.len(), 1);
    assert_eq!(poison[0].count, 1);
    assert_eq!(effects(&s).await, 4, "each of the others once");
    assert_eq!(status_of("poison-2").await, Some(OutboxStatus::Delivered));
}

//! Retention on both backends: another generation's stranded rows turn `/health` degraded until
//! they are adopted or handled; delivered outbox rows and their `event_handled` entries are
//! pruned in bounded batches, by the workers on their own interval; and with a million delivered
//! rows `/health`'s counts still read an index and answer quickly, and pruning empties the
//! table down to what is kept.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use spectral::outbox::{OutboxState, Retention};
use spectral::store::{decision_recorded, Effect, NewEvent};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use crate::app::{green_wire, test_config, Backend, Db, TestApp, OPERATOR};
use crate::support::eventually;

crate::both_backends!(
    stranded_rows_of_an_old_generation_degrade_health_until_adopted_or_handled,
    retention_prunes_delivered_rows_with_their_handled_entries_and_nothing_else,
    the_workers_prune_delivered_rows_on_their_own_interval,
    a_million_delivered_events_keep_health_on_an_index_and_are_pruned,
);

// ---------------------------------------------------------------------------------------------
// SQL behind the store's back, for what the store has no call for (counting every row,
// inserting a million, reading query plans).

/// Run `sql` (the SQLite text, or the Postgres text) on the test database; rows affected.
pub(crate) async fn exec(db: &Db, sqlite: &str, postgres: &str) -> Result<u64, String> {
    match (db.sqlite_file(), db.postgres_url()) {
        (Some(file), _) => {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(file)
                .busy_timeout(Duration::from_secs(30));
            let mut conn = sqlx::SqliteConnection::connect_with(&options)
                .await
                .expect("connect to the SQLite file");
            let r = sqlx::raw_sql(sqlite).execute(&mut conn).await;
            let _ = conn.close().await;
            r.map(|r| r.rows_affected()).map_err(|e| e.to_string())
        }
        (None, Some(url)) => {
            let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
            let r = sqlx::raw_sql(postgres).execute(&mut conn).await;
            let _ = conn.close().await;
            r.map(|r| r.rows_affected()).map_err(|e| e.to_string())
        }
        _ => unreachable!("a database is SQLite or Postgres"),
    }
}

/// `SELECT COUNT(*) FROM <table>` (`core.<table>` on Postgres).
pub(crate) async fn count(db: &Db, table: &str) -> i64 {
    match (db.sqlite_file(), db.postgres_url()) {
        (Some(file), _) => {
            let options = sqlx::sqlite::SqliteConnectOptions::new().filename(file);
            let mut conn = sqlx::SqliteConnection::connect_with(&options)
                .await
                .expect("connect");
            let n = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
                .fetch_one(&mut conn)
                .await
                .expect("count");
            let _ = conn.close().await;
            n
        }
        (None, Some(url)) => {
            let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
            let n = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM core.{table}"))
                .fetch_one(&mut conn)
                .await
                .expect("count");
            let _ = conn.close().await;
            n
        }
        _ => unreachable!("a database is SQLite or Postgres"),
    }
}

fn recorded(world: &str, seq: i64) -> NewEvent {
    decision_recorded(world, seq, seq, [("*", "GREEN", 1)]).expect("event")
}

// ---------------------------------------------------------------------------------------------
// Cases.

async fn stranded_rows_of_an_old_generation_degrade_health_until_adopted_or_handled(
    backend: Backend,
) {
    let db = Db::fresh(backend).await;
    let mut config = test_config(&db);
    // Every row of another generation that is pending at all is stranded.
    config.outbox.stranded_after = Duration::ZERO;
    let app = TestApp::start(config).await;
    let (status, health) = app.admin_get("/health").await;
    assert_eq!((status, &health["status"]), (200, &json!("ok")), "{health}");
    let own = health["generation"].as_i64().expect("generation");
    let old_generation = own + 1000;

    let old = db.store().await;
    old.set_generation(old_generation);
    old.enqueue(&[recorded("acme-payments", 1), recorded("acme-payments", 2)])
        .await
        .expect("enqueue");
    old.enqueue(&[recorded("acme-payments", 3)])
        .await
        .expect("enqueue");

    // Degraded on the admin health with the count and the age; still ready (200).
    let health = eventually(Duration::from_secs(10), "health degraded", || async {
        let (status, h) = app.admin_get("/health").await;
        (status == 200 && h["status"] == "degraded").then_some(h)
    })
    .await;
    let stranded = &health["features"]["outbox_stranded"];
    assert_eq!(stranded["rows"], 3, "{health}");
    assert!(stranded["oldest_age_ms"].as_i64().is_some(), "{health}");
    assert_eq!(stranded["after_ms"], 0, "{health}");
    // The public health says degraded too, and still names no count or world.
    let (status, public) = app.get(None, "/health").await;
    assert_eq!(
        (status, &public["status"]),
        (200, &json!("degraded")),
        "{public}"
    );
    let text = public.to_string();
    assert!(
        !text.contains("stranded") && !text.contains("acme"),
        "{text}"
    );

    // A generous threshold: the same rows are not stranded yet.
    let fresh = old
        .stranded(own, Duration::from_secs(3600))
        .await
        .expect("stranded");
    assert_eq!(fresh.rows, 0);

    // Handled by their own generation (a consumer of it, here by hand): one row fewer.
    let claimed = old
        .claim(old_generation, "old-worker", 1)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    old.complete(&claimed[0], "old-worker", "probe", &Effect::None)
        .await
        .expect("complete");
    eventually(Duration::from_secs(10), "two stranded rows", || async {
        let (_, h) = app.admin_get("/health").await;
        (h["features"]["outbox_stranded"]["rows"] == 2).then_some(())
    })
    .await;

    // Adopted by the running generation, they are handled and the health is ok again.
    assert_eq!(old.adopt(old_generation, own).await.expect("adopt"), 2);
    let health = eventually(Duration::from_secs(20), "health ok again", || async {
        let (status, h) = app.admin_get("/health").await;
        (status == 200 && h["status"] == "ok").then_some(h)
    })
    .await;
    assert_eq!(health["features"]["outbox_stranded"]["rows"], 0, "{health}");
    old.close().await;
    app.stop().await;
}

async fn retention_prunes_delivered_rows_with_their_handled_entries_and_nothing_else(
    backend: Backend,
) {
    let db = Db::fresh(backend).await;
    let store = db.store().await;
    store.set_generation(1);
    store
        .enqueue(&(1..=7).map(|i| recorded("w", i)).collect::<Vec<_>>())
        .await
        .expect("enqueue");
    // Five delivered (each with its event_handled entry), two left pending.
    let claimed = store.claim(1, "worker", 5).await.expect("claim");
    assert_eq!(claimed.len(), 5);
    for row in &claimed {
        store
            .complete(row, "worker", "probe", &Effect::None)
            .await
            .expect("complete");
    }
    assert_eq!(count(&db, "event_handled").await, 5);

    // Nothing is old enough for a retention that starts before the rows occurred.
    let long_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    assert_eq!(store.prune_outbox(long_ago, 100).await.expect("prune"), 0);
    assert_eq!(count(&db, "outbox").await, 7);

    // Batches of two: 2, 2, 1, then nothing; the pending rows stay.
    let later = chrono::Utc::now() + chrono::Duration::seconds(1);
    let mut batches = Vec::new();
    loop {
        let n = store.prune_outbox(later, 2).await.expect("prune");
        batches.push(n);
        if n == 0 {
            break;
        }
    }
    assert_eq!(batches, vec![2, 2, 1, 0]);
    assert_eq!(count(&db, "outbox").await, 2);
    assert_eq!(count(&db, "event_handled").await, 0);
    let counts = store.outbox_counts(1).await.expect("counts");
    assert_eq!(counts.pending, 2);

    // The worker's pass does the same and counts it.
    let pending = store.claim(1, "worker", 5).await.expect("claim");
    for row in &pending {
        store
            .complete(row, "worker", "probe", &Effect::None)
            .await
            .expect("complete");
    }
    let metrics = Arc::new(spectral::telemetry::Metrics::default());
    let state = Arc::new(OutboxState::new(metrics.clone()));
    let config = spectral::config::OutboxConfig {
        retention: Duration::ZERO,
        prune_batch: 1,
        ..Default::default()
    };
    let retention = Retention::new(store.clone(), &config, state);
    let removed = retention
        .pass(&CancellationToken::new())
        .await
        .expect("pass");
    assert_eq!(removed, 2);
    assert_eq!(metrics.outbox.pruned.get(), 2);
    assert_eq!(count(&db, "outbox").await, 0);
    assert_eq!(count(&db, "event_handled").await, 0);
    store.close().await;
}

async fn the_workers_prune_delivered_rows_on_their_own_interval(backend: Backend) {
    let db = Db::fresh(backend).await;
    let mut config = test_config(&db);
    config.outbox.retention = Duration::ZERO;
    config.outbox.prune_interval = Duration::from_millis(50);
    let app = TestApp::start(config).await;
    for _ in 0..3 {
        let (status, body) = app.decide(OPERATOR, &green_wire()).await;
        assert_eq!(status, 200, "{body}");
    }
    // The decisions' events are written, handled and then pruned by the workers.
    let text = eventually(Duration::from_secs(30), "rows pruned", || async {
        let resp = app
            .client
            .get(format!("{}/metrics", app.admin))
            .send()
            .await
            .ok()?;
        let text = resp.text().await.ok()?;
        let pruned: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("spectral_outbox_pruned_total "))?
            .trim()
            .parse()
            .ok()?;
        (pruned >= 1.0).then_some(text)
    })
    .await;
    assert!(text.contains("spectral_outbox_pruned_total"), "{text}");
    eventually(Duration::from_secs(30), "no delivered row left", || async {
        let left = app
            .running
            .as_ref()
            .expect("running")
            .app
            .store
            .outbox_list(Some(spectral::store::OutboxStatus::Delivered), None, 10)
            .await
            .ok()?;
        left.is_empty().then_some(())
    })
    .await;
    app.stop().await;
}

/// A million delivered rows of long ago, each with its `event_handled` entry, and a thousand
/// recent ones that retention keeps.
const OLD_ROWS: i64 = 1_000_000;
const RECENT_ROWS: i64 = 1_000;

async fn insert_delivered(db: &Db) {
    let now_us = chrono::Utc::now().timestamp_micros();
    let old_us = now_us - 30 * 86_400_000_000;
    let total = OLD_ROWS + RECENT_ROWS;
    // Row i occurred `old` + i µs when i <= OLD_ROWS, else now: one statement per table.
    let sqlite = format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {total})
         INSERT INTO outbox (event_type, event_version, occurred_at, source, channel,
                             generation, world, payload, idempotency_key, status, attempts,
                             available_at, claimed_at, claimed_by)
         SELECT 'test.event', 1, CASE WHEN i <= {OLD_ROWS} THEN {old_us} + i ELSE {now_us} END,
                'test', 'spectral_outbox', 1, 'w', '{{}}', 'k' || i, 'delivered', 1,
                {old_us}, {old_us}, 'worker'
         FROM n;
         INSERT INTO event_handled (handler, idempotency_key, outbox_id, handled_at)
         SELECT 'probe', idempotency_key, id, {old_us} FROM outbox;"
    );
    let postgres = format!(
        "INSERT INTO core.outbox (event_type, event_version, occurred_at, source, channel,
                                  generation, world, payload, idempotency_key, status, attempts,
                                  available_at, claimed_at, claimed_by)
         SELECT 'test.event', 1,
                CASE WHEN i <= {OLD_ROWS} THEN to_timestamp(({old_us} + i) / 1e6)
                     ELSE to_timestamp({now_us} / 1e6) END,
                'test', 'spectral_outbox', 1, 'w', '{{}}'::jsonb, 'k' || i, 'delivered', 1,
                to_timestamp({old_us} / 1e6), to_timestamp({old_us} / 1e6), 'worker'
         FROM generate_series(1, {total}) AS i;
         INSERT INTO core.event_handled (handler, idempotency_key, outbox_id, handled_at)
         SELECT 'probe', idempotency_key, id, to_timestamp({old_us} / 1e6) FROM core.outbox;
         ANALYZE core.outbox;
         ANALYZE core.event_handled;"
    );
    exec(db, &sqlite, &postgres).await.expect("bulk insert");
}

async fn a_million_delivered_events_keep_health_on_an_index_and_are_pruned(backend: Backend) {
    let db = Db::fresh(backend).await;
    // Migrate first, through a store of its own.
    db.store().await.close().await;
    let started = Instant::now();
    insert_delivered(&db).await;
    eprintln!("{backend:?}: inserted in {:?}", started.elapsed());
    assert_eq!(count(&db, "outbox").await, OLD_ROWS + RECENT_ROWS);

    // The queries `/health` runs read the index of undelivered rows, not the table.
    let store = db.store().await;
    for (query, plan) in store.health_query_plans(1).await.expect("plans") {
        assert!(
            plan.contains("outbox_undelivered"),
            "{backend:?}: {query} does not use outbox_undelivered:\n{plan}"
        );
        let scans_table = match backend {
            Backend::Sqlite => plan
                .lines()
                .any(|l| l.trim_start().starts_with("SCAN outbox") && !l.contains("INDEX")),
            Backend::Postgres => plan.contains("Seq Scan"),
        };
        assert!(
            !scans_table,
            "{backend:?}: {query} scans the table:\n{plan}"
        );
    }

    // And the service's `/health` answers well within a generous bound.
    // (Its own retention keeps everything: the pass below is the one measured.)
    let mut config = test_config(&db);
    config.outbox.retention = Duration::from_secs(3650 * 86_400);
    let app = TestApp::start(config).await;
    for _ in 0..3 {
        let started = Instant::now();
        let (status, health) = app.admin_get("/health").await;
        let took = started.elapsed();
        assert_eq!(status, 200, "{health}");
        assert!(
            took < Duration::from_secs(2),
            "{backend:?}: /health took {took:?}"
        );
        // The counts are there (the seeded worlds' own events may still be pending).
        assert!(
            health["features"]["outbox_rows"]["pending"].is_i64(),
            "{health}"
        );
    }
    app.stop().await;

    // One retention pass, in bounded batches, brings the table down to the recent rows.
    let metrics = Arc::new(spectral::telemetry::Metrics::default());
    let config = spectral::config::OutboxConfig {
        retention: Duration::from_secs(86_400),
        prune_batch: 10_000,
        ..Default::default()
    };
    let retention = Retention::new(
        store.clone(),
        &config,
        Arc::new(OutboxState::new(metrics.clone())),
    );
    // The service's own events (the seeded worlds') are recent and stay, like the recent rows.
    let (rows, handled) = (
        count(&db, "outbox").await,
        count(&db, "event_handled").await,
    );
    let started = Instant::now();
    let removed = retention
        .pass(&CancellationToken::new())
        .await
        .expect("pass");
    eprintln!(
        "{backend:?}: pruned {removed} rows in {:?}",
        started.elapsed()
    );
    assert_eq!(removed, OLD_ROWS as u64);
    assert_eq!(metrics.outbox.pruned.get(), OLD_ROWS as u64);
    let left = count(&db, "outbox").await;
    assert_eq!(left, rows - OLD_ROWS);
    assert!(left < RECENT_ROWS + 100, "{left} rows left");
    assert_eq!(count(&db, "event_handled").await, handled - OLD_ROWS);
    store.close().await;
}

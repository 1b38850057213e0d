//! The stop and the wiring of `spectral serve` as ARCHITECTURE.md ("Supervisor") describes
//! them: one deadline for the whole stop, so a slow client cannot starve the decision log's
//! flush; the API's commits waking the workers' consumer on SQLite; a dead workers runtime
//! making the process not ready and its exit code non-zero.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::app::{green_wire, test_config, Backend, Db, TestApp};
use crate::support::{eventually, predicates_dir};

/// A `spectral serve` process with the environment a test gives it.
struct Serve {
    child: Child,
    base: String,
    key: String,
    _cwd: tempfile::TempDir,
}

impl Serve {
    fn start(env: &[(&str, &str)]) -> Self {
        let cwd = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_spectral"))
            .arg("serve")
            .current_dir(cwd.path())
            .env_remove("DATABASE_URL")
            .env("SPECTRAL_ADDR", "127.0.0.1:0")
            .env("SPECTRAL_ADMIN_ADDR", "127.0.0.1:0")
            .env("SPECTRAL_SEED_DIR", predicates_dir())
            .env("SPECTRAL_LOG_FORMAT", "json")
            .env("SPECTRAL_SANDBOX_DEADLINE_US", "500000")
            .env("SPECTRAL_SANDBOX_DECISION_DEADLINE_US", "5000000")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spectral serve starts");
        let stdout = child.stdout.take().expect("stdout");
        let (base, key) = crate::app::service_address_and_key(stdout, Duration::from_secs(60));
        Self {
            child,
            base,
            key,
            _cwd: cwd,
        }
    }

    fn signal_term(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Wait for the process to exit, at most `within`; its exit code.
    async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let child = &mut self.child;
        eventually(within, "spectral serve exits", || {
            let status = child.try_wait().expect("waits");
            async move { status }
        })
        .await
        .code()
    }

    async fn health(&self, client: &reqwest::Client) -> Option<(u16, Value)> {
        let resp = client
            .get(format!("{}/health", self.base))
            .send()
            .await
            .ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.json().await.ok()?))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGTERM under decide load, with a client holding a request open past the drain: every
/// decision answered 200 is in the decision log afterwards, and the stop is clean. The
/// writer lingers longer than the whole deadline, so every record is still queued when the
/// stop begins; only a flush that gets its share of the deadline writes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_with_a_slow_client_in_flight_loses_no_decision() {
    let data = tempfile::tempdir().expect("tempdir");
    let data_dir = data.path().to_str().expect("utf-8 path").to_string();
    let mut server = Serve::start(&[
        ("SPECTRAL_DATA_DIR", &data_dir),
        ("SPECTRAL_SHUTDOWN_GRACE_MS", "3000"),
        // The slow client's request would otherwise end at its timeout, within the drain.
        ("SPECTRAL_REQUEST_TIMEOUT_MS", "120000"),
        ("SPECTRAL_DECISION_LOG_LINGER_MS", "10000"),
        ("SPECTRAL_DECISION_LOG_BATCH", "10000"),
        ("SPECTRAL_DECISION_LOG_CAPACITY", "100000"),
    ]);
    let client = reqwest::Client::new();

    // A client that sends its headers and part of its body, then waits: in flight until the
    // process exits.
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connects");
    let head = format!(
        "POST /api/decide HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 4096\r\n\r\n{{\"world\":",
        server.key
    );
    slow.write_all(head.as_bytes()).await.expect("writes");

    // Decide load from four clients until the server stops answering.
    let answered = Arc::new(Mutex::new(Vec::<String>::new()));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (client, base, key, answered) = (
                client.clone(),
                server.base.clone(),
                server.key.clone(),
                answered.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let sent = client
                        .post(format!("{base}/api/decide"))
                        .bearer_auth(&key)
                        .json(&green_wire())
                        .send()
                        .await;
                    let Ok(resp) = sent else { break };
                    if resp.status().as_u16() != 200 {
                        continue;
                    }
                    let Ok(body) = resp.json::<Value>().await else {
                        continue;
                    };
                    let id = body["decision_metadata"]["decision_id"]
                        .as_str()
                        .expect("a decision id")
                        .to_string();
                    answered.lock().expect("lock").push(id);
                }
            })
        })
        .collect();
    let counted = answered.clone();
    eventually(Duration::from_secs(60), "50 decisions answered", || {
        let n = counted.lock().expect("lock").len();
        async move { (n >= 50).then_some(()) }
    })
    .await;
    server.signal_term();
    let code = server.exit_code(Duration::from_secs(30)).await;
    for task in load {
        task.await.expect("load task");
    }
    drop(slow);
    assert_eq!(code, Some(0), "a graceful stop within its deadline exits 0");

    let mut config = spectral::config::Config::default().store;
    config.database_url = None;
    config.data_dir = data.path().to_path_buf();
    config.migrate_on_start = false;
    let store = spectral::store::Store::connect(&config)
        .await
        .expect("store");
    let written: HashSet<String> = store
        .decisions("acme-payments", 0, 1_000_000)
        .await
        .expect("decisions")
        .into_iter()
        .map(|r| r.decision.decision_id)
        .collect();
    store.close().await;
    let answered = answered.lock().expect("lock").clone();
    assert!(answered.len() >= 50);
    let lost: Vec<&String> = answered
        .iter()
        .filter(|id| !written.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} decisions answered 200 have no record, e.g. {:?}",
        lost.len(),
        answered.len(),
        lost.first()
    );
}

/// Under `spectral serve` on SQLite the API's commit wakes the workers' consumer: with a
/// poll interval of 30 s, a published version's event is handled in a fraction of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_the_apis_commit_wakes_the_workers_consumer() {
    const POLL: Duration = Duration::from_secs(30);
    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.outbox.poll_interval = POLL;
    let app = TestApp::start(config).await;
    let running = app.running.as_ref().expect("running");
    let (store, generation) = (running.app.store.clone(), running.app.generation);
    let (status, health) = app.admin_get("/health").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["features"]["outbox"], "wired", "{health}");

    let undelivered = || {
        let store = store.clone();
        async move {
            let c = store.outbox_counts(generation).await.expect("counts");
            (c.pending + c.in_flight == 0).then_some(())
        }
    };
    // The seed's events first, so that only the next one is measured.
    eventually(
        Duration::from_secs(10),
        "the seed's events handled",
        undelivered,
    )
    .await;
    let started = Instant::now();
    app.publish_yellow_variant().await;
    eventually(
        Duration::from_secs(10),
        "the published version's event handled",
        undelivered,
    )
    .await;
    let took = started.elapsed();
    assert!(
        took < POLL / 10,
        "publish → handled took {took:?}: the consumer waited for its poll"
    );
    let (_, metrics) = app.admin_get("/metrics").await;
    let text = metrics.as_str().unwrap_or_default();
    assert!(
        text.contains("spectral_outbox_handled_total{event_type=\"worldmodel.version.published\"}"),
        "{text}"
    );
    assert!(
        text.contains("spectral_outbox_consumer_state{state=\"wired\"} 1"),
        "{text}"
    );
    app.stop().await;
}

/// A workers runtime that dies makes the process not ready and `spectral serve` exit
/// non-zero. The failure is real: the workers' database connections are ended and the
/// database refuses new ones, while the API's open connections go on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_runtime_fails_readiness_and_the_exit_code() {
    // In process: the health check says why.
    let db = Db::fresh(Backend::Postgres).await;
    let url = db.postgres_url().expect("postgres").to_string();
    let mut config = test_config(&db);
    config.outbox.lease = Duration::from_millis(1000);
    config.outbox.poll_interval = Duration::from_millis(100);
    let mut app = TestApp::start(config).await;
    let running = app.running.as_ref().expect("running");
    let state = running.app.outbox.clone();
    eventually(Duration::from_secs(30), "the consumer wired", || {
        let wired = state.wiring() == spectral::outbox::Wiring::Wired;
        async move { wired.then_some(()) }
    })
    .await;
    let (ready, _) = running.app.health().await;
    assert!(ready);
    cut_off_the_workers(&url).await;
    eventually(
        Duration::from_secs(30),
        "the workers runtime failed",
        || {
            let failed = state.wiring() == spectral::outbox::Wiring::Failed;
            async move { failed.then_some(()) }
        },
    )
    .await;
    let (ready, health) = running.app.health().await;
    assert!(!ready, "{health}");
    assert_eq!(health["features"]["outbox"], "failed", "{health}");
    let stopped = app.running.take().expect("running").wait().await;
    assert_eq!(stopped, spectral::supervisor::Stopped::WorkersFailed);

    // The binary: exits non-zero.
    let db = Db::fresh(Backend::Postgres).await;
    let url = db.postgres_url().expect("postgres").to_string();
    let mut server = Serve::start(&[
        ("DATABASE_URL", url.as_str()),
        ("SPECTRAL_OUTBOX_LEASE_MS", "1000"),
        ("SPECTRAL_OUTBOX_POLL_MS", "100"),
        ("SPECTRAL_SHUTDOWN_GRACE_MS", "3000"),
    ]);
    let client = reqwest::Client::new();
    let served = &server;
    eventually(Duration::from_secs(30), "the consumer wired", || async {
        let (status, health) = served.health(&client).await?;
        (status == 200 && health["features"]["outbox"] == "wired").then_some(())
    })
    .await;
    cut_off_the_workers(&url).await;
    let code = server.exit_code(Duration::from_secs(30)).await;
    assert_eq!(code, Some(1), "a serve whose workers died exits 1");
}

/// End the workers' connections to the database at `url` and refuse new ones; the API
/// keeps the connections it has open.
async fn cut_off_the_workers(url: &str) {
    use sqlx::Connection;
    let mut parsed = url::Url::parse(url).expect("a database URL");
    let name = parsed.path().trim_start_matches('/').to_string();
    // A database's connections are refused from another one.
    parsed.set_path("/postgres");
    let mut admin = sqlx::PgConnection::connect(parsed.as_str())
        .await
        .expect("admin connection");
    let admin = &mut admin;
    sqlx::raw_sql(&format!(
        r#"ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false"#
    ))
    .execute(&mut *admin)
    .await
    .expect("refuse connections");
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND application_name = 'spectral-workers'",
    )
    .bind(&name)
    .fetch_all(&mut *admin)
    .await
    .expect("terminate");
    assert!(
        !ended.is_empty(),
        "the workers have connections of their own"
    );
}

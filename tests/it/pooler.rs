//! The production DSN's path: the service through a real PgBouncer. In session mode (what
//! production runs on, Supabase's session pooler) migrations, serving, decisions, deploy
//! propagation over LISTEN/NOTIFY and the outbox with its LISTEN reconnect all work; in
//! transaction mode the service refuses to start, with a message that names the mode.
//!
//! Each test starts its own `pgbouncer` process (Debian's package; `scripts/test.sh`
//! installs it) on a free loopback port, with a configuration written into a temporary
//! directory, in front of the test's own database on 127.0.0.1:5432.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use spectral::config::OutboxConfig;
use spectral::outbox::{Consumer, Handler, HandlerFuture, OutboxState, Registry, Wiring};
use spectral::store::{Effect, NewEvent, OutboxRow, StatDelta, Store, StoreConfig};
use tokio_util::sync::CancellationToken;

use crate::app::{green_wire, test_config, Backend, Db, TestApp, OPERATOR};
use crate::support::eventually;
use crate::support::process::command;

/// PgBouncer's pool modes under test.
#[derive(Debug, Clone, Copy)]
enum PoolMode {
    Session,
    Transaction,
}

/// A running `pgbouncer` in front of 127.0.0.1:5432, killed when dropped.
struct Pgbouncer {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

/// The `pgbouncer` executable: on `PATH`, or where Debian installs it.
fn pgbouncer_binary() -> PathBuf {
    let on_path = Command::new("sh")
        .args(["-c", "command -v pgbouncer"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|p| !p.is_empty());
    let path = on_path.map_or_else(|| PathBuf::from("/usr/sbin/pgbouncer"), PathBuf::from);
    assert!(
        path.exists(),
        "the pooler tests need PgBouncer: install it (apt-get install -y pgbouncer; \
         scripts/test.sh does)"
    );
    path
}

/// Whether this process runs as root, where PgBouncer must be told which user to become.
fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Pgbouncer {
    /// Write the configuration and start PgBouncer in `mode`; return once it accepts
    /// connections.
    async fn start(mode: PoolMode) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let mode = match mode {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        };
        let user = if running_as_root() {
            "user = postgres\n"
        } else {
            ""
        };
        // `*` routes every database name to the server, so each test's own database is
        // reached under its own name. sqlx sends `extra_float_digits` at start-up, which
        // PgBouncer must be told to accept.
        let ini = format!(
            "[databases]\n\
             * = host=127.0.0.1 port=5432\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {auth}\n\
             pool_mode = {mode}\n\
             max_client_conn = 200\n\
             default_pool_size = 40\n\
             ignore_startup_parameters = extra_float_digits\n\
             logfile = {log}\n\
             {user}",
            auth = dir.path().join("users.txt").display(),
            log = dir.path().join("pgbouncer.log").display(),
        );
        std::fs::write(dir.path().join("pgbouncer.ini"), ini).expect("write the configuration");
        std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"\"\n").expect("users");
        // PgBouncer, started as root, becomes `postgres` and must still read its files and
        // write its log.
        let _ = Command::new("chmod")
            .args(["-R", "a+rwX"])
            .arg(dir.path())
            .status();
        let mut bouncer = Self {
            dir,
            port,
            child: None,
        };
        bouncer.spawn().await;
        bouncer
    }

    /// Start the process on this bouncer's port and configuration; wait until it accepts.
    async fn spawn(&mut self) {
        let mut child = Command::new(pgbouncer_binary())
            .arg(self.dir.path().join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let addr = format!("127.0.0.1:{}", self.port);
        let log = self.dir.path().join("pgbouncer.log");
        eventually(Duration::from_secs(20), "pgbouncer accepting", || {
            let exited = child.try_wait().ok().flatten();
            let (addr, log) = (addr.clone(), log.clone());
            async move {
                if let Some(status) = exited {
                    panic!(
                        "pgbouncer exited ({status}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                tokio::net::TcpStream::connect(&addr).await.ok().map(drop)
            }
        })
        .await;
        self.child = Some(child);
    }

    /// SIGKILL the process and wait until it is gone (its port closes with it).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `url` (a test database's) with its server replaced by this bouncer.
    fn url_for(&self, url: &str) -> String {
        let mut parsed = url::Url::parse(url).expect("database URL");
        parsed.set_port(Some(self.port)).expect("port");
        parsed.to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test database and a bouncer in front of it; the URL through the bouncer.
async fn through_bouncer(mode: PoolMode) -> (Db, Pgbouncer, String) {
    let db = Db::fresh(Backend::Postgres).await;
    let bouncer = Pgbouncer::start(mode).await;
    let url = bouncer.url_for(db.postgres_url().expect("postgres"));
    (db, bouncer, url)
}

/// Migrations through the bouncer with the binary, then two instances serving through it: a
/// decision, and a deployment made through one instance reaching the other by NOTIFY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_migrates_serves_and_propagates_deploys_through_a_session_pooler() {
    let (db, bouncer, url) = through_bouncer(PoolMode::Session).await;
    let out = command(&["migrate"])
        .env("DATABASE_URL", &url)
        .output()
        .expect("spectral migrate");
    assert!(
        out.status.success(),
        "migrate through pgbouncer failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        bouncer.log()
    );

    let mut config = test_config(&db);
    config.store.database_url = Some(url.clone());
    let a = TestApp::start(config).await;
    let mut config = test_config(&db);
    config.store.database_url = Some(url.clone());
    // Polling so slow that only a notification can explain a prompt switch.
    config.cache.poll_interval = Duration::from_secs(60);
    let b = TestApp::start(config).await;
    let (_, health) = b.admin_get("/health").await;
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["features"]["deployments"], "listening", "{health}");

    let (status, d) = b.decide(OPERATOR, &green_wire()).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["status"], "GREEN", "{d}");
    assert_eq!(d["decision_metadata"]["world_model_version"], 1);

    assert_eq!(a.publish_yellow_variant().await, 2);
    let (s, body) = a
        .post(
            OPERATOR,
            "/api/worlds/acme-payments/deployments",
            &json!({"version": 2}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let d = eventually(
        Duration::from_secs(20),
        "the other instance switching to version 2 by NOTIFY",
        || async {
            let (_, d) = b.decide(OPERATOR, &green_wire()).await;
            (d["decision_metadata"]["world_model_version"] == 2).then_some(d)
        },
    )
    .await;
    assert_eq!(d["status"], "YELLOW", "{d}");
    a.stop().await;
    b.stop().await;
}

const TEST_EVENT: &str = "pooler.test";

/// Adds one to the `w/*/GREEN` statistic per handled row, so effects can be counted.
#[derive(Default)]
struct Count {
    runs: AtomicU32,
}

impl Handler for Count {
    fn name(&self) -> &'static str {
        "count"
    }

    fn handle<'a>(&'a self, _row: &'a OutboxRow) -> HandlerFuture<'a> {
        Box::pin(async move {
            self.runs.fetch_add(1, Ordering::SeqCst);
            Ok(Effect::Stats(vec![StatDelta {
                world: "w".into(),
                rule: "*".into(),
                status: "GREEN".into(),
                count: 1,
            }]))
        })
    }
}

fn event(key: &str) -> NewEvent {
    NewEvent {
        event_type: TEST_EVENT.into(),
        world: Some("w".into()),
        payload: json!({"key": key}),
        idempotency_key: key.into(),
        target: None,
    }
}

async fn store_at(url: &str) -> Store {
    Store::connect(&StoreConfig {
        database_url: Some(url.to_string()),
        max_connections: 4,
        migrate_on_start: true,
        ..StoreConfig::default()
    })
    .await
    .expect("store through pgbouncer")
}

async fn effects(store: &Store) -> i64 {
    store
        .stats("w")
        .await
        .map(|s| s.iter().find(|s| s.rule == "*").map_or(0, |s| s.count))
        .unwrap_or(-1)
}

async fn until_effects(store: &Store, n: i64) {
    eventually(Duration::from_secs(20), &format!("{n} effects"), || async {
        (effects(store).await >= n).then_some(())
    })
    .await;
}

/// The server processes of the database's sessions that last ran `LISTEN`.
async fn listen_backends(url: &str) -> Vec<i32> {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(url).await.expect("connect");
    let pids = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
         WHERE datname = current_database() AND query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()
         ORDER BY pid",
    )
    .fetch_all(&mut admin)
    .await
    .expect("sessions");
    let _ = admin.close().await;
    pids
}

/// The outbox through the bouncer: events wake the consumer by NOTIFY; the bouncer is
/// killed (every connection through it dies) and started again on its port, and the consumer
/// listens again through it and is woken without waiting for its two-minute poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_listens_through_a_session_pooler_and_reconnects_after_it_restarts() {
    let (db, mut bouncer, url) = through_bouncer(PoolMode::Session).await;
    let producer = store_at(&url).await;
    producer.set_generation(1);
    let mut registry = Registry::new();
    registry.register(TEST_EVENT, Arc::new(Count::default()));
    let state = Arc::new(OutboxState::default());
    let config = OutboxConfig {
        // So slow that only a notification explains a prompt delivery.
        poll_interval: Duration::from_secs(120),
        retry_base: Duration::from_millis(10),
        retry_cap: Duration::from_millis(40),
        ..OutboxConfig::default()
    };
    // A store of its own, so no in-process wake reaches the consumer.
    let consumer = Consumer::new(store_at(&url).await, registry, config, 1, state.clone());
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move { consumer.run(stopped).await });
    let wiring = |want: bool| {
        let state = state.clone();
        async move {
            eventually(
                Duration::from_secs(30),
                if want { "listening" } else { "not listening" },
                || async { ((state.wiring() == Wiring::Wired) == want).then_some(()) },
            )
            .await;
        }
    };
    wiring(true).await;
    producer.enqueue(&[event("before")]).await.expect("enqueue");
    until_effects(&producer, 1).await;

    let listening = listen_backends(db.postgres_url().expect("url")).await;
    assert_eq!(
        listening.len(),
        1,
        "one LISTEN session behind the bouncer: {listening:?}"
    );

    // Every connection through the bouncer dies with it, the listening one included; Postgres
    // sees its server sessions end. Once it is back, the consumer listens again: a new
    // LISTEN session appears behind the new bouncer.
    bouncer.kill();
    bouncer.spawn().await;
    eventually(
        Duration::from_secs(60),
        "a new LISTEN session behind the restarted bouncer",
        || async {
            let now = listen_backends(db.postgres_url().expect("url")).await;
            (now.len() == 1 && now != listening).then_some(())
        },
    )
    .await;
    wiring(true).await;
    // Written after the reconnect: only the renewed LISTEN can deliver it within the bound.
    let producer_after = store_at(&url).await;
    producer_after.set_generation(1);
    producer_after
        .enqueue(&[event("after")])
        .await
        .expect("enqueue after the restart");
    until_effects(&producer_after, 2).await;
    stop.cancel();
    task.await
        .expect("consumer task")
        .expect("the consumer ran");
}

/// In transaction mode the store refuses to start and says why: the pooler hands session
/// state (prepared statements, LISTEN, the migration lock) to whoever runs next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_pooler_is_refused_at_start_up_with_the_mode_named() {
    let (db, bouncer, url) = through_bouncer(PoolMode::Transaction).await;
    let refused = Store::connect(&StoreConfig {
        database_url: Some(url.clone()),
        max_connections: 4,
        migrate_on_start: true,
        ..StoreConfig::default()
    })
    .await
    .err()
    .unwrap_or_else(|| panic!("a transaction pooler was accepted\n{}", bouncer.log()));
    let message = refused.to_string();
    assert!(message.contains("transaction"), "{message}");
    assert!(message.contains("session"), "{message}");

    // The binary exits non-zero with the same reason on its output.
    let out = command(&["serve"])
        .env("DATABASE_URL", &url)
        .env("SPECTRAL_ADDR", "127.0.0.1:0")
        .output()
        .expect("spectral serve");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "serve started: {printed}");
    assert!(
        printed.contains("transaction or statement mode"),
        "{printed}"
    );

    // The same database straight, or through a session pooler, is accepted: the probe
    // refuses the mode, not the server.
    let direct = Store::connect(&StoreConfig {
        database_url: db.postgres_url().map(String::from),
        max_connections: 2,
        ..StoreConfig::default()
    })
    .await;
    assert!(direct.is_ok(), "{:?}", direct.err());
    let session = Pgbouncer::start(PoolMode::Session).await;
    let through = Store::connect(&StoreConfig {
        database_url: Some(session.url_for(db.postgres_url().expect("url"))),
        max_connections: 2,
        ..StoreConfig::default()
    })
    .await;
    assert!(through.is_ok(), "{:?}", through.err());
}

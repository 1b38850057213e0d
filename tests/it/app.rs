//! `TestApp`: the real service on a loopback port against a fresh database, driven over HTTP.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use spectral::config::{Config, Secret};
use spectral::supervisor::{self, Running};

use crate::db;
use crate::support::predicates_dir;

/// The operator key every test app bootstraps with.
pub const OPERATOR: &str = "spk_test_operator_key_0123456789";

/// The key webhook secrets are sealed with on PostgreSQL in the tests.
pub const WEBHOOK_SECRET_KEY: &str =
    "5eca1ed5eca1ed5eca1ed5eca1ed5eca1ed5eca1ed5eca1ed5eca1ed5eca1ed5";

/// Which backend a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The database behind a test app; dropped (deleted) with the last app that uses it.
pub enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(db::TestDb),
}

impl Db {
    pub async fn fresh(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => Db::Sqlite(db::fresh_sqlite_dir()),
            Backend::Postgres => Db::Postgres(db::fresh_postgres().await),
        }
    }

    /// Point a configuration at this database.
    pub fn configure(&self, config: &mut Config) {
        match self {
            Db::Sqlite(dir) => {
                config.store.database_url = None;
                config.store.data_dir = dir.path().to_path_buf();
            }
            Db::Postgres(pg) => config.store.database_url = Some(pg.url().to_string()),
        }
    }

    /// A store of its own on this database (migrated), for tests that read or write behind
    /// the service's back.
    pub async fn store(&self) -> spectral::store::Store {
        let mut config = test_config(self).store;
        config.migrate_on_start = true;
        spectral::store::Store::connect(&config)
            .await
            .expect("store")
    }

    /// The SQLite file, for tests that reach into the store directly.
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        match self {
            Db::Sqlite(dir) => Some(dir.path().join("spectral.db")),
            Db::Postgres(_) => None,
        }
    }

    pub fn postgres_url(&self) -> Option<&str> {
        match self {
            Db::Postgres(pg) => Some(pg.url()),
            Db::Sqlite(_) => None,
        }
    }
}

/// The configuration every test app starts from: loopback, port 0, the example worlds,
/// a known operator key, and a fast deployment poll.
pub fn test_config(db: &Db) -> Config {
    let mut config = Config::default();
    db.configure(&mut config);
    config.server.addr = "127.0.0.1:0".parse().expect("address");
    config.server.admin_addr = "127.0.0.1:0".parse().expect("address");
    config.bootstrap.operator_key = Some(Secret::new(OPERATOR));
    config.bootstrap.seed_dir = Some(predicates_dir());
    config.cache.poll_interval = Duration::from_millis(100);
    // Unoptimized test builds on a busy machine can take milliseconds per predicate; the
    // deadline itself is tested with its own sandboxes in `hostile.rs`.
    config.sandbox.deadline_us = 500_000;
    // Likewise the clock of a whole decision; the tests of it set their own.
    config.sandbox.decision_deadline_us = 5_000_000;
    // PostgreSQL has no zero-setup key for webhook secrets (src/seal.rs); SQLite makes its own.
    if matches!(db, Db::Postgres(_)) {
        config.outbox.webhook_secret_key = Some(Secret::new(WEBHOOK_SECRET_KEY));
    }
    // The webhook receivers of the tests listen on loopback.
    config.outbox.webhook_egress =
        spectral::egress::Egress::parse("127.0.0.0/8, ::1").expect("networks");
    config
}

/// A running service and an HTTP client for it.
pub struct TestApp {
    pub base: String,
    /// The admin listener: the detailed `/health` and `/metrics`.
    pub admin: String,
    pub client: reqwest::Client,
    pub running: Option<Running>,
}

impl TestApp {
    /// Start the service with a configuration.
    pub async fn start(config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind(config.server.addr)
            .await
            .expect("bind a loopback port");
        let running = supervisor::start(config, listener)
            .await
            .unwrap_or_else(|e| panic!("service did not start: {e}"));
        Self {
            base: format!("http://{}", running.addr),
            admin: format!("http://{}", running.admin_addr),
            client: reqwest::Client::new(),
            running: Some(running),
        }
    }

    /// Start on a database with the default test configuration.
    pub async fn on(db: &Db) -> Self {
        Self::start(test_config(db)).await
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.running.as_ref().map(|r| r.addr).expect("running")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stop gracefully (drains the decision log).
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Send a request and return status and JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut req = self.client.request(method, self.url(path));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body read");
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, json)
    }

    pub async fn decide(&self, key: &str, body: &Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, "/api/decide", Some(key), Some(body))
            .await
    }

    /// GET from the admin listener: status and JSON body (or the text, when not JSON).
    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .client
            .get(format!("{}{path}", self.admin))
            .send()
            .await
            .expect("request sent");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body read");
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, json)
    }

    pub async fn get(&self, key: Option<&str>, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, key, None).await
    }

    pub async fn post(&self, key: &str, path: &str, body: &Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(key), Some(body))
            .await
    }

    pub async fn put(&self, key: &str, path: &str, body: &Value) -> (u16, Value) {
        self.call(reqwest::Method::PUT, path, Some(key), Some(body))
            .await
    }

    /// Create a key through the store, as `spectral keys create` does.
    pub async fn key(&self, world: Option<&str>, scopes: &[spectral::store::Scope]) -> String {
        let app = &self.running.as_ref().expect("running").app;
        let (id, secret) = spectral::service::auth::generate();
        app.store
            .create_key(&spectral::store::NewKey {
                id,
                secret_hash: spectral::service::auth::hash_secret(&secret),
                world: world.map(String::from),
                scopes: scopes.to_vec(),
                label: "test".into(),
                expires_at: None,
            })
            .await
            .expect("key created");
        secret
    }
}

impl TestApp {
    /// Publish the payments world again with `standard-release` turned into a YELLOW rule, so
    /// that the green context answers differently in the new version; return its number.
    pub async fn publish_yellow_variant(&self) -> u64 {
        let model = spectral::worlds::load::load_model(&predicates_dir().join("acme-payments"))
            .expect("loads");
        let mut draft = serde_json::to_value(&model).expect("json");
        for rule in draft["actions"][0]["rules"].as_array_mut().expect("rules") {
            if rule["id"] == "standard-release" {
                rule["outcome"] = json!("YELLOW");
            }
        }
        let (status, body) = self
            .put(OPERATOR, "/api/worlds/acme-payments/draft", &draft)
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = self
            .post(OPERATOR, "/api/worlds/acme-payments/versions", &json!({}))
            .await;
        assert_eq!(status, 201, "{body}");
        body["version"].as_u64().expect("version")
    }
}

/// Read a `spectral serve` process's output until it has printed the address it listens on
/// (from its JSON log) and the operator key it generated; return the base URL and the key.
/// The output keeps being drained afterwards, so the process never writes into a closed pipe.
pub fn service_address_and_key(
    stdout: std::process::ChildStdout,
    limit: Duration,
) -> (String, String) {
    use std::io::{BufRead, BufReader};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut addr, mut key) = (None, None);
    let deadline = std::time::Instant::now() + limit;
    while addr.is_none() || key.is_none() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("the service printed its address and operator key in time");
        if let Some(k) = line.strip_prefix("operator key (shown once, store it now): ") {
            key = Some(k.trim().to_string());
        } else if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if v["message"] == "spectral API listening" {
                addr = v["addr"].as_str().map(String::from);
            }
        }
    }
    (format!("http://{}", addr.expect("addr")), key.expect("key"))
}

/// A valid wire-release context of the payments world that decides GREEN.
pub fn green_wire() -> Value {
    json!({
        "world": "acme-payments",
        "action": "wire_transfer.release",
        "context": {"amount": 2500, "currency": "USD", "payment_method": "ach",
            "vendor_id": "v-17", "vendor_status": "active", "vendor_country": "DE",
            "bank_account_changed_days": 40, "approvals": ["u-bob", "u-cy"],
            "initiator": "u-ann", "sanctions_hit": false}
    })
}

/// The one way a case runs on both backends: a `#[tokio::test]` per backend and case,
/// `<module>::sqlite::<case>` and `<module>::postgres::<case>`.
///
/// `both_backends!(a, b)` runs `async fn a(backend: Backend)` as it is. With runners,
/// `both_backends! { one_store => [a, b], two_stores => [c] }` hands each case to a runner of
/// the calling module, `async fn one_store(backend: Backend, case: impl FnOnce(..) -> Fut)`,
/// which builds what the case takes (a store, two stores) on that backend.
#[macro_export]
macro_rules! both_backends {
    (@backend $module:ident, $backend:ident, $([$runner:path => $($case:ident),*])+) => {
        mod $module {
            $($(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    $runner($crate::app::Backend::$backend, super::$case).await
                }
            )*)+
        }
    };
    ($($runner:ident => [$($case:ident),* $(,)?]),+ $(,)?) => {
        $crate::both_backends!(@backend sqlite, Sqlite, $([super::$runner => $($case),*])+);
        $crate::both_backends!(@backend postgres, Postgres, $([super::$runner => $($case),*])+);
    };
    ($($case:ident),* $(,)?) => {
        $crate::both_backends!(@backend sqlite, Sqlite, [$crate::app::as_is => $($case),*]);
        $crate::both_backends!(@backend postgres, Postgres, [$crate::app::as_is => $($case),*]);
    };
}

/// The runner of a case that takes the backend itself.
pub async fn as_is<F, Fut>(backend: Backend, case: F)
where
    F: FnOnce(Backend) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    case(backend).await
}

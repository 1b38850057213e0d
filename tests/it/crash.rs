//! The outbox survives its workers dying: `spectral api` and `spectral workers` run as
//! processes on one Postgres database, the workers are `kill -9`ed while webhook deliveries
//! are in flight and restarted, and every event is still handled once in effect; SIGTERM
//! finishes the delivery in hand, releases the rest and exits 0, for `workers` and `serve`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use spectral::store::{events, OutboxStatus, Store, StoreConfig};

use crate::app::{green_wire, OPERATOR};
use crate::db;
use crate::receiver::{Delivery, Receiver};
use crate::support::process::command;
use crate::support::{eventually, predicates_dir, Process};

const WORLD: &str = "acme-payments";
/// Long enough for a delivery in hand to finish; the tests wait for much less.
const GRACE: Duration = Duration::from_secs(10);
/// The bound on a stop: the grace period and room for the process to exit after it.
const STOPS_WITHIN: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The subscriber: the tests' receiver, answering slowly, so that a worker is in the middle of
// a delivery much of the time.

/// Webhook `i` is `POST /hook/{i}`, signed with `secrets[i]`.
#[derive(Clone)]
struct Subscriber {
    receiver: Receiver,
    secrets: Arc<Vec<String>>,
}

impl Subscriber {
    async fn start(secrets: Vec<String>) -> Self {
        Self {
            receiver: Receiver::slow(300..=500).await,
            secrets: Arc::new(secrets),
        }
    }

    fn url(&self, hook: usize) -> String {
        self.receiver.url_of(&format!("/hook/{hook}"))
    }

    /// A request that arrived after `since`, so recently that its answer is still at least
    /// 200 ms away: a worker that is killed now has not recorded it.
    fn in_hand(&self, since: Instant) -> Option<String> {
        self.receiver
            .all()
            .iter()
            .rev()
            .find(|d| {
                d.arrived >= since
                    && !d.answered
                    && d.arrived.elapsed() < Duration::from_millis(100)
            })
            .map(key)
    }

    /// Wait (bounded) for a request [`Subscriber::in_hand`].
    async fn wait_in_hand(&self, since: Instant) -> String {
        eventually(Duration::from_secs(60), "a delivery in flight", || async {
            self.in_hand(since)
        })
        .await
    }

    /// How often each idempotency key was received.
    fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for d in self.receiver.all() {
            *counts.entry(key(&d)).or_default() += 1;
        }
        counts
    }

    /// Requests whose signature does not verify against their hook's secret.
    fn unsigned(&self) -> usize {
        self.receiver
            .all()
            .iter()
            .filter(|d| !self.signed(d))
            .count()
    }

    fn signed(&self, d: &Delivery) -> bool {
        let secret = d
            .path
            .strip_prefix("/hook/")
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| self.secrets.get(i));
        let header = |name| d.header(name).unwrap_or_default();
        secret.is_some_and(|s| {
            verify(
                s,
                header("x-spectral-timestamp"),
                &d.body,
                header("x-spectral-signature"),
            )
        })
    }
}

fn key(d: &Delivery) -> String {
    d.header("idempotency-key").unwrap_or_default().to_string()
}

/// Checked independently of the service's own signing code: `v1=` hex HMAC-SHA256 of
/// `"{timestamp}.{body}"`.
fn verify(secret: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    header
        .strip_prefix("v1=")
        .and_then(|h| hex::decode(h).ok())
        .is_some_and(|sig| mac.verify_slice(&sig).is_ok())
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// The environment every process of a test shares.
fn common_env(db: &db::TestDb) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.url().to_string()),
        ("SPECTRAL_LOG_FORMAT", "json".into()),
        ("SPECTRAL_LOG", "info".into()),
        ("SPECTRAL_SHUTDOWN_GRACE_MS", GRACE.as_millis().to_string()),
        // Unoptimized test builds on a busy machine are slow; see `app::test_config`.
        ("SPECTRAL_SANDBOX_DEADLINE_US", "500000".into()),
        ("SPECTRAL_SANDBOX_DECISION_DEADLINE_US", "5000000".into()),
        ("SPECTRAL_DB_MAX_CONNECTIONS", "4".into()),
        // The webhook receivers of the tests listen on loopback.
        ("SPECTRAL_WEBHOOK_ALLOW_NETWORKS", "127.0.0.0/8".into()),
        // PostgreSQL has no zero-setup key for webhook secrets (src/seal.rs).
        (
            "SPECTRAL_WEBHOOK_SECRET_KEY",
            crate::app::WEBHOOK_SECRET_KEY.into(),
        ),
    ]
}

fn api_env(db: &db::TestDb) -> Vec<(&'static str, String)> {
    let mut env = common_env(db);
    env.extend([
        ("SPECTRAL_GENERATION", "1".to_string()),
        ("SPECTRAL_ADDR", "127.0.0.1:0".into()),
        ("SPECTRAL_SEED_DIR", predicates_dir().display().to_string()),
        ("SPECTRAL_OPERATOR_KEY", OPERATOR.into()),
        ("SPECTRAL_DEPLOY_POLL_MS", "200".into()),
    ]);
    env
}

/// The consumer's settings: a short lease, so that a dead worker's rows come back within
/// seconds, and quick polls and retries.
fn outbox_env() -> Vec<(&'static str, String)> {
    vec![
        ("SPECTRAL_OUTBOX_LEASE_MS", "1500".into()),
        ("SPECTRAL_OUTBOX_POLL_MS", "200".into()),
        ("SPECTRAL_OUTBOX_RETRY_BASE_MS", "100".into()),
        ("SPECTRAL_OUTBOX_RETRY_CAP_MS", "1000".into()),
        ("SPECTRAL_WEBHOOK_TIMEOUT_MS", "5000".into()),
    ]
}

fn workers_env(db: &db::TestDb) -> Vec<(&'static str, String)> {
    let mut env = common_env(db);
    env.push(("SPECTRAL_GENERATION", "1".to_string()));
    env.extend(outbox_env());
    env
}

/// Start `spectral api` or `serve` and return it with its base URL.
async fn start_api(command: &str, env: &[(&str, String)], dir: &Path) -> (Process, String) {
    let api = Process::spawn(&[command], env, dir);
    let base = api.ready().await;
    (api, base)
}

async fn test_store(db: &db::TestDb) -> Store {
    Store::connect(&StoreConfig {
        database_url: Some(db.url().to_string()),
        max_connections: 2,
        migrate_on_start: false,
        ..StoreConfig::default()
    })
    .await
    .expect("store")
}

// ---------------------------------------------------------------------------------------------
// Producing events through the API.

/// An HTTP client of the API with the operator key.
#[derive(Clone)]
struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(OPERATOR);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Subscribe `url` with `secret`; the webhook's id.
    async fn webhook(&self, url: &str, secret: &str) -> String {
        let (s, hook) = self
            .call(
                reqwest::Method::POST,
                &format!("/api/worlds/{WORLD}/webhooks"),
                Some(&json!({"url": url, "secret": secret})),
            )
            .await;
        assert_eq!(s, 201, "{hook}");
        hook["id"].as_str().expect("id").to_string()
    }

    /// Publish a new revision of the payments world and deploy it: two events, each one
    /// delivery per webhook. Returns the `(event type, event key)` of both.
    async fn publish_and_deploy(&self, revision: usize) -> Vec<(String, String)> {
        let model = spectral::worlds::load::load_model(&predicates_dir().join(WORLD))
            .expect("the example world loads");
        let mut model = serde_json::to_value(model).expect("json");
        model["description"] = json!(format!("revision {revision}"));
        let (s, body) = self
            .call(
                reqwest::Method::PUT,
                &format!("/api/worlds/{WORLD}/draft"),
                Some(&model),
            )
            .await;
        assert_eq!(s, 200, "{body}");
        let (s, published) = self
            .call(
                reqwest::Method::POST,
                &format!("/api/worlds/{WORLD}/versions"),
                Some(&json!({})),
            )
            .await;
        assert_eq!(s, 201, "{published}");
        let version = published["version"].as_u64().expect("version");
        let (s, deployed) = self
            .call(
                reqwest::Method::POST,
                &format!("/api/worlds/{WORLD}/deployments"),
                Some(&json!({"version": version})),
            )
            .await;
        assert_eq!(s, 200, "{deployed}");
        let seq = deployed["seq"].as_u64().expect("seq");
        vec![
            (
                events::VERSION_PUBLISHED.to_string(),
                format!("{WORLD}:{version}"),
            ),
            (
                events::MODULE_DEPLOYED.to_string(),
                format!("{WORLD}:{seq}"),
            ),
        ]
    }

    /// `n` single decisions and one batch of ten, four requests at a time; how many
    /// decisions were made.
    async fn decide(&self, n: usize) -> i64 {
        let mut made = 0;
        let mut tasks = tokio::task::JoinSet::new();
        for lane in 0..4 {
            let api = self.clone();
            tasks.spawn(async move {
                let mut made = 0;
                for _ in (lane..n).step_by(4) {
                    let (s, d) = api
                        .call(reqwest::Method::POST, "/api/decide", Some(&green_wire()))
                        .await;
                    assert_eq!(s, 200, "{d}");
                    made += 1;
                }
                made
            });
        }
        while let Some(lane) = tasks.join_next().await {
            made += lane.expect("decide lane");
        }
        let batch = json!({"requests": vec![green_wire(); 10]});
        let (s, out) = self
            .call(reqwest::Method::POST, "/api/decide/batch", Some(&batch))
            .await;
        assert_eq!(s, 200, "{out}");
        made + out["results"]
            .as_array()
            .expect("results")
            .iter()
            .filter(|r| r["status"] == 200)
            .count() as i64
    }

    /// Decisions counted by the statistics handler.
    async fn stats_total(&self) -> i64 {
        let (s, stats) = self
            .call(
                reqwest::Method::GET,
                &format!("/api/worlds/{WORLD}/stats"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{stats}");
        stats["decisions"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_i64).sum())
    }
}

/// The delivery keys the fan-out of `events` to `hooks` must produce.
fn delivery_keys(hooks: &[String], events: &[(String, String)]) -> BTreeSet<String> {
    hooks
        .iter()
        .flat_map(|h| events.iter().map(move |(t, k)| format!("{h}:{t}:{k}")))
        .collect()
}

/// Wait (bounded) until generation 1 has nothing pending or in flight, the subscriber has
/// seen every expected key and the statistics count every decision.
async fn drain(
    store: &Store,
    api: &Api,
    subscriber: &Subscriber,
    expected: &BTreeSet<String>,
    decisions: i64,
) {
    let last = Mutex::new(String::new());
    let drained = tokio::time::timeout(
        Duration::from_secs(180),
        // Past the outer bound, so that it is the one that fails, with the last state seen.
        eventually(Duration::from_secs(190), "the outbox drained", || async {
            let counts = store.outbox_counts(1).await.expect("counts");
            let seen: BTreeSet<String> = subscriber.counts().into_keys().collect();
            let missing = expected.difference(&seen).count();
            let stats = api.stats_total().await;
            *last.lock().expect("lock") = format!(
                "{counts:?}, {missing} deliveries missing, {stats} of {decisions} decisions counted"
            );
            (counts.pending == 0 && counts.in_flight == 0 && missing == 0 && stats >= decisions)
                .then_some(())
        }),
    )
    .await;
    assert!(
        drained.is_ok(),
        "not drained: {}",
        last.lock().expect("lock")
    );
}

/// Everything was handled once in effect: every expected delivery arrived, signed, and no
/// other; the statistics count each decision once; nothing of generation 1 is left.
async fn assert_exactly_once(
    store: &Store,
    api: &Api,
    subscriber: &Subscriber,
    expected: &BTreeSet<String>,
    decisions: i64,
) -> usize {
    let counts = subscriber.counts();
    let seen: BTreeSet<String> = counts.keys().cloned().collect();
    assert_eq!(
        &seen, expected,
        "the distinct delivery keys are the expected ones"
    );
    assert_eq!(subscriber.unsigned(), 0, "every delivery verifies");
    assert_eq!(
        api.stats_total().await,
        decisions,
        "no statistics effect lost or doubled"
    );
    let left = store.outbox_counts(1).await.expect("counts");
    assert_eq!(
        (left.pending, left.in_flight, left.failed),
        (0, 0, 0),
        "{left:?}"
    );
    counts.values().sum::<usize>() - counts.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_workers_lose_and_double_nothing() {
    let db = db::fresh_postgres().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = test_store_after_migration(&db, dir.path()).await;
    let secrets: Vec<String> = (0..2)
        .map(|i| format!("whsec_crash_test_{i}_0123456789"))
        .collect();
    let subscriber = Subscriber::start(secrets.clone()).await;

    let (mut api_proc, base) = start_api("api", &api_env(&db), dir.path()).await;
    let api = Api {
        base,
        client: reqwest::Client::new(),
    };
    let mut workers = Process::spawn(&["workers"], &workers_env(&db), dir.path());
    // The seeded worlds' events are handled before any webhook exists, so they deliver
    // nothing and every delivery below is one this test expects.
    eventually(
        Duration::from_secs(60),
        "the seed events handled",
        || async {
            let rows = store.outbox_list(None, Some(1), 1000).await.expect("list");
            (!rows.is_empty() && rows.iter().all(|r| r.status == OutboxStatus::Delivered))
                .then_some(())
        },
    )
    .await;
    let mut hooks = Vec::new();
    for (i, secret) in secrets.iter().enumerate() {
        hooks.push(api.webhook(&subscriber.url(i), secret).await);
    }

    // Phase 1: a stream of publishes, deploys and decisions while the workers are killed
    // three times in the middle of a delivery.
    let producer = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut produced = Vec::new();
            let mut decisions = 0;
            for revision in 0..4 {
                produced.extend(api.publish_and_deploy(revision).await);
                decisions += api.decide(30).await;
            }
            (produced, decisions)
        })
    };
    let mut killed_in_hand = Vec::new();
    for _ in 0..3 {
        let key = subscriber.wait_in_hand(workers.started()).await;
        workers.kill();
        killed_in_hand.push(key);
        workers = Process::spawn(&["workers"], &workers_env(&db), dir.path());
    }
    let (mut produced, mut decisions) = producer.await.expect("producer");
    let mut expected = delivery_keys(&hooks, &produced);
    assert_eq!(expected.len(), 2 * 2 * 4);
    drain(&store, &api, &subscriber, &expected, decisions).await;
    let redelivered = assert_exactly_once(&store, &api, &subscriber, &expected, decisions).await;
    let counts = subscriber.counts();
    for key in &killed_in_hand {
        assert!(
            counts.get(key).copied().unwrap_or(0) >= 2,
            "the delivery in hand when its worker died was delivered again, with its key: {key}"
        );
    }
    // Rows a killed worker had claimed were claimed again: by event type, how many.
    let mut reclaimed: BTreeMap<String, usize> = BTreeMap::new();
    for row in store
        .outbox_list(None, Some(1), 10_000)
        .await
        .expect("list")
    {
        if row.attempts > 1 {
            *reclaimed.entry(row.event_type).or_default() += 1;
        }
    }
    assert!(
        reclaimed.contains_key(events::WEBHOOK_DELIVERY),
        "{reclaimed:?}"
    );
    println!(
        "kill -9 ×3: {} deliveries expected, {} received ({redelivered} redeliveries), \
         {decisions} decisions counted once; rows claimed again after a kill: {reclaimed:?}",
        expected.len(),
        counts.values().sum::<usize>()
    );

    // Phase 2: SIGTERM in the middle of a delivery finishes it, releases the rest, exits 0.
    decisions += api.decide(20).await;
    let phase = Instant::now();
    let more = api.publish_and_deploy(4).await;
    let key = subscriber.wait_in_hand(phase).await;
    let (code, took) = workers.terminate(STOPS_WITHIN).await;
    assert_eq!(code, Some(0), "a graceful stop exits 0 (took {took:?})");
    assert!(took < GRACE, "{took:?}");
    let in_flight = store
        .outbox_list(Some(OutboxStatus::InFlight), Some(1), 100)
        .await
        .expect("list");
    assert!(
        in_flight.is_empty(),
        "rows left in flight after SIGTERM: {in_flight:?}"
    );
    let in_hand = store
        .outbox_list(None, Some(1), 10_000)
        .await
        .expect("list")
        .into_iter()
        .find(|r| r.event_type == events::WEBHOOK_DELIVERY && r.idempotency_key == key)
        .expect("the delivery in hand is an outbox row");
    assert_eq!(
        in_hand.status,
        OutboxStatus::Delivered,
        "the delivery in hand was finished"
    );
    assert!(
        store.outbox_counts(1).await.expect("counts").pending > 0,
        "the deliveries not yet started wait for the next worker"
    );
    // The next worker delivers the rest.
    let mut workers = Process::spawn(&["workers"], &workers_env(&db), dir.path());
    produced.extend(more);
    expected = delivery_keys(&hooks, &produced);
    drain(&store, &api, &subscriber, &expected, decisions).await;
    let redelivered = assert_exactly_once(&store, &api, &subscriber, &expected, decisions).await;
    assert_eq!(
        subscriber.counts()[&key],
        1,
        "a delivery finished on SIGTERM is not repeated"
    );
    println!(
        "after SIGTERM: {} deliveries expected, {redelivered} redeliveries in all, SIGTERM \
         exit took {took:?}",
        expected.len()
    );
    // The operator's view agrees: nothing pending, in flight or failed.
    for status in ["pending", "in_flight", "failed"] {
        let out = command(&["outbox", "list", "--status", status, "--generation", "1"])
            .env("DATABASE_URL", db.url())
            .env("SPECTRAL_LOG", "warn")
            .output()
            .expect("spectral outbox list runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("0 row(s)"), "{status}: {stderr}");
    }

    let (code, _) = workers.terminate(STOPS_WITHIN).await;
    assert_eq!(code, Some(0));
    // The API drains its decision log on SIGTERM: every decision made is recorded.
    decisions += api.decide(40).await;
    let (code, took) = api_proc.terminate(STOPS_WITHIN).await;
    assert_eq!(code, Some(0), "the API exits 0 on SIGTERM (took {took:?})");
    let recorded = store.decisions(WORLD, 0, 1_000_000).await.expect("records");
    assert_eq!(
        recorded.len() as i64,
        decisions,
        "the decision log was drained"
    );
    store.close().await;
}

/// `spectral serve`: SIGTERM while its workers are in the middle of a delivery and its API has
/// just answered a burst of decisions. It exits 0, the delivery is finished, no row is left
/// in flight, and every decision is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stops_gracefully_in_the_middle_of_a_delivery() {
    let db = db::fresh_postgres().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = test_store_after_migration(&db, dir.path()).await;
    let subscriber = Subscriber::start(vec!["whsec_serve_test_0123456789".into()]).await;
    let mut env = api_env(&db);
    env.extend(outbox_env());
    let (mut serve, base) = start_api("serve", &env, dir.path()).await;
    let api = Api {
        base,
        client: reqwest::Client::new(),
    };
    api.webhook(&subscriber.url(0), "whsec_serve_test_0123456789")
        .await;
    let decisions = api.decide(40).await;
    let since = Instant::now();
    for revision in 0..2 {
        api.publish_and_deploy(revision).await;
    }
    let key = subscriber.wait_in_hand(since).await;
    let (code, took) = serve.terminate(STOPS_WITHIN).await;
    assert_eq!(code, Some(0), "a graceful stop exits 0 (took {took:?})");
    assert!(took < GRACE, "{took:?}");
    let rows = store.outbox_list(None, None, 10_000).await.expect("list");
    let in_flight: Vec<_> = rows
        .iter()
        .filter(|r| r.status == OutboxStatus::InFlight)
        .collect();
    assert!(in_flight.is_empty(), "{in_flight:?}");
    let in_hand = rows
        .iter()
        .find(|r| r.event_type == events::WEBHOOK_DELIVERY && r.idempotency_key == key)
        .expect("the delivery in hand is an outbox row");
    assert_eq!(in_hand.status, OutboxStatus::Delivered);
    let recorded = store.decisions(WORLD, 0, 1_000_000).await.expect("records");
    assert_eq!(
        recorded.len() as i64,
        decisions,
        "the decision log was drained"
    );
    store.close().await;
}

/// Apply the migrations once, the way an operator does before starting the tiers, so the
/// test's own store can read the outbox from the start.
async fn test_store_after_migration(db: &db::TestDb, dir: &Path) -> Store {
    let out = command(&["migrate"])
        .current_dir(dir)
        .env("DATABASE_URL", db.url())
        .env("SPECTRAL_LOG", "warn")
        .output()
        .expect("spectral migrate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    test_store(db).await
}

/// Under `durability = commit` a decision is answered only once its record has committed, so
/// a `kill -9` of the real binary in the middle of a stream of decisions loses none that a
/// client received, and the chain still verifies after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_durability_commit_a_killed_process_loses_no_answered_decision() {
    let db = db::fresh_postgres().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = api_env(&db);
    env.push(("SPECTRAL_DECISION_LOG_DURABILITY", "commit".into()));
    let (mut serve, base) = start_api("serve", &env, dir.path()).await;
    let api = Api {
        base,
        client: reqwest::Client::new(),
    };
    let answered: Arc<Mutex<Vec<String>>> = Arc::default();
    // Each answer is announced, so the kill waits on a signal, not a poll.
    let (count, mut counted) = tokio::sync::watch::channel(0usize);
    let count = Arc::new(count);
    let mut lanes = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (api, answered, count) = (api.clone(), answered.clone(), count.clone());
        lanes.spawn(async move {
            for _ in 0..2_000 {
                let sent = api
                    .client
                    .post(format!("{}/api/decide", api.base))
                    .bearer_auth(OPERATOR)
                    .json(&green_wire())
                    .send()
                    .await;
                // Once the process is killed, requests fail: the lane is done.
                let Ok(resp) = sent else { return };
                let Ok(body) = resp.json::<Value>().await else {
                    return;
                };
                if let Some(id) = body["decision_metadata"]["decision_id"].as_str() {
                    let mut answered = answered.lock().expect("lock");
                    answered.push(id.to_string());
                    count.send_replace(answered.len());
                }
            }
        });
    }
    // Kill in the middle of the stream, once a few hundred decisions were answered.
    tokio::time::timeout(Duration::from_secs(60), counted.wait_for(|n| *n >= 300))
        .await
        .expect("300 decisions answered within a minute")
        .expect("the lanes run");
    serve.kill();
    while lanes.join_next().await.is_some() {}
    let answered: BTreeSet<String> = answered.lock().expect("lock").iter().cloned().collect();

    // After a restart every answered decision is in the chain, which verifies.
    let (mut again, _) = start_api("serve", &env, dir.path()).await;
    let store = test_store(&db).await;
    let recorded: BTreeSet<String> = store
        .decisions("acme-payments", 0, 100_000)
        .await
        .expect("records")
        .into_iter()
        .map(|r| r.decision.decision_id)
        .collect();
    let missing: Vec<&String> = answered.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "{} of {} answered decisions are missing from the log",
        missing.len(),
        answered.len()
    );
    let verified = spectral::service::audit::verify(&store, "acme-payments")
        .await
        .expect("verify");
    assert_eq!(verified.broken, None, "{verified:?}");
    assert!(verified.records >= answered.len() as u64);
    store.close().await;
    again.terminate(STOPS_WITHIN).await;
}

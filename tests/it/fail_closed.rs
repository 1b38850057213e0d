//! Fail closed on the production path, on both backends: worlds whose predicates return
//! `()` or other non-bools, or whose sources end inside a comment next to a rule whose string
//! closes it, decide RED (or fail closed) on `/api/decide` and `/api/decide/batch`, with and
//! without `explain`, and through `spectral decide`. Also the bounds of one decision and of
//! one batch, the lengths of what a caller sets, duplicate keys and constant folding.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spectral::worlds::{load, WorldModel};

use crate::app::{green_wire, test_config, Backend, Db, TestApp, OPERATOR};
use crate::support::process::command;

crate::both_backends!(
    every_path_decides_the_fail_closed_worlds_red,
    expensive_rules_of_one_world_do_not_hold_up_another,
    a_batch_stops_at_its_operation_budget,
    a_batch_answers_within_the_request_timeout,
    strings_a_caller_sets_are_bounded,
    duplicate_keys_are_refused_wherever_they_are,
    folding_a_large_constant_into_many_places_is_refused,
);

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fail-closed")
}

/// Each action of the fixture world, a context that must not be GREEN, and the error kind
/// expected of it (`None` where the rule simply matches).
fn cases() -> Vec<(&'static str, Value, Option<&'static str>)> {
    vec![
        (
            "pay.unit",
            json!({"amount": 50000}),
            Some("non_bool_result"),
        ),
        ("pay.inject", json!({"sanctions_hit": true}), None),
        ("pay.nested", json!({"sanctions_hit": true}), None),
        (
            "pay.leading",
            json!({"sanctions_hit": true, "amount": 5}),
            None,
        ),
        (
            "pay.switch",
            json!({"tier": "silver"}),
            Some("non_bool_result"),
        ),
        (
            "pay.string",
            json!({"amount": 50000}),
            Some("non_bool_result"),
        ),
    ]
}

fn assert_red(decision: &Value, action: &str, kind: Option<&str>) {
    assert_eq!(decision["status"], "RED", "{action}: {decision}");
    let kinds: Vec<&str> = decision["decision_metadata"]["errors"]
        .as_array()
        .map(|e| e.iter().filter_map(|e| e["kind"].as_str()).collect())
        .unwrap_or_default();
    match kind {
        Some(kind) => assert_eq!(kinds, [kind], "{action}: {decision}"),
        None => assert!(kinds.is_empty(), "{action}: {decision}"),
    }
    let matched = &decision["decision_metadata"]["matched_rules"][0];
    assert_eq!(matched["severity"], "T1", "{action}: {decision}");
}

/// Put a model as the draft, publish and deploy it; the version.
async fn deploy(app: &TestApp, model: &WorldModel) -> u64 {
    let world = &model.world;
    let draft = serde_json::to_value(model).expect("json");
    let (s, body) = app
        .put(OPERATOR, &format!("/api/worlds/{world}/draft"), &draft)
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = app
        .post(
            OPERATOR,
            &format!("/api/worlds/{world}/versions"),
            &json!({}),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    let version = body["version"].as_u64().expect("version");
    let (s, body) = app
        .post(
            OPERATOR,
            &format!("/api/worlds/{world}/deployments"),
            &json!({ "version": version }),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    // The instance that deploys swaps its cache before it answers.
    version
}

async fn every_path_decides_the_fail_closed_worlds_red(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let model = load::load_model(&fixture()).expect("the fixture world loads");
    deploy(&app, &model).await;

    let mut items = Vec::new();
    for (action, context, kind) in cases() {
        for explain in [false, true] {
            let body = json!({"world": "fail-closed", "action": action,
                              "context": context, "explain": explain});
            let (s, decision) = app.decide(OPERATOR, &body).await;
            assert_eq!(s, 200, "{decision}");
            assert_red(&decision, action, kind);
            items.push(body);
        }
    }
    let (s, out) = app
        .post(OPERATOR, "/api/decide/batch", &json!({ "requests": items }))
        .await;
    assert_eq!(s, 200, "{out}");
    let results = out["results"].as_array().expect("results");
    let expected: Vec<_> = cases().into_iter().flat_map(|c| [c.clone(), c]).collect();
    assert_eq!(results.len(), expected.len());
    for (result, (action, _, kind)) in results.iter().zip(expected) {
        assert_eq!(result["status"], 200, "{result}");
        assert_red(&result["decision"], action, kind);
    }
    app.stop().await;
}

/// `spectral decide` on the fixture folder, with and without `--explain`.
#[test]
fn spectral_decide_answers_the_fail_closed_worlds_red() {
    let world = fixture();
    for (action, context, kind) in cases() {
        for explain in [false, true] {
            let mut cmd = command(&["decide", "--world"]);
            cmd.arg(&world)
                .args(["--action", action, "--context", &context.to_string()]);
            if explain {
                cmd.arg("--explain");
            }
            let out = cmd.output().expect("spectral runs");
            let decision: Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
            assert_red(&decision, action, kind);
        }
    }
}

/// A world of `rules` rules that each run into the per-rule operation limit on `burn()`.
fn expensive_world(rules: usize) -> WorldModel {
    let mut model: WorldModel = serde_json::from_value(json!({
        "world": "expensive",
        "context": {"n": {"type": "integer"}, "a": {"type": "list"}, "b": {"type": "list"}},
        "actions": [{"name": "burn", "rules": []}],
    }))
    .expect("model");
    // Each call is 4,096 comparisons, charged as 256 operations; 40 of them, 10,240.
    let predicate = vec!["any_in(context.a, context.b)"; 40].join(" || ");
    let predicate = format!("context.n > 0 && ({predicate})");
    model.actions[0].rules = (0..rules)
        .map(|i| {
            serde_json::from_value(json!({
                "id": format!("burn-{i}"), "text": "expensive", "severity": "T2",
                "outcome": "YELLOW", "inputs": ["n", "a", "b"], "predicate": predicate,
                "cases": [{"context": {"n": 0, "a": [], "b": []}, "matches": false}],
            }))
            .expect("rule")
        })
        .collect();
    model
}

fn burn() -> Value {
    let a: Vec<i64> = (0..64).collect();
    let b: Vec<i64> = (1000..1064).collect();
    json!({"world": "expensive", "action": "burn", "context": {"n": 1, "a": a, "b": b}})
}

async fn expensive_rules_of_one_world_do_not_hold_up_another(backend: Backend) {
    let db = Db::fresh(backend).await;
    let mut config = test_config(&db);
    // One decision may take at most 40 ms, however many rules it has.
    config.sandbox.decision_deadline_us = 40_000;
    let app = TestApp::start(config).await;
    deploy(&app, &expensive_world(500)).await;

    // An expensive decide fails closed within its budget instead of running 500 rules.
    let started = Instant::now();
    let (s, d) = app.decide(OPERATOR, &burn()).await;
    let took = started.elapsed();
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["status"], "YELLOW", "{d}");
    let kinds: std::collections::BTreeSet<&str> = d["decision_metadata"]["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.iter().all(|k| [
            "too_many_operations",
            "budget_exceeded",
            "deadline_exceeded"
        ]
        .contains(k)),
        "{kinds:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "one expensive decide took {took:?}"
    );

    // Four callers keep deciding the expensive world while another decides the payments
    // world; the normal decides are answered as fast as a decide is, not after the
    // expensive ones.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut burners = Vec::new();
    for _ in 0..4 {
        let (client, url, stop) = (app.client.clone(), app.url("/api/decide"), stop.clone());
        burners.push(tokio::spawn(async move {
            let mut answered = (0u32, 0u32);
            for _ in 0..2_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let resp = client
                    .post(&url)
                    .bearer_auth(OPERATOR)
                    .json(&burn())
                    .send()
                    .await
                    .expect("sent");
                match resp.status().as_u16() {
                    200 => answered.0 += 1,
                    503 => answered.1 += 1,
                    other => panic!("expensive decide answered {other}"),
                }
            }
            answered
        }));
    }
    let mut latencies = Vec::new();
    for _ in 0..60 {
        let started = Instant::now();
        let (s, d) = app.decide(OPERATOR, &green_wire()).await;
        latencies.push(started.elapsed());
        assert_eq!(s, 200, "{d}");
        assert_eq!(d["status"], "GREEN", "{d}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = (0, 0);
    for b in burners {
        let (ok, shed) = b.await.expect("burner");
        answered = (answered.0 + ok, answered.1 + shed);
    }
    assert!(answered.0 > 0, "no expensive decide was answered");
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    let worst = latencies[latencies.len() - 1];
    // Evaluated on the API threads, four 500-rule decides would hold both of them for the
    // whole decision budget each time; off them, a normal decide waits for no budget.
    assert!(
        median < Duration::from_millis(40),
        "median normal decide {median:?} (worst {worst:?}) while expensive ones ran"
    );
    assert!(
        worst < Duration::from_millis(400),
        "worst normal decide {worst:?}"
    );
    app.stop().await;
}

async fn a_batch_stops_at_its_operation_budget(backend: Backend) {
    let db = Db::fresh(backend).await;
    let mut config = test_config(&db);
    config.sandbox.decision_max_operations = 20_000;
    config.evaluation.batch_max_operations = 100_000;
    let app = TestApp::start(config).await;
    deploy(&app, &expensive_world(40)).await;
    let items: Vec<Value> = (0..12).map(|_| burn()).collect();
    let (s, out) = app
        .post(OPERATOR, "/api/decide/batch", &json!({ "requests": items }))
        .await;
    assert_eq!(s, 200, "{out}");
    let results = out["results"].as_array().expect("results");
    let answered = results.iter().take_while(|r| r["status"] == 200).count();
    // Each item uses its whole 20,000-operation budget: the batch's 100,000 cover five, and
    // an item starts only while a whole decision budget is left.
    assert_eq!(answered, 5, "{out}");
    for r in &results[answered..] {
        assert_eq!(r["status"], 503, "{r}");
        assert_eq!(r["problem"]["code"], "batch_budget_exhausted", "{r}");
    }
    for r in &results[..answered] {
        let errors = r["decision"]["decision_metadata"]["errors"]
            .as_array()
            .expect("errors");
        assert!(errors.iter().any(|e| e["kind"] == "budget_exceeded"), "{r}");
    }
    app.stop().await;
}

async fn a_batch_answers_within_the_request_timeout(backend: Backend) {
    let db = Db::fresh(backend).await;
    let mut config = test_config(&db);
    config.server.request_timeout = Duration::from_millis(1_500);
    config.sandbox.decision_deadline_us = 100_000;
    config.evaluation.batch_max_operations = u64::MAX / 2;
    config.sandbox.decision_max_operations = 100_000_000;
    config.sandbox.max_operations = 10_000_000;
    let app = TestApp::start(config).await;
    deploy(&app, &expensive_world(40)).await;
    // 100 items of up to 100 ms each could take 10 s; the request timeout is 1.5 s.
    let items: Vec<Value> = (0..100).map(|_| burn()).collect();
    let started = Instant::now();
    let (s, out) = app
        .post(OPERATOR, "/api/decide/batch", &json!({ "requests": items }))
        .await;
    let took = started.elapsed();
    // Answered, not cut off by the timeout with a 503 for the whole batch (the client's
    // clock also counts reading the answer).
    assert_eq!(s, 200, "{out}");
    assert!(
        took < Duration::from_millis(2_500),
        "the batch took {took:?}"
    );
    let results = out["results"].as_array().expect("results");
    assert_eq!(results.len(), 100);
    assert!(results[0]["status"] == 200, "{}", results[0]);
    let refused = results.iter().filter(|r| r["status"] == 503).count();
    assert!(refused > 0, "every item was evaluated in {took:?}");
    let last = &results[99];
    assert_eq!(last["problem"]["code"], "batch_budget_exhausted", "{last}");
    app.stop().await;
}

async fn strings_a_caller_sets_are_bounded(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let mut body = green_wire();
    body["correlation_id"] = json!("c".repeat(256));
    let (s, d) = app.decide(OPERATOR, &body).await;
    assert_eq!(s, 200, "{d}");
    body["correlation_id"] = json!("c".repeat(257));
    let (s, p) = app.decide(OPERATOR, &body).await;
    assert_eq!(s, 400, "{p}");
    assert_eq!(p["code"], "field_too_long");
    assert_eq!(p["field"], "correlation_id");
    assert_eq!(p["max_length"], 256);
    // Characters, as JSON Schema's maxLength counts them, not bytes.
    body["correlation_id"] = json!("é".repeat(256));
    let (s, d) = app.decide(OPERATOR, &body).await;
    assert_eq!(s, 200, "{d}");
    body["correlation_id"] = json!("c".repeat(257));
    // In a batch, the item is refused and the rest answered.
    let (s, out) = app
        .post(
            OPERATOR,
            "/api/decide/batch",
            &json!({"requests": [body.clone(), green_wire()]}),
        )
        .await;
    assert_eq!(s, 200, "{out}");
    assert_eq!(out["results"][0]["problem"]["code"], "field_too_long");
    assert_eq!(out["results"][1]["status"], 200);
    let mut body = green_wire();
    body["action"] = json!("a".repeat(129));
    let (s, p) = app.decide(OPERATOR, &body).await;
    assert_eq!((s, p["field"].as_str()), (400, Some("action")), "{p}");
    let mut body = green_wire();
    body["world"] = json!("w".repeat(129));
    let (s, p) = app.decide(OPERATOR, &body).await;
    assert_eq!((s, p["field"].as_str()), (400, Some("world")), "{p}");
    app.stop().await;
}

async fn duplicate_keys_are_refused_wherever_they_are(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let send = |body: String, path: &'static str| {
        let req = app
            .client
            .post(app.url(path))
            .bearer_auth(OPERATOR)
            .header("content-type", "application/json")
            .body(body);
        async move {
            let resp = req.send().await.expect("sent");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("json"))
        }
    };
    let context = r#"{"amount": 2500, "currency": "USD", "payment_method": "ach",
        "vendor_id": "v-17", "vendor_status": "active", "vendor_country": "DE",
        "bank_account_changed_days": 40, "approvals": ["u-bob", "u-cy"],
        "initiator": "u-ann", "sanctions_hit": true, "sanctions_hit": false}"#;
    let body = format!(
        r#"{{"world": "acme-payments", "action": "wire_transfer.release", "context": {context}}}"#
    );
    let (s, p) = send(body.clone(), "/api/decide").await;
    assert_eq!(s, 400, "{p}");
    assert_eq!(p["code"], "duplicate_key");
    assert_eq!(p["key"], "context.sanctions_hit");
    let (s, p) = send(format!(r#"{{"requests": [{body}]}}"#), "/api/decide/batch").await;
    assert_eq!(
        (s, p["key"].as_str()),
        (400, Some("requests[0].context.sanctions_hit"))
    );
    let (s, p) = send(
        r#"{"world": "acme-payments", "world": "other", "action": "x", "context": {}}"#.into(),
        "/api/decide",
    )
    .await;
    assert_eq!((s, p["key"].as_str()), (400, Some("world")), "{p}");
    let (s, p) = send(
        r#"{"version": 1, "version": 2}"#.into(),
        "/api/worlds/acme-payments/deployments",
    )
    .await;
    assert_eq!((s, p["code"].as_str()), (400, Some("duplicate_key")), "{p}");
    // Without the repeat, the same context is decided.
    let body = body.replace(r#""sanctions_hit": true, "#, "");
    let (s, d) = send(body, "/api/decide").await;
    assert_eq!((s, d["status"].as_str()), (200, Some("GREEN")), "{d}");
    app.stop().await;
}

async fn folding_a_large_constant_into_many_places_is_refused(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let model = |refs: usize, rules: usize| -> WorldModel {
        let predicate = format!("[{}].len() > 0", vec!["config.l"; refs].join(", "));
        let rules: Vec<Value> = (0..rules)
            .map(|i| {
                json!({"id": format!("r-{i}"), "text": "t", "severity": "T2", "outcome": "YELLOW",
                       "inputs": [], "predicate": predicate,
                       "cases": [{"context": {}, "matches": true}]})
            })
            .collect();
        serde_json::from_value(json!({
            "world": "acme-payments",
            "context": {"n": {"type": "integer"}},
            "config": {"l": (0..1024).collect::<Vec<i64>>()},
            "actions": [{"name": "fold", "rules": rules}],
        }))
        .expect("model")
    };
    let before = crate::support::rss_kib();
    // One predicate that reads a 1,024-element list 80 times.
    let (s, p) = app
        .put(
            OPERATOR,
            "/api/worlds/acme-payments/draft",
            &serde_json::to_value(model(80, 1)).expect("json"),
        )
        .await;
    assert_eq!(s, 422, "{p}");
    assert_eq!(p["problems"][0]["kind"], "module_too_large", "{p}");
    // Ten that each stay under the per-predicate limit but not together.
    let (s, p) = app
        .put(
            OPERATOR,
            "/api/worlds/acme-payments/draft",
            &serde_json::to_value(model(50, 10)).expect("json"),
        )
        .await;
    assert_eq!(s, 422, "{p}");
    assert_eq!(p["problems"][0]["kind"], "module_too_large", "{p}");
    assert_eq!(p["problems"][0]["at"], "action", "{p}");
    let grown_mib = crate::support::rss_kib().saturating_sub(before) / 1024;
    assert!(
        grown_mib < 64,
        "refusing the drafts grew the process by {grown_mib} MiB"
    );
    // A few references are fine.
    let (s, p) = app
        .put(
            OPERATOR,
            "/api/worlds/acme-payments/draft",
            &serde_json::to_value(model(3, 2)).expect("json"),
        )
        .await;
    assert_eq!(s, 200, "{p}");
    app.stop().await;
}

/// The decision queue is bounded in bytes as well as in records: records with long
/// correlation ids fill a small byte budget long before the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_queue_is_bounded_in_bytes() {
    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.decision_log.max_bytes = 4096;
    config.decision_log.overflow = spectral::config::Overflow::Drop;
    // The writer holds the first batch open for this long, so the queue only fills.
    config.decision_log.linger = Duration::from_secs(5);
    let app = TestApp::start(config).await;
    for i in 0..30 {
        let mut body = green_wire();
        body["correlation_id"] = json!(format!("{i:0>250}"));
        let (s, d) = app.decide(OPERATOR, &body).await;
        assert_eq!(s, 200, "{d}");
    }
    let (_, health) = app.admin_get("/health").await;
    let log = &health["features"]["decision_log"];
    let dropped = log["dropped"].as_u64().unwrap_or(0);
    assert!(
        dropped >= 20,
        "4 KiB holds a handful of such records: {log}"
    );
    assert!(
        log["queued_bytes"].as_u64().unwrap_or(u64::MAX) <= 4096,
        "{log}"
    );
    assert_eq!(log["capacity"], 10_000, "{log}");
    // Nothing vanishes: what was not dropped is written by the graceful stop.
    app.stop().await;
    let store = db.store().await;
    let written = store
        .decisions("acme-payments", 0, 1000)
        .await
        .expect("records")
        .len() as u64;
    assert_eq!(written + dropped, 30);
    store.close().await;
}

/// With every evaluation slot taken, a decide of an expensive module is shed with 503 at
/// once rather than queued behind the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expensive_decide_is_shed_when_every_slot_is_taken() {
    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.evaluation.pool = 1;
    // Each expensive decide holds its slot for up to a second.
    config.sandbox.decision_deadline_us = 1_000_000;
    config.sandbox.max_operations = 10_000_000;
    config.sandbox.decision_max_operations = 100_000_000;
    let app = TestApp::start(config).await;
    deploy(&app, &expensive_world(500)).await;
    // The first decide runs inline and marks the module expensive.
    let (s, d) = app.decide(OPERATOR, &burn()).await;
    assert_eq!(s, 200, "{d}");
    let expensive = burn();
    let (a, b) = tokio::join!(app.decide(OPERATOR, &expensive), async {
        // The second starts once the first holds the one slot, as /health shows.
        crate::support::eventually(Duration::from_secs(5), "the slot being taken", || async {
            let (_, health) = app.admin_get("/health").await;
            (health["features"]["evaluation"]["busy"] == 1).then_some(())
        })
        .await;
        let started = Instant::now();
        let answer = app.decide(OPERATOR, &burn()).await;
        (answer, started.elapsed())
    });
    assert_eq!(a.0, 200, "{}", a.1);
    let ((s, p), took) = b;
    assert_eq!(s, 503, "{p}");
    assert_eq!(p["code"], "evaluation_overloaded", "{p}");
    assert!(took < Duration::from_millis(500), "shed after {took:?}");
    // A normal decide is not affected.
    let (s, d) = app.decide(OPERATOR, &green_wire()).await;
    assert_eq!((s, d["status"].as_str()), (200, Some("GREEN")), "{d}");
    app.stop().await;
}

/// No decision is answered without its record: under the default `block`, a decision whose
/// record cannot be queued in time is answered 503 `decision_log_unavailable`, and every
/// decision that was answered is in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_whose_record_cannot_be_queued_is_not_answered() {
    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.decision_log.capacity = 2;
    config.decision_log.overflow = spectral::config::Overflow::Block(Duration::from_millis(1));
    // The writer holds its first batch open for this long, so the queue only fills.
    config.decision_log.linger = Duration::from_secs(5);
    let app = TestApp::start(config).await;
    let mut answered = Vec::new();
    let mut refused = 0u64;
    for _ in 0..10 {
        let (s, d) = app.decide(OPERATOR, &green_wire()).await;
        match s {
            200 => answered.push(
                d["decision_metadata"]["decision_id"]
                    .as_str()
                    .map(String::from),
            ),
            503 => {
                assert_eq!(d["code"], "decision_log_unavailable", "{d}");
                refused += 1;
            }
            other => panic!("answered {other}: {d}"),
        }
    }
    assert!(
        refused > 0,
        "a two-record queue behind a lingering writer took ten"
    );
    let (_, health) = app.admin_get("/health").await;
    let log = &health["features"]["decision_log"];
    assert_eq!(log["refused"], refused, "{log}");
    assert_eq!(log["dropped"], 0, "{log}");
    app.stop().await;
    let store = db.store().await;
    let written: std::collections::BTreeSet<Option<String>> = store
        .decisions("acme-payments", 0, 1000)
        .await
        .expect("records")
        .into_iter()
        .map(|r| Some(r.decision.decision_id))
        .collect();
    let answered: std::collections::BTreeSet<Option<String>> = answered.into_iter().collect();
    assert_eq!(
        answered, written,
        "every answered decision is in the log, and only those"
    );
    store.close().await;
}

//! Webhooks and statistics through the running service: the outbox handlers end to end.

use std::time::Duration;

use serde_json::json;
use spectral::outbox::handlers::signature;

use crate::app::{green_wire, test_config, Backend, Db, TestApp, OPERATOR};
use crate::receiver::Receiver;
use crate::support::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_are_delivered_signed_and_retried() {
    let db = Db::fresh(Backend::Postgres).await;
    let mut config = test_config(&db);
    config.outbox.retry_base = Duration::from_millis(20);
    config.outbox.retry_cap = Duration::from_millis(100);
    let app = TestApp::start(config).await;
    let receiver = Receiver::start().await;
    // The first delivery fails with a retryable 503; the retry is accepted.
    receiver.answer(&[503]);
    let (s, hook) = app
        .post(
            OPERATOR,
            "/api/worlds/acme-payments/webhooks",
            &json!({"url": receiver.url, "secret": "whsec_test_0123456789"}),
        )
        .await;
    assert_eq!(s, 201, "{hook}");
    assert_eq!(hook["secret"], "whsec_test_0123456789");
    assert_eq!(
        hook["events"],
        json!(["worldmodel.version.published", "module.deployed"])
    );
    // Deploying version 1 again is a deployment like any other.
    let (s, dep) = app
        .post(
            OPERATOR,
            "/api/worlds/acme-payments/deployments",
            &json!({"version": 1}),
        )
        .await;
    assert_eq!(s, 200, "{dep}");
    let deliveries = receiver.until(2).await;
    let (failed, ok) = (&deliveries[0], &deliveries[1]);
    assert_eq!(
        failed.header("idempotency-key"),
        ok.header("idempotency-key")
    );
    for d in [failed, ok] {
        assert_eq!(d.header("x-spectral-event"), Some("module.deployed"));
        let ts: i64 = d
            .header("x-spectral-timestamp")
            .and_then(|t| t.parse().ok())
            .expect("timestamp");
        let expected = format!("v1={}", signature("whsec_test_0123456789", ts, &d.body));
        assert_eq!(d.header("x-spectral-signature"), Some(expected.as_str()));
        let body = d.json();
        assert_eq!(body["world"], "acme-payments");
        assert_eq!(body["data"]["version"], 1);
    }
    // A tampered body would not verify.
    let ts: i64 = ok
        .header("x-spectral-timestamp")
        .and_then(|t| t.parse().ok())
        .expect("timestamp");
    assert_ne!(
        format!("v1={}", signature("whsec_test_0123456789", ts, b"{}")),
        ok.header("x-spectral-signature").unwrap_or("")
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retirement_is_delivered_to_those_who_subscribe_to_it() {
    let db = Db::fresh(Backend::Sqlite).await;
    let app = TestApp::on(&db).await;
    let receiver = Receiver::start().await;
    let (s, hook) = app
        .post(
            OPERATOR,
            "/api/worlds/acme-payments/webhooks",
            &json!({"url": receiver.url, "events": ["world.version.retired"]}),
        )
        .await;
    assert_eq!(s, 201, "{hook}");
    // Publishing is not what it subscribed to; the retirement is.
    assert_eq!(app.publish_yellow_variant().await, 2);
    let (s, r) = app
        .post(
            OPERATOR,
            "/api/worlds/acme-payments/versions/2/retire",
            &json!({"reason": "canary went wrong"}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let deliveries = receiver.until(1).await;
    assert_eq!(
        deliveries[0].header("x-spectral-event"),
        Some("world.version.retired")
    );
    let body = deliveries[0].json();
    assert_eq!(body["world"], "acme-payments");
    assert_eq!(body["data"]["version"], 2);
    assert_eq!(body["data"]["reason"], "canary went wrong");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_delivery_fails_at_once_and_is_listed_for_replay() {
    let db = Db::fresh(Backend::Sqlite).await;
    let app = TestApp::on(&db).await;
    let receiver = Receiver::start().await;
    receiver.answer(&[410]);
    app.post(
        OPERATOR,
        "/api/worlds/acme-payments/webhooks",
        &json!({"url": receiver.url, "events": ["module.deployed"]}),
    )
    .await;
    app.post(
        OPERATOR,
        "/api/worlds/acme-payments/deployments",
        &json!({"version": 1}),
    )
    .await;
    receiver.until(1).await;
    let store = app.running.as_ref().expect("running").app.store.clone();
    let failed = failed_delivery(&store).await;
    assert_eq!(failed.event_type, "webhook.delivery");
    assert_eq!(failed.attempts, 1, "a 410 is not retried");
    assert!(failed.last_error.as_deref().unwrap_or("").contains("410"));
    // Replayed, it is delivered (the receiver now answers 200).
    store.replay(failed.id).await.expect("replay");
    receiver.until(2).await;
    let (_, health) = app.admin_get("/health").await;
    assert_eq!(health["features"]["outbox"], "wired");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_every_decision_by_status_and_rule() {
    let db = Db::fresh(Backend::Sqlite).await;
    let app = TestApp::on(&db).await;
    let mut red = green_wire();
    red["context"]["sanctions_hit"] = json!(true);
    for _ in 0..3 {
        app.decide(OPERATOR, &green_wire()).await;
    }
    for _ in 0..2 {
        app.decide(OPERATOR, &red).await;
    }
    let stats = eventually(Duration::from_secs(20), "5 decisions counted", || async {
        let (s, stats) = app
            .get(Some(OPERATOR), "/api/worlds/acme-payments/stats")
            .await;
        assert_eq!(s, 200, "{stats}");
        let total: i64 = stats["decisions"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_i64()).sum())
            .unwrap_or(0);
        (total == 5).then_some(stats)
    })
    .await;
    assert_eq!(stats["decisions"]["GREEN"], 3);
    assert_eq!(stats["decisions"]["RED"], 2);
    assert_eq!(stats["rules"]["sanctions-hit"]["RED"], 2);
    assert_eq!(stats["rules"]["standard-release"]["GREEN"], 3);
    // Another world's key cannot read them.
    let other = app
        .key(Some("globex-support"), &[spectral::store::Scope::Read])
        .await;
    let (s, _) = app
        .get(Some(&other), "/api/worlds/acme-payments/stats")
        .await;
    assert_eq!(s, 403);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_input_is_validated() {
    let db = Db::fresh(Backend::Sqlite).await;
    let app = TestApp::on(&db).await;
    for (body, word) in [
        (json!({"url": "ftp://x/y"}), "http or https"),
        (json!({"url": "not a url"}), "url 'not a url'"),
        (
            json!({"url": "http://x/y", "events": ["decision.recorded"]}),
            "unknown event",
        ),
    ] {
        let (s, b) = app
            .post(OPERATOR, "/api/worlds/acme-payments/webhooks", &body)
            .await;
        assert_eq!(s, 400, "{b}");
        assert!(b["detail"].as_str().unwrap_or("").contains(word), "{b}");
    }
    let (s, _) = app
        .post(
            OPERATOR,
            "/api/worlds/nowhere/webhooks",
            &json!({"url": "http://x/y"}),
        )
        .await;
    assert_eq!(s, 404);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_never_reach_internal_networks_by_default() {
    let db = Db::fresh(Backend::Sqlite).await;
    let receiver = Receiver::start().await;
    // An instance whose operator allowed loopback takes a subscription to the receiver.
    let app = TestApp::on(&db).await;
    let (s, hook) = app
        .post(
            OPERATOR,
            "/api/worlds/acme-payments/webhooks",
            &json!({"url": receiver.url, "events": ["module.deployed"]}),
        )
        .await;
    assert_eq!(s, 201, "{hook}");
    app.stop().await;

    // With the default policy, every internal address class is refused at subscription.
    let mut config = test_config(&db);
    config.outbox.webhook_egress = spectral::egress::Egress::default();
    let app = TestApp::start(config).await;
    for url in [
        receiver.url.clone(),
        "http://[::1]:9/".into(),
        "http://localhost:9/".into(),
        "http://10.0.0.1/".into(),
        "http://192.168.0.1/".into(),
        "http://169.254.169.254/latest/meta-data/".into(),
        "http://[fe80::1]/".into(),
        "http://224.0.0.1/".into(),
        "http://[::ffff:127.0.0.1]:9/".into(),
    ] {
        let (s, p) = app
            .post(
                OPERATOR,
                "/api/worlds/acme-payments/webhooks",
                &json!({ "url": url }),
            )
            .await;
        assert_eq!(s, 400, "{url}: {p}");
        assert!(
            p["detail"]
                .as_str()
                .unwrap_or("")
                .contains("internal address"),
            "{p}"
        );
    }
    // The subscription stored earlier is not delivered either: the delivery checks again.
    app.post(
        OPERATOR,
        "/api/worlds/acme-payments/deployments",
        &json!({"version": 1}),
    )
    .await;
    let store = app.running.as_ref().expect("running").app.store.clone();
    let failed = failed_delivery(&store).await;
    assert_eq!(failed.event_type, "webhook.delivery");
    assert!(
        failed
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("internal address"),
        "{failed:?}"
    );
    assert!(receiver.all().is_empty(), "a delivery reached loopback");
    app.stop().await;
}

/// The first outbox row that failed for good, once the consumer has failed one.
async fn failed_delivery(store: &spectral::store::Store) -> spectral::store::OutboxRow {
    eventually(
        Duration::from_secs(20),
        "a delivery failing for good",
        || async {
            store
                .outbox_list(Some(spectral::store::OutboxStatus::Failed), None, 10)
                .await
                .expect("list")
                .into_iter()
                .next()
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Webhook management and sealed secrets.

crate::both_backends!(
    webhook_secrets_are_sealed_at_rest_and_deliveries_still_verify,
    a_plaintext_secret_from_before_sealing_still_signs,
    webhooks_are_listed_without_secrets_and_deleted_only_within_their_world,
);

/// Deploy version 1 of the payments world again (a `module.deployed` event).
async fn redeploy(app: &TestApp) {
    let (s, dep) = app
        .post(
            OPERATOR,
            "/api/worlds/acme-payments/deployments",
            &json!({"version": 1}),
        )
        .await;
    assert_eq!(s, 200, "{dep}");
}

/// Whether a delivery carries the signature of `secret`.
fn signed_with(d: &crate::receiver::Delivery, secret: &str) -> bool {
    let ts: i64 = d
        .header("x-spectral-timestamp")
        .and_then(|t| t.parse().ok())
        .expect("timestamp");
    d.header("x-spectral-signature")
        == Some(format!("v1={}", signature(secret, ts, &d.body)).as_str())
}

async fn webhook_secrets_are_sealed_at_rest_and_deliveries_still_verify(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let receiver = Receiver::start().await;
    let secret = "whsec_sealed_0123456789";
    let (s, hook) = app
        .post(
            OPERATOR,
            "/api/worlds/acme-payments/webhooks",
            &json!({"url": receiver.url, "events": ["module.deployed"], "secret": secret}),
        )
        .await;
    assert_eq!(s, 201, "{hook}");
    // Shown once, at creation.
    assert_eq!(hook["secret"], secret);
    // The row holds a sealed value, not the secret.
    let store = db.store().await;
    let rows = store.webhooks("acme-payments").await.expect("webhooks");
    assert_eq!(rows.len(), 1);
    assert!(
        rows[0].secret.starts_with(spectral::seal::SEALED_PREFIX),
        "{}",
        rows[0].secret
    );
    assert!(!rows[0].secret.contains(secret));
    store.close().await;
    redeploy(&app).await;
    let deliveries = receiver.until(1).await;
    assert!(signed_with(&deliveries[0], secret), "a bad signature");
    assert!(!signed_with(&deliveries[0], &rows[0].secret));
    app.stop().await;
}

async fn a_plaintext_secret_from_before_sealing_still_signs(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let receiver = Receiver::start().await;
    // As a build from before sealing stored it.
    let store = db.store().await;
    store
        .create_webhook(&spectral::store::Webhook {
            id: "wh_legacy".into(),
            world: "acme-payments".into(),
            url: receiver.url.clone(),
            secret: "whsec_plain_from_an_older_build".into(),
            events: vec!["module.deployed".into()],
            created_at: chrono::Utc::now(),
        })
        .await
        .expect("stored");
    store.close().await;
    redeploy(&app).await;
    let deliveries = receiver.until(1).await;
    assert!(signed_with(
        &deliveries[0],
        "whsec_plain_from_an_older_build"
    ));
    app.stop().await;
}

async fn webhooks_are_listed_without_secrets_and_deleted_only_within_their_world(backend: Backend) {
    use spectral::store::Scope;
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let receiver = Receiver::start().await;
    let a = app.key(Some("acme-payments"), &[Scope::Author]).await;
    let b = app.key(Some("globex-support"), &[Scope::Author]).await;
    let a_reader = app
        .key(Some("acme-payments"), &[Scope::Read, Scope::Decide])
        .await;
    let mut ids = Vec::new();
    for (key, world) in [(&a, "acme-payments"), (&b, "globex-support")] {
        let (s, hook) = app
            .post(
                key,
                &format!("/api/worlds/{world}/webhooks"),
                &json!({"url": receiver.url, "secret": format!("whsec_{world}_secret")}),
            )
            .await;
        assert_eq!(s, 201, "{hook}");
        ids.push(hook["id"].as_str().expect("id").to_string());
    }
    let (s, listed) = app
        .get(Some(&a), "/api/worlds/acme-payments/webhooks")
        .await;
    assert_eq!(s, 200, "{listed}");
    let hooks = listed["webhooks"].as_array().expect("webhooks");
    assert_eq!(hooks.len(), 1, "{listed}");
    assert_eq!(hooks[0]["id"], ids[0].as_str());
    assert_eq!(hooks[0]["url"], receiver.url.as_str());
    let text = listed.to_string();
    assert!(
        !text.contains("secret") && !text.contains("sealed"),
        "{text}"
    );
    // World A's key reaches nothing of world B's, and a key without the author scope nothing.
    let (s, _) = app
        .get(Some(&a), "/api/worlds/globex-support/webhooks")
        .await;
    assert_eq!(s, 403);
    let (s, _) = app
        .get(Some(&a_reader), "/api/worlds/acme-payments/webhooks")
        .await;
    assert_eq!(s, 403);
    for (key, world, id) in [
        (&a, "globex-support", &ids[1]),
        (&a_reader, "acme-payments", &ids[0]),
    ] {
        let (s, p) = app
            .call(
                reqwest::Method::DELETE,
                &format!("/api/worlds/{world}/webhooks/{id}"),
                Some(key),
                None,
            )
            .await;
        assert_eq!(s, 403, "{p}");
    }
    // B's webhook named under world A is not A's to delete: not found, and still there.
    let (s, _) = app
        .call(
            reqwest::Method::DELETE,
            &format!("/api/worlds/acme-payments/webhooks/{}", ids[1]),
            Some(&a),
            None,
        )
        .await;
    assert_eq!(s, 404);
    let (_, theirs) = app
        .get(Some(&b), "/api/worlds/globex-support/webhooks")
        .await;
    assert_eq!(theirs["webhooks"].as_array().map(Vec::len), Some(1));
    // Their own keys (and operators) delete them.
    let (s, p) = app
        .call(
            reqwest::Method::DELETE,
            &format!("/api/worlds/acme-payments/webhooks/{}", ids[0]),
            Some(&a),
            None,
        )
        .await;
    assert_eq!(s, 200, "{p}");
    let (s, _) = app
        .call(
            reqwest::Method::DELETE,
            &format!("/api/worlds/globex-support/webhooks/{}", ids[1]),
            Some(OPERATOR),
            None,
        )
        .await;
    assert_eq!(s, 200);
    for (key, world) in [(&a, "acme-payments"), (&b, "globex-support")] {
        let (_, listed) = app
            .get(Some(key), &format!("/api/worlds/{world}/webhooks"))
            .await;
        assert_eq!(listed["webhooks"], json!([]), "{listed}");
    }
    // Nothing is delivered to a deleted webhook.
    redeploy(&app).await;
    let store = db.store().await;
    eventually(
        Duration::from_secs(10),
        "the deployment handled",
        || async {
            let rows = store.outbox_list(None, None, 50).await.ok()?;
            rows.iter()
                .any(|r| r.event_type == "module.deployed" && r.status.as_str() == "delivered")
                .then_some(())
        },
    )
    .await;
    assert!(receiver.all().is_empty(), "delivered to a deleted webhook");
    store.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_postgres_refuses_to_create_a_webhook_and_says_why() {
    let db = Db::fresh(Backend::Postgres).await;
    let mut config = test_config(&db);
    config.outbox.webhook_secret_key = None;
    let app = TestApp::start(config).await;
    let receiver = Receiver::start().await;
    let (s, p) = app
        .post(
            OPERATOR,
            "/api/worlds/acme-payments/webhooks",
            &json!({"url": receiver.url}),
        )
        .await;
    assert_eq!(s, 503, "{p}");
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or("")
            .contains("SPECTRAL_WEBHOOK_SECRET_KEY"),
        "{p}"
    );
    let (_, listed) = app
        .get(Some(OPERATOR), "/api/worlds/acme-payments/webhooks")
        .await;
    assert_eq!(listed["webhooks"], json!([]));
    app.stop().await;
}

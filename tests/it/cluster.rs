//! Several instances on one Postgres: a deployment made through one is served by the others
//! within the bounded delay, through NOTIFY and, with notifications off, through polling.
//! Also readiness: an instance is not ready while a deployed world fails to load.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::app::{green_wire, test_config, Backend, Db, TestApp, OPERATOR};
use crate::support::eventually;

/// Publish a YELLOW variant of the payments world through `app` and deploy it; return when
/// `other` answers with version 2, and how long that took after the deploy returned.
async fn deploy_and_measure(app: &TestApp, other: &TestApp) -> Duration {
    assert_eq!(app.publish_yellow_variant().await, 2);
    let (_, before) = other.decide(OPERATOR, &green_wire()).await;
    assert_eq!(before["decision_metadata"]["world_model_version"], 1);
    let (s, b) = app
        .post(
            OPERATOR,
            "/api/worlds/acme-payments/deployments",
            &json!({"version": 2}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let deployed = Instant::now();
    // The deploying instance serves the new version before it answers.
    let (_, own) = app.decide(OPERATOR, &green_wire()).await;
    assert_eq!(own["decision_metadata"]["world_model_version"], 2);
    let d = eventually(
        Duration::from_secs(10),
        "the other instance switching to version 2",
        || async {
            let (_, d) = other.decide(OPERATOR, &green_wire()).await;
            (d["decision_metadata"]["world_model_version"] == 2).then_some(d)
        },
    )
    .await;
    assert_eq!(d["status"], "YELLOW");
    deployed.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_reaches_another_instance_through_notify() {
    let db = Db::fresh(Backend::Postgres).await;
    let a = TestApp::on(&db).await;
    let mut config = test_config(&db);
    // Polling so slow that only a notification can explain a fast switch.
    config.cache.poll_interval = Duration::from_secs(60);
    let b = TestApp::start(config).await;
    let (_, health) = b.admin_get("/health").await;
    assert_eq!(health["features"]["deployments"], "listening");
    let took = deploy_and_measure(&a, &b).await;
    assert!(took < Duration::from_secs(5), "took {took:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_reaches_another_instance_by_polling_when_notifications_are_off() {
    let db = Db::fresh(Backend::Postgres).await;
    let a = TestApp::on(&db).await;
    let mut config = test_config(&db);
    config.cache.listen = false;
    config.cache.poll_interval = Duration::from_millis(200);
    let b = TestApp::start(config).await;
    let (_, health) = b.admin_get("/health").await;
    assert_eq!(health["features"]["deployments"], "polling");
    let took = deploy_and_measure(&a, &b).await;
    // Bounded by the poll interval plus a load; generous for a busy machine.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_is_not_ready_while_a_deployed_world_fails_to_load() {
    use sqlx::Connection;
    let db = Db::fresh(Backend::Postgres).await;
    let a = TestApp::on(&db).await;
    let (s, _) = a.admin_get("/health").await;
    assert_eq!(s, 200);
    a.stop().await;
    // Corrupt one stored module behind the service's back.
    let mut c = sqlx::PgConnection::connect(db.postgres_url().expect("postgres"))
        .await
        .expect("connect");
    sqlx::query("ALTER TABLE core.modules DISABLE TRIGGER modules_immutable")
        .execute(&mut c)
        .await
        .expect("disable trigger");
    let n = sqlx::query(
        "UPDATE core.modules \
         SET content = convert_to(replace(convert_from(content, 'UTF8'), 'standard-release', 'standard-relaxed'), 'UTF8') \
         WHERE hash IN (SELECT module_hash FROM core.version_modules WHERE world = 'acme-payments')",
    )
    .execute(&mut c)
    .await
    .expect("corrupt module");
    assert!(n.rows_affected() >= 1);
    let mut config = test_config(&db);
    config.bootstrap.seed_dir = None;
    let b = TestApp::start(config).await;
    let (s, health) = b.admin_get("/health").await;
    assert_eq!(s, 503, "{health}");
    assert_eq!(health["status"], "unavailable");
    let failed = health["features"]["worlds"]["failed"]["acme-payments"]
        .as_str()
        .unwrap_or("");
    assert!(failed.contains("hashes to"), "{health}");
    // The other worlds are still served; the broken one answers 503, not a guess.
    assert_eq!(health["features"]["worlds"]["loaded"]["globex-support"], 1);
    let (s, problem) = b.decide(OPERATOR, &green_wire()).await;
    assert_eq!(s, 503, "{problem}");
    assert_eq!(problem["code"], "unavailable");
    // The detail names the world but not the internals of the failure.
    let detail = problem["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("acme-payments") && !detail.contains("sha256"),
        "{detail}"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retirement_reaches_another_instance_that_had_the_version_loaded() {
    let db = Db::fresh(Backend::Postgres).await;
    let a = TestApp::on(&db).await;
    let mut config = test_config(&db);
    // Polling so slow that only a notification can explain a fast refusal.
    config.cache.poll_interval = Duration::from_secs(60);
    let b = TestApp::start(config).await;
    assert_eq!(a.publish_yellow_variant().await, 2);
    let mut pinned = green_wire();
    pinned["world_model_version"] = json!(2);
    // Instance b loads version 2 for a pinned request.
    let (s, d) = b.decide(OPERATOR, &pinned).await;
    assert_eq!((s, d["status"].as_str()), (200, Some("YELLOW")), "{d}");
    let (s, r) = a
        .post(
            OPERATOR,
            "/api/worlds/acme-payments/versions/2/retire",
            &json!({"reason": "canary went wrong"}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    // The retiring instance refuses it before it answers.
    let (s, _) = a.decide(OPERATOR, &pinned).await;
    assert_eq!(s, 410);
    // The other learns by notification (its poll is a minute away).
    let d = eventually(
        Duration::from_secs(5),
        "the other instance refusing the retired version",
        || async {
            let (s, d) = b.decide(OPERATOR, &pinned).await;
            assert!(s == 200 || s == 410, "{s}: {d}");
            (s == 410).then_some(d)
        },
    )
    .await;
    assert_eq!(d["code"], "version_retired");
    a.stop().await;
    b.stop().await;
}

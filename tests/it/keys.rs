//! The life cycle of API keys through the running service: listing (never a secret),
//! revocation (at once on the instance that revokes, through NOTIFY on another instance, within
//! the key cache's TTL where there is no NOTIFY), rotation with an overlap, expiry, and the
//! record of last use. Also `spectral keys list|revoke|rotate` against running `spectral api`
//! processes.

use std::time::Duration;

use chrono::Utc;
use reqwest::Method;
use serde_json::{json, Value};
use spectral::service::auth;
use spectral::store::{NewKey, Scope};

use crate::app::{green_wire, test_config, Backend, Db, TestApp, OPERATOR};
use crate::support::{eventually, process::command, Process};

crate::both_backends!(
    listing_shows_every_key_and_never_a_secret,
    only_operators_manage_keys,
    a_revoked_key_is_refused_at_once_by_the_instance_that_revoked_it,
    a_rotated_keys_old_secret_works_during_the_overlap_and_not_after,
    an_expired_key_is_refused,
    a_change_made_behind_an_instances_back_reaches_it_within_the_cache_ttl,
    last_use_is_recorded,
    a_revoked_operator_key_is_not_brought_back_by_a_restart,
);

/// A key created in the store as `spectral keys create` does; its id and secret.
async fn new_key(
    app: &TestApp,
    world: Option<&str>,
    scopes: &[Scope],
    expires_at: Option<chrono::DateTime<Utc>>,
) -> (String, String) {
    let (id, secret) = auth::generate();
    let store = &app.running.as_ref().expect("running").app.store;
    store
        .create_key(&NewKey {
            id: id.clone(),
            secret_hash: auth::hash_secret(&secret),
            world: world.map(String::from),
            scopes: scopes.to_vec(),
            label: "keys test".into(),
            expires_at,
        })
        .await
        .expect("key created");
    (id, secret)
}

async fn decide_status(app: &TestApp, secret: &str) -> (u16, Value) {
    app.decide(secret, &green_wire()).await
}

async fn listing_shows_every_key_and_never_a_secret(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let later = Utc::now() + chrono::TimeDelta::days(30);
    let (id, secret) = new_key(&app, Some("acme-payments"), &[Scope::Decide], Some(later)).await;
    let (s, _) = decide_status(&app, &secret).await;
    assert_eq!(s, 200);
    let resp = app
        .client
        .get(app.url("/api/keys"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("body");
    for hidden in [
        secret.as_str(),
        &auth::hash_secret(&secret),
        OPERATOR,
        &auth::hash_secret(OPERATOR),
    ] {
        assert!(!text.contains(hidden), "the listing shows a secret: {text}");
    }
    assert!(!text.contains("secret"), "{text}");
    let body: Value = serde_json::from_str(&text).expect("json");
    let keys = body["keys"].as_array().expect("keys");
    assert!(keys.len() >= 2, "{body}");
    let mine = keys
        .iter()
        .find(|k| k["id"] == id.as_str())
        .expect("listed");
    assert_eq!(mine["world"], "acme-payments");
    assert_eq!(mine["scopes"], json!(["decide"]));
    assert_eq!(mine["label"], "keys test");
    assert!(mine["created_at"].is_string(), "{mine}");
    assert!(mine["expires_at"].is_string(), "{mine}");
    assert!(mine["revoked_at"].is_null(), "{mine}");
    let operator = keys
        .iter()
        .find(|k| k["world"].is_null())
        .expect("operator");
    assert_eq!(operator["scopes"].as_array().map(Vec::len), Some(5));
    app.stop().await;
}

async fn only_operators_manage_keys(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let (id, secret) = new_key(&app, Some("acme-payments"), &Scope::ALL, None).await;
    for (method, path) in [
        (Method::GET, "/api/keys".to_string()),
        (Method::POST, format!("/api/keys/{id}/revoke")),
        (Method::POST, format!("/api/keys/{id}/rotate")),
    ] {
        let (s, problem) = app.call(method.clone(), &path, Some(&secret), None).await;
        assert_eq!(s, 403, "{method} {path}: {problem}");
        assert_eq!(problem["code"], "forbidden");
        let (s, _) = app.call(method.clone(), &path, None, None).await;
        assert_eq!(s, 401, "{method} {path} without a key");
    }
    // Nothing happened to the key.
    let (s, _) = decide_status(&app, &secret).await;
    assert_eq!(s, 200);
    for (path, code) in [
        ("/api/keys/key_nope/revoke", 404),
        ("/api/keys/key_nope/rotate", 404),
    ] {
        let (s, p) = app.post(OPERATOR, path, &json!({})).await;
        assert_eq!(s, code, "{path}: {p}");
    }
    app.stop().await;
}

async fn a_revoked_key_is_refused_at_once_by_the_instance_that_revoked_it(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let (id, secret) = new_key(&app, Some("acme-payments"), &[Scope::Decide], None).await;
    // Cached by a first request.
    assert_eq!(decide_status(&app, &secret).await.0, 200);
    let (s, revoked) = app
        .post(OPERATOR, &format!("/api/keys/{id}/revoke"), &json!({}))
        .await;
    assert_eq!(s, 200, "{revoked}");
    assert!(revoked["revoked_at"].is_string(), "{revoked}");
    let (s, problem) = decide_status(&app, &secret).await;
    assert_eq!(s, 401, "{problem}");
    // Revoking again keeps the first time; a revoked key cannot be rotated back to life.
    let (s, again) = app
        .post(OPERATOR, &format!("/api/keys/{id}/revoke"), &json!({}))
        .await;
    assert_eq!(s, 200);
    assert_eq!(again["revoked_at"], revoked["revoked_at"]);
    let (s, p) = app
        .post(OPERATOR, &format!("/api/keys/{id}/rotate"), &json!({}))
        .await;
    assert_eq!(s, 409, "{p}");
    // The server keeps serving everyone else.
    assert_eq!(decide_status(&app, OPERATOR).await.0, 200);
    app.stop().await;
}

async fn a_rotated_keys_old_secret_works_during_the_overlap_and_not_after(backend: Backend) {
    let db = Db::fresh(backend).await;
    let mut config = test_config(&db);
    config.keys.rotation_overlap = Duration::from_secs(3);
    let app = TestApp::start(config).await;
    let (id, old) = new_key(&app, Some("acme-payments"), &[Scope::Decide], None).await;
    assert_eq!(decide_status(&app, &old).await.0, 200);
    let (s, rotated) = app
        .post(OPERATOR, &format!("/api/keys/{id}/rotate"), &json!({}))
        .await;
    assert_eq!(s, 200, "{rotated}");
    let new = rotated["secret"]
        .as_str()
        .expect("the new secret")
        .to_string();
    assert_ne!(new, old);
    assert_eq!(rotated["id"], id.as_str());
    let until: chrono::DateTime<Utc> = rotated["previous_valid_until"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("previous_valid_until");
    // The new secret works, as the same key.
    let (s, d) = decide_status(&app, &new).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["decision_metadata"]["world"], "acme-payments");
    // The old one works while the overlap lasts: a refusal is only right after its end.
    let asked = Utc::now();
    let (s, p) = decide_status(&app, &old).await;
    assert!(
        s == 200 || (s == 401 && asked >= until),
        "the old secret was refused during the overlap: {p}"
    );
    // And is refused after it, cached or not.
    let p = eventually(
        Duration::from_secs(20),
        "the old secret refused",
        || async {
            let (s, p) = decide_status(&app, &old).await;
            (s == 401).then_some(p)
        },
    )
    .await;
    assert!(Utc::now() >= until);
    assert!(
        p["detail"].as_str().unwrap_or("").contains("rotation"),
        "{p}"
    );
    assert_eq!(decide_status(&app, &new).await.0, 200);
    // The listing tells when the overlap ends, never a secret.
    let (_, listed) = app.get(Some(OPERATOR), "/api/keys").await;
    let text = listed.to_string();
    assert!(!text.contains(&new) && !text.contains(&old), "{text}");
    app.stop().await;
}

async fn an_expired_key_is_refused(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let past = Utc::now() - chrono::TimeDelta::seconds(1);
    let (_, expired) = new_key(&app, Some("acme-payments"), &[Scope::Decide], Some(past)).await;
    let (s, p) = decide_status(&app, &expired).await;
    assert_eq!(s, 401, "{p}");
    assert!(
        p["detail"].as_str().unwrap_or("").contains("expired"),
        "{p}"
    );
    let soon = Utc::now() + chrono::TimeDelta::seconds(2);
    let (_, expiring) = new_key(&app, Some("acme-payments"), &[Scope::Decide], Some(soon)).await;
    let asked = Utc::now();
    let (s, _) = decide_status(&app, &expiring).await;
    assert!(s == 200 || asked >= soon, "refused before its expiry");
    // Refused once its time has come, even while its lookup is cached.
    eventually(Duration::from_secs(20), "the key expiring", || async {
        (decide_status(&app, &expiring).await.0 == 401).then_some(())
    })
    .await;
    assert!(Utc::now() >= soon);
    app.stop().await;
}

async fn a_change_made_behind_an_instances_back_reaches_it_within_the_cache_ttl(backend: Backend) {
    // A second store on the database revokes, as another instance would; with
    // notifications off the instance learns of it only when its cached lookup expires.
    let db = Db::fresh(backend).await;
    let mut config = test_config(&db);
    config.keys.listen = false;
    config.keys.cache_ttl = Duration::from_millis(500);
    let app = TestApp::start(config).await;
    let (id, secret) = new_key(&app, Some("acme-payments"), &[Scope::Decide], None).await;
    assert_eq!(decide_status(&app, &secret).await.0, 200);
    let other = db.store().await;
    let revoked_at = std::time::Instant::now();
    other.revoke_key(&id).await.expect("revoked");
    eventually(
        Duration::from_secs(20),
        "the instance refusing the key",
        || async { (decide_status(&app, &secret).await.0 == 401).then_some(()) },
    )
    .await;
    let took = revoked_at.elapsed();
    // The bound: the TTL, plus a request's time on a busy machine.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    other.close().await;
    app.stop().await;
}

async fn last_use_is_recorded(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let (id, secret) = new_key(&app, Some("acme-payments"), &[Scope::Decide], None).await;
    let listed = |app: &TestApp| {
        let id = id.clone();
        let client = app.client.clone();
        let url = app.url("/api/keys");
        async move {
            let body: Value = client
                .get(url)
                .bearer_auth(OPERATOR)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            body["keys"]
                .as_array()?
                .iter()
                .find(|k| k["id"] == id.as_str())
                .cloned()
        }
    };
    let before = listed(&app).await.expect("listed");
    assert!(before["last_used_at"].is_null(), "{before}");
    assert_eq!(decide_status(&app, &secret).await.0, 200);
    let used = eventually(Duration::from_secs(10), "last_used_at recorded", || async {
        listed(&app).await.filter(|k| k["last_used_at"].is_string())
    })
    .await;
    let at: chrono::DateTime<Utc> = used["last_used_at"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("a time");
    assert!(at <= Utc::now());
    app.stop().await;
}

async fn a_revoked_operator_key_is_not_brought_back_by_a_restart(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let (_, keys) = app.get(Some(OPERATOR), "/api/keys").await;
    let id = keys["keys"]
        .as_array()
        .and_then(|k| k.iter().find(|k| k["world"].is_null()))
        .and_then(|k| k["id"].as_str())
        .expect("the operator key")
        .to_string();
    let (s, _) = app
        .post(OPERATOR, &format!("/api/keys/{id}/revoke"), &json!({}))
        .await;
    assert_eq!(s, 200);
    assert_eq!(decide_status(&app, OPERATOR).await.0, 401);
    app.stop().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = match spectral::supervisor::start(test_config(&db), listener).await {
        Ok(_) => panic!("started with a revoked operator key"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("revoked"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Two `spectral api` processes on one Postgres, and the CLI.

fn api_env(db: &crate::db::TestDb, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("DATABASE_URL", db.url().to_string()),
        ("SPECTRAL_LOG_FORMAT", "json".into()),
        ("SPECTRAL_LOG", "info".into()),
        ("SPECTRAL_GENERATION", "1".into()),
        ("SPECTRAL_ADDR", "127.0.0.1:0".into()),
        (
            "SPECTRAL_SEED_DIR",
            crate::support::predicates_dir().display().to_string(),
        ),
        ("SPECTRAL_OPERATOR_KEY", OPERATOR.into()),
        ("SPECTRAL_DB_MAX_CONNECTIONS", "4".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    env
}

/// Run `spectral keys …` to the end; its stdout, stderr and success.
fn keys_cli(args: &[&str]) -> (String, String, bool) {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    let out = command(&all)
        .env("SPECTRAL_KEY", OPERATOR)
        .output()
        .expect("spectral runs");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

async fn decide_at(base: &str, secret: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/api/decide"))
        .bearer_auth(secret)
        .json(&green_wire())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_by_a_second_instance_through_notify() {
    let db = crate::db::fresh_postgres().await;
    let dir = tempfile::tempdir().expect("dir");
    // A cache TTL of ten minutes: only the notification can explain a refusal in time.
    let extra = [("SPECTRAL_KEY_CACHE_TTL_MS", "600000")];
    let a = Process::spawn(&["api"], &api_env(&db, &extra), dir.path());
    let a_base = a.ready().await;
    let b = Process::spawn(&["api"], &api_env(&db, &extra), dir.path());
    let b_base = b.ready().await;

    let out = command(&[
        "keys",
        "create",
        "--world",
        "acme-payments",
        "--scopes",
        "decide",
        "--label",
        "two instances",
    ])
    .env("DATABASE_URL", db.url())
    .output()
    .expect("keys create runs");
    assert!(out.status.success(), "{out:?}");
    let secret = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // Both instances have the key cached.
    assert_eq!(decide_at(&a_base, &secret).await, 200);
    assert_eq!(decide_at(&b_base, &secret).await, 200);

    let (listing, err, ok) = keys_cli(&["list", "--url", &a_base]);
    assert!(ok, "{err}");
    assert!(!listing.contains(&secret), "{listing}");
    let id = listing
        .lines()
        .find(|l| l.ends_with("two instances"))
        .and_then(|l| l.split('\t').next())
        .expect("the key is listed")
        .to_string();

    let (out, err, ok) = keys_cli(&["revoke", "--url", &a_base, &id]);
    assert!(ok, "{err}");
    assert!(out.contains("revoked at"), "{out}");
    let revoked = std::time::Instant::now();
    assert_eq!(decide_at(&a_base, &secret).await, 401);
    eventually(
        Duration::from_secs(10),
        "the second instance refusing the revoked key",
        || async { (decide_at(&b_base, &secret).await == 401).then_some(()) },
    )
    .await;
    // Documented bound with NOTIFY: about a second (docs/operations.md, "Keys").
    let took = revoked.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // Both keep serving the others.
    assert_eq!(decide_at(&b_base, OPERATOR).await, 200);
    assert_eq!(decide_at(&a_base, OPERATOR).await, 200);
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_rotates_a_key_and_creates_keys_that_expire() {
    let db = crate::db::fresh_postgres().await;
    let dir = tempfile::tempdir().expect("dir");
    let extra = [("SPECTRAL_KEY_ROTATION_OVERLAP_MS", "600000")];
    let a = Process::spawn(&["api"], &api_env(&db, &extra), dir.path());
    let base = a.ready().await;
    let out = command(&[
        "keys",
        "create",
        "--world",
        "acme-payments",
        "--label",
        "rotating",
        "--expires-in",
        "30d",
    ])
    .env("DATABASE_URL", db.url())
    .output()
    .expect("keys create runs");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("expiring at"));
    let old = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (listing, _, _) = keys_cli(&["list", "--url", &base]);
    let line = listing
        .lines()
        .find(|l| l.ends_with("rotating"))
        .expect("listed")
        .to_string();
    let fields: Vec<&str> = line.split('\t').collect();
    assert_ne!(fields[5], "-", "an expiry is listed: {line}");
    let (out, err, ok) = keys_cli(&["rotate", "--url", &base, fields[0]]);
    assert!(ok, "{err}");
    let new = out.trim().to_string();
    assert!(new.starts_with("spk_"), "{out}");
    assert!(err.contains("accepted until"), "{err}");
    assert_eq!(decide_at(&base, &new).await, 200);
    assert_eq!(decide_at(&base, &old).await, 200, "within the overlap");
    // A bad lifetime is refused before anything is created.
    let out = command(&["keys", "create", "--operator", "--expires-in", "soon"])
        .env("DATABASE_URL", db.url())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    drop(a);
}

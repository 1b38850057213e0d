//! Noisy neighbours are bounded: a key or a world over its rate is answered 429
//! `rate_limited` with `Retry-After`, counted in `/metrics`, while other keys and worlds are
//! served as before.

use serde_json::{json, Value};
use spectral::store::Scope;

use crate::app::{green_wire, test_config, Backend, Db, TestApp, OPERATOR};

crate::both_backends!(
    a_key_over_its_rate_gets_429_with_retry_after_and_another_key_is_served,
    a_flooded_world_leaves_another_world_unaffected,
    authoring_calls_have_a_rate_of_their_own,
);

/// Send `body` with `key` until a 429 comes back, at most `tries` times; the 429's headers
/// and problem, and how many requests passed before it.
async fn until_limited(
    app: &TestApp,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: &Value,
    tries: usize,
) -> (reqwest::header::HeaderMap, Value, usize) {
    for passed in 0..tries {
        let resp = app
            .client
            .request(method.clone(), app.url(path))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("sent");
        if resp.status().as_u16() == 429 {
            let headers = resp.headers().clone();
            let problem: Value = resp.json().await.expect("a problem document");
            return (headers, problem, passed);
        }
    }
    panic!("no 429 in {tries} requests to {path}");
}

/// A counter's value in the admin listener's `/metrics`.
async fn metric(app: &TestApp, line_start: &str) -> u64 {
    let (_, text) = app.admin_get("/metrics").await;
    text.as_str()
        .unwrap_or("")
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn a_key_over_its_rate_gets_429_with_retry_after_and_another_key_is_served(backend: Backend) {
    let db = Db::fresh(backend).await;
    let mut config = test_config(&db);
    // One decision a second per key, a bucket of one: the second in the same second is over.
    config.server.rate.decide_per_key = 1;
    config.server.rate.burst_seconds = 1;
    let app = TestApp::start(config).await;
    let noisy = app.key(Some("acme-payments"), &[Scope::Decide]).await;
    let quiet = app.key(Some("acme-payments"), &[Scope::Decide]).await;
    let (headers, problem, passed) = until_limited(
        &app,
        &noisy,
        reqwest::Method::POST,
        "/api/decide",
        &green_wire(),
        50,
    )
    .await;
    assert!(passed >= 1, "the first decision passes");
    assert_eq!(problem["code"], "rate_limited", "{problem}");
    assert_eq!(problem["status"], 429, "{problem}");
    assert_eq!(problem["limit"], "decide_key", "{problem}");
    let retry: u64 = headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("whole seconds");
    assert!((1..=2).contains(&retry), "Retry-After: {retry}");
    assert_eq!(
        headers["content-type"], "application/problem+json",
        "{headers:?}"
    );
    // Another key of the same world has its own bucket.
    let (s, d) = app.decide(&quiet, &green_wire()).await;
    assert_eq!((s, d["status"].as_str()), (200, Some("GREEN")), "{d}");
    // A batch counts its items: two of them never fit a bucket of one.
    let batch = json!({"requests": [green_wire(), green_wire()]});
    let (s, b) = app.post(&quiet, "/api/decide/batch", &batch).await;
    assert_eq!((s, b["code"].as_str()), (429, Some("rate_limited")), "{b}");
    assert!(metric(&app, "spectral_rate_limited_total{limit=\"decide_key\"}").await >= 2);
    app.stop().await;
}

async fn a_flooded_world_leaves_another_world_unaffected(backend: Backend) {
    let db = Db::fresh(backend).await;
    let mut config = test_config(&db);
    // Three decisions a second per world: a flood of one world soon exceeds it, and the few
    // decisions of another world below fit its own.
    config.server.rate.decide_per_world = 3;
    config.server.rate.burst_seconds = 1;
    let app = TestApp::start(config).await;
    let flooder = app.key(Some("globex-support"), &[Scope::Decide]).await;
    let neighbour = app.key(Some("globex-support"), &[Scope::Decide]).await;
    // The flood's bodies need not even be valid: each is counted before it is read further.
    let flood = json!({"world": "globex-support", "action": "refund.issue", "context": {}});
    let (_, problem, _) = until_limited(
        &app,
        &flooder,
        reqwest::Method::POST,
        "/api/decide",
        &flood,
        50,
    )
    .await;
    assert_eq!(problem["limit"], "decide_world", "{problem}");
    // The world's limit holds across its keys ...
    let (s, b) = app.decide(&neighbour, &flood).await;
    assert_eq!((s, b["limit"].as_str()), (429, Some("decide_world")), "{b}");
    // ... and another world's decisions are served as before, by a bound key and by the
    // operator key alike.
    let acme = app.key(Some("acme-payments"), &[Scope::Decide]).await;
    let (s, d) = app.decide(&acme, &green_wire()).await;
    assert_eq!((s, d["status"].as_str()), (200, Some("GREEN")), "{d}");
    // A key of the flooded world asking about another world spends nothing of that world's.
    let mut elsewhere = green_wire();
    elsewhere["world"] = json!("acme-payments");
    let (s, _) = app.decide(&flooder, &elsewhere).await;
    assert_ne!(s, 200, "a globex key cannot decide for acme");
    let (s, d) = app.decide(OPERATOR, &green_wire()).await;
    assert_eq!((s, d["status"].as_str()), (200, Some("GREEN")), "{d}");
    assert!(metric(&app, "spectral_rate_limited_total{limit=\"decide_world\"}").await >= 2);
    app.stop().await;
}

async fn authoring_calls_have_a_rate_of_their_own(backend: Backend) {
    let db = Db::fresh(backend).await;
    let mut config = test_config(&db);
    config.server.rate.authoring_per_key = 1;
    config.server.rate.burst_seconds = 1;
    let app = TestApp::start(config).await;
    let author = app.key(Some("acme-payments"), &Scope::ALL).await;
    // A draft that is refused as invalid still spends the rate: the flood is what is bounded.
    let (headers, problem, _) = until_limited(
        &app,
        &author,
        reqwest::Method::PUT,
        "/api/worlds/acme-payments/draft",
        &json!({"not": "a world"}),
        50,
    )
    .await;
    assert_eq!(problem["limit"], "authoring_key", "{problem}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    // Decisions of the same key are another bucket.
    let (s, d) = app.decide(&author, &green_wire()).await;
    assert_eq!((s, d["status"].as_str()), (200, Some("GREEN")), "{d}");
    // Another key authors as usual.
    let (s, b) = app
        .post(
            OPERATOR,
            "/api/worlds/acme-payments/deployments",
            &json!({"version": 1}),
        )
        .await;
    assert_ne!(s, 429, "{b}");
    assert!(metric(&app, "spectral_rate_limited_total{limit=\"authoring_key\"}").await >= 1);
    app.stop().await;
}

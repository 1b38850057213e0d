//! The decide service over HTTP, on SQLite and on Postgres: decide round trips, pinning (and
//! the pin scope it needs), retirement, batch, explain, every problem code, auth, publish/deploy/rollback, immutability,
//! restart, and the decision chain.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{json, Value};
use spectral::store::Scope;
use spectral::worlds::context::SystemValues;
use spectral::worlds::{load, ContextJson, Request};

use crate::app::{green_wire, test_config, Backend, Db, TestApp, OPERATOR};
use crate::support::{example_worlds, predicates_dir};

crate::both_backends!(
    every_example_world_answers_every_status_as_the_library_does,
    pinning_a_version,
    pinning_another_version_needs_the_pin_scope,
    retired_versions_are_refused_to_every_key,
    batch_answers_in_order_with_per_item_errors,
    explain_includes_the_trace,
    every_problem_code,
    keys_of_one_world_never_reach_another,
    publish_deploy_rollback,
    published_versions_are_immutable,
    restart_keeps_everything,
    decision_chain_verifies_and_detects_tampering,
    audit_verify_detects_a_deleted_a_reordered_and_an_inserted_record,
    openapi_document_describes_the_deployed_actions,
    draft_with_problems_lists_every_one,
);

/// Contexts for an action: every rule's cases laid over a base made of each rule's first
/// case, so that across them every rule matches and misses.
fn contexts(model: &spectral::worlds::WorldModel, action: &str) -> Vec<Value> {
    let Some(action) = model.action(action) else {
        return vec![];
    };
    let mut base = serde_json::Map::new();
    for rule in &action.rules {
        for case in rule.cases.iter().filter(|c| !c.matches).take(1) {
            for (k, v) in &case.context {
                base.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
    for rule in &action.rules {
        for (k, v) in &rule.cases[0].context {
            base.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let mut out = vec![Value::Object(base.clone())];
    for rule in &action.rules {
        for case in &rule.cases {
            let mut ctx = base.clone();
            ctx.extend(case.context.clone());
            out.push(Value::Object(ctx));
        }
    }
    out
}

async fn every_example_world_answers_every_status_as_the_library_does(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let sandbox = crate::support::sandbox();
    for dir in example_worlds() {
        let world = load::load(&dir, &sandbox).expect("example world loads");
        let mut seen = BTreeSet::new();
        for action in &world.model.actions {
            let module = world.module(&action.name).expect("module");
            for ctx in contexts(&world.model, &action.name) {
                let body =
                    json!({"world": world.model.world, "action": action.name, "context": ctx});
                // The library's answer at (nearly) the same request time.
                let text = ctx.to_string();
                let offline = spectral::worlds::evaluate(
                    &sandbox,
                    module,
                    &Request {
                        context: ContextJson::Text(&text),
                        system: SystemValues {
                            request_time: chrono::Utc::now().timestamp(),
                            request_id: "x".into(),
                            caller: "key_operator".into(),
                        },
                        correlation_id: None,
                        explain: false,
                    },
                )
                .expect("context is an object");
                let (status, online) = app.decide(OPERATOR, &body).await;
                assert_eq!(status, 200, "{online}");
                assert_eq!(
                    online["status"],
                    offline.status.as_str(),
                    "{body}\n{online}"
                );
                assert_eq!(
                    online["decision_metadata"]["matched_rules"],
                    serde_json::to_value(&offline.decision_metadata.matched_rules).expect("json")
                );
                assert_eq!(
                    online["decision_metadata"]["module_hash"],
                    offline.decision_metadata.module_hash.as_str()
                );
                seen.insert(offline.status);
            }
        }
        assert_eq!(
            seen.len(),
            4,
            "{} did not produce every status: {seen:?}",
            world.model.world
        );
    }
    app.stop().await;
}

async fn pinning_a_version(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let v2 = app.publish_yellow_variant().await;
    assert_eq!(v2, 2);
    // Not deployed: the deployed version 1 still answers; a pin reaches version 2.
    let (_, d) = app.decide(OPERATOR, &green_wire()).await;
    assert_eq!(d["status"], "GREEN");
    assert_eq!(d["decision_metadata"]["world_model_version"], 1);
    let mut pinned = green_wire();
    pinned["world_model_version"] = json!(2);
    let (status, d) = app.decide(OPERATOR, &pinned).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["status"], "YELLOW");
    assert_eq!(d["decision_metadata"]["world_model_version"], 2);
    pinned["world_model_version"] = json!(9);
    let (status, d) = app.decide(OPERATOR, &pinned).await;
    assert_eq!(status, 404, "{d}");
    assert_eq!(d["code"], "not_found");
    app.stop().await;
}

/// A decide body pinned to `version`.
fn pinned(version: u64) -> Value {
    let mut body = green_wire();
    body["world_model_version"] = json!(version);
    body
}

/// The status of each item of a batch answer.
fn item_statuses(out: &Value) -> Vec<u64> {
    out["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["status"].as_u64().expect("status"))
        .collect()
}

async fn pinning_another_version_needs_the_pin_scope(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    assert_eq!(app.publish_yellow_variant().await, 2);
    let decide_only = app.key(Some("acme-payments"), &[Scope::Decide]).await;
    let pinner = app
        .key(Some("acme-payments"), &[Scope::Decide, Scope::Pin])
        .await;
    // Naming the deployed version needs nothing more than decide.
    let (s, d) = app.decide(&decide_only, &pinned(1)).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["decision_metadata"]["world_model_version"], 1);
    // Any other version, published or not, is refused and the problem names the scope.
    for version in [2, 9] {
        let (s, b) = app.decide(&decide_only, &pinned(version)).await;
        assert_eq!((s, b["code"].as_str()), (403, Some("forbidden")), "{b}");
        let detail = b["detail"].as_str().unwrap_or("");
        assert!(detail.contains("'pin' scope"), "{detail}");
    }
    // With pin, an older or newer version is reachable (replays, canaries).
    let (s, d) = app.decide(&pinner, &pinned(2)).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(
        (
            d["status"].as_str(),
            d["decision_metadata"]["world_model_version"].as_u64()
        ),
        (Some("YELLOW"), Some(2))
    );
    // Pin does not stand in for decide, nor reach another world.
    let pin_only = app.key(Some("acme-payments"), &[Scope::Pin]).await;
    let (s, b) = app.decide(&pin_only, &pinned(2)).await;
    assert_eq!(s, 403, "{b}");
    let elsewhere = app
        .key(Some("globex-support"), &[Scope::Decide, Scope::Pin])
        .await;
    let (s, b) = app.decide(&elsewhere, &pinned(2)).await;
    assert_eq!(s, 403, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .unwrap_or("")
            .contains("bound to world"),
        "{b}"
    );
    // The batch applies the rule to every item on its own.
    let body = json!({"requests": [pinned(1), pinned(2), green_wire()]});
    let (s, out) = app.post(&decide_only, "/api/decide/batch", &body).await;
    assert_eq!(s, 200, "{out}");
    assert_eq!(item_statuses(&out), [200, 403, 200], "{out}");
    let problem = &out["results"][1]["problem"];
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or("")
            .contains("'pin' scope"),
        "{problem}"
    );
    assert_eq!(out["results"][2]["decision"]["status"], "GREEN");
    let (s, out) = app.post(&pinner, "/api/decide/batch", &body).await;
    assert_eq!(s, 200, "{out}");
    assert_eq!(item_statuses(&out), [200, 200, 200], "{out}");
    assert_eq!(out["results"][1]["decision"]["status"], "YELLOW");
    app.stop().await;
}

async fn retired_versions_are_refused_to_every_key(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let deployer = app
        .key(Some("acme-payments"), &[Scope::Deploy, Scope::Read])
        .await;
    let pinner = app
        .key(Some("acme-payments"), &[Scope::Decide, Scope::Pin])
        .await;
    let decide_only = app.key(Some("acme-payments"), &[Scope::Decide]).await;
    let elsewhere = app.key(Some("globex-support"), &Scope::ALL).await;
    let deploy = |version: u64| {
        let app = &app;
        let deployer = &deployer;
        async move {
            app.post(
                deployer,
                "/api/worlds/acme-payments/deployments",
                &json!({ "version": version }),
            )
            .await
        }
    };
    let retire = |key: &str, version: u64, body: Value| {
        let path = format!("/api/worlds/acme-payments/versions/{version}/retire");
        let key = key.to_string();
        let app = &app;
        async move { app.post(&key, &path, &body).await }
    };
    // Version 2 goes out, and is pinned (and so loaded) while it is deployed.
    assert_eq!(app.publish_yellow_variant().await, 2);
    let (s, b) = deploy(2).await;
    assert_eq!(s, 200, "{b}");
    let (s, d) = app.decide(&pinner, &pinned(2)).await;
    assert_eq!((s, d["status"].as_str()), (200, Some("YELLOW")), "{d}");
    // The deployed version cannot be retired.
    let (s, b) = retire(&deployer, 2, json!({})).await;
    assert_eq!((s, b["code"].as_str()), (409, Some("conflict")), "{b}");
    // Roll back: a pin key still reaches version 2 until it is retired.
    let (s, b) = deploy(1).await;
    assert_eq!(s, 200, "{b}");
    let (s, d) = app.decide(&pinner, &pinned(2)).await;
    assert_eq!(s, 200, "{d}");
    // Retiring needs deploy on the version's own world, and a reason of bounded size.
    let (s, b) = retire(&elsewhere, 2, json!({})).await;
    assert_eq!((s, b["code"].as_str()), (403, Some("forbidden")), "{b}");
    let (s, b) = retire(&pinner, 2, json!({})).await;
    assert_eq!((s, b["code"].as_str()), (403, Some("forbidden")), "{b}");
    // A body that is JSON but not an object is refused, though serde would read the struct
    // from an array of its fields.
    for body in [json!([]), json!(["why"]), json!("why"), json!(null)] {
        let (s, b) = retire(&deployer, 2, body.clone()).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (400, Some("malformed_request")),
            "{body}: {b}"
        );
    }
    let (s, b) = app
        .post(
            &deployer,
            "/api/worlds/acme-payments/deployments",
            &json!([1]),
        )
        .await;
    assert_eq!(
        (s, b["code"].as_str()),
        (400, Some("malformed_request")),
        "{b}"
    );
    let (s, b) = retire(&deployer, 2, json!({"reason": "x".repeat(1001)})).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (400, Some("field_too_long")),
        "{b}"
    );
    let (s, b) = retire(&deployer, 2, json!({"reason": "x", "force": true})).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (400, Some("malformed_request")),
        "{b}"
    );
    let (s, b) = retire(&deployer, 9, json!({})).await;
    assert_eq!((s, b["code"].as_str()), (404, Some("not_found")), "{b}");
    let (s, retired) = retire(&deployer, 2, json!({"reason": "too permissive"})).await;
    assert_eq!(s, 200, "{retired}");
    assert_eq!(retired["version"], 2);
    assert_eq!(retired["retired"]["reason"], "too permissive");
    let by = retired["retired"]["retired_by"].as_str().unwrap_or("");
    assert!(by.starts_with("key_"), "{retired}");
    // No key pins it any more: not one with pin, not the operator, not a decide-only key.
    for key in [pinner.as_str(), OPERATOR] {
        let (s, b) = app.decide(key, &pinned(2)).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (410, Some("version_retired")),
            "{b}"
        );
        assert_eq!(b["type"], "/problems/version_retired");
    }
    let (s, b) = app.decide(&decide_only, &pinned(2)).await;
    assert_eq!(s, 403, "{b}");
    let body = json!({"requests": [pinned(2), pinned(1)]});
    let (_, out) = app.post(&pinner, "/api/decide/batch", &body).await;
    assert_eq!(item_statuses(&out), [410, 200], "{out}");
    // The deployed version still answers, pinned or not.
    let (s, d) = app.decide(&decide_only, &green_wire()).await;
    assert_eq!((s, d["status"].as_str()), (200, Some("GREEN")), "{d}");
    // It is never deployed again, and stays retired.
    let (s, b) = deploy(2).await;
    assert_eq!((s, b["code"].as_str()), (409, Some("conflict")), "{b}");
    assert!(
        b["detail"].as_str().unwrap_or("").contains("retired"),
        "{b}"
    );
    let (s, b) = retire(&deployer, 2, json!({})).await;
    assert_eq!((s, b["code"].as_str()), (409, Some("conflict")), "{b}");
    let (s, b) = retire(OPERATOR, 1, json!({})).await;
    assert_eq!((s, b["code"].as_str()), (409, Some("conflict")), "{b}");
    // Reads show it: the version, and the world's list of versions.
    let (_, v2) = app
        .get(Some(&deployer), "/api/worlds/acme-payments/versions/2")
        .await;
    assert_eq!(v2["retired"], retired["retired"], "{v2}");
    let (_, v1) = app
        .get(Some(&deployer), "/api/worlds/acme-payments/versions/1")
        .await;
    assert!(v1["retired"].is_null(), "{v1}");
    let (_, world) = app.get(Some(&deployer), "/api/worlds/acme-payments").await;
    let versions = world["versions"].as_array().expect("versions");
    assert!(versions[0]["retired"].is_null(), "{world}");
    assert_eq!(versions[1]["retired"], retired["retired"], "{world}");
    // The body is optional: no body, no content type, no reason.
    assert_eq!(app.publish_yellow_variant().await, 3);
    let resp = app
        .client
        .post(app.url("/api/worlds/acme-payments/versions/3/retire"))
        .bearer_auth(&deployer)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.expect("json");
    assert!(body["retired"]["reason"].is_null(), "{body}");
    // Each retirement left its event in the outbox, in the transaction that retired it.
    app.stop().await;
    let store = db.store().await;
    let rows = store.outbox_list(None, None, 1000).await.expect("outbox");
    let mut events: Vec<(u64, Value)> = rows
        .iter()
        .filter(|r| r.event_type == spectral::store::events::VERSION_RETIRED)
        .map(|r| {
            (
                r.payload["version"].as_u64().unwrap_or(0),
                r.payload["reason"].clone(),
            )
        })
        .collect();
    events.sort_by_key(|(v, _)| *v);
    assert_eq!(
        events,
        [(2, json!("too permissive")), (3, Value::Null)],
        "{rows:?}"
    );
    store.close().await;
}

async fn batch_answers_in_order_with_per_item_errors(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let mut red = green_wire();
    red["context"]["vendor_country"] = json!("KP");
    let mut unknown_action = green_wire();
    unknown_action["action"] = json!("nope");
    let body = json!({"requests": [green_wire(), red, {"not": "a request"}, unknown_action]});
    let (status, out) = app.post(OPERATOR, "/api/decide/batch", &body).await;
    assert_eq!(status, 200, "{out}");
    let results = out["results"].as_array().expect("results");
    assert_eq!(results.len(), 4);
    assert_eq!(results[0]["status"], 200);
    assert_eq!(results[0]["decision"]["status"], "GREEN");
    assert_eq!(results[1]["decision"]["status"], "RED");
    assert_eq!(results[2]["status"], 400);
    assert_eq!(results[2]["problem"]["code"], "malformed_request");
    assert_eq!(results[3]["status"], 404);
    assert_eq!(results[3]["problem"]["code"], "not_found");
    // Over the configured maximum: the whole batch is refused.
    let many: Vec<Value> = (0..101).map(|_| green_wire()).collect();
    let (status, out) = app
        .post(OPERATOR, "/api/decide/batch", &json!({"requests": many}))
        .await;
    assert_eq!(status, 400, "{out}");
    assert!(out["detail"].as_str().unwrap_or("").contains("at most 100"));
    app.stop().await;
}

async fn explain_includes_the_trace(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let mut body = green_wire();
    body["explain"] = json!(true);
    body["correlation_id"] = json!("corr-7");
    let (status, d) = app.decide(OPERATOR, &body).await;
    assert_eq!(status, 200);
    let trace = d["decision_metadata"]["trace"].as_array().expect("trace");
    assert_eq!(trace.len(), 11);
    assert_eq!(trace[0]["rule"], "embargoed-country");
    assert_eq!(d["decision_metadata"]["correlation_id"], "corr-7");
    let (_, d) = app.decide(OPERATOR, &green_wire()).await;
    assert!(d["decision_metadata"]["trace"].is_null());
    app.stop().await;
}

async fn every_problem_code(backend: Backend) {
    let db = Db::fresh(backend).await;
    let mut config = test_config(&db);
    config.server.max_body_bytes = 4096;
    let app = TestApp::start(config).await;
    let raw = |body: &'static str, ctype: &'static str| {
        app.client
            .post(app.url("/api/decide"))
            .bearer_auth(OPERATOR)
            .header("content-type", ctype)
            .body(body)
    };
    let check = |status: u16, body: &Value, code: &str, expect: u16| {
        assert_eq!(status, expect, "{body}");
        assert_eq!(body["code"], code, "{body}");
        assert_eq!(body["status"], expect);
        assert_eq!(body["type"], format!("/problems/{code}"));
        assert!(body["title"].is_string() && body["detail"].is_string());
    };
    let send = |req: reqwest::RequestBuilder| async move {
        let resp = req.send().await.expect("sent");
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body: Value = resp.json().await.expect("json body");
        assert_eq!(ctype, "application/problem+json");
        (status, body)
    };
    // 400: malformed JSON, a missing field, a context that is not an object.
    let (s, b) = send(raw("{\"action\": ", "application/json")).await;
    check(s, &b, "malformed_request", 400);
    let (s, b) = send(raw("{\"action\": \"x\"}", "application/json")).await;
    check(s, &b, "malformed_request", 400);
    let (s, b) = app
        .decide(
            OPERATOR,
            &json!({"world": "acme-payments", "action": "vendor.onboard", "context": [1]}),
        )
        .await;
    check(s, &b, "bad_request", 400);
    // 401: no key, an unknown key.
    let (s, b) = app
        .call(Method::POST, "/api/decide", None, Some(&green_wire()))
        .await;
    check(s, &b, "unauthenticated", 401);
    let (s, b) = app.decide("spk_not_a_key", &green_wire()).await;
    check(s, &b, "unauthenticated", 401);
    // 403: a key without the scope.
    let reader = app.key(Some("acme-payments"), &[Scope::Read]).await;
    let (s, b) = app.decide(&reader, &green_wire()).await;
    check(s, &b, "forbidden", 403);
    // 404: unknown world, action, version, route.
    let mut body = green_wire();
    body["world"] = json!("nowhere");
    let (s, b) = app.decide(OPERATOR, &body).await;
    check(s, &b, "not_found", 404);
    let mut body = green_wire();
    body["action"] = json!("wire_transfer.explode");
    let (s, b) = app.decide(OPERATOR, &body).await;
    check(s, &b, "not_found", 404);
    let (s, b) = app
        .get(Some(OPERATOR), "/api/worlds/acme-payments/versions/77")
        .await;
    check(s, &b, "not_found", 404);
    let (s, b) = app.get(Some(OPERATOR), "/api/nothing-here").await;
    check(s, &b, "route_not_found", 404);
    // 405 with Allow.
    let resp = app
        .client
        .get(app.url("/api/decide"))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 405);
    assert_eq!(resp.headers()["allow"], "POST");
    // 413: over the body limit.
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(8000));
    let resp = app
        .client
        .post(app.url("/api/decide"))
        .bearer_auth(OPERATOR)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 413);
    let b: Value = resp.json().await.expect("json");
    assert_eq!(b["code"], "payload_too_large");
    // 415: not JSON.
    let (s, b) = send(raw("{}", "text/plain")).await;
    check(s, &b, "unsupported_media_type", 415);
    // 404 also for deploying a version that does not exist.
    let (s, b) = app
        .post(
            OPERATOR,
            "/api/worlds/acme-payments/deployments",
            &json!({"version": 42}),
        )
        .await;
    check(s, &b, "not_found", 404);
    // 422: a draft with problems.
    let (s, b) = app
        .put(
            OPERATOR,
            "/api/worlds/acme-payments/draft",
            &json!({"world": "acme-payments", "actions": []}),
        )
        .await;
    check(s, &b, "invalid_world_model", 422);
    app.stop().await;
}

async fn keys_of_one_world_never_reach_another(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let a_all = app.key(Some("acme-payments"), &Scope::ALL).await;
    let b_all = app.key(Some("globex-support"), &Scope::ALL).await;
    // A decides on A (world from the key), never on B.
    let mut own = green_wire();
    own.as_object_mut().expect("object").remove("world");
    let (s, _) = app.decide(&a_all, &own).await;
    assert_eq!(s, 200);
    let mut other = green_wire();
    other["world"] = json!("globex-support");
    other["action"] = json!("refund.issue");
    let (s, b) = app.decide(&a_all, &other).await;
    assert_eq!((s, b["code"].as_str()), (403, Some("forbidden")));
    // Read, author, deploy on B are all refused for A's key.
    let (s, _) = app.get(Some(&a_all), "/api/worlds/globex-support").await;
    assert_eq!(s, 403);
    let (s, _) = app
        .get(Some(&a_all), "/api/worlds/globex-support/versions/1")
        .await;
    assert_eq!(s, 403);
    let (s, _) = app
        .get(Some(&a_all), "/api/worlds/globex-support/actions")
        .await;
    assert_eq!(s, 403);
    let (s, _) = app
        .post(&a_all, "/api/worlds/globex-support/versions", &json!({}))
        .await;
    assert_eq!(s, 403);
    let (s, _) = app
        .post(
            &a_all,
            "/api/worlds/globex-support/deployments",
            &json!({"version": 1}),
        )
        .await;
    assert_eq!(s, 403);
    let model = load::load_model(&predicates_dir().join("globex-support")).expect("loads");
    let (s, _) = app
        .put(
            &a_all,
            "/api/worlds/globex-support/draft",
            &serde_json::to_value(&model).expect("json"),
        )
        .await;
    assert_eq!(s, 403);
    // The list shows A's key only its own world; B's key only its own.
    let (_, list) = app.get(Some(&a_all), "/api/worlds").await;
    let names: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|w| w["world"].as_str())
        .collect();
    assert_eq!(names, ["acme-payments"]);
    let (_, list) = app.get(Some(&b_all), "/api/worlds").await;
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    // Missing scopes within the own world.
    let decide_only = app.key(Some("acme-payments"), &[Scope::Decide]).await;
    let (s, _) = app
        .get(Some(&decide_only), "/api/worlds/acme-payments")
        .await;
    assert_eq!(s, 403);
    let (s, _) = app
        .post(
            &decide_only,
            "/api/worlds/acme-payments/deployments",
            &json!({"version": 1}),
        )
        .await;
    assert_eq!(s, 403);
    let author = app.key(Some("acme-payments"), &[Scope::Author]).await;
    let (s, _) = app
        .post(
            &author,
            "/api/worlds/acme-payments/deployments",
            &json!({"version": 1}),
        )
        .await;
    assert_eq!(s, 403);
    // An operator key must name the world.
    let (s, b) = app.decide(OPERATOR, &own).await;
    assert_eq!((s, b["code"].as_str()), (400, Some("bad_request")));
    app.stop().await;
}

async fn publish_deploy_rollback(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let deployer = app
        .key(
            Some("acme-payments"),
            &[Scope::Deploy, Scope::Decide, Scope::Read],
        )
        .await;
    let v2 = app.publish_yellow_variant().await;
    let (s, dep) = app
        .post(
            &deployer,
            "/api/worlds/acme-payments/deployments",
            &json!({"version": v2}),
        )
        .await;
    assert_eq!(s, 200, "{dep}");
    assert_eq!(dep["version"], 2);
    let (_, d) = app.decide(&deployer, &green_wire()).await;
    assert_eq!(
        (
            d["status"].as_str(),
            d["decision_metadata"]["world_model_version"].as_u64()
        ),
        (Some("YELLOW"), Some(2))
    );
    // Roll back.
    let (s, _) = app
        .post(
            &deployer,
            "/api/worlds/acme-payments/deployments",
            &json!({"version": 1}),
        )
        .await;
    assert_eq!(s, 200);
    let (_, d) = app.decide(&deployer, &green_wire()).await;
    assert_eq!(
        (
            d["status"].as_str(),
            d["decision_metadata"]["world_model_version"].as_u64()
        ),
        (Some("GREEN"), Some(1))
    );
    let (_, world) = app.get(Some(&deployer), "/api/worlds/acme-payments").await;
    assert_eq!(world["deployed_version"], 1);
    let history: Vec<u64> = world["deployments"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|d| d["version"].as_u64())
        .collect();
    assert_eq!(history, [1, 2, 1]);
    let versions = world["versions"].as_array().map(Vec::len);
    assert_eq!(versions, Some(2));
    app.stop().await;
}

async fn published_versions_are_immutable(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let (_, v1_before) = app
        .get(Some(OPERATOR), "/api/worlds/acme-payments/versions/1")
        .await;
    app.publish_yellow_variant().await;
    let (_, v1_after) = app
        .get(Some(OPERATOR), "/api/worlds/acme-payments/versions/1")
        .await;
    assert_eq!(v1_before, v1_after);
    let (_, v2) = app
        .get(Some(OPERATOR), "/api/worlds/acme-payments/versions/2")
        .await;
    assert_ne!(v1_after["model"], v2["model"]);
    // The unchanged action keeps its module (same content, same hash); the changed one does not.
    let hashes = |v: &Value| -> Vec<String> {
        v["modules"]
            .as_array()
            .expect("modules")
            .iter()
            .map(|m| m[1].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_ne!(hashes(&v1_after)[0], hashes(&v2)[0]);
    assert_eq!(hashes(&v1_after)[1], hashes(&v2)[1]);
    // There is no way to write a version: the routes refuse other methods.
    let resp = app
        .client
        .put(app.url("/api/worlds/acme-payments/versions/1"))
        .bearer_auth(OPERATOR)
        .json(&v2["model"])
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 405);
    app.stop().await;
}

async fn restart_keeps_everything(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let key = app.key(Some("acme-payments"), &Scope::ALL).await;
    let v2 = app.publish_yellow_variant().await;
    app.post(
        &key,
        "/api/worlds/acme-payments/deployments",
        &json!({"version": v2}),
    )
    .await;
    let (_, before) = app.decide(&key, &green_wire()).await;
    app.stop().await;

    let app = TestApp::on(&db).await;
    let (s, after) = app.decide(&key, &green_wire()).await;
    assert_eq!(s, 200, "keys survive a restart: {after}");
    assert_eq!(after["status"], before["status"]);
    assert_eq!(after["decision_metadata"]["world_model_version"], 2);
    assert_eq!(
        after["decision_metadata"]["module_hash"],
        before["decision_metadata"]["module_hash"]
    );
    let (_, world) = app.get(Some(&key), "/api/worlds/acme-payments").await;
    assert_eq!(world["versions"].as_array().map(Vec::len), Some(2));
    // Seeding does not publish the example worlds again.
    let (_, worlds) = app.get(Some(OPERATOR), "/api/worlds").await;
    for w in worlds.as_array().expect("list") {
        if w["world"] != "acme-payments" {
            assert_eq!(w["latest_version"], 1, "{w}");
        }
    }
    app.stop().await;
}

async fn decision_chain_verifies_and_detects_tampering(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let mut red = green_wire();
    red["context"]["sanctions_hit"] = json!(true);
    let mut ids = Vec::new();
    for i in 0..30 {
        let body = if i % 3 == 0 {
            red.clone()
        } else {
            green_wire()
        };
        let (_, d) = app.decide(OPERATOR, &body).await;
        ids.push(
            d["decision_metadata"]["decision_id"]
                .as_str()
                .expect("id")
                .to_string(),
        );
    }
    // A graceful stop writes everything queued.
    app.stop().await;
    let store2 = db.store().await;
    let report = spectral::service::audit::verify(&store2, "acme-payments")
        .await
        .expect("verify");
    assert_eq!(report.records, 30);
    assert_eq!(report.broken, None);
    let records = store2
        .decisions("acme-payments", 0, 100)
        .await
        .expect("records");
    let recorded: Vec<&str> = records
        .iter()
        .map(|r| r.decision.decision_id.as_str())
        .collect();
    assert_eq!(recorded, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(records[0].decision.status, "RED");
    assert!(records[0].decision.caller.starts_with("key_operator_"));
    store2.close().await;

    // Rewrite one record's status behind the service's back.
    // Record 10 (index 9) was RED; it now claims GREEN.
    tamper(&db, &ids[9]).await;
    let store3 = db.store().await;
    let report = spectral::service::audit::verify(&store3, "acme-payments")
        .await
        .expect("verify");
    let broken = report.broken.expect("tampering is detected");
    assert_eq!(broken.seq, 10);
    assert_eq!(broken.decision_id, ids[9]);
    assert!(
        broken
            .reason
            .contains("does not match the record's content"),
        "{}",
        broken.reason
    );
    store3.close().await;

    // Remove the newest three records as well: every remaining link still holds, but the
    // chain now ends before its head.
    truncate_newest(&db, "acme-payments", 3).await;
    let store4 = db.store().await;
    let report = spectral::service::audit::verify(&store4, "acme-payments")
        .await
        .expect("verify");
    let broken = report.broken.expect("the truncation is detected");
    assert_eq!(
        broken.seq, 10,
        "the first break is still the rewritten record"
    );
    store4.close().await;
    untamper(&db, &ids[9]).await;
    let store5 = db.store().await;
    let report = spectral::service::audit::verify(&store5, "acme-payments")
        .await
        .expect("verify");
    assert_eq!(report.records, 27);
    let broken = report.broken.expect("the truncation is detected");
    assert_eq!(broken.seq, 28);
    assert!(
        broken.reason.contains("its head is record 30"),
        "{}",
        broken.reason
    );
    store5.close().await;
}

/// Each kind of tampering, done behind the service's back and then undone, is found by
/// `audit verify` at the record where it was done; between them the chain verifies again. An
/// inserted record is linked and hashed as the service would have: only the chain head, kept
/// apart from the records, gives it away.
async fn audit_verify_detects_a_deleted_a_reordered_and_an_inserted_record(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    for _ in 0..12 {
        let (s, d) = app.decide(OPERATOR, &green_wire()).await;
        assert_eq!(s, 200, "{d}");
    }
    app.stop().await;
    let world = "acme-payments";
    let verify = verify_chain;
    assert_eq!(verify(&db).await.broken, None);
    let (t, pg) = ("decisions", "core.decisions");
    behind_the_service_raw(
        &db,
        &format!("CREATE TABLE saved AS SELECT * FROM {t}"),
        &format!("CREATE TABLE core.saved AS SELECT * FROM {pg}"),
    )
    .await;
    // Deleted: record 5 is gone, so record 6 is met where 5 was expected.
    behind_the_service_raw(
        &db,
        &format!("DELETE FROM {t} WHERE world = '{world}' AND seq = 5"),
        &format!("DELETE FROM {pg} WHERE world = '{world}' AND seq = 5"),
    )
    .await;
    let broken = verify(&db).await.broken.expect("a deletion is detected");
    assert_eq!(broken.seq, 6, "{broken:?}");
    assert!(
        broken.reason.contains("missing or out of order"),
        "{broken:?}"
    );
    restore_saved(&db).await;

    // Reordered: records 3 and 4 swap places, each keeping its own content and hashes.
    for (from, to) in [(3, 1000), (4, 3), (1000, 4)] {
        behind_the_service_raw(
            &db,
            &format!("UPDATE {t} SET seq = {to} WHERE world = '{world}' AND seq = {from}"),
            &format!("UPDATE {pg} SET seq = {to} WHERE world = '{world}' AND seq = {from}"),
        )
        .await;
    }
    let broken = verify(&db).await.broken.expect("a reordering is detected");
    assert_eq!(broken.seq, 3, "{broken:?}");
    assert!(broken.reason.contains("does not match"), "{broken:?}");
    restore_saved(&db).await;

    // Inserted: a record after the newest, with a correct link and a correct hash.
    let store = db.store().await;
    let last = store
        .decisions(world, 11, 1)
        .await
        .expect("records")
        .pop()
        .expect("record 12");
    store.close().await;
    assert_eq!(last.seq, 12);
    let forged = spectral::store::NewDecision {
        decision_id: "forged".into(),
        ..last.decision.clone()
    };
    let hash = spectral::store::chain_hash(&last.hash, 13, &forged).expect("hash");
    let copy = |table: &str| {
        format!(
            "INSERT INTO {table} (seq, world, decision_id, version, action, module_hash, status, \
             matched_rules, caller, correlation_id, context_digest, decided_at, prev_hash, hash) \
             SELECT 13, world, 'forged', version, action, module_hash, status, matched_rules, \
             caller, correlation_id, context_digest, decided_at, prev_hash_of_next, '{hash}' \
             FROM (SELECT *, '{}' AS prev_hash_of_next FROM {table} \
             WHERE world = '{world}' AND seq = 12) AS newest",
            last.hash
        )
    };
    behind_the_service_raw(&db, &copy(t), &copy(pg)).await;
    let report = verify(&db).await;
    let broken = report.broken.expect("an insertion is detected");
    assert_eq!(broken.seq, 13, "{broken:?}");
    assert_eq!(broken.decision_id, "forged");
    assert!(broken.reason.contains("past the chain head"), "{broken:?}");
    restore_saved(&db).await;
}

/// `audit verify` of acme-payments, on a store of its own.
async fn verify_chain(db: &Db) -> spectral::service::audit::Verification {
    let store = db.store().await;
    let report = spectral::service::audit::verify(&store, "acme-payments")
        .await
        .expect("verify");
    store.close().await;
    report
}

/// Put back the records saved in `saved` before the tampering, and check that they verify.
async fn restore_saved(db: &Db) {
    behind_the_service_raw(
        db,
        "DELETE FROM decisions; INSERT INTO decisions SELECT * FROM saved",
        "DELETE FROM core.decisions; INSERT INTO core.decisions SELECT * FROM core.saved",
    )
    .await;
    assert_eq!(verify_chain(db).await.broken, None, "restored");
}

/// Run `sql` (SQLite) or `pg` (Postgres), each one or more statements without arguments,
/// behind the service's back with the append-only triggers out of the way.
async fn behind_the_service_raw(db: &Db, sql: &str, pg: &str) {
    use sqlx::Connection;
    match (db.sqlite_file(), db.postgres_url()) {
        (Some(file), _) => {
            let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display()))
                .await
                .expect("sqlite");
            let sql = format!(
                "DROP TRIGGER IF EXISTS decisions_immutable; \
                 DROP TRIGGER IF EXISTS decisions_undeletable; {sql}"
            );
            sqlx::raw_sql(&sql).execute(&mut c).await.expect(&sql);
        }
        (None, Some(url)) => {
            let mut c = sqlx::PgConnection::connect(url).await.expect("postgres");
            let pg = format!("ALTER TABLE core.decisions DISABLE TRIGGER USER; {pg}");
            sqlx::raw_sql(&pg).execute(&mut c).await.expect(&pg);
        }
        _ => unreachable!(),
    }
}

/// Run `sql` (SQLite form, `?1` the argument) or `pg` (Postgres form, `$1`) behind the
/// service's back, as someone with direct database access would, with the append-only
/// triggers out of the way; how many rows it touched.
async fn behind_the_service(db: &Db, sql: &str, pg: &str, arg: &str) -> u64 {
    use sqlx::Connection;
    match (db.sqlite_file(), db.postgres_url()) {
        (Some(file), _) => {
            let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display()))
                .await
                .expect("sqlite");
            for trigger in ["decisions_immutable", "decisions_undeletable"] {
                sqlx::query(&format!("DROP TRIGGER IF EXISTS {trigger}"))
                    .execute(&mut c)
                    .await
                    .expect("drop trigger");
            }
            let n = sqlx::query(sql).bind(arg).execute(&mut c).await.expect(sql);
            n.rows_affected()
        }
        (None, Some(url)) => {
            let mut c = sqlx::PgConnection::connect(url).await.expect("postgres");
            sqlx::query("ALTER TABLE core.decisions DISABLE TRIGGER USER")
                .execute(&mut c)
                .await
                .expect("disable triggers");
            let n = sqlx::query(pg).bind(arg).execute(&mut c).await.expect(pg);
            n.rows_affected()
        }
        _ => unreachable!(),
    }
}

/// Delete `world`'s newest `n` records.
async fn truncate_newest(db: &Db, world: &str, n: u32) {
    let sql = format!(
        "DELETE FROM decisions WHERE world = ?1 AND seq > (SELECT MAX(seq) - {n} FROM decisions WHERE world = ?1)"
    );
    let pg = format!(
        "DELETE FROM core.decisions WHERE world = $1 AND seq > (SELECT MAX(seq) - {n} FROM core.decisions WHERE world = $1)"
    );
    assert_eq!(behind_the_service(db, &sql, &pg, world).await, u64::from(n));
}

/// Put the record [`tamper`] rewrote back as it was.
async fn untamper(db: &Db, decision_id: &str) {
    let n = behind_the_service(
        db,
        "UPDATE decisions SET status = 'RED' WHERE decision_id = ?1",
        "UPDATE core.decisions SET status = 'RED' WHERE decision_id = $1",
        decision_id,
    )
    .await;
    assert_eq!(n, 1);
}

/// Rewrite one record's status (RED to GREEN) behind the service's back.
async fn tamper(db: &Db, decision_id: &str) {
    let n = behind_the_service(
        db,
        "UPDATE decisions SET status = 'GREEN' WHERE decision_id = ?1",
        "UPDATE core.decisions SET status = 'GREEN' WHERE decision_id = $1",
        decision_id,
    )
    .await;
    assert_eq!(n, 1);
}

async fn openapi_document_describes_the_deployed_actions(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let (s, doc) = app
        .get(Some(OPERATOR), "/api/worlds/acme-payments/actions")
        .await;
    assert_eq!(s, 200, "{doc}");
    assert_eq!(doc["openapi"], "3.1.0");
    let ctx = &doc["components"]["schemas"]["wire_transfer_release_context"];
    assert_eq!(ctx["properties"]["amount"]["type"], "number");
    assert_eq!(ctx["properties"]["payment_method"]["enum"][0], "wire");
    assert_eq!(ctx["properties"]["approvals"]["items"]["type"], "string");
    // System attributes are the service's, not the caller's.
    assert!(ctx["properties"]["request_time"].is_null());
    // Missing evidence is answered 200 YELLOW, not refused: it is named, not `required`.
    assert!(ctx["required"].is_null());
    assert!(ctx["x-spectral-required-evidence"]
        .as_array()
        .expect("required evidence")
        .contains(&json!("sanctions_hit")));
    // An operator key must name the world, so the document requires it.
    let request = &doc["components"]["schemas"]["wire_transfer_release_request"];
    assert!(request["required"]
        .as_array()
        .expect("required")
        .contains(&json!("world")));
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for status in [
        "400", "401", "403", "404", "405", "413", "415", "500", "503",
    ] {
        assert!(
            doc["paths"]["/api/decide"]["post"]["responses"][status].is_object(),
            "{status} is not described"
        );
    }
    crate::openapi::validate(&doc);
    app.stop().await;
}

async fn draft_with_problems_lists_every_one(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let model = load::load_model(&predicates_dir().join("acme-payments")).expect("loads");
    let mut json = serde_json::to_value(&model).expect("json");
    let rules = json["actions"][0]["rules"].as_array_mut().expect("rules");
    rules[0]["predicate"] =
        json!("context.vendor_country in config.embargoed_countries && context.amount > 1");
    rules[1]["id"] = rules[2]["id"].clone();
    rules[3]["cases"][0]["matches"] = json!(false);
    let (s, b) = app
        .put(OPERATOR, "/api/worlds/acme-payments/draft", &json)
        .await;
    assert_eq!(s, 422, "{b}");
    let problems = b["problems"].as_array().expect("problems");
    let text = b.to_string();
    assert!(problems.len() >= 2, "{text}");
    assert!(text.contains("undeclared_input"), "{text}");
    assert!(text.contains("duplicate rule id"), "{text}");
    // Fix the structure; the failing case is reported next.
    let mut json = serde_json::to_value(&model).expect("json");
    json["actions"][0]["rules"][3]["cases"][0]["matches"] = json!(false);
    let (s, b) = app
        .put(OPERATOR, "/api/worlds/acme-payments/draft", &json)
        .await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(b["problems"][0]["at"], "case");
    assert_eq!(b["problems"][0]["rule"], "over-single-payment-cap");
    // Neither bad draft replaced the stored one: it is still the seeded model.
    let stored = db
        .store()
        .await
        .draft("acme-payments")
        .await
        .expect("draft")
        .expect("the seeded draft");
    assert_eq!(stored, serde_json::to_value(&model).expect("json"));
    app.stop().await;
}

/// What users see, snapshotted so that any change to it shows in review.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_of_what_users_see() {
    let db = Db::fresh(Backend::Sqlite).await;
    let app = TestApp::on(&db).await;
    // A YELLOW that does not depend on the clock: a large wire also matches the after-hours
    // rule for half of every day in New York.
    let mut body = green_wire();
    body["context"]["bank_account_changed_days"] = json!(3);
    body["correlation_id"] = json!("abc-123");
    let (_, decision) = app.decide(OPERATOR, &body).await;
    insta::assert_json_snapshot!("decide_response", decision, {
        ".decision_metadata.decision_id" => "[decision id]",
        ".decision_metadata.eval_us" => "[µs]",
    });
    let (_, missing) = app
        .decide(OPERATOR, &json!({"world": "acme-payments", "action": "vendor.onboard", "context": {"vendor_country": 7}}))
        .await;
    insta::assert_json_snapshot!("decide_missing_evidence", missing, {
        ".decision_metadata.decision_id" => "[decision id]",
        ".decision_metadata.eval_us" => "[µs]",
    });
    let (_, error) = app.decide("spk_nope", &body).await;
    insta::assert_json_snapshot!("error_unauthenticated", error);
    let (_, health) = app.admin_get("/health").await;
    insta::assert_json_snapshot!("health", health, {
        ".uptime_s" => "[seconds]",
        ".git_sha" => "[sha]",
        ".version" => "[version]",
        ".features.decision_log.written" => "[count]",
        ".features.decision_log.queue_depth" => "[count]",
        ".features.decision_log.queued_bytes" => "[bytes]",
        ".features.evaluation.busy" => "[count]",
        ".generation" => "[generation]",
        ".features.outbox_rows" => "[rows]",
    });
    app.stop().await;
}

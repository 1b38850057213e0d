//! The MCP server with a real client: the official Python SDK (`mcp`, installed by
//! `scripts/test.sh`) over Streamable HTTP against the running service, in both protocol
//! revisions, and over stdio against `spectral mcp`. Refusals the transport answers before a
//! session exists (key, Origin, session bound) are checked with plain HTTP as well.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};
use spectral::store::Scope;

use crate::app::{green_wire, test_config, Backend, Db, TestApp, OPERATOR};
use crate::support::predicates_dir;

crate::both_backends!(decide_over_mcp_is_decide_over_http);

fn client_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/mcp_client.py")
}

/// Run the Python client with a plan, off the runtime's threads; its answer as JSON.
async fn client(plan: Value) -> Value {
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(client_script())
            .arg(plan.to_string())
            .output()
            .expect("python3 runs (the mcp SDK is installed by scripts/test.sh)")
    })
    .await
    .expect("client task");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "the client's answer is not JSON ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn http_plan(app: &TestApp, key: &str, lifecycle: &str, calls: Value) -> Value {
    json!({
        "transport": "http", "url": app.url("/mcp"), "key": key,
        "lifecycle": lifecycle, "calls": calls
    })
}

fn call(tool: &str, arguments: Value) -> Value {
    json!({"tool": tool, "arguments": arguments})
}

fn red_wire() -> Value {
    let mut red = green_wire();
    red["context"]["sanctions_hit"] = json!(true);
    red
}

/// What must not differ between two answers to the same request.
fn verdict(decision: &Value) -> (Value, Value, Value) {
    (
        decision["status"].clone(),
        decision["work_frame"].clone(),
        decision["decision_metadata"]["matched_rules"].clone(),
    )
}

fn tool<'a>(answer: &'a Value, name: &str) -> &'a Value {
    answer["tools"]
        .as_array()
        .and_then(|tools| tools.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("no tool {name} in {answer}"))
}

/// A tool result's problem: its HTTP status and code.
fn problem(result: &Value) -> (u64, String) {
    assert_eq!(result["isError"], true, "{result}");
    let p = &result["structuredContent"];
    (
        p["status"].as_u64().unwrap_or(0),
        p["code"].as_str().unwrap_or("").to_string(),
    )
}

async fn decide_over_mcp_is_decide_over_http(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = TestApp::on(&db).await;
    let world_key = app
        .key(Some("acme-payments"), &[Scope::Decide, Scope::Read])
        .await;
    let decide_only = app.key(Some("acme-payments"), &[Scope::Decide]).await;
    let read_only = app.key(Some("acme-payments"), &[Scope::Read]).await;
    let other_world = app.key(Some("globex-support"), &Scope::ALL).await;

    let mut ids = Vec::new();
    for lifecycle in ["initialize", "discover"] {
        let mut own = green_wire();
        own.as_object_mut().expect("object").remove("world");
        let answer = client(http_plan(
            &app,
            &world_key,
            lifecycle,
            json!([
                call("spectral.list_actions", json!({})),
                call("spectral.decide", green_wire()),
                call("spectral.decide", red_wire()),
                call("spectral.decide", own),
                call(
                    "spectral.decide",
                    json!({"action": "nope.nothing", "context": {}})
                ),
                call(
                    "spectral.decide",
                    json!({"action": "wire_transfer.release", "context": {}, "colour": "red"})
                ),
            ]),
        ))
        .await;
        assert_eq!(answer["error"], Value::Null, "{answer}");
        let expected = if lifecycle == "initialize" {
            "2025-11-25"
        } else {
            "2026-07-28"
        };
        assert_eq!(answer["protocol"], expected, "{answer}");

        // The tools, described for a model, with the decision's schema as output schema.
        let decide = tool(&answer, "spectral.decide");
        let text = decide["description"].as_str().unwrap_or("");
        assert!(
            text.contains("binding") && text.contains("YELLOW"),
            "{text}"
        );
        assert_eq!(
            decide["outputSchema"]["required"],
            json!(["status", "work_frame", "decision_metadata"])
        );
        assert!(tool(&answer, "spectral.list_actions")["outputSchema"].is_object());

        let results = answer["results"].as_array().expect("results");
        let actions = &results[0]["structuredContent"];
        assert_eq!(actions["world"], "acme-payments", "{actions}");
        let names: Vec<&str> = actions["actions"]
            .as_array()
            .expect("actions")
            .iter()
            .filter_map(|a| a["name"].as_str())
            .collect();
        assert!(names.contains(&"wire_transfer.release"), "{names:?}");
        let schema = &actions["actions"][0]["context_schema"];
        assert_eq!(schema["properties"]["amount"]["type"], "number", "{schema}");

        // The same request over HTTP answers the same status and work frame.
        for (result, body) in [(&results[1], green_wire()), (&results[2], red_wire())] {
            assert_eq!(result["isError"], false, "{result}");
            let over_mcp = &result["structuredContent"];
            let (status, over_http) = app.decide(&world_key, &body).await;
            assert_eq!(status, 200);
            assert_eq!(verdict(over_mcp), verdict(&over_http));
            for d in [over_mcp, &over_http] {
                ids.push(
                    d["decision_metadata"]["decision_id"]
                        .as_str()
                        .expect("id")
                        .to_string(),
                );
            }
        }
        assert_eq!(results[1]["structuredContent"]["status"], "GREEN");
        assert_eq!(results[2]["structuredContent"]["status"], "RED");
        // A world key may leave out its world, as over HTTP.
        assert_eq!(results[3]["structuredContent"]["status"], "GREEN");
        ids.push(
            results[3]["structuredContent"]["decision_metadata"]["decision_id"]
                .as_str()
                .expect("id")
                .to_string(),
        );
        // Errors are the HTTP API's problems, as tool errors the model can read.
        assert_eq!(problem(&results[4]), (404, "not_found".into()));
        assert_eq!(problem(&results[5]), (400, "malformed_request".into()));
        assert!(results[5]["text"].as_str().unwrap_or("").contains("colour"));
    }

    // Wrong scope and another world's key fail as they do over HTTP.
    let answer = client(http_plan(
        &app,
        &decide_only,
        "initialize",
        json!([call("spectral.list_actions", json!({}))]),
    ))
    .await;
    let (status, http) = app
        .get(Some(&decide_only), "/api/worlds/acme-payments/actions")
        .await;
    assert_eq!((status, http["code"].as_str()), (403, Some("forbidden")));
    assert_eq!(problem(&answer["results"][0]), (403, "forbidden".into()));

    for key in [&read_only, &other_world] {
        let answer = client(http_plan(
            &app,
            key,
            "discover",
            json!([call("spectral.decide", green_wire())]),
        ))
        .await;
        let (status, http) = app.decide(key, &green_wire()).await;
        assert_eq!((status, http["code"].as_str()), (403, Some("forbidden")));
        assert_eq!(problem(&answer["results"][0]), (403, "forbidden".into()));
        assert_eq!(
            answer["results"][0]["structuredContent"]["detail"],
            http["detail"]
        );
    }

    // A wrong key gets no further than HTTP: the client cannot even begin.
    let answer = client(http_plan(&app, "spk_not_a_key", "initialize", json!([]))).await;
    assert!(answer["error"].is_string(), "{answer}");
    let resp = raw_initialize(&app, Some("spk_not_a_key"), None).await;
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(
        resp.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    let body: Value = resp.json().await.expect("problem");
    assert_eq!(body["code"], "unauthenticated");

    // Both transports' decisions are in the world's chain, and it verifies.
    app.stop().await;
    let store = db.store().await;
    let report = spectral::service::audit::verify(&store, "acme-payments")
        .await
        .expect("verify");
    assert_eq!(report.broken, None);
    let records = store
        .decisions("acme-payments", 0, 1000)
        .await
        .expect("records");
    let recorded: std::collections::BTreeSet<&str> = records
        .iter()
        .map(|r| r.decision.decision_id.as_str())
        .collect();
    assert_eq!(ids.len(), 10);
    for id in &ids {
        assert!(recorded.contains(id.as_str()), "decision {id} not recorded");
    }
    assert_eq!(report.records as usize, records.len());
    store.close().await;
}

/// An `initialize` of the earlier revision, by hand.
async fn raw_initialize(
    app: &TestApp,
    key: Option<&str>,
    origin: Option<&str>,
) -> reqwest::Response {
    let mut req = app
        .client
        .post(app.url("/mcp"))
        .header("accept", "application/json, text/event-stream")
        .json(&json!({
            "jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "test", "version": "1"}}
        }));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    if let Some(origin) = origin {
        req = req.header("origin", origin);
    }
    req.send().await.expect("sent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_and_session_bounds_are_enforced() {
    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.server.mcp.max_sessions = 2;
    config.server.mcp.allowed_origins = vec!["https://console.example.com".into()];
    let app = TestApp::start(config).await;

    // A browser page from anywhere else is refused, whatever key it carries.
    let resp = raw_initialize(&app, Some(OPERATOR), Some("http://rebound.example:8000")).await;
    assert_eq!(resp.status().as_u16(), 403);
    let body: Value = resp.json().await.expect("problem");
    assert_eq!(body["code"], "origin_not_allowed");
    let resp = raw_initialize(&app, Some(OPERATOR), Some("https://console.example.com")).await;
    assert_eq!(resp.status().as_u16(), 200);
    let first = resp
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .expect("a session")
        .to_string();

    // The second session is the last one; the third is refused and says why.
    let resp = raw_initialize(&app, Some(OPERATOR), None).await;
    assert_eq!(resp.status().as_u16(), 200);
    let resp = raw_initialize(&app, Some(OPERATOR), None).await;
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.expect("problem");
    assert_eq!(body["code"], "too_many_sessions", "{body}");
    let answer = client(http_plan(&app, OPERATOR, "initialize", json!([]))).await;
    // The SDK client is refused at its initialize, too.
    assert!(answer["error"].is_string(), "{answer}");
    // The current revision needs no session and still answers.
    let answer = client(http_plan(
        &app,
        OPERATOR,
        "discover",
        json!([call("spectral.decide", green_wire())]),
    ))
    .await;
    assert_eq!(
        answer["results"][0]["structuredContent"]["status"], "GREEN",
        "{answer}"
    );

    // Another key cannot use a session it did not open.
    let other = app.key(Some("acme-payments"), &Scope::ALL).await;
    let resp = app
        .client
        .delete(app.url("/mcp"))
        .bearer_auth(&other)
        .header("mcp-session-id", &first)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 404);

    // Ending a session makes room for a new one.
    let resp = app
        .client
        .delete(app.url("/mcp"))
        .bearer_auth(OPERATOR)
        .header("mcp-session-id", &first)
        .send()
        .await
        .expect("sent");
    assert!(resp.status().is_success(), "{}", resp.status());
    let resp = raw_initialize(&app, Some(OPERATOR), None).await;
    assert_eq!(resp.status().as_u16(), 200);

    // The API's body limit holds on /mcp too.
    let big = "x".repeat(2 << 20);
    let resp = app
        .client
        .post(app.url("/mcp"))
        .bearer_auth(OPERATOR)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .body(format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"pad\":\"{big}\"}}"
        ))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 413);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_at_their_age() {
    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.server.mcp.max_sessions = 1;
    config.server.mcp.session_max_age = std::time::Duration::from_secs(1);
    let app = TestApp::start(config).await;
    let resp = raw_initialize(&app, Some(OPERATOR), None).await;
    assert_eq!(resp.status().as_u16(), 200);
    let id = resp
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .expect("a session")
        .to_string();
    assert_eq!(
        raw_initialize(&app, Some(OPERATOR), None)
            .await
            .status()
            .as_u16(),
        503
    );
    // Past its age the session is gone and its place is free: a clock must pass, so polled.
    crate::support::eventually(
        std::time::Duration::from_secs(10),
        "the session aging out",
        || async {
            let resp = raw_initialize(&app, Some(OPERATOR), None).await;
            (resp.status().as_u16() == 200).then_some(())
        },
    )
    .await;
    let resp = app
        .client
        .post(app.url("/mcp"))
        .bearer_auth(OPERATOR)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &id)
        .header("mcp-protocol-version", "2025-11-25")
        .json(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 404);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_serves_the_same_tools_offline() {
    let dir = predicates_dir().join("acme-payments");
    let answer = client(json!({
        "transport": "stdio",
        "command": env!("CARGO_BIN_EXE_spectral"),
        "args": ["mcp", "--world", dir],
        "calls": [
            call("spectral.list_actions", json!({})),
            call("spectral.decide", green_wire()),
            call("spectral.decide", red_wire()),
            call("spectral.decide", json!({"world": "globex-support", "action": "wire_transfer.release", "context": {}})),
        ]
    }))
    .await;
    assert_eq!(answer["error"], Value::Null, "{answer}");
    let names: Vec<&str> = answer["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["spectral.decide", "spectral.list_actions"]);
    let results = answer["results"].as_array().expect("results");
    assert_eq!(results[0]["structuredContent"]["world"], "acme-payments");

    // The same decisions the service makes for these requests.
    let db = Db::fresh(Backend::Sqlite).await;
    let app = TestApp::on(&db).await;
    for (result, body) in [(&results[1], green_wire()), (&results[2], red_wire())] {
        let (status, over_http) = app.decide(OPERATOR, &body).await;
        assert_eq!(status, 200);
        assert_eq!(verdict(&result["structuredContent"]), verdict(&over_http));
    }
    assert_eq!(problem(&results[3]), (404, "not_found".into()));
    app.stop().await;
}

//! Validation of OpenAPI documents with a real validator (`openapi-spec-validator`, which
//! `scripts/test.sh` installs when it is missing).

use std::process::Command;

use serde_json::Value;

/// Fail the test unless `doc` is a valid OpenAPI 3.1 document.
pub fn validate(doc: &Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(doc).expect("json")).expect("write");
    let out = Command::new("python3")
        .args(["-m", "openapi_spec_validator", "--schema", "3.1"])
        .arg(&file)
        .output()
        .expect("python3 runs (the validator is installed by scripts/test.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "invalid OpenAPI document:\n{text}");
    assert!(text.contains("OK"), "{text}");
}

#[test]
fn the_validator_rejects_a_broken_document() {
    // Guards the guard: a document without `info` must not pass.
    let doc = serde_json::json!({"openapi": "3.1.0", "paths": {}});
    let result = std::panic::catch_unwind(|| validate(&doc));
    assert!(result.is_err());
}

/// Run schemathesis with all its checks, bounded in examples and time, against a document
/// and a service on loopback; the failures it reports, or `None`.
pub fn schemathesis(doc: &Value, base: &str, key: &str) -> Option<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(doc).expect("json")).expect("write");
    let config =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/schemathesis.toml");
    let out = Command::new("schemathesis")
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(&file)
        .args(["--url", base, "--checks", "all", "--max-examples", "20"])
        .args(["--request-timeout", "10", "--no-color"])
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .current_dir(dir.path())
        .output()
        .expect("schemathesis runs (it is installed by scripts/test.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tested = text.contains("Test cases:") && text.contains(" passed");
    if out.status.success() && tested {
        None
    } else {
        Some(text)
    }
}

/// The service on loopback without the workers, so that the webhooks and deployments the
/// fuzzer creates deliver nothing anywhere.
async fn api_alone() -> (crate::app::Db, spectral::supervisor::Running) {
    let db = crate::app::Db::fresh(crate::app::Backend::Sqlite).await;
    let config = crate::app::test_config(&db);
    let listener = tokio::net::TcpListener::bind(config.server.addr)
        .await
        .expect("bind");
    let running =
        spectral::supervisor::start_mode(config, listener, spectral::supervisor::Mode::Api)
            .await
            .unwrap_or_else(|e| panic!("service did not start: {e}"));
    (db, running)
}

async fn get(base: &str, path: &str, key: Option<&str>) -> Value {
    let mut req = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.expect("sent");
    assert_eq!(resp.status().as_u16(), 200, "{path}");
    resp.json().await.expect("json")
}

/// Off the runtime's threads: the service under test runs on them.
async fn fuzz(doc: Value, base: String) -> Option<String> {
    let started = std::time::Instant::now();
    let title = doc["info"]["title"].to_string();
    let report =
        tokio::task::spawn_blocking(move || schemathesis(&doc, &base, crate::app::OPERATOR))
            .await
            .expect("schemathesis task");
    eprintln!("schemathesis on {title}: {:?}", started.elapsed());
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_passes_every_document() {
    let (_db, running) = api_alone().await;
    let base = format!("http://{}", running.addr);
    let mut failures = Vec::new();
    for dir in crate::support::example_worlds() {
        let world = dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string();
        let doc = get(
            &base,
            &format!("/api/worlds/{world}/actions"),
            Some(crate::app::OPERATOR),
        )
        .await;
        validate(&doc);
        if let Some(report) = fuzz(doc, base.clone()).await {
            failures.push(format!("actions of {world}:\n{report}"));
        }
    }
    let doc = get(&base, "/api/openapi.json", None).await;
    validate(&doc);
    let paths: Vec<&String> = doc["paths"].as_object().expect("paths").keys().collect();
    for path in [
        "/api/decide",
        "/api/decide/batch",
        "/api/worlds/{world}/draft",
        "/api/worlds/{world}/versions",
        "/api/worlds/{world}/deployments",
        "/api/worlds/{world}/stats",
        "/api/worlds/{world}/webhooks",
    ] {
        assert!(paths.iter().any(|p| *p == path), "{path} is not described");
    }
    if let Some(report) = fuzz(doc, base.clone()).await {
        failures.push(format!("/api/openapi.json:\n{report}"));
    }
    running.shutdown().await;
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_a_document_that_lies() {
    // Guards the guard: the old actions document marked evidence `required`, though a
    // context without it is answered 200 YELLOW. schemathesis must catch that.
    let (_db, running) = api_alone().await;
    let base = format!("http://{}", running.addr);
    let mut doc = get(
        &base,
        "/api/worlds/acme-payments/actions",
        Some(crate::app::OPERATOR),
    )
    .await;
    let request = &mut doc["components"]["schemas"]["wire_transfer_release_request"];
    request["properties"]["context"] =
        serde_json::json!({"$ref": "#/components/schemas/wire_transfer_release_context"});
    let context = &mut doc["components"]["schemas"]["wire_transfer_release_context"];
    context["required"] = context["x-spectral-required-evidence"].clone();
    let report = fuzz(doc, base).await;
    running.shutdown().await;
    let report = report.expect("schemathesis reports the lie");
    assert!(
        report.contains("Schema-violating request accepted"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_is_a_whole_number_as_json_schema_has_it() {
    let (_db, running) = api_alone().await;
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();
    let send = |path: &str, body: Value| {
        client
            .post(format!("{base}{path}"))
            .bearer_auth(crate::app::OPERATOR)
            .json(&body)
            .send()
    };
    let mut decide = crate::app::green_wire();
    for (version, status) in [
        (serde_json::json!(1), 200),
        (serde_json::json!(1.0), 200),
        (serde_json::json!(1876718119723103.0), 404),
        (serde_json::json!(1.5), 400),
        (serde_json::json!(-1), 400),
        (serde_json::json!("1"), 400),
    ] {
        decide["world_model_version"] = version.clone();
        let resp = send("/api/decide", decide.clone()).await.expect("sent");
        assert_eq!(resp.status().as_u16(), status, "decide pinned to {version}");
        let resp = send(
            "/api/worlds/acme-payments/deployments",
            serde_json::json!({ "version": version }),
        )
        .await
        .expect("sent");
        assert_eq!(resp.status().as_u16(), status, "deploy {version}");
    }
    running.shutdown().await;
}

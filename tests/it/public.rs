//! The public port tells strangers nothing about tenants: the public `/health` keeps what
//! the deploy gate needs, the detailed one and `/metrics` live on the admin listener, 5xx
//! bodies carry an error id and never a cause; `HEAD` is answered wherever `GET` is; a slow
//! body gets 408 (docs/operations.md, "Public and admin ports").

use std::time::Duration;

use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::app::{green_wire, test_config, Backend, Db, TestApp, OPERATOR};
use crate::db;
use crate::support::{example_worlds, predicates_dir, Process};

/// The names of the seeded example worlds: what a stranger must never read.
fn world_names() -> Vec<String> {
    example_worlds()
        .iter()
        .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(String::from))
        .collect()
}

async fn text(client: &reqwest::Client, url: &str) -> (u16, String) {
    let resp = client.get(url).send().await.expect("sent");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_client_finds_no_world_name_count_or_error_text() {
    let db = Db::fresh(Backend::Sqlite).await;
    let app = TestApp::on(&db).await;
    let (s, _) = app.decide(OPERATOR, &green_wire()).await;
    assert_eq!(s, 200);
    let names = world_names();
    assert_eq!(names.len(), 3, "{names:?}");
    // Every unauthenticated endpoint but the OpenAPI document, which is the same static
    // description of the API for every deployment.
    let mut paths = vec![
        "/health".to_string(),
        "/version".into(),
        "/metrics".into(),
        "/api/worlds".into(),
    ];
    for name in &names {
        paths.push(format!("/api/worlds/{name}"));
        paths.push(format!("/api/worlds/{name}/stats"));
    }
    for path in &paths {
        let (status, body) = text(&app.client, &app.url(path)).await;
        for name in &names {
            assert!(
                !body.contains(name.as_str()),
                "{path} ({status}) names {name}: {body}"
            );
        }
        for word in [
            "decisions",
            "loaded",
            "queue_depth",
            "written",
            "outbox_rows",
        ] {
            assert!(
                !body.contains(word),
                "{path} ({status}) shows {word}: {body}"
            );
        }
    }
    let (status, _) = text(&app.client, &app.url("/metrics")).await;
    assert_eq!(status, 404, "/metrics is served on the admin listener only");

    let (status, health) = app.get(None, "/health").await;
    assert_eq!(status, 200, "{health}");
    insta::assert_json_snapshot!("public_health", health, {
        ".uptime_s" => "[seconds]",
        ".git_sha" => "[sha]",
        ".version" => "[version]",
        ".generation" => "[generation]",
    });
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_the_detailed_health_and_metrics() {
    let db = Db::fresh(Backend::Sqlite).await;
    let app = TestApp::on(&db).await;
    let admin = app.running.as_ref().map(|r| r.admin_addr).expect("running");
    assert!(admin.ip().is_loopback(), "{admin}");
    app.decide(OPERATOR, &green_wire()).await;
    let (status, health) = app.admin_get("/health").await;
    assert_eq!(status, 200, "{health}");
    for name in world_names() {
        assert_eq!(
            health["features"]["worlds"]["loaded"][&name], 1,
            "{name}: {health}"
        );
    }
    let (status, metrics) = app.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap_or("");
    assert!(
        metrics.contains("spectral_decisions_total") && metrics.contains("acme-payments"),
        "{metrics}"
    );
    // The admin listener serves nothing else: no API on it.
    let resp = app
        .client
        .post(format!("{}/api/decide", app.admin))
        .bearer_auth(OPERATOR)
        .json(&green_wire())
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 404);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_answered_wherever_get_is() {
    let db = Db::fresh(Backend::Sqlite).await;
    let app = TestApp::on(&db).await;
    let head = |path: &str, key: Option<&str>| {
        let mut req = app.client.head(app.url(path));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send()
    };
    let resp = head("/health", None).await.expect("sent");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let length: usize = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("content-length");
    assert!(length > 0);
    assert!(resp.bytes().await.expect("body").is_empty());
    let (status, _) = app.get(None, "/health").await;
    assert_eq!(status, 200);

    let resp = head("/api/worlds", Some(OPERATOR)).await.expect("sent");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.bytes().await.expect("body").is_empty());
    // The same refusal as GET: unauthenticated, 401.
    let resp = head("/api/worlds", None).await.expect("sent");
    assert_eq!(resp.status().as_u16(), 401);
    // Not where GET is not: a POST route.
    let resp = head("/api/decide", None).await.expect("sent");
    assert_eq!(resp.status().as_u16(), 405);
    let resp = app
        .client
        .post(app.url("/health"))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 405);
    assert_eq!(
        resp.headers().get("allow").and_then(|v| v.to_str().ok()),
        Some("GET, HEAD")
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_gets_408_with_a_problem_document() {
    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.server.header_timeout = Duration::from_millis(500);
    config.server.request_timeout = Duration::from_secs(60);
    let app = TestApp::start(config).await;
    let mut conn = TcpStream::connect(app.addr()).await.expect("connect");
    let head = format!(
        "POST /api/decide HTTP/1.1\r\nhost: spectral\r\nauthorization: Bearer {OPERATOR}\r\n\
         content-type: application/json\r\ncontent-length: 200\r\n\r\n{{\"world\""
    );
    conn.write_all(head.as_bytes()).await.expect("write");
    // The rest of the body never comes; the answer does, and well before the request
    // timeout (the read is bounded by the test's own limit only).
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n")
                        && String::from_utf8_lossy(&answer).contains("body_timeout")
                    {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to a slow body");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("\"code\":\"body_timeout\""), "{answer}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_answers_503_with_an_error_id_the_log_carries_and_no_cause() {
    let db = db::fresh_postgres().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("DATABASE_URL", db.url().to_string()),
        ("SPECTRAL_LOG_FORMAT", "json".into()),
        ("SPECTRAL_LOG", "info".into()),
        ("SPECTRAL_ADDR", "127.0.0.1:0".into()),
        ("SPECTRAL_OPERATOR_KEY", OPERATOR.into()),
        ("SPECTRAL_SEED_DIR", predicates_dir().display().to_string()),
    ];
    let mut api = Process::spawn(&["serve"], &env, dir.path());
    let base = api.ready().await;
    // Break the store under the service: the world listing's table is gone.
    let mut conn = PgConnection::connect(db.url()).await.expect("connect");
    sqlx::raw_sql("ALTER TABLE core.world_versions RENAME TO world_versions_gone")
        .execute(&mut conn)
        .await
        .expect("rename");
    let resp = reqwest::Client::new()
        .get(format!("{base}/api/worlds"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 503);
    let body = resp.text().await.expect("body");
    let problem: Value = serde_json::from_str(&body).expect("problem+json");
    assert_eq!(problem["code"], "unavailable", "{problem}");
    assert_eq!(
        problem["detail"], "the store is unavailable; retry shortly",
        "{problem}"
    );
    for leak in ["world_versions", "relation", "database", "error returned"] {
        assert!(!body.contains(leak), "the body leaks '{leak}': {body}");
    }
    let id = problem["error_id"].as_str().expect("error_id").to_string();
    assert!(
        id.len() == 36 && id.starts_with("err_") && id[4..].chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    // The log line with the same id has the cause.
    let line = api
        .printed("the failure's log line", |line| {
            let v: Value = serde_json::from_str(line).ok()?;
            (v["error_id"] == id.as_str()).then_some(v)
        })
        .await;
    assert!(
        line["error"]
            .as_str()
            .is_some_and(|e| e.contains("world_versions")),
        "{line}"
    );
    api.terminate(Duration::from_secs(30)).await;
    drop(dir);
}

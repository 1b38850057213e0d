//! Hostile and broken clients at the connection level: slow headers, idle connections past
//! the limit. Each is cut off or shed, and the server keeps answering everyone else.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::app::{green_wire, test_config, Backend, Db, TestApp, OPERATOR};
use crate::support::eventually;

/// Read until the server closes the connection; return what it sent.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&out).into_owned()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.server.header_timeout = Duration::from_millis(300);
    let app = TestApp::start(config).await;
    let mut slow = TcpStream::connect(app.addr()).await.expect("connect");
    slow.write_all(b"POST /api/decide HTTP/1.1\r\nHost: spectral\r\nContent-Type: appl")
        .await
        .expect("write");
    // Everyone else is served meanwhile.
    let (s, _) = app.decide(OPERATOR, &green_wire()).await;
    assert_eq!(s, 200);
    let started = Instant::now();
    let sent = read_to_close(&mut slow, Duration::from_secs(10)).await;
    let sent = sent.expect("the server closed the slow connection");
    assert!(
        sent.is_empty() || sent.starts_with("HTTP/1.1 408"),
        "{sent}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // On a new connection: the pooled one of the decide above was idle for as long as the
    // header timeout, which also ends idle keep-alive connections, and reusing it would race
    // the server closing it.
    let health = reqwest::Client::new()
        .get(format!("{}/health", app.base))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status().as_u16(), 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_limit_are_shed_and_reclaimed() {
    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.server.max_connections = 5;
    config.server.header_timeout = Duration::from_millis(1500);
    // Nothing is idle long enough to be closed for a newcomer: the limit itself is tested.
    config.server.connections.evict_idle_after = Duration::from_secs(600);
    let app = TestApp::start(config).await;
    // One client with a keep-alive connection, in use before the flood.
    let (s, _) = app.decide(OPERATOR, &green_wire()).await;
    assert_eq!(s, 200);
    // Four idle connections take the rest of the limit.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(app.addr()).await.expect("connect"));
    }
    // Give the server a moment to accept them all: it accepts in order, so once a fifth
    // connection is shed, the four are being held.
    let shed = eventually(
        Duration::from_secs(10),
        "a connection past the limit answered 503",
        || async {
            let mut extra = TcpStream::connect(app.addr()).await.expect("connect");
            extra
                .write_all(b"GET /health HTTP/1.1\r\nHost: spectral\r\n\r\n")
                .await
                .expect("write");
            let answer = read_to_close(&mut extra, Duration::from_secs(5))
                .await
                .unwrap_or_default();
            answer.starts_with("HTTP/1.1 503").then_some(answer)
        },
    )
    .await;
    assert!(shed.contains("too_many_connections"), "{shed}");
    assert!(shed.contains("application/problem+json"), "{shed}");
    // The client that was already connected keeps being answered.
    let (s, _) = app.decide(OPERATOR, &green_wire()).await;
    assert_eq!(s, 200);
    // Idle connections are closed after the header timeout, and new clients get in again.
    let started = Instant::now();
    for conn in idle.iter_mut() {
        let closed = read_to_close(conn, Duration::from_secs(10)).await;
        assert!(closed.is_some(), "an idle connection was never closed");
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    let fresh = reqwest::Client::new();
    let resp = fresh.get(app.url("/health")).send().await.expect("sent");
    assert_eq!(resp.status().as_u16(), 200);
    let (_, metrics) = app.admin_get("/metrics").await;
    let text = metrics.as_str().unwrap_or("").to_string();
    let shed_count = text
        .lines()
        .find(|l| l.starts_with("spectral_connections_shed_total "))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(shed_count >= 1, "{text}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_decisions_and_errors() {
    let db = Db::fresh(Backend::Sqlite).await;
    let app = TestApp::on(&db).await;
    let mut red = green_wire();
    red["context"]["sanctions_hit"] = serde_json::json!(true);
    app.decide(OPERATOR, &green_wire()).await;
    app.decide(OPERATOR, &red).await;
    app.decide("spk_wrong", &red).await;
    let resp = app
        .client
        .get(format!("{}/metrics", app.admin))
        .send()
        .await
        .expect("sent");
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = resp.text().await.expect("text");
    for line in [
        "spectral_decisions_total{status=\"GREEN\",world=\"acme-payments\"} 1",
        "spectral_decisions_total{status=\"RED\",world=\"acme-payments\"} 1",
        "spectral_http_responses_total{class=\"2xx\",route=\"decide\"} 2",
        "spectral_http_responses_total{class=\"4xx\",route=\"decide\"} 1",
        "spectral_http_request_duration_seconds_count{route=\"decide\"} 3",
        "spectral_cache_loads_total{result=\"ok\"} 3",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert!(text.contains("spectral_decision_log_queue_depth"));
    assert!(text.contains("spectral_decision_log_dropped_total 0"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_is_served() {
    let db = Db::fresh(Backend::Sqlite).await;
    let app = TestApp::on(&db).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let resp = h2
        .post(app.url("/api/decide"))
        .bearer_auth(OPERATOR)
        .json(&green_wire())
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status().as_u16(), 200);
    let d: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(d["status"], "GREEN");
    app.stop().await;
}

/// `n` green decisions in one batch request.
async fn decide_green_batch(app: &TestApp, n: usize) {
    let requests: Vec<serde_json::Value> = (0..n).map(|_| green_wire()).collect();
    let (s, out) = app
        .post(
            OPERATOR,
            "/api/decide/batch",
            &serde_json::json!({"requests": requests}),
        )
        .await;
    assert_eq!(s, 200, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_log_that_cannot_keep_up_drops_and_counts_it() {
    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.decision_log.capacity = 1;
    config.decision_log.overflow = spectral::config::Overflow::Drop;
    let app = TestApp::start(config).await;
    decide_green_batch(&app, 100).await;
    let (_, health) = app.admin_get("/health").await;
    let log = &health["features"]["decision_log"];
    assert_eq!(log["overflow"], "drop");
    let dropped = log["dropped"].as_u64().unwrap_or(0);
    assert!(
        dropped > 0,
        "a one-slot queue behind a database cannot take 100 at once: {log}"
    );
    let (_, metrics) = app.admin_get("/metrics").await;
    assert!(
        metrics
            .as_str()
            .unwrap_or("")
            .contains(&format!("spectral_decision_log_dropped_total {dropped}")),
        "{metrics}"
    );
    // Every decision is either written or counted as dropped: nothing vanishes silently.
    app.stop().await;
    let store2 = db.store().await;
    let written = store2
        .decisions("acme-payments", 0, 1000)
        .await
        .expect("records")
        .len() as u64;
    assert_eq!(written + dropped, 100);
    store2.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_log_commits_what_arrives_within_its_linger_as_one_batch() {
    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = test_config(&db);
    // Long enough that 30 decisions of one request, and the health check after them, all
    // come within it even on a slow machine.
    config.decision_log.linger = Duration::from_secs(5);
    let app = TestApp::start(config).await;
    decide_green_batch(&app, 30).await;
    let written = |health: &serde_json::Value| {
        health["features"]["decision_log"]["written"]
            .as_u64()
            .unwrap_or(0)
    };
    let (_, health) = app.admin_get("/health").await;
    assert_eq!(written(&health), 0, "still lingering: {health}");
    eventually(Duration::from_secs(30), "30 records written", || async {
        let (_, health) = app.admin_get("/health").await;
        (written(&health) == 30).then_some(())
    })
    .await;
    let store = db.store().await;
    let recorded: Vec<_> = store
        .outbox_list(None, None, 1000)
        .await
        .expect("outbox rows")
        .into_iter()
        .filter(|r| r.event_type == spectral::store::events::DECISION_RECORDED)
        .collect();
    assert_eq!(recorded.len(), 1, "one commit: {recorded:?}");
    assert_eq!(recorded[0].payload["first_seq"], 1);
    assert_eq!(recorded[0].payload["last_seq"], 30);
    assert_eq!(
        recorded[0].payload["counts"][0],
        serde_json::json!({"rule": "*", "status": "GREEN", "count": 30})
    );
    store.close().await;
    app.stop().await;
}

//! Connections cannot be hoarded: HTTP/2 connections that only answer PINGs and silent HTTP/1
//! sockets, a thousand of them, leave room for a new client; an idle HTTP/2 connection is
//! closed after the idle timeout; one client address holds at most its share.
//!
//! The connection handling never touches the store, so these run on SQLite alone.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::app::{test_config, Backend, Db, TestApp};
use crate::support::eventually;

/// Hoarders in each of the flood tests: the figure, as many as the global limit.
const HOARDERS: usize = 1024;

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

/// An HTTP/2 connection (prior knowledge, no TLS) whose driver answers the server's PINGs
/// until the server closes it; the driver's task ends then.
async fn h2_connection(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("an HTTP/2 handshake");
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, driver)
}

/// `GET /health` on an HTTP/2 connection; its status.
async fn h2_health(
    send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
) -> Option<u16> {
    let req = http::Request::get(format!("http://{addr}/health"))
        .body(Empty::new())
        .expect("request");
    send.ready().await.ok()?;
    let resp = send.send_request(req).await.ok()?;
    Some(resp.status().as_u16())
}

/// `GET /health` over HTTP/1.1 on `stream`: the head of the answer, up to its blank line.
async fn h1_health(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: spectral\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A new client's `GET /health` on a new connection, with a fresh client: its status, or
/// `None` when it got no answer within a second.
async fn newcomer(app: &TestApp) -> Option<u16> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let sent = client.get(app.url("/health")).send();
    match tokio::time::timeout(Duration::from_secs(1), sent).await {
        Ok(Ok(resp)) => Some(resp.status().as_u16()),
        _ => None,
    }
}

/// A server whose hoarders are not cut off by the idle timeout while the test runs, and
/// whose one client address may take the whole limit: only eviction can let a newcomer in.
fn hoarded_config(db: &Db) -> spectral::config::Config {
    let mut config = test_config(db);
    config.server.max_connections = HOARDERS;
    config.server.connections.per_ip = HOARDERS * 4;
    config.server.connections.idle_timeout = Duration::from_secs(600);
    // The server PINGs every header timeout; the hoarders answer.
    config.server.header_timeout = Duration::from_millis(500);
    config.server.connections.evict_idle_after = Duration::from_millis(0);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_http2_connections_that_answer_pings_do_not_lock_out_a_new_client() {
    let db = Db::fresh(Backend::Sqlite).await;
    let app = TestApp::start(hoarded_config(&db)).await;
    let addr = app.addr();
    // Every hoarder is served once, so each holds a permit, then stays open answering PINGs.
    let mut hoarders = Vec::with_capacity(HOARDERS);
    for _ in 0..HOARDERS {
        let (mut send, driver) = h2_connection(addr).await;
        let status = h2_health(&mut send, addr).await;
        hoarders.push((send, driver, status));
    }
    // Near the limit the idlest are closed as new hoarders come, so most, not all, are served.
    let served = hoarders.iter().filter(|h| h.2 == Some(200)).count();
    assert!(served >= HOARDERS / 2, "only {served} hoarders were served");
    // A server PING round has passed: the hoarders still open answered it.
    let open = hoarders.iter().filter(|h| !h.1.is_finished()).count();
    assert!(open > HOARDERS / 2, "only {open} hoarders are open");
    assert_eq!(newcomer(&app).await, Some(200));
    assert!(
        metric(
            &app,
            "spectral_connections_closed_idle_total{reason=\"evicted\"}"
        )
        .await
            >= 1
    );
    drop(hoarders);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_silent_http1_sockets_do_not_lock_out_a_new_client() {
    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = hoarded_config(&db);
    // Silent sockets are cut off after the header timeout; long enough here that only
    // eviction can make room.
    config.server.header_timeout = Duration::from_secs(600);
    let app = TestApp::start(config).await;
    let mut silent = Vec::with_capacity(HOARDERS);
    for _ in 0..HOARDERS {
        silent.push(TcpStream::connect(app.addr()).await.expect("connect"));
    }
    // The server accepts in order: once one more connection is answered, all the silent
    // ones before it have been taken in and hold permits.
    let mut probe = TcpStream::connect(app.addr()).await.expect("connect");
    let head = h1_health(&mut probe).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(probe);
    assert_eq!(newcomer(&app).await, Some(200));
    assert!(
        metric(
            &app,
            "spectral_connections_closed_idle_total{reason=\"evicted\"}"
        )
        .await
            >= 1
    );
    drop(silent);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_that_only_answers_pings_is_closed_after_the_idle_timeout() {
    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = test_config(&db);
    // PINGs every 100 ms, answered; idle after one request for 800 ms: closed.
    config.server.header_timeout = Duration::from_millis(100);
    config.server.connections.idle_timeout = Duration::from_millis(800);
    let app = TestApp::start(config).await;
    let (mut send, driver) = h2_connection(app.addr()).await;
    assert_eq!(h2_health(&mut send, app.addr()).await, Some(200));
    // The client's driver ends only when the server closes the connection.
    tokio::time::timeout(Duration::from_secs(20), driver)
        .await
        .expect("the idle HTTP/2 connection was closed")
        .expect("the driver ended");
    assert!(
        metric(
            &app,
            "spectral_connections_closed_idle_total{reason=\"timeout\"}"
        )
        .await
            >= 1
    );
    // A request in flight keeps its connection: a new connection is served as usual.
    let (mut send, _driver) = h2_connection(app.addr()).await;
    assert_eq!(h2_health(&mut send, app.addr()).await, Some(200));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_share_while_another_is_served() {
    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = test_config(&db);
    const CAP: usize = 4;
    config.server.connections.per_ip = CAP;
    let app = TestApp::start(config).await;
    // CAP keep-alive connections from 127.0.0.1, each served and kept open.
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut stream = TcpStream::connect(app.addr()).await.expect("connect");
        let head = h1_health(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        held.push(stream);
    }
    // The next from the same address is refused with a problem and closed.
    // The answer comes at once, before any request.
    let mut extra = TcpStream::connect(app.addr()).await.expect("connect");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), extra.read_to_string(&mut answer))
        .await
        .expect("the refused connection was closed")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("too_many_connections_from_address"),
        "{answer}"
    );
    // 127.0.0.2 is loopback too: another client address, served.
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("address"))
        .expect("bind 127.0.0.2");
    let mut other = socket.connect(app.addr()).await.expect("connect");
    let head = h1_health(&mut other).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Those already connected keep being served; the metric counted the refusal (the admin
    // listener is another listener, with its own share).
    let head = h1_health(&mut held[0]).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(metric(&app, "spectral_connections_refused_per_address_total").await >= 1);
    // A closed connection gives its share back.
    drop(held.pop());
    let head = eventually(
        Duration::from_secs(10),
        "a freed share is reused",
        || async {
            let mut again = TcpStream::connect(app.addr()).await.expect("connect");
            let head = h1_health(&mut again).await;
            head.starts_with("HTTP/1.1 200").then_some(head)
        },
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    app.stop().await;
}

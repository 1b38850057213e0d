//! The HTTP ceiling for `bench/http.sh`: a raw hyper 1.x server that reads each request's
//! body and answers 200 with a small fixed JSON body, on the same runtime shape and
//! connection settings as `spectral serve`.
//!
//! Usage: `cargo run --release --example hello -- [ADDR | PORT]` (or `HELLO_ADDR`); default
//! `127.0.0.1:8088`, a bare port listens on 127.0.0.1. It runs until killed.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark helper, not service code: failing to bind or start is a plain crash"
)]

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const BODY: &[u8] = br#"{"status":"GREEN","hello":"world"}"#;
/// A bound on the body read, like spectral's `SPECTRAL_MAX_BODY_BYTES`.
const MAX_BODY: usize = 1 << 20;

fn main() {
    let addr = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("HELLO_ADDR").ok())
        .unwrap_or_else(|| "127.0.0.1:8088".to_string());
    // A bare port means that port on the loopback address.
    let addr = if addr.chars().all(|c| c.is_ascii_digit()) {
        format!("127.0.0.1:{addr}")
    } else {
        addr
    };
    // The same shape as `spectral serve` (src/cli.rs `runtime`): a multi-thread runtime
    // with default worker count (one per CPU this process may run on).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hello-api")
        .build()
        .expect("cannot start the async runtime");
    runtime.block_on(serve(&addr));
}

async fn serve(addr: &str) {
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
    eprintln!("hello listening on {}", listener.local_addr().unwrap());
    // The connection settings of src/http.rs `serve`.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(10)));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection(TokioIo::new(stream), service_fn(handle))
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the whole body, as the decide handler must; the answer is 200 regardless.
    let _ = Limited::new(req.into_body(), MAX_BODY).collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

//! The HTTP load generator of `bench/http.sh`: keep-alive HTTP/1.1 connections to a server
//! on 127.0.0.1 (one connection per worker), closed loop or at a fixed, evenly paced rate,
//! every latency in an HdrHistogram; prints one JSON line of results.
//!
//! Closed loop (default): each connection sends its next request as soon as the previous
//! answer has been read, which measures the maximum throughput. With `--rate R` the run is
//! open loop: request `i` of connection `k` is due at `start + (i·c + k)/R`, and its latency
//! is measured from that due time, not from when it was sent, so a server stall shows up in
//! the tail instead of silently slowing the client down (no coordinated omission).
//!
//! Only the measurement window (after `--warmup`) is counted: a request counts when it was
//! due (open loop) or sent (closed loop) inside the window and its answer arrived.
//!
//! Example:
//! `loadgen --url http://127.0.0.1:8000/api/decide -X POST --body-file ctx.json
//!  -H 'authorization: Bearer …' -c 32 --duration 10 --warmup 2 [--rate 20000]`

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark tool, not service code: bad arguments and setup failures end it at once"
)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use http::{HeaderMap, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The longest run accepted, warm-up included: the tool always stops by itself.
const MAX_RUN: Duration = Duration::from_secs(3600);
/// Largest latency the histograms hold (ns); longer ones are clamped to it.
const MAX_LATENCY_NS: u64 = 60_000_000_000;
/// When an open-loop worker is this close to its next due time it stops sleeping on the
/// runtime's timer (1 ms granularity) and yields until the time comes.
const SPIN_WINDOW: Duration = Duration::from_micros(1500);

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "HTTP/1.1 keep-alive load generator for 127.0.0.1"
)]
struct Args {
    /// Target, e.g. http://127.0.0.1:8000/api/decide (the host must be 127.0.0.1).
    #[arg(long)]
    url: String,
    /// HTTP method.
    #[arg(short = 'X', long, default_value = "GET")]
    method: String,
    /// Request body.
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// Request body read from a file.
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// Extra header, `name: value`; repeatable (e.g. `authorization: Bearer …`). A body
    /// without a content-type header is sent as `application/json`.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Connections, one per worker, each with at most one request in flight.
    #[arg(short = 'c', long, default_value_t = 32)]
    connections: usize,
    /// Measurement time in seconds.
    #[arg(short = 'd', long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up in seconds before the measurement window (traffic sent, nothing counted).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Open loop at this many requests per second in total, evenly paced; closed loop when
    /// absent.
    #[arg(long)]
    rate: Option<f64>,
    /// Runtime threads: 1 is a current-thread runtime (best when pinned to one CPU).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds one request may take (connecting included) before it counts as an error.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// A name echoed in the output line.
    #[arg(long, default_value = "")]
    label: String,
}

/// What every worker shares.
struct Plan {
    request: Parts,
    connections: usize,
    /// Interval between two due times of one connection (open loop).
    interval: Option<Duration>,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    timeout: Duration,
}

/// What one worker measured.
struct Tally {
    latency: Histogram<u64>,
    /// Open loop: how late requests were sent after their due time.
    lag: Histogram<u64>,
    ok: u64,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    timeouts: u64,
    connects: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Self {
        Self {
            latency: histogram(),
            lag: histogram(),
            ok: 0,
            statuses: BTreeMap::new(),
            errors: 0,
            timeouts: 0,
            connects: 0,
            first_error: None,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latency.add(&other.latency).unwrap();
        self.lag.add(&other.lag).unwrap();
        self.ok += other.ok;
        for (code, n) in other.statuses {
            *self.statuses.entry(code).or_default() += n;
        }
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        self.connects += other.connects;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn error(&mut self, counted: bool, message: String) {
        if counted {
            self.errors += 1;
        }
        if self.first_error.is_none() {
            self.first_error = Some(message);
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).unwrap()
}

fn main() {
    let args = Args::parse();
    let plan_parts = prepare(&args);
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .expect("cannot start the async runtime");
    let cpu_before = cpu_ticks();
    let wall = Instant::now();
    let (tally, plan) = runtime.block_on(run(&args, plan_parts));
    let cpu_pct = match (cpu_before, cpu_ticks()) {
        (Some(a), Some(b)) => {
            // Clock ticks are 1/100 s on Linux (`getconf CLK_TCK`).
            let busy = (b.saturating_sub(a)) as f64 / 100.0;
            Some(round1(100.0 * busy / wall.elapsed().as_secs_f64()))
        }
        _ => None,
    };
    print_report(&args, &plan, &tally, cpu_pct);
}

/// The request every connection sends, and where: checked before the runtime starts.
struct Parts {
    addr: SocketAddr,
    method: Method,
    path: Uri,
    host: HeaderValue,
    headers: HeaderMap,
    body: Bytes,
}

fn prepare(args: &Args) -> Parts {
    let uri: Uri = args
        .url
        .parse()
        .unwrap_or_else(|e| fail(&format!("--url: {e}")));
    if uri.scheme_str() != Some("http") {
        fail("--url: only http:// is supported");
    }
    // Traffic goes to this machine's loopback only.
    if uri.host() != Some("127.0.0.1") {
        fail("--url: the host must be 127.0.0.1");
    }
    let port = uri.port_u16().unwrap_or(80);
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let path: Uri = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse()
        .unwrap_or_else(|e| fail(&format!("--url path: {e}")));
    let host = HeaderValue::from_str(&format!("127.0.0.1:{port}")).unwrap();
    let method: Method = args
        .method
        .to_ascii_uppercase()
        .parse()
        .unwrap_or_else(|e| fail(&format!("--method: {e}")));
    let body = match (&args.body, &args.body_file) {
        (Some(b), _) => Bytes::from(b.clone()),
        (None, Some(path)) => Bytes::from(
            std::fs::read(path)
                .unwrap_or_else(|e| fail(&format!("--body-file {}: {e}", path.display()))),
        ),
        (None, None) => Bytes::new(),
    };
    let mut headers = HeaderMap::new();
    for h in &args.headers {
        let Some((name, value)) = h.split_once(':') else {
            fail(&format!("--header '{h}': expected 'name: value'"));
        };
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .unwrap_or_else(|e| fail(&format!("--header '{h}': {e}")));
        let value = HeaderValue::from_str(value.trim())
            .unwrap_or_else(|e| fail(&format!("--header '{h}': {e}")));
        headers.append(name, value);
    }
    if !body.is_empty() && !headers.contains_key(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    let positive = |x: f64| x.is_finite() && x > 0.0;
    let warmup_ok = args.warmup.is_finite() && args.warmup >= 0.0;
    if args.connections == 0 || args.connections > 10_000 {
        fail("--connections: 1 to 10000");
    }
    if !positive(args.duration) || !warmup_ok {
        fail("--duration must be > 0 and --warmup >= 0");
    }
    if args.duration + args.warmup > MAX_RUN.as_secs_f64() {
        fail("--duration plus --warmup must be at most 3600 s");
    }
    if !positive(args.timeout) || args.timeout > 60.0 {
        fail("--timeout: more than 0, at most 60 s");
    }
    if let Some(rate) = args.rate {
        if !positive(rate) || rate > 10_000_000.0 {
            fail("--rate: more than 0, at most 10,000,000 per second");
        }
    }
    Parts {
        addr,
        method,
        path,
        host,
        headers,
        body,
    }
}

fn fail(message: &str) -> ! {
    eprintln!("loadgen: {message}");
    std::process::exit(2);
}

async fn run(args: &Args, parts: Parts) -> (Tally, Arc<Plan>) {
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let plan = Arc::new(Plan {
        request: parts,
        connections: args.connections,
        interval: args
            .rate
            .map(|r| Duration::from_secs_f64(args.connections as f64 / r)),
        start,
        measure_from,
        end: measure_from + Duration::from_secs_f64(args.duration),
        timeout: Duration::from_secs_f64(args.timeout),
    });
    let workers: Vec<_> = (0..args.connections)
        .map(|k| tokio::spawn(worker(k, plan.clone())))
        .collect();
    let mut total = Tally::new();
    for w in workers {
        // Every worker ends by itself: it stops sending at `end` and each request is
        // bounded by `timeout`.
        total.merge(w.await.expect("a worker failed"));
    }
    (total, plan)
}

async fn worker(k: usize, plan: Arc<Plan>) -> Tally {
    let mut tally = Tally::new();
    let mut conn: Option<SendRequest<Full<Bytes>>> = None;
    // Open loop: connection k's first due time is offset by k/R, so that the connections
    // together send one request every 1/R.
    let mut due = plan
        .interval
        .map(|iv| plan.start + iv.mul_f64(k as f64 / plan.connections as f64));
    tokio::time::sleep_until(plan.start.into()).await;
    loop {
        let intended = match (&mut due, plan.interval) {
            (Some(next), Some(iv)) => {
                let at = *next;
                if at >= plan.end {
                    break;
                }
                *next += iv;
                pace_until(at).await;
                at
            }
            _ => {
                let now = Instant::now();
                if now >= plan.end {
                    break;
                }
                now
            }
        };
        let counted = intended >= plan.measure_from;
        let sent = Instant::now();
        let outcome =
            tokio::time::timeout(plan.timeout, exchange(&plan, &mut conn, &mut tally)).await;
        let done = Instant::now();
        match outcome {
            Ok(Ok(status)) => {
                if counted {
                    let ns = u64::try_from((done - intended).as_nanos()).unwrap_or(u64::MAX);
                    tally.latency.saturating_record(ns.clamp(1, MAX_LATENCY_NS));
                    if plan.interval.is_some() {
                        let lag = u64::try_from((sent - intended).as_nanos()).unwrap_or(u64::MAX);
                        tally.lag.saturating_record(lag.clamp(1, MAX_LATENCY_NS));
                    }
                    if (200..300).contains(&status) {
                        tally.ok += 1;
                    }
                    *tally.statuses.entry(status).or_default() += 1;
                }
            }
            Ok(Err(message)) => {
                conn = None;
                tally.error(counted, message);
                backoff(&plan).await;
            }
            Err(_) => {
                conn = None;
                if counted {
                    tally.timeouts += 1;
                }
                tally.error(counted, format!("no answer within {:?}", plan.timeout));
            }
        }
    }
    tally
}

/// One request and its whole answer on the worker's connection, (re)connecting first when
/// there is none or it was closed. Returns the status code.
async fn exchange(
    plan: &Plan,
    conn: &mut Option<SendRequest<Full<Bytes>>>,
    tally: &mut Tally,
) -> Result<u16, String> {
    if let Some(sender) = conn.as_mut() {
        if sender.ready().await.is_err() {
            *conn = None;
        }
    }
    let sender = match conn {
        Some(sender) => sender,
        None => {
            let sender = connect(plan.request.addr).await?;
            tally.connects += 1;
            conn.insert(sender)
        }
    };
    let mut request = Request::builder()
        .method(plan.request.method.clone())
        .uri(plan.request.path.clone())
        .body(Full::new(plan.request.body.clone()))
        .map_err(|e| e.to_string())?;
    let headers = request.headers_mut();
    headers.insert(HOST, plan.request.host.clone());
    headers.extend(
        plan.request
            .headers
            .iter()
            .map(|(n, v)| (n.clone(), v.clone())),
    );
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("response body: {e}"))?;
    Ok(status)
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// After a failed request in closed loop, wait a little rather than spin on a dead server.
async fn backoff(plan: &Plan) {
    if plan.interval.is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until `at` with sub-millisecond precision: sleep on the timer while far away, then
/// yield to the runtime until the time has come.
async fn pace_until(at: Instant) {
    loop {
        let now = Instant::now();
        if now >= at {
            return;
        }
        if at - now > SPIN_WINDOW {
            tokio::time::sleep_until((at - SPIN_WINDOW).into()).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}

/// User plus system CPU time of this process in clock ticks (Linux), if readable.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn us(ns: u64) -> f64 {
    round1(ns as f64 / 1000.0)
}

fn print_report(args: &Args, plan: &Plan, tally: &Tally, client_cpu_pct: Option<f64>) {
    let h = &tally.latency;
    let seconds = (plan.end - plan.measure_from).as_secs_f64();
    let answered: u64 = tally.statuses.values().sum();
    let percentiles = |h: &Histogram<u64>| {
        serde_json::json!({
            "p50": us(h.value_at_quantile(0.50)),
            "p90": us(h.value_at_quantile(0.90)),
            "p99": us(h.value_at_quantile(0.99)),
            "p999": us(h.value_at_quantile(0.999)),
            "max": us(h.max()),
            "mean": round1(h.mean() / 1000.0),
        })
    };
    let by_code: BTreeMap<String, u64> = tally
        .statuses
        .iter()
        .map(|(code, n)| (code.to_string(), *n))
        .collect();
    let line = serde_json::json!({
        "label": args.label,
        "url": args.url,
        "method": plan.request.method.as_str(),
        "mode": if plan.interval.is_some() { "open" } else { "closed" },
        "connections": args.connections,
        "threads": args.threads,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "target_rate": args.rate,
        "requests": answered,
        "rps": round1(answered as f64 / seconds),
        "ok_2xx": tally.ok,
        "non_2xx": answered - tally.ok,
        "status": by_code,
        "errors": tally.errors,
        "timeouts": tally.timeouts,
        "connects": tally.connects,
        "first_error": tally.first_error,
        "latency_us": percentiles(h),
        "send_lag_us": if plan.interval.is_some() { Some(percentiles(&tally.lag)) } else { None },
        "client_cpu_pct": client_cpu_pct,
    });
    println!("{line}");
}

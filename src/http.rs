//! The HTTP API on hyper directly: the connection loop with its limits and graceful drain,
//! and the handlers that turn requests into service calls.
//!
//! **Boundary:** the only module that names hyper types. Nothing else depends on it but the
//! supervisor. Errors become responses in exactly one place, `problem`.

mod limits;
mod mcp;
mod problem;
mod router;
mod sse;
mod unique;

/// The body decoding of the API without a connection, for the fuzz targets in `fuzz/`: the
/// same functions the handlers call, on bytes. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use crate::service::DecideInput;

    /// A `POST /api/decide` body as the handler reads it: the duplicate-key walk, then the
    /// typed parse of a JSON object. The error is the problem's detail.
    pub fn decide_body(body: &[u8]) -> Result<DecideInput<'_>, String> {
        super::no_duplicate_keys(body).map_err(detail)?;
        super::parse(body).map_err(detail)
    }

    /// A JSON body's checks before any handler reads it (the draft endpoint's among them):
    /// the duplicate-key walk.
    pub fn json_body(body: &[u8]) -> Result<(), String> {
        super::no_duplicate_keys(body).map_err(detail)
    }

    fn detail(e: super::HttpError) -> String {
        match e {
            super::HttpError::Malformed(why) => why,
            super::HttpError::DuplicateKey(at) => format!("duplicate key at {at}"),
            other => format!("{other:?}"),
        }
    }
}

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::service::auth::Caller;
use crate::service::ratelimit::{Kind, RateLimited, RateLimiter};
use crate::service::{App, DecideInput, ServiceError};
use crate::telemetry::Route;
use router::Endpoint;

type Body = Full<Bytes>;

/// Which listener a server is: the public API, or the admin listener that alone serves the
/// detailed `/health` and `/metrics`, which name worlds (docs/operations.md, "Public and
/// admin ports").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Public,
    Admin,
}

impl Surface {
    /// Whether this listener serves `endpoint`.
    fn serves(self, endpoint: &Endpoint) -> bool {
        match self {
            Self::Public => !matches!(endpoint, Endpoint::Metrics),
            Self::Admin => matches!(
                endpoint,
                Endpoint::Health | Endpoint::Metrics | Endpoint::Version
            ),
        }
    }
}

/// Serve HTTP on `listener` until `stop` is cancelled, then stop accepting, let in-flight
/// requests finish for at most `drain`, and return. The supervisor gives the drain its share
/// of the one shutdown deadline; connections still open after it are left to end with the
/// process, and their decisions, recorded or refused, never answered unrecorded.
pub async fn serve(
    listener: TcpListener,
    surface: Surface,
    app: Arc<App>,
    config: ServerConfig,
    stop: CancellationToken,
    drain: Duration,
) {
    let config = Arc::new(config);
    // Each connection holds a permit while it is open; with none left, the connection idle
    // longest is closed to make room, and when none is idle, new connections are answered
    // 503 and closed at once: idle clients cannot starve the server of memory or file
    // descriptors, and the ones already connected keep being served.
    let permits = Arc::new(Semaphore::new(config.max_connections));
    // Below this many free permits, every new connection closes the idlest one, so that
    // room is made before the limit is reached.
    let reserve = (config.max_connections / 64).max(1);
    let conns = Arc::new(limits::Conns::new(
        config.connections.clone(),
        app.metrics.clone(),
    ));
    let rates = Arc::new(RateLimiter::new(&config.rate, app.metrics.clone()));
    // Cancelled when the server stops: every connection is asked to close gracefully.
    let closing = CancellationToken::new();
    let tracker = TaskTracker::new();
    // MCP event streams can stay open indefinitely; they end when the server stops.
    let mcp_stop = tokio_util::sync::CancellationToken::new();
    let mcp = Arc::new(mcp::Mcp::new(app.clone(), &config, mcp_stop.clone()));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(config.header_timeout));

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let registered = match conns.register(peer.ip(), &closing) {
                    Ok(registered) => registered,
                    Err(limits::AddressFull(cap)) => {
                        tokio::spawn(shed(stream, Shed::Address(cap)));
                        continue;
                    }
                };
                let permit = match permits.clone().try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) if conns.evict_idlest() => None,
                    Err(_) => {
                        app.metrics.connections_shed.inc();
                        tokio::spawn(shed(stream, Shed::Global));
                        continue;
                    }
                };
                if permit.is_some() && permits.available_permits() < reserve {
                    conns.evict_idlest();
                }
                let connection = Connection {
                    surface,
                    app: app.clone(),
                    mcp: mcp.clone(),
                    cfg: config.clone(),
                    rates: rates.clone(),
                    builder: builder.clone(),
                };
                let permits = permits.clone();
                tracker.spawn(async move {
                    let permit = match permit {
                        Some(permit) => permit,
                        // A connection idle longest is closing to make room: its permit is
                        // this one's, within the header timeout.
                        None => match tokio::time::timeout(connection.cfg.header_timeout, permits.acquire_owned()).await {
                            Ok(Ok(permit)) => permit,
                            _ => {
                                connection.app.metrics.connections_shed.inc();
                                shed(stream, Shed::Global).await;
                                return;
                            }
                        },
                    };
                    registered.conn.admitted();
                    connection.run(stream, peer, &registered).await;
                    drop(registered);
                    drop(permit);
                });
            }
            _ = stop.cancelled() => break,
        }
    }
    drop(listener);
    mcp_stop.cancel();
    closing.cancel();
    tracker.close();
    tracing::info!(?surface, "HTTP server draining");
    tokio::select! {
        _ = tracker.wait() => tracing::info!("HTTP server drained"),
        _ = tokio::time::sleep(drain) => {
            tracing::warn!(drain_ms = drain.as_millis() as u64, "the drain's share of the shutdown deadline ended with connections still open");
        }
    }
}

/// What one connection's task needs.
struct Connection {
    surface: Surface,
    app: Arc<App>,
    mcp: Arc<mcp::Mcp>,
    cfg: Arc<ServerConfig>,
    rates: Arc<RateLimiter>,
    builder: auto::Builder<TokioExecutor>,
}

impl Connection {
    /// Serve one connection until it ends, it has been idle for the idle timeout, or it is
    /// asked to close (shutdown, or room made for a new client).
    async fn run(
        self,
        stream: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
        registered: &limits::Registered,
    ) {
        let conn = registered.conn.clone();
        let cfg = self.cfg.clone();
        // hyper starts its header timeout only once the first bytes arrive, so a client
        // that connects and says nothing is timed out here.
        let mut probe = [0u8; 1];
        tokio::select! {
            peeked = tokio::time::timeout(cfg.header_timeout, stream.peek(&mut probe)) => match peeked {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            },
            _ = conn.close.cancelled() => return,
        }
        let Connection {
            surface,
            app,
            mcp,
            cfg: config,
            rates,
            builder,
        } = self;
        let metrics = app.metrics.clone();
        let for_requests = conn.clone();
        let service = service_fn(move |req| {
            let active = for_requests.begin();
            let work = handle(
                surface,
                app.clone(),
                config.clone(),
                mcp.clone(),
                rates.clone(),
                req,
            );
            async move {
                let response = work.await?;
                Ok::<_, Infallible>(response.map(|body| limits::Tracked::new(body, active)))
            }
        });
        let served = builder.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(served);
        let idle_timeout = cfg.connections.idle_timeout;
        let ended = loop {
            let deadline = conn
                .idle_deadline(idle_timeout)
                .unwrap_or_else(|| Instant::now() + idle_timeout);
            tokio::select! {
                ended = served.as_mut() => break Some(ended),
                _ = conn.close.cancelled() => break None,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    // Idle for the whole timeout, whatever PINGs or keep-alive said: closed.
                    if conn.idle_deadline(idle_timeout).is_some_and(|d| d <= Instant::now()) {
                        metrics.connections_closed_idle[0].inc();
                        conn.close.cancel();
                        break None;
                    }
                }
            }
        };
        let ended = match ended {
            Some(ended) => ended,
            None => {
                // GOAWAY on HTTP/2, `connection: close` or a plain close on HTTP/1; requests in
                // flight finish, within the request timeout; a peer that keeps the connection
                // open past that is cut off.
                served.as_mut().graceful_shutdown();
                match tokio::time::timeout(
                    cfg.header_timeout.max(cfg.request_timeout),
                    served.as_mut(),
                )
                .await
                {
                    Ok(ended) => ended,
                    Err(_) => return,
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}
/// Which connection limit a refused connection met.
enum Shed {
    /// The server's (`SPECTRAL_MAX_CONNECTIONS`), with no idle connection to close.
    Global,
    /// The client address's share (`SPECTRAL_MAX_CONNECTIONS_PER_IP`).
    Address(usize),
}

/// Answer a connection over a limit with a 503 and close it.
async fn shed(mut stream: tokio::net::TcpStream, limit: Shed) {
    let body = match limit {
        Shed::Global => problem::body(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "the server is at its connection limit; retry later",
        ),
        Shed::Address(cap) => problem::body(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections_from_address",
            &format!("this client address holds {cap} connections, its limit; reuse or close one"),
        ),
    };
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
}

async fn handle(
    surface: Surface,
    app: Arc<App>,
    config: Arc<ServerConfig>,
    mcp: Arc<mcp::Mcp>,
    rates: Arc<RateLimiter>,
    req: Request<Incoming>,
) -> Result<Response<mcp::Out>, Infallible> {
    let started = Instant::now();
    let head = req.method() == Method::HEAD;
    let routed = router::route(req.method(), req.uri().path()).and_then(|endpoint| {
        if surface.serves(&endpoint) {
            Ok(endpoint)
        } else {
            Err(router::RouteError::NotFound(req.uri().path().to_string()))
        }
    });
    let (route, response) = match routed {
        Err(e) => (
            Route::NotFound,
            problem::from_route_error(e).map(BodyExt::boxed),
        ),
        Ok(Endpoint::Mcp) => {
            let work = mcp::handle(&app, &mcp, &config, req);
            let response = match tokio::time::timeout(config.request_timeout, work).await {
                Ok(response) => response,
                Err(_) => problem::from_service(&ServiceError::Unavailable(format!(
                    "the request took longer than {} ms",
                    config.request_timeout.as_millis()
                )))
                .map(BodyExt::boxed),
            };
            (Route::Mcp, response)
        }
        Ok(endpoint) if endpoint.streams() => {
            let route = endpoint.route();
            // Opening the stream is bounded like any request; the stream has its own bound.
            let work = open_stream(app.clone(), &config, endpoint, req);
            let response = match tokio::time::timeout(config.request_timeout, work).await {
                Ok(Ok(response)) => response,
                Ok(Err(e)) => problem::from_error(&e).map(BodyExt::boxed),
                Err(_) => problem::from_service(&ServiceError::Unavailable(format!(
                    "the request took longer than {} ms",
                    config.request_timeout.as_millis()
                )))
                .map(BodyExt::boxed),
            };
            (route, response)
        }
        Ok(endpoint) => {
            let route = endpoint.route();
            let work = dispatch(surface, &app, &config, &rates, endpoint, req, started);
            let response = match tokio::time::timeout(config.request_timeout, work).await {
                Ok(Ok(response)) => response,
                Ok(Err(e)) => problem::from_error(&e),
                Err(_) => problem::from_service(&ServiceError::Unavailable(format!(
                    "the request took longer than {} ms",
                    config.request_timeout.as_millis()
                ))),
            };
            let response = if head {
                without_body(response)
            } else {
                response
            };
            (route, response.map(BodyExt::boxed))
        }
    };
    app.metrics
        .request(route, response.status().as_u16(), started.elapsed());
    Ok(response)
}

/// The answer to `HEAD`: the `GET` answer's status and headers, its length, and no body.
fn without_body(response: Response<Body>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    let length = body.size_hint().exact().unwrap_or(0);
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(length));
    Response::from_parts(parts, Full::new(Bytes::new()))
}

/// A request failed before reaching the service: the body.
#[derive(Debug)]
pub(crate) enum BodyError {
    TooLarge(usize),
    WrongType(String),
    /// The body did not arrive within the header timeout (408).
    TimedOut(Duration),
    Read(String),
}

async fn dispatch(
    surface: Surface,
    app: &App,
    config: &ServerConfig,
    rates: &RateLimiter,
    endpoint: Endpoint,
    req: Request<Incoming>,
    started: Instant,
) -> Result<Response<Body>, HttpError> {
    match endpoint {
        Endpoint::Health => {
            let (ready, body) = match surface {
                Surface::Admin => app.health().await,
                Surface::Public => app.public_health().await,
            };
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            Ok(json(status, &body))
        }
        Endpoint::Version => Ok(json(
            StatusCode::OK,
            &serde_json::json!({
                "version": app.build.version,
                "git_sha": app.build.git_sha,
                "generation": app.generation,
            }),
        )),
        Endpoint::OpenApi => Ok(json(
            StatusCode::OK,
            &crate::service::openapi::service_document(app.build.version, config.batch_max_items),
        )),
        Endpoint::Metrics => {
            let mut r = Response::new(Full::new(Bytes::from(app.metrics.render(app.log.depth()))));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(r)
        }
        endpoint => {
            let caller = app.keys.authenticate(authorization(&req)).await?;
            authed(app, config, rates, &caller, endpoint, req, started).await
        }
    }
}

/// Authenticate, do what the request asks (post a message), and answer with the stream of
/// the thread's events.
async fn open_stream(
    app: Arc<App>,
    config: &ServerConfig,
    endpoint: Endpoint,
    req: Request<Incoming>,
) -> Result<Response<mcp::Out>, HttpError> {
    use crate::store::ThreadKind;
    let caller = app.keys.authenticate(authorization(&req)).await?;
    let last = sse::last_event_id(&req)?;
    match endpoint {
        Endpoint::RunEvents(world, id) => {
            let thread = app
                .agent_thread(&caller, &world, ThreadKind::Run, &id)
                .await?;
            sse::respond(app, thread, last.unwrap_or(0), sse::Until::ThreadEnds)
        }
        Endpoint::ThreadEvents(world, name) => {
            let thread = app
                .agent_thread(&caller, &world, ThreadKind::Chat, &name)
                .await?;
            let after = last.unwrap_or(0);
            let until = if thread.status == crate::store::RUNNING {
                sse::Until::TurnAfter(after)
            } else {
                sse::Until::ThreadEnds
            };
            sse::respond(app, thread, after, until)
        }
        Endpoint::PostMessage(world, name) => {
            let body = json_body(req, config).await?;
            let input: crate::service::agent::MessageInput = parse(&body)?;
            let (thread, seq) = app.post_message(&caller, &world, &name, input).await?;
            // The stream starts with the message itself, so its id is the first one.
            sse::respond(app, thread, seq - 1, sse::Until::TurnAfter(seq))
        }
        _ => Err(ServiceError::Internal("a non-stream endpoint routed as a stream".into()).into()),
    }
}

fn authorization(req: &Request<Incoming>) -> Option<&str> {
    req.headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

async fn authed(
    app: &App,
    config: &ServerConfig,
    rates: &RateLimiter,
    caller: &Caller,
    endpoint: Endpoint,
    req: Request<Incoming>,
    started: Instant,
) -> Result<Response<Body>, HttpError> {
    // Authoring calls are counted before their body is read: a flood of them costs the
    // server no more than the check.
    if let Some(world) = authoring_world(&endpoint) {
        // A key bound to another world is refused further on; it spends only its own rate,
        // never the rate of a world it cannot act on.
        let world = match &caller.world {
            Some(own) if own != world => None,
            _ => Some(world),
        };
        rates.check(Kind::Authoring, &caller.key_id, world, 1)?;
    }
    match endpoint {
        Endpoint::Decide => {
            // A world-bound key's world is known before its body is read: over the limit, its
            // request costs no read and no parse. An operator key names the world in the body.
            if caller.world.is_some() {
                rates.check(Kind::Decide, &caller.key_id, caller.world.as_ref(), 1)?;
            }
            let body = json_body(req, config).await?;
            let input: DecideInput = parse(&body)?;
            if caller.world.is_none() {
                rates.check(Kind::Decide, &caller.key_id, input.world.as_ref(), 1)?;
            }
            let decision = app.decide(caller, &input).await?;
            Ok(json(StatusCode::OK, &decision))
        }
        Endpoint::DecideBatch => {
            let body = json_body(req, config).await?;
            let batch: BatchInput = parse(&body)?;
            if batch.requests.len() > config.batch_max_items {
                return Err(ServiceError::BadRequest(format!(
                    "a batch holds at most {} requests, this one has {}",
                    config.batch_max_items,
                    batch.requests.len()
                ))
                .into());
            }
            // Every item counts; an operator key's items may name several worlds, so only a
            // world-bound key's batch is counted against its world too.
            let items = u32::try_from(batch.requests.len()).unwrap_or(u32::MAX);
            rates.check(Kind::Decide, &caller.key_id, caller.world.as_ref(), items)?;
            // Items start only while they can finish within the request timeout, with room
            // to answer: every decision is bounded by its own deadline.
            let reserve = (config.request_timeout / 10)
                .max(app.sandbox.limits().decision_deadline() * 2)
                .min(config.request_timeout / 2);
            let mut budget = app.batch_budget(started + config.request_timeout - reserve);
            let mut results = Vec::with_capacity(batch.requests.len());
            for raw in batch.requests {
                let result = match serde_json::from_str::<DecideInput>(raw.get()) {
                    Err(e) => Err(HttpError::Malformed(e.to_string())),
                    Ok(input) => app
                        .decide_in_batch(caller, &input, &mut budget)
                        .await
                        .map_err(HttpError::from),
                };
                results.push(match result {
                    Ok(decision) => serde_json::json!({"status": 200, "decision": decision}),
                    Err(e) => {
                        let (status, body) = problem::parts(&e);
                        serde_json::json!({"status": status.as_u16(), "problem": body})
                    }
                });
            }
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({"results": results}),
            ))
        }
        Endpoint::Draft(world) => {
            let body = json_body(req, config).await?;
            let model = app.put_draft(caller, &world, &body).await?;
            let rules: usize = model.actions.iter().map(|a| a.rules.len()).sum();
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({"world": world, "draft": "valid", "actions": model.actions.len(), "rules": rules}),
            ))
        }
        Endpoint::Publish(world) => {
            let published = app.publish(caller, &world).await?;
            Ok(json(StatusCode::CREATED, &published))
        }
        Endpoint::Deploy(world) => {
            let body = json_body(req, config).await?;
            let input: DeployInput = parse(&body)?;
            let version = input.version.ok_or_else(|| {
                HttpError::Malformed("version must be a whole number, not null".into())
            })?;
            let deployment = app.deploy(caller, &world, version).await?;
            Ok(json(StatusCode::OK, &deployment))
        }
        Endpoint::Retire(world, version) => {
            let input: RetireInput = match optional_json_body(req, config).await? {
                Some(body) => parse(&body)?,
                None => RetireInput::default(),
            };
            let retired = app
                .retire(caller, &world, version, input.reason.as_deref())
                .await?;
            Ok(json(StatusCode::OK, &retired))
        }
        Endpoint::Worlds => Ok(json(StatusCode::OK, &app.worlds(caller).await?)),
        Endpoint::World(world) => Ok(json(StatusCode::OK, &app.world(caller, &world).await?)),
        Endpoint::WorldVersion(world, version) => Ok(json(
            StatusCode::OK,
            &app.version(caller, &world, version).await?,
        )),
        Endpoint::Actions(world) => Ok(json(StatusCode::OK, &app.actions(caller, &world).await?)),
        Endpoint::Stats(world) => Ok(json(StatusCode::OK, &app.stats(caller, &world).await?)),
        Endpoint::Webhooks(world) => {
            let body = json_body(req, config).await?;
            let input: crate::service::WebhookInput = parse(&body)?;
            let created = app.create_webhook(caller, &world, input).await?;
            Ok(json(StatusCode::CREATED, &created))
        }
        // The life cycle of keys, and webhook management.
        Endpoint::Keys => Ok(json(
            StatusCode::OK,
            &serde_json::json!({"keys": app.list_keys(caller).await?}),
        )),
        Endpoint::KeyRevoke(id) => Ok(json(StatusCode::OK, &app.revoke_key(caller, &id).await?)),
        Endpoint::KeyRotate(id) => Ok(json(StatusCode::OK, &app.rotate_key(caller, &id).await?)),
        Endpoint::WebhookList(world) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({"webhooks": app.webhooks(caller, &world).await?}),
        )),
        Endpoint::Webhook(world, id) => {
            app.delete_webhook(caller, &world, &id).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({"world": world, "deleted": id}),
            ))
        }
        Endpoint::StartRun(world) => {
            let body = json_body(req, config).await?;
            let input: crate::service::agent::RunInput = parse(&body)?;
            let started = app.start_run(caller, &world, input).await?;
            Ok(json(StatusCode::ACCEPTED, &started))
        }
        Endpoint::Runs(world) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({"runs": app.agent_runs(caller, &world).await?}),
        )),
        Endpoint::Run(world, id) => Ok(json(
            StatusCode::OK,
            &app.agent_run(caller, &world, &id).await?,
        )),
        Endpoint::Candidates(world) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({"candidates": app.candidates(caller, &world).await?}),
        )),
        Endpoint::Approve(world, id) => {
            review(
                app,
                config,
                caller,
                &world,
                &id,
                crate::store::Verdict::Approved,
                req,
            )
            .await
        }
        Endpoint::Reject(world, id) => {
            review(
                app,
                config,
                caller,
                &world,
                &id,
                crate::store::Verdict::Rejected,
                req,
            )
            .await
        }
        Endpoint::Shadow(world, method) => match method {
            Method::POST => {
                let body = json_body(req, config).await?;
                let input: crate::service::ShadowInput = parse(&body)?;
                let started = app.start_shadow(caller, &world, input).await?;
                Ok(json(StatusCode::CREATED, &started))
            }
            Method::DELETE => Ok(json(StatusCode::OK, &app.end_shadow(caller, &world).await?)),
            _ => Ok(json(
                StatusCode::OK,
                &app.shadow_report(caller, &world).await?,
            )),
        },
        Endpoint::Replays(world) => {
            let body = json_body(req, config).await?;
            let input: crate::service::ReplayInput = parse(&body)?;
            let queued = app.queue_replay(caller, &world, input).await?;
            Ok(json(StatusCode::ACCEPTED, &queued))
        }
        Endpoint::Replay(world, id) => Ok(json(
            StatusCode::OK,
            &app.replay(caller, &world, &id).await?,
        )),
        Endpoint::RunEvents(..) | Endpoint::PostMessage(..) | Endpoint::ThreadEvents(..) => {
            Err(ServiceError::Internal("a stream endpoint routed as a plain one".into()).into())
        }
        Endpoint::Health
        | Endpoint::Version
        | Endpoint::Metrics
        | Endpoint::OpenApi
        | Endpoint::Mcp => Err(ServiceError::Internal(
            "unauthenticated endpoint routed as authenticated".into(),
        )
        .into()),
    }
}

async fn review(
    app: &App,
    config: &ServerConfig,
    caller: &Caller,
    world: &str,
    id: &str,
    verdict: crate::store::Verdict,
    req: Request<Incoming>,
) -> Result<Response<Body>, HttpError> {
    let input: crate::service::agent::ReviewInput = match optional_json_body(req, config).await? {
        Some(body) => parse(&body)?,
        None => Default::default(),
    };
    let reviewed = app.review(caller, world, id, verdict, input).await?;
    Ok(json(StatusCode::OK, &reviewed))
}

/// The world an authoring call works on; `None` for every other endpoint.
fn authoring_world(endpoint: &Endpoint) -> Option<&String> {
    match endpoint {
        Endpoint::Draft(w)
        | Endpoint::Publish(w)
        | Endpoint::Deploy(w)
        | Endpoint::Retire(w, _)
        | Endpoint::Webhooks(w)
        | Endpoint::StartRun(w)
        | Endpoint::PostMessage(w, _)
        | Endpoint::Approve(w, _)
        | Endpoint::Reject(w, _)
        | Endpoint::Replays(w) => Some(w),
        Endpoint::Shadow(w, m) if *m != Method::GET => Some(w),
        _ => None,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchInput<'a> {
    #[serde(borrow)]
    requests: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployInput {
    #[serde(deserialize_with = "crate::service::whole_number")]
    version: Option<u64>,
}

/// The optional body of `POST /api/worlds/{world}/versions/{n}/retire`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetireInput {
    #[serde(default)]
    reason: Option<String>,
}

/// Everything a handler can fail with.
#[derive(Debug)]
pub(crate) enum HttpError {
    Service(ServiceError),
    Body(BodyError),
    Malformed(String),
    /// An object in the body repeats a key; the path of the first repeat.
    DuplicateKey(String),
    /// Over a rate limit (429 with `Retry-After`).
    RateLimited(RateLimited),
}

impl From<RateLimited> for HttpError {
    fn from(e: RateLimited) -> Self {
        Self::RateLimited(e)
    }
}

impl From<ServiceError> for HttpError {
    fn from(e: ServiceError) -> Self {
        Self::Service(e)
    }
}

/// A JSON object body as `T`. Every body the API takes is an object; serde would also read a
/// struct from an array of its fields in order, so anything else is refused first.
fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, HttpError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(HttpError::Malformed(
            "the body must be a JSON object".into(),
        ));
    }
    serde_json::from_slice(body).map_err(|e| HttpError::Malformed(e.to_string()))
}

/// Read a body within the size limit and the header timeout: a client that sends its body
/// too slowly gets 408, long before the request timeout.
async fn collect_body(req: Request<Incoming>, config: &ServerConfig) -> Result<Bytes, HttpError> {
    let max = config.max_body_bytes;
    let within = config.header_timeout;
    match tokio::time::timeout(within, Limited::new(req.into_body(), max).collect()).await {
        Err(_) => Err(HttpError::Body(BodyError::TimedOut(within))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(HttpError::Body(BodyError::TooLarge(max)))
        }
        Ok(Err(e)) => Err(HttpError::Body(BodyError::Read(e.to_string()))),
    }
}

/// Read a JSON request body within the size limit.
async fn json_body(req: Request<Incoming>, config: &ServerConfig) -> Result<Bytes, HttpError> {
    let max = config.max_body_bytes;
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence != "application/json" {
        return Err(HttpError::Body(BodyError::WrongType(
            content_type.to_string(),
        )));
    }
    // Refuse a declared oversize body before reading any of it.
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(HttpError::Body(BodyError::TooLarge(max)));
    }
    let body = collect_body(req, config).await?;
    no_duplicate_keys(&body)?;
    Ok(body)
}

/// A body with no repeated key in any of its objects. A body the walk cannot finish is
/// refused too: the typed parse that follows skips what it does not need without reading it
/// as strictly, so a repeat could hide behind it.
fn no_duplicate_keys(body: &[u8]) -> Result<(), HttpError> {
    match unique::check(body) {
        Ok(()) => Ok(()),
        Err(unique::Found::Duplicate(at)) => Err(HttpError::DuplicateKey(at)),
        Err(unique::Found::Invalid(why)) => Err(HttpError::Malformed(why)),
    }
}

/// A JSON request body that may be left out: `None` for an empty body sent without a
/// content type, otherwise as [`json_body`] reads it.
async fn optional_json_body(
    req: Request<Incoming>,
    config: &ServerConfig,
) -> Result<Option<Bytes>, HttpError> {
    if req.headers().contains_key(CONTENT_TYPE) {
        return json_body(req, config).await.map(Some);
    }
    match collect_body(req, config).await? {
        bytes if bytes.is_empty() => Ok(None),
        // A body, but no content type: refused as json_body refuses any type but JSON.
        _ => Err(HttpError::Body(BodyError::WrongType(String::new()))),
    }
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut r = Response::new(Full::new(Bytes::from(bytes)));
            *r.status_mut() = status;
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => problem::from_service(&ServiceError::Internal(format!(
            "response does not serialize: {e}"
        ))),
    }
}

/// Methods the router knows, for `405` answers.
pub(crate) fn allow_header(methods: &[Method]) -> String {
    methods
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

//! `/mcp`: the MCP server (`crate::mcp`) on the API's listener, behind the API's own checks.
//!
//! Before a request reaches the transport it passes what every API request passes: the
//! connection limit (the listener's), the Bearer key, the body limits and content type, and
//! the request timeout; and what an MCP endpoint needs besides: its `Origin` validated against
//! DNS rebinding, a session (of the earlier protocol revisions) used only with the key that
//! opened it, and a bound on the sessions open at once. Refusals are problem+json, as
//! everywhere else; tool errors are the HTTP API's problem documents inside the tool result.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, ORIGIN, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::Value;

use super::{problem, HttpError};
use crate::config::ServerConfig;
use crate::mcp::{self, Backend, Fault, SessionLimits, Sessions};
use crate::service::auth::Caller;
use crate::service::{App, DecideInput, ServiceError};

pub(super) type Out = BoxBody<Bytes, Infallible>;

const SESSION_HEADER: &str = "mcp-session-id";

/// The tools against the service, for an authenticated caller.
struct Online {
    app: Arc<App>,
    timeout: Duration,
}

fn fault(e: &HttpError) -> Fault {
    let (status, document) = problem::parts(e);
    Fault {
        status: status.as_u16(),
        document,
    }
}

fn no_caller() -> Fault {
    fault(&HttpError::Service(ServiceError::Internal(
        "an MCP tool call reached the service without its caller".into(),
    )))
}

impl Online {
    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, ServiceError>>,
    ) -> Result<T, Fault> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(fault(&HttpError::Service(e))),
            Err(_) => Err(fault(&HttpError::Service(ServiceError::Unavailable(
                format!(
                    "the request took longer than {} ms",
                    self.timeout.as_millis()
                ),
            )))),
        }
    }
}

impl Backend for Online {
    type Caller = Caller;

    async fn list_actions(
        &self,
        caller: Option<Caller>,
        world: Option<String>,
    ) -> Result<Value, Fault> {
        let caller = caller.ok_or_else(no_caller)?;
        self.bounded(self.app.action_catalog(&caller, world.as_deref()))
            .await
    }

    async fn decide(&self, caller: Option<Caller>, request: String) -> Result<Value, Fault> {
        let caller = caller.ok_or_else(no_caller)?;
        // The same parse as `POST /api/decide`, so the same input gets the same answer.
        let input: DecideInput = super::parse(request.as_bytes()).map_err(|e| fault(&e))?;
        let decision = self.bounded(self.app.decide(&caller, &input)).await?;
        serde_json::to_value(&decision).map_err(|e| {
            fault(&HttpError::Service(ServiceError::Internal(format!(
                "decision does not serialize: {e}"
            ))))
        })
    }
}

/// The MCP endpoint's state, one per listener.
pub(super) struct Mcp {
    service: mcp::HttpService<Online>,
    sessions: Arc<Sessions>,
    allowed_origins: Vec<String>,
}

impl Mcp {
    pub(super) fn new(
        app: Arc<App>,
        config: &ServerConfig,
        stop: tokio_util::sync::CancellationToken,
    ) -> Self {
        let sessions = Arc::new(Sessions::new(SessionLimits {
            max_sessions: config.mcp.max_sessions,
            max_age: config.mcp.session_max_age,
            idle: config.mcp.session_idle,
        }));
        let backend = Arc::new(Online {
            app,
            timeout: config.request_timeout,
        });
        Self {
            service: mcp::http_service(backend, sessions.clone(), config.max_body_bytes, stop),
            sessions,
            allowed_origins: config.mcp.allowed_origins.clone(),
        }
    }
}

fn boxed(r: Response<Full<Bytes>>) -> Response<Out> {
    r.map(|b| b.boxed())
}

/// A problem answer with an extra header.
fn refuse(e: ServiceError, code: Option<&'static str>) -> Response<Out> {
    let mut r = problem::from_service(&e);
    if let Some(code) = code {
        // Name the refusal precisely where the service's kinds are too coarse.
        let (status, mut doc) = problem::parts(&HttpError::Service(e));
        doc["code"] = Value::from(code);
        doc["type"] = Value::from(format!("/problems/{code}"));
        r = problem::respond(status, &doc);
    }
    boxed(r)
}

/// Whether an `Origin` header value is one of the allowed origins.
fn origin_allowed(origin: &str, allowed: &[String]) -> bool {
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    allowed.contains(&origin)
}

/// The first JSON-RPC message's method, to recognise an `initialize`.
#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    method: Option<String>,
}

pub(super) async fn handle(
    app: &App,
    mcp: &Mcp,
    config: &ServerConfig,
    req: Request<Incoming>,
) -> Response<Out> {
    if let Some(origin) = req.headers().get(ORIGIN) {
        let text = origin.to_str().unwrap_or("");
        if !origin_allowed(text, &mcp.allowed_origins) {
            return refuse(
                ServiceError::Forbidden(format!(
                    "origin '{text}' may not call /mcp; operators allow origins with \
                     SPECTRAL_MCP_ALLOWED_ORIGINS"
                )),
                Some("origin_not_allowed"),
            );
        }
    }
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let caller = match app.keys.authenticate(header).await {
        Ok(caller) => caller,
        Err(e) => {
            let mut r = boxed(problem::from_service(&e));
            if r.status() == StatusCode::UNAUTHORIZED {
                r.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            return r;
        }
    };
    let session = req
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(id) = &session {
        if let Some(owner) = mcp.sessions.owner(id) {
            if owner != caller.key_id {
                // Another key's session is as good as none: do not tell it exists.
                return refuse(
                    ServiceError::NotFound(format!("no MCP session '{id}' for this key")),
                    Some("session_not_found"),
                );
            }
        }
    }
    let (mut parts, body) = req.into_parts();
    let mut initialize = false;
    let body = if parts.method == Method::POST {
        let req = Request::from_parts(parts.clone(), body);
        let bytes = match super::json_body(req, config).await {
            Ok(bytes) => bytes,
            Err(e) => return boxed(problem::from_error(&e)),
        };
        initialize = serde_json::from_slice::<Probe>(&bytes)
            .ok()
            .and_then(|p| p.method)
            .is_some_and(|m| m == "initialize");
        if initialize && session.is_none() && mcp.sessions.full().await {
            let mut r = refuse(
                ServiceError::Unavailable(format!(
                    "the server has its maximum of {} MCP sessions open; retry later, or use \
                     protocol revision 2026-07-28, which needs no session",
                    mcp.sessions.limits().max_sessions
                )),
                Some("too_many_sessions"),
            );
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
        bytes
    } else {
        // GET (the event stream) and DELETE (end of session) carry no body.
        drop(body);
        Bytes::new()
    };
    parts.extensions.insert(caller.clone());
    let req = Request::from_parts(parts, Full::new(body));
    let mut response = mcp.service.handle(req).await;
    if initialize {
        if let Some(id) = response
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            mcp.sessions.set_owner(id, &caller.key_id);
        }
    }
    // The transport's own refusals are plain text; keep their status, name their type.
    if !response.headers().contains_key(CONTENT_TYPE) {
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    response
}

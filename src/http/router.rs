//! The hand-written router: method and path to an endpoint, with its path parameters.

use http::Method;

use crate::telemetry::Route;

/// Every endpoint of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Decide,
    DecideBatch,
    Draft(String),
    Publish(String),
    Deploy(String),
    Worlds,
    World(String),
    WorldVersion(String, u64),
    Retire(String, u64),
    Actions(String),
    Stats(String),
    Webhooks(String),
    Health,
    Version,
    Metrics,
    /// The whole API's OpenAPI document.
    OpenApi,
    /// The MCP endpoint; its methods are the transport's to judge.
    Mcp,
    // The life cycle of keys, and webhook management.
    /// `GET /api/keys`.
    Keys,
    /// `POST /api/keys/{id}/revoke`.
    KeyRevoke(String),
    /// `POST /api/keys/{id}/rotate`.
    KeyRotate(String),
    /// `GET /api/worlds/{world}/webhooks` (`POST` is [`Endpoint::Webhooks`]).
    WebhookList(String),
    /// `DELETE /api/worlds/{world}/webhooks/{id}`.
    Webhook(String, String),
    /// `POST …/agent/runs`: start an authoring run.
    StartRun(String),
    /// `GET …/agent/runs`.
    Runs(String),
    Run(String, String),
    /// A run's events, as a stream (`text/event-stream`).
    RunEvents(String, String),
    /// A user message to a chat thread, answered as a stream.
    PostMessage(String, String),
    /// A chat thread's events, as a stream (to reconnect with `Last-Event-ID`).
    ThreadEvents(String, String),
    Candidates(String),
    Approve(String, String),
    Reject(String, String),
    /// `POST`, `GET` or `DELETE …/shadow`: start, read or end the world's shadow.
    Shadow(String, Method),
    /// `POST …/replays`: queue a replay.
    Replays(String),
    /// `GET …/replays/{id}`.
    Replay(String, String),
}

impl Endpoint {
    /// Whether the endpoint answers with an event stream.
    pub fn streams(&self) -> bool {
        matches!(
            self,
            Self::RunEvents(..) | Self::PostMessage(..) | Self::ThreadEvents(..)
        )
    }
}

impl Endpoint {
    pub fn route(&self) -> Route {
        match self {
            Self::Decide => Route::Decide,
            Self::DecideBatch => Route::DecideBatch,
            Self::Draft(_) => Route::Draft,
            Self::Publish(_) => Route::Publish,
            Self::Deploy(_) => Route::Deploy,
            Self::Worlds => Route::Worlds,
            Self::World(_) => Route::World,
            Self::WorldVersion(..) => Route::WorldVersion,
            Self::Retire(..) => Route::Retire,
            Self::Actions(_) => Route::Actions,
            Self::Stats(_) => Route::Stats,
            Self::Webhooks(_) => Route::Webhooks,
            Self::Health => Route::Health,
            Self::Version => Route::ServiceVersion,
            Self::Metrics => Route::Metrics,
            Self::OpenApi => Route::OpenApi,
            Self::Mcp => Route::Mcp,
            Self::Keys | Self::KeyRevoke(_) | Self::KeyRotate(_) => Route::Keys,
            Self::WebhookList(_) | Self::Webhook(..) => Route::Webhooks,
            Self::StartRun(_)
            | Self::Runs(_)
            | Self::Run(..)
            | Self::Candidates(_)
            | Self::Approve(..)
            | Self::Reject(..) => Route::Agent,
            Self::RunEvents(..) | Self::PostMessage(..) | Self::ThreadEvents(..) => {
                Route::AgentStream
            }
            Self::Shadow(..) | Self::Replays(_) | Self::Replay(..) => Route::Impact,
        }
    }
}

/// Why a request matched no endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    NotFound(String),
    MethodNotAllowed(Vec<Method>),
}

/// Match a request. Paths are matched segment by segment; a trailing slash is ignored.
pub fn route(method: &Method, path: &str) -> Result<Endpoint, RouteError> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    // HEAD is answered wherever GET is: the same status and headers, no body (`http`).
    let one = |m: Method, e: Endpoint| {
        if *method == m || (m == Method::GET && *method == Method::HEAD) {
            Ok(e)
        } else if m == Method::GET {
            Err(RouteError::MethodNotAllowed(vec![m, Method::HEAD]))
        } else {
            Err(RouteError::MethodNotAllowed(vec![m]))
        }
    };
    match segments.as_slice() {
        ["api", "decide"] | ["decide"] => one(Method::POST, Endpoint::Decide),
        ["api", "decide", "batch"] => one(Method::POST, Endpoint::DecideBatch),
        ["api", "worlds"] => one(Method::GET, Endpoint::Worlds),
        ["api", "worlds", w] => one(Method::GET, Endpoint::World(w.to_string())),
        ["api", "worlds", w, "draft"] => one(Method::PUT, Endpoint::Draft(w.to_string())),
        ["api", "worlds", w, "versions"] => one(Method::POST, Endpoint::Publish(w.to_string())),
        ["api", "worlds", w, "versions", n] => match n.parse::<u64>() {
            Ok(n) => one(Method::GET, Endpoint::WorldVersion(w.to_string(), n)),
            Err(_) => Err(RouteError::NotFound(path.to_string())),
        },
        ["api", "worlds", w, "versions", n, "retire"] => match n.parse::<u64>() {
            Ok(n) => one(Method::POST, Endpoint::Retire(w.to_string(), n)),
            Err(_) => Err(RouteError::NotFound(path.to_string())),
        },
        ["api", "worlds", w, "deployments"] => one(Method::POST, Endpoint::Deploy(w.to_string())),
        ["api", "worlds", w, "actions"] => one(Method::GET, Endpoint::Actions(w.to_string())),
        ["api", "worlds", w, "stats"] => one(Method::GET, Endpoint::Stats(w.to_string())),
        ["api", "worlds", w, "webhooks"] if *method == Method::GET || *method == Method::HEAD => {
            Ok(Endpoint::WebhookList(w.to_string()))
        }
        ["api", "worlds", w, "webhooks"] if *method != Method::POST => {
            Err(RouteError::MethodNotAllowed(vec![
                Method::GET,
                Method::HEAD,
                Method::POST,
            ]))
        }
        ["api", "worlds", w, "webhooks"] => one(Method::POST, Endpoint::Webhooks(w.to_string())),
        ["api", "worlds", w, "webhooks", id] => one(
            Method::DELETE,
            Endpoint::Webhook(w.to_string(), id.to_string()),
        ),
        ["api", "worlds", w, "shadow"] => match *method {
            Method::POST | Method::GET | Method::DELETE => {
                Ok(Endpoint::Shadow(w.to_string(), method.clone()))
            }
            Method::HEAD => Ok(Endpoint::Shadow(w.to_string(), Method::GET)),
            _ => Err(RouteError::MethodNotAllowed(vec![
                Method::GET,
                Method::HEAD,
                Method::POST,
                Method::DELETE,
            ])),
        },
        ["api", "worlds", w, "replays"] => one(Method::POST, Endpoint::Replays(w.to_string())),
        ["api", "worlds", w, "replays", id] => {
            one(Method::GET, Endpoint::Replay(w.to_string(), id.to_string()))
        }
        ["api", "keys"] => one(Method::GET, Endpoint::Keys),
        ["api", "keys", id, "revoke"] => one(Method::POST, Endpoint::KeyRevoke(id.to_string())),
        ["api", "keys", id, "rotate"] => one(Method::POST, Endpoint::KeyRotate(id.to_string())),
        ["health"] => one(Method::GET, Endpoint::Health),
        ["version"] => one(Method::GET, Endpoint::Version),
        ["metrics"] => one(Method::GET, Endpoint::Metrics),
        ["api", "openapi.json"] => one(Method::GET, Endpoint::OpenApi),
        ["mcp"] => Ok(Endpoint::Mcp),
        ["api", "worlds", w, "agent", "runs"] => match *method {
            Method::POST => Ok(Endpoint::StartRun(w.to_string())),
            Method::GET | Method::HEAD => Ok(Endpoint::Runs(w.to_string())),
            _ => Err(RouteError::MethodNotAllowed(vec![
                Method::GET,
                Method::HEAD,
                Method::POST,
            ])),
        },
        ["api", "worlds", w, "agent", "runs", id] => {
            one(Method::GET, Endpoint::Run(w.to_string(), id.to_string()))
        }
        ["api", "worlds", w, "agent", "runs", id, "events"] => one(
            Method::GET,
            Endpoint::RunEvents(w.to_string(), id.to_string()),
        ),
        ["api", "worlds", w, "agent", "threads", t, "messages"] => one(
            Method::POST,
            Endpoint::PostMessage(w.to_string(), t.to_string()),
        ),
        ["api", "worlds", w, "agent", "threads", t, "events"] => one(
            Method::GET,
            Endpoint::ThreadEvents(w.to_string(), t.to_string()),
        ),
        ["api", "worlds", w, "agent", "candidates"] => {
            one(Method::GET, Endpoint::Candidates(w.to_string()))
        }
        ["api", "worlds", w, "agent", "candidates", id, "approve"] => one(
            Method::POST,
            Endpoint::Approve(w.to_string(), id.to_string()),
        ),
        ["api", "worlds", w, "agent", "candidates", id, "reject"] => one(
            Method::POST,
            Endpoint::Reject(w.to_string(), id.to_string()),
        ),
        _ => Err(RouteError::NotFound(path.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_every_endpoint() {
        let cases = [
            (Method::POST, "/api/decide", Endpoint::Decide),
            (Method::POST, "/decide", Endpoint::Decide),
            (Method::POST, "/api/decide/batch", Endpoint::DecideBatch),
            (Method::GET, "/api/worlds", Endpoint::Worlds),
            (
                Method::GET,
                "/api/worlds/acme/",
                Endpoint::World("acme".into()),
            ),
            (
                Method::PUT,
                "/api/worlds/acme/draft",
                Endpoint::Draft("acme".into()),
            ),
            (
                Method::POST,
                "/api/worlds/acme/versions",
                Endpoint::Publish("acme".into()),
            ),
            (
                Method::GET,
                "/api/worlds/acme/versions/3",
                Endpoint::WorldVersion("acme".into(), 3),
            ),
            (
                Method::POST,
                "/api/worlds/acme/versions/3/retire",
                Endpoint::Retire("acme".into(), 3),
            ),
            (
                Method::POST,
                "/api/worlds/acme/deployments",
                Endpoint::Deploy("acme".into()),
            ),
            (
                Method::GET,
                "/api/worlds/acme/actions",
                Endpoint::Actions("acme".into()),
            ),
            (Method::GET, "/health", Endpoint::Health),
            (Method::HEAD, "/health", Endpoint::Health),
            (Method::HEAD, "/api/worlds", Endpoint::Worlds),
            (Method::GET, "/version", Endpoint::Version),
            (Method::GET, "/metrics", Endpoint::Metrics),
            (Method::GET, "/api/openapi.json", Endpoint::OpenApi),
            (Method::POST, "/mcp", Endpoint::Mcp),
            (Method::DELETE, "/mcp", Endpoint::Mcp),
            (Method::GET, "/api/keys", Endpoint::Keys),
            (
                Method::POST,
                "/api/keys/key_1/revoke",
                Endpoint::KeyRevoke("key_1".into()),
            ),
            (
                Method::POST,
                "/api/keys/key_1/rotate",
                Endpoint::KeyRotate("key_1".into()),
            ),
            (
                Method::POST,
                "/api/worlds/acme/webhooks",
                Endpoint::Webhooks("acme".into()),
            ),
            (
                Method::GET,
                "/api/worlds/acme/webhooks",
                Endpoint::WebhookList("acme".into()),
            ),
            (
                Method::DELETE,
                "/api/worlds/acme/webhooks/wh_1",
                Endpoint::Webhook("acme".into(), "wh_1".into()),
            ),
            (
                Method::POST,
                "/api/worlds/acme/agent/runs",
                Endpoint::StartRun("acme".into()),
            ),
            (
                Method::GET,
                "/api/worlds/acme/agent/runs",
                Endpoint::Runs("acme".into()),
            ),
            (
                Method::GET,
                "/api/worlds/acme/agent/runs/r1",
                Endpoint::Run("acme".into(), "r1".into()),
            ),
            (
                Method::GET,
                "/api/worlds/acme/agent/runs/r1/events",
                Endpoint::RunEvents("acme".into(), "r1".into()),
            ),
            (
                Method::POST,
                "/api/worlds/acme/agent/threads/t1/messages",
                Endpoint::PostMessage("acme".into(), "t1".into()),
            ),
            (
                Method::GET,
                "/api/worlds/acme/agent/threads/t1/events",
                Endpoint::ThreadEvents("acme".into(), "t1".into()),
            ),
            (
                Method::GET,
                "/api/worlds/acme/agent/candidates",
                Endpoint::Candidates("acme".into()),
            ),
            (
                Method::POST,
                "/api/worlds/acme/agent/candidates/c1/approve",
                Endpoint::Approve("acme".into(), "c1".into()),
            ),
            (
                Method::POST,
                "/api/worlds/acme/agent/candidates/c1/reject",
                Endpoint::Reject("acme".into(), "c1".into()),
            ),
        ];
        for (method, path, expected) in cases {
            assert_eq!(route(&method, path), Ok(expected), "{method} {path}");
        }
    }

    #[test]
    fn unknown_paths_and_methods_are_told_apart() {
        assert_eq!(
            route(&Method::GET, "/api/decide"),
            Err(RouteError::MethodNotAllowed(vec![Method::POST]))
        );
        assert_eq!(
            route(&Method::POST, "/health"),
            Err(RouteError::MethodNotAllowed(vec![
                Method::GET,
                Method::HEAD
            ]))
        );
        assert_eq!(
            route(&Method::HEAD, "/api/decide"),
            Err(RouteError::MethodNotAllowed(vec![Method::POST]))
        );
        assert!(matches!(
            route(&Method::GET, "/nope"),
            Err(RouteError::NotFound(_))
        ));
        assert!(matches!(
            route(&Method::GET, "/api/worlds/a/versions/x"),
            Err(RouteError::NotFound(_))
        ));
        assert!(matches!(
            route(&Method::GET, "/"),
            Err(RouteError::NotFound(_))
        ));
    }
}

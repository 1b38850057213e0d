//! The one place where errors become HTTP responses: RFC 9457 problem+json with a stable
//! `type` and `code` per kind of error, logged once here with their cause. A 5xx body
//! carries an `error_id` that its log line carries too, and never the cause's text
//! (docs/operations.md, "Errors").

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use super::router::RouteError;
use super::{BodyError, HttpError};
use crate::service::ServiceError;

/// Status, stable code and the detail a caller may see.
fn classify(e: &HttpError) -> (StatusCode, &'static str, String, Option<Value>) {
    match e {
        HttpError::Malformed(detail) => (
            StatusCode::BAD_REQUEST,
            "malformed_request",
            format!("the request body is not valid: {detail}"),
            None,
        ),
        HttpError::DuplicateKey(at) => (
            StatusCode::BAD_REQUEST,
            "duplicate_key",
            format!("the request body repeats the key '{at}'; every key may appear once"),
            Some(json!({ "key": at })),
        ),
        HttpError::Body(BodyError::TooLarge(max)) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is over the limit of {max} bytes"),
            None,
        ),
        HttpError::Body(BodyError::WrongType(got)) => (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("expected content-type application/json, got '{got}'"),
            None,
        ),
        HttpError::Body(BodyError::TimedOut(within)) => (
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} ms",
                within.as_millis()
            ),
            None,
        ),
        HttpError::Body(BodyError::Read(detail)) => (
            StatusCode::BAD_REQUEST,
            "unreadable_body",
            format!("the request body could not be read: {detail}"),
            None,
        ),
        HttpError::RateLimited(e) => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            e.to_string(),
            Some(json!({ "limit": e.limit.as_str(), "retry_after": e.retry_after_secs() })),
        ),
        HttpError::Service(e) => classify_service(e),
    }
}

fn title(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("Error")
}

/// The problem document.
fn document(status: StatusCode, code: &str, detail: &str, extra: Option<Value>) -> Value {
    let mut doc = json!({
        "type": format!("/problems/{code}"),
        "title": title(status),
        "status": status.as_u16(),
        "detail": detail,
        "code": code,
    });
    if let (Some(Value::Object(extra)), Value::Object(map)) = (extra, &mut doc) {
        map.extend(extra);
    }
    doc
}

/// The serialized body of a problem, for answers written without hyper (connection shedding).
pub fn body(status: StatusCode, code: &str, detail: &str) -> Vec<u8> {
    serde_json::to_vec(&document(status, code, detail, None)).unwrap_or_default()
}

pub(super) fn respond(status: StatusCode, doc: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(doc).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r
}

/// A new error id: what a 5xx body and its log line share, so an operator finds one from
/// the other.
fn error_id() -> String {
    format!("err_{}", uuid::Uuid::now_v7().simple())
}

/// Add the error id to a 5xx problem's members.
fn with_error_id(id: &str, extra: Option<Value>) -> Option<Value> {
    let mut members = match extra {
        Some(Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    members.insert("error_id".into(), Value::String(id.to_string()));
    Some(Value::Object(members))
}

/// Status and problem document of an error, logging it once.
pub fn parts(e: &HttpError) -> (StatusCode, Value) {
    let (status, code, detail, extra) = classify(e);
    if status.is_server_error() {
        let id = error_id();
        match e {
            HttpError::Service(inner) => {
                tracing::error!(code, error_id = %id, error = %inner, "request failed")
            }
            other => tracing::error!(code, error_id = %id, error = ?other, "request failed"),
        }
        return (
            status,
            document(status, code, &detail, with_error_id(&id, extra)),
        );
    }
    tracing::debug!(code, %detail, "request refused");
    (status, document(status, code, &detail, extra))
}

pub(crate) fn from_error(e: &HttpError) -> Response<Full<Bytes>> {
    let (status, doc) = parts(e);
    let mut r = respond(status, &doc);
    if let HttpError::RateLimited(limited) = e {
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(limited.retry_after_secs()));
    }
    r
}

pub(crate) fn from_service(e: &ServiceError) -> Response<Full<Bytes>> {
    let (status, code, detail, extra) = classify_service(e);
    if status.is_server_error() {
        let id = error_id();
        tracing::error!(code, error_id = %id, error = %e, "request failed");
        return respond(
            status,
            &document(status, code, &detail, with_error_id(&id, extra)),
        );
    }
    respond(status, &document(status, code, &detail, extra))
}

fn classify_service(e: &ServiceError) -> (StatusCode, &'static str, String, Option<Value>) {
    match e {
        ServiceError::BadRequest(d) => (StatusCode::BAD_REQUEST, "bad_request", d.clone(), None),
        ServiceError::Unauthenticated(d) => {
            (StatusCode::UNAUTHORIZED, "unauthenticated", d.clone(), None)
        }
        ServiceError::Forbidden(d) => (StatusCode::FORBIDDEN, "forbidden", d.clone(), None),
        ServiceError::NotFound(d) => (StatusCode::NOT_FOUND, "not_found", d.clone(), None),
        ServiceError::Conflict(d) => (StatusCode::CONFLICT, "conflict", d.clone(), None),
        ServiceError::Retired(d) => (StatusCode::GONE, "version_retired", d.clone(), None),
        ServiceError::Invalid { message, problems } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_world_model",
            message.clone(),
            Some(json!({ "problems": problems })),
        ),
        ServiceError::Unavailable(d) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            d.clone(),
            None,
        ),
        ServiceError::FieldTooLong { field, max, .. } => (
            StatusCode::BAD_REQUEST,
            "field_too_long",
            e.to_string(),
            Some(json!({ "field": field, "max_length": max })),
        ),
        ServiceError::LogUnavailable(d) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "decision_log_unavailable",
            d.clone(),
            None,
        ),
        ServiceError::Overloaded(d) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "evaluation_overloaded",
            d.clone(),
            None,
        ),
        ServiceError::BatchBudget(d) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "batch_budget_exhausted",
            d.clone(),
            None,
        ),
        ServiceError::AgentUnconfigured(d) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "agent_unconfigured",
            d.clone(),
            None,
        ),
        ServiceError::TooManyRuns(d) => (
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_runs",
            d.clone(),
            None,
        ),
        // Internals never leak: the detail is generic, the cause is in the log under the
        // body's error id.
        ServiceError::Store(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the store is unavailable; retry shortly".to_string(),
            None,
        ),
        ServiceError::Internal(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred; it has been logged".to_string(),
            None,
        ),
    }
}

pub(crate) fn from_route_error(e: RouteError) -> Response<Full<Bytes>> {
    match e {
        RouteError::NotFound(path) => respond(
            StatusCode::NOT_FOUND,
            &document(
                StatusCode::NOT_FOUND,
                "route_not_found",
                &format!("no route for '{path}'"),
                None,
            ),
        ),
        RouteError::MethodNotAllowed(allowed) => {
            let mut r = respond(
                StatusCode::METHOD_NOT_ALLOWED,
                &document(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    &format!("this route accepts {}", super::allow_header(&allowed)),
                    None,
                ),
            );
            if let Ok(v) = HeaderValue::from_str(&super::allow_header(&allowed)) {
                r.headers_mut().insert(ALLOW, v);
            }
            r
        }
    }
}

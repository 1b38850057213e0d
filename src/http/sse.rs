//! The World Agent's event streams (`text/event-stream`): a thread's log from the store, each
//! event with its `seq` as its SSE `id`, so a client that reconnects with `Last-Event-ID`
//! gets exactly the events after the last one it saw (docs/agent.md, "Streams"). The stream
//! reads the store, not the worker, so it works with the API and the workers in separate
//! processes; it is woken by this process's commits that change its thread, on Postgres by the
//! notification every committed thread event sends (`service::agent::StreamWakes`), and
//! otherwise looks again after a short wait. A stream ends when what it follows has: a chat turn's `turn_finished`, or a run's end.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use super::{mcp::Out, HttpError};
use crate::service::agent::EVERY_THREAD;
use crate::service::{App, ServiceError};
use crate::store::{ThreadChanged, ThreadEvent, ThreadRecord, RUNNING};
use tokio::sync::broadcast::error::RecvError;

/// What ends a stream.
#[derive(Debug, Clone, Copy)]
pub(super) enum Until {
    /// The first `turn_finished` after the event with this seq.
    TurnAfter(u64),
    /// The thread is no longer running and every event has been sent.
    ThreadEnds,
}

/// The `Last-Event-ID` a client reconnects with: the seq of the last event it saw.
pub(super) fn last_event_id(req: &Request<Incoming>) -> Result<Option<u64>, HttpError> {
    let Some(v) = req.headers().get("last-event-id") else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            HttpError::Service(ServiceError::BadRequest(
                "Last-Event-ID must be the id (a whole number) of an event of this stream".into(),
            ))
        })
}

/// One event in SSE framing. `data` is one line of JSON, so it needs no continuation lines.
fn frame(e: &ThreadEvent) -> Bytes {
    let data = serde_json::json!({
        "seq": e.seq,
        "step": e.step,
        "kind": e.kind,
        "data": e.data,
        "at": e.created_at,
    });
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        e.seq, e.kind, data
    ))
}

struct Follow {
    app: Arc<App>,
    thread: ThreadRecord,
    after: u64,
    until: Until,
    pending: std::collections::VecDeque<ThreadEvent>,
    done: bool,
    deadline: tokio::time::Instant,
    quiet_since: tokio::time::Instant,
    /// Subscribed before the first look, so that no change after it is missed.
    changes: tokio::sync::broadcast::Receiver<ThreadChanged>,
    _permit: OwnedSemaphorePermit,
}

/// How long a stream waits between looks at the store when nothing woke it and no
/// notifications arrive (SQLite, or the Postgres listener is off or down).
const POLL: Duration = Duration::from_millis(100);
/// The same while notifications arrive: a safety net only.
const POLL_LISTENING: Duration = Duration::from_secs(1);
/// A comment line sent after this much silence, so that proxies keep the stream open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

impl Follow {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if self.done {
                return None;
            }
            if let Some(e) = self.pending.pop_front() {
                self.after = e.seq;
                self.quiet_since = tokio::time::Instant::now();
                if let Until::TurnAfter(seq) = self.until {
                    if e.kind == "turn_finished" && e.seq > seq {
                        self.done = true;
                    }
                }
                return Some(frame(&e));
            }
            if tokio::time::Instant::now() >= self.deadline {
                self.done = true;
                return Some(Bytes::from_static(
                    b"event: stream_timeout\ndata: {\"code\":\"stream_timeout\"}\n\n",
                ));
            }
            match self.app.agent_events(&self.thread, self.after).await {
                Ok(events) if !events.is_empty() => {
                    self.pending.extend(events);
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, thread = %self.thread.id, "an agent stream cannot read its thread");
                    self.done = true;
                    return Some(Bytes::from_static(
                        b"event: error\ndata: {\"code\":\"unavailable\"}\n\n",
                    ));
                }
            }
            if matches!(self.until, Until::ThreadEnds) {
                match self.app.agent_thread_now(&self.thread).await {
                    Ok(t) if t.status != RUNNING => {
                        // Events written with the end are read once more before stopping.
                        match self.app.agent_events(&self.thread, self.after).await {
                            Ok(events) if !events.is_empty() => {
                                self.pending.extend(events);
                                continue;
                            }
                            _ => return None,
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
            if self.quiet_since.elapsed() >= KEEP_ALIVE {
                self.quiet_since = tokio::time::Instant::now();
                return Some(Bytes::from_static(b": keep-alive\n\n"));
            }
            let listening = self.app.agent.wakes.listening();
            let poll = if listening { POLL_LISTENING } else { POLL };
            let thread: &str = &self.thread.id;
            let changes = &mut self.changes;
            let changed = async {
                loop {
                    match changes.recv().await {
                        Ok(c) if &*c.thread == thread || &*c.thread == EVERY_THREAD => {
                            return if c.notified { "notification" } else { "commit" };
                        }
                        Ok(_) => {}
                        // Fell behind: whatever was missed may have been ours.
                        Err(RecvError::Lagged(_)) => return "commit",
                        Err(RecvError::Closed) => std::future::pending::<()>().await,
                    }
                }
            };
            let by = tokio::select! {
                by = changed => by,
                _ = tokio::time::sleep(poll) => "poll",
            };
            self.app
                .metrics
                .agent
                .stream_wakes
                .with_label_values(&[by])
                .inc();
        }
    }
}

/// The streaming response following `thread` from the event after `after`.
pub(super) fn respond(
    app: Arc<App>,
    thread: ThreadRecord,
    after: u64,
    until: Until,
) -> Result<Response<Out>, HttpError> {
    let permit = app.agent.streams.clone().try_acquire_owned().map_err(|_| {
        HttpError::Service(ServiceError::Unavailable(
            "too many agent streams are open; retry shortly".into(),
        ))
    })?;
    let lifetime = app.agent.config.max_run_time + Duration::from_secs(60);
    let now = tokio::time::Instant::now();
    let changes = app.store.thread_changes();
    let follow = Follow {
        app,
        thread,
        after,
        until,
        pending: Default::default(),
        done: false,
        deadline: now + lifetime,
        quiet_since: now,
        changes,
        _permit: permit,
    };
    // The stream runs as a task of its own feeding the body; a client that goes away ends it
    // at the next send.
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(8);
    let mut follow = follow;
    tokio::spawn(async move {
        while let Some(bytes) = follow.next().await {
            if tx.send_data(bytes).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(body.boxed());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(r)
}

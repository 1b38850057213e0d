//! A real HTTP server standing in for an OpenAI-compatible LLM provider: a plain TCP listener
//! on loopback that answers scripted replies, streaming them for real (chunked transfer, one
//! write and flush per piece, pauses between them), and records every request with the
//! server's clock of its arrival.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// One scripted reply.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `text/event-stream`: each event's data is sent as `data: …\n\n`.
    Stream {
        events: Vec<String>,
        /// Pause after the headers, before the first event.
        first_delay: Duration,
        /// Pause between events.
        between: Duration,
        /// Close the connection after this many events, without ending the chunked body.
        cut_after: Option<usize>,
        /// Send every event in pieces of this many bytes (splitting UTF-8 sequences too).
        piece: Option<usize>,
    },
    /// A JSON body with a status and extra headers.
    Json {
        status: u16,
        headers: Vec<(String, String)>,
        body: Value,
    },
}

impl Reply {
    /// A stream of these events, sent at once; an event that starts with `raw:` is sent as
    /// the frame that follows, verbatim.
    pub fn stream(events: Vec<String>) -> Self {
        Self::Stream {
            events,
            first_delay: Duration::ZERO,
            between: Duration::ZERO,
            cut_after: None,
            piece: None,
        }
    }

    pub fn json(status: u16, body: Value) -> Self {
        Self::Json {
            status,
            headers: Vec::new(),
            body,
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        if let Self::Json { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }

    pub fn first_delay(mut self, d: Duration) -> Self {
        if let Self::Stream { first_delay, .. } = &mut self {
            *first_delay = d;
        }
        self
    }

    pub fn between(mut self, d: Duration) -> Self {
        if let Self::Stream { between, .. } = &mut self {
            *between = d;
        }
        self
    }

    pub fn cut_after(mut self, n: usize) -> Self {
        if let Self::Stream { cut_after, .. } = &mut self {
            *cut_after = Some(n);
        }
        self
    }

    pub fn in_pieces(mut self, n: usize) -> Self {
        if let Self::Stream { piece, .. } = &mut self {
            *piece = Some(n);
        }
        self
    }
}

/// One request the server got.
#[derive(Debug, Clone)]
pub struct Received {
    /// When it arrived, by the server's clock.
    pub at: Instant,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<Reply>,
    received: Vec<Received>,
    /// Replies whose client went away before the reply was written in full.
    abandoned: usize,
}

/// The stand-in provider.
#[derive(Clone)]
pub struct Llm {
    /// The base URL to configure (`…/v1`).
    pub base_url: String,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

impl Llm {
    /// Serve these replies in order; a request past the end of the script is answered 500.
    pub async fn start(script: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base_url = format!("http://{}/v1", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State {
            script: script.into(),
            ..State::default()
        }));
        let changed = Arc::new(Notify::new());
        let (s, n) = (state.clone(), changed.clone());
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (s, n) = (s.clone(), n.clone());
                tokio::spawn(async move {
                    let complete = serve(socket, &s).await;
                    if !complete {
                        s.lock().unwrap().abandoned += 1;
                    }
                    n.notify_waiters();
                });
            }
        });
        Self {
            base_url,
            state,
            changed,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn abandoned(&self) -> usize {
        self.state.lock().unwrap().abandoned
    }

    /// Wait until `probe` holds of the server's state, for at most `within`.
    pub async fn wait_for(&self, within: Duration, what: &str, probe: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.changed.notified();
            if probe(self) {
                return;
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok() || probe(self),
                "{what} did not happen within {within:?}"
            );
        }
    }
}

/// Read one request, answer it from the script; whether the reply was written in full.
async fn serve(mut socket: TcpStream, state: &Mutex<State>) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = find(&buf, b"\r\n\r\n") {
            break at;
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        assert!(buf.len() < 1 << 20, "request head too large");
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_default()
        .to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let reply = {
        let mut s = state.lock().unwrap();
        s.received.push(Received {
            at: Instant::now(),
            path,
            headers,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
        s.script.pop_front()
    };
    let reply =
        reply.unwrap_or_else(|| Reply::json(500, json!({"error": {"message": "script ended"}})));
    write_reply(&mut socket, reply).await.is_ok()
}

async fn write_reply(socket: &mut TcpStream, reply: Reply) -> std::io::Result<()> {
    match reply {
        Reply::Json {
            status,
            headers,
            body,
        } => {
            let body = body.to_string();
            let mut head = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                body.len()
            );
            for (n, v) in headers {
                head.push_str(&format!("{n}: {v}\r\n"));
            }
            head.push_str("\r\n");
            socket.write_all(head.as_bytes()).await?;
            socket.write_all(body.as_bytes()).await?;
            socket.flush().await
        }
        Reply::Stream {
            events,
            first_delay,
            between,
            cut_after,
            piece,
        } => {
            socket
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
                )
                .await?;
            socket.flush().await?;
            // The scripted slowness under test (a late first token, a paced stream), not a
            // wait for something to happen: nothing here is synchronised by time.
            tokio::time::sleep(first_delay).await;
            for (i, event) in events.iter().enumerate() {
                if cut_after == Some(i) {
                    // Gone mid-body: no terminating chunk.
                    return socket.shutdown().await;
                }
                if i > 0 {
                    tokio::time::sleep(between).await;
                }
                // `raw:` sends the frame as it is (comments, CRLF, other fields).
                let frame = match event.strip_prefix("raw:") {
                    Some(raw) => raw.to_string(),
                    None => format!("data: {event}\n\n"),
                };
                let bytes = frame.as_bytes();
                for part in bytes.chunks(piece.unwrap_or(bytes.len()).max(1)) {
                    socket
                        .write_all(format!("{:x}\r\n", part.len()).as_bytes())
                        .await?;
                    socket.write_all(part).await?;
                    socket.write_all(b"\r\n").await?;
                    socket.flush().await?;
                }
            }
            socket.write_all(b"0\r\n\r\n").await?;
            socket.flush().await
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---- chunks of a streamed answer, as an OpenAI-compatible server sends them

fn chunk(choices: Value) -> String {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "stand-in-1",
        "choices": choices,
    })
    .to_string()
}

/// The first chunk: the assistant's role and no content.
pub fn role() -> String {
    chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
    )
}

pub fn text(t: &str) -> String {
    chunk(json!([{"index": 0, "delta": {"content": t}, "finish_reason": null}]))
}

/// A fragment of the tool call at `index`; `id` and `name` only on its first.
pub fn tool(index: usize, id: Option<&str>, name: Option<&str>, args: &str) -> String {
    let mut call = json!({"index": index, "function": {"arguments": args}});
    if let Some(id) = id {
        call["id"] = json!(id);
        call["type"] = json!("function");
    }
    if let Some(name) = name {
        call["function"]["name"] = json!(name);
    }
    chunk(json!([{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": null}]))
}

pub fn finish(reason: &str) -> String {
    chunk(json!([{"index": 0, "delta": {}, "finish_reason": reason}]))
}

/// The usage chunk of `stream_options.include_usage`.
pub fn usage(prompt: u64, completion: u64) -> String {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "stand-in-1",
        "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    })
    .to_string()
}

pub fn done() -> String {
    "[DONE]".into()
}

/// A whole streamed text answer.
pub fn text_answer(parts: &[&str]) -> Vec<String> {
    let mut events = vec![role()];
    events.extend(parts.iter().map(|p| text(p)));
    events.extend([finish("stop"), usage(10, parts.len() as u64), done()]);
    events
}

/// A whole answer as one JSON body.
pub fn whole(text: Option<&str>, calls: Value, finish_reason: &str) -> Value {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "stand-in-1",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": calls},
            "finish_reason": finish_reason,
        }],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    })
}

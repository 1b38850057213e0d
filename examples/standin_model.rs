//! A stand-in model for `bench/agent.sh`: an OpenAI-compatible `POST …/chat/completions`
//! server that answers every call the World Agent makes (docs/agent.md, "The provider
//! contract") with a streamed tool call, paced like a real model, so that authoring runs can be
//! driven against a running service without a real model.
//!
//! It answers by the named `tool_choice`: `propose_rule` with a rule for `globex-support` /
//! `refund.issue` whose predicate passes its cases, `propose_cases` with those cases, and
//! anything else with a `reply` call. The call's arguments are sent in pieces of `--piece`
//! bytes, one chunk every `--between-ms`, so a run streams many token events.
//!
//! Usage: `cargo run --release --example standin_model -- --port 18090 [--between-ms 2]
//! [--piece 7]`. Listens on 127.0.0.1 only; runs until killed.

#![expect(
    clippy::unwrap_used,
    reason = "a benchmark helper, not service code: failing to bind or start is a plain crash"
)]

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(
    name = "standin_model",
    about = "A paced OpenAI-compatible stand-in model"
)]
struct Args {
    /// Port on 127.0.0.1.
    #[arg(long, default_value_t = 18090)]
    port: u16,
    /// Time between two chunks of a streamed answer.
    #[arg(long, default_value_t = 2)]
    between_ms: u64,
    /// Bytes of the tool call's arguments per chunk.
    #[arg(long, default_value_t = 7)]
    piece: usize,
}

const TEXT: &str = "A refund to store credit of more than 500 EUR needs a person to look at it.";
const PREDICATE: &str =
    r#"context.refund_method == "store_credit" && context.refund_amount > 500.0"#;
/// The largest request body read.
const MAX_BODY: usize = 8 << 20;

/// The tool call that answers a request naming `tool`.
fn answer(tool: &str) -> (String, Value) {
    match tool {
        "propose_rule" => (
            tool.into(),
            json!({
                "id": "large-store-credit",
                "text": TEXT,
                "severity": "T2",
                "outcome": "YELLOW",
                "inputs": ["refund_amount", "refund_method"],
                "predicate": PREDICATE,
            }),
        ),
        "propose_cases" => {
            let case = |amount: f64, method: &str, matches: bool| json!({"context": {"refund_amount": amount, "refund_method": method}, "matches": matches});
            (
                tool.into(),
                json!({"cases": [
                    case(600.0, "store_credit", true),
                    case(500.0, "store_credit", false),
                    case(900.0, "bank_transfer", false),
                    case(20.0, "original_payment", false),
                ]}),
            )
        }
        _ => (
            "reply".into(),
            json!({"text": "Refunds to store credit above 500 EUR are looked at by a person."}),
        ),
    }
}

fn chunk(choices: Value, usage: Option<Value>) -> Bytes {
    let mut c = json!({
        "id": "chatcmpl-standin",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "stand-in",
        "choices": choices,
    });
    if let Some(u) = usage {
        c["usage"] = u;
    }
    Bytes::from(format!("data: {c}\n\n"))
}

/// The frames of a streamed tool call of `name` with `args`, `piece` bytes at a time.
fn frames(name: &str, args: &Value, piece: usize) -> Vec<Bytes> {
    let text = args.to_string();
    let mut out = vec![chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
        None,
    )];
    // Split on character boundaries: the arguments may hold non-ASCII text.
    let mut start = 0;
    let mut first = true;
    while start < text.len() {
        let mut end = (start + piece.max(1)).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        let mut call = json!({"index": 0, "function": {"arguments": &text[start..end]}});
        if first {
            call["id"] = json!("call_1");
            call["type"] = json!("function");
            call["function"]["name"] = json!(name);
            first = false;
        }
        out.push(chunk(
            json!([{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": null}]),
            None,
        ));
        start = end;
    }
    out.push(chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
        None,
    ));
    let completion = out.len() as u64;
    out.push(chunk(
        json!([]),
        Some(json!({"prompt_tokens": 900, "completion_tokens": completion, "total_tokens": 900 + completion})),
    ));
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}

type Body = BoxBody<Bytes, Infallible>;

async fn handle(req: Request<Incoming>, between: Duration, piece: usize) -> Response<Body> {
    let path_ok = req.uri().path().ends_with("/chat/completions");
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
    };
    if !path_ok {
        return plain(StatusCode::NOT_FOUND, "only POST …/chat/completions");
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let tool = request["tool_choice"]["function"]["name"]
        .as_str()
        .unwrap_or("reply");
    let (name, args) = answer(tool);
    let frames = frames(&name, &args, piece);
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
    tokio::spawn(async move {
        for (i, frame) in frames.into_iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(between).await;
            }
            if tx.send_data(frame).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(body.boxed());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed());
    *r.status_mut() = status;
    r
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let between = Duration::from_millis(args.between_ms);
    let piece = args.piece;
    let listener = TcpListener::bind(("127.0.0.1", args.port)).await.unwrap();
    eprintln!("stand-in model on http://127.0.0.1:{}/v1", args.port);
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(move |req| async move {
                Ok::<_, Infallible>(handle(req, between, piece).await)
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

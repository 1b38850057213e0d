//! The LLM provider against a real HTTP server standing in for an OpenAI-compatible endpoint
//! (`llm.rs`): streaming, tool calls split over many deltas, usage, the non-streaming
//! fallback, retries, timeouts, cancellation, and the key kept out of every error.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use spectral::agent::provider::{
    Arguments, FinishReason, Message, Progress, Provider, ProviderError, Request, ToolChoice, Usage,
};
use spectral::agent::tools;
use spectral::config::{AgentConfig, Secret};
use spectral::worlds::{Severity, Status};
use tokio_util::sync::CancellationToken;

use crate::llm::{self, Llm, Reply};

const KEY: &str = "sk-test-7f3a9c1e5b2d";

fn config(llm: &Llm) -> AgentConfig {
    AgentConfig {
        base_url: Some(llm.base_url.parse().unwrap()),
        model: "stand-in-1".into(),
        api_key: Some(Secret::new(KEY)),
        // Waits the tests do not mean to measure stay short.
        retry_base: Duration::from_millis(1),
        retry_cap: Duration::from_millis(5),
        first_token_timeout: Duration::from_secs(10),
        call_timeout: Duration::from_secs(30),
        ..AgentConfig::default()
    }
}

fn request() -> Request {
    Request {
        messages: vec![
            Message::System("You write rules.".into()),
            Message::User("Refunds over 500 need review.".into()),
        ],
        tools: vec![tools::propose_rule()],
        tool_choice: ToolChoice::Named(tools::PROPOSE_RULE.into()),
        temperature: Some(0.0),
    }
}

/// Call with `config`, collecting the progress reports.
async fn call(
    config: &AgentConfig,
) -> (
    Result<spectral::agent::provider::Completion, ProviderError>,
    Vec<Progress>,
) {
    let provider = Provider::new(config).unwrap();
    let mut seen = Vec::new();
    let r = provider
        .complete(&request(), &CancellationToken::new(), |p| seen.push(p))
        .await;
    (r, seen)
}

fn texts(seen: &[Progress]) -> Vec<String> {
    seen.iter()
        .filter_map(|p| match p {
            Progress::Text(t) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

fn assert_no_key(e: &ProviderError) {
    let printed = format!("{e} | {e:?}");
    assert!(!printed.contains(KEY), "{printed}");
    assert!(!printed.contains("7f3a9c1e"), "{printed}");
}

#[tokio::test]
async fn streams_content_in_order_with_usage_and_sends_the_key_as_bearer() {
    let llm = Llm::start(vec![Reply::stream(llm::text_answer(&[
        "Hel",
        "lo",
        " wörld ✓",
    ]))
    .between(Duration::from_millis(5))])
    .await;
    let (r, seen) = call(&config(&llm)).await;
    let c = r.unwrap();
    assert_eq!(c.text, "Hello wörld ✓");
    assert_eq!(texts(&seen), ["Hel", "lo", " wörld ✓"]);
    assert_eq!(c.finish_reason, Some(FinishReason::Stop));
    assert_eq!(
        c.usage,
        Some(Usage {
            prompt_tokens: 10,
            completion_tokens: 3
        })
    );
    assert_eq!(c.model, "stand-in-1");
    assert!(c.streamed);
    assert_eq!(c.attempts, 1);
    assert!(c.latency >= c.first_token);

    let got = llm.received();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(r.body["model"], "stand-in-1");
    assert_eq!(r.body["stream"], true);
    assert_eq!(r.body["stream_options"], json!({"include_usage": true}));
    assert_eq!(r.body["max_tokens"], 4096);
    assert_eq!(
        r.body["messages"][1],
        json!({"role": "user", "content": "Refunds over 500 need review."})
    );
    assert_eq!(r.body["tools"][0]["function"]["name"], "propose_rule");
    assert_eq!(
        r.body["tools"][0]["function"]["parameters"],
        tools::propose_rule().parameters
    );
    assert_eq!(
        r.body["tool_choice"],
        json!({"type": "function", "function": {"name": "propose_rule"}})
    );
}

#[tokio::test]
async fn framing_survives_events_split_across_writes_mid_character() {
    let llm = Llm::start(vec![Reply::stream(llm::text_answer(&[
        "héllo ",
        "wörld ✓✓",
    ]))
    .in_pieces(3)])
    .await;
    let (r, _) = call(&config(&llm)).await;
    assert_eq!(r.unwrap().text, "héllo wörld ✓✓");
}

#[tokio::test]
async fn comments_crlf_other_fields_and_multi_line_data_follow_the_sse_standard() {
    let events = vec![
        "raw:: keep-alive\n\n".to_string(),
        "raw:event: ping\ndata: {}\n\n".to_string(),
        llm::role(),
        format!("raw:id: 7\r\ndata: {}\r\n\r\n", llm::text("one ")),
        // One JSON text over two data lines, joined by a newline.
        "raw:data: {\"choices\": [{\"index\": 0,\ndata: \"delta\": {\"content\": \"two\"}}]}\n\n"
            .to_string(),
        llm::finish("stop"),
        llm::done(),
    ];
    let llm = Llm::start(vec![Reply::stream(events)]).await;
    let (r, _) = call(&config(&llm)).await;
    let c = r.unwrap();
    assert_eq!(c.text, "one two");
    assert_eq!(c.attempts, 1);
}

#[tokio::test]
async fn a_tool_call_split_over_many_deltas_is_joined_and_parsed() {
    let args = json!({
        "id": "big-refund",
        "text": "Refunds over 500 need review.",
        "severity": "T2",
        "outcome": "YELLOW",
        "inputs": ["amount"],
        "predicate": "context.amount > 500"
    })
    .to_string();
    let mut events = vec![
        llm::role(),
        llm::tool(0, Some("call_a"), Some("propose_"), ""),
    ];
    events.push(llm::tool(0, None, Some("rule"), ""));
    // A second call interleaved at index 1, the arguments of both in small pieces.
    events.push(llm::tool(
        1,
        Some("call_b"),
        Some("propose_cases"),
        "{\"cases\":",
    ));
    let pieces: Vec<String> = args
        .chars()
        .collect::<Vec<_>>()
        .chunks(7)
        .map(|c| c.iter().collect())
        .collect();
    for (i, p) in pieces.iter().enumerate() {
        events.push(llm::tool(0, None, None, p));
        if i == 2 {
            events.push(llm::tool(1, None, None, "[{\"context\":{\"amount\":501},"));
        }
    }
    events.push(llm::tool(1, None, None, "\"matches\":true}]}"));
    events.extend([llm::finish("tool_calls"), llm::usage(120, 40), llm::done()]);
    let llm = Llm::start(vec![Reply::stream(events)]).await;
    let (r, seen) = call(&config(&llm)).await;
    let c = r.unwrap();
    assert_eq!(c.finish_reason, Some(FinishReason::ToolCalls));
    assert_eq!(c.tool_calls.len(), 2);
    assert_eq!(c.tool_calls[0].id, "call_a");
    assert_eq!(c.tool_calls[0].name, "propose_rule");
    assert_eq!(c.tool_calls[1].name, "propose_cases");
    assert!(
        seen.iter()
            .filter(|p| matches!(p, Progress::ToolCall { index: 0, .. }))
            .count()
            > 10
    );

    let rule = tools::parse_rule(&c.tool_calls).unwrap();
    assert_eq!(rule.call_id, "call_a");
    assert_eq!(rule.value.id, "big-refund");
    assert_eq!(rule.value.severity, Severity::T2);
    assert_eq!(rule.value.outcome, Status::Yellow);
    assert_eq!(rule.value.predicate, "context.amount > 500");
    let cases = tools::parse_cases(&c.tool_calls).unwrap();
    assert_eq!(cases.value.len(), 1);
    assert!(cases.value[0].matches);
    assert_eq!(c.usage.map(|u| u.prompt_tokens), Some(120));
}

#[tokio::test]
async fn arguments_that_are_not_json_are_a_repair_not_a_failure() {
    let events = vec![
        llm::role(),
        llm::tool(0, Some("call_x"), Some("propose_rule"), "{\"id\": \"a\", "),
        llm::tool(0, None, None, "\"text\": oops}"),
        llm::finish("tool_calls"),
        llm::done(),
    ];
    let llm = Llm::start(vec![Reply::stream(events)]).await;
    let (r, _) = call(&config(&llm)).await;
    let c = r.unwrap();
    assert!(matches!(
        c.tool_calls[0].arguments,
        Arguments::Malformed { .. }
    ));
    let repair = tools::parse_rule(&c.tool_calls).unwrap_err();
    assert_eq!(repair.code(), "arguments_not_json");
    assert!(matches!(repair.message(), Message::Tool { call_id, .. } if call_id == "call_x"));
    assert_eq!(c.usage, None, "no usage chunk was sent");
}

#[tokio::test]
async fn usage_is_read_when_choices_is_null() {
    let usage_null = json!({
        "id": "c", "object": "chat.completion.chunk", "model": "m", "choices": null,
        "usage": {"prompt_tokens": 3, "completion_tokens": 2}
    })
    .to_string();
    let events = vec![
        llm::role(),
        llm::text("ok"),
        llm::finish("stop"),
        usage_null,
        llm::done(),
    ];
    let llm = Llm::start(vec![Reply::stream(events)]).await;
    let (r, _) = call(&config(&llm)).await;
    assert_eq!(
        r.unwrap()
            .usage
            .map(|u| (u.prompt_tokens, u.completion_tokens)),
        Some((3, 2))
    );
}

#[tokio::test]
async fn a_malformed_chunk_is_retried_and_the_next_answer_used() {
    let bad = vec![
        llm::role(),
        llm::text("garb"),
        "{\"choices\": [".to_string(),
        llm::done(),
    ];
    let llm = Llm::start(vec![
        Reply::stream(bad.clone()),
        Reply::stream(llm::text_answer(&["fine"])),
    ])
    .await;
    let (r, seen) = call(&config(&llm)).await;
    let c = r.unwrap();
    assert_eq!(c.text, "fine");
    assert_eq!(c.attempts, 2);
    assert!(seen
        .iter()
        .any(|p| matches!(p, Progress::Retry { reason, .. } if reason.contains("not JSON"))));
    assert_eq!(llm.received().len(), 2);

    // With one attempt, the call ends with that cause, named.
    let llm = Llm::start(vec![Reply::stream(bad)]).await;
    let (r, _) = call(&AgentConfig {
        max_attempts: 1,
        ..config(&llm)
    })
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.code(), "provider_malformed");
    assert!(
        matches!(&e, ProviderError::GaveUp { attempts: 1, .. }),
        "{e}"
    );
}

#[tokio::test]
async fn a_stream_cut_before_done_is_retried_and_the_retried_answer_used() {
    let llm = Llm::start(vec![
        Reply::stream(llm::text_answer(&["first ", "try ", "lost"])).cut_after(3),
        Reply::stream(llm::text_answer(&["second"])),
    ])
    .await;
    let (r, seen) = call(&config(&llm)).await;
    let c = r.unwrap();
    assert_eq!(c.text, "second", "only the retried answer");
    assert_eq!(c.attempts, 2);
    // The progress shows the void attempt's tokens, then the retry, then the answer.
    let retry_at = seen
        .iter()
        .position(|p| matches!(p, Progress::Retry { .. }))
        .unwrap();
    assert_eq!(texts(&seen[..retry_at]), ["first ", "try "]);
    assert_eq!(texts(&seen[retry_at..]), ["second"]);
    assert_eq!(llm.received().len(), 2);
}

#[tokio::test]
async fn a_stream_that_ends_cleanly_without_done_counts_as_cut() {
    let mut no_done = llm::text_answer(&["half"]);
    no_done.pop();
    let llm = Llm::start(vec![
        Reply::stream(no_done),
        Reply::stream(llm::text_answer(&["whole"])),
    ])
    .await;
    let (r, seen) = call(&config(&llm)).await;
    assert_eq!(r.unwrap().text, "whole");
    assert!(seen
        .iter()
        .any(|p| matches!(p, Progress::Retry { reason, .. } if reason.contains("[DONE]"))));
}

#[tokio::test]
async fn an_error_event_inside_the_stream_is_retried() {
    let err = json!({"error": {"message": "upstream overloaded"}}).to_string();
    let llm = Llm::start(vec![
        Reply::stream(vec![llm::role(), err]),
        Reply::stream(llm::text_answer(&["ok"])),
    ])
    .await;
    let (r, seen) = call(&config(&llm)).await;
    assert_eq!(r.unwrap().text, "ok");
    assert!(seen.iter().any(
        |p| matches!(p, Progress::Retry { reason, .. } if reason.contains("upstream overloaded"))
    ));
}

#[tokio::test]
async fn a_429_is_retried_no_sooner_than_its_retry_after() {
    let llm = Llm::start(vec![
        Reply::json(429, json!({"error": {"message": "rate limited"}}))
            .with_header("retry-after", "1"),
        Reply::stream(llm::text_answer(&["ok"])),
    ])
    .await;
    let (r, _) = call(&config(&llm)).await;
    assert_eq!(r.unwrap().text, "ok");
    let got = llm.received();
    assert_eq!(got.len(), 2);
    // Measured by the server's clock of arrivals; the jittered backoff alone is at most 5 ms.
    let gap = got[1].at - got[0].at;
    assert!(gap >= Duration::from_secs(1), "retried after {gap:?}");
}

/// The same wait on tokio's paused clock: a two-minute `Retry-After` is waited out in full,
/// without the test waiting for it.
#[tokio::test(start_paused = true)]
async fn a_long_retry_after_is_waited_out_on_the_runtimes_clock() {
    let llm = Llm::start(vec![
        Reply::json(429, json!({"error": {"message": "rate limited"}}))
            .with_header("retry-after", "120"),
        Reply::stream(llm::text_answer(&["ok"])),
    ])
    .await;
    let config = AgentConfig {
        call_timeout: Duration::from_secs(600),
        first_token_timeout: Duration::from_secs(300),
        ..config(&llm)
    };
    let started = tokio::time::Instant::now();
    let (r, seen) = call(&config).await;
    let c = r.unwrap();
    assert_eq!((c.text.as_str(), c.attempts), ("ok", 2));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(120),
        "retried after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(125),
        "the jittered backoff alone is at most 5 ms: {waited:?}"
    );
    assert!(seen
        .iter()
        .any(|p| matches!(p, Progress::Retry { delay, .. } if *delay >= Duration::from_secs(120))));
}

/// Full-jitter backoff between 5xx answers, on the paused clock: every wait lies within its
/// doubling window, so three retries with a 1 s base and an 8 s cap take at most 1+2+4 s.
#[tokio::test(start_paused = true)]
async fn backoff_between_5xx_answers_stays_within_its_window() {
    let llm = Llm::start(vec![
        Reply::json(500, json!({"error": {"message": "boom"}})),
        Reply::json(502, json!({"error": {"message": "bad gateway"}})),
        Reply::json(503, json!({"error": {"message": "busy"}})),
        Reply::stream(llm::text_answer(&["ok"])),
    ])
    .await;
    let config = AgentConfig {
        retry_base: Duration::from_secs(1),
        retry_cap: Duration::from_secs(8),
        call_timeout: Duration::from_secs(600),
        first_token_timeout: Duration::from_secs(300),
        ..config(&llm)
    };
    let started = tokio::time::Instant::now();
    let (r, seen) = call(&config).await;
    assert_eq!(r.unwrap().attempts, 4);
    let delays: Vec<Duration> = seen
        .iter()
        .filter_map(|p| match p {
            Progress::Retry { delay, .. } => Some(*delay),
            _ => None,
        })
        .collect();
    assert_eq!(delays.len(), 3);
    for (i, d) in delays.iter().enumerate() {
        assert!(
            *d <= Duration::from_secs(1 << i),
            "retry {} waited {d:?}",
            i + 1
        );
    }
    let waited = started.elapsed();
    let total: Duration = delays.iter().sum();
    assert!(waited >= total, "{waited:?} < the delays' sum {total:?}");
    assert!(
        waited <= Duration::from_secs(7) + Duration::from_millis(100),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_500_then_success_succeeds() {
    let llm = Llm::start(vec![
        Reply::json(500, json!({"error": {"message": "boom"}})),
        Reply::json(503, json!({"error": "busy"})),
        Reply::stream(llm::text_answer(&["ok"])),
    ])
    .await;
    let (r, seen) = call(&config(&llm)).await;
    let c = r.unwrap();
    assert_eq!((c.text.as_str(), c.attempts), ("ok", 3));
    assert_eq!(
        seen.iter()
            .filter(|p| matches!(p, Progress::Retry { .. }))
            .count(),
        2
    );
}

#[tokio::test]
async fn retries_are_bounded() {
    let script = (0..10)
        .map(|_| Reply::json(502, json!({"error": {"message": "bad gateway"}})))
        .collect();
    let llm = Llm::start(script).await;
    let (r, _) = call(&AgentConfig {
        max_attempts: 3,
        ..config(&llm)
    })
    .await;
    let e = r.unwrap_err();
    assert!(
        matches!(&e, ProviderError::GaveUp { attempts: 3, last } if matches!(**last, ProviderError::Unavailable { status: 502, .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("bad gateway"), "{e}");
    assert_eq!(llm.received().len(), 3);
}

#[tokio::test]
async fn a_retry_after_past_the_call_deadline_gives_up_at_once() {
    let llm = Llm::start(vec![Reply::json(
        429,
        json!({"error": {"message": "slow down"}}),
    )
    .with_header("retry-after", "3600")])
    .await;
    let (r, _) = call(&AgentConfig {
        call_timeout: Duration::from_secs(5),
        ..config(&llm)
    })
    .await;
    let e = r.unwrap_err();
    assert!(
        matches!(&e, ProviderError::GaveUp { attempts: 1, .. }),
        "{e:?}"
    );
    assert_eq!(e.code(), "provider_unavailable");
    assert_eq!(llm.received().len(), 1);
}

#[tokio::test]
async fn a_400_is_terminal_with_the_servers_message() {
    let llm = Llm::start(vec![Reply::json(
        400,
        json!({"error": {"message": "model 'stand-in-1' does not support tools", "type": "invalid_request_error"}}),
    )])
    .await;
    let (r, _) = call(&config(&llm)).await;
    let e = r.unwrap_err();
    assert_eq!(
        e,
        ProviderError::Rejected {
            status: 400,
            message: "model 'stand-in-1' does not support tools".into()
        }
    );
    assert_eq!(e.code(), "provider_rejected");
    assert_eq!(llm.received().len(), 1, "not retried");
}

#[tokio::test]
async fn a_401_never_shows_the_key_even_when_the_server_echoes_it() {
    let llm = Llm::start(vec![Reply::json(
        401,
        json!({"error": {"message": format!("Incorrect API key provided: {KEY}. Header was: Bearer {KEY}")}}),
    )])
    .await;
    let (r, _) = call(&config(&llm)).await;
    let e = r.unwrap_err();
    assert!(
        matches!(&e, ProviderError::Rejected { status: 401, message } if message.contains("Incorrect API key")),
        "{e}"
    );
    assert_no_key(&e);
    assert_eq!(llm.received().len(), 1);
}

#[tokio::test]
async fn a_slow_first_token_times_out_and_is_retried() {
    let slow = || Reply::stream(llm::text_answer(&["late"])).first_delay(Duration::from_secs(5));
    let llm = Llm::start(vec![slow(), Reply::stream(llm::text_answer(&["quick"]))]).await;
    let cfg = AgentConfig {
        first_token_timeout: Duration::from_millis(300),
        ..config(&llm)
    };
    let (r, _) = call(&cfg).await;
    let c = r.unwrap();
    assert_eq!((c.text.as_str(), c.attempts), ("quick", 2));

    let llm = Llm::start(vec![slow(), slow()]).await;
    let (r, _) = call(&AgentConfig {
        max_attempts: 2,
        ..AgentConfig {
            base_url: Some(llm.base_url.parse().unwrap()),
            ..cfg
        }
    })
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.code(), "first_token_timeout");
    assert!(e.to_string().contains("300ms"), "{e}");
    assert_no_key(&e);
}

#[tokio::test]
async fn the_whole_call_times_out_even_while_tokens_flow() {
    let parts: Vec<String> = (0..200).map(|i| format!("t{i} ")).collect();
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let llm = Llm::start(vec![
        Reply::stream(llm::text_answer(&refs)).between(Duration::from_millis(50))
    ])
    .await;
    let (r, seen) = call(&AgentConfig {
        call_timeout: Duration::from_millis(600),
        ..config(&llm)
    })
    .await;
    assert_eq!(
        r.unwrap_err(),
        ProviderError::Timeout(Duration::from_millis(600))
    );
    assert!(
        !texts(&seen).is_empty(),
        "tokens arrived before the timeout"
    );
    assert!(texts(&seen).len() < 200);
}

#[tokio::test]
async fn cancellation_ends_the_call_and_drops_the_connection() {
    let parts: Vec<String> = (0..400).map(|i| format!("t{i} ")).collect();
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let llm = Llm::start(vec![
        Reply::stream(llm::text_answer(&refs)).between(Duration::from_millis(20))
    ])
    .await;
    let provider = Provider::new(&config(&llm)).unwrap();
    let cancel = CancellationToken::new();
    let tokens = Arc::new(Mutex::new(0usize));
    let (c2, t2) = (cancel.clone(), tokens.clone());
    let r = provider
        .complete(&request(), &cancel, move |p| {
            if let Progress::Text(_) = p {
                let mut n = t2.lock().unwrap();
                *n += 1;
                // Cancelled by the caller once the answer is under way.
                if *n == 3 {
                    c2.cancel();
                }
            }
        })
        .await;
    assert_eq!(r.unwrap_err(), ProviderError::Cancelled);
    assert!(*tokens.lock().unwrap() < 400);
    // The server sees its client go away long before the answer's end.
    llm.wait_for(Duration::from_secs(10), "the stream abandoned", |l| {
        l.abandoned() == 1
    })
    .await;
}

#[tokio::test]
async fn a_json_body_is_read_when_streaming_is_off_and_when_the_server_does_not_stream() {
    let calls = json!([{
        "id": "call_9", "type": "function",
        "function": {"name": "propose_cases", "arguments": "{\"cases\":[{\"context\":{\"amount\":1},\"matches\":false}]}"}
    }]);
    // Off by configuration: the request says so.
    let llm = Llm::start(vec![Reply::json(
        200,
        llm::whole(None, calls.clone(), "tool_calls"),
    )])
    .await;
    let (r, _) = call(&AgentConfig {
        stream: false,
        ..config(&llm)
    })
    .await;
    let c = r.unwrap();
    assert!(!c.streamed);
    assert_eq!(c.finish_reason, Some(FinishReason::ToolCalls));
    assert_eq!(c.usage.map(|u| u.completion_tokens), Some(3));
    assert_eq!(tools::parse_cases(&c.tool_calls).unwrap().value.len(), 1);
    let got = llm.received();
    assert_eq!(got[0].body["stream"], false);
    assert!(got[0].body.get("stream_options").is_none());

    // Asked to stream, answered with JSON: read as JSON, and the text still reported.
    let llm = Llm::start(vec![Reply::json(
        200,
        llm::whole(Some("plain answer"), json!(null), "stop"),
    )])
    .await;
    let (r, seen) = call(&config(&llm)).await;
    let c = r.unwrap();
    assert_eq!(c.text, "plain answer");
    assert!(!c.streamed);
    assert_eq!(texts(&seen), ["plain answer"]);
    assert_eq!(llm.received()[0].body["stream"], true);
}

#[tokio::test]
async fn an_answer_over_the_byte_limit_fails_and_is_not_retried() {
    let big = "x".repeat(4096);
    let llm = Llm::start(vec![Reply::stream(llm::text_answer(&[&big, &big]))]).await;
    let (r, _) = call(&AgentConfig {
        max_response_bytes: 4096,
        ..config(&llm)
    })
    .await;
    assert_eq!(r.unwrap_err(), ProviderError::TooLarge(4096));
    assert_eq!(llm.received().len(), 1);

    // The same answer passes under a limit it fits.
    let llm = Llm::start(vec![Reply::stream(llm::text_answer(&[&big, &big]))]).await;
    let (r, _) = call(&AgentConfig {
        max_response_bytes: 64 * 1024,
        ..config(&llm)
    })
    .await;
    assert_eq!(r.unwrap().text.len(), 8192);
}

#[tokio::test]
async fn an_unreachable_provider_is_retried_then_named() {
    // A port that was just free: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = AgentConfig {
        base_url: Some(format!("http://127.0.0.1:{port}/v1").parse().unwrap()),
        model: "m".into(),
        api_key: Some(Secret::new(KEY)),
        max_attempts: 2,
        retry_base: Duration::from_millis(1),
        retry_cap: Duration::from_millis(2),
        ..AgentConfig::default()
    };
    let (r, seen) = call(&cfg).await;
    let e = r.unwrap_err();
    assert_eq!(e.code(), "provider_unreachable");
    assert!(
        matches!(&e, ProviderError::GaveUp { attempts: 2, .. }),
        "{e:?}"
    );
    assert_eq!(
        seen.iter()
            .filter(|p| matches!(p, Progress::Attempt(_)))
            .count(),
        2
    );
    assert_no_key(&e);
}

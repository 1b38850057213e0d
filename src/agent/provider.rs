//! The LLM provider: OpenAI-compatible chat completions over HTTP, streamed or not, with
//! timeouts, cancellation and retries. The only module that knows the wire format
//! (`provider/wire.rs`); `docs/agent.md` is its contract.
//!
//! Server-sent events are framed by `eventsource-stream` over reqwest's byte stream
//! (ARCHITECTURE.md says why).

mod wire;

use std::time::Duration;

use eventsource_stream::{EventStreamError, Eventsource};
use futures::StreamExt;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, Secret};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", content = "content", rename_all = "snake_case")]
pub enum Message {
    System(String),
    User(String),
    Assistant {
        text: String,
        tool_calls: Vec<ToolCall>,
    },
    /// The answer to a tool call, sent back to the model (a repair message, for instance).
    Tool {
        call_id: String,
        content: String,
    },
}

/// A function the model may call, with the JSON Schema of its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: String,
    pub parameters: serde_json::Value,
}

/// Whether, and which, tool the model must call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ToolChoice {
    #[default]
    Auto,
    Required,
    None,
    Named(String),
}

/// One call to the model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    pub messages: Vec<Message>,
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
    pub temperature: Option<f64>,
}

/// A tool call's arguments: the JSON the model sent, or what it sent when that was not JSON
/// (for the caller to ask for a repair).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arguments {
    Json(serde_json::Value),
    Malformed { raw: String, error: String },
}

impl Arguments {
    /// Parse the joined argument text; no text at all is an empty object.
    pub fn parse(raw: &str) -> Self {
        if raw.trim().is_empty() {
            return Self::Json(serde_json::Value::Object(Default::default()));
        }
        match serde_json::from_str(raw) {
            Ok(v) => Self::Json(v),
            Err(e) => Self::Malformed {
                raw: raw.to_string(),
                error: e.to_string(),
            },
        }
    }

    /// The arguments as the text sent on the wire.
    pub fn raw(&self) -> String {
        match self {
            Self::Json(v) => v.to_string(),
            Self::Malformed { raw, .. } => raw.clone(),
        }
    }
}

/// A tool call of the model's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: Arguments,
}

/// Why the model stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    /// `max_tokens` was reached: the answer is cut.
    Length,
    ToolCalls,
    ContentFilter,
    Other(String),
}

impl FinishReason {
    fn parse(s: &str) -> Self {
        match s {
            "stop" | "eos" => Self::Stop,
            "length" => Self::Length,
            "tool_calls" | "function_call" => Self::ToolCalls,
            "content_filter" => Self::ContentFilter,
            other => Self::Other(other.to_string()),
        }
    }
}

/// Tokens the provider counted for a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The model's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// The model that answered, as the server names it (the configured one when it does not).
    pub model: String,
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    /// `None` when the server gave none.
    pub finish_reason: Option<FinishReason>,
    /// `None` when the server reported none.
    pub usage: Option<Usage>,
    /// From the start of the call to the end of the answer, retries included.
    pub latency: Duration,
    /// From sending the answered attempt to its first token.
    pub first_token: Duration,
    /// Attempts the call took (1 when the first was answered).
    pub attempts: u32,
    /// Whether the answer arrived as a stream.
    pub streamed: bool,
}

/// What a caller is told while a call runs, to show progress.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// An attempt starts (1-based).
    Attempt(u32),
    /// A fragment of the assistant's text.
    Text(String),
    /// A fragment of the tool call at `index` (in order of first appearance).
    ToolCall {
        index: usize,
        name: String,
        arguments: String,
    },
    /// The attempt failed and the call retries after `delay`: what the earlier fragments said
    /// is void.
    Retry {
        attempt: u32,
        delay: Duration,
        reason: String,
    },
}

/// Why a call failed. No variant holds the API key: server messages have it removed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    #[error(
        "the LLM provider is not configured (set SPECTRAL_AGENT_BASE_URL and SPECTRAL_AGENT_MODEL)"
    )]
    Unconfigured,
    /// A 4xx other than 429: retrying would not help.
    #[error("the LLM provider refused the request with HTTP {status}: {message}")]
    Rejected { status: u16, message: String },
    /// 429 or 5xx.
    #[error("the LLM provider answered HTTP {status}: {message}")]
    Unavailable {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("the LLM provider could not be reached: {0}")]
    Connect(String),
    #[error("the LLM provider's answer was cut before its end: {0}")]
    Cut(String),
    #[error("the LLM provider reported an error inside its stream: {0}")]
    InStream(String),
    #[error("the LLM provider sent an answer that is not the chat-completions format: {0}")]
    Malformed(String),
    #[error("no first token from the LLM provider within {0:?}")]
    FirstToken(Duration),
    #[error("the answer exceeded {0} bytes")]
    TooLarge(usize),
    #[error("the LLM call took longer than {0:?}")]
    Timeout(Duration),
    #[error("the LLM call was cancelled")]
    Cancelled,
    #[error("gave up on the LLM provider after {attempts} attempt(s): {last}")]
    GaveUp {
        attempts: u32,
        last: Box<ProviderError>,
    },
}

impl ProviderError {
    /// A stable code for problem documents and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unconfigured => "agent_unconfigured",
            Self::Rejected { .. } => "provider_rejected",
            Self::Unavailable { .. } => "provider_unavailable",
            Self::Connect(_) => "provider_unreachable",
            Self::Cut(_) => "stream_cut",
            Self::InStream(_) => "provider_stream_error",
            Self::Malformed(_) => "provider_malformed",
            Self::FirstToken(_) => "first_token_timeout",
            Self::TooLarge(_) => "response_too_large",
            Self::Timeout(_) => "call_timeout",
            Self::Cancelled => "cancelled",
            Self::GaveUp { last, .. } => last.code(),
        }
    }

    /// Whether another attempt may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. }
                | Self::Connect(_)
                | Self::Cut(_)
                | Self::InStream(_)
                | Self::Malformed(_)
                | Self::FirstToken(_)
        )
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The bytes of the response body, counted against the answer's limit.
#[derive(Debug)]
enum Transport {
    Http(reqwest::Error),
    TooLarge(usize),
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Http(e) => write!(f, "{e}"),
            Self::TooLarge(n) => write!(f, "more than {n} bytes"),
        }
    }
}

/// A client of one OpenAI-compatible endpoint.
#[derive(Debug, Clone)]
pub struct Provider {
    http: reqwest::Client,
    endpoint: url::Url,
    config: AgentConfig,
}

impl Provider {
    /// A client for the configured endpoint; `Unconfigured` without a base URL.
    pub fn new(config: &AgentConfig) -> Result<Self, ProviderError> {
        let Some(base) = &config.base_url else {
            return Err(ProviderError::Unconfigured);
        };
        if config.model.is_empty() {
            return Err(ProviderError::Unconfigured);
        }
        let mut endpoint = base.clone();
        let path = format!("{}/chat/completions", base.path().trim_end_matches('/'));
        endpoint.set_path(&path);
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // The key goes with the request; a redirect could take it elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("spectral/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::Connect(e.without_url().to_string()))?;
        Ok(Self {
            http,
            endpoint,
            config: config.clone(),
        })
    }

    /// The URL calls are sent to.
    pub fn endpoint(&self) -> &url::Url {
        &self.endpoint
    }

    /// The configured model.
    pub fn model(&self) -> &str {
        &self.config.model
    }

    /// Ask the model, retrying what may pass on a second try, within the call timeout; a
    /// cancelled `cancel` ends the call at once with `Cancelled`. `on` sees the answer's
    /// fragments as they arrive.
    pub async fn complete(
        &self,
        request: &Request,
        cancel: &CancellationToken,
        mut on: impl FnMut(Progress) + Send,
    ) -> Result<Completion, ProviderError> {
        let started = Instant::now();
        let deadline = started + self.config.call_timeout;
        let body = wire::request_body(
            &self.config.model,
            self.config.max_tokens,
            request,
            self.config.stream,
        );
        let on: &mut (dyn FnMut(Progress) + Send) = &mut on;
        let work = async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                on(Progress::Attempt(attempt));
                let error = match self.attempt(&body, on).await {
                    Ok(mut c) => {
                        c.attempts = attempt;
                        c.latency = started.elapsed();
                        if c.model.is_empty() {
                            c.model.clone_from(&self.config.model);
                        }
                        return Ok(c);
                    }
                    Err(e) => e,
                };
                if !error.retryable() {
                    return Err(error);
                }
                let give_up = |error| ProviderError::GaveUp {
                    attempts: attempt,
                    last: Box::new(error),
                };
                if attempt >= self.config.max_attempts {
                    return Err(give_up(error));
                }
                let delay = self.delay(attempt, error.retry_after());
                // A wait past the deadline would only end in a timeout.
                if Instant::now() + delay >= deadline {
                    return Err(give_up(error));
                }
                tracing::warn!(
                    attempt,
                    delay_ms = delay.as_millis() as u64,
                    code = error.code(),
                    error = %error,
                    "LLM call failed; retrying"
                );
                on(Progress::Retry {
                    attempt,
                    delay,
                    reason: error.to_string(),
                });
                tokio::time::sleep(delay).await;
            }
        };
        tokio::select! {
            biased;
            () = cancel.cancelled() => Err(ProviderError::Cancelled),
            r = tokio::time::timeout_at(deadline, work) => {
                r.unwrap_or(Err(ProviderError::Timeout(self.config.call_timeout)))
            }
        }
    }

    /// The wait before the attempt after `attempt`: full jitter over an exponential window,
    /// or the server's `Retry-After` when that is longer.
    fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let window = self
            .config
            .retry_base
            .saturating_mul(1u32 << (attempt - 1).min(20))
            .min(self.config.retry_cap);
        let jittered = Duration::from_millis(
            rand::thread_rng().gen_range(0..=window.as_millis().min(u128::from(u64::MAX)) as u64),
        );
        retry_after.map_or(jittered, |r| r.max(jittered))
    }

    fn scrub(&self, text: &str) -> String {
        scrub(text, self.config.api_key.as_ref())
    }

    async fn attempt(
        &self,
        body: &serde_json::Value,
        on: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<Completion, ProviderError> {
        let max = self.config.max_response_bytes;
        let mut rq = self.http.post(self.endpoint.clone()).json(body);
        if let Some(key) = &self.config.api_key {
            rq = rq.bearer_auth(key.expose());
        }
        let sent = Instant::now();
        let first_deadline = sent + self.config.first_token_timeout;
        let first_token = ProviderError::FirstToken(self.config.first_token_timeout);
        let response = tokio::time::timeout_at(first_deadline, rq.send())
            .await
            .map_err(|_| first_token.clone())?
            .map_err(|e| self.transport(e))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = retry_after(response.headers());
            let text = self.read_all(response, 64 * 1024).await.unwrap_or_default();
            let message = self.scrub(&wire::error_message(&String::from_utf8_lossy(&text)));
            let status = status.as_u16();
            return Err(if status == 429 || status >= 500 {
                ProviderError::Unavailable {
                    status,
                    message,
                    retry_after,
                }
            } else {
                ProviderError::Rejected { status, message }
            });
        }
        let is_stream = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        if !is_stream {
            // A JSON body: asked for, or the server does not stream.
            let bytes = self.read_all(response, max).await?;
            let whole: wire::Whole = serde_json::from_slice(&bytes)
                .map_err(|e| ProviderError::Malformed(format!("answer body: {e}")))?;
            let mut c = whole
                .into_completion()
                .ok_or_else(|| ProviderError::Malformed("an answer with no choice".into()))?;
            c.first_token = sent.elapsed();
            if !c.text.is_empty() {
                on(Progress::Text(c.text.clone()));
            }
            return Ok(c);
        }
        let mut seen = 0usize;
        let bytes = response.bytes_stream().map(move |r| {
            let chunk = r.map_err(Transport::Http)?;
            seen += chunk.len();
            if seen > max {
                return Err(Transport::TooLarge(max));
            }
            Ok(chunk)
        });
        let mut events = bytes.eventsource();
        let mut answer = wire::Assembly::default();
        let mut first_at = None;
        loop {
            let next = if answer.started {
                events.next().await
            } else {
                tokio::time::timeout_at(first_deadline, events.next())
                    .await
                    .map_err(|_| first_token.clone())?
            };
            let event = match next {
                None => return Err(ProviderError::Cut("the stream ended before [DONE]".into())),
                Some(Err(EventStreamError::Transport(Transport::TooLarge(n)))) => {
                    return Err(ProviderError::TooLarge(n))
                }
                Some(Err(EventStreamError::Transport(Transport::Http(e)))) => {
                    return Err(ProviderError::Cut(self.scrub(&e.without_url().to_string())))
                }
                Some(Err(e)) => {
                    return Err(ProviderError::Malformed(format!("event framing: {e}")))
                }
                Some(Ok(event)) => event,
            };
            if event.data.trim() == "[DONE]" {
                break;
            }
            if event.event == "error" {
                return Err(ProviderError::InStream(
                    self.scrub(&wire::error_message(&event.data)),
                ));
            }
            if event.data.trim().is_empty() {
                continue;
            }
            let chunk: wire::Chunk = serde_json::from_str(&event.data)
                .map_err(|e| ProviderError::Malformed(format!("a chunk that is not JSON ({e})")))?;
            if let Some(error) = &chunk.error {
                return Err(ProviderError::InStream(self.scrub(&wire::error_message(
                    &serde_json::json!({ "error": error }).to_string(),
                ))));
            }
            answer.push(chunk, on);
            if answer.started && first_at.is_none() {
                first_at = Some(sent.elapsed());
            }
        }
        let mut c = answer.finish();
        c.first_token = first_at.unwrap_or_else(|| sent.elapsed());
        c.streamed = true;
        Ok(c)
    }

    /// A whole body, at most `max` bytes.
    async fn read_all(
        &self,
        response: reqwest::Response,
        max: usize,
    ) -> Result<Vec<u8>, ProviderError> {
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| ProviderError::Cut(self.scrub(&e.without_url().to_string())))?;
            if body.len() + chunk.len() > max {
                return Err(ProviderError::TooLarge(max));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn transport(&self, e: reqwest::Error) -> ProviderError {
        let e = e.without_url();
        let text = self.scrub(&e.to_string());
        // reqwest's own words stop at the outermost cause; the inner ones say what happened.
        let mut detail = text;
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            detail = format!("{detail}: {}", self.scrub(&s.to_string()));
            source = s.source();
        }
        ProviderError::Connect(detail)
    }
}

/// `Retry-After` in seconds or as an HTTP date, or OpenAI's `retry-after-ms`.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64(ms.min(86_400_000.0) / 1000.0));
        }
    }
    let value = text("retry-after")?;
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(86_400)));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.signed_duration_since(chrono::Utc::now());
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// `text` with the key, and any bearer token, replaced.
fn scrub(text: &str, key: Option<&Secret>) -> String {
    let mut out = text.to_string();
    if let Some(key) = key.map(Secret::expose).filter(|k| !k.is_empty()) {
        out = out.replace(key, "<redacted>");
    }
    // A server may echo a prefix or a masked form; a bearer token is never worth printing.
    if let Some(at) = out.find("Bearer ") {
        let end = out[at + 7..]
            .find(char::is_whitespace)
            .map_or(out.len(), |n| at + 7 + n);
        out.replace_range(at + 7..end, "<redacted>");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_error(message: &str) -> Vec<ProviderError> {
        let m = message.to_string();
        let all = vec![
            ProviderError::Unconfigured,
            ProviderError::Rejected {
                status: 401,
                message: m.clone(),
            },
            ProviderError::Unavailable {
                status: 503,
                message: m.clone(),
                retry_after: None,
            },
            ProviderError::Connect(m.clone()),
            ProviderError::Cut(m.clone()),
            ProviderError::InStream(m.clone()),
            ProviderError::Malformed(m.clone()),
            ProviderError::FirstToken(Duration::from_secs(1)),
            ProviderError::TooLarge(1),
            ProviderError::Timeout(Duration::from_secs(1)),
            ProviderError::Cancelled,
        ];
        let gave_up = ProviderError::GaveUp {
            attempts: 2,
            last: Box::new(ProviderError::Cut(m)),
        };
        all.into_iter().chain([gave_up]).collect()
    }

    #[test]
    fn no_error_prints_the_key() {
        let key = Secret::new("sk-live-0123456789abcdef");
        let echoed = scrub(
            "Incorrect API key provided: sk-live-0123456789abcdef (Authorization: Bearer sk-live-0123)",
            Some(&key),
        );
        assert!(!echoed.contains("0123"), "{echoed}");
        for e in every_error(&echoed) {
            let printed = format!("{e} {e:?}");
            assert!(!printed.contains("0123"), "{printed}");
            assert!(!e.code().is_empty());
        }
        let config = AgentConfig {
            base_url: url::Url::parse("http://127.0.0.1:9/v1").ok(),
            model: "m".into(),
            api_key: Some(key),
            ..AgentConfig::default()
        };
        let provider = Provider::new(&config).unwrap_or_else(|e| unreachable!("{e}"));
        let printed = format!("{config:?} {provider:?}");
        assert!(!printed.contains("0123"), "{printed}");
    }

    /// Messages are kept (in checkpoints, for instance) as JSON and read back unchanged.
    #[test]
    fn messages_round_trip_through_json() {
        let all = vec![
            Message::System("s".into()),
            Message::User("u".into()),
            Message::Assistant {
                text: String::new(),
                tool_calls: vec![ToolCall {
                    id: "c".into(),
                    name: "propose_rule".into(),
                    arguments: Arguments::parse("{not json"),
                }],
            },
            Message::Tool {
                call_id: "c".into(),
                content: "fix it".into(),
            },
        ];
        let json = serde_json::to_string(&all).unwrap_or_else(|e| unreachable!("{e}"));
        let back: Vec<Message> =
            serde_json::from_str(&json).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(back, all);
    }

    #[test]
    fn unconfigured_without_a_base_url() {
        assert_eq!(
            Provider::new(&AgentConfig::default()).err(),
            Some(ProviderError::Unconfigured)
        );
    }

    #[test]
    fn the_endpoint_is_under_the_base_path() {
        for (base, want) in [
            ("http://h:8080/v1", "http://h:8080/v1/chat/completions"),
            ("http://h:8080/v1/", "http://h:8080/v1/chat/completions"),
            ("https://h/", "https://h/chat/completions"),
        ] {
            let config = AgentConfig {
                base_url: url::Url::parse(base).ok(),
                model: "m".into(),
                ..AgentConfig::default()
            };
            let p = Provider::new(&config).unwrap_or_else(|e| unreachable!("{e}"));
            assert_eq!(p.endpoint().as_str(), want);
        }
    }

    #[test]
    fn retry_after_in_seconds_as_a_date_and_in_milliseconds() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            "retry-after",
            reqwest::header::HeaderValue::from_static("7"),
        );
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        h.insert(
            "retry-after",
            reqwest::header::HeaderValue::from_str(&soon).unwrap_or_else(|e| unreachable!("{e}")),
        );
        assert!(retry_after(&h).is_some_and(|d| d > Duration::from_secs(20)));
        h.insert(
            "retry-after-ms",
            reqwest::header::HeaderValue::from_static("250"),
        );
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        assert_eq!(retry_after(&reqwest::header::HeaderMap::new()), None);
    }

    #[test]
    fn backoff_is_jittered_within_a_doubling_window_and_yields_to_retry_after() {
        let config = AgentConfig {
            base_url: url::Url::parse("http://h/v1").ok(),
            model: "m".into(),
            retry_base: Duration::from_millis(100),
            retry_cap: Duration::from_millis(350),
            ..AgentConfig::default()
        };
        let p = Provider::new(&config).unwrap_or_else(|e| unreachable!("{e}"));
        for attempt in 1..=6 {
            let window = Duration::from_millis((100u64 << (attempt - 1)).min(350));
            for _ in 0..50 {
                assert!(p.delay(attempt, None) <= window);
            }
        }
        assert!(p.delay(1, Some(Duration::from_secs(3))) >= Duration::from_secs(3));
    }
}

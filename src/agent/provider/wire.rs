//! The OpenAI-compatible chat-completions wire format: the request body, the answer as one
//! JSON body, and the chunks of a streamed answer joined into one answer
//! (`docs/agent.md`, "Endpoint and request").

use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    Arguments, Completion, FinishReason, Message, Progress, Request, ToolCall, ToolChoice, Usage,
};

/// The request body for `POST {base}/chat/completions`.
pub(super) fn request_body(model: &str, max_tokens: u32, req: &Request, stream: bool) -> Value {
    let mut body = json!({
        "model": model,
        "messages": req.messages.iter().map(message).collect::<Vec<_>>(),
        "max_tokens": max_tokens,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({ "include_usage": true });
    }
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    if !req.tools.is_empty() {
        body["tools"] = req
            .tools
            .iter()
            .map(|t| {
                json!({
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    }
                })
            })
            .collect();
        body["tool_choice"] = match &req.tool_choice {
            ToolChoice::Auto => json!("auto"),
            ToolChoice::Required => json!("required"),
            ToolChoice::None => json!("none"),
            ToolChoice::Named(name) => json!({ "type": "function", "function": { "name": name } }),
        };
    }
    body
}

fn message(m: &Message) -> Value {
    match m {
        Message::System(text) => json!({ "role": "system", "content": text }),
        Message::User(text) => json!({ "role": "user", "content": text }),
        Message::Assistant { text, tool_calls } => {
            let mut v = json!({ "role": "assistant", "content": text });
            if !tool_calls.is_empty() {
                v["tool_calls"] = tool_calls
                    .iter()
                    .map(|c| {
                        json!({
                            "id": c.id,
                            "type": "function",
                            "function": { "name": c.name, "arguments": c.arguments.raw() },
                        })
                    })
                    .collect();
            }
            v
        }
        Message::Tool { call_id, content } => {
            json!({ "role": "tool", "tool_call_id": call_id, "content": content })
        }
    }
}

#[derive(Deserialize)]
pub(super) struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        }
    }
}

/// One `data:` event of a streamed answer. `choices` is `[]` in the usage chunk and `null`
/// on some servers.
#[derive(Deserialize)]
pub(super) struct Chunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Option<Vec<ChunkChoice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    /// Some servers report a failure inside the stream.
    #[serde(default)]
    pub error: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Default)]
struct PartialCall {
    index: usize,
    id: String,
    name: String,
    arguments: String,
}

/// A streamed answer being put together, chunk by chunk.
#[derive(Default)]
pub(super) struct Assembly {
    model: Option<String>,
    text: String,
    calls: Vec<PartialCall>,
    finish: Option<String>,
    usage: Option<Usage>,
    /// Whether anything beyond the assistant's role has arrived: the first token.
    pub started: bool,
}

impl Assembly {
    pub fn push(&mut self, chunk: Chunk, on: &mut (dyn FnMut(Progress) + Send)) {
        if self.model.is_none() {
            self.model = chunk.model.filter(|m| !m.is_empty());
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(u.into());
            self.started = true;
        }
        // One choice is asked for; others are not ours.
        for choice in chunk.choices.unwrap_or_default() {
            if choice.index != 0 {
                continue;
            }
            let delta = choice.delta.unwrap_or_default();
            if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                self.started = true;
                on(Progress::Text(text.clone()));
                self.text.push_str(&text);
            }
            for (position, d) in delta.tool_calls.unwrap_or_default().into_iter().enumerate() {
                self.started = true;
                let index = d.index.unwrap_or(position);
                // Fragments join by index; a server that reuses an index for a second call
                // tells them apart by a new id.
                let open = self.calls.iter().rposition(|c| c.index == index);
                let slot = match (open, &d.id) {
                    (Some(k), Some(id))
                        if !self.calls[k].id.is_empty() && self.calls[k].id != *id =>
                    {
                        None
                    }
                    (open, _) => open,
                };
                let k = slot.unwrap_or_else(|| {
                    self.calls.push(PartialCall {
                        index,
                        ..PartialCall::default()
                    });
                    self.calls.len() - 1
                });
                let call = &mut self.calls[k];
                if let Some(id) = d.id.filter(|i| !i.is_empty()) {
                    call.id = id;
                }
                let (name, arguments) = match d.function {
                    Some(f) => (f.name.unwrap_or_default(), f.arguments.unwrap_or_default()),
                    None => (String::new(), String::new()),
                };
                call.name.push_str(&name);
                call.arguments.push_str(&arguments);
                on(Progress::ToolCall {
                    index: k,
                    name,
                    arguments,
                });
            }
            if let Some(reason) = choice.finish_reason {
                self.started = true;
                self.finish = Some(reason);
            }
        }
    }

    pub fn finish(self) -> Completion {
        Completion {
            model: self.model.unwrap_or_default(),
            text: self.text,
            tool_calls: self
                .calls
                .into_iter()
                .enumerate()
                .map(|(k, c)| ToolCall {
                    id: if c.id.is_empty() {
                        format!("call_{k}")
                    } else {
                        c.id
                    },
                    name: c.name,
                    arguments: Arguments::parse(&c.arguments),
                })
                .collect(),
            finish_reason: self.finish.as_deref().map(FinishReason::parse),
            usage: self.usage,
            ..Completion::default()
        }
    }
}

/// An answer given as one JSON body.
#[derive(Deserialize)]
pub(super) struct Whole {
    #[serde(default)]
    model: Option<String>,
    choices: Vec<WholeChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WholeChoice {
    message: WholeMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WholeMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WholeCall>>,
}

#[derive(Deserialize)]
struct WholeCall {
    #[serde(default)]
    id: Option<String>,
    function: WholeFunction,
}

#[derive(Deserialize)]
struct WholeFunction {
    name: String,
    /// A JSON text by the specification; some servers send the object itself.
    #[serde(default)]
    arguments: Value,
}

impl Whole {
    /// The answer, or `None` when it has no choice.
    pub fn into_completion(self) -> Option<Completion> {
        let choice = self.choices.into_iter().next()?;
        Some(Completion {
            model: self.model.unwrap_or_default(),
            text: choice.message.content.unwrap_or_default(),
            tool_calls: choice
                .message
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(k, c)| ToolCall {
                    id: c
                        .id
                        .filter(|i| !i.is_empty())
                        .unwrap_or_else(|| format!("call_{k}")),
                    name: c.function.name,
                    arguments: match c.function.arguments {
                        Value::String(s) => Arguments::parse(&s),
                        Value::Null => Arguments::parse(""),
                        other => Arguments::Json(other),
                    },
                })
                .collect(),
            finish_reason: choice.finish_reason.as_deref().map(FinishReason::parse),
            usage: self.usage.map(Usage::from),
            ..Completion::default()
        })
    }
}

/// The server's own words from an error body: `error.message`, `error` as text, `message` or
/// `detail`; otherwise the start of the body.
pub(super) fn error_message(body: &str) -> String {
    let from_json = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        let pick = |v: &Value| v.as_str().map(str::to_string);
        pick(&v["error"]["message"])
            .or_else(|| pick(&v["error"]))
            .or_else(|| pick(&v["message"]))
            .or_else(|| pick(&v["detail"]))
    });
    let text = from_json.unwrap_or_else(|| body.trim().to_string());
    let mut cut: String = text.chars().take(500).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    if cut.is_empty() {
        "no message".into()
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(v: Value) -> Chunk {
        serde_json::from_value(v).unwrap_or_else(|e| unreachable!("{e}"))
    }

    #[test]
    fn a_reused_index_with_a_new_id_is_a_second_call() {
        let mut a = Assembly::default();
        let mut seen = Vec::new();
        let mut on = |p: Progress| seen.push(p);
        for (id, name, args) in [
            (Some("a"), Some("one"), "{\"x\":"),
            (None, None, "1}"),
            (Some("b"), Some("two"), "{}"),
        ] {
            a.push(
                chunk(json!({"choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": 0, "id": id, "function": {"name": name, "arguments": args}}
                ]}}]})),
                &mut on,
            );
        }
        let c = a.finish();
        let names: Vec<_> = c.tool_calls.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["one", "two"]);
        assert_eq!(c.tool_calls[0].arguments, Arguments::Json(json!({"x": 1})));
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn error_messages_come_from_the_usual_places() {
        assert_eq!(
            error_message(r#"{"error":{"message":"bad model"}}"#),
            "bad model"
        );
        assert_eq!(error_message(r#"{"error":"overloaded"}"#), "overloaded");
        assert_eq!(error_message(r#"{"detail":"nope"}"#), "nope");
        assert_eq!(error_message("plain words\n"), "plain words");
        assert_eq!(error_message(""), "no message");
        assert!(error_message(&"x".repeat(2000)).chars().count() <= 501);
    }
}

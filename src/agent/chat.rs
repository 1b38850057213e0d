//! The World Agent in conversation (docs/agent.md, "Chat"): a chat thread's state, and one
//! turn of it. A turn answers the user's newest message with one model call offering two
//! tools, `reply` and `author_rule`; `author_rule` starts the authoring graph inside the thread,
//! which the runner then steps like any run, so the candidate and its evidence arrive in the
//! conversation. The chat model never sees a tool that proposes a rule: the only way to a
//! candidate is the graph, with its independent cases and its verification.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::graph::{self, Limits, RunState, Status, Task};
use super::provider::{Arguments, Message, Progress, Provider, Request, Tool, ToolChoice};
use super::runner::own_event;
use crate::config::AgentConfig;
use crate::store::{NewThreadEvent, Usage};
use crate::worlds::model::WorldModel;

/// The kind of a user's message in a chat thread's log.
pub const USER_MESSAGE: &str = "user_message";
/// The status of a chat thread waiting for its next message.
pub const IDLE: &str = "idle";
/// The template version of the chat prompt.
pub const CHAT_PROMPT: &str = "chat.v1";
const CHAT: &str = include_str!("../../prompts/chat.v1.md");
/// The longest reply kept, in characters.
pub const MAX_REPLY_CHARS: usize = 8_000;

pub const REPLY: &str = "reply";
pub const AUTHOR_RULE: &str = "author_rule";

/// One message of the conversation, as the chat keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Said {
    /// `user` or `assistant`.
    pub role: String,
    pub text: String,
}

/// A chat thread's checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatState {
    pub world: String,
    /// The seq of the last user message answered.
    pub seen_seq: u64,
    pub history: Vec<Said>,
    /// The authoring run the current turn started, while it runs.
    pub run: Option<RunState>,
    /// Runs started in this thread so far.
    pub runs: u32,
    /// Model use of the thread, its runs included.
    pub usage: graph::Usage,
    /// The code of the last turn's provider failure, if it failed.
    pub failed: Option<String>,
}

impl ChatState {
    pub fn new(world: &str) -> Self {
        Self {
            world: world.to_owned(),
            seen_seq: 0,
            history: Vec::new(),
            run: None,
            runs: 0,
            usage: graph::Usage::default(),
            failed: None,
        }
    }

    /// The run of the turn, once it has ended (taken out of the state).
    pub fn finished_run(&mut self) -> Option<RunState> {
        if self.run.as_ref().is_some_and(|r| r.status.is_done()) {
            self.run.take()
        } else {
            None
        }
    }

    /// The id of the run thread that records the current run.
    pub fn run_thread(&self, chat: &str) -> String {
        format!("run_{}.{}", chat.trim_start_matches("chat_"), self.runs)
    }

    pub fn usage_as_graph(&self) -> graph::Usage {
        self.usage
    }

    pub fn store_usage(&self) -> Usage {
        Usage {
            calls: u64::from(self.usage.calls),
            prompt_tokens: self.usage.prompt_tokens,
            completion_tokens: self.usage.completion_tokens,
        }
    }

    /// What the last turn's status says of the provider.
    pub fn last_status(&self) -> Status {
        match &self.failed {
            Some(code) => Status::ProviderFailed {
                code: code.clone(),
                message: String::new(),
            },
            None => Status::Running,
        }
    }

    /// Add what a run's step used to the thread's usage.
    pub fn add_run_usage(&mut self, before: &graph::Usage, after: &graph::Usage) {
        self.usage.calls += after.calls.saturating_sub(before.calls);
        self.usage.prompt_tokens += after.prompt_tokens.saturating_sub(before.prompt_tokens);
        self.usage.completion_tokens += after
            .completion_tokens
            .saturating_sub(before.completion_tokens);
        self.usage.latency_ms += after.latency_ms.saturating_sub(before.latency_ms);
    }

    /// End the turn of a run that ended as `run`, recorded as thread `child` with `candidate`.
    pub fn close_run(
        &mut self,
        child: &str,
        run: &RunState,
        candidate: Option<&str>,
    ) -> Vec<NewThreadEvent> {
        self.runs += 1;
        let status = run.status.code();
        let text = match (candidate, run.evidence()) {
            (Some(id), Some(e)) => format!(
                "I proposed rule '{}' for action '{}' as candidate {id} ({}, {} repair(s)); \
                 it waits for review.",
                e.rule.id, run.task.action, e.checks, e.repairs
            ),
            _ => format!("The authoring run ended {status} without a candidate."),
        };
        self.history.push(Said {
            role: "assistant".into(),
            text: text.clone(),
        });
        let mut events = vec![own_event(
            "run_finished",
            json!({
                "run": child,
                "status": status,
                "outcome": run.status,
                "candidate": candidate,
                "evidence": run.evidence(),
                "diagnostics": run.failures,
            }),
        )];
        events.push(own_event("assistant_message", json!({ "text": text })));
        events.push(own_event("turn_finished", json!({ "seq": self.seen_seq })));
        events
    }
}

/// `reply`, as offered to the chat model.
pub fn reply_tool() -> Tool {
    Tool {
        name: REPLY.into(),
        description: "Answer the user.".into(),
        parameters: json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["text"],
            "properties": {
                "text": { "type": "string", "minLength": 1, "maxLength": MAX_REPLY_CHARS }
            }
        }),
    }
}

/// `author_rule`, as offered to the chat model: it starts a run, it does not propose a rule.
pub fn author_rule_tool(actions: &[String]) -> Tool {
    Tool {
        name: AUTHOR_RULE.into(),
        description: "Start an authoring run for a rule the user stated: it is drafted, given \
                      independent test cases, verified and proposed for review."
            .into(),
        parameters: json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["action", "text"],
            "properties": {
                "action": { "type": "string", "enum": actions },
                "text": { "type": "string", "minLength": 1, "maxLength": graph::MAX_TEXT_CHARS }
            }
        }),
    }
}

/// The chat prompt: only the caller's world, and the conversation as data.
fn prompt(world: &WorldModel, history: &[Said]) -> Vec<Message> {
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into());
    let actions: Vec<Value> = world
        .actions
        .iter()
        .map(|a| {
            json!({
                "action": a.name,
                "rules": a.rules.iter().map(|r| json!({
                    "id": r.id,
                    "text": r.text,
                    "severity": r.severity,
                    "outcome": r.outcome,
                    "inputs": r.inputs,
                    "applies_when": r.applies_when,
                    "predicate": r.predicate,
                    "cases": r.cases,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let names: Vec<String> = world
        .actions
        .iter()
        .map(|a| format!("`{}`", a.name))
        .collect();
    let values = [
        ("world", world.world.clone()),
        (
            "description",
            if world.description.trim().is_empty() {
                "(none)".into()
            } else {
                world.description.trim().to_owned()
            },
        ),
        (
            "schema",
            serde_json::to_string_pretty(&world.context).unwrap_or_default(),
        ),
        (
            "config",
            serde_json::to_string_pretty(&world.config).unwrap_or_default(),
        ),
        ("rules", pretty(&Value::Array(actions))),
        ("actions", names.join(", ")),
        (
            "history",
            pretty(&serde_json::to_value(history).unwrap_or_default()),
        ),
    ];
    // Filled in one pass, as every template: a value is never scanned for placeholders.
    let fill = |part: &str| {
        let mut out = String::with_capacity(part.len() * 2);
        let mut rest = part;
        while let Some(at) = rest.find("{{") {
            out.push_str(&rest[..at]);
            let after = &rest[at + 2..];
            let Some(end) = after.find("}}") else {
                break;
            };
            let name = &after[..end];
            if let Some((_, v)) = values.iter().find(|(n, _)| *n == name) {
                out.push_str(v);
            }
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        out.trim().to_owned()
    };
    let (system, user) = CHAT.split_once("<!-- user -->").unwrap_or((CHAT, ""));
    vec![Message::System(fill(system)), Message::User(fill(user))]
}

/// Answer the user message `seq`, `text`: a reply, or the start of a run (which the runner
/// steps next). The events are the turn's, for the thread's log.
pub async fn turn(
    provider: &Provider,
    config: &AgentConfig,
    mut state: ChatState,
    world: Option<&WorldModel>,
    seq: u64,
    text: &str,
    limits: Limits,
) -> (ChatState, Vec<NewThreadEvent>) {
    state.seen_seq = seq;
    state.failed = None;
    state.history.push(Said {
        role: "user".into(),
        text: text.chars().take(graph::MAX_TEXT_CHARS).collect(),
    });
    let keep = config.chat_history.max(2);
    if state.history.len() > keep {
        let cut = state.history.len() - keep;
        state.history.drain(..cut);
    }
    let mut events = Vec::new();
    let Some(world) = world else {
        let text = format!(
            "World '{}' has no draft and no deployed version yet: there are no rules to talk about.",
            state.world
        );
        finish_reply(&mut state, &mut events, text);
        return (state, events);
    };
    let actions: Vec<String> = world.actions.iter().map(|a| a.name.clone()).collect();
    let request = Request {
        messages: prompt(world, &state.history),
        tools: vec![reply_tool(), author_rule_tool(&actions)],
        tool_choice: ToolChoice::Required,
        temperature: Some(0.0),
    };
    if state.usage.calls >= limits.max_llm_calls.saturating_mul(8) {
        finish_reply(
            &mut state,
            &mut events,
            "This conversation has used its model calls; start a new thread.".into(),
        );
        return (state, events);
    }
    let never = CancellationToken::new();
    let mut tokens = Vec::new();
    let result = provider
        .complete(&request, &never, |p| match p {
            Progress::Text(t) => tokens.push(t),
            Progress::ToolCall { arguments, .. } if !arguments.is_empty() => tokens.push(arguments),
            _ => {}
        })
        .await;
    for t in tokens {
        events.push(own_event("token", json!({ "node": "respond", "text": t })));
    }
    let completion = match result {
        Ok(c) => c,
        Err(e) => {
            state.usage.calls += 1;
            state.failed = Some(e.code().to_owned());
            events.push(own_event(
                "error",
                json!({ "code": e.code(), "message": e.to_string() }),
            ));
            finish_reply(
                &mut state,
                &mut events,
                "The model could not be reached; try again later.".into(),
            );
            return (state, events);
        }
    };
    state.usage.calls += 1;
    if let Some(u) = completion.usage {
        state.usage.prompt_tokens += u.prompt_tokens;
        state.usage.completion_tokens += u.completion_tokens;
    }
    state.usage.latency_ms += u64::try_from(completion.latency.as_millis()).unwrap_or(u64::MAX);
    let call = completion.tool_calls.first();
    let args = |name: &str| match call {
        Some(c) if c.name == name => match &c.arguments {
            Arguments::Json(v) => Some(v.clone()),
            Arguments::Malformed { .. } => None,
        },
        _ => None,
    };
    if let Some(v) = args(REPLY) {
        let text: String = v
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .chars()
            .take(MAX_REPLY_CHARS)
            .collect();
        if !text.trim().is_empty() {
            finish_reply(&mut state, &mut events, text);
            return (state, events);
        }
    }
    if let Some(v) = args(AUTHOR_RULE) {
        let action = v.get("action").and_then(Value::as_str).unwrap_or_default();
        let rule = v.get("text").and_then(Value::as_str).unwrap_or_default();
        if actions.iter().any(|a| a == action) && !rule.trim().is_empty() {
            let task = Task {
                world: state.world.clone(),
                action: action.to_owned(),
                text: rule.to_owned(),
            };
            events.push(own_event(
                "run_started",
                json!({ "action": action, "text": rule, "run": state.runs + 1 }),
            ));
            state.run = Some(RunState::new(task, limits));
            return (state, events);
        }
    }
    // Anything else (no tool, a tool that was not offered, arguments that do not parse or
    // name an action this world lacks) ends the turn without effect.
    let named = call.map(|c| c.name.clone()).unwrap_or_default();
    events.push(own_event(
        "error",
        json!({
            "code": "unusable_answer",
            "message": format!("the model answered without a usable `reply` or `author_rule` call ({})",
                if named.is_empty() { "no tool call".to_owned() } else { format!("called '{named}'") }),
        }),
    ));
    finish_reply(
        &mut state,
        &mut events,
        "I could not act on that. Ask about this world's rules, or state a rule to author.".into(),
    );
    (state, events)
}

fn finish_reply(state: &mut ChatState, events: &mut Vec<NewThreadEvent>, text: String) {
    state.history.push(Said {
        role: "assistant".into(),
        text: text.clone(),
    });
    events.push(own_event("assistant_message", json!({ "text": text })));
    events.push(own_event("turn_finished", json!({ "seq": state.seen_seq })));
}

//! The authoring graph: one definition, its nodes and edges a closed enum.
//!
//! ```text
//! intake → draft → derive_cases → verify ─┬─► propose
//!                                   ▲     └─► repair ─┐   (at most `max_repairs` times,
//!                                   └─────────────────┘    then `failed_verification`)
//! ```
//!
//! The state after every node is a plain serde value ([`RunState`]), so a caller can keep it
//! as a checkpoint and resume from it; [`Graph::step`] runs exactly one node. `draft` and
//! `repair` see the rule's predicate; `derive_cases` never does, so the cases it writes are an
//! independent statement of the rule (docs/agent.md). `verify` is deterministic. Every bound
//! (steps, model calls, tokens, repairs, wall time) ends the run with a status that names it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::prompt;
use super::provider::{
    Completion, Message, Progress, Provider, ProviderError, Request, ToolChoice,
};
use super::tools;
use super::verify::{self, Diagnostic, Verification};
use crate::sandbox::Sandbox;
use crate::worlds::model::{Case, Rule, WorldModel};

/// The nodes of the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Node {
    Intake,
    Draft,
    DeriveCases,
    Verify,
    Repair,
    Propose,
}

impl Node {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Intake => "intake",
            Self::Draft => "draft",
            Self::DeriveCases => "derive_cases",
            Self::Verify => "verify",
            Self::Repair => "repair",
            Self::Propose => "propose",
        }
    }
}

/// Where a run is, or how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Status {
    /// `next` runs on the next step.
    Running,
    /// A verified candidate is ready to be stored for review.
    Proposed,
    /// The rule did not verify within the repairs allowed; every diagnostic is kept.
    FailedVerification,
    /// A bound ended the run.
    Bounded {
        bound: Bound,
    },
    /// The request cannot be authored (unknown action, empty statement, …).
    Refused {
        reason: String,
    },
    /// The provider failed in a way retries did not mend.
    ProviderFailed {
        code: String,
        message: String,
    },
    Cancelled,
}

impl Status {
    /// A stable name, for the run's status field and metrics.
    pub fn code(&self) -> String {
        match self {
            Self::Running => "running".into(),
            Self::Proposed => "proposed".into(),
            Self::FailedVerification => "failed_verification".into(),
            Self::Bounded { bound } => format!("{}_exceeded", bound.as_str()),
            Self::Refused { .. } => "refused".into(),
            Self::ProviderFailed { .. } => "provider_failed".into(),
            Self::Cancelled => "cancelled".into(),
        }
    }

    pub fn is_done(&self) -> bool {
        *self != Self::Running
    }
}

/// The bounds of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    Steps,
    LlmCalls,
    Tokens,
    WallTime,
}

impl Bound {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Steps => "steps",
            Self::LlmCalls => "llm_calls",
            Self::Tokens => "tokens",
            Self::WallTime => "wall_time",
        }
    }
}

/// What one run may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Nodes run, retries of a malformed answer included.
    pub max_steps: u32,
    pub max_llm_calls: u32,
    /// Prompt and completion tokens together, as the provider counts them.
    pub max_tokens: u64,
    /// Repairs after a failed verification; the next failure ends the run.
    pub max_repairs: u32,
    /// Time spent in nodes, summed over resumes.
    #[serde(with = "millis")]
    pub max_wall: Duration,
    /// The longest statement of a rule, in characters.
    pub max_text_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self::from(&crate::config::AgentConfig::default())
    }
}

impl From<&crate::config::AgentConfig> for Limits {
    fn from(c: &crate::config::AgentConfig) -> Self {
        Self {
            max_steps: c.max_steps,
            max_llm_calls: c.max_calls,
            max_tokens: c.max_run_tokens,
            max_repairs: c.max_repairs,
            max_wall: c.max_run_time,
            max_text_chars: MAX_TEXT_CHARS,
        }
    }
}

/// The longest statement of a rule, in characters.
pub const MAX_TEXT_CHARS: usize = 4_000;

/// Model use of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub calls: u32,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Time spent waiting for the model.
    pub latency_ms: u64,
}

impl Usage {
    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    fn add(&mut self, c: &Completion) {
        self.calls += 1;
        if let Some(u) = c.usage {
            self.prompt_tokens += u.prompt_tokens;
            self.completion_tokens += u.completion_tokens;
        }
        self.latency_ms += u64::try_from(c.latency.as_millis()).unwrap_or(u64::MAX);
    }
}

/// What a run is asked to author.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub world: String,
    pub action: String,
    /// The rule as the operator stated it.
    pub text: String,
}

/// The state of a run after a node: its checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub task: Task,
    /// The node the next step runs (meaningful while `status` is `running`).
    pub next: Node,
    pub status: Status,
    /// Steps taken so far.
    pub step: u32,
    pub limits: Limits,
    /// The latest rule drafted or repaired.
    pub rule: Option<Rule>,
    /// The cases derived from the statement, never from the predicate.
    pub cases: Option<Vec<Case>>,
    /// The latest verification.
    pub verification: Option<Verification>,
    pub repairs: u32,
    /// The diagnostics of every failed verification, oldest first.
    pub failures: Vec<Vec<Diagnostic>>,
    /// Malformed answers asked to be made again, by tool.
    pub malformed: Vec<String>,
    /// The draft conversation, which `repair` continues.
    pub conversation: Vec<Message>,
    /// The conversation of `derive_cases`, kept apart: it never holds a predicate.
    pub cases_conversation: Vec<Message>,
    pub usage: Usage,
    /// The model that answered, as the provider named it.
    pub model: Option<String>,
    /// The prompt templates used, in order of first use (`draft.v1`, …).
    pub prompts: Vec<String>,
    /// Time spent in nodes so far.
    pub elapsed_ms: u64,
}

impl RunState {
    /// A run that has not started.
    pub fn new(task: Task, limits: Limits) -> Self {
        Self {
            task,
            next: Node::Intake,
            status: Status::Running,
            step: 0,
            limits,
            rule: None,
            cases: None,
            verification: None,
            repairs: 0,
            failures: Vec::new(),
            malformed: Vec::new(),
            conversation: Vec::new(),
            cases_conversation: Vec::new(),
            usage: Usage::default(),
            model: None,
            prompts: Vec::new(),
            elapsed_ms: 0,
        }
    }

    pub fn end(&mut self, status: Status) {
        self.status = status;
    }

    fn used_prompt(&mut self, version: &str) {
        if !self.prompts.iter().any(|p| p == version) {
            self.prompts.push(version.to_string());
        }
    }
}

/// What a step tells the caller while it runs, for the run's event log and the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum RunEvent {
    NodeStarted {
        step: u32,
        node: Node,
    },
    /// A fragment of the model's answer (text, or a tool call's arguments).
    Token {
        node: Node,
        text: String,
    },
    /// The model call is retried: what its earlier tokens said is void.
    Retry {
        node: Node,
        attempt: u32,
        reason: String,
    },
    NodeFinished {
        step: u32,
        node: Node,
        /// One line on what the node did.
        summary: String,
    },
}

/// The graph with what its nodes run against.
pub struct Graph<'a> {
    pub provider: &'a Provider,
    pub sandbox: &'a Sandbox,
}

impl Graph<'_> {
    /// Run the next node of `state` against `world` (the world the rule is authored for, as
    /// its draft or deployed version holds it), and return the state after it. A run that is
    /// done is returned unchanged.
    pub async fn step(
        &self,
        mut state: RunState,
        world: &WorldModel,
        cancel: &CancellationToken,
        on: &mut (dyn FnMut(RunEvent) + Send),
    ) -> RunState {
        if state.status.is_done() {
            return state;
        }
        if state.step >= state.limits.max_steps {
            state.end(Status::Bounded {
                bound: Bound::Steps,
            });
            return state;
        }
        let remaining = state
            .limits
            .max_wall
            .saturating_sub(Duration::from_millis(state.elapsed_ms));
        if remaining.is_zero() {
            state.end(Status::Bounded {
                bound: Bound::WallTime,
            });
            return state;
        }
        if cancel.is_cancelled() {
            state.end(Status::Cancelled);
            return state;
        }
        let node = state.next;
        state.step += 1;
        let step = state.step;
        on(RunEvent::NodeStarted { step, node });
        let started = tokio::time::Instant::now();
        let summary =
            match tokio::time::timeout(remaining, self.node(node, &mut state, world, cancel, on))
                .await
            {
                Ok(summary) => summary,
                Err(_) => {
                    state.end(Status::Bounded {
                        bound: Bound::WallTime,
                    });
                    "the run's time ran out".into()
                }
            };
        state.elapsed_ms += u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        on(RunEvent::NodeFinished {
            step,
            node,
            summary,
        });
        state
    }

    /// Step until the run is done, handing every state after a node to `checkpoint` (the
    /// caller keeps it, to resume from). The step bound ends every run.
    pub async fn run(
        &self,
        mut state: RunState,
        world: &WorldModel,
        cancel: &CancellationToken,
        on: &mut (dyn FnMut(RunEvent) + Send),
        checkpoint: &mut (dyn FnMut(&RunState) + Send),
    ) -> RunState {
        while !state.status.is_done() {
            state = self.step(state, world, cancel, on).await;
            checkpoint(&state);
        }
        state
    }

    async fn node(
        &self,
        node: Node,
        state: &mut RunState,
        world: &WorldModel,
        cancel: &CancellationToken,
        on: &mut (dyn FnMut(RunEvent) + Send),
    ) -> String {
        match node {
            Node::Intake => intake(state, world),
            Node::Draft => self.draft(state, world, cancel, on).await,
            Node::DeriveCases => self.derive_cases(state, world, cancel, on).await,
            Node::Verify => self.verify(state, world),
            Node::Repair => self.repair(state, cancel, on).await,
            Node::Propose => {
                state.end(Status::Proposed);
                let summary = state
                    .verification
                    .as_ref()
                    .map(Verification::summary)
                    .unwrap_or_default();
                format!("proposed with {summary}")
            }
        }
    }

    async fn draft(
        &self,
        state: &mut RunState,
        world: &WorldModel,
        cancel: &CancellationToken,
        on: &mut (dyn FnMut(RunEvent) + Send),
    ) -> String {
        if state.conversation.is_empty() {
            match prompt::draft(
                world,
                &state.task.action,
                &state.task.text,
                self.sandbox.limits(),
            ) {
                Ok(p) => {
                    state.used_prompt(p.version);
                    state.conversation = p.messages;
                }
                Err(e) => {
                    state.end(Status::Refused {
                        reason: e.to_string(),
                    });
                    return e.to_string();
                }
            }
        }
        self.ask_rule(state, Node::Draft, Node::DeriveCases, cancel, on)
            .await
    }

    /// Ask for a rule on the draft conversation; a malformed answer is answered with what to
    /// fix and asked again on the next step.
    async fn ask_rule(
        &self,
        state: &mut RunState,
        node: Node,
        then: Node,
        cancel: &CancellationToken,
        on: &mut (dyn FnMut(RunEvent) + Send),
    ) -> String {
        let request = Request {
            messages: state.conversation.clone(),
            tools: vec![tools::propose_rule()],
            tool_choice: ToolChoice::Named(tools::PROPOSE_RULE.into()),
            temperature: None,
        };
        let Some(completion) = self.call(state, node, &request, cancel, on).await else {
            return state.status.code();
        };
        state.conversation.push(assistant(&completion));
        match tools::parse_rule(&completion.tool_calls) {
            Ok(parsed) => {
                let mut rule = parsed.value;
                rule.cases.clear();
                let summary = format!(
                    "rule '{}' ({} → {})",
                    rule.id,
                    rule.severity.as_str(),
                    rule.outcome
                );
                state.conversation.push(Message::Tool {
                    call_id: parsed.call_id,
                    content: "Received; the rule is verified next.".into(),
                });
                state.rule = Some(rule);
                state.next = then;
                summary
            }
            Err(repair) => {
                state.malformed.push(repair.code().to_string());
                state.conversation.push(repair.message());
                state.next = node;
                format!("malformed answer ({}); asked again", repair.code())
            }
        }
    }

    async fn derive_cases(
        &self,
        state: &mut RunState,
        world: &WorldModel,
        cancel: &CancellationToken,
        on: &mut (dyn FnMut(RunEvent) + Send),
    ) -> String {
        if state.cases_conversation.is_empty() {
            match prompt::derive_cases(world, &state.task.action, &state.task.text) {
                Ok(p) => {
                    state.used_prompt(p.version);
                    state.cases_conversation = p.messages;
                }
                Err(e) => {
                    state.end(Status::Refused {
                        reason: e.to_string(),
                    });
                    return e.to_string();
                }
            }
        }
        let request = Request {
            messages: state.cases_conversation.clone(),
            tools: vec![tools::propose_cases()],
            tool_choice: ToolChoice::Named(tools::PROPOSE_CASES.into()),
            temperature: None,
        };
        let Some(completion) = self
            .call(state, Node::DeriveCases, &request, cancel, on)
            .await
        else {
            return state.status.code();
        };
        state.cases_conversation.push(assistant(&completion));
        match tools::parse_cases(&completion.tool_calls) {
            Ok(parsed) => {
                let n = parsed.value.len();
                state.cases = Some(parsed.value);
                state.next = Node::Verify;
                format!("{n} cases derived from the statement")
            }
            Err(repair) => {
                state.malformed.push(repair.code().to_string());
                state.cases_conversation.push(repair.message());
                state.next = Node::DeriveCases;
                format!("malformed answer ({}); asked again", repair.code())
            }
        }
    }

    fn verify(&self, state: &mut RunState, world: &WorldModel) -> String {
        let (Some(rule), Some(cases)) = (&state.rule, &state.cases) else {
            // Only reachable from a corrupted checkpoint: start the rule over.
            state.next = Node::Draft;
            return "nothing to verify; drafting again".into();
        };
        let verification = verify::verify(world, &state.task.action, rule, cases, self.sandbox);
        let summary = verification.summary();
        if verification.passed() {
            state.next = Node::Propose;
        } else {
            state.failures.push(verification.diagnostics.clone());
            if state.repairs >= state.limits.max_repairs {
                state.end(Status::FailedVerification);
            } else {
                state.next = Node::Repair;
            }
        }
        let failed = verification.diagnostics.len();
        state.verification = Some(verification);
        if failed == 0 {
            summary
        } else {
            format!("{summary}; {failed} problem(s)")
        }
    }

    async fn repair(
        &self,
        state: &mut RunState,
        cancel: &CancellationToken,
        on: &mut (dyn FnMut(RunEvent) + Send),
    ) -> String {
        state.repairs += 1;
        let diagnostics = state.failures.last().cloned().unwrap_or_default();
        state
            .conversation
            .push(Message::User(repair_message(&diagnostics)));
        state.used_prompt(REPAIR_PROMPT);
        // A malformed answer to the repair is asked again as a draft, without another repair.
        self.ask_rule(state, Node::Draft, Node::Verify, cancel, on)
            .await
    }

    /// One model call within the run's bounds; `None` when the run ended.
    async fn call(
        &self,
        state: &mut RunState,
        node: Node,
        request: &Request,
        cancel: &CancellationToken,
        on: &mut (dyn FnMut(RunEvent) + Send),
    ) -> Option<Completion> {
        if state.usage.calls >= state.limits.max_llm_calls {
            state.end(Status::Bounded {
                bound: Bound::LlmCalls,
            });
            return None;
        }
        if state.usage.tokens() >= state.limits.max_tokens {
            state.end(Status::Bounded {
                bound: Bound::Tokens,
            });
            return None;
        }
        let progress = |p: Progress| match p {
            Progress::Text(text) => on(RunEvent::Token { node, text }),
            Progress::ToolCall { arguments, .. } if !arguments.is_empty() => on(RunEvent::Token {
                node,
                text: arguments,
            }),
            Progress::Retry {
                attempt, reason, ..
            } => on(RunEvent::Retry {
                node,
                attempt,
                reason,
            }),
            _ => {}
        };
        match self.provider.complete(request, cancel, progress).await {
            Ok(completion) => {
                state.usage.add(&completion);
                state.model.get_or_insert_with(|| completion.model.clone());
                if state.usage.tokens() > state.limits.max_tokens {
                    state.end(Status::Bounded {
                        bound: Bound::Tokens,
                    });
                    return None;
                }
                Some(completion)
            }
            Err(ProviderError::Cancelled) => {
                state.end(Status::Cancelled);
                None
            }
            Err(e) => {
                state.usage.calls += 1;
                state.end(Status::ProviderFailed {
                    code: e.code().into(),
                    message: e.to_string(),
                });
                None
            }
        }
    }
}

/// The template version of the repair message.
pub const REPAIR_PROMPT: &str = "repair.v1";
const REPAIR: &str = include_str!("../../prompts/repair.v1.md");

fn repair_message(diagnostics: &[Diagnostic]) -> String {
    let list = diagnostics
        .iter()
        .map(|d| {
            let class = match d.class {
                verify::FailureClass::Mechanical => "mechanical",
                verify::FailureClass::Semantic => "semantic",
            };
            match d.kind {
                Some(kind) => format!("- [{class}] {} ({kind:?}): {}", d.at, d.message),
                None => format!("- [{class}] {}: {}", d.at, d.message),
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    REPAIR.replace("{{diagnostics}}", &list)
}

fn intake(state: &mut RunState, world: &WorldModel) -> String {
    let text = state.task.text.trim();
    let refused = if text.is_empty() {
        Some("the statement of the rule is empty".to_string())
    } else if text.chars().count() > state.limits.max_text_chars {
        Some(format!(
            "the statement of the rule is longer than {} characters",
            state.limits.max_text_chars
        ))
    } else if world.world != state.task.world {
        Some(format!(
            "the world is '{}', not '{}'",
            world.world, state.task.world
        ))
    } else if world.action(&state.task.action).is_none() {
        Some(format!(
            "world '{}' has no action '{}'",
            state.task.world, state.task.action
        ))
    } else {
        None
    };
    match refused {
        Some(reason) => {
            state.end(Status::Refused {
                reason: reason.clone(),
            });
            reason
        }
        None => {
            state.next = Node::Draft;
            format!("a rule for {} in {}", state.task.action, state.task.world)
        }
    }
}

fn assistant(c: &Completion) -> Message {
    Message::Assistant {
        text: c.text.clone(),
        tool_calls: c.tool_calls.clone(),
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// What a proposed candidate carries into review.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub rule: Rule,
    /// The derived cases the rule verified against.
    pub cases: Vec<Case>,
    pub verification: Verification,
    /// `n/n checks passed`.
    pub checks: String,
    pub repairs: u32,
    pub model: Option<String>,
    pub prompts: Vec<String>,
    pub usage: Usage,
}

impl RunState {
    /// The evidence bundle of a proposed run.
    pub fn evidence(&self) -> Option<Evidence> {
        if self.status != Status::Proposed {
            return None;
        }
        let verification = self.verification.clone()?;
        Some(Evidence {
            rule: self.rule.clone()?,
            cases: self.cases.clone()?,
            checks: verification.summary(),
            verification,
            repairs: self.repairs,
            model: self.model.clone(),
            prompts: self.prompts.clone(),
            usage: self.usage,
        })
    }
}

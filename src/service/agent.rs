//! The World Agent's endpoints, independent of HTTP (docs/agent.md, "API"): start a run and
//! read it, post to a chat thread and read its log, list candidates and review them. Every
//! one needs the `author` scope on the world named in the path, and a thread or candidate of
//! another world is not found, whatever its id. The API only writes to the store; the runs
//! themselves happen on the workers runtime.

use serde::{Deserialize, Serialize};

use super::{App, Caller, ServiceError};
use crate::agent::graph::{Task, MAX_TEXT_CHARS};
use crate::agent::runner::{authoring_base, candidate_id};
use crate::store::{
    CandidateRecord, NewThread, NewThreadEvent, Review, Scope, ThreadEvent, ThreadKind,
    ThreadRecord, Verdict,
};
use crate::worlds::model::{Case, Provenance, Rule, WorldModel};

/// The longest chat thread name a caller may choose, in characters.
pub const MAX_THREAD_NAME: usize = 64;
/// The longest review rationale, in characters.
pub const MAX_RATIONALE_CHARS: usize = 2_000;
/// Events returned by one read of a thread's log at most.
pub const EVENTS_PAGE: u32 = 500;

/// The body of `POST /api/worlds/{world}/agent/runs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunInput {
    pub action: String,
    /// The rule, in words.
    pub text: String,
}

/// A run just started.
#[derive(Debug, Serialize)]
pub struct RunStarted {
    pub run: String,
    pub world: String,
    pub status: String,
    /// Where to read it, and its events.
    pub links: serde_json::Value,
}

/// A run as `GET …/agent/runs/{id}` shows it.
#[derive(Debug, Serialize)]
pub struct RunView {
    #[serde(flatten)]
    pub thread: ThreadRecord,
    /// The latest checkpoint's step and state (the graph's state of a run).
    pub step: Option<u64>,
    pub state: Option<serde_json::Value>,
    pub candidate: Option<CandidateRecord>,
}

/// The body of a review.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewInput {
    #[serde(default)]
    pub rationale: Option<String>,
}

/// The body of `POST …/agent/threads/{thread}/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageInput {
    pub text: String,
}

fn check_text(field: &'static str, text: &str, max: usize) -> Result<(), ServiceError> {
    let len = text.chars().count();
    if text.trim().is_empty() {
        return Err(ServiceError::BadRequest(format!(
            "{field} must not be empty"
        )));
    }
    if len > max {
        return Err(ServiceError::FieldTooLong { field, len, max });
    }
    Ok(())
}

/// The store id of a world's chat thread: worlds never share a thread, whatever it is called.
pub fn chat_thread_id(world: &str, name: &str) -> String {
    format!("chat_{world}:{name}")
}

fn valid_name(name: &str) -> Result<(), ServiceError> {
    if name.is_empty()
        || name.len() > MAX_THREAD_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ServiceError::BadRequest(format!(
            "a thread name is 1 to {MAX_THREAD_NAME} letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

impl App {
    fn agent_ready(&self) -> Result<(), ServiceError> {
        if self.agent.configured {
            Ok(())
        } else {
            Err(ServiceError::AgentUnconfigured(
                "the World Agent has no model endpoint: set SPECTRAL_AGENT_BASE_URL and \
                 SPECTRAL_AGENT_MODEL (docs/agent.md)"
                    .into(),
            ))
        }
    }

    /// A thread of `world`, or `NotFound` (also when it is another world's).
    async fn world_thread(&self, world: &str, id: &str) -> Result<ThreadRecord, ServiceError> {
        match self
            .store
            .thread(id)
            .await
            .map_err(ServiceError::from_store)?
        {
            Some(t) if t.world == world => Ok(t),
            _ => Err(ServiceError::NotFound(format!(
                "agent thread '{id}' in world '{world}'"
            ))),
        }
    }

    /// Start an authoring run: the thread and its `agent.task.created` row, in one
    /// transaction; a worker takes it from there.
    pub async fn start_run(
        &self,
        caller: &Caller,
        world: &str,
        input: RunInput,
    ) -> Result<RunStarted, ServiceError> {
        caller.check(world, Scope::Author)?;
        self.agent_ready()?;
        check_text("text", &input.text, MAX_TEXT_CHARS)?;
        let base = authoring_base(&self.store, world)
            .await
            .map_err(ServiceError::from_store)?
            .ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "world '{world}' has no draft and no deployed version to author for"
                ))
            })?;
        if base.action(&input.action).is_none() {
            return Err(ServiceError::BadRequest(format!(
                "world '{world}' has no action '{}'",
                input.action
            )));
        }
        let running = self
            .store
            .running_threads(world, ThreadKind::Run)
            .await
            .map_err(ServiceError::from_store)?;
        let max = self.agent.config.max_runs_per_world;
        if running >= max {
            return Err(ServiceError::TooManyRuns(format!(
                "world '{world}' has {running} agent runs running, the most it may \
                 (SPECTRAL_AGENT_MAX_RUNS_PER_WORLD = {max}); retry when one ends"
            )));
        }
        let id = format!("run_{}", uuid::Uuid::now_v7().simple());
        let task = Task {
            world: world.to_owned(),
            action: input.action,
            text: input.text,
        };
        self.store
            .start_thread(&NewThread {
                id: id.clone(),
                world: world.to_owned(),
                kind: ThreadKind::Run,
                parent: None,
                created_by: caller.key_id.clone(),
                task: serde_json::to_value(&task)
                    .map_err(|e| ServiceError::Internal(e.to_string()))?,
            })
            .await
            .map_err(ServiceError::from_store)?;
        Ok(RunStarted {
            links: serde_json::json!({
                "self": format!("/api/worlds/{world}/agent/runs/{id}"),
                "events": format!("/api/worlds/{world}/agent/runs/{id}/events"),
            }),
            run: id,
            world: world.to_owned(),
            status: crate::store::RUNNING.into(),
        })
    }

    /// A run's state, its latest checkpoint and its candidate.
    pub async fn agent_run(
        &self,
        caller: &Caller,
        world: &str,
        id: &str,
    ) -> Result<RunView, ServiceError> {
        caller.check(world, Scope::Author)?;
        let thread = self.world_thread(world, id).await?;
        if thread.kind != ThreadKind::Run {
            return Err(ServiceError::NotFound(format!(
                "agent run '{id}' in world '{world}'"
            )));
        }
        let latest = self
            .store
            .latest_checkpoint(id)
            .await
            .map_err(ServiceError::from_store)?;
        let candidate = self
            .store
            .candidate(&candidate_id(id))
            .await
            .map_err(ServiceError::from_store)?
            .filter(|c| c.run_thread == id);
        Ok(RunView {
            step: latest.as_ref().map(|c| c.step),
            state: latest.map(|c| c.state),
            candidate,
            thread,
        })
    }

    /// A world's runs, newest first.
    pub async fn agent_runs(
        &self,
        caller: &Caller,
        world: &str,
    ) -> Result<Vec<ThreadRecord>, ServiceError> {
        caller.check(world, Scope::Author)?;
        self.store
            .world_threads(world, ThreadKind::Run, 100)
            .await
            .map_err(ServiceError::from_store)
    }

    /// The thread a stream reads: a run by its id, or a chat by its name.
    pub async fn agent_thread(
        &self,
        caller: &Caller,
        world: &str,
        kind: ThreadKind,
        id: &str,
    ) -> Result<ThreadRecord, ServiceError> {
        caller.check(world, Scope::Author)?;
        let id = match kind {
            ThreadKind::Run => id.to_owned(),
            ThreadKind::Chat => {
                valid_name(id)?;
                chat_thread_id(world, id)
            }
        };
        let thread = self.world_thread(world, &id).await?;
        if thread.kind != kind {
            return Err(ServiceError::NotFound(format!(
                "agent thread '{id}' in world '{world}'"
            )));
        }
        Ok(thread)
    }

    /// Events of a thread the caller was given by [`Self::agent_thread`].
    pub async fn agent_events(
        &self,
        thread: &ThreadRecord,
        after: u64,
    ) -> Result<Vec<ThreadEvent>, ServiceError> {
        self.store
            .events_after(&thread.id, after, EVENTS_PAGE)
            .await
            .map_err(ServiceError::from_store)
    }

    /// A thread as it is now (to tell whether a stream has ended).
    pub async fn agent_thread_now(
        &self,
        thread: &ThreadRecord,
    ) -> Result<ThreadRecord, ServiceError> {
        self.world_thread(&thread.world, &thread.id).await
    }

    /// Post a user message to a chat thread, creating it on first use; the thread and the
    /// message's seq (its events follow it).
    pub async fn post_message(
        &self,
        caller: &Caller,
        world: &str,
        name: &str,
        input: MessageInput,
    ) -> Result<(ThreadRecord, u64), ServiceError> {
        caller.check(world, Scope::Author)?;
        self.agent_ready()?;
        valid_name(name)?;
        check_text("text", &input.text, MAX_TEXT_CHARS)?;
        let id = chat_thread_id(world, name);
        match self
            .store
            .thread(&id)
            .await
            .map_err(ServiceError::from_store)?
        {
            Some(t) if t.world != world || t.kind != ThreadKind::Chat => {
                return Err(ServiceError::NotFound(format!("agent thread '{name}'")));
            }
            Some(_) => {}
            None => {
                let created = self
                    .store
                    .create_thread(&NewThread {
                        id: id.clone(),
                        world: world.to_owned(),
                        kind: ThreadKind::Chat,
                        parent: None,
                        created_by: caller.key_id.clone(),
                        task: serde_json::json!({ "chat": name }),
                    })
                    .await;
                match created {
                    Ok(()) | Err(crate::store::StoreError::Conflict(_)) => {}
                    Err(e) => return Err(ServiceError::from_store(e)),
                }
            }
        }
        let seq = self
            .store
            .post_to_thread(
                &id,
                world,
                &NewThreadEvent {
                    kind: crate::agent::chat::USER_MESSAGE.into(),
                    data: serde_json::json!({
                        "event": crate::agent::chat::USER_MESSAGE,
                        "text": input.text,
                        "by": caller.key_id,
                    }),
                },
            )
            .await
            .map_err(ServiceError::from_store)?;
        Ok((self.world_thread(world, &id).await?, seq))
    }

    /// A world's rule candidates, newest first.
    pub async fn candidates(
        &self,
        caller: &Caller,
        world: &str,
    ) -> Result<Vec<CandidateRecord>, ServiceError> {
        caller.check(world, Scope::Author)?;
        self.store
            .candidates(world)
            .await
            .map_err(ServiceError::from_store)
    }

    /// Approve or reject a proposed candidate. A rejection needs a rationale. An approval adds
    /// the rule to the world's draft (started from the deployed version when there is none),
    /// with its derived cases and its provenance, once the whole draft verifies; publishing
    /// stays a step of its own.
    pub async fn review(
        &self,
        caller: &Caller,
        world: &str,
        id: &str,
        verdict: Verdict,
        input: ReviewInput,
    ) -> Result<CandidateRecord, ServiceError> {
        caller.check(world, Scope::Author)?;
        let rationale = input.rationale.filter(|r| !r.trim().is_empty());
        if let Some(r) = &rationale {
            check_text("rationale", r, MAX_RATIONALE_CHARS)?;
        } else if verdict == Verdict::Rejected {
            return Err(ServiceError::BadRequest(
                "a rejection needs a rationale: {\"rationale\": \"…\"}".into(),
            ));
        }
        let candidate = match self
            .store
            .candidate(id)
            .await
            .map_err(ServiceError::from_store)?
        {
            Some(c) if c.world == world => c,
            _ => {
                return Err(ServiceError::NotFound(format!(
                    "rule candidate '{id}' in world '{world}'"
                )))
            }
        };
        if candidate.status != "proposed" {
            return Err(ServiceError::Conflict(format!(
                "rule candidate '{id}' was already {}",
                candidate.status
            )));
        }
        let draft = match verdict {
            Verdict::Rejected => None,
            Verdict::Approved => Some(self.draft_with(caller, &candidate).await?),
        };
        self.store
            .review(
                &Review {
                    candidate: id.to_owned(),
                    world: world.to_owned(),
                    verdict,
                    reviewer: caller.key_id.clone(),
                    rationale,
                },
                draft.as_ref(),
            )
            .await
            .map_err(ServiceError::from_store)
    }

    /// The world's draft with the candidate's rule added, verified.
    async fn draft_with(
        &self,
        caller: &Caller,
        candidate: &CandidateRecord,
    ) -> Result<serde_json::Value, ServiceError> {
        let world = candidate.world.as_str();
        let mut model: WorldModel = authoring_base(&self.store, world)
            .await
            .map_err(ServiceError::from_store)?
            .ok_or_else(|| {
                ServiceError::NotFound(format!("world '{world}' has no draft and no version"))
            })?;
        let mut rule: Rule = serde_json::from_value(candidate.rule.clone()).map_err(|e| {
            ServiceError::Internal(format!("candidate '{}' rule: {e}", candidate.id))
        })?;
        let derived: Vec<Case> = candidate
            .evidence
            .get("cases")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| ServiceError::Internal(format!("candidate cases: {e}")))?
            .unwrap_or_default();
        let thread = self
            .store
            .thread(&candidate.run_thread)
            .await
            .map_err(ServiceError::from_store)?
            .and_then(|t| t.parent);
        let prompts: Vec<String> =
            serde_json::from_value(candidate.prompt_versions.clone()).unwrap_or_default();
        rule.provenance = Some(Provenance {
            candidate: candidate.id.clone(),
            run: candidate.run_thread.clone(),
            thread,
            model: candidate.model.clone(),
            prompts,
            approved_by: caller.key_id.clone(),
            approved_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            derived_cases: derived.len(),
        });
        rule.cases.extend(derived);
        let action = model
            .actions
            .iter_mut()
            .find(|a| a.name == candidate.action)
            .ok_or_else(|| {
                ServiceError::Conflict(format!(
                    "world '{world}' no longer has action '{}'",
                    candidate.action
                ))
            })?;
        if action.rules.iter().any(|r| r.id == rule.id) {
            return Err(ServiceError::Conflict(format!(
                "action '{}' already has a rule '{}': edit the draft or reject the candidate",
                candidate.action, rule.id
            )));
        }
        action.rules.push(rule);
        self.verify(&model).await?;
        serde_json::to_value(&model).map_err(|e| ServiceError::Internal(e.to_string()))
    }
}

/// A change sent to every stream of the process, not one thread's: the listener came up or
/// was lost, so notifications may have been missed.
pub const EVERY_THREAD: &str = "*";

/// Whether this process hears of other processes' thread changes: on Postgres, one listener
/// per API process passes the notification each committed thread event and status change
/// sends (payload: the thread's id) on to the store's thread changes
/// ([`crate::store::Store::thread_changes`]), which also carry this process's own commits, so
/// that a stream follows a thread another process advances at once. A latency hint only;
/// streams look at the store as well, more often while nobody listens.
#[derive(Default)]
pub struct StreamWakes {
    listening: std::sync::atomic::AtomicBool,
}

/// A quiet listening connection is pinged this often, so that a dead one is noticed.
const LISTENER_PING: std::time::Duration = std::time::Duration::from_secs(15);

impl StreamWakes {
    /// Whether notifications are arriving (a listener is up).
    pub fn listening(&self) -> bool {
        self.listening.load(std::sync::atomic::Ordering::Acquire)
    }

    fn set_listening(&self, store: &crate::store::Store, yes: bool) {
        self.listening
            .store(yes, std::sync::atomic::Ordering::Release);
        // Either way, what was sent while nobody listened has to be read.
        store.announce_thread(EVERY_THREAD, true);
    }

    /// Pass notifications on to the streams until `stop`; listen again with backoff when the
    /// listener is lost. Returns at once on SQLite or when listening is off.
    pub async fn watch(
        self: std::sync::Arc<Self>,
        store: crate::store::Store,
        enabled: bool,
        stop: tokio_util::sync::CancellationToken,
    ) {
        if !enabled || store.backend() != crate::store::Backend::Postgres {
            return;
        }
        let mut backoff = std::time::Duration::from_millis(250);
        loop {
            let mut listener = match store.listen_agent().await {
                Ok(Some(l)) => l,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for agent thread events; streams poll the store");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
                    continue;
                }
            };
            backoff = std::time::Duration::from_millis(250);
            self.set_listening(&store, true);
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => {
                        self.set_listening(&store, false);
                        return;
                    }
                    next = tokio::time::timeout(LISTENER_PING, listener.next()) => next,
                };
                match next {
                    Ok(Ok(thread)) => store.announce_thread(&thread, true),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "lost the agent events listener; listening again");
                        break;
                    }
                    Err(_) => {
                        if let Err(e) = listener.ping().await {
                            tracing::warn!(error = %e, "the agent events listener is dead; listening again");
                            break;
                        }
                    }
                }
            }
            self.set_listening(&store, false);
        }
    }
}

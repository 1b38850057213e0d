//! The World Agent on the workers runtime: takes running threads from the store under a
//! lease, advances them one node at a time from their last checkpoint, and saves the state
//! and the node's events after every node (ARCHITECTURE.md, "src/agent").
//!
//! A thread is found either because an `agent.task.created` row woke the runner or because a
//! periodic look at the store finds a running thread whose lease expired: the thread of a
//! worker that crashed is resumed by whichever worker looks next. Every write under the lease
//! carries its fencing token, so a worker that lost the lease (it stalled past the lease and
//! another took over) has its writes refused and stops; a step re-run after a crash saves
//! nothing twice, and a run has at most one candidate.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::chat::{self, ChatState};
use super::graph::{Graph, Limits, RunEvent, RunState, Status, Task};
use super::provider::Provider;
use crate::config::AgentConfig;
use crate::sandbox::Sandbox;
use crate::store::{
    NewCandidate, NewCheckpoint, NewThreadEvent, RecordedRun, Store, StoreError, ThreadKind,
    ThreadRecord, Usage,
};
use crate::telemetry::AgentMetrics;
use crate::worlds::model::WorldModel;

/// What `/health` says of the agent: whether the provider answered at the last call.
#[derive(Debug, Default)]
pub struct AgentHealth {
    /// 0: no call yet, 1: the last call was answered, 2: it failed to reach the provider.
    last: AtomicU8,
}

impl AgentHealth {
    pub fn answered(&self) {
        self.last.store(1, Ordering::Relaxed);
    }

    pub fn unreachable(&self) {
        self.last.store(2, Ordering::Relaxed);
    }

    /// The provider could not be reached (or answered only errors) at the last call.
    pub fn degraded(&self) -> bool {
        self.last.load(Ordering::Relaxed) == 2
    }
}

/// The world a rule is authored for: its draft when it has one, else its deployed version.
pub async fn authoring_base(store: &Store, world: &str) -> Result<Option<WorldModel>, StoreError> {
    let json = match store.draft(world).await? {
        Some(draft) => Some(draft),
        None => match store.world(world).await?.and_then(|w| w.deployed_version) {
            Some(version) => store.version(world, version).await?.map(|v| v.model),
            None => None,
        },
    };
    json.map(|j| {
        serde_json::from_value(j)
            .map_err(|e| StoreError::Corrupt(format!("world '{world}' does not decode: {e}")))
    })
    .transpose()
}

/// The id of the candidate a run proposes: one per run, the same on every resume.
pub fn candidate_id(thread: &str) -> String {
    format!("cand_{}", thread.trim_start_matches("run_"))
}

/// A thread's event as the store keeps it.
fn stored(event: &RunEvent) -> NewThreadEvent {
    let data = serde_json::to_value(event).unwrap_or_default();
    let kind = data
        .get("event")
        .and_then(|k| k.as_str())
        .unwrap_or("event")
        .to_owned();
    NewThreadEvent { kind, data }
}

/// An event of the runner's own (not a node's).
pub(crate) fn own_event(kind: &str, data: impl Serialize) -> NewThreadEvent {
    let mut data = serde_json::to_value(data).unwrap_or_default();
    if let serde_json::Value::Object(m) = &mut data {
        m.insert("event".into(), kind.into());
    }
    NewThreadEvent {
        kind: kind.to_owned(),
        data,
    }
}

/// The runner of one process.
pub struct Runner {
    pub store: Store,
    pub provider: Arc<Provider>,
    pub sandbox: Arc<Sandbox>,
    pub config: AgentConfig,
    /// This worker's name on the leases it holds.
    pub owner: String,
    /// Signalled by the `agent.task.created` handler.
    pub wake: Arc<Notify>,
    pub metrics: Arc<crate::telemetry::Metrics>,
    pub health: Arc<AgentHealth>,
}

/// Why a thread stopped advancing in this worker.
#[derive(Debug)]
enum Stop {
    /// It finished.
    Done,
    /// Shutdown: the thread stays running, for the next worker.
    Shutdown,
    /// Another worker holds it now.
    Fenced,
    Store(StoreError),
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Fenced(_) => Self::Fenced,
            e => Self::Store(e),
        }
    }
}

impl Runner {
    /// Look for threads to advance until `shutdown`, then let the threads in hand stop
    /// between nodes (or abandon the node in progress, unsaved) and wait for them.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        let active: Arc<Mutex<HashSet<String>>> = Arc::default();
        let tracker = TaskTracker::new();
        let mut last_prune = tokio::time::Instant::now();
        tracing::info!(owner = %self.owner, "World Agent runner started");
        loop {
            if let Err(e) = self.take(&slots, &active, &tracker, &shutdown).await {
                tracing::warn!(error = %e, "looking for agent threads failed; retrying");
            }
            if last_prune.elapsed() >= Duration::from_secs(3_600) {
                last_prune = tokio::time::Instant::now();
                self.prune().await;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.config.poll) => {}
            }
        }
        tracker.close();
        tracker.wait().await;
        tracing::info!(owner = %self.owner, "World Agent runner stopped");
    }

    /// Take the lease of every resumable thread there is a slot for, and advance each.
    async fn take(
        self: &Arc<Self>,
        slots: &Arc<Semaphore>,
        active: &Arc<Mutex<HashSet<String>>>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        let free = u32::try_from(slots.available_permits()).unwrap_or(u32::MAX);
        if free == 0 {
            return Ok(());
        }
        for thread in self.store.expired_runs(free.saturating_mul(2)).await? {
            if lock(active).contains(&thread.id) {
                continue;
            }
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                break;
            };
            let Some(fence) = self
                .store
                .acquire_lease(&thread.id, &self.owner, self.config.lease)
                .await?
            else {
                // Another worker took it first: it backs off, this one goes on.
                continue;
            };
            lock(active).insert(thread.id.clone());
            let this = self.clone();
            let active = active.clone();
            let shutdown = shutdown.clone();
            let span = tracing::info_span!("agent_thread", thread = %thread.id, world = %thread.world, kind = thread.kind.as_str(), fence);
            tracker.spawn(
                async move {
                    let id = thread.id.clone();
                    match this.advance(&thread, fence, &shutdown).await {
                        Stop::Done => tracing::info!("agent thread finished"),
                        Stop::Shutdown => tracing::info!("agent thread left for the next worker"),
                        Stop::Fenced => {
                            tracing::warn!("agent thread taken over by another worker; backing off")
                        }
                        Stop::Store(e) => {
                            tracing::warn!(error = %e, "agent thread stopped on a store error")
                        }
                    }
                    lock(&active).remove(&id);
                    drop(slot);
                }
                .instrument(span),
            );
        }
        Ok(())
    }

    async fn prune(&self) {
        let Ok(age) = chrono::Duration::from_std(self.config.retention) else {
            return;
        };
        let before = chrono::Utc::now() - age;
        match self.store.prune(before, 100).await {
            Ok(p) if p.threads > 0 => tracing::info!(
                threads = p.threads,
                checkpoints = p.checkpoints,
                events = p.events,
                "pruned finished agent threads"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning agent threads failed"),
        }
    }

    /// Advance one thread under `fence` until it is done, shutdown, or the lease is lost.
    async fn advance(
        &self,
        thread: &ThreadRecord,
        fence: u64,
        shutdown: &CancellationToken,
    ) -> Stop {
        // The lease is renewed beside the work; losing it stops the work.
        let lost = CancellationToken::new();
        let renewing = {
            let store = self.store.clone();
            let (id, owner, ttl) = (thread.id.clone(), self.owner.clone(), self.config.lease);
            let lost = lost.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    match store.renew_lease(&id, &owner, fence, ttl).await {
                        Ok(()) => {}
                        Err(StoreError::Fenced(_)) => {
                            lost.cancel();
                            return;
                        }
                        Err(e) => tracing::warn!(error = %e, "renewing an agent lease failed"),
                    }
                }
            })
        };
        let stop = tokio::select! {
            stop = self.drive(thread, fence) => stop,
            () = shutdown.cancelled() => Stop::Shutdown,
            () = lost.cancelled() => Stop::Fenced,
        };
        renewing.abort();
        if matches!(stop, Stop::Shutdown) {
            // Let the next worker take it at once rather than after the lease.
            let _ = self
                .store
                .renew_lease(&thread.id, &self.owner, fence, Duration::ZERO)
                .await;
        }
        stop
    }

    async fn drive(&self, thread: &ThreadRecord, fence: u64) -> Stop {
        let result = match thread.kind {
            ThreadKind::Run => self.drive_run(thread, fence).await,
            ThreadKind::Chat => self.drive_chat(thread, fence).await,
        };
        match result {
            Ok(()) => Stop::Done,
            Err(stop) => stop,
        }
    }

    fn limits(&self) -> Limits {
        Limits::from(&self.config)
    }

    async fn drive_run(&self, thread: &ThreadRecord, fence: u64) -> Result<(), Stop> {
        let latest = self.store.latest_checkpoint(&thread.id).await?;
        let mut last_step = latest.as_ref().map(|c| c.step);
        let mut state = match latest {
            Some(c) => serde_json::from_value::<RunState>(c.state).map_err(|e| {
                Stop::Store(StoreError::Corrupt(format!(
                    "checkpoint does not decode: {e}"
                )))
            })?,
            None => match serde_json::from_value::<Task>(thread.task.clone()) {
                Ok(task) => RunState::new(task, self.limits()),
                Err(e) => {
                    let mut s = RunState::new(
                        Task {
                            world: thread.world.clone(),
                            action: String::new(),
                            text: String::new(),
                        },
                        self.limits(),
                    );
                    s.end(Status::Refused {
                        reason: format!("the run's task does not decode: {e}"),
                    });
                    s
                }
            },
        };
        // The run is always authored for the thread's world, whatever its task says.
        state.task.world.clone_from(&thread.world);
        let world = authoring_base(&self.store, &thread.world).await?;
        while !state.status.is_done() {
            let Some(world) = &world else {
                state.end(Status::Refused {
                    reason: format!(
                        "world '{}' has no draft and no deployed version",
                        thread.world
                    ),
                });
                break;
            };
            let node = state.next.as_str();
            let (next, events) = self.step(state, world).await;
            state = next;
            last_step = Some(
                self.save(thread, fence, &state, last_step, node, events)
                    .await?,
            );
        }
        if last_step.is_none() {
            // Ended before any node ran (a bad task): keep that as its checkpoint.
            self.save(thread, fence, &state, last_step, "end", Vec::new())
                .await?;
        }
        self.conclude(thread, fence, &state).await
    }

    /// Run one node, collecting its events.
    async fn step(&self, state: RunState, world: &WorldModel) -> (RunState, Vec<NewThreadEvent>) {
        let graph = Graph {
            provider: &self.provider,
            sandbox: &self.sandbox,
        };
        let before = state.usage;
        let mut events = Vec::new();
        let mut on = |e: RunEvent| events.push(stored(&e));
        // Cancellation is the lease's and the shutdown's, by dropping this future.
        let never = CancellationToken::new();
        let next = graph.step(state, world, &never, &mut on).await;
        self.account(&next.task.world, &before, &next.usage, &next.status);
        (next, events)
    }

    /// Count a step's model use, and what it says of the provider's health.
    pub(crate) fn account(
        &self,
        world: &str,
        before: &super::graph::Usage,
        after: &super::graph::Usage,
        status: &Status,
    ) {
        let m: &AgentMetrics = &self.metrics.agent;
        let calls = after.calls.saturating_sub(before.calls);
        if calls > 0 {
            m.calls.with_label_values(&[world]).inc_by(u64::from(calls));
            m.tokens
                .with_label_values(&[world, "prompt"])
                .inc_by(after.prompt_tokens.saturating_sub(before.prompt_tokens));
            m.tokens.with_label_values(&[world, "completion"]).inc_by(
                after
                    .completion_tokens
                    .saturating_sub(before.completion_tokens),
            );
            m.call_seconds
                .with_label_values(&[world])
                .inc_by(after.latency_ms.saturating_sub(before.latency_ms) as f64 / 1e3);
        }
        match status {
            Status::ProviderFailed { code, .. } if code != "rejected" => self.health.unreachable(),
            _ if calls > 0 => self.health.answered(),
            _ => {}
        }
    }

    /// Save the state after a step with its events; the step number saved.
    async fn save(
        &self,
        thread: &ThreadRecord,
        fence: u64,
        state: &RunState,
        last_step: Option<u64>,
        node: &str,
        mut events: Vec<NewThreadEvent>,
    ) -> Result<u64, Stop> {
        // A bound can end a run without a node running: it is a step of its own.
        let step = u64::from(state.step).max(last_step.map_or(1, |s| s + 1));
        if state.status.is_done() {
            events.push(own_event(
                "run_finished",
                serde_json::json!({
                    "status": state.status.code(),
                    "outcome": state.status,
                    "candidate": state.evidence().map(|_| candidate_id(&thread.id)),
                    "checks": state.verification.as_ref().map(|v| v.summary()),
                }),
            ));
        }
        let json = serde_json::to_value(state)
            .map_err(|e| Stop::Store(StoreError::Corrupt(format!("state: {e}"))))?;
        let usage = Usage {
            calls: u64::from(state.usage.calls),
            prompt_tokens: state.usage.prompt_tokens,
            completion_tokens: state.usage.completion_tokens,
        };
        // A step in which a bound ended the run before its node ran is recorded as `end`.
        let node = if u64::from(state.step) == step {
            node
        } else {
            "end"
        };
        self.store
            .save_checkpoint(
                &thread.id,
                fence,
                &NewCheckpoint {
                    step,
                    parent_step: last_step,
                    node: node.to_owned(),
                    state: json,
                },
                &events,
                &usage,
            )
            .await?;
        Ok(step)
    }

    /// A candidate's evidence bundle with, when its world keeps contexts, `impact`: what the
    /// rule added to the model it was authored against would have changed over the world's
    /// most recent kept decisions (docs/impact.md). A measure that fails leaves it `null`.
    async fn evidence_with_impact(
        &self,
        world: &str,
        action: &str,
        evidence: &super::graph::Evidence,
    ) -> serde_json::Value {
        let mut json = serde_json::to_value(evidence).unwrap_or_default();
        // The rule as approval would add it: with its derived cases, each reading only what
        // the rule reads.
        let mut rule = evidence.rule.clone();
        rule.cases = evidence
            .cases
            .iter()
            .map(|case| {
                let mut case = case.clone();
                case.context.retain(|name, _| rule.inputs.contains(name));
                case
            })
            .collect();
        let impact = match authoring_base(&self.store, world).await {
            Ok(Some(base)) => {
                crate::impact::candidate_impact(&self.store, &self.sandbox, &base, action, &rule)
                    .await
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        let impact = impact.unwrap_or_else(|e| {
            tracing::warn!(world, error = %e, "measuring a candidate's impact failed");
            None
        });
        if let serde_json::Value::Object(m) = &mut json {
            m.insert(
                "impact".into(),
                serde_json::to_value(impact).unwrap_or_default(),
            );
        }
        json
    }

    /// Store the candidate of a proposed run, then end the thread.
    async fn conclude(
        &self,
        thread: &ThreadRecord,
        fence: u64,
        state: &RunState,
    ) -> Result<(), Stop> {
        if let Some(evidence) = state.evidence() {
            let candidate = NewCandidate {
                id: candidate_id(&thread.id),
                action: state.task.action.clone(),
                rule: serde_json::to_value(&evidence.rule).unwrap_or_default(),
                evidence: self
                    .evidence_with_impact(&thread.world, &state.task.action, &evidence)
                    .await,
                model: evidence
                    .model
                    .clone()
                    .unwrap_or_else(|| self.config.model.clone()),
                prompt_versions: serde_json::to_value(&evidence.prompts).unwrap_or_default(),
            };
            self.store.propose(&thread.id, fence, &candidate).await?;
        }
        let status = state.status.code();
        self.store.finish(&thread.id, fence, &status).await?;
        self.metrics
            .agent
            .runs
            .with_label_values(&[thread.world.as_str(), status.as_str()])
            .inc();
        Ok(())
    }

    async fn drive_chat(&self, thread: &ThreadRecord, fence: u64) -> Result<(), Stop> {
        let latest = self.store.latest_checkpoint(&thread.id).await?;
        let mut last_step = latest.as_ref().map(|c| c.step);
        let mut state = match latest {
            Some(c) => serde_json::from_value::<ChatState>(c.state).map_err(|e| {
                Stop::Store(StoreError::Corrupt(format!(
                    "checkpoint does not decode: {e}"
                )))
            })?,
            None => ChatState::new(&thread.world),
        };
        state.world.clone_from(&thread.world);
        loop {
            if let Some(done) = state.finished_run() {
                self.propose_from_chat(thread, fence, &mut state, done, &mut last_step)
                    .await?;
                continue;
            }
            let (message, looked) = self.next_message(&thread.id, state.seen_seq).await?;
            let node = state.run.as_ref().map_or("respond", |r| r.next.as_str());
            let (next, events) = match (state.run.is_some(), message) {
                (true, _) => self.chat_run_step(state).await?,
                (false, Some((seq, text))) => self.chat_turn(state, seq, text).await?,
                (false, None) => {
                    // Every message is answered: the thread waits for the next one, unless
                    // one arrived since the look.
                    if self
                        .store
                        .finish_if_quiet(&thread.id, fence, chat::IDLE, looked)
                        .await?
                    {
                        return Ok(());
                    }
                    continue;
                }
            };
            state = next;
            let step = last_step.map_or(1, |s| s + 1);
            let json = serde_json::to_value(&state)
                .map_err(|e| Stop::Store(StoreError::Corrupt(format!("state: {e}"))))?;
            let usage = state.store_usage();
            self.store
                .save_checkpoint(
                    &thread.id,
                    fence,
                    &NewCheckpoint {
                        step,
                        parent_step: last_step,
                        node: node.to_owned(),
                        state: json,
                    },
                    &events,
                    &usage,
                )
                .await?;
            last_step = Some(step);
        }
    }

    /// Answer one user message: a reply, or the start of an authoring run in the thread.
    async fn chat_turn(
        &self,
        state: ChatState,
        seq: u64,
        text: String,
    ) -> Result<(ChatState, Vec<NewThreadEvent>), Stop> {
        let world = authoring_base(&self.store, &state.world).await?;
        let before = state.usage_as_graph();
        let (next, events) = chat::turn(
            &self.provider,
            &self.config,
            state,
            world.as_ref(),
            seq,
            &text,
            self.limits(),
        )
        .await;
        let after = next.usage_as_graph();
        let status = next.last_status();
        self.account(&next.world, &before, &after, &status);
        Ok((next, events))
    }

    async fn chat_run_step(
        &self,
        mut state: ChatState,
    ) -> Result<(ChatState, Vec<NewThreadEvent>), Stop> {
        let world = authoring_base(&self.store, &state.world).await?;
        let Some(run) = state.run.take() else {
            return Ok((state, Vec::new()));
        };
        let Some(world) = world else {
            let mut run = run;
            run.end(Status::Refused {
                reason: format!(
                    "world '{}' has no draft and no deployed version",
                    state.world
                ),
            });
            state.run = Some(run);
            return Ok((state, Vec::new()));
        };
        let before = run.usage;
        let (run, events) = self.step(run, &world).await;
        state.add_run_usage(&before, &run.usage);
        state.run = Some(run);
        Ok((state, events))
    }

    /// A run inside a chat ended: it is recorded as a finished run thread of its own, the
    /// chat's child, with its candidate (so a run still has at most one), and the turn ends.
    async fn propose_from_chat(
        &self,
        thread: &ThreadRecord,
        fence: u64,
        state: &mut ChatState,
        run: RunState,
        last_step: &mut Option<u64>,
    ) -> Result<(), Stop> {
        let child = state.run_thread(&thread.id);
        let candidate = match run.evidence() {
            Some(evidence) => Some(NewCandidate {
                id: candidate_id(&child),
                action: run.task.action.clone(),
                rule: serde_json::to_value(&evidence.rule).unwrap_or_default(),
                evidence: self
                    .evidence_with_impact(&thread.world, &run.task.action, &evidence)
                    .await,
                model: evidence
                    .model
                    .clone()
                    .unwrap_or_else(|| self.config.model.clone()),
                prompt_versions: serde_json::to_value(&evidence.prompts).unwrap_or_default(),
            }),
            None => None,
        };
        let recorded = RecordedRun {
            thread: crate::store::NewThread {
                id: child,
                world: thread.world.clone(),
                kind: ThreadKind::Run,
                parent: Some(thread.id.clone()),
                created_by: thread.created_by.clone(),
                task: serde_json::to_value(&run.task).unwrap_or_default(),
            },
            state: serde_json::to_value(&run).unwrap_or_default(),
            usage: Usage {
                calls: u64::from(run.usage.calls),
                prompt_tokens: run.usage.prompt_tokens,
                completion_tokens: run.usage.completion_tokens,
            },
            status: run.status.code(),
            candidate,
        };
        let proposed = self.store.record_run(&thread.id, fence, &recorded).await?;
        self.metrics
            .agent
            .runs
            .with_label_values(&[thread.world.as_str(), run.status.code().as_str()])
            .inc();
        let events = state.close_run(&recorded.thread.id, &run, proposed.as_deref());
        let step = last_step.map_or(1, |s| s + 1);
        let json = serde_json::to_value(&*state)
            .map_err(|e| Stop::Store(StoreError::Corrupt(format!("state: {e}"))))?;
        self.store
            .save_checkpoint(
                &thread.id,
                fence,
                &NewCheckpoint {
                    step,
                    parent_step: *last_step,
                    node: "run_finished".into(),
                    state: json,
                },
                &events,
                &state.store_usage(),
            )
            .await?;
        *last_step = Some(step);
        Ok(())
    }

    /// The first user message after `after`, and the last seq looked at.
    async fn next_message(
        &self,
        thread: &str,
        after: u64,
    ) -> Result<(Option<(u64, String)>, u64), StoreError> {
        let mut last = after;
        loop {
            let page = self.store.events_after(thread, last, 256).await?;
            let Some(end) = page.last().map(|e| e.seq) else {
                return Ok((None, last));
            };
            if let Some(m) = page.iter().find(|e| e.kind == chat::USER_MESSAGE) {
                let text = m
                    .data
                    .get("text")
                    .and_then(|t| t.as_str())
                    .unwrap_or_default();
                return Ok((Some((m.seq, text.to_owned())), end));
            }
            last = end;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

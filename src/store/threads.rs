//! What the store keeps of the World Agent (ARCHITECTURE.md, "src/store"): threads with their
//! run lease and fencing token, the checkpoint after every node, each thread's ordered event
//! log, and the rule candidates runs propose. States, events and evidence are JSON documents
//! here, so that the store does not depend on the agent's types.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::records::{to_u64, Json, Time};
use super::StoreError;

/// What a thread is: one authoring run, or a conversation that may start runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ThreadKind {
    Run,
    Chat,
}

impl ThreadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Run => "run",
            Self::Chat => "chat",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Run, Self::Chat]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// The status of a thread that a worker may advance; any other status is final.
pub const RUNNING: &str = "running";

/// A thread to create; it starts `running`, with no lease and fence 0.
#[derive(Debug, Clone, PartialEq)]
pub struct NewThread {
    pub id: String,
    pub world: String,
    pub kind: ThreadKind,
    /// The chat thread a run was started inside.
    pub parent: Option<String>,
    /// The key id that started it.
    pub created_by: String,
    pub task: serde_json::Value,
}

/// What a thread has used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// LLM calls.
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A stored thread.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ThreadRecord {
    pub id: String,
    pub world: String,
    pub kind: ThreadKind,
    pub parent: Option<String>,
    pub created_by: String,
    pub status: String,
    pub task: serde_json::Value,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Incremented on every acquisition of the lease.
    pub fence: u64,
    pub usage: Usage,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// When retention removed the thread's history (all but its final checkpoint).
    pub pruned_at: Option<DateTime<Utc>>,
}

/// The state after one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCheckpoint {
    pub step: u64,
    /// The step this one followed; `None` for the first.
    pub parent_step: Option<u64>,
    pub node: String,
    pub state: serde_json::Value,
}

/// A stored checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointRecord {
    pub step: u64,
    pub parent_step: Option<u64>,
    pub node: String,
    pub state: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// An event a step appends to its thread's log.
#[derive(Debug, Clone, PartialEq)]
pub struct NewThreadEvent {
    /// `token`, `node_started`, `node_finished`, `error`, …
    pub kind: String,
    pub data: serde_json::Value,
}

/// An event of a thread's log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ThreadEvent {
    /// 1, 2, 3 … within the thread.
    pub seq: u64,
    /// The step that appended it.
    pub step: u64,
    pub kind: String,
    pub data: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// What a save did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    /// `false` when the step was already checkpointed (a re-run): nothing was written.
    pub written: bool,
    /// The seq of the thread's last event after the save.
    pub last_seq: u64,
}

/// A rule candidate a run proposes.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCandidate {
    pub id: String,
    pub action: String,
    pub rule: serde_json::Value,
    /// The evidence bundle: derived cases with their results, checks passed, repairs, usage.
    pub evidence: serde_json::Value,
    pub model: String,
    /// The version of each prompt template the run used.
    pub prompt_versions: serde_json::Value,
}

/// A stored rule candidate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CandidateRecord {
    pub id: String,
    pub world: String,
    pub action: String,
    pub run_thread: String,
    pub rule: serde_json::Value,
    pub evidence: serde_json::Value,
    pub model: String,
    pub prompt_versions: serde_json::Value,
    /// `proposed`, `approved` or `rejected`.
    pub status: String,
    pub reviewer: Option<String>,
    pub rationale: Option<String>,
    pub reviewed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// A run that ended inside another thread (a chat), recorded as a finished run thread of its
/// own, the other's child, with its final state and its candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRun {
    /// The run thread; its world and parent are the parent thread's.
    pub thread: NewThread,
    pub state: serde_json::Value,
    pub usage: Usage,
    /// The final status.
    pub status: String,
    pub candidate: Option<NewCandidate>,
}

/// A reviewer's verdict on a rule candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Approved,
    Rejected,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Approved => "approved",
            Self::Rejected => "rejected",
        }
    }
}

/// A review of one candidate of one world.
#[derive(Debug, Clone, PartialEq)]
pub struct Review {
    pub candidate: String,
    pub world: String,
    pub verdict: Verdict,
    /// The key id of the reviewer.
    pub reviewer: String,
    pub rationale: Option<String>,
}

/// What a pruning removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    pub threads: u64,
    pub checkpoints: u64,
    pub events: u64,
}

// ---------------------------------------------------------------------------------------------
// Rows, decoded by name from either dialect.

/// The columns of `agent_threads`, in the order of `ThreadRow`.
macro_rules! thread_columns {
    () => {
        "id, world, kind, parent_thread, created_by, status, task, lease_owner, \
         lease_expires_at, fence, calls, prompt_tokens, completion_tokens, created_at, \
         updated_at, finished_at, pruned_at"
    };
}

/// The columns of `rule_candidates`, in the order of `CandidateRow`.
macro_rules! candidate_columns {
    () => {
        "id, world, action, run_thread, rule, evidence, model, prompt_versions, status, \
         reviewer, rationale, reviewed_at, created_at"
    };
}

pub(crate) use {candidate_columns, thread_columns};

#[derive(sqlx::FromRow)]
pub(crate) struct ThreadRow {
    pub id: String,
    pub world: String,
    pub kind: String,
    pub parent_thread: Option<String>,
    pub created_by: String,
    pub status: String,
    pub task: Json,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<Time>,
    pub fence: i64,
    pub calls: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub created_at: Time,
    pub updated_at: Time,
    pub finished_at: Option<Time>,
    pub pruned_at: Option<Time>,
}

/// What a write under a lease checks of its thread, read with the thread's row locked.
#[derive(sqlx::FromRow)]
pub(crate) struct ThreadLockRow {
    pub world: String,
    pub fence: i64,
    pub status: String,
}

#[derive(sqlx::FromRow)]
pub(crate) struct CheckpointRow {
    pub step: i64,
    pub parent_step: Option<i64>,
    pub node: String,
    pub state: Json,
    pub created_at: Time,
}

#[derive(sqlx::FromRow)]
pub(crate) struct ThreadEventRow {
    pub seq: i64,
    pub step: i64,
    pub kind: String,
    pub data: Json,
    pub created_at: Time,
}

#[derive(sqlx::FromRow)]
pub(crate) struct CandidateRow {
    pub id: String,
    pub world: String,
    pub action: String,
    pub run_thread: String,
    pub rule: Json,
    pub evidence: Json,
    pub model: String,
    pub prompt_versions: Json,
    pub status: String,
    pub reviewer: Option<String>,
    pub rationale: Option<String>,
    pub reviewed_at: Option<Time>,
    pub created_at: Time,
}

impl TryFrom<ThreadRow> for ThreadRecord {
    type Error = StoreError;

    fn try_from(r: ThreadRow) -> Result<Self, StoreError> {
        let kind = ThreadKind::parse(&r.kind).ok_or_else(|| {
            StoreError::Corrupt(format!("agent thread '{}' has kind '{}'", r.id, r.kind))
        })?;
        Ok(ThreadRecord {
            kind,
            world: r.world,
            parent: r.parent_thread,
            created_by: r.created_by,
            status: r.status,
            task: r.task.0,
            lease_owner: r.lease_owner,
            lease_expires_at: r.lease_expires_at.map(|t| t.0),
            fence: to_u64(r.fence, "fence")?,
            usage: Usage {
                calls: to_u64(r.calls, "calls")?,
                prompt_tokens: to_u64(r.prompt_tokens, "prompt tokens")?,
                completion_tokens: to_u64(r.completion_tokens, "completion tokens")?,
            },
            created_at: r.created_at.0,
            updated_at: r.updated_at.0,
            finished_at: r.finished_at.map(|t| t.0),
            pruned_at: r.pruned_at.map(|t| t.0),
            id: r.id,
        })
    }
}

impl TryFrom<CheckpointRow> for CheckpointRecord {
    type Error = StoreError;

    fn try_from(r: CheckpointRow) -> Result<Self, StoreError> {
        Ok(CheckpointRecord {
            step: to_u64(r.step, "step")?,
            parent_step: r.parent_step.map(|s| to_u64(s, "step")).transpose()?,
            node: r.node,
            state: r.state.0,
            created_at: r.created_at.0,
        })
    }
}

impl TryFrom<ThreadEventRow> for ThreadEvent {
    type Error = StoreError;

    fn try_from(r: ThreadEventRow) -> Result<Self, StoreError> {
        Ok(ThreadEvent {
            seq: to_u64(r.seq, "event seq")?,
            step: to_u64(r.step, "step")?,
            kind: r.kind,
            data: r.data.0,
            created_at: r.created_at.0,
        })
    }
}

impl From<CandidateRow> for CandidateRecord {
    fn from(r: CandidateRow) -> Self {
        CandidateRecord {
            id: r.id,
            world: r.world,
            action: r.action,
            run_thread: r.run_thread,
            rule: r.rule.0,
            evidence: r.evidence.0,
            model: r.model,
            prompt_versions: r.prompt_versions.0,
            status: r.status,
            reviewer: r.reviewer,
            rationale: r.rationale,
            reviewed_at: r.reviewed_at.map(|t| t.0),
            created_at: r.created_at.0,
        }
    }
}

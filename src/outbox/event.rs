//! The events the service produces, typed: one variant per event type, each with the payload
//! it carries (ARCHITECTURE.md). A row stores the type in `event_type`, the layout's version in
//! `event_version` and the payload as JSON in `payload`; [`Event`] is that triple decoded.
//!
//! A payload's fields may grow within a version (readers ignore fields they do not know);
//! any other change to a payload is a new version, and a build refuses a version newer than
//! it knows, so that the row waits in the dead-letter queue for a build that reads it rather
//! than being misread.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::{NewEvent, OutboxRow, StoreError};

/// Event type names, as stored in `event_type` and listed in webhook subscriptions.
pub mod events {
    /// A world version was published: [`super::VersionPublished`].
    pub const VERSION_PUBLISHED: &str = "worldmodel.version.published";
    /// A version was deployed (or rolled back to): [`super::ModuleDeployed`].
    pub const MODULE_DEPLOYED: &str = "module.deployed";
    /// A version was retired: [`super::VersionRetired`].
    pub const VERSION_RETIRED: &str = "world.version.retired";
    /// A batch of decisions of one world was recorded, one event per world per group commit:
    /// [`super::DecisionRecorded`].
    pub const DECISION_RECORDED: &str = "decision.recorded";
    /// One webhook delivery to one subscriber: [`super::WebhookDelivery`].
    pub const WEBHOOK_DELIVERY: &str = "webhook.delivery";
    /// A World Agent run proposed a rule candidate for review:
    /// [`super::RuleCandidateProposed`].
    pub const RULE_CANDIDATE_PROPOSED: &str = "worlds.rule_candidate.proposed";
    /// An agent thread has work for a worker (a run was started, or a chat message posted):
    /// [`super::AgentTaskCreated`].
    pub const AGENT_TASK_CREATED: &str = "agent.task.created";
}

/// An event, as producers build it and handlers read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "payload")]
pub enum Event {
    #[serde(rename = "worldmodel.version.published")]
    VersionPublished(VersionPublished),
    #[serde(rename = "module.deployed")]
    ModuleDeployed(ModuleDeployed),
    #[serde(rename = "world.version.retired")]
    VersionRetired(VersionRetired),
    #[serde(rename = "decision.recorded")]
    DecisionRecorded(DecisionRecorded),
    #[serde(rename = "webhook.delivery")]
    WebhookDelivery(Delivery),
    #[serde(rename = "worlds.rule_candidate.proposed")]
    RuleCandidateProposed(RuleCandidateProposed),
    #[serde(rename = "agent.task.created")]
    AgentTaskCreated(AgentTaskCreated),
}

/// `agent.task.created`: a thread is `running` and waits for a worker to take its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentTaskCreated {
    pub world: String,
    pub thread: String,
    /// `run` or `chat`.
    pub kind: String,
}

/// `worlds.rule_candidate.proposed`: a run's candidate awaits review.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCandidateProposed {
    pub world: String,
    /// The candidate's id.
    pub candidate: String,
    /// The run thread that proposed it.
    pub run_thread: String,
    pub action: String,
    pub model: String,
}

/// `worldmodel.version.published`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionPublished {
    pub world: String,
    pub version: u64,
    /// In the model's action order.
    pub modules: Vec<PublishedModule>,
    pub published_by: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedModule {
    pub action: String,
    pub hash: String,
}

/// `module.deployed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleDeployed {
    pub world: String,
    pub version: u64,
    /// The deployment's place in the world's history.
    pub seq: u64,
    pub deployed_by: String,
}

/// `world.version.retired`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRetired {
    pub world: String,
    pub version: u64,
    pub retired_at: DateTime<Utc>,
    pub retired_by: String,
    pub reason: Option<String>,
}

/// `decision.recorded`: the records of one group commit of one world.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecorded {
    pub world: String,
    #[serde(flatten)]
    pub batch: RecordedBatch,
}

/// What a `decision.recorded` event says of its batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RecordedBatch {
    /// Records `first_seq..=last_seq`, counted by status overall (rule `*`) and per matched
    /// rule, so the payload's size follows the rules that matched, not the batch's size.
    Counted {
        first_seq: i64,
        last_seq: i64,
        counts: Vec<RuleCount>,
    },
    /// The decisions themselves, as rows written by earlier builds carry them.
    Listed { decisions: Vec<ListedDecision> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCount {
    /// A rule id, or `*` for whole decisions.
    pub rule: String,
    pub status: String,
    pub count: u64,
}

/// A decision as earlier builds listed it in `decision.recorded`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedDecision {
    pub status: String,
    /// The ids of the rules that matched.
    #[serde(default)]
    pub rules: Vec<String>,
}

/// `webhook.delivery`: one delivery of one event to one subscriber.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub webhook_id: String,
    /// The type of the event delivered.
    pub event_type: String,
    /// The idempotency key of the event delivered.
    #[serde(default)]
    pub event_key: String,
    /// The delivered event's payload, sent to the subscriber as it was stored.
    pub body: serde_json::Value,
}

/// A row that does not decode into an [`Event`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("unknown event type '{0}'")]
    UnknownType(String),
    #[error(
        "event type '{event_type}' version {version} is newer than this build reads \
         (up to version {known}); replay the row once a build that reads it runs"
    )]
    NewerVersion {
        event_type: String,
        version: i32,
        known: i32,
    },
    #[error("malformed '{event_type}' payload: {reason}")]
    Malformed { event_type: String, reason: String },
}

impl Event {
    /// Every event type this build knows; each is at layout version [`Event::VERSION`].
    pub(crate) const TYPES: [&'static str; 7] = [
        events::VERSION_PUBLISHED,
        events::MODULE_DEPLOYED,
        events::VERSION_RETIRED,
        events::DECISION_RECORDED,
        events::WEBHOOK_DELIVERY,
        events::RULE_CANDIDATE_PROPOSED,
        events::AGENT_TASK_CREATED,
    ];

    /// The payload layout version this build writes and reads, for every type. It is the
    /// `event_version` column's default, so rows written before the column was set carry it.
    pub const VERSION: i32 = 1;

    pub fn event_type(&self) -> &'static str {
        match self {
            Self::VersionPublished(_) => events::VERSION_PUBLISHED,
            Self::ModuleDeployed(_) => events::MODULE_DEPLOYED,
            Self::VersionRetired(_) => events::VERSION_RETIRED,
            Self::DecisionRecorded(_) => events::DECISION_RECORDED,
            Self::WebhookDelivery(_) => events::WEBHOOK_DELIVERY,
            Self::RuleCandidateProposed(_) => events::RULE_CANDIDATE_PROPOSED,
            Self::AgentTaskCreated(_) => events::AGENT_TASK_CREATED,
        }
    }

    /// Decode a stored type, version and payload.
    pub fn decode(
        event_type: &str,
        version: i32,
        payload: &serde_json::Value,
    ) -> Result<Self, EventError> {
        if !Self::TYPES.contains(&event_type) {
            return Err(EventError::UnknownType(event_type.to_owned()));
        }
        if version > Self::VERSION {
            return Err(EventError::NewerVersion {
                event_type: event_type.to_owned(),
                version,
                known: Self::VERSION,
            });
        }
        let tagged = serde_json::json!({"event_type": event_type, "payload": payload});
        serde_json::from_value(tagged).map_err(|e| EventError::Malformed {
            event_type: event_type.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Decode an outbox row's event.
    pub fn from_row(row: &OutboxRow) -> Result<Self, EventError> {
        Self::decode(&row.event_type, row.event_version, &row.payload)
    }

    /// The payload as it is stored.
    pub fn payload(&self) -> Result<serde_json::Value, StoreError> {
        let tagged = serde_json::to_value(self)
            .map_err(|e| StoreError::Corrupt(format!("{} payload: {e}", self.event_type())))?;
        if let serde_json::Value::Object(mut m) = tagged {
            if let Some(payload) = m.remove("payload") {
                return Ok(payload);
            }
        }
        Err(StoreError::Corrupt(format!(
            "{} serialized with no payload",
            self.event_type()
        )))
    }

    /// The row to append for this event, about `world`, unique per type by `idempotency_key`.
    pub fn into_new(
        self,
        world: Option<&str>,
        idempotency_key: String,
    ) -> Result<NewEvent, StoreError> {
        Ok(NewEvent {
            event_type: self.event_type().to_owned(),
            world: world.map(str::to_owned),
            payload: self.payload()?,
            idempotency_key,
            target: None,
        })
    }
}

#[cfg(test)]
mod tests {

    use serde_json::json;

    use super::*;

    fn recorded() -> Event {
        Event::DecisionRecorded(DecisionRecorded {
            world: "w".into(),
            batch: RecordedBatch::Counted {
                first_seq: 1,
                last_seq: 2,
                counts: vec![RuleCount {
                    rule: "*".into(),
                    status: "RED".into(),
                    count: 2,
                }],
            },
        })
    }

    #[test]
    fn every_type_round_trips_under_its_own_name() {
        let events = [
            Event::VersionPublished(VersionPublished {
                world: "w".into(),
                version: 1,
                modules: vec![PublishedModule {
                    action: "pay".into(),
                    hash: "sha256:00".into(),
                }],
                published_by: "k".into(),
            }),
            Event::ModuleDeployed(ModuleDeployed {
                world: "w".into(),
                version: 1,
                seq: 1,
                deployed_by: "k".into(),
            }),
            Event::VersionRetired(VersionRetired {
                world: "w".into(),
                version: 1,
                retired_at: DateTime::from_timestamp(0, 0).unwrap(),
                retired_by: "k".into(),
                reason: None,
            }),
            recorded(),
            Event::WebhookDelivery(Delivery {
                webhook_id: "h".into(),
                event_type: events::MODULE_DEPLOYED.into(),
                event_key: "w:1".into(),
                body: json!({"world": "w"}),
            }),
            Event::RuleCandidateProposed(RuleCandidateProposed {
                world: "w".into(),
                candidate: "c".into(),
                run_thread: "t".into(),
                action: "pay".into(),
                model: "m".into(),
            }),
            Event::AgentTaskCreated(AgentTaskCreated {
                world: "w".into(),
                thread: "t".into(),
                kind: "run".into(),
            }),
        ];
        for (event, name) in events.into_iter().zip(Event::TYPES) {
            assert_eq!(event.event_type(), name);
            let tagged = serde_json::to_value(&event).unwrap();
            assert_eq!(
                tagged["event_type"], name,
                "the serde name is the stored name"
            );
            let payload = event.payload().unwrap();
            assert_eq!(
                Event::decode(name, Event::VERSION, &payload).unwrap(),
                event
            );
        }
    }

    #[test]
    fn payloads_keep_the_layout_rows_already_carry() {
        let payload = recorded().payload().unwrap();
        assert_eq!(
            payload,
            json!({"world": "w", "first_seq": 1, "last_seq": 2,
                   "counts": [{"rule": "*", "status": "RED", "count": 2}]})
        );
        let listed = json!({"world": "w", "decisions": [
            {"decision_id": "a", "action": "x", "status": "RED", "rules": ["r1"]}]});
        let Event::DecisionRecorded(r) =
            Event::decode(events::DECISION_RECORDED, 1, &listed).unwrap()
        else {
            panic!("not decision.recorded");
        };
        assert_eq!(
            r.batch,
            RecordedBatch::Listed {
                decisions: vec![ListedDecision {
                    status: "RED".into(),
                    rules: vec!["r1".into()]
                }]
            }
        );
    }

    #[test]
    fn unknown_types_newer_versions_and_bad_payloads_are_refused() {
        let payload = recorded().payload().unwrap();
        assert_eq!(
            Event::decode("thing.happened", 1, &payload),
            Err(EventError::UnknownType("thing.happened".into()))
        );
        let newer = Event::decode(events::DECISION_RECORDED, 2, &payload).unwrap_err();
        assert!(matches!(
            newer,
            EventError::NewerVersion {
                version: 2,
                known: 1,
                ..
            }
        ));
        assert!(
            newer.to_string().contains("newer than this build reads"),
            "{newer}"
        );
        for bad in [
            json!({"first_seq": 1, "last_seq": 1, "counts": []}),
            json!({"world": "w", "counts": "2"}),
            json!({"world": "w", "first_seq": 1, "last_seq": 1, "counts": [{"rule": "*", "status": "RED", "count": -1}]}),
        ] {
            let r = Event::decode(events::DECISION_RECORDED, 1, &bad);
            assert!(
                matches!(r, Err(EventError::Malformed { .. })),
                "{bad}: {r:?}"
            );
        }
    }
}

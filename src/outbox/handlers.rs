//! The service's handlers: decision statistics, webhook fan-out and webhook delivery.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use super::{events, Delivery, Event, RecordedBatch};
use super::{Handler, HandlerError, HandlerFuture, Registry};
use crate::egress::Egress;
use crate::seal::Sealer;
use crate::store::{Effect, OutboxRow, StatDelta, Store};

/// The handlers the service runs, by event type.
/// The handlers of every event type. Fails only when the webhook client cannot be built:
/// a client without the egress resolver and the no-redirect policy must never be used.
pub fn registry(
    store: Store,
    webhook_timeout: Duration,
    egress: &Egress,
    agent_wake: Arc<tokio::sync::Notify>,
    seal: Sealer,
) -> Result<Registry, reqwest::Error> {
    let delivery = WebhookDelivery::new(store.clone(), webhook_timeout, egress, seal)?;
    let mut r = Registry::new();
    let fanout: Arc<dyn super::Handler> = Arc::new(WebhookFanout {
        store: store.clone(),
    });
    r.register(events::DECISION_RECORDED, Arc::new(DecisionStats))
        .register(events::VERSION_PUBLISHED, fanout.clone())
        .register(events::MODULE_DEPLOYED, fanout.clone())
        .register(events::VERSION_RETIRED, fanout.clone())
        .register(events::RULE_CANDIDATE_PROPOSED, fanout)
        .register(events::WEBHOOK_DELIVERY, Arc::new(delivery))
        .register(
            events::AGENT_TASK_CREATED,
            Arc::new(AgentTask { wake: agent_wake }),
        );
    Ok(r)
}

/// `agent.task.created` → wake this process's World Agent runner. The thread itself is in
/// the store, `running`: the runner takes its lease, and a runner that was not woken (another
/// process's, or this one after a restart) finds it at its next look.
pub struct AgentTask {
    wake: Arc<tokio::sync::Notify>,
}

impl Handler for AgentTask {
    fn name(&self) -> &'static str {
        "agent_task"
    }

    fn handle<'a>(&'a self, row: &'a OutboxRow) -> HandlerFuture<'a> {
        Box::pin(async move {
            match event(row)? {
                Event::AgentTaskCreated(_) => {
                    self.wake.notify_one();
                    Ok(Effect::None)
                }
                other => Err(unexpected(self.name(), &other)),
            }
        })
    }
}

/// A row's event, or the terminal failure that sends a row this build cannot read to the
/// dead-letter queue.
fn event(row: &OutboxRow) -> Result<Event, HandlerError> {
    Event::from_row(row).map_err(|e| HandlerError::Terminal(e.to_string()))
}

/// The failure of a handler given an event of a type it does not handle.
fn unexpected(handler: &str, event: &Event) -> HandlerError {
    HandlerError::Terminal(format!(
        "{handler} does not handle '{}' events",
        event.event_type()
    ))
}

/// `decision.recorded` → per-world counts by status, and per rule by status.
pub struct DecisionStats;

impl Handler for DecisionStats {
    fn name(&self) -> &'static str {
        "decision_stats"
    }

    fn handle<'a>(&'a self, row: &'a OutboxRow) -> HandlerFuture<'a> {
        Box::pin(async move {
            let recorded = match event(row)? {
                Event::DecisionRecorded(recorded) => recorded,
                other => return Err(unexpected(self.name(), &other)),
            };
            let world = recorded.world;
            Ok(Effect::Stats(
                counts(&recorded.batch)?
                    .into_iter()
                    .map(|((rule, status), count)| StatDelta {
                        world: world.clone(),
                        rule,
                        status,
                        count,
                    })
                    .collect(),
            ))
        })
    }
}

type Counts = BTreeMap<(String, String), i64>;

/// The statistics of a batch, whether it came counted or (from earlier builds) listed.
fn counts(batch: &RecordedBatch) -> Result<Counts, HandlerError> {
    let mut out = Counts::new();
    match batch {
        RecordedBatch::Counted { counts, .. } => {
            for c in counts {
                let count = i64::try_from(c.count)
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        HandlerError::Terminal(format!(
                            "payload counts: {} for rule '{}' is not a positive count",
                            c.count, c.rule
                        ))
                    })?;
                *out.entry((c.rule.clone(), c.status.clone())).or_default() += count;
            }
        }
        RecordedBatch::Listed { decisions } => {
            for d in decisions {
                *out.entry(("*".into(), d.status.clone())).or_default() += 1;
                for rule in &d.rules {
                    *out.entry((rule.clone(), d.status.clone())).or_default() += 1;
                }
            }
        }
    }
    Ok(out)
}

/// `worldmodel.version.published`, `module.deployed`, `world.version.retired` and
/// `worlds.rule_candidate.proposed` → one
/// `webhook.delivery` per subscriber of the world, so each delivery is retried on its own.
pub(crate) struct WebhookFanout {
    store: Store,
}

impl Handler for WebhookFanout {
    fn name(&self) -> &'static str {
        "webhook_fanout"
    }

    fn handle<'a>(&'a self, row: &'a OutboxRow) -> HandlerFuture<'a> {
        Box::pin(async move {
            // Read to refuse what this build cannot read; the subscribers get the payload
            // as it was stored.
            match event(row)? {
                Event::VersionPublished(_)
                | Event::ModuleDeployed(_)
                | Event::VersionRetired(_)
                | Event::RuleCandidateProposed(_) => {}
                other => return Err(unexpected(self.name(), &other)),
            }
            let Some(world) = row.world.as_deref() else {
                return Ok(Effect::None);
            };
            let hooks = self
                .store
                .webhooks(world)
                .await
                .map_err(|e| HandlerError::Retryable(e.to_string()))?;
            let deliveries = hooks
                .into_iter()
                .filter(|h| h.events.iter().any(|e| e == &row.event_type || e == "*"))
                .map(|h| {
                    let key = format!("{}:{}:{}", h.id, row.event_type, row.idempotency_key);
                    Event::WebhookDelivery(Delivery {
                        webhook_id: h.id,
                        event_type: row.event_type.clone(),
                        event_key: row.idempotency_key.clone(),
                        body: row.payload.clone(),
                    })
                    .into_new(Some(world), key)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| HandlerError::Terminal(e.to_string()))?;
            Ok(if deliveries.is_empty() {
                Effect::None
            } else {
                Effect::Enqueue(deliveries)
            })
        })
    }
}

/// `webhook.delivery` → an HTTP POST signed with HMAC-SHA256 over the timestamp and body.
pub(crate) struct WebhookDelivery {
    store: Store,
    client: reqwest::Client,
    egress: Egress,
    /// Opens the stored secrets (`src/seal.rs`).
    seal: Sealer,
}

impl WebhookDelivery {
    /// A client that follows no redirects and connects only where `egress` permits: its
    /// resolver drops internal addresses, so a name cannot be rebound to one.
    pub(crate) fn new(
        store: Store,
        timeout: Duration,
        egress: &Egress,
        seal: Sealer,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(egress.resolver())
            .build()?;
        Ok(Self {
            store,
            client,
            egress: egress.clone(),
            seal,
        })
    }
}

/// The signature a subscriber checks: hex HMAC-SHA256 of `"{timestamp}.{body}"` keyed with
/// the webhook's secret.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail; the fallback only avoids a panic.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

impl Handler for WebhookDelivery {
    fn name(&self) -> &'static str {
        "webhook_delivery"
    }

    fn handle<'a>(&'a self, row: &'a OutboxRow) -> HandlerFuture<'a> {
        Box::pin(async move {
            let delivery = match event(row)? {
                Event::WebhookDelivery(delivery) => delivery,
                other => return Err(unexpected(self.name(), &other)),
            };
            let id = delivery.webhook_id.as_str();
            let hook = self
                .store
                .webhook(id)
                .await
                .map_err(|e| HandlerError::Retryable(e.to_string()))?
                .ok_or_else(|| {
                    HandlerError::Terminal(format!("webhook '{id}' no longer exists"))
                })?;
            // Checked again at delivery: the policy may be stricter than when it was stored.
            let url = reqwest::Url::parse(&hook.url)
                .map_err(|e| HandlerError::Terminal(format!("url '{}': {e}", hook.url)))?;
            self.egress.check_url(&url).map_err(|why| {
                HandlerError::Terminal(format!("not delivered to {}: {why}", hook.url))
            })?;
            // A sealed secret this process cannot open waits in the dead-letter queue, to be
            // replayed once the key is configured.
            let secret = self
                .seal
                .open(&hook.id, &hook.secret)
                .map_err(|e| HandlerError::Terminal(e.to_string()))?;
            let event_type = delivery.event_type.as_str();
            let body = serde_json::to_vec(&json!({
                "event_type": event_type,
                "world": hook.world,
                "data": delivery.body,
            }))
            .map_err(|e| HandlerError::Terminal(e.to_string()))?;
            let timestamp = chrono::Utc::now().timestamp();
            let response = self
                .client
                .post(&hook.url)
                .header("content-type", "application/json")
                .header("x-spectral-event", event_type)
                .header("x-spectral-timestamp", timestamp.to_string())
                .header(
                    "x-spectral-signature",
                    format!("v1={}", signature(&secret, timestamp, &body)),
                )
                // Subscribers deduplicate redeliveries with it.
                .header("idempotency-key", &row.idempotency_key)
                .body(body)
                .send()
                .await
                .map_err(|e| {
                    HandlerError::Retryable(format!("delivery to {} failed: {e}", hook.url))
                })?;
            let status = response.status();
            if status.is_success() {
                Ok(Effect::None)
            } else if status.as_u16() == 408 || status.as_u16() == 429 || status.is_server_error() {
                Err(HandlerError::Retryable(format!(
                    "{} answered {status}",
                    hook.url
                )))
            } else {
                Err(HandlerError::Terminal(format!(
                    "{} refused the delivery: {status}",
                    hook.url
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn signature_covers_timestamp_and_body() {
        let a = signature("k", 1, b"{}");
        assert_eq!(a.len(), 64);
        assert_ne!(a, signature("k", 2, b"{}"));
        assert_ne!(a, signature("k", 1, b"{ }"));
        assert_ne!(a, signature("other", 1, b"{}"));
        assert_eq!(a, signature("k", 1, b"{}"));
    }

    fn key(rule: &str, status: &str) -> (String, String) {
        (rule.into(), status.into())
    }

    fn batch(payload: serde_json::Value) -> RecordedBatch {
        match Event::decode(events::DECISION_RECORDED, Event::VERSION, &payload) {
            Ok(Event::DecisionRecorded(r)) => r.batch,
            other => panic!("{payload}: {other:?}"),
        }
    }

    #[test]
    fn counts_and_listed_decisions_give_the_same_statistics() {
        let counted = counts(&batch(
            json!({"world": "w", "first_seq": 1, "last_seq": 3, "counts": [
                {"rule": "*", "status": "RED", "count": 2},
                {"rule": "*", "status": "GREEN", "count": 1},
                {"rule": "sanctions-hit", "status": "RED", "count": 2},
            ]}),
        ));
        let listed = counts(&batch(json!({"world": "w", "decisions": [
            {"decision_id": "a", "action": "x", "status": "RED", "rules": ["sanctions-hit"]},
            {"decision_id": "b", "action": "x", "status": "GREEN", "rules": []},
            {"decision_id": "c", "action": "x", "status": "RED", "rules": ["sanctions-hit"]},
        ]})));
        let expected: Counts = [
            (key("*", "GREEN"), 1),
            (key("*", "RED"), 2),
            (key("sanctions-hit", "RED"), 2),
        ]
        .into();
        assert!(matches!(&counted, Ok(c) if *c == expected), "{counted:?}");
        assert!(matches!(&listed, Ok(c) if *c == expected), "{listed:?}");
    }

    #[test]
    fn a_zero_count_fails_for_good() {
        let zero = batch(json!({"world": "w", "first_seq": 1, "last_seq": 1,
                                "counts": [{"rule": "*", "status": "RED", "count": 0}]}));
        let r = counts(&zero);
        assert!(matches!(r, Err(HandlerError::Terminal(_))), "{r:?}");
    }

    fn row(event_type: &str, event_version: i32, payload: serde_json::Value) -> OutboxRow {
        let at = chrono::DateTime::from_timestamp(0, 0).unwrap_or_default();
        OutboxRow {
            id: 1,
            event_type: event_type.into(),
            event_version,
            occurred_at: at,
            source: "spectral/test".into(),
            target: None,
            channel: "spectral_outbox".into(),
            generation: 1,
            world: Some("w".into()),
            payload,
            idempotency_key: "w:1-1".into(),
            trace_context: None,
            status: crate::store::OutboxStatus::InFlight,
            attempts: 1,
            available_at: at,
            claimed_at: Some(at),
            claimed_by: Some("worker".into()),
            last_error: None,
            failure_history: json!([]),
            first_failed_at: None,
        }
    }

    #[tokio::test]
    async fn a_newer_version_or_another_type_fails_for_good_with_a_clear_error() {
        let payload = json!({"world": "w", "first_seq": 1, "last_seq": 1,
                             "counts": [{"rule": "*", "status": "RED", "count": 1}]});
        let today = DecisionStats
            .handle(&row(
                events::DECISION_RECORDED,
                Event::VERSION,
                payload.clone(),
            ))
            .await;
        assert!(
            matches!(today, Ok(Effect::Stats(ref d)) if d.len() == 1),
            "{today:?}"
        );
        let newer = DecisionStats
            .handle(&row(events::DECISION_RECORDED, Event::VERSION + 1, payload))
            .await;
        match newer {
            Err(HandlerError::Terminal(e)) => assert!(
                e.contains("version 2 is newer than this build reads"),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
        let deployed = json!({"world": "w", "version": 1, "seq": 1, "deployed_by": "k"});
        match DecisionStats
            .handle(&row(events::MODULE_DEPLOYED, 1, deployed))
            .await
        {
            Err(HandlerError::Terminal(e)) => {
                assert_eq!(e, "decision_stats does not handle 'module.deployed' events")
            }
            other => panic!("{other:?}"),
        }
    }
}

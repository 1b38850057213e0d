//! The service's handlers: decision statistics, webhook fan-out and webhook delivery.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use super::{Handler, HandlerError, HandlerFuture, Registry};
use crate::store::{events, Effect, NewEvent, OutboxRow, StatDelta, Store};

/// The handlers the service runs, by event type.
pub fn registry(store: Store, webhook_timeout: Duration) -> Registry {
    let mut r = Registry::new();
    let fanout: Arc<dyn super::Handler> = Arc::new(WebhookFanout {
        store: store.clone(),
    });
    r.register(events::DECISION_RECORDED, Arc::new(DecisionStats))
        .register(events::VERSION_PUBLISHED, fanout.clone())
        .register(events::MODULE_DEPLOYED, fanout.clone())
        .register(events::VERSION_RETIRED, fanout)
        .register(
            events::WEBHOOK_DELIVERY,
            Arc::new(WebhookDelivery::new(store, webhook_timeout)),
        );
    r
}

/// `decision.recorded` → per-world counts by status, and per rule by status.
pub struct DecisionStats;

impl Handler for DecisionStats {
    fn name(&self) -> &'static str {
        "decision_stats"
    }

    fn handle<'a>(&'a self, row: &'a OutboxRow) -> HandlerFuture<'a> {
        Box::pin(async move {
            let world = row.payload["world"]
                .as_str()
                .ok_or_else(|| HandlerError::Terminal("payload has no world".into()))?;
            let counts = match row.payload.get("counts") {
                Some(counts) => counted(counts)?,
                // Events written by earlier builds list the decisions instead.
                None => count_listed(&row.payload["decisions"])?,
            };
            Ok(Effect::Stats(
                counts
                    .into_iter()
                    .map(|((rule, status), count)| StatDelta {
                        world: world.to_string(),
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

/// `counts: [{rule, status, count}]`, as the decision log writes them.
fn counted(counts: &serde_json::Value) -> Result<Counts, HandlerError> {
    let bad = |what: &str| HandlerError::Terminal(format!("payload counts: {what}"));
    let mut out = Counts::new();
    for c in counts.as_array().ok_or_else(|| bad("not a list"))? {
        let rule = c["rule"]
            .as_str()
            .ok_or_else(|| bad("an entry has no rule"))?;
        let status = c["status"]
            .as_str()
            .ok_or_else(|| bad("an entry has no status"))?;
        let count = c["count"]
            .as_i64()
            .filter(|n| *n > 0)
            .ok_or_else(|| bad("an entry has no positive count"))?;
        *out.entry((rule.into(), status.into())).or_default() += count;
    }
    Ok(out)
}

/// `decisions: [{status, rules}]`, as earlier builds wrote them.
fn count_listed(decisions: &serde_json::Value) -> Result<Counts, HandlerError> {
    let decisions = decisions
        .as_array()
        .ok_or_else(|| HandlerError::Terminal("payload has neither counts nor decisions".into()))?;
    let mut out = Counts::new();
    for d in decisions {
        let status = d["status"]
            .as_str()
            .ok_or_else(|| HandlerError::Terminal("a decision has no status".into()))?;
        *out.entry(("*".into(), status.into())).or_default() += 1;
        for rule in d["rules"].as_array().into_iter().flatten() {
            if let Some(rule) = rule.as_str() {
                *out.entry((rule.into(), status.into())).or_default() += 1;
            }
        }
    }
    Ok(out)
}

/// `worldmodel.version.published`, `module.deployed` and `world.version.retired` → one
/// `webhook.delivery` per subscriber of the world, so each delivery is retried on its own.
pub struct WebhookFanout {
    store: Store,
}

impl Handler for WebhookFanout {
    fn name(&self) -> &'static str {
        "webhook_fanout"
    }

    fn handle<'a>(&'a self, row: &'a OutboxRow) -> HandlerFuture<'a> {
        Box::pin(async move {
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
                .map(|h| NewEvent {
                    event_type: events::WEBHOOK_DELIVERY.into(),
                    world: Some(world.to_string()),
                    payload: json!({
                        "webhook_id": h.id,
                        "event_type": row.event_type,
                        "event_key": row.idempotency_key,
                        "body": row.payload,
                    }),
                    idempotency_key: format!("{}:{}:{}", h.id, row.event_type, row.idempotency_key),
                    target: None,
                })
                .collect::<Vec<_>>();
            Ok(if deliveries.is_empty() {
                Effect::None
            } else {
                Effect::Enqueue(deliveries)
            })
        })
    }
}

/// `webhook.delivery` → an HTTP POST signed with HMAC-SHA256 over the timestamp and body.
pub struct WebhookDelivery {
    store: Store,
    client: reqwest::Client,
}

impl WebhookDelivery {
    pub fn new(store: Store, timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self { store, client }
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
            let id = row.payload["webhook_id"]
                .as_str()
                .ok_or_else(|| HandlerError::Terminal("payload has no webhook_id".into()))?;
            let hook = self
                .store
                .webhook(id)
                .await
                .map_err(|e| HandlerError::Retryable(e.to_string()))?
                .ok_or_else(|| {
                    HandlerError::Terminal(format!("webhook '{id}' no longer exists"))
                })?;
            let event_type = row.payload["event_type"].as_str().unwrap_or_default();
            let body = serde_json::to_vec(&json!({
                "event_type": event_type,
                "world": hook.world,
                "data": row.payload["body"],
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
                    format!("v1={}", signature(&hook.secret, timestamp, &body)),
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

    #[test]
    fn counts_and_listed_decisions_give_the_same_statistics() {
        let counts = counted(&json!([
            {"rule": "*", "status": "RED", "count": 2},
            {"rule": "*", "status": "GREEN", "count": 1},
            {"rule": "sanctions-hit", "status": "RED", "count": 2},
        ]));
        let listed = count_listed(&json!([
            {"decision_id": "a", "action": "x", "status": "RED", "rules": ["sanctions-hit"]},
            {"decision_id": "b", "action": "x", "status": "GREEN", "rules": []},
            {"decision_id": "c", "action": "x", "status": "RED", "rules": ["sanctions-hit"]},
        ]));
        let expected: Counts = [
            (key("*", "GREEN"), 1),
            (key("*", "RED"), 2),
            (key("sanctions-hit", "RED"), 2),
        ]
        .into();
        assert!(matches!(&counts, Ok(c) if *c == expected), "{counts:?}");
        assert!(matches!(&listed, Ok(c) if *c == expected), "{listed:?}");
    }

    #[test]
    fn malformed_counts_fail_for_good() {
        for bad in [
            json!({"rule": "*"}),
            json!([{"status": "RED", "count": 1}]),
            json!([{"rule": "*", "status": "RED", "count": 0}]),
            json!([{"rule": "*", "status": "RED", "count": "2"}]),
        ] {
            let r = counted(&bad);
            assert!(matches!(r, Err(HandlerError::Terminal(_))), "{bad}: {r:?}");
        }
        let r = count_listed(&serde_json::Value::Null);
        assert!(matches!(r, Err(HandlerError::Terminal(_))), "{r:?}");
    }
}

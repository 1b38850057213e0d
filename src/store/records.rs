//! What the store keeps, as the rest of the service sees it, and the rows both dialects
//! decode into. The rows name columns once for both backends; each dialect says how it stores
//! a time, a JSON document, a list of scopes and a list bound as one parameter by implementing
//! sqlx's traits for [`Time`], [`Json`], [`ScopeList`] and [`List`] in its own file.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::StoreError;

/// A scope an API key may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Decide,
    Read,
    Author,
    Deploy,
    /// Decide with a version other than the deployed one (`world_model_version`), for replays
    /// and canaries. Without it a key decides only with the deployed version, so a rollback
    /// takes a bad version out of every decide-only key's reach.
    Pin,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Self::Decide,
        Self::Read,
        Self::Author,
        Self::Deploy,
        Self::Pin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Decide => "decide",
            Self::Read => "read",
            Self::Author => "author",
            Self::Deploy => "deploy",
            Self::Pin => "pin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// A new API key to store. Only the sha256 of the secret is ever stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    /// Public identifier (shown in logs and decision records).
    pub id: String,
    /// Lower-case hex sha256 of the secret.
    pub secret_hash: String,
    /// The one world the key is bound to; `None` for an operator key (all worlds).
    pub world: Option<String>,
    pub scopes: Vec<Scope>,
    pub label: String,
    /// When the key stops being accepted; `None` for a key that does not expire.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A stored API key: what may be shown of it. Neither its secret nor the secret's hash is
/// ever part of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRecord {
    pub id: String,
    pub world: Option<String>,
    pub scopes: Vec<Scope>,
    pub label: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// Recorded at most about once a minute per key (docs/operations.md, "Keys").
    pub last_used_at: Option<DateTime<Utc>>,
    /// Until when the secret that the last rotation replaced is still accepted.
    pub previous_valid_until: Option<DateTime<Utc>>,
    /// Whether the lookup that found this record matched the secret the last rotation
    /// replaced rather than the current one; always `false` in listings.
    #[serde(skip_serializing)]
    pub found_by_previous: bool,
}

impl KeyRecord {
    /// Why a request made with the secret that found this record is refused at `now`, or
    /// `None` when it is accepted: revoked, expired, or a replaced secret past its overlap.
    pub fn refusal(&self, now: DateTime<Utc>) -> Option<String> {
        if let Some(at) = self.revoked_at {
            return Some(format!("API key '{}' was revoked at {at}", self.id));
        }
        if let Some(at) = self.expires_at.filter(|at| *at <= now) {
            return Some(format!("API key '{}' expired at {at}", self.id));
        }
        if self.found_by_previous {
            match self.previous_valid_until {
                Some(until) if until > now => {}
                _ => {
                    return Some(format!(
                        "this secret of API key '{}' was replaced by a rotation and its overlap has ended",
                        self.id
                    ))
                }
            }
        }
        None
    }
}

/// A module to store with a new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewModule {
    pub action: String,
    /// `sha256:<hex>` of `content`.
    pub hash: String,
    /// The canonical module source.
    pub content: Vec<u8>,
}

/// A version to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct NewVersion {
    pub world: String,
    /// The whole world model as JSON.
    pub model: serde_json::Value,
    pub modules: Vec<NewModule>,
    /// Who published it (a key id).
    pub published_by: String,
}

/// A published version, summarised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionSummary {
    pub version: u64,
    pub published_at: DateTime<Utc>,
    pub published_by: String,
    /// Set once the version is retired; `null` while it may be pinned and deployed.
    pub retired: Option<Retirement>,
}

/// Why, when and by whom a version was retired: no key may pin it any more and it is never
/// deployed again. Retirement is permanent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retirement {
    pub retired_at: DateTime<Utc>,
    /// The key id that retired it.
    pub retired_by: String,
    pub reason: Option<String>,
}

/// A published version in full.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionRecord {
    pub world: String,
    pub version: u64,
    pub model: serde_json::Value,
    /// `(action, module hash)` in the model's action order.
    pub modules: Vec<(String, String)>,
    pub published_at: DateTime<Utc>,
    pub published_by: String,
    /// Set once the version is retired.
    pub retired: Option<Retirement>,
}

/// One deployment in a world's history. Rollback is a deployment of an older version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deployment {
    /// Increases with every deployment of the world.
    pub seq: u64,
    pub version: u64,
    pub deployed_at: DateTime<Utc>,
    pub deployed_by: String,
}

/// A world in the list of worlds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorldSummary {
    pub world: String,
    pub deployed_version: Option<u64>,
    pub latest_version: Option<u64>,
}

/// A world in detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorldDetail {
    pub world: String,
    pub deployed_version: Option<u64>,
    pub has_draft: bool,
    /// Oldest first.
    pub versions: Vec<VersionSummary>,
    /// Oldest first.
    pub deployments: Vec<Deployment>,
}

/// A rule that matched a decision, as its record keeps it.
///
/// The fields are declared in the order of their names: records written when this was a
/// free-form JSON object serialized with sorted keys, and a chain hash covers these bytes.
/// Unknown fields are refused rather than dropped, since dropping one would change what an
/// auditor hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchedRule {
    pub id: String,
    /// The decision status the rule asked for (`RED`, `YELLOW`, …).
    pub outcome: String,
    /// The rule's tier (`T1`, `T2`, `T3`).
    pub severity: String,
}

/// A decision to record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewDecision {
    pub decision_id: String,
    pub world: String,
    pub version: u64,
    pub action: String,
    pub module_hash: String,
    pub status: String,
    /// The rules that matched, as the decision reported them.
    pub matched_rules: Vec<MatchedRule>,
    /// The key id that asked.
    pub caller: String,
    pub correlation_id: Option<String>,
    /// `sha256:<hex>` of the context the caller sent.
    pub context_digest: String,
    pub decided_at: DateTime<Utc>,
    /// The context's text, kept beside the record for replay when the world keeps contexts
    /// (`record_context = "full"`). Outside the hashed record: its digest is what the chain
    /// covers, so pruning the text leaves the chain verifiable.
    #[serde(skip)]
    pub context: Option<std::sync::Arc<str>>,
}

/// A recorded decision, with its place in its world's chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// 1, 2, 3 … within the world.
    pub seq: u64,
    #[serde(flatten)]
    pub decision: NewDecision,
    /// The previous record's hash (`GENESIS` for the first).
    pub prev_hash: String,
    pub hash: String,
}

/// One increment of the decision statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct StatDelta {
    pub world: String,
    /// A rule id, or `*` for whole decisions.
    pub rule: String,
    pub status: String,
    pub count: i64,
}

/// A webhook subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Webhook {
    pub id: String,
    pub world: String,
    pub url: String,
    #[serde(skip_serializing)]
    pub secret: String,
    pub events: Vec<String>,
    pub created_at: DateTime<Utc>,
}

// ---------------------------------------------------------------------------------------------
// Stored values: one Rust type per kind of column, with one storage per dialect.

/// A time as stored: `timestamptz` in PostgreSQL, integer microseconds in SQLite. Both keep
/// microseconds; [`now`] and [`truncate_micros`] make what is written read back equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Time(pub DateTime<Utc>);

/// A JSON document as stored: `jsonb` in PostgreSQL, text in SQLite.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Json(pub serde_json::Value);

/// A key's scopes as stored: `text[]` in PostgreSQL, comma-separated text in SQLite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScopeList(pub Vec<String>);

/// A list of values bound as one parameter, for set-based statements over a batch: an array
/// (`bigint[]`, `text[]`) in PostgreSQL, read with `ANY` or `UNNEST`; a JSON array in SQLite,
/// read with `json_each`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct List<T>(pub Vec<T>);

impl ScopeList {
    pub(crate) fn of(scopes: &[Scope]) -> Self {
        Self(scopes.iter().map(|s| s.as_str().to_owned()).collect())
    }
}

// ---------------------------------------------------------------------------------------------
// Rows, decoded by name from either dialect.

/// `version, published_at, published_by` with the retirement columns of a `LEFT JOIN`.
#[derive(sqlx::FromRow)]
pub(crate) struct VersionRow {
    pub version: i64,
    pub published_at: Time,
    pub published_by: String,
    #[sqlx(flatten)]
    pub retired: RetirementRow,
}

/// A version's model with its summary columns.
#[derive(sqlx::FromRow)]
pub(crate) struct VersionModelRow {
    pub model: Json,
    #[sqlx(flatten)]
    pub summary: VersionRow,
}

/// The retirement columns of a `LEFT JOIN` on the retired versions: all `NULL` when it found
/// no row.
#[derive(sqlx::FromRow)]
pub(crate) struct RetirementRow {
    pub retired_at: Option<Time>,
    pub retired_by: Option<String>,
    pub reason: Option<String>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct DeploymentRow {
    pub seq: i64,
    pub version: i64,
    pub deployed_at: Time,
    pub deployed_by: String,
}

#[derive(sqlx::FromRow)]
pub(crate) struct WorldRow {
    pub world: String,
    pub deployed_version: Option<i64>,
    pub latest_version: Option<i64>,
}

/// A world's own row, with what [`WorldDetail`] needs of it.
#[derive(sqlx::FromRow)]
pub(crate) struct WorldHeadRow {
    pub deployed_version: Option<i64>,
    pub has_draft: bool,
}

/// `(world, version)` of a deployed or retired version.
#[derive(sqlx::FromRow)]
pub(crate) struct WorldVersionRow {
    pub world: String,
    pub version: i64,
}

#[derive(sqlx::FromRow)]
pub(crate) struct KeyRow {
    pub id: String,
    pub world: Option<String>,
    pub scopes: ScopeList,
    pub label: String,
    pub created_at: Time,
    pub expires_at: Option<Time>,
    pub revoked_at: Option<Time>,
    pub last_used_at: Option<Time>,
    pub previous_valid_until: Option<Time>,
    pub found_by_previous: bool,
}

#[derive(sqlx::FromRow)]
pub(crate) struct WebhookRow {
    pub id: String,
    pub world: String,
    pub url: String,
    pub secret: String,
    /// Comma-separated event types.
    pub events: String,
    pub created_at: Time,
}

#[derive(sqlx::FromRow)]
pub(crate) struct DecisionRow {
    pub seq: i64,
    pub world: String,
    pub decision_id: String,
    pub version: i64,
    pub action: String,
    pub module_hash: String,
    pub status: String,
    /// The text of its JSON, hashed as written (see `chain::StoredDecision`).
    pub matched_rules: String,
    pub caller: String,
    pub correlation_id: Option<String>,
    pub context_digest: String,
    pub decided_at: Time,
    pub prev_hash: String,
    pub hash: String,
}

impl RetirementRow {
    fn retirement(self) -> Option<Retirement> {
        Some(Retirement {
            retired_at: self.retired_at?.0,
            retired_by: self.retired_by?,
            reason: self.reason,
        })
    }
}

impl TryFrom<VersionRow> for VersionSummary {
    type Error = StoreError;

    fn try_from(r: VersionRow) -> Result<Self, StoreError> {
        Ok(VersionSummary {
            version: to_u64(r.version, "version")?,
            published_at: r.published_at.0,
            published_by: r.published_by,
            retired: r.retired.retirement(),
        })
    }
}

impl VersionRecord {
    pub(crate) fn from_rows(
        world: &str,
        row: VersionModelRow,
        modules: Vec<(String, String)>,
    ) -> Result<Self, StoreError> {
        let summary = VersionSummary::try_from(row.summary)?;
        Ok(VersionRecord {
            world: world.to_owned(),
            version: summary.version,
            model: row.model.0,
            modules,
            published_at: summary.published_at,
            published_by: summary.published_by,
            retired: summary.retired,
        })
    }
}

impl TryFrom<DeploymentRow> for Deployment {
    type Error = StoreError;

    fn try_from(r: DeploymentRow) -> Result<Self, StoreError> {
        Ok(Deployment {
            seq: to_u64(r.seq, "deployment seq")?,
            version: to_u64(r.version, "version")?,
            deployed_at: r.deployed_at.0,
            deployed_by: r.deployed_by,
        })
    }
}

impl TryFrom<WorldRow> for WorldSummary {
    type Error = StoreError;

    fn try_from(r: WorldRow) -> Result<Self, StoreError> {
        Ok(WorldSummary {
            world: r.world,
            deployed_version: r
                .deployed_version
                .map(|v| to_u64(v, "version"))
                .transpose()?,
            latest_version: r.latest_version.map(|v| to_u64(v, "version")).transpose()?,
        })
    }
}

impl TryFrom<WorldVersionRow> for (String, u64) {
    type Error = StoreError;

    fn try_from(r: WorldVersionRow) -> Result<Self, StoreError> {
        Ok((r.world, to_u64(r.version, "version")?))
    }
}

impl TryFrom<KeyRow> for KeyRecord {
    type Error = StoreError;

    fn try_from(r: KeyRow) -> Result<Self, StoreError> {
        Ok(KeyRecord {
            id: r.id,
            world: r.world,
            scopes: parse_scopes(r.scopes.0.iter().map(String::as_str))?,
            label: r.label,
            created_at: r.created_at.0,
            expires_at: r.expires_at.map(|t| t.0),
            revoked_at: r.revoked_at.map(|t| t.0),
            last_used_at: r.last_used_at.map(|t| t.0),
            previous_valid_until: r.previous_valid_until.map(|t| t.0),
            found_by_previous: r.found_by_previous,
        })
    }
}

impl From<WebhookRow> for Webhook {
    fn from(r: WebhookRow) -> Self {
        Webhook {
            id: r.id,
            world: r.world,
            url: r.url,
            secret: r.secret,
            events: r
                .events
                .split(',')
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect(),
            created_at: r.created_at.0,
        }
    }
}

impl TryFrom<DecisionRow> for DecisionRecord {
    type Error = StoreError;

    fn try_from(r: DecisionRow) -> Result<Self, StoreError> {
        let matched_rules = serde_json::from_str(&r.matched_rules).map_err(|e| {
            StoreError::Corrupt(format!(
                "matched rules of decision '{}': {e}",
                r.decision_id
            ))
        })?;
        Ok(DecisionRecord {
            seq: to_u64(r.seq, "decision seq")?,
            decision: NewDecision {
                matched_rules,
                decision_id: r.decision_id,
                world: r.world,
                version: to_u64(r.version, "version")?,
                action: r.action,
                module_hash: r.module_hash,
                status: r.status,
                caller: r.caller,
                correlation_id: r.correlation_id,
                context_digest: r.context_digest,
                decided_at: r.decided_at.0,
                context: None,
            },
            prev_hash: r.prev_hash,
            hash: r.hash,
        })
    }
}

/// Convert every row, failing on the first that does not convert.
pub(crate) fn convert<R, T: TryFrom<R, Error = StoreError>>(
    rows: Vec<R>,
) -> Result<Vec<T>, StoreError> {
    rows.into_iter().map(T::try_from).collect()
}

// ---------------------------------------------------------------------------------------------
// Conversions both dialects share, so that a record reads back the same from either.

/// Both databases keep microseconds. Truncating before anything is stored or hashed makes a
/// stored time read back equal to what was written, so hashes recompute.
pub(crate) fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// The current time as it will be stored.
pub(crate) fn now() -> DateTime<Utc> {
    truncate_micros(Utc::now())
}

/// Micros since the epoch back to a time (SQLite stores times as integer microseconds).
pub(crate) fn from_micros(micros: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StoreError::Corrupt(format!("timestamp {micros} µs is out of range")))
}

/// Version numbers, sequence numbers and limits are `u64` in the API and `BIGINT` in both
/// databases. A number beyond `i64::MAX` cannot have been stored, so lookups treat it as absent.
pub(crate) fn to_i64(n: u64) -> Option<i64> {
    i64::try_from(n).ok()
}

pub(crate) fn to_u64(n: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("{what} {n} is negative")))
}

/// A number the caller gives that must fit a `BIGINT` column.
pub(crate) fn bigint(n: u64, what: &str) -> Result<i64, StoreError> {
    to_i64(n).ok_or_else(|| StoreError::Conflict(format!("{what} {n} is too large to store")))
}

pub(crate) fn parse_scopes<'a>(
    items: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<Scope>, StoreError> {
    items
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(|s| Scope::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown scope '{s}'"))))
        .collect()
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn unknown_scopes_are_corrupt_data() {
        assert_eq!(
            parse_scopes("decide,read".split(',')).unwrap(),
            vec![Scope::Decide, Scope::Read]
        );
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
        }
        assert_eq!(Scope::parse("pin"), Some(Scope::Pin));
        // An empty list is stored as an empty string.
        assert_eq!(parse_scopes("".split(',')).unwrap(), vec![]);
        let err = parse_scopes(["decide", "admin"]).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m == "unknown scope 'admin'"),
            "{err:?}"
        );
    }

    #[test]
    fn times_are_truncated_to_microseconds() {
        let t = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        let stored = truncate_micros(t);
        assert_eq!(stored.timestamp_subsec_nanos(), 123_456_000);
        assert_eq!(from_micros(stored.timestamp_micros()).unwrap(), stored);
        let before_epoch = DateTime::from_timestamp(-1, 999_999_999).unwrap();
        assert_eq!(
            truncate_micros(before_epoch),
            DateTime::from_timestamp(-1, 999_999_000).unwrap()
        );
    }

    #[test]
    fn matched_rules_serialize_as_the_sorted_objects_earlier_records_hashed() {
        let rule = MatchedRule {
            id: "r1".into(),
            outcome: "RED".into(),
            severity: "T1".into(),
        };
        let as_object = serde_json::json!({"severity": "T1", "id": "r1", "outcome": "RED"});
        assert_eq!(
            serde_json::to_vec(&rule).unwrap(),
            serde_json::to_vec(&as_object).unwrap()
        );
        let extra = r#"{"id":"r1","outcome":"RED","severity":"T1","n":1}"#;
        assert!(serde_json::from_str::<MatchedRule>(extra).is_err());
    }
}

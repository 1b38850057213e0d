//! The world model: the domain types of one world version, as they are authored (TOML under
//! `predicates/`, or JSON through the API) and stored. Plain data; checking and compiling it lives in
//! `worlds::compile`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One version of a world's definition: the context schema, config constants and actions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldModel {
    /// The world's slug, e.g. `acme-payments`.
    pub world: String,
    #[serde(default)]
    pub description: String,
    /// Typed attributes of the context, by name.
    #[serde(default)]
    pub context: BTreeMap<String, Attribute>,
    /// Named constants that predicates read as `config.NAME`.
    #[serde(default)]
    pub config: BTreeMap<String, serde_json::Value>,
    pub actions: Vec<Action>,
    /// What each decision's record keeps of its context (docs/impact.md). Not part of any
    /// module: it changes what is stored, never a decision.
    #[serde(default, skip_serializing_if = "RecordContext::is_digest")]
    pub record_context: RecordContext,
}

/// What a decision's record keeps of the context it was decided on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordContext {
    /// Nothing: the record carries no digest either (an empty one).
    None,
    /// Its sha256 digest, which the chain covers.
    #[default]
    Digest,
    /// The digest, and the context's text beside the record, for replay; bounded in size
    /// and pruned by age, outside the chain.
    Full,
}

impl RecordContext {
    pub fn is_digest(&self) -> bool {
        *self == Self::Digest
    }
}

impl WorldModel {
    /// The action with this name.
    pub fn action(&self, name: &str) -> Option<&Action> {
        self.actions.iter().find(|a| a.name == name)
    }
}

/// The type of a context attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttrType {
    Number,
    Integer,
    String,
    Bool,
    Enum,
    Timestamp,
    List,
    Object,
}

impl AttrType {
    pub const ALL: [AttrType; 8] = [
        Self::Number,
        Self::Integer,
        Self::String,
        Self::Bool,
        Self::Enum,
        Self::Timestamp,
        Self::List,
        Self::Object,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Number => "number",
            Self::Integer => "integer",
            Self::String => "string",
            Self::Bool => "bool",
            Self::Enum => "enum",
            Self::Timestamp => "timestamp",
            Self::List => "list",
            Self::Object => "object",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// Who provides an attribute's value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The caller sends it in the context.
    #[default]
    Supplied,
    /// The service fills it; a caller's value is ignored.
    System,
}

/// The system attributes a version may declare with `source = "system"`.
pub(crate) const SYSTEM_ATTRIBUTES: [(&str, AttrType); 3] = [
    ("request_time", AttrType::Timestamp),
    ("request_id", AttrType::String),
    ("caller", AttrType::String),
];

/// A typed context attribute with its constraints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attribute {
    #[serde(rename = "type")]
    pub ty: AttrType,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "is_supplied")]
    pub source: Source,
    /// A required attribute that is missing or ill-typed makes the answer `YELLOW` with
    /// `gather_evidence_and_retry`. Optional attributes may be absent; a predicate that reads
    /// an absent one fails closed, so guard it with `"name" in context`.
    #[serde(default = "yes")]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Allowed values of an `enum`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Maximum length in characters of a `string` or `enum`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// Element type of a `list` (any scalar type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<AttrType>,
    /// Maximum number of elements of a `list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_items: Option<usize>,
    /// Fields of an `object`, validated like attributes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, Attribute>,
}

fn yes() -> bool {
    true
}

fn is_supplied(s: &Source) -> bool {
    *s == Source::Supplied
}

impl Attribute {
    /// A required supplied attribute of a type, with no constraints.
    pub fn of(ty: AttrType) -> Self {
        Self {
            ty,
            description: String::new(),
            source: Source::Supplied,
            required: true,
            min: None,
            max: None,
            values: Vec::new(),
            max_length: None,
            items: None,
            max_items: None,
            fields: BTreeMap::new(),
        }
    }
}

/// How matched rules combine into one status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// The matched rule of highest severity wins, ties by outcome; a matched `T1` rule is a
    /// floor nothing lowers.
    #[default]
    WinnerTakesAll,
}

/// An action callers ask about, with its rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub aggregation: Aggregation,
    /// Work frames per status, over the built-in defaults.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub work_frames: BTreeMap<Status, WorkFramePatch>,
    pub rules: Vec<Rule>,
}

/// Rule severity: `T1` is the most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Severity {
    T1,
    T2,
    T3,
}

impl Severity {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "T1" => Some(Self::T1),
            "T2" => Some(Self::T2),
            "T3" => Some(Self::T3),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::T1 => "T1",
            Self::T2 => "T2",
            Self::T3 => "T3",
        }
    }
}

/// A decision's binding status. Ordered from least to most restrictive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Status {
    #[serde(rename = "GREEN")]
    Green,
    #[serde(rename = "GREEN-SKIP")]
    GreenSkip,
    #[serde(rename = "YELLOW")]
    Yellow,
    #[serde(rename = "RED")]
    Red,
}

impl Status {
    pub const ALL: [Status; 4] = [Self::Green, Self::GreenSkip, Self::Yellow, Self::Red];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Green => "GREEN",
            Self::GreenSkip => "GREEN-SKIP",
            Self::Yellow => "YELLOW",
            Self::Red => "RED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule of an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub id: String,
    /// The rule in natural language.
    pub text: String,
    pub severity: Severity,
    /// The status the rule emits when it matches.
    pub outcome: Status,
    /// The context attributes the rule (its `applies_when` and predicate together) reads.
    pub inputs: Vec<String>,
    /// A predicate that must hold for the rule to be considered at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applies_when: Option<String>,
    /// The predicate's Rhai source.
    pub predicate: String,
    /// Work-frame fields that replace the action's frame for this rule's outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_frame: Option<WorkFramePatch>,
    #[serde(default)]
    pub cases: Vec<Case>,
    /// Where the rule came from, when the World Agent proposed it and a reviewer approved it.
    /// Not module content: it never changes a decision or a module's hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

/// The origin of a rule the World Agent authored (docs/agent.md, "Provenance").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// The rule candidate that was approved.
    pub candidate: String,
    /// The run thread that proposed it, and the chat thread it ran in, if any.
    pub run: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<String>,
    pub model: String,
    /// The prompt templates the run used (`draft.v1`, …).
    pub prompts: Vec<String>,
    /// The key that approved it, and when.
    pub approved_by: String,
    pub approved_at: String,
    /// How many of the rule's cases were derived by the run.
    pub derived_cases: usize,
}

/// An example context with the expected match result of one rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub context: serde_json::Map<String, serde_json::Value>,
    /// Whether the rule matches (its `applies_when` holds and its predicate is true).
    pub matches: bool,
}

/// What the caller's agent may and may not do next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkFrame {
    pub mode: String,
    pub next_action: String,
    pub allowed_actions: Vec<String>,
    pub forbidden_actions: Vec<String>,
    pub required_output: Vec<String>,
    pub missing_evidence: Vec<String>,
    pub next_human_owner: Option<String>,
}

/// Work-frame fields to override; absent fields keep the value beneath.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkFramePatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_actions: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forbidden_actions: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_output: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_human_owner: Option<String>,
}

/// The resolved work frame of every status of an action: a field per status, so none can be
/// missing. Its JSON form is the object keyed by status, in the order of [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkFrames {
    #[serde(rename = "GREEN")]
    pub green: WorkFrame,
    #[serde(rename = "GREEN-SKIP")]
    pub green_skip: WorkFrame,
    #[serde(rename = "YELLOW")]
    pub yellow: WorkFrame,
    #[serde(rename = "RED")]
    pub red: WorkFrame,
}

impl WorkFrames {
    /// The built-in frames of an action with its authored patches applied over them.
    pub(crate) fn resolve(action: &str, patches: &BTreeMap<Status, WorkFramePatch>) -> Self {
        let frame = |status| {
            let base = WorkFrame::default_for(status, action);
            match patches.get(&status) {
                Some(patch) => base.patched(patch),
                None => base,
            }
        };
        Self {
            green: frame(Status::Green),
            green_skip: frame(Status::GreenSkip),
            yellow: frame(Status::Yellow),
            red: frame(Status::Red),
        }
    }

    /// The frame of a status.
    pub fn of(&self, status: Status) -> &WorkFrame {
        match status {
            Status::Green => &self.green,
            Status::GreenSkip => &self.green_skip,
            Status::Yellow => &self.yellow,
            Status::Red => &self.red,
        }
    }
}

impl WorkFrame {
    /// The built-in frame of a status for an action, before any override.
    pub(crate) fn default_for(status: Status, action: &str) -> Self {
        let (mode, next, allowed, forbidden): (&str, &str, Vec<String>, Vec<String>) = match status
        {
            Status::Green => ("proceed", action, vec![action.to_string()], vec![]),
            Status::GreenSkip => ("skip", "skip", vec![], vec![action.to_string()]),
            Status::Yellow => (
                "hold",
                "request_review",
                vec!["request_review".to_string()],
                vec![action.to_string()],
            ),
            Status::Red => ("block", "stop", vec![], vec![action.to_string()]),
        };
        Self {
            mode: mode.to_string(),
            next_action: next.to_string(),
            allowed_actions: allowed,
            forbidden_actions: forbidden,
            required_output: vec![],
            missing_evidence: vec![],
            next_human_owner: None,
        }
    }

    /// The frame with a patch applied over it.
    pub(crate) fn patched(mut self, patch: &WorkFramePatch) -> Self {
        if let Some(v) = &patch.mode {
            self.mode.clone_from(v);
        }
        if let Some(v) = &patch.next_action {
            self.next_action.clone_from(v);
        }
        if let Some(v) = &patch.allowed_actions {
            self.allowed_actions.clone_from(v);
        }
        if let Some(v) = &patch.forbidden_actions {
            self.forbidden_actions.clone_from(v);
        }
        if let Some(v) = &patch.required_output {
            self.required_output.clone_from(v);
        }
        if let Some(v) = &patch.next_human_owner {
            self.next_human_owner = Some(v.clone());
        }
        self
    }
}

//! The tools the agent asks the model to call, and the typed proposals parsed from its calls.
//!
//! `propose_rule` holds exactly what a rule of a world folder holds besides its cases
//! (`worlds::model::Rule`), with the predicate as source instead of a file name;
//! `propose_cases` holds a rule's cases as `worlds::model::Case` does. The schemas are built
//! here and nowhere else: the requests send them and `docs/agent.md` prints them (a test holds
//! the two together). An answer that does not follow them is a [`Repair`], with a message to
//! send back to the model, never a panic.

use serde_json::{json, Map, Value};

use super::provider::{Arguments, Message, Tool, ToolCall};
use crate::worlds::model::{Case, Rule, Severity, Status, WorkFramePatch};

/// The tool that proposes a rule.
pub const PROPOSE_RULE: &str = "propose_rule";
/// The tool that proposes a rule's cases.
pub const PROPOSE_CASES: &str = "propose_cases";
/// Cases one `propose_cases` call may hold.
pub const MAX_CASES: usize = 32;
/// The longest rule id (as the world validator allows).
pub const MAX_ID_LEN: usize = 64;

const SEVERITIES: [Severity; 3] = [Severity::T1, Severity::T2, Severity::T3];

fn severities() -> Vec<&'static str> {
    SEVERITIES.iter().map(|s| s.as_str()).collect()
}

fn outcomes() -> Vec<&'static str> {
    Status::ALL.iter().rev().map(|s| s.as_str()).collect()
}

/// `propose_rule`, as offered to the model.
pub fn propose_rule() -> Tool {
    let list = || json!({ "type": "array", "items": { "type": "string" } });
    Tool {
        name: PROPOSE_RULE.into(),
        description: "Propose one rule for the action: its id, its text, how severe it is, the \
                      status it emits when it matches, the context attributes it reads, and its \
                      predicate (one Rhai expression that is true when the rule matches)."
            .into(),
        parameters: json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["id", "text", "severity", "outcome", "inputs", "predicate"],
            "properties": {
                "id": {
                    "type": "string",
                    "pattern": format!("^[a-z0-9_-]{{1,{MAX_ID_LEN}}}$"),
                    "description": "Unique within the action: lowercase letters, digits, '-' and '_'."
                },
                "text": {
                    "type": "string",
                    "minLength": 1,
                    "description": "The rule in natural language."
                },
                "severity": {
                    "type": "string",
                    "enum": severities(),
                    "description": "T1 is the most severe; a matched T1 rule is a floor nothing lowers."
                },
                "outcome": {
                    "type": "string",
                    "enum": outcomes(),
                    "description": "The status the rule emits when it matches."
                },
                "inputs": {
                    "type": "array",
                    "items": { "type": "string", "minLength": 1 },
                    "uniqueItems": true,
                    "description": "Exactly the context attributes that applies_when and predicate read."
                },
                "applies_when": {
                    "type": ["string", "null"],
                    "description": "Optional Rhai expression: the rule is considered only when it is true."
                },
                "predicate": {
                    "type": "string",
                    "minLength": 1,
                    "description": "One Rhai expression, true when the rule matches."
                },
                "work_frame": {
                    "type": "object",
                    "additionalProperties": false,
                    "description": "Optional: work-frame fields that replace the action's frame for this rule's outcome.",
                    "properties": {
                        "mode": { "type": "string" },
                        "next_action": { "type": "string" },
                        "allowed_actions": list(),
                        "forbidden_actions": list(),
                        "required_output": list(),
                        "next_human_owner": { "type": "string" }
                    }
                }
            }
        }),
    }
}

/// `propose_cases`, as offered to the model.
pub fn propose_cases() -> Tool {
    Tool {
        name: PROPOSE_CASES.into(),
        description: "Propose example contexts for the rule, each with whether the rule matches \
                      it. Cover both sides of every condition the rule text states."
            .into(),
        parameters: json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["cases"],
            "properties": {
                "cases": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_CASES,
                    "items": {
                        "type": "object",
                        "additionalProperties": false,
                        "required": ["context", "matches"],
                        "properties": {
                            "name": {
                                "type": "string",
                                "description": "Optional: what the case shows."
                            },
                            "context": {
                                "type": "object",
                                "description": "The context attributes the rule reads, with values of their declared types."
                            },
                            "matches": {
                                "type": "boolean",
                                "description": "Whether the rule matches this context."
                            }
                        }
                    }
                }
            }
        }),
    }
}

/// A proposal parsed from the tool call that made it.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed<T> {
    /// The call's id, to answer it.
    pub call_id: String,
    pub value: T,
}

/// What was wrong with an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("the answer called no tool")]
    NoToolCall,
    #[error("the answer called `{0}`, which is not a tool offered here")]
    UnknownTool(String),
    #[error("the answer called the tool {0} times; call it exactly once")]
    SeveralCalls(usize),
    #[error("the arguments are not valid JSON: {0}")]
    BadJson(String),
    #[error("the arguments must be a JSON object")]
    NotAnObject,
    #[error("`{0}` is missing")]
    Missing(String),
    #[error("`{0}` is not a field of this tool")]
    Unknown(String),
    #[error("`{field}` must be {expected}")]
    WrongType { field: String, expected: String },
    #[error("`{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

/// A tool call that cannot be used as it is: the model is asked to call again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{tool}: {problem}")]
pub struct Repair {
    /// The tool that was asked for.
    pub tool: &'static str,
    /// The call to answer, when there was one.
    pub call_id: Option<String>,
    pub problem: Problem,
}

impl Repair {
    /// A stable code for the problem.
    pub fn code(&self) -> &'static str {
        match self.problem {
            Problem::NoToolCall => "no_tool_call",
            Problem::UnknownTool(_) => "unknown_tool",
            Problem::SeveralCalls(_) => "several_tool_calls",
            Problem::BadJson(_) => "arguments_not_json",
            Problem::NotAnObject => "arguments_not_an_object",
            Problem::Missing(_) => "missing_field",
            Problem::Unknown(_) => "unknown_field",
            Problem::WrongType { .. } => "wrong_type",
            Problem::Invalid { .. } => "invalid_value",
        }
    }

    /// The message that tells the model what to fix: the answer to its call, or a user
    /// message when it made none.
    pub fn message(&self) -> Message {
        let content = format!(
            "That `{tool}` call cannot be used: {problem}. Call `{tool}` once more, with \
             arguments that follow its JSON Schema exactly.",
            tool = self.tool,
            problem = self.problem,
        );
        match &self.call_id {
            Some(id) => Message::Tool {
                call_id: id.clone(),
                content,
            },
            None => Message::User(content),
        }
    }
}

/// The one call of `tool` and its arguments as an object.
fn the_call<'a>(
    calls: &'a [ToolCall],
    tool: &'static str,
) -> Result<(&'a ToolCall, &'a Map<String, Value>), Repair> {
    let repair = |call_id: Option<&str>, problem| Repair {
        tool,
        call_id: call_id.map(str::to_string),
        problem,
    };
    let Some(first) = calls.first() else {
        return Err(repair(None, Problem::NoToolCall));
    };
    let mut ours = calls.iter().filter(|c| c.name == tool);
    let Some(call) = ours.next() else {
        return Err(repair(
            Some(&first.id),
            Problem::UnknownTool(first.name.clone()),
        ));
    };
    let n = 1 + ours.count();
    if n > 1 {
        return Err(repair(Some(&call.id), Problem::SeveralCalls(n)));
    }
    match &call.arguments {
        Arguments::Malformed { error, .. } => {
            Err(repair(Some(&call.id), Problem::BadJson(error.clone())))
        }
        Arguments::Json(Value::Object(map)) => Ok((call, map)),
        Arguments::Json(_) => Err(repair(Some(&call.id), Problem::NotAnObject)),
    }
}

/// Field readers that name the field in what they report.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Fields<'a> {
    fn new(map: &'a Map<String, Value>, path: &str, allowed: &[&str]) -> Result<Self, Problem> {
        let fields = Self {
            map,
            path: path.to_string(),
        };
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(Problem::Unknown(fields.at(k)));
        }
        Ok(fields)
    }

    fn at(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn wrong(&self, name: &str, expected: &str) -> Problem {
        Problem::WrongType {
            field: self.at(name),
            expected: expected.into(),
        }
    }

    fn invalid(&self, name: &str, reason: impl Into<String>) -> Problem {
        Problem::Invalid {
            field: self.at(name),
            reason: reason.into(),
        }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn required(&self, name: &str) -> Result<&'a Value, Problem> {
        self.get(name)
            .ok_or_else(|| Problem::Missing(self.at(name)))
    }

    fn string(&self, name: &str) -> Result<&'a str, Problem> {
        let s = self
            .required(name)?
            .as_str()
            .ok_or_else(|| self.wrong(name, "a string"))?;
        if s.trim().is_empty() {
            return Err(self.invalid(name, "must not be empty"));
        }
        Ok(s)
    }

    fn optional_string(&self, name: &str) -> Result<Option<&'a str>, Problem> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => {
                let s = v
                    .as_str()
                    .ok_or_else(|| self.wrong(name, "a string or null"))?;
                Ok(Some(s).filter(|s| !s.trim().is_empty()))
            }
        }
    }

    fn strings(&self, name: &str) -> Result<Vec<String>, Problem> {
        let items = self
            .required(name)?
            .as_array()
            .ok_or_else(|| self.wrong(name, "an array of strings"))?;
        let mut out: Vec<String> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = format!("{name}[{i}]");
            let s = item.as_str().ok_or_else(|| self.wrong(&at, "a string"))?;
            if s.trim().is_empty() {
                return Err(self.invalid(&at, "must not be empty"));
            }
            if out.iter().any(|o| o == s) {
                return Err(self.invalid(&at, format!("'{s}' is listed twice")));
            }
            out.push(s.to_string());
        }
        Ok(out)
    }
}

fn is_rule_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn rule_from(map: &Map<String, Value>) -> Result<Rule, Problem> {
    let f = Fields::new(
        map,
        "",
        &[
            "id",
            "text",
            "severity",
            "outcome",
            "inputs",
            "applies_when",
            "predicate",
            "work_frame",
        ],
    )?;
    let id = f.string("id")?;
    if !is_rule_id(id) {
        return Err(f.invalid(
            "id",
            format!("'{id}' must be 1 to {MAX_ID_LEN} lowercase letters, digits, '-' or '_'"),
        ));
    }
    let text = f.string("text")?.trim().to_string();
    let severity = f.string("severity")?;
    let severity = Severity::parse(severity).ok_or_else(|| {
        f.invalid(
            "severity",
            format!("'{severity}' is not one of {}", severities().join(", ")),
        )
    })?;
    let outcome = f.string("outcome")?;
    let outcome = Status::parse(outcome).ok_or_else(|| {
        f.invalid(
            "outcome",
            format!("'{outcome}' is not one of {}", outcomes().join(", ")),
        )
    })?;
    let inputs = f.strings("inputs")?;
    let applies_when = f.optional_string("applies_when")?.map(str::to_string);
    let predicate = f.string("predicate")?.to_string();
    let work_frame = match f.get("work_frame") {
        None => None,
        Some(v @ Value::Object(_)) => Some(
            serde_json::from_value::<WorkFramePatch>(v.clone())
                .map_err(|e| f.invalid("work_frame", e.to_string()))?,
        ),
        Some(_) => return Err(f.wrong("work_frame", "an object")),
    };
    Ok(Rule {
        id: id.to_string(),
        text,
        severity,
        outcome,
        inputs,
        applies_when,
        predicate,
        work_frame,
        cases: Vec::new(),
        provenance: None,
    })
}

fn cases_from(map: &Map<String, Value>) -> Result<Vec<Case>, Problem> {
    let f = Fields::new(map, "", &["cases"])?;
    let items = f
        .required("cases")?
        .as_array()
        .ok_or_else(|| f.wrong("cases", "an array of cases"))?;
    if items.is_empty() {
        return Err(f.invalid("cases", "give at least one case"));
    }
    if items.len() > MAX_CASES {
        return Err(f.invalid(
            "cases",
            format!("{} cases; give at most {MAX_CASES}", items.len()),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let path = format!("cases[{i}]");
            let map = item.as_object().ok_or_else(|| Problem::WrongType {
                field: path.clone(),
                expected: "an object".into(),
            })?;
            let c = Fields::new(map, &path, &["name", "context", "matches"])?;
            let context = c
                .required("context")?
                .as_object()
                .ok_or_else(|| c.wrong("context", "an object"))?
                .clone();
            let matches = c
                .required("matches")?
                .as_bool()
                .ok_or_else(|| c.wrong("matches", "true or false"))?;
            let name = c.optional_string("name")?.unwrap_or_default().to_string();
            Ok(Case {
                name,
                context,
                matches,
            })
        })
        .collect()
}

/// The rule an answer's `propose_rule` call proposes (with no cases).
pub fn parse_rule(calls: &[ToolCall]) -> Result<Parsed<Rule>, Repair> {
    let (call, map) = the_call(calls, PROPOSE_RULE)?;
    rule_from(map)
        .map(|value| Parsed {
            call_id: call.id.clone(),
            value,
        })
        .map_err(|problem| Repair {
            tool: PROPOSE_RULE,
            call_id: Some(call.id.clone()),
            problem,
        })
}

/// The cases an answer's `propose_cases` call proposes.
pub fn parse_cases(calls: &[ToolCall]) -> Result<Parsed<Vec<Case>>, Repair> {
    let (call, map) = the_call(calls, PROPOSE_CASES)?;
    cases_from(map)
        .map(|value| Parsed {
            call_id: call.id.clone(),
            value,
        })
        .map_err(|problem| Repair {
            tool: PROPOSE_CASES,
            call_id: Some(call.id.clone()),
            problem,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worlds::model::{Action, AttrType, Attribute, WorldModel};

    fn call(name: &str, args: &str) -> ToolCall {
        ToolCall {
            id: "call_1".into(),
            name: name.into(),
            arguments: Arguments::parse(args),
        }
    }

    fn good_rule() -> Value {
        json!({
            "id": "big-refund",
            "text": "Refunds over the limit need review.",
            "severity": "T2",
            "outcome": "YELLOW",
            "inputs": ["amount"],
            "applies_when": null,
            "predicate": "context.amount > config.limit"
        })
    }

    fn rule_problem(args: Value) -> Problem {
        match parse_rule(&[call(PROPOSE_RULE, &args.to_string())]) {
            Err(r) => r.problem,
            Ok(p) => unreachable!("accepted {p:?}"),
        }
    }

    #[test]
    fn a_good_rule_parses_into_the_world_model() {
        let p = parse_rule(&[call(PROPOSE_RULE, &good_rule().to_string())])
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(p.call_id, "call_1");
        assert_eq!(p.value.severity, Severity::T2);
        assert_eq!(p.value.outcome, Status::Yellow);
        assert_eq!(p.value.inputs, ["amount"]);
        assert_eq!(p.value.applies_when, None);
        // What the tool holds is what a rule holds: it round-trips through the model's serde.
        let back: Rule = serde_json::from_value(
            serde_json::to_value(&p.value).unwrap_or_else(|e| unreachable!("{e}")),
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(back, p.value);
    }

    #[test]
    fn every_malformed_rule_is_a_repair_that_names_its_field() {
        let with = |k: &str, v: Value| {
            let mut r = good_rule();
            r[k] = v;
            r
        };
        let without = |k: &str| {
            let mut r = good_rule();
            r.as_object_mut().map(|m| m.remove(k));
            r
        };
        assert_eq!(
            rule_problem(without("predicate")),
            Problem::Missing("predicate".into())
        );
        assert_eq!(
            rule_problem(with("severity", json!(2))),
            Problem::WrongType {
                field: "severity".into(),
                expected: "a string".into()
            }
        );
        assert!(
            matches!(rule_problem(with("severity", json!("T4"))), Problem::Invalid { field, .. } if field == "severity")
        );
        assert!(
            matches!(rule_problem(with("outcome", json!("green"))), Problem::Invalid { field, .. } if field == "outcome")
        );
        assert!(
            matches!(rule_problem(with("id", json!("Big Refund"))), Problem::Invalid { field, .. } if field == "id")
        );
        assert!(
            matches!(rule_problem(with("inputs", json!(["a", "a"]))), Problem::Invalid { field, .. } if field == "inputs[1]")
        );
        assert!(matches!(
            rule_problem(with("inputs", json!("amount"))),
            Problem::WrongType { .. }
        ));
        assert!(matches!(
            rule_problem(with("predicate", json!("  "))),
            Problem::Invalid { .. }
        ));
        assert_eq!(
            rule_problem(with("extra", json!(1))),
            Problem::Unknown("extra".into())
        );
        assert!(
            matches!(rule_problem(with("work_frame", json!({"mood": "x"}))), Problem::Invalid { field, .. } if field == "work_frame")
        );
        assert_eq!(rule_problem(json!([1, 2])), Problem::NotAnObject);
    }

    #[test]
    fn wrong_calls_are_repairs_too() {
        let r = parse_rule(&[]).err();
        assert_eq!(r.as_ref().map(|r| r.code()), Some("no_tool_call"));
        assert!(matches!(r.map(|r| r.message()), Some(Message::User(_))));
        let r = parse_rule(&[call("delete_world", "{}")]).err();
        assert_eq!(r.as_ref().map(|r| r.code()), Some("unknown_tool"));
        let r = parse_rule(&[call(PROPOSE_RULE, "{\"id\": \"x\"")]).err();
        assert_eq!(r.as_ref().map(|r| r.code()), Some("arguments_not_json"));
        let msg = r.map(|r| r.message());
        assert!(
            matches!(&msg, Some(Message::Tool { call_id, content }) if call_id == "call_1" && content.contains("propose_rule")),
            "{msg:?}"
        );
        let twice = [call(PROPOSE_RULE, "{}"), call(PROPOSE_RULE, "{}")];
        assert_eq!(
            parse_rule(&twice).err().map(|r| r.problem),
            Some(Problem::SeveralCalls(2))
        );
    }

    #[test]
    fn cases_parse_and_their_limit_holds() {
        let good = json!({"cases": [
            {"name": "over", "context": {"amount": 20}, "matches": true},
            {"context": {"amount": 5}, "matches": false}
        ]});
        let p = parse_cases(&[call(PROPOSE_CASES, &good.to_string())])
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(p.value.len(), 2);
        assert!(p.value[0].matches && !p.value[1].matches);
        assert_eq!(p.value[0].name, "over");

        let problem = |v: Value| {
            parse_cases(&[call(PROPOSE_CASES, &v.to_string())])
                .err()
                .map(|r| r.problem)
        };
        let case = json!({"context": {"amount": 1}, "matches": true});
        let at_limit = json!({ "cases": vec![case.clone(); MAX_CASES] });
        assert_eq!(problem(at_limit), None);
        let over = json!({ "cases": vec![case; MAX_CASES + 1] });
        assert!(matches!(problem(over), Some(Problem::Invalid { field, .. }) if field == "cases"));
        assert!(matches!(
            problem(json!({"cases": []})),
            Some(Problem::Invalid { .. })
        ));
        assert_eq!(
            problem(json!({"cases": [{"context": {}, "matches": "yes"}]})),
            Some(Problem::WrongType {
                field: "cases[0].matches".into(),
                expected: "true or false".into()
            })
        );
        assert_eq!(
            problem(json!({"cases": [{"context": {}, "matches": true, "status": "RED"}]})),
            Some(Problem::Unknown("cases[0].status".into()))
        );
        assert_eq!(
            problem(json!({"cases": [{"matches": true}]})),
            Some(Problem::Missing("cases[0].context".into()))
        );
    }

    /// The id check here agrees with the world validator's, on both sides of each bound.
    #[test]
    fn rule_ids_are_checked_as_the_validator_checks_them() {
        let sandbox = crate::sandbox::Sandbox::new(Default::default());
        for id in [
            "a",
            "big-refund_2",
            &"x".repeat(64),
            "",
            "Big",
            "a.b",
            &"x".repeat(65),
            "a b",
        ] {
            let model = WorldModel {
                record_context: Default::default(),
                world: "w".into(),
                description: String::new(),
                context: [("amount".to_string(), Attribute::of(AttrType::Number))].into(),
                config: Default::default(),
                actions: vec![Action {
                    name: "refund.issue".into(),
                    description: String::new(),
                    aggregation: Default::default(),
                    work_frames: Default::default(),
                    rules: vec![Rule {
                        id: id.to_string(),
                        text: "t".into(),
                        severity: Severity::T2,
                        outcome: Status::Yellow,
                        inputs: vec!["amount".into()],
                        applies_when: None,
                        predicate: "context.amount > 1".into(),
                        work_frame: None,
                        provenance: None,
                        cases: vec![Case {
                            name: String::new(),
                            context: [("amount".to_string(), json!(2))].into_iter().collect(),
                            matches: true,
                        }],
                    }],
                }],
            };
            let valid = crate::worlds::compile::compile(&model, 1, &sandbox).is_ok();
            assert_eq!(is_rule_id(id), valid, "id {id:?}");
        }
    }

    /// The schemas offer what the parser accepts: every enum value parses.
    #[test]
    fn schema_enums_are_the_models_values() {
        let t = propose_rule();
        for s in t.parameters["properties"]["severity"]["enum"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert!(Severity::parse(s.as_str().unwrap_or_default()).is_some());
        }
        let outcomes = t.parameters["properties"]["outcome"]["enum"]
            .as_array()
            .map(Vec::len);
        assert_eq!(outcomes, Some(Status::ALL.len()));
        let props = t.parameters["properties"].as_object().map(|m| m.len());
        // Every field of a rule but its cases.
        assert_eq!(props, Some(8));
    }

    /// `docs/agent.md` prints each tool exactly as a request sends it.
    #[test]
    fn the_documented_tools_are_the_tools_sent() {
        let doc = include_str!("../../docs/agent.md");
        for tool in [propose_rule(), propose_cases()] {
            let sent = json!({
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": tool.parameters,
                }
            });
            let marker = format!("<!-- tool: {} -->", tool.name);
            let documented = doc
                .split_once(&marker)
                .and_then(|(_, rest)| rest.split_once("```json"))
                .and_then(|(_, rest)| rest.split_once("```"))
                .map(|(block, _)| serde_json::from_str::<Value>(block));
            let pretty = serde_json::to_string_pretty(&sent).unwrap_or_default();
            assert!(
                matches!(&documented, Some(Ok(d)) if *d == sent),
                "docs/agent.md must show, after {marker}:\n```json\n{pretty}\n```"
            );
        }
    }
}

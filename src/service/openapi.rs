//! The API described as it behaves: the OpenAPI 3.1 document of a world version (one decide
//! operation per action, each with the JSON Schema of the evidence its rules read), the
//! document of the whole service API, and the JSON Schemas the MCP tools share with them.
//!
//! What a document calls invalid the service refuses, and what it calls valid the service
//! answers: a context is any JSON object, because evidence that is missing or ill-typed is
//! answered `200 YELLOW` (`gather_evidence_and_retry`), never refused. The typed attributes are
//! still given, as the first branch of the context's `anyOf`, so a caller knows what to send.

use serde_json::{json, Map, Value};

use crate::worlds::model::{AttrType, Attribute, Source, WorldModel};
use crate::worlds::ModuleSource;

/// JSON Schema (2020-12, as OpenAPI 3.1 uses) of one attribute.
fn schema(attr: &Attribute) -> Value {
    let mut s = Map::new();
    let ty = match attr.ty {
        AttrType::Number => "number",
        AttrType::Integer => "integer",
        AttrType::String | AttrType::Enum | AttrType::Timestamp => "string",
        AttrType::Bool => "boolean",
        AttrType::List => "array",
        AttrType::Object => "object",
    };
    s.insert("type".into(), json!(ty));
    if !attr.description.is_empty() {
        s.insert("description".into(), json!(attr.description));
    }
    if let Some(min) = attr.min {
        s.insert("minimum".into(), json!(min));
    }
    if let Some(max) = attr.max {
        s.insert("maximum".into(), json!(max));
    }
    if attr.ty == AttrType::Enum {
        s.insert("enum".into(), json!(attr.values));
    }
    if attr.ty == AttrType::Timestamp {
        s.insert("format".into(), json!("date-time"));
    }
    if let Some(n) = attr.max_length {
        s.insert("maxLength".into(), json!(n));
    }
    if let Some(item) = attr.items {
        s.insert("items".into(), schema(&Attribute::of(item)));
    }
    if let Some(n) = attr.max_items {
        s.insert("maxItems".into(), json!(n));
    }
    if attr.ty == AttrType::Object && !attr.fields.is_empty() {
        s.insert("properties".into(), properties(attr.fields.iter()));
        let required: Vec<&String> = attr
            .fields
            .iter()
            .filter(|(_, f)| f.required)
            .map(|(n, _)| n)
            .collect();
        if !required.is_empty() {
            s.insert("required".into(), json!(required));
        }
    }
    Value::Object(s)
}

fn properties<'a>(attrs: impl Iterator<Item = (&'a String, &'a Attribute)>) -> Value {
    Value::Object(attrs.map(|(n, a)| (n.clone(), schema(a))).collect())
}

/// A component name for an action: `wire_transfer.release` → `wire_transfer_release`.
fn component(action: &str) -> String {
    action.replace('.', "_")
}

/// One deployed action as a caller sees it.
#[derive(Debug, Clone)]
pub struct ActionSchema {
    pub name: String,
    pub description: String,
    /// The evidence the action's rules read, as JSON Schema: typed properties, with the ones
    /// the schema requires listed under `x-spectral-required-evidence` rather than `required`,
    /// since a context without them is answered YELLOW, not refused.
    pub evidence: Value,
}

/// Every action of a version with the schema of the evidence it reads.
pub fn action_schemas(model: &WorldModel) -> Vec<ActionSchema> {
    let mut out = Vec::new();
    for (index, action) in model.actions.iter().enumerate() {
        let Some(source) = ModuleSource::of(model, index) else {
            continue;
        };
        // Only what the caller supplies: system attributes are the service's.
        let supplied: Vec<(&String, &Attribute)> = source
            .schema
            .iter()
            .filter(|(_, a)| a.source == Source::Supplied)
            .collect();
        let required: Vec<&String> = supplied
            .iter()
            .filter(|(_, a)| a.required)
            .map(|(n, _)| *n)
            .collect();
        out.push(ActionSchema {
            name: action.name.clone(),
            description: action.description.clone(),
            evidence: json!({
                "type": "object",
                "description": format!(
                    "Evidence for '{}'. Send every attribute listed in x-spectral-required-evidence: \
                     a context that lacks one, or has one of the wrong type, is answered 200 YELLOW \
                     with next_action gather_evidence_and_retry and the attribute in \
                     missing_evidence.",
                    action.name
                ),
                "properties": properties(supplied.iter().copied()),
                "x-spectral-required-evidence": required,
            }),
        });
    }
    out
}

/// The actions of a deployed version, as `spectral.list_actions` answers.
pub fn catalog(model: &WorldModel, version: u64) -> Value {
    let actions: Vec<Value> = action_schemas(model)
        .into_iter()
        .map(|a| {
            json!({
                "name": a.name,
                "description": a.description,
                "context_schema": a.evidence,
            })
        })
        .collect();
    json!({
        "world": model.world,
        "world_model_version": version,
        "description": model.description,
        "actions": actions,
    })
}

/// JSON Schema of [`catalog`]'s answer.
pub fn catalog_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "world": {"type": "string"},
            "world_model_version": {"type": "integer", "minimum": 1},
            "description": {"type": "string"},
            "actions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "description": {"type": "string"},
                        "context_schema": {"type": "object"}
                    },
                    "required": ["name", "description", "context_schema"]
                }
            }
        },
        "required": ["world", "world_model_version", "actions"]
    })
}

const STATUSES: [&str; 4] = ["GREEN", "GREEN-SKIP", "YELLOW", "RED"];

/// JSON Schema of a decision, as `POST /api/decide` answers 200 and `spectral.decide` returns.
pub fn decision_schema() -> Value {
    let strings = json!({"type": "array", "items": {"type": "string"}});
    json!({
        "type": "object",
        "properties": {
            "status": {
                "enum": STATUSES,
                "description": "Binding. GREEN: proceed with the action. GREEN-SKIP: the action is \
                    not needed; skip it. YELLOW: do not proceed; follow work_frame.next_action \
                    (a review, or more evidence). RED: do not proceed."
            },
            "work_frame": {
                "type": "object",
                "description": "What the caller may do next. Binding: never take an action in \
                    forbidden_actions, take only actions in allowed_actions, and produce every \
                    item of required_output.",
                "properties": {
                    "mode": {"type": "string"},
                    "next_action": {"type": "string"},
                    "allowed_actions": strings,
                    "forbidden_actions": strings,
                    "required_output": strings,
                    "missing_evidence": strings,
                    "next_human_owner": {"type": ["string", "null"]}
                },
                "required": ["mode", "next_action", "allowed_actions", "forbidden_actions",
                             "required_output", "missing_evidence", "next_human_owner"]
            },
            "decision_metadata": {
                "type": "object",
                "properties": {
                    "decision_id": {"type": "string"},
                    "correlation_id": {"type": ["string", "null"]},
                    "world": {"type": "string"},
                    "world_model_version": {"type": "integer", "minimum": 1},
                    "action": {"type": "string"},
                    "module_hash": {"type": "string"},
                    "matched_rules": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string"},
                                "severity": {"enum": ["T1", "T2", "T3"]},
                                "outcome": {"enum": STATUSES}
                            },
                            "required": ["id", "severity", "outcome"]
                        }
                    },
                    "errors": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "rule": {"type": "string"},
                                "attribute": {"type": "string"},
                                "kind": {"type": "string"},
                                "message": {"type": "string"}
                            },
                            "required": ["kind", "message"]
                        }
                    },
                    "trace": {"type": ["array", "null"], "items": {"type": "object"}},
                    "eval_us": {"type": "integer", "minimum": 0}
                },
                "required": ["decision_id", "correlation_id", "world", "world_model_version",
                             "action", "module_hash", "matched_rules", "errors", "trace", "eval_us"]
            }
        },
        "required": ["status", "work_frame", "decision_metadata"]
    })
}

/// JSON Schema of an RFC 9457 problem document as the service writes them.
pub fn problem_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "code": {"type": "string"},
            "problems": {"type": "array", "items": {"type": "object"}},
            "error_id": {"type": "string", "description": "On 5xx answers: the id the log line of the failure carries."}
        },
        "required": ["type", "title", "status", "detail", "code"]
    })
}

/// The fields of a decide request besides the action and its context, as JSON Schema
/// properties. `world` is given by the caller of this function: a constant in a world's
/// document, any string in the service's.
fn request_fields(world: Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("world".into(), world);
    m.insert(
        "world_model_version".into(),
        json!({
            "type": ["integer", "null"], "minimum": 1, "maximum": u64::MAX,
            "description": "Decide with this version instead of the deployed one (the deployed \
                one when absent or null). Naming the deployed version needs only the decide \
                scope; any other needs the pin scope (403 without it); a retired version \
                answers 410 with code version_retired."
        }),
    );
    m.insert(
        "correlation_id".into(),
        json!({
            "type": ["string", "null"],
            "maxLength": crate::service::MAX_CORRELATION_ID_CHARS,
            "description": "Echoed back in decision_metadata and stored with the decision."
        }),
    );
    m.insert(
        "explain".into(),
        json!({"type": "boolean", "description": "Include the per-rule trace."}),
    );
    m
}

/// JSON Schema of a decide request of any world, as the service document and the
/// `spectral.decide` tool take it. The document is read with an operator key in mind, which
/// must name the world (`world_required`); the tool is called with a world's own key as often.
pub fn decide_request_schema(world_required: bool) -> Value {
    let mut props = Map::new();
    props.insert(
        "action".into(),
        json!({"type": "string", "maxLength": crate::service::MAX_NAME_CHARS, "description": "The action to decide, e.g. wire_transfer.release; spectral.list_actions and GET /api/worlds/{world}/actions list them."}),
    );
    props.insert(
        "context".into(),
        json!({"type": "object", "description": "The evidence, as a JSON object. Missing or ill-typed evidence is answered YELLOW with missing_evidence, never refused."}),
    );
    props.extend(request_fields(json!({
        "type": "string",
        "maxLength": crate::service::MAX_NAME_CHARS,
        "description": "The world. An operator key must send it; a world key may leave it out."
    })));
    let required: &[&str] = if world_required {
        &["action", "context", "world"]
    } else {
        &["action", "context"]
    };
    json!({
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": false
    })
}

fn problem_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/problem"}}}
    })
}

/// The problem answers every authenticated JSON operation can get, with the ones named.
fn problems(extra: &[(&str, &str)]) -> Map<String, Value> {
    let mut m = Map::new();
    for (code, description) in [
        (
            "401",
            "No key, or an unknown one (`unauthenticated`): send `Authorization: Bearer <key>`.",
        ),
        (
            "403",
            "The key may not act on this world, or lacks the scope (`forbidden`).",
        ),
        ("404", "Unknown world, action, version or route (`not_found`)."),
        (
            "405",
            "The route does not take this method (`method_not_allowed`); `Allow` names the one it takes.",
        ),
        (
            "503",
            "Not ready, the store is down, a decision record cannot be queued in time, every \
             evaluation slot for expensive decisions is taken, the request took longer than the \
             request timeout, or the server is at its connection limit (`unavailable`, \
             `evaluation_overloaded`, `too_many_connections`, \
             `too_many_connections_from_address`).",
        ),
        ("500", "A fault of the service (`internal`); the detail is logged, not shown."),
        (
            "429",
            "The key or the world is over its rate (`rate_limited`); `Retry-After` says when to \
             retry.",
        ),
        (
            "408",
            "The request body did not arrive within the header timeout (`body_timeout`).",
        ),
    ] {
        m.insert(code.into(), problem_response(description));
    }
    for (code, description) in extra {
        m.insert((*code).into(), problem_response(description));
    }
    m
}

const RETIRED: &str = "world_model_version names a retired version (`version_retired`).";

/// The extra problems of an operation that reads a JSON body.
const BODY_PROBLEMS: [(&str, &str); 3] = [
    (
        "400",
        "The body is not valid JSON of the expected shape (duplicate keys included), a string \
         is over its maximum length, or the request cannot be served as asked \
         (`malformed_request`, `field_too_long`, `bad_request`, `unreadable_body`).",
    ),
    (
        "413",
        "The body is over the size limit (`payload_too_large`).",
    ),
    (
        "415",
        "The body is not `application/json` (`unsupported_media_type`).",
    ),
];

fn security_components() -> Value {
    json!({
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (`spk_…`). A world key acts on its own world with its scopes \
                (decide, read, author, deploy); an operator key acts on every world and must name it."
        }
    })
}

/// The OpenAPI document of a world version: what `GET /api/worlds/{world}/actions` answers.
pub fn document(model: &WorldModel, version: u64) -> Value {
    let mut schemas = Map::new();
    let mut variants = Vec::new();
    for action in action_schemas(model) {
        let name = component(&action.name);
        schemas.insert(format!("{name}_context"), action.evidence);
        let mut props = Map::new();
        props.insert("action".into(), json!({"const": action.name}));
        props.insert(
            "context".into(),
            json!({
                "description": "Any JSON object. The first branch is the evidence the rules read; \
                    anything else is answered 200 YELLOW asking for the evidence.",
                "anyOf": [
                    {"$ref": format!("#/components/schemas/{name}_context")},
                    {"type": "object"}
                ]
            }),
        );
        props.extend(request_fields(json!({
            "const": model.world,
            "description": "The world. An operator key must send it; a key of this world may leave it out."
        })));
        let mut request = json!({
            "type": "object",
            "properties": props,
            "required": ["action", "context", "world"],
            "additionalProperties": false,
        });
        if !action.description.is_empty() {
            request["description"] = json!(action.description);
        }
        schemas.insert(format!("{name}_request"), request);
        variants.push(json!({"$ref": format!("#/components/schemas/{name}_request")}));
    }
    schemas.insert("decision".into(), decision_schema());
    schemas.insert("problem".into(), problem_schema());
    let mut responses = problems(&BODY_PROBLEMS);
    responses.insert("410".into(), problem_response(RETIRED));
    responses.insert(
        "200".into(),
        json!({
            "description": "The decision, including YELLOW for missing or ill-typed evidence and for rules that failed closed.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/decision"}}}
        }),
    );
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": format!("Spectral decisions for world '{}'", model.world),
            "version": version.to_string(),
            "description": model.description,
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/decide": {
                "post": {
                    "operationId": "decide",
                    "summary": "Decide whether an action may proceed.",
                    "description": "The status and work frame of the answer are binding.",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": true,
                        "content": {"application/json": {"schema": {"oneOf": variants}}}
                    },
                    "responses": responses
                }
            }
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": security_components()
        }
    })
}

/// An authenticated JSON operation of the service document.
fn operation(
    id: &str,
    summary: &str,
    body: Option<Value>,
    ok: (&str, &str, Value),
    extra: &[(&str, &str)],
) -> Value {
    let mut responses = problems(extra);
    if body.is_some() {
        for (code, description) in BODY_PROBLEMS {
            responses.insert(code.into(), problem_response(description));
        }
    }
    responses.insert(
        ok.0.into(),
        json!({"description": ok.1, "content": {"application/json": {"schema": ok.2}}}),
    );
    let mut op = json!({
        "operationId": id,
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": responses,
    });
    if let Some(schema) = body {
        op["requestBody"] =
            json!({"required": true, "content": {"application/json": {"schema": schema}}});
    }
    op
}

/// The schemas of shadows and replays (docs/impact.md).
fn impact_schemas(datetime: &Value) -> Value {
    json!({
        "shadow_request": {
            "type": "object",
            "properties": {
                "version": {"type": "integer", "minimum": 0, "description": "A published version other than the deployed one."},
                "sample": {"type": "number", "minimum": 0, "maximum": 1, "description": "The share of decisions also evaluated against it; 1.0 by default."}
            },
            "required": ["version"],
            "additionalProperties": false
        },
        "difference_report": {
            "type": "object",
            "description": "Decisions compared, and how they differ, per (status before, status after, rule that made the difference), most frequent first.",
            "properties": {
                "evaluated": {"type": "integer"}, "differing": {"type": "integer"},
                "skipped": {"type": "integer", "description": "Sampled decisions not compared: the shadow's queue was full."},
                "other": {"type": "integer", "description": "Differing decisions beyond the kinds listed."},
                "differences": {"type": "array", "items": {
                    "type": "object",
                    "properties": {
                        "from": {"type": "string"}, "to": {"type": "string"},
                        "rule": {"type": ["string", "null"]}, "count": {"type": "integer"},
                        "examples": {"type": "array", "items": {"type": "string"}, "maxItems": crate::impact::EXAMPLES}
                    },
                    "required": ["from", "to", "rule", "count", "examples"]
                }}
            },
            "required": ["evaluated", "differing", "skipped", "other", "differences"]
        },
        "shadow": {
            "type": "object",
            "properties": {
                "shadow": {"type": "object", "properties": {
                    "world": {"type": "string"}, "id": {"type": "string"}, "version": {"type": "integer"},
                    "sample": {"type": "number"}, "started_by": {"type": "string"}, "started_at": datetime
                }, "required": ["world", "id", "version", "sample", "started_by", "started_at"]},
                "deployed_version": {"type": ["integer", "null"]},
                "pending": {"type": "integer", "description": "Sampled decisions this instance has not evaluated yet."},
                "summary": {"type": "string"},
                "report": reference("difference_report")
            },
            "required": ["shadow", "deployed_version", "pending", "summary", "report"]
        },
        "replay_request": {
            "type": "object",
            "properties": {
                "version": {"oneOf": [{"type": "integer", "minimum": 0}, {"const": "draft"}], "description": "A published version, or the world's draft."},
                "since": {"type": ["string", "null"], "format": "date-time", "description": "Only decisions decided at or after this time."},
                "limit": {"type": ["integer", "null"], "minimum": 1, "description": "The most recent decisions to replay; SPECTRAL_REPLAY_MAX_ROWS at most and by default."}
            },
            "required": ["version"],
            "additionalProperties": false
        },
        "replay": {
            "type": "object",
            "properties": {
                "id": {"type": "string"}, "world": {"type": "string"},
                "version": {"type": ["integer", "null"], "description": "null for the draft."},
                "since": {"type": ["string", "null"]}, "limit": {"type": "integer"},
                "status": {"enum": ["queued", "running", "done", "failed"]},
                "processed": {"type": "integer"}, "error": {"type": ["string", "null"]},
                "requested_by": {"type": "string"}, "requested_at": datetime,
                "finished_at": {"type": ["string", "null"]},
                "report": {"oneOf": [{"type": "null"}, {
                    "allOf": [reference("difference_report")],
                    "properties": {"summary": {"type": "string"}, "stopped_by": {"enum": ["end", "rows", "time", null]}},
                    "required": ["summary", "stopped_by"]
                }]}
            },
            "required": ["id", "world", "version", "since", "limit", "status", "processed", "error", "requested_by", "requested_at", "finished_at", "report"]
        }
    })
}

fn world_param() -> Value {
    json!({
        "name": "world", "in": "path", "required": true,
        "schema": {"type": "string"},
        "description": "The world's slug, e.g. acme-payments."
    })
}

fn reference(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// The OpenAPI document of the whole service API: what `GET /api/openapi.json` answers.
pub fn service_document(version: &str, batch_max_items: usize) -> Value {
    let datetime = json!({"type": "string", "format": "date-time"});
    let opt_int = json!({"type": ["integer", "null"], "minimum": 1});
    let deployment = json!({
        "type": "object",
        "properties": {
            "seq": {"type": "integer"}, "version": {"type": "integer"},
            "deployed_at": datetime, "deployed_by": {"type": "string"}
        },
        "required": ["seq", "version", "deployed_at", "deployed_by"]
    });
    let retirement = json!({
        "type": "object",
        "properties": {"retired_at": datetime, "retired_by": {"type": "string"}, "reason": {"type": ["string", "null"]}},
        "required": ["retired_at", "retired_by", "reason"]
    });
    let modules = json!({
        "type": "array",
        "description": "[action, module hash] pairs in the model's action order.",
        "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2}
    });
    let mut schemas = json!({
        "decide_request": decide_request_schema(true),
        "decision": decision_schema(),
        "problem": problem_schema(),
        "batch_request": {
            "type": "object",
            "properties": {"requests": {"type": "array", "maxItems": batch_max_items, "items": {
                "description": "A decide request. An item that is not one is answered in its own result with a 400 problem, not by refusing the batch.",
                "anyOf": [{"$ref": "#/components/schemas/decide_request"}, {}]
            }}},
            "required": ["requests"],
            "additionalProperties": false
        },
        "batch_response": {
            "type": "object",
            "properties": {"results": {"type": "array", "items": {
                "type": "object",
                "description": "One per request, in order: a decision, or the problem that request alone met (`batch_budget_exhausted` for items the batch's operations or time did not reach).",
                "properties": {
                    "status": {"type": "integer"},
                    "decision": reference("decision"),
                    "problem": reference("problem")
                },
                "required": ["status"]
            }}},
            "required": ["results"]
        },
        "world_model": {
            "type": "object",
            "description": "A whole world model (docs/predicates.md). A model that does not decode is \
                answered 400; one that decodes but fails validation or its cases, 422 with every problem listed.",
            "properties": {
                "world": {"type": "string"}, "description": {"type": "string"},
                "context": {"type": "object"}, "config": {"type": "object"},
                "actions": {"type": "array", "items": {"type": "object"}},
                "record_context": {"enum": ["none", "digest", "full"], "description": "What each \
                    decision's record keeps of its context (docs/impact.md); digest by default."}
            },
            "required": ["world", "actions"],
            "additionalProperties": false
        },
        "draft": {
            "type": "object",
            "properties": {
                "world": {"type": "string"}, "draft": {"const": "valid"},
                "actions": {"type": "integer"}, "rules": {"type": "integer"}
            },
            "required": ["world", "draft", "actions", "rules"]
        },
        "published": {
            "type": "object",
            "properties": {"world": {"type": "string"}, "version": {"type": "integer"}, "modules": modules},
            "required": ["world", "version", "modules"]
        },
        "deploy_request": {
            "type": "object",
            "properties": {"version": {"type": "integer", "minimum": 0, "maximum": u64::MAX}},
            "required": ["version"],
            "additionalProperties": false
        },
        "deployment": deployment,
        "retirement": retirement.clone(),
        "retire_request": {
            "type": "object",
            "properties": {"reason": {"type": ["string", "null"], "maxLength": crate::service::MAX_RETIRE_REASON_CHARS}},
            "additionalProperties": false
        },
        "retired_version": {
            "type": "object",
            "properties": {"world": {"type": "string"}, "version": {"type": "integer"}, "retired": reference("retirement")},
            "required": ["world", "version", "retired"]
        },
        "world_summary": {
            "type": "object",
            "properties": {"world": {"type": "string"}, "deployed_version": opt_int, "latest_version": opt_int},
            "required": ["world", "deployed_version", "latest_version"]
        },
        "world_detail": {
            "type": "object",
            "properties": {
                "world": {"type": "string"}, "deployed_version": opt_int, "has_draft": {"type": "boolean"},
                "versions": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"version": {"type": "integer"}, "published_at": datetime, "published_by": {"type": "string"},
                                   "retired": {"anyOf": [reference("retirement"), {"type": "null"}]}},
                    "required": ["version", "published_at", "published_by", "retired"]
                }},
                "deployments": {"type": "array", "items": reference("deployment")}
            },
            "required": ["world", "deployed_version", "has_draft", "versions", "deployments"]
        },
        "version_record": {
            "type": "object",
            "properties": {
                "world": {"type": "string"}, "version": {"type": "integer"},
                "model": reference("world_model"), "modules": modules,
                "published_at": datetime, "published_by": {"type": "string"}
            },
            "required": ["world", "version", "model", "modules", "published_at", "published_by"]
        },
        "stats": {
            "type": "object",
            "properties": {
                "world": {"type": "string"},
                "decisions": {"type": "object", "additionalProperties": {"type": "integer"}, "description": "Decisions by status."},
                "rules": {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": {"type": "integer"}}, "description": "Per rule: matches by the decision's status."}
            },
            "required": ["world", "decisions", "rules"]
        },
        "webhook_request": {
            "type": "object",
            "properties": {
                "url": {"type": "string", "format": "uri", "description": "http or https."},
                "events": {"type": ["array", "null"], "items": {"enum": ["worldmodel.version.published", "module.deployed"]}},
                "secret": {"type": ["string", "null"], "description": "The HMAC key; generated and returned once when absent."}
            },
            "required": ["url"],
            "additionalProperties": false
        },
        "webhook": {
            "type": "object",
            "properties": {
                "id": {"type": "string"}, "world": {"type": "string"}, "url": {"type": "string"},
                "events": {"type": "array", "items": {"type": "string"}},
                "created_at": datetime, "secret": {"type": "string"}
            },
            "required": ["id", "world", "url", "events", "created_at", "secret"]
        },
        "webhook_summary": {
            "type": "object",
            "properties": {
                "id": {"type": "string"}, "world": {"type": "string"}, "url": {"type": "string"},
                "events": {"type": "array", "items": {"type": "string"}},
                "created_at": datetime
            },
            "required": ["id", "world", "url", "events", "created_at"]
        },
        "key": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "world": {"type": ["string", "null"], "description": "null for an operator key."},
                "scopes": {"type": "array", "items": {"enum": ["decide", "read", "author", "deploy", "pin"]}},
                "label": {"type": "string"},
                "created_at": datetime,
                "expires_at": {"type": ["string", "null"], "format": "date-time"},
                "revoked_at": {"type": ["string", "null"], "format": "date-time"},
                "last_used_at": {"type": ["string", "null"], "format": "date-time"},
                "previous_valid_until": {"type": ["string", "null"], "format": "date-time"}
            },
            "required": ["id", "world", "scopes", "label", "created_at", "expires_at", "revoked_at", "last_used_at", "previous_valid_until"]
        },
        "rotated_key": {
            "allOf": [{"$ref": "#/components/schemas/key"}],
            "properties": {"secret": {"type": "string", "description": "The new secret, shown this once."}},
            "required": ["secret"]
        },
        "health": {
            "type": "object",
            "properties": {
                "status": {"enum": ["ok", "unavailable"]}, "version": {"type": "string"},
                "git_sha": {"type": "string"}, "generation": {"type": "integer"},
                "uptime_s": {"type": "integer"}, "features": {"type": "object"}
            },
            "required": ["status", "version", "git_sha", "generation", "uptime_s", "features"]
        },
        "build": {
            "type": "object",
            "properties": {"version": {"type": "string"}, "git_sha": {"type": "string"}, "generation": {"type": "integer"}},
            "required": ["version", "git_sha", "generation"]
        }
    });
    if let (Some(all), Value::Object(impact)) = (schemas.as_object_mut(), impact_schemas(&datetime))
    {
        all.extend(impact);
    }
    let world = world_param();
    let version_param = json!({
        "name": "version", "in": "path", "required": true,
        "schema": {"type": "integer", "minimum": 0, "maximum": u64::MAX}
    });
    let id_param = json!({
        "name": "id", "in": "path", "required": true,
        "schema": {"type": "string"},
        "description": "The id of a key (`key_…`) or a webhook (`wh_…`)."
    });
    let not_routed =
        problem_response("No such route (`route_not_found`), e.g. a version that is not a number.");
    let invalid = (
        "422",
        "The world model has problems, every one listed (`invalid_world_model`).",
    );
    let conflict = (
        "409",
        "The store refused the change (`conflict`), e.g. a version that cannot be loaded.",
    );
    let mut get_version = operation(
        "getVersion",
        "A published version in full.",
        None,
        ("200", "The version.", reference("version_record")),
        &[],
    );
    get_version["responses"]["404"] = not_routed.clone();
    let mut retire = operation(
        "retire",
        "Retire a version for good: no key may pin it any more and it is never deployed again.",
        None,
        ("200", "The retired version.", reference("retired_version")),
        &[conflict],
    );
    for (code, description) in BODY_PROBLEMS {
        retire["responses"][code] = problem_response(description);
    }
    retire["responses"]["404"] = not_routed;
    retire["requestBody"] = json!({
        "required": false,
        "content": {"application/json": {"schema": reference("retire_request")}}
    });
    let paths = json!({
        "/api/decide": {"post": operation(
            "decide", "Decide whether an action may proceed; the status and work frame are binding.",
            Some(reference("decide_request")),
            ("200", "The decision, YELLOW included for missing or ill-typed evidence.", reference("decision")), &[("410", RETIRED)])},
        "/api/decide/batch": {"post": operation(
            "decideBatch", "Decide several requests in order, each with its own result or problem.",
            Some(reference("batch_request")),
            ("200", "One result per request, in order.", reference("batch_response")), &[])},
        "/api/worlds": {"get": operation(
            "listWorlds", "The worlds the key may read.", None,
            ("200", "The worlds.", json!({"type": "array", "items": reference("world_summary")})), &[])},
        "/api/worlds/{world}": {"parameters": [world.clone()], "get": operation(
            "getWorld", "A world: its versions, deployments and whether it has a draft.", None,
            ("200", "The world.", reference("world_detail")), &[])},
        "/api/worlds/{world}/draft": {"parameters": [world.clone()], "put": operation(
            "putDraft", "Replace the world's draft with a whole world model, validated and verified.",
            Some(reference("world_model")),
            ("200", "The draft is valid.", reference("draft")), &[invalid, ("409", "The store refused the change (`conflict`).")])},
        "/api/worlds/{world}/versions": {"parameters": [world.clone()], "post": operation(
            "publish", "Publish the draft as the next version (immutable).", None,
            ("201", "The published version.", reference("published")), &[invalid, conflict])},
        "/api/worlds/{world}/versions/{version}": {"parameters": [world.clone(), version_param.clone()], "get": get_version},
        "/api/worlds/{world}/versions/{version}/retire": {"parameters": [world.clone(), version_param.clone()], "post": retire},
        "/api/worlds/{world}/deployments": {"parameters": [world.clone()], "post": operation(
            "deploy", "Deploy (or roll back to) a published version.",
            Some(reference("deploy_request")),
            ("200", "The deployment.", reference("deployment")), &[conflict])},
        "/api/worlds/{world}/actions": {"parameters": [world.clone()], "get": operation(
            "getActions", "The OpenAPI 3.1 document of the deployed version's actions.", None,
            ("200", "An OpenAPI document.", json!({"type": "object"})), &[])},
        "/api/worlds/{world}/stats": {"parameters": [world.clone()], "get": operation(
            "getStats", "Decision statistics as counted so far.", None,
            ("200", "The statistics.", reference("stats")), &[])},
        "/api/worlds/{world}/webhooks": {"parameters": [world.clone()], "post": operation(
            "createWebhook", "Subscribe a URL to the world's events (signed deliveries).",
            Some(reference("webhook_request")),
            ("201", "The webhook, with its secret shown this once.", reference("webhook")), &[]),
            "get": operation(
            "listWebhooks", "The world's webhooks, never their secrets (the author scope, or an operator key).", None,
            ("200", "The webhooks.", json!({"type": "object", "properties": {"webhooks": {"type": "array", "items": reference("webhook_summary")}}, "required": ["webhooks"]})), &[])},
        "/api/worlds/{world}/webhooks/{id}": {"parameters": [world, id_param.clone()], "delete": operation(
            "deleteWebhook", "Delete one of the world's webhooks; nothing more is delivered to it.", None,
            ("200", "Deleted.", json!({"type": "object", "properties": {"world": {"type": "string"}, "deleted": {"type": "string"}}, "required": ["world", "deleted"]})), &[])},
        "/api/worlds/{world}/shadow": {"parameters": [world.clone()],
            "post": operation(
                "startShadow", "Evaluate a published version beside the deployed one on a sampled share of live decisions (the deploy scope); its answers are never returned or recorded.",
                Some(reference("shadow_request")),
                ("201", "The shadow, started.", reference("shadow")),
                &[("409", "The world has no deployed version, or the version is the deployed one, retired or cannot be loaded (`conflict`).")]),
            "get": operation(
                "getShadow", "The world's shadow and every instance's differences so far.", None,
                ("200", "The shadow and its report.", reference("shadow")), &[]),
            "delete": operation(
                "endShadow", "End the world's shadow (the deploy scope); its final report.", None,
                ("200", "The shadow's final report.", reference("shadow")), &[])},
        "/api/worlds/{world}/replays": {"parameters": [world.clone()], "post": operation(
            "queueReplay", "Replay a version or the draft over the world's kept contexts (the author scope), on the workers.",
            Some(reference("replay_request")),
            ("202", "The replay, queued.", reference("replay")),
            &[("409", "The world keeps no contexts, or has as many replays queued or running as it may (`conflict`).")])},
        "/api/worlds/{world}/replays/{id}": {"parameters": [world.clone(), {
                "name": "id", "in": "path", "required": true, "schema": {"type": "string"},
                "description": "The replay's id (`rp_…`)."
            }], "get": operation(
            "getReplay", "A replay, its progress and its report so far.", None,
            ("200", "The replay.", reference("replay")), &[])},
        "/api/keys": {"get": operation(
            "listKeys", "Every API key, never a secret or its hash (operator keys only).", None,
            ("200", "The keys.", json!({"type": "object", "properties": {"keys": {"type": "array", "items": reference("key")}}, "required": ["keys"]})), &[])},
        "/api/keys/{id}/revoke": {"parameters": [id_param.clone()], "post": operation(
            "revokeKey", "Revoke a key for good (operator keys only); every instance refuses it within the documented bound.", None,
            ("200", "The revoked key.", reference("key")), &[])},
        "/api/keys/{id}/rotate": {"parameters": [id_param], "post": operation(
            "rotateKey", "Give a key a new secret, shown this once; the replaced one is accepted until `previous_valid_until` (operator keys only).", None,
            ("200", "The key with its new secret.", reference("rotated_key")), &[("409", "The key is revoked (`conflict`).")])},
        "/api/openapi.json": {"get": {
            "operationId": "getOpenApi", "summary": "This document.", "security": [],
            "responses": {
                "200": {"description": "An OpenAPI 3.1 document.", "content": {"application/json": {"schema": {"type": "object"}}}},
                "405": problem_response("Only GET.")
            }
        }},
        "/health": {"get": {
            "operationId": "health", "summary": "Readiness and each feature's state; nothing per world (the detailed report and /metrics are on the admin listener).", "security": [],
            "responses": {
                "200": {"description": "Ready.", "content": {"application/json": {"schema": reference("health")}}},
                "503": {"description": "Not ready, or at the connection limit.", "content": {
                    "application/json": {"schema": reference("health")},
                    "application/problem+json": {"schema": reference("problem")}
                }},
                "405": problem_response("Only GET.")
            }
        }},
        "/version": {"get": {
            "operationId": "version", "summary": "The build and generation.", "security": [],
            "responses": {
                "200": {"description": "The build.", "content": {"application/json": {"schema": reference("build")}}},
                "405": problem_response("Only GET.")
            }
        }}
    });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Spectral",
            "version": version,
            "description": "Deterministic decisions for software agents. `POST /decide` is an alias of \
                `POST /api/decide`. The same decide and discovery are served as MCP tools at `/mcp` \
                (Streamable HTTP; not described here)."
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": security_components()}
    })
}

//! The OpenAPI 3.1 document of a world version: one decide operation per action, each with
//! the JSON Schema of the context its rules read, so a caller's agent can discover what to
//! send.

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

/// The OpenAPI document of a world version.
pub fn document(model: &WorldModel, version: u64) -> Value {
    let mut schemas = Map::new();
    let mut variants = Vec::new();
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
        let name = component(&action.name);
        schemas.insert(
            format!("{name}_context"),
            json!({
                "type": "object",
                "description": format!("Context of '{}'.", action.name),
                "properties": properties(supplied.iter().copied()),
                "required": required,
            }),
        );
        schemas.insert(
            format!("{name}_request"),
            json!({
                "type": "object",
                "description": action.description,
                "properties": {
                    "action": {"const": action.name},
                    "context": {"$ref": format!("#/components/schemas/{name}_context")},
                    "world": {"const": model.world},
                    "world_model_version": {
                        "type": "integer",
                        "minimum": 1,
                        "description": "Decide with this version instead of the deployed one. \
                            Naming the deployed version needs only the decide scope; any other \
                            needs the pin scope (403 without it); a retired version answers \
                            410 with code version_retired."
                    },
                    "correlation_id": {"type": "string", "maxLength": crate::service::MAX_CORRELATION_ID_CHARS},
                    "explain": {"type": "boolean"}
                },
                "required": ["action", "context"],
            }),
        );
        variants.push(json!({"$ref": format!("#/components/schemas/{name}_request")}));
    }
    schemas.insert(
        "decision".into(),
        json!({
            "type": "object",
            "properties": {
                "status": {"enum": ["GREEN", "GREEN-SKIP", "YELLOW", "RED"]},
                "work_frame": {"type": "object"},
                "decision_metadata": {"type": "object"}
            },
            "required": ["status", "work_frame", "decision_metadata"]
        }),
    );
    schemas.insert(
        "problem".into(),
        json!({
            "type": "object",
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "code": {"type": "string"}
            }
        }),
    );
    let problem = json!({
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/problem"}}}
    });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": format!("Spectral decisions for world '{}'", model.world),
            "version": version.to_string(),
            "description": model.description,
        },
        "paths": {
            "/api/decide": {
                "post": {
                    "operationId": "decide",
                    "summary": "Decide whether an action may proceed.",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": true,
                        "content": {"application/json": {"schema": {"oneOf": variants}}}
                    },
                    "responses": {
                        "200": {
                            "description": "The decision.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/decision"}}}
                        },
                        "400": {"description": "Malformed request.", "content": problem["content"].clone()},
                        "401": {"description": "No or unknown key.", "content": problem["content"].clone()},
                        "403": {"description": "Key not allowed.", "content": problem["content"].clone()},
                        "404": {"description": "Unknown world, action or version.", "content": problem["content"].clone()}
                    }
                }
            }
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        }
    })
}

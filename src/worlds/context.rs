//! Validation of a caller's context against an action's schema, and its conversion into the
//! sandbox's bindings, in one pass over the JSON.
//!
//! Only the attributes the action's rules read are parsed into values; every other key is
//! skipped without allocating, so the cost of a request does not grow with what the caller
//! sends beyond what the rules need.

use std::fmt;

use chrono::DateTime;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use super::model::{AttrType, Attribute, Source};
use crate::sandbox::{Bindings, Input, Limits};

/// The values the service fills in for `source = "system"` attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemValues {
    /// Unix seconds.
    pub request_time: i64,
    pub request_id: String,
    pub caller: String,
}

/// Why an attribute cannot be used: missing or invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    pub attribute: String,
    pub reason: String,
}

/// The outcome of binding a context.
#[derive(Debug)]
pub enum Bound {
    /// Every required attribute is present and every present one is valid.
    Ready(Bindings),
    /// Evidence is missing or invalid; the rules must not run.
    Missing(Vec<Evidence>),
    /// The context is not a JSON object at all.
    NotAnObject(String),
}

/// Bind a context given as JSON text.
pub fn bind_str(
    attrs: &[(String, Attribute)],
    json: &str,
    system: Option<&SystemValues>,
    limits: &Limits,
) -> Bound {
    let mut de = serde_json::Deserializer::from_str(json);
    let slots = match (Seed { attrs }).deserialize(&mut de).and_then(|s| {
        de.end()?;
        Ok(s)
    }) {
        Ok(slots) => slots,
        Err(e) => return Bound::NotAnObject(e.to_string()),
    };
    finish(attrs, slots, system, limits)
}

/// Bind a context given as a parsed JSON value.
pub fn bind_value(
    attrs: &[(String, Attribute)],
    json: &Value,
    system: Option<&SystemValues>,
    limits: &Limits,
) -> Bound {
    match (Seed { attrs }).deserialize(json) {
        Ok(slots) => finish(attrs, slots, system, limits),
        Err(e) => Bound::NotAnObject(e.to_string()),
    }
}

/// Collects the values of the wanted attributes, by index into `attrs`.
struct Seed<'a> {
    attrs: &'a [(String, Attribute)],
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Vec<Option<Value>>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        debug_assert!(self.attrs.windows(2).all(|w| w[0].0 < w[1].0));
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Vec<Option<Value>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("the context as a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut slots = vec![None; self.attrs.len()];
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            // `attrs` comes sorted by name from the module's schema.
            match self
                .attrs
                .binary_search_by(|(name, _)| name.as_str().cmp(&key))
            {
                Ok(i) => slots[i] = Some(map.next_value::<Value>()?),
                Err(_) => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(slots)
    }
}

fn finish(
    attrs: &[(String, Attribute)],
    slots: Vec<Option<Value>>,
    system: Option<&SystemValues>,
    limits: &Limits,
) -> Bound {
    let mut input = Input::new();
    let mut missing = Vec::new();
    for ((name, attr), slot) in attrs.iter().zip(slots) {
        // A caller cannot forge system attributes: when the service supplies them, whatever
        // the caller sent under those names is ignored.
        if let (Source::System, Some(system)) = (attr.source, system) {
            match name.as_str() {
                "request_time" => input.insert_int(name, system.request_time),
                "request_id" => input.insert_str(name, &system.request_id),
                "caller" => input.insert_str(name, &system.caller),
                _ => missing.push(Evidence {
                    attribute: name.clone(),
                    reason: "unknown system attribute".into(),
                }),
            }
            continue;
        }
        let Some(value) = slot.filter(|v| !v.is_null()) else {
            if attr.required {
                missing.push(Evidence {
                    attribute: name.clone(),
                    reason: "required attribute is missing".into(),
                });
            }
            continue;
        };
        match check(attr, &value) {
            Ok(Checked::Timestamp(secs)) => input.insert_int(name, secs),
            Ok(Checked::AsIs) => {
                if let Err(reason) = input.insert(name, &value, limits) {
                    missing.push(Evidence {
                        attribute: name.clone(),
                        reason,
                    });
                }
            }
            Err(reason) => missing.push(Evidence {
                attribute: name.clone(),
                reason,
            }),
        }
    }
    if missing.is_empty() {
        Bound::Ready(input.seal())
    } else {
        Bound::Missing(missing)
    }
}

enum Checked {
    AsIs,
    Timestamp(i64),
}

/// Check a value against an attribute's type and constraints.
fn check(attr: &Attribute, value: &Value) -> Result<Checked, String> {
    match attr.ty {
        AttrType::Number => {
            let n = value
                .as_f64()
                .ok_or_else(|| format!("expected a number, got {}", kind(value)))?;
            bounds(attr, n)?;
        }
        AttrType::Integer => {
            let n = value
                .as_i64()
                .ok_or_else(|| format!("expected an integer, got {}", kind(value)))?;
            bounds(attr, n as f64)?;
        }
        AttrType::String => {
            let s = value
                .as_str()
                .ok_or_else(|| format!("expected a string, got {}", kind(value)))?;
            length(attr, s)?;
        }
        AttrType::Bool => {
            if !value.is_boolean() {
                return Err(format!("expected a bool, got {}", kind(value)));
            }
        }
        AttrType::Enum => {
            let s = value
                .as_str()
                .ok_or_else(|| format!("expected one of {:?}, got {}", attr.values, kind(value)))?;
            if !attr.values.iter().any(|v| v == s) {
                return Err(format!("'{s}' is not one of {:?}", attr.values));
            }
        }
        AttrType::Timestamp => {
            let s = value.as_str().ok_or_else(|| {
                format!("expected an RFC 3339 timestamp string, got {}", kind(value))
            })?;
            let t = DateTime::parse_from_rfc3339(s)
                .map_err(|e| format!("'{s}' is not an RFC 3339 timestamp: {e}"))?;
            return Ok(Checked::Timestamp(t.timestamp()));
        }
        AttrType::List => {
            let items = value
                .as_array()
                .ok_or_else(|| format!("expected a list, got {}", kind(value)))?;
            if let Some(max) = attr.max_items {
                if items.len() > max {
                    return Err(format!(
                        "list has {} items, over the maximum of {max}",
                        items.len()
                    ));
                }
            }
            if let Some(ty) = attr.items {
                let item_attr = Attribute::of(ty);
                for (i, item) in items.iter().enumerate() {
                    // Validation of the model keeps timestamps out of lists, so an item
                    // is never converted.
                    if let Err(e) = check(&item_attr, item) {
                        return Err(format!("item {i}: {e}"));
                    }
                }
            }
        }
        AttrType::Object => {
            let fields = value
                .as_object()
                .ok_or_else(|| format!("expected an object, got {}", kind(value)))?;
            for (name, field) in &attr.fields {
                match fields.get(name).filter(|v| !v.is_null()) {
                    None if field.required => {
                        return Err(format!("field '{name}' is missing"));
                    }
                    None => {}
                    Some(v) => match check(field, v) {
                        Ok(Checked::AsIs) => {}
                        Ok(Checked::Timestamp(_)) => {
                            return Err(format!(
                                "field '{name}': timestamps inside objects are not supported"
                            ))
                        }
                        Err(e) => return Err(format!("field '{name}': {e}")),
                    },
                }
            }
        }
    }
    Ok(Checked::AsIs)
}

fn bounds(attr: &Attribute, n: f64) -> Result<(), String> {
    if let Some(min) = attr.min {
        if n < min {
            return Err(format!("{n} is below the minimum of {min}"));
        }
    }
    if let Some(max) = attr.max {
        if n > max {
            return Err(format!("{n} is above the maximum of {max}"));
        }
    }
    Ok(())
}

fn length(attr: &Attribute, s: &str) -> Result<(), String> {
    if let Some(max) = attr.max_length {
        let len = s.chars().count();
        if len > max {
            return Err(format!(
                "string of {len} characters is over the maximum of {max}"
            ));
        }
    }
    Ok(())
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attrs() -> Vec<(String, Attribute)> {
        let mut amount = Attribute::of(AttrType::Number);
        amount.min = Some(0.0);
        let mut method = Attribute::of(AttrType::Enum);
        method.values = vec!["wire".into(), "ach".into()];
        let mut note = Attribute::of(AttrType::String);
        note.required = false;
        note.max_length = Some(5);
        let mut at = Attribute::of(AttrType::Timestamp);
        at.source = Source::System;
        vec![
            ("amount".into(), amount),
            ("method".into(), method),
            ("note".into(), note),
            ("request_time".into(), at),
        ]
    }

    fn system() -> SystemValues {
        SystemValues {
            request_time: 42,
            request_id: "r".into(),
            caller: "c".into(),
        }
    }

    fn missing(bound: Bound) -> Vec<String> {
        match bound {
            Bound::Missing(m) => m.into_iter().map(|e| e.attribute).collect(),
            Bound::Ready(_) => vec![],
            Bound::NotAnObject(e) => vec![format!("not an object: {e}")],
        }
    }

    #[test]
    fn valid_context_binds() {
        let b = bind_str(
            &attrs(),
            r#"{"amount": 5, "method": "wire", "other": [1,2,{"x":1}]}"#,
            Some(&system()),
            &Limits::default(),
        );
        assert!(matches!(b, Bound::Ready(_)), "{b:?}");
    }

    #[test]
    fn missing_and_invalid_attributes_are_named() {
        let b = bind_str(
            &attrs(),
            r#"{"amount": -1, "note": "too long"}"#,
            Some(&system()),
            &Limits::default(),
        );
        assert_eq!(missing(b), vec!["amount", "method", "note"]);
    }

    #[test]
    fn str_and_value_paths_agree() {
        let v = json!({"amount": "5", "method": "card"});
        let a = missing(bind_value(
            &attrs(),
            &v,
            Some(&system()),
            &Limits::default(),
        ));
        let b = missing(bind_str(
            &attrs(),
            &v.to_string(),
            Some(&system()),
            &Limits::default(),
        ));
        assert_eq!(a, b);
        assert_eq!(a, vec!["amount", "method"]);
    }

    #[test]
    fn system_attributes_cannot_be_forged_or_required_from_callers() {
        // Without system values (a case), a missing request_time is missing evidence; with
        // them, the caller's value is ignored.
        let v = json!({"amount": 1, "method": "ach", "request_time": "garbage"});
        assert_eq!(
            missing(bind_value(&attrs(), &v, None, &Limits::default())),
            vec!["request_time"]
        );
        assert!(missing(bind_value(
            &attrs(),
            &v,
            Some(&system()),
            &Limits::default()
        ))
        .is_empty());
    }

    #[test]
    fn non_objects_are_rejected() {
        for bad in ["[1]", "3", "{", "{\"amount\": 1} trailing"] {
            assert!(
                matches!(
                    bind_str(&attrs(), bad, Some(&system()), &Limits::default()),
                    Bound::NotAnObject(_)
                ),
                "{bad}"
            );
        }
    }
}

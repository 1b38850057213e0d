//! Conversion of validated JSON into the values predicates see.

use rhai::Dynamic;

use super::Limits;

/// The context a predicate sees: a map of the attributes an action's rules read, converted
/// from JSON once per request.
#[derive(Debug, Clone, Default)]
pub struct Input {
    map: rhai::Map,
}

impl Input {
    /// An empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bind an attribute to a JSON value. The value must already be validated against the
    /// schema; this only rejects values beyond the sandbox's size limits.
    pub fn insert(
        &mut self,
        name: &str,
        value: &serde_json::Value,
        limits: &Limits,
    ) -> Result<(), String> {
        let value = from_json(value, limits)?;
        self.map.insert(name.into(), value);
        Ok(())
    }

    /// Bind an attribute to an integer (timestamps are bound as Unix seconds).
    pub(crate) fn insert_int(&mut self, name: &str, value: i64) {
        self.map.insert(name.into(), Dynamic::from_int(value));
    }

    /// Bind an attribute to a string.
    pub(crate) fn insert_str(&mut self, name: &str, value: &str) {
        self.map.insert(
            name.into(),
            Dynamic::from(rhai::ImmutableString::from(value)),
        );
    }

    /// Freeze the context for evaluation. Predicates cannot assign, so one scope serves
    /// every rule of a decision without a copy of the context per rule.
    pub fn seal(self) -> Bindings {
        let mut scope = rhai::Scope::new();
        scope.push_constant_dynamic("context", Dynamic::from_map(self.map));
        Bindings { scope }
    }
}

/// A sealed context, ready to evaluate any number of programs against.
#[derive(Debug, Clone)]
pub struct Bindings {
    pub(super) scope: rhai::Scope<'static>,
}

/// Convert JSON to a Rhai value, refusing anything beyond the sandbox's size limits. Numbers
/// that fit an `i64` become integers, every other number a float.
pub(super) fn from_json(value: &serde_json::Value, limits: &Limits) -> Result<Dynamic, String> {
    let mut budget = Budget {
        strings: limits.max_string_bytes,
        array: limits.max_array_len,
        map: limits.max_map_len,
    };
    convert(value, limits, &mut budget)
}

/// What is left of the size limits while converting one value; Rhai counts nested elements
/// and the bytes of nested strings against the outermost container.
struct Budget {
    strings: usize,
    array: usize,
    map: usize,
}

fn convert(
    value: &serde_json::Value,
    limits: &Limits,
    budget: &mut Budget,
) -> Result<Dynamic, String> {
    use serde_json::Value;
    Ok(match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => {
            budget.strings = budget.strings.checked_sub(s.len()).ok_or_else(|| {
                format!(
                    "string of {} bytes is over the limit of {}",
                    s.len(),
                    limits.max_string_bytes
                )
            })?;
            Dynamic::from(rhai::ImmutableString::from(s.as_str()))
        }
        Value::Array(items) => {
            budget.array = budget.array.checked_sub(items.len()).ok_or_else(|| {
                format!(
                    "list of {} items is over the limit of {}",
                    items.len(),
                    limits.max_array_len
                )
            })?;
            let mut out = rhai::Array::with_capacity(items.len());
            for item in items {
                out.push(convert(item, limits, budget)?);
            }
            Dynamic::from_array(out)
        }
        Value::Object(fields) => {
            budget.map = budget.map.checked_sub(fields.len()).ok_or_else(|| {
                format!(
                    "object of {} fields is over the limit of {}",
                    fields.len(),
                    limits.max_map_len
                )
            })?;
            let mut out = rhai::Map::new();
            for (k, v) in fields {
                out.insert(k.as_str().into(), convert(v, limits, budget)?);
            }
            Dynamic::from_map(out)
        }
    })
}

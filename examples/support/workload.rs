//! The context the evaluation bench and `examples/evaluations.rs` decide: shared by path, as
//! benches and examples are crates of their own.

use serde_json::{Map, Value};
use spectral::worlds::WorldModel;

/// A realistic context for an action: the first not-matching case of every rule (or its first
/// case), merged, so that every rule can read what it needs.
pub fn typical_context(model: &WorldModel, action: &str) -> Value {
    let mut merged = Map::new();
    if let Some(action) = model.action(action) {
        for rule in &action.rules {
            if let Some(case) = rule
                .cases
                .iter()
                .find(|c| !c.matches)
                .or(rule.cases.first())
            {
                for (k, v) in &case.context {
                    merged.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
    }
    Value::Object(merged)
}

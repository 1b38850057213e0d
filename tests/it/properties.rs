//! Property tests: evaluation of every example action never panics and always answers with
//! one of the four statuses, whatever JSON the caller sends.

use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::{Map, Value};
use spectral::sandbox::Sandbox;
use spectral::worlds::model::{AttrType, Attribute};
use spectral::worlds::{load, CompiledWorld, ContextJson, Request, Status};

use crate::support::{example_worlds, system, verdict};

fn fixtures() -> &'static (Sandbox, Vec<CompiledWorld>) {
    static FIXTURES: OnceLock<(Sandbox, Vec<CompiledWorld>)> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let sandbox = crate::support::sandbox();
        let worlds = example_worlds()
            .iter()
            .map(|d| load::load(d, &sandbox).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        (sandbox, worlds)
    })
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        "20[0-9]{2}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-5][0-9]Z".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value that is often valid for the attribute, so that evaluation gets past validation.
fn plausible(attr: &Attribute, pick: u64, noise: Value) -> Value {
    let n = (pick % 2_000_000) as f64 - 1000.0;
    match (attr.ty, pick % 5) {
        (_, 0) => noise,
        (AttrType::Number, _) => Value::from(n / 3.0),
        (AttrType::Integer, _) => Value::from(n as i64),
        (AttrType::Bool, _) => Value::Bool(pick % 2 == 0),
        (AttrType::Enum, _) => attr
            .values
            .get(pick as usize % attr.values.len().max(1))
            .map_or(Value::Null, |v| Value::String(v.clone())),
        (AttrType::String, _) => Value::String(format!("s{}", pick % 7)),
        (AttrType::Timestamp, _) => Value::String(format!(
            "2026-{:02}-{:02}T{:02}:00:00Z",
            pick % 12 + 1,
            pick % 28 + 1,
            pick % 24
        )),
        (AttrType::List, _) => Value::Array(vec![Value::String(format!("s{}", pick % 3))]),
        (AttrType::Object, _) => {
            let mut m = Map::new();
            for (name, field) in &attr.fields {
                m.insert(name.clone(), plausible(field, pick / 7, Value::Null));
            }
            Value::Object(m)
        }
    }
}

fn check_every_action(context_for: impl Fn(&[(String, Attribute)]) -> Value) {
    let (sandbox, worlds) = fixtures();
    for world in worlds {
        for module in &world.modules {
            let context = context_for(&module.attrs);
            let text = context.to_string();
            for ctx in [ContextJson::Value(&context), ContextJson::Text(&text)] {
                let request = Request {
                    context: ctx,
                    system: system(),
                    correlation_id: None,
                    explain: true,
                };
                match spectral::worlds::evaluate(sandbox, module, &request) {
                    Ok(d) => {
                        assert!(Status::ALL.contains(&d.status));
                        if !d.decision_metadata.errors.is_empty() {
                            assert!(d.status >= Status::Yellow);
                        }
                        // Running the rules as one batch answers exactly as one by one.
                        let fast = Request {
                            explain: false,
                            ..request.clone()
                        };
                        let fast = spectral::worlds::evaluate(sandbox, module, &fast);
                        assert_eq!(fast.as_ref().map(verdict).ok(), Some(verdict(&d)));
                    }
                    // Only a context that is not an object is refused.
                    Err(_) => assert!(!context.is_object(), "{context}"),
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_json_never_panics(context in any_json()) {
        check_every_action(|_| context.clone());
    }

    #[test]
    fn plausible_contexts_never_panic(picks in prop::collection::vec(any::<u64>(), 32), noise in any_json()) {
        check_every_action(|attrs| {
            let mut m = Map::new();
            for (i, (name, attr)) in attrs.iter().enumerate() {
                let pick = picks[i % picks.len()];
                if pick % 11 != 0 {
                    m.insert(name.clone(), plausible(attr, pick, noise.clone()));
                }
            }
            Value::Object(m)
        });
    }
}

//! The peers' workload, shared by `benches/evaluate.rs` and `bench/peers`: one rule over a
//! 100-byte context, as `research/peers.md` §7 measured the peers on, and Spectral's rows of it.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::measurement::WallTime;
use criterion::BenchmarkGroup;
use serde_json::Map;
use spectral::sandbox::Sandbox;
use spectral::worlds::context::{self, SystemValues};
use spectral::worlds::model::{
    Action, AttrType, Attribute, Case, Rule, Severity, Status, WorldModel,
};
use spectral::worlds::{compile, evaluate, ContextJson, Request};

/// The workload the peers are measured on, here and in `research/peers.md` §7.
pub const PEERS_CONTEXT: &str = r#"{"user":{"id":"u1","tier":"gold","country":"US"},"amount":250,"action":"purchase","tags":["a","b"]}"#;
pub const PEERS_PREDICATE: &str =
    r#"context.amount < 1000 && context.user.country == "US" && context.user.tier == "gold""#;

pub fn peers_world() -> WorldModel {
    let mut user = Attribute::of(AttrType::Object);
    for field in ["id", "tier", "country"] {
        user.fields
            .insert(field.into(), Attribute::of(AttrType::String));
    }
    let context: BTreeMap<String, Attribute> = [
        ("amount".to_string(), Attribute::of(AttrType::Number)),
        ("user".to_string(), user),
    ]
    .into_iter()
    .collect();
    WorldModel {
        record_context: Default::default(),
        world: "peers".into(),
        description: String::new(),
        context,
        config: BTreeMap::new(),
        actions: vec![Action {
            name: "purchase".into(),
            description: String::new(),
            aggregation: Default::default(),
            work_frames: BTreeMap::new(),
            rules: vec![Rule {
                id: "gold-us-small".into(),
                text: "Small purchases by gold users in the US.".into(),
                severity: Severity::T2,
                outcome: Status::Green,
                inputs: vec!["amount".into(), "user".into()],
                applies_when: None,
                predicate: PEERS_PREDICATE.into(),
                work_frame: None,
                provenance: None,
                cases: vec![Case {
                    name: String::new(),
                    context: Map::new(),
                    matches: true,
                }],
            }],
        }],
    }
}

pub fn system() -> SystemValues {
    SystemValues {
        request_time: 1_772_465_400,
        request_id: "00000000-0000-7000-8000-000000000001".into(),
        caller: "bench".into(),
    }
}

/// Spectral's rows of the peers' workload: evaluation of the compiled module from the JSON
/// text, and the context conversion alone.
pub fn spectral_rows(group: &mut BenchmarkGroup<'_, WallTime>, sandbox: &Sandbox) {
    let peers = match compile(&peers_world(), 1, sandbox) {
        Ok(w) => w,
        Err(p) => panic!("{p:?}"),
    };
    let module = &peers.modules[0];
    group.bench_function("evaluate_json_text", |b| {
        b.iter(|| {
            let request = Request {
                context: ContextJson::Text(black_box(PEERS_CONTEXT)),
                system: system(),
                correlation_id: None,
                explain: false,
            };
            black_box(evaluate(sandbox, module, &request))
        })
    });
    group.bench_function("context_conversion_only", |b| {
        b.iter(|| {
            black_box(context::bind_str(
                &module.attrs,
                black_box(PEERS_CONTEXT),
                Some(&system()),
                sandbox.limits(),
            ))
        })
    });
}

//! Criterion benches of the decide hot path without HTTP: evaluation of a cached module with a
//! fresh scope, JSON parsing and context conversion included, and context conversion alone.
//! The peers' workload through `regorus` and `cedar-policy` beside ours is `bench/peers`, a
//! package of its own (see its manifest for why).
//!
//! Run: `cargo bench --bench evaluate`. Figures are recorded in `bench/RESULTS.md`.

#![expect(
    clippy::panic,
    reason = "a benchmark that cannot set up has nothing to measure: failing loudly is right here"
)]

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use spectral::sandbox::Sandbox;
use spectral::worlds::context;
use spectral::worlds::{evaluate, load, ContextJson, Request};

#[path = "support/peers.rs"]
mod peers;
use peers::system;

#[path = "../examples/support/workload.rs"]
mod workload;
use workload::typical_context;

fn benches(c: &mut Criterion) {
    let sandbox = Sandbox::default();

    let mut group = c.benchmark_group("peers_workload");
    peers::spectral_rows(&mut group, &sandbox);
    group.finish();

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("predicates");
    let mut worlds: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    worlds.sort();
    let mut group = c.benchmark_group("example_worlds");
    for path in worlds.iter().filter(|p| p.join("world.toml").is_file()) {
        let world = match load::load(path, &sandbox) {
            Ok(w) => w,
            Err(e) => panic!("{e}"),
        };
        // The action with the most rules is the world's typical heavy action.
        let Some(module) = world.modules.iter().max_by_key(|m| m.rules.len()) else {
            continue;
        };
        let text = typical_context(&world.model, &module.manifest.action).to_string();
        let name = format!(
            "{}/{} ({} rules)",
            world.model.world,
            module.manifest.action,
            module.rules.len()
        );
        group.bench_function(format!("evaluate {name}"), |b| {
            b.iter(|| {
                let request = Request {
                    context: ContextJson::Text(black_box(&text)),
                    system: system(),
                    correlation_id: None,
                    explain: false,
                };
                black_box(evaluate(&sandbox, module, &request))
            })
        });
        group.bench_function(format!("convert {name}"), |b| {
            b.iter(|| {
                black_box(context::bind_str(
                    &module.attrs,
                    black_box(&text),
                    Some(&system()),
                    sandbox.limits(),
                ))
            })
        });
    }
    group.finish();
}

criterion_group!(evaluation, benches);
criterion_main!(evaluation);

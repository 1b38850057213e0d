//! Evaluate the largest action of one example world `n` times, as the decide path does
//! (context text parsed, validated and bound, every rule evaluated, the decision assembled),
//! for instruction counts that do not depend on the machine's load:
//!
//! ```sh
//! cargo build --release --example evaluations
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/evaluations acme-payments 2000
//! ```
//!
//! Run it with `n` = 0 as well and subtract: the difference over `n` is the instructions of
//! one decision, set-up excluded. `bench/evaluations.sh` does both for every example world.

use std::hint::black_box;
use std::path::PathBuf;
use std::process::ExitCode;

use spectral::sandbox::Sandbox;
use spectral::worlds::context::SystemValues;
use spectral::worlds::{evaluate, load, ContextJson, Request};

#[path = "support/workload.rs"]
mod workload;
use workload::typical_context;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(world), Some(Ok(n))) = (args.get(1), args.get(2).map(|n| n.parse::<u64>())) else {
        eprintln!("usage: evaluations <example world> <evaluations>");
        return ExitCode::from(2);
    };
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("predicates")
        .join(world);
    let sandbox = Sandbox::default();
    let compiled = match load::load(&dir, &sandbox) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(module) = compiled.modules.iter().max_by_key(|m| m.rules.len()) else {
        eprintln!("{world} has no action");
        return ExitCode::FAILURE;
    };
    let text = typical_context(&compiled.model, &module.manifest.action).to_string();
    let system = SystemValues {
        request_time: 1_772_465_400,
        request_id: "00000000-0000-7000-8000-000000000001".into(),
        caller: "bench".into(),
    };
    let mut statuses = 0usize;
    for _ in 0..n {
        let request = Request {
            context: ContextJson::Text(black_box(&text)),
            system: system.clone(),
            correlation_id: None,
            explain: false,
        };
        if let Ok(d) = black_box(evaluate(&sandbox, module, &request)) {
            statuses += d.decision_metadata.matched_rules.len();
        }
    }
    println!(
        "{world}: {} ({} rules), {n} evaluations, {statuses} matched rules",
        module.manifest.action,
        module.rules.len()
    );
    ExitCode::SUCCESS
}

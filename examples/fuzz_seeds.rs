//! Writes the seed corpora of the fuzz targets (`fuzz/seeds/<target>/`) from the example
//! worlds in `predicates/` and the attacks of the hostile suite (`tests/it/hostile.rs`).
//!
//! Usage: `cargo run --example fuzz_seeds [-- OUT_DIR]` (default `fuzz/seeds`). Each target's
//! folder is emptied and written anew; the files are small and few, and their names say
//! where they came from.

#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a tool run by hand: a tree it cannot read is a plain crash"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use spectral::worlds::load::load_model;
use spectral::worlds::model::{
    Action, AttrType, Attribute, Case, Rule, Severity, Status, WorldModel,
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// At most this many decide bodies per action, taken from its rules' cases.
const BODIES_PER_ACTION: usize = 4;
/// At most this many example predicates per world.
const PREDICATES_PER_WORLD: usize = 12;

fn main() {
    let out = std::env::args()
        .nth(1)
        .map_or_else(|| Path::new(ROOT).join("fuzz/seeds"), PathBuf::from);
    let mut seeds = Seeds::default();
    let attacks = attacks();
    for dir in example_worlds() {
        let model = load_model(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let w = model.world.clone();
        seeds.add("draft_world", &format!("{w}.json"), pretty(&model));
        seeds.add("world_toml", &format!("{w}.txt"), folder_text(&dir, &[]));
        decide_bodies(&model, &mut seeds);
        let mut files = rhai_files(&dir);
        files.truncate(PREDICATES_PER_WORLD);
        for file in &files {
            let name = file
                .strip_prefix(&dir)
                .unwrap()
                .to_string_lossy()
                .replace('/', "_");
            seeds.add(
                "predicate",
                &format!("{w}_{name}"),
                std::fs::read(file).unwrap(),
            );
        }
        // The first predicate file replaced by an attack: the loader's view of a hostile rule.
        if let (Some(first), Some(attack)) = (files.first(), attacks.first()) {
            let rel = first.strip_prefix(&dir).unwrap().to_path_buf();
            seeds.add(
                "world_toml",
                &format!("{w}-hostile.txt"),
                folder_text(&dir, &[(rel, attack.as_str())]),
            );
        }
    }
    for (i, attack) in attacks.iter().enumerate() {
        seeds.add(
            "predicate",
            &format!("hostile-{i:02}.rhai"),
            attack.clone().into_bytes(),
        );
        if i % 3 == 0 {
            seeds.add(
                "draft_world",
                &format!("hostile-{i:02}.json"),
                pretty(&one_rule_world(attack)),
            );
        }
    }
    hostile_bodies(&mut seeds);
    hostile_folders(&mut seeds);
    seeds.write(&out);
}

/// Seed files by target, by name.
#[derive(Default)]
struct Seeds(BTreeMap<&'static str, BTreeMap<String, Vec<u8>>>);

impl Seeds {
    fn add(&mut self, target: &'static str, name: &str, bytes: Vec<u8>) {
        self.0
            .entry(target)
            .or_default()
            .insert(name.to_string(), bytes);
    }

    fn write(&self, out: &Path) {
        let mut total = 0;
        for (target, files) in &self.0 {
            let dir = out.join(target);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in files {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
            println!("{target}: {} seeds", files.len());
            total += files.len();
        }
        println!("{total} seeds under {}", out.display());
    }
}

fn pretty<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap();
    bytes.push(b'\n');
    bytes
}

fn example_worlds() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(Path::new(ROOT).join("predicates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("world.toml").is_file())
        .collect();
    dirs.sort();
    dirs
}

/// Every `.rhai` file under `dir`, sorted.
fn rhai_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rhai") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// A world folder as the `world_toml` target reads it: `world.toml`, then each predicate
/// file after a line `--- <relative path>`; `replace` swaps some files' text.
fn folder_text(dir: &Path, replace: &[(PathBuf, &str)]) -> Vec<u8> {
    let mut text = std::fs::read_to_string(dir.join("world.toml")).unwrap();
    for file in rhai_files(dir) {
        let rel = file.strip_prefix(dir).unwrap().to_path_buf();
        let body = match replace.iter().find(|(p, _)| *p == rel) {
            Some((_, b)) => (*b).to_string(),
            None => std::fs::read_to_string(&file).unwrap(),
        };
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("--- {}\n{body}", rel.display()));
    }
    text.into_bytes()
}

/// Decide bodies from the cases of each action's rules, with and without the trace.
fn decide_bodies(model: &WorldModel, seeds: &mut Seeds) {
    for action in &model.actions {
        let contexts = action
            .rules
            .iter()
            .flat_map(|r| &r.cases)
            .map(|c| &c.context);
        for (i, context) in contexts.take(BODIES_PER_ACTION).enumerate() {
            let body = json!({
                "world": model.world,
                "action": action.name,
                "context": context,
                "explain": i % 2 == 1,
                "correlation_id": format!("seed-{i}"),
            });
            seeds.add(
                "decide_body",
                &format!("{}_{}_{i}.json", model.world, action.name),
                pretty(&body),
            );
        }
    }
}

/// The malformed and hostile bodies of the API tests: repeated keys, forged system
/// attributes, deep nesting, the wrong shapes.
fn hostile_bodies(seeds: &mut Seeds) {
    let bodies: &[(&str, String)] = &[
        (
            "duplicate-top",
            r#"{"action":"vendor.onboard","action":"wire_transfer.release","context":{}}"#.into(),
        ),
        (
            "duplicate-context",
            r#"{"action":"wire_transfer.release","context":{"amount":1,"amount":1e9}}"#.into(),
        ),
        (
            "duplicate-escaped",
            r#"{"action":"wire_transfer.release","context":{"amount":1,"\u0061mount":2}}"#.into(),
        ),
        (
            "forged-system",
            r#"{"action":"wire_transfer.release","context":{"request_time":0,"request_id":"x","caller":"op","amount":5}}"#.into(),
        ),
        ("array-body", r#"["wire_transfer.release",{}]"#.into()),
        (
            "context-not-object",
            r#"{"action":"wire_transfer.release","context":[1,2,3]}"#.into(),
        ),
        (
            "version-float",
            r#"{"action":"wire_transfer.release","context":{},"world_model_version":1.0}"#.into(),
        ),
        (
            "deep",
            format!(
                r#"{{"action":"wire_transfer.release","context":{{"amount":{}1{}}}}}"#,
                "[".repeat(2_000),
                "]".repeat(2_000)
            ),
        ),
        (
            "unknown-field",
            r#"{"action":"wire_transfer.release","context":{},"admin":true}"#.into(),
        ),
        (
            "huge-numbers",
            r#"{"action":"wire_transfer.release","context":{"amount":1e308,"bank_account_changed_days":18446744073709551616}}"#.into(),
        ),
    ];
    for (name, body) in bodies {
        seeds.add(
            "decide_body",
            &format!("hostile-{name}.json"),
            body.clone().into_bytes(),
        );
    }
}

/// World folders the loader must refuse: paths out of the folder, broken TOML.
fn hostile_folders(seeds: &mut Seeds) {
    let manifest = |predicate: &str| {
        format!(
            "world = \"probe\"\n\n[context.n]\ntype = \"integer\"\n\n[[actions]]\nname = \"probe.run\"\n\n\
             [[actions.rules]]\nid = \"probe\"\ntext = \"an attack\"\nseverity = \"T2\"\noutcome = \"GREEN\"\n\
             inputs = [\"n\"]\npredicate = \"{predicate}\"\n\n[[actions.rules.cases]]\nmatches = true\n\
             context = {{ n = 5 }}\n"
        )
    };
    let folders = [
        (
            "parent",
            format!("{}--- p.rhai\ncontext.n == 5\n", manifest("../p.rhai")),
        ),
        (
            "absolute",
            format!("{}--- p.rhai\ncontext.n == 5\n", manifest("/etc/passwd")),
        ),
        ("missing", manifest("absent.rhai")),
        (
            "ok",
            format!("{}--- p.rhai\ncontext.n == 5\n", manifest("p.rhai")),
        ),
        ("not-toml", "world = [\n--- p.rhai\ntrue\n".to_string()),
    ];
    for (name, text) in folders {
        seeds.add(
            "world_toml",
            &format!("hostile-{name}.txt"),
            text.into_bytes(),
        );
    }
}

/// The hostile suite's world: one attribute of each shape, one rule with the attack.
fn one_rule_world(predicate: &str) -> WorldModel {
    let mut context = BTreeMap::new();
    context.insert("n".into(), Attribute::of(AttrType::Integer));
    context.insert("s".into(), Attribute::of(AttrType::String));
    context.insert("list".into(), Attribute::of(AttrType::List));
    context.insert("m".into(), Attribute::of(AttrType::Object));
    let inputs = ["n", "s", "list", "m"]
        .iter()
        .filter(|a| predicate.contains(&format!("context.{a}")))
        .map(|a| (*a).to_string())
        .collect();
    WorldModel {
        record_context: Default::default(),
        world: "hostile".into(),
        description: String::new(),
        context,
        config: [("limit".to_string(), json!(10))].into_iter().collect(),
        actions: vec![Action {
            name: "probe.run".into(),
            description: String::new(),
            aggregation: Default::default(),
            work_frames: BTreeMap::new(),
            rules: vec![Rule {
                id: "probe".into(),
                text: "an attack".into(),
                severity: Severity::T2,
                outcome: Status::Green,
                inputs,
                applies_when: None,
                predicate: predicate.into(),
                work_frame: None,
                provenance: None,
                cases: vec![Case {
                    name: String::new(),
                    context: serde_json::Map::from_iter([("n".to_string(), Value::from(5))]),
                    matches: true,
                }],
            }],
        }],
    }
}

/// The attacks of the hostile suite: each predicate literal passed to its checks, read from
/// the suite's source, and the generated ones at a size a seed may have.
fn attacks() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("tests/it/hostile.rs")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut in_list = false;
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        if t.starts_with("for predicate in [") {
            in_list = true;
            continue;
        }
        if in_list && t.starts_with(']') {
            in_list = false;
            continue;
        }
        let after_sandbox = i > 0 && {
            let prev = lines[i - 1].trim();
            prev.ends_with("sandbox(),") || prev == "&sandbox,"
        };
        if in_list || after_sandbox {
            if let Some(s) = literal(t.trim_end_matches(',')) {
                out.push(s);
            }
        }
    }
    out.push(format!("{}true{}", "(".repeat(200), ")".repeat(200)));
    out.push(format!("context.n{} > 0", " + 1".repeat(100)));
    out.push(format!("[{}].len() > 0", ["1"; 300].join(",")));
    out.push(["context.n * 2 > 0"; 40].join(" && "));
    out.push(["(\"a\"+context.s).pad(9999,\"a\")==\"\""; 8].join(" || "));
    out.dedup();
    out
}

/// The value of a Rust string literal (`"…"` with simple escapes, or `r#"…"#`), if `t` is one.
fn literal(t: &str) -> Option<String> {
    if let Some(raw) = t.strip_prefix("r#\"").and_then(|r| r.strip_suffix("\"#")) {
        return Some(raw.to_string());
    }
    let inner = t.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                c @ ('"' | '\\') => out.push(c),
                _ => return None,
            },
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

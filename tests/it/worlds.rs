//! World models through the library: the example worlds, module hashing, and the evaluator's
//! semantics (severity order, the T1 floor, fail-closed errors, missing evidence).

use std::collections::BTreeMap;

use serde_json::json;
use spectral::worlds::cases::run_cases;
use spectral::worlds::load;
use spectral::worlds::model::{Severity, Status, WorkFrame, WorkFramePatch};
use spectral::worlds::module::{Module, ModuleLoadError, ModuleSource};

use crate::support::{
    compile, decide, decide_with, example_worlds, one_rule_world, predicates_dir, verdict,
};

#[test]
fn every_example_world_loads_and_passes_its_cases() {
    let sandbox = crate::support::sandbox();
    for dir in example_worlds() {
        let world = load::load(&dir, &sandbox).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let results = run_cases(&world, &sandbox);
        let failed: Vec<_> = results.iter().filter(|r| !r.passed).collect();
        assert!(failed.is_empty(), "{failed:#?}");
        let rules: usize = world.model.actions.iter().map(|a| a.rules.len()).sum();
        assert!(world.model.actions.len() >= 2, "{}", dir.display());
        assert!(rules >= 8, "{}: {rules} rules", dir.display());
        assert!(results.len() >= rules);
    }
}

#[test]
fn every_example_world_covers_every_severity_and_outcome() {
    let sandbox = crate::support::sandbox();
    for dir in example_worlds() {
        let world = load::load(&dir, &sandbox).unwrap_or_else(|e| panic!("{e}"));
        let rules: Vec<_> = world.model.actions.iter().flat_map(|a| &a.rules).collect();
        for severity in [Severity::T1, Severity::T2, Severity::T3] {
            assert!(
                rules.iter().any(|r| r.severity == severity),
                "{} lacks {severity:?}",
                dir.display()
            );
        }
        for outcome in Status::ALL {
            assert!(
                rules.iter().any(|r| r.outcome == outcome),
                "{} lacks {outcome}",
                dir.display()
            );
        }
        assert!(
            rules.iter().any(|r| r.applies_when.is_some()),
            "{}",
            dir.display()
        );
        assert!(rules.iter().all(|r| !r.cases.is_empty()));
        assert!(!world.model.config.is_empty());
        assert!(
            world
                .model
                .context
                .values()
                .any(|a| a.ty == spectral::worlds::model::AttrType::Timestamp),
            "{} has no timestamp attribute",
            dir.display()
        );
    }
}

fn payments_source() -> ModuleSource {
    let sandbox = crate::support::sandbox();
    let world = load::load(&predicates_dir().join("acme-payments"), &sandbox)
        .unwrap_or_else(|e| panic!("{e}"));
    ModuleSource::of(&world.model, 0).unwrap_or_else(|| panic!("no action"))
}

#[test]
fn every_example_action_runs_as_one_batch() {
    let sandbox = crate::support::sandbox();
    for dir in example_worlds() {
        let world = load::load(&dir, &sandbox).unwrap_or_else(|e| panic!("{e}"));
        for m in &world.modules {
            assert!(m.has_batch(), "{} {}", dir.display(), m.manifest.action);
        }
    }
}

#[test]
fn batch_and_rule_by_rule_agree_on_every_case_context() {
    // Each rule's case contexts, merged with the first case of every other rule, exercise
    // matches, misses and guards of the whole action.
    let sandbox = crate::support::sandbox();
    for dir in example_worlds() {
        let world = load::load(&dir, &sandbox).unwrap_or_else(|e| panic!("{e}"));
        for action in &world.model.actions {
            let mut base = serde_json::Map::new();
            for rule in &action.rules {
                for (k, v) in &rule.cases[0].context {
                    base.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            for rule in &action.rules {
                for case in &rule.cases {
                    let mut ctx = base.clone();
                    ctx.extend(case.context.clone());
                    let ctx = serde_json::Value::Object(ctx);
                    let slow = decide_with(&world, &sandbox, &action.name, &ctx, true);
                    let fast = decide_with(&world, &sandbox, &action.name, &ctx, false);
                    assert_eq!(verdict(&fast), verdict(&slow), "{} {ctx}", action.name);
                }
            }
        }
    }
}

#[test]
fn the_same_content_gives_the_same_hash() {
    let a = payments_source();
    let b = payments_source();
    assert_eq!(a.hash().unwrap(), b.hash().unwrap());
    assert_eq!(a.canonical_json().unwrap(), b.canonical_json().unwrap());
    // Round-tripping through the stored form keeps the hash.
    let back: ModuleSource =
        serde_json::from_slice(&a.canonical_json().unwrap()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back.hash().unwrap(), a.hash().unwrap());
}

/// The work frames of a module are a struct with a field per status, and their canonical form
/// is still the object keyed by status that stored modules were hashed over.
#[test]
fn work_frames_keep_the_canonical_form_of_a_map_by_status() {
    let source = payments_source();
    let by_status: BTreeMap<Status, WorkFrame> = Status::ALL
        .into_iter()
        .map(|s| (s, source.work_frames.of(s).clone()))
        .collect();
    assert_eq!(
        serde_json::to_string(&source.work_frames).unwrap(),
        serde_json::to_string(&by_status).unwrap()
    );
    let text = serde_json::to_string(&by_status).unwrap();
    let back: spectral::worlds::model::WorkFrames = serde_json::from_str(&text).unwrap();
    assert_eq!(back, source.work_frames);
}

#[test]
fn any_change_gives_a_different_hash() {
    let base = payments_source();
    let mut changes: Vec<ModuleSource> = Vec::new();
    let mut c = base.clone();
    c.rules[0].predicate.push(' ');
    changes.push(c);
    let mut c = base.clone();
    c.rules[1].outcome = Status::Yellow;
    changes.push(c);
    let mut c = base.clone();
    c.world = "other-world".into();
    changes.push(c);
    let mut c = base.clone();
    if let Some(v) = c.config.values_mut().next() {
        *v = json!(1);
    }
    changes.push(c);
    let mut c = base.clone();
    c.rules[2].work_frame = Some(WorkFramePatch {
        next_human_owner: Some("someone".into()),
        ..Default::default()
    });
    changes.push(c);
    let mut c = base.clone();
    c.rules.swap(0, 1);
    changes.push(c);
    let mut hashes: Vec<String> = changes.iter().map(|c| c.hash().unwrap()).collect();
    hashes.push(base.hash().unwrap());
    let n = hashes.len();
    hashes.sort();
    hashes.dedup();
    assert_eq!(hashes.len(), n, "two different contents share a hash");
}

#[test]
fn a_stored_module_is_verified_before_it_is_compiled() {
    let sandbox = crate::support::sandbox();
    let source = payments_source();
    let bytes = source.canonical_json().unwrap();
    let hash = source.hash().unwrap();
    let module = Module::load(&bytes, &hash, 7, &sandbox).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(module.hash(), hash);
    assert_eq!(module.canonical_json(), bytes);
    assert_eq!(module.manifest.version, 7);
    let mut tampered = bytes.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 1;
    assert!(matches!(
        Module::load(&tampered, &hash, 7, &sandbox),
        Err(ModuleLoadError::HashMismatch { .. })
    ));
}

fn multi_rule_world() -> spectral::worlds::WorldModel {
    // n selects which rules match: every rule reads n.
    let mut model = one_rule_world("context.n == 1", &["n"]);
    let action = &mut model.actions[0];
    let template = action.rules[0].clone();
    let mk = |id: &str, severity, outcome, predicate: &str| {
        let mut r = template.clone();
        r.id = id.into();
        r.severity = severity;
        r.outcome = outcome;
        r.predicate = predicate.into();
        r
    };
    action.rules = vec![
        mk("t3-red", Severity::T3, Status::Red, "context.n >= 10"),
        mk("t2-yellow", Severity::T2, Status::Yellow, "context.n >= 20"),
        mk(
            "t1-skip",
            Severity::T1,
            Status::GreenSkip,
            "context.n >= 30",
        ),
        mk("t2-red", Severity::T2, Status::Red, "context.n >= 40"),
        mk("t3-green", Severity::T3, Status::Green, "context.n == 5"),
        mk(
            "t3-boom",
            Severity::T3,
            Status::Green,
            "context.n == 7 && context.n / 0 == 1",
        ),
    ];
    model
}

#[test]
fn the_most_severe_matched_rule_wins_ties_by_outcome() {
    let sandbox = crate::support::sandbox();
    let world = compile(&multi_rule_world(), &sandbox);
    let status = |n: i64| decide(&world, &sandbox, "probe.run", &json!({"n": n})).status;
    assert_eq!(status(0), Status::Green, "no match is GREEN");
    assert_eq!(status(5), Status::Green);
    assert_eq!(status(10), Status::Red, "T3 RED alone");
    assert_eq!(status(20), Status::Yellow, "T2 YELLOW beats T3 RED");
    // T1 GREEN-SKIP is a floor: T2 and T3 REDs beneath it do not override it.
    assert_eq!(status(30), Status::GreenSkip);
    assert_eq!(status(40), Status::GreenSkip);
}

#[test]
fn matched_rules_come_in_evaluation_order() {
    let sandbox = crate::support::sandbox();
    let world = compile(&multi_rule_world(), &sandbox);
    let d = decide(&world, &sandbox, "probe.run", &json!({"n": 40}));
    let ids: Vec<_> = d
        .decision_metadata
        .matched_rules
        .iter()
        .map(|m| m.id.as_str())
        .collect();
    assert_eq!(ids, ["t1-skip", "t2-yellow", "t2-red", "t3-red"]);
    let trace = d.decision_metadata.trace.unwrap_or_default();
    assert_eq!(trace.len(), 6);
    assert_eq!(trace[0].rule, "t1-skip");
}

#[test]
fn an_erroring_rule_fails_closed_and_is_never_green() {
    let sandbox = crate::support::sandbox();
    let world = compile(&multi_rule_world(), &sandbox);
    let d = decide(&world, &sandbox, "probe.run", &json!({"n": 7}));
    assert_eq!(d.status, Status::Yellow);
    assert_eq!(d.decision_metadata.matched_rules.len(), 1);
    assert_eq!(d.decision_metadata.matched_rules[0].id, "t3-boom");
    assert_eq!(d.decision_metadata.matched_rules[0].outcome, Status::Yellow);
    assert_eq!(d.decision_metadata.errors[0].kind, "arithmetic");
    assert_eq!(d.work_frame.next_action, "request_review");
}

#[test]
fn missing_or_invalid_evidence_asks_for_it() {
    let sandbox = crate::support::sandbox();
    let world = compile(&multi_rule_world(), &sandbox);
    for context in [
        json!({}),
        json!({"n": "five"}),
        json!({"n": 1.5}),
        json!({"n": null}),
    ] {
        let d = decide(&world, &sandbox, "probe.run", &context);
        assert_eq!(d.status, Status::Yellow, "{context}");
        assert_eq!(d.work_frame.next_action, "gather_evidence_and_retry");
        assert_eq!(d.work_frame.missing_evidence, vec!["n".to_string()]);
        assert!(d.decision_metadata.matched_rules.is_empty());
        assert_eq!(d.decision_metadata.errors[0].kind, "missing_evidence");
        assert_eq!(
            d.decision_metadata.errors[0].attribute.as_deref(),
            Some("n")
        );
    }
}

#[test]
fn identical_requests_get_identical_answers() {
    let sandbox = crate::support::sandbox();
    let world = load::load(&predicates_dir().join("acme-payments"), &sandbox)
        .unwrap_or_else(|e| panic!("{e}"));
    let ctx = json!({"amount": 60000, "currency": "USD", "payment_method": "wire",
        "vendor_id": "v-1", "vendor_status": "active", "vendor_country": "RU",
        "bank_account_changed_days": 2, "approvals": ["u-1"], "initiator": "u-2",
        "sanctions_hit": false});
    let mut a = decide(&world, &sandbox, "wire_transfer.release", &ctx);
    let mut b = decide(&world, &sandbox, "wire_transfer.release", &ctx);
    for d in [&mut a, &mut b] {
        d.decision_metadata.eval_us = 0;
        for t in d.decision_metadata.trace.iter_mut().flatten() {
            t.us = 0;
        }
    }
    assert_eq!(a, b);
    assert_eq!(a.status, Status::Yellow);
    // The dual-control rule's own work frame overrides the action's YELLOW frame.
    assert_eq!(a.decision_metadata.matched_rules[0].id, "dual-control");
    assert_eq!(a.work_frame.next_action, "collect_second_approval");
    assert_eq!(
        a.work_frame.required_output,
        vec!["approver_id".to_string()]
    );
    assert_eq!(
        a.work_frame.next_human_owner.as_deref(),
        Some("treasury-ops")
    );
}

#[test]
fn system_attributes_come_from_the_service_not_the_caller() {
    let sandbox = crate::support::sandbox();
    let world = load::load(&predicates_dir().join("acme-payments"), &sandbox)
        .unwrap_or_else(|e| panic!("{e}"));
    // support::system() binds 2026-03-02T15:30:00Z, 10:30 in New York on a Monday: inside
    // business hours. The forged time (a Saturday) must be ignored.
    let ctx = json!({"amount": 20000, "currency": "USD", "payment_method": "wire",
        "vendor_id": "v-1", "vendor_status": "active", "vendor_country": "DE",
        "bank_account_changed_days": 90, "approvals": ["u-1", "u-3"], "initiator": "u-2",
        "sanctions_hit": false, "request_time": "2026-03-07T17:00:00Z"});
    let d = decide(&world, &sandbox, "wire_transfer.release", &ctx);
    assert_eq!(d.status, Status::Green, "{:?}", d.decision_metadata);
}

/// A predicate that is a symbolic link out of the world folder is refused, not followed; a
/// link that stays inside the folder is read.
#[test]
fn a_symlink_out_of_the_world_folder_is_refused() {
    let outside = tempfile::tempdir().expect("tempdir");
    let secret = outside.path().join("secret.rhai");
    std::fs::write(&secret, "context.sanctions_hit").expect("write");
    let world = tempfile::tempdir().expect("tempdir");
    let dir = world.path().join("fail-closed");
    let fixture =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fail-closed");
    std::fs::create_dir_all(dir.join("pay")).expect("mkdir");
    std::fs::copy(fixture.join("world.toml"), dir.join("world.toml")).expect("copy");
    for entry in std::fs::read_dir(fixture.join("pay")).expect("read") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.join("pay").join(entry.file_name())).expect("copy");
    }
    assert!(load::load_model(&dir).is_ok(), "the copy loads");

    let link = dir.join("pay/open-block-comment.rhai");
    std::fs::remove_file(&link).expect("rm");
    std::os::unix::fs::symlink(&secret, &link).expect("symlink");
    let err = load::load_model(&dir)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("out of the world folder"), "{err}");

    // A link to a file inside the folder is fine.
    std::fs::remove_file(&link).expect("rm");
    std::fs::write(dir.join("pay/real.rhai"), "context.sanctions_hit").expect("write");
    std::os::unix::fs::symlink(dir.join("pay/real.rhai"), &link).expect("symlink");
    assert!(load::load_model(&dir).is_ok());
}

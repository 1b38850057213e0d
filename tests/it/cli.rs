//! The `spectral` binary run as a process.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::example_worlds;
use crate::support::process::command;

fn spectral(args: &[&str]) -> Output {
    // The deadline is tested in `hostile.rs`; `command` sets one that an unoptimized build
    // waiting for a core does not reach.
    command(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run spectral: {e}"))
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn there_are_at_least_three_example_worlds() {
    assert!(example_worlds().len() >= 3, "{:?}", example_worlds());
}

#[test]
fn world_check_passes_for_every_example_world() {
    for dir in example_worlds() {
        let out = spectral(&["world", "check", &dir.to_string_lossy()]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{}: {stdout}{stderr}", dir.display());
        assert!(stdout.contains(": ok ("), "{stdout}");
        assert!(stdout.contains("sha256:"), "{stdout}");
    }
}

#[test]
fn world_test_passes_for_every_example_world() {
    for dir in example_worlds() {
        let out = spectral(&["world", "test", &dir.to_string_lossy()]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{}: {stdout}{stderr}", dir.display());
        assert!(!stdout.contains("FAIL"), "{stdout}");
        assert!(stdout.contains(" 0 failed"), "{stdout}");
        assert!(stdout.lines().filter(|l| l.starts_with("PASS")).count() >= 16);
    }
}

/// Copy a world folder so a test can break it.
fn copy_world(from: &Path, to: &Path) {
    for entry in walk(from) {
        let rel = entry.strip_prefix(from).unwrap_or(&entry);
        let target = to.join(rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::copy(&entry, &target).unwrap_or_else(|e| panic!("{e}"));
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn payments() -> std::path::PathBuf {
    crate::support::predicates_dir().join("acme-payments")
}

#[test]
fn a_broken_predicate_names_the_rule_and_position() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    copy_world(&payments(), tmp.path());
    let file = tmp
        .path()
        .join("wire_transfer.release/recent-bank-change.rhai");
    std::fs::write(
        &file,
        "// reads an attribute it never declared\ncontext.bank_account_changed_days < 3\n    && context.amount > 1",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for command in ["check", "test"] {
        let out = spectral(&["world", command, &tmp.path().to_string_lossy()]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("action 'wire_transfer.release' rule 'recent-bank-change'"),
            "{stderr}"
        );
        assert!(stderr.contains("undeclared_input"), "{stderr}");
        assert!(stderr.contains("'context.amount'"), "{stderr}");
    }
}

#[test]
fn a_syntax_error_points_at_its_line_and_column_in_the_rhai_file() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    copy_world(&payments(), tmp.path());
    std::fs::write(
        tmp.path().join("vendor.onboard/high-risk-country.rhai"),
        "// comment\ncontext.vendor_country in config.high_risk_countries &&& true",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = spectral(&["world", "check", &tmp.path().to_string_lossy()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("vendor.onboard/high-risk-country.rhai:2:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("rule 'high-risk-country' predicate: syntax"),
        "{stderr}"
    );
}

#[test]
fn a_failing_case_is_reported_with_context_expected_and_actual() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    copy_world(&payments(), tmp.path());
    // Off by one: the rule now matches at exactly the cooldown, which its case says it must not.
    std::fs::write(
        tmp.path()
            .join("wire_transfer.release/recent-bank-change.rhai"),
        "context.bank_account_changed_days <= config.bank_change_cooldown_days",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = spectral(&["world", "test", &tmp.path().to_string_lossy()]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL wire_transfer.release / recent-bank-change / case 2"),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"context:  {"bank_account_changed_days":14}"#),
        "{stdout}"
    );
    assert!(stdout.contains("expected: not matched"), "{stdout}");
    assert!(stdout.contains("actual:   matched"), "{stdout}");
    assert!(stdout.contains(" 1 failed"), "{stdout}");
}

#[test]
fn every_manifest_problem_is_listed_with_its_line() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    copy_world(&payments(), tmp.path());
    let manifest = tmp.path().join("world.toml");
    let text_before = std::fs::read_to_string(&manifest).unwrap_or_else(|e| panic!("{e}"));
    let broken = text_before
        // an unknown type
        .replacen("type = \"number\"", "type = \"nubmer\"", 1)
        // a duplicate rule id
        .replacen("id = \"sanctions-hit\"", "id = \"embargoed-country\"", 1)
        // a missing predicate file
        .replacen(
            "predicate = \"wire_transfer.release/standard-release.rhai\"",
            "predicate = \"wire_transfer.release/nowhere.rhai\"",
            1,
        )
        // a case that names an undeclared attribute
        .replacen(
            "{ context = { bank_account_changed_days = 3 }, matches = true }",
            "{ context = { bank_account_changed_days = 3, vendor_id = \"v\" }, matches = true }",
            1,
        );
    std::fs::write(&manifest, &broken).unwrap_or_else(|e| panic!("{e}"));
    let out = spectral(&["world", "check", &tmp.path().to_string_lossy()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line_of = |needle: &str| {
        broken
            .lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
            .unwrap_or_else(|| panic!("{needle} not in manifest"))
    };
    assert!(
        stderr.contains(&format!("world.toml:{}:", line_of("type = \"nubmer\"")))
            && stderr.contains("unknown type 'nubmer'"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("world.toml:{}:", line_of("nowhere.rhai")))
            && stderr
                .contains("predicate file 'wire_transfer.release/nowhere.rhai' cannot be read"),
        "{stderr}"
    );
    // The loader stops before validation when files are missing, so fix those two and look
    // for the validation problems next.
    let fixed = broken
        .replacen("type = \"nubmer\"", "type = \"number\"", 1)
        .replacen("nowhere.rhai", "standard-release.rhai", 1);
    std::fs::write(&manifest, &fixed).unwrap_or_else(|e| panic!("{e}"));
    let out = spectral(&["world", "check", &tmp.path().to_string_lossy()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("duplicate rule id"), "{stderr}");
    assert!(
        stderr.contains("case names 'vendor_id', which is not an input of the rule"),
        "{stderr}"
    );
    assert!(stderr.contains("problem(s)"), "{stderr}");
}

#[test]
fn decide_prints_the_decision_as_the_service_returns_it() {
    let out = spectral(&[
        "decide",
        "--world",
        &payments().to_string_lossy(),
        "--action",
        "wire_transfer.release",
        "--context",
        r#"{"amount": 25000, "currency": "USD", "payment_method": "wire", "vendor_id": "v-17",
            "vendor_status": "active", "vendor_country": "IR", "bank_account_changed_days": 40,
            "approvals": ["u-bob"], "initiator": "u-ann", "sanctions_hit": false}"#,
        "--at",
        "2026-03-03T15:00:00Z",
        "--correlation-id",
        "abc-123",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["status"], "RED");
    assert_eq!(v["work_frame"]["next_human_owner"], "compliance");
    assert_eq!(v["decision_metadata"]["correlation_id"], "abc-123");
    assert_eq!(
        v["decision_metadata"]["matched_rules"][0]["id"],
        "embargoed-country"
    );
    assert!(v["decision_metadata"]["module_hash"]
        .as_str()
        .is_some_and(|h| h.starts_with("sha256:") && h.len() == 71));
    assert!(v["decision_metadata"]["trace"].is_null());
}

#[test]
fn decide_with_explain_includes_a_trace_of_every_rule() {
    let out = spectral(&[
        "decide",
        "--world",
        &payments().to_string_lossy(),
        "--action",
        "vendor.onboard",
        "--context",
        r#"{"vendor_country": "US", "sanctions_hit": false, "annual_spend_estimate": 100,
            "contact_email": "ap@vendor.example", "vendor_status": "pending"}"#,
        "--explain",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["status"], "GREEN");
    let trace = v["decision_metadata"]["trace"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(trace.len(), 6);
    assert!(trace
        .iter()
        .all(|t| t["applied"] == true && t["matched"] == false));
    assert!(trace
        .iter()
        .all(|t| t["operations"].as_u64().is_some_and(|o| o > 0)));
}

#[test]
fn decide_rejects_an_unknown_action_and_a_bad_context() {
    let world = payments();
    let out = spectral(&[
        "decide",
        "--world",
        &world.to_string_lossy(),
        "--action",
        "nope",
        "--context",
        "{}",
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("has no action 'nope'"), "{stderr}");
    let out = spectral(&[
        "decide",
        "--world",
        &world.to_string_lossy(),
        "--action",
        "vendor.onboard",
        "--context",
        "[1]",
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("context must be a JSON object"), "{stderr}");
}

#[test]
fn an_invalid_limit_in_the_environment_is_a_clear_error() {
    let out = command(&["world", "check", &payments().to_string_lossy()])
        .env("SPECTRAL_SANDBOX_DEADLINE_US", "soon")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("SPECTRAL_SANDBOX_DEADLINE_US"), "{stderr}");
}

#[test]
fn hostile_predicates_run_in_a_few_megabytes() {
    // The attacks that compile, as rules of one action, decided by the real binary under an
    // address-space cap of 256 MiB (the unguarded attacks allocate gigabytes; the process
    // itself needs a few MB of heap plus its mappings).
    let tmp = tempfile::tempdir().unwrap();
    let attacks = [
        ("pad-gigabytes", r#"(context.s + "").pad(2000000000, "y").len() > 0"#),
        ("sleep", "sleep(3) == ()"),
        ("overflow", "context.n + 9223372036854775807 > 0"),
        (
            "pad-chain",
            "(\"a\"+context.s).pad(9999,\"a\")==\"\" || (\"a\"+context.s).pad(9999,\"a\")==\"\" || (\"a\"+context.s).pad(9999,\"a\")==\"\"",
        ),
    ];
    let mut manifest = String::from(
        "world = \"hostile\"\n[context.s]\ntype = \"string\"\n[context.n]\ntype = \"integer\"\n\n[[actions]]\nname = \"probe.run\"\n",
    );
    for (id, predicate) in attacks {
        std::fs::write(tmp.path().join(format!("{id}.rhai")), predicate).unwrap();
        let inputs = match (
            predicate.contains("context.s"),
            predicate.contains("context.n"),
        ) {
            (true, _) => r#"["s"]"#,
            (_, true) => r#"["n"]"#,
            _ => "[]",
        };
        manifest.push_str(&format!(
            "\n[[actions.rules]]\nid = \"{id}\"\ntext = \"attack\"\nseverity = \"T3\"\noutcome = \"GREEN\"\ninputs = {inputs}\npredicate = \"{id}.rhai\"\ncases = [{{ context = {{}}, matches = true }}]\n"
        ));
    }
    std::fs::write(tmp.path().join("world.toml"), manifest).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 262144 && exec \"$0\" decide --world \"$1\" --action probe.run --context \"$2\"")
        .arg(env!("CARGO_BIN_EXE_spectral"))
        .arg(tmp.path())
        .arg(r#"{"s": "abc", "n": 1}"#)
        .env("SPECTRAL_SANDBOX_DEADLINE_US", "500000")
            .env("SPECTRAL_SANDBOX_DECISION_DEADLINE_US", "5000000")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["status"], "YELLOW");
    let kinds: Vec<&str> = v["decision_metadata"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    // The pad chain allocates ~10 KB strings and finishes inside its deadline.
    assert_eq!(
        kinds,
        ["data_too_large", "function_not_found", "arithmetic"]
    );
}

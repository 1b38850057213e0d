//! Validation of OpenAPI documents with a real validator (`openapi-spec-validator`, which
//! `scripts/test.sh` installs when it is missing).

use std::process::Command;

use serde_json::Value;

/// Fail the test unless `doc` is a valid OpenAPI 3.1 document.
pub fn validate(doc: &Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(doc).expect("json")).expect("write");
    let out = Command::new("python3")
        .args(["-m", "openapi_spec_validator", "--schema", "3.1"])
        .arg(&file)
        .output()
        .expect("python3 runs (the validator is installed by scripts/test.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "invalid OpenAPI document:\n{text}");
    assert!(text.contains("OK"), "{text}");
}

#[test]
fn the_validator_rejects_a_broken_document() {
    // Guards the guard: a document without `info` must not pass.
    let doc = serde_json::json!({"openapi": "3.1.0", "paths": {}});
    let result = std::panic::catch_unwind(|| validate(&doc));
    assert!(result.is_err());
}

//! `spectral audit export|verify|prune` on both backends, through the real binary: an exported
//! range verifies offline, a tampered export (a byte changed, a line removed, lines reordered,
//! the end cut off) fails with a message naming the line, a prune removes only exported
//! records and leaves a checkpoint from which the rest of the chain verifies, and a prune of a
//! range not exported is refused, by the command and by the database's triggers.

use chrono::{DateTime, Utc};
use spectral::service::audit;
use spectral::store::{MatchedRule, NewDecision, Store};

use crate::app::{Backend, Db};
use crate::retention::exec;
use crate::support::process::command;

crate::both_backends!(
    export_verify_prune_then_the_rest_verifies_from_the_checkpoint,
    tampered_exports_fail_verification_naming_the_line,
    a_prune_of_a_range_not_exported_is_refused,
);

/// The time decision `i` of the tests was made: `BASE` + `i` seconds.
const BASE: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

fn at(i: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(BASE + i, 250_000).expect("a valid time")
}

/// An `--until` that takes decisions 1..=i.
fn until(i: i64) -> String {
    DateTime::from_timestamp(BASE + i, 500_000)
        .expect("a valid time")
        .to_rfc3339()
}

fn decision(world: &str, i: i64) -> NewDecision {
    NewDecision {
        decision_id: format!("{world}-d{i}"),
        world: world.into(),
        version: 1,
        action: "refund.issue".into(),
        module_hash: format!("sha256:{}", "ab".repeat(32)),
        status: if i % 2 == 0 { "GREEN" } else { "RED" }.into(),
        matched_rules: vec![MatchedRule {
            id: "r1".into(),
            outcome: "RED".into(),
            severity: "T1".into(),
        }],
        caller: "key_1".into(),
        correlation_id: Some(format!("corr-{i}")),
        context_digest: format!("sha256:{}", "cd".repeat(32)),
        decided_at: at(i),
        context: None,
    }
}

/// A store on a fresh database with decisions 1..=n of `acme` and 1..=3 of `globex`.
async fn chain(backend: Backend, n: i64) -> (Db, Store) {
    let db = Db::fresh(backend).await;
    let store = db.store().await;
    let batch: Vec<NewDecision> = (1..=n)
        .map(|i| decision("acme", i))
        .chain((1..=3).map(|i| decision("globex", i)))
        .collect();
    store.append_decisions(&batch).await.expect("append");
    (db, store)
}

/// Run `spectral` on the test database: exit code, stdout, stderr.
fn spectral(db: &Db, args: &[&str]) -> (i32, String, String) {
    let mut cmd = command(args);
    cmd.env("SPECTRAL_LOG", "warn");
    match (db.sqlite_file(), db.postgres_url()) {
        (Some(file), _) => cmd.env("SPECTRAL_DATA_DIR", file.parent().expect("data dir")),
        (None, Some(url)) => cmd.env("DATABASE_URL", url),
        _ => unreachable!("a database is SQLite or Postgres"),
    };
    let out = cmd.output().expect("spectral runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn seqs(store: &Store, world: &str) -> Vec<u64> {
    store
        .decisions(world, 0, 1000)
        .await
        .expect("decisions")
        .iter()
        .map(|r| r.seq)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Cases.

async fn export_verify_prune_then_the_rest_verifies_from_the_checkpoint(backend: Backend) {
    let (db, store) = chain(backend, 10).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let first = dir.path().join("acme-1.jsonl");
    let first_s = first.to_str().expect("utf-8 path");

    let (code, out, err) = spectral(
        &db,
        &[
            "audit",
            "export",
            "--world",
            "acme",
            "--until",
            &until(5),
            "--out",
            first_s,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("records 1 to 5 (5)"), "{out}");
    // JSON lines: a header, five records with their links, a closing line.
    let text = std::fs::read_to_string(&first).expect("export");
    assert_eq!(text.lines().count(), 7, "{text}");
    assert!(text
        .lines()
        .nth(1)
        .expect("record")
        .contains("\"prev_hash\""));
    // An existing file is never overwritten.
    let (code, _, err) = spectral(
        &db,
        &[
            "audit",
            "export",
            "--world",
            "acme",
            "--until",
            &until(5),
            "--out",
            first_s,
        ],
    );
    assert_eq!(code, 2, "{err}");

    let (code, out, err) = spectral(&db, &["audit", "verify", "--file", first_s]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("acme: export intact (5 records, 1 to 5)"),
        "{out}"
    );

    let (code, out, err) = spectral(
        &db,
        &["audit", "prune", "--world", "acme", "--until", &until(5)],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("5 record(s) removed"), "{out}");
    assert_eq!(seqs(&store, "acme").await, vec![6, 7, 8, 9, 10]);
    // The other world is untouched.
    assert_eq!(seqs(&store, "globex").await, vec![1, 2, 3]);

    // What remains verifies from the checkpoint of record 5.
    let (code, out, err) = spectral(&db, &["audit", "verify", "--world", "acme"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("chain intact (5 records, after checkpoint 5)"),
        "{out}"
    );
    let checkpoint = store
        .chain_checkpoint("acme")
        .await
        .expect("checkpoint")
        .expect("some");
    let exported_last = text.lines().nth(5).expect("record 5");
    assert!(exported_last.contains(&checkpoint.hash), "{exported_last}");

    // A second range continues from the checkpoint: its header names it, and it verifies.
    let second = dir.path().join("acme-2.jsonl");
    let second_s = second.to_str().expect("utf-8 path");
    let (code, out, err) = spectral(
        &db,
        &[
            "audit",
            "export",
            "--world",
            "acme",
            "--until",
            &until(8),
            "--out",
            second_s,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("records 6 to 8 (3)"), "{out}");
    let report = audit::verify_file(&second).expect("read");
    assert_eq!(report.problem, None);
    assert_eq!(
        (report.first_seq, report.last_seq, report.records),
        (6, 8, 3)
    );
    let (code, out, err) = spectral(
        &db,
        &["audit", "prune", "--world", "acme", "--until", &until(8)],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(seqs(&store, "acme").await, vec![9, 10]);
    let verified = audit::verify(&store, "acme").await.expect("verify");
    assert_eq!(
        (verified.records, verified.pruned_through, verified.broken),
        (2, Some(8), None)
    );
    // Two exports recorded, each with the digest of its file.
    let exports = store.exports("acme").await.expect("exports");
    assert_eq!(
        exports
            .iter()
            .map(|e| (e.first_seq, e.last_seq))
            .collect::<Vec<_>>(),
        vec![(1, 5), (6, 8)]
    );
    store.close().await;
}

async fn tampered_exports_fail_verification_naming_the_line(backend: Backend) {
    let (db, store) = chain(backend, 6).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("acme.jsonl");
    audit::export(&store, "acme", at(100), &file)
        .await
        .expect("export");
    assert_eq!(audit::verify_file(&file).expect("read").problem, None);
    let text = std::fs::read_to_string(&file).expect("export");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 8);

    let write = |name: &str, lines: Vec<String>| {
        let path = dir.path().join(name);
        std::fs::write(&path, lines.join("\n") + "\n").expect("write");
        path
    };
    let owned = || lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    let mut cases = Vec::new();
    // One byte of a record changed (record 3's status RED → REX).
    let mut changed = owned();
    changed[3] = changed[3].replacen("\"RED\"", "\"REX\"", 1);
    assert_ne!(changed[3], lines[3]);
    cases.push((
        "one byte changed",
        write("byte.jsonl", changed),
        "line 4",
        "does not match",
    ));
    // A record removed from the middle.
    let mut removed = owned();
    removed.remove(3);
    cases.push((
        "a line removed",
        write("removed.jsonl", removed),
        "line 4",
        "missing",
    ));
    // Two records swapped.
    let mut swapped = owned();
    swapped.swap(2, 3);
    cases.push((
        "lines reordered",
        write("swapped.jsonl", swapped),
        "line 3",
        "expected record 2",
    ));
    // The last record removed: the closing line no longer matches.
    let mut last = owned();
    last.remove(6);
    cases.push((
        "the last record removed",
        write("last.jsonl", last),
        "closing line",
        "counts 6",
    ));
    // The end cut off.
    let mut cut = owned();
    cut.truncate(5);
    cases.push((
        "cut short",
        write("cut.jsonl", cut),
        "cut short",
        "closing line",
    ));
    // A record's hash changed along with its content cannot hide either: its successor's link
    // no longer matches.
    let mut relinked = owned();
    let mut record: serde_json::Value = serde_json::from_str(&relinked[2]).expect("json");
    record["status"] = "YELLOW".into();
    let decision: NewDecision = serde_json::from_value(record.clone()).expect("decision");
    let prev = record["prev_hash"].as_str().expect("prev").to_string();
    record["hash"] = spectral::store::chain_hash(&prev, 2, &decision)
        .expect("hash")
        .into();
    relinked[2] = record.to_string();
    cases.push((
        "a record rehashed",
        write("rehashed.jsonl", relinked),
        "line 4",
        "prev_hash",
    ));

    for (what, path, at_line, says) in &cases {
        let report = audit::verify_file(path).expect("read");
        let problem = report
            .problem
            .unwrap_or_else(|| panic!("{what}: the tampered export verified"));
        assert!(
            problem.contains(at_line) && problem.contains(says),
            "{what}: {problem}"
        );
    }
    // Through the command: exit 1 and the reason.
    let (code, out, err) = spectral(
        &db,
        &[
            "audit",
            "verify",
            "--file",
            cases[0].1.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("export broken: line 4"), "{out}");
    store.close().await;
}

async fn a_prune_of_a_range_not_exported_is_refused(backend: Backend) {
    let (db, store) = chain(backend, 10).await;
    let (code, out, err) = spectral(
        &db,
        &["audit", "prune", "--world", "acme", "--until", &until(5)],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("were not all exported"), "{err}");
    assert_eq!(seqs(&store, "acme").await.len(), 10);

    // Exported through record 3: a prune through 5 is still refused, through 3 it is not.
    let dir = tempfile::tempdir().expect("tempdir");
    audit::export(&store, "acme", at(3), &dir.path().join("a.jsonl"))
        .await
        .expect("export");
    let (code, out, err) = spectral(
        &db,
        &["audit", "prune", "--world", "acme", "--until", &until(5)],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("exports reach record 3"), "{err}");
    assert_eq!(seqs(&store, "acme").await.len(), 10);
    let pruned = audit::prune(&store, "acme", at(3)).await.expect("prune");
    assert_eq!((pruned.removed, pruned.checkpoint.seq), (3, 3));

    // Behind the command's back, the database refuses too: a record above the checkpoint
    // cannot be deleted, a checkpoint cannot move past what was exported or name a false hash.
    let delete = exec(
        &db,
        "DELETE FROM decisions WHERE world = 'acme' AND seq = 9",
        "DELETE FROM core.decisions WHERE world = 'acme' AND seq = 9",
    )
    .await;
    assert!(
        delete.is_err(),
        "a delete above the checkpoint went through"
    );
    let advance = exec(
        &db,
        "UPDATE decision_checkpoints SET seq = 9,
             hash = (SELECT hash FROM decisions WHERE world = 'acme' AND seq = 9)
         WHERE world = 'acme'",
        "UPDATE core.decision_checkpoints SET seq = 9,
             hash = (SELECT hash FROM core.decisions WHERE world = 'acme' AND seq = 9)
         WHERE world = 'acme'",
    )
    .await;
    assert!(advance.is_err(), "a checkpoint moved past the export");
    let forged = exec(
        &db,
        "INSERT INTO decision_checkpoints (world, seq, hash, pruned_at)
         VALUES ('globex', 2, 'sha256:00', 0)",
        "INSERT INTO core.decision_checkpoints (world, seq, hash, pruned_at)
         VALUES ('globex', 2, 'sha256:00', now())",
    )
    .await;
    assert!(
        forged.is_err(),
        "a checkpoint of an unexported world was stored"
    );
    let erased = exec(
        &db,
        "DELETE FROM decision_exports",
        "DELETE FROM core.decision_exports",
    )
    .await;
    assert!(erased.is_err(), "an export record was deleted");
    // An update of a record is refused as before.
    let altered = exec(
        &db,
        "UPDATE decisions SET status = 'GREEN' WHERE world = 'acme' AND seq = 9",
        "UPDATE core.decisions SET status = 'GREEN' WHERE world = 'acme' AND seq = 9",
    )
    .await;
    assert!(altered.is_err(), "a record was altered");
    assert_eq!(seqs(&store, "acme").await, (4..=10).collect::<Vec<_>>());
    let verified = audit::verify(&store, "acme").await.expect("verify");
    assert_eq!((verified.records, verified.broken), (7, None));
    store.close().await;
}

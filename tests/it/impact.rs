//! Impact before publishing, on both backends (docs/impact.md): a shadow version evaluated on
//! live traffic reports exactly the decisions that differ, checked against evaluating both
//! versions directly; sampling evaluates about its share; a hostile shadow never changes an
//! answer; a replay of the draft over kept contexts reports what the shadow did over the same
//! traffic; contexts are bounded, counted and pruned while the chain still verifies; and no key
//! of another world can touch a world's shadow or replays.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use spectral::config::Durability;
use spectral::store::Scope;
use spectral::worlds::WorldModel;

use crate::app::{green_wire, test_config, Backend, Db, TestApp, OPERATOR};
use crate::retention::count;
use crate::support::{compile, decide_with, eventually, predicates_dir, sandbox};

crate::both_backends!(
    a_shadow_reports_exactly_the_decisions_that_differ,
    sampling_at_a_tenth_evaluates_about_a_tenth,
    a_full_queue_skips_counted_and_no_answer_waits,
    a_hostile_shadow_never_changes_an_answer,
    a_replay_of_the_draft_reports_what_the_shadow_saw,
    pruning_contexts_keeps_the_chain_verifiable,
    a_context_over_the_bound_keeps_only_its_digest,
    a_key_of_another_world_cannot_touch_a_shadow_or_a_replay,
    deploying_the_shadow_version_ends_the_shadow,
    bad_shadow_and_replay_requests_are_refused_with_reasons,
    the_replay_command_prints_what_a_folder_would_change,
);

const WORLD: &str = "acme-payments";

/// A test app whose answers wait for their records' commit, so that what a client received is
/// in the log (and its context kept) when it reads.
async fn app(db: &Db, tune: impl FnOnce(&mut spectral::config::Config)) -> TestApp {
    let mut config = test_config(db);
    config.decision_log.durability = Durability::Commit;
    config.impact.shadow_flush = Duration::from_millis(20);
    config.impact.replay_poll = Duration::from_millis(20);
    // At nice 19 the evaluator may wait long for a CPU on a machine running the whole suite;
    // what these tests check does not depend on its priority.
    config.impact.shadow_nice = config.background.nice;
    tune(&mut config);
    TestApp::start(config).await
}

/// The payments world as JSON, changed by `edit`.
fn payments(edit: impl FnOnce(&mut Value)) -> Value {
    let model = spectral::worlds::load::load_model(&predicates_dir().join(WORLD)).expect("loads");
    let mut json = serde_json::to_value(&model).expect("json");
    edit(&mut json);
    json
}

/// Turn `standard-release` (which matches every positive amount) into a YELLOW rule.
fn yellow_release(model: &mut Value) {
    for rule in model["actions"][0]["rules"].as_array_mut().expect("rules") {
        if rule["id"] == "standard-release" {
            rule["outcome"] = json!("YELLOW");
        }
    }
}

/// Put `model` as the draft and publish it; its version.
async fn publish(app: &TestApp, model: &Value) -> u64 {
    let world = model["world"].as_str().expect("world");
    let (status, body) = app
        .put(OPERATOR, &format!("/api/worlds/{world}/draft"), model)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app
        .post(
            OPERATOR,
            &format!("/api/worlds/{world}/versions"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["version"].as_u64().expect("version")
}

async fn deploy(app: &TestApp, world: &str, version: u64) {
    let (status, body) = app
        .post(
            OPERATOR,
            &format!("/api/worlds/{world}/deployments"),
            &json!({"version": version}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// Wire releases of every kind: green, a suspended vendor (RED), a sanctions hit, a card
/// payment, missing evidence. Amounts stay under the after-hours threshold, so no answer
/// depends on the time of day.
fn traffic(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let mut body = green_wire();
            let c = &mut body["context"];
            c["amount"] = json!(100 + (i * 37) % 9000);
            match i % 5 {
                1 => c["vendor_status"] = json!("suspended"),
                2 => c["sanctions_hit"] = json!(true),
                3 => c["payment_method"] = json!("card"),
                4 => {
                    c.as_object_mut().expect("object").remove("approvals");
                }
                _ => {}
            }
            body
        })
        .collect()
}

/// Send every request; each decision's id with its answer.
async fn send(app: &TestApp, requests: &[Value]) -> Vec<(String, Value)> {
    let mut answered = Vec::new();
    for body in requests {
        let (status, d) = app.decide(OPERATOR, body).await;
        assert_eq!(status, 200, "{d}");
        let id = d["decision_metadata"]["decision_id"]
            .as_str()
            .expect("id")
            .to_string();
        answered.push((id, d));
    }
    answered
}

/// `(status, sorted (rule, outcome))` of an answer.
fn answer_of(status: &str, rules: &[Value]) -> (String, Vec<(String, String)>) {
    let mut rules: Vec<(String, String)> = rules
        .iter()
        .map(|r| {
            (
                r["id"].as_str().expect("id").to_string(),
                r["outcome"].as_str().expect("outcome").to_string(),
            )
        })
        .collect();
    rules.sort();
    (status.to_string(), rules)
}

/// The differences expected between two answers, computed here from the answers alone:
/// `(from, to, rule) → ids`.
type Expected = BTreeMap<Kind, Vec<String>>;

fn expect_difference(
    expected: &mut Expected,
    id: &str,
    before: &(String, Vec<(String, String)>),
    after: &(String, Vec<(String, String)>),
) {
    if before == after {
        return;
    }
    let only_before = before.1.iter().filter(|r| !after.1.contains(r));
    let only_after = after.1.iter().filter(|r| !before.1.contains(r));
    let rule = only_before
        .chain(only_after)
        .map(|(id, _)| id.clone())
        .min();
    expected
        .entry((before.0.clone(), after.0.clone(), rule))
        .or_default()
        .push(id.to_string());
}

/// A kind of difference: `(from, to, rule)`.
type Kind = (String, String, Option<String>);

/// A report's differences as `(from, to, rule) → (count, examples)`.
fn kinds(report: &Value) -> BTreeMap<Kind, (u64, Vec<String>)> {
    report["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .map(|d| {
            let key = (
                d["from"].as_str().expect("from").to_string(),
                d["to"].as_str().expect("to").to_string(),
                d["rule"].as_str().map(String::from),
            );
            let examples = d["examples"]
                .as_array()
                .expect("examples")
                .iter()
                .map(|e| e.as_str().expect("id").to_string())
                .collect();
            (key, (d["count"].as_u64().expect("count"), examples))
        })
        .collect()
}

/// The shadow's report once it has evaluated `n` decisions.
async fn shadow_after(app: &TestApp, world: &str, n: u64) -> Value {
    eventually(
        Duration::from_secs(30),
        "the shadow evaluating every decision",
        || async {
            let (status, body) = app
                .get(Some(OPERATOR), &format!("/api/worlds/{world}/shadow"))
                .await;
            assert_eq!(status, 200, "{body}");
            let report = &body["report"];
            let seen =
                report["evaluated"].as_u64().unwrap_or(0) + report["skipped"].as_u64().unwrap_or(0);
            assert!(seen <= n, "more decisions seen than sent: {body}");
            (seen == n).then_some(body)
        },
    )
    .await
}

async fn a_shadow_reports_exactly_the_decisions_that_differ(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = app(&db, |_| {}).await;
    let variant = payments(yellow_release);
    let shadow_version = publish(&app, &variant).await;
    let (status, started) = app
        .post(
            OPERATOR,
            &format!("/api/worlds/{WORLD}/shadow"),
            &json!({"version": shadow_version, "sample": 1.0}),
        )
        .await;
    assert_eq!(status, 201, "{started}");
    assert_eq!(started["deployed_version"], 1);

    let requests = traffic(30);
    let answered = send(&app, &requests).await;
    // Answers are the deployed version's, whatever the shadow says.
    assert!(answered
        .iter()
        .all(|(_, d)| d["decision_metadata"]["world_model_version"] == 1));

    // The same requests evaluated directly against the shadow version.
    let sandbox = sandbox();
    let model: WorldModel = serde_json::from_value(variant).expect("model");
    let shadow_world = compile(&model, &sandbox);
    let mut expected = Expected::new();
    for (body, (id, d)) in requests.iter().zip(&answered) {
        let direct = decide_with(
            &shadow_world,
            &sandbox,
            "wire_transfer.release",
            &body["context"],
            false,
        );
        let direct = serde_json::to_value(&direct).expect("json");
        expect_difference(
            &mut expected,
            id,
            &answer_of(
                d["status"].as_str().expect("status"),
                d["decision_metadata"]["matched_rules"]
                    .as_array()
                    .expect("rules"),
            ),
            &answer_of(
                direct["status"].as_str().expect("status"),
                direct["decision_metadata"]["matched_rules"]
                    .as_array()
                    .expect("rules"),
            ),
        );
    }
    assert!(
        expected.len() >= 2,
        "the traffic differs in more than one way: {expected:?}"
    );
    let differing: usize = expected.values().map(Vec::len).sum();
    assert!(differing < requests.len(), "some decisions do not differ");

    let view = shadow_after(&app, WORLD, requests.len() as u64).await;
    let report = &view["report"];
    assert_eq!(report["differing"], differing as u64, "{view}");
    assert_eq!(report["skipped"], 0);
    let got = kinds(report);
    let want: BTreeMap<_, _> = expected
        .into_iter()
        .map(|(k, mut ids)| {
            ids.sort();
            let n = ids.len() as u64;
            ids.truncate(5);
            (k, (n, ids))
        })
        .collect();
    assert_eq!(got, want);
    assert!(
        view["summary"]
            .as_str()
            .expect("summary")
            .starts_with("would have changed"),
        "{view}"
    );

    // The shadow's answers are never recorded.
    let store = db.store().await;
    let recorded = store.decisions(WORLD, 0, 1000).await.expect("decisions");
    assert_eq!(recorded.len(), requests.len());
    assert!(recorded.iter().all(|r| r.decision.version == 1));

    // Ending it returns the final report; then there is none.
    let (status, ended) = app
        .call(
            reqwest::Method::DELETE,
            &format!("/api/worlds/{WORLD}/shadow"),
            Some(OPERATOR),
            None,
        )
        .await;
    assert_eq!(status, 200, "{ended}");
    assert_eq!(ended["report"], *report);
    let (status, _) = app
        .get(Some(OPERATOR), &format!("/api/worlds/{WORLD}/shadow"))
        .await;
    assert_eq!(status, 404);
    app.stop().await;
}

async fn sampling_at_a_tenth_evaluates_about_a_tenth(backend: Backend) {
    let db = Db::fresh(backend).await;
    // No record is read here: answers need not wait for their commit.
    let app = app(&db, |c| c.decision_log.durability = Durability::Queued).await;
    let version = publish(&app, &payments(yellow_release)).await;
    let (status, body) = app
        .post(
            OPERATOR,
            &format!("/api/worlds/{WORLD}/shadow"),
            &json!({"version": version, "sample": 0.1}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let n = 600;
    send(&app, &vec![green_wire(); n]).await;
    // Every sampled decision was queued before its answer: once none is pending, the report
    // counts them all.
    let view = eventually(
        Duration::from_secs(30),
        "the sampled decisions evaluated",
        || async {
            let (_, body) = app
                .get(Some(OPERATOR), &format!("/api/worlds/{WORLD}/shadow"))
                .await;
            (body["pending"] == 0).then_some(body)
        },
    )
    .await;
    let sampled = view["report"]["evaluated"].as_u64().expect("evaluated")
        + view["report"]["skipped"].as_u64().expect("skipped");
    // Binomial(600, 0.1): mean 60, standard deviation ~7.3; these bounds are ±4.5 of them.
    assert!((27..=93).contains(&sampled), "sampled {sampled} of {n}");
    // Every green wire turns YELLOW in the variant.
    assert_eq!(view["report"]["differing"], view["report"]["evaluated"]);
    app.stop().await;
}

async fn a_full_queue_skips_counted_and_no_answer_waits(backend: Backend) {
    let db = Db::fresh(backend).await;
    // Room for one job, and an evaluator that pauses ~99 times as long as each evaluation
    // took: of a burst of concurrent decisions, all but a few find the queue full.
    let app = app(&db, |c| {
        c.decision_log.durability = Durability::Queued;
        c.impact.shadow_queue = 1;
        c.impact.shadow_cpu_percent = 1;
    })
    .await;
    let version = publish(&app, &payments(yellow_release)).await;
    let (status, body) = app
        .post(
            OPERATOR,
            &format!("/api/worlds/{WORLD}/shadow"),
            &json!({"version": version, "sample": 1.0}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let n = 40;
    let burst = vec![green_wire(); n];
    let answers =
        futures::future::join_all(burst.iter().map(|body| app.decide(OPERATOR, body))).await;
    // Every decision is answered, and by the deployed version.
    for (status, d) in &answers {
        assert_eq!(*status, 200, "{d}");
        assert_eq!(d["status"], "GREEN", "{d}");
    }
    let view = shadow_after(&app, WORLD, n as u64).await;
    let (evaluated, skipped) = (
        view["report"]["evaluated"].as_u64().expect("evaluated"),
        view["report"]["skipped"].as_u64().expect("skipped"),
    );
    assert!(evaluated >= 1, "{view}");
    assert!(skipped >= 1, "a queue of one took a burst of {n}: {view}");
    // The skips are counted in the metrics too.
    let (status, metrics) = app.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let metrics = metrics.as_str().expect("text");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("spectral_shadow_evaluations_total{outcome=\"skipped\"}"))
        .unwrap_or_else(|| panic!("no skipped counter in {metrics}"));
    assert!(line.ends_with(&format!(" {skipped}")), "{line} vs {view}");
    app.stop().await;
}

/// A world whose deployed rule is benign and whose shadow version's rules each hit a limit of
/// the sandbox on large inputs (arrays, strings, integer overflow), passing their cases on
/// small ones.
fn probe_world(hostile: bool) -> Value {
    let benign = json!({"id": "positive", "text": "n is positive", "severity": "T2",
        "outcome": "GREEN", "inputs": ["n"], "predicate": "context.n > 0",
        "cases": [{"context": {"n": 1}, "matches": true}, {"context": {"n": 0}, "matches": false}]});
    let mut rules = vec![benign];
    if hostile {
        rules.extend([
            json!({"id": "doubled-list", "text": "t", "severity": "T2", "outcome": "RED",
                "inputs": ["list"], "predicate": "(context.list + context.list).len() > 100",
                "cases": [{"context": {"list": [1]}, "matches": false}]}),
            json!({"id": "doubled-string", "text": "t", "severity": "T2", "outcome": "RED",
                "inputs": ["s"], "predicate": "(context.s + context.s).len() > 100",
                "cases": [{"context": {"s": "a"}, "matches": false}]}),
            json!({"id": "overflow", "text": "t", "severity": "T2", "outcome": "RED",
                "inputs": ["n"], "predicate": "context.n * 4611686018427387904 < 0",
                "cases": [{"context": {"n": 1}, "matches": false}]}),
        ]);
    }
    json!({
        "world": "probe",
        "context": {"n": {"type": "integer"}, "s": {"type": "string"},
            "list": {"type": "list", "items": "integer"}},
        "actions": [{"name": "probe.run", "rules": rules}],
    })
}

async fn a_hostile_shadow_never_changes_an_answer(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = app(&db, |_| {}).await;
    let benign = publish(&app, &probe_world(false)).await;
    deploy(&app, "probe", benign).await;
    let hostile = publish(&app, &probe_world(true)).await;
    let big: Vec<i64> = (0..600).collect();
    let requests: Vec<Value> = (0..12)
        .map(|i| {
            json!({"world": "probe", "action": "probe.run", "context": {
                "n": if i % 2 == 0 { 3 } else { 2_000_000_000 },
                "s": "x".repeat(if i % 3 == 0 { 10_000 } else { 3 }),
                "list": if i % 4 == 0 { big.clone() } else { vec![1, 2] },
            }})
        })
        .collect();
    let strip = |d: &Value| {
        let mut d = d.clone();
        for volatile in ["decision_id", "eval_us"] {
            d["decision_metadata"][volatile] = Value::Null;
        }
        d
    };
    let before: Vec<Value> = send(&app, &requests)
        .await
        .iter()
        .map(|(_, d)| strip(d))
        .collect();
    let (status, body) = app
        .post(
            OPERATOR,
            "/api/worlds/probe/shadow",
            &json!({"version": hostile, "sample": 1.0}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let after: Vec<Value> = send(&app, &requests)
        .await
        .iter()
        .map(|(_, d)| strip(d))
        .collect();
    assert_eq!(before, after, "a shadow changed an answer");
    assert!(after.iter().all(|d| d["status"] == "GREEN"));
    // The shadow failed closed on every limit, off the decide path.
    let view = shadow_after(&app, "probe", requests.len() as u64).await;
    assert_eq!(view["report"]["evaluated"], requests.len() as u64, "{view}");
    let rules: Vec<&str> = view["report"]["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .filter_map(|d| d["rule"].as_str())
        .collect();
    for rule in ["doubled-list", "doubled-string", "overflow"] {
        assert!(rules.contains(&rule), "{rule} not among {rules:?}: {view}");
    }
    // Its errors are counted by the sandbox's metrics, never as decisions.
    let recorded = db
        .store()
        .await
        .decisions("probe", 0, 1000)
        .await
        .expect("decisions");
    assert_eq!(recorded.len(), 2 * requests.len());
    let (status, health) = app.get(None, "/health").await;
    assert_eq!(status, 200, "{health}");
    app.stop().await;
}

async fn a_replay_of_the_draft_reports_what_the_shadow_saw(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = app(&db, |_| {}).await;
    let keeping = publish(&app, &payments(|m| m["record_context"] = json!("full"))).await;
    deploy(&app, WORLD, keeping).await;
    // The draft is now the candidate: the variant, keeping contexts too.
    let candidate = publish(
        &app,
        &payments(|m| {
            yellow_release(m);
            m["record_context"] = json!("full");
        }),
    )
    .await;
    let (status, body) = app
        .post(
            OPERATOR,
            &format!("/api/worlds/{WORLD}/shadow"),
            &json!({"version": candidate, "sample": 1.0}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let requests = traffic(25);
    send(&app, &requests).await;
    let shadow = shadow_after(&app, WORLD, requests.len() as u64).await;
    assert_eq!(count(&db, "decision_contexts").await, requests.len() as i64);

    let replay = |version: Value| {
        let app = &app;
        async move {
            let (status, queued) = app
                .post(
                    OPERATOR,
                    &format!("/api/worlds/{WORLD}/replays"),
                    &json!({"version": version}),
                )
                .await;
            assert_eq!(status, 202, "{queued}");
            assert_eq!(queued["status"], "queued");
            let id = queued["id"].as_str().expect("id").to_string();
            eventually(Duration::from_secs(30), "the replay finishing", || async {
                let (status, body) = app
                    .get(Some(OPERATOR), &format!("/api/worlds/{WORLD}/replays/{id}"))
                    .await;
                assert_eq!(status, 200, "{body}");
                assert_ne!(body["status"], "failed", "{body}");
                (body["status"] == "done").then_some(body)
            })
            .await
        }
    };
    for version in [json!("draft"), json!(candidate)] {
        let done = replay(version).await;
        let report = &done["report"];
        assert_eq!(report["stopped_by"], "end", "{done}");
        assert_eq!(done["processed"], requests.len() as u64);
        for field in ["evaluated", "differing", "differences"] {
            assert_eq!(report[field], shadow["report"][field], "{field}: {done}");
        }
        assert_eq!(report["summary"], shadow["summary"]);
    }
    // The deployed version replayed over its own decisions changes nothing.
    let same = replay(json!(keeping)).await;
    assert_eq!(same["report"]["differing"], 0, "{same}");
    // A limit bounds the rows.
    let (status, queued) = app
        .post(
            OPERATOR,
            &format!("/api/worlds/{WORLD}/replays"),
            &json!({"version": "draft", "limit": 10}),
        )
        .await;
    assert_eq!(status, 202, "{queued}");
    let id = queued["id"].as_str().expect("id").to_string();
    let bounded = eventually(Duration::from_secs(30), "the bounded replay", || async {
        let (_, body) = app
            .get(Some(OPERATOR), &format!("/api/worlds/{WORLD}/replays/{id}"))
            .await;
        (body["status"] == "done").then_some(body)
    })
    .await;
    assert_eq!(bounded["processed"], 10);
    assert_eq!(bounded["report"]["stopped_by"], "rows");
    app.stop().await;
}

async fn pruning_contexts_keeps_the_chain_verifiable(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = app(&db, |c| {
        c.impact.context_retention = Duration::from_millis(1);
        c.impact.prune_interval = Duration::from_millis(10);
    })
    .await;
    let keeping = publish(&app, &payments(|m| m["record_context"] = json!("full"))).await;
    deploy(&app, WORLD, keeping).await;
    let requests = traffic(20);
    send(&app, &requests).await;
    eventually(Duration::from_secs(30), "the contexts pruned", || async {
        (count(&db, "decision_contexts").await == 0).then_some(())
    })
    .await;
    let store = db.store().await;
    let verified = spectral::service::audit::verify(&store, WORLD)
        .await
        .expect("verify");
    assert!(verified.broken.is_none(), "{verified:?}");
    assert_eq!(verified.records, requests.len() as u64);
    let (_, metrics) = app.admin_get("/metrics").await;
    let metrics = metrics.as_str().expect("text");
    assert!(
        metrics.contains("spectral_decision_contexts_total{outcome=\"kept\"} 20"),
        "{metrics}"
    );
    app.stop().await;
}

async fn a_context_over_the_bound_keeps_only_its_digest(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = app(&db, |c| c.impact.context_max_bytes = 1024).await;
    let keeping = publish(&app, &payments(|m| m["record_context"] = json!("full"))).await;
    deploy(&app, WORLD, keeping).await;
    let mut big = green_wire();
    big["context"]["memo"] = json!("m".repeat(2000));
    send(&app, &[green_wire(), big]).await;
    assert_eq!(count(&db, "decision_contexts").await, 1);
    let recorded = db
        .store()
        .await
        .decisions(WORLD, 0, 10)
        .await
        .expect("decisions");
    assert_eq!(recorded.len(), 2);
    assert!(recorded
        .iter()
        .all(|r| r.decision.context_digest.starts_with("sha256:")));
    let (_, metrics) = app.admin_get("/metrics").await;
    let metrics = metrics.as_str().expect("text");
    assert!(
        metrics.contains("spectral_decision_contexts_total{outcome=\"too_large\"} 1"),
        "{metrics}"
    );
    // A world that keeps nothing records an empty digest.
    let nothing = publish(&app, &payments(|m| m["record_context"] = json!("none"))).await;
    deploy(&app, WORLD, nothing).await;
    send(&app, &[green_wire()]).await;
    let last = db
        .store()
        .await
        .decisions(WORLD, 2, 10)
        .await
        .expect("decisions");
    assert_eq!(last[0].decision.context_digest, "");
    app.stop().await;
}

async fn a_key_of_another_world_cannot_touch_a_shadow_or_a_replay(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = app(&db, |_| {}).await;
    let version = publish(&app, &payments(yellow_release)).await;
    let (status, body) = app
        .post(
            OPERATOR,
            &format!("/api/worlds/{WORLD}/shadow"),
            &json!({"version": version}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let other = app.key(Some("globex-support"), &Scope::ALL).await;
    let reader = app.key(Some(WORLD), &[Scope::Read, Scope::Decide]).await;
    let shadow = format!("/api/worlds/{WORLD}/shadow");
    let replays = format!("/api/worlds/{WORLD}/replays");
    for key in [&other, &reader] {
        let (status, body) = app.post(key, &shadow, &json!({"version": version})).await;
        assert_eq!(status, 403, "{body}");
        let (status, body) = app
            .call(reqwest::Method::DELETE, &shadow, Some(key), None)
            .await;
        assert_eq!(status, 403, "{body}");
        let (status, body) = app.post(key, &replays, &json!({"version": "draft"})).await;
        assert_eq!(status, 403, "{body}");
    }
    let (status, body) = app.get(Some(&other), &shadow).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = app
        .get(Some(&other), &format!("{replays}/rp_anything"))
        .await;
    assert_eq!(status, 403, "{body}");
    // The world's own reader may read; the shadow is untouched.
    let (status, body) = app.get(Some(&reader), &shadow).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["shadow"]["version"], version);
    // A replay id of one world is not found under another.
    let keeping = publish(&app, &payments(|m| m["record_context"] = json!("full"))).await;
    deploy(&app, WORLD, keeping).await;
    send(&app, &[green_wire()]).await;
    let (status, queued) = app
        .post(OPERATOR, &replays, &json!({"version": keeping}))
        .await;
    assert_eq!(status, 202, "{queued}");
    let id = queued["id"].as_str().expect("id");
    let (status, _) = app
        .get(
            Some(OPERATOR),
            &format!("/api/worlds/globex-support/replays/{id}"),
        )
        .await;
    assert_eq!(status, 404);
    app.stop().await;
}

async fn deploying_the_shadow_version_ends_the_shadow(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = app(&db, |_| {}).await;
    let version = publish(&app, &payments(yellow_release)).await;
    let shadow = format!("/api/worlds/{WORLD}/shadow");
    let (status, body) = app
        .post(
            OPERATOR,
            &shadow,
            &json!({"version": version, "sample": 0.5}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    deploy(&app, WORLD, version).await;
    let (status, body) = app.get(Some(OPERATOR), &shadow).await;
    assert_eq!(status, 404, "{body}");
    // The instance stops evaluating it: decisions are answered and nothing is pending.
    send(&app, &[green_wire()]).await;
    assert_eq!(
        app.running.as_ref().expect("running").app.shadows.pending(),
        0
    );
    app.stop().await;
}

async fn bad_shadow_and_replay_requests_are_refused_with_reasons(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = app(&db, |_| {}).await;
    let version = publish(&app, &payments(yellow_release)).await;
    let shadow = format!("/api/worlds/{WORLD}/shadow");
    for (body, want) in [
        (json!({"version": version, "sample": 1.5}), 400),
        (json!({"version": version, "sample": -0.1}), 400),
        (json!({"sample": 0.5}), 400),
        (json!({"version": "two"}), 400),
        (json!({"version": version, "extra": 1}), 400),
        (json!({"version": 1}), 409),
        (json!({"version": 99}), 404),
    ] {
        let (status, problem) = app.post(OPERATOR, &shadow, &body).await;
        assert_eq!(status, want, "{body}: {problem}");
        assert!(problem["detail"].is_string(), "{problem}");
    }
    let (status, problem) = app
        .call(reqwest::Method::DELETE, &shadow, Some(OPERATOR), None)
        .await;
    assert_eq!(status, 404, "{problem}");
    let replays = format!("/api/worlds/{WORLD}/replays");
    for (body, want) in [
        (json!({"version": "drafty"}), 400),
        (json!({"version": "draft", "limit": 0}), 400),
        (json!({"version": "draft", "limit": 100_000_000}), 400),
        (json!({"version": 99}), 404),
        // The world keeps no contexts.
        (json!({"version": "draft"}), 409),
    ] {
        let (status, problem) = app.post(OPERATOR, &replays, &body).await;
        assert_eq!(status, want, "{body}: {problem}");
        assert!(problem["detail"].is_string(), "{problem}");
    }
    let (status, _) = app
        .get(Some(OPERATOR), &format!("{replays}/rp_missing"))
        .await;
    assert_eq!(status, 404);
    app.stop().await;
}

/// Copy a folder, recursively.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

async fn the_replay_command_prints_what_a_folder_would_change(backend: Backend) {
    let db = Db::fresh(backend).await;
    let app = app(&db, |_| {}).await;
    let keeping = publish(&app, &payments(|m| m["record_context"] = json!("full"))).await;
    deploy(&app, WORLD, keeping).await;
    let requests = traffic(10);
    let answered = send(&app, &requests).await;
    let green = answered
        .iter()
        .filter(|(_, d)| d["status"] == "GREEN")
        .count();
    assert!(green > 0);
    // Every answer in which the rule matched changes, in status or in its outcome.
    let changed = answered
        .iter()
        .filter(|(_, d)| {
            d["decision_metadata"]["matched_rules"]
                .as_array()
                .expect("rules")
                .iter()
                .any(|r| r["id"] == "standard-release")
        })
        .count();
    assert!(changed > green, "some RED answers match it too");

    // The folder of a candidate: standard-release turned YELLOW.
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join(WORLD);
    copy_dir(&predicates_dir().join(WORLD), &folder);
    let manifest = folder.join("world.toml");
    let text = std::fs::read_to_string(&manifest).expect("read");
    let release = "outcome = \"GREEN\"\ninputs = [\"amount\"]\npredicate = \"wire_transfer.release/standard-release.rhai\"";
    assert!(text.contains(release));
    let text = text.replacen(release, &release.replace("GREEN", "YELLOW"), 1);
    std::fs::write(&manifest, format!("record_context = \"full\"\n{text}")).expect("write");

    let folder_arg = folder.to_string_lossy().into_owned();
    let args: Vec<String> = [
        "world",
        "replay",
        &folder_arg,
        "--url",
        &app.base,
        "--key",
        OPERATOR,
        "--wait",
        "60",
    ]
    .map(String::from)
    .to_vec();
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::support::process::command(&args)
            .output()
            .expect("runs")
    })
    .await
    .expect("joined");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "the draft replayed over {} recorded decisions (stopped by end)",
            requests.len()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("({changed} of {})", requests.len())),
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("  ") && l.contains(" GREEN "))
        .unwrap_or_else(|| panic!("no row for the rule: {stdout}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells[..4],
        [
            green.to_string().as_str(),
            "GREEN",
            "YELLOW",
            "standard-release"
        ],
        "{stdout}"
    );
    assert!(stderr.contains("uploaded"), "{stderr}");

    // A key that may not author the world is refused with the server's reason.
    let reader = app.key(Some(WORLD), &[Scope::Read]).await;
    let args = [
        "world",
        "replay",
        &folder_arg,
        "--url",
        &app.base,
        "--key",
        &reader,
    ];
    let out = crate::support::process::command(&args)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("403"));
    app.stop().await;
}

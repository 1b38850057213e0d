//! The World Agent across real processes, on both backends: `spectral api` and `spectral
//! workers` apart, the workers killed with SIGKILL in the middle of a run and started again
//! (the run resumes from its checkpoint and ends with one candidate and no event twice), and
//! two workers racing for one run (one advances it, the other backs off), and a chat turn
//! followed from the API process while the workers process answers it, cut and resumed with
//! `Last-Event-ID` (on Postgres, the stream is woken by the workers' notifications).

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::agent::{cases, rule, ACTION, GOOD, INPUTS, TEXT};
use crate::agent_api::{parse_sse, reply, stream, Sse};
use crate::app::{Backend, Db, OPERATOR};
use crate::llm::Llm;
use crate::support::eventually;
use crate::support::predicates_dir;
use crate::support::process::Process;

const WORLD: &str = "globex-support";

fn env(db: &Db, llm: &Llm) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("SPECTRAL_LOG_FORMAT", "json".to_string()),
        ("SPECTRAL_LOG", "info".into()),
        ("SPECTRAL_GENERATION", "1".into()),
        ("SPECTRAL_SANDBOX_DEADLINE_US", "500000".into()),
        ("SPECTRAL_SANDBOX_DECISION_DEADLINE_US", "5000000".into()),
        ("SPECTRAL_AGENT_BASE_URL", llm.base_url.clone()),
        ("SPECTRAL_AGENT_MODEL", "stand-in-1".into()),
        ("SPECTRAL_AGENT_RETRY_BASE_MS", "1".into()),
        ("SPECTRAL_AGENT_RETRY_CAP_MS", "5".into()),
        // A dead worker's run comes back within a second and a half.
        ("SPECTRAL_AGENT_LEASE_MS", "1500".into()),
        ("SPECTRAL_AGENT_POLL_MS", "200".into()),
        ("SPECTRAL_OUTBOX_POLL_MS", "200".into()),
    ];
    match (db.postgres_url(), db.sqlite_file()) {
        (Some(url), _) => env.push(("DATABASE_URL", url.to_string())),
        (None, Some(file)) => env.push((
            "SPECTRAL_DATA_DIR",
            file.parent().expect("dir").display().to_string(),
        )),
        (None, None) => unreachable!("a database is one or the other"),
    }
    env
}

async fn start_api(db: &Db, llm: &Llm, dir: &std::path::Path) -> (Process, String) {
    let mut env = env(db, llm);
    env.extend([
        ("SPECTRAL_ADDR", "127.0.0.1:0".to_string()),
        ("SPECTRAL_ADMIN_ADDR", "127.0.0.1:0".to_string()),
        ("SPECTRAL_SEED_DIR", predicates_dir().display().to_string()),
        ("SPECTRAL_OPERATOR_KEY", OPERATOR.into()),
    ]);
    let api = Process::spawn(&["api"], &env, dir);
    let base = api.ready().await;
    (api, base)
}

async fn start_run(base: &str) -> String {
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/worlds/{WORLD}/agent/runs"))
        .bearer_auth(OPERATOR)
        .json(&json!({"action": ACTION, "text": TEXT}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 202);
    let body: Value = resp.json().await.expect("json");
    body["run"].as_str().expect("run").to_string()
}

/// The run's whole log, read as a stream that ends with the run.
async fn log(base: &str, run: &str) -> Vec<Sse> {
    let (status, _, events) = stream(
        base,
        Method::GET,
        &format!("/api/worlds/{WORLD}/agent/runs/{run}/events"),
        OPERATOR,
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    events
}

fn started_nodes(events: &[Sse]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event == "node_started")
        .filter_map(|e| e.data["data"]["node"].as_str().map(String::from))
        .collect()
}

/// Exactly one candidate, proposed, from `run`.
async fn assert_one_candidate(base: &str, run: &str) {
    let resp = reqwest::Client::new()
        .get(format!("{base}/api/worlds/{WORLD}/agent/candidates"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .expect("sent");
    let body: Value = resp.json().await.expect("json");
    let candidates = body["candidates"].as_array().cloned().unwrap_or_default();
    assert_eq!(candidates.len(), 1, "{body}");
    assert_eq!(candidates[0]["run_thread"], run);
    assert_eq!(candidates[0]["status"], "proposed");
}

async fn a_run_whose_worker_is_killed_resumes_from_its_checkpoint_and_proposes_once(
    backend: Backend,
) {
    let db = Db::fresh(backend).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The cases call of the first worker never answers before the kill; the second worker's
    // is answered at once.
    let llm = Llm::start(vec![
        rule(GOOD, &INPUTS),
        cases().first_delay(Duration::from_secs(20)),
        cases(),
    ])
    .await;
    let (mut api, base) = start_api(&db, &llm, dir.path()).await;
    let mut workers = Process::spawn(&["workers"], &env(&db, &llm), dir.path());
    let run = start_run(&base).await;
    llm.wait_for(Duration::from_secs(60), "the cases call", |l| {
        l.received().len() >= 2
    })
    .await;
    workers.kill();
    let store = db.store().await;
    let thread = store.thread(&run).await.expect("thread").expect("the run");
    assert_eq!(thread.status, "running", "the run was cut in the middle");
    let before = store
        .latest_checkpoint(&run)
        .await
        .expect("checkpoint")
        .expect("a checkpoint after draft");
    assert_eq!(
        before.node, "draft",
        "the draft was checkpointed, the cases not"
    );

    let mut workers = Process::spawn(&["workers"], &env(&db, &llm), dir.path());
    let events = log(&base, &run).await;
    let ids: Vec<u64> = events.iter().filter_map(|e| e.id).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "no event twice"
    );
    assert_eq!(
        started_nodes(&events),
        ["intake", "draft", "derive_cases", "verify", "propose"],
        "each node once in the log: the cut node's events were never kept"
    );
    assert_eq!(
        events.last().expect("events").data["data"]["status"],
        "proposed"
    );
    assert_eq!(
        llm.received().len(),
        3,
        "the draft was not asked again; the cut call was"
    );
    assert_one_candidate(&base, &run).await;
    let thread = store.thread(&run).await.expect("thread").expect("the run");
    assert_eq!(thread.status, "proposed");
    assert!(thread.fence >= 2, "the second worker took the lease over");
    workers.kill();
    api.kill();
}

async fn two_workers_racing_for_one_run_advance_it_once(backend: Backend) {
    let db = Db::fresh(backend).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let llm = Llm::start(vec![rule(GOOD, &INPUTS), cases()]).await;
    let (mut api, base) = start_api(&db, &llm, dir.path()).await;
    let mut one = Process::spawn(&["workers"], &env(&db, &llm), dir.path());
    let mut two = Process::spawn(&["workers"], &env(&db, &llm), dir.path());
    for w in [&one, &two] {
        w.logged("World Agent runner started").await;
    }
    let run = start_run(&base).await;
    let events = log(&base, &run).await;
    let ids: Vec<u64> = events.iter().filter_map(|e| e.id).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "no event twice"
    );
    assert_eq!(
        started_nodes(&events),
        ["intake", "draft", "derive_cases", "verify", "propose"]
    );
    assert_eq!(llm.received().len(), 2, "one worker advanced the run");
    assert_one_candidate(&base, &run).await;
    // The run took one lease: the other worker never held it.
    let store = db.store().await;
    let thread = eventually(Duration::from_secs(10), "the run ended", || async {
        store
            .thread(&run)
            .await
            .ok()
            .flatten()
            .filter(|t| t.status != "running")
    })
    .await;
    assert_eq!(thread.fence, 1, "{thread:?}");
    one.kill();
    two.kill();
    api.kill();
}

/// Read events from an open stream until one of kind `until` (included) has arrived.
async fn read_until(resp: &mut reqwest::Response, until: &str) -> Vec<Sse> {
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let chunk = resp.chunk().await.expect("read").expect("open until then");
            text.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
            // Only whole events count: the text up to the last blank line.
            if let Some(end) = text.rfind("\n\n") {
                let events = parse_sse(&text[..end + 2]);
                if let Some(at) = events.iter().position(|e| e.event == until) {
                    return events[..=at].to_vec();
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no '{until}' event within a minute"))
}

async fn a_chat_turn_followed_across_processes_resumes_with_last_event_id(backend: Backend) {
    let db = Db::fresh(backend).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let answer = "Refunds above the order total are refused, whoever asks for them.";
    // A paced answer; the client is cut after the first token it reads and reconnects.
    let llm = Llm::start(vec![reply(answer).between(Duration::from_millis(40))]).await;
    let (mut api, base) = start_api(&db, &llm, dir.path()).await;
    let mut workers = Process::spawn(&["workers"], &env(&db, &llm), dir.path());
    workers.logged("World Agent runner started").await;

    let thread = format!("/api/worlds/{WORLD}/agent/threads/support-7");
    let mut resp = reqwest::Client::new()
        .post(format!("{base}{thread}/messages"))
        .bearer_auth(OPERATOR)
        .json(&json!({"text": "Which refunds are refused?"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 200);
    let first = read_until(&mut resp, "token").await;
    drop(resp);
    let seen = first.last().and_then(|e| e.id).expect("an id");
    let (status, _, rest) = stream(
        &base,
        Method::GET,
        &format!("{thread}/events"),
        OPERATOR,
        None,
        Some(seen),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        rest.first().and_then(|e| e.id),
        Some(seen + 1),
        "the reconnect starts right after the last event seen"
    );
    assert_eq!(rest.last().expect("events").event, "turn_finished");
    let all: Vec<Sse> = first.into_iter().chain(rest).collect();
    let ids: Vec<u64> = all.iter().filter_map(|e| e.id).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "nothing missed, nothing twice"
    );
    let tokens: String = all
        .iter()
        .filter(|e| e.event == "token")
        .filter_map(|e| e.data["data"]["text"].as_str())
        .collect();
    let tokens: Value = serde_json::from_str(&tokens).expect("the tokens join to the call");
    assert_eq!(tokens["text"], answer, "tokens in order");

    // The API process followed a thread another process wrote: on Postgres it was told by
    // notifications; on SQLite, which has none, it looked.
    let admin = api.logged("spectral API listening").await["admin_addr"]
        .as_str()
        .expect("admin_addr")
        .to_string();
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let wakes = |by: &str| -> u64 {
        let series = format!("spectral_agent_stream_wakes_total{{by=\"{by}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    match backend {
        Backend::Postgres => assert!(wakes("notification") > 0, "{metrics}"),
        Backend::Sqlite => {
            assert_eq!(wakes("notification"), 0, "{metrics}");
            assert!(wakes("poll") > 0, "{metrics}");
        }
    }
    workers.kill();
    api.kill();
}

crate::both_backends!(
    a_run_whose_worker_is_killed_resumes_from_its_checkpoint_and_proposes_once,
    two_workers_racing_for_one_run_advance_it_once,
    a_chat_turn_followed_across_processes_resumes_with_last_event_id,
);

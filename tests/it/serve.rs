//! The `spectral` binary as an operator runs it: `serve` with zero configuration, SIGTERM,
//! `keys create`, `world push`, `migrate` and `audit verify`.

use std::time::Duration;

use crate::app::green_wire;
use crate::support::process::command;
use crate::support::{eventually, predicates_dir, Process};

/// A `spectral serve` process on a free port with its own data directory.
struct Server {
    process: Process,
    base: String,
    operator_key: String,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Start `spectral serve` in an empty working directory, configured only with a data
    /// directory, a port and the example worlds; read the address and the generated operator
    /// key from its output.
    async fn start(data: &std::path::Path, dir: tempfile::TempDir) -> Self {
        Self::start_with(data, dir, &[]).await
    }

    /// [`Server::start`] with more environment variables.
    async fn start_with(
        data: &std::path::Path,
        dir: tempfile::TempDir,
        env: &[(&str, &str)],
    ) -> Self {
        let mut all = vec![
            ("SPECTRAL_ADDR", "127.0.0.1:0".to_string()),
            ("SPECTRAL_DATA_DIR", data.display().to_string()),
            ("SPECTRAL_SEED_DIR", predicates_dir().display().to_string()),
            ("SPECTRAL_LOG_FORMAT", "json".to_string()),
        ];
        all.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
        let process = Process::spawn(&["serve"], &all, dir.path());
        let base = process.ready().await;
        let operator_key = process
            .printed("the operator key", |line| {
                line.strip_prefix("operator key (shown once, store it now): ")
                    .map(|k| k.trim().to_string())
            })
            .await;
        Self {
            process,
            base,
            operator_key,
            _dir: dir,
        }
    }

    async fn terminate(&mut self) -> (Option<i32>, Duration) {
        self.process.terminate(Duration::from_secs(60)).await
    }
}

fn spectral(args: &[&str], data: &std::path::Path) -> (i32, String, String) {
    let out = command(args)
        .env("SPECTRAL_DATA_DIR", data)
        .env("SPECTRAL_LOG", "warn")
        .output()
        .expect("spectral runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_zero_configuration_answers_and_stops_on_sigterm() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(data.path(), tempfile::tempdir().expect("tempdir")).await;
    let client = reqwest::Client::new();
    let health: serde_json::Value = client
        .get(format!("{}/health", server.base))
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["features"]["store"]["backend"], "sqlite");
    assert_eq!(health["features"]["worlds"]["state"], "ok", "{health}");
    // The example worlds are seeded: the operator sees them (the public health names none).
    let worlds: serde_json::Value = client
        .get(format!("{}/api/worlds", server.base))
        .bearer_auth(&server.operator_key)
        .send()
        .await
        .expect("worlds")
        .json()
        .await
        .expect("json");
    assert_eq!(worlds.as_array().map(Vec::len), Some(3), "{worlds}");
    let resp = client
        .post(format!("{}/api/decide", server.base))
        .bearer_auth(&server.operator_key)
        .json(&green_wire())
        .send()
        .await
        .expect("decide");
    assert_eq!(resp.status().as_u16(), 200);
    let (code, took) = server.terminate().await;
    assert_eq!(code, Some(0), "a graceful stop exits 0");
    assert!(took < Duration::from_secs(30), "{took:?}");
    // The decision was written before the process exited, and its chain verifies.
    let (code, stdout, stderr) = spectral(
        &["audit", "verify", "--world", "acme-payments"],
        data.path(),
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("chain intact (1 records)"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_push_and_migrate_from_the_command_line() {
    let data = tempfile::tempdir().expect("tempdir");
    let (code, out, err) = spectral(&["migrate"], data.path());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("migrations applied"));
    let (code, key, err) = spectral(
        &[
            "keys",
            "create",
            "--world",
            "acme-payments",
            "--scopes",
            "decide,read,author,deploy,pin",
        ],
        data.path(),
    );
    assert_eq!(code, 0, "{err}");
    let key = key.trim().to_string();
    assert!(key.starts_with("spk_"), "{key}");
    assert!(
        err.contains("world 'acme-payments'") && err.contains("decide,read,author,deploy,pin"),
        "{err}"
    );
    let (code, _, err) = spectral(
        &["keys", "create", "--world", "x", "--scopes", "fly"],
        data.path(),
    );
    assert_eq!(code, 2);
    assert!(err.contains("unknown scope 'fly'"), "{err}");

    // A server on the same data; the world key pushes a new version of its world.
    let mut server = Server::start(data.path(), tempfile::tempdir().expect("tempdir")).await;
    let (code, out, err) = spectral(
        &[
            "world",
            "push",
            &predicates_dir().join("acme-payments").to_string_lossy(),
            "--url",
            &server.base,
            "--key",
            &key,
            "--deploy",
        ],
        data.path(),
    );
    assert_eq!(code, 0, "{out}{err}");
    // The seeded version 1 exists already, so the push publishes version 2.
    assert!(out.contains("acme-payments: published version 2"), "{out}");
    assert!(out.contains("acme-payments: deployed version 2"), "{out}");
    let client = reqwest::Client::new();
    let mut body = green_wire();
    body.as_object_mut().expect("object").remove("world");
    let d: serde_json::Value = client
        .post(format!("{}/api/decide", server.base))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .expect("decide")
        .json()
        .await
        .expect("json");
    assert_eq!(d["decision_metadata"]["world_model_version"], 2, "{d}");
    // A push of a world the key does not own is refused with the server's reason.
    let (code, _, err) = spectral(
        &[
            "world",
            "push",
            &predicates_dir().join("globex-support").to_string_lossy(),
            "--url",
            &server.base,
            "--key",
            &key,
        ],
        data.path(),
    );
    assert_ne!(code, 0);
    assert!(err.contains("403"), "{err}");
    // Version 1 was rolled forward from: retire it. The deployed version 2 is refused.
    let retire = |version: &str| {
        spectral(
            &[
                "world",
                "retire",
                "--url",
                &server.base,
                "--key",
                &key,
                "--world",
                "acme-payments",
                "--version",
                version,
                "--reason",
                "superseded",
            ],
            data.path(),
        )
    };
    let (code, out, err) = retire("1");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("acme-payments: retired version 1"), "{out}");
    let (code, _, err) = retire("2");
    assert_ne!(code, 0);
    assert!(
        err.contains("409") && err.contains("deployed version"),
        "{err}"
    );
    body["world_model_version"] = serde_json::json!(1);
    let resp = client
        .post(format!("{}/api/decide", server.base))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .expect("decide");
    assert_eq!(resp.status().as_u16(), 410);
    server.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_can_be_listed_replayed_and_adopted_from_the_command_line() {
    use spectral::store::{NewEvent, Store};
    let data = tempfile::tempdir().expect("tempdir");
    let mut config = spectral::config::Config::default().store;
    config.data_dir = data.path().to_path_buf();
    let store = Store::connect(&config).await.expect("store");
    store.set_generation(5);
    let event = |k: &str| NewEvent {
        event_type: "test.event".into(),
        world: None,
        payload: serde_json::json!({}),
        idempotency_key: k.into(),
        target: None,
    };
    store
        .enqueue(&[event("a"), event("b")])
        .await
        .expect("enqueue");
    let claimed = store.claim(5, "w", 1).await.expect("claim");
    store
        .fail(&claimed[0], "w", "subscriber refused it", None)
        .await
        .expect("fail");
    store.close().await;

    let (code, out, err) = spectral(&["outbox", "list", "--status", "failed"], data.path());
    assert_eq!(code, 0, "{err}");
    let line = out.lines().next().unwrap_or("");
    assert!(
        line.contains("failed") && line.contains("gen 5") && line.contains("subscriber refused it"),
        "{out}"
    );
    let id = line.split('\t').next().expect("id").to_string();
    let (code, out, _) = spectral(&["outbox", "replay", &id], data.path());
    assert_eq!(code, 0);
    assert!(out.contains(&format!("row {id} is pending again")));
    let (code, _, err) = spectral(&["outbox", "replay", &id], data.path());
    assert_ne!(code, 0, "only a failed row can be replayed");
    assert!(err.contains("not found"), "{err}");
    let (_, out, _) = spectral(
        &["outbox", "list", "--status", "pending", "--generation", "5"],
        data.path(),
    );
    assert_eq!(out.lines().count(), 2, "{out}");
    let (code, out, _) = spectral(
        &[
            "outbox",
            "adopt",
            "--from-generation",
            "5",
            "--to-generation",
            "6",
        ],
        data.path(),
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("2 row(s) of generation 5 adopted by generation 6"),
        "{out}"
    );
    let (_, out, _) = spectral(&["outbox", "list", "--generation", "6"], data.path());
    assert_eq!(out.lines().count(), 2, "{out}");
    let (code, _, err) = spectral(&["outbox", "list", "--status", "lost"], data.path());
    assert_eq!(code, 2);
    assert!(err.contains("unknown status 'lost'"), "{err}");
}

/// `(thread name, nice value)` of every thread of a process, from /proc.
#[cfg(target_os = "linux")]
fn thread_priorities(pid: u32) -> Vec<(String, i64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc lists the threads");
    tasks
        .filter_map(|t| {
            let t = t.ok()?.path();
            let name = std::fs::read_to_string(t.join("comm"))
                .ok()?
                .trim()
                .to_string();
            let stat = std::fs::read_to_string(t.join("stat")).ok()?;
            // Fields after the parenthesised name start with the 3rd; nice is the 19th.
            let nice = stat.rsplit_once(") ")?.1.split(' ').nth(16)?.parse().ok()?;
            Some((name, nice))
        })
        .collect()
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_threads_run_below_the_api_and_their_database_threads_too() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(
        data.path(),
        tempfile::tempdir().expect("tempdir"),
        &[("SPECTRAL_BACKGROUND_NICE", "7")],
    )
    .await;
    // The writer and the workers open their connections after the API is up; wait for them.
    let threads = eventually(
        Duration::from_secs(30),
        "the writer's thread and three SQLite threads",
        || async {
            let threads = thread_priorities(server.process.id());
            let sqlite = threads
                .iter()
                .filter(|(n, _)| n == "sqlx-sqlite-wor")
                .count();
            let log = threads.iter().any(|(n, _)| n == "spectral-log");
            (log && sqlite >= 3).then_some(threads)
        },
    )
    .await;
    let nice_of = |name: &str| -> Vec<i64> {
        threads
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, nice)| *nice)
            .collect()
    };
    let base = nice_of("spectral")[0];
    assert!(
        base <= 12,
        "the test needs room below the process's nice value {base}"
    );
    let background = base + 7;
    assert!(!nice_of("spectral-api").is_empty(), "{threads:?}");
    assert!(
        nice_of("spectral-api").iter().all(|n| *n == base),
        "{threads:?}"
    );
    // Thread names are cut to 15 bytes: "spectral-workers" reads as "spectral-worker".
    for name in ["spectral-log", "spectral-worker"] {
        let found = nice_of(name);
        assert!(!found.is_empty(), "no {name} thread: {threads:?}");
        assert!(
            found.iter().all(|n| *n == background),
            "{name}: {threads:?}"
        );
    }
    // SQLite runs each connection on a thread of its own, started by whoever opens it: the
    // API's pool at the API's priority, the writer's and the workers' at theirs.
    let sqlite = nice_of("sqlx-sqlite-wor");
    assert!(sqlite.contains(&base), "{threads:?}");
    assert!(
        sqlite.iter().filter(|n| **n == background).count() >= 2,
        "{threads:?}"
    );
}

/// A generation belongs to the build, not the process: after kill -9, the same build started
/// again goes on with its generation and handles the rows the dead process left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_kill_9_resumes_the_generation_and_strands_nothing() {
    use spectral::store::{decision_recorded, OutboxStatus, Store};
    let data = tempfile::tempdir().expect("tempdir");
    let client = reqwest::Client::new();
    let generation_of = |base: String| {
        let client = client.clone();
        async move {
            let health: serde_json::Value = client
                .get(format!("{base}/health"))
                .send()
                .await
                .expect("health")
                .json()
                .await
                .expect("json");
            health["generation"].as_i64().expect("a generation")
        }
    };
    let mut first = Server::start(data.path(), tempfile::tempdir().expect("tempdir")).await;
    let generation = generation_of(first.base.clone()).await;
    first.process.kill();
    assert_eq!(first.process.exited(Duration::from_secs(30)).await, None);

    // What the dead process left: a batch's event, committed and never handled.
    let mut config = spectral::config::Config::default().store;
    config.data_dir = data.path().to_path_buf();
    let store = Store::connect(&config).await.expect("store");
    store.set_generation(generation);
    let left =
        decision_recorded("acme-payments", 1_000, 1_006, [("*", "GREEN", 7)]).expect("event");
    store.enqueue(&[left]).await.expect("enqueue");
    assert_eq!(
        store
            .outbox_counts(generation)
            .await
            .expect("counts")
            .pending,
        1
    );

    // Started again as before; the operator key exists, so none is printed this time.
    let cwd = tempfile::tempdir().expect("tempdir");
    let env = [
        ("SPECTRAL_ADDR", "127.0.0.1:0".to_string()),
        ("SPECTRAL_DATA_DIR", data.path().display().to_string()),
        ("SPECTRAL_SEED_DIR", predicates_dir().display().to_string()),
        ("SPECTRAL_LOG_FORMAT", "json".to_string()),
    ];
    let second = Process::spawn(&["serve"], &env, cwd.path());
    let base = second.ready().await;
    assert_eq!(
        generation_of(base).await,
        generation,
        "the same build resumes its generation"
    );
    eventually(Duration::from_secs(30), "the left row handled", || {
        let store = store.clone();
        async move {
            let counts = store.outbox_counts(generation).await.expect("counts");
            let failed = store
                .outbox_list(Some(OutboxStatus::Failed), None, 10)
                .await
                .expect("list");
            assert!(failed.is_empty(), "{failed:?}");
            (counts.pending == 0 && counts.in_flight == 0 && counts.other_generations == 0)
                .then_some(())
        }
    })
    .await;
    store.close().await;
}

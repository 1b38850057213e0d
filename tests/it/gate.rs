//! `spectral gate` as a deploy runs it: the binary polling a real server's `/health`, through
//! a server that is live, one that runs another build, one that comes up late, one that stays
//! unhealthy and one that never answers.

use std::path::Path;
use std::time::{Duration, Instant};

use sqlx::Connection;

use crate::app::{test_config, Backend, Db, TestApp};
use crate::support::process::command;
use crate::support::Process;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What a finished gate said.
struct Verdict {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// `spectral gate --url <url> <args>`, as a process, off the test's runtime threads.
async fn gate(url: &str, args: &[&str]) -> Verdict {
    let mut command = command(&["gate", "--url", url]);
    command.args(args);
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let out = command.output().expect("spectral gate runs");
        Verdict {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: started.elapsed(),
        }
    })
    .await
    .expect("gate thread")
}

fn git_sha() -> &'static str {
    spectral::service::BuildInfo::current().git_sha
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_on_the_right_version() {
    let db = Db::fresh(Backend::Sqlite).await;
    let app = TestApp::on(&db).await;
    let v = gate(
        &app.base,
        &[
            "--expect-version",
            VERSION,
            "--expect-sha",
            git_sha(),
            "--require",
            "store.backend=sqlite",
            "--require",
            "store.reachable=true",
            "--timeout",
            "20s",
            "--interval",
            "100ms",
        ],
    )
    .await;
    assert_eq!(v.code, Some(0), "{}{}", v.stdout, v.stderr);
    assert!(
        v.stdout
            .contains(&format!("live: version {VERSION}, git_sha {}", git_sha())),
        "{}",
        v.stdout
    );
    assert!(v.stdout.contains("(attempt 1)"), "{}", v.stdout);
    assert!(!v.stderr.contains("attempt"), "{}", v.stderr);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_on_a_wrong_version_sha_or_feature() {
    let db = Db::fresh(Backend::Sqlite).await;
    let app = TestApp::on(&db).await;
    let v = gate(
        &app.base,
        &[
            "--expect-version",
            "0.0.0-other",
            "--timeout",
            "1s",
            "--interval",
            "200ms",
        ],
    )
    .await;
    assert_eq!(v.code, Some(1), "{}{}", v.stdout, v.stderr);
    let wrong = format!("version {VERSION} != expected 0.0.0-other");
    assert!(
        v.stderr.contains(&format!("attempt 1: {wrong}"))
            && v.stderr.contains(&format!("attempt 2: {wrong}")),
        "{}",
        v.stderr
    );
    assert!(
        v.stderr
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("gate closed: not live after") && l.ends_with(&wrong)),
        "{}",
        v.stderr
    );
    assert!(v.stdout.is_empty(), "{}", v.stdout);
    assert!(v.took >= Duration::from_secs(1), "{:?}", v.took);
    assert!(v.took < Duration::from_secs(15), "{:?}", v.took);

    // A zero timeout makes exactly one attempt.
    let v = gate(
        &app.base,
        &[
            "--expect-version",
            VERSION,
            "--expect-sha",
            "0000000",
            "--timeout",
            "0s",
        ],
    )
    .await;
    assert_eq!(v.code, Some(1));
    assert!(
        v.stderr.contains(&format!(
            "attempt 1: git_sha {} != expected 0000000",
            git_sha()
        )),
        "{}",
        v.stderr
    );
    assert!(!v.stderr.contains("attempt 2"), "{}", v.stderr);

    let v = gate(
        &app.base,
        &["--require", "store.backend=postgres", "--timeout", "0s"],
    )
    .await;
    assert_eq!(v.code, Some(1));
    assert!(
        v.stderr
            .contains("attempt 1: feature store.backend is sqlite, required postgres"),
        "{}",
        v.stderr
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_through_a_server_that_comes_up_late() {
    // Reserve a port, then free it: the gate starts against a port where nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let mut gate = Process::spawn(
        &[
            "gate",
            "--url",
            &base,
            "--expect-version",
            VERSION,
            "--timeout",
            "120s",
            "--interval",
            "100ms",
        ],
        &[],
        Path::new(env!("CARGO_MANIFEST_DIR")),
    );
    // The gate's own report of a refused attempt is the signal that it began polling.
    let first = gate
        .printed("its first attempt", |l| {
            l.starts_with("attempt ").then(|| l.to_string())
        })
        .await;
    assert!(first.starts_with("attempt 1: cannot connect"), "{first}");

    let db = Db::fresh(Backend::Sqlite).await;
    let mut config = test_config(&db);
    config.server.addr = format!("127.0.0.1:{port}").parse().expect("addr");
    let app = TestApp::start(config).await;

    let code = gate.exited(Duration::from_secs(120)).await;
    let output = gate.output().join("\n");
    assert_eq!(code, Some(0), "{output}");
    let stdout = gate
        .output()
        .into_iter()
        .find(|l| l.starts_with("live: "))
        .unwrap_or_default();
    assert!(
        stdout.starts_with(&format!("live: version {VERSION}")),
        "{output}"
    );
    // It passed on a later attempt than the refused one it reported.
    let passed_on: u32 = stdout
        .trim()
        .rsplit_once("(attempt ")
        .and_then(|(_, n)| n.trim_end_matches(')').parse().ok())
        .expect("attempt number");
    assert!(passed_on >= 2, "{stdout}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_on_a_server_that_stays_unhealthy() {
    let db = Db::fresh(Backend::Sqlite).await;
    let a = TestApp::on(&db).await;
    a.stop().await;
    // Corrupt the payments world's stored modules behind the service's back: every instance
    // refuses to serve a module whose content does not match its hash, and is not ready.
    let file = db.sqlite_file().expect("sqlite");
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display()))
        .await
        .expect("connect");
    sqlx::raw_sql(
        "DROP TRIGGER modules_immutable; \
         UPDATE modules \
         SET content = CAST(replace(CAST(content AS TEXT), 'standard-release', 'standard-relaxed') AS BLOB) \
         WHERE hash IN (SELECT module_hash FROM version_modules WHERE world = 'acme-payments')",
    )
    .execute(&mut c)
    .await
    .expect("corrupt modules");
    c.close().await.expect("close");

    let mut config = test_config(&db);
    config.bootstrap.seed_dir = None;
    let b = TestApp::start(config).await;
    let (status, health) = b.get(None, "/health").await;
    assert_eq!(status, 503, "{health}");

    let v = gate(
        &b.base,
        &[
            "--expect-version",
            VERSION,
            "--timeout",
            "2s",
            "--interval",
            "200ms",
        ],
    )
    .await;
    assert_eq!(v.code, Some(1), "{}{}", v.stdout, v.stderr);
    // The public health says worlds fail, never which.
    let reason = "503 unavailable: worlds failing";
    assert!(
        v.stderr.contains(&format!("attempt 1: {reason}")),
        "{}",
        v.stderr
    );
    assert!(
        v.stderr.lines().last().is_some_and(|l| l.ends_with(reason)),
        "{}",
        v.stderr
    );
    assert!(v.took >= Duration::from_secs(2), "{:?}", v.took);
    assert!(v.took < Duration::from_secs(20), "{:?}", v.took);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_cannot_hold_the_gate_open() {
    // Bound but never accepting: connections complete in the kernel and then hear nothing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", silent.local_addr().expect("addr"));
    let v = gate(&base, &["--timeout", "1s", "--interval", "100ms"]).await;
    assert_eq!(v.code, Some(1), "{}{}", v.stdout, v.stderr);
    assert!(
        v.stderr.contains("attempt 1: no answer within"),
        "{}",
        v.stderr
    );
    assert!(v.took < Duration::from_secs(10), "{:?}", v.took);
    drop(silent);
}

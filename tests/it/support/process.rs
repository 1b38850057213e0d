//! The one way a test runs the `spectral` binary: a [`command`] with only the environment the
//! test sets, and a [`Process`] for the long-running commands (`serve`, `api`, `workers`)
//! that waits on what the process prints, stops it with SIGTERM or SIGKILL, keeps its output
//! for the failure message and is killed when dropped, so a failing test leaves nothing
//! running.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;

/// How long a process has to print what a test waits for.
const PRINTS_WITHIN: Duration = Duration::from_secs(60);

/// `spectral` with these arguments and nothing of the caller's configuration (no
/// `SPECTRAL_*`, no `DATABASE_URL`), with the sandbox deadlines of the tests: an unoptimized
/// build on a busy machine is slow (see `app::test_config`). Set more with `.env`.
pub fn command(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_spectral"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("SPECTRAL_") || k == "DATABASE_URL" {
            cmd.env_remove(k);
        }
    }
    // Processes run side by side: each admin listener takes a port of its own.
    cmd.env("SPECTRAL_ADMIN_ADDR", "127.0.0.1:0")
        .env("SPECTRAL_SANDBOX_DEADLINE_US", "500000")
        .env("SPECTRAL_SANDBOX_DECISION_DEADLINE_US", "5000000");
    cmd
}

/// A running `spectral` process.
pub struct Process {
    name: String,
    child: Child,
    /// Every line of stdout and stderr, in the order they were read.
    output: Arc<Mutex<Vec<String>>>,
    /// The number of lines read so far; changes with every line, and closes when both
    /// streams have, which is when the process has exited.
    lines: watch::Receiver<usize>,
    started: Instant,
}

impl Process {
    /// Start `spectral` with `args`, the environment `env` (over [`command`]'s) and the working
    /// directory `dir`.
    pub fn spawn(args: &[&str], env: &[(&str, String)], dir: &Path) -> Self {
        let mut cmd = command(args);
        cmd.current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spectral starts");
        let started = Instant::now();
        let output: Arc<Mutex<Vec<String>>> = Arc::default();
        let (count, lines) = watch::channel(0usize);
        let count = Arc::new(count);
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("stdout"));
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("stderr"));
        for stream in [out, err] {
            let (output, count) = (output.clone(), count.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    output.lock().expect("lock").push(line);
                    count.send_modify(|n| *n += 1);
                }
            });
        }
        Self {
            name: format!("spectral {} ({})", args.join(" "), child.id()),
            child,
            output,
            lines,
            started,
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// When the process was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Every line the process printed so far, stdout and stderr.
    pub fn output(&self) -> Vec<String> {
        self.output.lock().expect("lock").clone()
    }

    /// Wait until the process has printed a line `pick` accepts, and return what it made of
    /// it. Woken by each line printed, not by a clock; fails when the output closes or a
    /// minute passes first.
    pub async fn printed<T>(&self, what: &str, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let mut lines = self.lines.clone();
        let mut seen = 0;
        let found = tokio::time::timeout(PRINTS_WITHIN, async {
            loop {
                lines.borrow_and_update();
                let output = self.output();
                if let Some(found) = output[seen..].iter().find_map(|l| pick(l)) {
                    return Some(found);
                }
                seen = output.len();
                if lines.changed().await.is_err() {
                    // The output closed; the lines read before it closed were checked above
                    // unless they came in meanwhile.
                    return self.output()[seen..].iter().find_map(|l| pick(l));
                }
            }
        })
        .await;
        match found {
            Ok(Some(found)) => found,
            Ok(None) => panic!("{} exited without printing {what}", self.name),
            Err(_) => panic!(
                "{} did not print {what} within {PRINTS_WITHIN:?}",
                self.name
            ),
        }
    }

    /// Wait for a JSON log line with this message; return it.
    pub async fn logged(&self, message: &str) -> Value {
        self.printed(&format!("the log line '{message}'"), |line| {
            serde_json::from_str::<Value>(line)
                .ok()
                .filter(|v| v["message"] == message)
        })
        .await
    }

    /// Wait until the API listens and `/health` answers 200; return its base URL. The
    /// process must log JSON (`SPECTRAL_LOG_FORMAT=json`).
    pub async fn ready(&self) -> String {
        let listening = self.logged("spectral API listening").await;
        let base = format!("http://{}", listening["addr"].as_str().expect("addr"));
        let client = reqwest::Client::new();
        let url = format!("{base}/health");
        super::eventually(PRINTS_WITHIN, "/health answering 200", || async {
            let resp = client.get(&url).send().await.ok()?;
            (resp.status() == 200).then_some(())
        })
        .await;
        base
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL sent");
        self.child.wait().expect("reaped");
    }

    /// Send SIGTERM and wait for the exit, at most `within`; the exit code and how long the
    /// stop took.
    pub async fn terminate(&mut self, within: Duration) -> (Option<i32>, Duration) {
        let sent = Instant::now();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIGTERM sent to {}", self.name);
        let code = self.exited(within).await;
        (code, sent.elapsed())
    }

    /// Wait for the process to exit, at most `within`; its exit code.
    pub async fn exited(&mut self, within: Duration) -> Option<i32> {
        // The output closes when the process exits: that is the signal to wait for.
        let mut lines = self.lines.clone();
        let closed =
            tokio::time::timeout(within, async { while lines.changed().await.is_ok() {} }).await;
        assert!(closed.is_ok(), "{} still runs after {within:?}", self.name);
        self.child.wait().expect("wait").code()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let output = self.output();
            eprintln!("--- last output of {} ---", self.name);
            for line in output.iter().skip(output.len().saturating_sub(40)) {
                eprintln!("{line}");
            }
        }
    }
}

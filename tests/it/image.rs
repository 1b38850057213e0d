//! The image's runtime, replayed outside Docker: this test reads the runtime stage of the
//! top-level `Dockerfile` and does what it says (its files, environment, working directory,
//! user, entrypoint, health check and stop signal) with the binary under test, so that the
//! image is exercised on a machine with no container engine, and the test breaks when the
//! Dockerfile changes in a way it cannot follow.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::app::green_wire;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One `COPY` of the runtime stage.
#[derive(Debug)]
struct CopyStep {
    /// From the build stage (`--from=…`), rather than from the repository.
    from_build: bool,
    /// `--chown=uid:gid`.
    chown: Option<(u32, u32)>,
    sources: Vec<String>,
    dest: String,
}

/// What the runtime stage of the Dockerfile sets up.
#[derive(Debug, Default)]
struct Runtime {
    copies: Vec<CopyStep>,
    env: BTreeMap<String, String>,
    workdir: String,
    user: Option<(u32, u32)>,
    expose: Vec<u16>,
    healthcheck: Vec<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

/// Instructions, one per entry, with continuation lines joined and comments dropped.
fn instructions(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                if !current.trim().is_empty() {
                    out.push(current.trim().to_string());
                }
                current.clear();
            }
        }
    }
    out
}

/// A JSON array of strings: the exec form, which the image must use so that the service is
/// PID 1 and gets SIGTERM itself.
fn exec_form(what: &str, text: &str) -> Vec<String> {
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{what} must be in exec form (a JSON array), not {text:?}: {e}"))
}

fn ids(text: &str) -> (u32, u32) {
    let (u, g) = text.split_once(':').unwrap_or((text, text));
    let n = |s: &str| {
        s.trim().parse::<u32>().unwrap_or_else(|_| {
            panic!("use numeric ids ({text:?}): this test and Kubernetes' runAsNonRoot read them")
        })
    };
    (n(u), n(g))
}

fn parse_runtime(dockerfile: &str) -> Runtime {
    let all = instructions(dockerfile);
    let last_from = all
        .iter()
        .rposition(|i| i.to_ascii_uppercase().starts_with("FROM "))
        .expect("a FROM");
    let mut rt = Runtime {
        workdir: "/".into(),
        ..Default::default()
    };
    for instruction in &all[last_from + 1..] {
        let (keyword, rest) = instruction
            .split_once(char::is_whitespace)
            .unwrap_or((instruction, ""));
        let rest = rest.trim();
        match keyword.to_ascii_uppercase().as_str() {
            "ARG" | "LABEL" => {}
            "COPY" => {
                let mut from_build = false;
                let mut chown = None;
                let mut paths = Vec::new();
                for word in rest.split_whitespace() {
                    if let Some(stage) = word.strip_prefix("--from=") {
                        from_build = !stage.is_empty();
                    } else if let Some(owner) = word.strip_prefix("--chown=") {
                        chown = Some(ids(owner));
                    } else if word.starts_with("--") {
                        panic!("COPY option {word} is not replayed by this test");
                    } else {
                        paths.push(word.to_string());
                    }
                }
                let dest = paths.pop().expect("COPY destination");
                rt.copies.push(CopyStep {
                    from_build,
                    chown,
                    sources: paths,
                    dest,
                });
            }
            "ENV" => {
                for pair in rest.split_whitespace() {
                    let (k, v) = pair.split_once('=').expect("ENV key=value");
                    rt.env.insert(k.into(), v.trim_matches('"').into());
                }
            }
            "WORKDIR" => rt.workdir = rest.into(),
            "USER" => rt.user = Some(ids(rest)),
            "EXPOSE" => rt.expose.extend(
                rest.split_whitespace()
                    .filter_map(|p| p.parse::<u16>().ok()),
            ),
            "HEALTHCHECK" => {
                let (_, cmd) = rest.split_once("CMD ").expect("HEALTHCHECK CMD");
                rt.healthcheck = exec_form("HEALTHCHECK CMD", cmd);
            }
            "ENTRYPOINT" => rt.entrypoint = exec_form("ENTRYPOINT", rest),
            "CMD" => rt.cmd = exec_form("CMD", rest),
            other => panic!(
                "the runtime stage has a {other} instruction, which this test does not replay: \
                 teach tests/it/image.rs what it does"
            ),
        }
    }
    rt
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).expect("mkdir");
        for entry in std::fs::read_dir(from).expect("read dir") {
            let entry = entry.expect("entry");
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
}

fn chown_tree(path: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).expect("chown");
    if path.is_dir() {
        for entry in std::fs::read_dir(path).expect("read dir") {
            chown_tree(&entry.expect("entry").path(), (uid, gid));
        }
    }
}

fn effective_uid() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|u| u.parse().ok())
        })
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// The image's filesystem, laid out under a temporary root.
struct Image {
    root: tempfile::TempDir,
    rt: Runtime,
    /// Run as the image's user (`setpriv`), or as whoever runs the test when that is not
    /// possible.
    as_user: Option<(u32, u32)>,
}

impl Image {
    fn build() -> Self {
        let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
        let rt = parse_runtime(&dockerfile);
        let root = tempfile::tempdir().expect("tempdir");
        // The image's directories are world-readable; so must the stand-in's root be for the
        // image's user to reach them.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let as_user = match (rt.user, effective_uid(), on_path("setpriv")) {
            (Some(user), Some(0), true) => {
                println!("replaying the image as its user {user:?} with setpriv");
                Some(user)
            }
            (Some(user), uid, setpriv) => {
                // Never silent: say which part is not checked, and why.
                println!(
                    "NOTE: the image's user {user:?} is not replayed (uid {uid:?}, setpriv on \
                     PATH: {setpriv}); its file access is not checked in this run"
                );
                None
            }
            (None, ..) => panic!("the runtime stage must set a non-root USER"),
        };
        let image = Self { root, rt, as_user };
        for step in &image.rt.copies {
            let dest = image.path(&step.dest);
            for source in &step.sources {
                if step.from_build {
                    match source.as_str() {
                        "/usr/local/bin/spectral" => {
                            copy_tree(Path::new(env!("CARGO_BIN_EXE_spectral")), &dest)
                        }
                        "/out/data" => std::fs::create_dir_all(&dest).expect("mkdir"),
                        other => panic!(
                            "COPY --from the build stage of {other}: teach tests/it/image.rs \
                             what the build stage puts there"
                        ),
                    }
                } else {
                    let from = repo().join(source);
                    assert!(from.exists(), "COPY {source}: not in the repository");
                    let to = if from.is_dir() || !dest.is_dir() {
                        dest.clone()
                    } else {
                        dest.join(from.file_name().expect("name"))
                    };
                    copy_tree(&from, &to);
                }
            }
            if let (Some(owner), Some(_)) = (step.chown, image.as_user) {
                chown_tree(&dest, owner);
            }
        }
        image
    }

    /// A path of the image, under the stand-in root.
    fn path(&self, image_path: &str) -> PathBuf {
        self.root.path().join(image_path.trim_start_matches('/'))
    }

    /// A command as the image runs it: its user, its working directory, and only its
    /// environment (image paths moved under the root), with `env` changed on top.
    fn command(&self, argv: &[String], env: &BTreeMap<String, String>) -> Command {
        let program = self.path(&argv[0]);
        let mut c = match self.as_user {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(&program);
                c
            }
            None => Command::new(&program),
        };
        c.args(&argv[1..])
            .current_dir(self.path(&self.rt.workdir))
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin");
        for (k, v) in env {
            let v = if v.starts_with('/') {
                self.path(v).to_string_lossy().into_owned()
            } else {
                v.clone()
            };
            c.env(k, v);
        }
        c
    }

    /// Whether the image's user may write to an image path.
    fn user_may_write(&self, image_path: &str) -> bool {
        let (uid, gid) = self.as_user.expect("user");
        Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .args(["--clear-groups", "--", "/usr/bin/test", "-w"])
            .arg(self.path(image_path))
            .status()
            .expect("setpriv runs")
            .success()
    }
}

/// A running `spectral serve` started as the image starts it.
struct Served {
    child: Child,
    base: String,
    operator_key: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(image: &Image, env: &BTreeMap<String, String>) -> Served {
    let argv: Vec<String> = image
        .rt
        .entrypoint
        .iter()
        .chain(&image.rt.cmd)
        .cloned()
        .collect();
    let mut child = image
        .command(&argv, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the entrypoint starts");
    let stdout = child.stdout.take().expect("stdout");
    let (base, operator_key) = crate::app::service_address_and_key(stdout, Duration::from_secs(90));
    Served {
        child,
        base,
        operator_key,
    }
}

#[test]
fn the_dockerfile_runtime_stage_is_what_the_test_replays() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let rt = parse_runtime(&dockerfile);
    assert_eq!(rt.expose, vec![8000]);
    assert_eq!(
        rt.env.get("SPECTRAL_ADDR").map(String::as_str),
        Some("0.0.0.0:8000")
    );
    assert_eq!(rt.entrypoint, vec!["/usr/local/bin/spectral"]);
    assert_eq!(rt.cmd, vec!["serve"]);
    assert!(
        rt.user.is_some_and(|(uid, gid)| uid != 0 && gid != 0),
        "{:?}",
        rt.user
    );
    assert_eq!(
        rt.healthcheck.get(..2),
        Some(&["/usr/local/bin/spectral".to_string(), "gate".into()][..])
    );
    // The binary, the migrations and the example worlds are in the image.
    let dests: Vec<&str> = rt.copies.iter().map(|c| c.dest.as_str()).collect();
    for wanted in [
        "/usr/local/bin/spectral",
        "/app/migrations",
        "/app/predicates",
    ] {
        assert!(dests.contains(&wanted), "{dests:?} lacks {wanted}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_serves_as_its_user_from_its_own_files() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let mut env = parse_runtime(&dockerfile).env;
    // Two departures from the image, both because this is a test: a free loopback port instead
    // of 0.0.0.0:8000 (other tests and services share this machine), and a predicate deadline
    // that an unoptimized build on a busy machine can meet while it seeds the example worlds.
    env.insert("SPECTRAL_ADDR".into(), "127.0.0.1:0".into());
    env.insert("SPECTRAL_ADMIN_ADDR".into(), "127.0.0.1:0".into());
    env.insert("SPECTRAL_SANDBOX_DEADLINE_US".into(), "500000".into());
    env.insert(
        "SPECTRAL_SANDBOX_DECISION_DEADLINE_US".into(),
        "5000000".into(),
    );
    let (image, server) = tokio::task::spawn_blocking({
        let env = env.clone();
        move || {
            let image = Image::build();
            let served = serve(&image, &env);
            (image, served)
        }
    })
    .await
    .expect("serve");

    // Ready, on the embedded store it created in the data directory, with the example worlds
    // seeded from the image's predicates.
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
    assert_eq!(health["features"]["store"]["backend"], "sqlite", "{health}");
    assert_eq!(health["features"]["worlds"]["state"], "ok", "{health}");
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
    let decision = client
        .post(format!("{}/api/decide", server.base))
        .bearer_auth(&server.operator_key)
        .json(&green_wire())
        .send()
        .await
        .expect("decide");
    assert_eq!(decision.status().as_u16(), 200);
    let decision: serde_json::Value = decision.json().await.expect("json");
    assert_eq!(decision["status"], "GREEN", "{decision}");

    // The image's HEALTHCHECK, as Docker would run it inside the container (its URL's port
    // moved to the one this run listens on).
    let port = server.base.rsplit(':').next().expect("port").to_string();
    let check: Vec<String> = image
        .rt
        .healthcheck
        .iter()
        .map(|a| a.replace(":8000", &format!(":{port}")))
        .collect();
    let out = image
        .command(&check, &env)
        .output()
        .expect("healthcheck runs");
    assert!(
        out.status.success(),
        "HEALTHCHECK failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("live: "));

    // The image's user writes its data directory and nothing else of the image.
    if let Some((uid, _)) = image.as_user {
        use std::os::unix::fs::MetadataExt;
        let db = image.path(&env["SPECTRAL_DATA_DIR"]).join("spectral.db");
        let meta = std::fs::metadata(&db).unwrap_or_else(|e| panic!("{}: {e}", db.display()));
        assert_eq!(meta.uid(), uid, "the store was created by the image's user");
        assert!(image.user_may_write(&env["SPECTRAL_DATA_DIR"]));
        for read_only in [
            "/usr/local/bin/spectral",
            "/app/predicates",
            "/app/migrations",
            "/app",
        ] {
            assert!(
                !image.user_may_write(read_only),
                "the image's user may write {read_only}"
            );
        }
    }

    // SIGTERM reaches the service itself (no shell in between) and it stops cleanly.
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let code = tokio::task::spawn_blocking(move || {
        let mut server = server;
        let started = Instant::now();
        (
            server.child.wait().expect("exits").code(),
            started.elapsed(),
        )
    })
    .await
    .expect("wait");
    assert_eq!(code.0, Some(0), "a graceful stop exits 0");
    assert!(code.1 < Duration::from_secs(30), "{:?}", code.1);
}

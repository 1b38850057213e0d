//! `spectral gate`: the go/no-go step of a deploy. It polls a service's `/health` until the
//! service answers 200 with the expected build (version, git sha, generation) and every feature
//! the deploy requires, or until a deadline passes, and says why after every attempt.
//!
//! **Boundary:** an HTTP client of the service and nothing else: it reads no configuration,
//! touches no store, and knows `/health` only as JSON.
//! **Invariant:** a gate never passes on anything but a 200 whose body says `"status": "ok"`
//! and meets every expectation; every failed attempt yields a [`Reason`].

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest a single attempt may wait for an answer, so that one hung connection cannot use up
/// the whole deadline.
const MAX_ATTEMPT: Duration = Duration::from_secs(10);

/// What the deploy expects to find on `/health`. Every field left empty is not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expectations {
    /// The `version` the new build reports.
    pub version: Option<String>,
    /// The `git_sha` baked into the new build.
    pub git_sha: Option<String>,
    /// The `generation` this deploy runs as.
    pub generation: Option<String>,
    /// Features that must show a given value, such as `outbox=wired`.
    pub require: Vec<Requirement>,
}

/// One feature that must show one value: `outbox=wired` checks `features.outbox`,
/// `store.backend=postgres` checks `features.store.backend`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// Dotted path under `features`.
    pub path: String,
    /// The value, compared with a JSON string as is and with anything else as its JSON text
    /// (`true`, `3`).
    pub value: String,
}

impl FromStr for Requirement {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, value) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}' is not feature=value"))?;
        let path = path.trim();
        let path = path.strip_prefix("features.").unwrap_or(path);
        if path.is_empty() || path.split('.').any(str::is_empty) {
            return Err(format!("'{s}' names no feature"));
        }
        Ok(Self {
            path: path.to_string(),
            value: value.trim().to_string(),
        })
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.path, self.value)
    }
}

/// How to gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    /// The service's base URL; `/health` is appended.
    pub url: String,
    /// How long to keep trying.
    pub timeout: Duration,
    /// Pause between attempts.
    pub interval: Duration,
    pub expect: Expectations,
}

/// Why one attempt did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// No HTTP answer: refused, reset, timed out, bad TLS.
    NoAnswer(String),
    /// An answer other than 200, with what its body says.
    Status { code: u16, detail: String },
    /// A 200 that is not `/health` JSON (a proxy's page, say).
    NotHealth(String),
    /// A 200 whose `status` is not `ok`.
    NotOk(String),
    /// The build is not the expected one.
    Mismatch {
        field: &'static str,
        actual: String,
        expected: String,
    },
    /// A required feature shows another value.
    Unmet {
        requirement: Requirement,
        actual: String,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoAnswer(why) => f.write_str(why),
            Self::Status { code, detail } => write!(f, "{code} {detail}"),
            Self::NotHealth(why) => write!(f, "200 but not a health report: {why}"),
            Self::NotOk(status) => write!(f, "200 but status is {status:?}"),
            Self::Mismatch {
                field,
                actual,
                expected,
            } => write!(f, "{field} {actual} != expected {expected}"),
            Self::Unmet {
                requirement,
                actual,
            } => write!(
                f,
                "feature {} is {actual}, required {}",
                requirement.path, requirement.value
            ),
        }
    }
}

/// The service is live as expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub version: String,
    pub git_sha: String,
    pub generation: String,
    /// The attempt that passed, counting from 1.
    pub attempt: u32,
}

impl fmt::Display for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "live: version {}, git_sha {}, generation {} (attempt {})",
            self.version, self.git_sha, self.generation, self.attempt
        )
    }
}

/// The gate did not open.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("not live after {waited:.1?} ({attempts} attempts); last: {last}")]
    TimedOut {
        attempts: u32,
        waited: Duration,
        last: Reason,
    },
    #[error("--url {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot build an HTTP client: {0}")]
    Client(String),
}

/// Judge one answer of `/health` against the expectations.
pub(crate) fn judge(code: u16, body: &[u8], expect: &Expectations) -> Result<Live, Reason> {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if code != 200 {
        return Err(Reason::Status {
            code,
            detail: describe_failure(code, json.as_ref(), body),
        });
    }
    let Some(Value::Object(health)) = json else {
        return Err(Reason::NotHealth(snippet(body)));
    };
    match health.get("status").and_then(Value::as_str) {
        Some("ok") => {}
        Some(other) => return Err(Reason::NotOk(other.to_string())),
        None => return Err(Reason::NotHealth("no \"status\" field".into())),
    }
    let version = text(health.get("version"));
    let git_sha = text(health.get("git_sha"));
    let generation = text(health.get("generation"));
    for (field, actual, expected) in [
        ("version", &version, &expect.version),
        ("git_sha", &git_sha, &expect.git_sha),
        ("generation", &generation, &expect.generation),
    ] {
        if let Some(expected) = expected {
            if actual != expected {
                return Err(Reason::Mismatch {
                    field,
                    actual: actual.clone(),
                    expected: expected.clone(),
                });
            }
        }
    }
    for requirement in &expect.require {
        let found = requirement
            .path
            .split('.')
            .try_fold(health.get("features"), |at, key| {
                at.map(|v| v.get(key)).ok_or(())
            })
            .ok()
            .flatten();
        let actual = found.map_or_else(|| "absent".to_string(), |v| text(Some(v)));
        if actual != requirement.value {
            return Err(Reason::Unmet {
                requirement: requirement.clone(),
                actual,
            });
        }
    }
    Ok(Live {
        version,
        git_sha,
        generation,
        attempt: 0,
    })
}

/// A JSON value as the text a person compares: strings bare, `null` or a missing value as
/// `none`, anything else as JSON.
fn text(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "none".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// A short, single-line excerpt of a body that is not what we expected.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(120) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None if line.is_empty() => "empty body".into(),
        None => line,
    }
}

/// Why a non-200 answer is not ready: for a health report, its status and the features that
/// are down; for problem+json, its detail; for anything else, the start of the body.
fn describe_failure(code: u16, json: Option<&Value>, body: &[u8]) -> String {
    let Some(json) = json.filter(|j| j.is_object()) else {
        let reason = reqwest::StatusCode::from_u16(code)
            .ok()
            .and_then(|c| c.canonical_reason())
            .unwrap_or("");
        return format!("{reason}: {}", snippet(body)).trim().to_string();
    };
    if let Some(detail) = json.get("detail").and_then(Value::as_str) {
        return detail.to_string();
    }
    let status = json.get("status").and_then(Value::as_str).unwrap_or("?");
    let features = &json["features"];
    let mut down = Vec::new();
    if features["store"]["reachable"] == Value::Bool(false) {
        down.push("store unreachable".to_string());
    }
    // The public report says only that worlds fail; the admin listener's names them.
    if features["worlds"]["state"] == "failing" {
        down.push("worlds failing".to_string());
    }
    if let Some(failed) = features["worlds"]["failed"].as_object() {
        if !failed.is_empty() {
            let names: Vec<&str> = failed.keys().map(String::as_str).collect();
            down.push(format!("worlds failed: {}", names.join(", ")));
        }
    }
    if down.is_empty() {
        down.push("not ready".into());
    }
    format!("{status}: {}", down.join("; "))
}

/// Parse a duration such as `500ms`, `30s`, `5m` or `1h`; a bare number is seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("'{s}' is not a duration such as 500ms, 30s or 5m"))?;
    let seconds = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("'{s}': unknown unit '{other}' (ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("'{s}': {e}"))
}

/// The `/health` URL of a base URL.
fn health_url(base: &str) -> Result<reqwest::Url, GateError> {
    let bad = |reason: String| GateError::BadUrl {
        url: base.to_string(),
        reason,
    };
    let url = reqwest::Url::parse(base.trim()).map_err(|e| bad(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("expected an http:// or https:// URL".into()));
    }
    let path = url.path().trim_end_matches('/');
    let path = if path.ends_with("/health") {
        path.to_string()
    } else {
        format!("{path}/health")
    };
    let mut url = url;
    url.set_path(&path);
    Ok(url)
}

/// Poll until the service is live as expected or the timeout passes. `report` hears every
/// failed attempt (numbered from 1) with its reason.
pub async fn run(gate: &Gate, mut report: impl FnMut(u32, &Reason)) -> Result<Live, GateError> {
    let url = health_url(&gate.url)?;
    let client = reqwest::Client::builder()
        .connect_timeout(MAX_ATTEMPT)
        .build()
        .map_err(|e| GateError::Client(e.to_string()))?;
    let started = Instant::now();
    let deadline = started + gate.timeout;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        // The last attempt may be short, but never so short that it cannot be answered.
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(200), MAX_ATTEMPT);
        let reason = match once(&client, url.clone(), budget, &gate.expect).await {
            Ok(mut live) => {
                live.attempt = attempt;
                return Ok(live);
            }
            Err(reason) => reason,
        };
        report(attempt, &reason);
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(GateError::TimedOut {
                attempts: attempt,
                waited: started.elapsed(),
                last: reason,
            });
        }
        tokio::time::sleep(gate.interval.min(left)).await;
    }
}

/// The `spectral gate` command: run the gate, print every failed attempt's reason to stderr and
/// the verdict, and turn it into an exit code (0 live, 1 not live in time, 2 unusable).
pub async fn main(gate: &Gate) -> std::process::ExitCode {
    let result = run(gate, |attempt, reason| {
        eprintln!("attempt {attempt}: {reason}");
    })
    .await;
    match result {
        Ok(live) => {
            println!("{live}");
            std::process::ExitCode::SUCCESS
        }
        Err(e @ GateError::TimedOut { .. }) => {
            eprintln!("gate closed: {e}");
            std::process::ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn once(
    client: &reqwest::Client,
    url: reqwest::Url,
    budget: Duration,
    expect: &Expectations,
) -> Result<Live, Reason> {
    let answer = async {
        let response = client
            .get(url)
            // A deploy must see the new build, not a cached answer of the old one.
            .header(reqwest::header::CACHE_CONTROL, "no-store")
            .send()
            .await?;
        let code = response.status().as_u16();
        let body = response.bytes().await?;
        Ok::<_, reqwest::Error>((code, body))
    };
    match tokio::time::timeout(budget, answer).await {
        Err(_) => Err(Reason::NoAnswer(format!("no answer within {budget:.1?}"))),
        Ok(Err(e)) => Err(Reason::NoAnswer(no_answer(&e))),
        Ok(Ok((code, body))) => judge(code, &body, expect),
    }
}

/// Why a request got no answer, in a few words: reqwest's own message names the URL (which the
/// reader knows) and hides the cause (which the reader wants) in its source chain.
fn no_answer(e: &reqwest::Error) -> String {
    let mut root: &(dyn std::error::Error + 'static) = e;
    while let Some(cause) = root.source() {
        root = cause;
    }
    let root = root.to_string();
    if e.is_connect() {
        format!("cannot connect: {root}")
    } else if e.is_timeout() {
        format!("no answer: {root}")
    } else {
        format!("request failed: {root}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn health(status: &str) -> Value {
        json!({
            "status": status, "version": "0.2.0", "git_sha": "abc123", "generation": 7,
            "features": {
                "store": {"backend": "postgres", "reachable": true},
                "deployments": "listening",
                "worlds": {"loaded": {"acme-payments": 3}, "failed": {}},
                "outbox": "wired", "agent": "unconfigured"
            }
        })
    }

    fn bytes(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap_or_default()
    }

    fn expect(version: &str) -> Expectations {
        Expectations {
            version: Some(version.into()),
            ..Default::default()
        }
    }

    #[test]
    fn passes_a_healthy_report_of_the_expected_build() {
        let mut e = expect("0.2.0");
        e.git_sha = Some("abc123".into());
        e.generation = Some("7".into());
        e.require = vec![
            "outbox=wired".parse().unwrap(),
            "features.store.backend=postgres".parse().unwrap(),
            "store.reachable=true".parse().unwrap(),
        ];
        let live = judge(200, &bytes(&health("ok")), &e).unwrap();
        assert_eq!(
            (live.version.as_str(), live.generation.as_str()),
            ("0.2.0", "7")
        );
        // No expectations at all: any healthy answer passes (the image's HEALTHCHECK).
        assert!(judge(200, &bytes(&health("ok")), &Expectations::default()).is_ok());
    }

    #[test]
    fn names_each_way_an_answer_falls_short() {
        let ok = bytes(&health("ok"));
        let reason = |code, body: &[u8], e: &Expectations| {
            judge(code, body, e).err().map(|r| r.to_string()).unwrap()
        };
        assert_eq!(
            reason(200, &ok, &expect("0.3.0")),
            "version 0.2.0 != expected 0.3.0"
        );
        let e = Expectations {
            git_sha: Some("def456".into()),
            ..Default::default()
        };
        assert_eq!(reason(200, &ok, &e), "git_sha abc123 != expected def456");
        let mut e = Expectations {
            require: vec!["agent=configured".parse().unwrap()],
            ..Default::default()
        };
        assert_eq!(
            reason(200, &ok, &e),
            "feature agent is unconfigured, required configured"
        );
        e.require = vec!["outbox.lag=0".parse().unwrap()];
        assert_eq!(
            reason(200, &ok, &e),
            "feature outbox.lag is absent, required 0"
        );

        let mut down = health("unavailable");
        down["features"]["worlds"]["failed"] = json!({"acme-payments": "hashes to sha256:00"});
        down["features"]["store"]["reachable"] = json!(false);
        assert_eq!(
            reason(503, &bytes(&down), &Expectations::default()),
            "503 unavailable: store unreachable; worlds failed: acme-payments"
        );
        assert_eq!(
            reason(
                503,
                &bytes(&health("unavailable")),
                &Expectations::default()
            ),
            "503 unavailable: not ready"
        );
        assert_eq!(
            reason(
                503,
                &bytes(&json!({"title": "Service Unavailable", "detail": "too many connections"})),
                &Expectations::default()
            ),
            "503 too many connections"
        );
        assert_eq!(
            reason(
                502,
                b"<html>\n<h1>Bad gateway</h1></html>",
                &Expectations::default()
            ),
            "502 Bad Gateway: <html> <h1>Bad gateway</h1></html>"
        );
        assert_eq!(
            reason(200, b"<html>hello</html>", &Expectations::default()),
            "200 but not a health report: <html>hello</html>"
        );
        assert_eq!(
            reason(200, &bytes(&health("starting")), &Expectations::default()),
            "200 but status is \"starting\""
        );
    }

    #[test]
    fn a_missing_generation_reads_as_none() {
        let mut h = health("ok");
        h["generation"] = Value::Null;
        let e = Expectations {
            generation: Some("7".into()),
            ..Default::default()
        };
        assert_eq!(
            judge(200, &bytes(&h), &e).err().map(|r| r.to_string()),
            Some("generation none != expected 7".into())
        );
    }

    #[test]
    fn requirements_parse_or_say_why_not() {
        let r: Requirement = "store.backend = postgres".parse().unwrap();
        assert_eq!(r.to_string(), "store.backend=postgres");
        assert!("outbox".parse::<Requirement>().is_err());
        assert!("=wired".parse::<Requirement>().is_err());
        assert!("store..backend=x".parse::<Requirement>().is_err());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn the_health_url_is_derived_from_the_base() {
        let u = |s: &str| health_url(s).map(|u| u.to_string()).ok();
        assert_eq!(
            u("http://127.0.0.1:8000"),
            Some("http://127.0.0.1:8000/health".into())
        );
        assert_eq!(
            u("https://spectral.example.com/"),
            Some("https://spectral.example.com/health".into())
        );
        assert_eq!(
            u("https://x.example.com/prefix/health"),
            Some("https://x.example.com/prefix/health".into())
        );
        assert_eq!(u("ftp://x"), None);
        assert_eq!(u("not a url"), None);
    }
}

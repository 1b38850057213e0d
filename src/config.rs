//! Configuration: one typed struct per module, assembled here from the environment. Nothing
//! else reads environment variables. Every option has a default that works with zero setup,
//! a doc comment, and a line in `docs/config.md`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::sandbox::Limits;
use crate::store::StoreConfig;

/// A secret value: never printed, neither by `Debug` nor by `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The HTTP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Address to listen on (`SPECTRAL_ADDR`); loopback unless set, port 8000 is the
    /// container's port (the image sets `0.0.0.0:8000`).
    pub addr: SocketAddr,
    /// Address of the admin listener (`SPECTRAL_ADMIN_ADDR`), loopback by default: the
    /// detailed `/health` and `/metrics`, which name worlds, live only there
    /// (docs/operations.md, "Public and admin ports").
    pub admin_addr: SocketAddr,
    /// Largest request body accepted (`SPECTRAL_MAX_BODY_BYTES`); larger bodies get 413.
    pub max_body_bytes: usize,
    /// Time a client has to send a request's headers (`SPECTRAL_HEADER_TIMEOUT_MS`), the
    /// first bytes of a new connection included.
    pub header_timeout: Duration,
    /// Time a request may take end to end (`SPECTRAL_REQUEST_TIMEOUT_MS`).
    pub request_timeout: Duration,
    /// Connections served at once (`SPECTRAL_MAX_CONNECTIONS`); more are answered 503 and
    /// closed.
    pub max_connections: usize,
    /// Items in one `POST /api/decide/batch` (`SPECTRAL_BATCH_MAX_ITEMS`).
    pub batch_max_items: usize,
    /// How long shutdown waits for in-flight work (`SPECTRAL_SHUTDOWN_GRACE_MS`).
    pub shutdown_grace: Duration,
    /// The MCP endpoint at `/mcp`.
    pub mcp: McpConfig,
    /// Connections held open by one client address and how long an idle one is kept.
    pub connections: ConnectionLimits,
    /// Request rates per key and per world (`SPECTRAL_RATE_*`).
    pub rate: RateConfig,
}

/// What one client address may hold, and how long a connection may sit idle: connections are
/// the resource a hoarder takes, so each has a bound below the global one
/// (docs/operations.md, "Connections").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections one client address may hold at once (`SPECTRAL_MAX_CONNECTIONS_PER_IP`);
    /// the next is answered 503 `too_many_connections_from_address` and closed. Behind a proxy
    /// that hides client addresses, set it to `SPECTRAL_MAX_CONNECTIONS`.
    pub per_ip: usize,
    /// A connection with no request in flight is closed after this long
    /// (`SPECTRAL_IDLE_TIMEOUT_MS`), HTTP/2 included whatever PINGs it answers.
    pub idle_timeout: Duration,
    /// Near the connection limit, the connection idle longest is closed to let a new client
    /// in, once it has been idle for this long (`SPECTRAL_EVICT_IDLE_MS`).
    pub evict_idle_after: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            per_ip: 256,
            idle_timeout: Duration::from_secs(10),
            evict_idle_after: Duration::from_secs(1),
        }
    }
}

/// Request rates, per key and per world, of decisions and of authoring calls; each is a token
/// bucket refilled at `per_second` that holds `burst` (docs/operations.md, "Rate limits").
/// The defaults are far above what one tenant's normal use reaches: they bound a flood, not
/// a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateConfig {
    /// Whether any rate is enforced (`SPECTRAL_RATE_LIMITS`, on by default).
    pub enabled: bool,
    /// Decisions per second one key may ask for (`SPECTRAL_RATE_DECIDE_PER_KEY`); a batch counts
    /// each of its items.
    pub decide_per_key: u32,
    /// Decisions per second asked of one world by all its keys
    /// (`SPECTRAL_RATE_DECIDE_PER_WORLD`).
    pub decide_per_world: u32,
    /// Authoring calls (drafts, publish, deploy, retire, webhooks) per second of one key
    /// (`SPECTRAL_RATE_AUTHORING_PER_KEY`).
    pub authoring_per_key: u32,
    /// Authoring calls per second on one world (`SPECTRAL_RATE_AUTHORING_PER_WORLD`).
    pub authoring_per_world: u32,
    /// How many seconds of its rate a bucket holds (`SPECTRAL_RATE_BURST_SECONDS`): the burst a
    /// quiet client may send at once.
    pub burst_seconds: u32,
}

impl Default for RateConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            decide_per_key: 50_000,
            decide_per_world: 100_000,
            authoring_per_key: 50,
            authoring_per_world: 100,
            burst_seconds: 2,
        }
    }
}

/// The MCP endpoint (`/mcp`) on the API's listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpConfig {
    /// Browser origins allowed to call `/mcp` (`SPECTRAL_MCP_ALLOWED_ORIGINS`, comma-separated,
    /// e.g. `https://console.example.com`). A request with any other `Origin` header is
    /// refused with 403, against DNS rebinding; requests without one (agents, not browsers)
    /// pass.
    pub allowed_origins: Vec<String>,
    /// Sessions of the earlier protocol revisions open at once (`SPECTRAL_MCP_MAX_SESSIONS`);
    /// an `initialize` beyond them is answered 503.
    pub max_sessions: usize,
    /// A session's age at which it is closed (`SPECTRAL_MCP_SESSION_MAX_AGE_MS`).
    pub session_max_age: Duration,
    /// A session's idle time at which it is closed (`SPECTRAL_MCP_SESSION_IDLE_MS`).
    pub session_idle: Duration,
}

impl Default for McpConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            max_sessions: 1024,
            session_max_age: Duration::from_secs(3600),
            session_idle: Duration::from_secs(300),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8000)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 9000)),
            max_body_bytes: 1 << 20,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 1024,
            batch_max_items: 100,
            shutdown_grace: Duration::from_secs(30),
            mcp: McpConfig::default(),
            connections: ConnectionLimits::default(),
            rate: RateConfig::default(),
        }
    }
}

/// The per-world module cache and how it learns of deployments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// How often deployments are polled (`SPECTRAL_DEPLOY_POLL_MS`); the bound on how long a
    /// deployment takes to reach an instance when notifications are lost.
    pub poll_interval: Duration,
    /// Listen for Postgres notifications of deployments (`SPECTRAL_DEPLOY_LISTEN`).
    pub listen: bool,
    /// Non-deployed versions kept compiled for pinned requests (`SPECTRAL_CACHE_MAX_VERSIONS`).
    pub max_pinned_versions: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(1000),
            listen: true,
            max_pinned_versions: 64,
        }
    }
}

/// API keys: how long an instance trusts what it looked up, and rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysConfig {
    /// How long a looked-up key is trusted before the store is asked again
    /// (`SPECTRAL_KEY_CACHE_TTL_MS`): the bound on how long a revoked key keeps working on an
    /// instance that missed the notification (every instance on SQLite).
    pub cache_ttl: Duration,
    /// How long a rotated key's replaced secret is still accepted
    /// (`SPECTRAL_KEY_ROTATION_OVERLAP_MS`), so that callers can switch without an outage.
    pub rotation_overlap: Duration,
    /// Listen for Postgres notifications of revocations and rotations (`SPECTRAL_KEY_LISTEN`).
    pub listen: bool,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            cache_ttl: Duration::from_secs(30),
            rotation_overlap: Duration::from_secs(24 * 3600),
            listen: true,
        }
    }
}

/// What the decision log does when its writer cannot keep up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Wait up to the given time for room, then refuse the decision (503).
    Block(Duration),
    /// Drop the record at once.
    Drop,
}

/// When a decision is answered, relative to its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Once its record is queued: fast; a `kill -9` loses what is still queued.
    Queued,
    /// Once the group commit that holds its record has committed: a `kill -9` loses no
    /// answered decision, at the cost of the commit's latency.
    Commit,
}

/// The batched decision writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionLogConfig {
    /// Records waiting to be written (`SPECTRAL_DECISION_LOG_CAPACITY`).
    pub capacity: usize,
    /// Bytes the waiting records may hold together (`SPECTRAL_DECISION_LOG_MAX_BYTES`).
    pub max_bytes: usize,
    /// Records written per transaction at most (`SPECTRAL_DECISION_LOG_BATCH`).
    pub batch_size: usize,
    /// `SPECTRAL_DECISION_LOG_OVERFLOW` = `block` (with `SPECTRAL_DECISION_LOG_BLOCK_MS`) or
    /// `drop`. Every dropped record is counted in metrics and on `/health`.
    pub overflow: Overflow,
    /// How long the writer waits for a batch to fill before committing what it has
    /// (`SPECTRAL_DECISION_LOG_LINGER_MS`): fewer, larger transactions under load.
    pub linger: Duration,
    /// `SPECTRAL_DECISION_LOG_DURABILITY` = `queued` or `commit`.
    pub durability: Durability,
}

impl Default for DecisionLogConfig {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            max_bytes: 32 * 1024 * 1024,
            batch_size: 256,
            overflow: Overflow::Block(Duration::from_millis(5)),
            linger: Duration::from_millis(10),
            durability: Durability::Queued,
        }
    }
}

/// The outbox consumer of the workers runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    /// This deploy's generation (`SPECTRAL_GENERATION`); allocated from the store at start
    /// when unset. `spectral api` and `spectral workers` run apart must be given the same one.
    pub generation: Option<i64>,
    /// Time between polls when nothing wakes the consumer (`SPECTRAL_OUTBOX_POLL_MS`),
    /// jittered by ±20%.
    pub poll_interval: Duration,
    /// Rows claimed at once (`SPECTRAL_OUTBOX_BATCH`).
    pub batch_size: u32,
    /// How long a claim lasts before the row is rescued from a dead worker
    /// (`SPECTRAL_OUTBOX_LEASE_MS`). Keep it above twice the slowest handler: a worker starts
    /// no row of a claimed batch after half the lease, and releases the rest.
    pub lease: Duration,
    /// Listen for Postgres notifications of new rows (`SPECTRAL_OUTBOX_LISTEN`).
    pub listen: bool,
    /// First retry delay (`SPECTRAL_OUTBOX_RETRY_BASE_MS`); doubles per attempt, with full
    /// jitter, up to `SPECTRAL_OUTBOX_RETRY_CAP_MS`.
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// Attempts before a row fails for good (`SPECTRAL_OUTBOX_MAX_ATTEMPTS`).
    pub max_attempts: u32,
    /// Time a webhook delivery may take (`SPECTRAL_WEBHOOK_TIMEOUT_MS`).
    pub webhook_timeout: Duration,
    /// Internal networks webhooks may reach (`SPECTRAL_WEBHOOK_ALLOW_NETWORKS`); none by
    /// default.
    pub webhook_egress: crate::egress::Egress,
    /// The key webhook secrets are sealed with at rest (`SPECTRAL_WEBHOOK_SECRET_KEY`, 64 hex
    /// digits). Unset: on SQLite a key generated into the data directory, on PostgreSQL no
    /// webhook can be created (`src/seal.rs`).
    pub webhook_secret_key: Option<Secret>,
    /// How long another generation's rows may stay pending or in flight before `/health`
    /// calls them stranded and turns `degraded` (`SPECTRAL_OUTBOX_STRANDED_AFTER_MS`, 10
    /// minutes): long enough for an old generation to drain during a rollout.
    pub stranded_after: Duration,
    /// How long delivered rows (and their `event_handled` entries) are kept after their event
    /// occurred (`SPECTRAL_OUTBOX_RETENTION_MS`, 7 days).
    pub retention: Duration,
    /// Time between the workers' retention passes (`SPECTRAL_OUTBOX_PRUNE_INTERVAL_MS`, 1
    /// minute).
    pub prune_interval: Duration,
    /// Rows deleted per retention transaction (`SPECTRAL_OUTBOX_PRUNE_BATCH`, 1,000): small, so
    /// that producers never wait long behind one.
    pub prune_batch: u32,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            generation: None,
            poll_interval: Duration::from_millis(1000),
            batch_size: 32,
            lease: Duration::from_secs(60),
            listen: true,
            retry_base: Duration::from_secs(1),
            retry_cap: Duration::from_secs(300),
            max_attempts: 5,
            webhook_timeout: Duration::from_secs(10),
            webhook_egress: crate::egress::Egress::default(),
            webhook_secret_key: None,
            stranded_after: Duration::from_secs(600),
            retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
            prune_batch: 1000,
        }
    }
}

/// What `spectral serve` sets up on a fresh store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapConfig {
    /// The operator key (`SPECTRAL_OPERATOR_KEY`). When unset and the store has no operator
    /// key, one is generated and printed once.
    pub operator_key: Option<Secret>,
    /// Worlds published and deployed when the store has none (`SPECTRAL_SEED_DIR`; empty to
    /// disable).
    pub seed_dir: Option<PathBuf>,
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        Self {
            operator_key: None,
            seed_dir: Some(PathBuf::from("predicates")),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// `SPECTRAL_LOG_FORMAT`: `json` (production) or `pretty`.
    pub json: bool,
    /// `SPECTRAL_LOG`: a tracing filter such as `info` or `spectral=debug`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            json: false,
            filter: "info".into(),
        }
    }
}

/// The LLM provider of the World Agent: any OpenAI-compatible chat-completions endpoint
/// (`docs/agent.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// The API's base URL (`SPECTRAL_AGENT_BASE_URL`), e.g. `https://api.openai.com/v1` or
    /// `http://127.0.0.1:8080/v1`; requests go to `{base}/chat/completions`. Unset: the agent
    /// is unconfigured.
    pub base_url: Option<url::Url>,
    /// The model name sent with every request (`SPECTRAL_AGENT_MODEL`); required with a base
    /// URL.
    pub model: String,
    /// Sent as `Authorization: Bearer` (`SPECTRAL_AGENT_API_KEY`); local servers need none.
    pub api_key: Option<Secret>,
    /// Ask for a streamed answer (`SPECTRAL_AGENT_STREAM`); off, every call asks for one JSON
    /// body.
    pub stream: bool,
    /// Time to open a connection (`SPECTRAL_AGENT_CONNECT_TIMEOUT_MS`).
    pub connect_timeout: Duration,
    /// Time from sending a request to the first token of its answer
    /// (`SPECTRAL_AGENT_FIRST_TOKEN_TIMEOUT_MS`), per attempt.
    pub first_token_timeout: Duration,
    /// Time one call may take, every attempt and wait between them included
    /// (`SPECTRAL_AGENT_CALL_TIMEOUT_MS`).
    pub call_timeout: Duration,
    /// Attempts per call (`SPECTRAL_AGENT_MAX_ATTEMPTS`), on 429, 5xx, connection errors and
    /// answers cut short.
    pub max_attempts: u32,
    /// First retry delay (`SPECTRAL_AGENT_RETRY_BASE_MS`); doubles per attempt, with full
    /// jitter, up to `SPECTRAL_AGENT_RETRY_CAP_MS`; a longer `Retry-After` wins.
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// `max_tokens` of every request (`SPECTRAL_AGENT_MAX_TOKENS`).
    pub max_tokens: u32,
    /// Bytes of one answer read at most (`SPECTRAL_AGENT_MAX_RESPONSE_BYTES`).
    pub max_response_bytes: usize,
    /// The bounds of one authoring run; hitting one ends the run with a status that names it.
    /// Nodes run, malformed answers asked again included (`SPECTRAL_AGENT_MAX_STEPS`).
    pub max_steps: u32,
    /// Model calls (`SPECTRAL_AGENT_MAX_CALLS`).
    pub max_calls: u32,
    /// Prompt and completion tokens together (`SPECTRAL_AGENT_MAX_RUN_TOKENS`).
    pub max_run_tokens: u64,
    /// Repairs after failed verifications (`SPECTRAL_AGENT_MAX_REPAIRS`).
    pub max_repairs: u32,
    /// Time spent in the run's nodes (`SPECTRAL_AGENT_MAX_RUN_MS`).
    pub max_run_time: Duration,
    /// Threads a worker advances at once (`SPECTRAL_AGENT_CONCURRENCY`).
    pub concurrency: usize,
    /// Runs of one world running at once (`SPECTRAL_AGENT_MAX_RUNS_PER_WORLD`); starting
    /// another is answered 429 `too_many_runs`.
    pub max_runs_per_world: u64,
    /// A worker's lease on a thread (`SPECTRAL_AGENT_LEASE_MS`), renewed at a third of it:
    /// the time after a worker's crash before another resumes its threads.
    pub lease: Duration,
    /// Time between looks for threads to resume when nothing wakes the worker
    /// (`SPECTRAL_AGENT_POLL_MS`).
    pub poll: Duration,
    /// Age after which a finished thread's checkpoints (all but the last) and events are
    /// pruned (`SPECTRAL_AGENT_RETENTION_MS`); its final state and candidate stay.
    pub retention: Duration,
    /// Messages a chat thread keeps in the model's view (`SPECTRAL_AGENT_CHAT_HISTORY`).
    pub chat_history: usize,
    /// Agent event streams open at once in one API process (`SPECTRAL_AGENT_MAX_STREAMS`).
    pub max_streams: usize,
    /// Wake streams by Postgres notifications of new thread events (`SPECTRAL_AGENT_LISTEN`);
    /// without them a stream looks at the store every 100 ms.
    pub listen: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            base_url: None,
            model: String::new(),
            api_key: None,
            stream: true,
            connect_timeout: Duration::from_secs(5),
            first_token_timeout: Duration::from_secs(60),
            call_timeout: Duration::from_secs(180),
            max_attempts: 4,
            retry_base: Duration::from_millis(500),
            retry_cap: Duration::from_secs(30),
            max_tokens: 4096,
            max_response_bytes: 1 << 20,
            max_steps: 24,
            max_calls: 12,
            max_run_tokens: 200_000,
            max_repairs: 3,
            max_run_time: Duration::from_secs(300),
            concurrency: 4,
            max_runs_per_world: 4,
            lease: Duration::from_secs(30),
            poll: Duration::from_secs(2),
            retention: Duration::from_secs(30 * 86_400),
            chat_history: 40,
            max_streams: 256,
            listen: true,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// Limits of the predicate sandbox (`SPECTRAL_SANDBOX_*`).
    pub sandbox: Limits,
    pub server: ServerConfig,
    /// `DATABASE_URL`, `SPECTRAL_DATA_DIR`, `SPECTRAL_DB_MAX_CONNECTIONS`,
    /// `SPECTRAL_MIGRATE_ON_START`.
    pub store: StoreConfig,
    pub cache: CacheConfig,
    pub keys: KeysConfig,
    pub decision_log: DecisionLogConfig,
    pub evaluation: EvaluationConfig,
    pub outbox: OutboxConfig,
    pub background: BackgroundConfig,
    pub bootstrap: BootstrapConfig,
    pub agent: AgentConfig,
    pub log: LogConfig,
    pub impact: ImpactConfig,
}

/// Impact analysis: kept contexts, shadows and replays (docs/impact.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImpactConfig {
    /// The largest context kept for replay, in bytes of its JSON text
    /// (`SPECTRAL_CONTEXT_MAX_BYTES`, 16 KiB); a larger one keeps only its digest (counted).
    pub context_max_bytes: usize,
    /// How long kept contexts (and finished replays) stay (`SPECTRAL_CONTEXT_RETENTION_MS`,
    /// 7 days); the chain is untouched.
    pub context_retention: Duration,
    /// Time between the workers' context retention passes (`SPECTRAL_CONTEXT_PRUNE_INTERVAL_MS`,
    /// 1 minute).
    pub prune_interval: Duration,
    /// Sampled decisions waiting for the shadow evaluator (`SPECTRAL_SHADOW_QUEUE`, 4,096); a
    /// decision sampled while it is full is skipped and counted.
    pub shadow_queue: usize,
    /// The share of one CPU the shadow evaluator may use, in percent
    /// (`SPECTRAL_SHADOW_CPU_PERCENT`, 10): above it the evaluator pauses, its queue fills and
    /// sampled decisions are skipped (counted), so that a costly shadow version takes only
    /// so much from the caches and the core it shares with the API.
    pub shadow_cpu_percent: u8,
    /// Nice steps below the API for the shadow evaluator (`SPECTRAL_SHADOW_NICE`, 0–19, 19):
    /// the lowest priority by default; a host with cores to spare may raise it, so that a
    /// busy machine does not leave sampled decisions waiting long.
    pub shadow_nice: u8,
    /// Time between writes of this instance's shadow reports (`SPECTRAL_SHADOW_FLUSH_MS`, 1 s).
    pub shadow_flush: Duration,
    /// The most recorded decisions one replay evaluates (`SPECTRAL_REPLAY_MAX_ROWS`, 100,000),
    /// and the default of its `limit`.
    pub replay_max_rows: u64,
    /// The longest one replay runs before it ends with what it has
    /// (`SPECTRAL_REPLAY_DEADLINE_MS`, 60 s).
    pub replay_deadline: Duration,
    /// How often the workers look for queued replays (`SPECTRAL_REPLAY_POLL_MS`, 1 s).
    pub replay_poll: Duration,
}

impl Default for ImpactConfig {
    fn default() -> Self {
        Self {
            context_max_bytes: 16 * 1024,
            context_retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
            shadow_queue: 4096,
            shadow_cpu_percent: 10,
            shadow_nice: 19,
            shadow_flush: Duration::from_secs(1),
            replay_max_rows: 100_000,
            replay_deadline: Duration::from_secs(60),
            replay_poll: Duration::from_secs(1),
        }
    }
}

/// Where decisions are evaluated, and what one batch request may spend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvaluationConfig {
    /// Decisions of expensive modules evaluated at once, off the API threads
    /// (`SPECTRAL_EVAL_POOL`); more are answered 503 `evaluation_overloaded`.
    pub pool: usize,
    /// Sandbox operations all the decisions of one `POST /api/decide/batch` may use together
    /// (`SPECTRAL_BATCH_MAX_OPERATIONS`); the items after it is spent are answered 503.
    pub batch_max_operations: u64,
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        Self {
            pool: 2,
            batch_max_operations: 1_000_000,
        }
    }
}

/// The threads that work off the request path: the decision-log writer and the workers
/// runtime (with the database threads they start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackgroundConfig {
    /// Their nice value (`SPECTRAL_BACKGROUND_NICE`, 0–19), added to the process's own: on a
    /// busy CPU the API threads come first, so a batch commit or an outbox burst does not sit
    /// in front of a waiting request. 0 runs them alike.
    pub nice: u8,
}

impl Default for BackgroundConfig {
    fn default() -> Self {
        Self { nice: 5 }
    }
}

/// A configuration value could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}={value:?}: {reason}")]
pub struct ConfigError {
    pub name: String,
    pub value: String,
    pub reason: String,
}

/// The environment, read once, with the names asked for (so a test can hold the
/// documentation to what is read).
struct Vars(
    HashMap<String, String>,
    std::cell::RefCell<std::collections::BTreeSet<String>>,
);

impl Vars {
    fn get(&self, name: &str) -> Option<&str> {
        self.1.borrow_mut().insert(name.to_string());
        self.0.get(name).map(String::as_str)
    }

    fn err(name: &str, value: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            name: name.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    fn number<T>(
        &self,
        name: &str,
        target: &mut T,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<(), ConfigError>
    where
        T: TryFrom<u64>,
    {
        let Some(text) = self.get(name) else {
            return Ok(());
        };
        let n: u64 = text
            .trim()
            .parse()
            .map_err(|e| Self::err(name, text, format!("not a whole number: {e}")))?;
        if !range.contains(&n) {
            return Err(Self::err(
                name,
                text,
                format!("must be within {}..={}", range.start(), range.end()),
            ));
        }
        *target = T::try_from(n).map_err(|_| Self::err(name, text, "out of range"))?;
        Ok(())
    }

    fn millis(
        &self,
        name: &str,
        target: &mut Duration,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<(), ConfigError> {
        let mut ms = target.as_millis() as u64;
        self.number(name, &mut ms, range)?;
        *target = Duration::from_millis(ms);
        Ok(())
    }

    fn flag(&self, name: &str, target: &mut bool) -> Result<(), ConfigError> {
        match self.get(name).map(str::trim) {
            None => Ok(()),
            Some("1" | "true" | "yes" | "on") => {
                *target = true;
                Ok(())
            }
            Some("0" | "false" | "no" | "off") => {
                *target = false;
                Ok(())
            }
            Some(other) => Err(Self::err(name, other, "expected true or false")),
        }
    }
}

impl Config {
    /// Read the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Read the configuration from `(name, value)` pairs; unknown names are ignored.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::read(&Vars(vars.into_iter().collect(), Default::default()))
    }

    fn read(v: &Vars) -> Result<Self, ConfigError> {
        let mut c = Self::default();

        let s = &mut c.sandbox;
        v.number(
            "SPECTRAL_SANDBOX_MAX_OPERATIONS",
            &mut s.max_operations,
            1..=10_000_000,
        )?;
        v.number(
            "SPECTRAL_SANDBOX_MAX_CALL_LEVELS",
            &mut s.max_call_levels,
            1..=64,
        )?;
        // Deeper than 128 risks overflowing a 2 MiB stack during evaluation.
        v.number(
            "SPECTRAL_SANDBOX_MAX_EXPR_DEPTH",
            &mut s.max_expr_depth,
            4..=128,
        )?;
        v.number(
            "SPECTRAL_SANDBOX_MAX_STRING_BYTES",
            &mut s.max_string_bytes,
            64..=16 << 20,
        )?;
        v.number(
            "SPECTRAL_SANDBOX_MAX_ARRAY_LEN",
            &mut s.max_array_len,
            1..=1 << 20,
        )?;
        v.number(
            "SPECTRAL_SANDBOX_MAX_MAP_LEN",
            &mut s.max_map_len,
            1..=1 << 20,
        )?;
        v.number(
            "SPECTRAL_SANDBOX_MAX_SOURCE_BYTES",
            &mut s.max_source_bytes,
            16..=1 << 20,
        )?;
        v.number(
            "SPECTRAL_SANDBOX_DEADLINE_US",
            &mut s.deadline_us,
            10..=10_000_000,
        )?;
        v.number(
            "SPECTRAL_SANDBOX_DECISION_MAX_OPERATIONS",
            &mut s.decision_max_operations,
            1..=100_000_000,
        )?;
        v.number(
            "SPECTRAL_SANDBOX_DECISION_DEADLINE_US",
            &mut s.decision_deadline_us,
            10..=60_000_000,
        )?;
        v.number(
            "SPECTRAL_SANDBOX_MAX_FOLDED_BYTES",
            &mut s.max_folded_bytes,
            1024..=256 << 20,
        )?;
        v.number(
            "SPECTRAL_SANDBOX_MAX_MODULE_BYTES",
            &mut s.max_module_bytes,
            1024..=1 << 30,
        )?;
        v.number(
            "SPECTRAL_SANDBOX_OFFLOAD_OPERATIONS",
            &mut s.offload_operations,
            1..=100_000_000,
        )?;

        let ev = &mut c.evaluation;
        v.number("SPECTRAL_EVAL_POOL", &mut ev.pool, 1..=1024)?;
        v.number(
            "SPECTRAL_BATCH_MAX_OPERATIONS",
            &mut ev.batch_max_operations,
            1..=1_000_000_000,
        )?;
        // An item of a batch starts only with a whole decision budget left.
        if ev.batch_max_operations < c.sandbox.decision_max_operations {
            return Err(Vars::err(
                "SPECTRAL_BATCH_MAX_OPERATIONS",
                &ev.batch_max_operations.to_string(),
                format!(
                    "below SPECTRAL_SANDBOX_DECISION_MAX_OPERATIONS ({}): no batch item could start",
                    c.sandbox.decision_max_operations
                ),
            ));
        }

        let srv = &mut c.server;
        if let Some(addr) = v.get("SPECTRAL_ADDR") {
            srv.addr = addr
                .trim()
                .parse()
                .map_err(|e| Vars::err("SPECTRAL_ADDR", addr, format!("not host:port: {e}")))?;
        }
        if let Some(addr) = v.get("SPECTRAL_ADMIN_ADDR") {
            srv.admin_addr = addr.trim().parse().map_err(|e| {
                Vars::err("SPECTRAL_ADMIN_ADDR", addr, format!("not host:port: {e}"))
            })?;
        }
        v.number(
            "SPECTRAL_MAX_BODY_BYTES",
            &mut srv.max_body_bytes,
            1024..=64 << 20,
        )?;
        v.millis(
            "SPECTRAL_HEADER_TIMEOUT_MS",
            &mut srv.header_timeout,
            10..=600_000,
        )?;
        v.millis(
            "SPECTRAL_REQUEST_TIMEOUT_MS",
            &mut srv.request_timeout,
            10..=600_000,
        )?;
        v.number(
            "SPECTRAL_MAX_CONNECTIONS",
            &mut srv.max_connections,
            1..=1_000_000,
        )?;
        v.number(
            "SPECTRAL_BATCH_MAX_ITEMS",
            &mut srv.batch_max_items,
            1..=10_000,
        )?;
        v.millis(
            "SPECTRAL_SHUTDOWN_GRACE_MS",
            &mut srv.shutdown_grace,
            0..=3_600_000,
        )?;
        let cl = &mut c.server.connections;
        v.number(
            "SPECTRAL_MAX_CONNECTIONS_PER_IP",
            &mut cl.per_ip,
            1..=1_000_000,
        )?;
        v.millis(
            "SPECTRAL_IDLE_TIMEOUT_MS",
            &mut cl.idle_timeout,
            10..=3_600_000,
        )?;
        v.millis(
            "SPECTRAL_EVICT_IDLE_MS",
            &mut cl.evict_idle_after,
            0..=3_600_000,
        )?;
        let rate = &mut c.server.rate;
        v.flag("SPECTRAL_RATE_LIMITS", &mut rate.enabled)?;
        for (name, target) in [
            ("SPECTRAL_RATE_DECIDE_PER_KEY", &mut rate.decide_per_key),
            ("SPECTRAL_RATE_DECIDE_PER_WORLD", &mut rate.decide_per_world),
            (
                "SPECTRAL_RATE_AUTHORING_PER_KEY",
                &mut rate.authoring_per_key,
            ),
            (
                "SPECTRAL_RATE_AUTHORING_PER_WORLD",
                &mut rate.authoring_per_world,
            ),
        ] {
            v.number(name, target, 1..=100_000_000)?;
        }
        v.number(
            "SPECTRAL_RATE_BURST_SECONDS",
            &mut rate.burst_seconds,
            1..=3600,
        )?;
        let mcp = &mut c.server.mcp;
        if let Some(list) = v.get("SPECTRAL_MCP_ALLOWED_ORIGINS") {
            mcp.allowed_origins = list
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect();
        }
        v.number(
            "SPECTRAL_MCP_MAX_SESSIONS",
            &mut mcp.max_sessions,
            1..=1_000_000,
        )?;
        v.millis(
            "SPECTRAL_MCP_SESSION_MAX_AGE_MS",
            &mut mcp.session_max_age,
            1_000..=86_400_000,
        )?;
        v.millis(
            "SPECTRAL_MCP_SESSION_IDLE_MS",
            &mut mcp.session_idle,
            1_000..=86_400_000,
        )?;

        let st = &mut c.store;
        if let Some(url) = v.get("DATABASE_URL").filter(|u| !u.trim().is_empty()) {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                // Never echo the value: it may carry a password.
                return Err(Vars::err(
                    "DATABASE_URL",
                    "<redacted>",
                    "must start with postgres:// (leave it unset for the embedded SQLite store)",
                ));
            }
            st.database_url = Some(url.trim().to_string());
        }
        if let Some(dir) = v.get("SPECTRAL_DATA_DIR") {
            st.data_dir = PathBuf::from(dir);
        }
        v.number(
            "SPECTRAL_DB_MAX_CONNECTIONS",
            &mut st.max_connections,
            1..=1000,
        )?;
        v.flag("SPECTRAL_MIGRATE_ON_START", &mut st.migrate_on_start)?;

        let ca = &mut c.cache;
        v.millis(
            "SPECTRAL_DEPLOY_POLL_MS",
            &mut ca.poll_interval,
            10..=3_600_000,
        )?;
        v.flag("SPECTRAL_DEPLOY_LISTEN", &mut ca.listen)?;
        v.number(
            "SPECTRAL_CACHE_MAX_VERSIONS",
            &mut ca.max_pinned_versions,
            1..=100_000,
        )?;

        let k = &mut c.keys;
        v.millis(
            "SPECTRAL_KEY_CACHE_TTL_MS",
            &mut k.cache_ttl,
            10..=3_600_000,
        )?;
        v.millis(
            "SPECTRAL_KEY_ROTATION_OVERLAP_MS",
            &mut k.rotation_overlap,
            0..=31 * 86_400_000,
        )?;
        v.flag("SPECTRAL_KEY_LISTEN", &mut k.listen)?;

        let dl = &mut c.decision_log;
        v.number(
            "SPECTRAL_DECISION_LOG_CAPACITY",
            &mut dl.capacity,
            1..=10_000_000,
        )?;
        v.number(
            "SPECTRAL_DECISION_LOG_MAX_BYTES",
            &mut dl.max_bytes,
            4096..=u64::from(u32::MAX),
        )?;
        v.number(
            "SPECTRAL_DECISION_LOG_BATCH",
            &mut dl.batch_size,
            1..=100_000,
        )?;
        let mut block = match dl.overflow {
            Overflow::Block(d) => d,
            Overflow::Drop => Duration::from_millis(5),
        };
        v.millis("SPECTRAL_DECISION_LOG_BLOCK_MS", &mut block, 0..=60_000)?;
        v.millis(
            "SPECTRAL_DECISION_LOG_LINGER_MS",
            &mut dl.linger,
            0..=10_000,
        )?;
        dl.durability = match v.get("SPECTRAL_DECISION_LOG_DURABILITY").map(str::trim) {
            None | Some("queued") => Durability::Queued,
            Some("commit") => Durability::Commit,
            Some(other) => {
                return Err(Vars::err(
                    "SPECTRAL_DECISION_LOG_DURABILITY",
                    other,
                    "expected queued or commit",
                ))
            }
        };
        dl.overflow = match v.get("SPECTRAL_DECISION_LOG_OVERFLOW").map(str::trim) {
            None | Some("block") => Overflow::Block(block),
            Some("drop") => Overflow::Drop,
            Some(other) => {
                return Err(Vars::err(
                    "SPECTRAL_DECISION_LOG_OVERFLOW",
                    other,
                    "expected block or drop",
                ))
            }
        };

        v.number("SPECTRAL_BACKGROUND_NICE", &mut c.background.nice, 0..=19)?;

        let o = &mut c.outbox;
        if let Some(g) = v
            .get("SPECTRAL_GENERATION")
            .filter(|g| !g.trim().is_empty())
        {
            let n: i64 = g.trim().parse().map_err(|e| {
                Vars::err("SPECTRAL_GENERATION", g, format!("not a whole number: {e}"))
            })?;
            if n < 1 {
                return Err(Vars::err("SPECTRAL_GENERATION", g, "must be 1 or more"));
            }
            o.generation = Some(n);
        }
        v.millis(
            "SPECTRAL_OUTBOX_POLL_MS",
            &mut o.poll_interval,
            10..=3_600_000,
        )?;
        v.number("SPECTRAL_OUTBOX_BATCH", &mut o.batch_size, 1..=10_000)?;
        v.millis("SPECTRAL_OUTBOX_LEASE_MS", &mut o.lease, 100..=86_400_000)?;
        v.flag("SPECTRAL_OUTBOX_LISTEN", &mut o.listen)?;
        v.millis(
            "SPECTRAL_OUTBOX_RETRY_BASE_MS",
            &mut o.retry_base,
            1..=3_600_000,
        )?;
        v.millis(
            "SPECTRAL_OUTBOX_RETRY_CAP_MS",
            &mut o.retry_cap,
            1..=86_400_000,
        )?;
        v.number(
            "SPECTRAL_OUTBOX_MAX_ATTEMPTS",
            &mut o.max_attempts,
            1..=1000,
        )?;
        v.millis(
            "SPECTRAL_WEBHOOK_TIMEOUT_MS",
            &mut o.webhook_timeout,
            10..=600_000,
        )?;
        v.millis(
            "SPECTRAL_OUTBOX_STRANDED_AFTER_MS",
            &mut o.stranded_after,
            0..=30 * 86_400_000,
        )?;
        v.millis(
            "SPECTRAL_OUTBOX_RETENTION_MS",
            &mut o.retention,
            1_000..=3_650 * 86_400_000,
        )?;
        v.millis(
            "SPECTRAL_OUTBOX_PRUNE_INTERVAL_MS",
            &mut o.prune_interval,
            10..=86_400_000,
        )?;
        v.number(
            "SPECTRAL_OUTBOX_PRUNE_BATCH",
            &mut o.prune_batch,
            1..=100_000,
        )?;
        let im = &mut c.impact;
        v.number(
            "SPECTRAL_CONTEXT_MAX_BYTES",
            &mut im.context_max_bytes,
            2..=1 << 20,
        )?;
        v.millis(
            "SPECTRAL_CONTEXT_RETENTION_MS",
            &mut im.context_retention,
            1..=3_650 * 86_400_000,
        )?;
        v.millis(
            "SPECTRAL_CONTEXT_PRUNE_INTERVAL_MS",
            &mut im.prune_interval,
            10..=86_400_000,
        )?;
        v.number("SPECTRAL_SHADOW_QUEUE", &mut im.shadow_queue, 1..=1 << 20)?;
        v.number(
            "SPECTRAL_SHADOW_CPU_PERCENT",
            &mut im.shadow_cpu_percent,
            1..=100,
        )?;
        v.number("SPECTRAL_SHADOW_NICE", &mut im.shadow_nice, 0..=19)?;
        v.millis(
            "SPECTRAL_SHADOW_FLUSH_MS",
            &mut im.shadow_flush,
            10..=600_000,
        )?;
        v.number(
            "SPECTRAL_REPLAY_MAX_ROWS",
            &mut im.replay_max_rows,
            1..=10_000_000,
        )?;
        v.millis(
            "SPECTRAL_REPLAY_DEADLINE_MS",
            &mut im.replay_deadline,
            100..=3_600_000,
        )?;
        v.millis("SPECTRAL_REPLAY_POLL_MS", &mut im.replay_poll, 10..=600_000)?;

        if let Some(list) = v.get("SPECTRAL_WEBHOOK_ALLOW_NETWORKS") {
            o.webhook_egress = crate::egress::Egress::parse(list)
                .map_err(|why| Vars::err("SPECTRAL_WEBHOOK_ALLOW_NETWORKS", list, why))?;
        }

        if let Some(key) = v
            .get("SPECTRAL_WEBHOOK_SECRET_KEY")
            .map(str::trim)
            .filter(|k| !k.is_empty())
        {
            if crate::seal::Sealer::from_hex(key).is_err() {
                return Err(Vars::err(
                    "SPECTRAL_WEBHOOK_SECRET_KEY",
                    "<redacted>",
                    "must be 64 hex digits (32 bytes), e.g. from `openssl rand -hex 32`",
                ));
            }
            o.webhook_secret_key = Some(Secret::new(key));
        }

        let b = &mut c.bootstrap;
        if let Some(key) = v.get("SPECTRAL_OPERATOR_KEY").filter(|k| !k.is_empty()) {
            if key.len() < 16 {
                return Err(Vars::err(
                    "SPECTRAL_OPERATOR_KEY",
                    "<redacted>",
                    "must be at least 16 characters",
                ));
            }
            b.operator_key = Some(Secret::new(key));
        }
        if let Some(dir) = v.get("SPECTRAL_SEED_DIR") {
            b.seed_dir = (!dir.trim().is_empty()).then(|| PathBuf::from(dir));
        }

        let a = &mut c.agent;
        if let Some(base) = v
            .get("SPECTRAL_AGENT_BASE_URL")
            .map(str::trim)
            .filter(|b| !b.is_empty())
        {
            // Never echo the value: a URL may carry credentials.
            let parsed = url::Url::parse(base).map_err(|e| {
                Vars::err(
                    "SPECTRAL_AGENT_BASE_URL",
                    "<redacted>",
                    format!("not a URL: {e}"),
                )
            })?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.cannot_be_a_base() {
                return Err(Vars::err(
                    "SPECTRAL_AGENT_BASE_URL",
                    "<redacted>",
                    "must be an http:// or https:// URL",
                ));
            }
            if !parsed.username().is_empty() || parsed.password().is_some() {
                return Err(Vars::err(
                    "SPECTRAL_AGENT_BASE_URL",
                    "<redacted>",
                    "must not carry credentials; set SPECTRAL_AGENT_API_KEY instead",
                ));
            }
            a.base_url = Some(parsed);
        }
        if let Some(model) = v.get("SPECTRAL_AGENT_MODEL") {
            a.model = model.trim().to_string();
        }
        if a.base_url.is_some() && a.model.is_empty() {
            return Err(Vars::err(
                "SPECTRAL_AGENT_MODEL",
                "",
                "required when SPECTRAL_AGENT_BASE_URL is set",
            ));
        }
        if let Some(key) = v
            .get("SPECTRAL_AGENT_API_KEY")
            .filter(|k| !k.trim().is_empty())
        {
            a.api_key = Some(Secret::new(key.trim()));
        }
        v.flag("SPECTRAL_AGENT_STREAM", &mut a.stream)?;
        v.millis(
            "SPECTRAL_AGENT_CONNECT_TIMEOUT_MS",
            &mut a.connect_timeout,
            10..=600_000,
        )?;
        v.millis(
            "SPECTRAL_AGENT_FIRST_TOKEN_TIMEOUT_MS",
            &mut a.first_token_timeout,
            10..=3_600_000,
        )?;
        v.millis(
            "SPECTRAL_AGENT_CALL_TIMEOUT_MS",
            &mut a.call_timeout,
            10..=3_600_000,
        )?;
        v.number("SPECTRAL_AGENT_MAX_ATTEMPTS", &mut a.max_attempts, 1..=20)?;
        v.millis(
            "SPECTRAL_AGENT_RETRY_BASE_MS",
            &mut a.retry_base,
            1..=600_000,
        )?;
        v.millis(
            "SPECTRAL_AGENT_RETRY_CAP_MS",
            &mut a.retry_cap,
            1..=3_600_000,
        )?;
        v.number(
            "SPECTRAL_AGENT_MAX_TOKENS",
            &mut a.max_tokens,
            1..=1_000_000,
        )?;
        v.number(
            "SPECTRAL_AGENT_MAX_RESPONSE_BYTES",
            &mut a.max_response_bytes,
            1024..=256 << 20,
        )?;
        v.number("SPECTRAL_AGENT_MAX_STEPS", &mut a.max_steps, 1..=1_000)?;
        v.number("SPECTRAL_AGENT_MAX_CALLS", &mut a.max_calls, 1..=500)?;
        v.number(
            "SPECTRAL_AGENT_MAX_RUN_TOKENS",
            &mut a.max_run_tokens,
            1..=100_000_000,
        )?;
        v.number("SPECTRAL_AGENT_MAX_REPAIRS", &mut a.max_repairs, 0..=20)?;
        v.millis(
            "SPECTRAL_AGENT_MAX_RUN_MS",
            &mut a.max_run_time,
            1_000..=86_400_000,
        )?;
        v.number("SPECTRAL_AGENT_CONCURRENCY", &mut a.concurrency, 1..=256)?;
        v.number(
            "SPECTRAL_AGENT_MAX_RUNS_PER_WORLD",
            &mut a.max_runs_per_world,
            1..=10_000,
        )?;
        v.millis("SPECTRAL_AGENT_LEASE_MS", &mut a.lease, 300..=3_600_000)?;
        v.millis("SPECTRAL_AGENT_POLL_MS", &mut a.poll, 10..=600_000)?;
        v.millis(
            "SPECTRAL_AGENT_RETENTION_MS",
            &mut a.retention,
            1_000..=u64::MAX / 2,
        )?;
        v.number(
            "SPECTRAL_AGENT_CHAT_HISTORY",
            &mut a.chat_history,
            2..=1_000,
        )?;
        v.number(
            "SPECTRAL_AGENT_MAX_STREAMS",
            &mut a.max_streams,
            1..=100_000,
        )?;
        v.flag("SPECTRAL_AGENT_LISTEN", &mut a.listen)?;

        let l = &mut c.log;
        match v.get("SPECTRAL_LOG_FORMAT").map(str::trim) {
            None | Some("pretty") => {}
            Some("json") => l.json = true,
            Some(other) => {
                return Err(Vars::err(
                    "SPECTRAL_LOG_FORMAT",
                    other,
                    "expected json or pretty",
                ))
            }
        }
        if let Some(filter) = v.get("SPECTRAL_LOG") {
            l.filter = filter.to_string();
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_with_no_environment() {
        assert_eq!(Config::from_vars(vec![]), Ok(Config::default()));
        let c = Config::default();
        assert_eq!(c.server.addr.port(), 8000);
        assert!(c.server.addr.ip().is_loopback());
        assert!(c.server.admin_addr.ip().is_loopback());
        assert!(c.store.database_url.is_none());
    }

    #[test]
    fn reads_every_section() {
        let c = Config::from_vars(vars(&[
            ("SPECTRAL_SANDBOX_MAX_OPERATIONS", "500"),
            ("SPECTRAL_SANDBOX_DEADLINE_US", "2000"),
            ("SPECTRAL_ADDR", "127.0.0.1:9000"),
            ("SPECTRAL_ADMIN_ADDR", "127.0.0.1:9100"),
            ("SPECTRAL_HEADER_TIMEOUT_MS", "250"),
            ("DATABASE_URL", "postgres://u:pw@h/db"),
            ("SPECTRAL_DEPLOY_LISTEN", "false"),
            ("SPECTRAL_DECISION_LOG_OVERFLOW", "drop"),
            ("SPECTRAL_SEED_DIR", ""),
            ("SPECTRAL_LOG_FORMAT", "json"),
            ("UNRELATED", "x"),
        ]))
        .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(c.sandbox.max_operations, 500);
        assert_eq!(c.sandbox.deadline_us, 2000);
        assert_eq!(c.server.addr.port(), 9000);
        assert_eq!(c.server.admin_addr.port(), 9100);
        assert_eq!(c.server.header_timeout, Duration::from_millis(250));
        assert_eq!(
            c.store.database_url.as_deref(),
            Some("postgres://u:pw@h/db")
        );
        assert!(!c.cache.listen);
        assert_eq!(c.decision_log.overflow, Overflow::Drop);
        assert_eq!(c.bootstrap.seed_dir, None);
        assert!(c.log.json);
    }

    #[test]
    fn rejects_garbage_and_out_of_range_values_by_name() {
        let e = Config::from_vars(vars(&[("SPECTRAL_SANDBOX_MAX_OPERATIONS", "lots")]));
        assert_eq!(
            e.map_err(|e| e.name),
            Err("SPECTRAL_SANDBOX_MAX_OPERATIONS".to_string())
        );
        let e = Config::from_vars(vars(&[("SPECTRAL_SANDBOX_MAX_EXPR_DEPTH", "100000")]));
        assert!(e.is_err_and(|e| e.reason.contains("4..=128")));
        let e = Config::from_vars(vars(&[("SPECTRAL_DEPLOY_LISTEN", "maybe")]));
        assert!(e.is_err());
    }

    /// Every variable the configuration reads is documented in docs/config.md, and every one
    /// documented there is read (except the few read elsewhere, named below).
    #[test]
    fn docs_name_exactly_the_variables_that_are_read() {
        let v = Vars(HashMap::new(), Default::default());
        Config::read(&v).unwrap_or_else(|e| unreachable!("{e}"));
        let read = v.1.into_inner();
        let documented: std::collections::BTreeSet<String> = include_str!("../docs/config.md")
            .lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|rest| rest.split('`').next())
            .filter(|name| name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .map(str::to_string)
            .collect();
        // Read by the build, the gate, the Worker or the tests, not by the service's config.
        let elsewhere = [
            "GIT_SHA",
            "PUBLIC_URL",
            "SPECTRAL_GIT_SHA",
            "SPECTRAL_TEST_DATABASE_URL",
        ];
        let undocumented: Vec<&String> = read.difference(&documented).collect();
        assert!(
            undocumented.is_empty(),
            "read but not in docs/config.md: {undocumented:?}"
        );
        let unread: Vec<&String> = documented
            .difference(&read)
            .filter(|n| !elsewhere.contains(&n.as_str()))
            .collect();
        assert!(
            unread.is_empty(),
            "in docs/config.md but never read: {unread:?}"
        );
    }

    #[test]
    fn secrets_never_print() {
        let e = Config::from_vars(vars(&[("DATABASE_URL", "mysql://u:hunter2@h/db")]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!e.contains("hunter2"), "{e}");
        let c = Config::from_vars(vars(&[
            ("SPECTRAL_OPERATOR_KEY", "spk_supersecretvalue123"),
            ("DATABASE_URL", "postgres://u:hunter2@h/db"),
            ("SPECTRAL_AGENT_BASE_URL", "http://127.0.0.1:9/v1"),
            ("SPECTRAL_AGENT_MODEL", "m"),
            ("SPECTRAL_AGENT_API_KEY", "sk-llmkeyvalue42"),
        ]))
        .unwrap_or_else(|e| unreachable!("{e}"));
        let printed = format!("{c:?}");
        assert!(!printed.contains("supersecretvalue"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("llmkeyvalue"), "{printed}");
        let key = c.agent.api_key.unwrap_or_else(|| Secret::new(""));
        assert_eq!(key.expose(), "sk-llmkeyvalue42");
        assert_eq!(key.to_string(), "<redacted>");
        let e = Config::from_vars(vars(&[(
            "SPECTRAL_AGENT_BASE_URL",
            "ftp://user:hunter2@h/v1",
        )]))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            e.contains("SPECTRAL_AGENT_BASE_URL") && !e.contains("hunter2"),
            "{e}"
        );
        let e = Config::from_vars(vars(&[
            ("SPECTRAL_AGENT_BASE_URL", "https://user:hunter2@h/v1"),
            ("SPECTRAL_AGENT_MODEL", "m"),
        ]))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("credentials") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn agent_needs_a_model_with_a_base_url() {
        let e = Config::from_vars(vars(&[("SPECTRAL_AGENT_BASE_URL", "http://h/v1")]));
        assert_eq!(
            e.map_err(|e| e.name),
            Err("SPECTRAL_AGENT_MODEL".to_string())
        );
        let c = Config::from_vars(vars(&[
            ("SPECTRAL_AGENT_BASE_URL", "http://h:8080/v1"),
            ("SPECTRAL_AGENT_MODEL", "qwen2.5"),
            ("SPECTRAL_AGENT_STREAM", "false"),
            ("SPECTRAL_AGENT_MAX_ATTEMPTS", "2"),
        ]))
        .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(c.agent.model, "qwen2.5");
        assert!(!c.agent.stream);
        assert_eq!(c.agent.max_attempts, 2);
        assert!(c.agent.api_key.is_none());
        let e = Config::from_vars(vars(&[("SPECTRAL_AGENT_MAX_ATTEMPTS", "0")]));
        assert!(e.is_err_and(|e| e.name == "SPECTRAL_AGENT_MAX_ATTEMPTS"));
    }
}

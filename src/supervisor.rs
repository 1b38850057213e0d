//! The composition root: builds the store, sandbox, cache, decision log and service, runs
//! bootstrap, serves HTTP, and shuts everything down in order within one deadline: not
//! ready, drain HTTP (the deadline less a reserve), stop the workers, write the decision
//! log, close the pools.
//!
//! **Boundary:** nothing depends on this module but the CLI. It is the only place that knows
//! every other module.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::runner::{AgentHealth, Runner};
use crate::config::{Config, OutboxConfig};
use crate::outbox::{handlers, Consumer, OutboxState, Wiring};
use crate::sandbox::Sandbox;
use crate::service::auth::{self, Keys};
use crate::service::cache::Cache;
use crate::service::decision_log::DecisionLog;
use crate::service::{App, BuildInfo, ServiceError};
use crate::store::{NewKey, Scope, Store, StoreConfig, StoreError};
use crate::telemetry::Metrics;

/// Starting the service failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("bootstrap: {0}")]
    Bootstrap(#[from] ServiceError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("workers runtime: {0}")]
    Workers(String),
    #[error("decision-log writer: {0}")]
    DecisionLog(String),
    #[error("{0}")]
    Config(String),
}

/// Which entrypoints run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The API and, on a second runtime, the workers (`spectral serve`).
    Both,
    /// The API alone (`spectral api`).
    Api,
}

/// This deploy's generation: configured, or this build's in the store (resumed after a
/// restart, allocated on its first start).
async fn generation(store: &Store, config: &Config) -> Result<i64, StartError> {
    match config.outbox.generation {
        Some(g) => Ok(g),
        None => {
            let build = BuildInfo::current();
            let (g, resumed) = store
                .generation_for_build(build.git_sha, "allocated at start")
                .await?;
            if resumed {
                tracing::info!(
                    generation = g,
                    git_sha = build.git_sha,
                    "resumed this build's generation"
                );
            } else {
                tracing::info!(
                    generation = g,
                    git_sha = build.git_sha,
                    "allocated a generation"
                );
            }
            Ok(g)
        }
    }
}

/// The share of the shutdown deadline kept, after the HTTP drain, for what follows it:
/// stopping the workers, writing the decision log, closing the pools.
pub fn reserve(grace: Duration) -> Duration {
    (grace / 4).min(Duration::from_secs(5))
}

/// The workers runtime: its own tokio runtime on its own OS thread, with its own pool, so
/// that a burst of background work never takes the API's threads or connections.
pub struct Workers {
    /// Cancelled once to stop; the consumer finishes the row in hand and returns.
    stop: CancellationToken,
    /// Cancelled by the thread when the runtime has ended, asked to or not.
    ended: CancellationToken,
    pub state: Arc<OutboxState>,
}

impl Workers {
    /// Start the consumer of `generation` on a new thread, counting in `metrics`. `beside`
    /// is the API's store when the API runs in this process: the workers' store then shares
    /// its in-process wake, so that the API's commits wake the consumer at once.
    pub fn spawn(
        config: &Config,
        generation: i64,
        beside: Option<Store>,
        metrics: Arc<Metrics>,
        health: Arc<AgentHealth>,
    ) -> Result<Self, StartError> {
        let state = Arc::new(OutboxState::new(metrics));
        let stop = CancellationToken::new();
        let ended = CancellationToken::new();
        let mut store_config = config.store.clone();
        store_config.migrate_on_start = false;
        let outbox = config.outbox.clone();
        let agent = AgentWiring {
            impact: config.impact.clone(),
            config: config.agent.clone(),
            sandbox: config.sandbox.clone(),
            health: health.clone(),
            metrics: state.metrics(),
        };
        let (thread_state, thread_stop, thread_ended) =
            (state.clone(), stop.clone(), ended.clone());
        let nice = config.background.nice;
        crate::background::spawn("spectral-workers", nice, move || {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_workers(
                    &store_config,
                    beside,
                    outbox,
                    agent,
                    generation,
                    thread_state.clone(),
                    thread_stop,
                )
            }));
            let failure = match run {
                Ok(Ok(())) => None,
                Ok(Err(reason)) => Some(reason),
                Err(_) => Some("the workers runtime panicked".to_string()),
            };
            if let Some(reason) = failure {
                tracing::error!(error = %reason, "the workers runtime failed; this process is not ready");
                thread_state.set(Wiring::Failed);
            }
            thread_ended.cancel();
        })
        .map_err(|e| StartError::Workers(e.to_string()))?;
        Ok(Self { stop, ended, state })
    }

    /// Resolves once the runtime has ended, asked to or not.
    pub async fn ended(&self) {
        self.ended.cancelled().await;
    }

    /// Whether the runtime ended on a failure.
    pub fn failed(&self) -> bool {
        self.state.wiring() == Wiring::Failed
    }

    /// Stop and wait for the runtime to finish.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.ended.cancelled().await;
    }
}

/// What the workers need to run the World Agent, and replays.
struct AgentWiring {
    impact: crate::config::ImpactConfig,
    config: crate::config::AgentConfig,
    sandbox: crate::sandbox::Limits,
    health: Arc<AgentHealth>,
    metrics: Arc<Metrics>,
}

/// The body of the workers thread: a runtime, a store, the consumer and (when a model is
/// configured) the World Agent's runner until `stop`.
fn run_workers(
    config: &StoreConfig,
    beside: Option<Store>,
    outbox: OutboxConfig,
    agent: AgentWiring,
    generation: i64,
    state: Arc<OutboxState>,
    stop: CancellationToken,
) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("spectral-worker")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the workers runtime: {e}"))?;
    runtime.block_on(async move {
        let store = match &beside {
            Some(api) => Store::connect_beside(config, api, "spectral-workers").await,
            None => Store::connect(config).await,
        }
        .map_err(|e| format!("the workers cannot reach the store: {e}"))?;
        // The API's commits reach this consumer only if the two stores share one wake.
        let woken = beside
            .as_ref()
            .is_some_and(|api| std::ptr::eq(api.local_wake(), store.local_wake()));
        drop(beside);
        store.set_generation(generation);
        let wake = Arc::new(tokio::sync::Notify::new());
        let seal = crate::seal::Sealer::for_store(outbox.webhook_secret_key.as_ref(), config)
            .map_err(|e| format!("webhook secrets: {e}"))?;
        let registry = handlers::registry(
            store.clone(),
            outbox.webhook_timeout,
            &outbox.webhook_egress,
            wake.clone(),
            seal,
        )
        .map_err(|e| format!("cannot build the webhook client: {e}"))?;
        // Replays (and the retention of kept contexts) run beside the consumer.
        let impact = &agent.impact;
        let replays = crate::impact::ReplayRunner {
            store: store.clone(),
            sandbox: Arc::new(crate::sandbox::Sandbox::new(agent.sandbox.clone())),
            limits: crate::impact::ReplayLimits {
                max_rows: impact.replay_max_rows,
                deadline: impact.replay_deadline,
                page: 500,
            },
            poll: impact.replay_poll,
            retention: impact.context_retention,
            prune_interval: impact.prune_interval,
            prune_batch: outbox.prune_batch.max(1),
            worker: format!(
                "replayer-{}-{}",
                std::process::id(),
                uuid::Uuid::now_v7().simple()
            ),
            metrics: agent.metrics.clone(),
        };
        let runner = match crate::agent::provider::Provider::new(&agent.config) {
            Ok(provider) => Some(Arc::new(Runner {
                store: store.clone(),
                provider: Arc::new(provider),
                sandbox: Arc::new(crate::sandbox::Sandbox::new(agent.sandbox)),
                config: agent.config,
                owner: format!(
                    "worker-{}-{}",
                    std::process::id(),
                    uuid::Uuid::now_v7().simple()
                ),
                wake,
                metrics: agent.metrics,
                health: agent.health,
            })),
            Err(e) => {
                tracing::info!(reason = %e, "the World Agent is not running");
                None
            }
        };
        let agent_runs = async {
            if let Some(runner) = runner {
                runner.run(stop.clone()).await;
            }
        };
        // Retention runs beside the consumer, on this runtime, until the consumer returns.
        let retention_stop = stop.child_token();
        let retention = tokio::spawn(
            crate::outbox::Retention::new(store.clone(), &outbox, state.clone())
                .run(retention_stop.clone()),
        );
        let replaying = tokio::spawn(replays.run(retention_stop.clone()));
        let consumed = Consumer::new(store.clone(), registry, outbox, generation, state)
            .woken_in_process(woken)
            .run(stop.clone());
        let (result, ()) = tokio::join!(consumed, agent_runs);
        retention_stop.cancel();
        let _ = retention.await;
        let _ = replaying.await;
        store.close().await;
        result.map_err(|e| format!("the outbox consumer cannot reach the store: {e}"))
    })
}

/// How a service stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Asked to, and every step finished within the deadline.
    Clean,
    /// The workers runtime failed; the service stopped itself.
    WorkersFailed,
    /// A step did not finish within the shutdown deadline and was abandoned.
    DeadlineExceeded,
}

/// A running service.
pub struct Running {
    /// The address the API listens on.
    pub addr: SocketAddr,
    /// The address of the admin listener: the detailed `/health` and `/metrics`.
    pub admin_addr: SocketAddr,
    pub app: Arc<App>,
    /// The operator key generated at this start, if one was (it is shown once).
    pub generated_operator_key: Option<String>,
    /// The root of the shutdown tree: cancelling it begins the stop, which cancels the
    /// server and the cache watcher with it.
    stop: CancellationToken,
    done: JoinHandle<Stopped>,
}

impl Running {
    /// Begin a graceful shutdown and wait for it to finish.
    pub async fn shutdown(self) -> Stopped {
        self.stop.cancel();
        self.wait().await
    }

    /// Wait until the service stops (after [`Running::trigger`] or a failure).
    pub async fn wait(self) -> Stopped {
        self.done.await.unwrap_or(Stopped::DeadlineExceeded)
    }

    /// The token that begins shutdown when cancelled; it is cancelled as well when the
    /// service stops itself.
    pub fn trigger(&self) -> CancellationToken {
        self.stop.clone()
    }
}

/// Start the API and the workers on a bound listener.
pub async fn start(config: Config, listener: TcpListener) -> Result<Running, StartError> {
    start_mode(config, listener, Mode::Both).await
}

/// Start the API, with or without the workers runtime.
pub async fn start_mode(
    config: Config,
    listener: TcpListener,
    mode: Mode,
) -> Result<Running, StartError> {
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.server.addr,
        source,
    })?;
    // The admin listener is bound first, so that an address in use fails the start before
    // anything else is set up.
    let admin_at = config.server.admin_addr;
    let admin = TcpListener::bind(admin_at)
        .await
        .map_err(|source| StartError::Listen {
            addr: admin_at,
            source,
        })?;
    let admin_addr = admin.local_addr().map_err(|source| StartError::Listen {
        addr: admin_at,
        source,
    })?;
    let store = Store::connect(&config.store).await?;
    let generation = generation(&store, &config).await?;
    store.set_generation(generation);
    let metrics = Arc::new(Metrics::default());
    let sandbox = Arc::new(Sandbox::new(config.sandbox.clone()));
    let cache = Arc::new(Cache::new(
        store.clone(),
        sandbox.clone(),
        metrics.clone(),
        config.cache.clone(),
    ));
    let (log, writer) = DecisionLog::start(
        store.clone(),
        &config.decision_log,
        config.background.nice,
        metrics.clone(),
    )
    .map_err(|e| StartError::DecisionLog(format!("cannot start its thread: {e}")))?;
    let shadows = Arc::new(
        crate::impact::Shadows::start(
            sandbox.clone(),
            config.impact.shadow_queue,
            config.impact.shadow_cpu_percent,
            config.impact.shadow_nice,
        )
        .map_err(|e| StartError::DecisionLog(format!("cannot start the shadow evaluator: {e}")))?,
    );
    let agent_health = Arc::new(AgentHealth::default());
    let workers = match mode {
        Mode::Both => Some(Workers::spawn(
            &config,
            generation,
            Some(store.clone()),
            metrics.clone(),
            agent_health.clone(),
        )?),
        Mode::Api => None,
    };
    let app = Arc::new(App {
        sandbox,
        store: store.clone(),
        cache: cache.clone(),
        keys: Keys::new(store.clone(), &config.keys),
        log,
        // The health of this process shows the consumer of its own workers runtime.
        outbox: workers.as_ref().map_or_else(
            || Arc::new(OutboxState::new(metrics.clone())),
            |w| w.state.clone(),
        ),
        metrics,
        build: BuildInfo::current(),
        started: Instant::now(),
        ready: Default::default(),
        generation,
        evaluation: crate::service::Evaluation::new(&config.evaluation),
        egress: config.outbox.webhook_egress.clone(),
        agent: crate::service::AgentState {
            configured: crate::agent::provider::Provider::new(&config.agent).is_ok(),
            config: config.agent.clone(),
            health: agent_health,
            streams: Arc::new(tokio::sync::Semaphore::new(config.agent.max_streams)),
            wakes: Arc::default(),
        },
        webhook_seal: crate::seal::Sealer::for_store(
            config.outbox.webhook_secret_key.as_ref(),
            &config.store,
        )
        .map_err(|e| StartError::Config(e.to_string()))?,
        stranded_after: config.outbox.stranded_after,
        shadows: shadows.clone(),
        impact: config.impact.clone(),
    });

    let generated_operator_key = ensure_operator_key(&store, &config).await?;
    if let Some(dir) = config.bootstrap.seed_dir.as_ref().filter(|d| d.is_dir()) {
        let seeded = app.seed(dir).await?;
        if !seeded.is_empty() {
            tracing::info!(worlds = seeded.len(), dir = %dir.display(), "published and deployed example worlds");
        }
    }
    let notifications = cache.listen().await;
    cache.refresh().await?;

    // The shutdown tree: one root token; the server and the cache watcher end with it, and
    // the tracker says when both have.
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(cache.clone().watch(notifications, stop.child_token()));
    let key_changes = app.keys.listen().await;
    tasks.spawn(app.keys.watch(key_changes, stop.child_token()));
    tasks.spawn(app.agent.wakes.clone().watch(
        store.clone(),
        config.agent.listen,
        stop.child_token(),
    ));
    let evaluated = cache.clone();
    tasks.spawn(shadows.run_flusher(
        store.clone(),
        move || evaluated.shadow_ids(),
        config.impact.shadow_flush,
        stop.child_token(),
    ));
    let grace = config.server.shutdown_grace;
    let reserve = reserve(grace);
    tasks.spawn(crate::http::serve(
        listener,
        crate::http::Surface::Public,
        app.clone(),
        config.server.clone(),
        stop.child_token(),
        grace.saturating_sub(reserve),
    ));
    tasks.spawn(crate::http::serve(
        admin,
        crate::http::Surface::Admin,
        app.clone(),
        config.server.clone(),
        stop.child_token(),
        grace.saturating_sub(reserve),
    ));
    tasks.close();
    app.ready.store(true, Ordering::Release);
    tracing::info!(%addr, %admin_addr, backend = ?store.backend(), generation, "spectral API listening");

    let stop_app = app.clone();
    let root = stop.clone();
    let done = tokio::spawn(async move {
        let app = stop_app;
        let mut outcome = Stopped::Clean;
        let workers_ended = async {
            match &workers {
                Some(w) => w.ended().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = root.cancelled() => {}
            _ = workers_ended => {
                tracing::error!("the workers runtime ended on its own; stopping the service");
                outcome = Stopped::WorkersFailed;
            }
        }
        // One deadline for the whole stop (ARCHITECTURE.md, "Supervisor").
        let deadline = tokio::time::Instant::now() + grace;
        // Not ready first, so that health checks steer traffic away while we drain.
        app.ready.store(false, Ordering::Release);
        root.cancel();
        // The server drains within the deadline minus the reserve, and returns.
        if tokio::time::timeout_at(deadline, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("the server did not return within the shutdown deadline");
        }
        // The workers finish the row in hand, leaving half the reserve to the decision log.
        if let Some(w) = &workers {
            if tokio::time::timeout_at(deadline - reserve / 2, w.stop())
                .await
                .is_err()
            {
                tracing::warn!("the workers did not stop within their share of the deadline");
                outcome = outcome.or(Stopped::DeadlineExceeded);
            }
            if w.failed() {
                outcome = Stopped::WorkersFailed;
            }
        }
        // Requests are done: write what the decision log still holds, then close the pool.
        app.log.stop();
        if tokio::time::timeout_at(deadline, writer).await.is_err() {
            tracing::error!(
                queued = app.log.depth(),
                "the decision log was not written within the shutdown deadline; its queued records are lost"
            );
            outcome = outcome.or(Stopped::DeadlineExceeded);
        }
        if tokio::time::timeout_at(deadline, app.store.close())
            .await
            .is_err()
        {
            tracing::warn!("the store's pool did not close within the shutdown deadline");
        }
        tracing::info!(outcome = ?outcome, "spectral stopped");
        outcome
    });
    Ok(Running {
        addr,
        admin_addr,
        app,
        generated_operator_key,
        stop,
        done,
    })
}

impl Stopped {
    /// The first failure seen wins.
    fn or(self, other: Stopped) -> Stopped {
        match self {
            Stopped::Clean => other,
            failed => failed,
        }
    }
}

/// Make sure an operator key exists: the configured one, or a new one that is returned so
/// the caller can show it once.
async fn ensure_operator_key(store: &Store, config: &Config) -> Result<Option<String>, StartError> {
    if let Some(secret) = &config.bootstrap.operator_key {
        let hash = auth::hash_secret(secret.expose());
        if store.key_by_hash(&hash).await?.is_none() {
            let id = format!("key_operator_{}", &hash[..8]);
            store
                .create_key(&NewKey {
                    id,
                    secret_hash: hash,
                    world: None,
                    scopes: Scope::ALL.to_vec(),
                    label: "operator (SPECTRAL_OPERATOR_KEY)".into(),
                    expires_at: None,
                })
                .await
                .map_err(|e| match e {
                    // Its id is taken but its secret matches nothing: it was revoked.
                    StoreError::Conflict(_) => StartError::Config(
                        "SPECTRAL_OPERATOR_KEY is a key that was revoked; configure a new one"
                            .into(),
                    ),
                    other => other.into(),
                })?;
        }
        return Ok(None);
    }
    if store.has_operator_key().await? {
        return Ok(None);
    }
    let (id, secret) = auth::generate();
    store
        .create_key(&NewKey {
            id,
            secret_hash: auth::hash_secret(&secret),
            world: None,
            scopes: Scope::ALL.to_vec(),
            label: "operator (generated at first start)".into(),
            expires_at: None,
        })
        .await?;
    Ok(Some(secret))
}

/// Run the workers alone until SIGTERM or SIGINT (`spectral workers`); `Err` when the
/// workers runtime fails.
pub async fn run_workers_until_signal(config: Config) -> Result<(), StartError> {
    let generation = config.outbox.generation.ok_or_else(|| {
        StartError::Config(
            "spectral workers needs SPECTRAL_GENERATION: the generation of the API whose events it handles"
                .into(),
        )
    })?;
    // Migrate (when configured) before the workers thread connects without migrating.
    let store = Store::connect(&config.store).await?;
    store.close().await;
    let grace = config.server.shutdown_grace;
    // No API in this process: nothing wakes the consumer but notifications and its poll.
    let workers = Workers::spawn(
        &config,
        generation,
        None,
        Arc::new(Metrics::default()),
        Arc::new(AgentHealth::default()),
    )?;
    tracing::info!(generation, "spectral workers running");
    tokio::select! {
        _ = signal() => {
            tracing::info!("shutdown signal received; finishing the row in hand");
            finish_within(grace, workers.stop()).await;
        }
        _ = workers.ended() => {}
    }
    if workers.failed() {
        return Err(StartError::Workers("the workers runtime failed".into()));
    }
    Ok(())
}

/// Wait for a shutdown to finish; a second signal, or `limit` running out, ends the process
/// at once.
async fn finish_within<T>(limit: Duration, shutdown: impl std::future::Future<Output = T>) -> T {
    tokio::select! {
        out = shutdown => out,
        _ = signal() => {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
        _ = tokio::time::sleep(limit) => {
            tracing::error!("shutdown exceeded its deadline: exiting now");
            std::process::exit(1);
        }
    }
}

/// Run until SIGTERM or SIGINT, or until the service stops itself (its workers runtime
/// failed), then shut down gracefully within the one deadline. A second signal ends the
/// process at once. Returns how the service stopped.
pub async fn run_until_signal(config: Config, mode: Mode) -> Result<Stopped, StartError> {
    let grace = config.server.shutdown_grace;
    let addr = config.server.addr;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })?;
    let running = start_mode(config, listener, mode).await?;
    if let Some(key) = &running.generated_operator_key {
        // Printed once, to stdout, and never logged: the only copy the operator gets.
        println!("operator key (shown once, store it now): {key}");
    }
    let trigger = running.trigger();
    let waiting = running.wait();
    tokio::pin!(waiting);
    tokio::select! {
        _ = signal() => {
            tracing::info!("shutdown signal received; draining");
            trigger.cancel();
        }
        // The service stops itself when its workers runtime fails.
        _ = trigger.cancelled() => {}
    }
    // Every step inside keeps to the deadline; this backstop ends a step that hangs past it
    // (the margin lets the stop report its outcome first).
    Ok(finish_within(grace + Duration::from_millis(500), waiting).await)
}

/// Wait for SIGTERM or SIGINT.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

//! The composition root: builds the store, sandbox, cache, decision log and service, runs
//! bootstrap, serves HTTP, and shuts everything down in order under one grace period.
//!
//! **Boundary:** nothing depends on this module but the CLI. It is the only place that knows
//! every other module.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::outbox::{handlers, Consumer, OutboxState};
use crate::sandbox::Sandbox;
use crate::service::auth::{self, Keys};
use crate::service::cache::Cache;
use crate::service::decision_log::DecisionLog;
use crate::service::{App, BuildInfo, ServiceError};
use crate::store::{NewKey, Scope, Store, StoreError};
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

/// This deploy's generation: configured, or allocated from the store.
async fn generation(store: &Store, config: &Config) -> Result<i64, StartError> {
    match config.outbox.generation {
        Some(g) => Ok(g),
        None => {
            let build = BuildInfo::current();
            let g = store
                .allocate_generation(build.git_sha, "allocated at start")
                .await?;
            tracing::info!(generation = g, "allocated a generation");
            Ok(g)
        }
    }
}

/// The workers runtime: its own tokio runtime on its own OS thread, with its own pool, so
/// that a burst of background work never takes the API's threads or connections.
pub struct Workers {
    /// Signalled once to stop; the consumer finishes the row in hand and returns.
    stop: watch::Sender<bool>,
    /// Completed by the thread when the runtime has shut down.
    done: tokio::sync::oneshot::Receiver<()>,
    pub state: Arc<OutboxState>,
}

impl Workers {
    /// Start the consumer of `generation` on a new thread.
    pub fn spawn(config: &Config, generation: i64) -> Result<Self, StartError> {
        let state = Arc::new(OutboxState::default());
        let (stop, stopped) = watch::channel(false);
        let (finished, done) = tokio::sync::oneshot::channel();
        let mut store_config = config.store.clone();
        store_config.migrate_on_start = false;
        let outbox = config.outbox.clone();
        let thread_state = state.clone();
        let nice = config.background.nice;
        crate::background::spawn("spectral-workers", nice, move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("spectral-worker")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the workers runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                let store = match Store::connect(&store_config).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "workers cannot reach the store");
                        return;
                    }
                };
                store.set_generation(generation);
                let registry = handlers::registry(store.clone(), outbox.webhook_timeout);
                Consumer::new(store.clone(), registry, outbox, generation, thread_state)
                    .run(stopped)
                    .await;
                store.close().await;
            });
            let _ = finished.send(());
        })
        .map_err(|e| StartError::Workers(e.to_string()))?;
        Ok(Self { stop, done, state })
    }

    /// Stop and wait for the runtime to finish.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.done.await;
    }
}

/// A running service.
pub struct Running {
    /// The address the API listens on.
    pub addr: SocketAddr,
    pub app: Arc<App>,
    /// The operator key generated at this start, if one was (it is shown once).
    pub generated_operator_key: Option<String>,
    /// The supervisor signals it once to begin shutdown; the server, the cache watcher and
    /// the shutdown sequence wait on it.
    stop: watch::Sender<bool>,
    done: JoinHandle<()>,
}

impl Running {
    /// Begin a graceful shutdown and wait for it to finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.done.await;
    }

    /// Wait until the service stops (after [`Running::trigger`] or a fatal error).
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// A handle that begins shutdown when sent `true`.
    pub fn trigger(&self) -> watch::Sender<bool> {
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
    let workers = match mode {
        Mode::Both => Some(Workers::spawn(&config, generation)?),
        Mode::Api => None,
    };
    let app = Arc::new(App {
        sandbox,
        store: store.clone(),
        cache: cache.clone(),
        keys: Keys::new(store.clone()),
        log,
        metrics,
        build: BuildInfo::current(),
        started: Instant::now(),
        ready: Default::default(),
        generation,
        // The health of this process shows the consumer of its own workers runtime.
        outbox: workers
            .as_ref()
            .map_or_else(|| Arc::new(OutboxState::default()), |w| w.state.clone()),
        evaluation: crate::service::Evaluation::new(&config.evaluation),
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

    let (stop, stopped) = watch::channel(false);
    let watcher = tokio::spawn(cache.clone().watch(notifications, stopped.clone()));
    app.ready.store(true, Ordering::Release);
    tracing::info!(%addr, backend = ?store.backend(), generation, "spectral API listening");

    let server_app = app.clone();
    let server_config = config.server.clone();
    let mut stop_seen = stopped.clone();
    let done = tokio::spawn(async move {
        let server = tokio::spawn(crate::http::serve(
            listener,
            server_app.clone(),
            server_config,
            stopped,
        ));
        let _ = stop_seen.changed().await;
        // Not ready first, so that health checks steer traffic away while we drain.
        server_app.ready.store(false, Ordering::Release);
        // The API drains while the workers finish the row in hand; both within the grace.
        let stop_workers = async {
            if let Some(w) = workers {
                w.stop().await;
            }
        };
        let _ = tokio::join!(server, stop_workers);
        // Requests are done: write what the decision log still holds, then close the pool.
        server_app.log.stop();
        let _ = writer.await;
        let _ = watcher.await;
        server_app.store.close().await;
        tracing::info!("spectral stopped");
    });
    Ok(Running {
        addr,
        app,
        generated_operator_key,
        stop,
        done,
    })
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
                })
                .await?;
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
        })
        .await?;
    Ok(Some(secret))
}

/// Run the workers alone until SIGTERM or SIGINT (`spectral workers`).
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
    let workers = Workers::spawn(&config, generation)?;
    tracing::info!(generation, "spectral workers running");
    signal().await;
    tracing::info!("shutdown signal received; finishing the row in hand");
    finish_within(grace, workers.stop()).await;
    Ok(())
}

/// Wait for a shutdown to finish; a second signal, or the grace period running out, ends the
/// process at once.
async fn finish_within(grace: Duration, shutdown: impl std::future::Future) {
    tokio::select! {
        _ = shutdown => {}
        _ = signal() => {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
        _ = tokio::time::sleep(grace) => {
            tracing::error!("shutdown exceeded the grace period: exiting now");
            std::process::exit(1);
        }
    }
}

/// Run until SIGTERM or SIGINT, then shut down gracefully. A second signal, or the grace
/// period running out, ends the process at once.
pub async fn run_until_signal(config: Config, mode: Mode) -> Result<(), StartError> {
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
    let waiting = tokio::spawn(running.wait());
    signal().await;
    tracing::info!("shutdown signal received; draining");
    let _ = trigger.send(true);
    finish_within(grace, waiting).await;
    Ok(())
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

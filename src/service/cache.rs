//! The per-world module cache.
//!
//! The decide path reads the deployed version of a world with one lock-free load
//! (`arc-swap`). A version is loaded by fetching its modules, verifying each one's hash and
//! compiling it, once: concurrent requests for the same version share one load. A deployment
//! swaps a world to its new version atomically; every instance learns of deployments at once
//! through Postgres notifications, and by polling the store when notifications are lost.
//!
//! Retired versions are refused, whether loaded already or not: the set of them is read from
//! the store on every refresh (so on the same notifications and polls as deployments), and a
//! version that turns up in it is dropped from the loaded ones.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::OnceCell;

use crate::config::CacheConfig;
use crate::sandbox::Sandbox;
use crate::store::{Notifications, Store};
use crate::telemetry::{Metrics, WorldCounters};
use crate::worlds::model::WorldModel;
use crate::worlds::Module;

/// One version of a world, compiled.
#[derive(Debug)]
pub struct LoadedVersion {
    pub world: String,
    pub version: u64,
    pub model: WorldModel,
    pub modules: HashMap<String, Arc<Module>>,
    /// The world's decision counters, resolved at load so that a decision only adds.
    pub counters: WorldCounters,
}

/// Why a version could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VersionLoadError {
    #[error("world '{world}' has no version {version}")]
    NotFound { world: String, version: u64 },
    #[error("world '{world}' version {version} is retired; no key may pin or deploy it")]
    Retired { world: String, version: u64 },
    #[error("loading world '{world}' version {version} failed: {reason}")]
    Failed {
        world: String,
        version: u64,
        reason: String,
    },
}

/// How the cache learns of deployments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Watch {
    /// Postgres notifications, with polling behind them.
    Listening,
    /// Polling only (SQLite, listening disabled, or the listener is down).
    Polling,
}

type Slot = Arc<OnceCell<Arc<LoadedVersion>>>;

/// A world's shadow as this instance evaluates it: the stored record and its version, loaded.
#[derive(Debug)]
pub struct Shadow {
    pub record: crate::store::ShadowRecord,
    pub loaded: Arc<LoadedVersion>,
}

pub struct Cache {
    store: Store,
    sandbox: Arc<Sandbox>,
    metrics: Arc<Metrics>,
    config: CacheConfig,
    /// The deployed version of every world: read lock-free on the decide path, replaced
    /// whole by `refresh`.
    deployed: ArcSwap<HashMap<String, Arc<LoadedVersion>>>,
    /// Loads in progress or done, by (world, version); a slot is shared by every request
    /// that needs the version while it loads.
    versions: Mutex<HashMap<(String, u64), Slot>>,
    /// Deployed worlds whose version failed to load, with the reason.
    failed: Mutex<BTreeMap<String, String>>,
    /// Retired versions as of the last refresh: never served, whatever is loaded.
    retired: ArcSwap<HashSet<(String, u64)>>,
    /// Each world's shadow as of the last refresh, read lock-free on the decide path.
    shadows: ArcSwap<HashMap<String, Arc<Shadow>>>,
    /// Serializes refreshes so that two never race to swap the same world.
    refreshing: tokio::sync::Mutex<()>,
    watch: Mutex<Watch>,
}

impl Cache {
    pub fn new(
        store: Store,
        sandbox: Arc<Sandbox>,
        metrics: Arc<Metrics>,
        config: CacheConfig,
    ) -> Self {
        Self {
            store,
            sandbox,
            metrics,
            config,
            deployed: ArcSwap::from_pointee(HashMap::new()),
            versions: Mutex::new(HashMap::new()),
            failed: Mutex::new(BTreeMap::new()),
            retired: ArcSwap::from_pointee(HashSet::new()),
            shadows: ArcSwap::from_pointee(HashMap::new()),
            refreshing: tokio::sync::Mutex::new(()),
            watch: Mutex::new(Watch::Polling),
        }
    }

    /// The deployed version of a world, if it is loaded. Lock-free.
    pub fn deployed(&self, world: &str) -> Option<Arc<LoadedVersion>> {
        self.deployed.load().get(world).cloned()
    }

    /// The world's shadow, if it has one and it is loaded. Lock-free.
    pub fn shadow(&self, world: &str) -> Option<Arc<Shadow>> {
        self.shadows.load().get(world).cloned()
    }

    /// The ids of the shadows this instance evaluates.
    pub fn shadow_ids(&self) -> Vec<String> {
        self.shadows
            .load()
            .values()
            .map(|s| s.record.id.clone())
            .collect()
    }

    /// Whether a version is retired, as of the last refresh. Lock-free.
    pub fn is_retired(&self, world: &str, version: u64) -> bool {
        self.retired.load().contains(&(world.to_string(), version))
    }

    /// A specific version of a world, loading it on a miss; `Retired` for a retired version,
    /// even one loaded before it was retired.
    pub async fn version(
        &self,
        world: &str,
        version: u64,
    ) -> Result<Arc<LoadedVersion>, VersionLoadError> {
        if self.is_retired(world, version) {
            return Err(VersionLoadError::Retired {
                world: world.to_string(),
                version,
            });
        }
        if let Some(v) = self.deployed(world).filter(|v| v.version == version) {
            return Ok(v);
        }
        let slot = {
            let mut versions = self
                .versions
                .lock()
                .map_err(|_| failed(world, version, "cache lock poisoned"))?;
            if versions.len() >= self.config.max_pinned_versions {
                self.evict(&mut versions);
            }
            versions
                .entry((world.to_string(), version))
                .or_default()
                .clone()
        };
        let loaded = slot
            .get_or_try_init(|| self.load(world, version))
            .await
            .cloned();
        if loaded.is_err() {
            // A failed load is retried by the next request rather than remembered.
            if let Ok(mut versions) = self.versions.lock() {
                versions.remove(&(world.to_string(), version));
            }
        }
        loaded
    }

    /// Drop cached versions that are not deployed, to stay within the configured bound.
    fn evict(&self, versions: &mut HashMap<(String, u64), Slot>) {
        let deployed = self.deployed.load();
        versions.retain(|(world, version), _| {
            deployed.get(world).is_some_and(|v| v.version == *version)
        });
    }

    async fn load(
        &self,
        world: &str,
        version: u64,
    ) -> Result<Arc<LoadedVersion>, VersionLoadError> {
        let result = self.load_uncounted(world, version).await;
        self.metrics.cache_load(result.is_ok());
        if let Err(e) = &result {
            tracing::error!(error = %e, "world version failed to load");
        } else {
            tracing::info!(world, version, "world version loaded");
        }
        result
    }

    async fn load_uncounted(
        &self,
        world: &str,
        version: u64,
    ) -> Result<Arc<LoadedVersion>, VersionLoadError> {
        let record = self
            .store
            .version(world, version)
            .await
            .map_err(|e| failed(world, version, &e.to_string()))?
            .ok_or_else(|| VersionLoadError::NotFound {
                world: world.to_string(),
                version,
            })?;
        let model: WorldModel = serde_json::from_value(record.model).map_err(|e| {
            failed(
                world,
                version,
                &format!("stored model does not decode: {e}"),
            )
        })?;
        let mut sources = Vec::with_capacity(record.modules.len());
        for (action, hash) in record.modules {
            let bytes = self
                .store
                .module(&hash)
                .await
                .map_err(|e| failed(world, version, &e.to_string()))?
                .ok_or_else(|| failed(world, version, &format!("module {hash} is missing")))?;
            sources.push((action, hash, bytes));
        }
        // Verifying hashes and compiling is CPU work of milliseconds: keep it off the
        // threads that serve requests.
        let sandbox = self.sandbox.clone();
        let (w, v) = (world.to_string(), version);
        let modules = tokio::task::spawn_blocking(move || {
            let mut modules = HashMap::new();
            for (action, hash, bytes) in sources {
                let module = Module::load(&bytes, &hash, v, &sandbox)
                    .map_err(|e| failed(&w, v, &format!("action '{action}': {e}")))?;
                modules.insert(action, Arc::new(module));
            }
            Ok::<_, VersionLoadError>(modules)
        })
        .await
        .map_err(|e| failed(world, version, &format!("compile task failed: {e}")))??;
        Ok(Arc::new(LoadedVersion {
            world: world.to_string(),
            version,
            model,
            modules,
            counters: self.metrics.world(world),
        }))
    }

    /// Bring every world to its deployed version, swapping atomically per refresh. Worlds
    /// already at their version are untouched.
    pub async fn refresh(&self) -> Result<(), crate::store::StoreError> {
        let _guard = self.refreshing.lock().await;
        // Retirements first: a refresh that fails after this still stops serving them.
        let retired: HashSet<(String, u64)> = self.store.retired().await?.into_iter().collect();
        if **self.retired.load() != retired {
            let retired = Arc::new(retired);
            // Refused from here on; then their loaded copies go.
            self.retired.store(retired.clone());
            if let Ok(mut versions) = self.versions.lock() {
                versions.retain(|key, _| !retired.contains(key));
            }
        }
        let deployed = self.store.deployed().await?;
        let current = self.deployed.load_full();
        let mut next: HashMap<String, Arc<LoadedVersion>> = (*current).clone();
        let mut changed = false;
        for (world, version) in deployed {
            if current.get(&world).is_some_and(|v| v.version == version) {
                continue;
            }
            match self.version(&world, version).await {
                Ok(loaded) => {
                    tracing::info!(world, version, "serving deployed version");
                    next.insert(world.clone(), loaded);
                    changed = true;
                    if let Ok(mut failed) = self.failed.lock() {
                        failed.remove(&world);
                    }
                }
                Err(e) => {
                    if let Ok(mut failed) = self.failed.lock() {
                        failed.insert(world.clone(), e.to_string());
                    }
                }
            }
        }
        if changed {
            self.deployed.store(Arc::new(next));
        }
        self.refresh_shadows().await
    }

    /// Bring the shadows to what the store has: started, replaced and ended ones swap in
    /// whole, on the notifications and polls that bring deployments.
    async fn refresh_shadows(&self) -> Result<(), crate::store::StoreError> {
        let records = self.store.shadows().await?;
        let current = self.shadows.load_full();
        let unchanged = records.len() == current.len()
            && records
                .iter()
                .all(|r| current.get(&r.world).is_some_and(|s| s.record == *r));
        if unchanged {
            return Ok(());
        }
        let mut next = HashMap::new();
        for record in records {
            if let Some(same) = current.get(&record.world).filter(|s| s.record == record) {
                next.insert(record.world.clone(), same.clone());
                continue;
            }
            match self.version(&record.world, record.version).await {
                Ok(loaded) => {
                    tracing::info!(
                        world = record.world,
                        version = record.version,
                        sample = record.sample,
                        "evaluating shadow version"
                    );
                    next.insert(record.world.clone(), Arc::new(Shadow { record, loaded }));
                }
                Err(e) => tracing::warn!(error = %e, "shadow version not loaded; not evaluated"),
            }
        }
        self.shadows.store(Arc::new(next));
        Ok(())
    }

    /// Whether every deployed world is loaded: the readiness condition.
    pub fn all_loaded(&self) -> bool {
        self.failed.lock().map(|f| f.is_empty()).unwrap_or(false)
    }

    /// Worlds served, with their versions.
    pub fn loaded(&self) -> BTreeMap<String, u64> {
        self.deployed
            .load()
            .iter()
            .map(|(w, v)| (w.clone(), v.version))
            .collect()
    }

    /// Deployed worlds that failed to load, with the reason.
    pub fn failures(&self) -> BTreeMap<String, String> {
        self.failed.lock().map(|f| f.clone()).unwrap_or_default()
    }

    pub fn watch_mode(&self) -> Watch {
        self.watch.lock().map(|w| *w).unwrap_or(Watch::Polling)
    }

    fn set_watch(&self, mode: Watch) {
        if let Ok(mut w) = self.watch.lock() {
            if *w != mode {
                tracing::info!(mode = ?mode, "deployment watch changed");
                *w = mode;
            }
        }
    }

    /// Start listening for deployment notifications, if the store has them and listening is
    /// enabled. Done before the instance reports ready, so that no deployment made after
    /// that moment waits for a poll.
    pub async fn listen(&self) -> Option<Notifications> {
        if !self.config.listen {
            return None;
        }
        match self.store.listen_deployments().await {
            Ok(Some(l)) => {
                self.set_watch(Watch::Listening);
                Some(l)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for deployments; polling");
                None
            }
        }
    }

    /// Keep the cache current until `stop` turns true: listen for notifications where the
    /// store has them (reconnecting with backoff when the connection drops) and poll every
    /// `poll_interval` regardless, because a notification can be lost.
    pub async fn watch(
        self: Arc<Self>,
        mut listener: Option<Notifications>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let poll = self.config.poll_interval;
        let mut retry_at = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(250);
        loop {
            if listener.is_none() && self.config.listen && tokio::time::Instant::now() >= retry_at {
                match self.store.listen_deployments().await {
                    Ok(Some(l)) => {
                        listener = Some(l);
                        backoff = Duration::from_millis(250);
                        self.set_watch(Watch::Listening);
                        // Anything deployed while we were not listening.
                        self.refresh_logged().await;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for deployments; polling");
                        retry_at = tokio::time::Instant::now() + backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => Some(l.next().await),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                n = notified => match n {
                    Some(Ok(world)) => {
                        tracing::debug!(world, "deployment notification");
                        self.refresh_logged().await;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "deployment listener lost; polling");
                        listener = None;
                        self.set_watch(Watch::Polling);
                        retry_at = tokio::time::Instant::now() + backoff;
                    }
                    None => {}
                },
                _ = tokio::time::sleep(poll) => self.refresh_logged().await,
            }
        }
    }

    async fn refresh_logged(&self) {
        if let Err(e) = self.refresh().await {
            tracing::warn!(error = %e, "refreshing deployments failed");
        }
    }
}

fn failed(world: &str, version: u64, reason: &str) -> VersionLoadError {
    VersionLoadError::Failed {
        world: world.to_string(),
        version,
        reason: reason.to_string(),
    }
}

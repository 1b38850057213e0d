//! API keys: generation, hashing, and authentication with a small cache in front of the
//! store, so that the decide path does not query the database per request. A cached lookup
//! is trusted for `SPECTRAL_KEY_CACHE_TTL_MS` at most, and dropped at once when Postgres
//! notifies that its key was revoked or rotated; the key's `last_used_at` is written off the
//! request, only by lookups that reach the store.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rand::RngCore;
use sha2::{Digest, Sha256};

use super::ServiceError;
use crate::config::KeysConfig;
use crate::store::{KeyRecord, Notifications, Scope, Store};

/// Who is asking: an authenticated key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_id: String,
    /// The one world the key may act on; `None` for an operator key.
    pub world: Option<String>,
    pub scopes: Vec<Scope>,
}

impl Caller {
    /// Whether this caller may act on `world` with `scope`. A key of world A can never act
    /// on world B, whatever its scopes.
    pub fn check(&self, world: &str, scope: Scope) -> Result<(), ServiceError> {
        if let Some(own) = &self.world {
            if own != world {
                return Err(ServiceError::Forbidden(format!(
                    "key '{}' is bound to world '{own}', not '{world}'",
                    self.key_id
                )));
            }
        }
        if !self.scopes.contains(&scope) {
            return Err(ServiceError::Forbidden(format!(
                "key '{}' lacks the '{}' scope",
                self.key_id,
                scope.as_str()
            )));
        }
        Ok(())
    }

    /// The world a request is about: the one named, or the key's own.
    pub fn resolve_world<'a>(&'a self, named: Option<&'a str>) -> Result<&'a str, ServiceError> {
        match (named, self.world.as_deref()) {
            (Some(w), _) => Ok(w),
            (None, Some(w)) => Ok(w),
            (None, None) => Err(ServiceError::BadRequest(
                "an operator key must name the world in the request".into(),
            )),
        }
    }
}

/// Lower-case hex sha256 of a key's secret: what the store keeps.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new key: its public id and its secret (shown once, never stored).
pub fn generate() -> (String, String) {
    let mut rng = rand::thread_rng();
    let mut id = [0u8; 6];
    let mut secret = [0u8; 24];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    (
        format!("key_{}", hex::encode(id)),
        format!("spk_{}", hex::encode(secret)),
    )
}

/// Unknown keys are remembered briefly so that a client retrying a bad key does not reach
/// the database on every request.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);
/// Entries kept at most; the map is cleared when it is full.
const MAX_ENTRIES: usize = 10_000;
/// A key's `last_used_at` is written when a lookup finds it older than this: at most about
/// once a minute per key (and instance), never on a request that the cache answers.
const TOUCH_EVERY: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// A looked-up key (or its absence) and when it was looked up.
type Entry = (Option<KeyRecord>, Instant);

/// Authenticates `Authorization: Bearer …` headers.
pub struct Keys {
    store: Store,
    /// By secret hash.
    cache: Arc<RwLock<HashMap<String, Entry>>>,
    config: KeysConfig,
}

impl Keys {
    pub fn new(store: Store, config: &KeysConfig) -> Self {
        Self {
            store,
            cache: Arc::default(),
            config: config.clone(),
        }
    }

    /// How long a rotated key's replaced secret stays valid.
    pub fn rotation_overlap(&self) -> Duration {
        self.config.rotation_overlap
    }

    /// The caller behind an `Authorization` header value.
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Caller, ServiceError> {
        let header = header.ok_or_else(|| {
            ServiceError::Unauthenticated("missing Authorization: Bearer <key> header".into())
        })?;
        let secret = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ServiceError::Unauthenticated("Authorization must be 'Bearer <key>'".into())
            })?;
        let hash = hash_secret(secret);
        let now = Instant::now();
        let cached = self.cache.read().ok().and_then(|c| {
            c.get(&hash).and_then(|(record, at)| {
                let ttl = if record.is_some() {
                    self.config.cache_ttl
                } else {
                    NEGATIVE_TTL
                };
                (now.duration_since(*at) < ttl).then(|| record.clone())
            })
        });
        let record = match cached {
            Some(record) => record,
            None => {
                let record = self
                    .store
                    .key_by_hash(&hash)
                    .await
                    .map_err(ServiceError::from_store)?;
                if let Some(r) = &record {
                    self.touch(r);
                }
                if let Ok(mut c) = self.cache.write() {
                    if c.len() >= MAX_ENTRIES {
                        c.clear();
                    }
                    c.insert(hash, (record.clone(), now));
                }
                record
            }
        };
        let record =
            record.ok_or_else(|| ServiceError::Unauthenticated("unknown API key".into()))?;
        if let Some(why) = record.refusal(chrono::Utc::now()) {
            return Err(ServiceError::Unauthenticated(why));
        }
        Ok(Caller {
            key_id: record.id,
            world: record.world,
            scopes: record.scopes,
        })
    }

    /// Record, off the request, that a key just looked up from the store is in use, when
    /// what the store has is older than [`TOUCH_EVERY`].
    fn touch(&self, record: &KeyRecord) {
        let now = chrono::Utc::now();
        if record.last_used_at.is_some_and(|at| now - at < TOUCH_EVERY) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, id) = (self.store.clone(), record.id.clone());
        runtime.spawn(async move {
            if let Err(e) = store.touch_key(&id).await {
                tracing::debug!(key = %id, error = %e, "recording the key's last use failed");
            }
        });
    }

    /// Forget every cached lookup of key `id`, so the next request with it asks the store.
    pub fn forget(&self, id: &str) {
        forget(&self.cache, Some(id));
    }

    /// Listen for revocations and rotations made anywhere (`None` on SQLite, or when
    /// listening is off or fails: cached lookups then expire after the TTL).
    pub async fn listen(&self) -> Option<Notifications> {
        if !self.config.listen {
            return None;
        }
        match self.store.listen_keys().await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for key changes; cached keys expire after the TTL");
                None
            }
        }
    }

    /// Drop cached lookups of every key a notification names until `stop`; when the
    /// listener is lost, drop them all (notifications may have been missed) and listen again
    /// with backoff. Without a listener there is nothing to do: the TTL bounds staleness.
    pub fn watch(
        &self,
        mut listener: Option<Notifications>,
        stop: tokio_util::sync::CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (store, cache, listen) = (self.store.clone(), self.cache.clone(), self.config.listen);
        async move {
            let mut backoff = Duration::from_millis(250);
            loop {
                let Some(l) = listener.as_mut() else {
                    if !listen || store.backend() != crate::store::Backend::Postgres {
                        return;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    match store.listen_keys().await {
                        Ok(l) => {
                            listener = l;
                            backoff = Duration::from_millis(250);
                            // Whatever changed while nobody listened.
                            forget(&cache, None);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot listen for key changes");
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                    }
                    continue;
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    n = l.next() => match n {
                        Ok(id) => {
                            tracing::debug!(key = %id, "key change notification");
                            forget(&cache, Some(&id));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "key change listener lost; forgetting cached keys");
                            forget(&cache, None);
                            listener = None;
                        }
                    },
                }
            }
        }
    }
}

/// Drop the cached lookups of key `id` (of every key with `None`). Unknown-key entries stay:
/// a change never makes an unknown secret valid except a rotation's new one, which was never
/// sent before it was made.
fn forget(cache: &RwLock<HashMap<String, Entry>>, id: Option<&str>) {
    if let Ok(mut c) = cache.write() {
        match id {
            Some(id) => c.retain(|_, (r, _)| r.as_ref().is_none_or(|r| r.id != id)),
            None => c.retain(|_, (r, _)| r.is_none()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(world: Option<&str>, scopes: &[Scope]) -> Caller {
        Caller {
            key_id: "key_1".into(),
            world: world.map(String::from),
            scopes: scopes.to_vec(),
        }
    }

    #[test]
    fn a_world_key_never_reaches_another_world() {
        let c = caller(Some("a"), &Scope::ALL);
        for scope in Scope::ALL {
            assert!(c.check("a", scope).is_ok());
            assert!(matches!(
                c.check("b", scope),
                Err(ServiceError::Forbidden(_))
            ));
        }
    }

    #[test]
    fn scopes_are_enforced() {
        let c = caller(Some("a"), &[Scope::Decide]);
        assert!(c.check("a", Scope::Decide).is_ok());
        assert!(matches!(
            c.check("a", Scope::Deploy),
            Err(ServiceError::Forbidden(_))
        ));
        let op = caller(None, &Scope::ALL);
        assert!(op.check("anything", Scope::Deploy).is_ok());
        assert!(op.resolve_world(None).is_err());
        assert_eq!(op.resolve_world(Some("x")).ok(), Some("x"));
    }

    #[test]
    fn generated_keys_are_distinct_and_hash_stably() {
        let (id1, s1) = generate();
        let (id2, s2) = generate();
        assert_ne!(id1, id2);
        assert_ne!(s1, s2);
        assert!(s1.starts_with("spk_") && s1.len() == 52);
        assert_eq!(hash_secret(&s1), hash_secret(&s1));
        assert_eq!(hash_secret("x").len(), 64);
    }
}

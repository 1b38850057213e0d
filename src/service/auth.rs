//! API keys: generation, hashing, and authentication with a small cache in front of the
//! store, so that the decide path does not query the database per request.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use rand::RngCore;
use sha2::{Digest, Sha256};

use super::ServiceError;
use crate::store::{KeyRecord, Scope, Store};

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

/// How long a looked-up key is trusted before the store is asked again; bounds how long a
/// revoked key keeps working on an instance.
const POSITIVE_TTL: Duration = Duration::from_secs(30);
/// Unknown keys are remembered briefly so that a client retrying a bad key does not reach
/// the database on every request.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);
/// Entries kept at most; the map is cleared when it is full.
const MAX_ENTRIES: usize = 10_000;

/// Authenticates `Authorization: Bearer …` headers.
pub struct Keys {
    store: Store,
    cache: RwLock<HashMap<String, (Option<KeyRecord>, Instant)>>,
}

impl Keys {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            cache: RwLock::new(HashMap::new()),
        }
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
                    POSITIVE_TTL
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
        Ok(Caller {
            key_id: record.id,
            world: record.world,
            scopes: record.scopes,
        })
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

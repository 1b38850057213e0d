//! Webhook secrets sealed at rest: XChaCha20-Poly1305 under a key from configuration
//! (`SPECTRAL_WEBHOOK_SECRET_KEY`), each secret bound to its webhook's id as associated data so
//! that a sealed value copied onto another row does not open.
//!
//! A sealed value is stored as `sealed:v1:<hex of nonce and ciphertext>`. Rows written before
//! secrets were sealed hold the secret itself; they are read as they are (both forms are read,
//! nothing is rewritten), so subscriptions made by an older build keep being signed.
//!
//! Where no key is configured: on SQLite (the zero-setup store) a key is generated once into
//! `webhook-secret.key` in the data directory, beside the database but not in it, so a copy or
//! backup of the database file alone does not reveal a secret; on PostgreSQL no webhook can be
//! created (a clear error names the setting), because a key generated on one instance's disk
//! would be unknown to the others that deliver, and a key kept in the same database protects
//! nothing that a dump of it reveals.

use std::io::Write;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

/// What a sealed value starts with.
pub const SEALED_PREFIX: &str = "sealed:v1:";
/// The file a generated key is kept in, in the SQLite data directory.
pub const KEY_FILE: &str = "webhook-secret.key";
const NONCE_BYTES: usize = 24;

/// Why a secret could not be sealed or opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error(
        "no key to seal webhook secrets with: set SPECTRAL_WEBHOOK_SECRET_KEY (64 hex digits) \
         on every instance"
    )]
    NoKey,
    #[error("the webhook secret key must be 64 hex digits (32 bytes)")]
    BadKey,
    #[error("the sealed secret of webhook '{0}' does not open with the configured key")]
    WontOpen(String),
    #[error("cannot keep the generated webhook secret key in {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
}

/// Seals and opens webhook secrets; without a key it opens only unsealed values.
#[derive(Clone)]
pub struct Sealer {
    cipher: Option<XChaCha20Poly1305>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("key", &self.cipher.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Sealer {
    /// A sealer with no key: it seals nothing and opens only unsealed values.
    pub fn none() -> Self {
        Self { cipher: None }
    }

    /// A sealer with a key given as 64 hex digits.
    pub fn from_hex(key: &str) -> Result<Self, SealError> {
        let bytes = hex::decode(key.trim()).map_err(|_| SealError::BadKey)?;
        if bytes.len() != 32 {
            return Err(SealError::BadKey);
        }
        let cipher = XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| SealError::BadKey)?;
        Ok(Self {
            cipher: Some(cipher),
        })
    }

    /// The sealer of a service: the configured key; else, with a SQLite data directory, the
    /// key generated into it (made on first use); else none.
    pub fn configured(key: Option<&str>, sqlite_dir: Option<&Path>) -> Result<Self, SealError> {
        match (key, sqlite_dir) {
            (Some(key), _) => Self::from_hex(key),
            (None, Some(dir)) => Self::from_hex(&key_file(dir)?),
            (None, None) => Ok(Self::none()),
        }
    }

    /// The sealer of a service on `store`: [`Sealer::configured`] with the data directory
    /// when the store is SQLite.
    pub fn for_store(
        key: Option<&crate::config::Secret>,
        store: &crate::store::StoreConfig,
    ) -> Result<Self, SealError> {
        let sqlite_dir = store
            .database_url
            .is_none()
            .then_some(store.data_dir.as_path());
        Self::configured(key.map(crate::config::Secret::expose), sqlite_dir)
    }

    /// Whether this sealer can seal.
    pub fn has_key(&self) -> bool {
        self.cipher.is_some()
    }

    /// Seal the secret of webhook `id`.
    pub fn seal(&self, id: &str, secret: &str) -> Result<String, SealError> {
        let cipher = self.cipher.as_ref().ok_or(SealError::NoKey)?;
        let mut nonce = [0u8; NONCE_BYTES];
        rand::thread_rng().fill_bytes(&mut nonce);
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| SealError::WontOpen(id.to_string()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!("{SEALED_PREFIX}{}", hex::encode(out)))
    }

    /// The secret of webhook `id` as stored: opened when sealed, as it is when it predates
    /// sealing.
    pub fn open(&self, id: &str, stored: &str) -> Result<String, SealError> {
        let Some(sealed) = stored.strip_prefix(SEALED_PREFIX) else {
            return Ok(stored.to_string());
        };
        let cipher = self.cipher.as_ref().ok_or(SealError::NoKey)?;
        let wont = || SealError::WontOpen(id.to_string());
        let bytes = hex::decode(sealed).map_err(|_| wont())?;
        if bytes.len() < NONCE_BYTES {
            return Err(wont());
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_BYTES);
        let plain = cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| wont())?;
        String::from_utf8(plain).map_err(|_| wont())
    }
}

/// The generated key in `dir`, made on first use. It is written to a file of its own and then
/// linked into place, so that two processes starting together end up with the same key and
/// never read a half-written one.
fn key_file(dir: &Path) -> Result<String, SealError> {
    let path = dir.join(KEY_FILE);
    let fail = |reason: String| SealError::KeyFile {
        path: path.clone(),
        reason,
    };
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok(text.trim().to_string());
    }
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    let tmp = dir.join(format!("{KEY_FILE}.{}", uuid::Uuid::now_v7().simple()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = options
        .open(&tmp)
        .and_then(|mut f| f.write_all(format!("{}\n", hex::encode(key)).as_bytes()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(e.to_string()));
    }
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    std::fs::read_to_string(&path)
        .map(|t| t.trim().to_string())
        .map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn a_sealed_secret_opens_only_for_its_webhook_and_key() {
        let s = Sealer::from_hex(KEY).unwrap_or_else(|e| unreachable!("{e}"));
        let sealed = s.seal("wh_1", "hunter2").unwrap_or_default();
        assert!(sealed.starts_with(SEALED_PREFIX));
        assert!(!sealed.contains("hunter2"));
        assert_ne!(sealed, s.seal("wh_1", "hunter2").unwrap_or_default());
        assert_eq!(s.open("wh_1", &sealed), Ok("hunter2".to_string()));
        assert_eq!(
            s.open("wh_2", &sealed),
            Err(SealError::WontOpen("wh_2".into()))
        );
        let other =
            Sealer::from_hex(&KEY.replace("00", "ff")).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(other.open("wh_1", &sealed).is_err());
        assert_eq!(Sealer::none().open("wh_1", &sealed), Err(SealError::NoKey));
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push('0');
        if tampered != sealed {
            assert!(s.open("wh_1", &tampered).is_err());
        }
    }

    #[test]
    fn plaintext_rows_from_before_sealing_are_read_as_they_are() {
        assert_eq!(Sealer::none().open("wh", "plain"), Ok("plain".into()));
        let s = Sealer::from_hex(KEY).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(s.open("wh", "plain"), Ok("plain".into()));
        assert_eq!(Sealer::none().seal("wh", "x"), Err(SealError::NoKey));
    }

    #[test]
    fn keys_must_be_32_bytes_of_hex() {
        assert_eq!(Sealer::from_hex("abc").err(), Some(SealError::BadKey));
        assert_eq!(
            Sealer::from_hex(&"zz".repeat(32)).err(),
            Some(SealError::BadKey)
        );
        assert!(Sealer::from_hex(KEY).is_ok());
        assert!(!format!("{:?}", Sealer::from_hex(KEY)).contains("0102"));
    }

    #[test]
    fn a_generated_key_is_made_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("seal-{}", uuid::Uuid::now_v7().simple()));
        let first = key_file(&dir).unwrap_or_default();
        assert_eq!(first.len(), 64);
        assert_eq!(key_file(&dir).unwrap_or_default(), first);
        let a = Sealer::configured(None, Some(&dir)).unwrap_or_else(|e| unreachable!("{e}"));
        let b = Sealer::configured(None, Some(&dir)).unwrap_or_else(|e| unreachable!("{e}"));
        let sealed = a.seal("wh", "s").unwrap_or_default();
        assert_eq!(b.open("wh", &sealed), Ok("s".into()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(KEY_FILE))
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0);
            assert_eq!(mode, 0o600);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

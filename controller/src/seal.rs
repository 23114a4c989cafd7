//! Secrets at rest: storage credentials and repository passwords are kept
//! in the catalog sealed (AES-256-GCM) under the controller's seal key, a
//! file of its own next to the catalog (`D/pki/seal.key`, 0600), so a
//! copy of the catalog alone reveals none of them.
//!
//! Each sealed value is bound to what it belongs to (the additional data,
//! e.g. `storage/eu-s3`): moved to another record it no longer opens.

use std::io::Write;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use zeroize::{Zeroize, Zeroizing};

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const KEY_FILE: &str = "seal.key";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot read the seal key {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the seal key {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the seal key {} is not 64 hex digits", path.display())]
    Malformed { path: PathBuf },
    /// The value was changed, belongs to another record, or was sealed
    /// under another key.
    #[error("sealed secret of {purpose} does not open with this controller's seal key")]
    Open { purpose: String },
}

impl ferry_core::CodedError for SealError {
    fn code(&self) -> ferry_core::ErrorCode {
        match self {
            Self::Read { .. } | Self::Write { .. } => ferry_core::ErrorCode::Unavailable,
            Self::Malformed { .. } | Self::Open { .. } => ferry_core::ErrorCode::Internal,
        }
    }
}

/// The controller's seal key. Never logged; zeroized when dropped (the
/// cipher's copy by the cipher, built with its `zeroize` feature).
pub struct SealKey {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(<redacted>)")
    }
}

/// Where the seal key of a controller data directory lives.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("pki").join(KEY_FILE)
}

impl SealKey {
    /// Loads the key of `data_dir`, creating it (0600) on first use.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, SealError> {
        let path = key_path(data_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&path, text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(&path),
            Err(source) => Err(SealError::Read { path, source }),
        }
    }

    /// Loads the key of `data_dir`, which must exist: for offline commands,
    /// which open what `serve` sealed and never create a key.
    pub fn load(data_dir: &Path) -> Result<Self, SealError> {
        let path = key_path(data_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&path, text),
            Err(source) => Err(SealError::Read { path, source }),
        }
    }

    fn parse(path: &Path, text: String) -> Result<Self, SealError> {
        let text = Zeroizing::new(text);
        let mut key = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), &mut key[..]).map_err(|_| SealError::Malformed {
            path: path.to_owned(),
        })?;
        Ok(Self::from_bytes(&key))
    }

    fn create(path: &Path) -> Result<Self, SealError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| SealError::Write {
            path: path.to_owned(),
            source,
        };
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(&mut key[..]);
        let mut text = hex::encode(&key[..]);
        text.push('\n');
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_all()
            });
        text.zeroize();
        match written {
            Ok(()) => Ok(Self::from_bytes(&key)),
            // Another process created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = std::fs::read_to_string(path).map_err(|source| SealError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::parse(path, text)
            }
            Err(e) => Err(err(e)),
        }
    }

    fn from_bytes(key: &[u8; 32]) -> Self {
        Self {
            cipher: Aes256Gcm::new(key.into()),
        }
    }

    /// Seals `secret` for `purpose`: `nonce ‖ ciphertext ‖ tag`.
    pub fn seal(&self, purpose: &str, secret: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret,
                    aad: purpose.as_bytes(),
                },
            )
            .expect("invariant: AES-GCM seals messages below 64 GiB");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens what [`SealKey::seal`] sealed for the same `purpose`.
    pub fn open(&self, purpose: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let fail = || SealError::Open {
            purpose: purpose.to_owned(),
        };
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(fail());
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: purpose.as_bytes(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| fail())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sealed_secrets_open_only_for_their_purpose_and_key() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(dir.path().join("pki")).expect("mkdir");
        let key = SealKey::load_or_create(dir.path()).expect("create");
        let mode = std::fs::metadata(key_path(dir.path()))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let sealed = key.seal("storage/eu", b"secret-access-key");
        assert!(
            !sealed.windows(b"secret".len()).any(|w| w == b"secret"),
            "sealed bytes hold the secret in clear"
        );
        assert_eq!(
            &key.open("storage/eu", &sealed).expect("open")[..],
            b"secret-access-key"
        );
        // Another record, a changed byte, a truncation: refused.
        assert!(matches!(
            key.open("storage/us", &sealed),
            Err(SealError::Open { .. })
        ));
        let mut bad = sealed.clone();
        bad[NONCE_LEN + 1] ^= 1;
        assert!(key.open("storage/eu", &bad).is_err());
        assert!(key.open("storage/eu", &sealed[..10]).is_err());

        // The same key comes back from the file; another directory's does not open it.
        let again = SealKey::load_or_create(dir.path()).expect("load");
        assert!(again.open("storage/eu", &sealed).is_ok());
        let loaded = SealKey::load(dir.path()).expect("load existing");
        assert!(loaded.open("storage/eu", &sealed).is_ok());
        // `load` never creates a key.
        let empty = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(empty.path().join("pki")).expect("mkdir");
        assert!(matches!(
            SealKey::load(empty.path()),
            Err(SealError::Read { .. })
        ));
        assert!(!key_path(empty.path()).exists());
        let other = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(other.path().join("pki")).expect("mkdir");
        let stranger = SealKey::load_or_create(other.path()).expect("create");
        assert!(stranger.open("storage/eu", &sealed).is_err());
        assert_eq!(format!("{key:?}"), "SealKey(<redacted>)");

        // A damaged key file is a clear error, not a new key.
        std::fs::write(key_path(other.path()), "not hex\n").expect("write");
        let e = SealKey::load_or_create(other.path()).expect_err("malformed");
        assert!(e.to_string().contains("is not 64 hex digits"), "{e}");
    }
}

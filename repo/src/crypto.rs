//! Keys and authenticated encryption.
//!
//! A repository has one random master key: an AES-256-GCM key that
//! encrypts every blob and object, a BLAKE3 key that derives blob ids, and
//! a seed for the chunker's gear table. The master key is stored only
//! wrapped, in key files (`keys/<id>`): each wraps it under a key derived
//! from a password with Argon2id. Adding or removing a key file never
//! touches data.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::format::BlobId;

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes an encrypted message adds to its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The data was modified, truncated, or encrypted under another key.
    #[error("authentication failed: data is corrupted or was encrypted with another key")]
    Authentication,
    #[error("encrypted message of {len} bytes is shorter than its {OVERHEAD}-byte overhead")]
    TooShort { len: usize },
    #[error("key derivation failed: {0}")]
    Kdf(String),
    #[error("key file is malformed: {0}")]
    MalformedKeyFile(String),
}

/// The repository master key material. Never logged: `Debug` is redacted.
#[derive(Clone)]
pub struct MasterKey {
    enc: [u8; 32],
    id: [u8; 32],
    chunker_seed: u64,
    cipher: Aes256Gcm,
}

impl Drop for MasterKey {
    /// The key material does not outlive its use (the cipher's own copy is
    /// zeroized by the cipher, built with its `zeroize` feature).
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.enc.zeroize();
        self.id.zeroize();
        self.chunker_seed.zeroize();
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// The serialised (plaintext) form of the master key inside a key file;
/// zeroized when dropped.
#[derive(Serialize, Deserialize)]
struct MasterKeyWire {
    enc: String,
    id: String,
    chunker_seed: u64,
}

impl Drop for MasterKeyWire {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.enc.zeroize();
        self.id.zeroize();
    }
}

impl MasterKey {
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let mut enc = [0u8; 32];
        let mut id = [0u8; 32];
        rng.fill_bytes(&mut enc);
        rng.fill_bytes(&mut id);
        Self::from_parts(enc, id, rng.next_u64())
    }

    fn from_parts(enc: [u8; 32], id: [u8; 32], chunker_seed: u64) -> Self {
        let cipher = Aes256Gcm::new(&enc.into());
        Self {
            enc,
            id,
            chunker_seed,
            cipher,
        }
    }

    pub fn chunker_seed(&self) -> u64 {
        self.chunker_seed
    }

    /// The id of a blob: BLAKE3 keyed with the repository's id key.
    pub fn blob_id(&self, plaintext: &[u8]) -> BlobId {
        BlobId(*blake3::keyed_hash(&self.id, plaintext).as_bytes())
    }

    /// Appends `nonce ‖ ciphertext ‖ tag` of `plaintext` to `out`. `aad` is
    /// authenticated but not stored (the blob id, or an object-kind label).
    pub fn seal_into(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        self.seal_parts_into(aad, &[], plaintext, out)
    }

    /// Like [`seal_into`] for the plaintext `head ‖ body`, without first
    /// copying it into one buffer.
    pub fn seal_parts_into(&self, aad: &[u8], head: &[u8], body: &[u8], out: &mut Vec<u8>) {
        out.reserve(NONCE_LEN + head.len() + body.len() + TAG_LEN);
        let start = out.len();
        out.extend_from_slice(&[0u8; NONCE_LEN]);
        out.extend_from_slice(head);
        out.extend_from_slice(body);
        self.seal_in_place(aad, out, start);
    }

    /// Seals in place the plaintext that follows a `NONCE_LEN`-byte gap at
    /// `start` in `out`: the gap receives the nonce and the tag is appended,
    /// so that `out[start..]` becomes `nonce ‖ ciphertext ‖ tag`. Lets a
    /// caller build the plaintext (e.g. compress) directly in its output
    /// buffer.
    pub fn seal_in_place(&self, aad: &[u8], out: &mut Vec<u8>, start: usize) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        out[start..start + NONCE_LEN].copy_from_slice(&nonce);
        let tag = self
            .cipher
            .encrypt_in_place_detached(
                Nonce::from_slice(&nonce),
                aad,
                &mut out[start + NONCE_LEN..],
            )
            .expect("invariant: AES-GCM accepts messages below 64 GiB");
        out.extend_from_slice(&tag);
    }

    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
        self.seal_into(aad, plaintext, &mut out);
        out
    }

    /// Authenticates and decrypts a message produced by [`seal_into`].
    pub fn open(&self, aad: &[u8], message: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if message.len() < OVERHEAD {
            return Err(CryptoError::TooShort { len: message.len() });
        }
        let (nonce, rest) = message.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut buf = ct.to_vec();
        self.cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                aad,
                &mut buf,
                Tag::from_slice(tag),
            )
            .map_err(|_| CryptoError::Authentication)?;
        Ok(buf)
    }

    /// [`MasterKey::open`] in place: decrypts `message` where it lies and
    /// returns the plaintext part of it.
    pub fn open_in_place<'m>(
        &self,
        aad: &[u8],
        message: &'m mut [u8],
    ) -> Result<&'m [u8], CryptoError> {
        if message.len() < OVERHEAD {
            return Err(CryptoError::TooShort { len: message.len() });
        }
        let (nonce, rest) = message.split_at_mut(NONCE_LEN);
        let (ct, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        self.cipher
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, ct, Tag::from_slice(tag))
            .map_err(|_| CryptoError::Authentication)?;
        Ok(ct)
    }

    fn to_wire(&self) -> MasterKeyWire {
        MasterKeyWire {
            enc: hex::encode(self.enc),
            id: hex::encode(self.id),
            chunker_seed: self.chunker_seed,
        }
    }

    fn from_wire(w: &MasterKeyWire) -> Result<Self, CryptoError> {
        let mut enc = [0u8; 32];
        let mut id = [0u8; 32];
        hex::decode_to_slice(&w.enc, &mut enc)
            .and_then(|_| hex::decode_to_slice(&w.id, &mut id))
            .map_err(|_| {
                CryptoError::MalformedKeyFile("master key is not 2×32 hex bytes".into())
            })?;
        Ok(Self::from_parts(enc, id, w.chunker_seed))
    }
}

/// Argon2id parameters, stored in each key file.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        Self {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

/// A key file: the master key wrapped under a password-derived key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub version: u32,
    /// Free-form label (host, user) shown by `repo key ls`.
    pub label: String,
    /// Unix seconds.
    pub created: i64,
    pub kdf: String,
    pub kdf_params: KdfParams,
    /// Hex salt.
    pub salt: String,
    /// Hex `nonce ‖ ciphertext ‖ tag` of the master key.
    pub wrapped: String,
}

const KEY_FILE_AAD: &[u8] = b"ferry key file v1";

fn derive_kek(password: &[u8], salt: &[u8], p: KdfParams) -> Result<MasterKey, CryptoError> {
    let params = argon2::Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
        .map_err(|e| CryptoError::Kdf(e.to_string()))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut kek = [0u8; 32];
    argon
        .hash_password_into(password, salt, &mut kek)
        .map_err(|e| CryptoError::Kdf(e.to_string()))?;
    Ok(MasterKey::from_parts(kek, [0u8; 32], 0))
}

impl KeyFile {
    pub fn wrap(
        master: &MasterKey,
        password: &[u8],
        label: &str,
        params: KdfParams,
    ) -> Result<Self, CryptoError> {
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        let kek = derive_kek(password, &salt, params)?;
        let plain = zeroize::Zeroizing::new(
            serde_json::to_vec(&master.to_wire())
                .map_err(|e| CryptoError::MalformedKeyFile(e.to_string()))?,
        );
        let wrapped = kek.seal(KEY_FILE_AAD, &plain);
        Ok(Self {
            version: 1,
            label: label.to_owned(),
            created: now_unix(),
            kdf: "argon2id".into(),
            kdf_params: params,
            salt: hex::encode(salt),
            wrapped: hex::encode(wrapped),
        })
    }

    /// Unwraps the master key; [`CryptoError::Authentication`] means the
    /// password does not open this key file.
    pub fn unwrap_key(&self, password: &[u8]) -> Result<MasterKey, CryptoError> {
        if self.kdf != "argon2id" {
            return Err(CryptoError::MalformedKeyFile(format!(
                "unknown kdf {:?}",
                self.kdf
            )));
        }
        let salt = hex::decode(&self.salt)
            .map_err(|_| CryptoError::MalformedKeyFile("salt is not hex".into()))?;
        let wrapped = hex::decode(&self.wrapped)
            .map_err(|_| CryptoError::MalformedKeyFile("wrapped key is not hex".into()))?;
        let kek = derive_kek(password, &salt, self.kdf_params)?;
        let plain = zeroize::Zeroizing::new(kek.open(KEY_FILE_AAD, &wrapped)?);
        let wire: MasterKeyWire = serde_json::from_slice(&plain)
            .map_err(|e| CryptoError::MalformedKeyFile(e.to_string()))?;
        MasterKey::from_wire(&wire)
    }
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> KdfParams {
        KdfParams {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        }
    }

    #[test]
    fn seal_open_round_trip_and_tamper_detection() {
        let k = MasterKey::generate();
        let msg = k.seal(b"aad", b"hello world");
        assert_eq!(msg.len(), 11 + OVERHEAD);
        assert_eq!(k.open(b"aad", &msg).expect("open"), b"hello world");
        assert!(matches!(
            k.open(b"other", &msg),
            Err(CryptoError::Authentication)
        ));
        let mut bad = msg.clone();
        bad[NONCE_LEN + 2] ^= 1;
        assert!(matches!(
            k.open(b"aad", &bad),
            Err(CryptoError::Authentication)
        ));
        assert!(matches!(
            k.open(b"aad", &msg[..10]),
            Err(CryptoError::TooShort { .. })
        ));
        let other = MasterKey::generate();
        assert!(other.open(b"aad", &msg).is_err());
    }

    #[test]
    fn blob_ids_are_keyed() {
        let a = MasterKey::generate();
        let b = MasterKey::generate();
        assert_eq!(a.blob_id(b"x"), a.blob_id(b"x"));
        assert_ne!(a.blob_id(b"x"), b.blob_id(b"x"));
        assert_ne!(a.blob_id(b"x").0, *blake3::hash(b"x").as_bytes());
    }

    #[test]
    fn key_file_wraps_and_rejects_wrong_password() {
        let k = MasterKey::generate();
        let kf = KeyFile::wrap(&k, b"secret", "test", cheap()).expect("wrap");
        let json = serde_json::to_string(&kf).expect("json");
        assert!(!json.contains(&hex::encode(k.enc)), "master key leaked");
        let back: KeyFile = serde_json::from_str(&json).expect("parse");
        let k2 = back.unwrap_key(b"secret").expect("unwrap");
        assert_eq!(k2.blob_id(b"data"), k.blob_id(b"data"));
        assert!(matches!(
            back.unwrap_key(b"wrong"),
            Err(CryptoError::Authentication)
        ));
        assert_eq!(format!("{k:?}"), "MasterKey(<redacted>)");
    }
}

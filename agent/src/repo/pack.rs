//! Pack objects: many encrypted blobs followed by an encrypted header.
//!
//! ```text
//! blob₀ ‖ blob₁ ‖ … ‖ seal(header) ‖ u32-le len(seal(header))
//! blob = seal(aad = id ‖ kind, flag ‖ body)   flag 0: raw, 1: zstd
//! ```

use serde::{Deserialize, Serialize};

use super::crypto::{CryptoError, MasterKey};
use super::format::{BlobId, BlobKind, PackId, content_hash};

const HEADER_AAD: &[u8] = b"ferry pack header v1";
const FLAG_RAW: u8 = 0;
const FLAG_ZSTD: u8 = 1;

/// One blob inside a pack, as listed in the pack header and in indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackEntry {
    pub kind: BlobKind,
    pub id: BlobId,
    pub offset: u32,
    pub length: u32,
    /// Plaintext length.
    pub raw_len: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {id} cannot be decrypted: {source}")]
    Decrypt {
        id: BlobId,
        #[source]
        source: CryptoError,
    },
    #[error("blob {id} has unknown encoding flag {flag}")]
    BadFlag { id: BlobId, flag: u8 },
    #[error("blob {id} cannot be decompressed: {reason}")]
    Decompress { id: BlobId, reason: String },
    #[error("blob {id} content does not match its id")]
    HashMismatch { id: BlobId },
    #[error("pack header is invalid: {reason}")]
    BadHeader { reason: String },
}

fn blob_aad(id: &BlobId, kind: BlobKind) -> [u8; 33] {
    let mut aad = [0u8; 33];
    aad[..32].copy_from_slice(id.as_bytes());
    aad[32] = match kind {
        BlobKind::Data => 0,
        BlobKind::Tree => 1,
    };
    aad
}

/// Per-thread compression state with an incompressibility probe.
pub struct BlobEncoder {
    compressor: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for BlobEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlobEncoder")
    }
}

const PROBE_LEN: usize = 64 * 1024;

impl BlobEncoder {
    pub fn new(level: i32) -> std::io::Result<Self> {
        Ok(Self {
            compressor: zstd::bulk::Compressor::new(level)?,
            scratch: Vec::new(),
        })
    }

    /// Compresses when worthwhile, encrypts, and appends the stored form to
    /// `out`. Returns the stored length.
    pub fn encode_into(
        &mut self,
        key: &MasterKey,
        id: &BlobId,
        kind: BlobKind,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> usize {
        let start = out.len();
        if self.worth_compressing(data) {
            let bound = zstd::zstd_safe::compress_bound(data.len());
            self.scratch.resize(bound + 1, 0);
            self.scratch[0] = FLAG_ZSTD;
            match self
                .compressor
                .compress_to_buffer(data, &mut self.scratch[1..])
            {
                Ok(n) if n + 1 < data.len() => {
                    key.seal_into(&blob_aad(id, kind), &self.scratch[..n + 1], out);
                    return out.len() - start;
                }
                _ => {}
            }
        }
        key.seal_parts_into(&blob_aad(id, kind), &[FLAG_RAW], data, out);
        out.len() - start
    }

    /// Small blobs are always tried; larger ones only when a 64 KiB sample
    /// from their middle shrinks by at least 3 %.
    fn worth_compressing(&mut self, data: &[u8]) -> bool {
        if data.len() <= 4 * PROBE_LEN {
            return !data.is_empty();
        }
        let mid = data.len() / 2;
        let sample = &data[mid - PROBE_LEN / 2..mid + PROBE_LEN / 2];
        self.scratch
            .resize(zstd::zstd_safe::compress_bound(PROBE_LEN), 0);
        match self
            .compressor
            .compress_to_buffer(sample, &mut self.scratch[..])
        {
            Ok(n) => n * 100 < PROBE_LEN * 97,
            Err(_) => false,
        }
    }
}

/// Decrypts, decompresses and re-hashes one stored blob.
pub fn decode_blob(
    key: &MasterKey,
    entry: &PackEntry,
    stored: &[u8],
) -> Result<Vec<u8>, BlobError> {
    let id = entry.id;
    let mut plain = key
        .open(&blob_aad(&id, entry.kind), stored)
        .map_err(|source| BlobError::Decrypt { id, source })?;
    let data =
        match plain.first().copied() {
            Some(FLAG_RAW) => {
                plain.remove(0);
                plain
            }
            Some(FLAG_ZSTD) => zstd::bulk::decompress(&plain[1..], entry.raw_len as usize)
                .map_err(|e| BlobError::Decompress {
                    id,
                    reason: e.to_string(),
                })?,
            other => {
                return Err(BlobError::BadFlag {
                    id,
                    flag: other.unwrap_or(255),
                });
            }
        };
    if data.len() != entry.raw_len as usize || key.blob_id(&data) != id {
        return Err(BlobError::HashMismatch { id });
    }
    Ok(data)
}

/// Builds one pack in memory.
#[derive(Debug, Default)]
pub struct PackBuilder {
    pub buf: Vec<u8>,
    pub entries: Vec<PackEntry>,
    pub raw_bytes: u64,
}

/// A finished pack, ready to upload.
#[derive(Debug)]
pub struct FinishedPack {
    pub id: PackId,
    pub data: Vec<u8>,
    pub entries: Vec<PackEntry>,
    pub raw_bytes: u64,
}

impl PackBuilder {
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            buf: Vec::with_capacity(cap),
            ..Default::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn add(
        &mut self,
        enc: &mut BlobEncoder,
        key: &MasterKey,
        id: BlobId,
        kind: BlobKind,
        data: &[u8],
    ) {
        let offset = self.buf.len() as u32;
        let length = enc.encode_into(key, &id, kind, data, &mut self.buf) as u32;
        self.raw_bytes += data.len() as u64;
        self.entries.push(PackEntry {
            kind,
            id,
            offset,
            length,
            raw_len: data.len() as u32,
        });
    }

    pub fn finish(mut self, key: &MasterKey) -> FinishedPack {
        let header = postcard::to_stdvec(&self.entries).expect("invariant: pack entries serialise");
        let sealed = key.seal(HEADER_AAD, &header);
        self.buf.extend_from_slice(&sealed);
        self.buf
            .extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        FinishedPack {
            id: PackId(content_hash(&self.buf)),
            data: self.buf,
            entries: self.entries,
            raw_bytes: self.raw_bytes,
        }
    }
}

/// The bytes at the end of a pack needed to find its header: at most this
/// many are fetched in one range request.
pub const HEADER_PROBE: u64 = 64 * 1024;

/// Parses the header from the tail of a pack (`tail` = the last bytes of a
/// pack of `pack_len` bytes). Returns `Ok(None)` when more bytes are
/// needed, with the number needed.
pub fn parse_header(
    key: &MasterKey,
    tail: &[u8],
    pack_len: u64,
) -> Result<Result<Vec<PackEntry>, u64>, BlobError> {
    if tail.len() < 4 {
        return Err(BlobError::BadHeader {
            reason: format!("pack of {pack_len} bytes is too short"),
        });
    }
    let n = u32::from_le_bytes(
        tail[tail.len() - 4..]
            .try_into()
            .expect("invariant: 4-byte slice"),
    ) as u64;
    if n + 4 > pack_len {
        return Err(BlobError::BadHeader {
            reason: format!("header length {n} exceeds pack length {pack_len}"),
        });
    }
    if (tail.len() as u64) < n + 4 {
        return Ok(Err(n + 4));
    }
    let sealed = &tail[tail.len() - 4 - n as usize..tail.len() - 4];
    let plain = key
        .open(HEADER_AAD, sealed)
        .map_err(|e| BlobError::BadHeader {
            reason: e.to_string(),
        })?;
    let entries: Vec<PackEntry> =
        postcard::from_bytes(&plain).map_err(|e| BlobError::BadHeader {
            reason: e.to_string(),
        })?;
    let body_len = pack_len - n - 4;
    for e in &entries {
        if e.offset as u64 + e.length as u64 > body_len {
            return Err(BlobError::BadHeader {
                reason: format!("blob {} lies outside the pack body", e.id),
            });
        }
    }
    Ok(Ok(entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trip_compressed_and_raw() {
        let key = MasterKey::generate();
        let mut enc = BlobEncoder::new(1).expect("zstd");
        let mut pb = PackBuilder::with_capacity(1 << 20);
        let text = b"abcabcabc".repeat(100_000);
        let mut noise = vec![0u8; 500_000];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut noise);
        let (a, b) = (key.blob_id(&text), key.blob_id(&noise));
        pb.add(&mut enc, &key, a, BlobKind::Data, &text);
        pb.add(&mut enc, &key, b, BlobKind::Tree, &noise);
        let p = pb.finish(&key);
        assert!(p.data.len() < text.len(), "text was not compressed");
        assert_eq!(p.id, PackId(content_hash(&p.data)));
        let entries = parse_header(&key, &p.data, p.data.len() as u64)
            .expect("header")
            .expect("complete");
        assert_eq!(entries, p.entries);
        let e0 = entries[0];
        let stored = &p.data[e0.offset as usize..(e0.offset + e0.length) as usize];
        assert_eq!(decode_blob(&key, &e0, stored).expect("decode"), text);
        let e1 = entries[1];
        let stored1 = &p.data[e1.offset as usize..(e1.offset + e1.length) as usize];
        assert_eq!(decode_blob(&key, &e1, stored1).expect("decode"), noise);
        // A blob presented under another id or kind fails.
        let mut wrong = e1;
        wrong.kind = BlobKind::Data;
        assert!(decode_blob(&key, &wrong, stored1).is_err());
        // A short tail asks for more.
        let tail = &p.data[p.data.len() - 8..];
        assert!(matches!(
            parse_header(&key, tail, p.data.len() as u64),
            Ok(Err(_))
        ));
        // Garbage is refused.
        assert!(parse_header(&key, &[1, 2, 3, 4, 5, 6, 7, 8], 8).is_err());
    }
}

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

/// Bytes a stored blob adds to its encoded body: nonce, flag, tag.
pub const BLOB_OVERHEAD: usize = super::crypto::OVERHEAD + 1;

/// Per-thread compression state.
///
/// Every blob is compressed straight into the pack buffer, with the output
/// limited to the input's size: zstd gives up on incompressible data at
/// several GB/s, so no sampling is needed, and the stored form is the raw
/// one whenever compression does not shrink the blob.
pub struct BlobEncoder {
    compressor: zstd::bulk::Compressor<'static>,
}

impl std::fmt::Debug for BlobEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlobEncoder")
    }
}

impl BlobEncoder {
    pub fn new(level: i32) -> std::io::Result<Self> {
        Ok(Self {
            compressor: zstd::bulk::Compressor::new(level)?,
        })
    }

    /// Compresses when that shrinks the blob, encrypts, and appends the
    /// stored form to `out`. Returns the stored length.
    pub fn encode_into(
        &mut self,
        key: &MasterKey,
        id: &BlobId,
        kind: BlobKind,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> usize {
        use super::crypto::NONCE_LEN;
        let start = out.len();
        let aad = blob_aad(id, kind);
        // Compressed output is kept only if flag + body < input length.
        if data.len() > 2 {
            let body = start + NONCE_LEN + 1;
            out.reserve(NONCE_LEN + data.len() + super::crypto::TAG_LEN);
            out.resize(body + data.len() - 2, 0);
            out[body - 1] = FLAG_ZSTD;
            if let Ok(n) = self.compressor.compress_to_buffer(data, &mut out[body..]) {
                out.truncate(body + n);
                key.seal_in_place(&aad, out, start);
                return out.len() - start;
            }
            out.truncate(start);
        }
        key.seal_parts_into(&aad, &[FLAG_RAW], data, out);
        out.len() - start
    }
}

thread_local! {
    /// One zstd decompression context per thread, reused across blobs.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses one zstd frame of at most `capacity` bytes with this
/// thread's context.
fn decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let dctx = match &mut *slot {
            Some(d) => d,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        dctx.decompress(data, capacity)
    })
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
    let data = match plain.first().copied() {
        Some(FLAG_RAW) => {
            plain.remove(0);
            plain
        }
        Some(FLAG_ZSTD) => {
            decompress(&plain[1..], entry.raw_len as usize).map_err(|e| BlobError::Decompress {
                id,
                reason: e.to_string(),
            })?
        }
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

/// The buffer [`decode_blob_in_place`] decompresses into, reused from blob
/// to blob so decoding many large blobs does not allocate and free
/// megabytes per blob (which glibc's malloc keeps in per-thread arenas).
#[derive(Debug, Default)]
pub struct DecodeBuffer {
    plain: Vec<u8>,
}

/// [`decode_blob`] of a stored blob the caller may overwrite: decrypted in
/// place, decompressed (if it was compressed) into `buf`. Returns the
/// plaintext, borrowed from `stored` or `buf`.
pub fn decode_blob_in_place<'a>(
    key: &MasterKey,
    entry: &PackEntry,
    stored: &'a mut [u8],
    buf: &'a mut DecodeBuffer,
) -> Result<&'a [u8], BlobError> {
    let id = entry.id;
    let opened = key
        .open_in_place(&blob_aad(&id, entry.kind), stored)
        .map_err(|source| BlobError::Decrypt { id, source })?;
    let data: &[u8] = match opened.first().copied() {
        Some(FLAG_RAW) => &opened[1..],
        Some(FLAG_ZSTD) => {
            let plain = &mut buf.plain;
            plain.clear();
            plain.reserve_exact(entry.raw_len as usize);
            DECOMPRESSOR
                .with(|cell| {
                    let mut slot = cell.borrow_mut();
                    let dctx = match &mut *slot {
                        Some(d) => d,
                        None => slot.insert(zstd::bulk::Decompressor::new()?),
                    };
                    dctx.decompress_to_buffer(&opened[1..], plain)
                })
                .map_err(|e| BlobError::Decompress {
                    id,
                    reason: e.to_string(),
                })?;
            plain
        }
        other => {
            return Err(BlobError::BadFlag {
                id,
                flag: other.unwrap_or(255),
            });
        }
    };
    if data.len() != entry.raw_len as usize || key.blob_id(data) != id {
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
        Self::from_buffer(Vec::with_capacity(cap))
    }

    /// Starts a pack in a recycled buffer (its content is discarded).
    pub fn from_buffer(mut buf: Vec<u8>) -> Self {
        buf.clear();
        Self {
            buf,
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

    #[test]
    fn blobs_with_an_incompressible_middle_are_still_compressed() {
        let key = MasterKey::generate();
        let mut enc = BlobEncoder::new(3).expect("zstd");
        // 2 MiB of text around 256 KiB of noise in the middle.
        let mut data = b"the quick brown fox ".repeat(60_000);
        let mut noise = vec![0u8; 256 * 1024];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut noise);
        let mid = data.len() / 2;
        data.splice(mid..mid, noise.iter().copied());
        let mut out = b"previous blob".to_vec();
        let id = key.blob_id(&data);
        let n = enc.encode_into(&key, &id, BlobKind::Data, &data, &mut out);
        assert_eq!(out.len(), 13 + n);
        assert!(
            n < noise.len() + 64 * 1024,
            "stored {n} bytes for {} bytes with {} of noise",
            data.len(),
            noise.len()
        );
        let entry = PackEntry {
            kind: BlobKind::Data,
            id,
            offset: 13,
            length: n as u32,
            raw_len: data.len() as u32,
        };
        assert_eq!(decode_blob(&key, &entry, &out[13..]).expect("decode"), data);
        assert_eq!(&out[..13], b"previous blob");

        // Incompressible and tiny blobs are stored raw: overhead only.
        for len in [0usize, 1, 2, 3, 100_000] {
            let mut noise = vec![0u8; len];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut noise);
            let id = key.blob_id(&noise);
            let mut out = Vec::new();
            let n = enc.encode_into(&key, &id, BlobKind::Tree, &noise, &mut out);
            assert_eq!(n, len + BLOB_OVERHEAD, "blob of {len} bytes");
            let entry = PackEntry {
                kind: BlobKind::Tree,
                id,
                offset: 0,
                length: n as u32,
                raw_len: len as u32,
            };
            assert_eq!(decode_blob(&key, &entry, &out).expect("decode"), noise);
        }
    }

    /// The backup uploader hands pack buffers back for reuse; that relies
    /// on getting the allocation back from the `Bytes` it uploaded.
    #[test]
    fn uploaded_pack_buffer_is_recovered_without_copy() {
        let mut v = Vec::with_capacity(1 << 20);
        v.extend_from_slice(&[7u8; 1000]);
        let ptr = v.as_ptr();
        let b = bytes::Bytes::from(v);
        let clone = b.clone();
        drop(clone);
        let back: Vec<u8> = b.try_into_mut().map(Vec::from).expect("unique");
        assert_eq!(back.as_ptr(), ptr);
        assert!(back.capacity() >= 1 << 20);
        assert_eq!(back.len(), 1000);
    }
}

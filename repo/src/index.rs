//! Index objects (`index/<id>`): which pack holds each blob, and where.
//! Encoded with postcard, zstd-compressed, then encrypted.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::format::{BlobId, PackId};
use super::pack::PackEntry;

/// The content of one index object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexFile {
    pub packs: Vec<IndexedPack>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedPack {
    pub id: PackId,
    pub blobs: Vec<PackEntry>,
}

/// Where one blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: PackId,
    pub entry: PackEntry,
}

/// The in-memory union of index objects.
#[derive(Debug, Default, Clone)]
pub struct Index {
    blobs: HashMap<BlobId, Location>,
    packs: HashMap<PackId, Vec<PackEntry>>,
}

impl Index {
    pub fn add_pack(&mut self, id: PackId, entries: &[PackEntry]) {
        for e in entries {
            self.blobs.entry(e.id).or_insert(Location {
                pack: id,
                entry: *e,
            });
        }
        self.packs.insert(id, entries.to_vec());
    }

    pub fn add_file(&mut self, file: &IndexFile) {
        for p in &file.packs {
            self.add_pack(p.id, &p.blobs);
        }
    }

    pub fn get(&self, id: &BlobId) -> Option<&Location> {
        self.blobs.get(id)
    }

    pub fn contains(&self, id: &BlobId) -> bool {
        self.blobs.contains_key(id)
    }

    pub fn has_pack(&self, id: &PackId) -> bool {
        self.packs.contains_key(id)
    }

    pub fn packs(&self) -> impl Iterator<Item = (&PackId, &Vec<PackEntry>)> {
        self.packs.iter()
    }

    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }

    pub fn pack_count(&self) -> usize {
        self.packs.len()
    }

    /// Removes the blobs of packs for which `exclude` holds (used to stop a
    /// backup from reusing blobs of packs marked for deletion).
    pub fn without_packs(&self, exclude: impl Fn(&PackId) -> bool) -> Index {
        let mut out = Index::default();
        for (id, entries) in &self.packs {
            if !exclude(id) {
                out.add_pack(*id, entries);
            }
        }
        out
    }
}

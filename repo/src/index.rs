//! Index objects (`index/<id>`): which pack holds each blob, and where.
//! Encoded with postcard, zstd-compressed, then encrypted.

use std::collections::HashMap;
use std::sync::OnceLock;

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
///
/// Each pack's entries are kept once, as listed; lookups by blob id go
/// through a table sorted by id holding 16 bytes per entry (the id's first
/// 8 bytes and where the entry is), built on the first lookup after a
/// change. About 64 bytes per blob in all, where a hash map of locations
/// next to the per-pack lists took about 280.
#[derive(Debug, Default, Clone)]
pub struct Index {
    packs: Vec<(PackId, Vec<PackEntry>)>,
    /// Position of each pack in `packs`.
    positions: HashMap<PackId, u32>,
    lookup: OnceLock<Vec<Slot>>,
}

/// One entry of the lookup table: the first 8 bytes of a blob id, and the
/// entry's place (pack position, entry position).
#[derive(Debug, Clone, Copy)]
struct Slot {
    prefix: u64,
    pack: u32,
    entry: u32,
}

fn prefix(id: &BlobId) -> u64 {
    let b = id.as_bytes();
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

impl Index {
    /// Adds a pack's entries. A pack already present is not added again
    /// (its id is the hash of its content, so its entries are the same).
    pub fn add_pack(&mut self, id: PackId, entries: &[PackEntry]) {
        self.add_pack_owned(id, entries.to_vec());
    }

    fn add_pack_owned(&mut self, id: PackId, entries: Vec<PackEntry>) {
        if self.positions.contains_key(&id) {
            return;
        }
        let pos = u32::try_from(self.packs.len()).expect("invariant: fewer than 2³² packs");
        self.positions.insert(id, pos);
        self.packs.push((id, entries));
        self.lookup = OnceLock::new();
    }

    pub fn add_file(&mut self, file: &IndexFile) {
        for p in &file.packs {
            self.add_pack(p.id, &p.blobs);
        }
    }

    /// [`Index::add_file`] without copying the entries.
    pub fn add_file_owned(&mut self, file: IndexFile) {
        for p in file.packs {
            self.add_pack_owned(p.id, p.blobs);
        }
    }

    /// The lookup table, sorted by (id, pack position, entry position): of
    /// the copies of a blob, the one added first comes first.
    fn table(&self) -> &[Slot] {
        self.lookup.get_or_init(|| {
            let n: usize = self.packs.iter().map(|(_, e)| e.len()).sum();
            let mut slots = Vec::with_capacity(n);
            for (p, (_, entries)) in self.packs.iter().enumerate() {
                for (e, entry) in entries.iter().enumerate() {
                    slots.push(Slot {
                        prefix: prefix(&entry.id),
                        pack: p as u32,
                        entry: e as u32,
                    });
                }
            }
            slots.sort_unstable_by(|a, b| {
                a.prefix
                    .cmp(&b.prefix)
                    .then_with(|| self.entry(a).id.cmp(&self.entry(b).id))
                    .then((a.pack, a.entry).cmp(&(b.pack, b.entry)))
            });
            slots
        })
    }

    fn entry(&self, s: &Slot) -> &PackEntry {
        &self.packs[s.pack as usize].1[s.entry as usize]
    }

    /// Where blob `id` is stored (the first copy added, if several).
    pub fn get(&self, id: &BlobId) -> Option<Location> {
        let table = self.table();
        let key = prefix(id);
        let start = table.partition_point(|s| s.prefix < key);
        table[start..]
            .iter()
            .take_while(|s| s.prefix == key)
            .find(|s| self.entry(s).id == *id)
            .map(|s| Location {
                pack: self.packs[s.pack as usize].0,
                entry: *self.entry(s),
            })
    }

    pub fn contains(&self, id: &BlobId) -> bool {
        self.get(id).is_some()
    }

    pub fn has_pack(&self, id: &PackId) -> bool {
        self.positions.contains_key(id)
    }

    /// Every pack with its entries, in the order they were added.
    pub fn packs(&self) -> impl Iterator<Item = (&PackId, &Vec<PackEntry>)> {
        self.packs.iter().map(|(id, e)| (id, e))
    }

    /// The entries of pack `id`, if it is indexed.
    pub fn pack_entries(&self, id: &PackId) -> Option<&[PackEntry]> {
        self.positions
            .get(id)
            .map(|p| self.packs[*p as usize].1.as_slice())
    }

    /// Distinct blobs.
    pub fn blob_count(&self) -> usize {
        let table = self.table();
        table
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                *i == 0 || {
                    let prev = &table[i - 1];
                    prev.prefix != s.prefix || self.entry(prev).id != self.entry(s).id
                }
            })
            .count()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::BlobKind;

    fn entry(id: u8, second: u8, offset: u32) -> PackEntry {
        let mut b = [0u8; 32];
        b[0] = id;
        // Same first 8 bytes for every `id`, different later: lookups
        // must compare whole ids.
        b[20] = second;
        PackEntry {
            kind: BlobKind::Data,
            id: BlobId(b),
            offset,
            length: 10,
            raw_len: 8,
        }
    }

    #[test]
    fn lookups_find_the_first_copy_and_whole_ids() {
        let mut index = Index::default();
        let (p1, p2, p3) = (PackId([1; 32]), PackId([2; 32]), PackId([3; 32]));
        index.add_pack(p2, &[entry(5, 1, 0), entry(5, 2, 10), entry(9, 0, 20)]);
        assert_eq!(
            index.get(&entry(5, 2, 0).id).map(|l| l.entry.offset),
            Some(10)
        );
        // Added later: the first copy stays the one found.
        index.add_file_owned(IndexFile {
            packs: vec![IndexedPack {
                id: p1,
                blobs: vec![entry(5, 2, 70), entry(7, 0, 80)],
            }],
        });
        let loc = index.get(&entry(5, 2, 0).id).expect("found");
        assert_eq!((loc.pack, loc.entry.offset), (p2, 10));
        assert_eq!(index.get(&entry(7, 0, 0).id).map(|l| l.pack), Some(p1));
        assert!(index.get(&entry(5, 3, 0).id).is_none());
        assert!(index.get(&entry(6, 1, 0).id).is_none());
        assert!(index.contains(&entry(9, 0, 0).id));
        assert_eq!(index.blob_count(), 4);
        // A pack added twice counts once.
        index.add_pack(p1, &[entry(5, 2, 70), entry(7, 0, 80)]);
        assert_eq!(index.pack_count(), 2);
        assert_eq!(index.pack_entries(&p1).map(<[_]>::len), Some(2));
        assert!(index.has_pack(&p2) && !index.has_pack(&p3));
        // Without p2, the copy in p1 is found.
        let rest = index.without_packs(|p| *p == p2);
        assert_eq!(rest.get(&entry(5, 2, 0).id).map(|l| l.pack), Some(p1));
        assert!(rest.get(&entry(9, 0, 0).id).is_none());
    }
}

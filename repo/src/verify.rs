//! Verification: a structural check of indexes, packs and snapshot trees,
//! and optionally reading back (a share of) the packs: download, check the
//! pack hash, decrypt and re-hash every blob.

use std::collections::{HashMap, HashSet};

use futures::StreamExt;
use serde::Serialize;

use super::format::{BlobId, PackId, SnapshotId};
use super::index::Index;
use super::pack;
use super::tree::NodeKind;
use super::{RepoError, Repository, object_key};

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Only this snapshot (default: all).
    pub snapshot: Option<SnapshotId>,
    /// Read back this percentage (1–100) of the packs.
    pub read_data_percent: Option<u8>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub snapshots: usize,
    pub trees: usize,
    pub data_blobs: usize,
    pub index_objects: usize,
    pub packs: usize,
    pub packs_read: usize,
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn into_result(self) -> Result<Self, RepoError> {
        match self.problems.first() {
            None => Ok(self),
            Some(first) => Err(RepoError::VerifyFailed {
                count: self.problems.len(),
                first: first.clone(),
            }),
        }
    }
}

impl Repository {
    pub async fn verify(&self, opts: VerifyOptions) -> Result<VerifyReport, RepoError> {
        let mut report = VerifyReport::default();
        // Index objects, one by one so a corrupt one is named.
        let mut index = Index::default();
        let ids: Vec<_> = self
            .io(self.store().list(super::format::INDEX_PREFIX))
            .await?
            .iter()
            .filter_map(|o| super::format::id_from_key::<super::format::IndexId>(o.key.as_str()))
            .collect();
        for iid in ids {
            report.index_objects += 1;
            let res = async {
                let bytes = self.get_object(&iid.object_key()).await?;
                self.decode_index(iid, &bytes)
            }
            .await;
            match res {
                Ok(f) => index.add_file_owned(f),
                Err(e) => report.problems.push(e.to_string()),
            }
        }
        // Packs named by the index exist and are large enough.
        let stored: HashMap<PackId, u64> = self.list_packs().await?.into_iter().collect();
        report.packs = stored.len();
        let mut missing_packs = HashSet::new();
        for (pid, entries) in index.packs() {
            match stored.get(pid) {
                None => {
                    missing_packs.insert(*pid);
                }
                Some(size) => {
                    if let Some(e) = entries
                        .iter()
                        .find(|e| e.offset as u64 + e.length as u64 > *size)
                    {
                        report.problems.push(format!(
                            "pack {pid} is truncated: blob {} ends beyond its {size} bytes",
                            e.id
                        ));
                    }
                }
            }
        }
        // Snapshot trees.
        let snaps = match opts.snapshot {
            Some(s) => vec![s],
            None => self.snapshot_ids().await?,
        };
        let mut seen_trees: HashSet<BlobId> = HashSet::new();
        let mut data: HashSet<BlobId> = HashSet::new();
        let mut reported_missing: HashSet<PackId> = HashSet::new();
        for sid in &snaps {
            report.snapshots += 1;
            let snap = match self.load_snapshot(*sid).await {
                Ok(s) => s,
                Err(e) => {
                    report.problems.push(e.to_string());
                    continue;
                }
            };
            let mut stack = vec![(snap.tree, String::from("/"))];
            seen_trees.insert(snap.tree);
            while let Some((tid, path)) = stack.pop() {
                report.trees += 1;
                let mut check = |blob: &BlobId, what: String, report: &mut VerifyReport| match index
                    .get(blob)
                {
                    None => report.problems.push(format!(
                        "blob {blob} of {what} in snapshot {sid} is not in any index"
                    )),
                    Some(loc) if missing_packs.contains(&loc.pack) => {
                        if reported_missing.insert(loc.pack) {
                            report.problems.push(format!(
                                "pack {} referenced by snapshot {sid} ({what}) is missing",
                                loc.pack
                            ));
                        }
                    }
                    Some(_) => {}
                };
                check(&tid, format!("directory {path}"), &mut report);
                let tree = match self.load_tree(&index, &tid).await {
                    Ok(t) => t,
                    Err(e) => {
                        report
                            .problems
                            .push(format!("directory {path} of snapshot {sid}: {e}"));
                        continue;
                    }
                };
                for n in &tree.nodes {
                    let child = format!("{}{}", path, n.display_name());
                    match &n.kind {
                        NodeKind::Dir { subtree } if seen_trees.insert(*subtree) => {
                            stack.push((*subtree, format!("{child}/")));
                        }
                        kind => {
                            for c in kind.data_blobs() {
                                if data.insert(*c) {
                                    check(c, format!("file {child}"), &mut report);
                                }
                            }
                        }
                    }
                }
            }
        }
        report.data_blobs = data.len();
        for p in missing_packs.difference(&reported_missing) {
            report
                .problems
                .push(format!("pack {p} listed in the index is missing"));
        }
        // Read back packs.
        if let Some(pct) = opts.read_data_percent {
            let pct = pct.clamp(1, 100) as u64;
            // For one snapshot, only the packs holding its blobs.
            let wanted: Option<HashSet<PackId>> = opts.snapshot.map(|_| {
                seen_trees
                    .iter()
                    .chain(data.iter())
                    .filter_map(|b| index.get(b).map(|l| l.pack))
                    .collect()
            });
            let mut candidates: Vec<PackId> = index
                .packs()
                .map(|(p, _)| *p)
                .filter(|p| stored.contains_key(p))
                .filter(|p| wanted.as_ref().is_none_or(|w| w.contains(p)))
                .collect();
            candidates.sort();
            let chosen: Vec<PackId> = if pct >= 100 {
                candidates
            } else {
                let n = (candidates.len() as u64 * pct).div_ceil(100) as usize;
                use rand::seq::SliceRandom;
                candidates.shuffle(&mut rand::rng());
                candidates.truncate(n);
                candidates
            };
            report.packs_read = chosen.len();
            let index = &index;
            let problems: Vec<Vec<String>> = futures::stream::iter(chosen)
                .map(|pid| async move { self.read_back_pack(index, pid).await })
                .buffer_unordered(4)
                .collect()
                .await;
            report.problems.extend(problems.into_iter().flatten());
        }
        Ok(report)
    }

    async fn read_back_pack(&self, index: &Index, pid: PackId) -> Vec<String> {
        let key = match object_key(&pid.object_key()) {
            Ok(k) => k,
            Err(e) => return vec![e.to_string()],
        };
        let data = match self.io(self.store().get(&key)).await {
            Ok(d) => d,
            Err(e) => return vec![format!("pack {pid} cannot be read: {e}")],
        };
        let key = self.key().clone();
        let expected: Vec<pack::PackEntry> = index
            .pack_entries(&pid)
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        tokio::task::spawn_blocking(move || {
            let mut problems = Vec::new();
            if super::format::content_hash(&data) != pid.0 {
                problems.push(format!(
                    "pack {pid} is corrupted: content does not match its id"
                ));
            }
            match pack::parse_header(&key, &data, data.len() as u64) {
                Ok(Ok(h)) if h == expected => {}
                Ok(Ok(_)) => problems.push(format!("pack {pid}: header does not match the index")),
                Ok(Err(_)) => problems.push(format!("pack {pid}: header is incomplete")),
                Err(e) => problems.push(format!("pack {pid}: {e}")),
            }
            for e in &expected {
                let lo = e.offset as usize;
                let Some(stored) = data.get(lo..lo + e.length as usize) else {
                    problems.push(format!("pack {pid} is truncated at blob {}", e.id));
                    continue;
                };
                if let Err(err) = pack::decode_blob(&key, e, stored) {
                    problems.push(format!("pack {pid}: {err}"));
                }
            }
            problems
        })
        .await
        .unwrap_or_else(|e| vec![format!("pack {pid}: check failed: {e}")])
    }
}

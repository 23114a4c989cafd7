//! `repo repair index`: rebuilds the index from the packs themselves, for
//! a repository that lost an index object or holds a corrupt one.

use serde::Serialize;

use super::format::{INDEX_PREFIX, IndexId, id_from_key};
use super::index::Index;
use super::{RepoError, Repository, object_key};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RepairReport {
    pub index_objects: usize,
    /// Unreadable index objects, removed once their packs were re-indexed.
    pub index_objects_removed: usize,
    /// Packs that no index listed, now listed in a new index object.
    pub packs_recovered: usize,
}

impl Repository {
    /// Re-indexes every pack that no readable index object lists (reading
    /// each such pack's header), then removes the unreadable index objects.
    /// Holds the maintenance lock: no prune runs meanwhile.
    pub async fn repair_index(&self) -> Result<RepairReport, RepoError> {
        let op = self.for_operation();
        let lock = op.lock_maintenance(op.cancel_token().clone()).await?;
        let res = op.repair_index_locked().await;
        let res = match res {
            Ok(r) => lock.check().map(|()| r),
            Err(e) => Err(lock.explain(e)),
        };
        lock.release().await;
        res
    }

    async fn repair_index_locked(&self) -> Result<RepairReport, RepoError> {
        let mut report = RepairReport::default();
        let mut index = Index::default();
        let mut unreadable = Vec::new();
        let ids: Vec<IndexId> = self
            .io(self.store().list(INDEX_PREFIX))
            .await?
            .iter()
            .filter_map(|o| id_from_key(o.key.as_str()))
            .collect();
        for id in ids {
            report.index_objects += 1;
            let bytes = self.get_object(&id.object_key()).await?;
            match self.decode_index(id, &bytes) {
                Ok(f) => index.add_file_owned(f),
                Err(e) => {
                    tracing::warn!(index = %id, error = %e, "index object is unreadable; its packs are re-indexed");
                    unreadable.push(id);
                }
            }
        }
        report.packs_recovered = self.recover_unindexed_packs(&mut index, false).await?;
        self.check_cancel()?;
        for id in unreadable {
            self.io(self.store().delete(&object_key(&id.object_key())?))
                .await?;
            report.index_objects_removed += 1;
        }
        Ok(report)
    }
}

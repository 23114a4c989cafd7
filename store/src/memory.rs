//! An in-memory store: objects in a map, for tests and for short-lived
//! repositories that never touch a disk. Every operation is atomic under
//! one lock, so a `put` is all-or-nothing like the durable stores.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;

use super::local::check_range;
use super::{ObjectInfo, ObjectKey, ObjectStore, StoreError, validate_prefix};

#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<ObjectKey, Bytes>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn objects(&self) -> MutexGuard<'_, BTreeMap<ObjectKey, Bytes>> {
        // A panic while holding the lock cannot leave the map half-updated:
        // every operation is a single map call.
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), StoreError> {
        self.objects().insert(key.clone(), data);
        Ok(())
    }

    async fn get(&self, key: &ObjectKey) -> Result<Bytes, StoreError> {
        self.objects()
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound { key: key.clone() })
    }

    async fn get_range(&self, key: &ObjectKey, range: Range<u64>) -> Result<Bytes, StoreError> {
        let data = self.get(key).await?;
        check_range(key, &range, data.len() as u64)?;
        Ok(data.slice(range.start as usize..range.end as usize))
    }

    async fn size(&self, key: &ObjectKey) -> Result<Option<u64>, StoreError> {
        Ok(self.objects().get(key).map(|d| d.len() as u64))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        validate_prefix(prefix)?;
        Ok(self
            .objects()
            .range(ObjectKey(prefix.to_owned())..)
            .take_while(|(k, _)| k.as_str().starts_with(prefix))
            .map(|(k, v)| ObjectInfo {
                key: k.clone(),
                size: v.len() as u64,
            })
            .collect())
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        self.objects().remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    mod conformance {
        use std::sync::Arc;

        use super::super::MemoryStore;
        use crate::conformance::{Fixture, conformance_suite};

        conformance_suite!(async {
            Fixture {
                store: Arc::new(MemoryStore::new()),
                _guard: None,
            }
        });
    }
}

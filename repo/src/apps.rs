//! App manifests (`apps/<name>`): the commit point of an application
//! backup.
//!
//! An application backup is one snapshot per volume plus one manifest that
//! names them, with the app's definition and the backup's figures. The
//! repository stores the manifest as an opaque document, encrypted and
//! authenticated with its name (a manifest cannot be passed off under
//! another name); what it says is the agent's and the controller's
//! business (`ferry_core::backup::AppManifest`). It is written after every
//! snapshot it names, and written once: a second write of the same name
//! with other content is refused.

use ferry_store::StoreError;

use super::format::APPS_PREFIX;
use super::{RepoError, Repository};

/// Longest manifest name.
const NAME_MAX: usize = 128;

fn aad(name: &str) -> Vec<u8> {
    format!("ferry app manifest v1 {name}").into_bytes()
}

fn check_name(name: &str) -> Result<(), RepoError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(RepoError::InvalidInput(format!(
            "app manifest name {name:?} is not 1-{NAME_MAX} of [a-z0-9-]"
        )))
    }
}

impl Repository {
    /// Stores the manifest `name`. Writing the same document again is a
    /// no-op (a retried step); another document under a taken name is
    /// refused.
    pub async fn save_app_manifest(&self, name: &str, doc: &[u8]) -> Result<(), RepoError> {
        check_name(name)?;
        if let Some(existing) = self.load_app_manifest(name).await? {
            if existing == doc {
                return Ok(());
            }
            return Err(RepoError::InvalidInput(format!(
                "app manifest {name} already exists with other content"
            )));
        }
        let sealed = self.key.seal(&aad(name), doc);
        self.put_object(&format!("{APPS_PREFIX}{name}"), sealed)
            .await
    }

    /// The manifest `name`, if the repository has it.
    pub async fn load_app_manifest(&self, name: &str) -> Result<Option<Vec<u8>>, RepoError> {
        check_name(name)?;
        let bytes = match self.get_object(&format!("{APPS_PREFIX}{name}")).await {
            Err(RepoError::Store(StoreError::NotFound { .. })) => return Ok(None),
            other => other?,
        };
        self.key
            .open(&aad(name), &bytes)
            .map(Some)
            .map_err(|e| RepoError::Corrupt {
                object: format!("app manifest {name}"),
                reason: e.to_string(),
            })
    }

    /// The names of every manifest, sorted.
    pub async fn app_manifest_names(&self) -> Result<Vec<String>, RepoError> {
        let mut names: Vec<String> = self
            .io(self.store.list(APPS_PREFIX))
            .await?
            .iter()
            .filter_map(|o| o.key.as_str().strip_prefix(APPS_PREFIX))
            .filter(|n| check_name(n).is_ok())
            .map(str::to_owned)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Removes the manifest `name`; false if there was none. The snapshots
    /// it names are forgotten separately.
    pub async fn remove_app_manifest(&self, name: &str) -> Result<bool, RepoError> {
        check_name(name)?;
        let key = super::object_key(&format!("{APPS_PREFIX}{name}"))?;
        if self.io(self.store.size(&key)).await?.is_none() {
            return Ok(false);
        }
        self.io(self.store.delete(&key)).await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ferry_store::{MemoryStore, ObjectStore};

    use super::*;

    #[tokio::test]
    async fn manifests_are_sealed_written_once_and_bound_to_their_name() {
        let store = Arc::new(MemoryStore::new());
        let repo = Repository::init(store.clone(), b"pw", "test")
            .await
            .expect("init");
        repo.save_app_manifest("17", b"{\"a\":1}")
            .await
            .expect("save");
        // The same document again is fine; another is refused.
        repo.save_app_manifest("17", b"{\"a\":1}")
            .await
            .expect("again");
        let err = repo
            .save_app_manifest("17", b"{\"a\":2}")
            .await
            .expect_err("taken");
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(
            repo.load_app_manifest("17").await.expect("load").as_deref(),
            Some(&b"{\"a\":1}"[..])
        );
        // Not stored in the clear.
        let raw = store
            .get(&super::super::object_key("apps/17").expect("key"))
            .await
            .expect("raw");
        assert!(!raw.windows(5).any(|w| w == b"\"a\":1"));
        // Moved under another name, it does not open.
        store
            .put(&super::super::object_key("apps/18").expect("key"), raw)
            .await
            .expect("copy");
        let err = repo.load_app_manifest("18").await.expect_err("bound");
        assert!(err.to_string().contains("app manifest 18"), "{err}");
        assert_eq!(
            repo.app_manifest_names().await.expect("names"),
            ["17", "18"]
        );
        assert!(repo.remove_app_manifest("17").await.expect("rm"));
        assert!(!repo.remove_app_manifest("17").await.expect("rm again"));
        assert_eq!(repo.load_app_manifest("17").await.expect("gone"), None);
        assert!(repo.save_app_manifest("../x", b"").await.is_err());
    }
}

//! A storage location in a local directory.
//!
//! Each object is one file below the root, at the path its key names. A put
//! writes a temporary file in the target directory, fsyncs it, renames it
//! over the final name and fsyncs the directory, so a reader (or a restart
//! after a crash) sees the whole object or no object. Temporary files that a
//! crash leaves behind carry the [`TEMP_PREFIX`] and are never listed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectInfo, ObjectKey, ObjectStore, StoreError};

/// File names starting with this are in-progress writes, not objects. Keys
/// whose last segment starts with it are refused.
pub const TEMP_PREFIX: &str = ".ferry-tmp-";

/// A temporary file untouched for this long was left by a crashed writer
/// (a put holds its temporary file for seconds); listing removes it.
pub const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Removes a crashed writer's temporary file once it is stale (best
/// effort: it is invisible to readers either way).
fn remove_if_stale(path: &Path) {
    let stale = fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= STALE_TEMP);
    if stale {
        match fs::remove_file(path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed a stale temporary file"),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot remove a stale temporary file")
            }
        }
    }
}

/// Objects as files below a root directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// Makes temporary file names unique within this process.
    counter: AtomicU64,
}

impl LocalStore {
    /// A store rooted at `root`. The directory is created on the first put
    /// if it does not exist yet.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                root: root.into(),
                counter: AtomicU64::new(0),
            }),
        }
    }

    /// The directory holding the objects.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Runs blocking file work on the blocking pool.
    async fn blocking<T, F>(&self, op: &'static str, key: String, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Permanent {
                op,
                key,
                source: Box::new(e),
            })?
    }
}

impl Inner {
    fn path_of(&self, key: &ObjectKey) -> PathBuf {
        // `ObjectKey` guarantees relative, non-empty segments without `..`,
        // so the joined path stays strictly below the root.
        let mut path = self.root.clone();
        path.extend(key.as_str().split('/'));
        path
    }

    fn put(&self, key: &ObjectKey, data: &[u8]) -> Result<(), StoreError> {
        let err = |e: io::Error| io_error("put", key.as_str(), e);
        let file_name = key.as_str().rsplit('/').next().unwrap_or_default();
        if file_name.starts_with(TEMP_PREFIX) {
            return Err(StoreError::InvalidKey {
                key: key.as_str().to_owned(),
            });
        }
        let path = self.path_of(key);
        let dir = path
            .parent()
            .expect("invariant: an object path has the root as an ancestor");
        self.create_dirs(dir).map_err(err)?;

        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(
            "{TEMP_PREFIX}{}-{n}-{file_name}",
            std::process::id()
        ));
        let result = (|| {
            let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            file.write_all(data)?;
            file.sync_all()?;
            drop(file);
            fs::rename(&tmp, &path)?;
            sync_dir(dir)
        })();
        if result.is_err() {
            // Best effort: the temporary file is invisible to readers anyway.
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(err)
    }

    /// Creates `dir` and its missing ancestors below the root, fsyncing the
    /// parent of every directory it creates so the new entries survive a
    /// crash.
    fn create_dirs(&self, dir: &Path) -> io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        let mut missing = Vec::new();
        let mut cur = dir;
        loop {
            if cur.is_dir() {
                break;
            }
            missing.push(cur.to_path_buf());
            match cur.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => cur = parent,
                _ => break,
            }
        }
        for d in missing.iter().rev() {
            match fs::create_dir(d) {
                Ok(()) => {
                    if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
                        sync_dir(parent)?;
                    }
                }
                // A concurrent put created it; its creator syncs the parent.
                Err(e) if e.kind() == ErrorKind::AlreadyExists && d.is_dir() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn get(&self, key: &ObjectKey) -> Result<Bytes, StoreError> {
        fs::read(self.path_of(key))
            .map(Bytes::from)
            .map_err(|e| not_found_or(key, "get", e))
    }

    fn get_range(&self, key: &ObjectKey, range: Range<u64>) -> Result<Bytes, StoreError> {
        let file = File::open(self.path_of(key)).map_err(|e| not_found_or(key, "get_range", e))?;
        let size = file
            .metadata()
            .map_err(|e| io_error("get_range", key.as_str(), e))?
            .len();
        check_range(key, &range, size)?;
        let len = usize::try_from(range.end - range.start).map_err(|_| StoreError::Permanent {
            op: "get_range",
            key: key.as_str().to_owned(),
            source: "range does not fit in memory".into(),
        })?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, range.start)
            .map_err(|e| io_error("get_range", key.as_str(), e))?;
        Ok(Bytes::from(buf))
    }

    fn size(&self, key: &ObjectKey) -> Result<Option<u64>, StoreError> {
        match fs::metadata(self.path_of(key)) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("size", key.as_str(), e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        super::validate_prefix(prefix)?;
        // Walk only the directory the prefix names, then filter by prefix.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let mut start = self.root.clone();
        if !dir_part.is_empty() {
            let dir_key = ObjectKey::new(dir_part).map_err(|_| StoreError::InvalidKey {
                key: prefix.to_owned(),
            })?;
            start = self.path_of(&dir_key);
        }
        let mut out = Vec::new();
        let mut stack = vec![(start, dir_part.to_owned())];
        while let Some((dir, rel)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                // Nothing below a missing path or a file.
                Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                    continue;
                }
                Err(e) => return Err(io_error("list", prefix, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| io_error("list", prefix, e))?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    tracing::warn!(dir = %dir.display(), "skipping a file whose name is not utf-8");
                    continue;
                };
                if name.starts_with(TEMP_PREFIX) {
                    remove_if_stale(&entry.path());
                    continue;
                }
                let key = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let file_type = entry.file_type().map_err(|e| io_error("list", prefix, e))?;
                if file_type.is_dir() {
                    // Descend only where keys can still match the prefix.
                    let as_dir = format!("{key}/");
                    if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                        stack.push((entry.path(), key));
                    }
                } else if file_type.is_file() && key.starts_with(prefix) {
                    let size = match entry.metadata() {
                        Ok(m) => m.len(),
                        // Deleted between readdir and stat.
                        Err(e) if e.kind() == ErrorKind::NotFound => continue,
                        Err(e) => return Err(io_error("list", prefix, e)),
                    };
                    if let Ok(key) = ObjectKey::new(key) {
                        out.push(ObjectInfo { key, size });
                    }
                }
            }
        }
        Ok(out)
    }

    fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let path = self.path_of(key);
        match fs::remove_file(&path) {
            Ok(()) => {
                let dir = path
                    .parent()
                    .expect("invariant: an object path has the root as an ancestor");
                sync_dir(dir).map_err(|e| io_error("delete", key.as_str(), e))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("delete", key.as_str(), e)),
        }
    }
}

/// Checks that `range` lies inside an object of `size` bytes.
pub(crate) fn check_range(
    key: &ObjectKey,
    range: &Range<u64>,
    size: u64,
) -> Result<(), StoreError> {
    if range.start > range.end || range.end > size {
        return Err(StoreError::Permanent {
            op: "get_range",
            key: key.as_str().to_owned(),
            source: format!(
                "range {}..{} is outside the object's {size} bytes",
                range.start, range.end
            )
            .into(),
        });
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn not_found_or(key: &ObjectKey, op: &'static str, e: io::Error) -> StoreError {
    if e.kind() == ErrorKind::NotFound {
        StoreError::NotFound { key: key.clone() }
    } else {
        io_error(op, key.as_str(), e)
    }
}

/// Interrupted or timed-out I/O may succeed on retry; permission, space and
/// everything else will not.
fn io_error(op: &'static str, key: &str, e: io::Error) -> StoreError {
    let key = key.to_owned();
    match e.kind() {
        ErrorKind::Interrupted | ErrorKind::TimedOut | ErrorKind::WouldBlock => {
            StoreError::Transient {
                op,
                key,
                source: Box::new(e),
            }
        }
        _ => StoreError::Permanent {
            op,
            key,
            source: Box::new(e),
        },
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), StoreError> {
        let k = key.clone();
        self.blocking("put", key.to_string(), move |s| s.put(&k, &data))
            .await
    }

    async fn get(&self, key: &ObjectKey) -> Result<Bytes, StoreError> {
        let k = key.clone();
        self.blocking("get", key.to_string(), move |s| s.get(&k))
            .await
    }

    async fn get_range(&self, key: &ObjectKey, range: Range<u64>) -> Result<Bytes, StoreError> {
        let k = key.clone();
        self.blocking("get_range", key.to_string(), move |s| {
            s.get_range(&k, range)
        })
        .await
    }

    async fn size(&self, key: &ObjectKey) -> Result<Option<u64>, StoreError> {
        let k = key.clone();
        self.blocking("size", key.to_string(), move |s| s.size(&k))
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let p = prefix.to_owned();
        self.blocking("list", prefix.to_owned(), move |s| s.list(&p))
            .await
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let k = key.clone();
        self.blocking("delete", key.to_string(), move |s| s.delete(&k))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ObjectKey {
        ObjectKey::new(s).expect("test key is valid")
    }

    mod conformance {
        use super::*;
        use crate::conformance::{Fixture, conformance_suite};

        conformance_suite!(async {
            let dir = tempfile::tempdir().expect("tempdir");
            Fixture {
                store: Arc::new(LocalStore::new(dir.path().join("repo"))),
                _guard: Some(Box::new(dir)),
            }
        });
    }

    #[tokio::test]
    async fn objects_are_files_below_the_root_and_no_temp_files_remain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path());
        store
            .put(&key("data/3f/3fa2"), Bytes::from_static(b"pack"))
            .await
            .expect("put");
        let on_disk = fs::read(dir.path().join("data/3f/3fa2")).expect("object file exists");
        assert_eq!(on_disk, b"pack");
        let names: Vec<_> = fs::read_dir(dir.path().join("data/3f"))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("3fa2")]);
    }

    #[tokio::test]
    async fn leftover_temp_files_are_not_listed_and_temp_names_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path());
        store
            .put(&key("index/a"), Bytes::from_static(b"x"))
            .await
            .expect("put");
        // What a crash in the middle of a put leaves behind.
        fs::write(
            dir.path().join(format!("index/{TEMP_PREFIX}1-0-b")),
            b"partial",
        )
        .expect("write temp");
        // And one a writer left days ago.
        let old = dir.path().join(format!("index/{TEMP_PREFIX}1-1-c"));
        fs::write(&old, b"abandoned").expect("write temp");
        let two_days_ago = std::time::SystemTime::now() - 2 * STALE_TEMP;
        fs::File::options()
            .write(true)
            .open(&old)
            .and_then(|f| f.set_modified(two_days_ago))
            .expect("age it");
        let listed = store.list("index/").await.expect("list");
        assert_eq!(
            listed,
            vec![ObjectInfo {
                key: key("index/a"),
                size: 1
            }]
        );
        // The stale one is gone, the fresh one (a put may be writing it) stays.
        assert!(!old.exists(), "stale temporary file kept");
        assert!(
            dir.path()
                .join(format!("index/{TEMP_PREFIX}1-0-b"))
                .exists()
        );
        let err = store
            .put(&key(&format!("index/{TEMP_PREFIX}x")), Bytes::new())
            .await
            .expect_err("temp-like name refused");
        assert!(matches!(err, StoreError::InvalidKey { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_root_that_is_a_file_gives_a_permanent_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"").expect("write");
        let store = LocalStore::new(&file);
        let err = store
            .put(&key("a"), Bytes::from_static(b"x"))
            .await
            .expect_err("put below a file fails");
        assert!(
            matches!(err, StoreError::Permanent { op: "put", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("put on a"), "{err}");
    }
}

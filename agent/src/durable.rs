//! The agent's one durable writer and its private directories.
//!
//! Every state file the agent keeps (the journal's entries, the restart
//! policies it set aside, the registry of copies) is written whole by
//! [`write`]: a temporary file (0600) beside the target, fsync, rename over
//! the target, fsync of the directory. A crash leaves the old file or the
//! new one, never a torn one. What the agent stages or keeps for itself
//! goes into directories made by [`private_dir`]: 0700 whatever the umask,
//! and files in them 0600 ([`create_private`]).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `bytes` to `path` durably and atomically; the file is 0600. The
/// directory must exist.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("a file path needs a directory"))?;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("a file path needs a file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = create_private(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Makes a rename or a removal in `dir` durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates (truncating) a file only its owner can read: 0600 from the
/// start, whatever the umask.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode on open: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Creates `dir` (and missing parents) and makes it 0700, whatever the
/// umask and whatever mode an existing one had.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
    }

    #[test]
    fn files_are_replaced_whole_and_private() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = tmp.path().join("state.json");
        std::fs::write(&p, b"old").expect("seed");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write(&p, b"new").expect("write");
        assert_eq!(std::fs::read(&p).expect("read"), b"new");
        assert_eq!(mode(&p), 0o600);
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn private_dirs_are_0700_even_when_they_existed_open() {
        let tmp = tempfile::tempdir().expect("tmp");
        let d = tmp.path().join("a/b");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&d).expect("private");
        assert_eq!(mode(&d), 0o700);
        let f = d.join("secret");
        drop(create_private(&f).expect("create"));
        assert_eq!(mode(&f), 0o600);
    }
}

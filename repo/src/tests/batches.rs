//! Restore in batches: a small tree restored with tiny batch limits goes
//! through many batches and must come back exactly as with one batch,
//! hard links across batches included; a failure in a later batch leaves
//! the earlier batches' files complete and nothing under a temporary name.

use super::*;
use crate::format::SnapshotId;
use crate::restore::{BatchLimits, RestoreOptions};

fn limits(files: usize, chunks: usize) -> RestoreOptions {
    RestoreOptions {
        batch: BatchLimits { files, chunks },
    }
}

/// Names of entries under a temporary name anywhere below `root`.
fn temporaries(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("entry");
            if e.file_name()
                .to_string_lossy()
                .starts_with(".ferry-restore-")
            {
                out.push(e.path().display().to_string());
            }
            if e.file_type().expect("type").is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

/// Many directories and files, hard link groups whose links lie far from
/// their first file (other directories, so other batches), an empty
/// hardlinked file, symlinks, fifos, a sparse file, read-only files and
/// directories, and directory times that later entries must not change.
fn make_wide_tree(src: &Path) {
    use std::os::unix::fs::FileExt;
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    for d in 0..12 {
        let dir = src.join(format!("d{d:02}/sub"));
        fs::create_dir_all(&dir).expect("mkdir");
        for i in 0..15 {
            let n = rng.random_range(0..40_000);
            fs::write(dir.join(format!("f{i:02}")), random_bytes(&mut rng, n)).expect("write");
        }
        std::os::unix::fs::symlink(format!("sub/f{d:02}"), src.join(format!("d{d:02}/ln")))
            .expect("symlink");
    }
    // Hard links: the first file in d00, links in d05 and d11 (and one in
    // the same directory); an empty file linked from the far end.
    fs::write(src.join("d00/linked"), random_bytes(&mut rng, 150_000)).expect("write");
    fs::hard_link(src.join("d00/linked"), src.join("d00/linked-too")).expect("link");
    fs::hard_link(src.join("d00/linked"), src.join("d05/sub/link-a")).expect("link");
    fs::hard_link(src.join("d00/linked"), src.join("d11/link-b")).expect("link");
    fs::write(src.join("d01/empty"), b"").expect("write");
    fs::hard_link(src.join("d01/empty"), src.join("d10/sub/empty-link")).expect("link");
    mkfifo(&src.join("d03/fifo"));
    {
        let f = fs::File::create(src.join("d04/sparse")).expect("create");
        f.set_len(6 << 20).expect("set_len");
        f.write_all_at(&random_bytes(&mut rng, 30_000), 1 << 20)
            .expect("write");
        f.write_all_at(b"tail", (6 << 20) - 4).expect("write");
    }
    fs::set_permissions(src.join("d02/sub/f03"), fs::Permissions::from_mode(0o400)).expect("chmod");
    fs::set_permissions(src.join("d06/sub"), fs::Permissions::from_mode(0o555)).expect("chmod");
    fs::set_permissions(src.join("d07"), fs::Permissions::from_mode(0o750)).expect("chmod");
    for d in 0..12 {
        set_mtime(&src.join(format!("d{d:02}/sub")), 1_400_000_000, d);
        set_mtime(&src.join(format!("d{d:02}")), 1_400_000_100, d);
    }
}

async fn wide_repo(tmp: &Path) -> (Arc<dyn ObjectStore>, Repository, SnapshotId) {
    let src = tmp.join("src");
    make_wide_tree(&src);
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.join("repo")));
    let repo = init(store.clone(), 128 * 1024).await;
    let id = backup_id(&repo, &src).await;
    (store, repo, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_in_many_batches_equals_one_in_one_batch() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (_, repo, id) = wide_repo(tmp.path()).await;
    let src = tmp.path().join("src");

    let one = tmp.path().join("one");
    let whole = repo
        .restore_with(id, None, &one, None, limits(usize::MAX, usize::MAX))
        .await
        .expect("restore in one batch");
    assert_eq!(whole.batches, 1, "{whole:?}");
    assert_same_tree(&src, &one);

    for (files, chunks) in [(1, 1), (3, usize::MAX), (usize::MAX, 7), (10, 20)] {
        let dst = tmp.path().join(format!("many-{files}-{chunks}"));
        let r = repo
            .restore_with(id, None, &dst, None, limits(files, chunks))
            .await
            .expect("restore in batches");
        assert!(
            r.batches >= 10,
            "only {} batches ({files}, {chunks})",
            r.batches
        );
        assert_same_tree(&src, &dst);
        assert!(temporaries(&dst).is_empty(), "{:?}", temporaries(&dst));
        assert_eq!(
            (r.files, r.dirs, r.symlinks, r.hardlinks, r.specials),
            (
                whole.files,
                whole.dirs,
                whole.symlinks,
                whole.hardlinks,
                whole.specials
            ),
            "({files}, {chunks})"
        );
        assert_eq!(r.bytes_written, whole.bytes_written);
        assert_eq!(r.bytes_total, whole.bytes_total);
        assert!(r.packs_read >= whole.packs_read);
    }
    assert_eq!(whole.hardlinks, 4, "{whole:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subtree_restores_in_many_batches() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (_, repo, id) = wide_repo(tmp.path()).await;
    let src = tmp.path().join("src");
    let sub = tmp.path().join("sub");
    let r = repo
        .restore_with(id, Some("d05"), &sub, None, limits(2, 3))
        .await
        .expect("restore subtree");
    assert!(r.batches >= 5, "{r:?}");
    assert_same_subtree(&src.join("d05"), &sub);
    // Its link's first file is outside the subtree: the link comes back
    // as a file of its own.
    assert_eq!(
        fs::read(sub.join("sub/link-a")).expect("read"),
        fs::read(src.join("d00/linked")).expect("read")
    );
    let one = tmp.path().join("one");
    repo.restore_with(id, Some("d00/linked"), &one, None, limits(1, 1))
        .await
        .expect("restore one file");
    assert_eq!(
        fs::read(one.join("linked")).expect("read"),
        fs::read(src.join("d00/linked")).expect("read")
    );
}

/// A bad blob of a file in a later batch: the error names that file, the
/// files of the batches before are all there and complete, nothing is
/// left under a temporary name, and no file after it was created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_in_a_later_batch_removes_only_its_incomplete_files() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    for i in 0..20 {
        fs::write(
            src.join(format!("f{i:02}")),
            random_bytes(&mut rng, 200_000),
        )
        .expect("write");
    }
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    let repo = init(store.clone(), 128 * 1024).await;
    let id = backup_id(&repo, &src).await;

    // Corrupt the last chunk of f13 (the second file of the fourth batch
    // of four files).
    let index = repo.load_index().await.expect("index");
    let snap = repo.load_snapshot(id).await.expect("snapshot");
    let tree = repo.load_tree(&index, &snap.tree).await.expect("tree");
    let node = tree
        .nodes
        .iter()
        .find(|n| n.name == b"f13")
        .expect("f13 in the snapshot");
    let blob = *node.kind.data_blobs().last().expect("a chunk");
    let loc = index.get(&blob).expect("indexed");
    let key = ObjectKey::new(loc.pack.object_key()).expect("key");
    let mut data = store.get(&key).await.expect("get").to_vec();
    data[loc.entry.offset as usize + loc.entry.length as usize / 2] ^= 0x55;
    store.put(&key, Bytes::from(data)).await.expect("put");

    let dst = tmp.path().join("dst");
    let err = repo
        .restore_with(id, None, &dst, None, limits(4, usize::MAX))
        .await
        .expect_err("restore fails");
    let text = err.to_string();
    assert!(text.contains("f13"), "the file is named: {text}");
    assert!(temporaries(&dst).is_empty(), "{:?}", temporaries(&dst));
    let present: Vec<String> = fs::read_dir(&dst)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    for name in &present {
        assert!(
            fs::read(dst.join(name)).expect("read") == fs::read(src.join(name)).expect("read"),
            "{name} was left with wrong content"
        );
    }
    for i in 0..12 {
        let name = format!("f{i:02}");
        assert!(
            present.contains(&name),
            "{name} of an earlier batch is missing: {present:?}"
        );
    }
    assert!(!present.contains(&"f13".to_owned()), "{present:?}");
    for i in 16..20 {
        let name = format!("f{i:02}");
        assert!(
            !present.contains(&name),
            "{name} of a later batch exists: {present:?}"
        );
    }
}

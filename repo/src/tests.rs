//! Round-trip, incremental, hostile-snapshot, corruption, interruption and
//! prune tests of the repository against the local store.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use rand::{Rng, RngCore, SeedableRng};

use super::backup::BackupOptions;
use super::crypto::KdfParams;
use super::format::{BlobKind, ChunkerParams, DATA_PREFIX, INDEX_PREFIX};
use super::tree::{Node, NodeKind, Timestamp, Tree};
use super::verify::VerifyOptions;
use super::{RepoError, Repository};
use ferry_store::faulty::{Fault, FaultyStore, Op, Rule};
use ferry_store::{LocalStore, ObjectKey, ObjectStore, RetryPolicy, Retrying};
use tokio_util::sync::CancellationToken;

pub(crate) fn small_chunker() -> ChunkerParams {
    ChunkerParams {
        min_size: 4096,
        avg_size: 16384,
        max_size: 65536,
    }
}

pub(crate) fn cheap_kdf() -> KdfParams {
    KdfParams {
        memory_kib: 1024,
        iterations: 1,
        parallelism: 1,
    }
}

pub(crate) const PW: &[u8] = b"correct horse";

pub(crate) async fn init(store: Arc<dyn ObjectStore>, pack_size: u32) -> Repository {
    Repository::init_with(store, PW, "test", cheap_kdf(), small_chunker(), pack_size)
        .await
        .expect("init")
}

fn set_mtime(path: &Path, sec: i64, nsec: u32) {
    let t = rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("utimensat");
}

pub(crate) fn random_bytes(rng: &mut impl RngCore, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// Builds a tree with every supported file type.
pub(crate) fn make_tree(root: &Path, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root_user = rustix::process::geteuid().is_root();
    fs::create_dir_all(root.join("a/b/c")).expect("mkdir");
    fs::create_dir_all(root.join("empty-dir")).expect("mkdir");
    fs::write(root.join("empty"), b"").expect("write");
    fs::write(root.join("small.txt"), b"hello ferry\n").expect("write");
    fs::write(
        root.join("a/log.txt"),
        "line of a log file\n".repeat(20_000),
    )
    .expect("write");
    fs::write(root.join("a/b/noise.bin"), random_bytes(&mut rng, 700_000)).expect("write");
    // Duplicate content: deduplicated.
    let dup = random_bytes(&mut rng, 200_000);
    fs::write(root.join("a/dup1"), &dup).expect("write");
    fs::write(root.join("a/b/c/dup2"), &dup).expect("write");
    for i in 0..30 {
        let n = rng.random_range(0..5000);
        fs::write(
            root.join(format!("a/b/c/f{i:02}.json")),
            random_bytes(&mut rng, n),
        )
        .expect("write");
    }
    // Sparse: 4 MiB with data at two places.
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(root.join("sparse.img")).expect("create");
        f.set_len(4 << 20).expect("set_len");
        f.write_all_at(b"start", 0).expect("write");
        f.write_all_at(&random_bytes(&mut rng, 10_000), 3 << 20)
            .expect("write");
    }
    // Names that are not UTF-8 and contain spaces.
    fs::write(root.join(std::ffi::OsStr::new("with space")), b"x").expect("write");
    fs::write(
        root.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"bad\xffname")),
        b"y",
    )
    .expect("write");
    // Symlinks, one dangling.
    std::os::unix::fs::symlink("small.txt", root.join("link-to-small")).expect("symlink");
    std::os::unix::fs::symlink("/nonexistent/target", root.join("a/dangling")).expect("symlink");
    // Hard links.
    fs::write(root.join("a/hard1"), b"linked content").expect("write");
    fs::hard_link(root.join("a/hard1"), root.join("a/b/hard2")).expect("link");
    // Fifo.
    mkfifo(&root.join("a/fifo"));
    // Permissions, ownership, xattrs.
    fs::set_permissions(root.join("small.txt"), fs::Permissions::from_mode(0o640)).expect("chmod");
    fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o750)).expect("chmod");
    if root_user {
        std::os::unix::fs::chown(root.join("a/log.txt"), Some(1234), Some(5678)).expect("chown");
        std::os::unix::fs::lchown(root.join("link-to-small"), Some(42), Some(43)).expect("lchown");
        fs::write(root.join("setuid"), b"#!/bin/sh\n").expect("write");
        fs::set_permissions(root.join("setuid"), fs::Permissions::from_mode(0o4755))
            .expect("chmod");
    }
    let _ = rustix::fs::setxattr(
        root.join("small.txt"),
        "user.ferry.test",
        b"value\x00with nul",
        rustix::fs::XattrFlags::empty(),
    );
    let _ = rustix::fs::setxattr(
        root.join("a"),
        "user.dir",
        b"d",
        rustix::fs::XattrFlags::empty(),
    );
    // Nanosecond mtimes, set last (deepest first so parents keep theirs).
    set_mtime(&root.join("a/b/noise.bin"), 1_600_000_000, 123_456_789);
    set_mtime(&root.join("link-to-small"), 1_500_000_000, 987_654_321);
    set_mtime(&root.join("a/b/c"), 1_400_000_000, 5);
    set_mtime(&root.join("a/b"), 1_400_000_001, 6);
    set_mtime(&root.join("a"), 1_400_000_002, 7);
    // The directory itself: a whole restore gives its target these.
    fs::set_permissions(root, fs::Permissions::from_mode(0o750)).expect("chmod");
    if root_user {
        std::os::unix::fs::chown(root, Some(2345), Some(6789)).expect("chown");
    }
    set_mtime(root, 1_300_000_000, 8);
}

fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(p, &mut names[..]).unwrap_or(0);
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let mut v = vec![0u8; 4096];
        let name_os = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name);
        if let Ok(len) = rustix::fs::lgetxattr(p, name_os, &mut v[..]) {
            v.truncate(len);
            out.push((name.to_vec(), v));
        }
    }
    out.sort();
    out
}

/// Asserts that two trees are equal in content and metadata.
pub(crate) fn assert_same_tree(a: &Path, b: &Path) {
    let (ma, mb) = (
        fs::metadata(a).expect("stat"),
        fs::metadata(b).expect("stat"),
    );
    assert_eq!(
        (ma.mode(), ma.uid(), ma.gid()),
        (mb.mode(), mb.uid(), mb.gid()),
        "mode and owner of the restored directory itself"
    );
    assert_eq!(
        (ma.mtime(), ma.mtime_nsec()),
        (mb.mtime(), mb.mtime_nsec()),
        "mtime of the restored directory itself"
    );
    compare_dir(a, b, "", &mut HashMap::new(), &mut HashMap::new(), true);
}

/// Like [`assert_same_tree`] for a subtree, whose hard links to files
/// outside it cannot be restored.
pub(crate) fn assert_same_subtree(a: &Path, b: &Path) {
    compare_dir(a, b, "", &mut HashMap::new(), &mut HashMap::new(), false);
}

fn compare_dir(
    a: &Path,
    b: &Path,
    rel: &str,
    la: &mut HashMap<u64, String>,
    lb: &mut HashMap<u64, String>,
    links: bool,
) {
    let names = |p: &Path| {
        let mut v: Vec<_> = fs::read_dir(p)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        v.sort();
        v
    };
    let (na, nb) = (names(a), names(b));
    assert_eq!(na, nb, "entries of {rel}/ differ");
    for name in na {
        let (pa, pb) = (a.join(&name), b.join(&name));
        let r = format!("{rel}/{}", name.to_string_lossy());
        let (ma, mb) = (
            fs::symlink_metadata(&pa).expect("stat"),
            fs::symlink_metadata(&pb).expect("stat"),
        );
        assert_eq!(ma.file_type(), mb.file_type(), "type of {r}");
        assert_eq!(ma.uid(), mb.uid(), "uid of {r}");
        assert_eq!(ma.gid(), mb.gid(), "gid of {r}");
        assert_eq!(
            (ma.mtime(), ma.mtime_nsec()),
            (mb.mtime(), mb.mtime_nsec()),
            "mtime of {r}"
        );
        if !ma.file_type().is_symlink() {
            assert_eq!(ma.mode(), mb.mode(), "mode of {r}");
            assert_eq!(xattrs(&pa), xattrs(&pb), "xattrs of {r}");
        }
        if ma.is_file() {
            assert_eq!(ma.len(), mb.len(), "size of {r}");
            assert!(
                fs::read(&pa).expect("read") == fs::read(&pb).expect("read"),
                "content of {r}"
            );
            if links && ma.nlink() > 1 {
                let first_a = la.entry(ma.ino()).or_insert_with(|| r.clone()).clone();
                let first_b = lb.entry(mb.ino()).or_insert_with(|| r.clone()).clone();
                assert_eq!(first_a, first_b, "hard link group of {r}");
                assert_eq!(ma.nlink(), mb.nlink(), "link count of {r}");
            }
            // Holes stay holes.
            if ma.blocks() * 512 < ma.len() / 2 {
                assert!(
                    mb.blocks() * 512 < mb.len() / 2,
                    "{r} lost its holes ({} blocks)",
                    mb.blocks()
                );
            }
        } else if ma.file_type().is_symlink() {
            assert_eq!(
                fs::read_link(&pa).ok(),
                fs::read_link(&pb).ok(),
                "target of {r}"
            );
        } else if ma.is_dir() {
            compare_dir(&pa, &pb, &r, la, lb, links);
        }
    }
}

/// A fifo with mode 0640.
pub(crate) fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .expect("mkfifo");
}

/// Backs `src` up with [`backup_opts`] and returns the snapshot's id.
pub(crate) async fn backup_id(repo: &Repository, src: &Path) -> super::format::SnapshotId {
    repo.backup(src, backup_opts(), None)
        .await
        .expect("backup")
        .id
        .expect("id")
}

pub(crate) fn backup_opts() -> BackupOptions {
    BackupOptions {
        tags: BTreeMap::from([("app".to_owned(), "test".to_owned())]),
        host: Some("host-a".into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_every_file_type_and_subtree() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    make_tree(&src, 1);
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    let repo = init(store.clone(), 256 * 1024).await;
    let out = repo
        .backup(&src, backup_opts(), None)
        .await
        .expect("backup");
    let id = out.id.expect("committed");
    let s = &out.snapshot.summary;
    assert!(
        s.packs_written >= 2,
        "expected several packs, got {}",
        s.packs_written
    );
    assert!(
        s.bytes_stored < s.bytes_read,
        "compression/dedup saved nothing: {s:?}"
    );

    // Re-open with the password and restore everything.
    let repo = Repository::open(store.clone(), PW).await.expect("open");
    let dst = tmp.path().join("dst");
    let r = repo.restore(id, None, &dst, None).await.expect("restore");
    assert!(r.hardlinks >= 1 && r.symlinks >= 2, "{r:?}");
    assert_same_tree(&src, &dst);

    // A subtree, and a single file.
    let sub = tmp.path().join("sub");
    repo.restore(id, Some("a/b"), &sub, None)
        .await
        .expect("restore subtree");
    assert_same_subtree(&src.join("a/b"), &sub);
    let one = tmp.path().join("one");
    repo.restore(id, Some("a/log.txt"), &one, None)
        .await
        .expect("restore file");
    assert_eq!(
        fs::read(one.join("log.txt")).expect("read"),
        fs::read(src.join("a/log.txt")).expect("read")
    );

    // A non-empty target is refused and left alone.
    let err = repo
        .restore(id, None, &dst, None)
        .await
        .expect_err("non-empty target");
    assert!(err.to_string().contains("not empty"), "{err}");

    let report = repo
        .verify(VerifyOptions {
            snapshot: None,
            read_data_percent: Some(100),
        })
        .await
        .expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.packs_read, report.packs);
}

/// Files are created by whichever data worker reaches them first and get
/// their metadata from the one writing their last chunk: read-only files
/// spread over many packs, sparse tails, all-zero files, empty files with
/// hard links and many small files across directories all come back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_fills_files_spread_over_packs_and_workers() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for d in 0..8 {
        fs::create_dir_all(src.join(format!("d{d}/inner"))).expect("mkdir");
        for i in 0..40 {
            let n = rng.random_range(1..3000);
            fs::write(
                src.join(format!("d{d}/inner/f{i}.txt")),
                random_bytes(&mut rng, n),
            )
            .expect("write");
        }
    }
    fs::write(src.join("d0/big.ro"), random_bytes(&mut rng, 1 << 20)).expect("write");
    fs::set_permissions(src.join("d0/big.ro"), fs::Permissions::from_mode(0o400)).expect("chmod");
    {
        let f = fs::File::create(src.join("d1/tail-hole")).expect("create");
        f.write_all_at(&random_bytes(&mut rng, 50_000), 0)
            .expect("write");
        f.set_len(3 << 20).expect("set_len");
    }
    fs::write(src.join("d2/zeros"), vec![0u8; 20_000]).expect("write");
    fs::write(src.join("d3/empty.ro"), b"").expect("write");
    fs::hard_link(src.join("d3/empty.ro"), src.join("d4/empty-link")).expect("link");
    fs::set_permissions(src.join("d3/empty.ro"), fs::Permissions::from_mode(0o444)).expect("chmod");
    set_mtime(&src.join("d0/big.ro"), 1_600_000_000, 1);
    set_mtime(&src.join("d3/empty.ro"), 1_500_000_000, 2);
    for d in 0..8 {
        set_mtime(&src.join(format!("d{d}/inner")), 1_400_000_000, d);
        set_mtime(&src.join(format!("d{d}")), 1_400_000_100, d);
    }

    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    let repo = init(store, 64 * 1024).await;
    let out = repo
        .backup(&src, backup_opts(), None)
        .await
        .expect("backup");
    let id = out.id.expect("committed");
    assert!(
        out.snapshot.summary.packs_written >= 8,
        "expected many packs, got {}",
        out.snapshot.summary.packs_written
    );
    let dst = tmp.path().join("dst");
    let r = repo.restore(id, None, &dst, None).await.expect("restore");
    assert_eq!(r.files, 8 * 40 + 4, "{r:?}");
    assert_eq!(r.hardlinks, 1, "{r:?}");
    assert!(r.packs_read >= 8, "{r:?}");
    assert_same_tree(&src, &dst);
    // The all-zero file was written densely, so it is restored densely.
    let zeros = fs::metadata(dst.join("d2/zeros")).expect("stat");
    assert_eq!(zeros.len(), 20_000);
    assert!(zeros.blocks() * 512 >= 20_000, "dense zeros became a hole");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_backup_reads_only_changes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    make_tree(&src, 2);
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    let repo = init(store.clone(), 1 << 20).await;
    let last = Arc::new(std::sync::Mutex::new(None));
    let seen = last.clone();
    let progress: Arc<dyn super::backup::Progress> =
        Arc::new(move |p: &super::backup::ProgressInfo| {
            *seen.lock().expect("lock") = Some(*p);
        });
    let first = repo
        .backup(&src, backup_opts(), Some(progress))
        .await
        .expect("backup");
    let p = last.lock().expect("lock").expect("progress was reported");
    assert_eq!(p.files, first.snapshot.summary.files);
    assert_eq!(p.bytes, first.snapshot.summary.bytes_read);

    // No change: nothing read, nothing new, same root tree.
    let second = repo
        .backup(&src, backup_opts(), None)
        .await
        .expect("backup");
    assert_eq!(second.snapshot.parent, first.id);
    assert_eq!(second.snapshot.summary.bytes_read, 0);
    assert_eq!(second.snapshot.summary.bytes_new, 0);
    assert_eq!(second.snapshot.summary.packs_written, 0);
    assert_eq!(second.snapshot.tree, first.snapshot.tree);

    // Change one file: only it is read. A new extended attribute on an
    // unchanged file (same size and mtime, new ctime) is recorded too.
    fs::write(src.join("a/b/c/f00.json"), b"changed").expect("write");
    rustix::fs::setxattr(
        src.join("small.txt"),
        "user.ferry.later",
        b"set after the first backup",
        rustix::fs::XattrFlags::empty(),
    )
    .expect("user xattrs on the test filesystem");
    let third = repo
        .backup(&src, backup_opts(), None)
        .await
        .expect("backup");
    // Its new ctime has the small file read again, with the changed one.
    let small = fs::metadata(src.join("small.txt")).expect("stat").len();
    assert_eq!(third.snapshot.summary.bytes_read, 7 + small);
    assert_ne!(third.snapshot.tree, first.snapshot.tree);

    // Another tag set has no parent and reads everything, storing nothing new.
    let mut other = backup_opts();
    other.tags.insert("volume".into(), "x".into());
    let fourth = repo.backup(&src, other, None).await.expect("backup");
    assert_eq!(fourth.snapshot.parent, None);
    assert!(fourth.snapshot.summary.bytes_read > 1_000_000);
    assert_eq!(fourth.snapshot.summary.bytes_new, 0);

    // The restore carries the attribute set after the first backup.
    let dst = tmp.path().join("dst");
    repo.restore(third.id.expect("id"), None, &dst, None)
        .await
        .expect("restore");
    assert_same_tree(&src, &dst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_first_copies_the_files_before_storing_and_the_source_may_change_then() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    make_tree(&src, 9);
    // 96 MiB to store: more than the pipeline holds between the readers
    // and the uploads, so reading could not end while uploads wait; one
    // file large enough to be copied by several threads.
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for i in 0..5 {
        let n = if i == 0 { (64 << 20) + 4096 } else { 8 << 20 };
        fs::write(src.join(format!("big{i}")), random_bytes(&mut rng, n)).expect("write");
    }
    let expected = tmp.path().join("expected");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&expected)
        .status()
        .expect("cp");
    assert!(cp.success());

    let faulty = Arc::new(FaultyStore::new(
        Arc::new(LocalStore::new(tmp.path().join("repo"))),
        1,
    ));
    let repo = init(faulty.clone(), 1 << 20).await;
    // The first four pack uploads wait 5 s (two run at once): nothing is
    // stored meanwhile. (One `nth` rule per upload held only the first:
    // the second rule had not yet counted the first call, still held, when
    // the second arrived.)
    faulty.inject(
        Rule::new(Fault::Delay(std::time::Duration::from_secs(5)))
            .op(Op::Put)
            .prefix(DATA_PREFIX)
            .first(4),
    );
    let read = Arc::new(tokio::sync::Notify::new());
    let opts = BackupOptions {
        read_ahead: Some(256 << 20),
        read_done: Some(read.clone()),
        ..backup_opts()
    };
    let backup = {
        let (repo, src) = (repo.clone(), src.clone());
        tokio::spawn(async move { repo.backup(&src, opts, None).await })
    };
    tokio::time::timeout(std::time::Duration::from_secs(4), read.notified())
        .await
        .expect("read_done before any pack is stored");
    let stored = faulty.inner().list(DATA_PREFIX).await.expect("list");
    assert!(
        stored.is_empty(),
        "{} packs stored before read_done",
        stored.len()
    );
    // The source changes once read: the backup has what it read.
    for i in 0..5 {
        fs::write(src.join(format!("big{i}")), b"changed").expect("write");
    }
    fs::remove_file(src.join("small.txt")).expect("rm");
    fs::write(src.join("a/new"), b"new").expect("write");
    let out = backup.await.expect("join").expect("backup");
    assert!(
        out.snapshot.summary.bytes_new > 40 << 20,
        "{:?}",
        out.snapshot.summary
    );
    let dst = tmp.path().join("dst");
    repo.restore(out.id.expect("committed"), None, &dst, None)
        .await
        .expect("restore");
    assert_same_tree(&expected, &dst);

    // A budget smaller than the big files: those are read the usual way,
    // the others copied; the same tree.
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo2")));
    let repo = init(store, 1 << 20).await;
    let opts = BackupOptions {
        read_ahead: Some(1 << 20),
        ..backup_opts()
    };
    let out = repo.backup(&expected, opts, None).await.expect("backup");
    let dst = tmp.path().join("dst2");
    repo.restore(out.id.expect("committed"), None, &dst, None)
        .await
        .expect("restore");
    assert_same_tree(&expected, &dst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_stores_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    make_tree(&src, 3);
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    let repo = init(store.clone(), 1 << 20).await;
    let mut o = backup_opts();
    o.dry_run = true;
    let out = repo.backup(&src, o, None).await.expect("dry run");
    assert!(out.id.is_none());
    assert!(out.snapshot.summary.bytes_read > 1_000_000);
    assert!(out.snapshot.summary.bytes_stored > 0);
    assert!(store.list(DATA_PREFIX).await.expect("list").is_empty());
    assert!(store.list("snapshots/").await.expect("list").is_empty());
    assert!(store.list("locks/").await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_key_rotation() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    let repo = init(store.clone(), 1 << 20).await;
    let err = Repository::open(store.clone(), b"wrong")
        .await
        .expect_err("wrong password");
    assert!(matches!(err, RepoError::WrongPassword), "{err}");
    assert!(err.to_string().contains("wrong password"));
    assert!(matches!(
        Repository::init_with(
            store.clone(),
            PW,
            "x",
            cheap_kdf(),
            small_chunker(),
            1 << 20
        )
        .await,
        Err(RepoError::AlreadyInitialized)
    ));

    let src = tmp.path().join("src");
    make_tree(&src, 4);
    let id = backup_id(&repo, &src).await;
    let data_before = store.list(DATA_PREFIX).await.expect("list");

    // Rotate: add a new key, open with it, remove the old one.
    let new_id = repo
        .add_key_with(b"new password", "rotated", cheap_kdf())
        .await
        .expect("add");
    let repo2 = Repository::open(store.clone(), b"new password")
        .await
        .expect("open new");
    assert_eq!(repo2.key_id(), new_id);
    assert!(
        repo2.remove_key(&new_id.to_hex()).await.is_err(),
        "removed the key in use"
    );
    repo2
        .remove_key(&repo.key_id().to_hex())
        .await
        .expect("remove old");
    assert!(matches!(
        Repository::open(store.clone(), PW).await,
        Err(RepoError::WrongPassword)
    ));
    assert_eq!(
        store.list(DATA_PREFIX).await.expect("list"),
        data_before,
        "data was rewritten"
    );
    let dst = tmp.path().join("dst");
    repo2
        .restore(id, None, &dst, None)
        .await
        .expect("restore with rotated key");
    assert_same_tree(&src, &dst);
    assert!(matches!(
        Repository::open(Arc::new(LocalStore::new(tmp.path().join("nothing"))), PW).await,
        Err(RepoError::NotARepository)
    ));
}

/// Writes a hand-made tree/snapshot through the library.
async fn hostile_snapshot(repo: &Repository, nodes: Vec<Node>) -> super::format::SnapshotId {
    use super::pack::{BlobEncoder, PackBuilder};
    let file_data = b"evil".to_vec();
    let file_id = repo.key().blob_id(&file_data);
    let tree = Tree { nodes };
    let enc_tree = tree.encode();
    let tree_id = repo.key().blob_id(&enc_tree);
    let mut enc = BlobEncoder::new(1).expect("zstd");
    let mut pb = PackBuilder::with_capacity(1024);
    pb.add(&mut enc, repo.key(), file_id, BlobKind::Data, &file_data);
    pb.add(&mut enc, repo.key(), tree_id, BlobKind::Tree, &enc_tree);
    let p = pb.finish(repo.key());
    repo.store()
        .put(
            &ObjectKey::new(p.id.object_key()).expect("key"),
            Bytes::from(p.data),
        )
        .await
        .expect("put");
    repo.write_index(vec![super::index::IndexedPack {
        id: p.id,
        blobs: p.entries,
    }])
    .await
    .expect("index");
    repo.save_snapshot(&super::snapshot::Snapshot {
        version: 1,
        time: "2024-01-01T00:00:00Z".into(),
        time_unix: 0,
        host: "evil".into(),
        path: "/".into(),
        tags: BTreeMap::new(),
        parent: None,
        tree: tree_id,
        root: None,
        summary: Default::default(),
    })
    .await
    .expect("snapshot")
}

fn node(name: &[u8], kind: NodeKind) -> Node {
    Node {
        name: name.to_vec(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: Timestamp::default(),
        ctime: Timestamp::default(),
        inode: 1,
        dev: 1,
        size: 4,
        xattrs: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_snapshots_cannot_escape_the_target() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    let repo = init(store.clone(), 1 << 20).await;
    let file = |name: &[u8]| {
        node(
            name,
            NodeKind::File {
                content: vec![repo.key().blob_id(b"evil")],
                hardlink: None,
            },
        )
    };
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).expect("mkdir");
    let cases: Vec<(&str, Vec<Node>)> = vec![
        ("dotdot", vec![file(b"..")]),
        ("slash", vec![file(b"../../outside/pwned")]),
        ("absolute", vec![file(b"/tmp/pwned")]),
        ("empty", vec![file(b"")]),
        // A symlink to outside, then a file of the same name: the file
        // must not be written through the link.
        (
            "symlink-then-file",
            vec![
                node(
                    b"x",
                    NodeKind::Symlink {
                        target: outside.join("pwned").into_os_string().into_encoded_bytes(),
                    },
                ),
                file(b"x"),
            ],
        ),
        // A symlink to outside, then a directory of the same name.
        (
            "symlink-then-dir",
            vec![
                node(
                    b"d",
                    NodeKind::Symlink {
                        target: outside.clone().into_os_string().into_encoded_bytes(),
                    },
                ),
                node(
                    b"d",
                    NodeKind::Dir {
                        subtree: repo.key().blob_id(&Tree { nodes: vec![] }.encode()),
                    },
                ),
            ],
        ),
    ];
    for (name, nodes) in cases {
        let id = hostile_snapshot(&repo, nodes).await;
        let target = tmp.path().join(format!("t-{name}"));
        let err = repo.restore(id, None, &target, None).await.expect_err(name);
        assert!(
            matches!(err, RepoError::UnsafeEntry { .. } | RepoError::Io { .. }),
            "{name}: unexpected error {err}"
        );
        assert_eq!(
            fs::read_dir(&outside).expect("read").count(),
            0,
            "{name} wrote outside the target"
        );
    }
    assert!(!Path::new("/tmp/pwned").exists());
}

/// Retries that give up within seconds, for tests.
pub(crate) fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        first_delay: std::time::Duration::from_millis(5),
        max_delay: std::time::Duration::from_millis(50),
        deadline: std::time::Duration::from_secs(10),
    }
}

/// Waits until `cond` holds, failing the test after `secs` seconds.
pub(crate) async fn wait_until<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A backup prepared beforehand (a cold backup's delta pass, while the app
/// is down) reads nothing from the storage: with every read failing it
/// still walks the tree, identical directories at several depths included,
/// and stores the same tree an unprepared backup stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_backup_reads_nothing_from_the_storage() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    for d in [
        "a/empty",
        "b/empty",
        "c/x/empty",
        "d/x/empty",
        "e/deep/er/empty",
        "f/empty1",
        "f/empty2",
        "f/empty3",
    ] {
        fs::create_dir_all(src.join(d)).expect("mkdir");
    }
    for (f, body) in [
        ("a/one", "1"),
        ("c/x/two", "2"),
        ("d/x/two", "2"),
        ("top", "t"),
    ] {
        fs::write(src.join(f), body).expect("write");
    }
    let store = faulty(Arc::new(LocalStore::new(tmp.path().join("repo"))));
    let repo = init(store.clone(), 1 << 20).await;
    let first = repo
        .backup(&src, backup_opts(), None)
        .await
        .expect("first backup");
    fs::write(src.join("a/one"), "changed").expect("write");
    let parent = first.id.expect("id");
    let opts = BackupOptions {
        parent: Some(parent),
        ..backup_opts()
    };
    let prepared = repo.prepare_backup(&src, &opts).await.expect("prepared");
    let lock = repo
        .lock_shared("backup", repo.cancel_token().clone())
        .await
        .expect("lock");
    for op in [Op::Get, Op::GetRange, Op::List, Op::Size] {
        store.inject(Rule::new(Fault::Permanent).op(op));
    }
    let prepared_run = repo
        .backup_under(
            &lock,
            &src,
            BackupOptions {
                prepared: Some(Arc::new(prepared)),
                ..opts.clone()
            },
            None,
        )
        .await
        .expect("a prepared backup needs no read");
    store.recover();
    lock.release().await;
    let plain = repo.backup(&src, opts, None).await.expect("plain backup");
    assert_eq!(prepared_run.snapshot.tree, plain.snapshot.tree);
    assert_eq!(prepared_run.snapshot.parent, Some(parent));
}

pub(crate) fn faulty(inner: Arc<dyn ObjectStore>) -> Arc<FaultyStore> {
    Arc::new(FaultyStore::new(inner, 17))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_backup_resumes_uploading_only_what_is_missing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    fs::create_dir(&src).expect("mkdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for i in 0..8 {
        fs::write(src.join(format!("f{i}")), random_bytes(&mut rng, 1 << 20)).expect("write");
    }
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    let repo = init(local.clone(), 512 * 1024).await;
    let store = faulty(local.clone());
    let crashing = Repository::open(store.clone(), PW).await.expect("open");
    // The lock, then six packs, then the process "dies".
    store.crash_after_puts(7);
    let err = crashing
        .backup(&src, backup_opts(), None)
        .await
        .expect_err("crash");
    assert!(store.crashed());
    assert!(!err.to_string().is_empty());
    assert!(
        local.list("snapshots/").await.expect("list").is_empty(),
        "no commit point may exist"
    );
    let left = local.list(DATA_PREFIX).await.expect("list");
    assert_eq!(left.len(), 6, "packs left by the interrupted run");
    // A torn pack (a truncated non-atomic write) is ignored, not trusted.
    let torn = ObjectKey::new(format!("{DATA_PREFIX}00/{}", "00".repeat(32))).expect("key");
    local
        .put(&torn, Bytes::from_static(b"torn"))
        .await
        .expect("put");
    store.recover();

    let out = crashing
        .backup(&src, backup_opts(), None)
        .await
        .expect("resume");
    let s = &out.snapshot.summary;
    let left_bytes: u64 = left.iter().map(|o| o.size).sum();
    assert!(s.bytes_read >= 8 << 20);
    // Everything the first run stored is reused: the new packs hold only
    // the remainder.
    let total_plain = 8u64 << 20;
    assert!(
        s.bytes_new <= total_plain - left_bytes * 9 / 10,
        "resumed run re-uploaded data: new {} bytes, {} bytes were already stored",
        s.bytes_new,
        left_bytes
    );
    assert!(s.bytes_stored < total_plain - left_bytes * 9 / 10);
    assert_eq!(
        local.list(DATA_PREFIX).await.expect("list").len() as u64,
        7 + s.packs_written,
        "packs after resume"
    );
    let dst = tmp.path().join("dst");
    repo.restore(out.id.expect("id"), None, &dst, None)
        .await
        .expect("restore");
    assert_same_tree(&src, &dst);
    // Prune later removes the torn object (it is in no index) — once the
    // crashed run's lock is gone (it expires; removed here by hand).
    let r = repo.prune(std::time::Duration::ZERO).await.expect("mark");
    assert_eq!(r.packs_newly_marked, 1, "{r:?}");
    let r = repo
        .prune(std::time::Duration::ZERO)
        .await
        .expect("deferred");
    assert!(r.deferred_by_backup && r.packs_deleted == 0, "{r:?}");
    let locks = local.list("locks/").await.expect("list");
    assert_eq!(locks.len(), 1, "the crashed backup's lock");
    local.delete(&locks[0].key).await.expect("delete lock");
    let r = repo.prune(std::time::Duration::ZERO).await.expect("delete");
    assert_eq!(r.packs_deleted, 1, "{r:?}");
    assert!(local.size(&torn).await.expect("size").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_and_torn_writes_are_retried() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    make_tree(&src, 12);
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    init(local.clone(), 256 * 1024).await;
    let store = faulty(local.clone());
    let retrying: Arc<dyn ObjectStore> = Arc::new(Retrying::new(store.clone(), fast_retry()));
    let repo = Repository::open(retrying, PW).await.expect("open");
    store.inject(
        Rule::new(Fault::TornWrite)
            .op(Op::Put)
            .prefix(DATA_PREFIX)
            .nth(2),
    );
    store.inject(Rule::new(Fault::Transient).op(Op::Put).nth(5));
    store.inject(
        Rule::new(Fault::Transient)
            .op(Op::GetRange)
            .probability(0.2),
    );
    store.inject(
        Rule::new(Fault::Delay(std::time::Duration::from_millis(5)))
            .op(Op::Put)
            .probability(0.5),
    );
    let id = backup_id(&repo, &src).await;
    let dst = tmp.path().join("dst");
    repo.restore(id, None, &dst, None).await.expect("restore");
    assert!(
        store.injected() >= 3,
        "faults injected: {}",
        store.injected()
    );
    assert_same_tree(&src, &dst);
    store.recover();
    let report = repo
        .verify(VerifyOptions {
            snapshot: None,
            read_data_percent: Some(100),
        })
        .await
        .expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_storage_errors_fail_the_backup_and_name_the_object() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    make_tree(&src, 13);
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    init(local.clone(), 256 * 1024).await;
    let store = faulty(local.clone());
    let repo = Repository::open(store.clone(), PW).await.expect("open");
    store.inject(
        Rule::new(Fault::Permanent)
            .op(Op::Put)
            .prefix(DATA_PREFIX)
            .nth(1),
    );
    let err = repo
        .backup(&src, backup_opts(), None)
        .await
        .expect_err("backup fails");
    assert!(err.to_string().contains(DATA_PREFIX), "{err}");
    assert!(!err.is_transient());
    assert!(local.list("snapshots/").await.expect("list").is_empty());
}

async fn corrupt_first(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    how: fn(&mut Vec<u8>),
) -> String {
    let objs = store.list(prefix).await.expect("list");
    let o = objs.iter().max_by_key(|o| o.size).expect("an object");
    let mut data = store.get(&o.key).await.expect("get").to_vec();
    how(&mut data);
    store.put(&o.key, Bytes::from(data)).await.expect("put");
    o.key.as_str().rsplit('/').next().expect("id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_pack_fails_verify_and_restore_naming_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    make_tree(&src, 5);
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    let repo = init(store.clone(), 1 << 20).await;
    let id = backup_id(&repo, &src).await;
    let pack = corrupt_first(&store, DATA_PREFIX, |d| d[100] ^= 0x55).await;

    let report = repo
        .verify(VerifyOptions {
            snapshot: None,
            read_data_percent: Some(100),
        })
        .await
        .expect("verify runs");
    assert!(!report.problems.is_empty());
    assert!(
        report.problems.iter().any(|p| p.contains(&pack)),
        "{:?}",
        report.problems
    );
    let err = report.into_result().expect_err("verify fails");
    assert!(err.to_string().contains(&pack));

    let dst = tmp.path().join("dst");
    let err = repo
        .restore(id, None, &dst, None)
        .await
        .expect_err("restore fails");
    assert!(err.to_string().contains(&pack), "{err}");

    // A missing pack is named by the structural check alone.
    let key = ObjectKey::new(format!("{DATA_PREFIX}{}/{}", &pack[..2], pack)).expect("key");
    store.delete(&key).await.expect("delete");
    let report = repo.verify(VerifyOptions::default()).await.expect("verify");
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains(&pack) && p.contains("missing")),
        "{:?}",
        report.problems
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_or_garbage_index_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    make_tree(&src, 6);
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    let repo = init(store.clone(), 1 << 20).await;
    let id = backup_id(&repo, &src).await;
    let idx = corrupt_first(&store, INDEX_PREFIX, |d| d.truncate(d.len() / 2)).await;
    let report = repo.verify(VerifyOptions::default()).await.expect("verify");
    assert!(
        report.problems.iter().any(|p| p.contains(&idx)),
        "{:?}",
        report.problems
    );
    let err = repo
        .restore(id, None, &tmp.path().join("dst"), None)
        .await
        .expect_err("restore");
    assert!(err.to_string().contains(&idx), "{err}");
    // Garbage snapshot manifests are refused by name too.
    let snap = corrupt_first(&store, "snapshots/", |d| d.iter_mut().for_each(|b| *b = 7)).await;
    let scan = repo.scan_snapshots().await.expect("scan");
    assert!(
        scan.unreadable
            .iter()
            .any(|(id, e)| id.to_hex() == snap && e.to_string().contains(&snap)),
        "{:?}",
        scan.unreadable
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_marks_then_deletes_after_delay_and_respects_lock() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    let repo = init(store.clone(), 256 * 1024).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    fs::create_dir_all(&a).expect("mkdir");
    fs::create_dir_all(&b).expect("mkdir");
    fs::write(a.join("keep"), random_bytes(&mut rng, 600_000)).expect("write");
    fs::write(b.join("drop"), random_bytes(&mut rng, 900_000)).expect("write");
    let sa = repo
        .backup(&a, backup_opts(), None)
        .await
        .expect("a")
        .id
        .expect("id");
    let sb = repo
        .backup(&b, backup_opts(), None)
        .await
        .expect("b")
        .id
        .expect("id");
    let packs_before = store.list(DATA_PREFIX).await.expect("list").len();

    // Nothing unreferenced yet.
    let r = repo.prune(std::time::Duration::ZERO).await.expect("prune");
    assert_eq!((r.packs_newly_marked, r.packs_deleted), (0, 0), "{r:?}");

    repo.forget(&[sb]).await.expect("forget");
    // First pass marks, deletes nothing even with a zero delay.
    let r = repo
        .prune(std::time::Duration::from_secs(3600))
        .await
        .expect("prune");
    assert!(r.packs_newly_marked >= 1, "{r:?}");
    assert_eq!(r.packs_deleted, 0);
    assert_eq!(
        store.list(DATA_PREFIX).await.expect("list").len(),
        packs_before
    );
    // Within the safety delay: still kept.
    let r = repo
        .prune(std::time::Duration::from_secs(3600))
        .await
        .expect("prune");
    assert_eq!(r.packs_deleted, 0);
    assert!(r.packs_marked_waiting >= 1);

    // A live backup lock defers deletion.
    let lock = repo
        .lock_shared("backup", CancellationToken::new())
        .await
        .expect("lock");
    let r = repo.prune(std::time::Duration::ZERO).await.expect("prune");
    assert!(r.deferred_by_backup && r.packs_deleted == 0, "{r:?}");
    // A second maintenance owner is refused.
    let m = repo
        .lock_maintenance(CancellationToken::new())
        .await
        .expect("maintenance");
    assert!(matches!(
        repo.prune(std::time::Duration::ZERO).await,
        Err(RepoError::Locked { .. })
    ));
    // And a backup may not start while maintenance runs.
    assert!(matches!(
        repo.backup(&a, backup_opts(), None).await,
        Err(RepoError::Locked { .. })
    ));
    m.release().await;
    lock.release().await;

    let r = repo.prune(std::time::Duration::ZERO).await.expect("prune");
    assert!(r.packs_deleted >= 1, "{r:?}");
    assert!(store.list("marks/").await.expect("list").is_empty());
    assert_eq!(
        store.list(DATA_PREFIX).await.expect("list").len(),
        packs_before - r.packs_deleted
    );
    // The remaining snapshot is intact.
    let report = repo
        .verify(VerifyOptions {
            snapshot: None,
            read_data_percent: Some(100),
        })
        .await
        .expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let dst = tmp.path().join("dst");
    repo.restore(sa, None, &dst, None).await.expect("restore");
    assert_same_tree(&a, &dst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_does_not_reuse_blobs_of_marked_packs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    let repo = init(store.clone(), 1 << 20).await;
    let src = tmp.path().join("src");
    fs::create_dir(&src).expect("mkdir");
    fs::write(src.join("f"), random_bytes(&mut rand::rng(), 300_000)).expect("write");
    let s1 = repo
        .backup(&src, backup_opts(), None)
        .await
        .expect("b1")
        .id
        .expect("id");
    repo.forget(&[s1]).await.expect("forget");
    let r = repo
        .prune(std::time::Duration::from_secs(3600))
        .await
        .expect("mark");
    assert!(r.packs_newly_marked >= 1);
    // The same data again: stored anew, so deleting the marked packs later
    // cannot break the new snapshot.
    let out = repo.backup(&src, backup_opts(), None).await.expect("b2");
    assert!(
        out.snapshot.summary.bytes_new >= 300_000,
        "{:?}",
        out.snapshot.summary
    );
    let r = repo.prune(std::time::Duration::ZERO).await.expect("prune");
    assert!(r.packs_deleted >= 1, "{r:?}");
    let dst = tmp.path().join("dst");
    repo.restore(out.id.expect("id"), None, &dst, None)
        .await
        .expect("restore");
    assert_same_tree(&src, &dst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_through_s3_on_seaweedfs() {
    let weed = ferry_store::testing::seaweed().await;
    let store = weed.store("ferry/repo").await;
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    make_tree(&src, 21);
    let repo = init(store.clone(), 256 * 1024).await;
    let first = repo
        .backup(&src, backup_opts(), None)
        .await
        .expect("backup");
    assert!(first.snapshot.summary.packs_written >= 2);
    fs::write(src.join("a/b/c/f01.json"), b"changed over s3").expect("write");
    let second = repo
        .backup(&src, backup_opts(), None)
        .await
        .expect("incremental");
    assert_eq!(second.snapshot.parent, first.id);
    assert_eq!(second.snapshot.summary.bytes_read, 15);

    let repo = Repository::open(store.clone(), PW)
        .await
        .expect("open over s3");
    let dst = tmp.path().join("dst");
    repo.restore(second.id.expect("id"), None, &dst, None)
        .await
        .expect("restore");
    assert_same_tree(&src, &dst);
    let report = repo
        .verify(VerifyOptions {
            snapshot: None,
            read_data_percent: Some(100),
        })
        .await
        .expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    repo.forget(&[first.id.expect("id")]).await.expect("forget");
    repo.prune(std::time::Duration::ZERO).await.expect("mark");
    let r = repo.prune(std::time::Duration::ZERO).await.expect("prune");
    // The old snapshot's few unique blobs either share packs with live data
    // (kept whole) or fill packs of their own (deleted); nothing else goes.
    assert!(r.packs_partly_referenced + r.packs_deleted >= 1, "{r:?}");
    assert_eq!(r.packs_referenced + r.packs_deleted, r.packs_total, "{r:?}");
    let dst2 = tmp.path().join("dst2");
    repo.restore(second.id.expect("id"), None, &dst2, None)
        .await
        .expect("restore after prune");
    assert_same_tree(&src, &dst2);
}

mod batches;
mod cancel;
mod defects;
mod locks;

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 8, .. ProptestConfig::default() })]
        /// Random trees of files with random sizes and contents survive a
        /// round trip byte for byte, whatever the restore's batch limits.
        #[test]
        fn random_trees_round_trip(files in proptest::collection::vec((0u8..4, 0usize..200_000, any::<u64>()), 1..20), batch in (1usize..30, 1usize..60)) {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
            rt.block_on(async {
                let tmp = tempfile::tempdir().expect("tmp");
                let src = tmp.path().join("src");
                for (i, (dir, size, seed)) in files.iter().enumerate() {
                    let d = src.join(format!("d{dir}"));
                    fs::create_dir_all(&d).expect("mkdir");
                    let mut rng = rand::rngs::StdRng::seed_from_u64(*seed);
                    // Mix compressible and random content.
                    let data: Vec<u8> = if seed % 2 == 0 { random_bytes(&mut rng, *size) } else { (0..*size).map(|j| (j % 7) as u8).collect() };
                    fs::write(d.join(format!("f{i}")), data).expect("write");
                }
                let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
                let repo = init(store, 128 * 1024).await;
                let id = backup_id(&repo, &src).await;
                let dst = tmp.path().join("dst");
                let opts = crate::restore::RestoreOptions {
                    batch: crate::restore::BatchLimits { files: batch.0, chunks: batch.1 },
                };
                repo.restore_with(id, None, &dst, None, opts).await.expect("restore");
                assert_same_tree(&src, &dst);
            });
        }
    }
}

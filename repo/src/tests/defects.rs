//! Defects found by running the data mover on real trees, each with the
//! test that showed it.

use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;

use super::*;
use crate::snapshot::Snapshot;

async fn local_repo(tmp: &Path) -> (Arc<dyn ObjectStore>, Repository) {
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.join("repo")));
    let repo = init(store.clone(), 256 * 1024).await;
    (store, repo)
}

async fn backup(repo: &Repository, src: &Path) -> crate::format::SnapshotId {
    repo.backup(src, backup_opts(), None)
        .await
        .expect("backup")
        .id
        .expect("id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_and_sockets_are_kept() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("dev")).expect("mkdir");
    let root = rustix::process::geteuid().is_root();
    if root {
        let mk = |name: &str, ft, dev| {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                src.join("dev").join(name),
                ft,
                rustix::fs::Mode::from_raw_mode(0o620),
                dev,
            )
            .expect("mknod")
        };
        mk(
            "null",
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::makedev(1, 3),
        );
        mk(
            "loop9",
            rustix::fs::FileType::BlockDevice,
            rustix::fs::makedev(7, 9),
        );
    }
    let sock = std::os::unix::net::UnixListener::bind(src.join("app.sock")).expect("bind");
    let (_, repo) = local_repo(tmp.path()).await;
    let id = backup(&repo, &src).await;
    drop(sock);
    let dst = tmp.path().join("dst");
    let summary = repo.restore(id, None, &dst, None).await.expect("restore");
    assert!(summary.skipped.is_empty(), "{:?}", summary.skipped);
    let st = fs::symlink_metadata(dst.join("app.sock")).expect("socket restored");
    assert!(st.file_type().is_socket());
    if root {
        assert_eq!(summary.specials, 3, "{summary:?}");
        for (name, block, rdev) in [
            ("null", false, rustix::fs::makedev(1, 3)),
            ("loop9", true, rustix::fs::makedev(7, 9)),
        ] {
            let st = fs::symlink_metadata(dst.join("dev").join(name)).expect("device restored");
            assert_eq!(st.file_type().is_block_device(), block, "{name}");
            assert_eq!(st.file_type().is_char_device(), !block, "{name}");
            assert_eq!(st.rdev(), rdev, "{name}");
            let want = fs::symlink_metadata(src.join("dev").join(name)).expect("stat");
            assert_eq!(st.mode(), want.mode(), "{name}");
        }
        assert_same_tree(&src, &dst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holes_are_never_read_and_each_file_keeps_its_allocation() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    // 64 GiB, 8 KiB of data in two places.
    let huge = fs::File::create(src.join("huge.img")).expect("create");
    huge.set_len(64 << 30).expect("set_len");
    huge.write_all_at(&random_bytes(&mut rng, 4096), 1 << 30)
        .expect("write");
    huge.write_all_at(&random_bytes(&mut rng, 4096), (64 << 30) - 4096)
        .expect("write");
    // 8 MiB with 4 KiB of data in the middle: one chunk's worth of range.
    let small = fs::File::create(src.join("mostly-hole")).expect("create");
    small.set_len(8 << 20).expect("set_len");
    small
        .write_all_at(&random_bytes(&mut rng, 4096), 4 << 20)
        .expect("write");
    // Dense zeros: allocated on disk, and must stay so.
    fs::write(src.join("zeros"), vec![0u8; 2 << 20]).expect("write");
    // Only holes.
    fs::File::create(src.join("all-hole"))
        .expect("create")
        .set_len(1 << 30)
        .expect("set_len");
    for f in ["huge.img", "mostly-hole", "all-hole"] {
        let md = fs::metadata(src.join(f)).expect("stat");
        assert!(
            md.blocks() * 512 < 1 << 20,
            "{f} is not sparse on this filesystem"
        );
    }

    let (_, repo) = local_repo(tmp.path()).await;
    let out = repo
        .backup(&src, backup_opts(), None)
        .await
        .expect("backup");
    let read = out.snapshot.summary.bytes_read;
    // The data runs (filesystem blocks) and the dense zeros, never a hole.
    assert!(read >= (2 << 20) + 3 * 4096, "{read}");
    assert!(read < 3 << 20, "holes were read: {read} bytes");

    let dst = tmp.path().join("dst");
    repo.restore(out.id.expect("id"), None, &dst, None)
        .await
        .expect("restore");
    let alloc = |f: &str| fs::metadata(dst.join(f)).expect("stat").blocks() * 512;
    assert_eq!(
        fs::metadata(dst.join("huge.img")).expect("stat").len(),
        64 << 30
    );
    assert!(
        alloc("huge.img") < 1 << 20,
        "huge.img: {} allocated",
        alloc("huge.img")
    );
    assert!(
        alloc("mostly-hole") <= 64 << 10,
        "mostly-hole: {} allocated",
        alloc("mostly-hole")
    );
    assert_eq!(alloc("all-hole"), 0);
    assert!(
        alloc("zeros") >= 2 << 20,
        "zeros became a hole: {} allocated",
        alloc("zeros")
    );
    let restored = fs::File::open(dst.join("huge.img")).expect("open");
    let huge = fs::File::open(src.join("huge.img")).expect("open");
    for off in [1u64 << 30, (64 << 30) - 4096] {
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        huge.read_exact_at(&mut a, off).expect("read");
        restored.read_exact_at(&mut b, off).expect("read");
        assert!(a == b, "data at {off}");
    }
    assert!(fs::read(dst.join("zeros")).expect("read") == vec![0u8; 2 << 20]);
    assert!(
        fs::read(dst.join("mostly-hole")).expect("read")
            == fs::read(src.join("mostly-hole")).expect("read")
    );

    // Unchanged sparse files are not read again.
    let again = repo
        .backup(&src, backup_opts(), None)
        .await
        .expect("backup");
    assert_eq!(again.snapshot.summary.bytes_read, 0);
    assert_eq!(again.snapshot.tree, out.snapshot.tree);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_leaves_no_wrong_file_and_names_the_files() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    for i in 0..6 {
        fs::write(src.join(format!("big{i}")), random_bytes(&mut rng, 3 << 20)).expect("write");
    }
    fs::write(src.join("small"), b"fine").expect("write");
    let (store, repo) = local_repo(tmp.path()).await;
    let id = backup(&repo, &src).await;
    // Corrupt one blob in the middle of the largest pack.
    let objs = store.list(DATA_PREFIX).await.expect("list");
    let o = objs.iter().max_by_key(|o| o.size).expect("a pack");
    let mut data = store.get(&o.key).await.expect("get").to_vec();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    store.put(&o.key, Bytes::from(data)).await.expect("put");

    let dst = tmp.path().join("dst");
    let err = repo
        .restore(id, None, &dst, None)
        .await
        .expect_err("restore fails");
    let text = err.to_string();
    assert!(
        text.contains("cannot restore big"),
        "the file is named: {text}"
    );
    // Whatever is in the target is complete and correct; nothing is left
    // under a temporary name.
    for e in fs::read_dir(&dst).expect("read_dir") {
        let e = e.expect("entry");
        let name = e.file_name();
        assert!(
            !name.to_string_lossy().starts_with(".ferry-restore-"),
            "temporary file left: {name:?}"
        );
        assert!(
            fs::read(e.path()).expect("read") == fs::read(src.join(&name)).expect("read"),
            "{name:?} was left with wrong content"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_newer_manifest_is_skipped_by_ls_and_parent_selection() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    make_tree(&src, 31);
    let (store, repo) = local_repo(tmp.path()).await;
    let first = backup(&repo, &src).await;
    let second = backup(&repo, &src).await;
    // The newest manifest turns to garbage.
    let key = ObjectKey::new(second.object_key()).expect("key");
    store
        .put(&key, Bytes::from_static(b"garbage"))
        .await
        .expect("put");
    // A manifest of a future format.
    let mut future: Snapshot = repo.load_snapshot(first).await.expect("load");
    future.version = 99;
    future.time_unix += 10;
    let newer = repo.save_snapshot(&future).await.expect("save");
    let err = repo.load_snapshot(newer).await.expect_err("newer format");
    assert!(err.to_string().contains("version 99"), "{err}");

    let scan = repo.scan_snapshots().await.expect("scan");
    assert_eq!(scan.snapshots.len(), 1);
    assert_eq!(scan.snapshots[0].0, first);
    let bad: Vec<_> = scan.unreadable.iter().map(|(id, _)| *id).collect();
    assert!(bad.contains(&second) && bad.contains(&newer), "{bad:?}");
    assert_eq!(
        repo.resolve_snapshot("latest").await.expect("latest"),
        first
    );
    // A default backup still finds its parent among the readable ones.
    let third = repo
        .backup(&src, backup_opts(), None)
        .await
        .expect("backup");
    assert_eq!(third.snapshot.parent, Some(first));
    assert_eq!(third.snapshot.summary.bytes_read, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_index_is_explained_and_repaired() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    make_tree(&src, 32);
    let (store, repo) = local_repo(tmp.path()).await;
    let id = backup(&repo, &src).await;
    for o in store.list(INDEX_PREFIX).await.expect("list") {
        store.delete(&o.key).await.expect("delete");
    }
    let err = repo
        .restore(id, None, &tmp.path().join("dst"), None)
        .await
        .expect_err("restore fails");
    assert!(err.to_string().contains("repo repair index"), "{err}");
    let report = repo.repair_index().await.expect("repair");
    assert!(report.packs_recovered >= 1, "{report:?}");
    let dst = tmp.path().join("dst2");
    repo.restore(id, None, &dst, None).await.expect("restore");
    assert_same_tree(&src, &dst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_of_one_snapshot_reads_only_its_packs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    for d in [&a, &b] {
        fs::create_dir_all(d).expect("mkdir");
        for i in 0..4 {
            fs::write(d.join(format!("f{i}")), random_bytes(&mut rng, 400_000)).expect("write");
        }
    }
    let (store, repo) = local_repo(tmp.path()).await;
    let sa = backup(&repo, &a).await;
    backup(&repo, &b).await;
    let total = store.list(DATA_PREFIX).await.expect("list").len();
    let report = repo
        .verify(VerifyOptions {
            snapshot: Some(sa),
            read_data_percent: Some(100),
        })
        .await
        .expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(report.packs_read >= 1);
    assert!(
        report.packs_read < total,
        "read {} of {total} packs",
        report.packs_read
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lineage_however_the_path_is_spelled() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    make_tree(&src, 33);
    std::os::unix::fs::symlink(&src, tmp.path().join("via-link")).expect("symlink");
    let (_, repo) = local_repo(tmp.path()).await;
    let first = backup(&repo, &src).await;
    let spellings = [
        format!("{}/", src.display()),
        format!("{}/./src", tmp.path().display()),
        format!("{}/src/a/..", tmp.path().display()),
        format!("{}/via-link", tmp.path().display()),
    ];
    for s in spellings {
        let out = repo
            .backup(Path::new(&s), backup_opts(), None)
            .await
            .expect("backup");
        assert_eq!(
            out.snapshot.path,
            src.canonicalize().expect("canonical").display().to_string(),
            "{s}"
        );
        assert!(out.snapshot.parent.is_some(), "{s} started a new lineage");
        assert_eq!(out.snapshot.summary.bytes_read, 0, "{s}");
    }
    let _ = first;
}

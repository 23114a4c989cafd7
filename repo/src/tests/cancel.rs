//! Cancelling a backup or a restore, against the local store and S3: it
//! stops promptly, removes its lock, commits nothing and leaves the
//! repository valid.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::*;
use crate::progress::{Progress, ProgressInfo};

/// A progress sink that remembers the bytes seen.
fn counting() -> (Arc<AtomicU64>, Arc<dyn Progress>) {
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let p: Arc<dyn Progress> = Arc::new(move |i: &ProgressInfo| {
        s.fetch_max(i.bytes.max(1), Ordering::SeqCst);
    });
    (seen, p)
}

fn big_tree(root: &Path, files: usize) {
    fs::create_dir_all(root).expect("mkdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(77);
    for i in 0..files {
        fs::write(
            root.join(format!("f{i:03}")),
            random_bytes(&mut rng, 1 << 20),
        )
        .expect("write");
    }
}

/// Cancels a backup of `src` into `repo` once it is under way; returns how
/// long it took to stop after the cancel.
async fn cancel_backup_midway(repo: &Repository, src: &Path) -> Duration {
    let token = CancellationToken::new();
    let (seen, progress) = counting();
    let task = {
        let repo = repo.with_cancel(token.clone());
        let src = src.to_path_buf();
        tokio::spawn(async move { repo.backup(&src, backup_opts(), Some(progress)).await })
    };
    wait_until(60, "the backup to read data", || {
        let seen = seen.clone();
        async move { seen.load(Ordering::SeqCst) > 0 }
    })
    .await;
    let cancelled_at = Instant::now();
    token.cancel();
    let res = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the backup stops")
        .expect("task");
    let took = cancelled_at.elapsed();
    assert!(matches!(res, Err(RepoError::Cancelled)), "{res:?}");
    took
}

/// Restores `id` into `target` and cancels the restore as soon as it
/// writes data.
async fn cancel_restore_midway(
    repo: &Repository,
    id: crate::format::SnapshotId,
    target: &Path,
) -> Result<crate::restore::RestoreSummary, RepoError> {
    let token = CancellationToken::new();
    let (seen, progress) = counting();
    let task = {
        let repo = repo.with_cancel(token.clone());
        let target = target.to_path_buf();
        tokio::spawn(async move { repo.restore(id, None, &target, Some(progress)).await })
    };
    wait_until(60, "the restore to write data", || {
        let seen = seen.clone();
        async move { seen.load(Ordering::SeqCst) > 0 }
    })
    .await;
    token.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the restore stops")
        .expect("task")
}

/// After a cancelled backup: no snapshot, no lock, a valid repository, and
/// the next backup completes and restores.
async fn assert_clean_after_cancel(repo: &Repository, src: &Path, dst: &Path) {
    assert!(repo.list_snapshots().await.expect("list").is_empty());
    wait_until(10, "the cancelled backup's lock to go", || async {
        repo.all_locks().await.expect("locks").is_empty()
    })
    .await;
    let report = repo
        .verify(VerifyOptions {
            snapshot: None,
            read_data_percent: Some(100),
        })
        .await
        .expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let id = repo
        .backup(src, backup_opts(), None)
        .await
        .expect("backup after cancel")
        .id
        .expect("id");
    repo.restore(id, None, dst, None).await.expect("restore");
    assert_same_tree(src, dst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_backup_stops_releases_its_lock_and_commits_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    big_tree(&src, 24);
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    init(local.clone(), 256 * 1024).await;
    let store = faulty(local.clone());
    // Slow uploads, so the backup is still running when it is cancelled.
    store.inject(
        Rule::new(Fault::Delay(Duration::from_millis(300)))
            .op(Op::Put)
            .prefix(DATA_PREFIX),
    );
    let repo = Repository::open(store.clone(), PW).await.expect("open");
    let took = cancel_backup_midway(&repo, &src).await;
    eprintln!("backup stopped {took:?} after the cancel");
    store.recover();
    let fresh = Repository::open(local, PW).await.expect("open");
    assert_clean_after_cancel(&fresh, &src, &tmp.path().join("dst")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_restore_stops_and_a_new_restore_succeeds() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    big_tree(&src, 16);
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    let repo = init(local.clone(), 256 * 1024).await;
    let id = backup_id(&repo, &src).await;
    let store = faulty(local.clone());
    store.inject(Rule::new(Fault::Delay(Duration::from_millis(300))).op(Op::GetRange));
    let slow = Repository::open(store, PW).await.expect("open");
    let res = cancel_restore_midway(&slow, id, &tmp.path().join("dst")).await;
    assert!(matches!(res, Err(RepoError::Cancelled)), "{res:?}");
    let again = tmp.path().join("again");
    repo.restore(id, None, &again, None).await.expect("restore");
    assert_same_tree(&src, &again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_backup_and_restore_on_s3() {
    let weed = ferry_store::testing::seaweed().await;
    let store = weed.store("ferry/cancel").await;
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    big_tree(&src, 24);
    let repo = init(store.clone(), 512 * 1024).await;
    let took = cancel_backup_midway(&repo, &src).await;
    eprintln!("s3 backup stopped {took:?} after the cancel");
    let dst = tmp.path().join("dst");
    assert_clean_after_cancel(&repo, &src, &dst).await;

    // Restore over S3, cancelled as soon as it writes.
    let id = repo.list_snapshots().await.expect("list")[0].0;
    let target = tmp.path().join("cancelled-restore");
    let res = cancel_restore_midway(&repo, id, &target).await;
    // A restore this small may finish before the cancel lands; it must
    // then be complete.
    match res {
        Err(RepoError::Cancelled) => {}
        Ok(_) => assert_same_tree(&src, &target),
        Err(e) => panic!("unexpected {e}"),
    }
}

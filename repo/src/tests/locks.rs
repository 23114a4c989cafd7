//! The lock guard: refreshed while its operation runs, stale soon after
//! its process dies, released on drop, and fatal to its operation when
//! lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::clock::Clock;
use crate::lock::LockTiming;
use crate::progress::{Progress, ProgressInfo};

/// Fast refreshes; a lock goes stale 30 minutes (of the clock) after its
/// last refresh.
fn fast_locks() -> LockTiming {
    LockTiming {
        refresh: Duration::from_millis(50),
        stale_after: Duration::from_secs(30 * 60),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_outlives_hours_is_never_pruned_under() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    fs::write(src.join("old"), random_bytes(&mut rng, 600_000)).expect("write");
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    let clock = Clock::manual(1_800_000_000);
    let repo = init(local.clone(), 128 * 1024)
        .await
        .with_clock(clock.clone())
        .with_lock_timing(fast_locks());
    // A snapshot, forgotten: its packs are unreferenced but still indexed,
    // so the next backup of the same data reuses them.
    let s1 = repo
        .backup(&src, backup_opts(), None)
        .await
        .expect("b1")
        .id
        .expect("id");
    repo.forget(&[s1]).await.expect("forget");
    fs::write(src.join("new"), random_bytes(&mut rng, 3 << 20)).expect("write");

    // A slow backup of old + new data.
    let store = faulty(local.clone());
    store.inject(
        Rule::new(Fault::Delay(Duration::from_millis(150)))
            .op(Op::Put)
            .prefix(DATA_PREFIX),
    );
    let slow = Repository::open(store.clone(), PW)
        .await
        .expect("open")
        .with_clock(clock.clone())
        .with_lock_timing(fast_locks());
    let seen = Arc::new(AtomicU64::new(0));
    let progress: Arc<dyn Progress> = {
        let seen = seen.clone();
        Arc::new(move |i: &ProgressInfo| {
            seen.fetch_max(i.bytes.max(1), Ordering::SeqCst);
        })
    };
    let backup = {
        let src = src.clone();
        tokio::spawn(async move { slow.backup(&src, backup_opts(), Some(progress)).await })
    };
    wait_until(60, "the backup to read data", || {
        let seen = seen.clone();
        async move { seen.load(Ordering::SeqCst) > 0 }
    })
    .await;
    // Prune marks the forgotten snapshot's packs (the backup reuses them).
    let r = repo.prune(Duration::from_secs(3600)).await.expect("mark");
    assert!(r.packs_newly_marked >= 1, "{r:?}");
    // Hours later, past any fixed lock lifetime, the backup runs on: the
    // clock moves in steps under half the lock's lifetime, each one
    // followed by a refresh from after it (as a live process refreshes).
    // (A refresh whose write is seen after its old expiry loses the lock,
    // and the test may move the clock just after seeing the write land:
    // two steps must stay inside one lifetime.)
    for _ in 0..9 {
        clock.advance(14 * 60);
        let now = clock.now_unix();
        wait_until(30, "the backup's lock to be refreshed", || async {
            repo.live_locks()
                .await
                .expect("locks")
                .iter()
                .any(|(_, l)| l.kind == "backup" && l.expires >= now + 30 * 60)
        })
        .await;
    }
    let r = repo.prune(Duration::from_secs(3600)).await.expect("prune");
    assert!(r.deferred_by_backup, "{r:?}");
    assert_eq!(r.packs_deleted, 0, "{r:?}");

    let out = backup.await.expect("task").expect("backup");
    let dst = tmp.path().join("dst");
    repo.restore(out.id.expect("id"), None, &dst, None)
        .await
        .expect("the long backup restores");
    assert_same_tree(&src, &dst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_go_stale_without_refresh_and_unlock_removes_only_stale_ones() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.path().join("repo")));
    let clock = Clock::manual(1_800_000_000);
    let repo = init(store, 1 << 20).await.with_clock(clock.clone());
    // A lock whose process "died": its refresher never runs (default
    // timing refreshes every 5 minutes of real time).
    let dead = repo
        .lock_shared("backup", CancellationToken::new())
        .await
        .expect("lock");
    let dead_key = dead.key().to_owned();
    std::mem::forget(dead);
    clock.advance(31 * 60);
    assert!(repo.live_locks().await.expect("locks").is_empty());
    let live = repo
        .lock_shared("backup", CancellationToken::new())
        .await
        .expect("lock");
    let removed = repo.unlock(false).await.expect("unlock");
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].0, dead_key);
    let left = repo.all_locks().await.expect("locks");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, live.key());
    // A dropped guard removes its lock.
    drop(live);
    wait_until(10, "the dropped lock to be removed", || async {
        repo.all_locks().await.expect("locks").is_empty()
    })
    .await;
}

/// A slow backup of 8 MiB (every pack upload held 150 ms) on `clock`,
/// once it holds its lock: another handle on the repository, and the
/// backup's task.
async fn slow_backup_holding_its_lock(
    tmp: &std::path::Path,
    clock: Clock,
) -> (
    Repository,
    tokio::task::JoinHandle<Result<crate::backup::BackupOutcome, RepoError>>,
) {
    let src = tmp.join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    for i in 0..8 {
        fs::write(src.join(format!("f{i}")), random_bytes(&mut rng, 1 << 20)).expect("write");
    }
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(tmp.join("repo")));
    let repo = init(local.clone(), 128 * 1024)
        .await
        .with_clock(clock.clone());
    let store = faulty(local.clone());
    store.inject(
        Rule::new(Fault::Delay(Duration::from_millis(150)))
            .op(Op::Put)
            .prefix(DATA_PREFIX),
    );
    let slow = Repository::open(store, PW)
        .await
        .expect("open")
        .with_clock(clock)
        .with_lock_timing(fast_locks());
    let backup = tokio::spawn(async move { slow.backup(&src, backup_opts(), None).await });
    wait_until(30, "the backup's lock", || async {
        !repo.all_locks().await.expect("locks").is_empty()
    })
    .await;
    (repo, backup)
}

/// The backup stops with its lock lost (the reason names `why`) and
/// commits nothing.
async fn ends_with_its_lock_lost(
    repo: &Repository,
    backup: tokio::task::JoinHandle<Result<crate::backup::BackupOutcome, RepoError>>,
    why: &str,
) {
    let res = tokio::time::timeout(Duration::from_secs(30), backup)
        .await
        .expect("the backup stops")
        .expect("task");
    match res {
        Err(RepoError::LockLost { reason, .. }) => assert!(reason.contains(why), "{reason}"),
        other => panic!("expected a lost lock, got {other:?}"),
    }
    assert!(repo.list_snapshots().await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lock_fails_its_backup_and_commits_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (repo, backup) =
        slow_backup_holding_its_lock(tmp.path(), Clock::manual(1_800_000_000)).await;
    // Someone removes every lock (`repo unlock --all`) mid-backup.
    repo.unlock(true).await.expect("unlock");
    ends_with_its_lock_lost(&repo, backup, "removed").await;
}

/// A process that stalled past its lock's expiry may find the lock taken
/// for stale (a prune may have deleted what it reuses): the refresher
/// never extends it then, and the backup fails without committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_that_expired_is_lost_never_extended() {
    let tmp = tempfile::tempdir().expect("tmp");
    let clock = Clock::manual(1_800_000_000);
    let (repo, backup) = slow_backup_holding_its_lock(tmp.path(), clock.clone()).await;
    // The process stalls past the lock's lifetime.
    clock.advance(31 * 60);
    ends_with_its_lock_lost(&repo, backup, "expired").await;
}

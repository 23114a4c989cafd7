//! Repository locks (`locks/<kind>-<random>`): shared ones for backups, one
//! exclusive maintenance lock for prune.
//!
//! A lock is held through a [`LockGuard`]. While the operation runs, the
//! guard rewrites its lock object every [`LockTiming::refresh`] with a new
//! expiry [`LockTiming::stale_after`] ahead, so a lock of a live operation
//! never expires however long the operation takes, and a lock left by a
//! killed process goes stale soon. If the guard cannot refresh before its
//! lock would go stale, or finds its lock object removed (`repo unlock`),
//! the lock is lost: the guard cancels the operation, which then fails with
//! [`RepoError::LockLost`]. The guard removes its lock on
//! [`LockGuard::release`], and also when dropped (an operation that failed
//! or was cancelled).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::format::LOCKS_PREFIX;
use super::{RepoError, Repository, object_key};
use ferry_store::{ObjectKey, ObjectStore, StoreError};

/// A lock object's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockInfo {
    pub kind: String,
    pub owner: String,
    pub created: i64,
    pub expires: i64,
}

/// How often a held lock is refreshed, and how long an unrefreshed lock
/// stays live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockTiming {
    pub refresh: Duration,
    pub stale_after: Duration,
}

impl Default for LockTiming {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(5 * 60),
            stale_after: Duration::from_secs(30 * 60),
        }
    }
}

pub const MAINTENANCE: &str = "maintenance";

fn owner() -> String {
    format!("{}:{}", super::hostname(), std::process::id())
}

/// A held lock, refreshed in the background until released or dropped.
#[derive(Debug)]
pub struct LockGuard {
    key: ObjectKey,
    store: Arc<dyn ObjectStore>,
    refresher: Option<tokio::task::JoinHandle<()>>,
    lost: Arc<Mutex<Option<String>>>,
    released: bool,
}

impl LockGuard {
    /// The lock object's key (`locks/…`).
    pub fn key(&self) -> &str {
        self.key.as_str()
    }

    /// `LockLost` once the lock is lost; operations check before they
    /// commit anything.
    pub fn check(&self) -> Result<(), RepoError> {
        match self.lost_reason() {
            Some(reason) => Err(RepoError::LockLost {
                lock: self.key.to_string(),
                reason,
            }),
            None => Ok(()),
        }
    }

    fn lost_reason(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The error an operation that ran under this lock should report:
    /// `LockLost` when a cancellation came from losing the lock.
    pub fn explain(&self, err: RepoError) -> RepoError {
        match (err, self.check()) {
            (RepoError::Cancelled, Err(lost)) => lost,
            (err, _) => err,
        }
    }

    /// Stops refreshing and removes the lock object.
    pub async fn release(mut self) {
        self.released = true;
        if let Some(r) = self.refresher.take() {
            r.abort();
        }
        if let Err(e) = self.store.delete(&self.key).await {
            tracing::warn!(lock = %self.key, error = %e, "could not remove lock");
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(r) = self.refresher.take() {
            r.abort();
        }
        if self.released {
            return;
        }
        // An operation that failed or was cancelled: remove the lock in the
        // background (without a runtime it goes stale instead).
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let store = self.store.clone();
            let key = self.key.clone();
            rt.spawn(async move {
                if let Err(e) = store.delete(&key).await {
                    tracing::warn!(lock = %key, error = %e, "could not remove lock; it goes stale on its own");
                }
            });
        }
    }
}

impl Repository {
    async fn write_lock(&self, key: &ObjectKey, info: &LockInfo) -> Result<(), RepoError> {
        let json = serde_json::to_vec(info).expect("invariant: lock serialises");
        self.io(self.store().put(key, Bytes::from(json))).await
    }

    /// Takes a lock of `kind` and starts refreshing it. When the lock is
    /// lost, `on_lost` is cancelled.
    async fn take_lock(
        &self,
        kind: &str,
        on_lost: CancellationToken,
    ) -> Result<LockGuard, RepoError> {
        let mut r = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut r);
        let key = object_key(&format!("{LOCKS_PREFIX}{kind}-{}", hex::encode(r)))?;
        let timing = self.lock_timing();
        let stale = timing.stale_after.as_secs() as i64;
        let now = self.clock().now_unix();
        let mut info = LockInfo {
            kind: kind.into(),
            owner: owner(),
            created: now,
            expires: now + stale,
        };
        self.write_lock(&key, &info).await?;
        let lost = Arc::new(Mutex::new(None));
        let refresher = {
            let repo = self.clone();
            let key = key.clone();
            let lost = lost.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(timing.refresh).await;
                    // Past its expiry, others may already have taken it for
                    // stale (a prune deleting what this operation reuses):
                    // it is lost, never silently extended.
                    let now = repo.clock().now_unix();
                    if now >= info.expires {
                        let reason = format!(
                            "it expired {} s ago before it could be refreshed (the process stalled)",
                            now - info.expires
                        );
                        tracing::error!(lock = %key, reason = %reason, "repository lock lost; stopping the operation");
                        *lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                        on_lost.cancel();
                        return;
                    }
                    let reason = match repo.store().size(&key).await {
                        Ok(Some(_)) => {
                            // Extended from the time it was seen live, never
                            // from a later one (the process may stall
                            // between the check and the write); a write
                            // that lands after the old expiry is too late.
                            // `info` keeps the expiry the store has until
                            // the new one is written.
                            let old = info.expires;
                            let refreshed = LockInfo {
                                expires: now + stale,
                                ..info.clone()
                            };
                            match repo.write_lock(&key, &refreshed).await {
                                Ok(()) if repo.clock().now_unix() < old => {
                                    info = refreshed;
                                    continue;
                                }
                                Ok(()) => format!(
                                    "it expired before its refresh was written ({} s late; the process stalled)",
                                    repo.clock().now_unix() - old
                                ),
                                // Keep trying while the lock is still live.
                                Err(e) if repo.clock().now_unix() < info.expires - 1 => {
                                    tracing::warn!(lock = %key, error = %e, "could not refresh lock; retrying");
                                    continue;
                                }
                                Err(e) => {
                                    format!("it could not be refreshed before it went stale: {e}")
                                }
                            }
                        }
                        Ok(None) => "its lock object was removed (repo unlock?)".to_owned(),
                        Err(e) if repo.clock().now_unix() < info.expires - 1 => {
                            tracing::warn!(lock = %key, error = %e, "could not check lock; retrying");
                            continue;
                        }
                        Err(e) => format!("it could not be checked before it went stale: {e}"),
                    };
                    tracing::error!(lock = %key, reason = %reason, "repository lock lost; stopping the operation");
                    *lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                    on_lost.cancel();
                    return;
                }
            })
        };
        Ok(LockGuard {
            key,
            store: self.store().clone(),
            refresher: Some(refresher),
            lost,
            released: false,
        })
    }

    /// A lock that many holders may take at once (backups), refused while
    /// a maintenance lock is live. `on_lost` is cancelled if the lock is
    /// lost later.
    pub async fn lock_shared(
        &self,
        kind: &str,
        on_lost: CancellationToken,
    ) -> Result<LockGuard, RepoError> {
        let guard = self.take_lock(kind, on_lost).await?;
        // Written first, checked second: a prune that starts later sees
        // this lock; one that started earlier is seen here.
        if let Some((_, l)) = self
            .live_locks()
            .await?
            .into_iter()
            .find(|(_, l)| l.kind == MAINTENANCE)
        {
            guard.release().await;
            return Err(RepoError::Locked {
                owner: l.owner,
                expires_unix: l.expires,
            });
        }
        Ok(guard)
    }

    /// The maintenance lock: refused while another live one exists.
    pub async fn lock_maintenance(
        &self,
        on_lost: CancellationToken,
    ) -> Result<LockGuard, RepoError> {
        let now = self.clock().now_unix();
        let busy = |locks: &[(String, LockInfo)], mine: Option<&str>| {
            locks
                .iter()
                .filter(|(k, l)| {
                    l.kind == MAINTENANCE && l.expires > now && Some(k.as_str()) != mine
                })
                .min_by_key(|(k, l)| (l.created, k.clone()))
                .cloned()
        };
        if let Some((_, l)) = busy(&self.live_locks().await?, None) {
            return Err(RepoError::Locked {
                owner: l.owner,
                expires_unix: l.expires,
            });
        }
        let guard = self.take_lock(MAINTENANCE, on_lost).await?;
        // Two writers may both have passed the first check: the older lock
        // (then the smaller key) wins, the other backs off.
        let locks = self.live_locks().await?;
        let mine = locks
            .iter()
            .find(|(k, _)| k == guard.key())
            .map(|(_, l)| l.created);
        if let Some((k, l)) = busy(&locks, Some(guard.key()))
            && mine.is_none_or(|c| (l.created, k.as_str()) < (c, guard.key()))
        {
            guard.release().await;
            return Err(RepoError::Locked {
                owner: l.owner,
                expires_unix: l.expires,
            });
        }
        Ok(guard)
    }

    /// Every lock object with its content, live or stale.
    pub async fn all_locks(&self) -> Result<Vec<(String, LockInfo)>, RepoError> {
        let mut out = Vec::new();
        for o in self.io(self.store().list(LOCKS_PREFIX)).await? {
            let bytes = match self.io(self.store().get(&o.key)).await {
                Ok(b) => b,
                Err(RepoError::Store(StoreError::NotFound { .. })) => continue,
                Err(e) => return Err(e),
            };
            match serde_json::from_slice::<LockInfo>(&bytes) {
                Ok(l) => out.push((o.key.as_str().to_owned(), l)),
                Err(e) => tracing::warn!(lock = %o.key, error = %e, "ignoring malformed lock"),
            }
        }
        Ok(out)
    }

    /// Every lock that has not gone stale.
    pub async fn live_locks(&self) -> Result<Vec<(String, LockInfo)>, RepoError> {
        let now = self.clock().now_unix();
        let mut locks = self.all_locks().await?;
        locks.retain(|(_, l)| l.expires > now);
        Ok(locks)
    }

    /// Removes stale locks (left by killed processes), or every lock with
    /// `all` (only when no Ferry process uses the repository). Returns the
    /// removed locks.
    pub async fn unlock(&self, all: bool) -> Result<Vec<(String, LockInfo)>, RepoError> {
        let now = self.clock().now_unix();
        let mut removed = Vec::new();
        for (key, l) in self.all_locks().await? {
            if all || l.expires <= now {
                self.io(self.store().delete(&object_key(&key)?)).await?;
                tracing::info!(lock = %key, owner = %l.owner, kind = %l.kind, "lock removed");
                removed.push((key, l));
            }
        }
        Ok(removed)
    }
}

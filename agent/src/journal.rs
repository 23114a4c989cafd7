//! What Ferry stopped: a crash-safe journal on the agent.
//!
//! Before a step stops an app's components, it records which ones it is
//! about to stop (only those that run: Ferry never starts what it did not
//! stop), durably, in `D/journal/<key>.json`: each as its driver's
//! receipt, read before the stop (the unit, or the container's id and the
//! restart policy it had), so exactly what was stopped is put back. Each recording gets a key of
//! its own (`job-<id>-<index>-<unique>`), so a later attempt of the same
//! step never overwrites what an earlier one recorded. Once the step has
//! started them again it removes its entry.
//!
//! An entry whose step is still running is *held*: only that step acts on
//! it. Every other entry is what an interrupted or failed step left, and is
//! replayed: every recorded component is put back from its receipt (started
//! unless it runs, what was set aside restored), in start order (the
//! reverse of the stop order), and the entry is removed once all of them
//! run. The agent replays at start, on a timer while
//! entries are left (a container engine or a unit that comes back after the
//! agent), at shutdown, and before a step works on an app an earlier entry
//! names (so an attempt never takes an app that is still down for running
//! normally). An entry that cannot be read is reported by name, never
//! silently dropped.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use ferry_core::{AppName, ComponentRef, TeamName};
use tokio_util::sync::CancellationToken;

use crate::platform::{PlatformError, Platforms, Receipt};

/// Entries hold receipts; format 1 (component names only, written before
/// receipts) is still read.
const FORMAT: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot {op} the journal {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal entry {} is unreadable: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("journal key {key:?} is not 1-128 of [a-z0-9-]")]
    BadKey { key: String },
}

impl ferry_core::CodedError for JournalError {
    fn code(&self) -> ferry_core::ErrorCode {
        match self {
            Self::Io { .. } => ferry_core::ErrorCode::Unavailable,
            Self::Corrupt { .. } => ferry_core::ErrorCode::Internal,
            Self::BadKey { .. } => ferry_core::ErrorCode::InvalidArgument,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct EntryFile {
    format: u32,
    /// In stop order.
    stopped: Vec<Receipt>,
    /// When a replay first found everything running without starting it
    /// (ms since the epoch): a stop begun before may still go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    running_since_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct EntryFileV1 {
    stopped: Vec<ComponentRef>,
}

/// A journal entry: the components one operation stopped, in stop order.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: String,
    pub stopped: Vec<Receipt>,
    /// When a replay first found all of it running without starting it.
    pub running_since_ms: Option<u64>,
}

impl Entry {
    /// Whether the entry stopped a component of `team/app`.
    pub fn touches(&self, team: &TeamName, app: &AppName) -> bool {
        self.stopped
            .iter()
            .any(|r| r.component.team == *team && r.component.app == *app)
    }
}

/// The journal directory of an agent.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
    /// Keys of entries whose step still runs: not replayed.
    held: Arc<Mutex<HashSet<String>>>,
    /// One replay at a time (the timer's and a step's never start the same
    /// component twice).
    replaying: Arc<tokio::sync::Mutex<()>>,
}

fn check_key(key: &str) -> Result<(), JournalError> {
    let ok = !key.is_empty()
        && key.len() <= 128
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(JournalError::BadKey {
            key: key.to_owned(),
        })
    }
}

/// A key no other recording of this agent has: the time in nanoseconds
/// and a counter.
fn unique_suffix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{nanos:x}-{n:x}")
}

/// An entry recorded by a running step: held (not replayed by anyone
/// else) until dropped. [`Held::clear`] removes it once everything it
/// stopped runs again; dropped without that, the entry stays for the
/// replays.
#[derive(Debug)]
pub struct Held {
    journal: Journal,
    key: String,
}

impl Held {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Forgets the entry: everything it stopped runs again.
    pub fn clear(self) -> Result<(), JournalError> {
        self.journal.clear(&self.key)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.journal
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

impl Journal {
    /// The journal under an agent's data directory, created (0700) if new.
    pub fn open(data_dir: &Path) -> Result<Self, JournalError> {
        let dir = data_dir.join("journal");
        crate::durable::private_dir(&dir).map_err(|source| JournalError::Io {
            op: "create",
            path: dir.clone(),
            source,
        })?;
        Ok(Self {
            dir,
            held: Arc::default(),
            replaying: Arc::default(),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// Records, durably, that the step `owner` (`job-<id>-<index>`) is
    /// about to stop `components` (in stop order), under a key of its own.
    /// Returns once the record is on disk; the entry is held until the
    /// returned value is dropped.
    pub fn begin(&self, owner: &str, components: &[Receipt]) -> Result<Held, JournalError> {
        let key = format!("{owner}-{}", unique_suffix());
        check_key(&key)?;
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        let held = Held {
            journal: self.clone(),
            key,
        };
        self.write(&held.key, components, None)?;
        Ok(held)
    }

    fn write(
        &self,
        key: &str,
        components: &[Receipt],
        running_since_ms: Option<u64>,
    ) -> Result<(), JournalError> {
        let file = EntryFile {
            format: FORMAT,
            stopped: components.to_vec(),
            running_since_ms,
        };
        let path = self.path(key);
        let io = |op, source| JournalError::Io {
            op,
            path: path.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(&file).map_err(|e| io("encode", e.into()))?;
        crate::durable::write(&path, &text).map_err(|e| io("write", e))
    }

    /// Forgets the operation `key`: everything it stopped runs again.
    pub fn clear(&self, key: &str) -> Result<(), JournalError> {
        check_key(key)?;
        let path = self.path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => crate::durable::sync_dir(&self.dir).map_err(|source| JournalError::Io {
                op: "sync",
                path: self.dir.clone(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(JournalError::Io {
                op: "remove from",
                path,
                source,
            }),
        }
    }

    fn is_held(&self, key: &str) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    /// The entries left, ordered by key; an unreadable one is an error of
    /// its own, so the others are still replayed.
    pub fn pending(&self) -> Result<Vec<Result<Entry, JournalError>>, JournalError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|source| JournalError::Io {
            op: "read",
            path: self.dir.clone(),
            source,
        })?;
        let mut keys = Vec::new();
        for e in rd {
            let e = e.map_err(|source| JournalError::Io {
                op: "read",
                path: self.dir.clone(),
                source,
            })?;
            let name = e.file_name();
            let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            // Temporary files of an interrupted write start with a dot.
            if check_key(key).is_ok() {
                keys.push(key.to_owned());
            }
        }
        keys.sort();
        Ok(keys.into_iter().map(|k| self.read(&k)).collect())
    }

    fn read(&self, key: &str) -> Result<Entry, JournalError> {
        let path = self.path(key);
        let corrupt = |reason: String| JournalError::Corrupt {
            path: path.clone(),
            reason,
        };
        let bytes = std::fs::read(&path).map_err(|source| JournalError::Io {
            op: "read",
            path: path.clone(),
            source,
        })?;
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        let format = serde_json::from_slice::<Format>(&bytes)
            .map_err(|e| corrupt(e.to_string()))?
            .format;
        let (stopped, running_since_ms) = match format {
            FORMAT => {
                let f = serde_json::from_slice::<EntryFile>(&bytes)
                    .map_err(|e| corrupt(e.to_string()))?;
                (f.stopped, f.running_since_ms)
            }
            // Names only: each component's owner puts it back as it can.
            1 => (
                serde_json::from_slice::<EntryFileV1>(&bytes)
                    .map_err(|e| corrupt(e.to_string()))?
                    .stopped
                    .into_iter()
                    .map(|component| Receipt {
                        driver: String::new(),
                        component,
                        detail: serde_json::Value::Null,
                    })
                    .collect(),
                None,
            ),
            other => {
                return Err(corrupt(format!(
                    "format {other} is not {FORMAT}, written by another Ferry version"
                )));
            }
        };
        Ok(Entry {
            key: key.to_owned(),
            stopped,
            running_since_ms,
        })
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// Puts back, in start order, every component of `stopped` (in stop order)
/// from its receipt (started unless it runs, what its stop set aside
/// restored); stops at the first that fails to start (what follows depends on it). A component the
/// agent no longer has (its app was removed, its container re-created by
/// someone else) has nothing to start.
/// Returns what the starts had to say ([`crate::platform::Remark`]).
pub async fn restart(
    platform: &Platforms,
    stopped: &[Receipt],
) -> Result<Vec<String>, PlatformError> {
    let mut remarks = Vec::new();
    for receipt in stopped.iter().rev() {
        match platform.start(receipt).await {
            Ok(remark) => remarks.extend(remark),
            Err(PlatformError::UnknownComponent { .. }) => {
                tracing::warn!(component = %receipt.component, "no longer on this agent; nothing to start");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(remarks)
}

/// Replays every entry no running step holds: restarts what an interrupted
/// or failed operation stopped and clears its entry. Returns the problems,
/// each naming its entry; entries that could not be restarted stay for the
/// next replay.
pub async fn replay(journal: &Journal, platform: &Platforms) -> Vec<String> {
    replay_where(journal, platform, None).await
}

/// Replays the entries no running step holds that stopped a component of
/// `team/app`, before a step works on that app.
pub async fn replay_app(
    journal: &Journal,
    platform: &Platforms,
    team: &TeamName,
    app: &AppName,
) -> Vec<String> {
    replay_where(journal, platform, Some((team, app))).await
}

/// Replays the entries of `app` (all when none); with an app, an entry
/// that cannot be read is logged, not a problem of this app's.
async fn replay_where(
    journal: &Journal,
    platform: &Platforms,
    app: Option<(&TeamName, &AppName)>,
) -> Vec<String> {
    let _one_at_a_time = journal.replaying.lock().await;
    let mut problems = Vec::new();
    let entries = match journal.pending() {
        Ok(e) => e,
        Err(e) => return vec![e.to_string()],
    };
    let mut readable = Vec::new();
    for entry in entries {
        match entry {
            Ok(e) => readable.push(e),
            // Cleared by its step since the directory was listed.
            Err(JournalError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if app.is_some() => tracing::error!("{e}"),
            Err(e) => problems.push(e.to_string()),
        }
    }
    // What running steps hold is theirs to start: an older entry naming
    // the same component waits until they are done.
    let held: HashSet<ComponentRef> = readable
        .iter()
        .filter(|e| journal.is_held(&e.key))
        .flat_map(|e| e.stopped.iter().map(|r| r.component.clone()))
        .collect();
    for entry in readable {
        let wanted = app.is_none_or(|(team, name)| entry.touches(team, name));
        if journal.is_held(&entry.key) || !wanted {
            continue;
        }
        if entry.stopped.iter().any(|r| held.contains(&r.component)) {
            tracing::debug!(entry = %entry.key, "a running step holds its components; replayed later");
            continue;
        }
        match restart_checked(platform, &entry).await {
            Ok(false) => {
                if let Err(e) = journal.clear(&entry.key) {
                    problems.push(e.to_string());
                }
            }
            // Found running without being started: a stop begun earlier
            // (by an agent that was killed, or a call that timed out) may
            // still go on. The entry stays until its stops' deadline has
            // passed; a replay then starts what that stop took down.
            Ok(true) => {
                let deadline = entry
                    .stopped
                    .iter()
                    .map(|r| platform.stop_deadline(r))
                    .max()
                    .unwrap_or_default();
                let now = now_ms();
                let since = entry.running_since_ms.unwrap_or(now);
                let settled = u128::from(now.saturating_sub(since)) >= deadline.as_millis();
                if settled {
                    if let Err(e) = journal.clear(&entry.key) {
                        problems.push(e.to_string());
                    }
                } else if entry.running_since_ms.is_none() {
                    tracing::info!(entry = %entry.key, deadline_secs = deadline.as_secs(),
                        "what the entry stopped runs; kept until a stop begun earlier can no longer be under way");
                    if let Err(e) = journal.write(&entry.key, &entry.stopped, Some(now)) {
                        problems.push(e.to_string());
                    }
                }
            }
            Err(e) => problems.push(format!(
                "journal entry {} is kept: cannot start what it stopped: {e}",
                entry.key
            )),
        }
    }
    problems
}

/// As [`restart`], for a replay: whether a component was found running
/// without Ferry starting it (then a stop begun earlier may still go on).
async fn restart_checked(platform: &Platforms, entry: &Entry) -> Result<bool, PlatformError> {
    tracing::warn!(entry = %entry.key, components = entry.stopped.len(),
        "an interrupted operation stopped components: starting them again");
    let mut found_running = false;
    for receipt in entry.stopped.iter().rev() {
        let state = match platform.status(&receipt.component).await {
            Ok(s) => s,
            Err(PlatformError::UnknownComponent { .. }) => {
                tracing::warn!(component = %receipt.component, "no longer on this agent; nothing to start");
                continue;
            }
            Err(e) => return Err(e),
        };
        found_running |= state == ferry_core::ComponentState::Running;
        match platform.start(receipt).await {
            Ok(_) => {}
            Err(PlatformError::UnknownComponent { .. }) => {
                tracing::warn!(component = %receipt.component, "no longer on this agent; nothing to start");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(found_running)
}

/// Replays the journal every `every` until `cancel`: what could not be
/// started at once (an engine or unit still away) runs again once it can.
pub async fn retry(
    journal: Journal,
    platform: Arc<Platforms>,
    every: Duration,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = cancel.cancelled() => return,
        }
        for problem in replay(&journal, platform.as_ref()).await {
            tracing::warn!("{problem}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::host::HostPlatform;
    use ferry_core::{
        App, AppName, Argv, Component, ComponentKind, ComponentName, ComponentState, HostComponent,
        TeamName,
    };
    use std::time::Duration;

    /// An app of command components whose "running" state is a marker
    /// file, started and stopped by real shell commands.
    fn app(dir: &Path, names: &[&str]) -> App {
        let sh = |s: String| Argv::new(vec!["sh".into(), "-c".into(), s]).expect("argv");
        let components = names
            .iter()
            .map(|n| {
                let marker = dir.join(format!("{n}.running"));
                let log = dir.join("starts.log");
                let m = marker.display();
                Component {
                    name: ComponentName::new(*n).expect("name"),
                    kind: ComponentKind::Host(HostComponent::Commands {
                        start: sh(format!("touch {m} && echo {n} >> {}", log.display())),
                        stop: sh(format!("rm -f {m}")),
                        status: Some(sh(format!("test -e {m}"))),
                    }),
                    stateful: true,
                    volumes: vec![],
                    depends_on: vec![],
                    state: ComponentState::Unknown,
                    hooks: Default::default(),
                }
            })
            .collect();
        App {
            name: AppName::new("shop").expect("app"),
            team: TeamName::new("t1").expect("team"),
            components,
            volumes: vec![],
        }
    }

    fn cref(n: &str) -> ComponentRef {
        ComponentRef {
            team: TeamName::new("t1").expect("team"),
            app: AppName::new("shop").expect("app"),
            component: ComponentName::new(n).expect("name"),
        }
    }

    /// The host driver's receipt of a command component.
    fn rc(n: &str) -> Receipt {
        Receipt {
            driver: "host".into(),
            component: cref(n),
            detail: serde_json::Value::Null,
        }
    }

    fn host(apps: Vec<App>) -> Platforms {
        Platforms::new(vec![Arc::new(HostPlatform::new(
            apps,
            Duration::from_secs(10),
        ))])
    }

    #[tokio::test]
    async fn replay_starts_what_an_interrupted_operation_stopped_and_nothing_else() {
        let tmp = tempfile::tempdir().expect("tmp");
        let platform = host(vec![app(tmp.path(), &["db", "web", "idle"])]);
        for c in ["db", "web"] {
            platform.start_component(&cref(c)).await.expect("start");
        }
        std::fs::remove_file(tmp.path().join("starts.log")).expect("reset log");
        // "idle" was stopped before the operation: not recorded, not started.
        let journal = Journal::open(&tmp.path().join("agent")).expect("open");
        let held = journal
            .begin("job-7-0", &[rc("web"), rc("db")])
            .expect("record");
        platform.stop(&rc("web")).await.expect("stop");
        platform.stop(&rc("db")).await.expect("stop");
        // Held while its step runs: nobody else starts what it stopped.
        assert!(replay(&journal, &platform).await.is_empty());
        assert_eq!(
            platform.status(&cref("db")).await.expect("status"),
            ComponentState::Stopped,
            "a held entry is not replayed"
        );
        drop(held);
        // The agent dies here. A fresh journal handle, as after a restart:
        let journal = Journal::open(&tmp.path().join("agent")).expect("reopen");
        let pending = journal.pending().expect("pending");
        assert_eq!(pending.len(), 1);
        let problems = replay(&journal, &platform).await;
        assert!(problems.is_empty(), "{problems:?}");
        for c in ["db", "web"] {
            assert_eq!(
                platform.status(&cref(c)).await.expect("status"),
                ComponentState::Running,
                "{c}"
            );
        }
        assert_eq!(
            platform.status(&cref("idle")).await.expect("status"),
            ComponentState::Stopped
        );
        // Started in start order (the reverse of the stop order), once.
        let log = std::fs::read_to_string(tmp.path().join("starts.log")).expect("log");
        assert_eq!(log, "db\nweb\n");
        assert!(
            journal.pending().expect("pending").is_empty(),
            "entry cleared"
        );
        // A second replay has nothing to do.
        assert!(replay(&journal, &platform).await.is_empty());
        let log = std::fs::read_to_string(tmp.path().join("starts.log")).expect("log");
        assert_eq!(log, "db\nweb\n");
    }

    #[tokio::test]
    async fn a_failed_start_keeps_the_entry_and_a_damaged_one_is_named() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut a = app(tmp.path(), &["db"]);
        // A start command that fails.
        if let ComponentKind::Host(HostComponent::Commands { start, .. }) =
            &mut a.components[0].kind
        {
            *start = Argv::new(vec!["false".into()]).expect("argv");
        }
        let platform = host(vec![a]);
        let journal = Journal::open(tmp.path()).expect("open");
        let key = {
            let held = journal.begin("job-1", &[rc("db")]).expect("record");
            held.key().to_owned()
        };
        std::fs::write(tmp.path().join("journal/job-2.json"), b"{ torn").expect("write");
        let problems = replay(&journal, &platform).await;
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains(&format!("{key} is kept"))),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("job-2.json is unreadable")),
            "{problems:?}"
        );
        assert_eq!(
            journal.pending().expect("pending").len(),
            2,
            "nothing dropped"
        );
        // Clearing is idempotent; keys that could escape the directory are refused.
        journal.clear(&key).expect("clear");
        journal.clear(&key).expect("clear again");
        assert!(matches!(
            journal.begin("../x", &[]),
            Err(JournalError::BadKey { .. })
        ));
    }

    /// Attempt 1 stops web and db; db does not start again (a transient
    /// failure), so web is not started either. Attempt 2 of the same step
    /// records its own entry: attempt 1's stays until what it stopped runs.
    #[tokio::test]
    async fn a_later_attempt_never_overwrites_what_an_earlier_one_recorded() {
        let tmp = tempfile::tempdir().expect("tmp");
        let platform = host(vec![app(tmp.path(), &["db", "web"])]);
        let journal = Journal::open(tmp.path()).expect("open");
        let first = journal
            .begin("job-3-0", &[rc("web"), rc("db")])
            .expect("attempt 1");
        let first_key = first.key().to_owned();
        drop(first); // attempt 1 failed to start them again
        let second = journal.begin("job-3-0", &[rc("db")]).expect("attempt 2");
        assert_ne!(second.key(), first_key);
        second.clear().expect("attempt 2 started db");
        let left: Vec<Entry> = journal
            .pending()
            .expect("pending")
            .into_iter()
            .map(|e| e.expect("readable"))
            .collect();
        assert_eq!(left.len(), 1, "attempt 1's entry is kept");
        assert_eq!(left[0].key, first_key);
        assert_eq!(left[0].stopped, vec![rc("web"), rc("db")]);
        // Before the next step on the app, it is replayed: web runs again.
        let problems = replay_app(
            &journal,
            &platform,
            &TeamName::new("t1").expect("team"),
            &AppName::new("shop").expect("app"),
        )
        .await;
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            platform.status(&cref("web")).await.expect("status"),
            ComponentState::Running
        );
        assert!(journal.pending().expect("pending").is_empty());
    }

    #[tokio::test]
    async fn a_step_on_one_app_replays_only_that_apps_entries() {
        let tmp = tempfile::tempdir().expect("tmp");
        let platform = host(vec![app(tmp.path(), &["db"])]);
        let journal = Journal::open(tmp.path()).expect("open");
        drop(journal.begin("job-1-0", &[rc("db")]).expect("record"));
        // Another entry, unreadable: not this app's problem.
        std::fs::write(tmp.path().join("journal/job-9.json"), b"{ torn").expect("write");
        let other = TeamName::new("t2").expect("team");
        let problems = replay_app(
            &journal,
            &platform,
            &other,
            &AppName::new("shop").expect("app"),
        )
        .await;
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(journal.pending().expect("pending").len(), 2, "not its app");
        assert_eq!(
            platform.status(&cref("db")).await.expect("status"),
            ComponentState::Stopped
        );
    }

    /// An entry an agent wrote before receipts (format 1: component names
    /// only) is still replayed, by each component's owner.
    #[tokio::test]
    async fn an_entry_from_before_receipts_is_still_replayed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let platform = host(vec![app(tmp.path(), &["db"])]);
        let journal = Journal::open(tmp.path()).expect("open");
        let old = serde_json::json!({
            "format": 1,
            "stopped": [{"team": "t1", "app": "shop", "component": "db"}],
        });
        std::fs::write(
            tmp.path().join("journal/job-4-0.json"),
            serde_json::to_vec(&old).expect("json"),
        )
        .expect("write");
        let pending = journal.pending().expect("pending");
        let entry = pending[0].as_ref().expect("readable");
        assert_eq!(entry.stopped[0].component, cref("db"));
        assert!(entry.stopped[0].driver.is_empty());
        let problems = replay(&journal, &platform).await;
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            platform.status(&cref("db")).await.expect("status"),
            ComponentState::Running
        );
        assert!(journal.pending().expect("pending").is_empty());
        // A format this agent does not know is named, not guessed at.
        std::fs::write(tmp.path().join("journal/job-5-0.json"), br#"{"format": 9}"#)
            .expect("write");
        let problems = replay(&journal, &platform).await;
        assert!(problems[0].contains("format 9"), "{problems:?}");
    }

    /// A replay that finds what an entry stopped running without starting
    /// it (a stop begun by an agent that was then killed may still be under
    /// way) keeps the entry until that stop's deadline has passed; when the
    /// late stop does take the component down, a later replay starts it.
    #[tokio::test]
    async fn a_component_found_running_is_confirmed_after_the_stop_deadline() {
        let tmp = tempfile::tempdir().expect("tmp");
        let platform = host(vec![app(tmp.path(), &["db"])]);
        platform.start_component(&cref("db")).await.expect("start");
        let journal = Journal::open(tmp.path()).expect("open");
        drop(journal.begin("job-1-0", &[rc("db")]).expect("record"));
        // db runs: the entry is kept, marked.
        assert!(replay(&journal, &platform).await.is_empty());
        let pending = journal.pending().expect("pending");
        let entry = pending[0].as_ref().expect("readable");
        assert!(entry.running_since_ms.is_some(), "{entry:?}");
        // The stop begun earlier ends now: db goes down. The next replay
        // starts it, and the entry goes.
        platform.stop(&rc("db")).await.expect("late stop");
        assert!(replay(&journal, &platform).await.is_empty());
        assert_eq!(
            platform.status(&cref("db")).await.expect("status"),
            ComponentState::Running
        );
        assert!(journal.pending().expect("pending").is_empty());
        // Found running again and again: cleared once the deadline (the
        // command timeout, 10 s here) has passed since it was first seen.
        let held = journal.begin("job-2-0", &[rc("db")]).expect("record");
        let key = held.key().to_owned();
        drop(held);
        assert!(replay(&journal, &platform).await.is_empty());
        assert_eq!(journal.pending().expect("pending").len(), 1);
        journal
            .write(&key, &[rc("db")], Some(now_ms() - 11_000))
            .expect("seen 11 s ago");
        assert!(replay(&journal, &platform).await.is_empty());
        assert!(journal.pending().expect("pending").is_empty());
    }

    /// A component a running step holds is that step's to start: an older
    /// entry naming it waits (it would start what the step stopped for its
    /// delta pass).
    #[tokio::test]
    async fn an_entry_waits_while_a_running_step_holds_its_components() {
        let tmp = tempfile::tempdir().expect("tmp");
        let platform = host(vec![app(tmp.path(), &["db"])]);
        let journal = Journal::open(tmp.path()).expect("open");
        drop(journal.begin("job-1-0", &[rc("db")]).expect("older entry"));
        let step = journal.begin("job-2-0", &[rc("db")]).expect("a step's");
        assert!(replay(&journal, &platform).await.is_empty());
        assert_eq!(
            platform.status(&cref("db")).await.expect("status"),
            ComponentState::Stopped,
            "not started behind the step's back"
        );
        assert_eq!(journal.pending().expect("pending").len(), 2);
        drop(step);
        assert!(replay(&journal, &platform).await.is_empty());
        assert_eq!(
            platform.status(&cref("db")).await.expect("status"),
            ComponentState::Running
        );
    }

    /// The timer replays what could not be started before (a unit or an
    /// engine that comes back after the agent).
    #[tokio::test]
    async fn the_timer_starts_what_comes_back_later() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut a = app(tmp.path(), &["db"]);
        // Starts only once the "engine" is back (a file appears).
        let back = tmp.path().join("engine-back");
        if let ComponentKind::Host(HostComponent::Commands { start, .. }) =
            &mut a.components[0].kind
        {
            let marker = tmp.path().join("db.running");
            *start = Argv::new(vec![
                "sh".into(),
                "-c".into(),
                format!("test -e {} && touch {}", back.display(), marker.display()),
            ])
            .expect("argv");
        }
        let platform = Arc::new(host(vec![a]));
        let journal = Journal::open(tmp.path()).expect("open");
        drop(journal.begin("job-1-0", &[rc("db")]).expect("record"));
        assert_eq!(replay(&journal, platform.as_ref()).await.len(), 1);
        let cancel = CancellationToken::new();
        let timer = tokio::spawn(retry(
            journal.clone(),
            platform.clone(),
            Duration::from_millis(50),
            cancel.clone(),
        ));
        std::fs::write(&back, b"").expect("engine back");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !journal.pending().expect("pending").is_empty() {
            assert!(std::time::Instant::now() < deadline, "not replayed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            platform.status(&cref("db")).await.expect("status"),
            ComponentState::Running
        );
        cancel.cancel();
        timer.await.expect("timer ends");
    }
}

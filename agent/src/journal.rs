//! What Ferry stopped: a crash-safe journal on the agent.
//!
//! Before a cold backup stops an app's stateful components, the agent
//! records which ones it is about to stop (only those that run: Ferry never
//! starts what it did not stop), durably, in `D/journal/<key>.json`. Once it
//! has started them again it removes the entry. When the agent starts, it
//! replays what is left, for it crashed or was killed in between: every
//! recorded component that does not run is started again, in start order
//! (the reverse of the stop order), and the entry is removed once all of
//! them run. An entry that cannot be read is reported by name, never
//! silently dropped.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use ferry_core::{ComponentRef, ComponentState};

use crate::platform::{Platform, PlatformError};

const FORMAT: u32 = 1;

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
    stopped: Vec<ComponentRef>,
}

/// A journal entry: the components one operation stopped, in stop order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub stopped: Vec<ComponentRef>,
}

/// The journal directory of an agent.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
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

impl Journal {
    /// The journal under an agent's data directory, created (0700) if new.
    pub fn open(data_dir: &Path) -> Result<Self, JournalError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = data_dir.join("journal");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| JournalError::Io {
                op: "create",
                path: dir.clone(),
                source,
            })?;
        Ok(Self { dir })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// Records, durably, that the operation `key` is about to stop
    /// `components` (in stop order). Returns once the record is on disk.
    pub fn record(&self, key: &str, components: &[ComponentRef]) -> Result<(), JournalError> {
        check_key(key)?;
        let file = EntryFile {
            format: FORMAT,
            stopped: components.to_vec(),
        };
        let path = self.path(key);
        let io = |op, source| JournalError::Io {
            op,
            path: path.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(&file).map_err(|e| io("encode", e.into()))?;
        let tmp = self.dir.join(format!(".{key}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("write", e))?;
        f.write_all(&text)
            .and_then(|_| f.sync_all())
            .map_err(|e| io("write", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io("write", e))?;
        self.sync_dir()
    }

    /// Forgets the operation `key`: everything it stopped runs again.
    pub fn clear(&self, key: &str) -> Result<(), JournalError> {
        check_key(key)?;
        let path = self.path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(JournalError::Io {
                op: "remove from",
                path,
                source,
            }),
        }
    }

    fn sync_dir(&self) -> Result<(), JournalError> {
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| JournalError::Io {
                op: "sync",
                path: self.dir.clone(),
                source,
            })
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
                continue; // temporary files of an interrupted record
            };
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
        let file: EntryFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if file.format != FORMAT {
            return Err(corrupt(format!(
                "format {} is not {FORMAT}, written by another Ferry version",
                file.format
            )));
        }
        Ok(Entry {
            key: key.to_owned(),
            stopped: file.stopped,
        })
    }
}

/// Starts again, in start order, every component of `entry` that does not
/// run; stops at the first that fails to start (what follows depends on it).
pub async fn restart(platform: &dyn Platform, entry: &Entry) -> Result<(), PlatformError> {
    for c in entry.stopped.iter().rev() {
        if platform.status(c).await? == ComponentState::Running {
            continue;
        }
        platform.start(c).await?;
    }
    Ok(())
}

/// Replays the journal at agent start: restarts what an interrupted
/// operation stopped and clears its entry. Returns the problems, each
/// naming its entry; entries that could not be restarted stay for the next
/// replay.
pub async fn replay(journal: &Journal, platform: &dyn Platform) -> Vec<String> {
    let mut problems = Vec::new();
    let entries = match journal.pending() {
        Ok(e) => e,
        Err(e) => return vec![e.to_string()],
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        tracing::warn!(entry = %entry.key, components = entry.stopped.len(),
            "an interrupted operation stopped components: starting them again");
        match restart(platform, &entry).await {
            Ok(()) => {
                if let Err(e) = journal.clear(&entry.key) {
                    problems.push(e.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::host::HostPlatform;
    use ferry_core::{
        App, AppName, Argv, Component, ComponentKind, ComponentName, HostComponent, TeamName,
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

    #[tokio::test]
    async fn replay_starts_what_an_interrupted_operation_stopped_and_nothing_else() {
        let tmp = tempfile::tempdir().expect("tmp");
        let platform = HostPlatform::new(
            vec![app(tmp.path(), &["db", "web", "idle"])],
            Duration::from_secs(10),
        );
        for c in ["db", "web"] {
            platform.start(&cref(c)).await.expect("start");
        }
        std::fs::remove_file(tmp.path().join("starts.log")).expect("reset log");
        // "idle" was stopped before the operation: not recorded, not started.
        let journal = Journal::open(&tmp.path().join("agent")).expect("open");
        journal
            .record("job-7", &[cref("web"), cref("db")])
            .expect("record");
        platform.stop(&cref("web")).await.expect("stop");
        platform.stop(&cref("db")).await.expect("stop");
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
        let platform = HostPlatform::new(vec![a], Duration::from_secs(10));
        let journal = Journal::open(tmp.path()).expect("open");
        journal.record("job-1", &[cref("db")]).expect("record");
        std::fs::write(tmp.path().join("journal/job-2.json"), b"{ torn").expect("write");
        let problems = replay(&journal, &platform).await;
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("job-1 is kept"), "{problems:?}");
        assert!(
            problems[1].contains("job-2.json is unreadable"),
            "{problems:?}"
        );
        assert_eq!(
            journal.pending().expect("pending").len(),
            2,
            "nothing dropped"
        );
        // Clearing is idempotent; keys that could escape the directory are refused.
        journal.clear("job-1").expect("clear");
        journal.clear("job-1").expect("clear again");
        assert!(matches!(
            journal.record("../x", &[]),
            Err(JournalError::BadKey { .. })
        ));
    }
}

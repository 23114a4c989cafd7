//! Job steps run in-process against the host driver (real shell commands)
//! and a local repository: what a step stops and starts, and when.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_core::{
    App, AppName, Argv, Component, ComponentKind, ComponentName, ComponentRef, ComponentState,
    ErrorCode, HostComponent, HostPath, TeamName, Volume, VolumeName,
};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::journal::Journal;
use crate::platform::host::HostPlatform;

const PASSWORD: &[u8] = b"step tests";

/// A tree: the app's volume, its components' marker files and logs, the
/// agent's data directory and a local repository.
struct Bed {
    dir: tempfile::TempDir,
    ctx: StepCtx,
    journal: Journal,
}

/// Components `names` (each depends on the one before), stateful, with
/// one volume; each start and stop appends its name to `starts`/`stops`.
fn app(dir: &Path, names: &[&str]) -> App {
    let sh = |s: String| Argv::new(vec!["sh".into(), "-c".into(), s]).expect("argv");
    let vol = dir.join("vol");
    let components = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let marker = dir.join(format!("{n}.running"));
            let m = marker.display();
            let d = dir.display();
            Component {
                name: ComponentName::new(*n).expect("name"),
                kind: ComponentKind::Host(HostComponent::Commands {
                    start: sh(format!("touch {m} && echo {n} >> {d}/starts")),
                    stop: sh(format!("rm -f {m} && echo {n} >> {d}/stops")),
                    status: Some(sh(format!("test -e {m}"))),
                }),
                stateful: true,
                volumes: vec![VolumeName::new("data").expect("volume")],
                depends_on: if i == 0 {
                    vec![]
                } else {
                    vec![ComponentName::new(names[i - 1]).expect("name")]
                },
                state: ComponentState::Unknown,
                hooks: Default::default(),
            }
        })
        .collect();
    App {
        name: AppName::new("shop").expect("app"),
        team: TeamName::new("web").expect("team"),
        components,
        volumes: vec![Volume {
            name: VolumeName::new("data").expect("volume"),
            path: HostPath::new(vol.display().to_string()).expect("path"),
        }],
    }
}

fn cref(n: &str) -> ComponentRef {
    ComponentRef {
        team: TeamName::new("web").expect("team"),
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

impl Bed {
    async fn new(names: &[&str]) -> Self {
        Self::with(names, |_, _| {}).await
    }

    /// As `new`, the app changed by `edit` (given the tree's directory).
    async fn with(names: &[&str], edit: impl FnOnce(&Path, &mut App)) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(dir.path().join("vol")).expect("vol");
        std::fs::write(dir.path().join("vol/data.txt"), b"rows\n").expect("data");
        let mut a = app(dir.path(), names);
        edit(dir.path(), &mut a);
        let platform = Arc::new(Platforms::new(vec![Arc::new(
            HostPlatform::with_copies(
                vec![a],
                Duration::from_secs(20),
                &dir.path().join("agent"),
                &dir.path().join("agent-copies"),
            )
            .expect("driver"),
        )]));
        crate::durable::private_dir(&dir.path().join("agent")).expect("agent dir");
        let journal = Journal::open(&dir.path().join("agent")).expect("journal");
        let mut ctx = StepCtx::new(platform, Some(journal.clone()), Duration::from_secs(1));
        ctx.scratch_dir = dir.path().join("agent/tmp");
        let store = Arc::new(ferry_store::local::LocalStore::new(dir.path().join("repo")));
        ferry_repo::Repository::init(store, PASSWORD, "tests")
            .await
            .expect("repository");
        for n in names {
            ctx.platform.start_component(&cref(n)).await.expect("start");
        }
        // Only what the step does is logged from here.
        let _ = std::fs::remove_file(dir.path().join("starts"));
        Self { dir, ctx, journal }
    }

    fn repo_path(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    async fn repo(&self) -> ferry_repo::Repository {
        let store = Arc::new(ferry_store::local::LocalStore::new(self.repo_path()));
        ferry_repo::Repository::open(store, PASSWORD)
            .await
            .expect("open")
    }

    fn repo_access(&self) -> RepoAccess {
        RepoAccess::local(&self.repo_path(), PASSWORD)
    }

    fn request(&self) -> BackupApp {
        BackupApp {
            team: "web".parse().expect("team"),
            app: "shop".parse().expect("app"),
            mode: BackupMode::Cold,
            backup: BackupId::new(1).expect("id"),
            job: JobId::new(7).expect("job"),
            index: 0,
            storage: "disk".parse().expect("storage"),
            cluster: "a".parse().expect("cluster"),
            node: "node-a".parse().expect("node"),
            repo: self.repo_access(),
        }
    }

    async fn restore(&self, manifest: &[u8], job: u64) -> StepResult<Restored> {
        let request = RestoreApp {
            manifest: AppManifest::parse(manifest).expect("manifest"),
            team: "qa".parse().expect("team"),
            app: "shop".parse().expect("app"),
            job,
            repo: self.repo_access(),
        };
        let report: Report = Arc::new(|_, _, _| {});
        restore_app(&self.ctx, request, CancellationToken::new(), report).await
    }

    /// A backup attempt; the manifest it committed.
    async fn backup(&self, cancel: CancellationToken) -> StepResult<Vec<u8>> {
        let report: Report = Arc::new(|_, _, _| {});
        backup_app(&self.ctx, self.request(), cancel, report).await
    }

    fn log(&self, which: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(which)).unwrap_or_default()
    }

    async fn state(&self, n: &str) -> ComponentState {
        self.ctx.platform.status(&cref(n)).await.expect("status")
    }
}

/// A prune takes the maintenance lock after the pre-copy, just before
/// the stop: the backup is refused while the app still runs, never after
/// it was stopped (each attempt would stop it again for nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_under_way_refuses_the_backup_before_anything_stops() {
    // The pre_stop hook (after the pre-copy, before the stop) waits until
    // the prune holds its lock.
    let bed = Bed::with(&["db"], |dir, app| {
        let d = dir.display();
        let hook = format!("touch {d}/hooked; while [ ! -e {d}/locked ]; do sleep 0.02; done");
        app.components[0].hooks.pre_stop =
            Some(Argv::new(vec!["sh".into(), "-c".into(), hook]).expect("argv"));
    })
    .await;
    let repo = bed.repo().await;
    let dir = bed.dir.path().to_owned();
    let prune = tokio::spawn(async move {
        while !dir.join("hooked").exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let lock = repo
            .lock_maintenance(CancellationToken::new())
            .await
            .expect("maintenance lock");
        std::fs::write(dir.join("locked"), b"").expect("signal");
        lock
    });
    let err = bed
        .backup(CancellationToken::new())
        .await
        .expect_err("refused while prune runs");
    assert!(err.message.contains("lock"), "{}", err.message);
    assert_eq!(bed.log("stops"), "", "nothing was stopped");
    assert_eq!(bed.state("db").await, ComponentState::Running);
    prune.await.expect("prune").release().await;
    bed.backup(CancellationToken::new())
        .await
        .expect("backs up once prune is done");
    assert_eq!(bed.log("stops"), "db\n");
    assert_eq!(bed.state("db").await, ComponentState::Running);
}

/// Attempt 1 stopped web and db and could not start them again (the
/// journal keeps them). Attempt 2 must not take the stopped app for one
/// its owner stopped: it starts them first, then backs up as usual, and
/// the job's success means the app runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_starts_what_an_earlier_attempt_left_stopped() {
    let bed = Bed::new(&["db", "web"]).await;
    let first = bed
        .journal
        .begin("job-7-0", &[rc("web"), rc("db")])
        .expect("attempt 1 records");
    for c in ["web", "db"] {
        bed.ctx.platform.stop(&rc(c)).await.expect("stop");
    }
    drop(first); // attempt 1 ended without starting them again
    let reply = bed
        .backup(CancellationToken::new())
        .await
        .expect("attempt 2 succeeds");
    for c in ["db", "web"] {
        assert_eq!(bed.state(c).await, ComponentState::Running, "{c}");
    }
    assert!(bed.journal.pending().expect("pending").is_empty());
    // Attempt 2 stopped both again for its own delta pass.
    assert_eq!(bed.log("stops"), "web\ndb\nweb\ndb\n");
    let manifest: serde_json::Value = serde_json::from_slice(&reply).expect("json");
    assert_eq!(manifest["stopped"], serde_json::json!(["web", "db"]));
}

/// A cancel that comes while the pre_stop hooks run stops nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_the_pre_stop_hook_stops_nothing() {
    let bed = Bed::with(&["db"], |dir, app| {
        let hook = format!("touch {}/hooked; sleep 1", dir.display());
        app.components[0].hooks.pre_stop =
            Some(Argv::new(vec!["sh".into(), "-c".into(), hook]).expect("argv"));
    })
    .await;
    let cancel = CancellationToken::new();
    let hooked = bed.dir.path().join("hooked");
    let watcher = {
        let cancel = cancel.clone();
        let hooked = hooked.clone();
        tokio::spawn(async move {
            while !hooked.exists() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            cancel.cancel();
        })
    };
    let err = bed.backup(cancel).await.expect_err("cancelled");
    watcher.await.expect("watcher");
    assert_eq!(err.code, ErrorCode::Cancelled, "{}", err.message);
    assert_eq!(bed.log("stops"), "", "nothing was stopped");
    assert_eq!(bed.state("db").await, ComponentState::Running);
    assert!(bed.journal.pending().expect("pending").is_empty());
}

/// Removing the source of a move: web stops, then db's stop fails. The
/// remove fails and web runs again, so the original is left as it was
/// (the job's undo then removes the copy, and one instance still runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remove_that_fails_half_way_starts_again_what_it_stopped() {
    let bed = Bed::with(&["db", "web"], |_, app| {
        if let ComponentKind::Host(HostComponent::Commands { stop, .. }) =
            &mut app.components[0].kind
        {
            *stop = Argv::new(vec![
                "sh".into(),
                "-c".into(),
                "echo busy >&2; exit 1".into(),
            ])
            .expect("argv");
        }
    })
    .await;
    let request = RemoveApp {
        team: "web".parse().expect("team"),
        app: "shop".parse().expect("app"),
        delete_data: false,
        restored_by_job: None,
    };
    let err = remove_app(&bed.ctx, request, CancellationToken::new())
        .await
        .expect_err("db does not stop");
    assert!(err.message.contains("busy"), "{}", err.message);
    assert_eq!(bed.log("stops"), "web\n", "web was stopped first");
    for c in ["db", "web"] {
        assert_eq!(bed.state(c).await, ComponentState::Running, "{c}");
    }
    assert!(bed.journal.pending().expect("pending").is_empty());
    // Still the agent's app.
    assert!(
        bed.ctx
            .platform
            .app(
                &TeamName::new("web").expect("team"),
                &AppName::new("shop").expect("app")
            )
            .await
            .expect("app")
            .is_some()
    );
}

/// A component without a status command runs once its start command
/// succeeded: the check after a restore accepts it instead of waiting for
/// a status that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_without_a_status_command_counts_as_running() {
    let bed = Bed::with(&["db"], |_, app| {
        if let ComponentKind::Host(HostComponent::Commands { status, .. }) =
            &mut app.components[0].kind
        {
            *status = None;
        }
    })
    .await;
    let request = CheckApp {
        team: "web".parse().expect("team"),
        app: "shop".parse().expect("app"),
        wait: Duration::from_millis(500),
    };
    let running = check_app(&bed.ctx, request)
        .await
        .expect("counts as running");
    assert_eq!(running, vec!["db".to_owned()]);
}

/// Copies get a home the app's own user can pass through (0711 on the
/// way, whatever the umask), under the restoring job; data a removed copy
/// kept is never cleared by the next restore of the same name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_get_a_home_of_their_own_and_kept_data_is_never_reused() {
    use std::os::unix::fs::PermissionsExt;
    let bed = Bed::new(&["db"]).await;
    let manifest = bed.backup(CancellationToken::new()).await.expect("backup");
    let first = bed.restore(&manifest, 8).await.expect("restored");
    // The same job asking again (its answer lost) gets the same answer.
    assert_eq!(bed.restore(&manifest, 8).await.expect("asked again"), first);
    let copies = bed.dir.path().join("agent-copies");
    let v0 = PathBuf::from(&first.volume_paths[0]);
    assert_eq!(v0, copies.join("qa/shop/job-8/v0"));
    for d in ["", "qa", "qa/shop", "qa/shop/job-8"] {
        let mode = std::fs::metadata(copies.join(d))
            .expect("dir")
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o711, "{d}");
    }
    assert_eq!(std::fs::read(v0.join("data.txt")).expect("data"), b"rows\n");
    // Removed with its data kept; then restored again under that name.
    let removed = remove_app(
        &bed.ctx,
        RemoveApp {
            team: "qa".parse().expect("team"),
            app: "shop".parse().expect("app"),
            delete_data: false,
            restored_by_job: Some(8),
        },
        CancellationToken::new(),
    )
    .await
    .expect("removed");
    assert!(removed);
    std::fs::write(v0.join("kept.txt"), b"the copy's own writes").expect("write");
    let second = bed.restore(&manifest, 9).await.expect("restored again");
    assert_eq!(
        PathBuf::from(&second.volume_paths[0]),
        copies.join("qa/shop/job-9/v0")
    );
    assert_eq!(
        std::fs::read(v0.join("kept.txt")).expect("kept data is still there"),
        b"the copy's own writes"
    );
}

/// The agent's shutdown waits for steps to let go of their apps, woken by
/// the release itself (no polling).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_comes_when_the_last_step_lets_go_of_its_app() {
    let bed = Bed::new(&["db"]).await;
    let holder = Holder {
        step: None,
        cancel: CancellationToken::new(),
    };
    let Ok(claim) = bed.ctx.claim("web", "shop", &holder) else {
        panic!("the app is free");
    };
    let ctx = bed.ctx.clone();
    let mut waiter = tokio::spawn(async move { ctx.idle().await });
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut waiter)
            .await
            .is_err(),
        "idle while a step holds an app"
    );
    drop(claim);
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("idle once released")
        .expect("task");
}

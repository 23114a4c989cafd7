//! Where applications run. One driver per kind of platform: `host`
//! (systemd units or command pairs, declared in the agent config) and
//! `containers` (a Docker Engine API: Docker or Podman); Kubernetes later.
//! Every driver describes apps in the ferry-core model (`App`,
//! `Component`, `ComponentKind`, `Volume`).
//!
//! A driver is built from capabilities, each a trait it implements or not:
//! - *workloads* ([`Driver`], every driver): its apps, their status, and
//!   stopping a component against a [`Receipt`] read before the stop (what
//!   exactly to put back: a unit, a container id and its restart policy),
//!   which the journal keeps, and starting it again from that receipt;
//! - *capture* ([`Capture`]): the config and images of an app, stored in
//!   the backup beside its volumes;
//! - *volume access* ([`Volumes`], every driver): a readable source for
//!   each volume a backup copies (a host directory, a container volume's
//!   mount point) and a writable target for each volume a restore fills
//!   (a directory under the copies root, a container volume made for the
//!   copy);
//! - *copies* ([`Copies`]): a copy made from a backup's manifest with
//!   identities of its own, its volumes the targets restored, and removing
//!   an app.
//!
//! [`Platforms`] is the agent's list of drivers: an app belongs to the
//! first that says it owns it. Adding a driver touches its own module, the
//! agent config and its component kind.

pub mod containers;
pub mod host;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
pub use ferry_core::{App, ComponentRef, ComponentState};
use ferry_core::{AppName, CodedError, ErrorCode, TeamName, Volume};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("{component} is not known to this agent")]
    UnknownComponent { component: Box<ComponentRef> },
    #[error("cannot run {action} for {component}: {source}")]
    Spawn {
        action: &'static str,
        component: Box<ComponentRef>,
        #[source]
        source: std::io::Error,
    },
    /// The command ran and failed; trying again may or may not help.
    #[error("{action} of {component} failed with {status}{}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    CommandFailed {
        action: &'static str,
        component: Box<ComponentRef>,
        status: String,
        stderr: String,
    },
    /// A retry may help.
    #[error("app registry {}: {reason}", path.display())]
    Registry {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("app {team}/{app} already exists on this agent")]
    AppExists {
        team: ferry_core::TeamName,
        app: ferry_core::AppName,
    },
    /// The container engine cannot be reached or refused a call.
    #[error("container engine at {socket}: {reason}")]
    Engine { socket: String, reason: String },
    #[error("not supported: {what}")]
    Unsupported { what: String },
    /// A copy's definition cannot be made from the original's.
    #[error("a copy of app {app}: {reason}")]
    BadCopy { app: String, reason: String },
    #[error("volume {volume} of {app} is gone")]
    VolumeGone { app: String, volume: String },
    #[error(
        "volume {name} already exists and is not this restore's; restore under another name, or remove the volume"
    )]
    VolumeTaken { name: String },
    #[error("no free port above {from} for {name}")]
    NoFreePort { name: String, from: u16 },
    /// A journal's receipt its driver cannot read.
    #[error("the receipt of {component} is unreadable: {reason}")]
    BadReceipt {
        component: Box<ComponentRef>,
        reason: String,
    },
    #[error("{action} of {component} did not finish within {secs} seconds")]
    Timeout {
        action: &'static str,
        component: Box<ComponentRef>,
        secs: u64,
    },
}

impl CodedError for PlatformError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownComponent { .. } => ErrorCode::NotFound,
            Self::VolumeGone { .. } => ErrorCode::FailedPrecondition,
            Self::VolumeTaken { .. } => ErrorCode::AlreadyExists,
            // The program is missing or cannot run, or it ran and failed:
            // the host must change before a retry helps.
            Self::Spawn { .. } | Self::CommandFailed { .. } => ErrorCode::FailedPrecondition,
            Self::Timeout { .. } => ErrorCode::DeadlineExceeded,
            Self::Registry { .. } | Self::BadReceipt { .. } => ErrorCode::Internal,
            Self::AppExists { .. } => ErrorCode::AlreadyExists,
            Self::Engine { .. } => ErrorCode::Unavailable,
            Self::Unsupported { .. } | Self::BadCopy { .. } => ErrorCode::FailedPrecondition,
            Self::NoFreePort { .. } => ErrorCode::Unavailable,
        }
    }
}

/// What Ferry needs to put a stopped component back exactly as it was:
/// read by its driver before the stop, kept in the journal until the
/// component runs again, and given back to the driver to start it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// The driver that made it, and starts the component again.
    pub driver: String,
    pub component: ComponentRef,
    /// The driver's own record (a container's id and restart policy);
    /// null when it needs none.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

/// What a stop or a start that succeeded has to say, for the backup's
/// record, beyond "done as asked" (`the engine killed it at the 20 s stop
/// timeout`); none when it went as asked.
pub type Remark = Option<String>;

/// Workloads: what every driver does.
#[async_trait]
pub trait Driver: Send + Sync {
    /// The driver's name, as the component kinds it runs name it
    /// ([`ferry_core::ComponentKind::driver`]).
    fn name(&self) -> &'static str;

    /// Whether `team/app` is this driver's, told without asking the
    /// platform; an app is the first owning driver's in the agent's list.
    fn owns(&self, team: &TeamName, app: &AppName) -> bool;

    /// The driver's apps, with each component's current state.
    async fn inventory(&self) -> Result<Vec<App>, PlatformError>;

    /// An app's definition, if the driver has it (component states as the
    /// driver knows them without asking: unknown for the host driver).
    async fn app(&self, team: &TeamName, app: &AppName) -> Result<Option<App>, PlatformError>;

    /// Whether a component runs.
    async fn status(&self, component: &ComponentRef) -> Result<ComponentState, PlatformError>;

    /// What stopping `component` now would have to put back, read before
    /// anything changes (the journal records it before the stop).
    async fn receipt(&self, component: &ComponentRef) -> Result<Receipt, PlatformError>;

    /// Stops the component of `receipt`; returns when it has stopped,
    /// with what the record should say of how (the engine killed it).
    async fn stop(&self, receipt: &Receipt) -> Result<Remark, PlatformError>;

    /// Puts the component of `receipt` back: starts it unless it already
    /// runs (someone else started it), and restores whatever the stop set
    /// aside. Returns once it runs as the driver defines it, with what the
    /// record should say of how (its health was never known).
    async fn start(&self, receipt: &Receipt) -> Result<Remark, PlatformError>;

    /// The longest a stop this driver began may still go on after the
    /// caller stopped waiting for it (the agent was killed, or the call
    /// timed out while the platform went on): a component Ferry stopped
    /// that is found running is taken for running only once this has
    /// passed.
    fn stop_deadline(&self) -> std::time::Duration;

    /// Runs one of a component's hooks (`pre_backup`, `post_backup`,
    /// `pre_stop`) in its context; fails if the command does.
    async fn hook(
        &self,
        component: &ComponentRef,
        which: &'static str,
        argv: &ferry_core::Argv,
    ) -> Result<(), PlatformError>;

    /// The driver's volume access.
    fn volumes(&self) -> &dyn Volumes;

    /// The driver's capture capability, if it has one.
    fn capture(&self) -> Option<&dyn Capture> {
        None
    }

    /// The driver's copies capability, if it has one.
    fn copies(&self) -> Option<&dyn Copies> {
        None
    }
}

/// Capture: an app's config and images, into a backup.
#[async_trait]
pub trait Capture: Send + Sync {
    /// Writes the images `app`'s components run into `dest`, as one archive
    /// the platform can load, and the components' captured config beside it
    /// (`containers.json`); returns what it exported (references or ids)
    /// and the archive's size, or none when the app has no images.
    async fn capture(
        &self,
        app: &App,
        dest: &Path,
    ) -> Result<Option<(Vec<String>, u64)>, PlatformError>;
}

/// The copy `team/name` that the restoring job `job` makes.
#[derive(Clone, Copy, Debug)]
pub struct CopyId<'a> {
    pub team: &'a TeamName,
    pub name: &'a AppName,
    pub job: u64,
}

/// Volume access: where a backup reads an app's volumes, and where a
/// restore writes a copy's.
#[async_trait]
pub trait Volumes: Send + Sync {
    /// Where a backup reads `volume` of `app` now: a directory the agent
    /// can read. Asked before anything stops; a volume that is gone is an
    /// error naming it.
    async fn source(&self, app: &App, volume: &Volume) -> Result<PathBuf, PlatformError>;

    /// An empty directory the agent can write, for the volume of `copy`
    /// made from volume number `index` of `original` (the backed-up app),
    /// reachable by the copy's own user. What an earlier attempt of the
    /// same job left there is cleared; anything else by that name is
    /// refused, never cleared.
    async fn target(
        &self,
        copy: CopyId<'_>,
        original: &App,
        index: usize,
    ) -> Result<PathBuf, PlatformError>;

    /// Deletes every target made for `copy`, which was never registered
    /// (its restore failed).
    async fn discard(&self, copy: CopyId<'_>) -> Result<(), PlatformError>;
}

/// The directory under which copies' volumes that are plain directories
/// are restored (every host copy's, a container copy's binds): one home
/// per copy and restoring job, `ROOT/TEAM/APP/job-N`, so an attempt of the
/// job clears only what it left, never what another job left (a copy
/// removed with its data kept).
#[derive(Clone, Debug)]
pub struct CopiesRoot(PathBuf);

impl CopiesRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self(root.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    fn home(&self, copy: CopyId<'_>) -> PathBuf {
        self.0
            .join(copy.team.as_str())
            .join(copy.name.as_str())
            .join(format!("job-{}", copy.job))
    }

    /// `HOME/vINDEX`, empty: every directory Ferry makes on the way is
    /// 0711 (whatever the umask), so the copy's own user passes through to
    /// its volumes (which get the backed-up directories' owners and modes)
    /// without listing anything.
    pub async fn target(&self, copy: CopyId<'_>, index: usize) -> Result<PathBuf, PlatformError> {
        let root = self.0.clone();
        let home = self.home(copy);
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::PermissionsExt;
            let app_dir = home.parent().expect("invariant: job-N has a parent");
            let team_dir = app_dir.parent().expect("invariant: APP has a parent");
            for dir in [&root, team_dir, app_dir, &home] {
                if dir.is_dir() {
                    continue;
                }
                std::fs::create_dir_all(dir)
                    .and_then(|()| {
                        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
                    })
                    .map_err(|e| PlatformError::Registry {
                        path: dir.to_path_buf(),
                        reason: format!("cannot create the copies directory: {e}"),
                    })?;
            }
            let target = home.join(format!("v{index}"));
            // What an interrupted attempt of this job left goes first.
            match std::fs::remove_dir_all(&target) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(PlatformError::Registry {
                        path: target,
                        reason: format!("cannot clear an earlier attempt's volume: {e}"),
                    });
                }
            }
            std::fs::create_dir(&target).map_err(|e| PlatformError::Registry {
                path: target.clone(),
                reason: format!("cannot create the copy's volume: {e}"),
            })?;
            Ok(target)
        })
        .await
        .map_err(|e| PlatformError::Registry {
            path: self.0.clone(),
            reason: e.to_string(),
        })?
    }

    /// Deletes the home of `copy` with everything in it (only what its
    /// job's restore wrote).
    pub async fn discard(&self, copy: CopyId<'_>) -> Result<(), PlatformError> {
        let home = self.home(copy);
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&home) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(PlatformError::Registry {
                path: home,
                reason: format!("cannot delete a failed restore's volumes: {e}"),
            }),
        })
        .await
        .map_err(|e| PlatformError::Registry {
            path: self.0.clone(),
            reason: e.to_string(),
        })?
    }
}

/// Copies: restored apps of the driver's kind, and removing apps.
#[async_trait]
pub trait Copies: Send + Sync {
    /// Makes `original` (from a backup's manifest) the copy `copy`: the
    /// driver derives the copy's definition (its volumes at `paths`, the
    /// targets [`Volumes::target`] gave, and whatever identities its platform needs anew: for the
    /// host driver, volume paths in commands and `{port:…}` templates moved
    /// off ports in use) and registers it durably. Not started yet.
    async fn add(&self, copy: NewCopy<'_>) -> Result<Copied, PlatformError>;

    /// The job that restored the copy `team/app`; none if it is no copy.
    fn job_of(&self, team: &TeamName, app: &AppName) -> Option<u64>;

    /// The ports moved when the copy `team/app` was made (`NAME=PORT`).
    fn remapped_ports_of(&self, team: &TeamName, app: &AppName) -> Vec<String>;

    /// Removes `team/app`, already stopped: a copy is unregistered (its
    /// volumes deleted with `delete_data`), a declared app retired (hidden
    /// from then on, its data never deleted). Whether it was there.
    async fn remove(
        &self,
        team: &TeamName,
        app: &AppName,
        delete_data: bool,
    ) -> Result<bool, PlatformError>;
}

/// What a restore asks a driver to make a copy of.
pub struct NewCopy<'a> {
    pub original: &'a App,
    pub copy: CopyId<'a>,
    /// The restored volumes, in the order of the original's.
    pub paths: &'a [PathBuf],
}

/// A copy as registered: its definition, and the ports moved
/// (`NAME=PORT`) for the job's result.
pub struct Copied {
    pub app: App,
    pub remapped_ports: Vec<String>,
}

/// The agent's drivers, in order: an app is the first owning driver's.
pub struct Platforms {
    drivers: Vec<Arc<dyn Driver>>,
    /// Each driver's apps as last listed, reported (their states unknown)
    /// while it cannot list them: an engine that is away does not make its
    /// apps vanish from the controller, whose jobs on them then fail with
    /// the engine's error.
    listed: std::sync::Mutex<std::collections::HashMap<&'static str, Vec<App>>>,
}

impl Platforms {
    pub fn new(drivers: Vec<Arc<dyn Driver>>) -> Self {
        Self {
            drivers,
            listed: std::sync::Mutex::default(),
        }
    }

    /// The drivers' names, reported in the agent's hello (`host+containers`).
    pub fn name(&self) -> String {
        let names: Vec<&str> = self.drivers.iter().map(|d| d.name()).collect();
        names.join("+")
    }

    /// The drivers whose apps this agent restores copies of (told to the
    /// controller, which refuses a restore no agent can make before
    /// anything stops).
    pub fn restores(&self) -> Vec<&'static str> {
        self.drivers
            .iter()
            .filter(|d| d.copies().is_some())
            .map(|d| d.name())
            .collect()
    }

    fn owner(&self, team: &TeamName, app: &AppName) -> Option<&dyn Driver> {
        self.drivers
            .iter()
            .find(|d| d.owns(team, app))
            .map(|d| d.as_ref())
    }

    fn owner_of(&self, c: &ComponentRef) -> Result<&dyn Driver, PlatformError> {
        self.owner(&c.team, &c.app)
            .ok_or_else(|| PlatformError::UnknownComponent {
                component: Box::new(c.clone()),
            })
    }

    fn named(&self, name: &str) -> Option<&dyn Driver> {
        self.drivers
            .iter()
            .find(|d| d.name() == name)
            .map(|d| d.as_ref())
    }

    /// Every driver's apps, each app from its owner only. A driver that
    /// cannot list its apps is logged, and the apps it listed last are
    /// reported with their states unknown; no driver listing any is an
    /// error.
    pub async fn inventory(&self) -> Result<Vec<App>, PlatformError> {
        let mut apps = Vec::new();
        let mut first_err = None;
        let mut listed = false;
        for (i, d) in self.drivers.iter().enumerate() {
            let mine = match d.inventory().await {
                Ok(more) => {
                    listed = true;
                    self.listed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(d.name(), more.clone());
                    more
                }
                Err(e) => {
                    tracing::warn!(driver = d.name(), error = %e, "apps not listed; those listed last are reported, their states unknown");
                    first_err.get_or_insert(e);
                    let mut last = self
                        .listed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(d.name())
                        .cloned()
                        .unwrap_or_default();
                    for c in last.iter_mut().flat_map(|a| a.components.iter_mut()) {
                        c.state = ComponentState::Unknown;
                    }
                    last
                }
            };
            apps.extend(
                mine.into_iter()
                    .filter(|a| !self.drivers[..i].iter().any(|e| e.owns(&a.team, &a.name))),
            );
        }
        match first_err {
            Some(e) if !listed => Err(e),
            _ => Ok(apps),
        }
    }

    pub async fn app(&self, team: &TeamName, app: &AppName) -> Result<Option<App>, PlatformError> {
        match self.owner(team, app) {
            Some(d) => d.app(team, app).await,
            None => Ok(None),
        }
    }

    pub async fn status(&self, c: &ComponentRef) -> Result<ComponentState, PlatformError> {
        self.owner_of(c)?.status(c).await
    }

    pub async fn receipt(&self, c: &ComponentRef) -> Result<Receipt, PlatformError> {
        self.owner_of(c)?.receipt(c).await
    }

    /// The driver a receipt names, or (a receipt from before receipts
    /// named one) the component's owner.
    fn maker(&self, r: &Receipt) -> Result<&dyn Driver, PlatformError> {
        if r.driver.is_empty() {
            return self.owner_of(&r.component);
        }
        self.named(&r.driver)
            .ok_or_else(|| PlatformError::Unsupported {
                what: format!(
                    "{} was stopped by the {} driver, which this agent no longer runs",
                    r.component, r.driver
                ),
            })
    }

    pub async fn stop(&self, r: &Receipt) -> Result<Remark, PlatformError> {
        self.maker(r)?.stop(r).await
    }

    /// How long a stop of the receipt's component may still go on
    /// ([`Driver::stop_deadline`]); the longest of all drivers when its
    /// driver is not known.
    pub fn stop_deadline(&self, r: &Receipt) -> std::time::Duration {
        match self.maker(r) {
            Ok(d) => d.stop_deadline(),
            Err(_) => self
                .drivers
                .iter()
                .map(|d| d.stop_deadline())
                .max()
                .unwrap_or_default(),
        }
    }

    pub async fn start(&self, r: &Receipt) -> Result<Remark, PlatformError> {
        self.maker(r)?.start(r).await
    }

    /// Starts a component Ferry did not stop (a copy just registered).
    pub async fn start_component(&self, c: &ComponentRef) -> Result<Remark, PlatformError> {
        let receipt = self.receipt(c).await?;
        self.start(&receipt).await
    }

    pub async fn hook(
        &self,
        c: &ComponentRef,
        which: &'static str,
        argv: &ferry_core::Argv,
    ) -> Result<(), PlatformError> {
        self.owner_of(c)?.hook(c, which, argv).await
    }

    /// Where a backup reads `volume` of `app` ([`Volumes::source`]).
    pub async fn source(&self, app: &App, volume: &Volume) -> Result<PathBuf, PlatformError> {
        let d = self
            .owner(&app.team, &app.name)
            .ok_or_else(|| PlatformError::Unsupported {
                what: format!("{}/{}: no driver of this agent has it", app.team, app.name),
            })?;
        d.volumes().source(app, volume).await
    }

    /// Captures `app`'s config and images into `dest` when its driver can;
    /// none when it has nothing to capture.
    pub async fn capture(
        &self,
        app: &App,
        dest: &Path,
    ) -> Result<Option<(Vec<String>, u64)>, PlatformError> {
        match self.owner(&app.team, &app.name).and_then(|d| d.capture()) {
            Some(c) => c.capture(app, dest).await,
            None => Ok(None),
        }
    }

    /// The volume access and copies of the driver named `driver`, for a
    /// restore of one of its apps.
    pub fn copies_by(&self, driver: &str) -> Result<(&dyn Volumes, &dyn Copies), PlatformError> {
        self.named(driver)
            .and_then(|d| Some((d.volumes(), d.copies()?)))
            .ok_or_else(|| PlatformError::Unsupported {
                what: format!("restoring apps of the {driver} driver on this agent"),
            })
    }

    /// The copies capability of `team/app`'s driver, for removing it.
    pub fn copies_of(&self, team: &TeamName, app: &AppName) -> Result<&dyn Copies, PlatformError> {
        let d = self
            .owner(team, app)
            .ok_or_else(|| PlatformError::Unsupported {
                what: format!("{team}/{app}: no driver of this agent has it"),
            })?;
        d.copies().ok_or_else(|| PlatformError::Unsupported {
            what: format!(
                "removing {team}/{app}: the {} driver cannot remove apps yet",
                d.name()
            ),
        })
    }
}

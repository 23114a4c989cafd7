//! Where applications run. One trait, one driver per kind of cluster:
//! `host` (systemd units or command pairs, declared in the agent config)
//! and `containers` (a Docker Engine API: Docker or Podman); Kubernetes
//! later. Every driver describes apps in the ferry-core model (`App`,
//! `Component`, `ComponentKind`, `Volume`). [`Platforms`] puts the host
//! driver and an optional container engine behind the one trait.

pub mod containers;
pub mod host;

use std::sync::Arc;

use async_trait::async_trait;
pub use ferry_core::{App, ComponentRef, ComponentState};
use ferry_core::{CodedError, ErrorCode};

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
    #[error("no free port above {from} for {name}")]
    NoFreePort { name: String, from: u16 },
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
            // The program is missing or cannot run, or it ran and failed:
            // the host must change before a retry helps.
            Self::Spawn { .. } | Self::CommandFailed { .. } => ErrorCode::FailedPrecondition,
            Self::Timeout { .. } => ErrorCode::DeadlineExceeded,
            Self::Registry { .. } => ErrorCode::Internal,
            Self::AppExists { .. } => ErrorCode::AlreadyExists,
            Self::Engine { .. } => ErrorCode::Unavailable,
            Self::Unsupported { .. } | Self::BadCopy { .. } => ErrorCode::FailedPrecondition,
            Self::NoFreePort { .. } => ErrorCode::Unavailable,
        }
    }
}

/// What every platform driver can do.
#[async_trait]
pub trait Platform: Send + Sync {
    /// The driver's name, reported in the agent's hello ("host", …).
    fn name(&self) -> &'static str;

    /// The apps this agent manages, in the ferry-core model, with each
    /// component's current state.
    async fn inventory(&self) -> Result<Vec<App>, PlatformError>;

    /// Whether a component runs.
    async fn status(&self, component: &ComponentRef) -> Result<ComponentState, PlatformError>;

    /// Stops a component; returns when it has stopped.
    async fn stop(&self, component: &ComponentRef) -> Result<(), PlatformError>;

    /// Starts a component; returns when the start command has succeeded.
    async fn start(&self, component: &ComponentRef) -> Result<(), PlatformError>;

    /// Runs one of a component's hooks (`pre_backup`, `post_backup`) in its
    /// context; fails if the command does.
    async fn hook(
        &self,
        component: &ComponentRef,
        which: &'static str,
        argv: &ferry_core::Argv,
    ) -> Result<(), PlatformError>;

    /// Writes the images `app`'s components run into `dest`, as one archive
    /// the engine can load, and the components' captured config beside it
    /// (`containers.json`); returns what it exported (references or ids)
    /// and the archive's size, or none when the platform has no images (the
    /// host driver).
    async fn export_images(
        &self,
        _app: &App,
        _dest: &std::path::Path,
    ) -> Result<Option<(Vec<String>, u64)>, PlatformError> {
        Ok(None)
    }

    /// Where restored copies' volumes go; none: this agent makes no copies.
    fn copies_dir(&self) -> Option<std::path::PathBuf>;

    /// The drivers whose apps this agent restores copies of (told to the
    /// controller, which refuses a restore no agent can make before
    /// anything stops).
    fn restores(&self) -> Vec<&'static str>;

    /// An app's definition, if the agent has it (component states as the
    /// driver knows them: unknown for the host driver).
    async fn app(
        &self,
        team: &ferry_core::TeamName,
        app: &ferry_core::AppName,
    ) -> Result<Option<App>, PlatformError>;

    /// The job that restored the copy `team/app`; none if it is no copy.
    fn copy_job(&self, team: &ferry_core::TeamName, app: &ferry_core::AppName) -> Option<u64>;

    /// Makes `original` (from a backup's manifest) a copy of this agent,
    /// named `team/name`, for job `job`: the driver derives the copy's
    /// definition (its volumes at `paths`, and whatever identities its
    /// platform needs anew: for the host driver, volume paths in commands
    /// and `{port:…}` templates moved off ports in use) and registers it
    /// durably. Not started yet.
    async fn add_copy(&self, copy: NewCopy<'_>) -> Result<Copied, PlatformError>;

    /// Unregisters a copy, or retires a declared app (hidden from then on);
    /// returns its definition, none if there was no such app.
    async fn forget_app(
        &self,
        team: &ferry_core::TeamName,
        app: &ferry_core::AppName,
    ) -> Result<Option<App>, PlatformError>;
}

/// What a restore asks a driver to make a copy of.
pub struct NewCopy<'a> {
    pub original: &'a App,
    pub team: &'a ferry_core::TeamName,
    pub name: &'a ferry_core::AppName,
    /// The restored volumes, in the order of the original's.
    pub paths: &'a [std::path::PathBuf],
    pub job: u64,
}

/// A copy as registered: its definition, and the ports moved
/// (`NAME=PORT`) for the job's result.
pub struct Copied {
    pub app: App,
    pub remapped_ports: Vec<String>,
}

/// The host driver, and a container engine when the agent config names
/// one: an app is the host's if the agent config (or a restored copy)
/// declares it, else the engine's.
pub struct Platforms {
    pub host: Arc<host::HostPlatform>,
    pub containers: Option<Arc<containers::ContainerPlatform>>,
}

impl Platforms {
    fn driver(&self, team: &ferry_core::TeamName, app: &ferry_core::AppName) -> &dyn Platform {
        match &self.containers {
            Some(c) if !self.host.declares(team, app) => c.as_ref(),
            _ => self.host.as_ref(),
        }
    }
}

#[async_trait]
impl Platform for Platforms {
    fn name(&self) -> &'static str {
        if self.containers.is_some() {
            "host+containers"
        } else {
            "host"
        }
    }

    async fn inventory(&self) -> Result<Vec<App>, PlatformError> {
        let mut apps = self.host.inventory().await?;
        if let Some(c) = &self.containers {
            match c.inventory().await {
                Ok(more) => apps.extend(
                    more.into_iter()
                        .filter(|a| !self.host.declares(&a.team, &a.name)),
                ),
                // The host's apps are still reported.
                Err(e) => tracing::warn!(error = %e, "container apps not listed"),
            }
        }
        Ok(apps)
    }

    async fn status(&self, c: &ComponentRef) -> Result<ComponentState, PlatformError> {
        self.driver(&c.team, &c.app).status(c).await
    }

    async fn stop(&self, c: &ComponentRef) -> Result<(), PlatformError> {
        self.driver(&c.team, &c.app).stop(c).await
    }

    async fn start(&self, c: &ComponentRef) -> Result<(), PlatformError> {
        self.driver(&c.team, &c.app).start(c).await
    }

    async fn hook(
        &self,
        c: &ComponentRef,
        which: &'static str,
        argv: &ferry_core::Argv,
    ) -> Result<(), PlatformError> {
        self.driver(&c.team, &c.app).hook(c, which, argv).await
    }

    async fn export_images(
        &self,
        app: &App,
        dest: &std::path::Path,
    ) -> Result<Option<(Vec<String>, u64)>, PlatformError> {
        self.driver(&app.team, &app.name)
            .export_images(app, dest)
            .await
    }

    fn copies_dir(&self) -> Option<std::path::PathBuf> {
        self.host.copies_dir()
    }

    fn restores(&self) -> Vec<&'static str> {
        let mut all = self.host.restores();
        if let Some(c) = &self.containers {
            all.extend(c.restores());
        }
        all
    }

    async fn app(
        &self,
        team: &ferry_core::TeamName,
        app: &ferry_core::AppName,
    ) -> Result<Option<App>, PlatformError> {
        self.driver(team, app).app(team, app).await
    }

    fn copy_job(&self, team: &ferry_core::TeamName, app: &ferry_core::AppName) -> Option<u64> {
        self.host.copy_job(team, app)
    }

    async fn add_copy(&self, copy: NewCopy<'_>) -> Result<Copied, PlatformError> {
        let host = copy
            .original
            .components
            .iter()
            .all(|c| matches!(c.kind, ferry_core::ComponentKind::Host(_)));
        match &self.containers {
            Some(c) if !host => c.add_copy(copy).await,
            _ => self.host.add_copy(copy).await,
        }
    }

    async fn forget_app(
        &self,
        team: &ferry_core::TeamName,
        app: &ferry_core::AppName,
    ) -> Result<Option<App>, PlatformError> {
        self.driver(team, app).forget_app(team, app).await
    }
}

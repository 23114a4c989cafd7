//! Where applications run. One trait, one driver per kind of cluster:
//! `host` (systemd units or command pairs, declared in the agent config)
//! today; containers and Kubernetes later. Every driver describes apps in
//! the ferry-core model (`App`, `Component`, `ComponentKind`, `Volume`).

pub mod host;

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

    /// Where restored copies' volumes go; none: this agent makes no copies.
    fn copies_dir(&self) -> Option<std::path::PathBuf>;

    /// An app's definition (component states unknown), if the agent has it.
    fn app(&self, team: &ferry_core::TeamName, app: &ferry_core::AppName) -> Option<App>;

    /// The job that restored the copy `team/app`; none if it is no copy.
    fn copy_job(&self, team: &ferry_core::TeamName, app: &ferry_core::AppName) -> Option<u64>;

    /// Ports the apps' commands declare, so that a copy picks others.
    fn ports_in_use(&self) -> Vec<u16>;

    /// Registers, durably, a copy restored by job `job`.
    async fn add_copy(&self, app: App, job: u64) -> Result<(), PlatformError>;

    /// Unregisters a copy, or retires a declared app (hidden from then on);
    /// returns its definition, none if there was no such app.
    async fn forget_app(
        &self,
        team: &ferry_core::TeamName,
        app: &ferry_core::AppName,
    ) -> Result<Option<App>, PlatformError>;
}

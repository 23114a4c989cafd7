//! Where applications run. One trait, one driver per kind of cluster:
//! `host` (systemd units or command pairs, declared in the agent config)
//! today; containers and Kubernetes later.

pub mod host;

use std::path::PathBuf;

use async_trait::async_trait;

/// Identifies one component: app (within its team) and component name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ComponentRef {
    pub team: String,
    pub app: String,
    pub component: String,
}

impl std::fmt::Display for ComponentRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "component {} of app {}/{}",
            self.component, self.team, self.app
        )
    }
}

/// How the platform runs a component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentKind {
    SystemdUnit {
        unit: String,
    },
    Commands {
        start: Vec<String>,
        stop: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentState {
    Running,
    Stopped,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    pub name: String,
    pub kind: ComponentKind,
    pub stateful: bool,
    pub volumes: Vec<PathBuf>,
    pub state: ComponentState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    pub name: String,
    pub team: String,
    pub components: Vec<Component>,
}

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
    #[error("{action} of {component} did not finish within {secs} seconds")]
    Timeout {
        action: &'static str,
        component: Box<ComponentRef>,
        secs: u64,
    },
}

impl PlatformError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }
}

/// What every platform driver can do.
#[async_trait]
pub trait Platform: Send + Sync {
    /// The driver's name, reported in the agent's hello ("host", …).
    fn name(&self) -> &'static str;

    /// The apps this agent manages, with each component's current state.
    async fn inventory(&self) -> Result<Vec<App>, PlatformError>;

    /// Whether a component runs.
    async fn status(&self, component: &ComponentRef) -> Result<ComponentState, PlatformError>;

    /// Stops a component; returns when it has stopped.
    async fn stop(&self, component: &ComponentRef) -> Result<(), PlatformError>;

    /// Starts a component; returns when the start command has succeeded.
    async fn start(&self, component: &ComponentRef) -> Result<(), PlatformError>;
}

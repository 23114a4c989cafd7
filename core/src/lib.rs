//! Ferry's domain model, shared by every crate and free of IO.
//!
//! - [`name`]: identifiers as validated newtypes (`ClusterName`, `AppName`,
//!   `BackupId`, …), checked once when built.
//! - [`model`]: the application model every platform driver fills (`App`,
//!   `Component`, `ComponentKind`, `Volume`).
//! - [`error`]: error codes with a retry class, which every layer's error
//!   reports through [`CodedError`].
//! - [`duration`]: the one duration syntax (`30s`, `15m`, `24h`, `7d`, `1h30m`).
//! - [`backup`]: what an application backup is, its manifest.
//! - [`clock`]: wall-clock time as Unix milliseconds.
//!
//! Wire types (`ferry.v1`) and their conversions live in `ferry-proto`.

pub mod backup;
pub mod clock;
pub mod duration;
pub mod error;
pub mod model;
pub mod name;
pub mod report;

pub use backup::{AppManifest, BackupMode, BackupTimings, ImagesSnapshot, VolumeSnapshot};
pub use clock::{Timestamp, now_ms};
pub use duration::{DurationError, HumanDuration};
pub use error::{CodedError, ErrorCode, RetryClass};
pub use model::{
    App, Argv, Component, ComponentKind, ComponentRef, ComponentState, ContainerComponent,
    ContainerMount, Hooks, HostComponent, HostPath, Inventory, ModelError, ModelProblem,
    MountBackup, UnitName, Volume,
};
pub use name::{
    AgentId, AppName, BackupId, ClusterName, ComponentName, JobId, LocationName, NameError,
    NodeName, TeamName, VolumeName,
};
pub use report::Chain;

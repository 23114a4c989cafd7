//! The application model every platform driver fills.
//!
//! An [`App`] is a group of [`Component`]s owned by one team, with the
//! [`Volume`]s holding its persistent data. What is specific to a kind of
//! platform sits in a typed enum, [`ComponentKind`]: today
//! [`ComponentKind::Host`] (systemd units or start/stop commands); container
//! and Kubernetes workloads get their own variants with their drivers.
//!
//! Field values are validated by their types (names, paths, commands);
//! what relates fields to each other (unique names, references to volumes
//! and dependencies that exist, no dependency cycles) by [`App::validate`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::error::{CodedError, ErrorCode};
use crate::name::{AppName, ComponentName, NameError, TeamName, VolumeName};

/// Longest path Ferry accepts (Linux PATH_MAX).
const PATH_MAX: usize = 4096;
/// Longest systemd unit name (systemd's own limit).
const UNIT_MAX: usize = 256;

/// An absolute, plain directory on a node: no `.` or `..`, no NUL.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPath(String);

impl HostPath {
    pub const KIND: &'static str = "volume path";

    /// Validates `value` and wraps it.
    pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
        let value = value.into();
        let bad = |reason| Err(NameError::new(Self::KIND, &value, reason));
        if value.is_empty() {
            return bad("must not be empty");
        }
        if value.len() > PATH_MAX {
            return bad("must be at most 4096 bytes");
        }
        if value.contains('\0') {
            return bad("must not contain NUL");
        }
        if !value.starts_with('/') || value.split('/').any(|s| s == "." || s == "..") {
            return bad("must be an absolute path without '.' or '..'");
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl TryFrom<String> for HostPath {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<HostPath> for String {
    fn from(p: HostPath) -> String {
        p.0
    }
}

impl fmt::Display for HostPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HostPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostPath({:?})", self.0)
    }
}

/// A systemd unit name (`postgresql@15-main.service`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UnitName(String);

impl UnitName {
    pub const KIND: &'static str = "systemd unit";

    /// Validates `value` and wraps it.
    pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
        let value = value.into();
        let bad = |reason| Err(NameError::new(Self::KIND, &value, reason));
        if value.trim().is_empty() {
            return bad("must not be empty");
        }
        if value.len() > UNIT_MAX {
            return bad("must be at most 256 bytes");
        }
        if value.contains('/') || value.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return bad("must not contain '/', spaces or control characters");
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UnitName {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<UnitName> for String {
    fn from(u: UnitName) -> String {
        u.0
    }
}

impl fmt::Display for UnitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UnitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UnitName({:?})", self.0)
    }
}

/// A command as argv: a program (not empty) and its arguments, no NUL.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Argv(Vec<String>);

impl Argv {
    pub const KIND: &'static str = "command";

    /// Validates `argv` and wraps it.
    pub fn new(argv: Vec<String>) -> Result<Self, NameError> {
        let shown = || argv.join(" ");
        match argv.first() {
            None => return Err(NameError::new(Self::KIND, "", "must not be empty")),
            Some(p) if p.trim().is_empty() => {
                return Err(NameError::new(Self::KIND, &shown(), "must name a program"));
            }
            Some(_) => {}
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(NameError::new(Self::KIND, &shown(), "must not contain NUL"));
        }
        Ok(Self(argv))
    }

    /// The program and its arguments.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

impl TryFrom<Vec<String>> for Argv {
    type Error = NameError;
    fn try_from(argv: Vec<String>) -> Result<Self, Self::Error> {
        Self::new(argv)
    }
}

impl From<Argv> for Vec<String> {
    fn from(a: Argv) -> Vec<String> {
        a.0
    }
}

/// How the host driver runs a component.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostComponent {
    /// A systemd unit: `systemctl start|stop|is-active`.
    Systemd { unit: UnitName },
    /// Commands declared in the agent's config; `status` exits 0 while the
    /// component runs (without it, the state is unknown).
    Commands {
        start: Argv,
        stop: Argv,
        #[serde(default)]
        status: Option<Argv>,
    },
}

/// What a component is on its platform. One variant per kind of platform;
/// containers and Kubernetes workloads come with their drivers. Not
/// `non_exhaustive` on purpose: a new kind must be handled by every
/// conversion and driver, and the compiler finds them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentKind {
    Host(HostComponent),
    Container(ContainerComponent),
}

impl ComponentKind {
    /// A short name for people and scripts: `systemd`, `commands`,
    /// `container`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Host(HostComponent::Systemd { .. }) => "systemd",
            Self::Host(HostComponent::Commands { .. }) => "commands",
            Self::Container(_) => "container",
        }
    }

    /// The platform driver that owns components of this kind (`host`,
    /// `containers`): an agent restores copies of an app only if it has
    /// the driver of each of its components.
    pub fn driver(&self) -> &'static str {
        match self {
            Self::Host(_) => "host",
            Self::Container(_) => "containers",
        }
    }
}

/// A container on a Docker Engine API (Docker or Podman), as the
/// containers driver saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerComponent {
    /// The engine's container id: Ferry stops and starts this container,
    /// never another one of the same name.
    pub id: String,
    /// The container's name (without Docker's leading `/`).
    pub name: String,
    /// The image as the container was created from (`Config.Image`).
    pub image: String,
    /// The image's id (`sha256:…`).
    pub image_id: String,
    /// Its mounts, each with what a backup does with it, decided when the
    /// driver lists the app (before anything stops).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<ContainerMount>,
}

/// A container's mount, as its engine reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerMount {
    /// Where the container sees it.
    pub destination: String,
    /// A named volume's name, or a bind's host path (empty for a tmpfs).
    #[serde(default)]
    pub source: String,
    /// The engine's type: `volume`, `bind`, `tmpfs`, …
    pub kind: String,
    #[serde(default)]
    pub read_only: bool,
    pub backup: MountBackup,
}

/// What a backup does with a mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "as", content = "why")]
pub enum MountBackup {
    /// Backed up as one of the app's volumes (a named volume, a bind of a
    /// directory).
    Volume,
    /// A bind of a single file, captured with the app's config.
    File,
    /// Recorded with the app's config, its data not backed up (a
    /// read-only bind of a host directory).
    Config,
    /// Left out, and why (a socket, a device, a tmpfs, a label).
    Skipped(String),
    /// Ferry cannot back it up, and why: a backup of the app is refused
    /// before anything stops.
    Refused(String),
}

impl MountBackup {
    /// Its code (`volume`, `file`, `config`, `skipped`, `refused`) and its
    /// reason (empty but for `skipped` and `refused`), as the wire and
    /// `-o json` carry it.
    pub fn code(&self) -> (&'static str, &str) {
        match self {
            Self::Volume => ("volume", ""),
            Self::File => ("file", ""),
            Self::Config => ("config", ""),
            Self::Skipped(why) => ("skipped", why),
            Self::Refused(why) => ("refused", why),
        }
    }

    /// The decision a code and a reason stand for; none for a code this
    /// version does not know.
    pub fn from_code(code: &str, why: String) -> Option<Self> {
        Some(match code {
            "volume" => Self::Volume,
            "file" => Self::File,
            "config" => Self::Config,
            "skipped" => Self::Skipped(why),
            "refused" => Self::Refused(why),
            _ => return None,
        })
    }

    /// A few words for people: `backed up as a volume`, `left out: a
    /// socket`, …
    pub fn describe(&self) -> String {
        match self {
            Self::Volume => "backed up as a volume".into(),
            Self::File => "file captured with the config".into(),
            Self::Config => "recorded as config, data not backed up".into(),
            Self::Skipped(why) => format!("left out: {why}"),
            Self::Refused(why) => format!("cannot be backed up: {why}"),
        }
    }
}

/// Whether a component was running when its driver looked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComponentState {
    Running,
    Stopped,
    /// The driver could not tell.
    #[default]
    Unknown,
}

impl ComponentState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ComponentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Persistent data of an app: a directory on the node. Container volumes
/// and Kubernetes claims are read through their node directory too.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Volume {
    /// The name the platform gives it; for the host driver, the path.
    pub name: VolumeName,
    pub path: HostPath,
}

/// One component of an application.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    pub name: ComponentName,
    pub kind: ComponentKind,
    /// Stateful components are stopped for a cold backup.
    pub stateful: bool,
    /// The app's volumes this component uses, by name.
    #[serde(default)]
    pub volumes: Vec<VolumeName>,
    /// Components of the same app that must run before this one (started
    /// first, stopped last).
    #[serde(default)]
    pub depends_on: Vec<ComponentName>,
    /// As the driver last saw it.
    #[serde(default)]
    pub state: ComponentState,
    /// Commands around a backup.
    #[serde(default, skip_serializing_if = "Hooks::is_empty")]
    pub hooks: Hooks,
}

/// Commands a driver runs in a component's context around a backup. Around
/// a `hot` backup, which does not stop it: `pre_backup` before its app's
/// volumes are copied (flush, freeze or checkpoint), `post_backup` after the
/// copy, whatever its outcome, for every component whose `pre_backup` ran.
/// In a `cold` backup, `pre_stop` just before the stop, while the component
/// still runs (a checkpoint, so that the stop and the delta pass are short).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hooks {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_backup: Option<Argv>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_backup: Option<Argv>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_stop: Option<Argv>,
}

impl Hooks {
    pub fn is_empty(&self) -> bool {
        self.pre_backup.is_none() && self.post_backup.is_none() && self.pre_stop.is_none()
    }

    /// Has a hook for `hot` backups.
    pub fn has_hot(&self) -> bool {
        self.pre_backup.is_some() || self.post_backup.is_some()
    }

    /// Every hook, with its name.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Argv)> {
        [
            ("pre_backup", &self.pre_backup),
            ("post_backup", &self.post_backup),
            ("pre_stop", &self.pre_stop),
        ]
        .into_iter()
        .filter_map(|(n, a)| a.as_ref().map(|a| (n, a)))
    }
}

/// An application: components and volumes owned by one team.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    pub name: AppName,
    pub team: TeamName,
    pub components: Vec<Component>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
}

/// What makes an app inconsistent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelProblem {
    #[error("component {component} is listed twice")]
    DuplicateComponent { component: ComponentName },
    #[error("volume {volume} is listed twice")]
    DuplicateVolume { volume: VolumeName },
    #[error("component {component} uses volume {volume}, which the app does not have")]
    UnknownVolume {
        component: ComponentName,
        volume: VolumeName,
    },
    #[error("component {component} lists volume {volume} twice")]
    VolumeUsedTwice {
        component: ComponentName,
        volume: VolumeName,
    },
    #[error("component {component} depends on {dependency}, which the app does not have")]
    UnknownDependency {
        component: ComponentName,
        dependency: ComponentName,
    },
    #[error("component {component} depends on itself, directly or through others")]
    DependencyCycle { component: ComponentName },
    #[error("the app is listed twice")]
    DuplicateApp,
}

/// An app that is not consistent, with the app named.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("app {app} of team {team}: {problem}")]
pub struct ModelError {
    pub app: AppName,
    pub team: TeamName,
    pub problem: ModelProblem,
}

impl CodedError for ModelError {
    fn code(&self) -> ErrorCode {
        ErrorCode::InvalidArgument
    }
}

impl App {
    /// The component called `name`.
    pub fn component(&self, name: &ComponentName) -> Option<&Component> {
        self.components.iter().find(|c| c.name == *name)
    }

    /// The mounts a backup of the app cannot take, each with its
    /// component and why (`db: /data: its source … does not exist`);
    /// empty when it can take them all.
    pub fn refused_mounts(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.components {
            if let ComponentKind::Container(k) = &c.kind {
                for m in &k.mounts {
                    if let MountBackup::Refused(why) = &m.backup {
                        out.push(format!("{}: {}: {why}", c.name, m.destination));
                    }
                }
            }
        }
        out
    }

    /// The volume called `name`.
    pub fn volume(&self, name: &VolumeName) -> Option<&Volume> {
        self.volumes.iter().find(|v| v.name == *name)
    }

    /// Where component `name` is in this app.
    pub fn reference(&self, component: &ComponentName) -> ComponentRef {
        ComponentRef {
            team: self.team.clone(),
            app: self.name.clone(),
            component: component.clone(),
        }
    }

    /// Checks what the field types cannot: unique component and volume
    /// names, references to volumes and components that exist, and
    /// dependencies without cycles.
    pub fn validate(&self) -> Result<(), ModelError> {
        let fail = |problem| ModelError {
            app: self.name.clone(),
            team: self.team.clone(),
            problem,
        };
        let mut volumes = BTreeSet::new();
        for v in &self.volumes {
            if !volumes.insert(&v.name) {
                return Err(fail(ModelProblem::DuplicateVolume {
                    volume: v.name.clone(),
                }));
            }
        }
        let mut components = BTreeMap::new();
        for c in &self.components {
            if components.insert(&c.name, c).is_some() {
                return Err(fail(ModelProblem::DuplicateComponent {
                    component: c.name.clone(),
                }));
            }
        }
        for c in &self.components {
            let mut used = BTreeSet::new();
            for v in &c.volumes {
                if !volumes.contains(v) {
                    return Err(fail(ModelProblem::UnknownVolume {
                        component: c.name.clone(),
                        volume: v.clone(),
                    }));
                }
                if !used.insert(v) {
                    return Err(fail(ModelProblem::VolumeUsedTwice {
                        component: c.name.clone(),
                        volume: v.clone(),
                    }));
                }
            }
            for d in &c.depends_on {
                if !components.contains_key(d) {
                    return Err(fail(ModelProblem::UnknownDependency {
                        component: c.name.clone(),
                        dependency: d.clone(),
                    }));
                }
            }
        }
        // Depth-first search; grey = on the current path.
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Grey,
            Black,
        }
        fn visit<'a>(
            c: &'a Component,
            all: &BTreeMap<&'a ComponentName, &'a Component>,
            marks: &mut BTreeMap<&'a ComponentName, Mark>,
        ) -> Result<(), ComponentName> {
            match marks.get(&c.name) {
                Some(Mark::Black) => return Ok(()),
                Some(Mark::Grey) => return Err(c.name.clone()),
                None => {}
            }
            marks.insert(&c.name, Mark::Grey);
            for d in &c.depends_on {
                if let Some(dep) = all.get(d) {
                    visit(dep, all, marks)?;
                }
            }
            marks.insert(&c.name, Mark::Black);
            Ok(())
        }
        let mut marks = BTreeMap::new();
        for c in &self.components {
            visit(c, &components, &mut marks)
                .map_err(|component| fail(ModelProblem::DependencyCycle { component }))?;
        }
        Ok(())
    }
}

/// Identifies one component: app (within its team) and component name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ComponentRef {
    pub team: TeamName,
    pub app: AppName,
    pub component: ComponentName,
}

impl fmt::Display for ComponentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "component {} of app {}/{}",
            self.component, self.team, self.app
        )
    }
}

/// Everything one agent reports: its apps, when it looked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inventory {
    pub apps: Vec<App>,
    pub taken_at: Timestamp,
}

impl Inventory {
    /// Every app is consistent and listed once per (team, name).
    pub fn validate(&self) -> Result<(), ModelError> {
        let mut seen = BTreeSet::new();
        for app in &self.apps {
            app.validate()?;
            if !seen.insert((&app.team, &app.name)) {
                return Err(ModelError {
                    app: app.name.clone(),
                    team: app.team.clone(),
                    problem: ModelProblem::DuplicateApp,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ComponentName {
        s.parse().expect("valid component name")
    }

    fn vol(s: &str) -> VolumeName {
        s.parse().expect("valid volume name")
    }

    fn component(n: &str, volumes: &[&str], deps: &[&str]) -> Component {
        Component {
            name: name(n),
            kind: ComponentKind::Host(HostComponent::Systemd {
                unit: UnitName::new(format!("{n}.service")).expect("unit"),
            }),
            stateful: true,
            volumes: volumes.iter().map(|v| vol(v)).collect(),
            depends_on: deps.iter().map(|d| name(d)).collect(),
            state: ComponentState::Running,
            hooks: Default::default(),
        }
    }

    fn app(components: Vec<Component>) -> App {
        App {
            name: "shop".parse().expect("app"),
            team: "web".parse().expect("team"),
            components,
            volumes: vec![Volume {
                name: vol("/srv/db"),
                path: HostPath::new("/srv/db").expect("path"),
            }],
        }
    }

    #[test]
    fn a_consistent_app_validates() {
        let a = app(vec![
            component("db", &["/srv/db"], &[]),
            component("web", &[], &["db"]),
        ]);
        assert_eq!(a.validate(), Ok(()));
        assert_eq!(
            a.component(&name("web")).map(|c| c.depends_on.len()),
            Some(1)
        );
        assert!(a.volume(&vol("/srv/db")).is_some());
        assert_eq!(
            a.reference(&name("db")).to_string(),
            "component db of app web/shop"
        );
    }

    #[test]
    fn inconsistencies_are_named() {
        let cases = [
            (
                app(vec![component("db", &[], &[]), component("db", &[], &[])]),
                "app shop of team web: component db is listed twice",
            ),
            (
                app(vec![component("db", &["/nope"], &[])]),
                "uses volume /nope, which the app does not have",
            ),
            (
                app(vec![component("db", &["/srv/db", "/srv/db"], &[])]),
                "lists volume /srv/db twice",
            ),
            (
                app(vec![component("web", &[], &["db"])]),
                "component web depends on db, which the app does not have",
            ),
            (
                app(vec![component("a", &[], &["a"])]),
                "component a depends on itself",
            ),
            (
                app(vec![
                    component("a", &[], &["b"]),
                    component("b", &[], &["c"]),
                    component("c", &[], &["a"]),
                ]),
                "depends on itself, directly or through others",
            ),
        ];
        for (a, needle) in cases {
            let err = a.validate().expect_err(needle);
            assert!(err.to_string().contains(needle), "{needle:?} not in {err}");
            assert_eq!(err.code(), ErrorCode::InvalidArgument);
        }
        let mut twice = app(vec![]);
        twice.volumes.push(twice.volumes[0].clone());
        assert!(matches!(
            twice.validate().expect_err("volume twice").problem,
            ModelProblem::DuplicateVolume { .. }
        ));
    }

    #[test]
    fn a_diamond_is_not_a_cycle() {
        let a = app(vec![
            component("top", &[], &["l", "r"]),
            component("l", &[], &["base"]),
            component("r", &[], &["base"]),
            component("base", &[], &[]),
        ]);
        assert_eq!(a.validate(), Ok(()));
    }

    #[test]
    fn an_inventory_lists_each_app_once() {
        let inv = Inventory {
            apps: vec![app(vec![]), app(vec![])],
            taken_at: Timestamp::from_unix_millis(1),
        };
        let err = inv.validate().expect_err("twice");
        assert_eq!(err.problem, ModelProblem::DuplicateApp);
    }

    #[test]
    fn host_paths_are_absolute_and_plain() {
        for ok in ["/", "/var/lib/postgresql/15/main", "/a b/c"] {
            assert!(HostPath::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "rel", "./a", "/a/../b", "/a/./b", "/a\0"] {
            let err = HostPath::new(bad).expect_err(bad);
            assert!(err.to_string().starts_with("invalid volume path"), "{err}");
        }
    }

    #[test]
    fn units_and_commands_are_checked() {
        assert!(UnitName::new("postgresql@15-main.service").is_ok());
        for bad in ["", " ", "a b", "a/b", "x\n"] {
            assert!(UnitName::new(bad).is_err(), "{bad:?}");
        }
        assert!(Argv::new(vec!["true".into()]).is_ok());
        assert!(Argv::new(vec![]).is_err());
        assert!(Argv::new(vec![" ".into(), "x".into()]).is_err());
        assert!(Argv::new(vec!["sh".into(), "a\0".into()]).is_err());
        assert!(serde_json::from_str::<Argv>("[]").is_err());
    }

    #[test]
    fn kind_labels_and_serde_shape() {
        let c = component("db", &[], &[]);
        assert_eq!(c.kind.label(), "systemd");
        let json = serde_json::to_value(&c.kind).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"host": {"systemd": {"unit": "db.service"}}})
        );
        let cmd = ComponentKind::Host(HostComponent::Commands {
            start: Argv::new(vec!["a".into()]).expect("argv"),
            stop: Argv::new(vec!["b".into()]).expect("argv"),
            status: None,
        });
        assert_eq!(cmd.label(), "commands");
        let back: ComponentKind =
            serde_json::from_value(serde_json::to_value(&cmd).expect("json")).expect("back");
        assert_eq!(back, cmd);
    }
}

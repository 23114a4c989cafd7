//! The containers driver: apps on a Docker Engine API (Docker Engine, or
//! Podman's Docker-compatible service), negotiating the API version.
//!
//! An app is a Compose project (`com.docker.compose.project`) or the
//! containers labelled `ferry.app`; its team is the `ferry.team` label or
//! the agent's default. A component is a container, named by its Compose
//! service or its container name; it is stateful when it mounts a named
//! volume or a bind (`ferry.stateful=true|false` overrides). Ferry stops
//! and starts the container by its id, never re-creating it. Before a stop,
//! a restart policy other than `no` is set to `no` (so a daemon restart in
//! the stopped window cannot bring the container back); the container's id
//! and the policy it had are its receipt, which the journal keeps until
//! Ferry has started it and put the policy back.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{
    ContainerInspectResponse, ContainerUpdateBody, HealthStatusEnum, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{ListContainersOptionsBuilder, StopContainerOptionsBuilder};
use ferry_core::{
    App, AppName, Argv, Component, ComponentKind, ComponentName, ComponentRef, ComponentState,
    ContainerComponent, ContainerMount, Hooks, HostPath, MountBackup, TeamName, Volume, VolumeName,
};
use tokio::sync::OnceCell;

use super::{Capture, CopiesRoot, CopyId, Driver, PlatformError, Receipt, Remark, Volumes};

/// Label naming a container's app (when it is no Compose project).
pub const APP_LABEL: &str = "ferry.app";
/// Label naming an app's team.
pub const TEAM_LABEL: &str = "ferry.team";
/// Label overriding whether a component is stateful (`true` / `false`).
pub const STATEFUL_LABEL: &str = "ferry.stateful";
/// Label choosing what a backup does with a container's mounts (on a
/// container: `true` backs up its read-only binds of directories too,
/// `false` leaves every mount out) or with a named volume (`false` leaves
/// it out).
pub const BACKUP_LABEL: &str = "ferry.backup";
/// The largest file a bind of a single file may be: it is captured with
/// the app's config, through the agent's data directory.
const FILE_BIND_MAX: u64 = 64 << 20;
const PROJECT_LABEL: &str = "com.docker.compose.project";
const SERVICE_LABEL: &str = "com.docker.compose.service";
const DEPENDS_LABEL: &str = "com.docker.compose.depends_on";
/// `docker compose run` containers: not part of the app.
const ONEOFF_LABEL: &str = "com.docker.compose.oneoff";

/// How the agent reaches its container engine.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// `unix:///var/run/docker.sock`, or the socket's path.
    pub socket: String,
    /// Team of apps without a `ferry.team` label.
    pub default_team: TeamName,
    /// How long a container gets to stop before the engine kills it.
    pub stop_timeout: Duration,
    /// How long a started container may take to run (and be healthy).
    pub start_timeout: Duration,
    /// Where the driver keeps what it changed (`DATA_DIR/containers`).
    pub state_dir: PathBuf,
    /// Where copies' binds are restored (the agent's copies directory).
    pub copies_root: CopiesRoot,
}

pub struct ContainerPlatform {
    settings: EngineSettings,
    docker: OnceCell<Docker>,
    /// Serialises edits of the policy file older agents kept.
    policies: Mutex<()>,
}

/// What the containers driver keeps of a stopped container: the container
/// itself (a container re-created since is not the one Ferry stopped) and
/// the restart policy it set aside.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ContainerReceipt {
    container: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    restart_policy: Option<RestartPolicy>,
}

/// One container as inspected, with the app it belongs to.
struct Seen {
    team: TeamName,
    app: AppName,
    component: ComponentName,
    inspect: ContainerInspectResponse,
}

impl ContainerPlatform {
    pub fn new(settings: EngineSettings) -> Self {
        Self {
            settings,
            docker: OnceCell::new(),
            policies: Mutex::new(()),
        }
    }

    fn engine_err(&self, reason: impl std::fmt::Display) -> PlatformError {
        PlatformError::Engine {
            socket: self.settings.socket.clone(),
            reason: reason.to_string(),
        }
    }

    /// The engine's client, connected and its API version negotiated on
    /// first use (and again after a failure).
    async fn docker(&self) -> Result<&Docker, PlatformError> {
        self.docker
            .get_or_try_init(|| async {
                let path = self
                    .settings
                    .socket
                    .strip_prefix("unix://")
                    .unwrap_or(&self.settings.socket);
                // Longer than a stop may take: the engine answers the stop
                // call once the container is down.
                let timeout = 120 + self.settings.stop_timeout.as_secs();
                let docker = Docker::connect_with_unix(path, timeout, bollard::API_DEFAULT_VERSION)
                    .map_err(|e| self.engine_err(e))?;
                docker
                    .negotiate_version()
                    .await
                    .map_err(|e| self.engine_err(e))
            })
            .await
    }

    /// Every container that belongs to an app (to app `only`, asked of
    /// the engine by its labels), inspected.
    async fn scan(&self, only: Option<&AppName>) -> Result<Vec<Seen>, PlatformError> {
        let docker = self.docker().await?;
        let filters: Vec<Option<HashMap<String, Vec<String>>>> = match only {
            None => vec![None],
            Some(app) => [APP_LABEL, PROJECT_LABEL]
                .iter()
                .map(|l| {
                    Some(HashMap::from([(
                        "label".to_owned(),
                        vec![format!("{l}={app}")],
                    )]))
                })
                .collect(),
        };
        let mut list = Vec::new();
        for f in filters {
            let mut options = ListContainersOptionsBuilder::default().all(true);
            if let Some(f) = &f {
                options = options.filters(f);
            }
            for c in docker
                .list_containers(Some(options.build()))
                .await
                .map_err(|e| self.engine_err(e))?
            {
                if !list
                    .iter()
                    .any(|o: &bollard::models::ContainerSummary| o.id == c.id)
                {
                    list.push(c);
                }
            }
        }
        let mut seen = Vec::new();
        for summary in list {
            let labels = summary.labels.unwrap_or_default();
            let Some(app) = labels.get(APP_LABEL).or_else(|| labels.get(PROJECT_LABEL)) else {
                continue;
            };
            if only.is_some_and(|o| o.as_str() != app) {
                continue;
            }
            if labels
                .get(ONEOFF_LABEL)
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
            {
                continue;
            }
            let Some(id) = summary.id else { continue };
            let inspect = match docker.inspect_container(&id, None).await {
                Ok(i) => i,
                // Removed since the list.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => continue,
                Err(e) => return Err(self.engine_err(e)),
            };
            let team = labels
                .get(TEAM_LABEL)
                .map(String::as_str)
                .unwrap_or(self.settings.default_team.as_str());
            let name = container_name(&inspect);
            let component = labels.get(SERVICE_LABEL).cloned().unwrap_or(name);
            match (app.parse(), team.parse(), component.parse()) {
                (Ok(app), Ok(team), Ok(component)) => seen.push(Seen {
                    team,
                    app,
                    component,
                    inspect,
                }),
                _ => tracing::warn!(
                    container = %id,
                    app = %app,
                    team = %team,
                    component = %component,
                    "container skipped: its app, team or component name is not a valid Ferry name"
                ),
            }
        }
        Ok(seen)
    }

    /// The apps the containers make up (only app `only`, when given).
    async fn apps(&self, only: Option<&AppName>) -> Result<Vec<App>, PlatformError> {
        let mut groups: BTreeMap<(TeamName, AppName), Vec<Seen>> = BTreeMap::new();
        for s in self.scan(only).await? {
            groups
                .entry((s.team.clone(), s.app.clone()))
                .or_default()
                .push(s);
        }
        let facts = self.facts(groups.values().flatten()).await?;
        let mut apps = Vec::new();
        for ((team, name), members) in groups {
            match build_app(team, name, &members, &facts) {
                Ok(app) => apps.push(app),
                Err(reason) => tracing::warn!(%reason, "container app skipped"),
            }
        }
        Ok(apps)
    }

    /// What is at the mounts' sources: each bind's host path, and which
    /// named volumes are labelled to be left out.
    async fn facts(&self, seen: impl Iterator<Item = &Seen>) -> Result<Facts, PlatformError> {
        let mut binds = Vec::new();
        let mut volumes = Vec::new();
        for m in seen.flat_map(|s| s.inspect.mounts.iter().flatten()) {
            match (m.typ.as_deref(), &m.name, &m.source) {
                (Some("bind"), _, Some(src)) if !binds.contains(src) => binds.push(src.clone()),
                (Some("volume"), Some(n), _) if !volumes.contains(n) => volumes.push(n.clone()),
                _ => {}
            }
        }
        let docker = self.docker().await?;
        let mut left_out = std::collections::HashSet::new();
        for name in volumes {
            match docker.inspect_volume(&name).await {
                Ok(v) if v.labels.get(BACKUP_LABEL).map(String::as_str) == Some("false") => {
                    left_out.insert(name);
                }
                Ok(_)
                | Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(e) => return Err(self.engine_err(e)),
            }
        }
        let paths = tokio::task::spawn_blocking(move || {
            binds
                .into_iter()
                .map(|b| {
                    let kind = SourceKind::of(Path::new(&b));
                    (b, kind)
                })
                .collect()
        })
        .await
        .map_err(|e| self.engine_err(e))?;
        Ok(Facts { paths, left_out })
    }

    /// The container that is a component, as the engine has it now; two
    /// containers claiming to be it are refused rather than guessed at.
    async fn locate(&self, r: &ComponentRef) -> Result<ContainerInspectResponse, PlatformError> {
        let mut found = self
            .scan(Some(&r.app))
            .await?
            .into_iter()
            .filter(|s| s.team == r.team && s.app == r.app && s.component == r.component);
        let first = found
            .next()
            .ok_or_else(|| PlatformError::UnknownComponent {
                component: Box::new(r.clone()),
            })?;
        if let Some(other) = found.next() {
            return Err(PlatformError::Unsupported {
                what: format!(
                    "{r} is two containers ({} and {}); Ferry acts on one container per component",
                    container_name(&first.inspect),
                    container_name(&other.inspect)
                ),
            });
        }
        Ok(first.inspect)
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInspectResponse, PlatformError> {
        self.docker()
            .await?
            .inspect_container(id, None)
            .await
            .map_err(|e| self.engine_err(e))
    }

    /// The policy file older agents kept (`policies.json`), by container
    /// id: read for journal entries they wrote.
    fn policy_file(&self) -> PathBuf {
        self.settings.state_dir.join("policies.json")
    }

    /// The restart policy an older agent set aside for container `id`, as
    /// its policy file (`policies.json`) has it.
    fn legacy_policy(&self, id: &str) -> Result<Option<RestartPolicy>, PlatformError> {
        Ok(self.legacy_policies()?.remove(id))
    }

    fn legacy_policies(&self) -> Result<HashMap<String, RestartPolicy>, PlatformError> {
        let path = self.policy_file();
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| PlatformError::Registry {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
            Err(e) => Err(PlatformError::Registry {
                path,
                reason: e.to_string(),
            }),
        }
    }

    /// Forgets the policy of container `id` in the older agents' policy
    /// file, once it is back on the container (the file goes once empty).
    fn forget_legacy_policy(&self, id: &str) -> Result<(), PlatformError> {
        let _guard = self.policies.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = self.legacy_policies()?;
        if all.remove(id).is_none() {
            return Ok(());
        }
        let path = self.policy_file();
        let err = |reason: String| PlatformError::Registry {
            path: path.clone(),
            reason,
        };
        if all.is_empty() {
            std::fs::remove_file(&path).map_err(|e| err(e.to_string()))
        } else {
            let body = serde_json::to_vec_pretty(&all).map_err(|e| err(e.to_string()))?;
            crate::durable::write(&path, &body).map_err(|e| err(e.to_string()))
        }
    }

    /// The container a receipt names, inspected; unknown once it is gone.
    async fn receipt_container(
        &self,
        receipt: &Receipt,
    ) -> Result<(ContainerInspectResponse, Option<RestartPolicy>), PlatformError> {
        if receipt.detail.is_null() {
            // A journal entry of an older agent: the component as it is
            // now, and the policy that agent kept aside.
            let i = self.locate(&receipt.component).await?;
            let policy = self.legacy_policy(i.id.as_deref().unwrap_or_default())?;
            return Ok((i, policy));
        }
        let kept: ContainerReceipt =
            serde_json::from_value(receipt.detail.clone()).map_err(|e| {
                PlatformError::BadReceipt {
                    component: Box::new(receipt.component.clone()),
                    reason: e.to_string(),
                }
            })?;
        match self
            .docker()
            .await?
            .inspect_container(&kept.container, None)
            .await
        {
            Ok(i) => Ok((i, kept.restart_policy)),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Err(PlatformError::UnknownComponent {
                component: Box::new(receipt.component.clone()),
            }),
            Err(e) => Err(self.engine_err(e)),
        }
    }

    async fn set_policy_call(
        &self,
        id: &str,
        policy: RestartPolicy,
    ) -> Result<(), bollard::errors::Error> {
        let body = ContainerUpdateBody {
            restart_policy: Some(policy),
            ..Default::default()
        };
        let docker = self
            .docker()
            .await
            .map_err(|e| bollard::errors::Error::IOError {
                err: std::io::Error::other(e.to_string()),
            })?;
        docker.update_container(id, body).await
    }
}

/// What Ferry keeps of a container to create it again: its inspect without
/// what is volatile (id, state, times, the generated host name) and without
/// what its image sets anyway (a copy gets those from the image). Stored
/// only inside the encrypted repository (environment values may be
/// secrets), never in the catalog or a job's output.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CapturedContainer {
    pub component: String,
    pub name: String,
    pub image: String,
    pub image_id: String,
    /// `Config`, less the image's defaults.
    pub config: bollard::models::ContainerConfig,
    /// `HostConfig`: mounts, ports, restart policy, resources, …
    pub host_config: Option<bollard::models::HostConfig>,
    /// Networks the container is attached to, by name.
    pub networks: Vec<String>,
    /// The files its binds of single files mount, captured beside this
    /// config.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<CapturedFile>,
}

/// A bind-mounted file, captured with the config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CapturedFile {
    /// Where the container sees it.
    pub destination: String,
    /// Its host path.
    pub source: String,
    /// Where it is in the captured config's directory (`files/N`).
    pub file: String,
    /// Its mode, owner and group on the host.
    #[serde(default)]
    pub mode: u32,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
}

/// Copies the file at `from` to `to` (at most [`FILE_BIND_MAX`] bytes),
/// with its mode, and its owner where the agent may set it; returns its
/// mode and owner.
fn capture_file(from: &Path, to: &Path) -> std::io::Result<(u32, u32, u32)> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // A file (after symlinks: /etc/localtime is one), never a FIFO that
    // would block the open.
    if !std::fs::metadata(from)?.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is no longer a file",
            from.display()
        )));
    }
    let mut src = std::fs::File::open(from)?;
    let meta = src.metadata()?;
    if let Some(dir) = to.parent() {
        crate::durable::private_dir(dir)?;
    }
    let mut copy = || -> std::io::Result<()> {
        let mut out = crate::durable::create_private(to)?;
        let copied = std::io::copy(&mut (&mut src).take(FILE_BIND_MAX + 1), &mut out)?;
        if copied > FILE_BIND_MAX {
            return Err(std::io::Error::other(format!(
                "it has grown past the {} MiB a file bind may be",
                FILE_BIND_MAX >> 20
            )));
        }
        // The owner first: a chown clears setuid and setgid.
        match std::os::unix::fs::chown(to, Some(meta.uid()), Some(meta.gid())) {
            Ok(()) => {}
            // An agent that is not root keeps the file as its own; the
            // owner is recorded.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
            Err(e) => return Err(e),
        }
        out.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))
    };
    if let Err(e) = copy() {
        let _ = std::fs::remove_file(to);
        return Err(e);
    }
    Ok((meta.mode() & 0o7777, meta.uid(), meta.gid()))
}

/// A container's config less what its image sets: equal scalar settings
/// and commands dropped, environment entries and labels the image has with
/// the same value dropped.
fn without_image_defaults(
    config: &bollard::models::ContainerConfig,
    image: Option<&bollard::models::ImageConfig>,
) -> bollard::models::ContainerConfig {
    let mut c = config.clone();
    c.hostname = None;
    c.image = None;
    let Some(img) = image else { return c };
    fn same<T: PartialEq>(field: &mut Option<T>, image: &Option<T>) {
        if field.is_some() && field == image {
            *field = None;
        }
    }
    same(&mut c.user, &img.user);
    same(&mut c.cmd, &img.cmd);
    same(&mut c.entrypoint, &img.entrypoint);
    same(&mut c.working_dir, &img.working_dir);
    same(&mut c.exposed_ports, &img.exposed_ports);
    same(&mut c.healthcheck, &img.healthcheck);
    same(&mut c.volumes, &img.volumes);
    same(&mut c.stop_signal, &img.stop_signal);
    same(&mut c.shell, &img.shell);
    same(&mut c.on_build, &img.on_build);
    if let (Some(env), Some(image_env)) = (&mut c.env, &img.env) {
        env.retain(|e| !image_env.contains(e));
    }
    if let (Some(labels), Some(image_labels)) = (&mut c.labels, &img.labels) {
        labels.retain(|k, v| image_labels.get(k) != Some(v));
    }
    c
}

fn container_name(i: &ContainerInspectResponse) -> String {
    i.name
        .as_deref()
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_owned()
}

fn is_running(i: &ContainerInspectResponse) -> bool {
    i.state
        .as_ref()
        .is_some_and(|s| s.running.unwrap_or(false) || s.restarting.unwrap_or(false))
}

fn labels(i: &ContainerInspectResponse) -> HashMap<String, String> {
    i.config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default()
}

/// A hook from a `ferry.<which>` label: a shell line run in the container.
fn label_hook(labels: &HashMap<String, String>, which: &str) -> Result<Option<Argv>, String> {
    labels
        .get(&format!("ferry.{which}"))
        .map(|line| {
            Argv::new(vec!["sh".into(), "-c".into(), line.clone()])
                .map_err(|e| format!("label ferry.{which}: {e}"))
        })
        .transpose()
}

/// What the driver found out about mounts' sources, before deciding what a
/// backup does with them.
#[derive(Debug, Default)]
struct Facts {
    /// What is at each bind's host path.
    paths: HashMap<String, SourceKind>,
    /// Named volumes labelled `ferry.backup=false`.
    left_out: std::collections::HashSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum SourceKind {
    Dir,
    File(u64),
    Socket,
    Device,
    Other,
    Missing,
    Unreadable(String),
}

impl SourceKind {
    fn of(path: &Path) -> Self {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => Self::Dir,
            Ok(m) if m.is_file() => Self::File(m.len()),
            Ok(m) if m.file_type().is_socket() => Self::Socket,
            Ok(m) if m.file_type().is_char_device() || m.file_type().is_block_device() => {
                Self::Device
            }
            Ok(_) => Self::Other,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::Missing,
            Err(e) => Self::Unreadable(e.to_string()),
        }
    }
}

/// What a backup does with mount `m` of a container with `labels`.
fn decide(
    m: &bollard::models::MountPoint,
    labels: &HashMap<String, String>,
    facts: &Facts,
) -> MountBackup {
    let label = labels.get(BACKUP_LABEL).map(String::as_str);
    let read_only = m.rw == Some(false);
    match m.typ.as_deref() {
        Some("volume") => {
            let name = m.name.as_deref().unwrap_or_default();
            if label == Some("false") {
                MountBackup::Skipped("the container's label ferry.backup=false".into())
            } else if facts.left_out.contains(name) {
                MountBackup::Skipped("the volume's label ferry.backup=false".into())
            } else if m.source.as_deref().unwrap_or_default().is_empty() {
                MountBackup::Refused(format!(
                    "volume {name} has no mount point on this host (label the container ferry.backup=false to leave its mounts out)"
                ))
            } else {
                MountBackup::Volume
            }
        }
        Some("bind") => {
            let src = m.source.as_deref().unwrap_or_default();
            let kind = facts.paths.get(src).cloned().unwrap_or(SourceKind::Missing);
            match kind {
                SourceKind::Socket => MountBackup::Skipped("a socket".into()),
                SourceKind::Device => MountBackup::Skipped("a device".into()),
                SourceKind::Other => MountBackup::Skipped("neither a file nor a directory".into()),
                _ if label == Some("false") => {
                    MountBackup::Skipped("the container's label ferry.backup=false".into())
                }
                SourceKind::File(n) if n > FILE_BIND_MAX => MountBackup::Refused(format!(
                    "{src} is a file of {} MiB, more than the {} MiB a file bind may be; bind its directory instead, or label the container ferry.backup=false",
                    n >> 20,
                    FILE_BIND_MAX >> 20
                )),
                SourceKind::File(_) => MountBackup::File,
                SourceKind::Dir if read_only && label != Some("true") => MountBackup::Config,
                SourceKind::Dir => MountBackup::Volume,
                SourceKind::Missing => {
                    MountBackup::Refused(format!("its source {src} does not exist on this host"))
                }
                SourceKind::Unreadable(e) => {
                    MountBackup::Refused(format!("its source {src} cannot be read: {e}"))
                }
            }
        }
        Some("tmpfs") => MountBackup::Skipped("a tmpfs: nothing outlives the container".into()),
        other => MountBackup::Skipped(format!("a {} mount", other.unwrap_or("typeless"))),
    }
}

/// One app from its containers.
fn build_app(
    team: TeamName,
    name: AppName,
    members: &[Seen],
    facts: &Facts,
) -> Result<App, String> {
    // Container names and ids → component names, for links and the like.
    let mut by_ref: HashMap<String, ComponentName> = HashMap::new();
    for s in members {
        by_ref.insert(s.component.to_string(), s.component.clone());
        by_ref.insert(container_name(&s.inspect), s.component.clone());
        if let Some(id) = &s.inspect.id {
            by_ref.insert(id.clone(), s.component.clone());
        }
    }
    let mut volumes: Vec<Volume> = Vec::new();
    let mut components = Vec::new();
    for s in members {
        let i = &s.inspect;
        let labels = labels(i);
        let mut uses = Vec::new();
        let mut mounts = Vec::new();
        for m in i.mounts.iter().flatten() {
            let backup = decide(m, &labels, facts);
            let kind = m.typ.as_deref().unwrap_or_default();
            let source = match kind {
                "volume" => m.name.clone(),
                _ => m.source.clone(),
            }
            .unwrap_or_default();
            mounts.push(ContainerMount {
                destination: m.destination.clone().unwrap_or_default(),
                source: source.clone(),
                kind: kind.to_owned(),
                read_only: m.rw == Some(false),
                backup: backup.clone(),
            });
            if backup != MountBackup::Volume {
                continue;
            }
            let (vol_name, path) = match (kind, &m.source) {
                ("volume", Some(src)) => (source, src.clone()),
                ("bind", Some(src)) => (src.clone(), src.clone()),
                _ => continue,
            };
            let vol_name = VolumeName::new(&vol_name).map_err(|e| e.to_string())?;
            let path = HostPath::new(&path).map_err(|e| e.to_string())?;
            if !volumes.iter().any(|v| v.name == vol_name) {
                volumes.push(Volume {
                    name: vol_name.clone(),
                    path,
                });
            }
            if !uses.contains(&vol_name) {
                uses.push(vol_name);
            }
        }
        let stateful = match labels.get(STATEFUL_LABEL).map(String::as_str) {
            Some("true") => true,
            Some("false") => false,
            _ => !uses.is_empty(),
        };
        // What it names as needed: container names or ids, or services.
        let mut needs: Vec<&str> = Vec::new();
        // Compose: "db:service_started:false,cache:service_healthy:true".
        for dep in labels.get(DEPENDS_LABEL).iter().flat_map(|l| l.split(',')) {
            needs.push(dep.split(':').next().unwrap_or_default().trim());
        }
        if let Some(hc) = &i.host_config {
            // Links: "/db:/web/db".
            for link in hc.links.iter().flatten() {
                needs.push(
                    link.split(':')
                        .next()
                        .unwrap_or_default()
                        .trim_start_matches('/'),
                );
            }
            // volumes_from: "db" or "db:ro".
            for from in hc.volumes_from.iter().flatten() {
                needs.push(from.split(':').next().unwrap_or_default());
            }
            if let Some(other) = hc
                .network_mode
                .as_deref()
                .and_then(|m| m.strip_prefix("container:"))
            {
                needs.push(other);
            }
        }
        let mut depends_on: Vec<ComponentName> = Vec::new();
        for target in needs {
            if let Some(c) = by_ref.get(target)
                && *c != s.component
                && !depends_on.contains(c)
            {
                depends_on.push(c.clone());
            }
        }
        let hooks = Hooks {
            pre_backup: label_hook(&labels, "pre_backup")?,
            post_backup: label_hook(&labels, "post_backup")?,
            pre_stop: label_hook(&labels, "pre_stop")?,
        };
        components.push(Component {
            name: s.component.clone(),
            kind: ComponentKind::Container(ContainerComponent {
                id: i.id.clone().unwrap_or_default(),
                name: container_name(i),
                image: i
                    .config
                    .as_ref()
                    .and_then(|c| c.image.clone())
                    .unwrap_or_default(),
                image_id: i.image.clone().unwrap_or_default(),
                mounts,
            }),
            stateful,
            volumes: uses,
            depends_on,
            state: if is_running(i) {
                ComponentState::Running
            } else {
                ComponentState::Stopped
            },
            hooks,
        });
    }
    components.sort_by(|a, b| a.name.cmp(&b.name));
    let app = App {
        name,
        team,
        components,
        volumes,
    };
    app.validate().map_err(|e| e.to_string())?;
    Ok(app)
}

#[async_trait]
impl Driver for ContainerPlatform {
    fn name(&self) -> &'static str {
        "containers"
    }

    /// Every app the drivers before it in the agent's list do not own.
    fn owns(&self, _team: &TeamName, _app: &AppName) -> bool {
        true
    }

    async fn inventory(&self) -> Result<Vec<App>, PlatformError> {
        self.apps(None).await
    }

    async fn app(&self, team: &TeamName, app: &AppName) -> Result<Option<App>, PlatformError> {
        Ok(self
            .apps(Some(app))
            .await?
            .into_iter()
            .find(|a| a.team == *team && a.name == *app))
    }

    async fn status(&self, r: &ComponentRef) -> Result<ComponentState, PlatformError> {
        Ok(if is_running(&self.locate(r).await?) {
            ComponentState::Running
        } else {
            ComponentState::Stopped
        })
    }

    async fn receipt(&self, r: &ComponentRef) -> Result<Receipt, PlatformError> {
        let i = self.locate(r).await?;
        let policy = i
            .host_config
            .as_ref()
            .and_then(|h| h.restart_policy.clone())
            .unwrap_or_default();
        let restarts = !matches!(
            policy.name,
            None | Some(RestartPolicyNameEnum::NO | RestartPolicyNameEnum::EMPTY)
        );
        let kept = ContainerReceipt {
            container: i.id.clone().unwrap_or_default(),
            restart_policy: restarts.then_some(policy),
        };
        Ok(Receipt {
            driver: self.name().to_owned(),
            component: r.clone(),
            detail: serde_json::to_value(kept).map_err(|e| PlatformError::BadReceipt {
                component: Box::new(r.clone()),
                reason: e.to_string(),
            })?,
        })
    }

    async fn stop(&self, receipt: &Receipt) -> Result<Remark, PlatformError> {
        let r = &receipt.component;
        let (i, policy) = self.receipt_container(receipt).await?;
        let id = i.id.clone().unwrap_or_default();
        if policy.is_some() {
            // The journal has the policy: whatever happens next, the start
            // puts it back.
            let no = RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            };
            match self.set_policy_call(&id, no).await {
                Ok(()) => {}
                // Podman has no update call; it restarts a container only
                // when the container exits on its own, not after a stop,
                // and has no daemon whose restart could bring it back.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404 | 405 | 501,
                    ..
                }) => {
                    tracing::info!(component = %r, "the engine cannot change a restart policy; a stopped container stays stopped there");
                }
                Err(e) => return Err(self.engine_err(e)),
            }
        }
        let secs = i32::try_from(self.settings.stop_timeout.as_secs()).unwrap_or(i32::MAX);
        let stop_began = Instant::now();
        // A container that was not running answers 304, which the client
        // takes as success.
        self.docker()
            .await?
            .stop_container(
                &id,
                Some(StopContainerOptionsBuilder::default().t(secs).build()),
            )
            .await
            .map_err(|e| self.engine_err(e))?;
        let after = self.inspect(&id).await?;
        if is_running(&after) {
            return Err(PlatformError::CommandFailed {
                action: "stop",
                component: Box::new(r.clone()),
                status: "the container still runs".into(),
                stderr: String::new(),
            });
        }
        // Exit 137 is SIGKILL: the engine's at the stop timeout when the
        // container ran before this stop and the stop took that long (not
        // an earlier exit, not a stop signal of SIGKILL).
        let state = after.state.as_ref();
        let ran = is_running(&i);
        if ran && state.and_then(|s| s.oom_killed) == Some(true) {
            tracing::warn!(component = %r, container = %id, "the container ran out of memory while it stopped");
            return Ok(Some(format!(
                "{} was killed for want of memory while it stopped; its data was copied as after a crash",
                r.component
            )));
        }
        let killed = ran
            && state.and_then(|s| s.exit_code) == Some(137)
            && stop_began.elapsed() + Duration::from_secs(1) >= self.settings.stop_timeout;
        if killed {
            tracing::warn!(component = %r, container = %id, timeout_secs = secs, "the container did not stop on its stop signal; the engine killed it");
            return Ok(Some(format!(
                "{} did not stop on its stop signal within {secs} s and the engine killed it (exit 137); its data was copied as after a crash (give it a better stop: a ferry.pre_stop hook, or a STOPSIGNAL it stops on)",
                r.component
            )));
        }
        tracing::info!(component = %r, container = %id, action = "stop", "component command succeeded");
        Ok(None)
    }

    async fn start(&self, receipt: &Receipt) -> Result<Remark, PlatformError> {
        let r = &receipt.component;
        let (i, policy) = self.receipt_container(receipt).await?;
        let id = i.id.clone().unwrap_or_default();
        let put_back = async {
            let Some(policy) = policy else {
                return Ok(());
            };
            match self.set_policy_call(&id, policy).await {
                Ok(()) => {
                    tracing::info!(component = %r, container = %id, "restart policy put back");
                }
                // An engine without the update call (Podman) never changed it.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404 | 405 | 501,
                    ..
                }) => {}
                Err(e) => return Err(self.engine_err(e)),
            }
            if receipt.detail.is_null() {
                // Back on the container: an older agent's record of it goes.
                self.forget_legacy_policy(&id)?;
            }
            Ok::<_, PlatformError>(())
        };
        if is_running(&i) {
            // Running again (whoever started it): only the policy goes back.
            return put_back.await.map(|()| None);
        }
        // One that runs already answers 304: success too.
        self.docker()
            .await?
            .start_container(&id, None)
            .await
            .map_err(|e| self.engine_err(e))?;
        put_back.await?;
        // Running, and healthy where it has a healthcheck: waited for
        // until the check has had its chances (its start period, and an
        // interval per retry and one more), then a running container
        // counts as started, and the record says so. An engine that runs
        // no checks at all (Podman's service without systemd) is seen
        // after two intervals without a new result.
        let check = i
            .config
            .as_ref()
            .and_then(|c| c.healthcheck.as_ref())
            .filter(|h| {
                h.test
                    .as_ref()
                    .is_some_and(|t| t.first().is_some_and(|k| k != "NONE"))
            });
        let began = Instant::now();
        let last_result = |i: &ContainerInspectResponse| {
            i.state
                .as_ref()
                .and_then(|s| s.health.as_ref())
                .and_then(|h| h.log.as_ref())
                .and_then(|l| l.last())
                .map(|r| format!("{:?}", r.start))
        };
        let before = last_result(&i);
        // (Docker's defaults: every 30 s, 30 s each, 3 retries.)
        let health_wait = check.map(|h| {
            let ns = |v: Option<i64>, default: u64| {
                Duration::from_nanos(v.filter(|n| *n > 0).map_or(default, |n| n as u64))
            };
            let interval = ns(h.interval, 30_000_000_000);
            let timeout = ns(h.timeout, 30_000_000_000);
            let retries = u32::try_from(h.retries.filter(|n| *n > 0).unwrap_or(3)).unwrap_or(3);
            let start_period = ns(h.start_period, 0);
            (
                start_period.saturating_add(interval.saturating_mul(retries.saturating_add(1))),
                // The first result lands an interval and a probe in.
                start_period
                    .saturating_add(interval.saturating_mul(2))
                    .saturating_add(timeout)
                    .saturating_add(Duration::from_secs(2)),
            )
        });
        // The start timeout, or longer (15 minutes at most) when the check
        // needs longer to have had its chances: it then counts as started,
        // not as failed.
        let deadline = began
            + health_wait.map_or(self.settings.start_timeout, |(all, _)| {
                self.settings.start_timeout.max(
                    all.saturating_add(Duration::from_secs(5))
                        .min(Duration::from_secs(15 * 60)),
                )
            });
        loop {
            let now = self.inspect(&id).await?;
            let health = now
                .state
                .as_ref()
                .and_then(|s| s.health.as_ref())
                .and_then(|h| h.status);
            let running = is_running(&now);
            if running && (check.is_none() || matches!(health, Some(HealthStatusEnum::HEALTHY))) {
                break;
            }
            if matches!(health, Some(HealthStatusEnum::UNHEALTHY)) {
                return Err(PlatformError::CommandFailed {
                    action: "start",
                    component: Box::new(r.clone()),
                    status: "the container is unhealthy".into(),
                    stderr: String::new(),
                });
            }
            if let (true, Some((all_chances, no_checks))) = (running, health_wait) {
                let waited = began.elapsed();
                let remark = if waited >= no_checks && last_result(&now) == before {
                    Some(format!(
                        "{} runs; the engine ran no healthcheck in {} s, so it counts as started",
                        r.component,
                        waited.as_secs()
                    ))
                } else if waited >= all_chances {
                    Some(format!(
                        "{} runs; not yet healthy after {} s (its healthcheck's start period and retries), so it counts as started",
                        r.component,
                        waited.as_secs()
                    ))
                } else {
                    None
                };
                if let Some(remark) = remark {
                    tracing::warn!(component = %r, container = %id, "{remark}");
                    return Ok(Some(remark));
                }
            }
            if Instant::now() >= deadline {
                return Err(PlatformError::Timeout {
                    action: "start",
                    component: Box::new(r.clone()),
                    secs: self.settings.start_timeout.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::info!(component = %r, container = %id, action = "start", "component command succeeded");
        Ok(None)
    }

    /// The engine kills a stopping container at the stop timeout.
    fn stop_deadline(&self) -> Duration {
        self.settings.stop_timeout + Duration::from_secs(10)
    }

    async fn hook(
        &self,
        r: &ComponentRef,
        which: &'static str,
        argv: &Argv,
    ) -> Result<(), PlatformError> {
        use futures::StreamExt;
        let i = self.locate(r).await?;
        let id = i.id.clone().unwrap_or_default();
        let docker = self.docker().await?;
        let exec = docker
            .create_exec(
                &id,
                bollard::models::ExecConfig {
                    cmd: Some(argv.as_slice().to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.engine_err(e))?;
        let mut stderr = String::new();
        let run = async {
            if let bollard::exec::StartExecResults::Attached { mut output, .. } = docker
                .start_exec(&exec.id, None)
                .await
                .map_err(|e| self.engine_err(e))?
            {
                while let Some(out) = output.next().await {
                    if let Ok(bollard::container::LogOutput::StdErr { message }) = out
                        && stderr.len() < 4096
                    {
                        stderr.push_str(&String::from_utf8_lossy(&message));
                    }
                }
            }
            Ok::<_, PlatformError>(())
        };
        tokio::time::timeout(self.settings.start_timeout, run)
            .await
            .map_err(|_| PlatformError::Timeout {
                action: which,
                component: Box::new(r.clone()),
                secs: self.settings.start_timeout.as_secs(),
            })??;
        let code = docker
            .inspect_exec(&exec.id)
            .await
            .map_err(|e| self.engine_err(e))?
            .exit_code;
        if code != Some(0) {
            return Err(PlatformError::CommandFailed {
                action: which,
                component: Box::new(r.clone()),
                status: format!(
                    "exit status {}",
                    code.map_or("unknown".into(), |c| c.to_string())
                ),
                stderr: stderr.trim().to_owned(),
            });
        }
        tracing::info!(component = %r, action = which, "component command succeeded");
        Ok(())
    }

    fn volumes(&self) -> &dyn Volumes {
        self
    }

    fn capture(&self) -> Option<&dyn Capture> {
        Some(self)
    }
}

/// Label on the engine volumes made for a copy: `TEAM/APP/job-N`, the copy
/// and the job that restored it.
pub const COPY_LABEL: &str = "ferry.copy";

fn copy_label(copy: CopyId<'_>) -> String {
    format!("{}/{}/job-{}", copy.team, copy.name, copy.job)
}

/// A bind's volume is named by its host path; a named volume by its name.
fn is_bind(v: &Volume) -> bool {
    v.name.as_str().starts_with('/')
}

/// The engine volume of `copy` made from `original` of app `of`: the
/// original's name with its app's prefix (Compose's `PROJECT_`) taken for
/// the copy's, else the copy's name and `_` before it.
pub fn copy_volume_name(of: &AppName, copy: &AppName, original: &VolumeName) -> String {
    let rest = original
        .as_str()
        .strip_prefix(&format!("{of}_"))
        .unwrap_or(original.as_str());
    format!("{copy}_{rest}")
}

#[async_trait]
impl Volumes for ContainerPlatform {
    /// A bind's host path; a named volume's mount point, as the engine
    /// has it now.
    async fn source(&self, app: &App, volume: &Volume) -> Result<PathBuf, PlatformError> {
        if is_bind(volume) {
            return Ok(volume.path.as_path().to_path_buf());
        }
        match self
            .docker()
            .await?
            .inspect_volume(volume.name.as_str())
            .await
        {
            Ok(v) if !v.mountpoint.is_empty() => Ok(PathBuf::from(v.mountpoint)),
            Ok(v) => Err(PlatformError::Unsupported {
                what: format!(
                    "volume {} of {}/{} (driver {}) has no mount point on this host",
                    volume.name, app.team, app.name, v.driver
                ),
            }),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Err(PlatformError::VolumeGone {
                app: format!("{}/{}", app.team, app.name),
                volume: volume.name.to_string(),
            }),
            Err(e) => Err(self.engine_err(e)),
        }
    }

    /// A bind's copy is a directory under the copies root; a named
    /// volume's, an engine volume made for the copy (labelled with it and
    /// its job), its mount point emptied when an earlier attempt of the
    /// same job made it.
    async fn target(
        &self,
        copy: CopyId<'_>,
        original: &App,
        index: usize,
    ) -> Result<PathBuf, PlatformError> {
        let volume = original
            .volumes
            .get(index)
            .ok_or_else(|| PlatformError::BadCopy {
                app: format!("{}/{}", original.team, original.name),
                reason: format!("it has no volume number {index}"),
            })?;
        if is_bind(volume) {
            return self.settings.copies_root.target(copy, index).await;
        }
        let name = copy_volume_name(&original.name, copy.name, &volume.name);
        // Two volumes of the original must not become one of the copy's
        // (`shop_data` and `data`, for app `shop`).
        if let Some((_, other)) = original.volumes.iter().enumerate().find(|(i, v)| {
            *i != index
                && !is_bind(v)
                && copy_volume_name(&original.name, copy.name, &v.name) == name
        }) {
            return Err(PlatformError::BadCopy {
                app: format!("{}/{}", copy.team, copy.name),
                reason: format!(
                    "volumes {} and {} would both be its volume {name}",
                    volume.name, other.name
                ),
            });
        }
        let docker = self.docker().await?;
        let label = copy_label(copy);
        let existing = match docker.inspect_volume(&name).await {
            Ok(v) => Some(v),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => None,
            Err(e) => return Err(self.engine_err(e)),
        };
        let volume = match existing {
            Some(v) if v.labels.get(COPY_LABEL) == Some(&label) => {
                let dir = PathBuf::from(&v.mountpoint);
                tokio::task::spawn_blocking(move || empty_dir(&dir))
                    .await
                    .map_err(|e| self.engine_err(e))?
                    .map_err(|e| PlatformError::Registry {
                        path: PathBuf::from(&v.mountpoint),
                        reason: format!("cannot clear an earlier attempt's volume {name}: {e}"),
                    })?;
                v
            }
            Some(_) => return Err(PlatformError::VolumeTaken { name }),
            None => {
                let made = docker
                    .create_volume(bollard::models::VolumeCreateRequest {
                        name: Some(name.clone()),
                        labels: Some(HashMap::from([(COPY_LABEL.to_owned(), label.clone())])),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| self.engine_err(e))?;
                // The engine answers a create of a name that exists with
                // that volume: one made meanwhile by another restore is
                // not ours.
                if made.labels.get(COPY_LABEL) != Some(&label) {
                    return Err(PlatformError::VolumeTaken { name });
                }
                made
            }
        };
        if volume.mountpoint.is_empty() {
            return Err(PlatformError::Unsupported {
                what: format!("volume {name} has no mount point on this host"),
            });
        }
        Ok(PathBuf::from(volume.mountpoint))
    }

    /// Removes the engine volumes labelled with `copy` and its job, and its
    /// binds' directories.
    async fn discard(&self, copy: CopyId<'_>) -> Result<(), PlatformError> {
        let docker = self.docker().await?;
        let filter = format!("{COPY_LABEL}={}", copy_label(copy));
        let listed = docker
            .list_volumes(Some(bollard::query_parameters::ListVolumesOptions {
                filters: Some(HashMap::from([("label".to_owned(), vec![filter])])),
            }))
            .await
            .map_err(|e| self.engine_err(e))?;
        for v in listed.volumes.into_iter().flatten() {
            match docker
                .remove_volume(
                    &v.name,
                    None::<bollard::query_parameters::RemoveVolumeOptions>,
                )
                .await
            {
                Ok(())
                | Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(e) => return Err(self.engine_err(format!("removing volume {}: {e}", v.name))),
            }
        }
        self.settings.copies_root.discard(copy).await
    }
}

/// Removes everything in `dir`, leaving it.
fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

#[async_trait]
impl Capture for ContainerPlatform {
    async fn capture(
        &self,
        app: &App,
        dest: &Path,
    ) -> Result<Option<(Vec<String>, u64)>, PlatformError> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let docker = self.docker().await?;
        // By reference where it still names the container's image (so a
        // load gives it back its name), else by id.
        let mut names: Vec<String> = Vec::new();
        for c in &app.components {
            let ComponentKind::Container(k) = &c.kind else {
                continue;
            };
            if k.image_id.is_empty() {
                continue;
            }
            let by_ref = !k.image.is_empty()
                && !k.image.starts_with("sha256:")
                && docker
                    .inspect_image(&k.image)
                    .await
                    .ok()
                    .and_then(|i| i.id)
                    .is_some_and(|id| id == k.image_id);
            let name = if by_ref {
                k.image.clone()
            } else {
                k.image_id.clone()
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
        if names.is_empty() {
            return Ok(None);
        }
        let io = |e: std::io::Error| PlatformError::Registry {
            path: dest.to_path_buf(),
            reason: e.to_string(),
        };
        // Each container's config, beside the images, with the files its
        // binds of single files mount.
        let mut captured = Vec::new();
        let mut file_count = 0usize;
        for c in &app.components {
            let ComponentKind::Container(k) = &c.kind else {
                continue;
            };
            let mut files = Vec::new();
            for m in k.mounts.iter().filter(|m| m.backup == MountBackup::File) {
                let file = format!("files/{file_count}");
                file_count += 1;
                let (from, to) = (PathBuf::from(&m.source), dest.with_file_name(&file));
                let (mode, uid, gid) =
                    tokio::task::spawn_blocking(move || capture_file(&from, &to))
                        .await
                        .map_err(|e| io(std::io::Error::other(e)))?
                        .map_err(|e| PlatformError::Unsupported {
                            what: format!(
                                "capturing {} ({} of {}): {e}",
                                m.source, m.destination, c.name
                            ),
                        })?;
                files.push(CapturedFile {
                    destination: m.destination.clone(),
                    source: m.source.clone(),
                    file,
                    mode,
                    uid,
                    gid,
                });
            }
            let i = self.inspect(&k.id).await?;
            let image = docker.inspect_image(&k.image_id).await.ok();
            let config = i.config.clone().unwrap_or_default();
            captured.push(CapturedContainer {
                component: c.name.to_string(),
                name: k.name.clone(),
                image: k.image.clone(),
                image_id: k.image_id.clone(),
                config: without_image_defaults(
                    &config,
                    image.as_ref().and_then(|i| i.config.as_ref()),
                ),
                host_config: i.host_config.clone(),
                networks: i
                    .network_settings
                    .as_ref()
                    .and_then(|n| n.networks.as_ref())
                    .map(|n| {
                        let mut v: Vec<String> = n.keys().cloned().collect();
                        v.sort();
                        v
                    })
                    .unwrap_or_default(),
                files,
            });
        }
        let config_path = dest.with_file_name("containers.json");
        let body =
            serde_json::to_vec_pretty(&captured).map_err(|e| io(std::io::Error::other(e)))?;
        // Private from the start: the config holds the containers'
        // environments (secrets).
        let mut config_file =
            tokio::fs::File::from_std(crate::durable::create_private(&config_path).map_err(io)?);
        config_file.write_all(&body).await.map_err(io)?;
        config_file.flush().await.map_err(io)?;
        let mut file = tokio::fs::File::from_std(crate::durable::create_private(dest).map_err(io)?);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut stream = docker.export_images(&refs);
        let mut bytes = 0u64;
        while let Some(part) = stream.next().await {
            let part = part.map_err(|e| self.engine_err(format!("exporting images: {e}")))?;
            bytes += part.len() as u64;
            file.write_all(&part).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        if bytes == 0 {
            return Err(self.engine_err("exporting images gave an empty archive"));
        }
        tracing::info!(app = %app.name, team = %app.team, images = names.len(), bytes, "images exported");
        Ok(Some((names, bytes)))
    }
}

/// The policy file's location under a data directory.
pub fn state_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("containers")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An inspect as the engine returns it (the fields the driver reads).
    fn inspect(v: serde_json::Value) -> ContainerInspectResponse {
        serde_json::from_value(v).expect("inspect fixture")
    }

    fn seen(component: &str, v: serde_json::Value) -> Seen {
        Seen {
            team: "web".parse().expect("team"),
            app: "shop".parse().expect("app"),
            component: component.parse().expect("component"),
            inspect: inspect(v),
        }
    }

    fn shop() -> Vec<Seen> {
        let labels = |service: &str, extra: &[(&str, &str)]| {
            let mut m = serde_json::Map::new();
            m.insert(PROJECT_LABEL.into(), "shop".into());
            m.insert(SERVICE_LABEL.into(), service.into());
            for (k, v) in extra {
                m.insert((*k).into(), (*v).into());
            }
            serde_json::Value::Object(m)
        };
        vec![
            seen(
                "db",
                serde_json::json!({
                    "Id": "d1", "Name": "/shop-db-1", "Image": "sha256:aa",
                    "State": {"Running": true},
                    "Config": {"Image": "postgres:15", "Labels": labels("db", &[("ferry.pre_stop", "psql -c CHECKPOINT")]),
                               "Healthcheck": {"Test": ["CMD", "pg_isready"]}},
                    "Mounts": [{"Type": "volume", "Name": "shop_pgdata", "Source": "/var/lib/docker/volumes/shop_pgdata/_data", "Destination": "/var/lib/postgresql/data"}],
                    "HostConfig": {"RestartPolicy": {"Name": "always"}}
                }),
            ),
            seen(
                "web",
                serde_json::json!({
                    "Id": "w1", "Name": "/shop-web-1", "Image": "sha256:bb",
                    "State": {"Running": false},
                    "Config": {"Image": "nginx", "Labels": labels("web", &[
                        (DEPENDS_LABEL, "db:service_started:false,missing:service_started:false"),
                        (STATEFUL_LABEL, "false")])},
                    "Mounts": [{"Type": "bind", "Source": "/srv/static", "Destination": "/usr/share/nginx/html"}]
                }),
            ),
            seen(
                "worker",
                serde_json::json!({
                    "Id": "k1", "Name": "/shop-worker-1", "Image": "sha256:cc",
                    "State": {"Running": true},
                    "Config": {"Image": "worker", "Labels": labels("worker", &[])},
                    "Mounts": [{"Type": "tmpfs", "Destination": "/tmp"}],
                    "HostConfig": {"Links": ["/shop-db-1:/shop-worker-1/db"]}
                }),
            ),
            seen(
                "sidecar",
                serde_json::json!({
                    "Id": "s1", "Name": "/shop-sidecar-1", "Image": "sha256:dd",
                    "State": {"Running": true, "Paused": true},
                    "Config": {"Image": "sidecar", "Labels": labels("sidecar", &[(STATEFUL_LABEL, "true")])},
                    "HostConfig": {"NetworkMode": "container:d1", "VolumesFrom": ["shop-db-1:ro"]}
                }),
            ),
        ]
    }

    /// What the host has at shop's bind sources.
    fn shop_facts() -> Facts {
        Facts {
            paths: HashMap::from([("/srv/static".to_owned(), SourceKind::Dir)]),
            ..Facts::default()
        }
    }

    #[test]
    fn containers_make_one_app_with_their_volumes_dependencies_and_hooks() {
        let app = build_app(
            "web".parse().expect("team"),
            "shop".parse().expect("app"),
            &shop(),
            &shop_facts(),
        )
        .expect("app");
        let names: Vec<&str> = app.components.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["db", "sidecar", "web", "worker"]);
        let c = |n: &str| {
            app.components
                .iter()
                .find(|c| c.name.as_str() == n)
                .expect(n)
        };
        let db = c("db");
        assert!(db.stateful);
        assert_eq!(db.state, ComponentState::Running);
        assert_eq!(
            db.kind,
            ComponentKind::Container(ContainerComponent {
                id: "d1".into(),
                name: "shop-db-1".into(),
                image: "postgres:15".into(),
                image_id: "sha256:aa".into(),
                mounts: vec![ContainerMount {
                    destination: "/var/lib/postgresql/data".into(),
                    source: "shop_pgdata".into(),
                    kind: "volume".into(),
                    read_only: false,
                    backup: MountBackup::Volume,
                }],
            })
        );
        assert_eq!(db.volumes[0].as_str(), "shop_pgdata");
        let pre_stop = db.hooks.pre_stop.as_ref().expect("pre_stop from the label");
        assert_eq!(pre_stop.as_slice(), ["sh", "-c", "psql -c CHECKPOINT"]);
        // A bind makes a volume; the label says it is not stateful anyway.
        let web = c("web");
        assert!(!web.stateful);
        assert_eq!(web.state, ComponentState::Stopped);
        assert_eq!(web.volumes[0].as_str(), "/srv/static");
        // Compose's depends_on (an unknown service ignored), a link, and
        // network_mode + volumes_from naming the same one (listed once).
        for n in ["web", "worker", "sidecar"] {
            let deps: Vec<&str> = c(n).depends_on.iter().map(|d| d.as_str()).collect();
            assert_eq!(deps, ["db"], "{n}");
        }
        // tmpfs is no volume; the label makes it stateful.
        assert!(!c("worker").stateful && c("worker").volumes.is_empty());
        assert!(c("sidecar").stateful);
        let vols: Vec<(&str, &str)> = app
            .volumes
            .iter()
            .map(|v| (v.name.as_str(), v.path.as_str()))
            .collect();
        assert_eq!(
            vols,
            [
                ("shop_pgdata", "/var/lib/docker/volumes/shop_pgdata/_data"),
                ("/srv/static", "/srv/static")
            ]
        );
    }

    #[test]
    fn an_app_with_a_volume_ferry_cannot_name_is_refused_not_cut_short() {
        let mut members = shop();
        members[0].inspect.mounts = Some(vec![bollard::models::MountPoint {
            typ: Some("volume".into()),
            name: Some("bad/name".into()),
            source: Some("relative/path".into()),
            ..Default::default()
        }]);
        let err = build_app(
            "web".parse().expect("team"),
            "shop".parse().expect("app"),
            &members,
            &shop_facts(),
        )
        .expect_err("refused");
        assert!(!err.is_empty());
    }

    /// Every kind of mount gets its decision from what is at its source,
    /// whether it is read-only, and the labels; only volumes become the
    /// app's volumes.
    #[test]
    fn mounts_are_decided_by_their_source_their_mode_and_the_labels() {
        let bind = |src: &str, dest: &str, rw: bool| bollard::models::MountPoint {
            typ: Some("bind".into()),
            source: Some(src.into()),
            destination: Some(dest.into()),
            rw: Some(rw),
            ..Default::default()
        };
        let volume = |name: &str, dest: &str| bollard::models::MountPoint {
            typ: Some("volume".into()),
            name: Some(name.into()),
            source: Some(format!("/var/lib/docker/volumes/{name}/_data")),
            destination: Some(dest.into()),
            rw: Some(true),
            ..Default::default()
        };
        let facts = Facts {
            paths: HashMap::from([
                ("/srv/data".into(), SourceKind::Dir),
                ("/usr".into(), SourceKind::Dir),
                ("/srv/nginx.conf".into(), SourceKind::File(1200)),
                ("/srv/big.img".into(), SourceKind::File(100 << 20)),
                ("/var/run/docker.sock".into(), SourceKind::Socket),
                ("/dev/fuse".into(), SourceKind::Device),
            ]),
            left_out: ["scratch".to_owned()].into(),
        };
        let none = HashMap::new();
        let yes = HashMap::from([(BACKUP_LABEL.to_owned(), "true".to_owned())]);
        let no = HashMap::from([(BACKUP_LABEL.to_owned(), "false".to_owned())]);
        let skipped = |d: &MountBackup| matches!(d, MountBackup::Skipped(_));
        let refused = |d: &MountBackup| matches!(d, MountBackup::Refused(_));
        type Expect<'a> = &'a dyn Fn(&MountBackup) -> bool;
        let cases: Vec<(
            bollard::models::MountPoint,
            &HashMap<String, String>,
            Expect,
        )> = vec![
            (volume("pgdata", "/var/lib/postgresql/data"), &none, &|d| {
                *d == MountBackup::Volume
            }),
            (volume("scratch", "/scratch"), &none, &skipped),
            (volume("pgdata", "/data"), &no, &skipped),
            (bind("/srv/data", "/data", true), &none, &|d| {
                *d == MountBackup::Volume
            }),
            (bind("/usr", "/usr", false), &none, &|d| {
                *d == MountBackup::Config
            }),
            (bind("/usr", "/usr", false), &yes, &|d| {
                *d == MountBackup::Volume
            }),
            (
                bind("/srv/nginx.conf", "/etc/nginx/nginx.conf", false),
                &none,
                &|d| *d == MountBackup::File,
            ),
            (
                bind("/srv/nginx.conf", "/etc/nginx/nginx.conf", true),
                &none,
                &|d| *d == MountBackup::File,
            ),
            (
                bind("/srv/nginx.conf", "/etc/nginx/nginx.conf", false),
                &no,
                &skipped,
            ),
            (bind("/srv/big.img", "/disk.img", true), &none, &refused),
            (
                bind("/var/run/docker.sock", "/var/run/docker.sock", true),
                &yes,
                &skipped,
            ),
            (bind("/dev/fuse", "/dev/fuse", true), &none, &skipped),
            (bind("/srv/gone", "/gone", true), &none, &refused),
            (bind("/srv/gone", "/gone", true), &no, &skipped),
            (
                bollard::models::MountPoint {
                    typ: Some("tmpfs".into()),
                    destination: Some("/tmp".into()),
                    ..Default::default()
                },
                &none,
                &skipped,
            ),
        ];
        for (m, labels, expected) in cases {
            let d = decide(&m, labels, &facts);
            assert!(expected(&d), "{:?} {labels:?}: {d:?}", m.destination);
        }
        // Only what is backed up as a volume is one of the app's volumes.
        let mut members = shop();
        members[0].inspect.mounts = Some(vec![
            volume("shop_pgdata", "/var/lib/postgresql/data"),
            bind("/srv/nginx.conf", "/etc/nginx/nginx.conf", false),
            bind("/usr", "/usr", false),
            bind("/var/run/docker.sock", "/var/run/docker.sock", true),
        ]);
        let app = build_app(
            "web".parse().expect("team"),
            "shop".parse().expect("app"),
            &members,
            &facts,
        )
        .expect("app");
        let vols: Vec<&str> = app.volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            vols,
            ["shop_pgdata"],
            "/srv/static is missing: refused, not a volume"
        );
        assert_eq!(
            app.refused_mounts(),
            ["web: /usr/share/nginx/html: its source /srv/static does not exist on this host"]
        );
        let db = app
            .components
            .iter()
            .find(|c| c.name.as_str() == "db")
            .expect("db");
        let ComponentKind::Container(k) = &db.kind else {
            panic!("a container")
        };
        let decided: Vec<(&str, &MountBackup)> = k
            .mounts
            .iter()
            .map(|m| (m.destination.as_str(), &m.backup))
            .collect();
        assert_eq!(decided[1], ("/etc/nginx/nginx.conf", &MountBackup::File));
        assert_eq!(decided[2], ("/usr", &MountBackup::Config));
        assert!(skipped(decided[3].1));
        assert_eq!(db.volumes.len(), 1);
    }
}

#[cfg(test)]
mod capture_tests {
    use super::*;
    use bollard::models::{ContainerConfig, ImageConfig};

    #[test]
    fn a_copy_volume_takes_the_copy_name_for_the_app_prefix() {
        let name = |of: &str, copy: &str, v: &str| {
            copy_volume_name(
                &of.parse().expect("app"),
                &copy.parse().expect("copy"),
                &VolumeName::new(v).expect("volume"),
            )
        };
        // Compose names a project's volumes PROJECT_VOLUME.
        assert_eq!(name("shop", "shop-copy", "shop_pgdata"), "shop-copy_pgdata");
        assert_eq!(name("shop", "shop2", "shopdata"), "shop2_shopdata");
        assert_eq!(name("shop", "b", "other_data"), "b_other_data");
    }

    #[test]
    fn what_the_image_sets_is_not_copied_into_the_container_config() {
        let image = ImageConfig {
            env: Some(vec!["PATH=/usr/bin".into(), "LANG=C".into()]),
            cmd: Some(vec!["postgres".into()]),
            entrypoint: Some(vec!["docker-entrypoint.sh".into()]),
            working_dir: Some("/".into()),
            labels: Some(HashMap::from([
                ("maintainer".to_owned(), "someone".to_owned()),
                ("version".to_owned(), "15".to_owned()),
            ])),
            ..Default::default()
        };
        let container = ContainerConfig {
            hostname: Some("6cf5b2c8186d".into()),
            image: Some("postgres:15".into()),
            env: Some(vec![
                "PATH=/usr/bin".into(),
                "LANG=C.UTF-8".into(),
                "POSTGRES_PASSWORD=s3cret".into(),
            ]),
            cmd: Some(vec!["postgres".into()]),
            entrypoint: Some(vec!["/custom-entry".into()]),
            working_dir: Some("/".into()),
            user: Some("999".into()),
            labels: Some(HashMap::from([
                ("maintainer".to_owned(), "someone".to_owned()),
                ("version".to_owned(), "16".to_owned()),
                ("ferry.app".to_owned(), "shop".to_owned()),
            ])),
            ..Default::default()
        };
        let c = without_image_defaults(&container, Some(&image));
        // Volatile or kept apart.
        assert_eq!((c.hostname, c.image), (None, None));
        // Equal to the image's: dropped; different or the container's own: kept.
        assert_eq!(
            c.env,
            Some(vec![
                "LANG=C.UTF-8".into(),
                "POSTGRES_PASSWORD=s3cret".into()
            ])
        );
        assert_eq!(c.cmd, None);
        assert_eq!(c.working_dir, None);
        assert_eq!(c.entrypoint, Some(vec!["/custom-entry".into()]));
        assert_eq!(c.user, Some("999".into()));
        let mut labels: Vec<_> = c.labels.unwrap_or_default().into_iter().collect();
        labels.sort();
        assert_eq!(
            labels,
            [
                ("ferry.app".to_owned(), "shop".to_owned()),
                ("version".to_owned(), "16".to_owned())
            ]
        );
        // Without the image's config, only the volatile fields go.
        let bare = without_image_defaults(&container, None);
        assert_eq!(bare.env.map(|e| e.len()), Some(3));
        assert_eq!(bare.hostname, None);
    }
}

//! The host driver: apps declared in the agent config, components that are
//! systemd units (`systemctl start|stop|is-active`) or start/stop commands
//! with an optional status command (exit 0 = running).

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use ferry_core::{App, AppName, ComponentKind, HostComponent, TeamName, Volume};

use super::{
    ComponentRef, ComponentState, Copied, Copies, CopiesRoot, CopyId, Driver, NewCopy,
    PlatformError, Receipt, Remark, Volumes,
};

/// What a component's commands get of the agent's environment; nothing
/// else (a command that needs more sets it: `env NAME=VALUE program …`).
const INHERITED_ENV: [&str; 5] = ["PATH", "HOME", "LANG", "LC_ALL", "TZ"];
/// `PATH` when the agent has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Stderr kept for error messages.
const STDERR_LIMIT: usize = 2048;
/// How long stderr is read after the command exited.
const STDERR_DRAIN: Duration = Duration::from_millis(200);

/// The host platform driver.
#[derive(Debug)]
pub struct HostPlatform {
    /// The declared apps and the registered copies; component states are
    /// filled per inventory.
    apps: std::sync::RwLock<Apps>,
    /// Held from reading the registry to swapping in the saved one, so two
    /// steps that change it at once never lose each other's change.
    editing: std::sync::Mutex<()>,
    timeout: Duration,
    /// Where copies are recorded (`D/apps.json`); none: copies cannot be
    /// made.
    data_dir: Option<PathBuf>,
    /// Where copies' volumes go (the agent config's `copies_dir`).
    copies_root: Option<CopiesRoot>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Apps {
    #[serde(skip)]
    declared: Vec<App>,
    #[serde(default)]
    copies: Vec<Copy>,
    /// Declared apps removed as the source of a move.
    #[serde(default)]
    retired: Vec<(TeamName, AppName)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Copy {
    app: App,
    /// The job that restored it.
    job: u64,
    /// The ports moved off the original's (`NAME=PORT`), for a job that
    /// asks again.
    #[serde(default)]
    remapped_ports: Vec<String>,
}

impl Apps {
    fn all(&self) -> impl Iterator<Item = &App> {
        self.declared
            .iter()
            .filter(|a| !self.retired.contains(&(a.team.clone(), a.name.clone())))
            .chain(self.copies.iter().map(|c| &c.app))
    }
}

/// Where the registry of copies lives.
fn registry_path(data_dir: &Path) -> PathBuf {
    data_dir.join("apps.json")
}

/// Expands `{port:NAME=DEFAULT}` placeholders to the port.
pub fn expand_ports(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(start) = rest.find("{port:") {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        match tail.find('}') {
            Some(end) => {
                let inner = &tail[6..end];
                match inner.split_once('=') {
                    Some((_, port)) if port.parse::<u16>().is_ok() => out.push_str(port),
                    _ => out.push_str(&tail[..=end]),
                }
                rest = &tail[end + 1..];
            }
            None => {
                out.push_str(tail);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The ports an app's commands declare, by name.
pub fn declared_ports(app: &App) -> std::collections::BTreeMap<String, u16> {
    let mut ports = std::collections::BTreeMap::new();
    for arg in commands_of(app).flat_map(|a| a.as_slice().iter()) {
        let mut rest = arg.as_str();
        while let Some(start) = rest.find("{port:") {
            let tail = &rest[start + 6..];
            let Some(end) = tail.find('}') else { break };
            if let Some((name, port)) = tail[..end].split_once('=')
                && let Ok(port) = port.parse::<u16>()
            {
                ports.insert(name.to_owned(), port);
            }
            rest = &tail[end..];
        }
    }
    ports
}

fn commands_of(app: &App) -> impl Iterator<Item = &ferry_core::Argv> {
    app.components.iter().flat_map(|c| match &c.kind {
        ComponentKind::Host(HostComponent::Commands {
            start,
            stop,
            status,
        }) => vec![start, stop]
            .into_iter()
            .chain(status.iter())
            .chain(c.hooks.iter().map(|(_, a)| a))
            .collect::<Vec<_>>(),
        ComponentKind::Host(HostComponent::Systemd { .. }) | ComponentKind::Container(_) => {
            c.hooks.iter().map(|(_, a)| a).collect()
        }
    })
}

/// Replaces `{port:NAME=OLD}` with `{port:NAME=NEW}` where NAME is remapped.
fn remap_ports(arg: &str, ports: &std::collections::BTreeMap<String, (u16, u16)>) -> String {
    let mut out = arg.to_owned();
    for (name, (old, new)) in ports {
        out = out.replace(
            &format!("{{port:{name}={old}}}"),
            &format!("{{port:{name}={new}}}"),
        );
    }
    out
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// The copy's definition: the original's, named anew, its volumes at the
/// restored paths (replaced in its commands too) and each declared port
/// moved to the next free one where the original's is taken.
fn copy_of(new: &NewCopy<'_>, taken: &[u16]) -> Result<Copied, PlatformError> {
    let app = new.original;
    let bad = |reason: String| PlatformError::BadCopy {
        app: format!("{}/{}", app.team, app.name),
        reason,
    };
    // Longest first, so /a/b is replaced before /a.
    let mut moves: Vec<(String, String)> = app
        .volumes
        .iter()
        .zip(new.paths)
        .map(|(v, p)| (v.path.to_string(), p.display().to_string()))
        .collect();
    moves.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
    let mut ports = std::collections::BTreeMap::new();
    let mut used: Vec<u16> = taken.to_vec();
    for (pname, port) in declared_ports(app) {
        let mut p = port;
        while used.contains(&p) || !port_free(p) {
            p = p.checked_add(1).ok_or_else(|| PlatformError::NoFreePort {
                name: pname.clone(),
                from: port,
            })?;
        }
        used.push(p);
        if p != port {
            ports.insert(pname, (port, p));
        }
    }
    let rewrite = |arg: &String| {
        let mut a = arg.clone();
        for (from, to) in &moves {
            a = a.replace(from.as_str(), to);
        }
        remap_ports(&a, &ports)
    };
    let argv = |a: &ferry_core::Argv| {
        ferry_core::Argv::new(a.as_slice().iter().map(rewrite).collect())
            .map_err(|e| bad(e.to_string()))
    };
    let mut copy = app.clone();
    copy.team = new.copy.team.clone();
    copy.name = new.copy.name.clone();
    for (v, p) in copy.volumes.iter_mut().zip(new.paths) {
        v.path =
            ferry_core::HostPath::new(p.display().to_string()).map_err(|e| bad(e.to_string()))?;
    }
    for c in &mut copy.components {
        c.state = ComponentState::Unknown;
        c.hooks = ferry_core::Hooks {
            pre_backup: c.hooks.pre_backup.as_ref().map(argv).transpose()?,
            post_backup: c.hooks.post_backup.as_ref().map(argv).transpose()?,
            pre_stop: c.hooks.pre_stop.as_ref().map(argv).transpose()?,
        };
        let ComponentKind::Host(HostComponent::Commands {
            start,
            stop,
            status,
        }) = &c.kind
        else {
            return Err(bad(format!(
                "component {} is a systemd unit; a copy needs start/stop commands (a unit cannot run twice)",
                c.name
            )));
        };
        c.kind = ComponentKind::Host(HostComponent::Commands {
            start: argv(start)?,
            stop: argv(stop)?,
            status: status.as_ref().map(argv).transpose()?,
        });
    }
    copy.validate().map_err(|e| bad(e.to_string()))?;
    Ok(Copied {
        app: copy,
        remapped_ports: ports
            .iter()
            .map(|(n, (_, new))| format!("{n}={new}"))
            .collect(),
    })
}

/// The outcome of one command.
struct Ran {
    success: bool,
    code: Option<i32>,
    status: String,
    stderr: String,
}

impl HostPlatform {
    /// Builds the driver from the apps declared in the agent config
    /// ([`crate::config::AgentConfig::app_model`]).
    pub fn new(apps: Vec<App>, timeout: Duration) -> Self {
        Self {
            apps: std::sync::RwLock::new(Apps {
                declared: apps,
                ..Apps::default()
            }),
            editing: std::sync::Mutex::new(()),
            timeout,
            data_dir: None,
            copies_root: None,
        }
    }

    /// The driver with the copies recorded under `data_dir` (restored
    /// apps), which it can add to; their volumes go under `copies_root`.
    pub fn with_copies(
        apps: Vec<App>,
        timeout: Duration,
        data_dir: &Path,
        copies_root: &Path,
    ) -> Result<Self, PlatformError> {
        let path = registry_path(data_dir);
        let mut registry: Apps = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| PlatformError::Registry {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Apps::default(),
            Err(e) => {
                return Err(PlatformError::Registry {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        registry.declared = apps;
        Ok(Self {
            apps: std::sync::RwLock::new(registry),
            editing: std::sync::Mutex::new(()),
            timeout,
            data_dir: Some(data_dir.to_owned()),
            copies_root: Some(CopiesRoot::new(copies_root)),
        })
    }

    /// Whether the agent config or a restored copy declares `team/app`.
    pub fn declares(&self, team: &TeamName, app: &AppName) -> bool {
        self.read().all().any(|a| a.team == *team && a.name == *app)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Apps> {
        self.apps.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the registry: `f` edits a copy of it, which is saved
    /// durably and then put in place; edits run one at a time.
    fn edit<T>(
        &self,
        f: impl FnOnce(&mut Apps) -> Result<T, PlatformError>,
    ) -> Result<T, PlatformError> {
        let _one_at_a_time = self.editing.lock().unwrap_or_else(|p| p.into_inner());
        let mut apps = self.read().clone();
        let out = f(&mut apps)?;
        let Some(dir) = &self.data_dir else {
            return Err(PlatformError::Registry {
                path: PathBuf::from("(none)"),
                reason: "this agent keeps no registry of copies".into(),
            });
        };
        let path = registry_path(dir);
        let err = |e: std::io::Error| PlatformError::Registry {
            path: path.clone(),
            reason: e.to_string(),
        };
        let text = serde_json::to_vec_pretty(&apps).map_err(|e| err(e.into()))?;
        crate::durable::write(&path, &text).map_err(err)?;
        *self.apps.write().unwrap_or_else(|p| p.into_inner()) = apps;
        Ok(out)
    }

    fn find(&self, r: &ComponentRef) -> Result<HostComponent, PlatformError> {
        self.read()
            .all()
            .filter(|a| a.team == r.team && a.name == r.app)
            .find_map(|a| a.component(&r.component))
            .and_then(|c| match &c.kind {
                ComponentKind::Host(h) => Some(h.clone()),
                ComponentKind::Container(_) => None,
            })
            .ok_or_else(|| PlatformError::UnknownComponent {
                component: Box::new(r.clone()),
            })
    }

    async fn run(
        &self,
        action: &'static str,
        component: &ComponentRef,
        argv: &[String],
    ) -> Result<Ran, PlatformError> {
        let spawn_err = |source| PlatformError::Spawn {
            action,
            component: Box::new(component.clone()),
            source,
        };
        let (program, args) = argv.split_first().ok_or_else(|| {
            spawn_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "empty command",
            ))
        })?;
        // A clean environment: the agent's own (S3 keys, the repository
        // password) is not the app's business.
        let mut command = Command::new(expand_ports(program));
        command.env_clear();
        for key in INHERITED_ENV {
            if let Some(v) = std::env::var_os(key) {
                command.env(key, v);
            }
        }
        if std::env::var_os("PATH").is_none() {
            command.env("PATH", DEFAULT_PATH);
        }
        let mut child = command
            .args(args.iter().map(|a| expand_ports(a)))
            .env("FERRY_TEAM", component.team.as_str())
            .env("FERRY_APP", component.app.as_str())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        let mut stderr_pipe = child.stderr.take();
        // A command may leave a daemon behind that inherited stderr: read
        // what arrives while the command runs, never wait for EOF after it.
        let mut buf = Vec::new();
        let status = tokio::time::timeout(self.timeout, async {
            let mut chunk = [0u8; 512];
            loop {
                match &mut stderr_pipe {
                    Some(pipe) => tokio::select! {
                        status = child.wait() => break status,
                        n = pipe.read(&mut chunk) => match n {
                            Ok(0) | Err(_) => stderr_pipe = None,
                            Ok(n) => if buf.len() < STDERR_LIMIT { buf.extend_from_slice(&chunk[..n]) },
                        },
                    },
                    None => break child.wait().await,
                }
            }
        })
        .await
        .map_err(|_| PlatformError::Timeout {
            action,
            component: Box::new(component.clone()),
            secs: self.timeout.as_secs(),
        })?
        .map_err(spawn_err)?;
        // The command has exited; collect what it wrote last. EOF comes at
        // once unless a daemon it left behind holds stderr open: bounded.
        if let Some(mut pipe) = stderr_pipe {
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(STDERR_DRAIN, pipe.read_to_end(&mut rest)).await;
            buf.extend_from_slice(&rest);
        }
        buf.truncate(STDERR_LIMIT);
        Ok(Ran {
            success: status.success(),
            code: status.code(),
            status: status.to_string(),
            stderr: String::from_utf8_lossy(&buf).trim().to_owned(),
        })
    }

    async fn run_checked(
        &self,
        action: &'static str,
        component: &ComponentRef,
        argv: &[String],
    ) -> Result<(), PlatformError> {
        let ran = self.run(action, component, argv).await?;
        if ran.success {
            tracing::info!(%component, action, "component command succeeded");
            Ok(())
        } else {
            Err(PlatformError::CommandFailed {
                action,
                component: Box::new(component.clone()),
                status: ran.status,
                stderr: ran.stderr,
            })
        }
    }

    fn systemctl(verb: &str, unit: &str) -> Vec<String> {
        vec!["systemctl".into(), verb.into(), "--".into(), unit.into()]
    }
}

/// What the host driver keeps of a stopped component: the unit, so the
/// unit Ferry stopped is the one started again (even if the component's
/// unit in the agent config has changed since); commands come from the
/// config.
#[derive(Debug, Default, Serialize, Deserialize)]
struct HostReceipt {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unit: Option<ferry_core::UnitName>,
}

impl HostPlatform {
    /// What a receipt's component is: the unit Ferry stopped, or its
    /// declared commands; unknown once the agent no longer manages it (its
    /// app dropped from the config, or retired).
    fn target(&self, r: &Receipt) -> Result<HostComponent, PlatformError> {
        let declared = self.find(&r.component)?;
        let kept: HostReceipt = if r.detail.is_null() {
            HostReceipt::default()
        } else {
            serde_json::from_value(r.detail.clone()).map_err(|e| PlatformError::BadReceipt {
                component: Box::new(r.component.clone()),
                reason: e.to_string(),
            })?
        };
        Ok(match kept.unit {
            Some(unit) => HostComponent::Systemd { unit },
            None => declared,
        })
    }

    async fn status_of(
        &self,
        r: &ComponentRef,
        c: &HostComponent,
    ) -> Result<ComponentState, PlatformError> {
        match c {
            HostComponent::Systemd { unit } => {
                let ran = self
                    .run("status", r, &Self::systemctl("is-active", unit.as_str()))
                    .await?;
                // is-active: 0 active; 3 inactive/failed; others: cannot tell.
                Ok(match ran.code {
                    Some(0) => ComponentState::Running,
                    Some(3) => ComponentState::Stopped,
                    _ => ComponentState::Unknown,
                })
            }
            HostComponent::Commands { status: None, .. } => Ok(ComponentState::Unknown),
            HostComponent::Commands {
                status: Some(argv), ..
            } => {
                let ran = self.run("status", r, argv.as_slice()).await?;
                Ok(if ran.success {
                    ComponentState::Running
                } else {
                    ComponentState::Stopped
                })
            }
        }
    }

    /// Copies' volumes live under the copies root; none: no copies.
    fn copies_root(&self) -> Result<&CopiesRoot, PlatformError> {
        self.copies_root
            .as_ref()
            .ok_or_else(|| PlatformError::Unsupported {
                what: "copies on an agent without a copies directory".into(),
            })
    }
}

#[async_trait]
impl Driver for HostPlatform {
    fn name(&self) -> &'static str {
        "host"
    }

    fn owns(&self, team: &TeamName, app: &AppName) -> bool {
        self.declares(team, app)
    }

    async fn app(&self, team: &TeamName, app: &AppName) -> Result<Option<App>, PlatformError> {
        Ok(self
            .read()
            .all()
            .find(|a| a.team == *team && a.name == *app)
            .cloned())
    }

    async fn inventory(&self) -> Result<Vec<App>, PlatformError> {
        let mut apps: Vec<App> = self.read().all().cloned().collect();
        for app in &mut apps {
            for c in &mut app.components {
                let r = ComponentRef {
                    team: app.team.clone(),
                    app: app.name.clone(),
                    component: c.name.clone(),
                };
                c.state = match self.status(&r).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(component = %r, error = %e, "status unknown");
                        ComponentState::Unknown
                    }
                };
            }
        }
        Ok(apps)
    }

    async fn status(&self, r: &ComponentRef) -> Result<ComponentState, PlatformError> {
        let c = self.find(r)?;
        self.status_of(r, &c).await
    }

    async fn receipt(&self, r: &ComponentRef) -> Result<Receipt, PlatformError> {
        let detail = match self.find(r)? {
            HostComponent::Systemd { unit } => serde_json::to_value(HostReceipt {
                unit: Some(unit),
            })
            .map_err(|e| PlatformError::BadReceipt {
                component: Box::new(r.clone()),
                reason: e.to_string(),
            })?,
            HostComponent::Commands { .. } => serde_json::Value::Null,
        };
        Ok(Receipt {
            driver: self.name().to_owned(),
            component: r.clone(),
            detail,
        })
    }

    async fn stop(&self, receipt: &Receipt) -> Result<Remark, PlatformError> {
        let r = &receipt.component;
        match self.target(receipt)? {
            HostComponent::Systemd { unit } => {
                self.run_checked("stop", r, &Self::systemctl("stop", unit.as_str()))
                    .await?;
            }
            HostComponent::Commands { stop, .. } => {
                self.run_checked("stop", r, stop.as_slice()).await?;
            }
        }
        Ok(None)
    }

    async fn start(&self, receipt: &Receipt) -> Result<Remark, PlatformError> {
        let r = &receipt.component;
        let c = self.target(receipt)?;
        // Running already (someone else started it): nothing to do. A
        // component that cannot tell is started (its start command is
        // what Ferry has).
        if self.status_of(r, &c).await? == ComponentState::Running {
            return Ok(None);
        }
        match c {
            HostComponent::Systemd { unit } => {
                self.run_checked("start", r, &Self::systemctl("start", unit.as_str()))
                    .await?;
            }
            HostComponent::Commands { start, .. } => {
                self.run_checked("start", r, start.as_slice()).await?;
            }
        }
        Ok(None)
    }

    /// A stop command is killed at the command timeout; one left behind
    /// by a killed agent is bounded by its own.
    fn stop_deadline(&self) -> Duration {
        self.timeout
    }

    async fn hook(
        &self,
        r: &ComponentRef,
        which: &'static str,
        argv: &ferry_core::Argv,
    ) -> Result<(), PlatformError> {
        self.find(r)?;
        self.run_checked(which, r, argv.as_slice()).await
    }

    fn volumes(&self) -> &dyn Volumes {
        self
    }

    fn copies(&self) -> Option<&dyn Copies> {
        self.copies_root.as_ref().map(|_| self as &dyn Copies)
    }
}

#[async_trait]
impl Volumes for HostPlatform {
    /// The declared path.
    async fn source(&self, _app: &App, volume: &Volume) -> Result<PathBuf, PlatformError> {
        Ok(volume.path.as_path().to_path_buf())
    }

    /// `ROOT/TEAM/APP/job-N/vINDEX` ([`CopiesRoot::target`]).
    async fn target(
        &self,
        copy: CopyId<'_>,
        _original: &App,
        index: usize,
    ) -> Result<PathBuf, PlatformError> {
        self.copies_root()?.target(copy, index).await
    }

    async fn discard(&self, copy: CopyId<'_>) -> Result<(), PlatformError> {
        self.copies_root()?.discard(copy).await
    }
}

#[async_trait]
impl Copies for HostPlatform {
    async fn add(&self, new: NewCopy<'_>) -> Result<Copied, PlatformError> {
        // Under the registry's edit: two copies restored at once never
        // pick the same port.
        self.edit(|apps| {
            if apps
                .all()
                .any(|a| a.team == *new.copy.team && a.name == *new.copy.name)
            {
                return Err(PlatformError::AppExists {
                    team: new.copy.team.clone(),
                    app: new.copy.name.clone(),
                });
            }
            let taken: Vec<u16> = apps
                .all()
                .flat_map(|a| declared_ports(a).into_values())
                .collect();
            let copied = copy_of(&new, &taken)?;
            apps.copies.push(Copy {
                app: copied.app.clone(),
                job: new.copy.job,
                remapped_ports: copied.remapped_ports.clone(),
            });
            Ok(copied)
        })
    }

    fn job_of(&self, team: &TeamName, app: &AppName) -> Option<u64> {
        self.read()
            .copies
            .iter()
            .find(|c| c.app.team == *team && c.app.name == *app)
            .map(|c| c.job)
    }

    fn remapped_ports_of(&self, team: &TeamName, app: &AppName) -> Vec<String> {
        self.read()
            .copies
            .iter()
            .find(|c| c.app.team == *team && c.app.name == *app)
            .map(|c| c.remapped_ports.clone())
            .unwrap_or_default()
    }

    async fn remove(
        &self,
        team: &TeamName,
        app: &AppName,
        delete_data: bool,
    ) -> Result<bool, PlatformError> {
        if !self.declares(team, app) {
            return Ok(false);
        }
        let copy = self.edit(|apps| {
            if let Some(i) = apps
                .copies
                .iter()
                .position(|c| c.app.team == *team && c.app.name == *app)
            {
                return Ok(Some(apps.copies.remove(i).app));
            }
            apps.retired.push((team.clone(), app.clone()));
            Ok(None)
        })?;
        // Only a copy's volumes under the copies root (or, restored by an
        // older agent, under `DATA_DIR/copies`) are Ferry's to delete: the
        // volumes, then their job's directory once it is empty.
        let roots: Vec<PathBuf> = self
            .copies_root
            .iter()
            .map(|r| r.path().to_path_buf())
            .chain(self.data_dir.as_ref().map(|d| d.join("copies")))
            .collect();
        if let (true, Some(copy)) = (delete_data, copy) {
            let volumes: Vec<PathBuf> = copy
                .volumes
                .iter()
                .map(|v| v.path.as_path().to_path_buf())
                .filter(|p| roots.iter().any(|r| p.starts_with(r) && p != r))
                .collect();
            tokio::task::spawn_blocking(move || {
                for v in &volumes {
                    match std::fs::remove_dir_all(v) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(PlatformError::Registry {
                                path: v.clone(),
                                reason: format!("cannot delete the copy's volume: {e}"),
                            });
                        }
                    }
                    if let Some(home) = v.parent().filter(|h| !roots.iter().any(|r| h == r)) {
                        let _ = std::fs::remove_dir(home);
                    }
                }
                Ok(())
            })
            .await
            .map_err(|e| PlatformError::Registry {
                path: PathBuf::from("(copies)"),
                reason: e.to_string(),
            })??;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
    use ferry_core::CodedError;

    fn platform(dir: &std::path::Path, timeout: Duration) -> HostPlatform {
        let d = dir.display();
        let text = format!(
            r#"
controller = "https://127.0.0.1:1"
data_dir = "{d}"

[[apps]]
name = "shop"
team = "web"

[[apps.components]]
name = "sleeper"
stateful = true
volumes = ["{d}/data"]
start = "sleep 300 >/dev/null 2>&1 & echo $! > {d}/pid"
stop = "kill $(cat {d}/pid) && rm {d}/pid"
status = "test -f {d}/pid && kill -0 $(cat {d}/pid)"

[[apps.components]]
name = "no-status"
start = ["true"]
stop = ["sh", "-c", "echo cannot stop this >&2; exit 7"]

[[apps.components]]
name = "slow"
start = "sleep 30"
stop = "true"
"#
        );
        let cfg = AgentConfig::parse(&text).expect("valid config");
        HostPlatform::new(cfg.app_model().expect("model"), timeout)
    }

    fn r(c: &str) -> ComponentRef {
        ComponentRef {
            team: "web".parse().expect("team"),
            app: "shop".parse().expect("app"),
            component: c.parse().expect("component"),
        }
    }

    #[tokio::test]
    async fn commands_start_stop_and_report_a_real_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = platform(dir.path(), Duration::from_secs(20));
        assert_eq!(
            p.status(&r("sleeper")).await.expect("status"),
            ComponentState::Stopped
        );
        p.start(&p.receipt(&r("sleeper")).await.expect("receipt"))
            .await
            .expect("start");
        let pid: i32 = std::fs::read_to_string(dir.path().join("pid"))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        assert_eq!(
            p.status(&r("sleeper")).await.expect("status"),
            ComponentState::Running
        );
        let inv = p.inventory().await.expect("inventory");
        assert_eq!(inv.len(), 1);
        assert_eq!(inv[0].components.len(), 3);
        let sleeper = &inv[0].components[0];
        assert_eq!(sleeper.state, ComponentState::Running);
        assert!(sleeper.stateful);
        let data = format!("{}/data", dir.path().display());
        assert_eq!(sleeper.volumes.len(), 1);
        assert_eq!(sleeper.volumes[0].as_str(), data);
        assert_eq!(inv[0].volumes.len(), 1);
        assert_eq!(inv[0].volumes[0].path.as_str(), data);
        assert_eq!(inv[0].components[1].state, ComponentState::Unknown);

        p.stop(&p.receipt(&r("sleeper")).await.expect("receipt"))
            .await
            .expect("stop");
        assert_eq!(
            p.status(&r("sleeper")).await.expect("status"),
            ComponentState::Stopped
        );
        // The process is gone (possibly a zombie until reaped by init).
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(state.is_empty() || state.contains(") Z"), "{state}");
    }

    #[tokio::test]
    async fn a_failing_command_reports_its_exit_status_and_stderr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = platform(dir.path(), Duration::from_secs(20));
        let err = p
            .stop(&p.receipt(&r("no-status")).await.expect("receipt"))
            .await
            .expect_err("stop fails");
        let msg = err.to_string();
        assert!(
            msg.contains("stop of component no-status of app web/shop"),
            "{msg}"
        );
        assert!(msg.contains("7"), "{msg}");
        assert!(msg.contains("cannot stop this"), "{msg}");
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn a_command_that_hangs_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = platform(dir.path(), Duration::from_millis(300));
        let err = p
            .start(&p.receipt(&r("slow")).await.expect("receipt"))
            .await
            .expect_err("times out");
        assert!(matches!(err, PlatformError::Timeout { .. }), "{err}");
        assert!(err.is_transient());
    }

    #[tokio::test]
    async fn unknown_components_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = platform(dir.path(), Duration::from_secs(5));
        let err = p.receipt(&r("nope")).await.expect_err("unknown");
        assert!(
            err.to_string()
                .contains("component nope of app web/shop is not known"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn systemd_status_is_unknown_or_real_without_panicking() {
        // systemctl may be missing or without a running systemd here; the
        // driver must then fail cleanly (spawn error) or report a state.
        let cfg = AgentConfig::parse(
            "controller = \"https://c:1\"\ndata_dir = \"/d\"\n[[apps]]\nname = \"a\"\nteam = \"t\"\n[[apps.components]]\nname = \"u\"\nsystemd = \"ferry-test-does-not-exist.service\"\n",
        )
        .expect("valid");
        let p = HostPlatform::new(cfg.app_model().expect("model"), Duration::from_secs(10));
        let c = ComponentRef {
            team: "t".parse().expect("team"),
            app: "a".parse().expect("app"),
            component: "u".parse().expect("component"),
        };
        match p.status(&c).await {
            Ok(state) => assert_ne!(state, ComponentState::Running),
            Err(e) => assert!(matches!(e, PlatformError::Spawn { .. }), "{e}"),
        }
    }

    /// A receipt outlives its app: once the app is retired (or dropped
    /// from the config), nothing of it is started again.
    #[tokio::test]
    async fn a_receipt_of_an_app_no_longer_managed_starts_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let declared = platform(dir.path(), Duration::from_secs(20))
            .app(&"web".parse().expect("team"), &"shop".parse().expect("app"))
            .await
            .expect("app")
            .expect("declared");
        let p = HostPlatform::with_copies(
            vec![declared],
            Duration::from_secs(20),
            dir.path(),
            &dir.path().join("copies"),
        )
        .expect("driver");
        let receipt = p.receipt(&r("sleeper")).await.expect("receipt");
        assert!(
            p.remove(
                &"web".parse().expect("team"),
                &"shop".parse().expect("app"),
                false
            )
            .await
            .expect("retired")
        );
        let err = p.start(&receipt).await.expect_err("not managed");
        assert!(
            matches!(err, PlatformError::UnknownComponent { .. }),
            "{err}"
        );
        assert!(!dir.path().join("pid").exists(), "nothing was started");
    }

    /// `--delete-data` deletes a copy's volumes under the copies root and
    /// those an older agent restored under `DATA_DIR/copies`; nothing
    /// elsewhere.
    #[tokio::test]
    async fn delete_data_reaches_copies_an_older_agent_made_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = HostPlatform::with_copies(
            Vec::new(),
            Duration::from_secs(5),
            dir.path(),
            &dir.path().join("new-copies"),
        )
        .expect("driver");
        let template = platform(dir.path(), Duration::from_secs(5))
            .app(&"web".parse().expect("team"), &"shop".parse().expect("app"))
            .await
            .expect("app")
            .expect("declared");
        let team: TeamName = "qa".parse().expect("team");
        let legacy = dir.path().join("copies/qa/old/v0");
        let current = dir.path().join("new-copies/qa/new/job-2/v0");
        let elsewhere = dir.path().join("elsewhere");
        for (name, path, job) in [
            ("old", &legacy, 1),
            ("new", &current, 2),
            ("other", &elsewhere, 3),
        ] {
            std::fs::create_dir_all(path).expect("volume");
            std::fs::write(path.join("data"), "rows").expect("data");
            let name: AppName = name.parse().expect("name");
            p.add(NewCopy {
                original: &template,
                copy: super::CopyId {
                    team: &team,
                    name: &name,
                    job,
                },
                paths: std::slice::from_ref(path),
            })
            .await
            .expect("added");
        }
        for name in ["old", "new", "other"] {
            let name: AppName = name.parse().expect("name");
            assert!(p.remove(&team, &name, true).await.expect("removed"));
        }
        assert!(!legacy.exists(), "an older agent's copy is deleted");
        assert!(
            !dir.path().join("copies/qa/old").exists(),
            "its empty home too"
        );
        assert!(!current.exists(), "a copy under the copies root is deleted");
        assert!(elsewhere.join("data").exists(), "data elsewhere is kept");
    }

    /// Two steps on different apps change the registry at once: neither
    /// change is lost, in memory or on disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn copies_added_at_once_are_all_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = std::sync::Arc::new(
            HostPlatform::with_copies(
                Vec::new(),
                Duration::from_secs(5),
                dir.path(),
                &dir.path().join("copies"),
            )
            .expect("driver"),
        );
        let template = platform(dir.path(), Duration::from_secs(5))
            .app(&"web".parse().expect("team"), &"shop".parse().expect("app"))
            .await
            .expect("app")
            .expect("declared");
        let mut tasks = Vec::new();
        for i in 0..16u64 {
            let (p, template) = (p.clone(), template.clone());
            let paths = vec![dir.path().join(format!("c{i}"))];
            tasks.push(tokio::spawn(async move {
                let team = "web".parse().expect("team");
                let name = format!("copy{i}").parse().expect("name");
                p.add(NewCopy {
                    original: &template,
                    copy: super::CopyId {
                        team: &team,
                        name: &name,
                        job: i + 1,
                    },
                    paths: &paths,
                })
                .await
                .map(|_| ())
            }));
        }
        for t in tasks {
            t.await.expect("task").expect("added");
        }
        let reloaded = HostPlatform::with_copies(
            Vec::new(),
            Duration::from_secs(5),
            dir.path(),
            &dir.path().join("copies"),
        )
        .expect("reload");
        for i in 0..16u64 {
            let team = "web".parse().expect("team");
            let name = format!("copy{i}").parse().expect("name");
            assert_eq!(p.job_of(&team, &name), Some(i + 1), "copy{i} in memory");
            assert_eq!(
                reloaded.job_of(&team, &name),
                Some(i + 1),
                "copy{i} on disk"
            );
        }
    }

    /// Commands get a clean environment: nothing of the agent's own (its
    /// S3 keys, the repository password) beyond a few basics.
    #[tokio::test]
    async fn commands_do_not_inherit_the_agents_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("env");
        let text = format!(
            "controller = \"https://c:1\"\ndata_dir = \"/d\"\n[[apps]]\nname = \"a\"\nteam = \"t\"\n[[apps.components]]\nname = \"c\"\nstart = \"env > {}\"\nstop = \"true\"\n",
            out.display()
        );
        let cfg = AgentConfig::parse(&text).expect("valid");
        let p = HostPlatform::new(cfg.app_model().expect("model"), Duration::from_secs(10));
        let c = ComponentRef {
            team: "t".parse().expect("team"),
            app: "a".parse().expect("app"),
            component: "c".parse().expect("component"),
        };
        // The test runner's environment is large (CARGO_*, RUST_*): none of
        // it may reach the command.
        assert!(std::env::vars().any(|(k, _)| k.starts_with("CARGO")));
        p.start(&p.receipt(&c).await.expect("receipt"))
            .await
            .expect("start");
        let env = std::fs::read_to_string(&out).expect("env output");
        let mut keys: Vec<&str> = env
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .collect();
        keys.sort();
        for k in &keys {
            assert!(
                [
                    "PATH",
                    "HOME",
                    "LANG",
                    "LC_ALL",
                    "TZ",
                    "FERRY_TEAM",
                    "FERRY_APP",
                    "PWD",
                    "SHLVL",
                    "_"
                ]
                .contains(k),
                "{k} reached the command: {keys:?}"
            );
        }
        assert!(env.contains("FERRY_TEAM=t\n"), "{env}");
        assert!(env.contains("PATH="), "{env}");
    }

    /// The host driver makes a copy's definition: volume paths in its
    /// commands replaced, and a declared port that another app of the
    /// agent uses moved to the next free one (listed for the job).
    #[tokio::test]
    async fn copies_get_their_volumes_and_ports_of_their_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A port free on this host now, declared by the original.
        let port = std::net::TcpListener::bind(("0.0.0.0", 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let text = format!(
            "controller = \"https://c:1\"\ndata_dir = \"/d\"\n[[apps]]\nname = \"a\"\nteam = \"t\"\n[[apps.components]]\nname = \"c\"\nvolumes = [\"/srv/a\"]\nstart = \"serve --data /srv/a --port {{port:http={port}}}\"\nstop = \"true\"\n"
        );
        let cfg = AgentConfig::parse(&text).expect("valid");
        let original = cfg.app_model().expect("model").remove(0);
        let p = HostPlatform::with_copies(
            Vec::new(),
            Duration::from_secs(5),
            dir.path(),
            &dir.path().join("copies"),
        )
        .expect("driver");
        let team: TeamName = "qa".parse().expect("team");
        let mut copies = Vec::new();
        for (n, job) in [("one", 1), ("two", 2)] {
            let name: AppName = n.parse().expect("name");
            let paths = vec![dir.path().join(n)];
            copies.push(
                p.add(NewCopy {
                    original: &original,
                    copy: super::CopyId {
                        team: &team,
                        name: &name,
                        job,
                    },
                    paths: &paths,
                })
                .await
                .expect("copy"),
            );
        }
        let start = |c: &Copied| match &c.app.components[0].kind {
            ComponentKind::Host(HostComponent::Commands { start, .. }) => {
                start.as_slice().join(" ")
            }
            other => panic!("{other:?}"),
        };
        let one = dir.path().join("one").display().to_string();
        assert!(
            start(&copies[0]).contains(&format!("--data {one} --port {{port:http={port}}}")),
            "{}",
            start(&copies[0])
        );
        assert!(copies[0].remapped_ports.is_empty());
        // A job that asks again (its answer lost) is told the same ports.
        let two: AppName = "two".parse().expect("name");
        assert_eq!(p.remapped_ports_of(&team, &two), copies[1].remapped_ports);
        // The second copy's port is the first's: it moves to the next free.
        assert_eq!(copies[1].remapped_ports.len(), 1);
        let moved: u16 = copies[1].remapped_ports[0]
            .strip_prefix("http=")
            .and_then(|p| p.parse().ok())
            .expect("http=PORT");
        assert!(moved > port, "{moved}");
        assert!(
            start(&copies[1]).contains(&format!("{{port:http={moved}}}")),
            "{}",
            start(&copies[1])
        );
    }
}

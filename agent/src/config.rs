//! The agent's TOML configuration (`ferry-agent run --config FILE`).
//!
//! ```toml
//! controller = "https://ferry.example.com:7443"
//! data_dir = "/var/lib/ferry-agent"     # agent.key, agent.crt, ca.crt
//! heartbeat_secs = 10                   # optional
//! reconnect_max_ms = 30000              # optional, backoff ceiling
//!
//! [[apps]]
//! name = "billing"
//! team = "payments"
//!
//! [[apps.components]]
//! name = "db"
//! stateful = true
//! systemd = "postgresql@15-main.service"
//! volumes = ["/var/lib/postgresql/15/main"]
//!
//! [[apps.components]]
//! name = "worker"
//! start = "/usr/local/bin/worker --daemon"   # run by /bin/sh -c
//! stop = ["pkill", "-x", "worker"]          # or an argv list
//! status = "pgrep -x worker"                # optional; exit 0 = running
//! depends_on = ["db"]                       # optional; started after db
//! ```
//!
//! The node and cluster come from the agent's certificate, not from here.
//! Apps are checked by building them in the ferry-core model
//! ([`AgentConfig::app_model`]), so the agent and the controller apply the
//! same rules to names, paths and commands.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_core::{
    App, AppName, Argv, Component, ComponentKind, ComponentName, ComponentState, Hooks,
    HostComponent, HostPath, TeamName, UnitName, Volume, VolumeName,
};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read agent config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent config {} is not valid: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("agent config: {0}")]
    Invalid(String),
}

/// A command: a shell line (run with `/bin/sh -c`) or an argv list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum CommandSpec {
    Shell(String),
    Argv(Vec<String>),
}

impl CommandSpec {
    /// The argv to execute.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Self::Shell(line) => vec!["/bin/sh".into(), "-c".into(), line.clone()],
            Self::Argv(argv) => argv.clone(),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Self::Shell(line) => line.trim().is_empty(),
            Self::Argv(argv) => argv.first().is_none_or(|a| a.is_empty()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    pub name: String,
    #[serde(default)]
    pub stateful: bool,
    #[serde(default)]
    pub volumes: Vec<PathBuf>,
    #[serde(default)]
    pub systemd: Option<String>,
    #[serde(default)]
    pub start: Option<CommandSpec>,
    #[serde(default)]
    pub stop: Option<CommandSpec>,
    #[serde(default)]
    pub status: Option<CommandSpec>,
    /// Components of the same app started before this one.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Run before a `hot` backup copies the app's volumes (the component
    /// keeps running), e.g. a checkpoint or a write freeze.
    #[serde(default)]
    pub pre_backup: Option<CommandSpec>,
    /// Run after a `hot` backup's copy, whatever its outcome, if
    /// `pre_backup` ran (or there is none).
    #[serde(default)]
    pub post_backup: Option<CommandSpec>,
    /// Run just before a `cold` backup stops the component (it still
    /// runs), e.g. a checkpoint so that the stop and the delta pass are
    /// short. A failure fails the backup before anything is stopped.
    #[serde(default)]
    pub pre_stop: Option<CommandSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub name: String,
    pub team: String,
    #[serde(default)]
    pub components: Vec<ComponentConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// `https://HOST:PORT` of the controller.
    pub controller: String,
    pub data_dir: PathBuf,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
    /// Seconds a start/stop/status command may run.
    #[serde(default = "default_command_timeout")]
    pub command_timeout_secs: u64,
    /// Seconds a step retries an unreachable S3 location before it fails.
    #[serde(default = "default_storage_retry")]
    pub storage_retry_secs: u64,
    /// MiB of memory a cold backup's delta pass may copy the changed files
    /// into, so the app starts again once they are copied and they are
    /// stored while it runs (default: a quarter of the machine's memory, at
    /// most 4096).
    #[serde(default)]
    pub delta_buffer_mib: Option<u64>,
    /// Where restored copies' volumes go; default: beside the data
    /// directory, its name and `-copies` (`/var/lib/ferry-agent-copies`).
    /// Ferry makes it 0711
    /// (others may pass through, not list it), so a copy's own user (e.g.
    /// `postgres`) reaches its volume while the data directory stays 0700.
    #[serde(default)]
    pub copies_dir: Option<PathBuf>,
    /// Seconds between retries of the journal while it holds components
    /// Ferry stopped and could not start again (an engine or a unit that
    /// is away).
    #[serde(default = "default_journal_retry")]
    pub journal_retry_secs: u64,
    /// A container engine whose Compose projects and `ferry.app`-labelled
    /// containers are apps of this agent.
    #[serde(default)]
    pub containers: Option<ContainersConfig>,
    #[serde(default)]
    pub apps: Vec<AppConfig>,
}

/// `[containers]`: the engine's API socket (Docker Engine, or Podman's
/// service).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainersConfig {
    /// `unix:///var/run/docker.sock` (the default) or the socket's path.
    #[serde(default = "default_socket")]
    pub socket: String,
    /// Team of apps whose containers have no `ferry.team` label.
    #[serde(default = "default_team")]
    pub default_team: String,
    /// Seconds a container gets to stop before the engine kills it.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_secs: u64,
}

fn default_socket() -> String {
    "unix:///var/run/docker.sock".into()
}
fn default_team() -> String {
    "default".into()
}
fn default_stop_timeout() -> u64 {
    30
}

fn default_heartbeat() -> u64 {
    10
}
fn default_reconnect_min() -> u64 {
    200
}
fn default_reconnect_max() -> u64 {
    30_000
}
fn default_storage_retry() -> u64 {
    300
}
fn default_command_timeout() -> u64 {
    120
}
fn default_journal_retry() -> u64 {
    30
}

impl AgentConfig {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }

    pub fn command_timeout(&self) -> Duration {
        Duration::from_secs(self.command_timeout_secs)
    }

    pub fn journal_retry(&self) -> Duration {
        Duration::from_secs(self.journal_retry_secs.max(1))
    }

    /// Where restored copies' volumes go: `copies_dir`, or beside the data
    /// directory with `-copies` appended to its name
    /// (`/var/lib/ferry-agent-copies`), so agents never share one.
    pub fn copies_dir(&self) -> PathBuf {
        self.copies_dir.clone().unwrap_or_else(|| {
            let mut name = self
                .data_dir
                .file_name()
                .map(std::ffi::OsStr::to_os_string)
                .unwrap_or_else(|| "ferry-agent".into());
            name.push("-copies");
            self.data_dir.with_file_name(name)
        })
    }

    /// The container engine's settings, if `[containers]` is there.
    pub fn engine_settings(
        &self,
    ) -> Result<Option<crate::platform::containers::EngineSettings>, ConfigError> {
        let Some(c) = &self.containers else {
            return Ok(None);
        };
        let default_team = c.default_team.parse().map_err(|e: ferry_core::NameError| {
            ConfigError::Invalid(format!("containers.default_team: {e}"))
        })?;
        Ok(Some(crate::platform::containers::EngineSettings {
            socket: c.socket.clone(),
            default_team,
            stop_timeout: Duration::from_secs(c.stop_timeout_secs),
            start_timeout: self.command_timeout(),
            state_dir: crate::platform::containers::state_dir(&self.data_dir),
            copies_root: crate::platform::CopiesRoot::new(self.copies_dir()),
        }))
    }

    /// Bytes a delta pass may copy: `delta_buffer_mib`, or a quarter
    /// of the memory (`/proc/meminfo`), between 64 MiB and 4 GiB.
    pub fn delta_buffer(&self) -> usize {
        const MIB: u64 = 1 << 20;
        let mib = self.delta_buffer_mib.unwrap_or_else(|| {
            let total_kib = std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| {
                    m.lines()
                        .find_map(|l| l.strip_prefix("MemTotal:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                })
                .unwrap_or(1 << 20);
            (total_kib / 1024 / 4).clamp(64, 4096)
        });
        usize::try_from(mib.max(1).saturating_mul(MIB)).unwrap_or(usize::MAX)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Invalid(reason) => ConfigError::Parse {
                path: path.to_owned(),
                reason,
            },
            other => other,
        })
    }

    /// Parses and validates a configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self =
            toml::from_str(text).map_err(|e| ConfigError::Invalid(e.message().to_owned()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if let Some(c) = &self.copies_dir {
            if !c.is_absolute() {
                return bad(format!(
                    "copies_dir {} is not an absolute path",
                    c.display()
                ));
            }
            if c.starts_with(&self.data_dir) {
                return bad(format!(
                    "copies_dir {} is inside data_dir {}, which only the agent may enter: a copy's own user could not reach its volumes",
                    c.display(),
                    self.data_dir.display()
                ));
            }
        }
        if !self.controller.starts_with("https://") {
            return bad(format!(
                "controller {:?} must be an https:// url",
                self.controller
            ));
        }
        if self.heartbeat_secs == 0 {
            return bad("heartbeat_secs must be at least 1".into());
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            return bad("reconnect_min_ms must be positive and at most reconnect_max_ms".into());
        }
        self.app_model()?;
        Ok(())
    }

    /// The declared apps in the ferry-core model, checked: names, paths and
    /// commands by their types, the rest by [`App::validate`]. A volume
    /// directory is named by its path and listed once per app.
    pub fn app_model(&self) -> Result<Vec<App>, ConfigError> {
        let mut seen = BTreeSet::new();
        let mut apps = Vec::with_capacity(self.apps.len());
        for app in &self.apps {
            let bad = |m: String| ConfigError::Invalid(m);
            let name: AppName = app.name.parse().map_err(|e| bad(format!("{e}")))?;
            let team: TeamName = app
                .team
                .parse()
                .map_err(|e| bad(format!("app {name}: {e}")))?;
            if !seen.insert((team.clone(), name.clone())) {
                return Err(bad(format!("app {name} of team {team} is declared twice")));
            }
            let mut volumes: Vec<Volume> = Vec::new();
            let mut components = Vec::with_capacity(app.components.len());
            for c in &app.components {
                let what = format!("component {:?} of app {name}", c.name);
                let component: ComponentName =
                    c.name.parse().map_err(|e| bad(format!("{what}: {e}")))?;
                let host = match (&c.systemd, &c.start, &c.stop) {
                    (Some(unit), None, None) if !unit.trim().is_empty() => {
                        if c.status.is_some() {
                            return Err(bad(format!(
                                "{what}: status is only for start/stop commands (systemd answers it)"
                            )));
                        }
                        HostComponent::Systemd {
                            unit: UnitName::new(unit.clone())
                                .map_err(|e| bad(format!("{what}: {e}")))?,
                        }
                    }
                    (None, Some(start), Some(stop)) => {
                        if start.is_empty()
                            || stop.is_empty()
                            || c.status.as_ref().is_some_and(CommandSpec::is_empty)
                        {
                            return Err(bad(format!("{what}: commands must not be empty")));
                        }
                        let argv = |spec: &CommandSpec| {
                            Argv::new(spec.argv()).map_err(|e| bad(format!("{what}: {e}")))
                        };
                        HostComponent::Commands {
                            start: argv(start)?,
                            stop: argv(stop)?,
                            status: c.status.as_ref().map(argv).transpose()?,
                        }
                    }
                    _ => {
                        return Err(bad(format!(
                            "{what} needs either systemd = \"UNIT\" or both start and stop commands"
                        )));
                    }
                };
                let mut uses = Vec::with_capacity(c.volumes.len());
                for v in &c.volumes {
                    let text = v.to_string_lossy().into_owned();
                    let path = HostPath::new(text.clone())
                        .map_err(|e| bad(format!("{what}: volume {e}")))?;
                    let volume = VolumeName::new(text).map_err(|e| bad(format!("{what}: {e}")))?;
                    if !volumes.iter().any(|known| known.name == volume) {
                        volumes.push(Volume {
                            name: volume.clone(),
                            path,
                        });
                    }
                    if !uses.contains(&volume) {
                        uses.push(volume);
                    }
                }
                let depends_on = c
                    .depends_on
                    .iter()
                    .map(|d| {
                        d.parse()
                            .map_err(|e| bad(format!("{what}: depends_on: {e}")))
                    })
                    .collect::<Result<_, _>>()?;
                let hook = |spec: &Option<CommandSpec>, which: &str| {
                    spec.as_ref()
                        .map(|s| {
                            if s.is_empty() {
                                return Err(bad(format!("{what}: {which} must not be empty")));
                            }
                            Argv::new(s.argv()).map_err(|e| bad(format!("{what}: {which}: {e}")))
                        })
                        .transpose()
                };
                let hooks = Hooks {
                    pre_backup: hook(&c.pre_backup, "pre_backup")?,
                    post_backup: hook(&c.post_backup, "post_backup")?,
                    pre_stop: hook(&c.pre_stop, "pre_stop")?,
                };
                components.push(Component {
                    name: component,
                    kind: ComponentKind::Host(host),
                    stateful: c.stateful,
                    volumes: uses,
                    depends_on,
                    state: ComponentState::Unknown,
                    hooks,
                });
            }
            let model = App {
                name,
                team,
                components,
                volumes,
            };
            model.validate().map_err(|e| bad(e.to_string()))?;
            apps.push(model);
        }
        Ok(apps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
controller = "https://127.0.0.1:7443"
data_dir = "/var/lib/ferry-agent"
heartbeat_secs = 2

[[apps]]
name = "billing"
team = "payments"

[[apps.components]]
name = "postgresql@15-main.service"
stateful = true
systemd = "postgresql@15-main.service"
volumes = ["/var/lib/postgresql/15/main"]

[[apps.components]]
name = "worker"
start = "exec /usr/bin/worker"
stop = ["pkill", "-x", "worker"]
status = "pgrep -x worker"
"#;

    #[test]
    fn full_config_parses_with_defaults() {
        let c = AgentConfig::parse(FULL).expect("valid");
        assert_eq!(c.heartbeat(), Duration::from_secs(2));
        assert_eq!(c.reconnect_max_ms, 30_000);
        assert_eq!(c.apps.len(), 1);
        let comps = &c.apps[0].components;
        assert_eq!(
            comps[0].systemd.as_deref(),
            Some("postgresql@15-main.service")
        );
        assert!(comps[0].stateful);
        assert!(!comps[1].stateful);
        assert_eq!(
            comps[1].start.as_ref().map(CommandSpec::argv),
            Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "exec /usr/bin/worker".into()
            ])
        );
        assert_eq!(
            comps[1].stop.as_ref().map(CommandSpec::argv),
            Some(vec!["pkill".into(), "-x".into(), "worker".into()])
        );
    }

    fn expect_invalid(text: &str, needle: &str) {
        let err = AgentConfig::parse(text).expect_err(needle).to_string();
        assert!(err.contains(needle), "{needle:?} not in {err:?}");
    }

    #[test]
    fn bad_configs_are_refused_with_the_object_named() {
        let head = "controller = \"https://c:1\"\ndata_dir = \"/d\"\n";
        expect_invalid(
            "controller = \"http://c:1\"\ndata_dir = \"/d\"\n",
            "https://",
        );
        expect_invalid("data_dir = \"/d\"\n", "controller");
        expect_invalid(&format!("{head}surprise = 1\n"), "surprise");
        expect_invalid(
            &format!("{head}[[apps]]\nname = \"Bad\"\nteam = \"t\"\n"),
            "\"Bad\"",
        );
        expect_invalid(
            &format!(
                "{head}[[apps]]\nname = \"a\"\nteam = \"t\"\n[[apps]]\nname = \"a\"\nteam = \"t\"\n"
            ),
            "declared twice",
        );
        let app = format!("{head}[[apps]]\nname = \"a\"\nteam = \"t\"\n[[apps.components]]\n");
        expect_invalid(&format!("{app}name = \"c\"\n"), "needs either systemd");
        expect_invalid(
            &format!("{app}name = \"c\"\nstart = \"x\"\n"),
            "needs either systemd",
        );
        expect_invalid(
            &format!("{app}name = \"c\"\nsystemd = \"u\"\nstart = \"x\"\nstop = \"y\"\n"),
            "needs either systemd",
        );
        expect_invalid(
            &format!("{app}name = \"c\"\nstart = \"\"\nstop = \"y\"\n"),
            "must not be empty",
        );
        expect_invalid(
            &format!("{app}name = \"c\"\nsystemd = \"u\"\nvolumes = [\"/a/../etc\"]\n"),
            "absolute path",
        );
        expect_invalid(
            &format!("{app}name = \"c\"\nsystemd = \"u\"\nvolumes = [\"rel\"]\n"),
            "absolute path",
        );
        expect_invalid(
            &format!("{app}name = \"a/b\"\nsystemd = \"u\"\n"),
            "component \"a/b\"",
        );
        expect_invalid(
            &format!("{app}name = \"c\"\nsystemd = \"u\"\ndepends_on = [\"nope\"]\n"),
            "component c depends on nope, which the app does not have",
        );
        expect_invalid(
            &format!(
                "{app}name = \"c\"\nsystemd = \"u\"\n[[apps.components]]\nname = \"c\"\nsystemd = \"v\"\n"
            ),
            "component c is listed twice",
        );
    }

    #[test]
    fn the_documented_example_config_is_valid() {
        let c = AgentConfig::parse(include_str!("../../deploy/agent.toml")).expect("valid");
        let apps = c.app_model().expect("model");
        assert_eq!(apps[0].components.len(), 2);
        assert_eq!(apps[0].components[1].depends_on[0].as_str(), "db");
        let pre_stop = apps[0].components[0]
            .hooks
            .pre_stop
            .as_ref()
            .expect("pre_stop");
        assert_eq!(
            pre_stop.as_slice().last().map(String::as_str),
            Some("CHECKPOINT")
        );
        // Unset: a quarter of the memory, between 64 MiB and 4 GiB.
        let b = c.delta_buffer();
        assert!((64 << 20..=4 << 30).contains(&b), "{b}");
        let set = AgentConfig {
            delta_buffer_mib: Some(100),
            ..c
        };
        assert_eq!(set.delta_buffer(), 100 << 20);
    }

    #[test]
    fn apps_build_the_core_model() {
        let text = format!(
            "{FULL}depends_on = [\"postgresql@15-main.service\"]\nvolumes = [\"/var/lib/postgresql/15/main\", \"/srv/spool\"]\n"
        );
        let apps = AgentConfig::parse(&text)
            .expect("valid")
            .app_model()
            .expect("model");
        assert_eq!(apps.len(), 1);
        let app = &apps[0];
        assert_eq!(
            (app.name.as_str(), app.team.as_str()),
            ("billing", "payments")
        );
        // Both components use the database directory: listed once.
        let names: Vec<&str> = app.volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["/var/lib/postgresql/15/main", "/srv/spool"]);
        assert_eq!(app.volumes[1].path.as_str(), "/srv/spool");
        let db = &app.components[0];
        assert!(matches!(
            &db.kind,
            ComponentKind::Host(HostComponent::Systemd { unit }) if unit.as_str() == "postgresql@15-main.service"
        ));
        let worker = &app.components[1];
        assert_eq!(worker.depends_on[0].as_str(), "postgresql@15-main.service");
        assert_eq!(worker.volumes.len(), 2);
        match &worker.kind {
            ComponentKind::Host(HostComponent::Commands { status, stop, .. }) => {
                assert_eq!(stop.as_slice(), ["pkill", "-x", "worker"]);
                assert!(status.is_some());
            }
            other => panic!("worker is {other:?}"),
        }
    }
}

//! Where ferryctl finds the controller and its identity: flags, then
//! `FERRY_*` environment variables (both handled by clap), then a config
//! file. `ferryctl config` shows what is in effect and where each value
//! came from.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The config file, TOML. Relative paths are relative to the file.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub controller: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "no {what} configured: pass --{flag}, set {env}, or put `{flag} = …` in the config file ({path})"
    )]
    Missing {
        what: &'static str,
        flag: &'static str,
        env: &'static str,
        path: String,
    },
}

/// Where a value came from, for `ferryctl config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Flag,
    File,
}

#[derive(Debug, Clone, Serialize)]
pub struct Setting<T> {
    pub value: T,
    pub source: Source,
}

/// The settings in effect after merging flags/env with the config file.
#[derive(Debug, Clone, Serialize)]
pub struct Effective {
    pub config_file: Option<PathBuf>,
    pub controller: Option<Setting<String>>,
    pub ca: Option<Setting<PathBuf>>,
    pub cert: Option<Setting<PathBuf>>,
    pub key: Option<Setting<PathBuf>>,
}

/// Values given on the command line or through the environment.
#[derive(Debug, Default, Clone)]
pub struct Given {
    pub config: Option<PathBuf>,
    pub controller: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The default config file: `$XDG_CONFIG_HOME/ferry/ferryctl.toml` or
/// `~/.config/ferry/ferryctl.toml`.
pub fn default_config_path() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("ferry/ferryctl.toml"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/ferry/ferryctl.toml"))
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut cfg: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.message().to_owned(),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [&mut cfg.ca, &mut cfg.cert, &mut cfg.key]
        .into_iter()
        .flatten()
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok(cfg)
}

/// Merges what was given with the config file. An explicitly named config
/// file must exist; the default one is optional.
pub fn resolve(given: &Given) -> Result<Effective, ConfigError> {
    let (path, file) = match &given.config {
        Some(p) => (Some(p.clone()), load_file(p)?),
        None => match default_config_path() {
            Some(p) if p.exists() => (Some(p.clone()), load_file(&p)?),
            _ => (None, FileConfig::default()),
        },
    };
    fn pick<T: Clone>(flag: &Option<T>, file: &Option<T>) -> Option<Setting<T>> {
        match (flag, file) {
            (Some(v), _) => Some(Setting {
                value: v.clone(),
                source: Source::Flag,
            }),
            (None, Some(v)) => Some(Setting {
                value: v.clone(),
                source: Source::File,
            }),
            (None, None) => None,
        }
    }
    Ok(Effective {
        controller: pick(&given.controller, &file.controller),
        ca: pick(&given.ca, &file.ca),
        cert: pick(&given.cert, &file.cert),
        key: pick(&given.key, &file.key),
        config_file: path,
    })
}

/// What a connection needs; every field required.
#[derive(Debug, Clone)]
pub struct Connection {
    pub controller: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Effective {
    pub fn connection(&self) -> Result<Connection, ConfigError> {
        let path = self
            .config_file
            .as_ref()
            .map(|p| p.display().to_string())
            .or_else(|| default_config_path().map(|p| p.display().to_string()))
            .unwrap_or_else(|| "none".into());
        let missing = |what, flag, env| ConfigError::Missing {
            what,
            flag,
            env,
            path: path.clone(),
        };
        Ok(Connection {
            controller: self
                .controller
                .as_ref()
                .map(|s| s.value.clone())
                .ok_or_else(|| missing("controller address", "controller", "FERRY_CONTROLLER"))?,
            ca: self
                .ca
                .as_ref()
                .map(|s| s.value.clone())
                .ok_or_else(|| missing("CA certificate", "ca", "FERRY_CA"))?,
            cert: self
                .cert
                .as_ref()
                .map(|s| s.value.clone())
                .ok_or_else(|| missing("client certificate", "cert", "FERRY_CERT"))?,
            key: self
                .key
                .as_ref()
                .map(|s| s.value.clone())
                .ok_or_else(|| missing("client key", "key", "FERRY_KEY"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_relative_paths_follow_the_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("ferryctl.toml");
        std::fs::write(
            &file,
            "controller = \"https://file:1\"\nca = \"ca.crt\"\ncert = \"/abs/op.crt\"\nkey = \"op.key\"\n",
        )?;
        let given = Given {
            config: Some(file.clone()),
            controller: Some("https://flag:2".into()),
            ..Given::default()
        };
        let eff = resolve(&given)?;
        let conn = eff.connection()?;
        assert_eq!(conn.controller, "https://flag:2");
        assert_eq!(
            eff.controller.as_ref().map(|s| s.source),
            Some(Source::Flag)
        );
        assert_eq!(conn.ca, dir.path().join("ca.crt"));
        assert_eq!(conn.cert, PathBuf::from("/abs/op.crt"));
        assert_eq!(eff.key.as_ref().map(|s| s.source), Some(Source::File));
        Ok(())
    }

    #[test]
    fn missing_settings_and_bad_files_say_what_to_do() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "controler = \"typo\"\n")?;
        let err = resolve(&Given {
            config: Some(file),
            ..Given::default()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains("not valid") && err.contains("controler"),
            "{err}"
        );

        let eff = resolve(&Given {
            config: Some(dir.path().join("absent.toml")),
            ..Given::default()
        });
        assert!(matches!(eff, Err(ConfigError::Read { .. })));

        let file = dir.path().join("empty.toml");
        std::fs::write(&file, "")?;
        let eff = resolve(&Given {
            config: Some(file),
            ..Given::default()
        })?;
        let err = eff
            .connection()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("--controller") && err.contains("FERRY_CONTROLLER"),
            "{err}"
        );
        Ok(())
    }
}

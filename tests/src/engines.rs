//! Real container engines for the tests: a `dockerd` or a Podman API
//! service per test, each with its own root under a short temporary
//! directory (unix socket paths must stay under 108 bytes), no network for
//! containers (`--network none`), and images built from local files (no
//! registry is reachable). The `docker` command line talks to either one
//! through `DOCKER_HOST`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The base image every test container runs: busybox, imported from a tar.
pub const BASE_IMAGE: &str = "ferry-test/base:1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Docker,
    Podman,
}

pub struct Engine {
    pub kind: Kind,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Engine {
    /// Starts an engine and waits until it answers (at most 60 s).
    pub fn start(kind: Kind) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("fe").tempdir_in("/tmp")?;
        let mut engine = Self {
            kind,
            dir,
            child: None,
        };
        engine.resume()?;
        Ok(engine)
    }

    /// Starts the engine's daemon again on the same root (after
    /// [`Engine::halt`]) and waits until it answers (at most 60 s).
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let kind = self.kind;
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("engine.log"))?;
        let mut cmd = match kind {
            Kind::Docker => {
                let mut c = Command::new("dockerd");
                c.arg("--data-root")
                    .arg(d.join("data"))
                    .arg("--exec-root")
                    .arg(d.join("exec"))
                    .arg("--pidfile")
                    .arg(d.join("pid"))
                    .arg("-H")
                    .arg(format!("unix://{}", d.join("api.sock").display()))
                    .args(["--bridge=none", "--iptables=false", "--ip6tables=false"]);
                c
            }
            Kind::Podman => {
                std::fs::write(
                    d.join("containers.conf"),
                    "[containers]\ndefault_ulimits = []\n[engine]\nruntime = \"runc\"\n",
                )?;
                let mut c = Command::new("podman");
                c.env("CONTAINERS_CONF", d.join("containers.conf"))
                    .arg("--root")
                    .arg(d.join("root"))
                    .arg("--runroot")
                    .arg(d.join("run"))
                    .args(["system", "service", "--time=0"])
                    .arg(format!("unix://{}", d.join("api.sock").display()));
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {kind:?} (is it installed?)"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.socket().exists() && self.docker(&["version"]).is_ok_and(|(ok, ..)| ok) {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!("{kind:?} exited with {status}: {}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!("{kind:?} did not answer within 60 s: {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the engine's daemon as its service manager would (SIGTERM,
    /// then SIGKILL after 30 s), keeping its containers, volumes and
    /// images for [`Engine::resume`].
    pub fn halt(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("engine.log")).unwrap_or_default();
        log.lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs the `docker` command line against this engine: (success,
    /// stdout, stderr).
    pub fn docker(&self, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        let out = Command::new("docker")
            .env("DOCKER_HOST", format!("unix://{}", self.socket().display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running docker (the docker.io package)")?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }

    /// `docker …`, failing unless it succeeds; its stdout.
    pub fn docker_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let (ok, out, err) = self.docker(args)?;
        anyhow::ensure!(ok, "docker {}: {err}", args.join(" "));
        Ok(out)
    }

    /// Imports [`BASE_IMAGE`]: busybox and its applets, `/tmp`, `/data`.
    pub fn import_base_image(&self) -> anyhow::Result<()> {
        let root = self.dir.path().join("image");
        for d in ["bin", "tmp", "data"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("busybox (the busybox-static package)")?;
        std::fs::copy(busybox, root.join("bin/busybox"))?;
        for applet in [
            "sh", "ls", "cat", "echo", "sleep", "date", "dd", "head", "true", "test", "[",
        ] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
        }
        let tar = self.dir.path().join("image.tar");
        let ok = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()?
            .success();
        anyhow::ensure!(ok, "tar of the base image");
        self.docker_ok(&["import", &tar.display().to_string(), BASE_IMAGE])?;
        Ok(())
    }

    /// `docker inspect -f FORMAT NAME`.
    pub fn inspect(&self, name: &str, format: &str) -> anyhow::Result<String> {
        self.docker_ok(&["inspect", "-f", format, name])
    }

    /// Stops the engine (as [`Engine::halt`]); its containers
    /// are removed first, a few rounds (Podman refuses to remove a
    /// container another one shares a namespace with, until that one is
    /// gone).
    pub fn stop(&mut self) {
        for _ in 0..4 {
            let Ok((true, ids, _)) = self.docker(&["ps", "-aq"]) else {
                break;
            };
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if ids.is_empty() {
                break;
            }
            for id in ids {
                let _ = self.docker(&["rm", "-f", id]);
            }
        }
        self.halt();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

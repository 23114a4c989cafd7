//! Harness for Ferry's end-to-end tests: runs the real binaries
//! (`ferry-controller`, `ferry-agent`) on ports the OS chooses, and talks to
//! them over real mTLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry_proto::tls;
use ferry_proto::v1::operator_client::OperatorClient;
use tonic::transport::Channel;

pub mod engines;
pub mod lab;

/// Default deadline for conditions the tests wait on.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The directory holding `ferry-controller` and `ferry-agent`:
/// `$FERRY_BIN_DIR` when set (the caller built them, e.g. `scripts/test`),
/// otherwise this harness builds them once per run into `target/<profile>`.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("FERRY_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let status = Command::new(cargo)
            .args([
                "build",
                "-p",
                "ferry-controller",
                "-p",
                "ferry-agent",
                "--bins",
                "--manifest-path",
            ])
            .arg(&manifest)
            .status()
            .expect("cargo build of the daemons runs");
        assert!(
            status.success(),
            "building ferry-controller and ferry-agent failed"
        );
        // The test executable lives in target/<profile>/deps/.
        let exe = std::env::current_exe().expect("test executable path");
        exe.parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf()
    })
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Polls `cond` until it returns `Some`, failing after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut cond: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = cond().await {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a command to completion, returning (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> anyhow::Result<(bool, String, String)> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A command for one of the binaries, run under `umask` when given (through
/// `sh -c 'umask …; exec …'`).
pub fn command(name: &str, umask: Option<&str>) -> Command {
    match umask {
        None => Command::new(bin(name)),
        Some(mask) => {
            let mut cmd = Command::new("sh");
            cmd.arg("-c")
                .arg(format!("umask {mask} && exec \"$0\" \"$@\""))
                .arg(bin(name));
            cmd
        }
    }
}

/// A controller data directory and, while running, its process.
pub struct Controller {
    /// Holds the data directory (`data/`, created by `init`), the address
    /// file and the logs.
    pub dir: tempfile::TempDir,
    pub addr: Option<SocketAddr>,
    umask: Option<String>,
    serve_args: Vec<String>,
    child: Option<Child>,
    starts: u32,
}

impl Controller {
    /// `ferry-controller init` into a fresh directory.
    pub fn init() -> anyhow::Result<Self> {
        Self::init_with_umask(None)
    }

    /// `init` and every later `serve` run under `umask`.
    pub fn init_with_umask(umask: Option<&str>) -> anyhow::Result<Self> {
        Self::init_with(umask, &[])
    }

    /// `init` with extra server certificate names (besides 127.0.0.1 and
    /// localhost), e.g. the address agents in a namespace dial.
    pub fn init_with(umask: Option<&str>, sans: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (ok, out, err) = run(command("ferry-controller", umask)
            .arg("init")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--san", "127.0.0.1", "--san", "localhost"])
            .args(sans.iter().flat_map(|s| ["--san", s])))?;
        if !ok {
            bail!("ferry-controller init failed: {err}");
        }
        if !out.contains("ca fingerprint: sha256:") {
            bail!("init did not print the ca fingerprint: {out}");
        }
        Ok(Self {
            dir,
            addr: None,
            umask: umask.map(str::to_owned),
            serve_args: Vec::new(),
            child: None,
            starts: 0,
        })
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A path inside the data directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.data_dir().join(rel)
    }

    /// Extra arguments for every later `serve`.
    pub fn serve_args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.serve_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Starts `serve` on an OS-chosen port (the same port again on a
    /// restart) and waits for the address file.
    pub async fn start(&mut self) -> anyhow::Result<SocketAddr> {
        let listen = self
            .addr
            .map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        let addr_file = self.dir.path().join("addr");
        let _ = std::fs::remove_file(&addr_file);
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts))?;
        let child = command("ferry-controller", self.umask.as_deref())
            .arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen", &listen])
            .args(
                [("--heartbeat-secs", "1"), ("--last-seen-flush-secs", "1")]
                    .into_iter()
                    // Tests' own settings win over these defaults.
                    .filter(|(flag, _)| !self.serve_args.iter().any(|a| a == flag))
                    .flat_map(|(flag, value)| [flag, value]),
            )
            .args(&self.serve_args)
            .arg("--addr-file")
            .arg(&addr_file)
            .env("FERRY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let addr = wait_for("the controller's address file", DEADLINE, || {
            let f = addr_file.clone();
            async move {
                std::fs::read_to_string(&f)
                    .ok()
                    .and_then(|s| s.trim().parse::<SocketAddr>().ok())
            }
        })
        .await?;
        self.addr = Some(addr);
        Ok(addr)
    }

    fn log_path(&self, start: u32) -> PathBuf {
        self.dir.path().join(format!("controller-{start}.log"))
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr.expect("controller started"))
    }

    /// The running `serve` process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().to_string();
            run(Command::new("kill").args(["-TERM", &pid]))?;
            let status = wait_for("the controller to exit", DEADLINE, || {
                let s = c.try_wait().ok().flatten();
                async move { s }
            })
            .await?;
            if !status.success() {
                bail!("controller exited with {status}");
            }
        }
        Ok(())
    }

    pub fn read(&self, rel: &str) -> anyhow::Result<String> {
        std::fs::read_to_string(self.path(rel)).with_context(|| format!("reading {rel}"))
    }

    /// Everything the controller logged, across restarts.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .filter_map(|i| std::fs::read_to_string(self.log_path(i)).ok())
            .collect()
    }

    /// An operator client with the certificate `init` wrote.
    pub async fn operator(&self) -> anyhow::Result<OperatorClient<Channel>> {
        let ch = tls::channel(
            &self.url(),
            &self.read("operator/ca.crt")?,
            &self.read("operator/operator.crt")?,
            &self.read("operator/operator.key")?,
        )
        .await?;
        Ok(OperatorClient::new(ch))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `ferry-agent run`.
pub struct AgentProcess {
    child: Child,
    pub log: PathBuf,
}

impl AgentProcess {
    pub fn spawn(config: &Path, log: PathBuf) -> anyhow::Result<Self> {
        Self::spawn_in(None, config, log)
    }

    /// `ferry-agent run` inside network namespace `netns` (`ip netns
    /// exec` replaces itself with the agent, so the pid is the agent's).
    pub fn spawn_in(netns: Option<&str>, config: &Path, log: PathBuf) -> anyhow::Result<Self> {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("ferry-agent"));
                c
            }
            None => Command::new(bin("ferry-agent")),
        };
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("FERRY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(Self { child, log })
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, no goodbye (a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as systemd stops it; [`AgentProcess::stop`] waits for the
    /// exit too.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        run(Command::new("kill").args(["-TERM", &pid]))?;
        Ok(())
    }

    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.terminate()?;
        let child = &mut self.child;
        wait_for("the agent to exit", DEADLINE, || {
            let s = child.try_wait().ok().flatten();
            async move { s }
        })
        .await?;
        Ok(())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The two ends of an agent session opened by hand.
pub type RawSession = (
    tokio::sync::mpsc::Sender<ferry_proto::v1::AgentMessage>,
    tonic::Streaming<ferry_proto::v1::ControllerMessage>,
);

/// Opens an agent session with the given identity (PEM), says hello as
/// `node` of `cluster`, and waits for the controller's welcome.
pub async fn open_agent_session(
    url: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    cluster: &str,
    node: &str,
) -> anyhow::Result<RawSession> {
    use ferry_proto::v1 as pb;
    let channel = tls::channel(url, ca_pem, cert_pem, key_pem).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            cluster: cluster.to_owned(),
            node: node.to_owned(),
            version: "raw".into(),
            platform: "host".into(),
            restores: Vec::new(),
        })),
    })
    .await?;
    let mut inbound = pb::agent_sessions_client::AgentSessionsClient::new(channel)
        .open_session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    match inbound.message().await?.and_then(|m| m.kind) {
        Some(pb::controller_message::Kind::Welcome(_)) => Ok((tx, inbound)),
        other => bail!("expected a welcome, got {other:?}"),
    }
}

/// Installs ring as the process's rustls provider (idempotent).
pub fn setup() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

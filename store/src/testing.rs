//! A real SeaweedFS S3 server for the agent's tests.
//!
//! [`seaweed`] starts one `weed mini` per test binary, on ports the OS
//! chooses, and hands out fresh buckets so tests stay apart:
//!
//! ```ignore
//! let weed = crate::testing::seaweed().await;
//! let store = weed.store("my-test").await; // new bucket, prefix "my-test"
//! ```
//!
//! The `weed` binary comes from `FERRY_WEED` or the location
//! `scripts/install-seaweedfs` installs to; without it the tests fail and
//! say how to install it. The server runs under a small shell watchdog that
//! stops it (SIGTERM, SIGKILL after a grace) and removes its data as soon as
//! the test process closes the watchdog's stdin, which happens even when the
//! test process dies.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::OnceCell;

use super::ObjectStore;
use super::location::S3Config;
use super::s3::S3Store;

pub const ACCESS_KEY: &str = "ferrytest";
pub const SECRET_KEY: &str = "ferrytest-secret-key";

/// How long the server may take to answer its first signed request.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running SeaweedFS.
pub struct SeaweedFs {
    endpoint: String,
    dir: PathBuf,
    watchdog: Mutex<Option<Child>>,
    buckets: AtomicU64,
}

static SHARED: OnceCell<SeaweedFs> = OnceCell::const_new();

/// The SeaweedFS shared by every test of this binary, started on first use.
pub async fn seaweed() -> &'static SeaweedFs {
    SHARED.get_or_init(SeaweedFs::start).await
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct ports that were free a moment ago (held together while
/// choosing so they differ).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

fn weed_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FERRY_WEED") {
        return path.into();
    }
    let cache = std::env::var_os("FERRY_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ferry")))
        .unwrap_or_else(|| PathBuf::from("/nonexistent"));
    cache.join("seaweedfs/bin/weed")
}

/// Stops the server when stdin closes, then removes its directory.
const WATCHDOG: &str = r#"
weed=$1; dir=$2; shift 2
GOMEMLIMIT=256MiB "$weed" "$@" >"$dir/weed.log" 2>&1 </dev/null &
pid=$!
cat >/dev/null
kill -TERM "$pid" 2>/dev/null
i=0
while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 150 ]; do sleep 0.2; i=$((i+1)); done
kill -KILL "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
rm -rf "$dir"
"#;

impl SeaweedFs {
    /// Starts a server and waits until a signed request succeeds.
    pub async fn start() -> Self {
        let weed = weed_binary();
        assert!(
            weed.is_file(),
            "SeaweedFS not found at {}: run scripts/install-seaweedfs (or set FERRY_WEED to the weed binary)",
            weed.display()
        );
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("ferry-weed-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(dir.join("data")).expect("create the seaweedfs directory");
        let identities = serde_json::json!({"identities": [{
            "name": "ferry-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]});
        std::fs::File::create(dir.join("s3.json"))
            .and_then(|mut f| f.write_all(identities.to_string().as_bytes()))
            .expect("write s3.json");

        let ports = free_ports(10);
        let port_flags = [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
            "admin.port",
            "admin.port.grpc",
        ];
        let s3_port = ports[6];
        let d = dir.display();
        let mut args: Vec<String> = vec![
            "mini".into(),
            format!("-dir={d}/data"),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-s3.config={d}/s3.json"),
            "-s3.allowDeleteBucketNotEmpty=false".into(),
            "-s3.autoCreateBucket=false".into(),
            "-webdav=false".into(),
            "-admin.ui=false".into(),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            "-master.telemetry=false".into(),
            format!("-filer.localSocket={d}/filer.sock"),
            format!("-s3.localSocket={d}/s3.sock"),
        ];
        args.extend(
            port_flags
                .iter()
                .zip(&ports)
                .map(|(flag, port)| format!("-{flag}={port}")),
        );
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("ferry-weed-watchdog")
            .arg(&weed)
            .arg(&dir)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the seaweedfs watchdog shell");

        let server = Self {
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            dir,
            watchdog: Mutex::new(Some(watchdog)),
            buckets: AtomicU64::new(0),
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        let mut config = self.config("ferry-ready", "");
        config.tuning.attempt_timeout = Duration::from_secs(5);
        let probe = S3Store::new(&config).await.expect("probe store");
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            match probe.create_bucket().await {
                Ok(()) => return,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    panic!(
                        "seaweedfs at {} was not ready within {READY_TIMEOUT:?}: {e}\n{}",
                        self.endpoint,
                        self.log_tail()
                    )
                }
                Err(_) => {}
            }
            if let Some(status) = self.exited() {
                panic!(
                    "seaweedfs watchdog exited ({status}) before the server was ready\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn exited(&self) -> Option<std::process::ExitStatus> {
        let mut guard = self.watchdog.lock().ok()?;
        guard.as_mut()?.try_wait().ok().flatten()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("weed.log")).unwrap_or_default();
        let lines: Vec<_> = log.lines().rev().take(30).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A config for `bucket` with `prefix` and the server's credentials.
    pub fn config(&self, bucket: &str, prefix: &str) -> S3Config {
        let mut config =
            S3Config::new(&self.endpoint, bucket).with_credentials(ACCESS_KEY, SECRET_KEY);
        config.prefix = prefix.to_owned();
        config
    }

    /// Creates a bucket no other test uses and returns its name.
    pub async fn new_bucket(&self) -> String {
        let n = self.buckets.fetch_add(1, Ordering::Relaxed);
        let bucket = format!("t{}-{n}", std::process::id());
        S3Store::new(&self.config(&bucket, ""))
            .await
            .expect("store for bucket creation")
            .create_bucket()
            .await
            .unwrap_or_else(|e| panic!("create bucket {bucket}: {e}"));
        bucket
    }

    /// A store on a fresh bucket, below `prefix` (may be empty).
    pub async fn store(&self, prefix: &str) -> Arc<dyn ObjectStore> {
        let bucket = self.new_bucket().await;
        Arc::new(
            S3Store::new(&self.config(&bucket, prefix))
                .await
                .expect("s3 store"),
        )
    }
}

impl Drop for SeaweedFs {
    /// Closes the watchdog's stdin, which stops the server, and waits for
    /// the watchdog (bounded by its own grace period).
    fn drop(&mut self) {
        let Ok(mut guard) = self.watchdog.lock() else {
            return;
        };
        if let Some(mut child) = guard.take() {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::ObjectKey;

    #[tokio::test]
    async fn a_second_server_runs_beside_the_shared_one_and_stops_on_drop() {
        let shared = seaweed().await;
        let own = SeaweedFs::start().await;
        assert_ne!(own.endpoint(), shared.endpoint());
        let store = own.store("p").await;
        let key = ObjectKey::new("k").expect("key");
        store
            .put(&key, Bytes::from_static(b"v"))
            .await
            .expect("put");
        assert_eq!(store.get(&key).await.expect("get"), &b"v"[..]);
        let dir = own.dir.clone();
        drop(own);
        // The watchdog has exited: the server is stopped and its data gone.
        assert!(!dir.exists(), "{} still exists", dir.display());
    }
}

//! Separate hosts on one machine: each "cluster" gets its own network
//! namespace, joined to the test's host namespace by a bridge. Processes
//! started in a namespace have their own loopback and ports (two
//! PostgreSQL servers on port 5432 do not collide) and reach the host only
//! at [`Lab::host_ip`], where the tests put [`Forward`]s to the controller
//! and the storage: forwards the tests can cut to simulate an outage.
//!
//! Needs root (or CAP_NET_ADMIN) and `ip` from iproute2. Every name carries
//! the test process's id, so concurrent test binaries do not meet, and
//! everything is removed on drop; what a killed test process left is
//! removed by the next one, and a subnet still in use is never taken.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use anyhow::{Context, bail};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A bridge on the host with one network namespace per cluster.
pub struct Lab {
    /// `fy<pid>x<n>`: unique per process and lab.
    tag: String,
    bridge: String,
    subnet: u8,
    namespaces: Vec<String>,
}

/// Labs made by this process so far.
static LABS: AtomicU32 = AtomicU32::new(0);

/// Held while a lab picks and claims its subnet.
static CLAIM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The S of every 10.231.S.x address on the host.
fn taken_subnets() -> anyhow::Result<Vec<u8>> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .context("running ip (iproute2)")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("10.231."))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect())
}

/// The pid in a lab's name (`fy<pid>x…`), if `name` is one.
fn lab_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("fy")?;
    let (pid, _) = rest.split_once('x')?;
    pid.parse().ok()
}

/// Removes the bridges and namespaces of labs whose test process is gone
/// (killed before its labs were dropped), once per process.
fn sweep_dead_labs() {
    static SWEPT: AtomicBool = AtomicBool::new(false);
    if SWEPT.swap(true, Ordering::SeqCst) {
        return;
    }
    let dead = |name: &str| {
        lab_pid(name).is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    let listed = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    for line in listed(&["netns", "list"]).lines() {
        if let Some(ns) = line.split_whitespace().next().filter(|ns| dead(ns)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
    for line in listed(&["-o", "link", "show", "type", "bridge"]).lines() {
        // `7: fy123x4b: <BROADCAST,…`
        if let Some(b) = line.split(": ").nth(1).filter(|b| dead(b)) {
            let _ = ip(&["link", "del", b]);
        }
    }
}

impl Lab {
    /// A bridge and `clusters.len()` namespaces, named after the clusters.
    pub fn new(clusters: &[&str]) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        // One lab at a time picks its subnet and claims it on its bridge,
        // so two of this process's labs never share one.
        let _claim = CLAIM
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sweep_dead_labs();
        // 10.231.S.0/24: the first S from the pid and the lab that no
        // address on the host is in (a lab left by a killed test process
        // keeps its address; sharing its subnet would send this lab's
        // replies to that bridge).
        let taken = taken_subnets()?;
        let first = (pid.wrapping_mul(8).wrapping_add(n)) % 200;
        let subnet = (0..200)
            .map(|i| u8::try_from((first + i) % 200).unwrap_or(0) + 20)
            .find(|s| !taken.contains(s))
            .context("every 10.231.S.0/24 test subnet is in use on this host")?;
        let tag = format!("fy{pid}x{n}");
        let mut lab = Self {
            bridge: format!("{tag}b"),
            tag,
            subnet,
            namespaces: Vec::new(),
        };
        let host = format!("{}/24", lab.host_ip());
        ip(&["link", "add", &lab.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &host, "dev", &lab.bridge])?;
        ip(&["link", "set", &lab.bridge, "up"])?;
        for (i, cluster) in clusters.iter().enumerate() {
            let ns = lab.namespace(cluster);
            ip(&["netns", "add", &ns])?;
            lab.namespaces.push(ns.clone());
            let (outer, inner) = (format!("{}h{i}", lab.tag), format!("{}n{i}", lab.tag));
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "master", &lab.bridge])?;
            ip(&["link", "set", &outer, "up"])?;
            let addr = format!("10.231.{subnet}.{}/24", i + 2);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    /// The host's address on the bridge, reachable from every namespace.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.subnet, 1)
    }

    /// The namespace of `cluster` (for `ip netns exec`).
    pub fn namespace(&self, cluster: &str) -> String {
        format!("{}{cluster}", self.tag)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// A TCP forward from an address on the host to a target, that can be cut:
/// while cut, open connections are dropped and new ones closed at once
/// (what a client sees when a server or its network goes away). It can
/// also be stalled: connections stay open and what clients send waits
/// (a server that has stopped answering), until released.
pub struct Forward {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    stall: Arc<Stall>,
    conns: Arc<std::sync::Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

/// A forward's stall: `armed` bytes more from clients pass, then what
/// they send waits until `release`.
struct Stall {
    /// Bytes clients may still send before the stall holds; `u64::MAX`:
    /// not armed.
    left: std::sync::atomic::AtomicU64,
    released: tokio::sync::Notify,
    /// Sends waiting at the stall.
    held: std::sync::atomic::AtomicUsize,
}

impl Stall {
    /// Called before `n` bytes from a client are passed on: waits while
    /// the stall holds.
    async fn pass(&self, n: usize) {
        let n = n as u64;
        loop {
            let released = self.released.notified();
            let left = self.left.load(Ordering::SeqCst);
            if left == u64::MAX {
                return;
            }
            if left >= n
                && self
                    .left
                    .compare_exchange(left, left - n, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                return;
            }
            if left >= n {
                continue;
            }
            // What is left of the budget goes; a release (or a new
            // budget) meanwhile wins.
            if left != 0
                && self
                    .left
                    .compare_exchange(left, 0, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
            {
                continue;
            }
            self.held.fetch_add(1, Ordering::SeqCst);
            released.await;
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Copies `from` to `to`, through the stall when there is one.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stall: Option<Arc<Stall>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(s) = &stall {
            s.pass(n).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Forward {
    /// Listens on `ip` (a port the OS chooses) and forwards to `target`.
    pub async fn start(ip: Ipv4Addr, target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let open = Arc::new(AtomicBool::new(true));
        let stall = Arc::new(Stall {
            left: std::sync::atomic::AtomicU64::new(u64::MAX),
            released: tokio::sync::Notify::new(),
            held: std::sync::atomic::AtomicUsize::new(0),
        });
        let conns = Arc::new(std::sync::Mutex::new(JoinSet::new()));
        let (o, c, st) = (open.clone(), conns.clone(), stall.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                // Checked under the lock `cut` takes, so no connection
                // accepted during a cut survives it.
                let Ok(mut guard) = c.lock() else { return };
                if !o.load(Ordering::SeqCst) {
                    continue;
                }
                let st = st.clone();
                guard.spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        let (in_r, in_w) = inbound.into_split();
                        let (out_r, out_w) = outbound.into_split();
                        tokio::join!(pump(in_r, out_w, Some(st)), pump(out_r, in_w, None));
                    }
                });
                // Reap finished connections as we go.
                while guard.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            addr,
            open,
            stall,
            conns,
            accept,
        })
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        if let Ok(mut c) = self.conns.lock() {
            self.open.store(false, Ordering::SeqCst);
            c.abort_all();
        }
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Lets `bytes` more from clients through, then holds what they send
    /// (connections stay open) until [`Forward::release`].
    pub fn stall_after(&self, bytes: u64) {
        self.stall.left.store(bytes, Ordering::SeqCst);
    }

    /// How many sends the stall holds now.
    pub fn held(&self) -> usize {
        self.stall.held.load(Ordering::SeqCst)
    }

    /// Lets everything through again.
    pub fn release(&self) {
        self.stall.left.store(u64::MAX, Ordering::SeqCst);
        self.stall.released.notify_waiters();
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(mut c) = self.conns.lock() {
            c.abort_all();
        }
    }
}

//! Separate hosts on one machine: each "cluster" gets its own network
//! namespace, joined to the test's host namespace by a bridge. Processes
//! started in a namespace have their own loopback and ports (two
//! PostgreSQL servers on port 5432 do not collide) and reach the host only
//! at [`Lab::host_ip`], where the tests put [`Forward`]s to the controller
//! and the storage: forwards the tests can cut to simulate an outage.
//!
//! Needs root (or CAP_NET_ADMIN) and `ip` from iproute2. Every name carries
//! the test process's id, so concurrent test binaries do not meet, and
//! everything is removed on drop.

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

impl Lab {
    /// A bridge and `clusters.len()` namespaces, named after the clusters.
    pub fn new(clusters: &[&str]) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        // 10.231.S.0/24; S from the pid and the lab so concurrent tests
        // and binaries differ.
        let subnet = u8::try_from((pid.wrapping_mul(8).wrapping_add(n)) % 200).unwrap_or(0) + 20;
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
/// (what a client sees when a server or its network goes away).
pub struct Forward {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Forward {
    /// Listens on `ip` (a port the OS chooses) and forwards to `target`.
    pub async fn start(ip: Ipv4Addr, target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let open = Arc::new(AtomicBool::new(true));
        let conns = Arc::new(std::sync::Mutex::new(JoinSet::new()));
        let (o, c) = (open.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                // Checked under the lock `cut` takes, so no connection
                // accepted during a cut survives it.
                let Ok(mut guard) = c.lock() else { return };
                if !o.load(Ordering::SeqCst) {
                    continue;
                }
                guard.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                // Reap finished connections as we go.
                while guard.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            addr,
            open,
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
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(mut c) = self.conns.lock() {
            c.abort_all();
        }
    }
}

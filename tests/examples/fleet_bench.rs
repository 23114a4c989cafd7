//! The controller's memory with a fleet of simulated agents, each a real
//! mTLS session with its own enrolled certificate: hello, a one-app
//! inventory, heartbeats, and replies to pings. Run by `bench/fleet.sh`.
//!
//!   fleet_bench [AGENTS] [ROUNDS] (default 5000, 2); binaries from FERRY_BIN_DIR
//!
//! Prints one JSON object: the controller's resident memory (VmRSS, and its
//! peak VmHWM) with the catalog only, then for each of two rounds with
//! every agent online, after a ping of every agent through its link, and
//! after they all went away (the second round shows whether memory of
//! ended sessions is reused or lost).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_proto::tls::{self, CaFingerprint};
use ferry_proto::v1 as pb;
use ferry_proto::v1::agent_message::Kind as AgentKind;
use ferry_proto::v1::controller_message::Kind as ControllerKind;
use ferry_tests::{Controller, open_agent_session, setup, wait_for};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

const HEARTBEAT_SECS: u64 = 10;
const CONCURRENCY: usize = 32;

/// (VmRSS, VmHWM) of a process, MiB.
fn memory(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .context("no value")?
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

#[derive(Clone)]
struct Identity {
    node: String,
    cert_pem: String,
    key_pem: String,
}

async fn enrol(ctl: &Controller, n: usize, ca_pem: &str) -> anyhow::Result<Vec<Identity>> {
    let mut op = ctl.operator().await?;
    let pin = CaFingerprint::of_pem(ca_pem)?;
    let channel = tls::pinned_channel(&ctl.url(), &pin).await?;
    let gate = Arc::new(Semaphore::new(CONCURRENCY));
    let mut joins = JoinSet::new();
    for i in 0..n {
        let token = op
            .create_join_token(pb::CreateJoinTokenRequest {
                cluster: "fleet".into(),
                ttl_seconds: 0,
            })
            .await?
            .into_inner()
            .token;
        let mut client = pb::enrollment_client::EnrollmentClient::new(channel.clone());
        let permit = Arc::clone(&gate).acquire_owned().await?;
        joins.spawn(async move {
            let _permit = permit;
            let node = format!("node-{i:05}");
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, node.as_str());
            params.distinguished_name = dn;
            let csr_pem = params.serialize_request(&key)?.pem()?;
            let resp = client
                .join(pb::JoinRequest {
                    token,
                    csr_pem,
                    node: node.clone(),
                    cluster: String::new(),
                })
                .await?
                .into_inner();
            anyhow::Ok(Identity {
                node,
                cert_pem: resp.certificate_pem,
                key_pem: key.serialize_pem(),
            })
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(j) = joins.join_next().await {
        out.push(j??);
    }
    Ok(out)
}

fn app(node: &str) -> pb::App {
    pb::App {
        name: format!("app-{node}"),
        team: "fleet".into(),
        components: vec![pb::Component {
            name: "main".into(),
            stateful: false,
            state: pb::ComponentState::Running as i32,
            kind: Some(pb::component::Kind::Host(pb::HostComponent {
                control: Some(pb::host_component::Control::Systemd(pb::SystemdUnit {
                    unit: "main.service".into(),
                })),
            })),
            ..Default::default()
        }],
        volumes: vec![],
    }
}

/// One simulated agent: connects, reports, then heartbeats and answers
/// pings until `stop`.
async fn agent(
    url: String,
    ca_pem: Arc<String>,
    id: Identity,
    online: mpsc::Sender<()>,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let (tx, mut inbound) =
        open_agent_session(&url, &ca_pem, &id.cert_pem, &id.key_pem, "fleet", &id.node).await?;
    let send = |kind| pb::AgentMessage { kind: Some(kind) };
    tx.send(send(AgentKind::Inventory(pb::Inventory {
        apps: vec![app(&id.node)],
        taken_unix_ms: ferry_core::now_ms(),
        more: false,
    })))
    .await?;
    let _ = online.send(()).await;
    drop(online);
    let mut beat = tokio::time::interval(Duration::from_secs(HEARTBEAT_SECS));
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = beat.tick() => {
                tx.send(send(AgentKind::Heartbeat(pb::Heartbeat { sent_unix_ms: ferry_core::now_ms() }))).await?;
            }
            msg = inbound.message() => match msg?.and_then(|m| m.kind) {
                Some(ControllerKind::Request(r)) => {
                    let reply = pb::Reply {
                        id: r.id,
                        result: Some(pb::reply::Result::Ping(pb::PingReply {
                            version: "sim".into(),
                            platform: "host".into(),
                            agent_unix_ms: ferry_core::now_ms(),
                            requests_running: 1,
                        })),
                    };
                    tx.send(send(AgentKind::Reply(reply))).await?;
                }
                Some(_) => {}
                None => anyhow::bail!("session closed"),
            },
        }
    }
}

async fn online_count(ctl: &Controller) -> anyhow::Result<usize> {
    let mut op = ctl.operator().await?;
    let mut n = 0;
    let mut page_token = String::new();
    loop {
        let page = op
            .list_agents(pb::ListAgentsRequest {
                cluster: "fleet".into(),
                page_size: 1000,
                page_token,
            })
            .await?
            .into_inner();
        n += page.agents.iter().filter(|a| a.online).count();
        if page.next_page_token.is_empty() {
            return Ok(n);
        }
        page_token = page.next_page_token;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    setup();
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(5000);
    let mut ctl = Controller::init()?;
    ctl.serve_args([
        "--heartbeat-secs",
        &HEARTBEAT_SECS.to_string(),
        "--max-connections",
        &(n + 100).to_string(),
    ]);
    ctl.start().await?;
    let pid = ctl.pid().context("controller pid")?;
    let ca_pem = Arc::new(ctl.read("operator/ca.crt")?);
    let (idle_rss, _) = memory(pid)?;

    let started = Instant::now();
    let ids = enrol(&ctl, n, &ca_pem).await?;
    let enrol_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (enrolled_rss, _) = memory(pid)?;

    let mut rounds = Vec::new();
    let rounds_n: usize = std::env::args()
        .nth(2)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(2);
    for round in 1..=rounds_n {
        let stop = tokio_util::sync::CancellationToken::new();
        let (online_tx, mut online_rx) = mpsc::channel(n.max(1));
        let mut agents = JoinSet::new();
        let gate = Arc::new(Semaphore::new(CONCURRENCY));
        let started = Instant::now();
        for id in ids.iter().cloned() {
            let permit = Arc::clone(&gate).acquire_owned().await?;
            let (url, ca, tx, stop) = (
                ctl.url(),
                Arc::clone(&ca_pem),
                online_tx.clone(),
                stop.clone(),
            );
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            agents.spawn(async move {
                let (inner_tx, mut inner_rx) = mpsc::channel(1);
                let run = agent(url, ca, id, inner_tx, stop);
                tokio::pin!(run);
                // Hold the connect permit until this agent is online.
                let mut done_tx = Some(done_tx);
                loop {
                    tokio::select! {
                        r = &mut run => return r,
                        Some(()) = inner_rx.recv(), if done_tx.is_some() => {
                            let _ = tx.send(()).await;
                            if let Some(d) = done_tx.take() { let _ = d.send(()); }
                        }
                    }
                }
            });
            tokio::spawn(async move {
                let _ = done_rx.await;
                drop(permit);
            });
        }
        drop(online_tx);
        for _ in 0..n {
            if online_rx.recv().await.is_none() {
                break;
            }
        }
        let connect_s = started.elapsed().as_secs_f64();
        let online = wait_for("every agent online", Duration::from_secs(120), || {
            let ctl = &ctl;
            async move { online_count(ctl).await.ok().filter(|c| *c == n) }
        })
        .await?;
        // Two heartbeat rounds, so every session has settled.
        tokio::time::sleep(Duration::from_secs(2 * HEARTBEAT_SECS)).await;
        let (online_rss, online_hwm) = memory(pid)?;

        // Every agent pinged through its link.
        let started = Instant::now();
        let mut pings = JoinSet::new();
        let op = ctl.operator().await?;
        for i in 0..n {
            let mut op = op.clone();
            let permit = Arc::clone(&gate).acquire_owned().await?;
            pings.spawn(async move {
                let _permit = permit;
                let mut events = op
                    .ping_agent(pb::PingAgentRequest {
                        cluster: "fleet".into(),
                        node: format!("node-{i:05}"),
                        hold_ms: 0,
                        timeout_ms: 30_000,
                    })
                    .await?
                    .into_inner();
                while let Some(e) = events.message().await? {
                    if let Some(pb::ping_agent_event::Kind::Result(_)) = e.kind {
                        return anyhow::Ok(());
                    }
                }
                anyhow::bail!("no reply")
            });
        }
        let mut ok = 0;
        while let Some(p) = pings.join_next().await {
            if p.is_ok_and(|r| r.is_ok()) {
                ok += 1;
            }
        }
        let ping_s = started.elapsed().as_secs_f64();
        let (pinged_rss, pinged_hwm) = memory(pid)?;

        stop.cancel();
        while agents.join_next().await.is_some() {}
        wait_for("every agent offline", Duration::from_secs(120), || {
            let ctl = &ctl;
            async move { online_count(ctl).await.ok().filter(|c| *c == 0) }
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (gone_rss, gone_hwm) = memory(pid)?;
        rounds.push(serde_json::json!({
            "round": round,
            "online": online,
            "pings_answered": ok,
            "connect_s": connect_s,
            "ping_all_s": ping_s,
            "rss_mib": {
                "online": online_rss,
                "after_ping": pinged_rss,
                "after_disconnect": gone_rss,
            },
            "peak_rss_mib": online_hwm.max(pinged_hwm).max(gone_hwm),
            "per_online_agent_kib": (online_rss - enrolled_rss) * 1024.0 / n as f64,
        }));
    }
    ctl.stop().await?;

    println!(
        "{}",
        serde_json::json!({
            "agents": n,
            "enrol_s": enrol_s,
            "rss_mib": { "idle": idle_rss, "enrolled": enrolled_rss },
            "rounds": rounds,
        })
    );
    Ok(())
}

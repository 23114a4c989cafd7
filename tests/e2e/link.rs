//! The two-way link between controller and agent, over the real binaries:
//! requests with progress, deadlines and cancellation, through restarts of
//! either side; one live session per agent; large inventories and lists.

use std::process::Command;

use ferry_proto::v1 as pb;
use ferry_tests::{
    AgentProcess, Controller, DEADLINE, RawSession, bin, open_agent_session, run, setup, wait_for,
};
use tokio_stream::StreamExt;

use crate::foundation::agent_config;
use crate::reconnect::enrol;

fn ferryctl(ctl: &Controller, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    run(&mut ferryctl_cmd(ctl, args))
}

pub(crate) fn ferryctl_cmd(ctl: &Controller, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("ferryctl"));
    cmd.env("FERRY_CONTROLLER", ctl.url())
        .env("FERRY_CA", ctl.path("operator/ca.crt"))
        .env("FERRY_CERT", ctl.path("operator/operator.crt"))
        .env("FERRY_KEY", ctl.path("operator/operator.key"))
        .env("HOME", ctl.dir.path())
        .env_remove("FERRY_CONFIG")
        .env_remove("FERRY_OUTPUT")
        .args(args);
    cmd
}

/// A ping of node-1 as `ferryctl -o json` reports it, once it succeeds.
async fn ping_until_answered(ctl: &Controller) -> anyhow::Result<serde_json::Value> {
    wait_for("the agent to answer a ping", DEADLINE, || {
        let got = ferryctl(
            ctl,
            &["agent", "ping", "node-1", "--cluster", "prod", "-o", "json"],
        )
        .ok()
        .filter(|(ok, _, _)| *ok)
        .and_then(|(_, out, _)| serde_json::from_str::<serde_json::Value>(&out).ok());
        async move { got }
    })
    .await
}

/// Pings through the operator API, collecting progress until the result.
async fn ping(
    ctl: &Controller,
    hold_ms: u64,
    timeout_ms: u64,
) -> anyhow::Result<(
    Vec<pb::Progress>,
    Result<pb::PingAgentResult, tonic::Status>,
)> {
    let mut op = ctl.operator().await?;
    let mut events = match op
        .ping_agent(pb::PingAgentRequest {
            cluster: "prod".into(),
            node: "node-1".into(),
            hold_ms,
            timeout_ms,
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return Ok((Vec::new(), Err(status))),
    };
    let mut progress = Vec::new();
    while let Some(event) = events.next().await {
        match event.map(|e| e.kind) {
            Ok(Some(pb::ping_agent_event::Kind::Progress(p))) => progress.push(p),
            Ok(Some(pb::ping_agent_event::Kind::Result(r))) => return Ok((progress, Ok(r))),
            Ok(None) => anyhow::bail!("an empty event"),
            Err(status) => return Ok((progress, Err(status))),
        }
    }
    anyhow::bail!("the ping ended without a result")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_agent_through_restarts_of_either_side() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let dir = enrol(&ctl, "node-1").await?;
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, agent_config(&ctl.url(), dir.path()))?;
    let mut agent = AgentProcess::spawn(&config, dir.path().join("agent-1.log"))?;

    let pong = ping_until_answered(&ctl).await?;
    assert_eq!(pong["platform"], "host", "{pong}");
    assert_eq!(pong["version"], env!("CARGO_PKG_VERSION"), "{pong}");
    assert_eq!(pong["requests_running"], 1, "{pong}");

    // A long request: progress every second, and the session stays up
    // meanwhile (it holds longer than three missed heartbeats would allow).
    let (progress, result) = ping(&ctl, 4_000, 0).await?;
    let result = result.map_err(|s| anyhow::anyhow!("held ping failed: {s:?}"))?;
    assert!(result.round_trip_ms >= 4_000, "{result:?}");
    let done: Vec<u64> = progress.iter().map(|p| p.done).collect();
    assert_eq!(done, [1, 2, 3, 4], "{progress:?}");
    assert!(progress.iter().all(|p| p.total == 4));
    let sessions = agent.logs().matches("session established").count();
    assert_eq!(sessions, 1, "{}", agent.logs());

    // A deadline passed: the caller hears so, the agent is told to stop.
    let (_, result) = ping(&ctl, 30_000, 1_000).await?;
    let status = result.expect_err("past its deadline");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    wait_for("the agent to drop the abandoned request", DEADLINE, || {
        let pong = ferryctl(
            &ctl,
            &["agent", "ping", "node-1", "--cluster", "prod", "-o", "json"],
        )
        .ok()
        .and_then(|(_, out, _)| serde_json::from_str::<serde_json::Value>(&out).ok())
        .filter(|p| p["requests_running"] == 1);
        async move { pong }
    })
    .await?;

    // The controller restarts: the same request works once the agent is back.
    ctl.stop().await?;
    let (ok, _, err) = ferryctl(&ctl, &["agent", "ping", "node-1", "--cluster", "prod"])?;
    assert!(!ok && err.contains("cannot reach the controller"), "{err}");
    ctl.start().await?;
    ping_until_answered(&ctl).await?;

    // The agent restarts.
    agent.stop().await?;
    let (ok, _, err) = ferryctl(&ctl, &["agent", "ping", "node-1", "--cluster", "prod"])?;
    assert!(!ok, "a stopped agent answered");
    assert!(err.contains("not connected"), "{err}");
    let mut agent = AgentProcess::spawn(&config, dir.path().join("agent-2.log"))?;
    ping_until_answered(&ctl).await?;

    // Another request kind: the inventory, now; recorded when it returns.
    let (ok, out, err) = ferryctl(
        &ctl,
        &[
            "agent",
            "refresh",
            "node-1",
            "--cluster",
            "prod",
            "-o",
            "json",
        ],
    )?;
    assert!(ok, "{err}");
    let refreshed: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(refreshed["apps"], 1, "{out}");

    // A node nobody enrolled: not found, a usage error (exit 2).
    let mut cmd = ferryctl_cmd(&ctl, &["agent", "ping", "node-9", "--cluster", "prod"]);
    let out = cmd.output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no agent is enrolled as node node-9"), "{err}");

    // The caller goes away mid-request: the controller cancels it on the
    // agent, long before its hold would end.
    let mut held = ferryctl_cmd(
        &ctl,
        &[
            "agent",
            "ping",
            "node-1",
            "--cluster",
            "prod",
            "--hold",
            "40s",
        ],
    )
    .stderr(std::process::Stdio::piped())
    .spawn()?;
    let mut stderr = std::io::BufReader::new(held.stderr.take().expect("stderr"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line)?;
    assert!(line.contains("held 1 s of 40 s"), "{line:?}");
    let busy = ping_until_answered(&ctl).await?;
    assert_eq!(busy["requests_running"], 2, "{busy}");
    held.kill()?;
    held.wait()?;
    wait_for(
        "the agent to cancel the abandoned request",
        DEADLINE,
        || {
            let got = ping_until_answered(&ctl);
            async move { got.await.ok().filter(|p| p["requests_running"] == 1) }
        },
    )
    .await?;
    let logs = agent.logs();
    assert!(!logs.contains("session failed"), "{logs}");

    agent.stop().await?;
    ctl.stop().await?;
    Ok(())
}

/// An agent session opened by hand with the agent's own identity.
async fn raw_session(ctl: &Controller, dir: &std::path::Path) -> anyhow::Result<RawSession> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    open_agent_session(
        &ctl.url(),
        &read("ca.crt")?,
        &read("agent.crt")?,
        &read("agent.key")?,
        "prod",
        "node-1",
    )
    .await
}

/// Reads the session until it fails; returns the status.
async fn session_end(inbound: &mut tonic::Streaming<pb::ControllerMessage>) -> tonic::Status {
    loop {
        match tokio::time::timeout(DEADLINE, inbound.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => return tonic::Status::ok("closed without a status"),
            Ok(Err(status)) => return status,
            Err(_) => return tonic::Status::deadline_exceeded("the session did not end"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_of_an_agent_replaces_the_old_one() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let dir = enrol(&ctl, "node-1").await?;
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, agent_config(&ctl.url(), dir.path()))?;

    let (_tx1, mut first) = raw_session(&ctl, dir.path()).await?;
    let (_tx2, mut second) = raw_session(&ctl, dir.path()).await?;
    let status = session_end(&mut first).await;
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(status.message().contains("superseded"), "{status:?}");

    // The real agent connects: it replaces the hand-made session, and
    // requests go to it.
    let mut agent = AgentProcess::spawn(&config, dir.path().join("agent.log"))?;
    let status = session_end(&mut second).await;
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    let pong = ping_until_answered(&ctl).await?;
    assert_eq!(pong["platform"], "host");
    let mut op = ctl.operator().await?;
    let agents = op
        .list_agents(pb::ListAgentsRequest::default())
        .await?
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    assert!(agents[0].online);
    agent.stop().await?;
    ctl.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_ends_the_session_with_a_reason() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let dir = enrol(&ctl, "node-1").await?;
    let (tx, mut inbound) = raw_session(&ctl, dir.path()).await?;
    // One inventory message of ~5 MiB: over gRPC's 4 MiB limit.
    let app = |i: usize| pb::App {
        name: format!("app-{i}-{}", "x".repeat(50_000)),
        team: "web".into(),
        ..Default::default()
    };
    tx.send(pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Inventory(pb::Inventory {
            apps: (0..100).map(app).collect(),
            taken_unix_ms: 1,
            more: false,
        })),
    })
    .await?;
    let status = session_end(&mut inbound).await;
    assert_ne!(status.code(), tonic::Code::Ok, "{status:?}");
    assert!(
        status.message().contains("too large"),
        "the agent must learn why: {status:?}"
    );
    ctl.stop().await?;
    Ok(())
}

/// An agent config declaring `n` apps of about 3 KB each.
fn many_apps(controller: &str, data_dir: &std::path::Path, n: usize) -> String {
    let mut text = agent_config(controller, data_dir);
    let long_arg = "x".repeat(3000);
    for i in 0..n {
        text.push_str(&format!(
            "\n[[apps]]\nname = \"bulk-{i:05}\"\nteam = \"bulk\"\n\n[[apps.components]]\n\
             name = \"main\"\nstart = \"true {long_arg}\"\nstop = \"true\"\n"
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_and_a_list_larger_than_one_message_arrive_whole() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let dir = enrol(&ctl, "node-1").await?;
    let config = dir.path().join("agent.toml");
    // ~6 MB of apps: the inventory goes in parts, `app ls` in pages.
    std::fs::write(&config, many_apps(&ctl.url(), dir.path(), 2_000))?;
    let mut agent = AgentProcess::spawn(&config, dir.path().join("agent.log"))?;
    let (ok, out, err) = wait_for("the whole inventory", DEADLINE * 2, || {
        let got = ferryctl(&ctl, &["app", "ls", "--team", "bulk", "-o", "json"])
            .ok()
            .filter(|(ok, out, _)| *ok && out.matches("bulk-").count() >= 2_000);
        async move { got }
    })
    .await?;
    assert!(ok, "{err}");
    let apps: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    assert_eq!(apps.len(), 2_000);
    assert_eq!(apps[0]["name"], "bulk-00000");
    assert_eq!(apps[1999]["name"], "bulk-01999");
    let logs = agent.logs();
    let sent = logs
        .lines()
        .find(|l| l.contains("inventory sent") && l.contains("apps=2001"))
        .ok_or_else(|| anyhow::anyhow!("no inventory of 2001 apps sent: {logs}"))?;
    let parts: usize = sent
        .split("parts=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no part count in {sent}"))?;
    assert!(parts > 1, "sent in one part: {sent}");
    assert!(!logs.contains("session failed"), "{logs}");
    let ctl_logs = ctl.logs();
    assert!(ctl_logs.contains("apps=2001"), "{ctl_logs}");
    agent.stop().await?;
    ctl.stop().await?;
    Ok(())
}

//! How an agent tells why it lost the controller, and how soon it is back.

use std::process::Command;

use ferry_tests::{AgentProcess, Controller, DEADLINE, bin, run, setup, wait_for};

use crate::foundation::{agent_config, token};

/// Enrols node `node` of cluster `prod` into a fresh data directory.
pub(crate) async fn enrol(ctl: &Controller, node: &str) -> anyhow::Result<tempfile::TempDir> {
    let mut op = ctl.operator().await?;
    let t = token(&mut op, "prod", 0).await?;
    let dir = tempfile::tempdir()?;
    let (ok, _, err) = run(Command::new(bin("ferry-agent"))
        .args(["join", "--controller", &ctl.url(), "--token", &t.token])
        .args(["--ca-fingerprint", &t.ca_fingerprint, "--node", node])
        .arg("--data-dir")
        .arg(dir.path()))?;
    anyhow::ensure!(ok, "join failed: {err}");
    Ok(dir)
}

/// The first line of the agent's log after `skip` lines that contains
/// `what`, with its index.
fn log_line(agent: &AgentProcess, skip: usize, what: &str) -> Option<(usize, String)> {
    agent
        .logs()
        .lines()
        .enumerate()
        .skip(skip)
        .find(|(_, l)| l.contains(what))
        .map(|(i, l)| (i, l.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_logs_why_it_cannot_reach_the_controller() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let dir = enrol(&ctl, "node-1").await?;
    // A port nothing listens on: chosen by the OS, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        agent_config(&format!("https://{closed}"), dir.path()),
    )?;
    let mut agent = AgentProcess::spawn(&config, dir.path().join("agent.log"))?;
    let (_, line) = wait_for("the agent to log a failed session", DEADLINE, || {
        let found = log_line(&agent, 0, "session failed");
        async move { found }
    })
    .await?;
    // The cause, not just "transport error", and each part of it once.
    assert!(line.contains("Connection refused"), "{line}");
    assert!(line.contains(&closed.to_string()), "{line}");
    for part in ["transport error", "tcp connect error", "Connection refused"] {
        assert_eq!(line.matches(part).count(), 1, "{part:?} in {line}");
    }
    agent.stop().await?;
    ctl.stop().await?;
    Ok(())
}

/// The `delay_ms` of a `reconnecting` log line.
fn delay_ms(line: &str) -> Option<u64> {
    let rest = &line[line.find("delay_ms=")? + "delay_ms=".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_session_resets_the_agents_backoff() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let dir = enrol(&ctl, "node-1").await?;
    let config = dir.path().join("agent.toml");
    // A floor of 50 ms and a ceiling far above anything the test waits for.
    let text = agent_config(&ctl.url(), dir.path())
        .replace("reconnect_max_ms = 500", "reconnect_max_ms = 600000");
    anyhow::ensure!(text.contains("reconnect_min_ms = 50\n"), "{text}");
    std::fs::write(&config, text)?;
    let mut agent = AgentProcess::spawn(&config, dir.path().join("agent.log"))?;
    let (first, _) = wait_for("the first session", DEADLINE, || {
        let found = log_line(&agent, 0, "session established");
        async move { found }
    })
    .await?;

    // Down for a while: failed attempts grow the delay well past the floor.
    ctl.kill();
    wait_for("the backoff to grow", DEADLINE, || {
        let grown = agent
            .logs()
            .lines()
            .skip(first)
            .filter_map(delay_ms)
            .any(|ms| ms >= 400);
        async move { grown.then_some(()) }
    })
    .await?;

    // Back for a moment only: the session is accepted, then lost again.
    ctl.start().await?;
    let (second, _) = wait_for("the second session", DEADLINE, || {
        let found = log_line(&agent, first + 1, "session established");
        async move { found }
    })
    .await?;
    ctl.kill();
    let (_, line) = wait_for("a retry after the second session", DEADLINE, || {
        let found = log_line(&agent, second, "reconnecting");
        async move { found }
    })
    .await?;
    let ms = delay_ms(&line).ok_or_else(|| anyhow::anyhow!("no delay in {line}"))?;
    assert!(ms <= 50, "the backoff was not reset: {line}");

    // And the agent is back as soon as the controller is.
    ctl.start().await?;
    wait_for("the third session", DEADLINE, || {
        let found = log_line(&agent, second + 1, "session established");
        async move { found }
    })
    .await?;
    agent.stop().await?;
    ctl.stop().await?;
    Ok(())
}

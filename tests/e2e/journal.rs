//! The agent's journal of what Ferry stopped, over the real binary: an
//! agent that died between stopping a component and starting it again
//! starts it when it runs next, and never starts what it did not stop.

use std::process::Command;

use ferry_tests::{AgentProcess, Controller, DEADLINE, run, setup, wait_for};

use crate::foundation::agent_config;
use crate::reconnect::enrol;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_starts_at_start_up_what_an_interrupted_operation_stopped() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let dir = enrol(&ctl, "node-1").await?;
    let d = dir.path();
    let config = d.join("agent.toml");
    std::fs::write(&config, agent_config(&ctl.url(), d))?;
    // What an agent killed during a cold backup leaves: the journal entry
    // it wrote before stopping shop's db, and db not running.
    std::fs::create_dir_all(d.join("journal"))?;
    std::fs::write(
        d.join("journal/job-41.json"),
        r#"{"format": 1, "stopped": [{"team": "web", "app": "shop", "component": "db"}]}"#,
    )?;
    assert!(!d.join("db.pid").exists());

    let mut agent = AgentProcess::spawn(&config, d.join("agent.log"))?;
    let alive = || {
        let d = d.to_path_buf();
        async move {
            let (ok, _, _) = run(Command::new("sh")
                .arg("-c")
                .arg(format!("kill -0 $(cat {}/db.pid)", d.display())))
            .ok()?;
            (ok && !d.join("journal/job-41.json").exists()).then_some(())
        }
    };
    wait_for("db started again and the entry cleared", DEADLINE, alive).await?;
    let logs = agent.logs();
    assert!(
        logs.contains("an interrupted operation stopped components"),
        "{logs}"
    );
    agent.stop().await?;

    // Nothing in the journal: a stopped component stays stopped.
    run(Command::new("sh").arg("-c").arg(format!(
        "kill $(cat {0}/db.pid); rm {0}/db.pid",
        d.display()
    )))?;
    let mut agent = AgentProcess::spawn(&config, d.join("agent2.log"))?;
    wait_for("agent online", DEADLINE, || {
        let logs = agent.logs();
        async move { logs.contains("session established").then_some(()) }
    })
    .await?;
    assert!(
        !d.join("db.pid").exists(),
        "a component Ferry did not stop was started"
    );
    agent.stop().await?;
    Ok(())
}

//! Jobs over the real binaries: a cold backup stops the app's stateful
//! component for the final delta only and starts it again, the backup is
//! listed with its downtime, it restores as a copy beside the original
//! (own volume, own process) and migrates to another cluster; a local
//! location's backup is refused elsewhere; refuse mode stops nothing.

use std::path::{Path, PathBuf};

use anyhow::Context;
use std::process::Command;

use ferry_tests::{AgentProcess, Controller, DEADLINE, bin, run, setup, wait_for};

use crate::foundation::token;

pub(crate) fn ferryctl(ctl: &Controller, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = crate::link::ferryctl_cmd(ctl, args).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `ferryctl app backup shop --cluster a --team web -o json EXTRA…`.
pub(crate) fn backup_shop(
    ctl: &Controller,
    extra: &[&str],
) -> anyhow::Result<(i32, String, String)> {
    let mut args = vec![
        "app",
        "backup",
        "shop",
        "--cluster",
        "a",
        "--team",
        "web",
        "-o",
        "json",
    ];
    args.extend(extra);
    ferryctl(ctl, &args)
}

/// A forward on `ip` to the tests' SeaweedFS (the S3 server), which a test
/// can cut or stall.
pub(crate) async fn seaweed_forward(
    ip: std::net::Ipv4Addr,
) -> anyhow::Result<ferry_tests::lab::Forward> {
    use anyhow::Context;
    let weed = ferry_store::testing::seaweed().await;
    let addr: std::net::SocketAddr = weed
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .context("seaweedfs endpoint")?;
    ferry_tests::lab::Forward::start(ip, addr).await
}

/// Adds the S3 location `name`: SeaweedFS's `bucket`, reached at
/// `endpoint`, with the test server's keys in a credentials file in the
/// controller's directory.
pub(crate) fn add_s3_storage(
    ctl: &Controller,
    name: &str,
    endpoint: &str,
    bucket: &str,
) -> anyhow::Result<()> {
    let creds = ctl.dir.path().join(format!("{name}-s3.env"));
    std::fs::write(
        &creds,
        format!(
            "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\n",
            ferry_store::testing::ACCESS_KEY,
            ferry_store::testing::SECRET_KEY
        ),
    )?;
    let creds = creds.display().to_string();
    let (code, out, err) = ferryctl(
        ctl,
        &[
            "storage",
            "add",
            name,
            "s3",
            "--endpoint",
            endpoint,
            "--bucket",
            bucket,
            "--credentials-file",
            &creds,
        ],
    )?;
    anyhow::ensure!(code == 0, "storage add {name}: {out}{err}");
    Ok(())
}

/// A fault the fault matrix injects (`postgres.rs`, `containers.rs`).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fault {
    AgentKill,
    AgentTerm,
    ControllerKill,
    Cancel,
    /// The container engine stopped and started again (its containers
    /// with it); not on the host driver.
    EngineRestart,
}

/// Asserts that the backup job `job` made reads back whole
/// (`backup verify --read-data 100`); `what` names the case in failures.
pub(crate) fn assert_backup_verifies(
    ctl: &Controller,
    job: &serde_json::Value,
    what: &str,
) -> anyhow::Result<()> {
    let bid = job["backup_id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("{what}: no backup id in {job}"))?
        .to_string();
    let (code, out, err) = ferryctl(
        ctl,
        &["backup", "verify", &bid, "--read-data", "100", "-o", "json"],
    )?;
    anyhow::ensure!(
        code == 0,
        "{what}: backup {bid} does not verify: {out}{err}"
    );
    Ok(())
}

/// Job `id` once it has ended (`job show`, polled), within `deadline`: a
/// job that never ends fails the test instead of hanging it.
pub(crate) async fn job_ended(
    ctl: &Controller,
    id: &str,
    deadline: std::time::Duration,
) -> anyhow::Result<serde_json::Value> {
    ferry_tests::wait_for(&format!("job {id} to end"), deadline, || {
        let shown = ferryctl(ctl, &["job", "show", id, "-o", "json"]);
        async move {
            let (_, out, _) = shown.ok()?;
            let job = json(&out).ok()?;
            ["succeeded", "failed", "cancelled"]
                .contains(&job["state"].as_str()?)
                .then_some(job)
        }
    })
    .await
}

pub(crate) fn json(out: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(out)?)
}

pub(crate) async fn enrol_in(
    ctl: &Controller,
    cluster: &str,
    node: &str,
) -> anyhow::Result<AgentDir> {
    let root = tempfile::tempdir()?;
    let dir = root.path().join("agent");
    enrol_at(ctl, cluster, node, &dir).await?;
    Ok(AgentDir { _root: root, dir })
}

/// Enrols an agent whose data directory `dir` `ferry-agent join` creates.
pub(crate) async fn enrol_at(
    ctl: &Controller,
    cluster: &str,
    node: &str,
    dir: &Path,
) -> anyhow::Result<()> {
    let mut op = ctl.operator().await?;
    let t = token(&mut op, cluster, 0).await?;
    let (ok, _, err) = run(Command::new(bin("ferry-agent"))
        .args(["join", "--controller", &ctl.url(), "--token", &t.token])
        .args(["--ca-fingerprint", &t.ca_fingerprint, "--node", node])
        .arg("--data-dir")
        .arg(dir))?;
    anyhow::ensure!(ok, "join failed: {err}");
    Ok(())
}

/// An agent's data directory as `join` made it, in a temporary root of its
/// own (the agent's copies directory goes beside it).
pub(crate) struct AgentDir {
    _root: tempfile::TempDir,
    dir: PathBuf,
}

impl AgentDir {
    pub(crate) fn path(&self) -> &Path {
        &self.dir
    }
}

/// The volume `v0` of the copy `team/app` on the agent with data directory
/// `data_dir` (in the agent's default copies directory, under the job that
/// restored it).
pub(crate) fn copy_volume(data_dir: &Path, team: &str, app: &str) -> anyhow::Result<PathBuf> {
    let mut name = data_dir
        .file_name()
        .context("data dir name")?
        .to_os_string();
    name.push("-copies");
    let app_dir = data_dir.with_file_name(name).join(team).join(app);
    let jobs: Vec<PathBuf> = std::fs::read_dir(&app_dir)
        .with_context(|| format!("copies of {team}/{app} in {}", app_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("job-"))
        })
        .collect();
    anyhow::ensure!(
        jobs.len() == 1,
        "one copy of {team}/{app} expected: {jobs:?}"
    );
    Ok(jobs[0].join("v0"))
}

/// An agent config with app web/shop: one stateful component whose process
/// keeps its pid in `run` (a directory every host has, like /run; per team
/// and app, so a copy has its own)
/// and appends a line to its volume's `starts` file at every start.
pub(crate) fn config(controller: &str, d: &Path, run: &Path, with_app: bool) -> String {
    let r = run.display();
    let d = d.display();
    let app = if with_app {
        format!(
            r#"
[[apps]]
name = "shop"
team = "web"

[[apps.components]]
name = "db"
stateful = true
volumes = ["{d}/vol"]
start = "mkdir -p {r} && echo start >> {d}/vol/starts && (sleep 300 >/dev/null 2>&1 & echo $! > {r}/$FERRY_TEAM-$FERRY_APP.pid)"
stop = "kill $(cat {r}/$FERRY_TEAM-$FERRY_APP.pid) && rm {r}/$FERRY_TEAM-$FERRY_APP.pid"
status = "test -f {r}/$FERRY_TEAM-$FERRY_APP.pid && kill -0 $(cat {r}/$FERRY_TEAM-$FERRY_APP.pid)"
"#
        )
    } else {
        String::new()
    };
    format!(
        r#"controller = "{controller}"
data_dir = "{d}"
heartbeat_secs = 1
reconnect_min_ms = 50
reconnect_max_ms = 500
{app}"#
    )
}

pub(crate) fn pid_of(d: &Path, team: &str, app: &str) -> Option<u32> {
    std::fs::read_to_string(d.join(format!("{team}-{app}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub(crate) fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.contains(") Z")
}

pub(crate) async fn wait_online(ctl: &Controller, n: usize) -> anyhow::Result<()> {
    wait_for("agents online", DEADLINE, || {
        let r = ferryctl(ctl, &["agent", "ls", "-o", "json"]).ok();
        async move {
            let (_, out, _) = r?;
            (out.matches("\"online\": true").count() >= n).then_some(())
        }
    })
    .await
}

pub(crate) async fn wait_app(
    ctl: &Controller,
    cluster: &str,
    team: &str,
    app: &str,
) -> anyhow::Result<()> {
    wait_for("the app in the inventory", DEADLINE, || {
        let r = ferryctl(ctl, &["app", "ls", "--cluster", cluster, "-o", "json"]).ok();
        let (team, app) = (team.to_owned(), app.to_owned());
        async move {
            let (_, out, _) = r?;
            let v: serde_json::Value = serde_json::from_str(&out).ok()?;
            v.as_array()?
                .iter()
                .any(|a| a["team"] == team.as_str() && a["name"] == app.as_str())
                .then_some(())
        }
    })
    .await
}

pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_backup_restore_as_a_copy_and_migrate() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let a = enrol_in(&ctl, "a", "node-a").await?;
    let b = enrol_in(&ctl, "b", "node-b").await?;
    let (da, db) = (a.path(), b.path());
    std::fs::create_dir_all(da.join("vol/sub"))?;
    std::fs::write(da.join("vol/data.txt"), "rows before the backup\n")?;
    std::fs::write(da.join("vol/sub/big.bin"), vec![7u8; 3 << 20])?;
    let rundir = ctl.dir.path().join("run");
    let rd = rundir.as_path();
    std::fs::write(da.join("agent.toml"), config(&ctl.url(), da, rd, true))?;
    std::fs::write(db.join("agent.toml"), config(&ctl.url(), db, rd, false))?;
    let mut agent_a = AgentProcess::spawn(&da.join("agent.toml"), da.join("agent.log"))?;
    let mut agent_b = AgentProcess::spawn(&db.join("agent.toml"), db.join("agent.log"))?;
    wait_online(&ctl, 2).await?;
    wait_app(&ctl, "a", "web", "shop").await?;

    // The app runs before the backup.
    let (ok, _, err) = run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && mkdir -p {r} && echo start >> vol/starts && (sleep 300 >/dev/null 2>&1 & echo $! > {r}/web-shop.pid)",
        da.display(),
        r = rd.display()
    )))?;
    anyhow::ensure!(ok, "{err}");
    let before = pid_of(rd, "web", "shop").expect("pid");

    let shared = ctl.dir.path().join("shared");
    let shared_arg = shared.display().to_string();
    let (code, out, err) = ferryctl(
        &ctl,
        &["storage", "add", "nfs", "shared", "--path", &shared_arg],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let local = ctl.dir.path().join("local-a");
    let local_arg = local.display().to_string();
    let (code, out, err) = ferryctl(
        &ctl,
        &[
            "storage",
            "add",
            "disk-a",
            "local",
            "--cluster",
            "a",
            "--path",
            &local_arg,
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");

    // refuse mode: the component runs, so nothing is stopped or copied.
    let (code, out, err) = ferryctl(
        &ctl,
        &[
            "app",
            "backup",
            "shop",
            "--cluster",
            "a",
            "--team",
            "web",
            "--storage",
            "nfs",
            "--mode",
            "refuse",
        ],
    )?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("mode refuse") && err.contains("nothing was stopped"),
        "{err}"
    );
    assert_eq!(pid_of(rd, "web", "shop"), Some(before));
    assert!(alive(before));

    // Cold backup.
    let (code, out, err) = ferryctl(
        &ctl,
        &[
            "app",
            "backup",
            "shop",
            "--cluster",
            "a",
            "--team",
            "web",
            "--storage",
            "nfs",
            "-o",
            "json",
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let job = json(&out)?;
    assert_eq!(job["state"], "succeeded", "{job}");
    let backup_id = job["backup_id"].as_u64().expect("backup id");
    assert!(job["downtime_ms"].as_u64().unwrap_or(0) > 0, "{job}");
    // Stopped and started again: a new process, the old one gone.
    let after = pid_of(rd, "web", "shop").expect("running again");
    assert_ne!(after, before);
    assert!(alive(after) && !alive(before));
    assert_eq!(
        std::fs::read_to_string(da.join("vol/starts"))?,
        "start\nstart\n"
    );
    assert!(
        !da.join("journal")
            .read_dir()?
            .any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json")))
    );

    let (code, out, _) = ferryctl(&ctl, &["backup", "ls", "-o", "json"])?;
    assert_eq!(code, 0);
    let list = json(&out)?;
    let listed = list.as_array().expect("array");
    assert_eq!(listed.len(), 1, "{list}");
    assert_eq!(listed[0]["id"], backup_id);
    assert_eq!(listed[0]["mode"], "cold");
    assert_eq!(listed[0]["stopped"][0], "db");
    // The manifest is in the repository, encrypted.
    assert!(shared.join(format!("apps/{backup_id}")).exists());

    // Restore as a copy beside the original, into team t2 on cluster a.
    let id = backup_id.to_string();
    let (code, out, err) = ferryctl(
        &ctl,
        &[
            "backup",
            "restore",
            &id,
            "--to-cluster",
            "a",
            "--to-team",
            "t2",
            "-o",
            "json",
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let job = json(&out)?;
    assert_eq!(job["copy"], "a/t2/shop", "{job}");
    let copy_pid = pid_of(rd, "t2", "shop").expect("the copy runs");
    assert!(alive(copy_pid) && alive(after), "both run");
    let copy_dir = copy_volume(da, "t2", "shop")?;
    assert_eq!(
        std::fs::read_to_string(copy_dir.join("data.txt"))?,
        "rows before the backup\n"
    );
    assert_eq!(
        std::fs::read(copy_dir.join("sub/big.bin"))?,
        vec![7u8; 3 << 20]
    );
    // The backup holds the volume as it was while the app was stopped
    // (one start); the copy started on its own volume, the original's is
    // untouched.
    assert_eq!(
        std::fs::read_to_string(copy_dir.join("starts"))?,
        "start\nstart\n"
    );
    assert_eq!(
        std::fs::read_to_string(da.join("vol/starts"))?,
        "start\nstart\n"
    );
    wait_app(&ctl, "a", "t2", "shop").await?;

    // A local location's backup restores only in its cluster.
    let (code, out, err) = ferryctl(
        &ctl,
        &[
            "app",
            "backup",
            "shop",
            "--cluster",
            "a",
            "--team",
            "web",
            "--storage",
            "disk-a",
            "-o",
            "json",
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let local_backup = json(&out)?["backup_id"].as_u64().expect("id").to_string();
    let (code, _, err) = ferryctl(
        &ctl,
        &[
            "backup",
            "restore",
            &local_backup,
            "--to-cluster",
            "b",
            "--to-team",
            "web",
        ],
    )?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("local to cluster a") && err.contains("not in cluster b"),
        "{err}"
    );

    // Migrate to cluster b, team t3, through the shared location.
    let (code, out, err) = ferryctl(
        &ctl,
        &[
            "app",
            "migrate",
            "shop",
            "--cluster",
            "a",
            "--team",
            "web",
            "--storage",
            "nfs",
            "--to-cluster",
            "b",
            "--to-team",
            "t3",
            "-o",
            "json",
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let job = json(&out)?;
    assert_eq!(job["kind"], "migrate");
    assert_eq!(job["copy"], "b/t3/shop", "{job}");
    let on_b = pid_of(rd, "t3", "shop").expect("runs on b");
    assert!(alive(on_b));
    let moved = copy_volume(db, "t3", "shop")?;
    assert_eq!(
        std::fs::read_to_string(moved.join("data.txt"))?,
        "rows before the backup\n"
    );
    assert_eq!(files_under(&moved).len(), 3, "{:?}", files_under(&moved));
    // The source still runs (no --delete-source).
    assert!(pid_of(rd, "web", "shop").is_some_and(alive));

    // Delete the first backup: gone from the catalog and the repository.
    let (code, out, err) = ferryctl(&ctl, &["backup", "rm", &id])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(!shared.join(format!("apps/{id}")).exists());
    let (_, out, _) = ferryctl(&ctl, &["backup", "show", &id])?;
    assert!(out.is_empty());

    // Jobs are listed with their outcome.
    let (code, out, _) = ferryctl(&ctl, &["job", "ls", "-o", "json"])?;
    assert_eq!(code, 0);
    let jobs = json(&out)?;
    let states: Vec<&str> = jobs
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|j| j["state"].as_str())
        .collect();
    assert_eq!(
        states,
        [
            "failed",
            "succeeded",
            "succeeded",
            "succeeded",
            "succeeded",
            "succeeded"
        ],
        "{jobs}"
    );

    // A component that was stopped before the backup stays stopped.
    let (ok, _, err) = run(Command::new("sh").arg("-c").arg(format!(
        "kill $(cat {r}/web-shop.pid) && rm {r}/web-shop.pid",
        r = rd.display()
    )))?;
    anyhow::ensure!(ok, "{err}");
    let (code, out, err) = ferryctl(
        &ctl,
        &[
            "app",
            "backup",
            "shop",
            "--cluster",
            "a",
            "--team",
            "web",
            "--storage",
            "nfs",
            "-o",
            "json",
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let job = json(&out)?;
    assert_eq!(job["downtime_ms"], 0, "{job}");
    assert_eq!(pid_of(rd, "web", "shop"), None, "not started by Ferry");
    let id = job["backup_id"].as_u64().expect("id").to_string();
    let (_, out, _) = ferryctl(&ctl, &["backup", "show", &id, "-o", "json"])?;
    assert_eq!(json(&out)?["stopped"], serde_json::json!([]));

    // Stop every process the test started.
    for team in ["web", "t2", "t3"] {
        if let Some(p) = pid_of(rd, team, "shop") {
            let _ = Command::new("kill").arg(p.to_string()).status();
        }
    }
    agent_a.stop().await?;
    agent_b.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_agent_stays_offline_fails_at_the_deadline() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.serve_args(["--step-offline-secs", "2"]);
    ctl.start().await?;
    let a = enrol_in(&ctl, "a", "node-a").await?;
    let b = enrol_in(&ctl, "b", "node-b").await?;
    let (da, db) = (a.path(), b.path());
    std::fs::create_dir_all(da.join("vol"))?;
    std::fs::write(da.join("vol/data.txt"), "x")?;
    let rundir = ctl.dir.path().join("run");
    std::fs::write(da.join("agent.toml"), config(&ctl.url(), da, &rundir, true))?;
    std::fs::write(
        db.join("agent.toml"),
        config(&ctl.url(), db, &rundir, false),
    )?;
    let mut agent_a = AgentProcess::spawn(&da.join("agent.toml"), da.join("agent.log"))?;
    let mut agent_b = AgentProcess::spawn(&db.join("agent.toml"), db.join("agent.log"))?;
    wait_online(&ctl, 2).await?;
    wait_app(&ctl, "a", "web", "shop").await?;
    let shared = ctl.dir.path().join("shared").display().to_string();
    let (code, out, err) = ferryctl(
        &ctl,
        &["storage", "add", "nfs", "shared", "--path", &shared],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = ferryctl(
        &ctl,
        &[
            "app",
            "backup",
            "shop",
            "--cluster",
            "a",
            "--team",
            "web",
            "-o",
            "json",
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let id = json(&out)?["backup_id"].as_u64().expect("id").to_string();

    // Agent b goes away; a restore there waits for it, then fails.
    agent_b.stop().await?;
    wait_for("agent b offline", DEADLINE, || {
        let r = ferryctl(&ctl, &["agent", "ls", "-o", "json"]).ok();
        async move {
            let (_, out, _) = r?;
            (out.matches("\"online\": true").count() == 1).then_some(())
        }
    })
    .await?;
    let (code, out, err) = ferryctl(
        &ctl,
        &[
            "backup",
            "restore",
            &id,
            "--to-cluster",
            "b",
            "--to-team",
            "t2",
            "-o",
            "json",
        ],
    )?;
    assert_eq!(code, 1, "{out}{err}");
    let job = json(&out)?;
    assert_eq!(job["state"], "failed", "{job}");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("was offline for more than 2 s"), "{reason}");
    // Nothing was restored, so nothing is left behind.
    assert_eq!(job["leftovers"], serde_json::json!([]));
    assert!(!db.join("copies").exists());
    agent_a.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_run_around_a_hot_copy_and_before_a_cold_stop() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let a = enrol_in(&ctl, "a", "node-a").await?;
    let da = a.path();
    std::fs::create_dir_all(da.join("vol"))?;
    std::fs::write(da.join("vol/data.txt"), "data")?;
    let rundir = ctl.dir.path().join("run");
    let d = da.display();
    let r = rundir.display();
    let hooks = format!(
        "pre_backup = \"test ! -f {d}/fail-pre && touch {d}/vol/frozen && echo pre >> {d}/hooks.log\"\npost_backup = \"rm {d}/vol/frozen && echo post >> {d}/hooks.log\"\npre_stop = \"test ! -f {d}/fail-stop && kill -0 $(cat {r}/web-shop.pid) && echo pre_stop >> {d}/hooks.log\"\n"
    );
    let conf = config(&ctl.url(), da, &rundir, true)
        .replace("\nstatus = ", &format!("\n{hooks}status = "));
    std::fs::write(da.join("agent.toml"), conf)?;
    let mut agent = AgentProcess::spawn(&da.join("agent.toml"), da.join("agent.log"))?;
    wait_online(&ctl, 1).await?;
    wait_app(&ctl, "a", "web", "shop").await?;
    let (ok, _, err) = run(Command::new("sh").arg("-c").arg(format!(
        "mkdir -p {r} && (sleep 300 >/dev/null 2>&1 & echo $! > {r}/web-shop.pid)",
        r = rundir.display()
    )))?;
    anyhow::ensure!(ok, "{err}");
    let pid = pid_of(&rundir, "web", "shop").expect("pid");
    let shared = ctl.dir.path().join("shared").display().to_string();
    let (code, out, err) = ferryctl(
        &ctl,
        &["storage", "add", "nfs", "shared", "--path", &shared],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let backup_in = |ctl: &Controller, mode: &str| backup_shop(ctl, &["--mode", mode]);
    let backup = |ctl: &Controller| backup_in(ctl, "hot");

    let (code, out, err) = backup(&ctl)?;
    assert_eq!(code, 0, "{out}{err}");
    let job = json(&out)?;
    assert_eq!(job["downtime_ms"], 0, "{job}");
    // Nothing stopped; pre ran before the copy, post after it.
    assert_eq!(pid_of(&rundir, "web", "shop"), Some(pid));
    assert!(alive(pid));
    assert_eq!(
        std::fs::read_to_string(da.join("hooks.log"))?,
        "pre\npost\n"
    );
    assert!(!da.join("vol/frozen").exists());
    let id = job["backup_id"].as_u64().expect("id").to_string();
    let (_, out, _) = ferryctl(&ctl, &["backup", "show", &id, "-o", "json"])?;
    let shown = json(&out)?;
    assert_eq!(shown["mode"], "hot");
    assert_eq!(shown["stopped"], serde_json::json!([]));
    let (code, out, err) = ferryctl(
        &ctl,
        &[
            "backup",
            "restore",
            &id,
            "--to-cluster",
            "a",
            "--to-team",
            "t2",
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        copy_volume(da, "t2", "shop")?.join("frozen").exists(),
        "the copy was taken between the hooks"
    );

    // A failing pre_backup hook fails the backup; nothing more runs.
    std::fs::write(da.join("fail-pre"), "")?;
    let (code, out, err) = backup(&ctl)?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("pre_backup"), "{err}");
    assert_eq!(
        std::fs::read_to_string(da.join("hooks.log"))?,
        "pre\npost\n"
    );
    let (_, out, _) = ferryctl(&ctl, &["backup", "ls", "-o", "json"])?;
    assert_eq!(json(&out)?.as_array().map(Vec::len), Some(1));

    // Cold: pre_stop runs while the component still runs, then it stops
    // and starts again (a new process); the hot hooks do not run.
    std::fs::remove_file(da.join("fail-pre"))?;
    let (code, out, err) = backup_in(&ctl, "cold")?;
    assert_eq!(code, 0, "{out}{err}");
    let job = json(&out)?;
    assert!(job["downtime_ms"].as_u64() > Some(0), "{job}");
    let id = job["backup_id"].as_u64().expect("id").to_string();
    let (_, out, _) = ferryctl(&ctl, &["backup", "show", &id, "-o", "json"])?;
    assert_eq!(json(&out)?["stopped"], serde_json::json!(["db"]), "{out}");
    assert_eq!(
        std::fs::read_to_string(da.join("hooks.log"))?,
        "pre\npost\npre_stop\n"
    );
    let restarted = pid_of(&rundir, "web", "shop").expect("pid");
    assert_ne!(restarted, pid);
    assert!(alive(restarted));
    // A failing pre_stop hook fails the backup before anything stops.
    std::fs::write(da.join("fail-stop"), "")?;
    let (code, out, err) = backup_in(&ctl, "cold")?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("pre_stop"), "{err}");
    assert_eq!(pid_of(&rundir, "web", "shop"), Some(restarted));
    assert!(alive(restarted));
    let (_, out, _) = ferryctl(&ctl, &["backup", "ls", "-o", "json"])?;
    assert_eq!(json(&out)?.as_array().map(Vec::len), Some(2));

    for team in ["web", "t2"] {
        if let Some(p) = pid_of(&rundir, team, "shop") {
            let _ = Command::new("kill").arg(p.to_string()).status();
        }
    }
    agent.stop().await?;
    Ok(())
}

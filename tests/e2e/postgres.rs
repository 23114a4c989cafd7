//! A real PostgreSQL server, run by the host driver, in two clusters that
//! are network namespaces (`tests/src/lab.rs`): agents of clusters a and b
//! each live in their own namespace and reach the controller and SeaweedFS
//! only through forwards on the host's bridge address, which the tests can
//! cut. PostgreSQL listens on 127.0.0.1 of its namespace (a copy on the same
//! cluster must move to another port; on cluster b port 5432 is free) and on
//! a unix socket the test reads through the shared filesystem.
//!
//! Needs root: network namespaces, and PostgreSQL runs as the `postgres`
//! user (`runuser`), like a packaged server.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ferry_tests::lab::{Forward, Lab};
use ferry_tests::{AgentProcess, Controller, DEADLINE, run, setup, wait_for};

use crate::jobs::{Fault, alive, enrol_at, ferryctl, files_under, json, wait_app, wait_online};

const TEAM: &str = "fin";
const APP: &str = "ledger";

/// The newest PostgreSQL's binaries.
fn pg_bin() -> anyhow::Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (/usr/lib/postgresql): apt-get install postgresql")?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
        .context("no pg_ctl under /usr/lib/postgresql/*/bin")
}

fn sh(line: &str) -> anyhow::Result<String> {
    let (ok, out, err) = run(Command::new("sh").arg("-c").arg(line))?;
    ensure!(ok, "{line}: {err}");
    Ok(out)
}

/// PostgreSQL servers the test started (directly or through Ferry), stopped
/// at the end whatever happened.
#[derive(Default)]
struct Servers {
    bin: PathBuf,
    dirs: Mutex<Vec<PathBuf>>,
}

impl Servers {
    fn watch(&self, data: &Path) {
        if let Ok(mut d) = self.dirs.lock() {
            d.push(data.to_path_buf());
        }
    }

    /// The postmaster's pid of the server on `data`, if one runs.
    fn postmaster(data: &Path) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()?;
        alive(pid).then_some(pid)
    }
}

/// Where the agent with data directory `data` keeps the copies of
/// `team_app` (`TEAM/APP`): one directory per restoring job in it.
fn copies(data: &Path, team_app: &str) -> PathBuf {
    let mut name = data.file_name().unwrap_or_default().to_os_string();
    name.push("-copies");
    data.with_file_name(name).join(team_app)
}

impl Drop for Servers {
    fn drop(&mut self) {
        let watched = self.dirs.lock().map(|d| d.clone()).unwrap_or_default();
        // A data directory, or a copies directory whose jobs' `v0` are.
        let mut dirs = Vec::new();
        for d in watched {
            if d.join("PG_VERSION").exists() {
                dirs.push(d);
            } else {
                dirs.extend(
                    std::fs::read_dir(&d)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| e.path().join("v0")),
                );
            }
        }
        for d in dirs {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&d)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}

/// A SQL client on the server whose socket is in `sock`.
#[derive(Clone)]
struct Db {
    psql: PathBuf,
    sock: PathBuf,
    port: u16,
}

impl Db {
    fn query(&self, sql: &str) -> anyhow::Result<String> {
        let (ok, out, err) = run(Command::new(&self.psql)
            .arg("-h")
            .arg(&self.sock)
            .args(["-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-XAtq"])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql]))?;
        ensure!(ok, "{sql}: {err}");
        Ok(out.trim().to_owned())
    }

    /// A checksum over every row of `table`.
    fn checksum(&self, table: &str) -> anyhow::Result<String> {
        self.query(&format!(
            "select count(*) || '/' || md5(coalesce(string_agg(t::text, ',' order by t::text), '')) from {table} t"
        ))
    }

    /// The ids in table `t`.
    fn ids(&self) -> anyhow::Result<Vec<u64>> {
        Ok(self
            .query("select id from t order by id")?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }
}

/// Inserts rows 1, 2, 3 … into `t` one transaction at a time, until
/// stopped, recording which committed and when each attempt failed.
struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Written>,
}

#[derive(Debug, Default)]
struct Written {
    /// (id, when it committed)
    committed: Vec<(u64, Instant)>,
    /// When an insert failed (the server was down).
    failed: Vec<Instant>,
}

impl Writer {
    fn start(db: Db) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut w = Written::default();
            let mut id = 1u64;
            while !s.load(Ordering::SeqCst) {
                match db.query(&format!("insert into t values ({id})")) {
                    Ok(_) => {
                        w.committed.push((id, Instant::now()));
                        id += 1;
                    }
                    Err(_) => {
                        w.failed.push(Instant::now());
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
            w
        });
        Self { stop, task }
    }

    async fn finish(self) -> anyhow::Result<Written> {
        self.stop.store(true, Ordering::SeqCst);
        Ok(self.task.await?)
    }
}

/// The controller, SeaweedFS, agents of clusters a and b in their own
/// namespaces, and PostgreSQL as app fin/ledger on cluster a.
struct Site {
    agent_a: AgentProcess,
    agent_b: AgentProcess,
    servers: Servers,
    ctl: Controller,
    s3: Forward,
    _ctl_fwd: Forward,
    /// The host's directory the test's files live in (like `/srv`).
    root: tempfile::TempDir,
    /// The agents' data directories, as `join` made them.
    a: PathBuf,
    b: PathBuf,
    /// Socket directories, one per team and app.
    sock: PathBuf,
    bucket: String,
    lab: Lab,
}

impl Site {
    /// `stop_extra` is appended to the stop command (e.g. work the app does
    /// as it shuts down).
    async fn new(stop_extra: &str, serve_args: &[&str]) -> anyhow::Result<Self> {
        setup();
        ensure!(
            std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0),
            "this test needs root (network namespaces, PostgreSQL as user postgres)"
        );
        let bin = pg_bin()?;
        let lab = Lab::new(&["a", "b"])?;
        let host = lab.host_ip();
        let mut ctl = Controller::init_with(None, &[&host.to_string()])?;
        ctl.serve_args(serve_args.iter().copied());
        let addr = ctl.start().await?;
        let ctl_fwd = Forward::start(host, addr).await?;
        let weed = ferry_store::testing::seaweed().await;
        let s3 = crate::jobs::seaweed_forward(host).await?;

        // The host's directory for the app's files (like /srv): PostgreSQL,
        // running as postgres, passes through it to its data and socket
        // directories. Ferry's own directories keep the modes Ferry gives
        // them: the agents' data directories (0700, made by join) hold
        // them, and the copies go beside them.
        let root = tempfile::tempdir()?;
        sh(&format!("chmod 711 {}", root.path().display()))?;
        let (a, b) = (root.path().join("agent-a"), root.path().join("agent-b"));
        enrol_at(&ctl, "a", "node-a", &a).await?;
        enrol_at(&ctl, "b", "node-b", &b).await?;
        let sock = root.path().join("s");
        std::fs::create_dir_all(&sock)?;
        std::fs::create_dir_all(root.path().join("gate"))?;
        let vol = root.path().join("pg");
        std::fs::create_dir_all(&vol)?;
        sh(&format!(
            "chown postgres:postgres {v} && chmod 700 {v} && runuser -u postgres -- {b}/initdb -D {v} -U postgres --auth=trust --locale=C -E UTF8 >/dev/null",
            v = vol.display(),
            b = bin.display()
        ))?;
        let url = format!("https://{}", ctl_fwd.addr);
        let stop_extra = stop_extra.replace("{vol}", &vol.display().to_string());
        let app = app_config(&bin, &vol, &sock, &stop_extra);
        // The fault tests strike during the delta pass: with a 1 MiB delta
        // buffer the 128 MiB their stop command writes is read and chunked
        // while PostgreSQL is down, instead of copied in a moment.
        let mut config_a = agent_config(&url, &a, &app);
        if !stop_extra.is_empty() {
            config_a = config_a.replace(
                "storage_retry_secs",
                "delta_buffer_mib = 1\nstorage_retry_secs",
            );
        }
        std::fs::write(a.join("agent.toml"), config_a)?;
        std::fs::write(b.join("agent.toml"), agent_config(&url, &b, ""))?;
        let agent_a = AgentProcess::spawn_in(
            Some(&lab.namespace("a")),
            &a.join("agent.toml"),
            a.join("agent.log"),
        )?;
        let agent_b = AgentProcess::spawn_in(
            Some(&lab.namespace("b")),
            &b.join("agent.toml"),
            b.join("agent.log"),
        )?;
        let mut site = Self {
            agent_a,
            agent_b,
            servers: Servers {
                bin,
                dirs: Mutex::default(),
            },
            ctl,
            s3,
            _ctl_fwd: ctl_fwd,
            root,
            a,
            b,
            sock,
            bucket: String::new(),
            lab,
        };
        // A site that never comes up says why: what each daemon logged.
        if let Err(e) = wait_online(&site.ctl, 2).await {
            let listed = ferryctl(&site.ctl, &["agent", "ls", "-o", "json"])
                .map(|(_, out, err)| format!("{out}{err}"))
                .unwrap_or_else(|e| e.to_string());
            bail!(
                "{e}\nagent ls: {listed}\n--- agent a ---\n{}\n--- agent b ---\n{}\n--- controller ---\n{}",
                site.agent_a.logs(),
                site.agent_b.logs(),
                site.ctl.logs()
            );
        }
        wait_app(&site.ctl, "a", TEAM, APP).await?;

        // The S3 location: agents reach SeaweedFS through the forward.
        let bucket = weed.new_bucket().await;
        site.bucket = bucket.clone();
        let endpoint = format!("http://{}", site.s3.addr);
        crate::jobs::add_s3_storage(&site.ctl, "objects", &endpoint, &bucket)?;

        // PostgreSQL runs before the backup, started as Ferry would.
        let start = app_start(&site.servers.bin, &vol, &site.sock);
        sh(&format!(
            "FERRY_TEAM={TEAM} FERRY_APP={APP} ip netns exec {} sh -c '{}'",
            site.lab.namespace("a"),
            start.replace("{port:pg=5432}", "5432")
        ))?;
        site.servers.watch(&vol);
        let db = site.db(TEAM, APP)?;
        db.query(
            "create table known(id int primary key, v text);
             insert into known select g, md5(g::text) from generate_series(1, 2000) g;
             create table t(id bigint);
             create table bulk as select g, repeat(md5(g::text), 30) as v from generate_series(1, 40000) g;",
        )?;
        Ok(site)
    }

    fn vol(&self) -> PathBuf {
        self.root.path().join("pg")
    }

    /// A client of the server of `team/app` (its port read from the socket
    /// it listens on).
    fn db(&self, team: &str, app: &str) -> anyhow::Result<Db> {
        let sock = self.sock.join(format!("{team}-{app}"));
        let port = std::fs::read_dir(&sock)
            .with_context(|| format!("no socket directory for {team}/{app}"))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix(".s.PGSQL.")?.parse::<u16>().ok()
            })
            .next()
            .with_context(|| format!("{team}/{app} listens on no socket"))?;
        Ok(Db {
            psql: self.servers.bin.join("psql"),
            sock,
            port,
        })
    }

    /// Waits until `team/app` answers queries.
    async fn ready(&self, team: &str, app: &str) -> anyhow::Result<Db> {
        wait_for("PostgreSQL to answer", DEADLINE, || {
            let db = self
                .db(team, app)
                .ok()
                .filter(|db| db.query("select 1").is_ok());
            async move { db }
        })
        .await
    }

    fn backup(&self, extra: &[&str]) -> anyhow::Result<(i32, serde_json::Value, String)> {
        let mut args = vec![
            "app",
            "backup",
            APP,
            "--cluster",
            "a",
            "--team",
            TEAM,
            "--storage",
            "objects",
            "-o",
            "json",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = ferryctl(&self.ctl, &args)?;
        let v = json(&out).unwrap_or(serde_json::Value::Null);
        Ok((code, v, format!("{out}{err}")))
    }

    fn backups(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let (code, out, err) = ferryctl(&self.ctl, &["backup", "ls", "-o", "json"])?;
        ensure!(code == 0, "{err}");
        Ok(json(&out)?.as_array().cloned().unwrap_or_default())
    }

    /// PostgreSQL's log of `team`'s copy, for failure messages.
    fn pg_log(&self, team: &str) -> String {
        let log = self.sock.join(format!("{team}-{APP}/log"));
        format!(
            "\n--- {}:\n{}",
            log.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    }

    fn journal_entries(&self) -> usize {
        std::fs::read_dir(self.a.join("journal"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .count()
            })
            .unwrap_or(0)
    }
}

/// A shell line that, while the file `GATE/hold-PHASE` exists, says it got
/// there (`GATE/in-PHASE`) and waits (60 s at most) until the test lets it
/// go on (`GATE/go-PHASE`): a fault strikes while Ferry is in that phase.
/// `GATE` is the directory beside the sockets' (`ROOT/gate`).
fn hold(sock: &Path, phase: &str) -> String {
    let g = sock.with_file_name("gate");
    let g = g.display();
    format!(
        "if [ -e {g}/hold-{phase} ]; then rm -f {g}/hold-{phase}; touch {g}/in-{phase}; i=0; until [ -e {g}/go-{phase} ] || [ $i -ge 1200 ]; do sleep 0.05; i=$((i+1)); done; rm -f {g}/go-{phase} {g}/in-{phase}; fi"
    )
}

fn app_start(bin: &Path, vol: &Path, sock: &Path) -> String {
    format!(
        r#"{hold}; S={s}/$FERRY_TEAM-$FERRY_APP; mkdir -p $S && chown postgres $S && runuser -u postgres -- {b}/pg_ctl -D {v} -l $S/log -w -t 60 -o "-p {{port:pg=5432}} -k $S -c listen_addresses=127.0.0.1" start >/dev/null"#,
        hold = hold(sock, "starting"),
        s = sock.display(),
        b = bin.display(),
        v = vol.display()
    )
}

fn app_config(bin: &Path, vol: &Path, sock: &Path, stop_extra: &str) -> String {
    let (b, v) = (bin.display(), vol.display());
    format!(
        r#"
[[apps]]
name = "{APP}"
team = "{TEAM}"

[[apps.components]]
name = "db"
stateful = true
volumes = ["{v}"]
start = '{start}'
stop = 'runuser -u postgres -- {b}/pg_ctl -D {v} -m fast -w -t 60 stop >/dev/null && {{ {hold}; }}{stop_extra}'
status = 'runuser -u postgres -- {b}/pg_ctl -D {v} status >/dev/null'
"#,
        start = app_start(bin, vol, sock),
        hold = hold(sock, "stopping"),
    )
}

fn agent_config(controller: &str, d: &Path, apps: &str) -> String {
    format!(
        r#"controller = "{controller}"
data_dir = "{d}"
heartbeat_secs = 1
reconnect_min_ms = 50
reconnect_max_ms = 500
journal_retry_secs = 2
command_timeout_secs = 30
storage_retry_secs = 3
{apps}"#,
        d = d.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cold_backup_migrate_and_copy_across_namespaces() -> anyhow::Result<()> {
    let mut site = Site::new("", &[]).await?;
    let db = site.db(TEAM, APP)?;
    assert_eq!(db.port, 5432);
    let known = db.checksum("known")?;
    let vol = site.vol();

    // refuse mode with PostgreSQL running: refused, nothing stopped.
    let pm = Servers::postmaster(&vol).context("postgres runs")?;
    let (code, job, out) = site.backup(&["--mode", "refuse"])?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(job["state"], "failed", "{job}");
    assert!(out.contains("nothing was stopped"), "{out}");
    assert_eq!(Servers::postmaster(&vol), Some(pm));
    assert!(site.backups()?.is_empty());

    // Cold backup while rows are being written.
    let writer = Writer::start(db.clone());
    wait_for("rows before the backup", DEADLINE, || {
        let n = db.query("select count(*) from t").ok();
        async move { n.filter(|n| n.parse::<u32>().unwrap_or(0) >= 5) }
    })
    .await?;
    let started = Instant::now();
    let (code, job, out) = site.backup(&[])?;
    let ended = Instant::now();
    assert_eq!(code, 0, "{out}");
    assert_eq!(job["state"], "succeeded", "{job}");
    let downtime = job["downtime_ms"].as_u64().unwrap_or(0);
    assert!(downtime > 0, "{job}");
    // Ferry stopped and started PostgreSQL: a new postmaster.
    let pm2 = Servers::postmaster(&vol).context("postgres runs again")?;
    assert_ne!(pm2, pm);
    assert!(!alive(pm));
    assert_eq!(site.journal_entries(), 0);
    // A few rows after the restart, then stop writing.
    let resumed = db.ids()?.len();
    wait_for("rows after the backup", DEADLINE, || {
        let n = db.ids().map(|v| v.len()).unwrap_or(0);
        async move { (n >= resumed + 3).then_some(()) }
    })
    .await?;
    let written = writer.finish().await?;
    let first_failure = written
        .failed
        .iter()
        .copied()
        .find(|f| *f >= started)
        .context("the writer never saw the server down: was it stopped?")?;
    assert!(first_failure < ended);
    let before_stop: Vec<u64> = written
        .committed
        .iter()
        .filter(|(_, at)| *at < first_failure)
        .map(|(id, _)| *id)
        .collect();
    let during_pre_copy = written
        .committed
        .iter()
        .filter(|(_, at)| *at >= started && *at < first_failure)
        .count();
    assert!(
        during_pre_copy > 0,
        "no row committed while the backup pre-copied"
    );
    let backup = job["backup_id"].as_u64().context("backup id")?.to_string();
    let listed = site.backups()?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["stopped"][0], "db");
    // The timings and volumes of both passes are recorded.
    for field in ["pre_copy_ms", "bytes_new", "delta_bytes_read"] {
        assert!(
            listed[0][field].as_u64().unwrap_or(0) > 0,
            "{field}: {}",
            listed[0]
        );
    }
    assert!(listed[0]["delta_ms"].as_u64().unwrap_or(u64::MAX) <= downtime);

    // Stopped at the end whatever happens, like every server of the test.
    site.servers.watch(&copies(&site.a, "qa/ledger"));
    site.servers.watch(&copies(&site.b, "t2/ledger"));
    // The backup restored as a copy on cluster a beside the original:
    // port 5432 is taken in a's namespace, so the copy moves.
    let (code, out, err) = ferryctl(
        &site.ctl,
        &[
            "backup",
            "restore",
            &backup,
            "--to-cluster",
            "a",
            "--to-team",
            "qa",
            "-o",
            "json",
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}{}", site.pg_log("qa"));
    assert_eq!(json(&out)?["copy"], "a/qa/ledger");
    let copy = site.ready("qa", APP).await?;
    assert_ne!(copy.port, 5432);
    assert_eq!(copy.checksum("known")?, known);
    // Every row committed before PostgreSQL stopped is in the backup (those
    // written during the pre-copy too), none written after it restarted.
    let in_copy = copy.ids()?;
    for id in &before_stop {
        assert!(
            in_copy.contains(id),
            "row {id} committed before the stop is missing"
        );
    }
    let restarted_at = written
        .committed
        .iter()
        .find(|(_, at)| *at > first_failure)
        .map(|(id, _)| *id)
        .context("rows after the restart")?;
    assert!(in_copy.iter().all(|id| *id < restarted_at), "{in_copy:?}");
    // Both run, each on its own data.
    assert!(Servers::postmaster(&vol).is_some());
    copy.query("insert into t values (999999)")?;
    assert!(!db.ids()?.contains(&999_999));

    // Migrate to cluster b, team t2: port 5432 is free in b's namespace.
    let source = db.checksum("t")?;
    let (code, out, err) = ferryctl(
        &site.ctl,
        &[
            "app",
            "migrate",
            APP,
            "--cluster",
            "a",
            "--team",
            TEAM,
            "--storage",
            "objects",
            "--to-cluster",
            "b",
            "--to-team",
            "t2",
            "-o",
            "json",
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let job = json(&out)?;
    assert_eq!(job["copy"], "b/t2/ledger", "{job}");
    let moved = site.ready("t2", APP).await?;
    assert_eq!(moved.port, 5432);
    assert_eq!(moved.checksum("known")?, known);
    assert_eq!(moved.checksum("t")?, source);
    // The source still runs.
    assert!(Servers::postmaster(&vol).is_some());
    assert_eq!(db.checksum("t")?, source);

    site.agent_a.stop().await?;
    site.agent_b.stop().await?;
    Ok(())
}

/// Appended to the stop command of the fault tests: PostgreSQL's volume
/// gets 128 MiB of new data as it stops, so the delta pass has something to
/// read and upload while the tests strike.
const NEW_DATA_ON_STOP: &str =
    " && dd if=/dev/urandom of={vol}/ferry-test-new.bin bs=1M count=128 status=none";

impl Site {
    /// Starts a cold backup and returns its job id once the agent has
    /// stopped PostgreSQL and begun the delta pass.
    async fn backup_until_delta(&self) -> anyhow::Result<String> {
        let (code, job, out) = self.backup(&["--detach"])?;
        ensure!(code == 0, "{out}");
        let id = job["id"].as_u64().context("job id")?.to_string();
        let agent = &self.agent_a;
        wait_for("the delta pass", DEADLINE, || {
            let seen = agent.logs().contains("delta pass started");
            async move { seen.then_some(()) }
        })
        .await?;
        Ok(id)
    }

    /// Follows job `id` to its end (five minutes at most).
    async fn job_end(&self, id: &str) -> anyhow::Result<serde_json::Value> {
        crate::jobs::job_ended(&self.ctl, id, Duration::from_secs(300)).await
    }

    /// What the bucket holds under `prefix`.
    async fn objects(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let weed = ferry_store::testing::seaweed().await;
        let store = ferry_store::open(&ferry_store::StorageConfig::S3(Box::new(
            weed.config(&self.bucket, ""),
        )))
        .await?;
        Ok(store
            .list(prefix)
            .await?
            .into_iter()
            .map(|o| o.key.to_string())
            .collect())
    }

    fn respawn_agent_a(&mut self, log: &str) -> anyhow::Result<()> {
        self.agent_a = AgentProcess::spawn_in(
            Some(&self.lab.namespace("a")),
            &self.a.join("agent.toml"),
            self.a.join(log),
        )?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_in_the_delta_pass_restarts_postgres_and_the_step_runs_again()
-> anyhow::Result<()> {
    let mut site = Site::new(NEW_DATA_ON_STOP, &[]).await?;
    let vol = site.vol();
    let known = site.db(TEAM, APP)?.checksum("known")?;
    let pm = Servers::postmaster(&vol).context("postgres runs")?;
    let id = site.backup_until_delta().await?;
    site.agent_a.kill();
    // Stopped by Ferry, and the agent is gone: the journal holds it.
    assert_eq!(Servers::postmaster(&vol), None);
    assert_eq!(site.journal_entries(), 1);
    let (_, out, _) = ferryctl(&site.ctl, &["job", "show", &id, "-o", "json"])?;
    assert_eq!(json(&out)?["state"], "running", "{out}");
    assert!(site.backups()?.is_empty());

    // The agent starts again: its journal starts PostgreSQL again.
    site.respawn_agent_a("agent-2.log")?;
    let db = site.ready(TEAM, APP).await?;
    let after_crash = Servers::postmaster(&vol).context("postgres runs again")?;
    assert_ne!(after_crash, pm);
    assert!(
        site.agent_a.logs().contains("journal"),
        "{}",
        site.agent_a.logs()
    );

    // The step was lost with its agent; it ran again once the agent was
    // back, as a whole new attempt, and only that attempt's backup exists.
    let job = site.job_end(&id).await?;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["steps"][0]["attempts"], 2, "{job}");
    let listed = site.backups()?;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(Servers::postmaster(&vol).is_some());
    assert_eq!(site.journal_entries(), 0);
    assert_eq!(db.checksum("known")?, known);
    let backup = listed[0]["id"].as_u64().context("id")?.to_string();
    site.servers.watch(&copies(&site.b, "t2/ledger"));
    let (code, out, err) = ferryctl(
        &site.ctl,
        &[
            "backup",
            "restore",
            &backup,
            "--to-cluster",
            "b",
            "--to-team",
            "t2",
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(site.ready("t2", APP).await?.checksum("known")?, known);
    site.agent_a.stop().await?;
    site.agent_b.stop().await?;
    Ok(())
}

/// The agent is stopped (SIGTERM, as systemd stops it) while PostgreSQL is
/// down for the delta pass: it starts PostgreSQL again before it exits and
/// leaves no journal entry. Its step does not answer (a shutdown is no
/// cancel) and runs again as attempt 2 once the agent is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stopped_in_the_delta_pass_starts_postgres_before_it_exits() -> anyhow::Result<()>
{
    let mut site = Site::new(NEW_DATA_ON_STOP, &[]).await?;
    let vol = site.vol();
    let pm = Servers::postmaster(&vol).context("postgres runs")?;
    let id = site.backup_until_delta().await?;
    site.agent_a.stop().await?;
    let after = Servers::postmaster(&vol).context("postgres runs once the agent has exited")?;
    assert_ne!(after, pm, "stopped for the delta pass, then started again");
    assert_eq!(site.journal_entries(), 0);
    let (_, out, _) = ferryctl(&site.ctl, &["job", "show", &id, "-o", "json"])?;
    assert_eq!(json(&out)?["state"], "running", "{out}");
    site.respawn_agent_a("agent-2.log")?;
    let job = site.job_end(&id).await?;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["steps"][0]["attempts"], 2, "{job}");
    assert_eq!(site.backups()?.len(), 1);
    site.ready(TEAM, APP).await?;
    assert_eq!(site.journal_entries(), 0);
    site.agent_a.stop().await?;
    site.agent_b.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_backup_reconciles_the_job_at_start() -> anyhow::Result<()> {
    let mut site = Site::new(NEW_DATA_ON_STOP, &[]).await?;
    let vol = site.vol();
    let pm = Servers::postmaster(&vol).context("postgres runs")?;
    let id = site.backup_until_delta().await?;
    site.ctl.kill();
    // The agent finishes the step on its own: PostgreSQL runs again.
    wait_for("postgres to run again", DEADLINE, || {
        let up = Servers::postmaster(&vol).filter(|p| *p != pm);
        async move { up }
    })
    .await?;
    site.ctl.start().await?;
    // Reconciled: the step is dispatched again, and the agent answers
    // with the backup the first attempt committed (no second stop).
    let job = site.job_end(&id).await?;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["steps"][0]["attempts"], 2, "{job}");
    let listed = site.backups()?;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(
        listed[0]["downtime_ms"].as_u64().unwrap_or(0) > 0,
        "{listed:?}"
    );
    let starts = site.agent_a.logs().matches("backup committed").count();
    assert_eq!(starts, 1, "one backup was taken, not two");
    assert!(site.agent_a.logs().contains("backup already committed"));
    assert!(Servers::postmaster(&vol).is_some());
    assert_eq!(site.journal_entries(), 0);
    site.agent_a.stop().await?;
    site.agent_b.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_lost_mid_upload_fails_the_backup_commits_nothing_and_restarts_postgres_and_a_restore_leaves_nothing()
-> anyhow::Result<()> {
    let mut site = Site::new(NEW_DATA_ON_STOP, &[]).await?;
    let vol = site.vol();
    let id = site.backup_until_delta().await?;
    site.s3.cut();
    let job = site.job_end(&id).await?;
    assert_eq!(job["state"], "failed", "{job}");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("storage") || reason.contains("repository"),
        "{reason}"
    );
    site.s3.restore();
    assert!(site.backups()?.is_empty());
    assert_eq!(site.objects("apps/").await?, Vec::<String>::new());
    let db = site.ready(TEAM, APP).await?;
    assert!(Servers::postmaster(&vol).is_some());
    assert_eq!(db.query("select count(*) from known")?, "2000");
    assert_eq!(site.journal_entries(), 0);

    // A restore that loses the storage mid-way fails and leaves nothing:
    // no copy registered, and none of the volumes it had begun to write.
    let (code, job, out) = site.backup(&[])?;
    assert_eq!(code, 0, "{out}");
    let backup = job["backup_id"].as_u64().context("backup id")?.to_string();
    let (code, out, err) = ferryctl(
        &site.ctl,
        &[
            "backup",
            "restore",
            &backup,
            "--to-cluster",
            "b",
            "--to-team",
            "qa",
            "--detach",
            "-o",
            "json",
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let id = json(&out)?["id"].as_u64().context("job id")?.to_string();
    let home = copies(&site.b, "qa/ledger");
    wait_for("the restore writing its volume", DEADLINE, || {
        let begun = !files_under(&home).is_empty();
        async move { begun.then_some(()) }
    })
    .await?;
    site.s3.stall_after(0);
    site.s3.cut();
    let job = site.job_end(&id).await?;
    site.s3.restore();
    site.s3.release();
    assert_eq!(job["state"], "failed", "{job}");
    let (_, out, _) = ferryctl(&site.ctl, &["app", "ls", "--cluster", "b", "-o", "json"])?;
    assert!(!out.contains("\"qa\""), "{out}");
    let left = files_under(&home);
    assert!(left.is_empty(), "{left:?}");
    site.agent_a.stop().await?;
    site.agent_b.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_cancelled_mid_transfer_restarts_postgres_and_lists_nothing() -> anyhow::Result<()>
{
    let mut site = Site::new(NEW_DATA_ON_STOP, &[]).await?;
    let vol = site.vol();
    let id = site.backup_until_delta().await?;
    let (code, out, err) = ferryctl(&site.ctl, &["job", "cancel", &id])?;
    assert_eq!(code, 0, "{out}{err}");
    let job = site.job_end(&id).await?;
    assert_eq!(job["state"], "cancelled", "{job}");
    assert!(site.backups()?.is_empty());
    assert_eq!(site.objects("apps/").await?, Vec::<String>::new());
    site.ready(TEAM, APP).await?;
    assert!(Servers::postmaster(&vol).is_some());
    assert_eq!(site.journal_entries(), 0);
    site.agent_a.stop().await?;
    site.agent_b.stop().await?;
    Ok(())
}

/// A cancel was requested, then the controller was killed before the step
/// answered: at its restart the step is settled (dispatched again with a
/// cancel) instead of waiting for ever for an answer no task can carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_pending_when_the_controller_restarts_still_ends_the_job() -> anyhow::Result<()> {
    let mut site = Site::new(NEW_DATA_ON_STOP, &[]).await?;
    let vol = site.vol();
    let id = site.backup_until_delta().await?;
    let (code, out, err) = ferryctl(&site.ctl, &["job", "cancel", &id])?;
    assert_eq!(code, 0, "{out}{err}");
    site.ctl.kill();
    site.ctl.start().await?;
    // Polled with a deadline: before the settle, the job never ended.
    let job = crate::jobs::job_ended(&site.ctl, &id, DEADLINE).await?;
    assert_eq!(job["state"], "cancelled", "{job}");
    site.ready(TEAM, APP).await?;
    assert!(Servers::postmaster(&vol).is_some());
    assert_eq!(site.journal_entries(), 0);
    site.agent_a.stop().await?;
    site.agent_b.stop().await?;
    Ok(())
}

impl Site {
    /// One row of the fault matrix: every fault struck in `phase`, each
    /// backup succeeding but a cancelled one (which ends in one of
    /// `cancelled`); then the agents stop.
    async fn fault_row(mut self, phase: &str, cancelled: &[&str]) -> anyhow::Result<()> {
        let ok = &["succeeded"][..];
        self.fault_cell(phase, Fault::AgentKill, ok, "agent-2.log")
            .await?;
        self.fault_cell(phase, Fault::AgentTerm, ok, "agent-3.log")
            .await?;
        self.fault_cell(phase, Fault::ControllerKill, ok, "")
            .await?;
        self.fault_cell(phase, Fault::Cancel, cancelled, "").await?;
        self.agent_a.stop().await?;
        self.agent_b.stop().await?;
        Ok(())
    }

    /// One cell of the fault matrix: a cold backup held in `phase`, `fault`
    /// struck there, then everything let go and brought back. The phases:
    /// - `pre-copy`: the first pass is uploading while PostgreSQL runs
    ///   (the storage's forward stalls after 1 MiB);
    /// - `stopping`: PostgreSQL is down and its stop command has not
    ///   returned (a gate in the command);
    /// - `starting`: its start command has begun (a gate);
    /// - `uploading`: PostgreSQL runs again and its journal entry is
    ///   cleared while the delta pass's data waits to be stored (the
    ///   forward stalled from the stop on).
    ///
    /// Whatever happened: PostgreSQL ends running with its rows, the
    /// journal ends empty, the job ends in one of `outcomes`, a backup
    /// exists exactly when the job succeeded, and it passes a full read of
    /// its data.
    async fn fault_cell(
        &mut self,
        phase: &str,
        fault: Fault,
        outcomes: &[&str],
        log: &str,
    ) -> anyhow::Result<()> {
        let cell = format!("{fault:?} while {phase}");
        let known = self.db(TEAM, APP)?.checksum("known")?;
        let before = self.backups()?.len();
        let gate = self.root.path().join("gate");
        let gated = matches!(phase, "stopping" | "starting");
        let gate_phase = if phase == "uploading" {
            "stopping"
        } else {
            phase
        };
        let seen = |what: &str| self.agent_a.logs().matches(what).count();
        let (pre_copies, runs_again) = (seen("pre-copy started"), seen("the app runs again"));
        match phase {
            "pre-copy" => {
                // Data the repository does not hold yet, so the pre-copy
                // has packs to upload (about 6 MiB of hex digits).
                self.db(TEAM, APP)?.query(
                    "create table if not exists filler (x text); \
                     insert into filler select md5(random()::text) from generate_series(1, 200000)",
                )?;
                self.s3.stall_after(1 << 20);
            }
            _ => std::fs::write(gate.join(format!("hold-{gate_phase}")), "")?,
        }
        let (code, job, out) = self.backup(&["--detach"])?;
        ensure!(code == 0, "{cell}: {out}");
        let id = job["id"].as_u64().context("job id")?.to_string();
        let inside = gate.join(format!("in-{gate_phase}"));
        if phase != "pre-copy" {
            wait_for(&format!("{cell}: the {gate_phase} gate"), DEADLINE, || {
                let there = inside.exists();
                async move { there.then_some(()) }
            })
            .await?;
        }
        if phase == "uploading" {
            // Nothing reaches the storage from the stop on; the delta pass
            // reads into memory, PostgreSQL starts again, and the uploads
            // wait.
            self.s3.stall_after(0);
            std::fs::write(gate.join("go-stopping"), "")?;
        }
        if !gated {
            let vol = self.vol();
            let state = || {
                (
                    self.s3.held() > 0,
                    Servers::postmaster(&vol).is_some(),
                    self.journal_entries() == 0,
                    seen("pre-copy started") > pre_copies,
                    phase == "pre-copy" || seen("the app runs again") > runs_again,
                )
            };
            let there = wait_for(&format!("{cell}: the {phase} phase"), DEADLINE, || {
                let s = state();
                async move { (s.0 && s.1 && s.2 && s.3 && s.4).then_some(()) }
            })
            .await;
            if let Err(e) = there {
                bail!(
                    "{e}: (held, postmaster, journal empty, pre-copy begun, app runs again) = {:?}\n{}",
                    state(),
                    self.agent_a.logs()
                );
            }
        }
        let go = || {
            if gated {
                std::fs::write(gate.join(format!("go-{phase}")), "")
            } else {
                self.s3.release();
                Ok(())
            }
        };
        match fault {
            Fault::AgentKill => {
                self.agent_a.kill();
                go()?;
                if gated {
                    // The command Ferry ran goes on without it (a start
                    // ends with PostgreSQL answering); once it is done, the
                    // agent starts again.
                    wait_for(&format!("{cell}: the held command"), DEADLINE, || {
                        let done = !inside.exists();
                        async move { done.then_some(()) }
                    })
                    .await?;
                }
                if phase == "starting" {
                    self.ready(TEAM, APP).await?;
                }
                self.respawn_agent_a(log)?;
            }
            Fault::AgentTerm => {
                self.agent_a.terminate()?;
                go()?;
                self.agent_a.stop().await?;
                self.respawn_agent_a(log)?;
            }
            Fault::ControllerKill => {
                self.ctl.kill();
                go()?;
                self.ctl.start().await?;
            }
            Fault::EngineRestart => bail!("{cell}: the host driver has no engine"),
            Fault::Cancel => {
                let (code, out, err) = ferryctl(&self.ctl, &["job", "cancel", &id])?;
                ensure!(code == 0, "{cell}: {out}{err}");
                // A cancel does not wait for storage that has stopped
                // answering: the job ends while the stall still holds.
                let ended = if gated {
                    Ok(serde_json::Value::Null)
                } else {
                    crate::jobs::job_ended(&self.ctl, &id, DEADLINE).await
                };
                go()?;
                ended.with_context(|| format!("{cell}: {}", self.agent_a.logs()))?;
            }
        }
        let job = self.job_end(&id).await?;
        let state = job["state"].as_str().unwrap_or_default().to_owned();
        ensure!(
            outcomes.contains(&state.as_str()),
            "{cell}: the job ended {state}, not one of {outcomes:?}: {job}\n{}",
            self.agent_a.logs()
        );
        let db = self.ready(TEAM, APP).await?;
        assert_eq!(db.checksum("known")?, known, "{cell}");
        let journal = wait_for(&format!("{cell}: the journal emptied"), DEADLINE, || {
            let left = self.journal_entries();
            async move { (left == 0).then_some(()) }
        })
        .await;
        ensure!(journal.is_ok(), "{cell}: {}", self.agent_a.logs());
        let listed = self.backups()?;
        if state == "succeeded" {
            assert_eq!(listed.len(), before + 1, "{cell}: {listed:?}");
            crate::jobs::assert_backup_verifies(&self.ctl, &job, &cell)?;
        } else {
            assert_eq!(listed.len(), before, "{cell}: {listed:?}");
        }
        eprintln!("fault matrix: {cell}: the job {state}, PostgreSQL runs, the journal is empty");
        Ok(())
    }
}

/// The fault matrix's `pre-copy` row on the host driver: every fault
/// struck while the first pass uploads and PostgreSQL still runs (the
/// storage has stopped answering; it answers again once the fault has
/// struck). Nothing was stopped, so nothing may stay stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_while_postgres_is_pre_copied() -> anyhow::Result<()> {
    Site::new("", &[])
        .await?
        .fault_row("pre-copy", &["cancelled"])
        .await
}

/// The fault matrix's `uploading` row: every fault struck once PostgreSQL
/// runs again and its journal entry is gone, while the delta pass's data
/// waits for storage that has stopped answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_while_a_postgres_backup_uploads() -> anyhow::Result<()> {
    Site::new("", &[])
        .await?
        .fault_row("uploading", &["cancelled"])
        .await
}

/// The fault matrix's `stopping` row on the host driver, PostgreSQL
/// running as `postgres`: every fault struck while PostgreSQL is down and
/// its stop command has not returned. (The stopped window's row is the
/// tests above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_while_postgres_is_stopping() -> anyhow::Result<()> {
    Site::new(NEW_DATA_ON_STOP, &[])
        .await?
        .fault_row("stopping", &["cancelled"])
        .await
}

/// The fault matrix's `starting` row: every fault struck while Ferry's
/// start of PostgreSQL runs. A cancel there may come too late (the backup
/// was complete once the delta pass had read everything).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_while_postgres_is_starting() -> anyhow::Result<()> {
    Site::new(NEW_DATA_ON_STOP, &[])
        .await?
        .fault_row("starting", &["cancelled", "succeeded"])
        .await
}

//! The containers driver over real engines (a `dockerd` and a Podman
//! service, each its own root): container apps in the inventory, a cold
//! backup that stops and starts the same container ids, a container that
//! was stopped before stays stopped, a container started by someone else in
//! the stopped window fails the backup, an agent killed while a container
//! is stopped starts it again from its journal, and an engine that cannot
//! be reached gives a clear error.

use ferry_tests::engines::{BASE_IMAGE, Engine, Kind};
use ferry_tests::{AgentProcess, Controller, DEADLINE, setup, wait_for};
use std::path::{Path, PathBuf};

use crate::jobs::{Fault, backup_shop, enrol_in, ferryctl, json, wait_app, wait_online};

/// The db container's program: appends a line to its volume every 20 ms;
/// on SIGTERM it writes as many MiB as its volume's `stop-mib` file says
/// (16 at first), then exits: a delta to read.
/// While `/data/hold-stopping` exists, the stop first says so
/// (`/data/in-stopping`) and waits (15 s at most, below the engine's stop
/// timeout) until the test lets it go on (`/data/go-stopping`): a fault
/// strikes while Ferry is stopping the container.
const WRITER: &str = "[ -f /data/stop-mib ] || echo 16 > /data/stop-mib; \
    trap 'if [ -e /data/hold-stopping ]; then rm -f /data/hold-stopping; touch /data/in-stopping; i=0; \
    until [ -e /data/go-stopping ] || [ $i -ge 300 ]; do sleep 0.05; i=$((i+1)); done; \
    rm -f /data/go-stopping /data/in-stopping; fi; \
    dd if=/dev/urandom of=/data/on-stop bs=1M count=$(cat /data/stop-mib) 2>/dev/null; exit 0' TERM; \
    while true; do date >> /data/log; sleep 0.02 & wait $!; done";

type Site = (Engine, Controller, crate::jobs::AgentDir, AgentProcess);

/// The labels that make a container part of app web/shop.
const SHOP: [&str; 4] = ["-l", "ferry.app=shop", "-l", "ferry.team=web"];

/// An environment value of db's: kept in the encrypted repository only.
const SECRET: &str = "correct-horse-battery-staple";

/// web's config file, bind-mounted read-only.
const WEB_CONF: &str = "listen 8080\nroot /srv\n";

async fn site(kind: Kind) -> anyhow::Result<Site> {
    let engine = Engine::start(kind)?;
    engine.import_base_image()?;
    // db: stateful (a named volume), restart always; web shares its
    // network namespace (so it depends on db), stateless; cache: stateful,
    // created but never started.
    engine.docker_ok(&[
        "run",
        "-d",
        "--name",
        "shop-db",
        "--network",
        "none",
        "--restart",
        "always",
        "-e",
        &format!("SHOP_TOKEN={SECRET}"),
        "-v",
        "shopdata:/data",
        SHOP[0],
        SHOP[1],
        SHOP[2],
        SHOP[3],
        // Hooks, run in the container through the exec API.
        "-l",
        "ferry.pre_stop=echo pre_stop >> /data/hooks",
        "-l",
        "ferry.pre_backup=echo pre_backup >> /data/hooks",
        "-l",
        "ferry.post_backup=echo post_backup >> /data/hooks",
        BASE_IMAGE,
        "sh",
        "-c",
        WRITER,
    ])?;
    // web mounts what Compose apps mount: a config file (read-only), a
    // host directory read-only, and the engine's socket; none of them is
    // data of the app.
    let conf = engine.dir().join("conf");
    std::fs::create_dir_all(&conf)?;
    std::fs::write(conf.join("web.conf"), WEB_CONF)?;
    let conf_bind = format!("{}:/etc/web.conf:ro", conf.join("web.conf").display());
    let socket_bind = format!("{}:/var/run/docker.sock", engine.socket().display());
    engine.docker_ok(&[
        "run",
        "-d",
        "--name",
        "shop-web",
        "--network",
        "container:shop-db",
        "-v",
        &conf_bind,
        "-v",
        "/usr:/usr-host:ro",
        "-v",
        &socket_bind,
        SHOP[0],
        SHOP[1],
        SHOP[2],
        SHOP[3],
        BASE_IMAGE,
        "sleep",
        "100000",
    ])?;
    engine.docker_ok(&[
        "create",
        "--name",
        "shop-cache",
        "--network",
        "none",
        "-v",
        "cachedata:/data",
        SHOP[0],
        SHOP[1],
        SHOP[2],
        SHOP[3],
        BASE_IMAGE,
        "sleep",
        "100000",
    ])?;
    connect(engine, "").await
}

/// db alone: stateful (a named volume), restart always.
fn db_alone(engine: &Engine) -> anyhow::Result<()> {
    db_alone_with(engine, &[])
}

/// A healthcheck that fails while `/data/hold-starting` exists (saying so
/// with `/data/in-starting`): Ferry's start of db, which waits until db is
/// healthy, is held at it.
const HEALTH_GATE: [&str; 8] = [
    "--health-cmd",
    "if [ -e /data/hold-starting ]; then touch /data/in-starting; exit 1; fi; rm -f /data/in-starting",
    "--health-interval",
    "1s",
    "--health-timeout",
    "2s",
    "--health-retries",
    "10000",
];

fn db_alone_with(engine: &Engine, extra: &[&str]) -> anyhow::Result<()> {
    let mut args = vec!["run", "-d"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "--name",
        "shop-db",
        "--network",
        "none",
        "--restart",
        "always",
        "-v",
        "shopdata:/data",
        SHOP[0],
        SHOP[1],
        SHOP[2],
        SHOP[3],
        BASE_IMAGE,
        "sh",
        "-c",
        WRITER,
    ]);
    engine.docker_ok(&args)?;
    Ok(())
}

/// A controller, and cluster a's agent on `engine` (its config with
/// `extra` lines), once it lists web/shop; storage `nfs` with a password
/// the test knows.
async fn connect(engine: Engine, extra: &str) -> anyhow::Result<Site> {
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let a = enrol_in(&ctl, "a", "node-a").await?;
    let conf = format!(
        "controller = \"{}\"\ndata_dir = \"{}\"\nheartbeat_secs = 1\nreconnect_min_ms = 50\nreconnect_max_ms = 500\ndelta_buffer_mib = 1\n{extra}\n[containers]\nsocket = \"unix://{}\"\nstop_timeout_secs = 20\n",
        ctl.url(),
        a.path().display(),
        engine.socket().display()
    );
    std::fs::write(a.path().join("agent.toml"), conf)?;
    let agent = AgentProcess::spawn(&a.path().join("agent.toml"), a.path().join("agent.log"))?;
    wait_online(&ctl, 1).await?;
    wait_app(&ctl, "a", "web", "shop").await?;
    // A repository password the test knows, to look inside the backup.
    let shared = ctl.dir.path().join("shared").display().to_string();
    let pw = ctl.dir.path().join("repo.pw").display().to_string();
    std::fs::write(&pw, "the test's repository password\n")?;
    let (code, out, err) = ferryctl(
        &ctl,
        &[
            "storage",
            "add",
            "nfs",
            "shared",
            "--path",
            &shared,
            "--password-file",
            &pw,
        ],
    )?;
    anyhow::ensure!(code == 0, "{out}{err}");
    Ok((engine, ctl, a, agent))
}

async fn cold_backup_keeps_the_containers(kind: Kind) -> anyhow::Result<()> {
    setup();
    let (engine, ctl, a, mut agent) = site(kind).await?;
    let id_of = |name: &str| engine.inspect(name, "{{.Id}}");
    let (db_id, web_id, cache_id) = (id_of("shop-db")?, id_of("shop-web")?, id_of("shop-cache")?);
    let started_before = engine.inspect("shop-db", "{{.State.StartedAt}}")?;

    // The inventory: three components, their kinds, states and volumes.
    let (_, out, _) = ferryctl(&ctl, &["app", "ls", "--cluster", "a", "-o", "json"])?;
    let apps = json(&out)?;
    let shop = apps
        .as_array()
        .and_then(|a| a.iter().find(|a| a["name"] == "shop"))
        .cloned()
        .unwrap_or_default();
    let text = shop.to_string();
    for needle in [
        "shop-db",
        "shop-web",
        "shop-cache",
        "shopdata",
        "cachedata",
        "container",
    ] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }

    let (code, out, err) = backup_shop(&ctl, &[])?;
    assert_eq!(code, 0, "{kind:?}: {out}{err}\n{}", agent.logs());
    let job = json(&out)?;
    assert!(job["downtime_ms"].as_u64() > Some(0), "{job}");
    let bid = job["backup_id"].as_u64().expect("backup id").to_string();
    let (_, out, _) = ferryctl(&ctl, &["backup", "show", &bid, "-o", "json"])?;
    let shown = json(&out)?;
    // Only the running stateful container was stopped.
    assert_eq!(shown["stopped"], serde_json::json!(["shop-db"]), "{shown}");
    assert!(shown.to_string().contains("shopdata"), "{shown}");
    // The image the three containers run, exported once, by its name.
    let images = &shown["images"];
    assert_eq!(
        images["images"].as_array().map(Vec::len),
        Some(1),
        "{shown}"
    );
    assert!(
        images["images"][0]
            .as_str()
            .unwrap_or_default()
            .ends_with(BASE_IMAGE),
        "{shown}"
    );
    assert!(images["bytes"].as_u64() > Some(500_000), "{shown}");
    assert!(images["bytes_new"].as_u64() > Some(100_000), "{shown}");
    // Inside the repository: the images' archive, and each container's
    // config with its environment (the secret too), without the image's
    // defaults.
    let inside = ctl.dir.path().join("inside");
    let snap = images["snapshot"].as_str().unwrap_or_default().to_owned();
    let out = std::process::Command::new(ferry_tests::bin("ferry-agent"))
        .args(["snapshot", "restore", &snap, "--target"])
        .arg(&inside)
        .arg("--repo")
        .arg(ctl.dir.path().join("shared"))
        .arg("--password-file")
        .arg(ctl.dir.path().join("repo.pw"))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::metadata(inside.join("images.tar"))?.len() > 500_000);
    let captured: serde_json::Value =
        serde_json::from_slice(&std::fs::read(inside.join("containers.json"))?)?;
    let db = captured
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "shop-db"))
        .cloned()
        .unwrap_or_default();
    let env = db["config"]["Env"].to_string();
    assert!(env.contains(&format!("SHOP_TOKEN={SECRET}")), "{db}");
    assert_eq!(db["host_config"]["RestartPolicy"]["Name"], "always", "{db}");
    assert_eq!(captured.as_array().map(Vec::len), Some(3), "{captured}");
    // web's config file, captured beside its config; the read-only host
    // directory and the socket are recorded, not backed up, and are no
    // volumes of the app.
    let web = captured
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "shop-web"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(web["files"][0]["destination"], "/etc/web.conf", "{web}");
    let file = web["files"][0]["file"].as_str().unwrap_or_default();
    assert_eq!(std::fs::read_to_string(inside.join(file))?, WEB_CONF);
    let volumes: Vec<&str> = shown["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v[0].as_str())
        .collect();
    assert!(
        volumes
            .iter()
            .all(|v| !v.starts_with("/usr") && !v.ends_with(".sock") && !v.ends_with(".conf")),
        "{volumes:?}"
    );
    let mount = |dest: &str| {
        shown["mounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["destination"] == dest)
            .map(|m| {
                let code = m["backup"].as_str().unwrap_or_default();
                format!("{code} {}", m["why"].as_str().unwrap_or_default())
            })
            .unwrap_or_default()
    };
    assert_eq!(mount("/etc/web.conf"), "file ", "{shown}");
    assert_eq!(mount("/usr-host"), "config ", "{shown}");
    assert_eq!(mount("/var/run/docker.sock"), "skipped a socket", "{shown}");
    assert_eq!(mount("/data"), "volume ", "{shown}");
    let (_, text, _) = ferryctl(&ctl, &["backup", "show", &bid])?;
    assert!(
        text.contains("mount:    shop-web /usr-host ro (bind /usr): recorded as config"),
        "{text}"
    );
    // …and nowhere else: not in the backup's record, the job, the logs or
    // the controller's files (its catalog among them).
    let (_, listed, _) = ferryctl(&ctl, &["backup", "show", &bid])?;
    for (what, text) in [
        ("backup show -o json", shown.to_string()),
        ("backup show", listed),
        ("the job", job.to_string()),
        ("the agent's log", agent.logs()),
        ("the controller's log", ctl.logs()),
    ] {
        assert!(!text.contains(SECRET), "the secret is in {what}");
    }
    let mut dirs = vec![ctl.dir.path().to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if p.starts_with(&inside) || p.ends_with("shared") {
                continue;
            }
            if p.is_dir() {
                dirs.push(p);
            } else if p.is_file() {
                let bytes = std::fs::read(&p)?;
                assert!(
                    !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
                    "the secret is in {}",
                    p.display()
                );
            }
        }
    }

    // The same containers: db started again (a new start time), its
    // restart policy as it was; web untouched; cache still not running.
    assert_eq!(id_of("shop-db")?, db_id);
    assert_eq!(id_of("shop-web")?, web_id);
    assert_eq!(id_of("shop-cache")?, cache_id);
    assert_eq!(engine.inspect("shop-db", "{{.State.Running}}")?, "true");
    assert_ne!(
        engine.inspect("shop-db", "{{.State.StartedAt}}")?,
        started_before
    );
    assert_eq!(
        engine.inspect("shop-db", "{{.HostConfig.RestartPolicy.Name}}")?,
        "always"
    );
    assert_eq!(engine.inspect("shop-cache", "{{.State.Running}}")?, "false");
    assert_eq!(engine.docker_ok(&["ps", "-q"])?.lines().count(), 2);
    let vol = engine.docker_ok(&["volume", "inspect", "-f", "{{.Mountpoint}}", "shopdata"])?;
    let hooks = || std::fs::read_to_string(std::path::Path::new(&vol).join("hooks"));
    // The cold backup ran db's pre_stop hook, in the container, only.
    assert_eq!(hooks()?, "pre_stop\n");

    // refuse: db runs, so nothing is stopped and nothing is taken.
    let started = engine.inspect("shop-db", "{{.State.StartedAt}}")?;
    let (code, out, err) = backup_shop(&ctl, &["--mode", "refuse"])?;
    assert_ne!(code, 0, "{out}{err}");
    assert!(format!("{out}{err}").contains("refuse"), "{out}{err}");
    // Copies of container apps are not built yet, and no agent says it
    // makes them: a migrate is refused before its backup stops anything,
    // and so is a restore.
    let migrate = [
        "app",
        "migrate",
        "shop",
        "--cluster",
        "a",
        "--team",
        "web",
        "--to-cluster",
        "a",
        "--to-team",
        "t2",
    ];
    let restore = [
        "backup",
        "restore",
        &bid,
        "--to-cluster",
        "a",
        "--to-team",
        "t2",
    ];
    for args in [&migrate[..], &restore[..]] {
        let (code, out, err) = ferryctl(&ctl, args)?;
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(
            err.contains("no agent of cluster a restores copies of containers apps"),
            "{err}"
        );
    }
    // hot: nothing stopped, db's pre_backup and post_backup around the copy.
    let (code, out, err) = backup_shop(&ctl, &["--mode", "hot"])?;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json(&out)?["downtime_ms"], 0, "{out}");
    assert_eq!(engine.inspect("shop-db", "{{.State.StartedAt}}")?, started);
    assert_eq!(hooks()?, "pre_stop\npre_backup\npost_backup\n");
    // What the stop wrote is in the backup: the delta pass read it.
    let (code, out, err) = ferryctl(
        &ctl,
        &["backup", "verify", &bid, "--read-data", "100", "-o", "json"],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        shown["delta_bytes_read"].as_u64() >= Some(16 << 20),
        "{shown}"
    );

    // Someone starts db while Ferry has it stopped: the backup fails,
    // nothing is committed, db runs. (256 MiB at the stop: a delta pass
    // long enough to strike in.)
    std::fs::write(std::path::Path::new(&vol).join("stop-mib"), "256\n")?;
    let (code, out, err) = backup_shop(&ctl, &["--detach"])?;
    assert_eq!(code, 0, "{out}{err}");
    let job_id = json(&out)?["id"].as_u64().expect("job").to_string();
    wait_for("the delta pass", DEADLINE, || {
        let seen = agent.logs().matches("delta pass started").count() >= 2;
        async move { seen.then_some(()) }
    })
    .await?;
    engine.docker_ok(&["start", "shop-db"])?;
    let (_, out, err) = ferryctl(&ctl, &["job", "watch", &job_id, "-o", "json"])?;
    let ended = json(&out).map_err(|e| anyhow::anyhow!("{e}: {out}{err}"))?;
    assert_eq!(ended["state"], "failed", "{ended}");
    assert!(
        ended["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("started by someone else"),
        "{ended}"
    );
    let (_, out, _) = ferryctl(&ctl, &["backup", "ls", "-o", "json"])?;
    assert_eq!(json(&out)?.as_array().map(Vec::len), Some(2), "{out}");
    assert_eq!(engine.inspect("shop-db", "{{.State.Running}}")?, "true");
    assert_eq!(
        engine.inspect("shop-db", "{{.HostConfig.RestartPolicy.Name}}")?,
        "always"
    );

    // The agent is killed while db is stopped: db stays down (the journal
    // holds it) until the agent starts again and its journal starts the
    // same container, its policy put back; the lost step runs again.
    let (code, out, err) = backup_shop(&ctl, &["--detach"])?;
    assert_eq!(code, 0, "{out}{err}");
    let job_id = json(&out)?["id"].as_u64().expect("job").to_string();
    wait_for("the delta pass", DEADLINE, || {
        let seen = agent.logs().matches("delta pass started").count() >= 3;
        async move { seen.then_some(()) }
    })
    .await?;
    agent.kill();
    assert_eq!(engine.inspect("shop-db", "{{.State.Running}}")?, "false");
    let journal = std::fs::read_dir(a.path().join("journal"))?.count();
    assert_eq!(journal, 1, "the journal holds what Ferry stopped");
    agent = AgentProcess::spawn(&a.path().join("agent.toml"), a.path().join("agent-2.log"))?;
    wait_for("db running again", DEADLINE, || {
        let up = engine.inspect("shop-db", "{{.State.Running}}").ok();
        async move { (up.as_deref() == Some("true")).then_some(()) }
    })
    .await?;
    assert_eq!(id_of("shop-db")?, db_id);
    let (_, out, err) = ferryctl(&ctl, &["job", "watch", &job_id, "-o", "json"])?;
    let ended = json(&out).map_err(|e| anyhow::anyhow!("{e}: {out}{err}"))?;
    assert_eq!(ended["state"], "succeeded", "{ended}\n{}", agent.logs());
    // The same image again costs next to nothing.
    let again = ended["backup_id"].as_u64().expect("backup id").to_string();
    let (_, out, _) = ferryctl(&ctl, &["backup", "show", &again, "-o", "json"])?;
    let shown = json(&out)?;
    let (bytes, new) = (
        shown["images"]["bytes"].as_u64().unwrap_or(0),
        shown["images"]["bytes_new"].as_u64().unwrap_or(u64::MAX),
    );
    assert!(bytes > 500_000 && new < bytes / 20, "{shown}");
    assert_eq!(engine.inspect("shop-db", "{{.State.Running}}")?, "true");
    assert_eq!(
        engine.inspect("shop-db", "{{.HostConfig.RestartPolicy.Name}}")?,
        "always"
    );
    assert_eq!(engine.inspect("shop-cache", "{{.State.Running}}")?, "false");

    // The engine goes away (its containers kept): a clear error naming it.
    let socket = engine.socket().display().to_string();
    let mut engine = engine;
    engine.halt();
    let (code, out, err) = backup_shop(&ctl, &[])?;
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        format!("{out}{err}").contains("container engine")
            && format!("{out}{err}").contains(&socket),
        "{out}{err}"
    );
    agent.stop().await?;
    drop(a);
    // Back, so its containers are removed with it.
    engine.resume()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_cold_backup_keeps_the_containers() -> anyhow::Result<()> {
    cold_backup_keeps_the_containers(Kind::Docker).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_cold_backup_keeps_the_containers() -> anyhow::Result<()> {
    cold_backup_keeps_the_containers(Kind::Podman).await
}

/// The container engine restarts while Ferry has db stopped: dockerd is
/// stopped as its service manager would stop it, in the delta pass, and
/// started again only once Ferry has failed to start db. While the engine
/// is away db stays stopped; its own start does not bring db back (Ferry
/// set the `always` policy aside); then the journal's timer starts the
/// same container and puts its policy back. The job ends with a true
/// outcome, and a backup it reports complete passes a full verify. (Podman
/// has no daemon whose restart stops or starts containers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_engine_restarted_in_the_stopped_window() -> anyhow::Result<()> {
    setup();
    let engine = Engine::start(Kind::Docker)?;
    engine.import_base_image()?;
    db_alone(&engine)?;
    let db_id = engine.inspect("shop-db", "{{.Id}}")?;
    let (mut engine, ctl, a, mut agent) = connect(engine, "journal_retry_secs = 1").await?;
    let vol = engine.docker_ok(&["volume", "inspect", "-f", "{{.Mountpoint}}", "shopdata"])?;
    // A delta long enough to stop the engine in.
    std::fs::write(std::path::Path::new(&vol).join("stop-mib"), "256\n")?;
    let (code, out, err) = backup_shop(&ctl, &["--detach"])?;
    assert_eq!(code, 0, "{out}{err}");
    let job_id = json(&out)?["id"].as_u64().expect("job").to_string();
    wait_for("the delta pass", DEADLINE, || {
        let seen = agent.logs().contains("delta pass started");
        async move { seen.then_some(()) }
    })
    .await?;
    let halting = std::time::Instant::now();
    engine.halt();
    eprintln!("the engine stopped in {:?}", halting.elapsed());
    // The delta pass reads 256 MiB through a 1 MiB buffer first: slow
    // in a debug build on a loaded machine.
    wait_for("Ferry's start of db to fail", 5 * DEADLINE, || {
        let seen = agent.logs().contains("did not all start again");
        async move { seen.then_some(()) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", agent.logs()))?;
    assert_eq!(
        std::fs::read_dir(a.path().join("journal"))?.count(),
        1,
        "the journal holds db"
    );
    // The engine comes back while the agent is away: its own start leaves
    // db stopped, its `always` policy set aside by Ferry.
    agent.stop().await?;
    engine.resume()?;
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(engine.inspect("shop-db", "{{.State.Running}}")?, "false");
    assert_eq!(
        engine.inspect("shop-db", "{{.HostConfig.RestartPolicy.Name}}")?,
        "no"
    );
    // The agent is back: its journal starts db and puts its policy back.
    agent = AgentProcess::spawn(&a.path().join("agent.toml"), a.path().join("agent-2.log"))?;
    wait_for("db running again", DEADLINE, || {
        let up = engine.inspect("shop-db", "{{.State.Running}}").ok();
        async move { (up.as_deref() == Some("true")).then_some(()) }
    })
    .await?;
    assert_eq!(
        engine.inspect("shop-db", "{{.Id}}")?,
        db_id,
        "the same container"
    );
    let ended = crate::jobs::job_ended(&ctl, &job_id, std::time::Duration::from_secs(300)).await?;
    eprintln!("the job ended {}: {}", ended["state"], ended["reason"]);
    match ended["state"].as_str() {
        Some("succeeded") => {
            crate::jobs::assert_backup_verifies(&ctl, &ended, "engine restarted")?;
        }
        Some("failed") => {
            let (_, out, _) = ferryctl(&ctl, &["backup", "ls", "-o", "json"])?;
            assert_eq!(json(&out)?.as_array().map(Vec::len), Some(0), "{out}");
        }
        _ => panic!("{ended}"),
    }
    wait_for("the journal emptied", DEADLINE, || {
        let left = std::fs::read_dir(a.path().join("journal")).map(|d| d.count());
        async move { matches!(left, Ok(0)).then_some(()) }
    })
    .await?;
    assert_eq!(engine.inspect("shop-db", "{{.State.Running}}")?, "true");
    assert_eq!(
        engine.inspect("shop-db", "{{.HostConfig.RestartPolicy.Name}}")?,
        "always",
        "{}",
        agent.logs()
    );
    agent.stop().await?;
    drop(a);
    Ok(())
}

/// db alone on an engine of `kind`, its agent replaying its journal every
/// second; `cells` run one after the other on it.
struct Bed {
    engine: Engine,
    /// The agent's way to the S3 storage (`objects`), which can stall.
    s3: ferry_tests::lab::Forward,
    ctl: Controller,
    a: crate::jobs::AgentDir,
    agent: AgentProcess,
    vol: PathBuf,
    db_id: String,
    agents: usize,
}

impl Bed {
    async fn new(kind: Kind) -> anyhow::Result<Self> {
        Self::with_db(kind, &[]).await
    }

    /// db run with `extra` arguments.
    async fn with_db(kind: Kind, extra: &[&str]) -> anyhow::Result<Self> {
        setup();
        let engine = Engine::start(kind)?;
        engine.import_base_image()?;
        db_alone_with(&engine, extra)?;
        let db_id = engine.inspect("shop-db", "{{.Id}}")?;
        let (engine, ctl, a, agent) = connect(engine, "journal_retry_secs = 1").await?;
        // The backups go to SeaweedFS, through a forward the pre-copy and
        // uploading cells stall.
        let s3 = crate::jobs::seaweed_forward(std::net::Ipv4Addr::LOCALHOST).await?;
        let bucket = ferry_store::testing::seaweed().await.new_bucket().await;
        let endpoint = format!("http://{}", s3.addr);
        crate::jobs::add_s3_storage(&ctl, "objects", &endpoint, &bucket)?;
        let vol = PathBuf::from(engine.docker_ok(&[
            "volume",
            "inspect",
            "-f",
            "{{.Mountpoint}}",
            "shopdata",
        ])?);
        Ok(Self {
            engine,
            s3,
            ctl,
            a,
            agent,
            vol,
            db_id,
            agents: 1,
        })
    }

    fn journal_entries(&self) -> usize {
        std::fs::read_dir(self.a.path().join("journal")).map_or(0, |d| d.count())
    }

    fn backups(&self) -> anyhow::Result<usize> {
        let (_, out, _) = ferryctl(&self.ctl, &["backup", "ls", "-o", "json"])?;
        Ok(json(&out)?.as_array().map_or(0, Vec::len))
    }

    fn respawn(&mut self) -> anyhow::Result<()> {
        self.agents += 1;
        let log = self.a.path().join(format!("agent-{}.log", self.agents));
        self.agent = AgentProcess::spawn(&self.a.path().join("agent.toml"), log)?;
        Ok(())
    }

    /// One cell: a cold backup of db, `fault` struck while db is
    /// `stopping` (its stop held at a gate inside the container), in the
    /// `stopped` window (a 128 MiB delta pass), in the `pre-copy` (the
    /// storage's forward stalls after 1 MiB of the first pass, db running)
    /// or `uploading` (the forward stalled from the stop on: db runs again
    /// while the delta pass's data waits). Whatever happened, the same
    /// container ends running with its restart policy, the journal ends
    /// empty, the job ends in one of `outcomes`, and a backup exists
    /// exactly when it succeeded, passing a full read of its data.
    async fn cell(&mut self, phase: &str, fault: Fault, outcomes: &[&str]) -> anyhow::Result<()> {
        let cell = format!("{:?} {fault:?} while {phase}", self.engine.kind);
        let before = self.backups()?;
        let seen = |agent: &AgentProcess, what: &str| agent.logs().matches(what).count();
        let delta_passes = seen(&self.agent, "delta pass started");
        let (pre_copies, runs_again) = (
            seen(&self.agent, "pre-copy started"),
            seen(&self.agent, "the app runs again"),
        );
        let gated = matches!(phase, "stopping" | "uploading");
        let in_phase = self.vol.join("in-stopping");
        match phase {
            "stopping" => std::fs::write(self.vol.join("stop-mib"), "16\n")?,
            "stopped" => std::fs::write(self.vol.join("stop-mib"), "128\n")?,
            // The delta fits the agent's 1 MiB buffer: nothing is stored
            // while db is down.
            "uploading" => std::fs::write(self.vol.join("stop-mib"), "0\n")?,
            "starting" => {
                std::fs::write(self.vol.join("stop-mib"), "0\n")?;
                std::fs::write(self.vol.join("hold-starting"), "")?;
            }
            _ => {
                // Data the repository does not hold yet: packs to upload.
                // (xorshift: it does not compress.)
                let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ before as u64;
                let filler: Vec<u8> = (0..4usize << 20)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                std::fs::write(self.vol.join(format!("filler-{before}")), filler)?;
                std::fs::write(self.vol.join("stop-mib"), "0\n")?;
                self.s3.stall_after(1 << 20);
            }
        }
        if gated {
            std::fs::write(self.vol.join("hold-stopping"), "")?;
        }
        let (code, out, err) = backup_shop(&self.ctl, &["--detach", "--storage", "objects"])?;
        anyhow::ensure!(code == 0, "{cell}: {out}{err}");
        let id = json(&out)?["id"].as_u64().expect("job").to_string();
        let agent = &self.agent;
        wait_for(&format!("{cell}: the phase"), DEADLINE, || {
            let engine = &self.engine;
            let there = match phase {
                "stopped" => seen(agent, "delta pass started") > delta_passes,
                // Started again by Ferry, which waits for its health.
                "starting" => {
                    seen(agent, "delta pass started") > delta_passes
                        && engine
                            .inspect("shop-db", "{{.State.Running}} {{.State.Health.Status}}")
                            .is_ok_and(|s| s == "true starting")
                }
                "pre-copy" => self.s3.held() > 0 && seen(agent, "pre-copy started") > pre_copies,
                _ => in_phase.exists(),
            };
            async move { there.then_some(()) }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.agent.logs()))?;
        if phase == "uploading" {
            self.s3.stall_after(0);
            std::fs::write(self.vol.join("go-stopping"), "")?;
            let (agent, engine) = (&self.agent, &self.engine);
            wait_for(&format!("{cell}: the uploads held"), DEADLINE, || {
                let there = self.s3.held() > 0
                    && seen(agent, "the app runs again") > runs_again
                    && self.journal_entries() == 0
                    && engine
                        .inspect("shop-db", "{{.State.Running}}")
                        .ok()
                        .as_deref()
                        == Some("true");
                async move { there.then_some(()) }
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}\n{}", self.agent.logs()))?;
        }
        // What lets the held phase go on: the gate, or the storage.
        let vol = self.vol.clone();
        let go = |s3: &ferry_tests::lab::Forward| -> std::io::Result<()> {
            match phase {
                "stopping" => std::fs::write(vol.join("go-stopping"), "")?,
                "starting" => std::fs::remove_file(vol.join("hold-starting"))?,
                "pre-copy" | "uploading" => s3.release(),
                _ => {}
            }
            Ok(())
        };
        match fault {
            Fault::AgentKill => {
                self.agent.kill();
                if phase != "stopping" {
                    go(&self.s3)?;
                }
                self.respawn()?;
                if phase == "stopping" {
                    // The agent is back while the stop it began still goes
                    // on, and its replay keeps the entry: Docker shows db
                    // running (not taken for started, since the stop ends
                    // after it), Podman shows it stopping (not startable).
                    let agent = &self.agent;
                    wait_for(&format!("{cell}: the replay"), DEADLINE, || {
                        let logs = agent.logs();
                        let seen = logs.contains("kept until a stop begun earlier")
                            || logs.contains("is kept: cannot start what it stopped");
                        async move { seen.then_some(()) }
                    })
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}\n{}", self.agent.logs()))?;
                    go(&self.s3)?;
                }
            }
            Fault::AgentTerm => {
                self.agent.terminate()?;
                go(&self.s3)?;
                self.agent.stop().await?;
                self.respawn()?;
            }
            Fault::ControllerKill => {
                self.ctl.kill();
                go(&self.s3)?;
                self.ctl.start().await?;
            }
            Fault::EngineRestart => {
                // The engine stops its containers (db's held stop is cut
                // short: the engine kills it) and starts again those whose
                // policy says so; db's is Ferry's set-aside `no` once the
                // stop has begun.
                self.engine.halt();
                self.engine.resume()?;
                if phase == "stopping" {
                    // The container's trap was killed at the gate.
                    for f in ["in-stopping", "hold-stopping"] {
                        let _ = std::fs::remove_file(self.vol.join(f));
                    }
                } else {
                    go(&self.s3)?;
                }
            }
            Fault::Cancel => {
                let (code, out, err) = ferryctl(&self.ctl, &["job", "cancel", &id])?;
                anyhow::ensure!(code == 0, "{cell}: {out}{err}");
                // A cancel does not wait for storage that has stopped
                // answering: the job ends while the stall still holds.
                if matches!(phase, "pre-copy" | "uploading") {
                    let ended = crate::jobs::job_ended(&self.ctl, &id, DEADLINE).await;
                    go(&self.s3)?;
                    ended.map_err(|e| anyhow::anyhow!("{cell}: {e}\n{}", self.agent.logs()))?;
                }
                go(&self.s3)?;
            }
        }
        let ended =
            crate::jobs::job_ended(&self.ctl, &id, std::time::Duration::from_secs(300)).await?;
        let state = ended["state"].as_str().unwrap_or_default().to_owned();
        anyhow::ensure!(
            outcomes.contains(&state.as_str()),
            "{cell}: the job ended {state}, not one of {outcomes:?}: {ended}\n{}",
            self.agent.logs()
        );
        let engine = &self.engine;
        wait_for(&format!("{cell}: db running"), DEADLINE, || {
            let up = engine.inspect("shop-db", "{{.State.Running}}").ok();
            async move { (up.as_deref() == Some("true")).then_some(()) }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", self.agent.logs()))?;
        assert_eq!(
            self.engine.inspect("shop-db", "{{.Id}}")?,
            self.db_id,
            "{cell}"
        );
        let bed = &*self;
        wait_for(&format!("{cell}: the journal emptied"), DEADLINE, || {
            let left = bed.journal_entries();
            async move { (left == 0).then_some(()) }
        })
        .await?;
        assert_eq!(
            self.engine
                .inspect("shop-db", "{{.HostConfig.RestartPolicy.Name}}")?,
            "always",
            "{cell}"
        );
        let after = self.backups()?;
        if state == "succeeded" {
            assert_eq!(after, before + 1, "{cell}");
            crate::jobs::assert_backup_verifies(&self.ctl, &ended, &cell)?;
        } else {
            assert_eq!(after, before, "{cell}");
        }
        assert!(
            !Path::new(&in_phase).exists(),
            "{cell}: the gate was let go"
        );
        eprintln!(
            "fault matrix: {cell}: the job {state}, db runs with its policy, the journal is empty"
        );
        Ok(())
    }
}

/// The containers driver's fault matrix on one engine: every fault while
/// db is stopping, and those the stopped-window tests above do not strike
/// there (SIGTERM, the controller's SIGKILL, a cancel).
async fn faults(kind: Kind) -> anyhow::Result<()> {
    let mut bed = Bed::new(kind).await?;
    let ok = &["succeeded"][..];
    bed.cell("stopping", Fault::AgentKill, ok).await?;
    bed.cell("stopping", Fault::AgentTerm, ok).await?;
    bed.cell("stopping", Fault::ControllerKill, ok).await?;
    bed.cell("stopping", Fault::Cancel, &["cancelled"]).await?;
    bed.cell("stopped", Fault::AgentTerm, ok).await?;
    bed.cell("stopped", Fault::ControllerKill, ok).await?;
    bed.cell("stopped", Fault::Cancel, &["cancelled"]).await?;
    bed.agent.stop().await?;
    Ok(())
}

/// The containers driver's `pre-copy` and `uploading` rows on one engine:
/// every fault struck while the storage holds the backup, db running.
async fn faults_at_the_storage(kind: Kind) -> anyhow::Result<()> {
    let mut bed = Bed::new(kind).await?;
    // A first backup stores the app's images: the pre-copy cells' stall
    // then falls in the volumes' first pass, not in the images' capture.
    let (code, out, err) = backup_shop(&bed.ctl, &["--storage", "objects"])?;
    anyhow::ensure!(code == 0, "{out}{err}");
    let ok = &["succeeded"][..];
    for phase in ["pre-copy", "uploading"] {
        bed.cell(phase, Fault::AgentKill, ok).await?;
        bed.cell(phase, Fault::AgentTerm, ok).await?;
        bed.cell(phase, Fault::ControllerKill, ok).await?;
        bed.cell(phase, Fault::Cancel, &["cancelled"]).await?;
    }
    bed.agent.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_faults_while_pre_copying_and_uploading() -> anyhow::Result<()> {
    faults_at_the_storage(Kind::Docker).await
}

/// The `starting` row on Docker: every fault struck while Ferry waits for
/// db, started again, to be healthy (its healthcheck held at a gate).
/// Podman's service here runs no healthchecks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_faults_while_starting() -> anyhow::Result<()> {
    let mut bed = Bed::with_db(Kind::Docker, &HEALTH_GATE).await?;
    let ok = &["succeeded"][..];
    bed.cell("starting", Fault::AgentKill, ok).await?;
    bed.cell("starting", Fault::AgentTerm, ok).await?;
    bed.cell("starting", Fault::ControllerKill, ok).await?;
    bed.cell("starting", Fault::Cancel, &["cancelled", "succeeded"])
        .await?;
    bed.cell("starting", Fault::EngineRestart, &["succeeded", "failed"])
        .await?;
    bed.agent.stop().await?;
    Ok(())
}

/// The engine-restart column on Docker (Podman has no daemon whose restart
/// stops or starts containers): dockerd stopped and started again while
/// db is pre-copied, stopping, or running again while the backup uploads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_engine_restarted_while_pre_copying_stopping_and_uploading() -> anyhow::Result<()> {
    let mut bed = Bed::new(Kind::Docker).await?;
    let (code, out, err) = backup_shop(&bed.ctl, &["--storage", "objects"])?;
    anyhow::ensure!(code == 0, "{out}{err}");
    let ok = &["succeeded"][..];
    bed.cell("pre-copy", Fault::EngineRestart, ok).await?;
    bed.cell("stopping", Fault::EngineRestart, &["succeeded", "failed"])
        .await?;
    bed.cell("uploading", Fault::EngineRestart, ok).await?;
    bed.agent.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_faults_while_pre_copying_and_uploading() -> anyhow::Result<()> {
    faults_at_the_storage(Kind::Podman).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_faults_while_stopping_and_stopped() -> anyhow::Result<()> {
    faults(Kind::Docker).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_faults_while_stopping_and_stopped() -> anyhow::Result<()> {
    faults(Kind::Podman).await
}

/// A container that does not stop on its stop signal (busybox `sh` as PID
/// 1 has no handler for SIGUSR1, so the kernel drops it) is killed by the
/// engine at the stop timeout: the backup goes through and its record says
/// that db was killed, not stopped cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_a_container_killed_at_the_stop_timeout_is_said_in_the_record() -> anyhow::Result<()>
{
    setup();
    let engine = Engine::start(Kind::Docker)?;
    engine.import_base_image()?;
    db_alone_with(&engine, &["--stop-signal", "SIGUSR1"])?;
    let (engine, ctl, _a, mut agent) = connect(engine, "").await?;
    let (code, out, err) = backup_shop(&ctl, &[])?;
    assert_eq!(code, 0, "{out}{err}\n{}", agent.logs());
    let job = json(&out)?;
    let bid = job["backup_id"].as_u64().expect("backup id").to_string();
    let (_, out, _) = ferryctl(&ctl, &["backup", "show", &bid, "-o", "json"])?;
    let shown = json(&out)?;
    let remarks = shown["remarks"].to_string();
    assert!(
        remarks.contains("shop-db did not stop on its stop signal") && remarks.contains("killed"),
        "{shown}"
    );
    let (_, text, _) = ferryctl(&ctl, &["backup", "show", &bid])?;
    assert!(text.contains("remark:   shop-db did not stop"), "{text}");
    assert_eq!(engine.inspect("shop-db", "{{.State.Running}}")?, "true");
    crate::jobs::assert_backup_verifies(&ctl, &job, "killed at the stop timeout")?;
    agent.stop().await?;
    Ok(())
}

/// db has a healthcheck that Podman's service (without systemd) never
/// runs: Ferry's start counts db as started once the check has had two
/// intervals without a result, says so in the record, and the backup
/// succeeds in one attempt, never stopping db again. (Where the engine does
/// run it, db becomes healthy and nothing is said.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_a_healthcheck_the_engine_never_runs_counts_as_started_and_is_said()
-> anyhow::Result<()> {
    setup();
    let engine = Engine::start(Kind::Podman)?;
    engine.import_base_image()?;
    db_alone_with(&engine, &HEALTH_GATE)?;
    let (engine, ctl, _a, mut agent) = connect(engine, "").await?;
    let (code, out, err) = backup_shop(&ctl, &[])?;
    assert_eq!(code, 0, "{out}{err}\n{}", agent.logs());
    let job = json(&out)?;
    assert_eq!(job["steps"][0]["attempts"], 1, "{job}");
    let bid = job["backup_id"].as_u64().expect("backup id").to_string();
    let (_, out, _) = ferryctl(&ctl, &["backup", "show", &bid, "-o", "json"])?;
    let shown = json(&out)?;
    let health: serde_json::Value =
        serde_json::from_str(&engine.inspect("shop-db", "{{json .State.Health}}")?)
            .unwrap_or_default();
    let checks_ran = health["Log"].as_array().is_some_and(|l| !l.is_empty());
    let said = shown["remarks"].to_string().contains("ran no healthcheck");
    assert_eq!(said, !checks_ran, "checks ran: {checks_ran}; {shown}");
    assert_eq!(engine.inspect("shop-db", "{{.State.Running}}")?, "true");
    agent.stop().await?;
    Ok(())
}

/// A mount Ferry cannot back up (a bind of a file larger than a file bind
/// may be) refuses the backup before anything runs, naming the mount; db
/// is never stopped. Labelled `ferry.backup=false`, the same mount is left
/// out and the backup goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_ferry_cannot_back_up_refuses_the_backup_before_anything_stops()
-> anyhow::Result<()> {
    setup();
    let engine = Engine::start(Kind::Docker)?;
    engine.import_base_image()?;
    db_alone(&engine)?;
    let big = engine.dir().join("disk.img");
    std::fs::File::create(&big)?.set_len(100 << 20)?;
    let bind = format!("{}:/disk.img", big.display());
    let sidecar = |engine: &Engine, extra: &[&str]| {
        let mut args = vec!["run", "-d", "--name", "shop-disk", "--network", "none"];
        args.extend_from_slice(&["-v", &bind]);
        args.extend_from_slice(extra);
        args.extend_from_slice(&SHOP);
        args.extend_from_slice(&[BASE_IMAGE, "sleep", "100000"]);
        engine.docker_ok(&args).map(|_| ())
    };
    sidecar(&engine, &[])?;
    let started = engine.inspect("shop-db", "{{.State.StartedAt}}")?;
    let (engine, ctl, _a, mut agent) = connect(engine, "").await?;
    let (code, out, err) = backup_shop(&ctl, &[])?;
    assert_ne!(code, 0, "{out}{err}");
    let said = format!("{out}{err}");
    assert!(said.contains("shop-disk: /disk.img"), "{said}");
    assert!(said.contains("nothing was stopped"), "{said}");
    assert_eq!(engine.inspect("shop-db", "{{.State.StartedAt}}")?, started);
    for step in ["images exported", "pre-copy started", "action=\"stop\""] {
        assert!(!agent.logs().contains(step), "{step}: {}", agent.logs());
    }
    engine.docker_ok(&["rm", "-f", "shop-disk"])?;
    // (The agent reads the app from the engine when the backup begins.)
    sidecar(&engine, &["-l", "ferry.backup=false"])?;
    let (code, out, err) = backup_shop(&ctl, &[])?;
    assert_eq!(code, 0, "{out}{err}\n{}", agent.logs());
    agent.stop().await?;
    Ok(())
}

/// The containers driver's volume access on a real engine: a backup reads
/// a named volume at the engine's mount point; a copy's volume is an
/// engine volume of its own, labelled with its restoring job, emptied when
/// that job asks again, and deleted by a discard; a volume by that name
/// that is not this restore's is refused and left as it was.
async fn copy_volumes_are_engine_volumes_of_their_own(kind: Kind) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use ferry_agent::platform::containers::{ContainerPlatform, EngineSettings};
    use ferry_agent::platform::{CopiesRoot, CopyId, Driver};
    setup();
    let engine = Engine::start(kind)?;
    engine.import_base_image()?;
    db_alone(&engine)?;
    let tmp = tempfile::tempdir()?;
    let driver = ContainerPlatform::new(EngineSettings {
        socket: format!("unix://{}", engine.socket().display()),
        default_team: "web".parse()?,
        stop_timeout: std::time::Duration::from_secs(20),
        start_timeout: std::time::Duration::from_secs(60),
        state_dir: tmp.path().join("state"),
        copies_root: CopiesRoot::new(tmp.path().join("copies")),
    });
    let app = driver
        .app(&"web".parse()?, &"shop".parse()?)
        .await?
        .context("web/shop is listed")?;
    let index = app
        .volumes
        .iter()
        .position(|v| v.name.as_str() == "shopdata")
        .context("shopdata is a volume of web/shop")?;
    let mountpoint =
        |name: &str| engine.docker_ok(&["volume", "inspect", "-f", "{{.Mountpoint}}", name]);

    let source = driver.volumes().source(&app, &app.volumes[index]).await?;
    assert_eq!(source, PathBuf::from(mountpoint("shopdata")?));
    wait_for("db writing its log", DEADLINE, || {
        let written = source.join("log").exists();
        async move { written.then_some(()) }
    })
    .await?;

    let (qa, shop2, shop3) = ("qa".parse()?, "shop2".parse()?, "shop3".parse()?);
    let copy = CopyId {
        team: &qa,
        name: &shop2,
        job: 7,
    };
    let target = driver.volumes().target(copy, &app, index).await?;
    assert_eq!(target, PathBuf::from(mountpoint("shop2_shopdata")?));
    assert_eq!(
        engine.docker_ok(&[
            "volume",
            "inspect",
            "-f",
            "{{index .Labels \"ferry.copy\"}}",
            "shop2_shopdata"
        ])?,
        "qa/shop2/job-7"
    );
    assert!(std::fs::read_dir(&target)?.next().is_none(), "empty");
    std::fs::create_dir(target.join("half"))?;
    std::fs::write(target.join("half/written"), "an interrupted attempt")?;
    // The same job again: the same volume, emptied.
    assert_eq!(driver.volumes().target(copy, &app, index).await?, target);
    assert!(std::fs::read_dir(&target)?.next().is_none(), "emptied");
    // Another job, the same name: refused, the volume left as it was.
    std::fs::write(target.join("rows"), "the copy's own")?;
    let other = CopyId { job: 8, ..copy };
    let refused = driver
        .volumes()
        .target(other, &app, index)
        .await
        .expect_err("another job's volume is refused");
    assert!(refused.to_string().contains("already exists"), "{refused}");
    assert_eq!(
        std::fs::read_to_string(target.join("rows"))?,
        "the copy's own"
    );
    // A volume someone made by the copy's name: refused, and no discard
    // touches it.
    engine.docker_ok(&["volume", "create", "shop3_shopdata"])?;
    let theirs = CopyId {
        team: &qa,
        name: &shop3,
        job: 9,
    };
    assert!(driver.volumes().target(theirs, &app, index).await.is_err());
    driver.volumes().discard(theirs).await?;
    // Another job's discard of the same copy leaves this job's volume.
    driver.volumes().discard(other).await?;
    assert_eq!(
        std::fs::read_to_string(target.join("rows"))?,
        "the copy's own"
    );
    driver.volumes().discard(copy).await?;
    let names = engine.docker_ok(&["volume", "ls", "-q"])?;
    let names: Vec<&str> = names.lines().collect();
    assert!(names.contains(&"shop3_shopdata"), "{names:?}");
    assert!(names.contains(&"shopdata"), "{names:?}");
    assert!(!names.contains(&"shop2_shopdata"), "{names:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_copy_volumes_are_engine_volumes_of_their_own() -> anyhow::Result<()> {
    copy_volumes_are_engine_volumes_of_their_own(Kind::Docker).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_copy_volumes_are_engine_volumes_of_their_own() -> anyhow::Result<()> {
    copy_volumes_are_engine_volumes_of_their_own(Kind::Podman).await
}

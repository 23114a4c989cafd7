//! `ferry-controller catalog rebuild` over the real binaries: a catalog
//! put back from before some backups is brought in line with the
//! location's repository (the backup taken since is recorded again, the
//! one removed since is forgotten, the rest is kept), the rebuilt backup
//! restores, a serving controller's catalog is refused, a second rebuild
//! changes nothing, and later backups get fresh ids.

use std::collections::BTreeSet;
use std::process::Command;

use ferry_tests::{AgentProcess, Controller, bin, run, setup};

use crate::jobs::{config, copy_volume, enrol_in, ferryctl, json, pid_of, wait_app, wait_online};

/// `ferry-controller catalog rebuild --storage nfs` of the controller's
/// data directory: (exit code, stdout, stderr).
fn rebuild(ctl: &Controller) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(bin("ferry-controller"))
        .args(["catalog", "rebuild", "--data-dir"])
        .arg(ctl.data_dir())
        .args(["--storage", "nfs"])
        .env("FERRY_LOG", "warn")
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A cold backup of web/shop of cluster a into `nfs`; its id.
fn backup(ctl: &Controller) -> anyhow::Result<u64> {
    let (code, out, err) = ferryctl(
        ctl,
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
    anyhow::ensure!(code == 0, "backup failed: {out}{err}");
    let job = json(&out)?;
    anyhow::ensure!(job["state"] == "succeeded", "{job}");
    job["backup_id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no backup id in {job}"))
}

fn remove(ctl: &Controller, id: u64) -> anyhow::Result<()> {
    let (code, out, err) = ferryctl(ctl, &["backup", "rm", &id.to_string()])?;
    anyhow::ensure!(code == 0, "backup rm {id} failed: {out}{err}");
    Ok(())
}

/// The ids `ferryctl backup ls` lists.
fn listed(ctl: &Controller) -> anyhow::Result<Vec<u64>> {
    let (code, out, err) = ferryctl(ctl, &["backup", "ls", "-o", "json"])?;
    anyhow::ensure!(code == 0, "backup ls failed: {err}");
    Ok(json(&out)?
        .as_array()
        .map(|a| a.iter().filter_map(|b| b["id"].as_u64()).collect())
        .unwrap_or_default())
}

/// Starts the controller again and waits for the agent to reconnect.
async fn restart(ctl: &mut Controller) -> anyhow::Result<()> {
    ctl.start().await?;
    wait_online(ctl, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_catalog_is_rebuilt_from_the_repository() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let a = enrol_in(&ctl, "a", "node-a").await?;
    let da = a.path();
    std::fs::create_dir_all(da.join("vol"))?;
    let rundir = ctl.dir.path().join("run");
    let rd = rundir.as_path();
    std::fs::write(da.join("agent.toml"), config(&ctl.url(), da, rd, true))?;
    let mut agent = AgentProcess::spawn(&da.join("agent.toml"), da.join("agent.log"))?;
    wait_online(&ctl, 1).await?;
    wait_app(&ctl, "a", "web", "shop").await?;
    // The app runs, so the backups are cold ones that stop it.
    let (ok, _, err) = run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && mkdir -p {r} && echo start >> vol/starts && (sleep 300 >/dev/null 2>&1 & echo $! > {r}/web-shop.pid)",
        da.display(),
        r = rd.display()
    )))?;
    anyhow::ensure!(ok, "{err}");
    let shared = ctl.dir.path().join("shared");
    let (code, out, err) = ferryctl(
        &ctl,
        &[
            "storage",
            "add",
            "nfs",
            "shared",
            "--path",
            &shared.display().to_string(),
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");

    // Backups 1 and 2, then a copy of the catalog is set aside.
    std::fs::write(da.join("vol/data.txt"), "rows at the first backup\n")?;
    let first = backup(&ctl)?;
    let second = backup(&ctl)?;
    ctl.stop().await?;
    let catalog = ctl.path("catalog.redb");
    let saved = ctl.dir.path().join("catalog-saved.redb");
    std::fs::copy(&catalog, &saved)?;

    // Since then: backup 3 taken, backup 2 removed (from the repository
    // too).
    restart(&mut ctl).await?;
    std::fs::write(da.join("vol/data.txt"), "rows at the third backup\n")?;
    let third = backup(&ctl)?;
    remove(&ctl, second)?;
    assert!(!shared.join(format!("apps/{second}")).exists());
    assert_eq!(listed(&ctl)?, [first, third]);
    ctl.stop().await?;

    // The older catalog comes back: it knows 1 and 2, not 3.
    std::fs::copy(&saved, &catalog)?;
    let (code, out, err) = rebuild(&ctl)?;
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with(&format!(
            "added backup {third}: web/shop of cluster a, taken "
        )),
        "{out}"
    );
    assert!(
        lines[1].starts_with(&format!("removed backup {second}: web/shop of cluster a"))
            && lines[1].ends_with("(its manifest is not in the repository)"),
        "{out}"
    );
    assert_eq!(lines[2], "storage nfs: 1 added, 1 removed, 1 unchanged");
    // Nothing secret is said.
    let key = ctl.read("pki/seal.key")?;
    assert!(
        !out.contains(key.trim()) && !err.contains(key.trim()),
        "{out}{err}"
    );

    restart(&mut ctl).await?;
    assert_eq!(listed(&ctl)?, [first, third]);
    let (code, out, _) = ferryctl(&ctl, &["backup", "show", &third.to_string(), "-o", "json"])?;
    assert_eq!(code, 0);
    let shown = json(&out)?;
    assert_eq!(shown["storage"], "nfs", "{shown}");
    assert_eq!(shown["mode"], "cold", "{shown}");

    // The rebuilt backup restores, with the data it was taken with.
    let (code, out, err) = ferryctl(
        &ctl,
        &[
            "backup",
            "restore",
            &third.to_string(),
            "--to-cluster",
            "a",
            "--to-team",
            "t2",
            "-o",
            "json",
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json(&out)?["copy"], "a/t2/shop", "{out}");
    assert_eq!(
        std::fs::read_to_string(copy_volume(da, "t2", "shop")?.join("data.txt"))?,
        "rows at the third backup\n"
    );

    // A serving controller holds its catalog: refused, nothing changed.
    let (code, out, err) = rebuild(&ctl)?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("is in use") && err.contains("stop the controller"),
        "{err}"
    );
    assert!(out.is_empty(), "{out}");
    assert_eq!(listed(&ctl)?, [first, third]);

    // Catalog and repository agree after a removal: a second rebuild
    // neither adds nor removes.
    remove(&ctl, first)?;
    ctl.stop().await?;
    let (code, out, err) = rebuild(&ctl)?;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out, "storage nfs: 0 added, 0 removed, 1 unchanged\n",
        "{err}"
    );

    // The next backup gets an id none of the rebuilt ones had (the saved
    // catalog's sequence stood at the rebuilt backup's id).
    restart(&mut ctl).await?;
    let fourth = backup(&ctl)?;
    let used = BTreeSet::from([first, second, third]);
    assert!(
        !used.contains(&fourth) && fourth > third,
        "{fourth} after {used:?}"
    );
    assert_eq!(listed(&ctl)?, [third, fourth]);

    for team in ["web", "t2"] {
        if let Some(p) = pid_of(rd, team, "shop") {
            let _ = Command::new("kill").arg(p.to_string()).status();
        }
    }
    agent.stop().await?;
    ctl.stop().await?;
    Ok(())
}

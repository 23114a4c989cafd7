//! Storage locations over the real binaries: `ferryctl storage add` has an
//! agent create the repository (a local directory, a SeaweedFS bucket),
//! the secrets stay sealed in the catalog, and every refusal is clear.

use ferry_tests::{AgentProcess, Controller, DEADLINE, setup, wait_for};

use crate::foundation::agent_config;
use crate::reconnect::enrol;

fn ferryctl(ctl: &Controller, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = crate::link::ferryctl_cmd(ctl, args)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Bytes of every file under `dir`, concatenated.
fn all_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.extend(b);
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_locations_get_a_repository_and_keep_their_secrets_sealed() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    // No agent online yet: nothing can create the repository.
    let repo_dir = ctl.dir.path().join("backups");
    let path = repo_dir.display().to_string();
    let (code, _, err) = ferryctl(
        &ctl,
        &["storage", "add", "early", "shared", "--path", &path],
    )?;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no agent is online to create the repository of storage early"),
        "{err}"
    );

    let dir = enrol(&ctl, "node-1").await?;
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, agent_config(&ctl.url(), dir.path()))?;
    let mut agent = AgentProcess::spawn(&config, dir.path().join("agent.log"))?;
    wait_for("the agent online", DEADLINE, || {
        let r = ferryctl(&ctl, &["agent", "ls", "-o", "json"]).ok();
        async move {
            let (_, out, _) = r?;
            out.contains("\"online\": true").then_some(())
        }
    })
    .await?;

    // A local location: the agent creates the repository in the directory.
    let (code, out, err) = ferryctl(
        &ctl,
        &[
            "storage",
            "add",
            "disk",
            "local",
            "--cluster",
            "prod",
            "--path",
            &path,
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("storage disk added: local"), "{out}");
    let repo_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo_dir.join("config"))?)?;
    let repo_id = repo_config["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(repo_id.len(), 64, "{repo_config}");
    let (code, out, _) = ferryctl(&ctl, &["storage", "show", "disk", "-o", "json"])?;
    assert_eq!(code, 0);
    let shown: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(shown["repository_id"], repo_id.as_str());
    assert_eq!(shown["cluster"], "prod");
    assert_eq!(shown["has_credentials"], false);

    // An S3 location on SeaweedFS, with credentials from a file.
    let weed = ferry_store::testing::seaweed().await;
    let bucket = weed.new_bucket().await;
    let s3 = weed.config(&bucket, "");
    let secret = s3
        .secret_access_key
        .as_ref()
        .map(|s| s.expose().to_owned())
        .unwrap_or_default();
    let creds = ctl.dir.path().join("s3.env");
    let key_id = s3.access_key_id.clone().unwrap_or_default();
    let write_creds = |secret: &str| {
        std::fs::write(
            &creds,
            format!("AWS_ACCESS_KEY_ID={key_id}\nAWS_SECRET_ACCESS_KEY={secret}\n"),
        )
    };
    write_creds(&secret)?;
    let endpoint = s3.endpoint.clone().unwrap_or_default();
    let creds_arg = creds.display().to_string();
    let (code, out, err) = ferryctl(
        &ctl,
        &[
            "storage",
            "add",
            "eu",
            "s3",
            "--endpoint",
            &endpoint,
            "--bucket",
            &bucket,
            "--prefix",
            "ferry",
            "--credentials-file",
            &creds_arg,
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = ferryctl(&ctl, &["storage", "ls", "-o", "json"])?;
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(&out)?;
    let names: Vec<&str> = listed
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["disk", "eu"]);
    assert_eq!(listed[1]["has_credentials"], true);
    assert_eq!(listed[1]["repository_id"].as_str().map(str::len), Some(64));
    let (_, shown, _) = ferryctl(&ctl, &["storage", "show", "eu"])?;
    assert!(shown.contains("credentials: kept, sealed"), "{shown}");
    assert!(!shown.contains(&secret), "the secret was printed: {shown}");

    // A wrong secret: refused by the agent's attempt, nothing recorded.
    write_creds("wrong-secret-value")?;
    let (code, _, err) = ferryctl(
        &ctl,
        &[
            "storage",
            "add",
            "bad",
            "s3",
            "--endpoint",
            &endpoint,
            "--bucket",
            &bucket,
            "--credentials-file",
            &creds_arg,
        ],
    )?;
    assert_ne!(code, 0);
    assert!(!err.contains("wrong-secret-value"), "{err}");
    let (code, _, _) = ferryctl(&ctl, &["storage", "show", "bad"])?;
    assert_eq!(code, 2, "a failed add left a record");

    // Refusals: a taken name, an unknown cluster, a cluster with no agent
    // online, a relative path; each with its exit code and reason.
    ferryctl(&ctl, &["token", "create", "--cluster", "edge"])?;
    let local = |name: &'static str, cluster: &'static str| {
        vec![
            "storage",
            "add",
            name,
            "local",
            "--cluster",
            cluster,
            "--path",
            "/x",
        ]
    };
    let cases: [(Vec<&str>, i32, &str); 4] = [
        (
            vec!["storage", "add", "disk", "shared", "--path", &path],
            2,
            "storage location disk already exists",
        ),
        (local("far", "nowhere"), 2, "nowhere"),
        (
            local("far", "edge"),
            1,
            "no agent of cluster edge is online",
        ),
        (
            vec!["storage", "add", "rel", "shared", "--path", "rel/dir"],
            2,
            "absolute path",
        ),
    ];
    for (args, want_code, want_text) in cases {
        let (code, _, err) = ferryctl(&ctl, &args)?;
        assert_eq!(code, want_code, "{args:?}: {err}");
        assert!(err.contains(want_text), "{args:?}: {err}");
    }

    // Checks: the local location from its cluster; the S3 one from every
    // cluster, and edge has no agent online.
    let (code, out, err) = ferryctl(&ctl, &["storage", "check", "disk", "-o", "json"])?;
    assert_eq!(code, 0, "{out}{err}");
    let checks: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(checks.as_array().map(Vec::len), Some(1), "{checks}");
    assert_eq!(checks[0]["cluster"], "prod");
    assert_eq!(checks[0]["ok"], true, "{checks}");
    assert!(
        !repo_dir.join("probes").exists()
            || std::fs::read_dir(repo_dir.join("probes"))?.count() == 0
    );
    let (code, out, err) = ferryctl(&ctl, &["storage", "check", "eu"])?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("no agent of cluster edge is online"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("prod") && l.contains(" ok ")),
        "{out}"
    );
    assert!(
        err.contains("storage eu: 1 of 2 cluster(s) cannot use it"),
        "{err}"
    );

    // An existing repository is taken under the controller with its password;
    // with another password it is refused and nothing is recorded.
    let old = ctl.dir.path().join("old-repo");
    let pw = ctl.dir.path().join("old.pw");
    std::fs::write(&pw, "old repository password\n")?;
    let out = std::process::Command::new(ferry_tests::bin("ferry-agent"))
        .args(["repo", "init", "--repo"])
        .arg(&old)
        .arg("--password-file")
        .arg(&pw)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let old_id = serde_json::from_slice::<serde_json::Value>(&std::fs::read(old.join("config"))?)?
        ["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (old_s, pw_s) = (old.display().to_string(), pw.display().to_string());
    let attach = |name: &'static str| {
        vec![
            "storage",
            "add",
            name,
            "local",
            "--cluster",
            "prod",
            "--path",
            &old_s,
            "--password-file",
            &pw_s,
            "-o",
            "json",
        ]
    };
    let (code, out, err) = ferryctl(&ctl, &attach("old"))?;
    assert_eq!(code, 0, "{out}{err}");
    let attached: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(attached["repository_id"], old_id.as_str());
    std::fs::write(&pw, "not the password\n")?;
    let (code, _, err) = ferryctl(&ctl, &attach("old2"))?;
    assert_ne!(code, 0);
    assert!(
        err.contains("does not open with this location's password"),
        "{err}"
    );
    assert!(!err.contains("not the password"), "{err}");
    let (code, _, _) = ferryctl(&ctl, &["storage", "show", "old2"])?;
    assert_eq!(code, 2, "a refused attach left a record");

    // The catalog holds no secret in clear; the agent's log neither.
    ctl.stop().await?;
    let catalog = all_bytes(&ctl.data_dir());
    assert!(
        !contains(&catalog, &secret),
        "the S3 secret is in the controller's files in clear"
    );
    assert!(
        !contains(&catalog, "old repository password"),
        "a repository password is in the controller's files in clear"
    );
    let logs = agent.logs();
    assert!(
        !logs.contains(&secret),
        "the S3 secret is in the agent's log"
    );
    agent.stop().await?;

    // Removing forgets the location and leaves its repository in place.
    ctl.start().await?;
    let (code, out, _) = ferryctl(&ctl, &["storage", "rm", "disk"])?;
    assert_eq!(code, 0, "{out}");
    assert!(repo_dir.join("config").exists());
    let (code, _, err) = ferryctl(&ctl, &["storage", "rm", "disk"])?;
    assert_eq!(code, 2, "{err}");
    Ok(())
}

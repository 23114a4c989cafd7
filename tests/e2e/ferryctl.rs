//! `ferryctl` over the real controller: output for people and scripts,
//! configuration sources, and the exit codes of every kind of failure.

use std::process::{Command, Output, Stdio};

use ferry_tests::{Controller, bin, setup};

/// `ferryctl` with no inherited `FERRY_*` settings and no config file.
fn ferryctl(home: &std::path::Path) -> Command {
    let mut cmd = Command::new(bin("ferryctl"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FERRY_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("HOME", home).env_remove("XDG_CONFIG_HOME");
    cmd
}

fn as_operator(cmd: &mut Command, ctl: &Controller, dir: &str) {
    cmd.env("FERRY_CONTROLLER", ctl.url())
        .env("FERRY_CA", ctl.path(&format!("{dir}/ca.crt")))
        .env("FERRY_CERT", ctl.path(&format!("{dir}/operator.crt")))
        .env("FERRY_KEY", ctl.path(&format!("{dir}/operator.key")));
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs `cmd` with stdout a pipe whose reading end is already closed, as
/// for `ferryctl … | head -1` once `head` has exited.
fn output_into_closed_pipe(cmd: &mut Command) -> anyhow::Result<Output> {
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    Ok(cmd.stdout(writer).stderr(Stdio::piped()).output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferryctl_exits_quietly_when_its_output_is_closed() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let home = tempfile::tempdir()?;
    let commands: [&[&str]; 6] = [
        &["--help"],
        &["config"],
        &["config", "-o", "json"],
        &["cluster", "ls"],
        &["agent", "ls", "-o", "json"],
        &["token", "create", "--cluster", "edge-1"],
    ];
    for args in commands {
        let mut cmd = ferryctl(home.path());
        as_operator(&mut cmd, &ctl, "operator");
        let out = output_into_closed_pipe(cmd.args(args))?;
        let (_, stderr) = text(&out);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert_eq!(stderr, "", "{args:?}");
    }
    // The commands ran against the controller: the token's cluster exists.
    let mut cmd = ferryctl(home.path());
    as_operator(&mut cmd, &ctl, "operator");
    let out = cmd.args(["cluster", "ls", "-o", "json"]).output()?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let clusters: serde_json::Value = serde_json::from_str(&stdout)?;
    assert_eq!(clusters[0]["name"], "edge-1", "{stdout}");
    ctl.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferryctl_lists_issues_tokens_and_reads_its_config_file() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let home = tempfile::tempdir()?;

    // Token for a new cluster, as JSON for scripts.
    let mut cmd = ferryctl(home.path());
    as_operator(&mut cmd, &ctl, "operator");
    let out = cmd
        .args([
            "token",
            "create",
            "--cluster",
            "edge-1",
            "--ttl",
            "30m",
            "-o",
            "json",
        ])
        .output()?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let token: serde_json::Value = serde_json::from_str(&stdout)?;
    assert_eq!(token["cluster"], "edge-1");
    assert!(
        token["token"]
            .as_str()
            .is_some_and(|t| t.starts_with("fjt_"))
    );
    assert!(
        token["ca_fingerprint"]
            .as_str()
            .is_some_and(|f| f.starts_with("sha256:") && f.len() == 71)
    );
    // The secret is printed for the operator, never logged by the controller.
    let secret = token["token"].as_str().unwrap_or_default();
    assert!(!ctl.logs().contains(secret));

    // The same settings from the default config file instead of the
    // environment; relative paths are relative to the file.
    let cfg_dir = home.path().join(".config/ferry");
    std::fs::create_dir_all(&cfg_dir)?;
    for f in ["ca.crt", "operator.crt", "operator.key"] {
        std::fs::copy(ctl.path(&format!("operator/{f}")), cfg_dir.join(f))?;
    }
    std::fs::write(
        cfg_dir.join("ferryctl.toml"),
        format!(
            "controller = \"{}\"\nca = \"ca.crt\"\ncert = \"operator.crt\"\nkey = \"operator.key\"\n",
            ctl.url()
        ),
    )?;
    let out = ferryctl(home.path()).args(["cluster", "ls"]).output()?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("AGENTS"),
        "{stdout}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("edge-1 ") && l.contains(" 0 ")),
        "{stdout}"
    );

    let out = ferryctl(home.path())
        .args(["agent", "ls", "-o", "json"])
        .output()?;
    assert!(out.status.success());
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout)?,
        serde_json::json!([])
    );

    // `config` says where each setting comes from; a flag beats the file.
    let out = ferryctl(home.path())
        .args([
            "config",
            "-o",
            "json",
            "--controller",
            "https://elsewhere:1",
        ])
        .output()?;
    let cfg: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(cfg["controller"]["value"], "https://elsewhere:1");
    assert_eq!(cfg["controller"]["source"], "flag");
    assert_eq!(cfg["cert"]["source"], "file");

    // Bad input is exit code 2 with the controller's reason.
    let out = ferryctl(home.path())
        .args(["token", "create", "--cluster", "Not_A_Name"])
        .output()?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Not_A_Name"), "{stderr}");
    ctl.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferryctl_failures_have_clear_messages_and_exit_codes() -> anyhow::Result<()> {
    setup();
    let home = tempfile::tempdir()?;

    // Nothing configured: usage error, and it says how to configure.
    let out = ferryctl(home.path()).args(["cluster", "ls"]).output()?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--controller") && stderr.contains("FERRY_CONTROLLER"),
        "{stderr}"
    );

    let mut ctl = Controller::init()?;
    let addr = ctl.start().await?;

    // A controller that is not running: exit 3, "cannot reach".
    let mut other = Controller::init()?;
    let other_addr = other.start().await?;
    other.stop().await?;
    let mut cmd = ferryctl(home.path());
    as_operator(&mut cmd, &other, "operator");
    let out = cmd
        .env("FERRY_CONTROLLER", format!("https://{other_addr}"))
        .args(["cluster", "ls"])
        .output()?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("cannot reach the controller"), "{stderr}");

    // An operator certificate from another Ferry CA: refused, exit 3.
    let mut cmd = ferryctl(home.path());
    as_operator(&mut cmd, &other, "operator");
    let out = cmd
        .env("FERRY_CONTROLLER", format!("https://{addr}"))
        .env("FERRY_CA", ctl.path("operator/ca.crt"))
        .args(["cluster", "ls"])
        .output()?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("refused this client"), "{stderr}");

    // Trusting the wrong CA for the server: refused by ferryctl itself.
    let mut cmd = ferryctl(home.path());
    as_operator(&mut cmd, &ctl, "operator");
    let out = cmd
        .env("FERRY_CA", other.path("operator/ca.crt"))
        .args(["cluster", "ls"])
        .output()?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("not the controller this client trusts"),
        "{stderr}"
    );

    // A missing key file: exit 2, naming the file; no key material printed.
    let mut cmd = ferryctl(home.path());
    as_operator(&mut cmd, &ctl, "operator");
    let out = cmd
        .env("FERRY_KEY", home.path().join("absent.key"))
        .args(["agent", "ls"])
        .output()?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("absent.key"), "{stderr}");
    assert!(!stderr.contains("PRIVATE KEY"));
    ctl.stop().await?;
    Ok(())
}

//! What the daemons write is private to their user, whatever the umask
//! they start with.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;
use ferry_proto::v1 as pb;
use ferry_tests::{Controller, command, run, setup};

use crate::foundation::token;

fn mode(path: &Path) -> anyhow::Result<u32> {
    let meta = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(meta.permissions().mode() & 0o7777)
}

fn chmod(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_keep_their_files_private_whatever_the_umask() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init_with_umask(Some("000"))?;
    for (rel, want) in [
        ("", 0o700),
        ("pki", 0o700),
        ("operator", 0o700),
        ("pki/ca.key", 0o600),
        ("pki/server.key", 0o600),
        ("operator/operator.key", 0o600),
    ] {
        let got = mode(&ctl.path(rel))?;
        assert_eq!(got, want, "controller {rel:?} is {got:04o}");
    }
    // Certificates are public, but only their owner may change them.
    for rel in [
        "pki/ca.crt",
        "pki/server.crt",
        "operator/ca.crt",
        "operator/operator.crt",
    ] {
        let got = mode(&ctl.path(rel))?;
        assert_eq!(got & 0o022, 0, "controller {rel} is {got:04o}");
    }

    ctl.start().await?;
    let mut op = ctl.operator().await?;
    // A token was issued, so the catalog is open.
    let t = token(&mut op, "prod", 0).await?;
    let got = mode(&ctl.path("catalog.redb"))?;
    assert_eq!(got, 0o600, "catalog.redb is {got:04o}");

    // `join` creates its data directory.
    let agent_root = tempfile::tempdir()?;
    let agent_dir = agent_root.path().join("agent");
    let (ok, _, err) = run(command("ferry-agent", Some("000"))
        .args(["join", "--controller", &ctl.url(), "--token", &t.token])
        .args(["--ca-fingerprint", &t.ca_fingerprint, "--node", "n1"])
        .arg("--data-dir")
        .arg(&agent_dir))?;
    assert!(ok, "join failed: {err}");
    for (rel, want) in [("", 0o700), ("agent.key", 0o600), ("agent.toml", 0o600)] {
        let got = mode(&agent_dir.join(rel))?;
        assert_eq!(got, want, "agent {rel:?} is {got:04o}");
    }
    for rel in ["agent.crt", "ca.crt"] {
        let got = mode(&agent_dir.join(rel))?;
        assert_eq!(got & 0o022, 0, "agent {rel} is {got:04o}");
    }

    // Left open (by an older Ferry, a careless copy): `serve` tightens what
    // is its own, and warns about the data directory, which it leaves be.
    ctl.stop().await?;
    chmod(&ctl.path("catalog.redb"), 0o644)?;
    chmod(&ctl.path("pki"), 0o755)?;
    chmod(&ctl.path("operator"), 0o755)?;
    chmod(&ctl.data_dir(), 0o755)?;
    ctl.start().await?;
    let mut op = ctl.operator().await?;
    let clusters = op
        .list_clusters(pb::ListClustersRequest::default())
        .await?
        .into_inner()
        .clusters;
    assert_eq!(clusters.len(), 1);
    for (rel, want) in [
        ("catalog.redb", 0o600),
        ("pki", 0o700),
        ("operator", 0o700),
        ("", 0o755),
    ] {
        let got = mode(&ctl.path(rel))?;
        assert_eq!(got, want, "after restart, controller {rel:?} is {got:04o}");
    }
    assert!(
        ctl.logs()
            .contains("the data directory is open to other users"),
        "{}",
        ctl.logs()
    );
    ctl.stop().await?;
    Ok(())
}

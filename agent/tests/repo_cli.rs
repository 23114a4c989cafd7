//! The `ferry-agent repo …` / `snapshot …` commands, run as the real binary
//! against a local repository.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_ferry-agent");
const PASSWORD: &str = "s3cr3t-pass-phrase";

fn run(repo: &Path, pwfile: &Path, args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .args(args)
        .arg("--repo")
        .arg(repo)
        .arg("--password-file")
        .arg(pwfile)
        .env_remove("FERRY_REPO")
        .env_remove("FERRY_REPO_PASSWORD")
        .output()
        .expect("run ferry-agent");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains(PASSWORD), "the password was echoed: {all}");
    out
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cli_cycle_create_ls_restore_verify_forget_prune() {
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = tmp.path().join("repo");
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n")).expect("write");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).expect("mkdir");
    std::fs::write(src.join("d/a.txt"), "alpha\n".repeat(1000)).expect("write");
    std::fs::write(src.join("b.bin"), vec![7u8; 3 << 20]).expect("write");

    ok(&run(&repo, &pw, &["repo", "init"]));
    // A second init is refused as bad input.
    assert_eq!(run(&repo, &pw, &["repo", "init"]).status.code(), Some(2));

    let out = ok(&run(
        &repo,
        &pw,
        &[
            "snapshot",
            "create",
            src.to_str().expect("utf8"),
            "--tag",
            "app=web",
            "-o",
            "json",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json summary");
    let id = v["snapshot"].as_str().expect("snapshot id").to_owned();
    assert_eq!(v["files"], 2);
    assert!(v["bytes_read"].as_u64().expect("bytes") >= 3 << 20);
    assert!(v["mib_per_s"].as_f64().is_some());

    // No-change run reads nothing and picks the first as parent.
    let out = ok(&run(
        &repo,
        &pw,
        &[
            "snapshot",
            "create",
            src.to_str().expect("utf8"),
            "--tag",
            "app=web",
            "-o",
            "json",
        ],
    ));
    let v2: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v2["bytes_read"], 0);
    assert_eq!(v2["parent"].as_str(), Some(id.as_str()));

    // Dry run: summary line, nothing stored.
    let out = ok(&run(
        &repo,
        &pw,
        &[
            "snapshot",
            "create",
            src.to_str().expect("utf8"),
            "--dry-run",
            "--no-parent",
        ],
    ));
    assert!(out.starts_with("dry run"), "{out}");
    assert!(out.contains("MiB/s"), "{out}");

    let out = ok(&run(&repo, &pw, &["snapshot", "ls", "-o", "json"]));
    let list: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(list.as_array().map(|a| a.len()), Some(2));

    let target = tmp.path().join("restored");
    ok(&run(
        &repo,
        &pw,
        &[
            "snapshot",
            "restore",
            &id[..12],
            "--target",
            target.to_str().expect("utf8"),
        ],
    ));
    assert_eq!(
        std::fs::read(target.join("b.bin")).expect("read"),
        vec![7u8; 3 << 20]
    );
    let sub = tmp.path().join("sub");
    ok(&run(
        &repo,
        &pw,
        &[
            "snapshot",
            "restore",
            &format!("{id}:d"),
            "--target",
            sub.to_str().expect("utf8"),
        ],
    ));
    assert!(sub.join("a.txt").is_file());

    let out = ok(&run(&repo, &pw, &["repo", "verify", "--read-data"]));
    assert!(out.contains("0 problem(s)"), "{out}");
    ok(&run(
        &repo,
        &pw,
        &["snapshot", "verify", &id, "--read-data=50"],
    ));

    // Keys: add, list, rotate.
    let pw2 = tmp.path().join("pw2");
    std::fs::write(&pw2, "another-password").expect("write");
    ok(&run(
        &repo,
        &pw,
        &[
            "repo",
            "key",
            "add",
            "--new-password-file",
            pw2.to_str().expect("utf8"),
        ],
    ));
    let out = ok(&run(&repo, &pw2, &["repo", "key", "ls", "-o", "json"]));
    let keys: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(keys.as_array().map(|a| a.len()), Some(2));

    // Forget both, prune with no delay: first pass marks, second deletes.
    let ids: Vec<String> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_owned())
        .collect();
    let mut args = vec!["snapshot", "forget"];
    args.extend(ids.iter().map(|s| s.as_str()));
    ok(&run(&repo, &pw, &args));
    ok(&run(&repo, &pw, &["repo", "prune", "--safety-delay", "0s"]));
    let out = ok(&run(
        &repo,
        &pw,
        &["repo", "prune", "--safety-delay", "0s", "-o", "json"],
    ));
    let r: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(r["packs_deleted"].as_u64().expect("n") >= 1, "{r}");
}

#[test]
fn cli_errors_have_clear_messages_and_exit_codes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = tmp.path().join("repo");
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, PASSWORD).expect("write");
    // Not a repository.
    let out = run(&repo, &pw, &["snapshot", "ls"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no repository"));
    ok(&run(&repo, &pw, &["repo", "init"]));
    // Wrong password.
    let bad = tmp.path().join("bad");
    std::fs::write(&bad, "not it").expect("write");
    let out = run(&repo, &bad, &["snapshot", "ls"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong password"));
    // Unknown snapshot, bad tag, bad duration, missing source.
    let out = run(
        &repo,
        &pw,
        &[
            "snapshot",
            "restore",
            "abcdef12",
            "--target",
            "/nonexistent-x",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("snapshot abcdef12 not found"));
    let out = run(
        &repo,
        &pw,
        &["snapshot", "create", "/tmp", "--tag", "novalue"],
    );
    assert_eq!(out.status.code(), Some(2));
    let out = run(&repo, &pw, &["repo", "prune", "--safety-delay", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&repo, &pw, &["snapshot", "create", "/nonexistent/src"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/src"));
    // A password on the command line is not accepted.
    let out = Command::new(BIN)
        .args(["repo", "init", "--password", "x"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

/// Without credentials in the location, the standard AWS chain provides
/// them (here the environment), and nothing of them reaches the output.
#[test]
fn s3_credentials_come_from_the_aws_environment() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let weed = rt.block_on(ferry_store::testing::seaweed());
    let bucket = rt.block_on(weed.new_bucket());
    let tmp = tempfile::tempdir().expect("tmp");
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, PASSWORD).expect("write");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("f"), "over s3\n".repeat(100)).expect("write");
    let location = format!("s3:{}/{bucket}/via-env", weed.endpoint());
    let agent = |args: &[&str], with_keys: bool| {
        let mut c = Command::new(BIN);
        c.args(args)
            .arg("--repo")
            .arg(&location)
            .arg("--password-file")
            .arg(&pw)
            .env_remove("FERRY_REPO")
            .env_remove("FERRY_REPO_PASSWORD")
            .env_remove("AWS_PROFILE")
            .env("AWS_CONFIG_FILE", tmp.path().join("no-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                tmp.path().join("no-credentials"),
            )
            .env("AWS_EC2_METADATA_DISABLED", "true");
        if with_keys {
            c.env("AWS_ACCESS_KEY_ID", ferry_store::testing::ACCESS_KEY)
                .env("AWS_SECRET_ACCESS_KEY", ferry_store::testing::SECRET_KEY);
        } else {
            c.env_remove("AWS_ACCESS_KEY_ID")
                .env_remove("AWS_SECRET_ACCESS_KEY");
        }
        let out = c.output().expect("run ferry-agent");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !all.contains(ferry_store::testing::SECRET_KEY),
            "the secret key was echoed: {all}"
        );
        out
    };
    ok(&agent(&["repo", "init"], true));
    ok(&agent(
        &["snapshot", "create", src.to_str().expect("utf8")],
        true,
    ));
    let out = ok(&agent(&["snapshot", "ls", "-o", "json"], true));
    let list: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(list.as_array().map(|a| a.len()), Some(1));
    // Without any credentials the command fails at once (no retries for
    // a failure a retry cannot fix) and says why.
    let out = agent(&["snapshot", "ls"], false);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no credentials"), "{stderr}");
    assert!(!stderr.contains("gave up after"), "retried: {stderr}");
}

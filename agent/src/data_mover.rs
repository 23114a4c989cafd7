//! `ferry-agent repo …` and `ferry-agent snapshot …`: argument parsing and
//! runners. Exit codes: 0 done, 1 failed, 2 bad usage or input.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

use ferry_repo::backup::{BackupOptions, Progress, ProgressInfo};
use ferry_repo::format::SnapshotId;
use ferry_repo::verify::VerifyOptions;
use ferry_repo::{RepoError, Repository};
use ferry_store::ObjectStore;
use ferry_store::location::StorageConfig;

/// Options shared by every repository command.
#[derive(Debug, Args, Clone)]
pub struct RepoGlobal {
    /// Repository location: `/path`, `local:/path` or
    /// `s3:http(s)://ENDPOINT/BUCKET[/PREFIX]`.
    #[arg(long, env = "FERRY_REPO", global = true)]
    pub repo: Option<String>,
    /// File holding the repository password (else env FERRY_REPO_PASSWORD).
    #[arg(long, global = true, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Output format: a table or text for people, JSON for scripts.
    #[arg(short, long, value_enum, default_value = "table", global = true)]
    pub output: Format,
    /// Same as `--output json`: the old spelling, kept for scripts.
    #[arg(long, global = true, hide = true, conflicts_with = "output")]
    json: bool,
}

impl RepoGlobal {
    /// Whether results are printed as JSON.
    pub fn json(&self) -> bool {
        self.json || self.output == Format::Json
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct RepoArgs {
    #[command(flatten)]
    pub global: RepoGlobal,
    #[command(subcommand)]
    pub command: RepoCommand,
}

#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Create a new repository.
    Init,
    /// Manage key files (passwords) without rewriting data.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Check the repository's structure and optionally read data back.
    Verify(VerifyArgs),
    /// Mark unreferenced packs and delete those marked long enough ago.
    Prune {
        /// How long a pack stays marked before it may be deleted.
        #[arg(long, default_value = "24h")]
        safety_delay: String,
    },
    /// Repair the repository.
    #[command(subcommand)]
    Repair(RepairCommand),
    /// Remove stale locks left by killed processes (a live operation
    /// refreshes its lock; one not refreshed for 30 minutes is stale).
    Unlock {
        /// Remove every lock, live ones too: only when no Ferry process uses
        /// the repository.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RepairCommand {
    /// Rebuild the index from the packs (after a lost or corrupt index
    /// object).
    Index,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Add a key file for another password (read from --new-password-file
    /// or env FERRY_NEW_REPO_PASSWORD).
    Add {
        #[arg(long, value_name = "FILE")]
        new_password_file: Option<PathBuf>,
        /// Label shown by `key ls`.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List key files.
    Ls,
    /// Remove a key file (not the one in use).
    Rm { id: String },
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only this snapshot (id or unique prefix).
    pub snapshot: Option<String>,
    /// Also download and check this percentage of packs (default 100).
    #[arg(long, num_args = 0..=1, default_missing_value = "100", value_name = "PERCENT")]
    pub read_data: Option<u8>,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub global: RepoGlobal,
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Back up a directory.
    Create {
        path: PathBuf,
        /// Tag as key=value (repeatable).
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// Parent snapshot (default: the latest with the same host, path and tags).
        #[arg(long)]
        parent: Option<String>,
        /// Read every file even if unchanged.
        #[arg(long, conflicts_with = "parent")]
        no_parent: bool,
        /// Run the whole pipeline, store nothing.
        #[arg(long)]
        dry_run: bool,
        /// Host name to record (default: this machine's).
        #[arg(long)]
        host: Option<String>,
        /// Files read at the same time (default 8; more helps a cold disk
        /// with deep queues).
        #[arg(long, value_name = "N")]
        read_concurrency: Option<usize>,
        /// Copy the files to read into memory first, up to MIB, and store
        /// them after (what a cold backup's delta pass does).
        #[arg(long, value_name = "MIB")]
        read_ahead_mib: Option<usize>,
    },
    /// List snapshots.
    Ls,
    /// Restore ID or ID:SUBPATH into a directory.
    Restore {
        spec: String,
        #[arg(long)]
        target: PathBuf,
    },
    /// Verify (same as `repo verify`).
    Verify(VerifyArgs),
    /// Delete snapshot manifests (data goes with the next prune).
    Forget {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// A failure with its exit code.
#[derive(Debug)]
struct Failure {
    code: i32,
    message: String,
}

impl From<RepoError> for Failure {
    fn from(e: RepoError) -> Self {
        Failure {
            code: if e.is_usage() { 2 } else { 1 },
            message: ferry_core::Chain(&e).to_string(),
        }
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

async fn open_store(g: &RepoGlobal) -> Result<Arc<dyn ObjectStore>, Failure> {
    let loc = g
        .repo
        .as_deref()
        .ok_or_else(|| usage("no repository given: use --repo LOCATION or FERRY_REPO"))?;
    let config: StorageConfig = loc
        .parse()
        .map_err(|e: ferry_store::location::LocationError| usage(e.to_string()))?;
    ferry_store::open(&config)
        .await
        .map_err(|e| Failure::from(RepoError::from(e)))
}

fn read_secret(file: Option<&Path>, env: &str, what: &str) -> Result<Vec<u8>, Failure> {
    let raw = match file {
        Some(f) => std::fs::read(f)
            .map_err(|e| usage(format!("cannot read {what} file {}: {e}", f.display())))?,
        None => std::env::var_os(env)
            .map(std::os::unix::ffi::OsStringExt::into_vec)
            .ok_or_else(|| {
                usage(
                    format!("no {what}: use --{what}-file FILE or {env}")
                        .replace("new password-file", "new-password-file"),
                )
            })?,
    };
    let mut pw = raw;
    while pw.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        pw.pop();
    }
    if pw.is_empty() {
        return Err(usage(format!("{what} is empty")));
    }
    Ok(pw)
}

fn password(g: &RepoGlobal) -> Result<Vec<u8>, Failure> {
    read_secret(
        g.password_file.as_deref(),
        "FERRY_REPO_PASSWORD",
        "password",
    )
}

async fn open(g: &RepoGlobal) -> Result<Repository, Failure> {
    let store = open_store(g).await?;
    let pw = password(g)?;
    Ok(Repository::open(store, &pw)
        .await?
        .with_cancel(cancel_on_signal()))
}

/// A token cancelled by SIGINT or SIGTERM: the running operation stops,
/// removes its lock and leaves the repository valid.
fn cancel_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("\ninterrupted: stopping…");
        t.cancel();
    });
    token
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    );
}

fn report(res: Result<(), Failure>) -> i32 {
    match res {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("error: {}", f.message);
            f.code
        }
    }
}

/// Runs `ferry-agent repo …`; returns the exit code.
pub async fn run_repo(args: RepoArgs) -> i32 {
    report(repo_inner(args).await)
}

/// Runs `ferry-agent snapshot …`; returns the exit code.
pub async fn run_snapshot(args: SnapshotArgs) -> i32 {
    report(snapshot_inner(args).await)
}

async fn repo_inner(args: RepoArgs) -> Result<(), Failure> {
    let g = &args.global;
    match args.command {
        RepoCommand::Init => {
            let store = open_store(g).await?;
            let pw = password(g)?;
            let label = ferry_repo::hostname();
            let repo = Repository::init(store, &pw, &label).await?;
            if g.json() {
                print_json(
                    &serde_json::json!({"id": repo.config().id, "key": repo.key_id().to_hex()}),
                );
            } else {
                println!(
                    "created repository {} (key {})",
                    repo.config().id,
                    repo.key_id().short()
                );
            }
        }
        RepoCommand::Key(k) => {
            let repo = open(g).await?;
            match k {
                KeyCommand::Add {
                    new_password_file,
                    label,
                } => {
                    let pw = read_secret(
                        new_password_file.as_deref(),
                        "FERRY_NEW_REPO_PASSWORD",
                        "new password",
                    )?;
                    let id = repo.add_key(&pw, &label).await?;
                    if g.json() {
                        print_json(&serde_json::json!({"id": id.to_hex()}));
                    } else {
                        println!("added key {}", id.short());
                    }
                }
                KeyCommand::Ls => {
                    let keys = repo.list_keys().await?;
                    if g.json() {
                        let v: Vec<_> = keys
                            .iter()
                            .map(|(id, k)| serde_json::json!({"id": id.to_hex(), "label": k.label, "created": k.created, "current": *id == repo.key_id()}))
                            .collect();
                        print_json(&v);
                    } else {
                        for (id, k) in keys {
                            let cur = if id == repo.key_id() { "*" } else { " " };
                            println!("{cur} {}  {}  {}", id.short(), k.created, k.label);
                        }
                    }
                }
                KeyCommand::Rm { id } => {
                    let id = repo.remove_key(&id).await?;
                    println!("removed key {}", id.short());
                }
            }
        }
        RepoCommand::Verify(v) => verify(g, v).await?,
        RepoCommand::Repair(RepairCommand::Index) => {
            let repo = open(g).await?;
            let r = repo.repair_index().await?;
            if g.json() {
                print_json(&r);
            } else {
                println!(
                    "read {} index object(s); re-indexed {} pack(s); removed {} unreadable index object(s)",
                    r.index_objects, r.packs_recovered, r.index_objects_removed
                );
            }
        }
        RepoCommand::Unlock { all } => {
            let repo = open(g).await?;
            let removed = repo.unlock(all).await?;
            if g.json() {
                let v: Vec<_> = removed
                    .iter()
                    .map(|(k, l)| serde_json::json!({"lock": k, "kind": l.kind, "owner": l.owner, "expires": l.expires}))
                    .collect();
                print_json(&v);
            } else {
                for (k, l) in &removed {
                    println!("removed {} lock {k} of {}", l.kind, l.owner);
                }
                println!("{} lock(s) removed", removed.len());
            }
        }
        RepoCommand::Prune { safety_delay } => {
            let delay =
                ferry_core::duration::parse(&safety_delay).map_err(|e| usage(e.to_string()))?;
            let repo = open(g).await?;
            let r = repo.prune(delay).await?;
            if g.json() {
                print_json(&r);
            } else {
                println!(
                    "packs: {} total, {} referenced ({} partly, kept), {} newly marked, {} waiting, {} deleted ({} bytes){}",
                    r.packs_total,
                    r.packs_referenced,
                    r.packs_partly_referenced,
                    r.packs_newly_marked,
                    r.packs_marked_waiting,
                    r.packs_deleted,
                    r.bytes_deleted,
                    if r.deferred_by_backup {
                        "; deletion deferred: a backup is running"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    Ok(())
}

async fn verify(g: &RepoGlobal, v: VerifyArgs) -> Result<(), Failure> {
    let repo = open(g).await?;
    let snapshot = match &v.snapshot {
        Some(s) => Some(repo.resolve_snapshot(s).await?),
        None => None,
    };
    if v.read_data.is_some_and(|p| p == 0 || p > 100) {
        return Err(usage("--read-data takes a percentage from 1 to 100"));
    }
    let r = repo
        .verify(VerifyOptions {
            snapshot,
            read_data_percent: v.read_data,
        })
        .await?;
    if g.json() {
        print_json(&r);
    } else {
        for p in &r.problems {
            eprintln!("problem: {p}");
        }
        println!(
            "checked {} snapshot(s), {} tree(s), {} data blob(s), {} index object(s), {} pack(s), read {} pack(s): {} problem(s)",
            r.snapshots,
            r.trees,
            r.data_blobs,
            r.index_objects,
            r.packs,
            r.packs_read,
            r.problems.len()
        );
    }
    r.into_result().map(|_| ()).map_err(Failure::from)
}

/// `1.5 GiB`-style sizes for tables.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn parse_tags(tags: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    let mut out = BTreeMap::new();
    for t in tags {
        let (k, v) = t
            .split_once('=')
            .ok_or_else(|| usage(format!("tag {t:?} is not KEY=VALUE")))?;
        if k.is_empty() {
            return Err(usage(format!("tag {t:?} has an empty key")));
        }
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// Prints progress to stderr, at most four times a second, when stderr is
/// a terminal.
struct TermProgress {
    last: std::sync::Mutex<Instant>,
}

impl Progress for TermProgress {
    fn update(&self, p: &ProgressInfo) {
        if let Ok(mut last) = self.last.lock()
            && last.elapsed() >= Duration::from_millis(250)
        {
            *last = Instant::now();
            eprint!(
                "\r{} files, {:.1} MiB, {:.1} MiB/s   ",
                p.files,
                p.bytes as f64 / 1048576.0,
                p.rate() / 1048576.0
            );
        }
    }
}

fn term_progress() -> Option<Arc<dyn Progress>> {
    std::io::stderr().is_terminal().then(|| {
        Arc::new(TermProgress {
            last: std::sync::Mutex::new(Instant::now()),
        }) as Arc<dyn Progress>
    })
}

async fn snapshot_inner(args: SnapshotArgs) -> Result<(), Failure> {
    let g = &args.global;
    match args.command {
        SnapshotCommand::Create {
            path,
            tags,
            parent,
            no_parent,
            dry_run,
            host,
            read_concurrency,
            read_ahead_mib,
        } => {
            let tags = parse_tags(&tags)?;
            let repo = open(g).await?;
            let parent: Option<SnapshotId> = match parent {
                Some(p) => Some(repo.resolve_snapshot(&p).await?),
                None => None,
            };
            let progress = term_progress();
            let out = repo
                .backup(
                    &path,
                    BackupOptions {
                        tags,
                        parent,
                        no_parent,
                        dry_run,
                        host,
                        upload_concurrency: None,
                        read_concurrency,
                        read_ahead: read_ahead_mib.map(|m| m.saturating_mul(1 << 20)),
                        ..BackupOptions::default()
                    },
                    progress.clone(),
                )
                .await?;
            if progress.is_some() {
                eprintln!();
            }
            let s = &out.snapshot.summary;
            let secs = (s.duration_ms as f64 / 1000.0).max(0.001);
            let mib_s = s.bytes_read as f64 / 1048576.0 / secs;
            if g.json() {
                print_json(&serde_json::json!({
                    "snapshot": out.id.map(|i| i.to_hex()),
                    "dry_run": dry_run,
                    "parent": out.snapshot.parent.map(|i| i.to_hex()),
                    "files": s.files,
                    "files_unchanged": s.files_unchanged,
                    "dirs": s.dirs,
                    "bytes_total": s.bytes_total,
                    "bytes_read": s.bytes_read,
                    "bytes_new": s.bytes_new,
                    "bytes_stored": s.bytes_stored,
                    "packs": s.packs_written,
                    "duration_s": secs,
                    "mib_per_s": mib_s,
                }));
            } else {
                println!(
                    "{} {}: {} files ({} unchanged), read {} bytes, new {} bytes, stored {} bytes in {} packs, {:.3} s, {:.1} MiB/s",
                    if dry_run { "dry run" } else { "snapshot" },
                    out.id.map(|i| i.to_hex()).unwrap_or_else(|| "-".into()),
                    s.files,
                    s.files_unchanged,
                    s.bytes_read,
                    s.bytes_new,
                    s.bytes_stored,
                    s.packs_written,
                    secs,
                    mib_s
                );
            }
        }
        SnapshotCommand::Ls => {
            let repo = open(g).await?;
            let scan = repo.scan_snapshots().await?;
            for (id, e) in &scan.unreadable {
                eprintln!("warning: skipping snapshot {id}: {e}");
            }
            let snaps = scan.snapshots;
            if g.json() {
                let v: Vec<_> = snaps
                    .iter()
                    .map(|(id, s)| serde_json::json!({"id": id.to_hex(), "time": s.time, "host": s.host, "path": s.path, "tags": s.tags, "parent": s.parent.map(|p| p.to_hex()), "files": s.summary.files, "bytes": s.summary.bytes_total}))
                    .collect();
                print_json(&v);
            } else {
                println!(
                    "{:<8}  {:<20}  {:<12}  {:>9}  {:>10}  PATH  TAGS",
                    "ID", "TIME", "HOST", "FILES", "SIZE"
                );
                for (id, s) in snaps {
                    let tags: Vec<String> =
                        s.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!(
                        "{:<8}  {:<20}  {:<12}  {:>9}  {:>10}  {}  {}",
                        id.short(),
                        s.time,
                        s.host,
                        s.summary.files,
                        human_bytes(s.summary.bytes_total),
                        s.path,
                        tags.join(",")
                    );
                }
            }
        }
        SnapshotCommand::Restore { spec, target } => {
            let (id, sub) = match spec.split_once(':') {
                Some((i, s)) => (i.to_owned(), Some(s.to_owned())),
                None => (spec.clone(), None),
            };
            let repo = open(g).await?;
            let id = repo.resolve_snapshot(&id).await?;
            let progress = term_progress();
            let r = repo
                .restore(id, sub.as_deref(), &target, progress.clone())
                .await?;
            if progress.is_some() {
                eprintln!();
            }
            let secs = (r.duration_ms as f64 / 1000.0).max(0.001);
            if g.json() {
                let mut v = serde_json::to_value(&r).unwrap_or_default();
                v["mib_per_s"] = serde_json::json!(r.bytes_written as f64 / 1048576.0 / secs);
                print_json(&v);
            } else {
                println!(
                    "restored {} files, {} dirs, {} symlinks, {} hard links, {} bytes ({} written) in {:.3} s, {:.1} MiB/s",
                    r.files,
                    r.dirs,
                    r.symlinks,
                    r.hardlinks,
                    r.bytes_total,
                    r.bytes_written,
                    secs,
                    r.bytes_written as f64 / 1048576.0 / secs
                );
            }
            if !r.skipped.is_empty() {
                for s in &r.skipped {
                    eprintln!("not restored: {s}");
                }
                return Err(Failure {
                    code: 1,
                    message: format!(
                        "{} entr{} could not be restored (see above)",
                        r.skipped.len(),
                        if r.skipped.len() == 1 { "y" } else { "ies" }
                    ),
                });
            }
        }
        SnapshotCommand::Verify(v) => verify(g, v).await?,
        SnapshotCommand::Forget { ids } => {
            let repo = open(g).await?;
            let mut resolved = Vec::new();
            for i in &ids {
                resolved.push(repo.resolve_snapshot(i).await?);
            }
            repo.forget(&resolved).await?;
            for i in resolved {
                println!("forgot snapshot {}", i.short());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Command {
        Repo(RepoArgs),
        Snapshot(SnapshotArgs),
    }

    /// Whether `ferry-agent ARGV…` prints JSON.
    fn json(argv: &[&str]) -> Result<bool, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("ferry-agent").chain(argv.iter().copied()))?;
        let g = match cli.command {
            Command::Repo(a) => a.global,
            Command::Snapshot(a) => a.global,
        };
        Ok(g.json())
    }

    #[test]
    fn output_is_spelled_like_ferryctl() {
        for argv in [
            &["snapshot", "ls", "-o", "json"][..],
            &["snapshot", "ls", "--output", "json"],
            &["snapshot", "ls", "--output=json"],
            &["repo", "-o", "json", "key", "ls"],
            &["repo", "prune", "--safety-delay", "0s", "-o", "json"],
            &["snapshot", "ls", "--json"],
        ] {
            assert!(json(argv).expect("parse"), "{argv:?}");
        }
        for argv in [
            &["snapshot", "ls"][..],
            &["snapshot", "ls", "-o", "table"],
            &["repo", "verify", "--output", "table"],
        ] {
            assert!(!json(argv).expect("parse"), "{argv:?}");
        }
        for argv in [
            &["snapshot", "ls", "-o", "yaml"][..],
            &["snapshot", "ls", "--output"],
            &["snapshot", "ls", "--json", "-o", "table"],
        ] {
            assert!(json(argv).is_err(), "{argv:?} was taken");
        }
    }
}

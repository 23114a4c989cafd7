//! `ferryctl app backup|migrate`, `ferryctl backup …` and `ferryctl job …`:
//! long work runs as a job on the controller; the command follows it
//! (a progress line on a terminal, plain lines otherwise) unless told to
//! `--detach`, and exits 1 if the job did not succeed.

use std::io::IsTerminal;

use clap::{Args, Subcommand};
use ferry_proto::v1;
use serde::Serialize;

use crate::config::Effective;
use crate::connect::{self, CliError};
use crate::output::{Format, Table, emit, when};

#[derive(Debug, Args)]
pub struct Follow {
    /// Print the job id and return at once (follow it with `ferryctl job watch ID`)
    #[arg(long)]
    pub detach: bool,
}

#[derive(Debug, Args)]
pub struct Target {
    /// The cluster the copy goes to
    #[arg(long)]
    pub to_cluster: String,
    /// The team the copy belongs to
    #[arg(long)]
    pub to_team: String,
    /// The copy's name [default: the original's if free there, else NAME-copy]
    #[arg(long = "as")]
    pub as_name: Option<String>,
    /// Remove the original once the copy runs (its data is kept)
    #[arg(long)]
    pub delete_source: bool,
}

#[derive(Debug, Args)]
pub struct AppRef {
    /// The app's name
    pub app: String,
    /// The app's cluster
    #[arg(long)]
    pub cluster: String,
    /// The app's team
    #[arg(long)]
    pub team: String,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub app: AppRef,
    /// cold (stop stateful components for the final delta), refuse (refuse
    /// while one runs) or hot (no stop)
    #[arg(long, default_value = "cold")]
    pub mode: String,
    /// The storage location [default: the only one that fits]
    #[arg(long)]
    pub storage: Option<String>,
    #[command(flatten)]
    pub follow: Follow,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub app: AppRef,
    #[command(flatten)]
    pub target: Target,
    #[arg(long, default_value = "cold")]
    pub mode: String,
    /// The storage location the backup goes through [default: the only
    /// one both clusters reach]
    #[arg(long)]
    pub storage: Option<String>,
    #[command(flatten)]
    pub follow: Follow,
}

#[derive(Debug, Subcommand)]
pub enum BackupVerb {
    /// List backups
    Ls {
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long)]
        team: Option<String>,
        #[arg(long)]
        app: Option<String>,
        #[arg(long)]
        storage: Option<String>,
    },
    /// Show one backup
    Show { id: u64 },
    /// Delete a backup (its data goes with the next prune after the safety delay)
    Rm {
        id: u64,
        #[command(flatten)]
        follow: Follow,
    },
    /// Verify a backup's snapshots, reading PCT percent of its data
    Verify {
        id: u64,
        #[arg(long, default_value_t = 0)]
        read_data: u32,
        #[command(flatten)]
        follow: Follow,
    },
    /// Restore a backup as a copy
    Restore {
        id: u64,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        follow: Follow,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobVerb {
    /// List jobs
    Ls {
        /// Only jobs that have not ended
        #[arg(long)]
        active: bool,
    },
    /// Show one job with its steps
    Show { id: u64 },
    /// Follow a job until it ends
    Watch { id: u64 },
    /// Cancel a job: it stops and undoes what it did
    Cancel { id: u64 },
}

#[derive(Serialize)]
struct StepRow {
    name: String,
    status: String,
    attempts: u32,
    reason: String,
    undo: bool,
}

#[derive(Serialize)]
struct JobRow {
    id: u64,
    kind: String,
    state: String,
    reason: String,
    summary: String,
    created_unix_ms: i64,
    finished_unix_ms: i64,
    backup_id: u64,
    downtime_ms: u64,
    copy: String,
    remapped_ports: Vec<String>,
    leftovers: Vec<String>,
    steps: Vec<StepRow>,
}

impl From<&v1::Job> for JobRow {
    fn from(j: &v1::Job) -> Self {
        Self {
            id: j.id,
            kind: j.kind.clone(),
            state: j.state.clone(),
            reason: j.reason.clone(),
            summary: j.summary.clone(),
            created_unix_ms: j.created_unix_ms,
            finished_unix_ms: j.finished_unix_ms,
            backup_id: j.backup_id,
            downtime_ms: j.downtime_ms,
            copy: j.copy.clone(),
            remapped_ports: j.remapped_ports.clone(),
            leftovers: j.leftovers.clone(),
            steps: j
                .steps
                .iter()
                .map(|s| StepRow {
                    name: s.name.clone(),
                    status: s.status.clone(),
                    attempts: s.attempts,
                    reason: s.reason.clone(),
                    undo: s.undo,
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct BackupRow {
    id: u64,
    storage: String,
    cluster: String,
    node: String,
    team: String,
    app: String,
    mode: String,
    created_unix_ms: i64,
    duration_ms: u64,
    downtime_ms: u64,
    bytes: u64,
    files: u64,
    stopped: Vec<String>,
    volumes: Vec<(String, String)>,
    job_id: u64,
    ferry_version: String,
    pre_copy_ms: u64,
    delta_ms: u64,
    bytes_new: u64,
    delta_bytes_read: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    images: Option<ImagesRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    mounts: Vec<MountRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    remarks: Vec<String>,
}

#[derive(Serialize)]
struct MountRow {
    component: String,
    destination: String,
    source: String,
    kind: String,
    read_only: bool,
    /// volume | file | config | skipped | refused
    backup: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    why: String,
}

#[derive(Serialize)]
struct ImagesRow {
    snapshot: String,
    images: Vec<String>,
    bytes: u64,
    bytes_new: u64,
}

impl From<&v1::Backup> for BackupRow {
    fn from(b: &v1::Backup) -> Self {
        Self {
            id: b.id,
            storage: b.storage.clone(),
            cluster: b.cluster.clone(),
            node: b.node.clone(),
            team: b.team.clone(),
            app: b.app.clone(),
            mode: b.mode.clone(),
            created_unix_ms: b.created_unix_ms,
            duration_ms: b.duration_ms,
            downtime_ms: b.downtime_ms,
            bytes: b.bytes,
            files: b.files,
            stopped: b.stopped.clone(),
            volumes: b
                .volumes
                .iter()
                .map(|v| (v.path.clone(), v.snapshot.clone()))
                .collect(),
            job_id: b.job_id,
            ferry_version: b.ferry_version.clone(),
            pre_copy_ms: b.pre_copy_ms,
            delta_ms: b.delta_ms,
            bytes_new: b.bytes_new,
            delta_bytes_read: b.delta_bytes_read,
            images: b.images.as_ref().map(|i| ImagesRow {
                snapshot: i.snapshot.clone(),
                images: i.images.clone(),
                bytes: i.bytes,
                bytes_new: i.bytes_new,
            }),
            mounts: b
                .mounts
                .iter()
                .map(|m| MountRow {
                    component: m.component.clone(),
                    destination: m.destination.clone(),
                    source: m.source.clone(),
                    kind: m.kind.clone(),
                    read_only: m.read_only,
                    backup: m.backup.clone(),
                    why: m.why.clone(),
                })
                .collect(),
            remarks: b.remarks.clone(),
        }
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A duration for people: milliseconds under a second (a downtime of
/// 40 ms is not "0.0 s"), seconds with one decimal above.
fn secs(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

fn print_job(j: &v1::Job, out: Format) -> Result<(), CliError> {
    if out == Format::Json {
        return crate::command::print_json(&JobRow::from(j));
    }
    let now = ferry_core::now_ms();
    let mut text = format!(
        "job {} ({}): {}\n  {}\n  started {}\n",
        j.id,
        j.kind,
        j.state,
        j.summary,
        when(j.created_unix_ms, now)
    );
    if !j.reason.is_empty() {
        text.push_str(&format!("  reason: {}\n", j.reason));
    }
    if j.backup_id != 0 {
        text.push_str(&format!("  backup: {}\n", j.backup_id));
    }
    if j.downtime_ms != 0 {
        text.push_str(&format!("  downtime: {}\n", secs(j.downtime_ms)));
    }
    if !j.copy.is_empty() {
        text.push_str(&format!("  copy: {}\n", j.copy));
    }
    for p in &j.remapped_ports {
        text.push_str(&format!("  port remapped: {p}\n"));
    }
    for l in &j.leftovers {
        text.push_str(&format!("  left behind: {l}\n"));
    }
    for (i, s) in j.steps.iter().enumerate() {
        text.push_str(&format!(
            "  {}{}. {} [{}{}]{}\n",
            if s.undo { "undo " } else { "" },
            i + 1,
            s.name,
            s.status,
            if s.attempts > 1 {
                format!(", {} attempts", s.attempts)
            } else {
                String::new()
            },
            if s.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", s.reason)
            }
        ));
    }
    emit(&text)
}

fn progress_line(j: &v1::Job) -> String {
    match &j.progress {
        Some(p) => {
            let mut line = p.message.clone();
            if p.done_bytes > 0 {
                line.push_str(&format!(" — {}", bytes(p.done_bytes)));
                if p.total_bytes > 0 {
                    line.push_str(&format!(" of {}", bytes(p.total_bytes)));
                }
            }
            if p.bytes_per_second > 0 {
                line.push_str(&format!(", {}/s", bytes(p.bytes_per_second)));
            }
            if p.eta_seconds > 0 {
                line.push_str(&format!(", {} s left", p.eta_seconds));
            }
            line
        }
        None => j
            .steps
            .iter()
            .find(|s| s.status == "running")
            .map(|s| s.name.clone())
            .unwrap_or_else(|| j.state.clone()),
    }
}

/// Follows a job to its end; fails unless it succeeded.
pub async fn follow(
    eff: &Effective,
    out: Format,
    job: v1::Job,
    detach: bool,
) -> Result<(), CliError> {
    if detach {
        if out == Format::Json {
            return crate::command::print_json(&JobRow::from(&job));
        }
        return emit(&format!("job {} started: {}\n", job.id, job.summary));
    }
    let conn = eff.connection()?;
    let url = conn.controller.clone();
    let mut client = connect::operator(&conn).await?;
    let mut stream = client
        .watch_job(v1::GetJobRequest { job_id: job.id })
        .await
        .map_err(|st| CliError::from_agent_status(&url, st))?
        .into_inner();
    let tty = std::io::stderr().is_terminal() && out != Format::Json;
    if out != Format::Json {
        eprintln!("job {}: {}", job.id, job.summary);
    }
    // On a terminal a progress bar (a spinner while the total is unknown);
    // otherwise one plain line per change.
    let bar = tty.then(|| {
        let b =
            indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        b.enable_steady_tick(std::time::Duration::from_millis(120));
        b
    });
    let spinner = indicatif::ProgressStyle::with_template("{spinner} {wide_msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
    let bounded =
        indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {percent:>3}% {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
    let mut last = job;
    let mut shown = String::new();
    while let Some(j) = stream
        .message()
        .await
        .map_err(|st| CliError::from_agent_status(&url, st))?
    {
        let line = progress_line(&j);
        if out != Format::Json && line != shown {
            match &bar {
                Some(b) => {
                    match j.progress.as_ref().filter(|p| p.total_bytes > 0) {
                        Some(p) => {
                            b.set_style(bounded.clone());
                            b.set_length(p.total_bytes);
                            b.set_position(p.done_bytes.min(p.total_bytes));
                        }
                        None => b.set_style(spinner.clone()),
                    }
                    b.set_message(line.clone());
                }
                None => eprintln!("  {line}"),
            }
            shown = line;
        }
        last = j;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    print_job(&last, out)?;
    match last.state.as_str() {
        "succeeded" => Ok(()),
        _ => Err(CliError::Failed {
            message: format!(
                "job {} {}{}",
                last.id,
                last.state,
                if last.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", last.reason)
                }
            ),
        }),
    }
}

fn opt(s: Option<String>) -> String {
    s.unwrap_or_default()
}

pub async fn backup_app(eff: &Effective, out: Format, a: BackupArgs) -> Result<(), CliError> {
    let conn = eff.connection()?;
    let url = conn.controller.clone();
    let mut client = connect::operator(&conn).await?;
    let job = client
        .backup_app(v1::BackupAppJobRequest {
            cluster: a.app.cluster,
            team: a.app.team,
            app: a.app.app,
            storage: opt(a.storage),
            mode: a.mode,
        })
        .await
        .map_err(|st| CliError::from_agent_status(&url, st))?
        .into_inner();
    follow(eff, out, job, a.follow.detach).await
}

pub async fn migrate_app(eff: &Effective, out: Format, a: MigrateArgs) -> Result<(), CliError> {
    let conn = eff.connection()?;
    let url = conn.controller.clone();
    let mut client = connect::operator(&conn).await?;
    let job = client
        .migrate_app(v1::MigrateAppRequest {
            cluster: a.app.cluster,
            team: a.app.team,
            app: a.app.app,
            storage: opt(a.storage),
            mode: a.mode,
            to_cluster: a.target.to_cluster,
            to_team: a.target.to_team,
            as_name: opt(a.target.as_name),
            delete_source: a.target.delete_source,
        })
        .await
        .map_err(|st| CliError::from_agent_status(&url, st))?
        .into_inner();
    follow(eff, out, job, a.follow.detach).await
}

pub async fn backup(eff: &Effective, out: Format, verb: BackupVerb) -> Result<(), CliError> {
    let conn = eff.connection()?;
    let url = conn.controller.clone();
    let mut client = connect::operator(&conn).await?;
    let status = |st| CliError::from_agent_status(&url, st);
    match verb {
        BackupVerb::Ls {
            cluster,
            team,
            app,
            storage,
        } => {
            let mut rows = Vec::new();
            let mut token = String::new();
            loop {
                let page = client
                    .list_backups(v1::ListBackupsRequest {
                        page_size: 0,
                        page_token: token,
                        cluster: opt(cluster.clone()),
                        team: opt(team.clone()),
                        app: opt(app.clone()),
                        storage: opt(storage.clone()),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                rows.extend(page.backups.iter().map(BackupRow::from));
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            if out == Format::Json {
                return crate::command::print_json(&rows);
            }
            let now = ferry_core::now_ms();
            let mut t = Table::new(vec![
                "ID", "APP", "CLUSTER", "STORAGE", "MODE", "SIZE", "DOWNTIME", "TAKEN",
            ]);
            for r in &rows {
                t.row(vec![
                    r.id.to_string(),
                    format!("{}/{}", r.team, r.app),
                    r.cluster.clone(),
                    r.storage.clone(),
                    r.mode.clone(),
                    bytes(r.bytes),
                    if r.downtime_ms == 0 {
                        "-".into()
                    } else {
                        secs(r.downtime_ms)
                    },
                    when(r.created_unix_ms, now),
                ]);
            }
            emit(&t.render())
        }
        BackupVerb::Show { id } => {
            let b = client
                .get_backup(v1::GetBackupRequest { backup_id: id })
                .await
                .map_err(status)?
                .into_inner();
            let r = BackupRow::from(&b);
            if out == Format::Json {
                return crate::command::print_json(&r);
            }
            let mut text = format!(
                "backup {}\n  app:      {}/{} on {}/{}\n  storage:  {}\n  mode:     {}\n  taken:    {}\n  took:     {}\n  downtime: {}\n  size:     {} in {} files\n",
                r.id,
                r.team,
                r.app,
                r.cluster,
                r.node,
                r.storage,
                r.mode,
                when(r.created_unix_ms, ferry_core::now_ms()),
                secs(r.duration_ms),
                if r.downtime_ms == 0 {
                    "none".into()
                } else {
                    secs(r.downtime_ms)
                },
                bytes(r.bytes),
                r.files
            );
            if !r.stopped.is_empty() {
                text.push_str(&format!("  stopped:  {}\n", r.stopped.join(", ")));
                text.push_str(&format!(
                    "  passes:   pre-copy {} while running, delta {} reading {}\n",
                    secs(r.pre_copy_ms),
                    secs(r.delta_ms),
                    bytes(r.delta_bytes_read)
                ));
            }
            text.push_str(&format!("  new data: {}\n", bytes(r.bytes_new)));
            for (path, snap) in &r.volumes {
                text.push_str(&format!(
                    "  volume:   {path} (snapshot {})\n",
                    &snap[..snap.len().min(12)]
                ));
            }
            if let Some(i) = &r.images {
                text.push_str(&format!(
                    "  images:   {} ({}, {} new; snapshot {})\n",
                    i.images.join(", "),
                    bytes(i.bytes),
                    bytes(i.bytes_new),
                    &i.snapshot[..i.snapshot.len().min(12)]
                ));
            }
            for remark in &r.remarks {
                text.push_str(&format!("  remark:   {remark}\n"));
            }
            for m in &r.mounts {
                let from = if m.source.is_empty() {
                    m.kind.clone()
                } else {
                    format!("{} {}", m.kind, m.source)
                };
                text.push_str(&format!(
                    "  mount:    {} {}{} ({from}): {}\n",
                    m.component,
                    m.destination,
                    if m.read_only { " ro" } else { "" },
                    ferry_core::MountBackup::from_code(&m.backup, m.why.clone())
                        .map_or_else(|| format!("{} {}", m.backup, m.why), |b| b.describe())
                ));
            }
            emit(&text)
        }
        BackupVerb::Rm { id, follow: f } => {
            let job = client
                .delete_backup(v1::DeleteBackupRequest { backup_id: id })
                .await
                .map_err(status)?
                .into_inner();
            follow(eff, out, job, f.detach).await
        }
        BackupVerb::Verify {
            id,
            read_data,
            follow: f,
        } => {
            let job = client
                .verify_backup(v1::VerifyBackupJobRequest {
                    backup_id: id,
                    read_data_percent: read_data,
                })
                .await
                .map_err(status)?
                .into_inner();
            follow(eff, out, job, f.detach).await
        }
        BackupVerb::Restore {
            id,
            target,
            follow: f,
        } => {
            let job = client
                .restore_backup(v1::RestoreBackupRequest {
                    backup_id: id,
                    to_cluster: target.to_cluster,
                    to_team: target.to_team,
                    as_name: opt(target.as_name),
                    delete_source: target.delete_source,
                })
                .await
                .map_err(status)?
                .into_inner();
            follow(eff, out, job, f.detach).await
        }
    }
}

pub async fn job(eff: &Effective, out: Format, verb: JobVerb) -> Result<(), CliError> {
    let conn = eff.connection()?;
    let url = conn.controller.clone();
    let mut client = connect::operator(&conn).await?;
    let status = |st| CliError::from_agent_status(&url, st);
    match verb {
        JobVerb::Ls { active } => {
            let mut jobs = Vec::new();
            let mut token = String::new();
            loop {
                let page = client
                    .list_jobs(v1::ListJobsRequest {
                        page_size: 0,
                        page_token: token,
                        active,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                jobs.extend(page.jobs);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            if out == Format::Json {
                let rows: Vec<JobRow> = jobs.iter().map(JobRow::from).collect();
                return crate::command::print_json(&rows);
            }
            let now = ferry_core::now_ms();
            let mut t = Table::new(vec!["ID", "KIND", "STATE", "STARTED", "SUMMARY"]);
            for j in &jobs {
                t.row(vec![
                    j.id.to_string(),
                    j.kind.clone(),
                    j.state.clone(),
                    when(j.created_unix_ms, now),
                    j.summary.clone(),
                ]);
            }
            emit(&t.render())
        }
        JobVerb::Show { id } => {
            let j = client
                .get_job(v1::GetJobRequest { job_id: id })
                .await
                .map_err(status)?
                .into_inner();
            print_job(&j, out)
        }
        JobVerb::Watch { id } => {
            let j = client
                .get_job(v1::GetJobRequest { job_id: id })
                .await
                .map_err(status)?
                .into_inner();
            follow(eff, out, j, false).await
        }
        JobVerb::Cancel { id } => {
            let j = client
                .cancel_job(v1::GetJobRequest { job_id: id })
                .await
                .map_err(status)?
                .into_inner();
            if out == Format::Json {
                return crate::command::print_json(&JobRow::from(&j));
            }
            emit(&format!(
                "job {}: cancel requested; it undoes what it did (`ferryctl job watch {}` follows it)\n",
                j.id, j.id
            ))
        }
    }
}

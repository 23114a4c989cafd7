//! `ferryctl storage …`: storage locations. Credentials come from a file or
//! the environment, never from the command line, and are never printed.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use ferry_proto::v1;
use serde::Serialize;

use crate::config::Effective;
use crate::connect::{self, CliError};
use crate::output::{Format, Table, emit, when};

#[derive(Debug, Subcommand)]
pub enum StorageVerb {
    /// Add a storage location; the controller has an agent create its repository
    Add(AddArgs),
    /// List storage locations
    Ls,
    /// Show one storage location
    Show { name: String },
    /// Have an online agent of every cluster that can reach it write, read and remove a probe there
    Check { name: String },
    /// Forget a storage location and its password (its repository stays in place, unreachable)
    Rm { name: String },
}

/// `storage add NAME KIND [flags]`. The kind is a positional value, not a
/// subcommand: clap takes a first word that names a subcommand for it, so a
/// location named `shared`, `local` or `s3` would be read as its kind.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The location's name (a DNS label)
    pub name: String,
    /// What the location is
    #[arg(value_enum)]
    pub kind: Kind,
    /// Take an existing repository at the location under the controller:
    /// a file holding its password (without it, the controller generates one)
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// The cluster whose hosts hold the directory
    #[arg(long, help_heading = "local", required_if_eq("kind", "local"))]
    pub cluster: Option<String>,
    /// The directory, absolute
    #[arg(
        long,
        help_heading = "local, shared",
        required_if_eq_any([("kind", "local"), ("kind", "shared")])
    )]
    pub path: Option<String>,
    /// http(s)://host[:port]
    #[arg(long, help_heading = "s3", required_if_eq("kind", "s3"))]
    pub endpoint: Option<String>,
    /// The bucket (it must exist)
    #[arg(long, help_heading = "s3", required_if_eq("kind", "s3"))]
    pub bucket: Option<String>,
    /// Keep the repository below this prefix of the bucket
    #[arg(long, help_heading = "s3")]
    pub prefix: Option<String>,
    /// The bucket's region [default: us-east-1]
    #[arg(long, help_heading = "s3")]
    pub region: Option<String>,
    /// A file of AWS_ACCESS_KEY_ID=…, AWS_SECRET_ACCESS_KEY=… and
    /// optionally AWS_SESSION_TOKEN=… lines
    #[arg(long, help_heading = "s3", conflicts_with = "credentials_env")]
    pub credentials_file: Option<PathBuf>,
    /// Take the credentials from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    /// and AWS_SESSION_TOKEN. Without this or --credentials-file, agents
    /// use their own credentials
    #[arg(long, help_heading = "s3")]
    pub credentials_env: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// A directory on the hosts of one cluster: its backups restore in that cluster only
    Local,
    /// A directory every cluster mounts (NFS, …)
    Shared,
    /// An S3-compatible bucket, reachable from every cluster
    S3,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Local => "local",
            Kind::Shared => "shared",
            Kind::S3 => "s3",
        }
    }
}

impl AddArgs {
    /// Refuses a flag that belongs to another kind (clap checks the
    /// required ones).
    fn check_flags(&self) -> Result<(), CliError> {
        let given = [
            (
                "--cluster",
                self.cluster.is_some(),
                [Kind::Local].as_slice(),
            ),
            ("--path", self.path.is_some(), &[Kind::Local, Kind::Shared]),
            ("--endpoint", self.endpoint.is_some(), &[Kind::S3]),
            ("--bucket", self.bucket.is_some(), &[Kind::S3]),
            ("--prefix", self.prefix.is_some(), &[Kind::S3]),
            ("--region", self.region.is_some(), &[Kind::S3]),
            (
                "--credentials-file",
                self.credentials_file.is_some(),
                &[Kind::S3],
            ),
            ("--credentials-env", self.credentials_env, &[Kind::S3]),
        ];
        match given
            .iter()
            .find(|(_, set, kinds)| *set && !kinds.contains(&self.kind))
        {
            Some((flag, _, _)) => Err(CliError::Input(format!(
                "{flag} does not apply to {} storage location {}",
                self.kind.as_str(),
                self.name
            ))),
            None => Ok(()),
        }
    }
}

/// Credentials from `KEY=VALUE` lines (blank lines and `#` comments
/// ignored); the values are never echoed in errors.
fn parse_credentials(text: &str, from: &str) -> Result<v1::S3Credentials, CliError> {
    let mut c = v1::S3Credentials::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(CliError::Input(format!(
                "{from} line {}: expected KEY=VALUE",
                n + 1
            )));
        };
        let v = v.trim().trim_matches('"').to_owned();
        match k.trim().trim_start_matches("export ").trim() {
            "AWS_ACCESS_KEY_ID" => c.access_key_id = v,
            "AWS_SECRET_ACCESS_KEY" => c.secret_access_key = v,
            "AWS_SESSION_TOKEN" => c.session_token = v,
            other => {
                return Err(CliError::Input(format!(
                    "{from} line {}: unknown key {other:?}",
                    n + 1
                )));
            }
        }
    }
    if c.access_key_id.is_empty() || c.secret_access_key.is_empty() {
        return Err(CliError::Input(format!(
            "{from} needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )));
    }
    Ok(c)
}

pub(crate) fn request(args: AddArgs) -> Result<v1::AddStorageRequest, CliError> {
    args.check_flags()?;
    let password_file = args.password_file;
    let s = v1::Storage {
        name: args.name,
        kind: args.kind.as_str().into(),
        cluster: args.cluster.unwrap_or_default(),
        path: args.path.unwrap_or_default(),
        endpoint: args.endpoint.unwrap_or_default(),
        bucket: args.bucket.unwrap_or_default(),
        prefix: args.prefix.unwrap_or_default(),
        region: args.region.unwrap_or_default(),
        ..v1::Storage::default()
    };
    let mut credentials = None;
    if let Some(f) = args.credentials_file {
        let text = std::fs::read_to_string(&f).map_err(|source| CliError::ReadFile {
            what: "credentials file",
            path: f.display().to_string(),
            source,
        })?;
        credentials = Some(parse_credentials(&text, &f.display().to_string())?);
    } else if args.credentials_env {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        let text = format!(
            "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\nAWS_SESSION_TOKEN={}\n",
            var("AWS_ACCESS_KEY_ID"),
            var("AWS_SECRET_ACCESS_KEY"),
            var("AWS_SESSION_TOKEN")
        );
        credentials = Some(parse_credentials(&text, "the environment")?);
    }
    let password = match password_file {
        Some(f) => {
            let text = std::fs::read_to_string(&f).map_err(|source| CliError::ReadFile {
                what: "password file",
                path: f.display().to_string(),
                source,
            })?;
            let pw = text.trim_end_matches(['\n', '\r']).as_bytes().to_vec();
            if pw.is_empty() {
                return Err(CliError::Input(format!(
                    "password file {} is empty",
                    f.display()
                )));
            }
            pw
        }
        None => Vec::new(),
    };
    Ok(v1::AddStorageRequest {
        storage: Some(s),
        credentials,
        password,
    })
}

#[derive(Serialize)]
struct Row {
    name: String,
    kind: String,
    cluster: String,
    path: String,
    endpoint: String,
    bucket: String,
    prefix: String,
    region: String,
    repository_id: String,
    has_credentials: bool,
    created_unix_ms: i64,
}

impl From<v1::Storage> for Row {
    fn from(s: v1::Storage) -> Self {
        Self {
            name: s.name,
            kind: s.kind,
            cluster: s.cluster,
            path: s.path,
            endpoint: s.endpoint,
            bucket: s.bucket,
            prefix: s.prefix,
            region: s.region,
            repository_id: s.repository_id,
            has_credentials: s.has_credentials,
            created_unix_ms: s.created_unix_ms,
        }
    }
}

impl Row {
    /// Where it is, in one cell.
    fn place(&self) -> String {
        match self.kind.as_str() {
            "local" => format!("{} on cluster {}", self.path, self.cluster),
            "s3" if self.prefix.is_empty() => format!("{}/{}", self.endpoint, self.bucket),
            "s3" => format!("{}/{}/{}", self.endpoint, self.bucket, self.prefix),
            _ => self.path.clone(),
        }
    }
}

fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

pub async fn run(eff: &Effective, out: Format, verb: StorageVerb) -> Result<(), CliError> {
    if let StorageVerb::Add(args) = &verb {
        // Bad usage first, before any connection setting is looked at.
        args.check_flags()?;
    }
    let conn = eff.connection()?;
    let url = conn.controller.clone();
    match verb {
        StorageVerb::Add(args) => {
            let req = request(args)?;
            let mut client = connect::operator(&conn).await?;
            let s = client
                .add_storage(req)
                .await
                .map_err(|st| CliError::from_agent_status(&url, st))?
                .into_inner();
            let row = Row::from(s);
            if out == Format::Json {
                return crate::command::print_json(&row);
            }
            emit(&format!(
                "storage {} added: {} {}, repository {}\n",
                row.name,
                row.kind,
                row.place(),
                short(&row.repository_id)
            ))
        }
        StorageVerb::Ls => {
            let mut client = connect::operator(&conn).await?;
            let mut rows = Vec::new();
            let mut token = String::new();
            loop {
                let page = client
                    .list_storage(v1::ListStorageRequest {
                        page_size: 0,
                        page_token: token,
                    })
                    .await
                    .map_err(|st| CliError::from_status(&url, st))?
                    .into_inner();
                rows.extend(page.storage.into_iter().map(Row::from));
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            if out == Format::Json {
                return crate::command::print_json(&rows);
            }
            let now = ferry_core::now_ms();
            let mut t = Table::new(vec!["NAME", "KIND", "WHERE", "REPOSITORY", "CREATED"]);
            for r in &rows {
                t.row(vec![
                    r.name.clone(),
                    r.kind.clone(),
                    r.place(),
                    short(&r.repository_id),
                    when(r.created_unix_ms, now),
                ]);
            }
            emit(&t.render())
        }
        StorageVerb::Show { name } => {
            let mut client = connect::operator(&conn).await?;
            let s = client
                .get_storage(v1::GetStorageRequest { name })
                .await
                .map_err(|st| CliError::from_status(&url, st))?
                .into_inner();
            let r = Row::from(s);
            if out == Format::Json {
                return crate::command::print_json(&r);
            }
            let now = ferry_core::now_ms();
            emit(&format!(
                "name:        {}\nkind:        {}\nwhere:       {}\nregion:      {}\nrepository:  {}\ncredentials: {}\ncreated:     {}\n",
                r.name,
                r.kind,
                r.place(),
                if r.region.is_empty() { "-" } else { &r.region },
                r.repository_id,
                if r.has_credentials {
                    "kept, sealed"
                } else {
                    "none (agents use their own)"
                },
                when(r.created_unix_ms, now),
            ))
        }
        StorageVerb::Check { name } => {
            let mut client = connect::operator(&conn).await?;
            let r = client
                .check_storage(v1::CheckStorageRequest { name: name.clone() })
                .await
                .map_err(|st| CliError::from_status(&url, st))?
                .into_inner();
            #[derive(Serialize)]
            struct Check {
                cluster: String,
                node: String,
                ok: bool,
                error: String,
                write_ms: u64,
                read_ms: u64,
            }
            let checks: Vec<Check> = r
                .checks
                .into_iter()
                .map(|c| Check {
                    cluster: c.cluster,
                    node: c.node,
                    ok: c.ok,
                    error: c.error,
                    write_ms: c.write_ms,
                    read_ms: c.read_ms,
                })
                .collect();
            let failed = checks.iter().filter(|c| !c.ok).count();
            if out == Format::Json {
                crate::command::print_json(&checks)?;
            } else {
                let mut t = Table::new(vec!["CLUSTER", "NODE", "RESULT", "WRITE", "READ"]);
                for c in &checks {
                    let (result, w, r) = if c.ok {
                        (
                            "ok".to_owned(),
                            format!("{} ms", c.write_ms),
                            format!("{} ms", c.read_ms),
                        )
                    } else {
                        (c.error.clone(), "-".into(), "-".into())
                    };
                    t.row(vec![
                        c.cluster.clone(),
                        if c.node.is_empty() {
                            "-".into()
                        } else {
                            c.node.clone()
                        },
                        result,
                        w,
                        r,
                    ]);
                }
                emit(&t.render())?;
            }
            if failed > 0 {
                return Err(CliError::Failed {
                    message: format!(
                        "storage {name}: {failed} of {} cluster(s) cannot use it",
                        checks.len()
                    ),
                });
            }
            Ok(())
        }
        StorageVerb::Rm { name } => {
            let mut client = connect::operator(&conn).await?;
            let r = client
                .remove_storage(v1::RemoveStorageRequest { name: name.clone() })
                .await
                .map_err(|st| CliError::from_status(&url, st))?
                .into_inner();
            if !r.removed {
                return Err(CliError::Rejected {
                    message: format!("storage location {name} not found"),
                });
            }
            if out == Format::Json {
                #[derive(Serialize)]
                struct Removed {
                    removed: bool,
                }
                return crate::command::print_json(&Removed { removed: true });
            }
            emit(&format!(
                "storage {name} removed from the catalog. Its repository is left in place, but the \
                 controller no longer holds its password: adding the location again creates no \
                 access to it\n"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_files_are_read_and_never_echoed() {
        let c = parse_credentials(
            "# keys\nexport AWS_ACCESS_KEY_ID=AKID\nAWS_SECRET_ACCESS_KEY=\"s3cr3t\"\n",
            "f",
        )
        .expect("parse");
        assert_eq!(c.access_key_id, "AKID");
        assert_eq!(c.secret_access_key, "s3cr3t");
        let e = parse_credentials("AWS_SECRET_ACCESS_KEY=hunter2\n", "f").expect_err("no id");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = parse_credentials("PASSWORD=hunter2\n", "f").expect_err("unknown key");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = parse_credentials("hunter2\n", "f").expect_err("no =");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}

//! One grammar for every capability: `ferryctl NOUN VERB [NAME] [flags]`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ferry_proto::v1;
use serde::Serialize;

use crate::config::{self, Effective, Given};
use crate::connect::{self, CliError};
use crate::output::{Format, Table, emit, when};

#[derive(Debug, Parser)]
#[command(
    name = "ferryctl",
    version,
    about = "Back up, restore and migrate whole applications with Ferry"
)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Noun,
}

#[derive(Debug, Args)]
struct Global {
    /// Controller address, e.g. https://ferry.example.com:7443
    #[arg(long, env = "FERRY_CONTROLLER", global = true)]
    controller: Option<String>,
    /// The controller's CA certificate (PEM)
    #[arg(long, env = "FERRY_CA", global = true)]
    ca: Option<PathBuf>,
    /// Operator client certificate (PEM)
    #[arg(long, env = "FERRY_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Operator client key (PEM)
    #[arg(long, env = "FERRY_KEY", global = true)]
    key: Option<PathBuf>,
    /// Config file [default: ~/.config/ferry/ferryctl.toml]
    #[arg(long, env = "FERRY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Output format
    #[arg(
        short,
        long,
        value_enum,
        env = "FERRY_OUTPUT",
        default_value = "table",
        global = true
    )]
    output: Format,
}

#[derive(Debug, Subcommand)]
enum Noun {
    /// Clusters known to the controller
    #[command(subcommand)]
    Cluster(ClusterVerb),
    /// Agents: one per cluster or node
    #[command(subcommand)]
    Agent(AgentVerb),
    /// Applications reported by the agents
    #[command(subcommand)]
    App(AppVerb),
    /// Join tokens for enrolling agents
    #[command(subcommand)]
    Token(TokenVerb),
    /// Storage locations: where backups go
    #[command(subcommand)]
    Storage(crate::storage::StorageVerb),
    /// Backups: list, show, restore as a copy, verify, delete
    #[command(subcommand)]
    Backup(crate::jobs::BackupVerb),
    /// Jobs: every backup, restore, migration, deletion and verification
    #[command(subcommand)]
    Job(crate::jobs::JobVerb),
    /// Show the connection settings in effect and where they come from
    Config,
}

#[derive(Debug, Subcommand)]
enum ClusterVerb {
    /// List clusters
    Ls,
}

#[derive(Debug, Subcommand)]
enum AgentVerb {
    /// List agents, online or not
    Ls {
        /// Only this cluster's agents
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Send a request through an agent's session and wait for its reply
    Ping {
        /// The agent's node name
        node: String,
        /// The agent's cluster
        #[arg(long)]
        cluster: String,
        /// Have the agent hold its reply this long, reporting progress
        /// (e.g. 5s; at most 1m)
        #[arg(long, value_parser = parse_millis)]
        hold: Option<u64>,
        /// Give up after this long [default: 10s more than --hold]
        #[arg(long, value_parser = parse_millis)]
        timeout: Option<u64>,
    },
    /// Ask an agent to report its applications now
    Refresh {
        /// The agent's node name
        node: String,
        /// The agent's cluster
        #[arg(long)]
        cluster: String,
    },
}

#[derive(Debug, Subcommand)]
enum AppVerb {
    /// List applications
    Ls {
        /// Only this cluster's apps
        #[arg(long)]
        cluster: Option<String>,
        /// Only this team's apps
        #[arg(long)]
        team: Option<String>,
    },
    /// Back an app up: its definition and its volumes, at one moment
    Backup(crate::jobs::BackupArgs),
    /// Move an app to another cluster or team: backup, restore as a copy, check it runs
    Migrate(crate::jobs::MigrateArgs),
}

#[derive(Debug, Subcommand)]
enum TokenVerb {
    /// Issue a single-use, expiring join token for a cluster (created when new)
    Create {
        /// The cluster the enrolled agent will belong to
        #[arg(long)]
        cluster: String,
        /// How long the token stays valid, e.g. 30m, 2h, 1d [default: the controller's, 1h]
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<u64>,
    },
}

/// A token lifetime in Ferry's duration syntax (`90s`, `30m`, `2h`, `1d`,
/// `1h30m`, bare seconds), in whole seconds, at least one.
fn parse_duration(s: &str) -> Result<u64, String> {
    let d = ferry_core::duration::parse(s).map_err(|e| e.to_string())?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{s:?} is not a whole number of seconds"));
    }
    match d.as_secs() {
        0 => Err(format!("{s:?} is not a positive duration")),
        secs => Ok(secs),
    }
}

/// A duration in Ferry's syntax, in milliseconds.
fn parse_millis(s: &str) -> Result<u64, String> {
    let d = ferry_core::duration::parse(s).map_err(|e| e.to_string())?;
    u64::try_from(d.as_millis()).map_err(|_| format!("{s:?} is too long"))
}

pub(crate) fn print_json<T: Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Failed {
        message: format!("cannot encode output as JSON: {e}"),
    })?;
    emit(&format!("{text}\n"))
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    let g = &cli.global;
    let effective = config::resolve(&Given {
        config: g.config.clone(),
        controller: g.controller.clone(),
        ca: g.ca.clone(),
        cert: g.cert.clone(),
        key: g.key.clone(),
    })?;
    let out = g.output;
    match cli.command {
        Noun::Config => show_config(&effective, out),
        Noun::Cluster(ClusterVerb::Ls) => cluster_ls(&effective, out).await,
        Noun::Agent(AgentVerb::Ls { cluster }) => agent_ls(&effective, out, cluster).await,
        Noun::Agent(AgentVerb::Ping {
            node,
            cluster,
            hold,
            timeout,
        }) => agent_ping(&effective, out, cluster, node, hold, timeout).await,
        Noun::Agent(AgentVerb::Refresh { node, cluster }) => {
            agent_refresh(&effective, out, cluster, node).await
        }
        Noun::App(AppVerb::Ls { cluster, team }) => app_ls(&effective, out, cluster, team).await,
        Noun::Token(TokenVerb::Create { cluster, ttl }) => {
            token_create(&effective, out, cluster, ttl).await
        }
        Noun::Storage(verb) => crate::storage::run(&effective, out, verb).await,
        Noun::App(AppVerb::Backup(a)) => crate::jobs::backup_app(&effective, out, a).await,
        Noun::App(AppVerb::Migrate(a)) => crate::jobs::migrate_app(&effective, out, a).await,
        Noun::Backup(verb) => crate::jobs::backup(&effective, out, verb).await,
        Noun::Job(verb) => crate::jobs::job(&effective, out, verb).await,
    }
}

fn show_config(eff: &Effective, out: Format) -> Result<(), CliError> {
    if out == Format::Json {
        return print_json(eff);
    }
    let mut t = Table::new(vec!["SETTING", "VALUE", "FROM"]);
    let file = eff
        .config_file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "-".into());
    t.row(vec!["config".into(), file, "-".into()]);
    let src = |s: config::Source| {
        match s {
            config::Source::Flag => "flag or environment",
            config::Source::File => "config file",
        }
        .to_string()
    };
    let mut add = |name: &str, v: Option<(String, config::Source)>| match v {
        Some((value, s)) => t.row(vec![name.into(), value, src(s)]),
        None => t.row(vec![name.into(), "(not set)".into(), "-".into()]),
    };
    add(
        "controller",
        eff.controller.as_ref().map(|s| (s.value.clone(), s.source)),
    );
    for (name, v) in [("ca", &eff.ca), ("cert", &eff.cert), ("key", &eff.key)] {
        add(
            name,
            v.as_ref()
                .map(|s| (s.value.display().to_string(), s.source)),
        );
    }
    emit(&t.render())
}

async fn cluster_ls(eff: &Effective, out: Format) -> Result<(), CliError> {
    let conn = eff.connection()?;
    let mut client = connect::operator(&conn).await?;
    let clusters = all_clusters(&mut client, &conn.controller).await?;
    let agents = all_agents(&mut client, &conn.controller, String::new()).await?;
    #[derive(Serialize)]
    struct Row {
        name: String,
        created_unix_ms: i64,
        agents: usize,
        agents_online: usize,
    }
    let rows: Vec<Row> = clusters
        .into_iter()
        .map(|c| {
            let mine = agents.iter().filter(|a| a.cluster == c.name);
            let (n, online) = mine.fold((0, 0), |(n, o), a| (n + 1, o + usize::from(a.online)));
            Row {
                name: c.name,
                created_unix_ms: c.created_unix_ms,
                agents: n,
                agents_online: online,
            }
        })
        .collect();
    if out == Format::Json {
        return print_json(&rows);
    }
    let now = ferry_core::now_ms();
    let mut t = Table::new(vec!["NAME", "AGENTS", "ONLINE", "CREATED"]);
    for r in rows {
        t.row(vec![
            r.name,
            r.agents.to_string(),
            r.agents_online.to_string(),
            when(r.created_unix_ms, now),
        ]);
    }
    emit(&t.render())
}

async fn agent_ls(eff: &Effective, out: Format, cluster: Option<String>) -> Result<(), CliError> {
    let conn = eff.connection()?;
    let mut client = connect::operator(&conn).await?;
    let agents = all_agents(&mut client, &conn.controller, cluster.unwrap_or_default()).await?;
    if out == Format::Json {
        #[derive(Serialize)]
        struct Row<'a> {
            cluster: &'a str,
            node: &'a str,
            online: bool,
            last_seen_unix_ms: i64,
            version: &'a str,
            platform: &'a str,
            enrolled_unix_ms: i64,
        }
        let rows: Vec<Row<'_>> = agents
            .iter()
            .map(|a| Row {
                cluster: &a.cluster,
                node: &a.node,
                online: a.online,
                last_seen_unix_ms: a.last_seen_unix_ms,
                version: &a.version,
                platform: &a.platform,
                enrolled_unix_ms: a.enrolled_unix_ms,
            })
            .collect();
        return print_json(&rows);
    }
    let now = ferry_core::now_ms();
    let mut t = Table::new(vec![
        "CLUSTER",
        "NODE",
        "STATUS",
        "LAST SEEN",
        "VERSION",
        "PLATFORM",
    ]);
    for a in agents {
        t.row(vec![
            a.cluster,
            a.node,
            if a.online { "online" } else { "offline" }.into(),
            when(a.last_seen_unix_ms, now),
            a.version,
            a.platform,
        ]);
    }
    emit(&t.render())
}

async fn app_ls(
    eff: &Effective,
    out: Format,
    cluster: Option<String>,
    team: Option<String>,
) -> Result<(), CliError> {
    let conn = eff.connection()?;
    let mut client = connect::operator(&conn).await?;
    let (cluster, team) = (cluster.unwrap_or_default(), team.unwrap_or_default());
    let mut apps = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_apps(v1::ListAppsRequest {
                cluster: cluster.clone(),
                team: team.clone(),
                page_size: 0,
                page_token,
            })
            .await
            .map_err(|s| CliError::from_status(&conn.controller, s))?
            .into_inner();
        apps.extend(page.apps);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    #[derive(Serialize)]
    struct Component {
        name: String,
        kind: String,
        stateful: bool,
        state: &'static str,
        volumes: Vec<String>,
    }
    #[derive(Serialize)]
    struct Row {
        cluster: String,
        node: String,
        team: String,
        name: String,
        components: Vec<Component>,
    }
    let mut rows: Vec<Row> = Vec::with_capacity(apps.len());
    for r in apps {
        let Some(app) = r.app else { continue };
        let app = ferry_core::App::try_from(app).map_err(|e| CliError::Failed {
            message: format!("the controller sent an app this ferryctl cannot read: {e}"),
        })?;
        let components = app
            .components
            .iter()
            .map(|c| Component {
                name: c.name.to_string(),
                kind: c.kind.label().to_owned(),
                stateful: c.stateful,
                state: c.state.as_str(),
                volumes: c
                    .volumes
                    .iter()
                    .map(|v| {
                        app.volume(v)
                            .map_or_else(|| v.to_string(), |v| v.path.to_string())
                    })
                    .collect(),
            })
            .collect();
        rows.push(Row {
            cluster: r.cluster,
            node: r.node,
            team: app.team.to_string(),
            name: app.name.to_string(),
            components,
        });
    }
    if out == Format::Json {
        return print_json(&rows);
    }
    let mut t = Table::new(vec![
        "CLUSTER",
        "TEAM",
        "APP",
        "COMPONENTS",
        "STATEFUL",
        "VOLUMES",
    ]);
    for r in rows {
        let running = r.components.iter().filter(|c| c.state == "running").count();
        let stateful: Vec<&str> = r
            .components
            .iter()
            .filter(|c| c.stateful)
            .map(|c| c.name.as_str())
            .collect();
        let volumes: usize = r.components.iter().map(|c| c.volumes.len()).sum();
        t.row(vec![
            r.cluster,
            r.team,
            r.name,
            format!("{} ({} running)", r.components.len(), running),
            if stateful.is_empty() {
                "-".into()
            } else {
                stateful.join(",")
            },
            volumes.to_string(),
        ]);
    }
    emit(&t.render())
}

type Client = ferry_proto::v1::operator_client::OperatorClient<tonic::transport::Channel>;

async fn all_clusters(client: &mut Client, url: &str) -> Result<Vec<v1::Cluster>, CliError> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_clusters(v1::ListClustersRequest {
                page_size: 0,
                page_token,
            })
            .await
            .map_err(|s| CliError::from_status(url, s))?
            .into_inner();
        out.extend(page.clusters);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

async fn all_agents(
    client: &mut Client,
    url: &str,
    cluster: String,
) -> Result<Vec<v1::Agent>, CliError> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_agents(v1::ListAgentsRequest {
                cluster: cluster.clone(),
                page_size: 0,
                page_token,
            })
            .await
            .map_err(|s| CliError::from_status(url, s))?
            .into_inner();
        out.extend(page.agents);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

async fn agent_ping(
    eff: &Effective,
    out: Format,
    cluster: String,
    node: String,
    hold: Option<u64>,
    timeout: Option<u64>,
) -> Result<(), CliError> {
    let conn = eff.connection()?;
    let mut client = connect::operator(&conn).await?;
    let url = &conn.controller;
    let mut events = client
        .ping_agent(v1::PingAgentRequest {
            cluster,
            node,
            hold_ms: hold.unwrap_or(0),
            timeout_ms: timeout.unwrap_or(0),
        })
        .await
        .map_err(|s| CliError::from_agent_status(url, s))?
        .into_inner();
    loop {
        let event = events
            .message()
            .await
            .map_err(|s| CliError::from_agent_status(url, s))?;
        match event.and_then(|e| e.kind) {
            Some(v1::ping_agent_event::Kind::Progress(p)) => {
                if out != Format::Json {
                    eprintln!("{}", p.message);
                }
            }
            Some(v1::ping_agent_event::Kind::Result(r)) => {
                let reply = r.reply.unwrap_or_default();
                if out == Format::Json {
                    #[derive(Serialize)]
                    struct Pong<'a> {
                        round_trip_ms: u64,
                        request_id: u64,
                        version: &'a str,
                        platform: &'a str,
                        agent_unix_ms: i64,
                        requests_running: u32,
                    }
                    return print_json(&Pong {
                        round_trip_ms: r.round_trip_ms,
                        request_id: r.request_id,
                        version: &reply.version,
                        platform: &reply.platform,
                        agent_unix_ms: reply.agent_unix_ms,
                        requests_running: reply.requests_running,
                    });
                }
                return emit(&format!(
                    "reply from agent {} ({}) in {} ms; it runs {} request(s)\n",
                    reply.version, reply.platform, r.round_trip_ms, reply.requests_running
                ));
            }
            None => {
                return Err(CliError::Failed {
                    message: "the controller ended the ping without a reply".to_owned(),
                });
            }
        }
    }
}

async fn agent_refresh(
    eff: &Effective,
    out: Format,
    cluster: String,
    node: String,
) -> Result<(), CliError> {
    let conn = eff.connection()?;
    let mut client = connect::operator(&conn).await?;
    let resp = client
        .refresh_agent_inventory(v1::RefreshAgentInventoryRequest {
            cluster: cluster.clone(),
            node: node.clone(),
        })
        .await
        .map_err(|s| CliError::from_agent_status(&conn.controller, s))?
        .into_inner();
    if out == Format::Json {
        #[derive(Serialize)]
        struct Refreshed {
            apps: u32,
        }
        return print_json(&Refreshed { apps: resp.apps });
    }
    emit(&format!(
        "agent {node} of cluster {cluster} reported {} app(s)\n",
        resp.apps
    ))
}

async fn token_create(
    eff: &Effective,
    out: Format,
    cluster: String,
    ttl: Option<u64>,
) -> Result<(), CliError> {
    let conn = eff.connection()?;
    let mut client = connect::operator(&conn).await?;
    let resp = client
        .create_join_token(v1::CreateJoinTokenRequest {
            cluster,
            ttl_seconds: ttl.unwrap_or(0),
        })
        .await
        .map_err(|s| CliError::from_status(&conn.controller, s))?
        .into_inner();
    if out == Format::Json {
        #[derive(Serialize)]
        struct Token<'a> {
            token: &'a str,
            cluster: &'a str,
            expires_unix_ms: i64,
            ca_fingerprint: &'a str,
        }
        return print_json(&Token {
            token: &resp.token,
            cluster: &resp.cluster,
            expires_unix_ms: resp.expires_unix_ms,
            ca_fingerprint: &resp.ca_fingerprint,
        });
    }
    let (token, cluster, ca) = (&resp.token, &resp.cluster, &resp.ca_fingerprint);
    let expires = when(resp.expires_unix_ms, ferry_core::now_ms());
    let controller = &conn.controller;
    emit(&format!(
        "token:          {token}\n\
         cluster:        {cluster}\n\
         expires:        {expires}\n\
         ca fingerprint: {ca}\n\
         \n\
         enrol an agent of this cluster with (the token works once):\n  \
         ferry-agent join --controller {controller} --token {token} --ca-fingerprint {ca}\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert_eq!(parse_duration("1d"), Ok(86_400));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert!(parse_duration("1500ms").is_err());
    }

    /// What `ferryctl storage add …` asks the controller for, or why not.
    fn storage_add(argv: &[&str]) -> Result<v1::Storage, String> {
        let cli = Cli::try_parse_from(["ferryctl", "storage", "add"].iter().chain(argv))
            .map_err(|e| e.to_string())?;
        let Noun::Storage(crate::storage::StorageVerb::Add(args)) = cli.command else {
            return Err(format!("not storage add: {:?}", cli.command));
        };
        let req = crate::storage::request(args).map_err(|e| e.to_string())?;
        req.storage
            .ok_or_else(|| "no storage in the request".to_owned())
    }

    #[test]
    fn storage_locations_may_be_named_like_a_kind() {
        for name in ["shared", "local", "s3", "disk"] {
            let s = storage_add(&[name, "shared", "--path", "/p"]).expect(name);
            assert_eq!((s.name.as_str(), s.kind.as_str()), (name, "shared"));
            assert_eq!(s.path, "/p");

            let s = storage_add(&[name, "local", "--cluster", "c", "--path", "/x"]).expect(name);
            assert_eq!((s.name.as_str(), s.kind.as_str()), (name, "local"));
            assert_eq!((s.cluster.as_str(), s.path.as_str()), ("c", "/x"));

            let s = storage_add(&[
                name,
                "s3",
                "--endpoint",
                "https://s3.example.com",
                "--bucket",
                "b",
                "--prefix",
                "ferry",
            ])
            .expect(name);
            assert_eq!((s.name.as_str(), s.kind.as_str()), (name, "s3"));
            assert_eq!(
                (s.endpoint.as_str(), s.bucket.as_str(), s.prefix.as_str()),
                ("https://s3.example.com", "b", "ferry")
            );
        }
    }

    #[test]
    fn storage_add_takes_global_flags_after_the_kind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "secret\n").expect("write password file");
        let pw = pw.display().to_string();
        let argv = [
            "local",
            "local",
            "--cluster",
            "c",
            "--path",
            "/x",
            "--password-file",
            &pw,
            "-o",
            "json",
        ];
        let cli =
            Cli::try_parse_from(["ferryctl", "storage", "add"].iter().chain(&argv)).expect("parse");
        assert_eq!(cli.global.output, Format::Json);
        let Noun::Storage(crate::storage::StorageVerb::Add(args)) = cli.command else {
            panic!("not storage add: {:?}", cli.command);
        };
        let req = crate::storage::request(args).expect("request");
        assert_eq!(req.password, b"secret");
        assert_eq!(req.storage.map(|s| s.name), Some("local".to_owned()));
    }

    #[test]
    fn storage_add_refuses_flags_of_another_kind() {
        for argv in [
            &["disk", "shared", "--path", "/p", "--cluster", "c"][..],
            &["disk", "local", "--path", "/p"],
            &[
                "disk",
                "s3",
                "--endpoint",
                "https://e",
                "--bucket",
                "b",
                "--path",
                "/p",
            ],
            &["disk", "shared", "--path", "/p", "--bucket", "b"],
            &["disk", "nfs", "--path", "/p"],
            &["disk"],
            &["shared"],
        ] {
            assert!(storage_add(argv).is_err(), "{argv:?} was taken");
        }
        let e = storage_add(&["disk", "shared", "--path", "/p", "--cluster", "c"])
            .expect_err("--cluster with shared");
        assert!(
            e.contains("--cluster does not apply to shared storage location disk"),
            "{e}"
        );
    }
}

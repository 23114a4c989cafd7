//! Enrolment, agent sessions, restarts and every refusal of the mTLS
//! surface, over the real `ferry-controller` and `ferry-agent` binaries.

use anyhow::Context;
use ferry_proto::tls::{self, CaFingerprint};
use ferry_proto::v1 as pb;
use ferry_proto::v1::agent_sessions_client::AgentSessionsClient;
use ferry_proto::v1::enrollment_client::EnrollmentClient;
use ferry_proto::v1::operator_client::OperatorClient;
use ferry_tests::{AgentProcess, Controller, DEADLINE, bin, run, setup, wait_for};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
use std::process::Command;
use tonic::Code;

pub(crate) async fn token(
    op: &mut OperatorClient<tonic::transport::Channel>,
    cluster: &str,
    ttl: u64,
) -> anyhow::Result<pb::CreateJoinTokenResponse> {
    Ok(op
        .create_join_token(pb::CreateJoinTokenRequest {
            cluster: cluster.into(),
            ttl_seconds: ttl,
        })
        .await?
        .into_inner())
}

async fn agents(
    op: &mut OperatorClient<tonic::transport::Channel>,
) -> anyhow::Result<Vec<pb::Agent>> {
    Ok(op
        .list_agents(pb::ListAgentsRequest::default())
        .await?
        .into_inner()
        .agents)
}

async fn clusters(
    op: &mut OperatorClient<tonic::transport::Channel>,
) -> anyhow::Result<Vec<String>> {
    Ok(op
        .list_clusters(pb::ListClustersRequest::default())
        .await?
        .into_inner()
        .clusters
        .into_iter()
        .map(|c| c.name)
        .collect())
}

pub(crate) fn agent_config(controller: &str, data_dir: &std::path::Path) -> String {
    let d = data_dir.display();
    format!(
        r#"controller = "{controller}"
data_dir = "{d}"
heartbeat_secs = 1
reconnect_min_ms = 50
reconnect_max_ms = 500

[[apps]]
name = "shop"
team = "web"

[[apps.components]]
name = "db"
stateful = true
volumes = ["{d}/db"]
start = "sleep 300 >/dev/null 2>&1 & echo $! > {d}/db.pid"
stop = "kill $(cat {d}/db.pid)"
status = "kill -0 $(cat {d}/db.pid)"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrols_reports_and_reconnects_after_controller_restart() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let mut op = ctl.operator().await?;
    let t = token(&mut op, "prod", 0).await?;
    assert!(t.token.starts_with("fjt_"));
    assert_eq!(
        t.ca_fingerprint,
        CaFingerprint::of_pem(&ctl.read("pki/ca.crt")?)?.to_string()
    );

    // Enrol with the real binary.
    let agent_dir = tempfile::tempdir()?;
    let (ok, out, err) = run(Command::new(bin("ferry-agent"))
        .args(["join", "--controller", &ctl.url(), "--token", &t.token])
        .args(["--ca-fingerprint", &t.ca_fingerprint, "--node", "node-1"])
        .arg("--data-dir")
        .arg(agent_dir.path()))?;
    assert!(ok, "join failed: {err}");
    assert!(
        out.contains("enrolled node node-1 in cluster prod"),
        "{out}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(agent_dir.path().join("agent.key"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // The token is single-use: the binary is refused the second time.
    let other_dir = tempfile::tempdir()?;
    let (ok, _, err) = run(Command::new(bin("ferry-agent"))
        .args(["join", "--controller", &ctl.url(), "--token", &t.token])
        .args(["--ca-fingerprint", &t.ca_fingerprint, "--node", "node-2"])
        .arg("--data-dir")
        .arg(other_dir.path()))?;
    assert!(!ok);
    assert!(err.contains("already used"), "{err}");
    assert!(!other_dir.path().join("agent.key").exists());

    let config = agent_dir.path().join("agent.toml");
    std::fs::write(&config, agent_config(&ctl.url(), agent_dir.path()))?;
    // Start the component so the inventory shows a running process.
    let (ok, _, err) = run(Command::new("sh").arg("-c").arg(format!(
        "sleep 300 >/dev/null 2>&1 & echo $! > {}/db.pid",
        agent_dir.path().display()
    )))?;
    assert!(ok, "{err}");
    let mut agent = AgentProcess::spawn(&config, agent_dir.path().join("agent.log"))?;

    let online = |op: OperatorClient<tonic::transport::Channel>| async move {
        let mut op = op;
        let a = agents(&mut op).await.ok()?;
        a.into_iter().find(|a| a.node == "node-1" && a.online)
    };
    let seen = wait_for("agent online", DEADLINE, || online(op.clone())).await?;
    assert_eq!(seen.cluster, "prod");
    assert_eq!(seen.platform, "host");
    assert_eq!(seen.version, env!("CARGO_PKG_VERSION"));
    let apps = wait_for("inventory", DEADLINE, || {
        let mut op = op.clone();
        async move {
            let apps = op
                .list_apps(pb::ListAppsRequest {
                    cluster: "prod".into(),
                    team: "web".into(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .apps;
            (!apps.is_empty()).then_some(apps)
        }
    })
    .await?;
    assert_eq!(apps.len(), 1);
    assert_eq!(apps[0].node, "node-1");
    let app = apps[0].app.clone().context("app")?;
    assert_eq!((app.name.as_str(), app.team.as_str()), ("shop", "web"));
    assert_eq!(app.components.len(), 1);
    // Converted by ferry-proto: validated, and typed as the host kind.
    let app = ferry_core::App::try_from(app).context("a valid app")?;
    let db = &app.components[0];
    assert_eq!(db.kind.label(), "commands");
    assert!(db.stateful);
    let dir = format!("{}/db", agent_dir.path().display());
    assert_eq!(db.volumes.len(), 1);
    assert_eq!(db.volumes[0].as_str(), dir);
    assert_eq!(app.volumes.len(), 1);
    assert_eq!(app.volumes[0].path.as_str(), dir);

    // Kill the controller: the agent goes offline in its eyes and comes back.
    ctl.kill();
    wait_for("the agent to notice", DEADLINE, || {
        let logs = agent.logs();
        async move { logs.contains("session failed").then_some(()) }
    })
    .await?;
    ctl.start().await?;
    let mut op = ctl.operator().await?;
    let back = wait_for("agent online after restart", DEADLINE, || {
        online(op.clone())
    })
    .await?;
    assert!(back.last_seen_unix_ms >= seen.last_seen_unix_ms);
    // The controller counts the agent online as soon as the session opens;
    // the agent logs its side once the welcome arrives.
    wait_for("the agent to log its second session", DEADLINE, || {
        let n = agent.logs().matches("session established").count();
        async move { (n >= 2).then_some(()) }
    })
    .await?;

    // The catalog survived: cluster, agent, app, and the token stays used.
    assert_eq!(clusters(&mut op).await?, vec!["prod".to_owned()]);
    assert_eq!(agents(&mut op).await?.len(), 1);
    let apps = op
        .list_apps(pb::ListAppsRequest::default())
        .await?
        .into_inner()
        .apps;
    assert_eq!(apps.len(), 1);
    let again = tls::pinned_channel(&ctl.url(), &CaFingerprint::parse(&t.ca_fingerprint)?).await?;
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    let err = EnrollmentClient::new(again)
        .join(pb::JoinRequest {
            token: t.token.clone(),
            csr_pem: csr,
            node: "node-3".into(),
            cluster: String::new(),
        })
        .await
        .expect_err("token reuse after restart");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("already used by node node-1"),
        "{}",
        err.message()
    );

    // Orderly shutdown of both; then no secret in any log.
    agent.stop().await?;
    wait_for("agent offline", DEADLINE, || {
        let mut op = op.clone();
        async move {
            let a = agents(&mut op).await.ok()?;
            a.iter().all(|a| !a.online).then_some(())
        }
    })
    .await?;
    ctl.stop().await?;
    let logs = format!("{}{}", ctl.logs(), agent.logs());
    assert!(
        logs.contains("agent enrolled"),
        "controller logged enrolment"
    );
    assert!(!logs.contains(&t.token), "a log contains the join token");
    assert!(
        !logs.contains(&t.token["fjt_".len()..]),
        "a log contains the token's secret part"
    );
    assert!(
        !logs.contains("PRIVATE KEY"),
        "a log contains a private key"
    );
    Ok(())
}

/// A client identity signed by `issuer`, valid or not, as PEM (cert, key).
fn client_cert(
    issuer: &Issuer<'_, &KeyPair>,
    uri: &str,
    expired: bool,
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "test");
    p.subject_alt_names = vec![SanType::URI(uri.to_owned().try_into()?)];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    if expired {
        p.not_before = now - time::Duration::days(30);
        p.not_after = now - time::Duration::days(1);
    } else {
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(1);
    }
    Ok((p.signed_by(&key, issuer)?.pem(), key.serialize_pem()))
}

/// With TLS 1.3 the server checks the client certificate after the
/// client's side of the handshake is done, so the client learns of the
/// refusal as a closed connection on its first call, never as a response.
fn assert_handshake_refused(s: &tonic::Status) {
    assert!(
        matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "{s:?}"
    );
    let text = format!("{s:?}").to_lowercase();
    assert!(
        text.contains("connection closed")
            || text.contains("certificate")
            || text.contains("tls")
            // Depending on timing the refusal arrives as the server's
            // alert ("received fatal alert: UnknownCA") or as a write
            // into the connection the server already closed.
            || text.contains("fatal alert")
            || text.contains("broken pipe"),
        "{text}"
    );
}

/// Dials with the given client identity and calls ListClusters.
async fn list_as(ctl: &Controller, cert: &str, key: &str) -> Result<(), tonic::Status> {
    let ca = ctl
        .read("pki/ca.crt")
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let ch = match tls::channel(&ctl.url(), &ca, cert, key).await {
        Ok(ch) => ch,
        Err(e) => {
            return Err(tonic::Status::unavailable(format!(
                "{e}: {:?}",
                std::error::Error::source(&e)
            )));
        }
    };
    OperatorClient::new(ch)
        .list_clusters(pb::ListClustersRequest::default())
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_refuses_what_it_must_and_writes_nothing() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let mut op = ctl.operator().await?;
    let pin = CaFingerprint::of_pem(&ctl.read("pki/ca.crt")?)?;

    // Malformed operator input.
    let err = token(&mut op, "Not_A_Cluster", 0)
        .await
        .expect_err("bad name");
    let status = err.downcast::<tonic::Status>()?;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("invalid cluster name"),
        "{}",
        status.message()
    );
    let err = token(&mut op, "a", 100 * 24 * 3600)
        .await
        .expect_err("ttl too long");
    assert_eq!(
        err.downcast::<tonic::Status>()?.code(),
        Code::InvalidArgument
    );
    assert!(
        clusters(&mut op).await?.is_empty(),
        "a refused request created a cluster"
    );

    // No client certificate: only Join is reachable.
    let anon = tls::pinned_channel(&ctl.url(), &pin).await?;
    let s = OperatorClient::new(anon.clone())
        .list_clusters(pb::ListClustersRequest::default())
        .await
        .expect_err("anonymous operator call");
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(
        s.message().contains("requires a client certificate"),
        "{}",
        s.message()
    );
    let s = AgentSessionsClient::new(anon.clone())
        .open_session(tokio_stream::iter(Vec::<pb::AgentMessage>::new()))
        .await
        .expect_err("anonymous session");
    assert_eq!(s.code(), Code::Unauthenticated);

    // Health answers operators, not anonymous clients.
    let s = tonic_health::pb::health_client::HealthClient::new(anon.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect_err("anonymous health check");
    assert_eq!(s.code(), Code::Unauthenticated);
    let op_health = tls::channel(
        &ctl.url(),
        &ctl.read("pki/ca.crt")?,
        &ctl.read("operator/operator.crt")?,
        &ctl.read("operator/operator.key")?,
    )
    .await?;
    let health = tonic_health::pb::health_client::HealthClient::new(op_health)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await?
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Join refusals: garbage CSR, bad node, another cluster, unknown token.
    let t_a = token(&mut op, "a", 0).await?;
    token(&mut op, "b", 0).await?;
    let mut enrol = EnrollmentClient::new(anon.clone());
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    let join = |token: &str, csr: &str, node: &str, cluster: &str| pb::JoinRequest {
        token: token.into(),
        csr_pem: csr.into(),
        node: node.into(),
        cluster: cluster.into(),
    };
    let s = enrol
        .join(join(&t_a.token, "garbage", "n1", ""))
        .await
        .expect_err("garbage csr");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("invalid certificate signing request"),
        "{}",
        s.message()
    );
    let s = enrol
        .join(join(&t_a.token, &csr, "Bad/Node", ""))
        .await
        .expect_err("bad node");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("invalid node name"), "{}", s.message());
    let s = enrol
        .join(join(&t_a.token, &csr, "n1", "b"))
        .await
        .expect_err("other cluster");
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(
        s.message().contains("not a token of cluster b"),
        "{}",
        s.message()
    );
    let s = enrol
        .join(join("fjt_nope", &csr, "n1", ""))
        .await
        .expect_err("unknown token");
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("unknown"), "{}", s.message());
    assert!(
        agents(&mut op).await?.is_empty(),
        "a refused join created an agent"
    );

    // Expired token.
    let short = token(&mut op, "a", 1).await?;
    wait_for("the short token to expire", DEADLINE, || {
        let exp = short.expires_unix_ms;
        async move {
            let now = i64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_millis(),
            )
            .ok()?;
            (now > exp + 50).then_some(())
        }
    })
    .await?;
    let s = enrol
        .join(join(&short.token, &csr, "n1", "a"))
        .await
        .expect_err("expired token");
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("expired"), "{}", s.message());
    assert!(agents(&mut op).await?.is_empty());

    // The token refused above is still good: a correct join succeeds.
    let ok = enrol
        .join(join(&t_a.token, &csr, "n1", "a"))
        .await?
        .into_inner();
    assert_eq!((ok.cluster.as_str(), ok.node.as_str()), ("a", "n1"));
    let agent_cert = ok.certificate_pem;
    let agent_key = key.serialize_pem();
    let ca = ctl.read("pki/ca.crt")?;

    // An agent of cluster a claiming cluster b is refused and not recorded.
    let ch = tls::channel(&ctl.url(), &ca, &agent_cert, &agent_key).await?;
    let hello = |cluster: &str| pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
            cluster: cluster.into(),
            node: "n1".into(),
            version: "test".into(),
            platform: "host".into(),
            restores: Vec::new(),
        })),
    };
    let s = AgentSessionsClient::new(ch.clone())
        .open_session(tokio_stream::iter(vec![hello("b")]))
        .await
        .expect_err("cluster mismatch");
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(
        s.message().contains("certificate is for cluster a"),
        "{}",
        s.message()
    );
    let a = agents(&mut op).await?;
    assert_eq!(a.len(), 1);
    assert!(
        !a[0].online && a[0].version.is_empty(),
        "refused hello was recorded: {a:?}"
    );
    // An agent certificate may not use the operator API, nor an operator the agent API.
    let s = OperatorClient::new(ch)
        .list_clusters(pb::ListClustersRequest::default())
        .await
        .expect_err("agent as operator");
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(
        s.message().contains("may not use the operator api"),
        "{}",
        s.message()
    );
    let op_ch = tls::channel(
        &ctl.url(),
        &ca,
        &ctl.read("operator/operator.crt")?,
        &ctl.read("operator/operator.key")?,
    )
    .await?;
    let s = AgentSessionsClient::new(op_ch)
        .open_session(tokio_stream::iter(vec![hello("a")]))
        .await
        .expect_err("operator as agent");
    assert_eq!(s.code(), Code::PermissionDenied);

    // A certificate from another CA, and an expired one from ours: the TLS
    // handshake fails.
    let foreign_key = KeyPair::generate()?;
    let mut foreign = CertificateParams::default();
    foreign.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let foreign_issuer = Issuer::new(foreign, &foreign_key);
    let (cert, key_pem) = client_cert(&foreign_issuer, "ferry://operator/admin", false)?;
    let s = list_as(&ctl, &cert, &key_pem)
        .await
        .expect_err("foreign ca");
    assert_handshake_refused(&s);

    let ca_key = KeyPair::from_pem(&ctl.read("pki/ca.key")?)?;
    let ours = Issuer::from_ca_cert_pem(&ca, &ca_key)?;
    let (cert, key_pem) = client_cert(&ours, "ferry://operator/admin", true)?;
    let s = list_as(&ctl, &cert, &key_pem)
        .await
        .expect_err("expired cert");
    assert_handshake_refused(&s);
    // The same CA with a valid date is accepted: the refusal was the expiry.
    let (cert, key_pem) = client_cert(&ours, "ferry://operator/admin", false)?;
    list_as(&ctl, &cert, &key_pem).await?;

    // Nothing else reached the catalog.
    assert_eq!(
        clusters(&mut op).await?,
        vec!["a".to_owned(), "b".to_owned()]
    );
    assert_eq!(agents(&mut op).await?.len(), 1);
    ctl.stop().await?;
    let catalog = ferry_controller::catalog::open(
        ferry_controller::catalog::Engine::Redb,
        &ctl.path("catalog.redb"),
    )
    .await?;
    let tokens = catalog.list_join_tokens(None).await?;
    assert_eq!(tokens.len(), 3, "{tokens:?}");
    assert_eq!(tokens.iter().filter(|t| t.used.is_some()).count(), 1);
    let logs = ctl.logs();
    for secret in [&t_a.token, &short.token] {
        assert!(
            !logs.contains(secret.as_str()),
            "a log contains a join token"
        );
    }
    assert!(!logs.contains("PRIVATE KEY"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_refuses_a_controller_whose_ca_does_not_match_the_pin() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.start().await?;
    let mut op = ctl.operator().await?;
    let t = token(&mut op, "prod", 0).await?;
    let wrong = CaFingerprint::of_der(b"some other ca").to_string();
    let dir = tempfile::tempdir()?;
    let (ok, _, err) = run(Command::new(bin("ferry-agent"))
        .args(["join", "--controller", &ctl.url(), "--token", &t.token])
        .args(["--ca-fingerprint", &wrong, "--node", "n1"])
        .arg("--data-dir")
        .arg(dir.path()))?;
    assert!(!ok);
    assert!(err.contains("cannot connect to controller"), "{err}");
    // The cause is named, and once.
    assert_eq!(
        err.matches("does not contain the pinned ca").count(),
        1,
        "{err}"
    );
    assert!(!dir.path().join("agent.key").exists());
    // The token was never sent, so it still works.
    let (ok, _, err) = run(Command::new(bin("ferry-agent"))
        .args(["join", "--controller", &ctl.url(), "--token", &t.token])
        .args(["--ca-fingerprint", &t.ca_fingerprint, "--node", "n1"])
        .arg("--data-dir")
        .arg(dir.path()))?;
    assert!(ok, "{err}");
    Ok(())
}

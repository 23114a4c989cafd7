//! What a connection may take of the controller: connections that never
//! finish TLS or never speak HTTP/2 are closed, and connections beyond the
//! limit are refused while those already open keep working.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use ferry_proto::v1 as pb;
use ferry_proto::v1::operator_client::OperatorClient;
use ferry_tests::{Controller, DEADLINE, setup, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::transport::Channel;

async fn list_clusters(op: &mut OperatorClient<Channel>) -> anyhow::Result<usize> {
    Ok(op
        .list_clusters(pb::ListClustersRequest::default())
        .await?
        .into_inner()
        .clusters
        .len())
}

/// Waits (up to the deadline) for the server to close `conn`, reading and
/// dropping whatever it sends first.
async fn closed_by_server(conn: &mut TcpStream) -> anyhow::Result<()> {
    let mut buf = [0u8; 1024];
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(end, conn.read(&mut buf)).await {
            Err(_) => anyhow::bail!("the server kept the connection open for {DEADLINE:?}"),
            Ok(Ok(0) | Err(_)) => return Ok(()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_tls_are_closed() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    ctl.serve_args(["--handshake-timeout-secs", "1"]);
    let addr = ctl.start().await?;

    // Silent connections, and one that stops inside a TLS record.
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(addr).await?);
    }
    let mut stalled = TcpStream::connect(addr).await?;
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await?;

    // Meanwhile the controller serves as usual.
    let mut op = ctl.operator().await?;
    assert_eq!(list_clusters(&mut op).await?, 0);

    for (i, conn) in silent.iter_mut().enumerate() {
        closed_by_server(conn)
            .await
            .with_context(|| format!("silent connection {i}"))?;
    }
    closed_by_server(&mut stalled)
        .await
        .context("stalled handshake")?;
    // The operator's connection, which finished its handshake, still works.
    assert_eq!(list_clusters(&mut op).await?, 0);
    ctl.stop().await?;
    Ok(())
}

/// Completes a TLS handshake with the controller (no client certificate,
/// ALPN h2), then sends nothing; returns once the server closed the
/// connection, or fails if it is still open after the deadline.
fn tls_then_silence(addr: SocketAddr, ca_pem: &str) -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes())?)?;
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let server = ServerName::try_from(addr.ip().to_string())?;
    let conn = rustls::ClientConnection::new(Arc::new(config), server)?;
    let sock = std::net::TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(DEADLINE))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    let mut buf = [0u8; 1024];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => return Ok(()),
            // The server's HTTP/2 settings, or session tickets.
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                anyhow::bail!("the server kept a silent TLS connection open for {DEADLINE:?}")
            }
            Err(_) => return Ok(()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_silent_after_tls_is_closed() -> anyhow::Result<()> {
    setup();
    let mut ctl = Controller::init()?;
    // Silent for three keepalive intervals: closed.
    ctl.serve_args(["--keepalive-secs", "1"]);
    let addr = ctl.start().await?;
    let ca = ctl.read("pki/ca.crt")?;
    let silent = tokio::task::spawn_blocking(move || tls_then_silence(addr, &ca));

    // An operator that is idle between calls answers the keepalive pings,
    // so its connection survives the silent one.
    let mut op = ctl.operator().await?;
    assert_eq!(list_clusters(&mut op).await?, 0);
    silent.await??;
    assert_eq!(list_clusters(&mut op).await?, 0);
    ctl.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_and_the_others_keep_working() -> anyhow::Result<()>
{
    setup();
    let mut ctl = Controller::init()?;
    ctl.serve_args(["--max-connections", "3", "--handshake-timeout-secs", "600"]);
    let addr = ctl.start().await?;

    // One operator connection and two that hold their places in the
    // handshake: the limit is reached.
    let mut op = ctl.operator().await?;
    assert_eq!(list_clusters(&mut op).await?, 0);
    let mut fillers = vec![
        TcpStream::connect(addr).await?,
        TcpStream::connect(addr).await?,
    ];

    // One more is closed at once, at TCP or at TLS.
    let mut over = TcpStream::connect(addr).await?;
    closed_by_server(&mut over)
        .await
        .context("a fourth connection")?;
    assert!(
        ctl.operator().await.is_err(),
        "a new operator connection was admitted beyond the limit"
    );
    wait_for("the refusals to be logged", DEADLINE, || {
        let logged = ctl.logs().contains("connections refused");
        async move { logged.then_some(()) }
    })
    .await?;

    // Those inside the limit are still open, and the operator still works.
    let mut buf = [0u8; 1];
    for (i, f) in fillers.iter().enumerate() {
        match f.try_read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => anyhow::bail!("filler {i} was closed: {other:?}"),
        }
    }
    assert_eq!(list_clusters(&mut op).await?, 0);

    // Closing them makes room again.
    for f in &mut fillers {
        f.shutdown().await?;
    }
    drop(fillers);
    let mut again = wait_for("room for a new operator connection", DEADLINE, || {
        let ctl = &ctl;
        async move { ctl.operator().await.ok() }
    })
    .await?;
    assert_eq!(list_clusters(&mut again).await?, 0);
    ctl.stop().await?;
    Ok(())
}

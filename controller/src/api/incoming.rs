//! Accepting connections: a bound on how many are open at once, and a
//! deadline for peers that send nothing.
//!
//! Every accepted TCP connection takes one of `max_connections` permits
//! for as long as it is open; one beyond that is closed at once, so the
//! connections that hold permits (agents' sessions, operators) keep
//! working and the controller keeps file descriptors for its own use.
//! TLS then has `handshake_timeout` to complete (tonic's acceptor), and the
//! server pings every `keepalive` over HTTP/2. A connection from which
//! nothing at all arrives for three keepalive intervals is closed: a live
//! client answers every ping, so this only ends connections that finished
//! TLS and then never spoke HTTP/2, or a peer that went away without a word.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::config::ConnectionLimits;

/// File descriptors kept for the controller itself (catalog, logs, blocking
/// threads, outbound connections) when the connection limit is checked
/// against the open-file limit.
const RESERVED_FDS: u64 = 256;

/// How often a refused connection or a failing `accept` is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// How long `accept` pauses when the process is out of file descriptors,
/// rather than spinning on a listener that stays readable.
const FD_EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);

/// Raises the soft open-file limit to the hard one and returns the
/// connection limit that fits into it: `wanted`, or less (with a warning)
/// when the open-file limit leaves no room for that many.
pub fn fit_open_file_limit(wanted: usize) -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let mut soft = limit.current;
    // An unlimited hard limit still stops at the kernel's nr_open.
    let hard = limit.maximum.unwrap_or(1 << 20);
    if soft.is_some_and(|s| s < hard) {
        let raised = Rlimit {
            current: Some(hard),
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::info!(from = soft, to = hard, "raised the open-file limit");
                soft = Some(hard);
            }
            Err(e) => tracing::warn!(error = %e, limit = soft, "cannot raise the open-file limit"),
        }
    }
    let room = soft.map_or(usize::MAX, |s| {
        usize::try_from(s.saturating_sub(RESERVED_FDS).max(1)).unwrap_or(usize::MAX)
    });
    if wanted > room {
        tracing::warn!(
            wanted,
            allowed = room,
            open_file_limit = soft,
            "the open-file limit leaves room for fewer connections than --max-connections; raise LimitNOFILE"
        );
        room
    } else {
        wanted
    }
}

/// Rate-limited warnings about one kind of event.
struct Warner {
    what: &'static str,
    count: u64,
    last: Option<Instant>,
}

impl Warner {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            count: 0,
            last: None,
        }
    }

    fn note(&mut self, detail: &dyn std::fmt::Display) {
        self.count += 1;
        let now = Instant::now();
        if self
            .last
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            tracing::warn!(count = self.count, detail = %detail, "{}", self.what);
            self.count = 0;
            self.last = Some(now);
        }
    }
}

struct Acceptor {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    max: usize,
    idle_timeout: Duration,
    refused: Warner,
    failed: Warner,
}

impl Acceptor {
    async fn next(&mut self) -> Conn {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => match self.permits.clone().try_acquire_owned() {
                    Ok(permit) => return Conn::new(stream, permit, self.idle_timeout),
                    Err(_) => {
                        drop(stream);
                        self.refused.note(&format_args!(
                            "{peer} beyond the limit of {} connections",
                            self.max
                        ));
                    }
                },
                Err(e) => {
                    // Out of descriptors: wait for some to come back.
                    let exhausted = [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE]
                        .iter()
                        .any(|n| e.raw_os_error() == Some(n.raw_os_error()));
                    self.failed.note(&e);
                    if exhausted {
                        tokio::time::sleep(FD_EXHAUSTED_PAUSE).await;
                    }
                }
            }
        }
    }
}

/// The connections accepted on `listener`, within `limits`; never ends and
/// never yields an error (a failed `accept` is logged and retried).
pub fn accept(
    listener: TcpListener,
    max_connections: usize,
    limits: &ConnectionLimits,
) -> impl Stream<Item = io::Result<Conn>> + use<> {
    let acceptor = Acceptor {
        listener,
        permits: Arc::new(Semaphore::new(max_connections)),
        max: max_connections,
        idle_timeout: limits.idle_timeout(),
        refused: Warner::new("connections refused"),
        failed: Warner::new("cannot accept connections"),
    };
    futures::stream::unfold(acceptor, |mut a| async move {
        let conn = a.next().await;
        Some((Ok(conn), a))
    })
}

/// An accepted connection: holds its permit while open, and fails its
/// reads once nothing has arrived for the idle timeout.
pub struct Conn {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle_timeout: Duration,
    last_read: Instant,
    idle: Pin<Box<Sleep>>,
}

impl Conn {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit, idle_timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            stream,
            _permit: permit,
            idle_timeout,
            last_read: now,
            idle: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.last_read = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                // The timer is moved only when it fires, not on every read.
                while this.idle.as_mut().poll(cx).is_ready() {
                    let deadline = this.last_read + this.idle_timeout;
                    if deadline <= Instant::now() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("nothing received for {:?}", this.idle_timeout),
                        )));
                    }
                    this.idle.as_mut().reset(deadline);
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(idle: Duration) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 2,
            handshake_timeout: idle,
            // Three keepalive intervals make the idle timeout.
            keepalive: idle / 3,
        }
    }

    async fn listener() -> (TcpListener, std::net::SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        (l, addr)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_fails_its_read_after_the_idle_timeout() {
        let (l, addr) = listener().await;
        let incoming = accept(l, 2, &limits(Duration::from_secs(30)));
        tokio::pin!(incoming);
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let mut conn = incoming.next().await.expect("conn").expect("ok");

        // Data keeps it alive past the timeout.
        let mut buf = [0u8; 8];
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(20)).await;
            client.write_all(b"ping").await.expect("write");
            let n = conn.read(&mut buf).await.expect("read");
            assert_eq!(&buf[..n], b"ping");
        }
        // Then silence: the read fails once the idle timeout has passed.
        let started = Instant::now();
        let err = conn.read(&mut buf).await.expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(30));
        drop(client);
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_permits_come_back() {
        let (l, addr) = listener().await;
        let incoming = accept(l, 2, &limits(Duration::from_secs(300)));
        tokio::pin!(incoming);
        let mut a = TcpStream::connect(addr).await.expect("a");
        let _b = TcpStream::connect(addr).await.expect("b");
        let mut over = TcpStream::connect(addr).await.expect("over");
        let mut conn_a = incoming.next().await.expect("a").expect("ok");
        let _conn_b = incoming.next().await.expect("b").expect("ok");

        // Accepting the next one happens inside `next()`: poll it while
        // the third client waits for the server to close it.
        let mut buf = [0u8; 1];
        let (closed, _) = tokio::select! {
            r = over.read(&mut buf) => (r, ()),
            _ = incoming.next() => panic!("a third connection was admitted"),
        };
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");

        // The admitted ones still work.
        a.write_all(b"x").await.expect("write");
        let n = conn_a.read(&mut buf).await.expect("read");
        assert_eq!(n, 1);

        // Closing one frees its permit for a new client.
        drop(conn_a);
        let _c = TcpStream::connect(addr).await.expect("c");
        let conn_c = incoming.next().await.expect("c");
        assert!(conn_c.is_ok());
    }

    #[test]
    fn the_connection_limit_fits_the_open_file_limit() {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        assert_eq!(fit_open_file_limit(10), 10);
        let fitted = fit_open_file_limit(usize::MAX);
        if let Some(soft) = soft {
            assert!(fitted as u64 <= soft, "{fitted} > {soft}");
        }
    }
}

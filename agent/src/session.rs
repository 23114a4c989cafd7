//! The agent's side of the session: dial out, say hello, report the
//! inventory, send heartbeats, run the controller's requests (through
//! [`Dispatcher`]); reconnect with exponential backoff and jitter whenever
//! the stream fails or the controller goes away.

use std::time::{Duration, Instant};

use ferry_core::{Chain, CodedError, ErrorCode};
use ferry_proto::identity::PeerIdentity;
use ferry_proto::tls::{self, TlsError};
use ferry_proto::v1 as pb;
use ferry_proto::v1::agent_message::Kind as AgentKind;
use ferry_proto::v1::agent_sessions_client::AgentSessionsClient;
use ferry_proto::v1::controller_message::Kind as ControllerKind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::enrol::AgentFiles;
use crate::requests::Dispatcher;

/// Inventory is re-sent this often even when nothing asked for it.
const INVENTORY_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot read {}: {source}; run `ferry-agent join` first", path.display())]
    MissingFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent certificate {} is not an agent identity: {reason}", path.display())]
    NotAnAgent {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the controller ended the session ({code:?}): {message}")]
    Status { code: tonic::Code, message: String },
    #[error("the controller closed the session")]
    Closed,
    #[error("the controller's first message was not a welcome")]
    NoWelcome,
}

impl From<tonic::Status> for SessionError {
    fn from(s: tonic::Status) -> Self {
        Self::Status {
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

impl SessionError {
    /// The controller ended the session for a newer one of the same agent
    /// (the one status it ends a session with `ABORTED` for).
    pub fn superseded(&self) -> bool {
        matches!(
            self,
            Self::Status {
                code: tonic::Code::Aborted,
                ..
            }
        )
    }
}

impl CodedError for SessionError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::MissingFile { .. } | Self::NotAnAgent { .. } => ErrorCode::FailedPrecondition,
            Self::Tls(e) => e.code(),
            Self::Status { code, .. } => ferry_proto::status::code_from_grpc(*code),
            Self::Closed | Self::NoWelcome => ErrorCode::Unavailable,
        }
    }
}

/// Identity and connection settings loaded from the data directory.
#[derive(Clone)]
pub struct SessionSettings {
    pub controller: String,
    pub cluster: String,
    pub node: String,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    pub heartbeat: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl std::fmt::Debug for SessionSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSettings")
            .field("controller", &self.controller)
            .field("cluster", &self.cluster)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn read(path: &std::path::Path) -> Result<String, SessionError> {
    std::fs::read_to_string(path).map_err(|source| SessionError::MissingFile {
        path: path.to_owned(),
        source,
    })
}

impl SessionSettings {
    pub fn load(config: &AgentConfig) -> Result<Self, SessionError> {
        let files = AgentFiles::new(&config.data_dir);
        let cert_pem = read(&files.cert)?;
        let der = tls::first_cert_der(&cert_pem, "agent certificate")?;
        let (cluster, node) = match PeerIdentity::from_cert_der(der.as_ref()) {
            Ok(PeerIdentity::Agent { cluster, node }) => (cluster, node),
            Ok(other) => {
                return Err(SessionError::NotAnAgent {
                    path: files.cert,
                    reason: format!("it names {other}"),
                });
            }
            Err(e) => {
                return Err(SessionError::NotAnAgent {
                    path: files.cert,
                    reason: e.to_string(),
                });
            }
        };
        Ok(Self {
            controller: config.controller.clone(),
            cluster,
            node,
            ca_pem: read(&files.ca)?,
            cert_pem,
            key_pem: read(&files.key)?,
            heartbeat: config.heartbeat(),
            reconnect_min: Duration::from_millis(config.reconnect_min_ms),
            reconnect_max: Duration::from_millis(config.reconnect_max_ms),
        })
    }
}

/// The next backoff delay: doubling up to `max`, with up to 50 % jitter
/// subtracted so a fleet does not reconnect in lockstep.
pub fn next_backoff(current: Duration, min: Duration, max: Duration) -> (Duration, Duration) {
    let next = (current * 2).clamp(min, max);
    let jitter = rand::random::<f64>() * 0.5;
    let sleep = current.mul_f64(1.0 - jitter).max(min / 2);
    (sleep, next)
}

/// How a session attempt ended, as far as the backoff cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionEnd {
    /// The controller accepted the session: its welcome arrived.
    pub established: bool,
    /// From dialling to the end of the session.
    pub lasted: Duration,
}

/// The backoff to go on from after a session ended. A session the
/// controller accepted proves it is back, however short the session was
/// (a controller restarted twice in a row must not leave its agents
/// waiting out a long delay), so the backoff starts again at `min`; so it
/// does after an attempt that lasted longer than the ceiling. Failed
/// attempts keep growing it.
pub fn backoff_after(end: SessionEnd, current: Duration, min: Duration, max: Duration) -> Duration {
    if end.established || end.lasted > max {
        min
    } else {
        current
    }
}

/// Keeps a session open until `cancel`; reconnects forever otherwise.
pub async fn run(
    settings: SessionSettings,
    steps: crate::steps::StepCtx,
    cancel: CancellationToken,
) {
    let mut backoff = settings.reconnect_min;
    loop {
        let started = Instant::now();
        let mut established = false;
        let result = tokio::select! {
            r = session_once(&settings, &steps, &cancel, &mut established) => r,
            () = cancel.cancelled() => Ok(()),
        };
        if cancel.is_cancelled() {
            break;
        }
        let mut superseded = false;
        match result {
            Ok(()) => tracing::warn!(controller = %settings.controller, "session ended"),
            Err(e) => {
                superseded = e.superseded();
                if superseded {
                    tracing::error!(controller = %settings.controller, error = %Chain(&e),
                        "another session of this agent replaced this one: is a second agent running with the same identity (a copied data directory or VM)?");
                } else {
                    tracing::warn!(controller = %settings.controller, error = %Chain(&e), "session failed");
                }
            }
        }
        // Two agents sharing one identity replace each other's sessions:
        // backing off as for a failure keeps them from doing so in a loop.
        let end = SessionEnd {
            established: established && !superseded,
            lasted: started.elapsed(),
        };
        backoff = backoff_after(end, backoff, settings.reconnect_min, settings.reconnect_max);
        let (sleep, next) = next_backoff(backoff, settings.reconnect_min, settings.reconnect_max);
        backoff = next;
        tracing::info!(
            delay_ms = u64::try_from(sleep.as_millis()).unwrap_or(u64::MAX),
            "reconnecting"
        );
        tokio::select! {
            () = tokio::time::sleep(sleep) => {},
            () = cancel.cancelled() => break,
        }
    }
}

/// One session, from dialling to its end; sets `established` once the
/// controller's welcome arrives.
async fn session_once(
    s: &SessionSettings,
    steps: &crate::steps::StepCtx,
    cancel: &CancellationToken,
    established: &mut bool,
) -> Result<(), SessionError> {
    let channel = tls::channel(&s.controller, &s.ca_pem, &s.cert_pem, &s.key_pem).await?;
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(16);
    let send = |kind| pb::AgentMessage { kind: Some(kind) };
    // The channel is fresh and has room.
    let _ = tx.try_send(send(AgentKind::Hello(pb::Hello {
        cluster: s.cluster.clone(),
        node: s.node.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        platform: steps.platform.name().to_owned(),
        restores: steps
            .platform
            .restores()
            .into_iter()
            .map(str::to_owned)
            .collect(),
    })));
    let mut inbound = AgentSessionsClient::new(channel)
        .open_session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let heartbeat = match inbound.message().await? {
        Some(pb::ControllerMessage {
            kind: Some(ControllerKind::Welcome(w)),
        }) => {
            *established = true;
            tracing::info!(cluster = %s.cluster, node = %s.node, controller_version = %w.version, "session established");
            u64::try_from(w.heartbeat_interval_ms)
                .ok()
                .filter(|ms| *ms > 0)
                .map_or(s.heartbeat, Duration::from_millis)
        }
        Some(_) => return Err(SessionError::NoWelcome),
        None => return Err(SessionError::Closed),
    };
    let mut requests = Dispatcher::new(tx.clone(), steps.clone());
    let result = serve(&mut requests, &tx, &mut inbound, heartbeat, cancel).await;
    requests.shutdown().await;
    result
}

/// The established session: heartbeats, inventories and requests until
/// either side ends it.
async fn serve(
    requests: &mut Dispatcher,
    tx: &mpsc::Sender<pb::AgentMessage>,
    inbound: &mut tonic::Streaming<pb::ControllerMessage>,
    heartbeat: Duration,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let mut beat = tokio::time::interval(heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: the inventory goes out at once.
    let mut inv_tick = tokio::time::interval(INVENTORY_EVERY);
    inv_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            _ = beat.tick() => {
                let hb = pb::AgentMessage {
                    kind: Some(AgentKind::Heartbeat(pb::Heartbeat { sent_unix_ms: ferry_core::now_ms() })),
                };
                if tx.send(hb).await.is_err() {
                    return Err(SessionError::Closed);
                }
            }
            _ = inv_tick.tick() => requests.send_inventory(),
            () = requests.reap() => {}
            msg = inbound.message() => match msg? {
                Some(pb::ControllerMessage { kind: Some(kind) }) => match kind {
                    ControllerKind::HeartbeatAck(_) => {}
                    ControllerKind::Request(r) => {
                        tracing::debug!(request = r.id, "request received");
                        requests.request(r);
                    }
                    ControllerKind::Cancel(c) => requests.cancel(c.id),
                    ControllerKind::Welcome(_) => {
                        tracing::debug!("second welcome ignored");
                    }
                },
                Some(pb::ControllerMessage { kind: None }) => {
                    tracing::debug!("controller message of unknown kind ignored");
                }
                None => return Err(SessionError::Closed),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_ceiling_with_jitter() {
        let min = Duration::from_millis(100);
        let max = Duration::from_millis(1600);
        let mut cur = min;
        for _ in 0..10 {
            let (sleep, next) = next_backoff(cur, min, max);
            assert!(sleep <= cur, "{sleep:?} > {cur:?}");
            assert!(sleep >= min / 2);
            assert!(next <= max && next >= cur.min(max));
            cur = next;
        }
        assert_eq!(cur, max);
    }

    const MIN: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);

    fn end(established: bool, lasted_ms: u64) -> SessionEnd {
        SessionEnd {
            established,
            lasted: Duration::from_millis(lasted_ms),
        }
    }

    #[test]
    fn an_accepted_session_resets_the_backoff_however_short() {
        let grown = Duration::from_secs(16);
        assert_eq!(backoff_after(end(true, 5), grown, MIN, MAX), MIN);
        assert_eq!(backoff_after(end(true, 60_000), grown, MIN, MAX), MIN);
        // A long attempt resets it too, accepted or not.
        assert_eq!(backoff_after(end(false, 31_000), grown, MIN, MAX), MIN);
    }

    #[test]
    fn failed_attempts_keep_growing_the_backoff() {
        let grown = Duration::from_secs(16);
        assert_eq!(backoff_after(end(false, 5), grown, MIN, MAX), grown);
        assert_eq!(backoff_after(end(false, 29_000), grown, MIN, MAX), grown);
    }

    /// The run loop's arithmetic: a controller that is down for a while,
    /// comes back for a moment, then goes down again.
    #[test]
    fn the_first_retry_after_an_accepted_session_is_quick() {
        fn retry(end: SessionEnd, backoff: &mut Duration) -> Duration {
            *backoff = backoff_after(end, *backoff, MIN, MAX);
            let (sleep, next) = next_backoff(*backoff, MIN, MAX);
            *backoff = next;
            sleep
        }
        let mut backoff = MIN;
        for _ in 0..12 {
            retry(end(false, 3), &mut backoff);
        }
        assert_eq!(backoff, MAX, "failures grow the backoff to the ceiling");
        // Accepted, then lost again at once: retried within `min`.
        let sleep = retry(end(true, 40), &mut backoff);
        assert!(sleep <= MIN, "{sleep:?}");
        // And lost twice quickly: still near the floor, not at the ceiling.
        let sleep = retry(end(true, 40), &mut backoff);
        assert!(sleep <= MIN, "{sleep:?}");
    }
}

//! The controller's end of one agent session: send the agent requests and
//! await their replies and progress.
//!
//! A [`Link`] is created when a session is admitted and held by the fleet
//! registry while the session lives. [`Link::call`] sends a request and
//! returns a [`Call`]: its progress arrives on [`Call::progress`], its reply
//! from [`Call::finish`]. Dropping a `Call` before its reply cancels the
//! request on the agent. When the session ends (the agent went away, the
//! controller stops, or a newer session of the same agent replaced it)
//! every pending call fails with [`LinkError::SessionEnded`]; nothing waits
//! forever.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_core::{CodedError, ErrorCode};
use ferry_proto::v1 as pb;
use ferry_proto::v1::controller_message::Kind as ControllerKind;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::catalog::{ClusterName, NodeName};

/// What the session task sends to the agent.
pub type Outbound = mpsc::Sender<Result<pb::ControllerMessage, Status>>;

/// Progress messages buffered per call; a reader that falls behind misses
/// the newest progress while the buffer is full, never the reply.
const PROGRESS_BUFFER: usize = 16;

/// Calls in flight on one session at most; more are refused as unavailable
/// (the job engine keeps far fewer).
const MAX_PENDING: usize = 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error("agent {node} of cluster {cluster} is not connected")]
    NotConnected {
        cluster: ClusterName,
        node: NodeName,
    },
    #[error("the session with the agent ended before it replied: {reason}")]
    SessionEnded { reason: String },
    #[error("the agent did not reply within {} ms", .0.as_millis())]
    DeadlineExceeded(Duration),
    #[error("the agent has {MAX_PENDING} requests in flight; try again later")]
    Busy,
    #[error("the agent answered with a reply of another kind")]
    UnexpectedReply,
    #[error("the agent failed the request ({code}): {message}")]
    Remote { code: ErrorCode, message: String },
}

impl CodedError for LinkError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::NotConnected { .. } | Self::SessionEnded { .. } | Self::Busy => {
                ErrorCode::Unavailable
            }
            Self::DeadlineExceeded(_) => ErrorCode::DeadlineExceeded,
            Self::UnexpectedReply => ErrorCode::Internal,
            Self::Remote { code, .. } => *code,
        }
    }
}

/// The result part of a reply, or why there is none.
pub type ReplyResult = Result<pb::reply::Result, LinkError>;

struct Pending {
    reply: oneshot::Sender<ReplyResult>,
    progress: mpsc::Sender<pb::Progress>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// Set once the session ended: new calls fail at once.
    ended: Option<String>,
}

/// One live session's request channel to its agent.
pub struct Link {
    /// Dropped when the link ends, so the agent's stream closes once the
    /// session task is gone.
    outbound: Mutex<Option<Outbound>>,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Cancelled when the session must end (superseded, or shutting down).
    closing: CancellationToken,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").finish_non_exhaustive()
    }
}

impl Link {
    pub fn new(outbound: Outbound) -> Arc<Self> {
        Arc::new(Self {
            outbound: Mutex::new(Some(outbound)),
            state: Mutex::default(),
            next_id: AtomicU64::new(1),
            closing: CancellationToken::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a single insert or remove: poisoning cannot leave
        // the map inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a request; the agent gives up after `timeout` and so does the
    /// returned call.
    pub async fn call(
        self: &Arc<Self>,
        kind: pb::request::Kind,
        timeout: Duration,
    ) -> Result<Call, LinkError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        let (progress_tx, progress_rx) = mpsc::channel(PROGRESS_BUFFER);
        {
            let mut st = self.lock();
            if let Some(reason) = &st.ended {
                return Err(LinkError::SessionEnded {
                    reason: reason.clone(),
                });
            }
            if st.pending.len() >= MAX_PENDING {
                return Err(LinkError::Busy);
            }
            st.pending.insert(
                id,
                Pending {
                    reply: reply_tx,
                    progress: progress_tx,
                },
            );
        }
        let call = Call {
            id,
            link: Arc::clone(self),
            reply: Some(reply_rx),
            progress: progress_rx,
            deadline: tokio::time::Instant::now() + timeout,
            timeout,
        };
        let request = pb::ControllerMessage {
            kind: Some(ControllerKind::Request(pb::Request {
                id,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                kind: Some(kind),
            })),
        };
        let outbound = self
            .outbound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(outbound) = outbound else {
            return Err(LinkError::SessionEnded {
                reason: self.reason(),
            });
        };
        let sent = tokio::select! {
            r = outbound.send(Ok(request)) => r.is_ok(),
            () = self.closing.cancelled() => false,
            () = tokio::time::sleep_until(call.deadline) => {
                return Err(LinkError::DeadlineExceeded(timeout));
            }
        };
        drop(outbound);
        if !sent {
            self.end("the session's outbound stream is closed");
            return Err(LinkError::SessionEnded {
                reason: self.reason(),
            });
        }
        Ok(call)
    }

    /// Delivers a reply from the agent. A reply to no pending call (it was
    /// cancelled, or timed out) is dropped.
    pub fn complete(&self, reply: pb::Reply) {
        let Some(pending) = self.lock().pending.remove(&reply.id) else {
            tracing::debug!(request = reply.id, "reply to no pending request dropped");
            return;
        };
        let result = match reply.result {
            Some(pb::reply::Result::Error(e)) => Err(LinkError::Remote {
                code: ErrorCode::from_name(&e.code).unwrap_or(ErrorCode::Internal),
                message: e.message.chars().take(4096).collect(),
            }),
            Some(other) => Ok(other),
            None => Err(LinkError::UnexpectedReply),
        };
        let _ = pending.reply.send(result);
    }

    /// Delivers progress from the agent; dropped when the caller is behind.
    pub fn progress(&self, progress: pb::Progress) {
        let st = self.lock();
        if let Some(p) = st.pending.get(&progress.id) {
            let _ = p.progress.try_send(progress);
        }
    }

    /// Ends the link: every pending call fails with `reason`, new calls are
    /// refused, and the session task is told to close.
    pub fn end(&self, reason: &str) {
        let pending = {
            let mut st = self.lock();
            if st.ended.is_none() {
                st.ended = Some(reason.to_owned());
            }
            std::mem::take(&mut st.pending)
        };
        for (_, p) in pending {
            let _ = p.reply.send(Err(LinkError::SessionEnded {
                reason: reason.to_owned(),
            }));
        }
        self.outbound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.closing.cancel();
    }

    /// Why the link ended (empty while it lives).
    pub fn reason(&self) -> String {
        self.lock().ended.clone().unwrap_or_default()
    }

    /// Resolves once [`Link::end`] was called.
    pub async fn closing(&self) {
        self.closing.cancelled().await;
    }

    /// Calls awaiting a reply.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// Asks the agent to stop request `id`, still awaiting its reply (a
    /// job step that must clean up before it answers).
    pub fn send_cancel(&self, id: u64) {
        let cancel = pb::ControllerMessage {
            kind: Some(ControllerKind::Cancel(pb::Cancel { id })),
        };
        if let Some(tx) = &*self.outbound.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = tx.try_send(Ok(cancel));
        }
    }

    fn abandon(&self, id: u64) {
        if self.lock().pending.remove(&id).is_some() {
            let cancel = pb::ControllerMessage {
                kind: Some(ControllerKind::Cancel(pb::Cancel { id })),
            };
            // Best effort: a full channel means the session is in trouble,
            // and its end fails the call anyway.
            if let Some(tx) = &*self.outbound.lock().unwrap_or_else(|p| p.into_inner()) {
                let _ = tx.try_send(Ok(cancel));
            }
        }
    }
}

/// A request sent to an agent, awaiting its reply.
pub struct Call {
    id: u64,
    link: Arc<Link>,
    reply: Option<oneshot::Receiver<ReplyResult>>,
    /// Progress reported by the agent, in order; closed with the reply.
    pub progress: mpsc::Receiver<pb::Progress>,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl Call {
    /// The request's id within its session.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// When the caller stops waiting for the reply.
    pub fn deadline(&self) -> tokio::time::Instant {
        self.deadline
    }

    /// Waits for the reply, until the request's deadline.
    pub async fn finish(mut self) -> ReplyResult {
        let Some(rx) = self.reply.take() else {
            return Err(LinkError::UnexpectedReply);
        };
        match tokio::time::timeout_at(self.deadline, rx).await {
            Ok(Ok(result)) => result,
            // The sender is only dropped by `end`, which sends first.
            Ok(Err(_)) => Err(LinkError::SessionEnded {
                reason: "the session ended".to_owned(),
            }),
            Err(_) => {
                self.link.abandon(self.id);
                Err(LinkError::DeadlineExceeded(self.timeout))
            }
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // Not finished: the caller gave up, so the agent may stop too.
        if self.reply.is_some() {
            self.link.abandon(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::v1::controller_message::Kind;

    fn ping() -> pb::request::Kind {
        pb::request::Kind::Ping(pb::PingRequest { hold_ms: 0 })
    }

    fn request_of(msg: Option<Result<pb::ControllerMessage, Status>>) -> pb::Request {
        match msg.and_then(|m| m.ok()).and_then(|m| m.kind) {
            Some(Kind::Request(r)) => r,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    fn pong(id: u64) -> pb::Reply {
        pb::Reply {
            id,
            result: Some(pb::reply::Result::Ping(pb::PingReply {
                version: "v".into(),
                ..Default::default()
            })),
        }
    }

    #[tokio::test]
    async fn replies_and_progress_reach_their_own_call() {
        let (tx, mut rx) = mpsc::channel(8);
        let link = Link::new(tx);
        let mut a = link.call(ping(), Duration::from_secs(5)).await.expect("a");
        let b = link.call(ping(), Duration::from_secs(5)).await.expect("b");
        let ra = request_of(rx.recv().await);
        let rb = request_of(rx.recv().await);
        assert_ne!(ra.id, rb.id);
        assert_eq!(ra.timeout_ms, 5000);
        link.progress(pb::Progress {
            id: ra.id,
            done: 1,
            total: 2,
            message: "half".into(),
        });
        link.complete(pong(rb.id));
        link.complete(pong(ra.id));
        assert_eq!(a.progress.recv().await.map(|p| p.done), Some(1));
        assert!(matches!(b.finish().await, Ok(pb::reply::Result::Ping(_))));
        assert!(matches!(a.finish().await, Ok(pb::reply::Result::Ping(_))));
        assert_eq!(link.pending(), 0);
    }

    #[tokio::test]
    async fn an_agent_error_keeps_its_code() {
        let (tx, mut rx) = mpsc::channel(8);
        let link = Link::new(tx);
        let call = link
            .call(ping(), Duration::from_secs(5))
            .await
            .expect("call");
        let id = request_of(rx.recv().await).id;
        link.complete(pb::Reply {
            id,
            result: Some(pb::reply::Result::Error(pb::RequestError {
                code: "failed_precondition".into(),
                message: "not now".into(),
            })),
        });
        let err = call.finish().await.expect_err("error");
        assert_eq!(err.code(), ErrorCode::FailedPrecondition);
        assert!(err.to_string().contains("not now"), "{err}");
    }

    #[tokio::test]
    async fn the_end_of_the_session_fails_pending_and_new_calls() {
        let (tx, _rx) = mpsc::channel(8);
        let link = Link::new(tx);
        let call = link
            .call(ping(), Duration::from_secs(60))
            .await
            .expect("call");
        link.end("superseded by a newer session");
        let err = call.finish().await.expect_err("ended");
        assert!(matches!(err, LinkError::SessionEnded { .. }), "{err}");
        assert!(err.to_string().contains("superseded"), "{err}");
        let err = link
            .call(ping(), Duration::from_secs(1))
            .await
            .err()
            .expect("refused");
        assert_eq!(err.code(), ErrorCode::Unavailable);
        // `closing` resolves at once now.
        tokio::time::timeout(Duration::from_secs(1), link.closing())
            .await
            .expect("closing");
    }

    #[tokio::test]
    async fn a_call_given_up_cancels_the_request_on_the_agent() {
        let (tx, mut rx) = mpsc::channel(8);
        let link = Link::new(tx);
        let call = link
            .call(ping(), Duration::from_millis(50))
            .await
            .expect("call");
        let id = request_of(rx.recv().await).id;
        let err = call.finish().await.expect_err("times out");
        assert_eq!(err.code(), ErrorCode::DeadlineExceeded);
        match rx.recv().await.and_then(|m| m.ok()).and_then(|m| m.kind) {
            Some(Kind::Cancel(c)) => assert_eq!(c.id, id),
            other => panic!("expected a cancel, got {other:?}"),
        }
        // A late reply is dropped quietly.
        link.complete(pong(id));
        assert_eq!(link.pending(), 0);

        // Dropping an unfinished call cancels too.
        let call = link
            .call(ping(), Duration::from_secs(5))
            .await
            .expect("call");
        let id = request_of(rx.recv().await).id;
        drop(call);
        match rx.recv().await.and_then(|m| m.ok()).and_then(|m| m.kind) {
            Some(Kind::Cancel(c)) => assert_eq!(c.id, id),
            other => panic!("expected a cancel, got {other:?}"),
        }
    }
}

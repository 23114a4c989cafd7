//! `AgentSessions.OpenSession`: the long-lived stream every agent keeps
//! open. The first message must be a `Hello` whose cluster and node match the
//! agent's certificate; then heartbeats and inventories flow until either
//! side goes away.

use std::pin::Pin;
use std::time::Duration;

use ferry_core::{Inventory, now_ms};
use ferry_proto::v1 as pb;
use ferry_proto::v1::agent_message::Kind as AgentKind;
use ferry_proto::v1::agent_sessions_server::AgentSessions;
use ferry_proto::v1::controller_message::Kind as ControllerKind;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::AgentPeer;
use super::{ApiError, Shared};
use crate::catalog::{AgentRecord, Timestamp};

/// How long an agent has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Outbound messages buffered per session.
const OUTBOUND_BUFFER: usize = 16;

pub struct AgentSessionApi {
    shared: Shared,
}

impl AgentSessionApi {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

impl AgentSessionApi {
    /// Checks the hello against the certificate and the catalog, and records
    /// the agent's version and platform.
    async fn admit(&self, peer: &AgentPeer, hello: pb::Hello) -> Result<AgentRecord, ApiError> {
        if hello.cluster != peer.cluster.as_str() {
            return Err(ApiError::Denied(format!(
                "agent certificate is for cluster {}, but the agent claims cluster {:?}",
                peer.cluster,
                hello.cluster.chars().take(80).collect::<String>()
            )));
        }
        if hello.node != peer.node.as_str() {
            return Err(ApiError::Denied(format!(
                "agent certificate is for node {}, but the agent claims node {:?}",
                peer.node,
                hello.node.chars().take(80).collect::<String>()
            )));
        }
        let agents = self.shared.catalog.list_agents(Some(&peer.cluster)).await?;
        let mut record = agents
            .into_iter()
            .find(|a| a.node == peer.node)
            .ok_or_else(|| {
                ApiError::Denied(format!(
                    "node {} is not enrolled in cluster {}",
                    peer.node, peer.cluster
                ))
            })?;
        if record.cert_fingerprint != peer.cert_fingerprint {
            return Err(ApiError::Denied(format!(
                "the certificate of node {} in cluster {} was replaced by a newer enrolment",
                peer.node, peer.cluster
            )));
        }
        record.version = hello.version.chars().take(64).collect();
        record.platform = hello.platform.chars().take(64).collect();
        record.last_seen = Timestamp::now();
        self.shared.catalog.upsert_agent(record.clone()).await?;
        Ok(record)
    }
}

type OutStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentSessions for AgentSessionApi {
    type OpenSessionStream = OutStream;

    #[tracing::instrument(skip_all, name = "agent_session")]
    async fn open_session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::OpenSessionStream>, Status> {
        let peer = request
            .extensions()
            .get::<AgentPeer>()
            .cloned()
            .ok_or_else(|| {
                Status::unauthenticated("agent session requires a client certificate")
            })?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 30 seconds"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(AgentKind::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of an agent session must be a hello",
                ));
            }
        };
        let record = self.admit(&peer, hello).await.map_err(|e| {
            tracing::warn!(cluster = %peer.cluster, node = %peer.node, error = %e, "agent session refused");
            Status::from(e)
        })?;
        let shared = self.shared.clone();
        let session = shared
            .fleet
            .connect(&record.cluster, &record.node, &record.id);
        tracing::info!(cluster = %record.cluster, node = %record.node, agent = %record.id,
            version = %record.version, platform = %record.platform, %session, "agent online");

        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let welcome = pb::ControllerMessage {
            kind: Some(ControllerKind::Welcome(pb::Welcome {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                heartbeat_interval_ms: i64::try_from(shared.heartbeat.as_millis())
                    .unwrap_or(i64::MAX),
            })),
        };
        // The channel is fresh and has room: this cannot fail.
        let _ = tx.try_send(Ok(welcome));
        // Missing three heartbeats ends the session.
        let silence = shared.heartbeat * 3;
        tokio::spawn(async move {
            let end = loop {
                let next = tokio::select! {
                    () = shared.shutdown.cancelled() => break "controller shutting down".to_owned(),
                    next = tokio::time::timeout(silence, inbound.message()) => next,
                };
                let msg = match next {
                    Err(_) => break format!("no message for {} seconds", silence.as_secs()),
                    Ok(Err(status)) => break format!("stream failed: {}", status.message()),
                    Ok(Ok(None)) => break "agent closed the session".to_owned(),
                    Ok(Ok(Some(m))) => m,
                };
                shared.fleet.seen(&record.id, Timestamp::now());
                match msg.kind {
                    Some(AgentKind::Heartbeat(hb)) => {
                        let ack = pb::ControllerMessage {
                            kind: Some(ControllerKind::HeartbeatAck(pb::HeartbeatAck {
                                sent_unix_ms: hb.sent_unix_ms,
                                received_unix_ms: now_ms(),
                            })),
                        };
                        if tx.send(Ok(ack)).await.is_err() {
                            break "agent went away".to_owned();
                        }
                    }
                    Some(AgentKind::Inventory(inv)) => {
                        // Validated on the way in: names, paths, kinds, consistency.
                        let result = match Inventory::try_from(inv).map_err(ApiError::from) {
                            Ok(Inventory { apps, .. }) => {
                                let n = apps.len();
                                shared
                                    .catalog
                                    .replace_inventory(
                                        &record.cluster,
                                        &record.node,
                                        apps,
                                        Timestamp::now(),
                                    )
                                    .await
                                    .map(|()| n)
                                    .map_err(ApiError::from)
                            }
                            Err(e) => Err(e),
                        };
                        match result {
                            Ok(n) => {
                                tracing::info!(cluster = %record.cluster, node = %record.node, apps = n, "inventory recorded")
                            }
                            Err(e) => {
                                tracing::warn!(cluster = %record.cluster, node = %record.node, error = %e, "inventory refused");
                                let _ = tx.send(Err(Status::from(e))).await;
                                break "inventory refused".to_owned();
                            }
                        }
                    }
                    Some(AgentKind::Hello(_)) => {
                        let _ = tx
                            .send(Err(Status::invalid_argument(
                                "hello sent twice in one session",
                            )))
                            .await;
                        break "hello sent twice".to_owned();
                    }
                    None => {
                        tracing::debug!(cluster = %record.cluster, node = %record.node, "message of unknown kind ignored");
                    }
                }
            };
            shared
                .fleet
                .disconnect(&record.cluster, &record.node, session);
            tracing::info!(cluster = %record.cluster, node = %record.node, %session, reason = %end, "agent offline");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

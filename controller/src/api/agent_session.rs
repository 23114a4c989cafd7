//! `AgentSessions.OpenSession`: the long-lived stream every agent keeps
//! open. The first message must be a `Hello` whose cluster and node match the
//! agent's certificate; then heartbeats and inventories flow from the agent,
//! requests (through the session's [`Link`]) from the controller, until
//! either side goes away or a newer session of the same agent replaces it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::{Inventory, now_ms};
use ferry_proto::convert::InventoryParts;
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
use crate::link::{Link, Outbound};

/// How long an agent has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Outbound messages buffered per session.
const OUTBOUND_BUFFER: usize = 16;
/// The most apps one node may report, and the most bytes of its inventory.
const MAX_INVENTORY_APPS: usize = 100_000;
const MAX_INVENTORY_BYTES: usize = 64 << 20;

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
        let mut record = self
            .shared
            .catalog
            .agent_of_node(&peer.cluster, &peer.node)
            .await?
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
        record.restores = hello
            .restores
            .iter()
            .take(16)
            .map(|d| d.chars().take(64).collect())
            .collect();
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
        let link = Link::new(tx.clone());
        let session =
            shared
                .fleet
                .connect(&record.cluster, &record.node, &record.id, Arc::clone(&link));
        tracing::info!(cluster = %record.cluster, node = %record.node, agent = %record.id,
            version = %record.version, platform = %record.platform, %session, "agent online");
        tokio::spawn(async move {
            let end = serve(&shared, &record, &link, inbound, &tx).await;
            link.end(&end);
            drop(tx);
            shared
                .fleet
                .disconnect(&record.cluster, &record.node, session);
            tracing::info!(cluster = %record.cluster, node = %record.node, %session, reason = %end, "agent offline");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves one admitted session until it ends; returns why it ended.
async fn serve(
    shared: &Shared,
    record: &AgentRecord,
    link: &Link,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: &Outbound,
) -> String {
    // Missing three heartbeats ends the session.
    let silence = shared.heartbeat * 3;
    let mut parts = InventoryParts::new(MAX_INVENTORY_APPS, MAX_INVENTORY_BYTES);
    loop {
        let next = tokio::select! {
            () = shared.shutdown.cancelled() => return "controller shutting down".to_owned(),
            () = link.closing() => {
                let reason = link.reason();
                let status = Status::aborted(format!("session closed: {reason}"));
                let _ = tokio::time::timeout(Duration::from_secs(5), tx.send(Err(status))).await;
                return reason;
            }
            next = tokio::time::timeout(silence, inbound.message()) => next,
        };
        let msg = match next {
            Err(_) => return format!("no message for {} seconds", silence.as_secs()),
            Ok(Err(status)) => {
                // Tell the agent why, if it still listens: an oversized
                // message is refused here, and the agent must learn it.
                let reason = format!("cannot read the agent's message: {}", status.message());
                let _ = tx.try_send(Err(Status::new(status.code(), reason.clone())));
                return reason;
            }
            Ok(Ok(None)) => return "agent closed the session".to_owned(),
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
                    return "agent went away".to_owned();
                }
            }
            Some(AgentKind::Inventory(part)) => {
                // Validated on the way in: names, paths, kinds, consistency.
                let result = match parts.push(part).map_err(ApiError::from) {
                    Ok(None) => continue,
                    Ok(Some(Inventory { apps, .. })) => {
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
                        tracing::info!(cluster = %record.cluster, node = %record.node, apps = n, "inventory recorded");
                    }
                    Err(e) => {
                        tracing::warn!(cluster = %record.cluster, node = %record.node, error = %e, "inventory refused");
                        let _ = tx.send(Err(Status::from(e))).await;
                        return "inventory refused".to_owned();
                    }
                }
            }
            // Messages are handled in order: a reply sent after an
            // inventory finds it recorded.
            Some(AgentKind::Reply(reply)) => link.complete(reply),
            Some(AgentKind::Progress(progress)) => link.progress(progress),
            Some(AgentKind::Hello(_)) => {
                let _ = tx
                    .send(Err(Status::invalid_argument(
                        "hello sent twice in one session",
                    )))
                    .await;
                return "hello sent twice".to_owned();
            }
            None => {
                tracing::debug!(cluster = %record.cluster, node = %record.node, "message of unknown kind ignored");
            }
        }
    }
}

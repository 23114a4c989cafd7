//! Which agents are connected right now (memory only), with the [`Link`]
//! to send each one requests, and their last-seen times, flushed to the
//! catalog in batches so a heartbeat does not cost a durable write per
//! agent. One live session per agent: a reconnect replaces the old
//! session's entry and ends the old session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferry_core::Chain;
use tokio_util::sync::CancellationToken;

use crate::catalog::{AgentId, Catalog, ClusterName, NodeName, Timestamp};
use crate::link::{Link, LinkError};

/// Identifies one session, so a stale session ending does not mark the
/// agent's newer session offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s{}", self.0)
    }
}

#[derive(Debug, Clone)]
pub struct OnlineAgent {
    pub session: SessionId,
    pub agent: AgentId,
    pub connected_at: Timestamp,
    pub link: Arc<Link>,
}

#[derive(Default)]
struct State {
    online: HashMap<(ClusterName, NodeName), OnlineAgent>,
    seen: HashMap<AgentId, Timestamp>,
}

/// The controller's live view of its agents.
#[derive(Default)]
pub struct Fleet {
    state: Mutex<State>,
    next_session: AtomicU64,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").finish_non_exhaustive()
    }
}

impl Fleet {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps inconsistent
        // (each update is a single insert/remove), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks an agent online, reachable through `link`, and returns its new
    /// session; a previous session of the same node is ended.
    pub fn connect(
        &self,
        cluster: &ClusterName,
        node: &NodeName,
        agent: &AgentId,
        link: Arc<Link>,
    ) -> SessionId {
        let session = SessionId(self.next_session.fetch_add(1, Ordering::Relaxed));
        let now = Timestamp::now();
        let old = {
            let mut st = self.lock();
            st.seen.insert(agent.clone(), now);
            st.online.insert(
                (cluster.clone(), node.clone()),
                OnlineAgent {
                    session,
                    agent: agent.clone(),
                    connected_at: now,
                    link,
                },
            )
        };
        if let Some(old) = old {
            old.link.end(&format!(
                "superseded by session {session} of the same agent"
            ));
        }
        session
    }

    /// Marks the session's agent offline, unless a newer session replaced it.
    pub fn disconnect(&self, cluster: &ClusterName, node: &NodeName, session: SessionId) {
        let mut st = self.lock();
        let key = (cluster.clone(), node.clone());
        if st.online.get(&key).is_some_and(|o| o.session == session) {
            st.online.remove(&key);
        }
    }

    /// Records that an agent was heard from; flushed by [`Fleet::flush`].
    pub fn seen(&self, agent: &AgentId, at: Timestamp) {
        self.lock().seen.insert(agent.clone(), at);
    }

    pub fn online(&self, cluster: &ClusterName, node: &NodeName) -> Option<OnlineAgent> {
        self.lock()
            .online
            .get(&(cluster.clone(), node.clone()))
            .cloned()
    }

    /// The link to an online agent.
    pub fn link(&self, cluster: &ClusterName, node: &NodeName) -> Result<Arc<Link>, LinkError> {
        self.online(cluster, node)
            .map(|o| o.link)
            .ok_or_else(|| LinkError::NotConnected {
                cluster: cluster.clone(),
                node: node.clone(),
            })
    }

    /// The links of the online agents, optionally of one cluster, ordered
    /// by (cluster, node).
    pub fn online_links(
        &self,
        cluster: Option<&ClusterName>,
    ) -> Vec<(ClusterName, NodeName, Arc<Link>)> {
        let mut v: Vec<_> = self
            .lock()
            .online
            .iter()
            .filter(|((c, _), _)| cluster.is_none_or(|want| want == c))
            .map(|((c, n), o)| (c.clone(), n.clone(), o.link.clone()))
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }

    /// The link to an online agent, by its id.
    pub fn link_of_agent(&self, agent: &AgentId) -> Option<Arc<Link>> {
        self.lock()
            .online
            .values()
            .find(|o| o.agent == *agent)
            .map(|o| o.link.clone())
    }

    /// The online agents of a cluster with their nodes, ordered by node.
    pub fn online_agents(&self, cluster: &ClusterName) -> Vec<(NodeName, AgentId)> {
        let mut v: Vec<_> = self
            .lock()
            .online
            .iter()
            .filter(|((c, _), _)| c == cluster)
            .map(|((_, n), o)| (n.clone(), o.agent.clone()))
            .collect();
        v.sort();
        v
    }

    pub fn online_count(&self) -> usize {
        self.lock().online.len()
    }

    /// Writes pending last-seen times to the catalog in one batch.
    pub async fn flush(&self, catalog: &dyn Catalog) {
        let batch: Vec<(AgentId, Timestamp)> = self.lock().seen.drain().collect();
        if batch.is_empty() {
            return;
        }
        if let Err(e) = catalog.touch_agents(&batch).await {
            // One unknown agent (removed meanwhile) fails the batch: retry
            // the rest one by one so the others are not lost.
            tracing::debug!(error = %Chain(&e), "batched last-seen update failed, retrying per agent");
            for (agent, at) in batch {
                if let Err(e) = catalog.touch_agent(&agent, at).await {
                    tracing::warn!(agent = %agent, error = %Chain(&e), "cannot record last-seen time");
                }
            }
        }
    }

    /// Flushes last-seen times every `every` until cancelled, then once more.
    pub async fn run_flusher(
        self: Arc<Self>,
        catalog: Arc<dyn Catalog>,
        every: Duration,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush(catalog.as_ref()).await,
                () = cancel.cancelled() => break,
            }
        }
        self.flush(catalog.as_ref()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_session_does_not_take_a_newer_one_offline() {
        let fleet = Fleet::new();
        let c = ClusterName::new("prod").expect("valid");
        let n = NodeName::new("n1").expect("valid");
        let a = AgentId::new("a1").expect("valid");
        let link = || Link::new(tokio::sync::mpsc::channel(1).0);
        let old_link = link();
        let first = fleet.connect(&c, &n, &a, Arc::clone(&old_link));
        let second = fleet.connect(&c, &n, &a, link());
        assert_ne!(first, second);
        assert!(
            futures::FutureExt::now_or_never(old_link.closing()).is_some(),
            "the superseded session is told to close"
        );
        fleet.disconnect(&c, &n, first);
        assert_eq!(fleet.online(&c, &n).map(|o| o.session), Some(second));
        fleet.disconnect(&c, &n, second);
        assert!(fleet.online(&c, &n).is_none());
        assert!(fleet.link(&c, &n).is_err());
        assert_eq!(fleet.online_count(), 0);
    }
}

//! The agent's end of the link: requests from the controller, each run as a
//! tracked task with its own cancellation token (a child of the session's),
//! while the session loop goes on answering heartbeats.
//!
//! Every request gets exactly one reply: its result, or an error with a
//! Ferry error code (`cancelled` when the controller cancelled it or the
//! session ended, `deadline_exceeded` past its timeout, `unavailable` when
//! the agent already runs too many). The inventory, whole or in parts, is
//! sent by one task at a time, so parts of two inventories never interleave.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferry_core::{Chain, CodedError, ErrorCode};
use ferry_proto::convert::{INVENTORY_PART_BYTES, inventory_parts};
use ferry_proto::v1 as pb;
use ferry_proto::v1::agent_message::Kind as AgentKind;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::platform::{PlatformError, Platforms};

mod convert;

/// Requests one agent works on at once; more are refused as unavailable.
const MAX_RUNNING: usize = 64;
/// Progress of a held ping is sent this often.
const PING_PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// The longest a ping may hold its reply.
const MAX_PING_HOLD: Duration = Duration::from_secs(60);

/// Why the inventory could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot take the inventory: {0}")]
    Platform(#[from] PlatformError),
    #[error("the session closed while the inventory was sent")]
    Closed,
}

impl CodedError for InventoryError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Platform(e) => e.code(),
            Self::Closed => ErrorCode::Unavailable,
        }
    }
}

/// What request handlers share.
#[derive(Clone)]
struct Ctx {
    tx: mpsc::Sender<pb::AgentMessage>,
    platform: Arc<Platforms>,
    steps: crate::steps::StepCtx,
    /// Held while an inventory's parts are sent.
    inventory: Arc<Mutex<()>>,
    running: Arc<AtomicUsize>,
}

impl Ctx {
    async fn send(&self, kind: AgentKind) -> bool {
        self.tx
            .send(pb::AgentMessage { kind: Some(kind) })
            .await
            .is_ok()
    }

    /// Takes the inventory and sends it, in parts when it is large; returns
    /// how many apps it holds.
    async fn send_inventory(&self) -> Result<usize, InventoryError> {
        let _one_at_a_time = self.inventory.lock().await;
        let apps = self.platform.inventory().await?;
        let inventory = ferry_core::Inventory {
            apps,
            taken_at: ferry_core::Timestamp::now(),
        };
        let (parts, oversize) = inventory_parts(inventory, INVENTORY_PART_BYTES);
        for (app, bytes) in &oversize {
            tracing::error!(app = %app.name, team = %app.team, bytes,
                limit = INVENTORY_PART_BYTES,
                "app left out of the inventory: its description is larger than one message may be");
        }
        let n: usize = parts.iter().map(|p| p.apps.len()).sum();
        let count = parts.len();
        for part in parts {
            if !self.send(AgentKind::Inventory(part)).await {
                return Err(InventoryError::Closed);
            }
        }
        tracing::info!(apps = n, parts = count, "inventory sent");
        Ok(n)
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> pb::reply::Result {
    pb::reply::Result::Error(pb::RequestError {
        code: code.as_str().to_owned(),
        message: message.into(),
    })
}

/// Runs the controller's requests of one session.
pub struct Dispatcher {
    ctx: Ctx,
    session: CancellationToken,
    tasks: JoinSet<Option<u64>>,
    cancels: HashMap<u64, CancellationToken>,
}

impl Dispatcher {
    pub fn new(tx: mpsc::Sender<pb::AgentMessage>, steps: crate::steps::StepCtx) -> Self {
        Self {
            ctx: Ctx {
                tx,
                platform: steps.platform.clone(),
                steps,
                inventory: Arc::new(Mutex::new(())),
                running: Arc::new(AtomicUsize::new(0)),
            },
            session: CancellationToken::new(),
            tasks: JoinSet::new(),
            cancels: HashMap::new(),
        }
    }

    /// Requests running now.
    pub fn running(&self) -> usize {
        self.cancels.len()
    }

    /// Sends the inventory in the background, unless one is being sent.
    pub fn send_inventory(&mut self) {
        if self.ctx.inventory.try_lock().is_err() {
            tracing::debug!("an inventory is being sent; this one is skipped");
            return;
        }
        let ctx = self.ctx.clone();
        self.tasks.spawn(async move {
            if let Err(e) = ctx.send_inventory().await {
                tracing::warn!(error = %Chain(&e), "inventory not sent");
            }
            None
        });
    }

    /// Starts a request; its reply is sent when it ends.
    pub fn request(&mut self, r: pb::Request) {
        let id = r.id;
        let refuse = |code, message: String| {
            let ctx = self.ctx.clone();
            async move {
                let reply = pb::Reply {
                    id,
                    result: Some(error(code, message)),
                };
                ctx.send(AgentKind::Reply(reply)).await;
                None
            }
        };
        if self.cancels.contains_key(&id) {
            // A reply would fail the running request of that id: a
            // controller bug, reported here and otherwise ignored.
            tracing::error!(
                request = id,
                "request id already running; the new request is ignored"
            );
            return;
        }
        if self.cancels.len() >= MAX_RUNNING {
            let f = refuse(
                ErrorCode::Unavailable,
                format!("the agent runs {MAX_RUNNING} requests already"),
            );
            self.tasks.spawn(f);
            return;
        }
        let Some(kind) = r.kind else {
            let f = refuse(
                ErrorCode::FailedPrecondition,
                format!(
                    "this agent ({}) does not know the request; upgrade it",
                    env!("CARGO_PKG_VERSION")
                ),
            );
            self.tasks.spawn(f);
            return;
        };
        // A step outlives its session (the next attempt finds it); the
        // agent's shutdown or the controller's cancel stops it.
        let cancel = if is_step(&kind) {
            self.ctx.steps.shutdown.child_token()
        } else {
            self.session.child_token()
        };
        self.cancels.insert(id, cancel.clone());
        let ctx = self.ctx.clone();
        let timeout = (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms));
        ctx.running.fetch_add(1, Ordering::Relaxed);
        let a_step = is_step(&kind);
        self.tasks.spawn(async move {
            let result = if a_step {
                // A job step handles its own cancel (it may have to start
                // what it stopped first) and runs in a task of its own, so
                // that the end of the session cannot cut it short.
                let span = step_span(id, &kind);
                let step = tokio::spawn(tracing::Instrument::instrument(
                    step(ctx.clone(), id, kind, cancel),
                    span,
                ));
                match step.await {
                    Ok(r) => r,
                    Err(e) => error(ErrorCode::Internal, format!("step task failed: {e}")),
                }
            } else {
                let work = handle(&ctx, id, kind);
                tokio::select! {
                r = work => r,
                () = cancel.cancelled() => error(ErrorCode::Cancelled, "cancelled"),
                () = sleep_or_forever(timeout) => error(
                    ErrorCode::DeadlineExceeded,
                    format!("not done within {} ms", r.timeout_ms),
                ),
                }
            };
            ctx.running.fetch_sub(1, Ordering::Relaxed);
            // A step stopped by the agent's own shutdown does not answer:
            // its session ends, and the controller runs it again once the
            // agent is back (a "cancelled" answer would end the job).
            if !(a_step && ctx.steps.shutdown.is_cancelled()) {
                let reply = pb::Reply {
                    id,
                    result: Some(result),
                };
                ctx.send(AgentKind::Reply(reply)).await;
            }
            Some(id)
        });
    }

    /// Asks a running request to stop; it replies `cancelled`.
    pub fn cancel(&mut self, id: u64) {
        match self.cancels.get(&id) {
            Some(token) => token.cancel(),
            None => tracing::debug!(request = id, "cancel of no running request ignored"),
        }
    }

    /// Waits for a task to end and forgets it; pending forever when none
    /// runs (for `select!`).
    pub async fn reap(&mut self) {
        match self.tasks.join_next().await {
            Some(Ok(Some(id))) => {
                self.cancels.remove(&id);
            }
            Some(Ok(None)) => {}
            Some(Err(e)) => tracing::error!(error = %e, "request task failed"),
            None => std::future::pending().await,
        }
    }

    /// Ends the session's requests: cancels them all and waits briefly for
    /// their replies (which go nowhere once the stream is closed).
    pub async fn shutdown(mut self) {
        self.session.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.shutdown().await;
    }
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn is_step(kind: &pb::request::Kind) -> bool {
    use pb::request::Kind as K;
    matches!(
        kind,
        K::BackupApp(_)
            | K::RestoreApp(_)
            | K::RemoveApp(_)
            | K::CheckApp(_)
            | K::ForgetBackup(_)
            | K::VerifyBackup(_)
            | K::Prune(_)
    )
}

/// Runs a job step to its answer, progress sent as it goes.
async fn step(
    ctx: Ctx,
    id: u64,
    kind: pb::request::Kind,
    cancel: CancellationToken,
) -> pb::reply::Result {
    use crate::steps;
    use pb::reply::Result as R;
    use pb::request::Kind as K;
    let tx = ctx.tx.clone();
    let last = Arc::new(std::sync::Mutex::new(
        std::time::Instant::now() - PROGRESS_EVERY,
    ));
    let report: steps::Report = Arc::new(move |done, total, message| {
        // At most one progress message per interval; the rest are dropped.
        let mut at = last.lock().unwrap_or_else(|p| p.into_inner());
        if at.elapsed() < PROGRESS_EVERY {
            return;
        }
        *at = std::time::Instant::now();
        let _ = tx.try_send(pb::AgentMessage {
            kind: Some(AgentKind::Progress(pb::Progress {
                id,
                done,
                total,
                message,
            })),
        });
    });
    let s = &ctx.steps;
    let app = match &kind {
        K::BackupApp(r) => Some((r.team.as_str(), r.app.as_str())),
        K::RestoreApp(r) => Some((r.team.as_str(), r.app.as_str())),
        K::RemoveApp(r) => Some((r.team.as_str(), r.app.as_str())),
        _ => None,
    };
    // An earlier attempt of a step on the same app may still run (its
    // session ended, this agent did not): wait for it, then this attempt
    // finds what it did. A cancel of this attempt also stops an earlier
    // attempt of the same step.
    let holder = steps::Holder {
        step: step_of(&kind),
        cancel: cancel.clone(),
    };
    let _claim = match app {
        Some((team, app)) => {
            let mut relayed = false;
            loop {
                // Enabled before the claim is tried: a release in between
                // is not missed.
                let released = s.released();
                tokio::pin!(released);
                released.as_mut().enable();
                match s.claim(team, app, &holder) {
                    // Also once an earlier attempt was stopped for this
                    // cancel: this one, cancelled, does nothing new and
                    // answers with what was done (it may have finished).
                    Ok(c) => break Some(c),
                    Err(other) => {
                        if cancel.is_cancelled() && !relayed {
                            if other.step.is_none() || other.step != holder.step {
                                return error(
                                    ErrorCode::Cancelled,
                                    "cancelled while another step on the app ran",
                                );
                            }
                            other.cancel.cancel();
                            relayed = true;
                        }
                        tokio::select! {
                            () = released => {}
                            () = cancel.cancelled(), if !relayed => {}
                        }
                    }
                }
            }
        }
        None => None,
    };
    let retry = s.storage_retry;
    let result = match kind {
        K::BackupApp(r) => async {
            let input = convert::backup(r, retry)?;
            let manifest = steps::backup_app(s, input, cancel, report).await?;
            Ok(R::BackupApp(pb::BackupAppReply { manifest }))
        }
        .await,
        K::RestoreApp(r) => async {
            let input = convert::restore(r, retry)?;
            let copy = steps::restore_app(s, input, cancel, report).await?;
            Ok(R::RestoreApp(convert::restored(copy)))
        }
        .await,
        K::RemoveApp(r) => async {
            let removed = steps::remove_app(s, convert::remove(r)?, cancel).await?;
            Ok(R::RemoveApp(pb::RemoveAppReply { removed }))
        }
        .await,
        K::CheckApp(r) => async {
            let input = convert::check(r)?;
            tokio::select! {
                r = steps::check_app(s, input) => r.map(|running| R::CheckApp(pb::CheckAppReply { running })),
                () = cancel.cancelled() => Err(steps::StepFailure { code: ErrorCode::Cancelled, message: "cancelled".into() }),
            }
        }
        .await,
        K::ForgetBackup(r) => async {
            let n = steps::forget_backup(convert::forget(r, retry)?, cancel).await?;
            Ok(R::ForgetBackup(pb::ForgetBackupReply {
                snapshots_forgotten: n,
            }))
        }
        .await,
        K::VerifyBackup(r) => async {
            let summary = steps::verify_backup(convert::verify(r, retry)?, cancel).await?;
            Ok(R::VerifyBackup(pb::VerifyBackupReply { summary }))
        }
        .await,
        K::Prune(r) => async {
            let summary = steps::prune(convert::prune(r, retry)?, cancel).await?;
            Ok(R::Prune(pb::PruneReply { summary }))
        }
        .await,
        _ => Err(steps::StepFailure {
            code: ErrorCode::Internal,
            message: "not a job step".into(),
        }),
    };
    if matches!(result, Ok(R::RestoreApp(_) | R::RemoveApp(_))) {
        // The apps changed: the controller learns it now, not at the next
        // periodic inventory.
        if let Err(e) = ctx.send_inventory().await {
            tracing::warn!(error = %Chain(&e), "inventory not sent after the apps changed");
        }
    }
    result.unwrap_or_else(|f| error(f.code, f.message))
}

/// One span per job step: what it is, its job and place, its app.
fn step_span(request: u64, kind: &pb::request::Kind) -> tracing::Span {
    use pb::request::Kind as K;
    let (what, app) = match kind {
        K::BackupApp(r) => ("backup", format!("{}/{}", r.team, r.app)),
        K::RestoreApp(r) => ("restore", format!("{}/{}", r.team, r.app)),
        K::RemoveApp(r) => ("remove", format!("{}/{}", r.team, r.app)),
        K::CheckApp(r) => ("check", format!("{}/{}", r.team, r.app)),
        K::ForgetBackup(_) => ("forget", String::new()),
        K::VerifyBackup(_) => ("verify", String::new()),
        K::Prune(_) => ("prune", String::new()),
        _ => ("other", String::new()),
    };
    let (job, index, undo) = step_of(kind).unwrap_or_default();
    tracing::info_span!("step", what, request, job, index, undo, app)
}

/// The job, plan index and undo flag of a step request.
fn step_of(kind: &pb::request::Kind) -> Option<(u64, u32, bool)> {
    use pb::request::Kind as K;
    let key = match kind {
        K::BackupApp(r) => r.step.as_ref(),
        K::RestoreApp(r) => r.step.as_ref(),
        _ => None,
    }?;
    Some((key.job_id, key.index, key.undo))
}

/// Progress of a job step is sent at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

async fn handle(ctx: &Ctx, id: u64, kind: pb::request::Kind) -> pb::reply::Result {
    match kind {
        pb::request::Kind::Ping(p) => {
            let hold = Duration::from_millis(p.hold_ms).min(MAX_PING_HOLD);
            let total = hold.as_secs();
            let start = tokio::time::Instant::now();
            let mut done = 0;
            while start.elapsed() < hold {
                let left = hold.saturating_sub(start.elapsed());
                tokio::time::sleep(left.min(PING_PROGRESS_EVERY)).await;
                done += 1;
                let progress = pb::Progress {
                    id,
                    done: done.min(total.max(1)),
                    total,
                    message: format!("held {done} s of {total} s"),
                };
                ctx.send(AgentKind::Progress(progress)).await;
            }
            pb::reply::Result::Ping(pb::PingReply {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                platform: ctx.platform.name().to_owned(),
                agent_unix_ms: ferry_core::now_ms(),
                requests_running: u32::try_from(ctx.running.load(Ordering::Relaxed))
                    .unwrap_or(u32::MAX),
            })
        }
        pb::request::Kind::RefreshInventory(_) => {
            // Sent by a task of its own: cancelling the request stops the
            // wait, never an inventory halfway through its parts.
            let send = {
                let ctx = ctx.clone();
                tokio::spawn(async move { ctx.send_inventory().await })
            };
            match send.await {
                Ok(Ok(n)) => pb::reply::Result::RefreshInventory(pb::RefreshInventoryReply {
                    apps: u32::try_from(n).unwrap_or(u32::MAX),
                }),
                Ok(Err(e)) => error(e.code(), Chain(&e).to_string()),
                Err(e) => error(ErrorCode::Internal, format!("inventory task failed: {e}")),
            }
        }
        pb::request::Kind::InitRepository(r) => {
            match crate::storage::init_repository(r, ctx.steps.storage_retry).await {
                Ok(reply) => pb::reply::Result::InitRepository(reply),
                Err(f) => error(f.code, f.message),
            }
        }
        pb::request::Kind::ProbeStorage(r) => {
            match crate::storage::probe_storage(r, ctx.steps.storage_retry).await {
                Ok(reply) => pb::reply::Result::ProbeStorage(reply),
                Err(f) => error(f.code, f.message),
            }
        }
        other => step(ctx.clone(), id, other, CancellationToken::new()).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::host::HostPlatform;

    fn dispatcher() -> (Dispatcher, mpsc::Receiver<pb::AgentMessage>) {
        let (tx, rx) = mpsc::channel(64);
        let platform = Arc::new(Platforms::new(vec![Arc::new(HostPlatform::new(
            Vec::new(),
            Duration::from_secs(5),
        ))]));
        let steps = crate::steps::StepCtx::new(platform, None, Duration::from_secs(300));
        (Dispatcher::new(tx, steps), rx)
    }

    fn ping(id: u64, hold_ms: u64, timeout_ms: u64) -> pb::Request {
        pb::Request {
            id,
            timeout_ms,
            kind: Some(pb::request::Kind::Ping(pb::PingRequest { hold_ms })),
        }
    }

    /// The next reply, skipping progress.
    async fn reply(rx: &mut mpsc::Receiver<pb::AgentMessage>) -> pb::Reply {
        loop {
            match rx.recv().await.and_then(|m| m.kind) {
                Some(AgentKind::Reply(r)) => return r,
                Some(AgentKind::Progress(_)) => continue,
                other => panic!("expected a reply, got {other:?}"),
            }
        }
    }

    fn code(r: &pb::Reply) -> &str {
        match &r.result {
            Some(pb::reply::Result::Error(e)) => &e.code,
            _ => "ok",
        }
    }

    #[tokio::test]
    async fn a_long_request_reports_progress_and_can_be_cancelled() {
        let (mut d, mut rx) = dispatcher();
        d.request(ping(1, 10_000, 0));
        d.request(ping(2, 0, 0));
        // The quick one answers while the long one runs.
        let r = reply(&mut rx).await;
        assert_eq!((r.id, code(&r)), (2, "ok"));
        match rx.recv().await.and_then(|m| m.kind) {
            Some(AgentKind::Progress(p)) => assert_eq!((p.id, p.done, p.total), (1, 1, 10)),
            other => panic!("expected progress, got {other:?}"),
        }
        d.reap().await;
        assert_eq!(d.running(), 1);
        d.cancel(1);
        let r = reply(&mut rx).await;
        assert_eq!((r.id, code(&r)), (1, "cancelled"));
        d.reap().await;
        assert_eq!(d.running(), 0);
    }

    #[tokio::test]
    async fn deadlines_duplicates_and_unknown_requests_get_an_error_reply() {
        let (mut d, mut rx) = dispatcher();
        d.request(ping(1, 30_000, 300));
        // A second request of a running id is ignored: one reply only.
        d.request(ping(1, 0, 0));
        let r = reply(&mut rx).await;
        assert_eq!((r.id, code(&r)), (1, "deadline_exceeded"));
        d.request(pb::Request {
            id: 7,
            timeout_ms: 0,
            kind: None,
        });
        let r = reply(&mut rx).await;
        assert_eq!((r.id, code(&r)), (7, "failed_precondition"));
    }

    #[tokio::test]
    async fn the_end_of_the_session_cancels_every_request() {
        let (mut d, mut rx) = dispatcher();
        for id in 1..=3 {
            d.request(ping(id, 60_000, 0));
        }
        d.shutdown().await;
        let mut ids = Vec::new();
        while let Some(m) = rx.recv().await {
            if let Some(AgentKind::Reply(r)) = m.kind {
                assert_eq!(code(&r), "cancelled");
                ids.push(r.id);
            }
        }
        ids.sort_unstable();
        assert_eq!(ids, [1, 2, 3]);
    }
}

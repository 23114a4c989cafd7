//! The job engine: one task owns every job that has not ended, feeds its
//! state machine the events it observes, persists the new state, then
//! carries out the actions: a step is handed to its agent by a task of its
//! own, which streams the step's progress back and answers with its
//! result.
//!
//! - Agents coming and going are observed every tick (one second) from
//!   the fleet; a step whose agent is offline waits up to the limit.
//! - At start-up every job that had not ended is loaded and told that the
//!   controller restarted: resumable steps are dispatched again, others
//!   fail with the reason and their job's undo steps run.
//! - At most `per_agent` steps run on one agent at once; the others wait
//!   for a slot, dispatched.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::{AgentId, AppManifest, Chain, CodedError, JobId, RetryClass, Timestamp};
use ferry_proto::v1 as pb;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::machine::{Action, Event, Executor, Limits, StepRef};
use super::work::{AppAt, JobState, StepProgress, Work};
use crate::catalog::{BackupRecord, Catalog, CatalogError, JobRecord, StorageRecord};
use crate::fleet::Fleet;
use crate::link::LinkError;
use crate::locations::{Secrets, reachable_from, target};
use crate::seal::SealKey;

/// The longest a step may run.
const STEP_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a health check waits for the app to run.
const CHECK_WAIT: Duration = Duration::from_secs(120);
const TICK: Duration = Duration::from_secs(1);

/// A job as the API shows it.
#[derive(Clone, Debug)]
pub struct JobView {
    pub id: JobId,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub state: JobState,
    pub progress: Option<StepProgress>,
}

impl JobView {
    pub fn from_record(r: &JobRecord) -> Result<Self, CatalogError> {
        let state =
            serde_json::from_value(r.state.clone()).map_err(|e| CatalogError::InvalidRecord {
                what: format!("job {}", r.id),
                reason: e.to_string(),
            })?;
        Ok(Self {
            id: r.id,
            created_at: r.created_at,
            updated_at: r.updated_at,
            state,
            progress: None,
        })
    }

    pub fn is_done(&self) -> bool {
        self.state.machine.is_done()
    }
}

/// What a finished step changed, applied to the job's state with its
/// answer.
enum Effect {
    None,
    Downtime(u64),
    Copy { copy: AppAt, ports: Vec<String> },
}

enum Msg {
    Submit {
        state: Box<JobState>,
        reply: oneshot::Sender<Result<JobView, CatalogError>>,
    },
    Cancel {
        id: JobId,
        reply: oneshot::Sender<Option<JobView>>,
    },
    Watch {
        id: JobId,
        reply: oneshot::Sender<Option<watch::Receiver<JobView>>>,
    },
    Answer {
        id: JobId,
        event: Event,
        effect: Effect,
    },
    Progress {
        id: JobId,
        step: String,
        progress: pb::Progress,
    },
}

/// What step tasks need.
struct Deps {
    catalog: Arc<dyn Catalog>,
    fleet: Arc<Fleet>,
    seal: Arc<SealKey>,
    per_agent: usize,
    slots: std::sync::Mutex<HashMap<AgentId, Arc<Semaphore>>>,
    /// One prune at a time per location, whichever agent runs it: the
    /// controller is each location's one prune owner.
    prunes: std::sync::Mutex<HashMap<ferry_core::LocationName, Arc<Semaphore>>>,
}

impl Deps {
    fn slot(&self, agent: &AgentId) -> Arc<Semaphore> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(agent.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_agent.max(1))))
            .clone()
    }

    fn prune_slot(&self, storage: &ferry_core::LocationName) -> Arc<Semaphore> {
        let mut prunes = self.prunes.lock().unwrap_or_else(|p| p.into_inner());
        prunes
            .entry(storage.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(1)))
            .clone()
    }
}

/// The handle the API uses.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Msg>,
    catalog: Arc<dyn Catalog>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("the job engine has stopped")]
    Stopped,
}

impl CodedError for EngineError {
    fn code(&self) -> ferry_core::ErrorCode {
        match self {
            Self::Catalog(e) => e.code(),
            Self::Stopped => ferry_core::ErrorCode::Unavailable,
        }
    }
}

impl Engine {
    /// Starts the engine: loads the jobs that had not ended, reconciles
    /// them, and runs until `cancel`.
    pub async fn start(
        catalog: Arc<dyn Catalog>,
        fleet: Arc<Fleet>,
        seal: Arc<SealKey>,
        limits: Limits,
        per_agent: usize,
        cancel: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), CatalogError> {
        let (tx, rx) = mpsc::channel(1024);
        let deps = Arc::new(Deps {
            catalog: catalog.clone(),
            fleet,
            seal,
            per_agent,
            slots: std::sync::Mutex::default(),
            prunes: std::sync::Mutex::default(),
        });
        let mut actor = Actor {
            deps,
            tx: tx.clone(),
            limits,
            jobs: HashMap::new(),
        };
        let mut page = crate::catalog::PageRequest::first(500);
        let mut restarted = Vec::new();
        loop {
            let p = catalog.list_jobs(true, &page).await?;
            for r in &p.items {
                match JobView::from_record(r) {
                    Ok(v) => restarted.push(v),
                    Err(e) => {
                        tracing::error!(job = %r.id, error = %Chain(&e), "job record unreadable; left as it is")
                    }
                }
            }
            match p.next {
                Some(n) => page.after = Some(n),
                None => break,
            }
        }
        for mut view in restarted {
            // Whoever was online before the restart is not yet: the steps
            // wait for their agents to reconnect (up to the deadline)
            // instead of spending their attempts on missing links.
            view.state.machine.online.clear();
            tracing::info!(job = %view.id, kind = view.state.kind.as_str(), "reconciling a job the controller was running");
            let id = view.id;
            actor.adopt(view);
            actor
                .apply(
                    id,
                    Event::Restarted {
                        now: Timestamp::now(),
                    },
                    Effect::None,
                )
                .await;
        }
        let task = tokio::spawn(actor.run(rx, cancel));
        Ok((Self { tx, catalog }, task))
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Records a new job and starts it.
    pub async fn submit(&self, state: JobState) -> Result<JobView, EngineError> {
        Ok(self
            .ask(|reply| Msg::Submit {
                state: Box::new(state),
                reply,
            })
            .await??)
    }

    /// Asks a job to stop; `None` if there is no such job.
    pub async fn cancel(&self, id: JobId) -> Result<Option<JobView>, EngineError> {
        if let Some(v) = self.ask(|reply| Msg::Cancel { id, reply }).await? {
            return Ok(Some(v));
        }
        self.get(id).await
    }

    /// The job as it is now.
    pub async fn get(&self, id: JobId) -> Result<Option<JobView>, EngineError> {
        if let Some(rx) = self.ask(|reply| Msg::Watch { id, reply }).await? {
            return Ok(Some(rx.borrow().clone()));
        }
        Ok(self
            .catalog
            .get_job(id)
            .await?
            .map(|r| JobView::from_record(&r))
            .transpose()?)
    }

    /// Follows a running job; `None` when it is not running (see
    /// [`Engine::get`]).
    pub async fn watch(&self, id: JobId) -> Result<Option<watch::Receiver<JobView>>, EngineError> {
        self.ask(|reply| Msg::Watch { id, reply }).await
    }
}

struct Active {
    view: watch::Sender<JobView>,
    /// Cancels the step tasks running for the job.
    steps: HashMap<StepRef, CancellationToken>,
    /// When the running step's progress started, and at how many bytes.
    progress_since: Option<(tokio::time::Instant, u64)>,
}

struct Actor {
    deps: Arc<Deps>,
    tx: mpsc::Sender<Msg>,
    limits: Limits,
    jobs: HashMap<JobId, Active>,
}

impl Actor {
    fn adopt(&mut self, view: JobView) {
        let id = view.id;
        let (tx, _) = watch::channel(view);
        self.jobs.insert(
            id,
            Active {
                view: tx,
                steps: HashMap::new(),
                progress_since: None,
            },
        );
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(m) => self.handle(m).await,
                    None => break,
                },
                _ = tick.tick() => self.tick().await,
                () = cancel.cancelled() => break,
            }
        }
        // Step tasks end with the controller; their jobs are reconciled at
        // the next start.
        for a in self.jobs.values() {
            for t in a.steps.values() {
                t.cancel();
            }
        }
    }

    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Submit { state, reply } => {
                let _ = reply.send(self.submit(*state).await);
            }
            Msg::Cancel { id, reply } => {
                if !self.jobs.contains_key(&id) {
                    let _ = reply.send(None);
                    return;
                }
                if let Some(a) = self.jobs.get(&id) {
                    a.view.send_modify(|v| v.state.cancel_requested = true);
                }
                tracing::info!(job = %id, "cancel requested");
                self.apply(
                    id,
                    Event::Cancel {
                        now: Timestamp::now(),
                    },
                    Effect::None,
                )
                .await;
                let view = self.jobs.get(&id).map(|a| a.view.borrow().clone());
                let view = match view {
                    Some(v) => Some(v),
                    None => self.load(id).await,
                };
                let _ = reply.send(view);
            }
            Msg::Watch { id, reply } => {
                let _ = reply.send(self.jobs.get(&id).map(|a| a.view.subscribe()));
            }
            Msg::Answer { id, event, effect } => self.apply(id, event, effect).await,
            Msg::Progress { id, step, progress } => {
                let Some(a) = self.jobs.get_mut(&id) else {
                    return;
                };
                let now = tokio::time::Instant::now();
                let (since, at) = *a.progress_since.get_or_insert((now, progress.done));
                let secs = now.duration_since(since).as_secs_f64();
                let rate = if secs > 0.5 {
                    (progress.done.saturating_sub(at) as f64 / secs) as u64
                } else {
                    0
                };
                let eta = if rate > 0 && progress.total > progress.done {
                    (progress.total - progress.done) / rate
                } else {
                    0
                };
                a.view.send_modify(|v| {
                    v.progress = Some(StepProgress {
                        step,
                        done: progress.done,
                        total: progress.total,
                        message: progress.message,
                        bytes_per_second: rate,
                        eta_seconds: eta,
                    });
                });
            }
        }
    }

    async fn load(&self, id: JobId) -> Option<JobView> {
        let r = self.deps.catalog.get_job(id).await.ok()??;
        JobView::from_record(&r).ok()
    }

    async fn submit(&mut self, mut state: JobState) -> Result<JobView, CatalogError> {
        let id = JobId::new(
            self.deps
                .catalog
                .next_id(crate::catalog::Counter::Job)
                .await?,
        )?;
        let now = Timestamp::now();
        state.machine.limits = self.limits;
        state.machine.online = state
            .agents()
            .into_iter()
            .filter(|a| self.deps.fleet.link_of_agent(a).is_some())
            .collect();
        let view = JobView {
            id,
            created_at: now,
            updated_at: now,
            state,
            progress: None,
        };
        persist(self.deps.catalog.as_ref(), &view).await?;
        tracing::info!(job = %id, kind = view.state.kind.as_str(), summary = %view.state.summary, "job started");
        self.adopt(view);
        self.apply(id, Event::Tick { now }, Effect::None).await;
        let v = self.jobs.get(&id).map(|a| a.view.borrow().clone());
        match v {
            Some(v) => Ok(v),
            None => self.load(id).await.ok_or(CatalogError::InvalidRecord {
                what: format!("job {id}"),
                reason: "vanished".into(),
            }),
        }
    }

    /// Feeds every running job the clock and its agents' presence.
    async fn tick(&mut self) {
        let now = Timestamp::now();
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in ids {
            let changes: Vec<(AgentId, bool)> = {
                let Some(a) = self.jobs.get(&id) else {
                    continue;
                };
                let v = a.view.borrow();
                v.state
                    .agents()
                    .into_iter()
                    .filter_map(|agent| {
                        let online = self.deps.fleet.link_of_agent(&agent).is_some();
                        let known = v.state.machine.online.contains(&agent);
                        (online != known).then_some((agent, online))
                    })
                    .collect()
            };
            for (agent, online) in changes {
                self.apply(id, Event::Online { agent, online, now }, Effect::None)
                    .await;
            }
            self.apply(id, Event::Tick { now }, Effect::None).await;
        }
    }

    /// Applies one event to a job: new state, persisted, then its actions.
    async fn apply(&mut self, id: JobId, event: Event, effect: Effect) {
        let Some(a) = self.jobs.get_mut(&id) else {
            return;
        };
        let mut view = a.view.borrow().clone();
        let before = view.state.clone();
        match effect {
            Effect::None => {}
            Effect::Downtime(ms) => view.state.downtime_ms = ms,
            Effect::Copy { copy, ports } => {
                view.state.copy = Some(copy);
                view.state.remapped_ports = ports;
            }
        }
        let ran_step = matches!(
            event,
            Event::Succeeded { .. } | Event::Failed { .. } | Event::Lost { .. }
        );
        let actions = view.state.machine.on(event);
        if view.state == before {
            return; // a tick that changed nothing
        }
        view.updated_at = Timestamp::now();
        if ran_step {
            view.progress = None;
            a.progress_since = None;
        }
        if let Err(e) = persist(self.deps.catalog.as_ref(), &view).await {
            // The state in memory goes on; the next change writes it again.
            tracing::error!(job = %id, error = %Chain(&e), "cannot record the job's state");
        }
        a.view.send_replace(view.clone());
        for action in actions {
            match action {
                Action::Dispatch {
                    step,
                    work,
                    executor,
                    settle,
                } => {
                    let token = CancellationToken::new();
                    a.steps.insert(step, token.clone());
                    tracing::info!(job = %id, step = step.index + 1, undo = step.undo, attempt = step.attempt, settle, what = %work.describe(), "step dispatched");
                    tokio::spawn(run_step(
                        self.deps.clone(),
                        self.tx.clone(),
                        id,
                        Dispatched {
                            step,
                            work,
                            executor,
                            settle,
                        },
                        token,
                    ));
                }
                Action::Cancel { step, .. } => {
                    if let Some(t) = a.steps.get(&step) {
                        t.cancel();
                    }
                }
                Action::Finished(outcome) => {
                    tracing::info!(job = %id, outcome = ?outcome, "job ended");
                }
            }
        }
        if view.is_done() {
            self.jobs.remove(&id);
        }
    }
}

async fn persist(catalog: &dyn Catalog, view: &JobView) -> Result<(), CatalogError> {
    let state = serde_json::to_value(&view.state).map_err(|e| CatalogError::InvalidRecord {
        what: format!("job {}", view.id),
        reason: e.to_string(),
    })?;
    catalog
        .put_job(JobRecord {
            id: view.id,
            kind: view.state.kind.as_str().to_owned(),
            created_at: view.created_at,
            updated_at: view.updated_at,
            done: view.is_done(),
            state,
        })
        .await
}

/// Why a step failed, and whether another attempt may help.
struct StepFailure {
    reason: String,
    transient: bool,
    /// The agent went away: try again once it is back.
    lost: bool,
}

impl StepFailure {
    fn permanent(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            transient: false,
            lost: false,
        }
    }
}

impl From<LinkError> for StepFailure {
    fn from(e: LinkError) -> Self {
        Self {
            transient: e.retry_class() == RetryClass::Transient,
            lost: matches!(
                e,
                LinkError::NotConnected { .. } | LinkError::SessionEnded { .. }
            ),
            reason: e.to_string(),
        }
    }
}

impl From<CatalogError> for StepFailure {
    fn from(e: CatalogError) -> Self {
        Self {
            transient: e.retry_class() == RetryClass::Transient,
            lost: false,
            reason: Chain(&e).to_string(),
        }
    }
}

/// A step handed to its executor (a settle is cancelled as soon as it is
/// handed over).
struct Dispatched {
    step: StepRef,
    work: Work,
    executor: Executor,
    settle: bool,
}

async fn run_step(
    deps: Arc<Deps>,
    tx: mpsc::Sender<Msg>,
    id: JobId,
    d: Dispatched,
    cancel: CancellationToken,
) {
    let step = d.step;
    let (result, effect) = match step_result(&deps, &tx, id, &d, &cancel).await {
        Ok(effect) => (Ok(()), effect),
        Err(f) => (Err(f), Effect::None),
    };
    let now = Timestamp::now();
    let event = match result {
        Ok(()) => Event::Succeeded { step, now },
        Err(f) if f.lost => {
            tracing::warn!(job = %id, step = step.index + 1, undo = step.undo, reason = %f.reason, "step lost with its agent; runs again once the agent is back");
            Event::Lost {
                step,
                reason: f.reason,
                now,
            }
        }
        Err(f) => {
            tracing::warn!(job = %id, step = step.index + 1, undo = step.undo, reason = %f.reason, transient = f.transient, "step failed");
            Event::Failed {
                step,
                reason: f.reason,
                transient: f.transient,
                now,
            }
        }
    };
    let _ = tx.send(Msg::Answer { id, event, effect }).await;
}

async fn step_result(
    deps: &Deps,
    tx: &mpsc::Sender<Msg>,
    id: JobId,
    d: &Dispatched,
    cancel: &CancellationToken,
) -> Result<Effect, StepFailure> {
    let (step, work, executor) = (d.step, &d.work, &d.executor);
    let Executor::Agent(agent) = executor else {
        return Err(StepFailure::permanent("no controller steps are defined"));
    };
    let _pruning = match work {
        Work::Prune { storage } => {
            let slot = deps.prune_slot(storage);
            Some(tokio::select! {
                p = slot.acquire_owned() => p.map_err(|_| StepFailure::permanent("the engine stopped"))?,
                () = cancel.cancelled() => return Err(StepFailure::permanent("cancelled before it started")),
            })
        }
        _ => None,
    };
    let slot = deps.slot(agent);
    let _permit = tokio::select! {
        p = slot.acquire_owned() => p.map_err(|_| StepFailure::permanent("the engine stopped"))?,
        () = cancel.cancelled() => return Err(StepFailure::permanent("cancelled before it started")),
    };
    let kind = request_for(deps, id, step, work).await?;
    let link = deps.fleet.link_of_agent(agent).ok_or_else(|| StepFailure {
        reason: format!("agent {agent} is not connected"),
        transient: true,
        lost: true,
    })?;
    let mut call = link.call(kind, STEP_TIMEOUT).await?;
    let call_id = call.id();
    let (_, closed) = mpsc::channel(1);
    let mut progress = std::mem::replace(&mut call.progress, closed);
    let finish = call.finish();
    tokio::pin!(finish);
    // A settle: the agent stops the attempt that may still run there
    // (starting again what it stopped) and answers with what it did.
    let mut cancel_sent = d.settle;
    if d.settle {
        link.send_cancel(call_id);
    }
    let described = work.describe();
    let reply = loop {
        tokio::select! {
            r = &mut finish => break r,
            Some(p) = progress.recv() => {
                let _ = tx.try_send(Msg::Progress { id, step: described.clone(), progress: p });
            }
            () = cancel.cancelled(), if !cancel_sent => {
                // The agent stops the step and answers once it has cleaned
                // up (restarted what it stopped).
                cancel_sent = true;
                link.send_cancel(call_id);
            }
        }
    }?;
    on_reply(deps, work, reply).await
}

/// How an agent reaches a location: its kind, the target with any
/// credentials, and the repository password.
struct Reach {
    kind: crate::catalog::StorageKind,
    target: pb::StorageTarget,
    password: Vec<u8>,
}

async fn location_of(
    deps: &Deps,
    storage: &ferry_core::LocationName,
) -> Result<Reach, StepFailure> {
    let record: StorageRecord = deps
        .catalog
        .get_storage(storage)
        .await?
        .ok_or_else(|| StepFailure::permanent(format!("storage location {storage} is gone")))?;
    let secrets = Secrets::open(&deps.seal, &record)
        .map_err(|e| StepFailure::permanent(Chain(&e).to_string()))?;
    Ok(Reach {
        target: target(&record.kind, &secrets),
        password: secrets.password_bytes(),
        kind: record.kind,
    })
}

fn snapshots_of(b: &BackupRecord) -> Vec<String> {
    b.manifest.snapshots()
}

async fn backup_of(deps: &Deps, backup: ferry_core::BackupId) -> Result<BackupRecord, StepFailure> {
    deps.catalog
        .get_backup(backup)
        .await?
        .ok_or_else(|| StepFailure::permanent(format!("backup {backup} is not in the catalog")))
}

fn step_key(id: JobId, step: StepRef) -> pb::StepKey {
    pb::StepKey {
        job_id: id.get(),
        index: step.index,
        undo: step.undo,
        attempt: step.attempt,
    }
}

/// The request that carries a step to its agent, secrets included.
async fn request_for(
    deps: &Deps,
    id: JobId,
    step: StepRef,
    work: &Work,
) -> Result<pb::request::Kind, StepFailure> {
    use pb::request::Kind;
    Ok(match work {
        Work::Backup {
            source,
            storage,
            backup,
            mode,
        } => {
            let at = location_of(deps, storage).await?;
            if !reachable_from(&at.kind, &source.cluster) {
                return Err(StepFailure::permanent(format!(
                    "storage {storage} is local to another cluster than {}",
                    source.cluster
                )));
            }
            Kind::BackupApp(pb::BackupAppRequest {
                step: Some(step_key(id, step)),
                target: Some(at.target),
                password: at.password,
                storage: storage.to_string(),
                backup_id: backup.get(),
                team: source.team.to_string(),
                app: source.app.to_string(),
                mode: mode.as_str().to_owned(),
                cluster: source.cluster.to_string(),
                node: source.node.to_string(),
            })
        }
        Work::Restore { backup, copy } => {
            let b = backup_of(deps, *backup).await?;
            let at = location_of(deps, &b.manifest.storage).await?;
            if !reachable_from(&at.kind, &copy.cluster) {
                return Err(StepFailure::permanent(format!(
                    "backup {backup} is in storage {}, local to another cluster than {}",
                    b.manifest.storage, copy.cluster
                )));
            }
            Kind::RestoreApp(pb::RestoreAppRequest {
                step: Some(step_key(id, step)),
                target: Some(at.target),
                password: at.password,
                manifest: b.manifest.to_json(),
                team: copy.team.to_string(),
                app: copy.app.to_string(),
            })
        }
        Work::Check { app } => Kind::CheckApp(pb::CheckAppRequest {
            team: app.team.to_string(),
            app: app.app.to_string(),
            wait_ms: u64::try_from(CHECK_WAIT.as_millis()).unwrap_or(u64::MAX),
        }),
        Work::Remove {
            app,
            copy_of_this_job,
        } => Kind::RemoveApp(pb::RemoveAppRequest {
            team: app.team.to_string(),
            app: app.app.to_string(),
            delete_data: *copy_of_this_job,
            restored_by_job: if *copy_of_this_job { id.get() } else { 0 },
        }),
        Work::Forget { backup } => {
            let b = backup_of(deps, *backup).await?;
            let at = location_of(deps, &b.manifest.storage).await?;
            Kind::ForgetBackup(pb::ForgetBackupRequest {
                target: Some(at.target),
                password: at.password,
                backup_id: backup.get(),
                snapshots: snapshots_of(&b),
            })
        }
        Work::Prune { storage } => {
            let at = location_of(deps, storage).await?;
            Kind::Prune(pb::PruneRequest {
                target: Some(at.target),
                password: at.password,
            })
        }
        Work::Verify {
            backup,
            read_data_percent,
        } => {
            let b = backup_of(deps, *backup).await?;
            let at = location_of(deps, &b.manifest.storage).await?;
            Kind::VerifyBackup(pb::VerifyBackupRequest {
                target: Some(at.target),
                password: at.password,
                backup_id: backup.get(),
                snapshots: snapshots_of(&b),
                read_data_percent: *read_data_percent,
            })
        }
    })
}

/// Records what a step did in the catalog.
async fn on_reply(
    deps: &Deps,
    work: &Work,
    reply: pb::reply::Result,
) -> Result<Effect, StepFailure> {
    use pb::reply::Result as R;
    match (work, reply) {
        (Work::Backup { backup, source, .. }, R::BackupApp(r)) => {
            let manifest = AppManifest::parse(&r.manifest).map_err(|e| {
                StepFailure::permanent(format!("the agent's manifest is not valid: {e}"))
            })?;
            if manifest.backup != *backup
                || manifest.app.name != source.app
                || manifest.app.team != source.team
            {
                return Err(StepFailure::permanent(
                    "the agent's manifest is of another backup or app",
                ));
            }
            let downtime = manifest.timings.downtime_ms;
            deps.catalog
                .put_backup(BackupRecord {
                    manifest,
                    recorded_at: Timestamp::now(),
                })
                .await?;
            Ok(Effect::Downtime(downtime))
        }
        (Work::Restore { copy, .. }, R::RestoreApp(r)) => Ok(Effect::Copy {
            copy: copy.clone(),
            ports: r.remapped_ports,
        }),
        (Work::Forget { backup }, R::ForgetBackup(_)) => {
            deps.catalog.remove_backup(*backup).await?;
            Ok(Effect::None)
        }
        (Work::Check { .. }, R::CheckApp(_))
        | (Work::Remove { .. }, R::RemoveApp(_))
        | (Work::Prune { .. }, R::Prune(_))
        | (Work::Verify { .. }, R::VerifyBackup(_)) => Ok(Effect::None),
        _ => Err(LinkError::UnexpectedReply.into()),
    }
}

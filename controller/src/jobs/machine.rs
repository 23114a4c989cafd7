//! A job's state machine: pure, no IO, no clock of its own.
//!
//! A job is a plan of steps run one after another, each by one executor (an
//! agent, or the controller itself). Steps that leave something behind name
//! an *undo* step. When a step fails for good, or the job is cancelled, the
//! undo steps of the steps that succeeded, and of the one that ran and
//! failed (it may have done part of its work), run in reverse order, and
//! the job ends failed or cancelled; a job succeeds only when every step did.
//!
//! The engine feeds [`Job::on`] the events it observes (a reply from an
//! agent, an agent coming or going, a cancel, the clock, its own restart)
//! and carries out the [`Action`]s it returns, after persisting the new
//! state: the state is what survives a crash, so it is written before the
//! actions run. A step may therefore be dispatched again after a crash;
//! executors make steps idempotent by their [`StepRef`].

use serde::{Deserialize, Serialize};

use ferry_core::{AgentId, Timestamp};

/// How long a job waits for an offline executor, and how often it tries a
/// step whose failures are transient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// A step whose agent is offline for longer fails (milliseconds).
    pub offline_ms: u64,
    /// Dispatches of one step, the first included, before a transient
    /// failure counts as final.
    pub attempts: u32,
    /// Wait before the next attempt after a transient failure, times the
    /// attempts so far (milliseconds).
    pub retry_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            offline_ms: 10 * 60 * 1000,
            attempts: 3,
            retry_ms: 5_000,
        }
    }
}

/// Who runs a step.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Executor {
    Agent(AgentId),
    /// The controller itself (catalog records, prune scheduling).
    Controller,
}

/// One step of a plan: what to do (`T`, opaque here), who does it, and
/// how to take it back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step<T> {
    pub work: T,
    pub executor: Executor,
    /// Whether the step may be dispatched again when its fate is unknown
    /// (the controller restarted while it ran). A step that is not
    /// resumable fails instead, with the reason.
    pub resumable: bool,
    /// Run when the job does not succeed, if this step did.
    pub undo: Option<Box<Step<T>>>,
}

/// A step of a job, as executors see it: its place in the plan (or among
/// the undo steps) and the attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StepRef {
    pub index: u32,
    pub undo: bool,
    pub attempt: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum StepStatus {
    Pending,
    /// Handed to its executor, as attempt [`StepState::attempts`].
    Dispatched {
        at: Timestamp,
    },
    Succeeded {
        at: Timestamp,
    },
    Failed {
        reason: String,
        at: Timestamp,
    },
    /// Never dispatched because the job ended first.
    Skipped,
}

/// A step with its status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepState<T> {
    pub step: Step<T>,
    pub status: StepStatus,
    /// Dispatches so far (kept across a transient failure); the one
    /// dispatched last is the attempt executors answer for.
    pub attempts: u32,
    /// Not dispatched again before this (after a transient failure).
    #[serde(default)]
    pub not_before: Option<Timestamp>,
    /// An earlier attempt may still run on its executor (it was lost with
    /// its agent, or dispatched when the controller restarted), and why.
    /// Before the job moves on without it (a cancel, or no attempts left),
    /// it is *settled*: dispatched once more with a cancel, so the executor
    /// stops the attempt still running (starting again what it stopped) and
    /// answers with what it did.
    #[serde(default)]
    pub unsettled: Option<String>,
    /// The attempt dispatched last is a settle.
    #[serde(default)]
    pub settling: bool,
}

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    Succeeded,
    Failed { reason: String },
    Cancelled,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    /// Running the plan.
    Running,
    /// Taking back what the plan did, then ending as `cause`.
    Undoing { cause: Outcome },
    Done {
        outcome: Outcome,
        at: Timestamp,
        /// Undo steps that failed: what may be left behind.
        #[serde(default)]
        leftovers: Vec<String>,
    },
}

/// What the engine observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The clock moved (deadlines, retry delays).
    Tick {
        now: Timestamp,
    },
    /// An agent's session opened or closed.
    Online {
        agent: AgentId,
        online: bool,
        now: Timestamp,
    },
    Succeeded {
        step: StepRef,
        now: Timestamp,
    },
    Failed {
        step: StepRef,
        reason: String,
        /// Trying again may help (the executor's error class).
        transient: bool,
        now: Timestamp,
    },
    /// The executor's agent went away while the step ran (its session
    /// ended, or it was not connected): the step's fate is unknown. It is
    /// dispatched again once the agent is back (the agent restarts what a
    /// step stopped and makes steps idempotent), as another attempt.
    Lost {
        step: StepRef,
        reason: String,
        now: Timestamp,
    },
    /// The user asked to cancel.
    Cancel {
        now: Timestamp,
    },
    /// The controller started again: whatever was dispatched may or may
    /// not still run.
    Restarted {
        now: Timestamp,
    },
}

/// What the engine must do, after persisting the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action<T> {
    /// Hand the step to its executor; a settle (see
    /// [`StepState::unsettled`]) is cancelled as soon as it is handed over.
    Dispatch {
        step: StepRef,
        work: T,
        executor: Executor,
        settle: bool,
    },
    /// Ask the executor to stop the step (it still answers).
    Cancel { step: StepRef, executor: Executor },
    /// The job ended.
    Finished(Outcome),
}

/// A job's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job<T> {
    pub plan: Vec<StepState<T>>,
    /// Undo steps in the order they run (the reverse of their steps').
    pub undo: Vec<StepState<T>>,
    pub phase: Phase,
    pub limits: Limits,
    /// Set by a cancel while a step runs: the job ends when it answers.
    pub cancelling: bool,
    /// Agents known to be online.
    pub online: Vec<AgentId>,
    /// Since when the current step waits for its offline agent.
    pub waiting_since: Option<Timestamp>,
}

/// The request to stop plan step `index`, dispatched as `attempt`.
fn cancel_of<T>(index: usize, attempt: u32, s: &StepState<T>) -> Action<T> {
    Action::Cancel {
        step: StepRef {
            index: index as u32,
            undo: false,
            attempt,
        },
        executor: s.step.executor.clone(),
    }
}

impl<T> StepState<T> {
    fn new(step: Step<T>) -> Self {
        Self {
            step,
            status: StepStatus::Pending,
            attempts: 0,
            not_before: None,
            unsettled: None,
            settling: false,
        }
    }
}

impl<T: Clone> Job<T> {
    /// A job about to run `plan`; nothing is dispatched before the first
    /// event.
    pub fn new(plan: Vec<Step<T>>, limits: Limits, online: Vec<AgentId>) -> Self {
        Self {
            plan: plan.into_iter().map(StepState::new).collect(),
            undo: Vec::new(),
            phase: Phase::Running,
            limits,
            cancelling: false,
            online,
            waiting_since: None,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done { .. })
    }

    /// The list the current phase works through.
    fn list(&self) -> (&[StepState<T>], bool) {
        match self.phase {
            Phase::Undoing { .. } => (&self.undo, true),
            _ => (&self.plan, false),
        }
    }

    /// The first step of the current list that has not ended.
    fn current(&self) -> Option<usize> {
        let (list, _) = self.list();
        list.iter().position(|s| {
            matches!(
                s.status,
                StepStatus::Pending | StepStatus::Dispatched { .. }
            )
        })
    }

    fn step_mut(&mut self, r: StepRef) -> Option<&mut StepState<T>> {
        let undoing = matches!(self.phase, Phase::Undoing { .. });
        if r.undo != undoing {
            return None;
        }
        let list = if r.undo {
            &mut self.undo
        } else {
            &mut self.plan
        };
        list.get_mut(r.index as usize)
    }

    fn is_online(&self, e: &Executor) -> bool {
        match e {
            Executor::Controller => true,
            Executor::Agent(a) => self.online.contains(a),
        }
    }

    /// Applies one event; returns what to do.
    pub fn on(&mut self, event: Event) -> Vec<Action<T>> {
        if self.is_done() {
            return Vec::new();
        }
        let mut actions = Vec::new();
        let now = match event {
            Event::Tick { now } => now,
            Event::Online { agent, online, now } => {
                self.online.retain(|a| *a != agent);
                if online {
                    self.online.push(agent);
                }
                now
            }
            Event::Succeeded { step, now } => {
                self.answered(step, Ok(()), now);
                now
            }
            Event::Failed {
                step,
                reason,
                transient,
                now,
            } => {
                self.answered(step, Err((reason, transient)), now);
                now
            }
            Event::Lost { step, reason, now } => {
                self.lost(step, reason, now);
                now
            }
            Event::Cancel { now } => {
                // Undo steps always run to their end: a cancel only stops
                // the plan.
                if let (Phase::Running, Some(i)) = (&self.phase, self.current()) {
                    let s = &self.plan[i];
                    if let StepStatus::Dispatched { .. } = s.status {
                        let attempt = s.attempts;
                        // The job ends when the step answers.
                        if !self.cancelling {
                            actions.push(cancel_of(i, attempt, s));
                        }
                        self.cancelling = true;
                    } else if s.unsettled.is_some() {
                        // An earlier attempt may still run: it is settled
                        // once its agent is back, and the job ends then.
                        self.cancelling = true;
                    } else {
                        // A step waiting to be tried again ran before: it
                        // may have done part of its work.
                        if s.attempts > 0
                            && let Some(u) = s.step.undo.as_deref().cloned()
                        {
                            self.undo.insert(0, StepState::new(u));
                        }
                        self.begin_undo(Outcome::Cancelled);
                    }
                }
                now
            }
            Event::Restarted { now } => {
                let undoing = matches!(self.phase, Phase::Undoing { .. });
                let cancelling = self.cancelling;
                if let Some(i) = self.current() {
                    let list = if undoing {
                        &mut self.undo
                    } else {
                        &mut self.plan
                    };
                    let s = &mut list[i];
                    if let StepStatus::Dispatched { .. } = s.status {
                        if cancelling && !undoing {
                            // The step task that carried the cancel ended
                            // with the controller: the step is settled once
                            // its agent is there, and the job ends then.
                            s.status = StepStatus::Pending;
                            s.unsettled = Some(
                                "the controller restarted while the step was being cancelled"
                                    .into(),
                            );
                        } else if s.step.resumable || undoing {
                            // Dispatched again below; the executor knows the
                            // step by its job and place, whatever the attempt.
                            s.status = StepStatus::Pending;
                        } else {
                            s.status = StepStatus::Failed {
                                reason: "the controller restarted while this step ran, and it cannot be resumed".into(),
                                at: now,
                            };
                            // It may have done part of its work: its undo runs.
                            if let Some(u) = s.step.undo.as_deref().cloned() {
                                self.undo.insert(0, StepState::new(u));
                            }
                            let reason = format!(
                                "step {} was interrupted by a controller restart and cannot be resumed",
                                i + 1
                            );
                            self.begin_undo(Outcome::Failed { reason });
                        }
                    }
                }
                now
            }
        };
        self.advance(now, &mut actions);
        actions
    }

    /// An executor answered for `r`. Answers for anything but the current
    /// dispatched attempt are stale and ignored.
    fn answered(&mut self, r: StepRef, result: Result<(), (String, bool)>, now: Timestamp) {
        let attempts = self.limits.attempts.max(1);
        let retry_ms = self.limits.retry_ms;
        let cancelling = self.cancelling;
        let Some(s) = self.step_mut(r) else { return };
        if !matches!(s.status, StepStatus::Dispatched { .. }) || s.attempts != r.attempt {
            return;
        }
        let undo = s.step.undo.as_deref().cloned();
        // An answer settles what earlier attempts did.
        let unsettled = s.unsettled.take();
        let settled = std::mem::take(&mut s.settling);
        match result {
            Ok(()) => {
                s.status = StepStatus::Succeeded { at: now };
                if !r.undo {
                    if let Some(u) = undo {
                        self.undo.insert(0, StepState::new(u));
                    }
                    // A cancel that comes after the last step is done is
                    // too late: the job succeeded (undoing now would take
                    // back a copy whose source is already gone).
                    let last = r.index as usize + 1 == self.plan.len();
                    if cancelling && !last {
                        self.cancelling = false;
                        self.begin_undo(Outcome::Cancelled);
                    } else {
                        self.cancelling = false;
                    }
                }
            }
            Err((reason, transient)) => {
                // A settle that did not succeed fails the step with why it
                // had to be settled.
                let reason = match unsettled.filter(|_| settled) {
                    Some(why) => format!("{why}; stopped: {reason}"),
                    None => reason,
                };
                if transient && !cancelling && !settled && s.attempts < attempts {
                    s.status = StepStatus::Pending;
                    let delay = retry_ms.saturating_mul(u64::from(s.attempts));
                    s.not_before = Some(now.plus(std::time::Duration::from_millis(delay)));
                    return;
                }
                s.status = StepStatus::Failed {
                    reason: reason.clone(),
                    at: now,
                };
                if r.undo {
                    return;
                }
                // A step that ran and failed (or was cancelled) may have
                // done part of its work (a copy registered, then a start
                // failed): its undo runs too. Undo steps are idempotent and
                // take back only what their own step made.
                if let Some(u) = undo {
                    self.undo.insert(0, StepState::new(u));
                }
                let outcome = if cancelling {
                    Outcome::Cancelled
                } else {
                    Outcome::Failed {
                        reason: format!("step {} failed: {reason}", r.index + 1),
                    }
                };
                self.cancelling = false;
                self.begin_undo(outcome);
            }
        }
    }

    /// The agent of `r` went away mid-step: wait for it and dispatch the
    /// step again, while attempts remain and no cancel is under way.
    fn lost(&mut self, r: StepRef, reason: String, now: Timestamp) {
        let attempts = self.limits.attempts.max(1);
        let cancelling = self.cancelling;
        let Some(s) = self.step_mut(r) else { return };
        if !matches!(s.status, StepStatus::Dispatched { .. }) || s.attempts != r.attempt {
            return;
        }
        if s.settling {
            // Lost again while being settled: nothing more to ask.
            let why = s.unsettled.take().unwrap_or_default();
            s.settling = false;
            let reason = format!("{why}; lost again before it could be stopped: {reason}");
            self.answered(r, Err((reason, false)), now);
            return;
        }
        // It may still run there: a cancel, or the last attempt, settles it
        // once the agent is back; otherwise it is dispatched again (the
        // agent joins the new attempt to one still running).
        s.unsettled = Some(if cancelling || s.attempts >= attempts {
            format!("{reason} (attempt {} of {attempts})", s.attempts)
        } else {
            reason
        });
        s.status = StepStatus::Pending;
        s.not_before = None;
        if let Executor::Agent(agent) = s.step.executor.clone() {
            self.online.retain(|a| *a != agent);
        }
    }

    /// Ends the plan: pending steps are skipped, the undo steps run next.
    fn begin_undo(&mut self, cause: Outcome) {
        for s in &mut self.plan {
            if matches!(s.status, StepStatus::Pending) {
                s.status = StepStatus::Skipped;
            }
        }
        self.waiting_since = None;
        // The plan is over: nothing is left to cancel.
        self.cancelling = false;
        self.phase = Phase::Undoing { cause };
    }

    /// Dispatches the current step if it can, waits for its agent if not,
    /// and ends the job when its list is through.
    fn advance(&mut self, now: Timestamp, actions: &mut Vec<Action<T>>) {
        loop {
            let Some(i) = self.current() else {
                match &self.phase {
                    Phase::Running => {
                        self.finish(Outcome::Succeeded, now, actions);
                    }
                    Phase::Undoing { cause } => {
                        let cause = cause.clone();
                        self.finish(cause, now, actions);
                    }
                    Phase::Done { .. } => {}
                }
                return;
            };
            let (list, undo) = self.list();
            let s = &list[i];
            if !matches!(s.status, StepStatus::Pending) {
                return; // dispatched: wait for its answer
            }
            let settle = s.unsettled.is_some()
                && (self.cancelling || s.attempts >= self.limits.attempts.max(1));
            if !settle && (self.cancelling || s.not_before.is_some_and(|t| now < t)) {
                return;
            }
            let executor = s.step.executor.clone();
            if !self.is_online(&executor) {
                let since = *self.waiting_since.get_or_insert(now);
                let waited = now.unix_millis().saturating_sub(since.unix_millis());
                if u64::try_from(waited).unwrap_or(0) < self.limits.offline_ms {
                    return;
                }
                let who = match &executor {
                    Executor::Agent(a) => format!("agent {a}"),
                    Executor::Controller => "the controller".into(),
                };
                let reason = format!(
                    "{who} was offline for more than {} s",
                    self.limits.offline_ms / 1000
                );
                let list = if undo { &mut self.undo } else { &mut self.plan };
                list[i].status = StepStatus::Failed {
                    reason: reason.clone(),
                    at: now,
                };
                // An earlier attempt ran (and was lost): it may have done
                // part of its work, so its undo runs too.
                let undo_of_lost = (!undo && list[i].attempts > 0)
                    .then(|| list[i].step.undo.as_deref().cloned())
                    .flatten();
                if let Some(u) = undo_of_lost {
                    self.undo.insert(0, StepState::new(u));
                }
                self.waiting_since = None;
                if !undo {
                    let outcome = if self.cancelling {
                        Outcome::Cancelled
                    } else {
                        Outcome::Failed {
                            reason: format!("step {} failed: {reason}", i + 1),
                        }
                    };
                    self.begin_undo(outcome);
                }
                continue;
            }
            self.waiting_since = None;
            let list = if undo { &mut self.undo } else { &mut self.plan };
            let s = &mut list[i];
            s.attempts += 1;
            s.not_before = None;
            s.settling = settle;
            s.status = StepStatus::Dispatched { at: now };
            actions.push(Action::Dispatch {
                step: StepRef {
                    index: i as u32,
                    undo,
                    attempt: s.attempts,
                },
                work: s.step.work.clone(),
                executor: s.step.executor.clone(),
                settle,
            });
            return;
        }
    }

    fn finish(&mut self, outcome: Outcome, now: Timestamp, actions: &mut Vec<Action<T>>) {
        if outcome == Outcome::Succeeded {
            // Kept what every step made: nothing to take back.
            self.undo.clear();
        }
        let leftovers = self
            .undo
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match &s.status {
                StepStatus::Failed { reason, .. } => Some(format!("undo step {}: {reason}", i + 1)),
                _ => None,
            })
            .collect();
        self.phase = Phase::Done {
            outcome: outcome.clone(),
            at: now,
            leftovers,
        };
        actions.push(Action::Finished(outcome));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_unix_millis(ms)
    }

    fn agent(n: u8) -> AgentId {
        AgentId::new(format!("a{n}")).expect("agent id")
    }

    fn step(work: &'static str, who: u8, undo: Option<&'static str>) -> Step<&'static str> {
        Step {
            work,
            executor: Executor::Agent(agent(who)),
            resumable: true,
            undo: undo.map(|u| {
                Box::new(Step {
                    work: u,
                    executor: Executor::Agent(agent(who)),
                    resumable: true,
                    undo: None,
                })
            }),
        }
    }

    fn ok(j: &mut Job<&'static str>, step: StepRef, ms: i64) -> Vec<Action<&'static str>> {
        j.on(Event::Succeeded { step, now: t(ms) })
    }

    fn dispatched(actions: &[Action<&'static str>]) -> Vec<(StepRef, &'static str)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Dispatch { step, work, .. } => Some((*step, *work)),
                _ => None,
            })
            .collect()
    }

    fn finished(actions: &[Action<&'static str>]) -> Option<Outcome> {
        actions.iter().find_map(|a| match a {
            Action::Finished(o) => Some(o.clone()),
            _ => None,
        })
    }

    /// A migrate-like plan: back up on 1, restore on 2 (undo: remove the
    /// copy), remove the source on 1.
    fn migrate() -> Job<&'static str> {
        Job::new(
            vec![
                step("backup", 1, None),
                step("restore", 2, Some("remove copy")),
                step("remove source", 1, None),
            ],
            Limits::default(),
            vec![agent(1), agent(2)],
        )
    }

    #[test]
    fn steps_run_in_order_and_the_job_succeeds() {
        let mut j = migrate();
        let a = j.on(Event::Tick { now: t(0) });
        let d = dispatched(&a);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].1, "backup");
        let a = ok(&mut j, d[0].0, 1);
        let d = dispatched(&a);
        assert_eq!(d[0].1, "restore");
        let a = ok(&mut j, d[0].0, 2);
        let d = dispatched(&a);
        assert_eq!(d[0].1, "remove source");
        let a = ok(&mut j, d[0].0, 3);
        assert_eq!(finished(&a), Some(Outcome::Succeeded));
        assert!(j.is_done());
        // Nothing moves a finished job.
        assert!(j.on(Event::Cancel { now: t(4) }).is_empty());
        assert!(j.on(Event::Restarted { now: t(5) }).is_empty());
    }

    #[test]
    fn a_failure_undoes_what_succeeded_and_names_the_step() {
        let mut j = migrate();
        let d = dispatched(&j.on(Event::Tick { now: t(0) }));
        let d = dispatched(&ok(&mut j, d[0].0, 1));
        let d = dispatched(&ok(&mut j, d[0].0, 2));
        assert_eq!(d[0].1, "remove source");
        let a = j.on(Event::Failed {
            step: d[0].0,
            reason: "permission denied".into(),
            transient: false,
            now: t(3),
        });
        let u = dispatched(&a);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].1, "remove copy");
        assert!(u[0].0.undo);
        let a = ok(&mut j, u[0].0, 4);
        match finished(&a) {
            Some(Outcome::Failed { reason }) => {
                assert!(reason.contains("step 3"), "{reason}");
                assert!(reason.contains("permission denied"), "{reason}");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// A cancel that comes while the last step runs, answered by its
    /// success, is too late: the job succeeded and nothing is undone (the
    /// copy stays, its source is gone).
    #[test]
    fn a_cancel_after_the_last_step_is_done_is_too_late() {
        let mut j = migrate();
        let d = dispatched(&j.on(Event::Tick { now: t(0) }));
        let d = dispatched(&ok(&mut j, d[0].0, 1));
        let d = dispatched(&ok(&mut j, d[0].0, 2));
        assert_eq!(d[0].1, "remove source");
        j.on(Event::Cancel { now: t(3) });
        let a = ok(&mut j, d[0].0, 4);
        assert!(dispatched(&a).is_empty(), "nothing undone: {a:?}");
        assert_eq!(finished(&a), Some(Outcome::Succeeded));
    }

    /// A restore that failed transiently waits to be tried again when the
    /// job is cancelled: it ran, so its undo runs.
    #[test]
    fn a_cancel_while_a_step_waits_to_be_tried_again_runs_its_undo() {
        let mut j = migrate();
        let d = dispatched(&j.on(Event::Tick { now: t(0) }));
        let d = dispatched(&ok(&mut j, d[0].0, 1));
        assert_eq!(d[0].1, "restore");
        j.on(Event::Failed {
            step: d[0].0,
            reason: "start of db timed out".into(),
            transient: true,
            now: t(2),
        });
        let a = j.on(Event::Cancel { now: t(3) });
        let u = dispatched(&a);
        assert_eq!(u.len(), 1, "{a:?}");
        assert_eq!(u[0].1, "remove copy");
        let a = ok(&mut j, u[0].0, 4);
        assert_eq!(finished(&a), Some(Outcome::Cancelled));
    }

    /// The restore registered its copy, then a start failed: the step
    /// failed, and its own undo (remove the copy this job made) runs, so
    /// nothing is left registered that does not run.
    #[test]
    fn a_step_that_ran_and_failed_runs_its_own_undo() {
        let mut j = migrate();
        let d = dispatched(&j.on(Event::Tick { now: t(0) }));
        let d = dispatched(&ok(&mut j, d[0].0, 1));
        assert_eq!(d[0].1, "restore");
        let a = j.on(Event::Failed {
            step: d[0].0,
            reason: "start of db failed".into(),
            transient: false,
            now: t(2),
        });
        let u = dispatched(&a);
        assert_eq!(u.len(), 1, "{a:?}");
        assert_eq!(u[0].1, "remove copy");
        assert!(u[0].0.undo);
        let a = ok(&mut j, u[0].0, 3);
        assert!(
            matches!(finished(&a), Some(Outcome::Failed { .. })),
            "{a:?}"
        );
        // A step that never ran (its agent stayed offline) undoes nothing.
        let mut j = Job::new(
            vec![step("restore", 2, Some("remove copy"))],
            Limits::default(),
            vec![],
        );
        assert!(dispatched(&j.on(Event::Tick { now: t(0) })).is_empty());
        let a = j.on(Event::Tick {
            now: t(10 * 60 * 1000 + 1),
        });
        assert!(dispatched(&a).is_empty(), "{a:?}");
        assert!(
            matches!(finished(&a), Some(Outcome::Failed { .. })),
            "{a:?}"
        );
    }

    #[test]
    fn transient_failures_are_retried_after_a_delay_then_count() {
        let mut j = migrate();
        let d = dispatched(&j.on(Event::Tick { now: t(0) }));
        let fail = |j: &mut Job<&'static str>, r: StepRef, now| {
            j.on(Event::Failed {
                step: r,
                reason: "storage unreachable".into(),
                transient: true,
                now: t(now),
            })
        };
        assert!(
            dispatched(&fail(&mut j, d[0].0, 10)).is_empty(),
            "no retry before the delay"
        );
        assert!(dispatched(&j.on(Event::Tick { now: t(4_000) })).is_empty());
        let d2 = dispatched(&j.on(Event::Tick { now: t(5_010) }));
        assert_eq!(d2[0].0.attempt, 2);
        // An answer for the first attempt is stale.
        assert!(
            j.on(Event::Succeeded {
                step: d[0].0,
                now: t(5_020)
            })
            .is_empty()
        );
        fail(&mut j, d2[0].0, 6_000);
        let d3 = dispatched(&j.on(Event::Tick { now: t(20_000) }));
        assert_eq!(d3[0].0.attempt, 3);
        let a = fail(&mut j, d3[0].0, 21_000);
        assert!(
            matches!(finished(&a), Some(Outcome::Failed { .. })),
            "{a:?}"
        );
    }

    #[test]
    fn an_offline_agent_is_waited_for_up_to_the_deadline() {
        let mut j = Job::new(
            vec![step("backup", 1, None)],
            Limits {
                offline_ms: 60_000,
                ..Limits::default()
            },
            vec![],
        );
        assert!(j.on(Event::Tick { now: t(0) }).is_empty());
        assert!(j.on(Event::Tick { now: t(59_999) }).is_empty());
        let a = j.on(Event::Tick { now: t(60_000) });
        match finished(&a) {
            Some(Outcome::Failed { reason }) => {
                assert!(
                    reason.contains("agent a1 was offline for more than 60 s"),
                    "{reason}"
                )
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        // An agent back in time gets the step.
        let mut j = Job::new(vec![step("backup", 1, None)], Limits::default(), vec![]);
        assert!(j.on(Event::Tick { now: t(0) }).is_empty());
        let a = j.on(Event::Online {
            agent: agent(1),
            online: true,
            now: t(1_000),
        });
        assert_eq!(dispatched(&a)[0].1, "backup");
    }

    #[test]
    fn cancel_stops_the_running_step_then_undoes() {
        let mut j = migrate();
        let d = dispatched(&j.on(Event::Tick { now: t(0) }));
        let d = dispatched(&ok(&mut j, d[0].0, 1));
        assert_eq!(d[0].1, "restore");
        let a = j.on(Event::Cancel { now: t(2) });
        assert!(matches!(a.as_slice(), [Action::Cancel { step, .. }] if *step == d[0].0));
        // A second cancel sends nothing more.
        assert!(j.on(Event::Cancel { now: t(3) }).is_empty());
        // The restore finished anyway: its copy is removed.
        let a = ok(&mut j, d[0].0, 4);
        let u = dispatched(&a);
        assert_eq!(u[0].1, "remove copy");
        let a = ok(&mut j, u[0].0, 5);
        assert_eq!(finished(&a), Some(Outcome::Cancelled));
        assert!(matches!(j.plan[2].status, StepStatus::Skipped));
    }

    #[test]
    fn a_restart_resumes_resumable_steps_and_fails_the_others() {
        let mut j = migrate();
        let d = dispatched(&j.on(Event::Tick { now: t(0) }));
        let a = j.on(Event::Restarted { now: t(1) });
        let again = dispatched(&a);
        assert_eq!(again[0].1, "backup");
        assert_eq!(again[0].0.attempt, 2);
        assert_eq!(again[0].0.index, d[0].0.index);

        let mut plan = vec![step("backup", 1, None)];
        plan[0].resumable = false;
        let mut j = Job::new(plan, Limits::default(), vec![agent(1)]);
        j.on(Event::Tick { now: t(0) });
        let a = j.on(Event::Restarted { now: t(1) });
        match finished(&a) {
            Some(Outcome::Failed { reason }) => {
                assert!(reason.contains("controller restart"), "{reason}")
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn a_step_lost_with_its_agent_runs_again_once_the_agent_is_back() {
        let mut j = migrate();
        let d = dispatched(&j.on(Event::Tick { now: t(0) }));
        let lost = j.on(Event::Lost {
            step: d[0].0,
            reason: "the session ended".into(),
            now: t(1),
        });
        // Not dispatched again while the agent is away, however long the
        // clock runs short of the offline deadline.
        assert!(lost.is_empty(), "{lost:?}");
        assert!(j.on(Event::Tick { now: t(100) }).is_empty());
        let back = j.on(Event::Online {
            agent: agent(1),
            online: true,
            now: t(101),
        });
        let again = dispatched(&back);
        assert_eq!(again[0].0.index, d[0].0.index);
        assert_eq!(again[0].0.attempt, 2);
        // Lost on every attempt: the last is settled once the agent is back
        // (it may still run there), and lost again, the job fails and says
        // so.
        let mut step = again[0].0;
        let mut end = Vec::new();
        for n in 0..5 {
            end = j.on(Event::Lost {
                step,
                reason: "the session ended".into(),
                now: t(200 + n),
            });
            end.extend(j.on(Event::Online {
                agent: agent(1),
                online: true,
                now: t(200 + n),
            }));
            match dispatched(&end).first() {
                Some((s, _)) if !s.undo => step = *s,
                _ => break,
            }
        }
        assert_eq!(j.plan[0].attempts, Limits::default().attempts + 1);
        match &j.plan[0].status {
            StepStatus::Failed { reason, .. } => {
                assert!(
                    reason.contains("session ended")
                        && reason.contains("attempt 3 of 3")
                        && reason.contains("lost again"),
                    "{reason}"
                )
            }
            other => panic!("expected the step to fail, got {other:?} after {end:?}"),
        }
    }

    fn settles(actions: &[Action<&'static str>]) -> Vec<(StepRef, &'static str)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Dispatch {
                    step,
                    work,
                    settle: true,
                    ..
                } => Some((*step, *work)),
                _ => None,
            })
            .collect()
    }

    /// A cancel was sent, then the controller restarted before the step
    /// answered: the step task that carried the cancel is gone, so the step
    /// is settled (dispatched again with a cancel) and the job ends when it
    /// answers, instead of waiting for ever.
    #[test]
    fn a_restart_while_a_cancel_is_pending_settles_the_step() {
        let mut j = migrate();
        let d = dispatched(&j.on(Event::Tick { now: t(0) }));
        let a = j.on(Event::Cancel { now: t(1) });
        assert!(matches!(a.as_slice(), [Action::Cancel { .. }]), "{a:?}");
        let a = j.on(Event::Restarted { now: t(2) });
        let s = settles(&a);
        assert_eq!(s.len(), 1, "{a:?}");
        assert_eq!(s[0].1, "backup");
        assert_eq!(s[0].0.index, d[0].0.index);
        let a = j.on(Event::Failed {
            step: s[0].0,
            reason: "cancelled".into(),
            transient: true,
            now: t(3),
        });
        assert_eq!(finished(&a), Some(Outcome::Cancelled), "{a:?}");
    }

    /// The restore was being cancelled when its agent went away: it may
    /// still run there, so nothing is undone until it is settled; what it
    /// answers decides the rest (here: the copy was made, and is removed).
    #[test]
    fn a_step_lost_while_cancelling_is_settled_before_anything_is_undone() {
        let mut j = migrate();
        let d = dispatched(&j.on(Event::Tick { now: t(0) }));
        let d = dispatched(&ok(&mut j, d[0].0, 1));
        assert_eq!(d[0].1, "restore");
        j.on(Event::Cancel { now: t(2) });
        let a = j.on(Event::Lost {
            step: d[0].0,
            reason: "the session ended".into(),
            now: t(3),
        });
        assert!(a.is_empty(), "nothing runs while the agent is away: {a:?}");
        assert!(j.on(Event::Tick { now: t(100) }).is_empty());
        let a = j.on(Event::Online {
            agent: agent(2),
            online: true,
            now: t(101),
        });
        let s = settles(&a);
        assert_eq!(s.len(), 1, "{a:?}");
        assert_eq!(s[0].1, "restore");
        let a = ok(&mut j, s[0].0, 102);
        let u = dispatched(&a);
        assert_eq!(u[0].1, "remove copy");
        let a = ok(&mut j, u[0].0, 103);
        assert_eq!(finished(&a), Some(Outcome::Cancelled));
        // A cancel while a lost step waits for its agent waits too.
        let mut j = migrate();
        let d = dispatched(&j.on(Event::Tick { now: t(0) }));
        j.on(Event::Lost {
            step: d[0].0,
            reason: "the session ended".into(),
            now: t(1),
        });
        let a = j.on(Event::Cancel { now: t(2) });
        assert!(finished(&a).is_none(), "{a:?}");
        let a = j.on(Event::Online {
            agent: agent(1),
            online: true,
            now: t(3),
        });
        let s = settles(&a);
        assert_eq!(s.len(), 1, "{a:?}");
        let a = j.on(Event::Failed {
            step: s[0].0,
            reason: "cancelled".into(),
            transient: false,
            now: t(4),
        });
        assert_eq!(finished(&a), Some(Outcome::Cancelled));
    }

    #[test]
    fn the_state_survives_a_round_trip_through_json() {
        let mut j = migrate();
        let d = dispatched(&j.on(Event::Tick { now: t(0) }));
        ok(&mut j, d[0].0, 1);
        let text = serde_json::to_string(&j).expect("encode");
        let back: Job<String> = serde_json::from_str(&text).expect("decode");
        assert_eq!(serde_json::to_string(&back).expect("encode"), text);
    }

    #[derive(Clone, Debug)]
    enum Ev {
        Tick(u16),
        Online(u8, bool),
        /// Answer the n-th outstanding dispatch (modulo), with a result.
        Answer(u8, u8),
        Cancel,
        Restart,
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (0u16..5000).prop_map(Ev::Tick),
            (1u8..3, any::<bool>()).prop_map(|(a, o)| Ev::Online(a, o)),
            (any::<u8>(), 0u8..5).prop_map(|(n, r)| Ev::Answer(n, r)),
            Just(Ev::Cancel),
            Just(Ev::Restart),
        ]
    }

    fn plan() -> impl Strategy<Value = Vec<(u8, bool, bool)>> {
        // (agent, has undo, resumable)
        prop::collection::vec((1u8..3, any::<bool>(), any::<bool>()), 1..5)
    }

    proptest! {
        /// Whatever happens: at most one step runs at a time; a job that
        /// succeeded ran every step and no undo; a job that did not succeed
        /// ran (or tried) the undo of every step that succeeded or ran and
        /// failed, in reverse order; answers for anything but the running attempt change
        /// nothing; after a cancel only undo steps start; a finished job
        /// stays finished and does nothing more.
        #[test]
        fn invariants_hold_for_any_events(p in plan(), events in prop::collection::vec(ev(), 0..60)) {
            let plan: Vec<Step<String>> = p.iter().enumerate().map(|(i, (a, undo, resumable))| Step {
                work: format!("s{i}"),
                executor: Executor::Agent(agent(*a)),
                resumable: *resumable,
                undo: undo.then(|| Box::new(Step {
                    work: format!("u{i}"),
                    executor: Executor::Agent(agent(*a)),
                    resumable: true,
                    undo: None,
                })),
            }).collect();
            let mut j = Job::new(plan, Limits { offline_ms: 10_000, attempts: 2, retry_ms: 100 }, vec![agent(1)]);
            let mut now = 0i64;
            let mut outstanding: Vec<StepRef> = Vec::new();
            let mut finishes = 0;
            let mut cancelled = false;
            for e in events {
                now += 1;
                let was_done = j.is_done();
                if matches!(e, Ev::Cancel) && j.phase == Phase::Running {
                    cancelled = true;
                }
                let before = serde_json::to_string(&j).expect("encode");
                let actions = match e {
                    Ev::Tick(dt) => { now += i64::from(dt); j.on(Event::Tick { now: t(now) }) }
                    Ev::Online(a, o) => j.on(Event::Online { agent: agent(a), online: o, now: t(now) }),
                    Ev::Answer(n, r) => {
                        if outstanding.is_empty() { continue; }
                        let step = outstanding[n as usize % outstanding.len()];
                        let a = match r {
                            0 | 1 => j.on(Event::Succeeded { step, now: t(now) }),
                            2 => j.on(Event::Failed { step, reason: "boom".into(), transient: true, now: t(now) }),
                            3 => j.on(Event::Lost { step, reason: "gone".into(), now: t(now) }),
                            _ => j.on(Event::Failed { step, reason: "boom".into(), transient: false, now: t(now) }),
                        };
                        outstanding.retain(|s| *s != step);
                        a
                    }
                    Ev::Cancel => j.on(Event::Cancel { now: t(now) }),
                    Ev::Restart => j.on(Event::Restarted { now: t(now) }),
                };
                if was_done {
                    prop_assert!(actions.is_empty());
                    prop_assert_eq!(serde_json::to_string(&j).expect("encode"), before);
                }
                for a in &actions {
                    match a {
                        Action::Dispatch { step, work, settle, .. } => {
                            // After a cancel, only undo steps start, and
                            // settles of steps that may still run.
                            prop_assert!(step.undo || *settle || !cancelled, "step {} started after a cancel", work);
                            outstanding.retain(|s| !(s.index == step.index && s.undo == step.undo));
                            outstanding.push(*step);
                        }
                        Action::Finished(_) => finishes += 1,
                        Action::Cancel { .. } => {}
                    }
                }
                let running = j.plan.iter().chain(j.undo.iter())
                    .filter(|s| matches!(s.status, StepStatus::Dispatched { .. })).count();
                prop_assert!(running <= 1, "{} steps dispatched at once", running);
            }
            // Liveness: with both agents online, the clock moving and every
            // step answered, any job ends.
            for a in [1, 2] {
                for act in j.on(Event::Online { agent: agent(a), online: true, now: t(now) }) {
                    if let Action::Dispatch { step, .. } = act { outstanding.push(step); }
                    if let Action::Finished(_) = act { finishes += 1; }
                }
            }
            for _ in 0..4 * (p.len() + 1) {
                if j.is_done() { break; }
                now += 100_000;
                let mut acts = j.on(Event::Tick { now: t(now) });
                if let Some(step) = outstanding.pop() {
                    acts.extend(j.on(Event::Succeeded { step, now: t(now) }));
                }
                for act in acts {
                    if let Action::Dispatch { step, .. } = act { outstanding.push(step); }
                    if let Action::Finished(_) = act { finishes += 1; }
                }
            }
            prop_assert!(j.is_done(), "the job never ended: {:?}", j.phase);
            prop_assert!(finishes <= 1);
            if let Phase::Done { outcome, .. } = &j.phase {
                prop_assert_eq!(finishes, 1);
                let succeeded: Vec<usize> = j.plan.iter().enumerate()
                    .filter(|(_, s)| matches!(s.status, StepStatus::Succeeded { .. }))
                    .map(|(i, _)| i).collect();
                if *outcome == Outcome::Succeeded {
                    prop_assert_eq!(succeeded.len(), j.plan.len());
                    prop_assert!(j.undo.is_empty());
                } else {
                    // Every step with an undo that succeeded, or ran and
                    // failed, has it, in reverse order, ended.
                    let ran: Vec<usize> = j.plan.iter().enumerate()
                        .filter(|(_, s)| match s.status {
                            StepStatus::Succeeded { .. } => true,
                            StepStatus::Failed { .. } | StepStatus::Skipped => s.attempts > 0,
                            _ => false,
                        })
                        .map(|(i, _)| i).collect();
                    let expected: Vec<String> = ran.iter().rev()
                        .filter(|i| p[**i].1).map(|i| format!("u{i}")).collect();
                    let got: Vec<String> = j.undo.iter().map(|s| s.step.work.clone()).collect();
                    prop_assert_eq!(&got, &expected);
                    for s in &j.undo {
                        let ended = matches!(s.status, StepStatus::Succeeded { .. } | StepStatus::Failed { .. });
                        prop_assert!(ended);
                    }
                    for s in &j.plan {
                        let open = matches!(s.status, StepStatus::Dispatched { .. } | StepStatus::Pending);
                        prop_assert!(!open);
                    }
                }
            } else {
                prop_assert_eq!(finishes, 0);
            }
        }
    }
}

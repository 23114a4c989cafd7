//! A fault-injecting wrapper around any [`ObjectStore`], for tests of what
//! Ferry does when storage misbehaves: errors, delays, torn writes and
//! crashes in the middle of a backup.
//!
//! ```ignore
//! use ferry_store::faulty::{FaultyStore, Fault, Op, Rule};
//!
//! let store = FaultyStore::new(inner, 42); // seed: same faults every run
//! // The 3rd put below data/ fails with a transient error.
//! store.inject(Rule::new(Fault::Transient).op(Op::Put).prefix("data/").nth(3));
//! // One get in ten fails permanently.
//! store.inject(Rule::new(Fault::Permanent).op(Op::Get).probability(0.1));
//! // Every list waits 50 ms first.
//! store.inject(Rule::new(Fault::Delay(Duration::from_millis(50))).op(Op::List));
//! // The 2nd put stores only a prefix of its data, then fails.
//! store.inject(Rule::new(Fault::TornWrite).op(Op::Put).nth(2));
//! // The process "crashes" after 10 successful puts: every later call
//! // fails permanently until `recover`.
//! store.crash_after_puts(10);
//! …
//! assert!(store.crashed());
//! store.recover(); // clears the crash and every rule
//! ```
//!
//! Rules are checked in the order they were added; the first that fires
//! decides the call's fate (a delay fires and then lets later rules decide).
//! Each rule counts only the calls it matches, so `nth(3)` means the third
//! call of that rule's ops and prefix.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{ObjectInfo, ObjectKey, ObjectStore, StoreError};

/// A storage operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Put,
    Get,
    GetRange,
    Size,
    List,
    Delete,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::GetRange => "get_range",
            Op::Size => "size",
            Op::List => "list",
            Op::Delete => "delete",
        }
    }
}

/// What happens when a rule fires.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The call fails with [`StoreError::Transient`] without reaching the
    /// inner store.
    Transient,
    /// The call fails with [`StoreError::Permanent`] without reaching the
    /// inner store.
    Permanent,
    /// The call waits this long, then goes on (later rules may still fire).
    Delay(Duration),
    /// Only for puts: a prefix of the data (a seeded random length, shorter
    /// than the whole) is stored under the key, then the put fails with a
    /// transient error, as a crash mid-write on a store without atomic
    /// writes would leave it. On other operations it acts as `Transient`.
    TornWrite,
}

/// When a rule fires, counted over the calls the rule matches.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Trigger {
    Always,
    /// Only the n-th matching call (1-based).
    Nth(u64),
    /// Each of the first n matching calls.
    First(u64),
    /// Every matching call after the first n.
    After(u64),
    /// Each matching call with this probability.
    Probability(f64),
}

/// One fault to inject: which calls it applies to and when it fires.
#[derive(Debug, Clone)]
pub struct Rule {
    fault: Fault,
    ops: Vec<Op>,
    prefix: String,
    trigger: Trigger,
    /// Matching calls seen so far.
    seen: u64,
}

impl Rule {
    /// A rule that fires `fault` on every call of every operation; narrow
    /// it with the methods below.
    pub fn new(fault: Fault) -> Self {
        Self {
            fault,
            ops: Vec::new(),
            prefix: String::new(),
            trigger: Trigger::Always,
            seen: 0,
        }
    }

    /// Applies to `op` (may be given several times; none means all).
    pub fn op(mut self, op: Op) -> Self {
        self.ops.push(op);
        self
    }

    /// Applies only to keys (or list prefixes) starting with `prefix`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Fires on the n-th matching call only (1-based).
    pub fn nth(mut self, n: u64) -> Self {
        self.trigger = Trigger::Nth(n);
        self
    }

    /// Fires on each of the first `n` matching calls. Unlike one `nth`
    /// rule per call, it counts every call as it arrives, also while an
    /// earlier one is held by a delay.
    pub fn first(mut self, n: u64) -> Self {
        self.trigger = Trigger::First(n);
        self
    }

    /// Fires on every matching call after the first `n`.
    pub fn after(mut self, n: u64) -> Self {
        self.trigger = Trigger::After(n);
        self
    }

    /// Fires on each matching call with probability `p` (seeded).
    pub fn probability(mut self, p: f64) -> Self {
        self.trigger = Trigger::Probability(p);
        self
    }

    fn matches(&self, op: Op, key: &str) -> bool {
        (self.ops.is_empty() || self.ops.contains(&op)) && key.starts_with(&self.prefix)
    }
}

/// Wraps a store and injects the faults of its rules. Cheap to clone; the
/// clones share rules, counters and the random source.
#[derive(Debug, Clone)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    rules: Vec<Rule>,
    rng: StdRng,
    /// The crash point, counted in admitted puts.
    crash_after_puts: Option<u64>,
    /// Puts let through to the inner store (in flight or done). Counting
    /// admissions, not completions, keeps the crash point exact when puts
    /// run concurrently.
    admitted_puts: u64,
    successful_puts: u64,
    crashed: bool,
    injected: u64,
}

/// The source of injected errors, so tests can tell them from real ones.
#[derive(Debug, thiserror::Error)]
#[error("injected fault: {0}")]
pub struct InjectedFault(String);

/// What to do with one call.
enum Decision {
    Pass,
    Fail(StoreError),
    Tear(usize),
}

impl FaultyStore {
    /// Wraps `inner`; `seed` makes probabilistic rules and torn-write
    /// lengths the same on every run.
    pub fn new(inner: Arc<dyn ObjectStore>, seed: u64) -> Self {
        Self {
            inner,
            state: Arc::new(Mutex::new(State {
                rules: Vec::new(),
                rng: StdRng::seed_from_u64(seed),
                crash_after_puts: None,
                admitted_puts: 0,
                successful_puts: 0,
                crashed: false,
                injected: 0,
            })),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Adds a rule after the existing ones.
    pub fn inject(&self, rule: Rule) {
        self.state().rules.push(rule);
    }

    /// After `n` more puts, the store "crashes": every later call of any
    /// operation fails permanently until [`recover`](Self::recover). Puts
    /// already admitted when the crash point is reached still complete,
    /// so exactly `n` more puts reach the inner store, however many run
    /// at once. `crash_after_puts(0)` crashes on the next call.
    pub fn crash_after_puts(&self, n: u64) {
        let mut s = self.state();
        s.crash_after_puts = Some(s.admitted_puts + n);
        if n == 0 {
            s.crashed = true;
        }
    }

    /// Whether the crash point was reached.
    pub fn crashed(&self) -> bool {
        self.state().crashed
    }

    /// Clears the crash and every rule: the store behaves like the inner
    /// one again (as after a restart).
    pub fn recover(&self) {
        let mut s = self.state();
        s.rules.clear();
        s.crash_after_puts = None;
        s.crashed = false;
    }

    /// How many faults (errors, delays and torn writes) were injected.
    pub fn injected(&self) -> u64 {
        self.state().injected
    }

    /// Puts that reached the inner store and succeeded.
    pub fn successful_puts(&self) -> u64 {
        self.state().successful_puts
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock poisons it; the state
        // is still consistent (every update is a single assignment).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides the fate of one call, sleeping for any delays on the way.
    async fn decide(&self, op: Op, key: &str, len: usize) -> Decision {
        let mut index = 0;
        loop {
            let (fault, remaining) = {
                let mut s = self.state();
                if s.crashed {
                    s.injected += 1;
                    return Decision::Fail(error(false, op, key, "the store crashed".into()));
                }
                let mut fired = None;
                while index < s.rules.len() {
                    let State { rules, rng, .. } = &mut *s;
                    let rule = &mut rules[index];
                    index += 1;
                    if !rule.matches(op, key) {
                        continue;
                    }
                    rule.seen += 1;
                    let fires = match rule.trigger {
                        Trigger::Always => true,
                        Trigger::Nth(n) => rule.seen == n,
                        Trigger::First(n) => rule.seen <= n,
                        Trigger::After(n) => rule.seen > n,
                        Trigger::Probability(p) => rng.random_bool(p.clamp(0.0, 1.0)),
                    };
                    if fires {
                        fired = Some(rule.fault.clone());
                        break;
                    }
                }
                let Some(fault) = fired else {
                    if op == Op::Put {
                        if s.crash_after_puts.is_some_and(|n| s.admitted_puts >= n) {
                            s.crashed = true;
                            s.injected += 1;
                            return Decision::Fail(error(
                                false,
                                op,
                                key,
                                "the store crashed".into(),
                            ));
                        }
                        s.admitted_puts += 1;
                    }
                    return Decision::Pass;
                };
                s.injected += 1;
                let torn_len = if len > 0 {
                    s.rng.random_range(0..len)
                } else {
                    0
                };
                (fault, torn_len)
            };
            match fault {
                Fault::Delay(d) => tokio::time::sleep(d).await,
                Fault::Transient => {
                    return Decision::Fail(error(true, op, key, "transient error".into()));
                }
                Fault::Permanent => {
                    return Decision::Fail(error(false, op, key, "permanent error".into()));
                }
                Fault::TornWrite if op == Op::Put => return Decision::Tear(remaining),
                Fault::TornWrite => {
                    return Decision::Fail(error(true, op, key, "torn write".into()));
                }
            }
        }
    }

    /// Counts a successful put and crashes when the crash point is reached.
    fn put_done(&self) {
        let mut s = self.state();
        s.successful_puts += 1;
        if s.crash_after_puts.is_some_and(|n| s.admitted_puts >= n) {
            s.crashed = true;
        }
    }
}

fn error(transient: bool, op: Op, key: &str, what: String) -> StoreError {
    let source = Box::new(InjectedFault(what));
    if transient {
        StoreError::Transient {
            op: op.name(),
            key: key.to_owned(),
            source,
        }
    } else {
        StoreError::Permanent {
            op: op.name(),
            key: key.to_owned(),
            source,
        }
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), StoreError> {
        match self.decide(Op::Put, key.as_str(), data.len()).await {
            Decision::Pass => {
                self.inner.put(key, data).await?;
                self.put_done();
                Ok(())
            }
            Decision::Fail(e) => Err(e),
            Decision::Tear(keep) => {
                let len = data.len();
                self.inner.put(key, data.slice(..keep)).await?;
                Err(error(
                    true,
                    Op::Put,
                    key.as_str(),
                    format!("torn write: kept {keep} of {len} bytes"),
                ))
            }
        }
    }

    async fn get(&self, key: &ObjectKey) -> Result<Bytes, StoreError> {
        match self.decide(Op::Get, key.as_str(), 0).await {
            Decision::Fail(e) => Err(e),
            _ => self.inner.get(key).await,
        }
    }

    async fn get_range(&self, key: &ObjectKey, range: Range<u64>) -> Result<Bytes, StoreError> {
        match self.decide(Op::GetRange, key.as_str(), 0).await {
            Decision::Fail(e) => Err(e),
            _ => self.inner.get_range(key, range).await,
        }
    }

    async fn size(&self, key: &ObjectKey) -> Result<Option<u64>, StoreError> {
        match self.decide(Op::Size, key.as_str(), 0).await {
            Decision::Fail(e) => Err(e),
            _ => self.inner.size(key).await,
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        match self.decide(Op::List, prefix, 0).await {
            Decision::Fail(e) => Err(e),
            _ => self.inner.list(prefix).await,
        }
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        match self.decide(Op::Delete, key.as_str(), 0).await {
            Decision::Fail(e) => Err(e),
            _ => self.inner.delete(key).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalStore;
    use crate::conformance::{Fixture, conformance_suite, pattern};

    fn key(s: &str) -> ObjectKey {
        ObjectKey::new(s).expect("valid key")
    }

    fn faulty() -> (FaultyStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path()));
        (FaultyStore::new(inner, 7), dir)
    }

    /// Without rules the wrapper is a faithful store.
    mod conformance {
        use super::*;

        conformance_suite!(async {
            let (store, dir) = faulty();
            Fixture {
                store: Arc::new(store),
                _guard: Some(Box::new(dir)),
            }
        });
    }

    #[tokio::test]
    async fn nth_fires_once_on_matching_calls_only() {
        let (store, _dir) = faulty();
        store.inject(
            Rule::new(Fault::Transient)
                .op(Op::Put)
                .prefix("data/")
                .nth(2),
        );
        let data = Bytes::from_static(b"x");
        store
            .put(&key("index/a"), data.clone())
            .await
            .expect("other prefix");
        store.put(&key("data/1"), data.clone()).await.expect("1st");
        let err = store
            .put(&key("data/2"), data.clone())
            .await
            .expect_err("2nd fails");
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("data/2"), "{err}");
        store.put(&key("data/3"), data.clone()).await.expect("3rd");
        store.put(&key("data/2"), data).await.expect("retry");
        assert_eq!(store.injected(), 1);
        assert_eq!(store.successful_puts(), 4);
    }

    /// `first(2)` holds the first two calls, and counts the second while
    /// the first is still held: the third passes at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn first_holds_each_of_the_first_calls_even_while_one_is_held() {
        let (store, _dir) = faulty();
        store.inject(
            Rule::new(Fault::Delay(Duration::from_secs(30)))
                .op(Op::Put)
                .prefix("data/")
                .first(2),
        );
        let data = Bytes::from_static(b"x");
        let held: Vec<_> = ["data/1", "data/2"]
            .into_iter()
            .map(|k| {
                let (store, data) = (store.clone(), data.clone());
                tokio::spawn(async move { store.put(&key(k), data).await })
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.injected() < 2 {
            assert!(std::time::Instant::now() < deadline, "both calls held");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        store.put(&key("data/3"), data).await.expect("3rd passes");
        assert_eq!(store.successful_puts(), 1, "the first two are still held");
        for h in held {
            h.abort();
        }
    }

    #[tokio::test]
    async fn permanent_after_and_ops() {
        let (store, _dir) = faulty();
        store
            .put(&key("a"), Bytes::from_static(b"a"))
            .await
            .expect("put");
        store.inject(
            Rule::new(Fault::Permanent)
                .op(Op::Get)
                .op(Op::Size)
                .after(1),
        );
        store.get(&key("a")).await.expect("first get passes");
        let err = store.size(&key("a")).await.expect_err("then fails");
        assert!(
            matches!(err, StoreError::Permanent { op: "size", .. }),
            "{err}"
        );
        assert!(store.get(&key("a")).await.is_err());
        // Other operations are untouched.
        assert_eq!(store.list("").await.expect("list").len(), 1);
        store.delete(&key("a")).await.expect("delete");
    }

    #[tokio::test]
    async fn probability_is_deterministic_for_a_seed() {
        async fn failures(seed: u64) -> Vec<bool> {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = FaultyStore::new(Arc::new(LocalStore::new(dir.path())), seed);
            store.inject(Rule::new(Fault::Transient).probability(0.3));
            let mut out = Vec::new();
            for i in 0..200 {
                out.push(store.size(&key(&format!("k{i}"))).await.is_err());
            }
            out
        }
        let a = failures(1).await;
        assert_eq!(a, failures(1).await);
        assert_ne!(a, failures(2).await);
        let n = a.iter().filter(|f| **f).count();
        assert!((20..=100).contains(&n), "{n} of 200 failed at p=0.3");
    }

    #[tokio::test]
    async fn delays_then_lets_later_rules_decide() {
        let (store, _dir) = faulty();
        store.inject(Rule::new(Fault::Delay(Duration::from_millis(100))).op(Op::List));
        store.inject(Rule::new(Fault::Transient).op(Op::List).nth(2));
        let start = tokio::time::Instant::now();
        store.list("").await.expect("delayed list");
        // A sleep lasts at least its duration.
        assert!(start.elapsed() >= Duration::from_millis(100));
        assert!(store.list("").await.is_err());
        assert_eq!(store.injected(), 3);
    }

    #[tokio::test]
    async fn torn_write_keeps_a_prefix_and_reports_an_error() {
        let (store, _dir) = faulty();
        store.inject(Rule::new(Fault::TornWrite).op(Op::Put).nth(1));
        let data = pattern(100_000, 1);
        let err = store
            .put(&key("pack"), data.clone())
            .await
            .expect_err("torn");
        assert!(err.is_transient(), "{err}");
        let stored = store
            .inner()
            .get(&key("pack"))
            .await
            .expect("prefix stored");
        assert!(stored.len() < data.len());
        assert_eq!(&stored[..], &data[..stored.len()]);
        // The retry writes the whole object.
        store.put(&key("pack"), data.clone()).await.expect("retry");
        assert!(store.get(&key("pack")).await.expect("get") == data);
    }

    #[tokio::test]
    async fn crash_point_stops_everything_until_recover() {
        let (store, _dir) = faulty();
        store.crash_after_puts(3);
        for i in 0..3 {
            store
                .put(&key(&format!("p{i}")), Bytes::from_static(b"x"))
                .await
                .expect("before the crash");
        }
        assert!(store.crashed());
        let err = store
            .put(&key("p3"), Bytes::from_static(b"x"))
            .await
            .expect_err("crashed");
        assert!(!err.is_transient());
        assert!(store.get(&key("p0")).await.is_err());
        assert_eq!(store.inner().list("").await.expect("list").len(), 3);
        store.recover();
        assert!(!store.crashed());
        assert_eq!(store.list("").await.expect("list").len(), 3);
        store
            .put(&key("p3"), Bytes::from_static(b"x"))
            .await
            .expect("after recover");
    }
}

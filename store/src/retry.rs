//! The one retry policy of Ferry's storage: every operation of every store
//! is retried here, and nowhere else (the S3 client's own retries are off).
//!
//! A transient failure is retried with exponential backoff and jitter until
//! the operation's total deadline; a permanent failure or `NotFound` is
//! returned at once. Each attempt of an S3 request is bounded by the
//! store's attempt timeout, so a silent endpoint costs at most the deadline
//! plus one attempt. Dropping the future (cancellation) stops at once,
//! backoff sleeps included.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{ObjectInfo, ObjectKey, ObjectStore, StoreError};

/// How long and how often to retry a transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// The first backoff delay; each next one doubles, up to `max_delay`.
    #[serde(with = "serde_secs")]
    pub first_delay: Duration,
    #[serde(with = "serde_secs")]
    pub max_delay: Duration,
    /// The whole operation, every attempt and wait included, gives up once
    /// this much time has passed since its start.
    #[serde(with = "serde_secs")]
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    /// Rides out a storage outage of a few minutes.
    fn default() -> Self {
        Self {
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(20),
            deadline: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            first_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
            deadline: Duration::ZERO,
        }
    }

    /// The wait before attempt `n + 1` (`n` ≥ 1): the doubled delay with
    /// up to a quarter of it taken off at random, so clients that failed
    /// together do not retry together.
    pub fn delay(&self, n: u32) -> Duration {
        let base = self
            .first_delay
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(20))
            .min(self.max_delay);
        let jitter = base.mul_f64(jitter_fraction() * 0.25);
        base.saturating_sub(jitter)
    }

    /// Runs `op` until it succeeds, fails permanently, or the deadline
    /// passes; returns the last error then, saying how long it tried.
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let started = tokio::time::Instant::now();
        let deadline = started + self.deadline;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let err = match op().await {
                Err(e) if e.is_transient() => e,
                other => return other,
            };
            let wait = self.delay(attempt);
            if tokio::time::Instant::now() + wait >= deadline {
                if attempt == 1 {
                    return Err(err);
                }
                return Err(err.gave_up(attempt, started.elapsed()));
            }
            tracing::warn!(error = %err, attempt, retry_in_ms = wait.as_millis() as u64, "transient storage error, retrying");
            tokio::time::sleep(wait).await;
        }
    }
}

/// A number in [0, 1) from the clock's low bits: jitter needs no more.
fn jitter_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos.wrapping_mul(2_654_435_761) >> 8) / f64::from(1u32 << 24)
}

pub(crate) mod serde_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

/// Any store with [`RetryPolicy`] applied to every operation.
#[derive(Debug, Clone)]
pub struct Retrying {
    inner: Arc<dyn ObjectStore>,
    policy: RetryPolicy,
}

impl Retrying {
    pub fn new(inner: Arc<dyn ObjectStore>, policy: RetryPolicy) -> Self {
        Self { inner, policy }
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

#[async_trait]
impl ObjectStore for Retrying {
    async fn put(&self, key: &ObjectKey, data: Bytes) -> Result<(), StoreError> {
        self.policy.run(|| self.inner.put(key, data.clone())).await
    }

    async fn get(&self, key: &ObjectKey) -> Result<Bytes, StoreError> {
        self.policy.run(|| self.inner.get(key)).await
    }

    async fn get_range(&self, key: &ObjectKey, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.policy
            .run(|| self.inner.get_range(key, range.clone()))
            .await
    }

    async fn size(&self, key: &ObjectKey) -> Result<Option<u64>, StoreError> {
        self.policy.run(|| self.inner.size(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.policy.run(|| self.inner.list(prefix)).await
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        self.policy.run(|| self.inner.delete(key)).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn transient() -> StoreError {
        StoreError::Transient {
            op: "get",
            key: "k".into(),
            source: "connection refused".into(),
        }
    }

    fn policy(deadline_ms: u64) -> RetryPolicy {
        RetryPolicy {
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
            deadline: Duration::from_millis(deadline_ms),
        }
    }

    #[test]
    fn delays_double_up_to_the_ceiling_with_bounded_jitter() {
        let p = RetryPolicy {
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            deadline: Duration::from_secs(60),
        };
        for (n, base) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (5, 1600),
            (6, 2000),
            (30, 2000),
        ] {
            let d = p.delay(n).as_millis() as u64;
            assert!(
                d <= base && d >= base * 3 / 4,
                "attempt {n}: {d} ms for base {base}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let out = policy(10_000)
            .run(|| async {
                if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err(transient())
                } else {
                    Ok(7)
                }
            })
            .await
            .expect("succeeds on the fourth attempt");
        assert_eq!(out, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline_and_says_so() {
        let calls = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let err = policy(1_000)
            .run(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(transient())
            })
            .await
            .expect_err("never succeeds");
        let elapsed = started.elapsed();
        assert!(elapsed <= Duration::from_millis(1_000), "{elapsed:?}");
        assert!(calls.load(Ordering::SeqCst) > 10);
        let text = err.to_string();
        assert!(text.contains("gave up after"), "{text}");
        assert!(text.contains("connection refused"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_and_not_found_are_not_retried() {
        for err in [
            StoreError::Permanent {
                op: "put",
                key: "k".into(),
                source: "access denied".into(),
            },
            StoreError::NotFound {
                key: ObjectKey::new("k").expect("key"),
            },
        ] {
            let calls = AtomicU32::new(0);
            let mut once = Some(err);
            let res: Result<(), _> = policy(10_000)
                .run(|| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let e = once.take();
                    async move { Err(e.expect("called once")) }
                })
                .await;
            assert!(res.is_err());
            assert_eq!(calls.load(Ordering::SeqCst), 1);
        }
    }
}

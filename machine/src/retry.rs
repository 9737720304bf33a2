//! Retrying an Update whose failure rolled it back for a transient cause.
//!
//! [`ChatMachine::update`] takes its callback by value (`AsyncFnOnce`), so
//! running it again needs a fresh callback per attempt:
//! [`ChatMachine::update_with_retry`] takes a factory that makes one.
//! It retries exactly when [`Error::is_retryable`] says so, that is when
//! the failed attempt certainly rolled back (nothing committed, nothing
//! published) and its cause may be gone next time: a lost connection, a
//! serialization failure, a deadlock, a timeout, a read-only server. It
//! never retries a rejection, an error of the callback, an outcome that is
//! unknown, or a committed change whose publication failed.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use crate::error::Error;
use crate::machine::ChatMachine;
use crate::store::Store;
use crate::tx::Tx;

/// How often and how patiently [`ChatMachine::update_with_retry`] tries.
///
/// Before attempt `n + 1` it waits a random time between zero and
/// `min(max_backoff, initial_backoff * 2^(n - 1))` ("full jitter"), so
/// transactions that failed together (the two sides of a deadlock, the
/// Updates of a connection pool after a server restart) do not collide
/// again in lockstep. The total wait is bounded by
/// `(max_attempts - 1) * max_backoff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least one is always made).
    pub max_attempts: u32,
    /// The upper bound of the first wait.
    pub initial_backoff: Duration,
    /// The upper bound of every wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// Five attempts, waits bounded by 10 ms, 20 ms, 40 ms, 80 ms: about
    /// 150 ms of waiting at worst, enough to ride out a deadlock or a
    /// serialization conflict; a failover needs a longer policy.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// A policy of `max_attempts` attempts with the default backoff.
    pub fn attempts(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts,
            ..RetryPolicy::default()
        }
    }

    /// The upper bound of the wait after failed attempt `attempt` (1 is
    /// the first).
    pub fn backoff_cap(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff)
    }

    /// The wait after failed attempt `attempt`: uniform in
    /// `[0, backoff_cap(attempt)]`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let cap = self.backoff_cap(attempt);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(random_u64() % (nanos + 1))
    }
}

/// A random number, good enough for jitter: std's hasher keys are drawn
/// at random per `RandomState`, which spares a dependency on `rand`.
fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

impl<S: Store> ChatMachine<S> {
    /// Runs an Update (see [`ChatMachine::update`]) and runs it again, with
    /// a fresh callback from `make`, while it fails with an error that
    /// [`Error::is_retryable`], up to `policy.max_attempts` attempts in
    /// all. Returns the first success, or the last error (retryable or
    /// not), unchanged.
    ///
    /// Every failed attempt rolled back, so at most one attempt commits,
    /// and notifications are published for that one only. The callback
    /// must therefore be safe to run more than once: decide inside it from
    /// what the [`Tx`] shows (the chat may have changed between attempts),
    /// and keep side effects outside the store for after the result.
    ///
    /// ```
    /// # use chatstate::{ChatMachine, RetryPolicy, Store};
    /// # async fn f<S: Store>(chat: ChatMachine<S>) -> Result<(), chatstate::Error> {
    /// chat.update_with_retry(&RetryPolicy::default(), || async |tx| {
    ///     tx.record_generation_attempt().await
    /// })
    /// .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn update_with_retry<T, F>(
        &self,
        policy: &RetryPolicy,
        mut make: impl FnMut() -> F,
    ) -> Result<T, Error>
    where
        F: AsyncFnOnce(&mut Tx<'_, S>) -> Result<T, Error>,
    {
        let mut attempt = 1;
        loop {
            match self.update(make()).await {
                Err(e) if e.is_retryable() && attempt < policy.max_attempts => {
                    tokio::time::sleep(policy.backoff(attempt)).await;
                    attempt += 1;
                }
                done => return done,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_stays_within_it() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        };
        let caps: Vec<u64> = (1..=5)
            .map(|n| p.backoff_cap(n).as_millis() as u64)
            .collect();
        assert_eq!(caps, [10, 20, 40, 50, 50]);
        for attempt in 1..=40 {
            assert!(p.backoff(attempt) <= p.backoff_cap(attempt));
        }
        // Jitter: 64 draws of the same bound are not all equal.
        let draws: std::collections::BTreeSet<_> = (0..64).map(|_| p.backoff(3)).collect();
        assert!(draws.len() > 1, "{draws:?}");
        assert_eq!(
            RetryPolicy::attempts(3).backoff_cap(u32::MAX),
            Duration::from_secs(1)
        );
    }
}

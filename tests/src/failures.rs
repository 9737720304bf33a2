//! Failure edges on both stores: nested Updates of two chats in opposite
//! order deadlock, the store breaks the deadlock by failing one of them
//! with [`StoreErrorKind::Deadlock`] (Postgres after its
//! `deadlock_timeout`, the in-memory store when the cycle closes), the
//! other commits, and the failed one can be retried.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use chatstate::{ChatMachine, Error, RetryPolicy, Store, StoreErrorKind, TestControl};
use chatstate_model::ChatId;
use tokio::sync::Barrier;

use crate::Backend;
use crate::fixture::Fx;

/// Instantiates every failure-edge test as a `#[tokio::test]` for a
/// backend expression.
#[macro_export]
macro_rules! failure_suite {
    ($backend:expr) => {
        $crate::failure_suite!(@tests $backend;
            nested_updates_in_opposite_order_fail_one_with_deadlock,
            the_deadlocked_update_commits_when_retried,
        );
    };
    (@tests $backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::failures::$name(&$backend).await;
            }
        )*
    };
}

/// Runs an Update of `outer` that writes, waits at `barrier` (first
/// attempt only) while holding `outer`'s row lock, then runs a nested
/// Update of `inner`. With `retry` it runs under the retrying Update.
/// Returns the result and the number of attempts.
async fn crossing<S: Store>(
    outer: ChatMachine<S>,
    inner: ChatId,
    barrier: Arc<Barrier>,
    retry: bool,
) -> (Result<(), Error>, u32) {
    let attempts = Arc::new(AtomicU32::new(0));
    let make = || {
        let attempts = attempts.clone();
        let barrier = barrier.clone();
        async move |tx: &mut chatstate::Tx<'_, S>| {
            let first = attempts.fetch_add(1, Ordering::SeqCst) == 0;
            tx.record_generation_attempt().await?;
            if first {
                barrier.wait().await;
            }
            tx.update_nested(inner, async |n| n.record_generation_attempt().await)
                .await?;
            Ok(())
        }
    };
    let policy = RetryPolicy::attempts(if retry { 3 } else { 1 });
    let result = outer.update_with_retry(&policy, make).await;
    (result, attempts.load(Ordering::SeqCst))
}

async fn two_chats<B: Backend>(b: &B) -> (Fx<B::S>, ChatMachine<B::S>, ChatMachine<B::S>)
where
    B::S: TestControl,
{
    let fx = Fx::new(b.store().await);
    let a = fx.create().await;
    let c = fx.create().await;
    (fx, a, c)
}

/// Fails instead of hanging when the deadlock is never broken (a hang
/// guard: Postgres breaks it after one second).
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(30), f)
        .await
        .expect("the deadlock was never broken")
}

async fn snapshot<S: Store + TestControl>(m: &ChatMachine<S>) -> i64 {
    m.load().await.expect("load").row.versions.snapshot
}

/// Without retrying: exactly one of the two fails, with Deadlock (a
/// retryable error), and the other commits both of its chats.
pub async fn nested_updates_in_opposite_order_fail_one_with_deadlock<B: Backend>(b: &B) {
    let (_fx, a, c) = two_chats(b).await;
    let before = (snapshot(&a).await, snapshot(&c).await);
    let barrier = Arc::new(Barrier::new(2));
    let (ra, rc) = bounded(async {
        tokio::join!(
            tokio::spawn(crossing(a.clone(), c.chat_id(), barrier.clone(), false)),
            tokio::spawn(crossing(c.clone(), a.chat_id(), barrier, false)),
        )
    })
    .await;
    let results = [ra.unwrap(), rc.unwrap()];
    let failed: Vec<&Error> = results
        .iter()
        .filter_map(|(r, _)| r.as_ref().err())
        .collect();
    assert_eq!(failed.len(), 1, "{} : {results:?}", b.name());
    let Error::Store(e) = failed[0] else {
        panic!("{}: expected a store error, got {}", b.name(), failed[0]);
    };
    assert_eq!(e.kind, StoreErrorKind::Deadlock, "{}: {e}", b.name());
    assert!(failed[0].is_retryable());
    // The winner bumped both chats once; the loser's bump rolled back.
    assert_eq!(
        (snapshot(&a).await, snapshot(&c).await),
        (before.0 + 1, before.1 + 1),
        "{}",
        b.name()
    );
}

/// With the retrying Update both commit: the deadlocked one on its second
/// attempt, after the other released its locks.
pub async fn the_deadlocked_update_commits_when_retried<B: Backend>(b: &B) {
    let (_fx, a, c) = two_chats(b).await;
    let before = (snapshot(&a).await, snapshot(&c).await);
    let barrier = Arc::new(Barrier::new(2));
    let (ra, rc) = bounded(async {
        tokio::join!(
            tokio::spawn(crossing(a.clone(), c.chat_id(), barrier.clone(), true)),
            tokio::spawn(crossing(c.clone(), a.chat_id(), barrier, true)),
        )
    })
    .await;
    let (ra, rc) = (ra.unwrap(), rc.unwrap());
    ra.0.as_ref().expect("a commits");
    rc.0.as_ref().expect("c commits");
    let mut attempts = [ra.1, rc.1];
    attempts.sort();
    assert_eq!(attempts, [1, 2], "{}", b.name());
    let after = (snapshot(&a).await, snapshot(&c).await);
    assert_eq!(after, (before.0 + 2, before.1 + 2), "{}", b.name());
    let rec = a.load().await.unwrap();
    assert_eq!(rec.row.generation_attempt, 2, "each Update wrote once");
}

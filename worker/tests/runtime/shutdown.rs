//! A graceful shutdown hands its chats back: a handler that listens to
//! `stopping()` returns them at once, the others are aborted after the
//! grace period, and both Abandons publish hints another runtime claims
//! from (not from a sweep).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chatstate::{ExecutionState, Options};
use chatstate_worker::Runtime;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use crate::backend::{Backend, until};
use crate::handlers::{Hold, Turn};

const GRACE: Duration = Duration::from_millis(300);
const WAIT: Duration = Duration::from_secs(20);

async fn graceful_shutdown_hands_chats_back_to_another_runtime<B: Backend>() {
    let b = Arc::new(B::new().await);
    let options = Options::default();
    let polite = b.create("polite").await;
    let stubborn = b.create("stubborn").await;

    let (started, mut a_started) = mpsc::unbounded_channel();
    let a = Runtime::builder(b.store(), b.notify(), Hold { started })
        .options(options)
        .capacity(2)
        .grace(GRACE)
        .spawn()
        .unwrap();
    let mut held = HashSet::new();
    for _ in 0..2 {
        let s = timeout(WAIT, a_started.recv()).await.unwrap().unwrap();
        held.insert(s.chat);
    }
    assert_eq!(held, HashSet::from([polite, stubborn]));

    // The other runtime sweeps once, at start (both leases are fresh then),
    // and then only hears hints.
    let (done, mut turns) = mpsc::unbounded_channel();
    let other = Runtime::builder(b.store(), b.notify(), Turn { done })
        .options(options)
        .sweep_interval(Duration::from_secs(3600))
        .hints(b.hints().await)
        .spawn()
        .unwrap();
    until("the first sweep ran", || other.stats().sweeps > 0).await;

    let stopping = Instant::now();
    let a_stats = a.shutdown().await;
    let took = stopping.elapsed();
    assert_eq!(a_stats.handed_back, 2, "{a_stats:?}");
    assert!(
        took >= GRACE,
        "the stubborn handler had its grace: {took:?}"
    );

    let mut taken = HashSet::new();
    for _ in 0..2 {
        let (worker, chat, result) = timeout(WAIT, turns.recv()).await.unwrap().unwrap();
        result.unwrap();
        assert_eq!(worker, other.worker_id());
        taken.insert(chat);
    }
    assert_eq!(taken, held);
    let other_stats = other.shutdown().await;
    assert_eq!(
        other_stats.swept, 0,
        "claimed from the hints: {other_stats:?}"
    );
    assert_eq!(other_stats.claims_won, 2);
    for chat in [polite, stubborn] {
        let record = b.load(chat).await;
        assert_eq!(record.state(), ExecutionState::W);
        // Create, claim, hand back, claim, turn, release.
        assert_eq!(record.row.versions.snapshot, 6);
    }
    println!(
        "{}: shutdown took {took:?} (grace {GRACE:?}), handed back {}; the other runtime won {} from {} hints",
        std::any::type_name::<B>(),
        a_stats.handed_back,
        other_stats.claims_won,
        other_stats.hints,
    );
}

on_both_stores!(graceful_shutdown_hands_chats_back_to_another_runtime);

//! Two runtimes on one store share the work: every runnable chat is taken
//! by exactly one of them, and the claims they lose bump nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chatstate::{ExecutionState, Options};
use chatstate_worker::Runtime;
use tokio::sync::mpsc;

use crate::backend::Backend;
use crate::handlers::{OneStepAtATime, Turn};

/// Chats the API task creates.
const CHATS: usize = 24;

async fn every_runnable_chat_is_taken_by_exactly_one_runtime<B: Backend>() {
    let b = Arc::new(B::new().await);
    let (done, mut turns) = mpsc::unbounded_channel();
    let mut runtimes = Vec::new();
    // One runtime has room for every chat, so it tries every hint; the
    // other is small enough that hints are dropped at capacity and its
    // sweeps pick chats up. Every chat the small one tries, the big one
    // tries too, so at least one claim loses.
    for capacity in [CHATS, 4] {
        let runtime = Runtime::builder(b.store(), b.notify(), Turn { done: done.clone() })
            .options(Options::default())
            .capacity(capacity)
            .sweep_interval(Duration::from_millis(100))
            .hints(b.hints().await)
            .spawn()
            .unwrap();
        runtimes.push(runtime);
    }

    // The API side creates chats while both runtimes run.
    let api = tokio::spawn({
        let b = b.clone();
        async move {
            let mut chats = Vec::new();
            for i in 0..CHATS {
                chats.push(b.create(&format!("question {i}")).await);
            }
            chats
        }
    });
    let chats = api.await.unwrap();

    let mut taken = HashMap::new();
    for _ in 0..CHATS {
        let (worker, chat, result) = tokio::time::timeout(Duration::from_secs(60), turns.recv())
            .await
            .expect("every chat gets a turn")
            .unwrap();
        result.unwrap_or_else(|e| panic!("turn on {chat}: {e}"));
        assert!(
            taken.insert(chat, worker).is_none(),
            "{chat} was taken twice"
        );
    }
    let workers: Vec<_> = runtimes.iter().map(Runtime::worker_id).collect();
    let mut stats = Vec::new();
    for runtime in runtimes {
        stats.push(runtime.shutdown().await);
    }
    assert!(turns.try_recv().is_err(), "no chat was taken again");

    for chat in &chats {
        assert!(taken.contains_key(chat), "{chat} was never taken");
        let record = b.load(*chat).await;
        assert_eq!(record.state(), ExecutionState::W);
        assert_eq!(record.row.owner, None, "released after the turn");
        // Create 1, claim 2, the turn 3, the release 4: the claims that
        // lost moved nothing.
        assert_eq!(record.row.versions.snapshot, 4, "{chat}");
    }
    let won: u64 = stats.iter().map(|s| s.claims_won).sum();
    let lost: u64 = stats
        .iter()
        .map(|s| s.claims_held + s.claims_not_runnable)
        .sum();
    assert_eq!(won, CHATS as u64);
    for (worker, s) in workers.iter().zip(&stats) {
        let mine = taken.values().filter(|w| *w == worker).count() as u64;
        assert_eq!(s.claims_won, mine);
        assert_eq!(s.finished, mine);
        assert_eq!((s.leases_lost, s.handed_back, s.claims_failed), (0, 0, 0));
        println!(
            "{}: won {} lost {} (held {}, not runnable {}), skipped {}, hints {} (deduplicated {}, at capacity {}), sweeps {} found {}",
            std::any::type_name::<B>(),
            s.claims_won,
            s.claims_held + s.claims_not_runnable,
            s.claims_held,
            s.claims_not_runnable,
            s.claims_skipped,
            s.hints,
            s.hints_deduplicated,
            s.hints_at_capacity,
            s.sweeps,
            s.swept,
        );
    }
    // The big runtime hears every hint, so it tries every chat the small
    // one takes: each such try is skipped by the pre-check
    // (`claimable_among`) or loses its claim, committing nothing either way.
    let skipped: u64 = stats.iter().map(|s| s.claims_skipped).sum();
    assert!(
        lost + skipped > 0,
        "the big runtime tries every chat the small one tries"
    );
}

/// A handler that finishes while the chat is still runnable gets it again
/// at once: the release publishes a hint, which this runtime filters out
/// while it still holds the chat, so the chat is offered again when the
/// task ends (no hint source, no sweep needed).
async fn a_chat_released_runnable_is_claimed_again_at_once<B: Backend>() {
    let b = B::new().await;
    let chat = b.create("a long answer").await;
    let (calls, mut seen) = mpsc::unbounded_channel();
    let runtime = Runtime::builder(b.store(), b.notify(), OneStepAtATime { calls })
        .sweep_interval(Duration::from_secs(3600))
        .spawn()
        .unwrap();
    for expected in [ExecutionState::R0, ExecutionState::W] {
        let (got, step) = tokio::time::timeout(Duration::from_secs(20), seen.recv())
            .await
            .expect("the chat is claimed")
            .unwrap();
        assert_eq!((got, step.unwrap()), (chat, expected));
    }
    let stats = runtime.shutdown().await;
    assert_eq!(
        (stats.claims_won, stats.finished, stats.sweeps, stats.swept),
        (2, 2, 1, 1),
        "{stats:?}"
    );
    let record = b.load(chat).await;
    assert_eq!(record.state(), ExecutionState::W);
    // Create, claim, step, release, claim, end of turn, release.
    assert_eq!(record.row.versions.snapshot, 7);
}

on_both_stores!(
    every_runnable_chat_is_taken_by_exactly_one_runtime,
    a_chat_released_runnable_is_claimed_again_at_once,
);

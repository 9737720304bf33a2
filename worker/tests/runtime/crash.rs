//! A runtime that dies mid-handler writes nothing more: its heartbeat
//! task stops with it, its lease goes stale, and the other runtime's sweep
//! re-owns the chat within `heartbeat_stale` + the sweep interval.

use std::sync::Arc;
use std::time::Duration;

use chatstate::Options;
use chatstate_worker::Runtime;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use crate::backend::{Backend, until};
use crate::handlers::Hold;

const STALE: Duration = Duration::from_secs(2);
const HEARTBEAT: Duration = Duration::from_millis(300);
const SWEEP: Duration = Duration::from_millis(200);

/// Slack for a loaded machine on top of the protocol's bounds.
const SLACK: Duration = Duration::from_secs(3);

async fn a_crashed_runtimes_chat_is_re_owned_after_its_lease_goes_stale<B: Backend>() {
    let b = Arc::new(B::new().await);
    let options = Options {
        heartbeat_stale: STALE,
        ..Options::default()
    };
    let runtime = |started| {
        let b = b.clone();
        async move {
            Runtime::builder(b.store(), b.notify(), Hold { started })
                .options(options)
                .heartbeat_interval(HEARTBEAT)
                .sweep_interval(SWEEP)
                .grace(Duration::from_millis(50))
                .hints(b.hints().await)
                .spawn()
                .unwrap()
        }
    };
    let chat = b.create("work").await;
    let (started_a, mut a_started) = mpsc::unbounded_channel();
    let a = runtime(started_a).await;
    let held = timeout(SLACK, a_started.recv()).await.unwrap().unwrap();
    assert_eq!((held.chat, held.worker), (chat, a.worker_id()));

    // The second runtime starts while the lease is fresh: its first sweep
    // finds nothing to claim.
    let (started_b, mut b_started) = mpsc::unbounded_channel();
    let b_runtime = runtime(started_b).await;
    until("the second runtime swept", || b_runtime.stats().sweeps > 0).await;
    if !b.injected_clock() {
        // In real time, heartbeats keep the lease fresh for longer than
        // `heartbeat_stale` while the other runtime sweeps.
        let beats = (STALE.as_millis() / HEARTBEAT.as_millis()) as u64 + 1;
        until("the lease outlived heartbeat_stale", || {
            a.stats().heartbeats >= beats
        })
        .await;
    }
    assert!(b_started.try_recv().is_err(), "a fresh lease is not taken");
    assert_eq!(b_runtime.stats().claims_won, 0);

    let crashed_at = Instant::now();
    let a_stats = a.abort();
    timeout(SLACK, held.heartbeat.clone().stopped())
        .await
        .expect("the crashed runtime's heartbeat task stops");

    // Store time: injected on the in-memory store, real on Postgres.
    let stale_from = if b.injected_clock() {
        b.age_leases(STALE).await;
        Instant::now()
    } else {
        crashed_at
    };
    let taken = timeout(STALE + SWEEP + SLACK, b_started.recv())
        .await
        .expect("the chat is re-owned")
        .unwrap();
    let re_owned = taken.at - stale_from;
    assert_eq!((taken.chat, taken.worker), (chat, b_runtime.worker_id()));
    if b.injected_clock() {
        assert!(re_owned <= SWEEP + SLACK, "{re_owned:?}");
    } else {
        // Not before the lease was stale: its last heartbeat was at most
        // one interval before the crash.
        assert!(re_owned >= STALE - HEARTBEAT, "{re_owned:?}");
        assert!(re_owned <= STALE + SWEEP + SLACK, "{re_owned:?}");
    }

    let record = b.load(chat).await;
    assert_eq!(
        record.row.owner.map(|o| o.worker_id),
        Some(b_runtime.worker_id())
    );
    // Create 1, the first claim 2, the takeover 3: the crash wrote nothing.
    assert_eq!(record.row.versions.snapshot, 3);
    let b_stats = b_runtime.shutdown().await;
    assert_eq!(b_stats.claims_won, 1);
    println!(
        "{}: re-owned {re_owned:?} after the lease {} (stale {STALE:?}, sweep {SWEEP:?}); crashed runtime: {} heartbeats; taker: {} sweeps",
        std::any::type_name::<B>(),
        if b.injected_clock() {
            "was aged stale"
        } else {
            "holder crashed"
        },
        a_stats.heartbeats,
        b_stats.sweeps,
    );
}

on_both_stores!(a_crashed_runtimes_chat_is_re_owned_after_its_lease_goes_stale);

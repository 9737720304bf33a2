//! Discovery and claims on Postgres: `claimable` skips rows other
//! transactions hold instead of waiting, claims and heartbeats cost what
//! the lean path promises, and heartbeat rows stay bounded by the chats
//! owned.

use std::time::Duration;

use chatstate::{Claim, Ending, LeaseStatus, Store, TestControl};
use chatstate_model::{RunnerId, WorkerId};
use tokio::sync::oneshot;

use crate::common::{fx, snapshot_version};

/// A hang guard for operations that must complete without waiting for
/// anyone (a failure deadline, never a way to let something happen).
const GUARD: Duration = Duration::from_secs(30);

#[tokio::test]
async fn claimable_skips_rows_held_by_an_update_or_a_read_lock() {
    let fx = fx().await;
    let updated = fx.create().await;
    let read = fx.create().await;
    let free = fx.create().await;
    let all = fx.store.claimable(&fx.options, 10).await.unwrap();
    assert_eq!(all, [updated.id, read.id, free.id], "oldest first");
    // An open Update holds one row (FOR NO KEY UPDATE), an open ReadLock
    // another (FOR SHARE).
    let (held_tx, held) = oneshot::channel();
    let (go, go_rx) = oneshot::channel::<()>();
    let (m1, m2) = (fx.machine(updated.id), fx.machine(read.id));
    let task = tokio::spawn(async move {
        m1.update(async move |tx| {
            tx.record_generation_attempt().await?;
            m2.read_lock(async move |_| {
                held_tx.send(()).unwrap();
                go_rx.await.unwrap();
                Ok(())
            })
            .await
        })
        .await
    });
    held.await.unwrap();
    let got = tokio::time::timeout(GUARD, fx.store.claimable(&fx.options, 10))
        .await
        .expect("claimable waited for a row lock")
        .unwrap();
    assert_eq!(got, [free.id]);
    // Held rows do not count towards the limit.
    let got = fx.store.claimable(&fx.options, 1).await.unwrap();
    assert_eq!(got, [free.id]);
    assert_eq!(fx.store.lock_waiters().await.unwrap(), 0);
    go.send(()).unwrap();
    task.await.unwrap().unwrap();
    // Once the locks are gone, so is the skip. The Update wrote the row, so
    // its chat is now the youngest.
    assert_eq!(
        fx.store.claimable(&fx.options, 10).await.unwrap(),
        [read.id, free.id, updated.id]
    );
}

#[tokio::test]
async fn claims_and_heartbeats_cost_what_the_lean_path_promises() {
    let fx = fx().await;
    let chat = fx.create().await;
    let m = fx.machine(chat.id);
    let (w1, r1) = (WorkerId::new_random(), RunnerId::new_random());
    let (w2, r2) = (WorkerId::new_random(), RunnerId::new_random());
    let before = fx.store.round_trips();
    assert!(matches!(
        m.try_acquire(w1, r1).await.unwrap(),
        Claim::Won { .. }
    ));
    assert_eq!(fx.store.round_trips() - before, 3, "a won claim");
    let version = snapshot_version(fx.store.pool(), chat.id).await;
    let before = fx.store.round_trips();
    assert!(matches!(
        m.try_acquire(w2, r2).await.unwrap(),
        Claim::Held { .. }
    ));
    assert_eq!(fx.store.round_trips() - before, 2, "a lost claim");
    assert_eq!(
        snapshot_version(fx.store.pool(), chat.id).await,
        version,
        "a lost claim bumped"
    );
    let before = fx.store.round_trips();
    assert_eq!(m.heartbeat(r1).await.unwrap(), LeaseStatus::Held);
    assert!(matches!(
        m.heartbeat(r2).await.unwrap(),
        LeaseStatus::Lost { .. }
    ));
    assert_eq!(fx.store.round_trips() - before, 2, "one per heartbeat");
    let before = fx.store.round_trips();
    fx.store.claimable(&fx.options, 100).await.unwrap();
    assert_eq!(fx.store.round_trips() - before, 1, "one per sweep");
    assert_eq!(snapshot_version(fx.store.pool(), chat.id).await, version);
}

/// Heartbeat rows per chat, counted by the server.
async fn rows_per_chat(pool: &sqlx::PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT count(*) FROM chat_heartbeats GROUP BY chat_id ORDER BY chat_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn heartbeat_rows_stay_one_per_owned_chat_across_takeovers() {
    let fx = fx().await;
    let chats = [fx.create().await, fx.create().await];
    let mut runners: Vec<RunnerId> = Vec::new();
    for round in 0..6 {
        runners.clear();
        for chat in &chats {
            let m = fx.machine(chat.id);
            let (w, r) = (WorkerId::new_random(), RunnerId::new_random());
            // Alternate claims of stale leases and unconditional takeovers.
            if round % 2 == 0 {
                assert!(matches!(
                    m.try_acquire(w, r).await.unwrap(),
                    Claim::Won { .. }
                ));
            } else {
                m.update(async |tx| tx.acquire(w, r).await).await.unwrap();
            }
            assert_eq!(m.heartbeat(r).await.unwrap(), LeaseStatus::Held);
            runners.push(r);
        }
        assert_eq!(
            rows_per_chat(fx.store.pool()).await,
            [1, 1],
            "round {round}"
        );
        fx.store
            .advance_clock(Duration::from_secs(31))
            .await
            .unwrap();
    }
    // A takeover that rolls back deletes nothing.
    let m = fx.machine(chats[0].id);
    let (w, r) = (WorkerId::new_random(), RunnerId::new_random());
    m.update_or_skip(async |tx| {
        tx.acquire(w, r).await?;
        Ok(Ending::Skip(()))
    })
    .await
    .unwrap();
    assert_eq!(rows_per_chat(fx.store.pool()).await, [1, 1]);
    assert_eq!(m.heartbeat(runners[0]).await.unwrap(), LeaseStatus::Held);
    for chat in &chats {
        fx.machine(chat.id)
            .update(async |tx| tx.abandon().await)
            .await
            .unwrap();
    }
    assert!(rows_per_chat(fx.store.pool()).await.is_empty());
    assert_eq!(fx.store.heartbeat_rows().await.unwrap(), 0);
}

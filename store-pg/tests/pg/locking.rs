//! Row locks: heartbeats never wait for an open Update; Lock excludes
//! Update; ReadLocks share and exclude Update; concurrent Updates each see
//! what the previous one committed.

use std::time::{Duration, Instant};

use chatstate::{BusyBehavior, ChatMachine, Error, LeaseStatus};
use chatstate_model::{NewMessage, RunnerId, WorkerId};
use chatstate_store_pg::PgStore;
use tokio::sync::{mpsc, oneshot};

use crate::common::{fx, snapshot_version};

/// A hang guard for operations that must complete without waiting for
/// anyone (a failure deadline, never a way to let something happen).
const GUARD: Duration = Duration::from_secs(30);

/// Returns once `n` transactions of the store's database wait for a lock.
/// It polls the server's own view of lock waits, so it depends on no
/// timing: it fails only if nobody ever blocks.
async fn until_lock_waiters(store: &PgStore, n: usize) {
    let deadline = Instant::now() + GUARD;
    while store.lock_waiters().await.unwrap() < n {
        assert!(
            Instant::now() < deadline,
            "no transaction ever waited for the lock"
        );
        tokio::task::yield_now().await;
    }
}

/// Spawns an Update that reports entering its callback on `entered`.
fn spawn_update(
    m: ChatMachine<PgStore>,
    entered: mpsc::UnboundedSender<()>,
) -> tokio::task::JoinHandle<Result<(), Error>> {
    tokio::spawn(async move {
        m.update(async move |tx| {
            entered.send(()).unwrap();
            tx.record_generation_attempt().await?;
            Ok(())
        })
        .await
    })
}

#[tokio::test]
async fn heartbeat_does_not_wait_for_an_open_update() {
    let fx = fx().await;
    let chat = fx.create().await;
    // Only the chat's runner's heartbeat is written: take the chat first.
    let (worker, runner) = (WorkerId::new_random(), RunnerId::new_random());
    fx.machine(chat.id)
        .update(async |tx| tx.acquire(worker, runner).await)
        .await
        .unwrap();
    let (entered_tx, entered) = oneshot::channel();
    let (go, go_rx) = oneshot::channel::<()>();
    let m = fx.machine(chat.id);
    let task = tokio::spawn(async move {
        m.update(async move |tx| {
            // A write of the chat row: the lock is FOR NO KEY UPDATE.
            tx.record_generation_attempt().await?;
            entered_tx.send(()).unwrap();
            go_rx.await.unwrap();
            Ok(())
        })
        .await
    });
    entered.await.unwrap();
    // The upsert's foreign-key check takes FOR KEY SHARE on the chat row,
    // which does not conflict with the open Update's lock.
    let beat = tokio::time::timeout(GUARD, fx.machine(chat.id).heartbeat(runner))
        .await
        .expect("the heartbeat waited for the open Update");
    assert_eq!(beat.unwrap(), LeaseStatus::Held);
    go.send(()).unwrap();
    task.await.unwrap().unwrap();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM chat_heartbeats WHERE chat_id = $1 AND runner_id = $2",
    )
    .bind(chat.id.0)
    .bind(runner.0)
    .fetch_one(fx.store.pool())
    .await
    .unwrap();
    assert_eq!(n, 1);
    // And a heartbeat for a missing chat is "gone", not an FK error.
    let missing = fx.machine(chatstate_model::ChatId::new_random());
    assert_eq!(
        missing.heartbeat(runner).await.unwrap(),
        LeaseStatus::ChatGone
    );
}

#[tokio::test]
async fn lock_blocks_a_concurrent_update_until_it_ends() {
    let fx = fx().await;
    let chat = fx.create().await;
    let before = snapshot_version(fx.store.pool(), chat.id).await;
    let (held_tx, held) = oneshot::channel();
    let (release, release_rx) = oneshot::channel::<()>();
    let m = fx.machine(chat.id);
    let lock = tokio::spawn(async move {
        m.lock(async move |_| {
            held_tx.send(()).unwrap();
            release_rx.await.unwrap();
            Ok(())
        })
        .await
    });
    held.await.unwrap();

    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let update = spawn_update(fx.machine(chat.id), entered_tx);
    until_lock_waiters(&fx.store, 1).await;
    assert!(entered.try_recv().is_err(), "the Update ran under the Lock");

    release.send(()).unwrap();
    lock.await.unwrap().unwrap();
    update.await.unwrap().unwrap();
    assert!(entered.try_recv().is_ok());
    assert_eq!(snapshot_version(fx.store.pool(), chat.id).await, before + 1);
}

#[tokio::test]
async fn read_locks_share_and_exclude_updates() {
    let fx = fx().await;
    let chat = fx.create().await;
    let (held_tx, held) = oneshot::channel();
    let (release, release_rx) = oneshot::channel::<()>();
    let m = fx.machine(chat.id);
    let first = tokio::spawn(async move {
        m.read_lock(async move |r| {
            held_tx.send(()).unwrap();
            release_rx.await.unwrap();
            Ok(r.state())
        })
        .await
    });
    held.await.unwrap();

    // A second ReadLock runs to completion while the first is held.
    let second = tokio::time::timeout(
        GUARD,
        fx.machine(chat.id).read_lock(async |r| r.load().await),
    )
    .await
    .expect("a ReadLock waited for another ReadLock");
    second.unwrap();

    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let update = spawn_update(fx.machine(chat.id), entered_tx);
    until_lock_waiters(&fx.store, 1).await;
    assert!(
        entered.try_recv().is_err(),
        "the Update ran under a ReadLock"
    );

    release.send(()).unwrap();
    first.await.unwrap().unwrap();
    update.await.unwrap().unwrap();
    assert!(entered.try_recv().is_ok());
}

/// Each Update must see what the one before it committed, even when it
/// waited for the row lock: a stale queue would reuse queue lengths.
#[tokio::test]
async fn concurrent_updates_each_see_the_previous_commit() {
    let fx = fx().await;
    let chat = fx.create().await;
    const N: usize = 8;
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let m = fx.machine(chat.id);
            tokio::spawn(async move {
                m.update(async move |tx| {
                    let seen = tx.snapshot().queue.len();
                    tx.send_message(NewMessage::user(format!("m{i}")), BusyBehavior::Queue)
                        .await?;
                    Ok(seen)
                })
                .await
            })
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap().unwrap());
    }
    seen.sort();
    assert_eq!(seen, (0..N).collect::<Vec<_>>());
    let rec = fx.machine(chat.id).load().await.unwrap();
    assert_eq!(rec.queue.len(), N);
    assert_eq!(rec.row.versions.snapshot, 1 + N as i64);
}

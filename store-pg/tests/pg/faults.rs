//! Faults: a backend killed in the middle of an Update, a cancelled Update
//! future, Invalid rows.

use chatstate::{Error, StoreErrorKind};
use chatstate_model::{ChatStatus, ExecutionState, RejectionKind};
use chatstate_store_pg::{ListenerEvent, PgNotifyListener, PgStore};
use sqlx::PgPool;
use tokio::sync::oneshot;

use crate::common::{Step, fx, next, send_marker, snapshot_version};

/// The backend of the one transaction of this database that is idle in
/// a transaction (the Update paused in its callback).
async fn idle_in_transaction_pid(pool: &PgPool) -> i32 {
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
          WHERE datname = current_database() AND state = 'idle in transaction' \
            AND pid <> pg_backend_pid()",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(pids.len(), 1, "exactly one open transaction: {pids:?}");
    pids[0]
}

async fn terminate(pool: &PgPool, pid: i32) {
    // With a timeout, pg_terminate_backend waits until the backend is gone.
    let gone: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 10000)")
        .bind(pid)
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(gone, "backend {pid} did not exit");
}

#[tokio::test]
async fn killed_backend_fails_the_update_applies_and_publishes_nothing() {
    let fx = fx().await;
    // Owned with a fresh lease, so Updates publish no ownership hints.
    let chat = fx.reach(&[Step::Acquire], ExecutionState::R0).await;
    let pool = fx.store.pool().clone();
    let mut listener = PgNotifyListener::connect(&pool).await.unwrap();
    listener.listen_chats([chat.id]).await.unwrap();
    listener.listen_ownership().await.unwrap();

    // Killed before a write, and killed before the commit.
    for write_after_kill in [true, false] {
        let before = snapshot_version(&pool, chat.id).await;
        let (entered_tx, entered) = oneshot::channel();
        let (killed, killed_rx) = oneshot::channel::<()>();
        let m = fx.machine_in_tx(chat.id);
        let task = tokio::spawn(async move {
            m.update(async move |tx| {
                if !write_after_kill {
                    tx.record_generation_attempt().await?;
                }
                entered_tx.send(()).unwrap();
                killed_rx.await.unwrap();
                if write_after_kill {
                    tx.record_generation_attempt().await?;
                }
                Ok(())
            })
            .await
        });
        entered.await.unwrap();
        let pid = idle_in_transaction_pid(&pool).await;
        terminate(&pool, pid).await;
        killed.send(()).unwrap();
        let err = task.await.unwrap().unwrap_err();
        let Error::Store(e) = &err else {
            panic!("expected a store error, got {err}");
        };
        assert_eq!(e.kind, StoreErrorKind::Connection, "{e:?}");
        assert_eq!(
            snapshot_version(&pool, chat.id).await,
            before,
            "nothing applied"
        );

        // Nothing published: a marker sent now is the first thing heard.
        let marker = send_marker(&pool, before).await;
        assert_eq!(
            next(&mut listener).await,
            ListenerEvent::Notification(marker)
        );

        fx.machine_in_tx(chat.id)
            .update(async |tx| tx.record_generation_attempt().await)
            .await
            .expect("the next Update works");
        let event = next(&mut listener).await;
        let ListenerEvent::Notification(n) = event else {
            panic!("unexpected {event:?}");
        };
        assert_eq!(
            n.snapshot_version(),
            before + 1,
            "only the next Update published"
        );
        assert_eq!(snapshot_version(&pool, chat.id).await, before + 1);
    }
}

#[tokio::test]
async fn a_dropped_update_future_rolls_back_and_the_pool_stays_usable() {
    let fx = fx().await;
    let chat = fx.create().await;
    // One connection only: a connection returned to the pool with an open
    // transaction would be the next Update's.
    let pool = chatstate_store_pg::pool_options()
        .max_connections(1)
        .connect_with((*fx.store.pool().connect_options()).clone())
        .await
        .unwrap();
    let store = PgStore::new(pool.clone());
    let machine = chatstate::ChatMachine::new(
        store.clone(),
        chatstate::Notify::InTransaction,
        chat.id,
        fx.options,
    );
    let before = snapshot_version(fx.store.pool(), chat.id).await;

    let (entered_tx, entered) = oneshot::channel();
    let m = machine.clone();
    let task = tokio::spawn(async move {
        m.update(async move |tx| {
            tx.record_generation_attempt().await?;
            entered_tx.send(()).unwrap();
            std::future::pending::<()>().await;
            Ok(())
        })
        .await
    });
    entered.await.unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());

    // The next Update gets a working connection, and the cancelled one's
    // bump and write are gone.
    for _ in 0..3 {
        machine
            .update(async |tx| tx.record_generation_attempt().await)
            .await
            .unwrap();
    }
    let rec = machine.load().await.unwrap();
    assert_eq!(rec.row.versions.snapshot, before + 3);
    assert_eq!(rec.row.generation_attempt, 3);
}

#[tokio::test]
async fn paused_rows_are_invalid_and_reconcile_into_e0_or_e1() {
    let fx = fx().await;
    for (steps, landed) in [
        (&[Step::RawPaused][..], ExecutionState::E0),
        (&[Step::Queue, Step::RawPaused][..], ExecutionState::E1),
    ] {
        let chat = fx.reach(steps, ExecutionState::Invalid).await;
        let m = fx.machine(chat.id);
        let rec = m.load().await.unwrap();
        assert_eq!(rec.row.status, ChatStatus::Other("paused".into()));

        let err = m
            .update(async |tx| tx.record_generation_attempt().await)
            .await
            .unwrap_err();
        assert_eq!(
            err.rejection().map(|r| r.kind.clone()),
            Some(RejectionKind::InvalidState)
        );
        let out = m
            .update(async |tx| tx.reconcile_invalid_state(None, None).await)
            .await
            .unwrap();
        assert_eq!((out.from, out.to), (ExecutionState::Invalid, landed));
        assert_eq!(m.load().await.unwrap().state(), landed);
    }
}

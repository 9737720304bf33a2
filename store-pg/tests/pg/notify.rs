//! In-transaction notifications (NOTIFY) and the listener: delivered only
//! after commit, never on rollback, in commit order; a killed listener
//! reconnects and its receiver can detect the gap.

use chatstate::{Error, HighWaterMark};
use chatstate_model::{ChatId, Notification};
use chatstate_store_pg::{LISTENER_APPLICATION_NAME, ListenerEvent, PgNotifyListener};
use tokio::sync::oneshot;

use crate::common::{Step, fx, next, send_marker};

/// The next `chat:update`, skipping ownership hints of `chat`.
async fn next_update(listener: &mut PgNotifyListener, chat: ChatId) -> ListenerEvent {
    loop {
        match next(listener).await {
            ListenerEvent::Notification(Notification::Ownership(h)) if h.chat_id == chat => {}
            other => return other,
        }
    }
}

fn snapshot_of(event: &ListenerEvent) -> i64 {
    match event {
        ListenerEvent::Notification(n @ Notification::Update { .. }) => n.snapshot_version(),
        other => panic!("expected a chat:update, got {other:?}"),
    }
}

#[tokio::test]
async fn delivered_only_after_commit_never_on_rollback_in_commit_order() {
    let fx = fx().await;
    let chat = fx.create().await;
    let pool = fx.store.pool().clone();
    let mut listener = PgNotifyListener::connect(&pool).await.unwrap();
    listener.listen_ownership().await.unwrap();
    listener.listen_chats([chat.id]).await.unwrap();

    // An Update paused inside its callback, after a transition.
    let (entered_tx, entered) = oneshot::channel();
    let (go, go_rx) = oneshot::channel::<()>();
    let m = fx.machine_in_tx(chat.id);
    let task = tokio::spawn(async move {
        m.update(async move |tx| {
            tx.record_generation_attempt().await?;
            entered_tx.send(()).unwrap();
            go_rx.await.unwrap();
            Ok(())
        })
        .await
    });
    entered.await.unwrap();
    let marker = send_marker(&pool, 1).await;
    assert_eq!(
        next(&mut listener).await,
        ListenerEvent::Notification(marker),
        "the open Update published nothing"
    );
    go.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(snapshot_of(&next_update(&mut listener, chat.id).await), 2);

    // A callback error rolls back: nothing is delivered.
    let m = fx.machine_in_tx(chat.id);
    let err = m
        .update(async |tx| -> Result<(), Error> {
            tx.record_generation_attempt().await?;
            Err(Error::callback("changed my mind"))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Callback(_)));
    let marker = send_marker(&pool, 2).await;
    assert_eq!(
        next_update(&mut listener, chat.id).await,
        ListenerEvent::Notification(marker)
    );

    // Concurrent Updates on one chat: delivered in commit order, which is
    // lock order, so the snapshot versions arrive strictly increasing.
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let m = fx.machine_in_tx(chat.id);
            tokio::spawn(async move { m.update(async |_| Ok(())).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 6 {
        seen.push(snapshot_of(&next_update(&mut listener, chat.id).await));
    }
    assert_eq!(seen, (3..=8).collect::<Vec<i64>>());
}

#[tokio::test]
async fn killed_listener_reconnects_and_the_receiver_sees_the_gap() {
    let fx = fx().await;
    // Owned with a fresh lease: no ownership hints, only updates.
    let chat = fx
        .reach(&[Step::Acquire], chatstate_model::ExecutionState::R0)
        .await;
    let pool = fx.store.pool().clone();
    let mut listener = PgNotifyListener::connect(&pool).await.unwrap();
    listener.listen_chats([chat.id]).await.unwrap();
    let m = fx.machine_in_tx(chat.id);
    let mut hwm = HighWaterMark::new();

    m.update(async |_| Ok(())).await.unwrap();
    let ListenerEvent::Notification(first) = next(&mut listener).await else {
        panic!("expected a notification");
    };
    assert!(hwm.accept(&first));
    let mark = hwm.mark(chat.id);

    // Kill the listener's session and wait until it is gone.
    let pid: i32 = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
          WHERE application_name = $1 AND datname = current_database()",
    )
    .bind(LISTENER_APPLICATION_NAME)
    .fetch_one(&pool)
    .await
    .unwrap();
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 10000)")
        .bind(pid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(killed);

    // Committed while nobody listens: lost.
    m.update(async |_| Ok(())).await.unwrap();
    assert_eq!(next(&mut listener).await, ListenerEvent::Reconnected);
    m.update(async |_| Ok(())).await.unwrap();
    let ListenerEvent::Notification(after) = next(&mut listener).await else {
        panic!("expected a notification after the reconnect");
    };
    let version = after.snapshot_version();
    assert!(hwm.accept(&after));
    assert_eq!(version, mark + 2);
    assert!(
        version > mark + 1,
        "the receiver detects the missed snapshot"
    );
}

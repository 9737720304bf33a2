//! The listener's `recv` is cancel-safe: raced against short timeouts in
//! `tokio::select!` while its backend is killed, it still reports the
//! reconnect before any notification that follows it, and loses none of
//! those.

use std::time::{Duration, Instant};

use chatstate_model::ExecutionState;
use chatstate_store_pg::{LISTENER_APPLICATION_NAME, ListenerEvent, PgNotifyListener};

use crate::common::{GUARD, Step, fx, next, snapshot_version};

#[tokio::test]
async fn recv_cancelled_again_and_again_still_reports_the_reconnect() {
    let fx = fx().await;
    // Owned with a fresh lease: Updates publish no ownership hints.
    let chat = fx.reach(&[Step::Acquire], ExecutionState::R0).await;
    let pool = fx.store.pool().clone();
    let mut listener = PgNotifyListener::connect(&pool).await.unwrap();
    listener.listen_chats([chat.id]).await.unwrap();
    let m = fx.machine_in_tx(chat.id);
    m.update(async |_| Ok(())).await.unwrap();
    assert!(matches!(
        next(&mut listener).await,
        ListenerEvent::Notification(_)
    ));

    let killed: bool = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity \
          WHERE application_name = $1 AND datname = current_database()",
    )
    .bind(LISTENER_APPLICATION_NAME)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(killed);

    // Every `recv` is raced against a timeout of 0.2 to 3 ms, shorter
    // than a reconnect takes, so most calls are cancelled, many in the
    // middle of noticing the loss or of reconnecting. Updates keep
    // committing meanwhile: a reconnect that went unreported would show
    // as a notification without a Reconnected before it.
    let deadline = Instant::now() + GUARD;
    let mut reconnected = false;
    let mut awaited = None;
    let mut round = 0u64;
    loop {
        assert!(
            Instant::now() < deadline,
            "no Reconnected (reconnected: {reconnected})"
        );
        round += 1;
        let wait = Duration::from_micros(200 + 300 * (round % 10));
        tokio::select! {
            event = listener.recv() => match event {
                Ok(ListenerEvent::Reconnected) => {
                    assert!(!reconnected, "one reconnect, reported once");
                    reconnected = true;
                    m.update(async |_| Ok(())).await.unwrap();
                    awaited = Some(snapshot_version(&pool, chat.id).await);
                }
                Ok(ListenerEvent::Notification(n)) => {
                    assert!(
                        reconnected,
                        "notification {} arrived after the kill without a Reconnected",
                        n.snapshot_version()
                    );
                    if Some(n.snapshot_version()) == awaited {
                        break;
                    }
                }
                Ok(other) => panic!("unexpected {other:?}"),
                // A reconnect attempt failed; the next call tries again.
                Err(_) => {}
            },
            () = tokio::time::sleep(wait) => {}
        }
        if !reconnected && round.is_multiple_of(20) {
            m.update(async |_| Ok(())).await.unwrap();
        }
    }
}

//! Lost hints: a Postgres listener that reconnects reports the gap, and
//! the runtime sweeps at once for what it may have missed.

use std::time::Duration;

use chatstate_store_pg::LISTENER_APPLICATION_NAME;
use chatstate_worker::Runtime;
use tokio::sync::mpsc;

use crate::backend::{Backend, Pg, until};
use crate::handlers::Turn;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_reconnect_makes_the_runtime_sweep_pg() {
    let b = Pg::new().await;
    let (done, mut turns) = mpsc::unbounded_channel();
    let runtime = Runtime::builder(b.store(), b.notify(), Turn { done })
        .sweep_interval(Duration::from_secs(3600))
        .hints(b.hints().await)
        .spawn()
        .unwrap();
    until("the first sweep ran", || runtime.stats().sweeps == 1).await;

    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity \
          WHERE application_name = $1 AND datname = current_database()",
    )
    .bind(LISTENER_APPLICATION_NAME)
    .fetch_all(b.store().pool())
    .await
    .unwrap();
    assert_eq!(killed, [true]);
    // Created around the reconnect: its hint may be lost, the sweep that
    // follows the reconnect is not.
    let chat = b.create("meanwhile").await;
    until("the reconnect made it sweep", || {
        runtime.stats().sweeps >= 2
    })
    .await;
    let (_, got, result) = tokio::time::timeout(Duration::from_secs(20), turns.recv())
        .await
        .expect("the chat is taken")
        .unwrap();
    result.unwrap();
    assert_eq!(got, chat);
    runtime.shutdown().await;
}

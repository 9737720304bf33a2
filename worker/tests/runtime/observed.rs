//! The runtime tells its observer about every Update it makes: the claim,
//! the handler's steps and the release, in snapshot order, with the
//! handler's steps fenced by the lease's runner.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatstate::{ChatChange, CommitObserver, CommitReport, Transition};
use chatstate_worker::Runtime;
use tokio::sync::mpsc;

use crate::backend::Backend;
use crate::handlers::Turn;

#[derive(Default)]
struct Keep(Mutex<Vec<ChatChange>>);

impl CommitObserver for Keep {
    fn commit_ended(&self, report: &CommitReport<'_>) {
        assert!(report.result.is_ok(), "{:?}", report.result);
        self.0
            .lock()
            .expect("changes")
            .extend(report.changes.iter().cloned());
    }
}

async fn the_observer_sees_every_update_of_the_runtime<B: Backend>() {
    let b = B::new().await;
    let keep = Arc::new(Keep::default());
    let (done, mut turns) = mpsc::unbounded_channel();
    let runtime = Runtime::builder(b.store(), b.notify(), Turn { done })
        .observer(keep.clone())
        .hints(b.hints().await)
        .spawn()
        .unwrap();
    let chat = b.create("observe me").await;
    let (_, turned, result) = tokio::time::timeout(Duration::from_secs(20), turns.recv())
        .await
        .expect("the chat gets a turn")
        .unwrap();
    assert_eq!(turned, chat);
    result.unwrap();
    let stats = runtime.shutdown().await;
    assert_eq!(stats.claims_won, 1);

    let changes = std::mem::take(&mut *keep.0.lock().unwrap());
    let seen: Vec<(i64, Vec<Transition>)> = changes
        .iter()
        .map(|c| {
            assert_eq!(c.chat_id, chat);
            let ts = c.calls.iter().map(|c| c.input.transition()).collect();
            (c.snapshot_version, ts)
        })
        .collect();
    assert_eq!(
        seen,
        [
            (2, vec![Transition::Acquire]),
            (3, vec![Transition::CommitStep, Transition::FinishTurn]),
            (4, vec![Transition::Abandon]),
        ]
    );
    let runner = changes[0].end.row.owner.expect("claimed").runner_id;
    assert!(
        changes[1].calls.iter().all(|c| c.fence == Some(runner)),
        "the handler's steps are fenced by the lease's runner"
    );
    assert_eq!(b.load(chat).await.row.versions.snapshot, 4);
}

on_both_stores!(the_observer_sees_every_update_of_the_runtime);

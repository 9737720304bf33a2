//! Handlers the tests run, each reporting what it saw on a channel.

use std::sync::Arc;

use chatstate::{ChatId, Error, ExecutionState, NewMessage, Part, Store, WorkerId};
use chatstate_worker::{Handler, HeartbeatWatch, Lease, Released};
use tokio::sync::{Notify, mpsc};

/// What a handler reports when it starts on a chat.
#[derive(Debug)]
pub(crate) struct Started {
    pub(crate) chat: ChatId,
    pub(crate) worker: WorkerId,
    pub(crate) heartbeat: HeartbeatWatch,
    pub(crate) at: tokio::time::Instant,
}

fn started<S: Store>(lease: &Lease<S>) -> Started {
    Started {
        chat: lease.chat_id(),
        worker: lease.owner().worker_id,
        heartbeat: lease.heartbeat_watch(),
        at: tokio::time::Instant::now(),
    }
}

/// One whole turn: read the history, commit a step and end the turn in
/// one Update (the chat lands in W), then report.
pub(crate) struct Turn {
    pub(crate) done: mpsc::UnboundedSender<(WorkerId, ChatId, Result<(), Error>)>,
}

impl<S: Store> Handler<S> for Turn {
    async fn handle(&self, lease: &Lease<S>) -> Released {
        let turn = async {
            lease.load().await?;
            lease
                .update(async |tx| {
                    tx.commit_step(vec![NewMessage::assistant("done")], false)
                        .await?;
                    tx.finish_turn().await
                })
                .await
        };
        let result = turn.await.map(drop);
        let _ = self
            .done
            .send((lease.owner().worker_id, lease.chat_id(), result));
        Released::Finished
    }
}

/// Reports and then never finishes by itself: it returns only when the
/// lease is lost, or (if the chat's first message says "polite") hands the
/// chat back when the runtime stops.
pub(crate) struct Hold {
    pub(crate) started: mpsc::UnboundedSender<Started>,
}

impl<S: Store> Handler<S> for Hold {
    async fn handle(&self, lease: &Lease<S>) -> Released {
        let polite = match lease.load().await {
            Ok(record) => record.history[0].content == vec![Part::text("polite")],
            Err(_) => return Released::Errored,
        };
        let _ = self.started.send(started(lease));
        if polite {
            tokio::select! {
                () = lease.stopping() => Released::HandBack,
                () = lease.lost() => Released::Finished,
            }
        } else {
            lease.lost().await;
            Released::Finished
        }
    }
}

/// What [`Gated`] reports.
#[derive(Debug)]
pub(crate) enum Gate {
    /// The history was read (its version); the handler waits for the gate.
    Generated { chat: ChatId, history_version: i64 },
    /// A commit attempt, and whether the lease was known lost after it.
    Committed {
        result: Result<(), Error>,
        lost: bool,
    },
}

/// Reads the history, waits for the test's gate (ignoring `lost()`), then
/// commits a step and ends the turn; if that fails it reads the history
/// again and retries once. Reports every stage.
pub(crate) struct Gated {
    pub(crate) events: mpsc::UnboundedSender<Gate>,
    pub(crate) gate: Arc<Notify>,
}

impl Gated {
    async fn commit<S: Store>(&self, lease: &Lease<S>) -> bool {
        let result = lease
            .update(async |tx| {
                tx.commit_step(vec![NewMessage::assistant("step")], false)
                    .await?;
                tx.finish_turn().await
            })
            .await
            .map(drop);
        let ok = result.is_ok();
        let _ = self.events.send(Gate::Committed {
            result,
            lost: lease.is_lost(),
        });
        ok
    }
}

impl<S: Store> Handler<S> for Gated {
    async fn handle(&self, lease: &Lease<S>) -> Released {
        let Ok(record) = lease.load().await else {
            return Released::Errored;
        };
        let _ = self.events.send(Gate::Generated {
            chat: lease.chat_id(),
            history_version: record.row.versions.history,
        });
        self.gate.notified().await;
        if !self.commit(lease).await {
            let _ = lease.load().await;
            self.commit(lease).await;
        }
        Released::Finished
    }
}

/// Reports, then waits for `lost()` and reports again.
pub(crate) struct WaitLost {
    pub(crate) started: mpsc::UnboundedSender<Started>,
    pub(crate) lost: mpsc::UnboundedSender<ChatId>,
}

impl<S: Store> Handler<S> for WaitLost {
    async fn handle(&self, lease: &Lease<S>) -> Released {
        let _ = self.started.send(started(lease));
        lease.lost().await;
        let _ = self.lost.send(lease.chat_id());
        Released::Finished
    }
}

/// Commits one step and lets go while the chat is still runnable; on the
/// next claim (the history has an answer) ends the turn. Reports each call.
pub(crate) struct OneStepAtATime {
    pub(crate) calls: mpsc::UnboundedSender<(ChatId, Result<ExecutionState, Error>)>,
}

impl<S: Store> Handler<S> for OneStepAtATime {
    async fn handle(&self, lease: &Lease<S>) -> Released {
        let step = async {
            let record = lease.load().await?;
            let answered = record
                .active_history()
                .any(|m| m.role == chatstate::Role::Assistant);
            lease
                .update(async |tx| {
                    let outcome = if answered {
                        tx.finish_turn().await?
                    } else {
                        tx.commit_step(vec![NewMessage::assistant("part")], false)
                            .await?
                    };
                    Ok(outcome.to)
                })
                .await
        };
        let _ = self.calls.send((lease.chat_id(), step.await));
        Released::Finished
    }
}

//! Two worker runtimes share the chats of an in-memory store.
//!
//! Run with `cargo run -p chatstate-worker --example mem`. An API task
//! creates chats; each chat's ownership hint reaches both runtimes, one
//! claim wins, and its handler answers and ends the turn.

use std::sync::Arc;
use std::time::Duration;

use chatstate::{BroadcastPublisher, CreateChat, NewMessage, Store, create_chat};
use chatstate_store_mem::MemStore;
use chatstate_worker::{Handler, Lease, Released, Runtime};
use tokio::sync::mpsc;

/// Answers the last user message and ends the turn.
struct Answer {
    turns: mpsc::UnboundedSender<String>,
}

impl<S: Store> Handler<S> for Answer {
    async fn handle(&self, lease: &Lease<S>) -> Released {
        // The history the answer is generated from; a later edit of it
        // makes the commit fail with HistoryChanged.
        let record = match lease.load().await {
            Ok(record) => record,
            Err(_) => return Released::Errored,
        };
        let question = record.active_history().count();
        let answer = format!("answer to a history of {question} message(s)");
        let committed = lease
            .update(async |tx| {
                tx.commit_step(vec![NewMessage::assistant(answer)], false)
                    .await?;
                tx.finish_turn().await
            })
            .await;
        match committed {
            Ok(outcome) => {
                let _ = self.turns.send(format!(
                    "{} by runner {}: {} -> {}",
                    lease.chat_id(),
                    lease.runner(),
                    outcome.from,
                    outcome.to
                ));
                Released::Finished
            }
            Err(_) => Released::Errored,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let store = MemStore::new();
    let publisher = Arc::new(BroadcastPublisher::default());
    let (turns, mut done) = mpsc::unbounded_channel();

    let mut runtimes = Vec::new();
    for _ in 0..2 {
        runtimes.push(
            Runtime::builder(
                store.clone(),
                publisher.clone(),
                Answer {
                    turns: turns.clone(),
                },
            )
            .capacity(4)
            .hints(publisher.subscribe())
            .spawn()?,
        );
    }

    const CHATS: usize = 8;
    for i in 0..CHATS {
        create_chat(
            &store,
            &publisher.clone().into(),
            CreateChat {
                messages: vec![NewMessage::user(format!("question {i}"))],
                ..CreateChat::default()
            },
        )
        .await?;
    }
    for _ in 0..CHATS {
        let line = tokio::time::timeout(Duration::from_secs(10), done.recv())
            .await?
            .expect("the runtimes are running");
        println!("{line}");
    }
    for runtime in runtimes {
        let worker = runtime.worker_id();
        let stats = runtime.shutdown().await;
        println!(
            "worker {worker}: claims won {}, lost {} (held {}, not runnable {}), hints {}",
            stats.claims_won,
            stats.claims_held + stats.claims_not_runnable,
            stats.claims_held,
            stats.claims_not_runnable,
            stats.hints
        );
    }
    Ok(())
}

//! A worker runtime on PostgreSQL, and an API that talks to it only
//! through the database.
//!
//! Run with `cargo run -p chatstate-worker --features pg --example pg`
//! (it uses `DATABASE_URL` if set, else it starts a throwaway cluster of
//! its own, as the tests do). Notifications are delivered with each commit
//! (`Notify::InTransaction`), so the runtime learns of new chats from its
//! `LISTEN chat:ownership` connection, exactly as a worker in another
//! process would; its sweep would find them even without the hints.

use std::time::Duration;

use anyhow::Context as _;
use chatstate::{
    BusyBehavior, ChatMachine, CreateChat, ExecutionState, NewMessage, Notify, Options, Store,
    create_chat,
};
use chatstate_store_pg::PgStore;
use chatstate_worker::{Handler, Lease, Released, Runtime, pg::ownership_listener};

/// Answers the chat's history and ends the turn; a queued follow-up is
/// promoted by the finish and answered in the same hold of the lease.
struct Answer;

impl<S: Store> Handler<S> for Answer {
    async fn handle(&self, lease: &Lease<S>) -> Released {
        loop {
            // The history this answer is generated from: a user's edit
            // meanwhile makes the commit fail with HistoryChanged.
            let record = match lease.load().await {
                Ok(record) => record,
                Err(_) => return Released::Errored,
            };
            if !record.state().is_runnable() {
                return Released::Finished;
            }
            let seen = record.active_history().count();
            let answer = format!("an answer to {seen} message(s)");
            let finished = lease
                .update(async |tx| {
                    tx.commit_step(vec![NewMessage::assistant(answer)], false)
                        .await?;
                    tx.finish_turn().await
                })
                .await;
            match finished {
                // A promoted queued message starts the next turn at once.
                Ok(outcome) if outcome.to == ExecutionState::R0 => continue,
                Ok(_) => return Released::Finished,
                Err(_) => return Released::Errored,
            }
        }
    }
}

async fn store() -> anyhow::Result<PgStore> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let pool = chatstate_store_pg::pool_options().connect(&url).await?;
        chatstate_store_pg::migrate(&pool).await?;
        return Ok(PgStore::new(pool));
    }
    let cluster = tokio::task::spawn_blocking(chatstate_testing::throwaway::Cluster::shared)
        .await?
        .context("starting a throwaway cluster")?;
    Ok(PgStore::new(cluster.new_database().await?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let store = store().await?;
    let options = Options::default();
    let runtime = Runtime::builder(store.clone(), Notify::InTransaction, Answer)
        .options(options)
        .hints(ownership_listener(&store).await?)
        .spawn()?;

    // The API side: create chats and queue follow-ups while they run.
    let mut chats = Vec::new();
    for i in 0..4 {
        let created = create_chat(
            &store,
            &Notify::InTransaction,
            CreateChat {
                messages: vec![NewMessage::user(format!("question {i}"))],
                ..CreateChat::default()
            },
        )
        .await?;
        let chat = ChatMachine::new(
            store.clone(),
            Notify::InTransaction,
            created.chat_id,
            options,
        );
        chat.update(async |tx| {
            tx.send_message(NewMessage::user("and a follow-up"), BusyBehavior::Queue)
                .await
        })
        .await?;
        chats.push(chat);
    }

    // Each chat comes to rest, answered twice, with nobody owning it.
    for chat in &chats {
        let record = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let record = chat.load().await?;
                if record.state() == ExecutionState::W && record.row.owner.is_none() {
                    return Ok::<_, chatstate::Error>(record);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .context("a chat did not come to rest")??;
        let answers = record
            .active_history()
            .filter(|m| m.role == chatstate::Role::Assistant)
            .count();
        println!(
            "{}: {} -> {} answers, snapshot {}",
            chat.chat_id(),
            record.state(),
            answers,
            record.row.versions.snapshot
        );
        anyhow::ensure!(answers == 2, "both user messages answered");
    }
    let stats = runtime.shutdown().await;
    println!(
        "claims won {}, lost {}, heartbeats {}, handed back {}",
        stats.claims_won,
        stats.claims_held + stats.claims_not_runnable,
        stats.heartbeats,
        stats.handed_back
    );
    Ok(())
}

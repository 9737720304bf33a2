//! A chat's life on the in-memory store: create it, let a worker acquire it
//! and commit a step, queue a user message, finish the turn (which promotes
//! the queued message), and print every notification a subscriber saw.
//!
//! Run with `cargo run -p chatstate --example quickstart`.

use std::sync::Arc;

use chatstate::{
    BroadcastPublisher, BusyBehavior, ChatMachine, CreateChat, HighWaterMark, NewMessage,
    Notification, Notify, Options, RunnerId, WorkerId, create_chat,
};
use chatstate_store_mem::MemStore;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let store = MemStore::new();
    let publisher = Arc::new(BroadcastPublisher::default());
    let mut subscriber = publisher.subscribe();
    let notify = Notify::AfterCommit(publisher.clone());

    // CreateChat: N -> R0, with an ownership hint since no worker owns it.
    let created = create_chat(
        &store,
        &notify,
        CreateChat {
            messages: vec![NewMessage::user("What is a row lock?")],
            ..CreateChat::default()
        },
    )
    .await?;
    let chat = ChatMachine::new(store, notify, created.chat_id, Options::default());
    println!(
        "created {} in {}",
        created.chat_id,
        chat.load().await?.state()
    );

    // A worker acquires the chat and commits one step, in one Update.
    let (worker, runner) = (WorkerId::new_random(), RunnerId::new_random());
    chat.update(async |tx| {
        tx.acquire(worker, runner).await?;
        tx.fenced(runner)
            .commit_step(vec![NewMessage::assistant("A lock on one row...")], false)
            .await?;
        Ok(())
    })
    .await?;

    // The user sends a follow-up while the turn runs: it is queued (R0 -> R1).
    let queued = chat
        .update(async |tx| {
            tx.send_message(NewMessage::user("And FOR SHARE?"), BusyBehavior::Queue)
                .await
        })
        .await?;
    println!("SendMessage: {} -> {}", queued.from, queued.to);

    // The worker finishes its turn: the queued message is promoted (R1 -> R0).
    let finished = chat
        .update(async |tx| tx.fenced(runner).finish_turn().await)
        .await?;
    println!(
        "FinishTurn: {} -> {}, promoted {:?}",
        finished.from, finished.to, finished.promoted
    );

    // Every notification, deduplicated by a high-water mark as a receiver would.
    let mut mark = HighWaterMark::new();
    while let Ok(published) = subscriber.try_recv() {
        let n = published.notification()?;
        let note = match n {
            Notification::Ownership(_) => "  (hint: no live lease)",
            Notification::Update { .. } if mark.accept(&n) => "",
            Notification::Update { .. } => "  (stale, ignored)",
        };
        println!(
            "{:<48} {}{note}",
            published.channel,
            String::from_utf8_lossy(&published.payload),
        );
    }
    Ok(())
}

//! The snapshot caches on the chat row (queue ids, tool bookkeeping:
//! migration 0002), the deferred snapshot bump, and test control on a
//! missing chat.

use chatstate::{ChatRecord, Error, StoreErrorKind, TestControl};
use chatstate_model::{ChatId, ChatStatus, NewMessage, QueuedMessageId, Snapshot, ToolState};
use sqlx::PgPool;

use crate::common::{Fx, Step, TestChat, fx, snapshot_version};

/// The queue and the tool bookkeeping as the tables have them.
fn from_tables(rec: &ChatRecord) -> (Vec<QueuedMessageId>, ToolState) {
    let tools =
        ToolState::from_history(rec.active_history().map(|m| (m.role, m.content.as_slice())));
    (rec.queue.iter().map(|q| q.id).collect(), tools)
}

/// The snapshot an Update opens with, and the tables read in the same
/// Update (which then commits nothing but its bump).
async fn opened(fx: &Fx, chat: ChatId) -> (Snapshot, ChatRecord) {
    fx.machine(chat)
        .update(async |tx| Ok((tx.snapshot().clone(), tx.load().await?)))
        .await
        .unwrap()
}

async fn assert_caches_match(fx: &Fx, chat: ChatId, ctx: &str) {
    let (snap, rec) = opened(fx, chat).await;
    let (queue, tools) = from_tables(&rec);
    assert_eq!(snap.queue, queue, "{ctx}: queue");
    assert_eq!(snap.tools, tools, "{ctx}: tools");
}

/// True when both caches of the stored row are valid.
async fn caches_valid(pool: &PgPool, chat: ChatId) -> bool {
    sqlx::query_scalar(
        "SELECT tool_state_version IS NOT DISTINCT FROM history_version
            AND queue_ids_version IS NOT DISTINCT FROM queue_version
           FROM chats WHERE id = $1",
    )
    .bind(chat.0)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A chat with an outstanding dynamic call and a queue of three.
async fn busy_chat(fx: &Fx) -> TestChat {
    let mut chat = fx.create().await;
    for step in [
        Step::Acquire,
        Step::CommitDynamicCall,
        Step::Queue,
        Step::Queue,
        Step::Queue,
    ] {
        fx.step(&mut chat, step).await;
    }
    chat
}

#[tokio::test]
async fn the_row_caches_follow_every_plan() {
    let fx = fx().await;
    let mut chat = busy_chat(&fx).await;
    assert_caches_match(&fx, chat.id, "after setup").await;
    let (snap, _) = opened(&fx, chat.id).await;
    assert_eq!(snap.tools.outstanding(None).len(), 1, "the dynamic call");
    assert_eq!(snap.queue, chat.queued);

    let m = fx.machine(chat.id);
    m.update(async |tx| tx.delete_queued_message(chat.queued[1]).await)
        .await
        .unwrap();
    assert_caches_match(&fx, chat.id, "after a delete").await;
    // To the head, interrupting the turn.
    m.update(async |tx| tx.promote_queued_message(chat.queued[2]).await)
        .await
        .unwrap();
    assert_caches_match(&fx, chat.id, "after a reorder").await;
    // A synthetic result for the outstanding call, the partial reply, then
    // the head promoted into the history: one plan.
    let owner = fx.owner;
    let out = m
        .update(async |tx| {
            tx.fenced(owner.runner_id)
                .finish_interruption(vec![NewMessage::assistant("partial")])
                .await
        })
        .await
        .unwrap();
    assert!(out.promoted.is_some());
    assert_caches_match(&fx, chat.id, "after finishing the interruption").await;
    let (snap, _) = opened(&fx, chat.id).await;
    assert_eq!(snap.queue, [chat.queued[0]]);
    assert!(snap.tools.outstanding(None).is_empty());
    fx.step(&mut chat, Step::FinishTurn).await;
    assert_caches_match(&fx, chat.id, "after finishing the turn").await;
    assert!(caches_valid(fx.store.pool(), chat.id).await);
}

#[tokio::test]
async fn stale_caches_are_read_from_the_tables() {
    let fx = fx().await;
    let chat = busy_chat(&fx).await;
    let pool = fx.store.pool();
    // What a chat from before migration 0002 looks like, and what a row
    // written by an older binary looks like (a cache one version behind),
    // each with a wrong cached value.
    for stale in [
        "UPDATE chats SET tool_state = NULL, tool_state_version = NULL,
                          queue_ids = NULL, queue_ids_version = NULL WHERE id = $1",
        "UPDATE chats SET tool_state = '{\"calls\": [{\"id\": \"bogus\", \"name\": \"x\",
                                                       \"provider_executed\": false}],
                                           \"handled\": []}',
                          tool_state_version = history_version - 1,
                          queue_ids = '{42}', queue_ids_version = queue_version - 1
          WHERE id = $1",
    ] {
        sqlx::query(stale)
            .bind(chat.id.0)
            .execute(pool)
            .await
            .unwrap();
        assert!(!caches_valid(pool, chat.id).await);
        let (snap, rec) = opened(&fx, chat.id).await;
        let (queue, tools) = from_tables(&rec);
        assert_eq!(snap.queue, queue, "{stale}");
        assert_eq!(snap.tools, tools, "{stale}");
        // Plans changing the history and the queue write both again.
        let gone = queue[0];
        fx.machine(chat.id)
            .update(async |tx| {
                tx.delete_queued_message(gone).await?;
                tx.fenced(fx.owner.runner_id)
                    .commit_step(vec![NewMessage::assistant("more")], false)
                    .await
            })
            .await
            .unwrap();
        assert!(caches_valid(pool, chat.id).await, "{stale}");
        assert_caches_match(&fx, chat.id, stale).await;
    }
    // The edit context still folds the history itself.
    let edited = fx
        .machine(chat.id)
        .update(async |tx| {
            tx.edit_message(
                chat.first_message,
                vec![chatstate_model::Part::text("again")],
                None,
            )
            .await
        })
        .await
        .unwrap();
    assert_eq!(edited.from, chatstate_model::ExecutionState::R1);
    assert_caches_match(&fx, chat.id, "after the edit").await;
    let (snap, _) = opened(&fx, chat.id).await;
    assert!(snap.queue.is_empty(), "an edit discards the queue");
    assert!(snap.tools.calls.is_empty());
}

#[tokio::test]
async fn the_bump_is_written_once_with_or_without_a_row_write() {
    let fx = fx().await;
    let chat = fx.create().await;
    let pool = fx.store.pool();
    let m = fx.machine(chat.id);
    let before = snapshot_version(pool, chat.id).await;

    // No plan at all: the commit writes the bump; load sees it first.
    let seen = m
        .update(async |tx| Ok((tx.snapshot().row.versions.snapshot, tx.load().await?)))
        .await
        .unwrap();
    assert_eq!(seen.0, before + 1);
    assert_eq!(seen.1.row.versions.snapshot, before + 1);
    assert_eq!(snapshot_version(pool, chat.id).await, before + 1);

    // Two transitions, the second leaving the row as it is.
    m.update(async |tx| {
        tx.record_generation_attempt().await?;
        let rec = tx.load().await?;
        assert_eq!(rec.row.versions.snapshot, before + 2);
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(snapshot_version(pool, chat.id).await, before + 2);

    // A nested Update of the same chat bumps once more.
    let inner = m
        .update(async |tx| {
            let outer = tx.snapshot().row.versions.snapshot;
            let inner = tx
                .update_nested(chat.id, async |itx| {
                    Ok((itx.snapshot().row.versions.snapshot, itx.load().await?))
                })
                .await?;
            Ok((outer, inner))
        })
        .await
        .unwrap();
    assert_eq!(inner.0, before + 3);
    assert_eq!(inner.1.0, before + 4);
    assert_eq!(inner.1.1.row.versions.snapshot, before + 4);
    assert_eq!(snapshot_version(pool, chat.id).await, before + 4);

    // A rolled-back Update writes nothing.
    let _ = m
        .update(async |tx| -> Result<(), Error> {
            tx.record_generation_attempt().await?;
            Err(Error::callback("no"))
        })
        .await
        .unwrap_err();
    assert_eq!(snapshot_version(pool, chat.id).await, before + 4);
}

#[tokio::test]
async fn raw_state_of_a_missing_chat_is_an_error() {
    let fx = fx().await;
    let err = fx
        .store
        .set_raw_state(ChatId::new_random(), &ChatStatus::Running, false)
        .await
        .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Data);
    let source = std::error::Error::source(&err).map(ToString::to_string);
    assert!(source.is_some_and(|s| s.contains("not found")), "{err:?}");
}

//! Creation, metadata, store time and the go-shaped baseline.

use std::collections::BTreeMap;
use std::time::Duration;

use chatstate::{
    BusyBehavior, ChatMetadata, CreateChat, Error, MetadataPatch, Notify, TestControl, create_chat,
};
use chatstate_model::{
    ExecutionState, JsonText, NewMessage, Notification, OwnershipHint, RejectionKind, Role,
};
use chatstate_store_pg::{ListenerEvent, PgNotifyListener};
use chatstate_testing::goshape::{GoShaped, GoShapedError, GoShapedOutcome};

use crate::common::{Step, fx, next, send_marker};

#[tokio::test]
async fn create_twice_is_rejected_and_notifies_once() {
    let fx = fx().await;
    let pool = fx.store.pool().clone();
    let mut listener = PgNotifyListener::connect(&pool).await.unwrap();
    listener.listen_ownership().await.unwrap();
    let input = CreateChat {
        id: Some(chatstate_model::ChatId::new_random()),
        owner_id: uuid::Uuid::new_v4(),
        metadata: ChatMetadata {
            title: "it's a \\ title".into(),
            labels: BTreeMap::from([("team".into(), "core".into())]),
            metadata: Some(JsonText::parse(r#"{"z": 1, "a": [true, null]}"#).unwrap()),
        },
        messages: vec![NewMessage::user("one"), NewMessage::assistant("two")],
        ..CreateChat::default()
    };
    let created = create_chat(&fx.store, &Notify::InTransaction, input.clone())
        .await
        .unwrap();
    let rec = fx.machine(created.chat_id).load().await.unwrap();
    assert_eq!(
        rec.row, created.row,
        "the stored row is the row the model made"
    );
    assert_eq!(rec.metadata, input.metadata);
    assert_eq!(
        rec.history
            .iter()
            .map(|m| (m.id, m.revision))
            .collect::<Vec<_>>(),
        created
            .messages
            .iter()
            .map(|id| (*id, 1))
            .collect::<Vec<_>>()
    );
    let hint = next(&mut listener).await;
    assert_eq!(
        hint,
        ListenerEvent::Notification(Notification::Ownership(OwnershipHint {
            chat_id: created.chat_id,
            snapshot_version: 1,
        }))
    );

    // Again, with the chat now in W: rejected, nothing written, no hint.
    fx.machine(created.chat_id)
        .update(async |tx| tx.finish_turn().await)
        .await
        .unwrap();
    let err = create_chat(&fx.store, &Notify::InTransaction, input)
        .await
        .unwrap_err();
    let rejection = err.rejection().expect("a rejection");
    assert_eq!(rejection.from, ExecutionState::W);
    assert!(matches!(
        rejection.kind,
        RejectionKind::TransitionNotAllowed { .. }
    ));
    assert_eq!(
        fx.machine(created.chat_id)
            .load()
            .await
            .unwrap()
            .history
            .len(),
        2
    );
    let marker = send_marker(&pool, 7).await;
    assert_eq!(
        next(&mut listener).await,
        ListenerEvent::Notification(marker)
    );
}

#[tokio::test]
async fn metadata_is_written_atomically_and_moves_no_version() {
    let fx = fx().await;
    let chat = fx.create().await;
    let m = fx.machine(chat.id);
    m.update(async |tx| {
        tx.set_title("renamed").await?;
        tx.set_labels(BTreeMap::from([("k".into(), "v".into())]))
            .await?;
        tx.set_metadata(Some(JsonText::parse(r#"{"n": 1}"#).unwrap()))
            .await
    })
    .await
    .unwrap();
    let rec = m.load().await.unwrap();
    assert_eq!(rec.metadata.title, "renamed");
    assert_eq!(rec.metadata.labels["k"], "v");
    assert_eq!(rec.row.versions.snapshot, 2, "only the Update's own bump");
    assert_eq!(rec.row.versions.history, 1);

    // A failed callback rolls the metadata back with everything else.
    let err = m
        .update(async |tx| -> Result<(), Error> {
            tx.set_title("lost").await?;
            Err(Error::callback("no"))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Callback(_)));
    // Lock may write metadata too; clearing the free JSON.
    m.lock(async |l| {
        l.write_metadata(MetadataPatch {
            metadata: Some(None),
            ..MetadataPatch::default()
        })
        .await
    })
    .await
    .unwrap();
    let rec = m.load().await.unwrap();
    assert_eq!(rec.metadata.title, "renamed");
    assert_eq!(rec.metadata.metadata, None);
    assert_eq!(rec.row.versions.snapshot, 2);
}

#[tokio::test]
async fn aged_heartbeats_make_the_lease_stale() {
    let fx = fx().await;
    let chat = fx.reach(&[Step::Acquire], ExecutionState::R0).await;
    let m = fx.machine(chat.id);
    let hints = || {
        fx.publisher
            .notifications()
            .into_iter()
            .filter(|n| matches!(n, Notification::Ownership(h) if h.chat_id == chat.id))
            .count()
    };
    let before = hints();
    let fresh = m
        .update(async |tx| Ok(tx.snapshot().lease_fresh))
        .await
        .unwrap();
    assert!(fresh);
    assert_eq!(hints(), before, "a fresh lease gets no hint");
    fx.store
        .advance_clock(Duration::from_secs(31))
        .await
        .unwrap();
    let fresh = m
        .update(async |tx| Ok(tx.snapshot().lease_fresh))
        .await
        .unwrap();
    assert!(!fresh);
    assert_eq!(hints(), before + 1, "a stale lease gets one hint");
    // A heartbeat makes it fresh again.
    assert_eq!(
        m.heartbeat(fx.owner.runner_id).await.unwrap(),
        chatstate::LeaseStatus::Held
    );
    assert!(
        m.update(async |tx| Ok(tx.snapshot().lease_fresh))
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn go_shaped_updates_write_what_the_lean_path_writes() {
    let fx = fx().await;
    let lean = fx.reach(&[Step::Acquire], ExecutionState::R0).await;
    let go = fx.reach(&[Step::Acquire], ExecutionState::R0).await;
    let message = NewMessage::new(Role::Assistant, vec![chatstate_model::Part::text("step")]);
    let baseline = GoShaped::new(fx.store.pool().clone());

    let before = baseline.round_trips();
    let out = baseline
        .commit_step(go.id, &message, &fx.options)
        .await
        .unwrap();
    let go_trips = baseline.round_trips() - before;
    assert_eq!(
        out,
        GoShapedOutcome::Committed {
            snapshot_version: 3,
            round_trips: 10
        }
    );
    assert_eq!(go_trips, 10);
    let before = fx.store.round_trips();
    fx.machine(lean.id)
        .update(async |tx| tx.commit_step(vec![message.clone()], false).await)
        .await
        .unwrap();
    assert_eq!(fx.store.round_trips() - before, 3);

    let queued = NewMessage::user("later");
    let out = baseline
        .send_queued(go.id, &queued, &fx.options)
        .await
        .unwrap();
    assert!(matches!(
        out,
        GoShapedOutcome::Committed {
            round_trips: 10,
            ..
        }
    ));
    fx.machine(lean.id)
        .update(async |tx| tx.send_message(queued.clone(), BusyBehavior::Queue).await)
        .await
        .unwrap();

    let a = fx.machine(lean.id).load().await.unwrap();
    let b = fx.machine(go.id).load().await.unwrap();
    assert_eq!(a.row.versions, b.row.versions);
    assert_eq!(a.row.generation_attempt, b.row.generation_attempt);
    let shape = |r: &chatstate::ChatRecord| {
        r.history
            .iter()
            .map(|m| (m.role, m.content.clone(), m.revision))
            .collect::<Vec<_>>()
    };
    assert_eq!(shape(&a), shape(&b));
    assert_eq!(a.queue.len(), b.queue.len());

    // From W, CommitStep is not allowed.
    let w = fx.reach(&[Step::FinishTurn], ExecutionState::W).await;
    let out = baseline
        .commit_step(w.id, &message, &fx.options)
        .await
        .unwrap();
    assert!(matches!(
        out,
        GoShapedOutcome::NotAllowed {
            from: ExecutionState::W,
            ..
        }
    ));
    assert_eq!(
        baseline
            .commit_step(chatstate_model::ChatId::new_random(), &message, &fx.options)
            .await
            .unwrap(),
        GoShapedOutcome::ChatNotFound
    );

    // A value the store would escape is refused before anything is sent.
    let before = (
        baseline.round_trips(),
        fx.machine(go.id).load().await.unwrap(),
    );
    let nul = NewMessage::assistant("a\0b");
    assert!(matches!(
        baseline.commit_step(go.id, &nul, &fx.options).await,
        Err(GoShapedError::Unsupported(_))
    ));
    let after = (
        baseline.round_trips(),
        fx.machine(go.id).load().await.unwrap(),
    );
    assert_eq!(before.0, after.0);
    assert_eq!(before.1.row.versions, after.1.row.versions);
}

#[tokio::test]
async fn store_time_round_trips_exactly_in_microseconds() {
    let fx = fx().await;
    let chat = fx
        .reach(&[Step::CommitDynamicCall], ExecutionState::R0)
        .await;
    let m = fx.machine(chat.id);
    let (now, out) = m
        .update(async |tx| {
            let now = tx.snapshot().now;
            Ok((now, tx.enter_requires_action().await?))
        })
        .await
        .unwrap();
    let deadline = now.plus(fx.options.requires_action_timeout);
    assert_eq!(out.requires_action_deadline, Some(deadline));
    let rec = m.load().await.unwrap();
    assert_eq!(rec.row.requires_action_deadline_at, Some(deadline));

    let w = fx.reach(&[Step::FinishTurn], ExecutionState::W).await;
    let m = fx.machine(w.id);
    let now = m
        .update(async |tx| {
            tx.request_compaction().await?;
            Ok(tx.snapshot().now)
        })
        .await
        .unwrap();
    assert_eq!(
        m.load().await.unwrap().row.compaction_requested_at,
        Some(now)
    );
}

#[tokio::test]
async fn nested_updates_commit_and_publish_together() {
    let fx = fx().await;
    let (a, b) = (fx.create().await, fx.create().await);
    let mut listener = PgNotifyListener::connect(fx.store.pool()).await.unwrap();
    listener.listen_chats([a.id, b.id]).await.unwrap();
    let before = fx.store.round_trips();
    fx.machine_in_tx(a.id)
        .update(async |tx| {
            tx.record_generation_attempt().await?;
            tx.update_nested(b.id, async |inner| inner.record_generation_attempt().await)
                .await?;
            Ok(())
        })
        .await
        .unwrap();
    // Open, write, nested open, nested write, commit.
    assert_eq!(fx.store.round_trips() - before, 5);
    let mut got = Vec::new();
    for _ in 0..2 {
        let event = next(&mut listener).await;
        let ListenerEvent::Notification(n) = event else {
            panic!("unexpected {event:?}");
        };
        got.push((n.chat_id(), n.snapshot_version()));
    }
    assert_eq!(got, [(b.id, 2), (a.id, 2)], "nested first, then the outer");

    // A nested Update of a missing chat fails the whole Update.
    let err = fx
        .machine_in_tx(a.id)
        .update(async |tx| {
            tx.record_generation_attempt().await?;
            tx.update_nested(chatstate_model::ChatId::new_random(), async |_| Ok(()))
                .await
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ChatNotFound(_)));
    let rec = fx.machine(a.id).load().await.unwrap();
    assert_eq!(rec.row.versions.snapshot, 2);
    assert_eq!(rec.row.generation_attempt, 1);
}

#[tokio::test]
async fn an_oversized_notification_fails_the_commit_and_rolls_back() {
    use chatstate::{Store, StoreErrorKind, StoreTx};
    use chatstate_model::{ChatUpdate, MAX_PAYLOAD_BYTES};
    let fx = fx().await;
    let chat = fx.create().await;
    let (tx, snap) = fx
        .store
        .begin_update(chat.id, &fx.options)
        .await
        .unwrap()
        .unwrap();
    let mut update = ChatUpdate::from_row(&snap.row);
    update.status = "x".repeat(MAX_PAYLOAD_BYTES);
    let err = tx
        .commit(&[Notification::Update {
            chat_id: chat.id,
            update,
        }])
        .await
        .unwrap_err();
    assert_eq!(err.kind, StoreErrorKind::Data);
    let rec = fx.machine(chat.id).load().await.unwrap();
    assert_eq!(rec.row.versions.snapshot, 1, "the bump was rolled back");
}

/// Values Postgres cannot store verbatim (U+0000 in text and jsonb,
/// numbers `numeric` would rewrite) come back exactly as given.
#[tokio::test]
async fn values_postgres_would_alter_come_back_exactly() {
    let fx = fx().await;
    let odd = "nul\0, marker \u{E000}, \u{E000}s\u{E000}0 and \u{1F980}";
    let metadata = ChatMetadata {
        title: odd.to_owned(),
        labels: BTreeMap::from([(odd.to_owned(), "\0".to_owned())]),
        metadata: Some(JsonText::parse(r#"{"z": -0.0, "\u0000": [1e16, "\u0000"]}"#).unwrap()),
    };
    let created = create_chat(
        &fx.store,
        &Notify::InTransaction,
        CreateChat {
            owner_id: uuid::Uuid::new_v4(),
            dynamic_tools: ["tool\0".to_owned()].into(),
            metadata: metadata.clone(),
            messages: vec![NewMessage::user(odd)],
            ..CreateChat::default()
        },
    )
    .await
    .unwrap();
    let m = fx.machine(created.chat_id);
    let call = NewMessage::new(
        Role::Assistant,
        vec![chatstate_model::Part::tool_call("id\0", "tool\0")],
    );
    for retry in ["-0", "-0.0", "1e16", r#""\u0000""#] {
        m.update(async |tx| tx.record_retry_state(retry).await)
            .await
            .unwrap();
        let rec = m.load().await.unwrap();
        assert_eq!(
            rec.row.retry_state,
            Some(JsonText::parse(retry).unwrap()),
            "{retry}"
        );
    }
    // The tool bookkeeping sees the call (and its dynamic tool) as the
    // model does: EnterRequiresAction needs it outstanding, and the
    // cancellation answers its exact id.
    let out = m
        .update(async |tx| {
            tx.commit_step(vec![call.clone()], false).await?;
            tx.enter_requires_action().await?;
            tx.cancel_requires_action(Some("why\0".into())).await
        })
        .await
        .unwrap();
    assert_eq!(out.cancellations, 1);
    let rec = m.load().await.unwrap();
    assert_eq!(rec.metadata, metadata);
    assert_eq!(rec.row.dynamic_tools, created.row.dynamic_tools);
    assert_eq!(rec.history[0].content, NewMessage::user(odd).content);
    assert_eq!(rec.history[1].content, call.content);
    let cancel = &rec.history[2].content[0];
    assert!(matches!(
        cancel,
        chatstate_model::Part::ToolResult { tool_call_id, result, .. }
            if tool_call_id == "id\0" && *result == JsonText::string("why\0")
    ));
}

//! Inspection: one chat in full, and listings by state, status, archived
//! flag and stale lease, read-only.

use std::time::Duration;

use chatstate::{StoreTx, TestControl};
use chatstate_model::{ChatId, ChatStatus, ExecutionState, Options};
use chatstate_store_pg::inspect::{
    ChatFilter, ChatSummary, LeaseFreshness, inspect_chat, list_chats, next_transitions,
};

use crate::common::{Fx, Step, fx};

/// Past the default staleness threshold (30 s).
const AGE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn inspect_shows_the_row_lease_queue_history_and_next_transitions() {
    let fx = fx().await;
    let pool = fx.store.pool();
    let options = Options::default();
    let chat = fx
        .reach(
            &[Step::Acquire, Step::Queue, Step::Queue],
            ExecutionState::R1,
        )
        .await;
    let loaded = fx.machine(chat.id).load().await.unwrap();

    let got = inspect_chat(pool, chat.id, 1, &options)
        .await
        .unwrap()
        .expect("the chat exists");
    assert_eq!(got.state, ExecutionState::R1);
    assert_eq!(got.row, loaded.row);
    assert_eq!(got.metadata, loaded.metadata);
    assert_eq!(got.queue, loaded.queue);
    assert_eq!(
        got.queue.iter().map(|q| q.id).collect::<Vec<_>>(),
        chat.queued
    );
    assert_eq!(got.history_rows, loaded.history.len() as u64);
    assert_eq!(
        got.active_history_rows,
        loaded.active_history().count() as u64
    );
    assert_eq!(
        got.recent_history,
        loaded.history[loaded.history.len() - 1..]
    );
    assert_eq!(got.next, next_transitions(ExecutionState::R1, true));
    assert_eq!(got.lease.owner, Some(fx.owner));
    assert_eq!(got.lease.freshness, LeaseFreshness::Fresh);
    let age = got.lease.heartbeat_age_us.expect("a heartbeat");
    assert!((0..30_000_000).contains(&age), "{age}");
    assert_eq!(
        got.lease.heartbeat_at.map(|h| h.0 + age),
        Some(got.store_time.0)
    );
    assert!(!got.needs_worker);
    assert!(got.created_at <= got.updated_at && got.updated_at <= got.store_time);
    // More rows asked for than exist: all of them.
    let all = inspect_chat(pool, chat.id, 1000, &options)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(all.recent_history, loaded.history);

    // The same heartbeat, older than the threshold.
    fx.store.advance_clock(AGE).await.unwrap();
    let stale = inspect_chat(pool, chat.id, 0, &options)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stale.lease.freshness, LeaseFreshness::Stale);
    assert!(stale.lease.heartbeat_age_us.unwrap() >= AGE.as_micros() as i64);
    assert!(stale.needs_worker && stale.recent_history.is_empty());
    // A longer threshold makes it fresh again.
    let patient = Options {
        heartbeat_stale: Duration::from_secs(3600),
        ..options
    };
    let fresh = inspect_chat(pool, chat.id, 0, &patient)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fresh.lease.freshness, LeaseFreshness::Fresh);

    // The heartbeat row gone (as after a crash: the table is unlogged).
    sqlx::query("DELETE FROM chat_heartbeats")
        .execute(pool)
        .await
        .unwrap();
    let missing = inspect_chat(pool, chat.id, 0, &options)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(missing.lease.freshness, LeaseFreshness::Missing);
    assert_eq!(missing.lease.heartbeat_at, None);
    assert!(missing.needs_worker);
    // Reading changed nothing.
    assert_eq!(fx.machine(chat.id).load().await.unwrap().row, loaded.row);

    let unowned = fx.create().await;
    let got = inspect_chat(pool, unowned.id, 10, &options)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.lease.freshness, LeaseFreshness::Unowned);
    assert_eq!((got.state, got.needs_worker), (ExecutionState::R0, true));
    assert_eq!(got.next, next_transitions(ExecutionState::R0, false));

    let nobody = ChatId(uuid::Uuid::new_v4());
    assert!(
        inspect_chat(pool, nobody, 10, &options)
            .await
            .unwrap()
            .is_none()
    );
}

/// Inspection takes no row lock: it answers while an Update holds the
/// chat, with the last committed state.
#[tokio::test]
async fn inspect_does_not_wait_for_an_open_update() {
    let fx = fx().await;
    let chat = fx.create().await;
    let before = fx.machine(chat.id).load().await.unwrap().row.versions;
    let (tx, _snapshot) = chatstate::Store::begin_update(&fx.store, chat.id, &fx.options)
        .await
        .unwrap()
        .unwrap();
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        inspect_chat(fx.store.pool(), chat.id, 1, &fx.options),
    )
    .await
    .expect("inspection waited for the row lock")
    .unwrap()
    .unwrap();
    assert_eq!(got.row.versions, before);
    tx.rollback().await.unwrap();
}

/// The ids of a listing.
fn ids(chats: &[ChatSummary]) -> Vec<ChatId> {
    chats.iter().map(|c| c.id).collect()
}

/// Chats in several states: (name, steps, state).
const CHATS: [(&str, &[Step], ExecutionState); 6] = [
    ("unowned R0", &[], ExecutionState::R0),
    (
        "owned R1",
        &[Step::Acquire, Step::Queue],
        ExecutionState::R1,
    ),
    ("idle", &[Step::FinishTurn], ExecutionState::W),
    (
        "archived",
        &[Step::FinishTurn, Step::Archive],
        ExecutionState::XW,
    ),
    ("paused", &[Step::RawPaused], ExecutionState::Invalid),
    (
        "error with queue",
        &[Step::Queue, Step::FinishError],
        ExecutionState::E1,
    ),
];

async fn make_chats(fx: &Fx) -> Vec<ChatId> {
    let mut out = Vec::new();
    for (_, steps, state) in CHATS {
        out.push(fx.reach(steps, state).await.id);
    }
    out
}

#[tokio::test]
async fn listings_filter_by_state_status_archived_and_stale_lease() {
    let fx = fx().await;
    let pool = fx.store.pool();
    let options = Options::default();
    let chats = make_chats(&fx).await;
    let [r0, r1, idle, archived, paused, error] = chats[..] else {
        unreachable!()
    };

    let all = list_chats(pool, &ChatFilter::default(), &options)
        .await
        .unwrap();
    let mut sorted = ids(&all);
    sorted.sort();
    let mut expected = chats.clone();
    expected.sort();
    assert_eq!(sorted, expected, "every chat, once");
    assert!(
        all.windows(2)
            .all(|w| (w[0].updated_at, w[0].id) <= (w[1].updated_at, w[1].id)),
        "oldest first"
    );
    for summary in &all {
        let (name, _, state) = CHATS[chats.iter().position(|c| *c == summary.id).unwrap()];
        assert_eq!(summary.state, state, "{name}");
    }
    let r1_row = all.iter().find(|c| c.id == r1).unwrap();
    assert_eq!(r1_row.queue_len, 1);
    assert_eq!(r1_row.lease.freshness, LeaseFreshness::Fresh);
    assert_eq!(r1_row.lease.owner, Some(fx.owner));
    // Without the row's queue cache (a chat from before migration 0002),
    // the queue table says the same.
    sqlx::query("UPDATE chats SET queue_ids = NULL, queue_ids_version = NULL WHERE id = $1")
        .bind(r1.0)
        .execute(pool)
        .await
        .unwrap();
    let uncached = list_chats(pool, &ChatFilter::default(), &options)
        .await
        .unwrap();
    let r1_uncached = uncached.iter().find(|c| c.id == r1).unwrap();
    assert_eq!(
        (r1_uncached.queue_len, r1_uncached.state),
        (1, ExecutionState::R1)
    );

    // (what, filter, the chats expected, in any order).
    let cases: Vec<(&str, ChatFilter, Vec<ChatId>)> = vec![
        (
            "runnable states",
            ChatFilter {
                states: vec![ExecutionState::R0, ExecutionState::R1],
                ..ChatFilter::default()
            },
            vec![r0, r1],
        ),
        (
            "Invalid",
            ChatFilter {
                states: vec![ExecutionState::Invalid],
                ..ChatFilter::default()
            },
            vec![paused],
        ),
        (
            "E1 and XW",
            ChatFilter {
                states: vec![ExecutionState::E1, ExecutionState::XW],
                ..ChatFilter::default()
            },
            vec![archived, error],
        ),
        (
            "status waiting",
            ChatFilter {
                statuses: vec![ChatStatus::Waiting],
                ..ChatFilter::default()
            },
            vec![idle, archived],
        ),
        (
            "legacy status",
            ChatFilter {
                statuses: vec![ChatStatus::Other("paused".into())],
                ..ChatFilter::default()
            },
            vec![paused],
        ),
        (
            "archived",
            ChatFilter {
                archived: Some(true),
                ..ChatFilter::default()
            },
            vec![archived],
        ),
        (
            "waiting and not archived",
            ChatFilter {
                statuses: vec![ChatStatus::Waiting],
                archived: Some(false),
                ..ChatFilter::default()
            },
            vec![idle],
        ),
        (
            "stale lease: the unowned runnable chat only",
            ChatFilter {
                stale_lease: true,
                ..ChatFilter::default()
            },
            vec![r0],
        ),
        (
            "a state no stored chat is in",
            ChatFilter {
                states: vec![ExecutionState::A0],
                ..ChatFilter::default()
            },
            vec![],
        ),
    ];
    for (what, filter, mut expected) in cases {
        let mut got = ids(&list_chats(pool, &filter, &options).await.unwrap());
        got.sort();
        expected.sort();
        assert_eq!(got, expected, "{what}");
    }

    // The limit keeps the oldest.
    let two = ChatFilter {
        limit: 2,
        ..ChatFilter::default()
    };
    assert_eq!(
        ids(&list_chats(pool, &two, &options).await.unwrap()),
        ids(&all[..2])
    );

    // Once the owner's heartbeat is old, the owned chat needs a worker too,
    // as the workers' own sweep agrees.
    fx.store.advance_clock(AGE).await.unwrap();
    let stale = ChatFilter {
        stale_lease: true,
        ..ChatFilter::default()
    };
    let listed = list_chats(pool, &stale, &options).await.unwrap();
    let mut got = ids(&listed);
    got.sort();
    let mut expected = vec![r0, r1];
    expected.sort();
    assert_eq!(got, expected);
    assert!(listed.iter().all(|c| c.needs_worker));
    let mut claimable = chatstate::Store::claimable(&fx.store, &options, 100)
        .await
        .unwrap();
    claimable.sort();
    assert_eq!(claimable, expected);
}

//! A server crash in the middle of a workload: `pg_ctl stop -m immediate`
//! while Updates run, then a start. Every Update is recorded as committed,
//! maybe committed (an unknown outcome) or not committed, as its result
//! says, and the model's oracle checks the store against the record: no
//! commit may go unreported, none reported may be missing.
//!
//! A test binary of its own, because it restarts its process's cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chatstate::{
    BusyBehavior, ChatMachine, CommitState, CreateChat, Input, NewMessage, Notify,
    RecordingPublisher, create_chat,
};
use chatstate_model::oracle::{self, CommittedUpdate, Config, CreatedChat, Published, StoredChat};
use chatstate_model::{Call, ChatId, NewChat, Options};
use chatstate_store_pg::PgStore;
use chatstate_testing::throwaway::Cluster;
use sqlx::Connection;
use tokio::sync::{Notify as Signal, watch};

const CHATS: usize = 3;
const TASKS: usize = 6;
const OPS: usize = 40;
/// Committed Updates before the crash.
const CRASH_AFTER: usize = 40;

/// What a task recorded.
#[derive(Default)]
struct Record {
    committed: Vec<CommittedUpdate>,
    maybe: Vec<CommittedUpdate>,
    failed: usize,
}

fn sent(own: &RecordingPublisher) -> Vec<Published> {
    let out = own
        .published()
        .into_iter()
        .map(|p| Published {
            channel: p.channel,
            payload: p.payload,
        })
        .collect();
    own.clear();
    out
}

async fn task(
    store: PgStore,
    chats: Vec<ChatId>,
    index: usize,
    committed: Arc<AtomicUsize>,
    crash: Arc<Signal>,
    mut restarted: watch::Receiver<bool>,
) -> Record {
    let own = Arc::new(RecordingPublisher::new());
    let notify = Notify::AfterCommit(own.clone());
    let mut record = Record::default();
    for op in 0..OPS {
        let chat = chats[(index + op) % chats.len()];
        let m = ChatMachine::new(store.clone(), notify.clone(), chat, Options::default());
        let mut calls = Vec::new();
        let mut outcomes = Vec::new();
        let mut seen = None;
        let got = m
            .update(async |tx| {
                let start = tx.snapshot().clone();
                let input = match start.queue.first() {
                    Some(head) if op % 3 == 2 => Input::DeleteQueuedMessage { id: *head },
                    _ => Input::SendMessage {
                        message: NewMessage::user(format!("task {index} op {op}")),
                        busy_behavior: BusyBehavior::Queue,
                    },
                };
                calls.push(Call {
                    input: input.clone(),
                    fence: None,
                });
                outcomes.push(tx.apply(input).await?);
                seen = Some((start, tx.snapshot().clone()));
                Ok(())
            })
            .await;
        let state = match &got {
            Ok(()) => CommitState::Committed,
            Err(e) => e.commit_state(),
        };
        let recorded = seen.map(|(start, end)| CommittedUpdate {
            chat,
            snapshot: start.row.versions.snapshot,
            now: start.now,
            lease_fresh: start.lease_fresh,
            calls,
            outcomes,
            end,
            published: sent(&own),
        });
        match (state, recorded) {
            (CommitState::Committed, Some(u)) => {
                if committed.fetch_add(1, Ordering::SeqCst) + 1 == CRASH_AFTER {
                    crash.notify_one();
                }
                record.committed.push(u);
            }
            (CommitState::Unknown, Some(u)) => record.maybe.push(u),
            (CommitState::Committed | CommitState::Unknown, None) => {
                panic!("task {index} op {op}: a commit without a finished callback: {got:?}")
            }
            _ => {
                assert!(own.published().is_empty(), "published without a commit");
                record.failed += 1;
                // The server is going down: carry on once it is back, so
                // the ops left run against the recovered server.
                let _ = restarted.wait_for(|done| *done).await;
            }
        }
    }
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn immediate_stop_during_a_workload_violates_nothing() {
    let cluster = Cluster::shared().unwrap_or_else(|e| panic!("{e}"));
    let name = cluster.create_database().await.unwrap();
    // The harness runs the server without synchronous commit (a crash may
    // then lose the last commits, by design of that setting); a crash test
    // needs every reported commit to survive. A database setting overrides
    // the server's command line.
    let mut admin = sqlx::PgConnection::connect_with(&cluster.connect_options(&name))
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{name}\" SET synchronous_commit = on"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    let pool = chatstate_store_pg::pool_options()
        .connect_with(cluster.connect_options(&name))
        .await
        .unwrap();
    let on: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(on, "on");
    let store = PgStore::new(pool);
    let creator = Arc::new(RecordingPublisher::new());
    let mut created = Vec::new();
    let mut chats = Vec::new();
    for i in 0..CHATS {
        let new = NewChat {
            id: ChatId::new_random(),
            owner_id: uuid::Uuid::new_v4(),
            dynamic_tools: Default::default(),
            last_model_config_id: None,
            messages: vec![NewMessage::user(format!("chat {i}"))],
        };
        let c = create_chat(
            &store,
            &Notify::AfterCommit(creator.clone()),
            CreateChat::from(new.clone()),
        )
        .await
        .unwrap();
        chats.push(new.id);
        created.push(CreatedChat {
            new,
            ids: c.messages,
            published: sent(&creator),
        });
    }

    let committed = Arc::new(AtomicUsize::new(0));
    let crash = Arc::new(Signal::new());
    let (restarted_tx, restarted) = watch::channel(false);
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            tokio::spawn(task(
                store.clone(),
                chats.clone(),
                i,
                committed.clone(),
                crash.clone(),
                restarted.clone(),
            ))
        })
        .collect();
    // Crash once enough has committed, with Updates in flight.
    crash.notified().await;
    tokio::task::spawn_blocking(|| cluster.restart_immediately())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    restarted_tx.send(true).unwrap();

    let mut all = Record::default();
    for t in tasks {
        let r = t.await.unwrap();
        all.committed.extend(r.committed);
        all.maybe.extend(r.maybe);
        all.failed += r.failed;
    }
    // Read the chats as stored, on a session opened after the restart.
    let mut finals = BTreeMap::new();
    for id in &chats {
        let m = ChatMachine::new(
            store.clone(),
            Notify::InTransaction,
            *id,
            Options::default(),
        );
        let mut record = None;
        for _ in 0..40 {
            if let Ok(r) = m.load().await {
                record = Some(r);
                break;
            }
        }
        let r = record.expect("the chat reads after the restart");
        finals.insert(
            *id,
            StoredChat {
                row: r.row,
                queue: r.queue,
                history: r.history,
            },
        );
    }
    let config = Config {
        options: Options::default(),
        exact_time: false,
    };
    let verdict =
        oracle::check_with_unknown(&config, &created, &all.committed, &all.maybe, &finals);
    let violations: Vec<String> = verdict
        .violations
        .iter()
        .map(|v| format!("{v:#}"))
        .collect();
    assert!(
        violations.is_empty(),
        "{} violations ({} committed, {} maybe, {} failed):\n{}",
        violations.len(),
        all.committed.len(),
        all.maybe.len(),
        all.failed,
        violations.join("\n")
    );
    assert!(all.failed > 0, "the crash failed some Updates");
    let maybe_landed: i64 = finals
        .values()
        .map(|c| c.row.versions.snapshot - 1)
        .sum::<i64>()
        - all.committed.len() as i64;
    println!(
        "crash test: {} committed, {} unknown ({} of them landed), {} not committed",
        all.committed.len(),
        all.maybe.len(),
        maybe_landed,
        all.failed
    );
    assert_eq!(
        verdict.updates_checked as i64,
        all.committed.len() as i64 + maybe_landed
    );
}

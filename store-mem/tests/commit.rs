//! Commit outcomes on the in-memory store: a store error poisons the
//! transaction, and a commit reported lost (applied, then
//! `OutcomeUnknown`) is told apart from one that did not happen, by the
//! machine and by the model's oracle.

use std::collections::BTreeMap;
use std::sync::Arc;

use chatstate::{
    BusyBehavior, ChatMachine, CommitState, CreateChat, Error, Input, MetadataPatch, NewMessage,
    Notify, Options, RecordingPublisher, StoreErrorKind, create_chat,
};
use chatstate_model::oracle::{self, CommittedUpdate, Config, CreatedChat, Published, StoredChat};
use chatstate_model::{Call, ChatId, NewChat};
use chatstate_store_mem::MemStore;

struct Fx {
    store: MemStore,
    publisher: Arc<RecordingPublisher>,
    chat: ChatId,
}

async fn fx() -> Fx {
    let store = MemStore::new();
    let publisher = Arc::new(RecordingPublisher::new());
    let created = create_chat(
        &store,
        &Notify::InTransaction,
        CreateChat {
            messages: vec![NewMessage::user("hello")],
            ..CreateChat::default()
        },
    )
    .await
    .unwrap();
    Fx {
        store,
        publisher,
        chat: created.chat_id,
    }
}

impl Fx {
    fn machine(&self) -> ChatMachine<MemStore> {
        ChatMachine::new(
            self.store.clone(),
            Notify::AfterCommit(self.publisher.clone()),
            self.chat,
            Options::default(),
        )
    }

    async fn snapshot(&self) -> (i64, usize) {
        let r = self.machine().load().await.unwrap();
        (r.row.versions.snapshot, r.queue.len())
    }
}

#[tokio::test]
async fn a_store_error_poisons_the_update_even_if_the_callback_carries_on() {
    let fx = fx().await;
    let before = fx.snapshot().await;
    let got = fx
        .machine()
        .update(async |tx| {
            tx.send_message(NewMessage::user("kept?"), BusyBehavior::Queue)
                .await?;
            fx.store.fail_nth_call(1);
            let failed = tx
                .send_message(NewMessage::user("fails"), BusyBehavior::Queue)
                .await;
            assert!(
                matches!(&failed, Err(Error::Store(e)) if e.kind == StoreErrorKind::Injected),
                "{failed:?}"
            );
            // Carries on, as it may after a rejection.
            Ok(())
        })
        .await;
    assert!(
        matches!(
            got,
            Err(Error::Poisoned {
                kind: StoreErrorKind::Injected,
                ..
            })
        ),
        "{got:?}"
    );
    assert_eq!(got.unwrap_err().commit_state(), CommitState::NotCommitted);
    assert_eq!(
        fx.snapshot().await,
        before,
        "rolled back, the first send too"
    );
    assert!(fx.publisher.published().is_empty());
}

#[tokio::test]
async fn a_rejection_does_not_poison() {
    let fx = fx().await;
    let before = fx.snapshot().await;
    fx.machine()
        .update(async |tx| {
            assert!(
                tx.set_archived(true).await.is_err(),
                "running chats do not archive"
            );
            tx.send_message(NewMessage::user("queued"), BusyBehavior::Queue)
                .await
        })
        .await
        .unwrap();
    assert_eq!(fx.snapshot().await, (before.0 + 1, 1));
}

#[tokio::test]
async fn a_store_error_poisons_a_lock() {
    let fx = fx().await;
    let got = fx
        .machine()
        .lock(async |l| {
            let title = MetadataPatch {
                title: Some("lost".to_owned()),
                ..MetadataPatch::default()
            };
            fx.store.fail_nth_call(1);
            assert!(l.write_metadata(title).await.is_err());
            Ok(())
        })
        .await;
    assert!(matches!(got, Err(Error::Poisoned { .. })), "{got:?}");
    let r = fx.machine().load().await.unwrap();
    assert_eq!(r.metadata.title, "");
}

#[tokio::test]
async fn a_lost_commit_is_unknown_not_rolled_back() {
    let fx = fx().await;
    let (before, _) = fx.snapshot().await;
    fx.store.lose_nth_commit(1);
    let got = fx
        .machine()
        .update(async |tx| {
            tx.send_message(NewMessage::user("once"), BusyBehavior::Queue)
                .await
        })
        .await;
    let err = got.unwrap_err();
    assert_eq!(err.commit_state(), CommitState::Unknown, "{err:?}");
    assert!(!err.is_committed());
    // It did commit; the caller was not told, so nothing was published
    // after commit.
    assert_eq!(fx.snapshot().await, (before + 1, 1));
    assert!(fx.publisher.published().is_empty());
}

#[tokio::test]
async fn a_lost_chat_creation_is_unknown() {
    let store = MemStore::new();
    store.lose_nth_commit(1);
    let id = ChatId::new_random();
    let err = create_chat(
        &store,
        &Notify::InTransaction,
        CreateChat {
            id: Some(id),
            messages: vec![NewMessage::user("hello")],
            ..CreateChat::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.commit_state(), CommitState::Unknown, "{err:?}");
    let m = ChatMachine::new(store, Notify::InTransaction, id, Options::default());
    assert_eq!(m.load().await.unwrap().row.versions.snapshot, 1);
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

/// Updates on a few chats with every third commit reported lost: recorded
/// as committed or maybe committed by what each returned, the oracle finds
/// the store consistent, and counts exactly the commits that landed.
#[tokio::test]
async fn the_oracle_settles_lost_commits_by_the_stored_versions() {
    let store = MemStore::new();
    let creator = Arc::new(RecordingPublisher::new());
    let mut created = Vec::new();
    for i in 0..3 {
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
        created.push(CreatedChat {
            new,
            ids: c.messages,
            published: sent(&creator),
        });
    }
    store.lose_every_nth_commit(3);
    let own = Arc::new(RecordingPublisher::new());
    let (mut committed, mut maybe) = (Vec::new(), Vec::new());
    for op in 0..60usize {
        let chat = created[op % created.len()].new.id;
        let m = ChatMachine::new(
            store.clone(),
            Notify::AfterCommit(own.clone()),
            chat,
            Options::default(),
        );
        let mut log = (Vec::new(), Vec::new());
        let mut seen = None;
        let got = m
            .update(async |tx| {
                let start = tx.snapshot().clone();
                let input = match start.queue.first() {
                    Some(head) if op % 4 == 3 => Input::DeleteQueuedMessage { id: *head },
                    _ => Input::SendMessage {
                        message: NewMessage::user(format!("op {op}")),
                        busy_behavior: BusyBehavior::Queue,
                    },
                };
                log.0.push(Call {
                    input: input.clone(),
                    fence: None,
                });
                log.1.push(tx.apply(input).await?);
                seen = Some((start, tx.snapshot().clone()));
                Ok(())
            })
            .await;
        let (start, end) = seen.expect("the callback ran to its end");
        let u = CommittedUpdate {
            chat,
            snapshot: start.row.versions.snapshot,
            now: start.now,
            lease_fresh: start.lease_fresh,
            calls: log.0,
            outcomes: log.1,
            end,
            published: sent(&own),
        };
        match got.map_or_else(|e| e.commit_state(), |()| CommitState::Committed) {
            CommitState::Committed => committed.push(u),
            CommitState::Unknown => maybe.push(u),
            other => panic!("op {op}: {other:?}"),
        }
    }
    assert_eq!(maybe.len(), 20);
    let mut finals = BTreeMap::new();
    for c in &created {
        let m = ChatMachine::new(
            store.clone(),
            Notify::InTransaction,
            c.new.id,
            Options::default(),
        );
        let r = m.load().await.unwrap();
        finals.insert(
            c.new.id,
            StoredChat {
                row: r.row,
                queue: r.queue,
                history: r.history,
            },
        );
    }
    let config = Config {
        options: Options::default(),
        exact_time: true,
    };
    let verdict = oracle::check_with_unknown(&config, &created, &committed, &maybe, &finals);
    assert!(verdict.violations.is_empty(), "{:#?}", verdict.violations);
    // Every lost commit did land on this store.
    assert_eq!(verdict.updates_checked, 60);
    // Without the maybe-committed record, the oracle sees commits nobody
    // reported.
    let strict = oracle::check(&config, &created, &committed, &finals);
    assert!(!strict.violations.is_empty());
}

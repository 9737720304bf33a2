//! Shared fixtures: a fresh database per test, chats created with a known
//! dynamic tool, and canned steps that bring a chat into a state.

use std::collections::BTreeSet;
use std::sync::Arc;

use chatstate::{
    BusyBehavior, ChatMachine, CreateChat, Created, Error, Notify, RecordingPublisher, TestControl,
    create_chat,
};
use chatstate_model::{
    ChatId, ChatStatus, ExecutionState, JsonText, MessageId, NewMessage, Notification, Options,
    Owner, OwnershipHint, Part, QueuedMessageId, Role, RunnerId, ToolResultInput, WorkerId,
};
use chatstate_store_pg::{ListenerEvent, PgNotifyListener, PgStore};
use chatstate_testing::throwaway::Cluster;
use sqlx::PgPool;

/// The dynamic (client-executed) tool of every test chat.
pub(crate) const DYNAMIC_TOOL: &str = "ask_user";
/// The id of the dynamic call `Step::CommitDynamicCall` makes.
pub(crate) const DYNAMIC_CALL: &str = "call-dyn-1";

/// A fresh migrated database. Fails (never skips) when there is no
/// PostgreSQL: the message names both remedies.
pub(crate) async fn database() -> PgPool {
    let cluster = Cluster::shared().unwrap_or_else(|e| panic!("{e}"));
    cluster
        .new_database()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A store, a recording publisher, options and a worker identity.
pub(crate) struct Fx {
    pub(crate) store: PgStore,
    pub(crate) publisher: Arc<RecordingPublisher>,
    pub(crate) options: Options,
    pub(crate) owner: Owner,
}

/// A chat made by [`Fx::create`] and moved along by steps.
pub(crate) struct TestChat {
    pub(crate) id: ChatId,
    /// The initial user message.
    pub(crate) first_message: MessageId,
    /// Queued message ids, oldest first (as queued by `Step::Queue`).
    pub(crate) queued: Vec<QueuedMessageId>,
}

/// One canned setup step, each one Update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Acquire,
    Queue,
    CommitDynamicCall,
    Enter,
    Interrupt,
    FinishTurn,
    FinishError,
    Archive,
    RawPaused,
}

pub(crate) async fn fx() -> Fx {
    fx_on(PgStore::new(database().await))
}

/// The fixture on a given store (e.g. one behind a pooler).
pub(crate) fn fx_on(store: PgStore) -> Fx {
    Fx {
        store,
        publisher: Arc::new(RecordingPublisher::new()),
        options: Options::default(),
        owner: Owner {
            worker_id: WorkerId::new_random(),
            runner_id: RunnerId::new_random(),
        },
    }
}

impl Fx {
    /// A machine on `chat` publishing after commit to the recorder.
    pub(crate) fn machine(&self, chat: ChatId) -> ChatMachine<PgStore> {
        ChatMachine::new(
            self.store.clone(),
            Notify::AfterCommit(self.publisher.clone()),
            chat,
            self.options,
        )
    }

    /// A machine on `chat` notifying with the commit (NOTIFY).
    pub(crate) fn machine_in_tx(&self, chat: ChatId) -> ChatMachine<PgStore> {
        ChatMachine::new(
            self.store.clone(),
            Notify::InTransaction,
            chat,
            self.options,
        )
    }

    /// Creates a running chat (R0) with one user message and the dynamic
    /// tool, notifying with the commit.
    pub(crate) async fn create(&self) -> TestChat {
        let created: Created = create_chat(
            &self.store,
            &Notify::InTransaction,
            CreateChat {
                owner_id: uuid::Uuid::new_v4(),
                dynamic_tools: BTreeSet::from([DYNAMIC_TOOL.to_owned()]),
                last_model_config_id: Some(uuid::Uuid::new_v4()),
                messages: vec![NewMessage::user("hello")],
                ..CreateChat::default()
            },
        )
        .await
        .expect("create chat");
        TestChat {
            id: created.chat_id,
            first_message: created.messages[0],
            queued: Vec::new(),
        }
    }

    /// Creates a chat and applies `steps`, asserting it lands in `state`.
    pub(crate) async fn reach(&self, steps: &[Step], state: ExecutionState) -> TestChat {
        let mut chat = self.create().await;
        for step in steps {
            self.step(&mut chat, *step).await;
        }
        let m = self.machine(chat.id);
        let got = m
            .read_lock(async |r| Ok(r.state()))
            .await
            .expect("read state");
        assert_eq!(got, state, "setup {steps:?}");
        chat
    }

    /// Applies one setup step in an Update of its own.
    pub(crate) async fn step(&self, chat: &mut TestChat, step: Step) {
        let m = self.machine(chat.id);
        let owner = self.owner;
        match step {
            Step::RawPaused => {
                self.store
                    .set_raw_state(chat.id, &ChatStatus::Other("paused".into()), false)
                    .await
                    .expect("raw state");
            }
            Step::Queue => {
                let out = m
                    .update(async |tx| {
                        tx.send_message(NewMessage::user("queued"), BusyBehavior::Queue)
                            .await
                    })
                    .await
                    .unwrap_or_else(|e| panic!("{step:?}: {e}"));
                chat.queued.push(out.queued.expect("queued"));
            }
            _ => {
                m.update(async |tx| -> Result<(), Error> {
                    match step {
                        Step::Acquire => {
                            tx.acquire(owner.worker_id, owner.runner_id).await?;
                        }
                        Step::CommitDynamicCall => {
                            tx.commit_step(vec![dynamic_call()], false).await?;
                        }
                        Step::Enter => {
                            tx.enter_requires_action().await?;
                        }
                        Step::Interrupt => {
                            tx.interrupt(None).await?;
                        }
                        Step::FinishTurn => {
                            tx.finish_turn().await?;
                        }
                        Step::FinishError => {
                            tx.finish_error(Some(JsonText::string("boom"))).await?;
                        }
                        Step::Archive => {
                            tx.set_archived(true).await?;
                        }
                        Step::Queue | Step::RawPaused => unreachable!(),
                    }
                    Ok(())
                })
                .await
                .unwrap_or_else(|e| panic!("{step:?}: {e}"));
            }
        }
    }
}

/// An assistant message calling the dynamic tool.
pub(crate) fn dynamic_call() -> NewMessage {
    NewMessage::new(
        Role::Assistant,
        vec![
            Part::text("let me ask"),
            Part::tool_call(DYNAMIC_CALL, DYNAMIC_TOOL),
        ],
    )
}

/// The result answering [`dynamic_call`].
pub(crate) fn dynamic_result() -> ToolResultInput {
    ToolResultInput {
        tool_call_id: DYNAMIC_CALL.to_owned(),
        output: r#"{"answer": "yes"}"#.to_owned(),
        is_error: false,
    }
}

/// Runs one SQL statement on the pool and returns its single integer.
pub(crate) async fn scalar_i64(pool: &PgPool, sql: &'static str, chat: ChatId) -> i64 {
    use sqlx::Row;
    let row = sqlx::query(sql)
        .bind(chat.0)
        .fetch_one(pool)
        .await
        .expect("scalar query");
    row.try_get(0).expect("integer column")
}

/// The stored snapshot version of a chat.
pub(crate) async fn snapshot_version(pool: &PgPool, chat: ChatId) -> i64 {
    scalar_i64(
        pool,
        "SELECT snapshot_version FROM chats WHERE id = $1",
        chat,
    )
    .await
}

/// How long a test waits for a notification before failing (a hang guard,
/// never a way to let something happen).
pub(crate) const GUARD: std::time::Duration = std::time::Duration::from_secs(30);

/// The listener's next event.
pub(crate) async fn next(listener: &mut PgNotifyListener) -> ListenerEvent {
    tokio::time::timeout(GUARD, listener.recv())
        .await
        .expect("no notification arrived")
        .expect("listener failed")
}

/// A marker: an ownership hint for a chat that does not exist, published
/// in autocommit. Postgres delivers notifications in commit order, so a
/// listener that hears the marker first has heard nothing committed
/// before it. Distinct `n` give distinct markers.
pub(crate) async fn send_marker(pool: &PgPool, n: i64) -> Notification {
    let hint = Notification::Ownership(OwnershipHint {
        chat_id: ChatId(uuid::Uuid::from_u128(n as u128)),
        snapshot_version: n,
    });
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(hint.channel())
        .bind(String::from_utf8(hint.payload()).unwrap())
        .execute(pool)
        .await
        .unwrap();
    hint
}

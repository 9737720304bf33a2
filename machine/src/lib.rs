//! Durable execution state for AI chats.
//!
//! `chatstate` is the only code that changes a chat's execution state: its
//! status and archived flag, its message history, its queue of pending user
//! messages, and the lease of the worker that owns it. Every change is a
//! *transition*, validated against one transition matrix and applied in a
//! store transaction that first locks the chat's row and bumps its
//! `snapshot_version` once. Notifications (`chat:update:<id>` and
//! `chat:ownership`) are published only after commit.
//!
//! # Tour
//!
//! - [`ChatMachine`] is a handle on one chat. [`ChatMachine::update`] runs a
//!   callback in a transaction; the [`Tx`] it receives has one method per
//!   transition and nothing that could write execution state otherwise.
//!   [`ChatMachine::lock`] and [`ChatMachine::read_lock`] hold the row lock
//!   without bumping or publishing.
//! - [`ChatMachine::update_with_retry`] runs an Update again after a
//!   failure that rolled it back for a transient cause
//!   ([`Error::is_retryable`]), under a [`RetryPolicy`].
//! - [`create_chat`] creates a chat (N -> R0).
//! - [`Tx::app`] lets the application's own writes (its billing rows, an
//!   outbox) share an Update's transaction, through the narrow handle each
//!   store offers for them ([`StoreTx::App`]), which cannot reach the
//!   store's own writes; [`CreateChat::prepare`] lets a store
//!   create a chat in the application's transaction.
//! - Workers find chats that need one with [`Store::claimable`], take them
//!   with [`ChatMachine::try_acquire`] (a losing [`Claim`] commits nothing),
//!   keep them with [`ChatMachine::heartbeat`] (which reports a lost lease
//!   as a [`LeaseStatus`]) and refuse stale steps with
//!   [`Fenced::expect_history`].
//! - [`Store`] is what a backing store implements: the in-memory store is
//!   `chatstate-store-mem`, the PostgreSQL one `chatstate-store-pg`.
//! - [`ChatMachine::observed`] attaches a [`CommitObserver`], told exactly
//!   what every Update that tried to commit applied and how its commit
//!   ended (the input of a linearizability check, an audit log or metrics).
//! - Every Update, Lock, ReadLock, creation and heartbeat runs in a
//!   `tracing` span (target `chatstate`) that records its transitions,
//!   states, snapshot version, outcome and phase times; with the `metrics`
//!   feature, Updates, transitions and lock waits are also counted through
//!   the `metrics` facade (`docs/observability.md` lists every name).
//! - [`Notify`] chooses how notifications leave: through a [`Publisher`]
//!   after commit, or delivered by the store with the commit.
//! - The rules themselves live in the pure `chatstate-model` crate,
//!   re-exported as [`model`]; the machine executes the model's decisions and
//!   asserts every landed state against the matrix.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use chatstate::{BroadcastPublisher, BusyBehavior, ChatMachine, CreateChat, NewMessage,
//!                 Options, RunnerId, WorkerId, create_chat, ExecutionState};
//! use chatstate_store_mem::MemStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), chatstate::Error> {
//! let store = MemStore::new();
//! let publisher = Arc::new(BroadcastPublisher::default());
//! let mut updates = publisher.subscribe();
//!
//! let created = create_chat(&store, &publisher.clone().into(), CreateChat {
//!     messages: vec![NewMessage::user("hello")],
//!     ..CreateChat::default()
//! }).await?;
//! let chat = ChatMachine::new(store, publisher.clone(), created.chat_id, Options::default());
//!
//! // A worker takes the chat and commits a step.
//! let (worker, runner) = (WorkerId::new_random(), RunnerId::new_random());
//! chat.update(async |tx| {
//!     tx.acquire(worker, runner).await?;
//!     tx.fenced(runner).commit_step(vec![NewMessage::assistant("hi!")], false).await?;
//!     Ok(())
//! }).await?;
//!
//! // The user queues a follow-up; the turn ends and promotes it.
//! chat.update(async |tx| {
//!     tx.send_message(NewMessage::user("and then?"), BusyBehavior::Queue).await
//! }).await?;
//! let finished = chat.update(async |tx| tx.fenced(runner).finish_turn().await).await?;
//! assert_eq!(finished.to, ExecutionState::R0);
//! assert!(finished.promoted.is_some());
//!
//! while let Ok(n) = updates.try_recv() {
//!     println!("{} {}", n.channel, String::from_utf8_lossy(&n.payload));
//! }
//! # Ok(())
//! # }
//! ```

mod claim;
mod create;
mod error;
mod locked;
mod machine;
mod observe;
mod publish;
mod retry;
mod store;
mod telemetry;
mod tx;

pub use chatstate_model as model;
pub use chatstate_model::{
    BusyBehavior, Call, ChatId, ChatRow, ChatStatus, ExecutionState, Input, JsonText, Message,
    MessageId, NewMessage, Notification, Options, Outcome, Owner, Part, QueuedMessage,
    QueuedMessageId, Rejection, RejectionKind, Role, RunnerId, Snapshot, Timestamp,
    ToolResultInput, Transition, Versions, Visibility, WorkerId,
};
pub use claim::{Claim, Ending, LeaseStatus};
pub use create::{CreateChat, Created, CreatedPending, PreparedChat, create_chat};
pub use error::{CommitState, Error, FlushError, PublishError, StoreError, StoreErrorKind};
pub use locked::{Locked, ReadLocked};
pub use machine::ChatMachine;
pub use observe::{ChatChange, CommitObserver, CommitReport};
pub use publish::{
    BroadcastPublisher, HighWaterMark, Notify, PublishBuffer, Published, Publisher,
    RecordingPublisher,
};
pub use retry::RetryPolicy;
pub use store::{
    ChatMetadata, ChatRecord, CreateOutcome, LockMode, MetadataPatch, Store, StoreTx, TestControl,
};
pub use tx::{Fenced, Tx};

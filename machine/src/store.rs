//! The store interface the machine runs on.
//!
//! A store offers transactions scoped to chat rows. It never decides what a
//! transition does: the machine decides a [`Plan`] with the model and the
//! store writes it verbatim. The interface is shaped so that a SQL store can
//! run an Update of one transition in three round trips: begin, lock, bump
//! and load in one; the plan's writes in one; commit (with in-transaction
//! notifications) in one.

use std::collections::BTreeMap;
use std::future::Future;

use chatstate_model::{
    Assigned, ChatId, ChatRow, EditContext, ExecutionState, JsonText, Message, MessageId,
    NewMessage, Notification, Options, Plan, QueuedMessage, RunnerId, Snapshot,
};
use serde::{Deserialize, Serialize};

use crate::claim::LeaseStatus;
use crate::error::StoreError;

/// Row lock strength.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockMode {
    /// Exclusive: excludes every other lock on the row (Update, Lock).
    Exclusive,
    /// Shared: coexists with other shared locks only (ReadLock).
    Shared,
}

/// A store of chats.
///
/// Implementations must give each method's future `Send`, take row locks
/// that block (asynchronously) like database row locks, and roll a
/// transaction back when its handle is dropped without a commit.
pub trait Store: Clone + Send + Sync + 'static {
    /// A transaction holding one chat row lock (and possibly more, for
    /// nested Updates).
    type Tx: StoreTx;

    /// Begins a transaction, takes the exclusive lock of `chat`, bumps its
    /// `snapshot_version` by exactly one and returns the snapshot after the
    /// bump (lease freshness by `options.heartbeat_stale`, store time of the
    /// transaction). `None` if the chat does not exist; then no transaction
    /// stays open.
    fn begin_update(
        &self,
        chat: ChatId,
        options: &Options,
    ) -> impl Future<Output = Result<Option<(Self::Tx, Snapshot)>, StoreError>> + Send;

    /// Begins a transaction holding a row lock of the given mode, without a
    /// bump. `None` if the chat does not exist.
    fn begin_locked(
        &self,
        chat: ChatId,
        mode: LockMode,
        options: &Options,
    ) -> impl Future<Output = Result<Option<(Self::Tx, Snapshot)>, StoreError>> + Send;

    /// Inserts a new chat row and its initial messages (each with revision
    /// `row.versions.snapshot`) in one transaction, delivering `notify`
    /// atomically with the commit (empty unless the machine notifies in
    /// transaction).
    fn create_chat(
        &self,
        row: &ChatRow,
        metadata: &ChatMetadata,
        messages: &[NewMessage],
        notify: &[Notification],
    ) -> impl Future<Output = Result<CreateOutcome, StoreError>> + Send;

    /// Upserts the heartbeat of (chat, runner) at store time, in a
    /// transaction of its own, if and only if `runner` is the chat's
    /// committed runner. Never bumps, never publishes, and does not wait for
    /// the chat's row lock (it reads the last committed row).
    fn heartbeat(
        &self,
        chat: ChatId,
        runner: RunnerId,
    ) -> impl Future<Output = Result<LeaseStatus, StoreError>> + Send;

    /// Chats that need an owner: runnable by the model's classifier (not
    /// archived, status in [`ChatStatus::runnable`](chatstate_model::ChatStatus::runnable), which a model test
    /// proves equal to the classifier), lease missing or stale by store
    /// time (`options.heartbeat_stale`); oldest first by the row's last
    /// write of execution state (`updated_at`, then id); at most `limit`.
    ///
    /// It never waits for a row lock: a chat whose row another transaction
    /// holds locked (an Update, a Lock, a ReadLock) is skipped, not waited
    /// for; the next sweep, or the hint that transaction publishes, finds
    /// it. The answer is a snapshot: claim each chat with
    /// [`ChatMachine::try_acquire`](crate::ChatMachine::try_acquire), which
    /// decides again under the lock.
    fn claimable(
        &self,
        options: &Options,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<ChatId>, StoreError>> + Send;

    /// [`Store::claimable`] among `chats` only: those of them that need an
    /// owner now, by the same rules, oldest first. Like `claimable` it never
    /// waits for a row lock, so a chat another worker is claiming right now
    /// is left out. A worker asks this before claiming a hinted chat, so
    /// that a hint every worker hears does not make every worker lock the
    /// row. Unknown ids are ignored.
    fn claimable_among(
        &self,
        chats: &[ChatId],
        options: &Options,
    ) -> impl Future<Output = Result<Vec<ChatId>, StoreError>> + Send;
}

/// What [`Store::create_chat`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    /// Created; the ids of the initial messages, in order.
    Created(Vec<MessageId>),
    /// A chat with this id exists already (its current state); nothing
    /// was written.
    AlreadyExists(ExecutionState),
}

/// An open store transaction. Dropping it without [`StoreTx::commit`] rolls
/// it back.
///
/// Its methods write plans and chat rows, so the machine keeps them to
/// itself: inside an Update the application reaches the transaction only
/// through [`StoreTx::App`], by [`Tx::app`](crate::Tx::app).
pub trait StoreTx: Send {
    /// What the application may do in this transaction besides
    /// transitions: the store's means for the application's own writes
    /// (its billing rows, its outbox), committed or rolled back with the
    /// Update. It must offer nothing that writes a plan, a chat row or
    /// metadata, or otherwise reaches this transaction's own methods; a
    /// store with nothing to offer uses `()`.
    type App<'a>: Send
    where
        Self: 'a;

    /// The application's handle on this transaction (see
    /// [`StoreTx::App`]).
    fn app(&mut self) -> Self::App<'_>;

    /// Writes a plan decided against the snapshot of `chat` (which this
    /// transaction has locked exclusively), in one step, and returns the
    /// ids given to the inserted rows.
    fn apply(
        &mut self,
        chat: ChatId,
        plan: &Plan,
    ) -> impl Future<Output = Result<Assigned, StoreError>> + Send;

    /// Reads what EditMessage needs to know about `message` of `chat`.
    fn edit_context(
        &mut self,
        chat: ChatId,
        message: MessageId,
    ) -> impl Future<Output = Result<EditContext, StoreError>> + Send;

    /// Inside this transaction, takes the exclusive lock of another chat
    /// and bumps it (a nested Update). `None` if it does not exist.
    fn begin_nested(
        &mut self,
        chat: ChatId,
        options: &Options,
    ) -> impl Future<Output = Result<Option<Snapshot>, StoreError>> + Send;

    /// Reads the whole of a chat this transaction has locked.
    fn load(&mut self, chat: ChatId)
    -> impl Future<Output = Result<ChatRecord, StoreError>> + Send;

    /// Writes metadata of a chat this transaction has locked exclusively.
    /// Metadata is not execution state: no version moves.
    fn write_metadata(
        &mut self,
        chat: ChatId,
        patch: &MetadataPatch,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Commits, delivering `notify` atomically with the commit (the store's
    /// own notification channel; empty unless the machine notifies in
    /// transaction).
    fn commit(self, notify: &[Notification])
    -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Rolls back now (dropping also rolls back, but may be costlier).
    fn rollback(self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Chat metadata: not execution state, written freely under a lock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMetadata {
    /// Title.
    pub title: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Free JSON.
    pub metadata: Option<JsonText>,
}

/// A change of metadata; `None` fields are left as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetadataPatch {
    /// New title.
    pub title: Option<String>,
    /// New labels (replacing all).
    pub labels: Option<BTreeMap<String, String>>,
    /// New free JSON (`Some(None)` clears it).
    pub metadata: Option<Option<JsonText>>,
}

/// Everything stored about a chat, read under a lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatRecord {
    /// The row.
    pub row: ChatRow,
    /// Metadata.
    pub metadata: ChatMetadata,
    /// The queue, head first.
    pub queue: Vec<QueuedMessage>,
    /// Every message in id order, soft-deleted ones included.
    pub history: Vec<Message>,
}

impl ChatRecord {
    /// The classified state.
    pub fn state(&self) -> ExecutionState {
        self.row.classify(!self.queue.is_empty())
    }

    /// The active history.
    pub fn active_history(&self) -> impl DoubleEndedIterator<Item = &Message> {
        self.history.iter().filter(|m| !m.deleted)
    }
}

/// Controls a store offers to tests and trace replays: moving store time
/// and writing rows no transition would write.
pub trait TestControl {
    /// Moves store time forward (the in-memory clock), or ages every stored
    /// heartbeat by `by` (Postgres, whose clock cannot move).
    fn advance_clock(
        &self,
        by: std::time::Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Writes a chat's status and archived flag directly, bypassing the
    /// matrix and the versions (to create legacy or Invalid rows).
    fn set_raw_state(
        &self,
        chat: ChatId,
        status: &chatstate_model::ChatStatus,
        archived: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

//! `Lock` and `ReadLock` views of a chat held under its row lock.

use chatstate_model::{ChatId, ExecutionState, Snapshot};

use crate::error::Error;
use crate::store::{ChatRecord, MetadataPatch, Store, StoreTx};
use crate::tx::{Poison, poison_on_error};

/// A chat held under a shared row lock (ReadLock): reads only.
pub struct ReadLocked<'a, S: Store> {
    pub(crate) stx: &'a mut S::Tx,
    pub(crate) chat_id: ChatId,
    pub(crate) snap: Snapshot,
    /// The first store error seen (a Lock then refuses to commit).
    pub(crate) poisoned: Option<Poison>,
}

impl<S: Store> ReadLocked<'_, S> {
    /// The chat.
    pub fn chat_id(&self) -> ChatId {
        self.chat_id
    }

    /// The snapshot taken with the lock.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    /// The classified state.
    pub fn state(&self) -> ExecutionState {
        self.snap.state()
    }

    /// Reads the whole chat.
    pub async fn load(&mut self) -> Result<ChatRecord, Error> {
        let record = self.stx.load(self.chat_id).await;
        poison_on_error(&mut self.poisoned, record)
    }
}

/// A chat held under an exclusive row lock (Lock): reads, and metadata
/// writes that roll back with the callback.
pub struct Locked<'a, S: Store> {
    pub(crate) view: ReadLocked<'a, S>,
}

impl<'a, S: Store> std::ops::Deref for Locked<'a, S> {
    type Target = ReadLocked<'a, S>;
    fn deref(&self) -> &Self::Target {
        &self.view
    }
}

impl<S: Store> std::ops::DerefMut for Locked<'_, S> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.view
    }
}

impl<S: Store> Locked<'_, S> {
    /// Writes metadata (committed with the lock's transaction).
    pub async fn write_metadata(&mut self, patch: MetadataPatch) -> Result<(), Error> {
        let done = self
            .view
            .stx
            .write_metadata(self.view.chat_id, &patch)
            .await;
        poison_on_error(&mut self.view.poisoned, done)
    }
}

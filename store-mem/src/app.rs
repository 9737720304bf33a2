//! The application's handle on an Update's transaction: hooks run at
//! commit, and nothing that reaches the chat's rows.

use crate::MemTx;

/// What the application may do in an Update's transaction on the
/// in-memory store ([`chatstate::StoreTx::App`] of [`MemTx`]), reached
/// with [`chatstate::Tx::app`]: register hooks that run when it commits.
///
/// The handle borrows the transaction but offers none of its methods, so
/// the chat still changes only through the Update's transitions.
pub struct MemApp<'a> {
    tx: &'a mut MemTx,
}

impl std::fmt::Debug for MemApp<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemApp")
            .field("hooks", &self.tx.hooks.len())
            .finish_non_exhaustive()
    }
}

impl<'a> MemApp<'a> {
    pub(crate) fn new(tx: &'a mut MemTx) -> Self {
        MemApp { tx }
    }

    /// Registers the application's own write to run when this transaction
    /// commits: exactly once if it commits, never if it rolls back (an
    /// error, a rejected Update, a dropped future, a failed commit).
    ///
    /// It is the in-memory counterpart of the Postgres store's statements
    /// in an Update's transaction. Hooks run in registration order inside
    /// the commit, after the chat's changes are final and before its row
    /// locks are released: whoever reads the chat under its lock (an
    /// Update, a Lock, a ReadLock) after the commit also sees what the
    /// hooks wrote, and whoever sees what a hook wrote and then locks the
    /// chat sees the committed chat. A hook cannot fail and must not block
    /// or call back into the store (it would wait on the row locks it runs
    /// under); it should only move the application's in-memory state.
    ///
    /// ```
    /// # use chatstate::{ChatMachine, CreateChat, NewMessage, Options, RecordingPublisher, create_chat};
    /// # use chatstate_store_mem::MemStore;
    /// # use std::sync::{Arc, Mutex};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), chatstate::Error> {
    /// # let store = MemStore::new();
    /// # let publisher = Arc::new(RecordingPublisher::new());
    /// # let created = create_chat(&store, &publisher.clone().into(), CreateChat {
    /// #     messages: vec![NewMessage::user("hello")], ..CreateChat::default() }).await?;
    /// let chat = ChatMachine::new(store, publisher, created.chat_id, Options::default());
    /// let outbox: Arc<Mutex<Vec<String>>> = Arc::default();
    /// let out = outbox.clone();
    /// let refused = chat.update(async |tx| {
    ///     tx.app().on_commit(move || out.lock().unwrap().push("archived".into()));
    ///     tx.set_archived(true).await // rejected: the chat is running
    /// }).await;
    /// assert!(refused.is_err());
    /// assert!(outbox.lock().unwrap().is_empty(), "rolled back: the hook never ran");
    /// # Ok(())
    /// # }
    /// ```
    pub fn on_commit(&mut self, hook: impl FnOnce() + Send + 'static) {
        self.tx.hooks.push(Box::new(hook));
    }
}

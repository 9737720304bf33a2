//! Test support for chatstate: backends to run the same tests on, canned
//! ways to bring a chat into every state, and the generic store suite.
//!
//! Every test in [`suite`] is generic over a [`Backend`]: the in-memory
//! store ([`MemBackend`]) and Postgres ([`PgBackend`], a fresh database per
//! test on a throwaway cluster the harness starts itself). The test binaries
//! in `tests/tests/` instantiate the suite once per backend.

pub mod boundary;
pub mod concurrency;
pub mod conformance;
pub mod failures;
pub mod faults;
pub mod fixture;
pub mod hostile;
pub mod observed;
pub mod paths;
pub mod regressions;
pub mod suite;
pub mod sut;
pub mod world;

use std::future::Future;

use chatstate::{Store, TestControl};
use chatstate_model::{ChatId, Notification, Timestamp};
use chatstate_store_mem::{MemClock, MemStore};

pub use fixture::{Fx, Setup, SetupStep};

/// A store implementation the generic tests can run on.
pub trait Backend: Send + Sync + 'static {
    /// The store.
    type S: Store + TestControl;

    /// A name for messages.
    fn name(&self) -> &'static str;

    /// A fresh, empty store (for Postgres: a new database).
    fn store(&self) -> impl Future<Output = Self::S> + Send;

    /// How many transactions are waiting for a row lock right now.
    fn lock_waiters(&self, store: &Self::S) -> impl Future<Output = usize> + Send;

    /// How many heartbeat rows the store holds, over every chat.
    fn heartbeat_rows(&self, store: &Self::S) -> impl Future<Output = usize> + Send;

    /// Starts listening to the `chat:update` notifications the store
    /// delivers with its commits ([`chatstate::Notify::InTransaction`]) for
    /// one chat.
    fn listen(&self, store: &Self::S, chat: ChatId) -> impl Future<Output = Feed> + Send;
}

/// Notifications a store delivered with its commits, for one chat.
pub enum Feed {
    /// The in-memory store's bus.
    Mem(
        tokio::sync::broadcast::Receiver<chatstate::Published>,
        ChatId,
    ),
    /// A Postgres LISTEN connection.
    Pg(Box<chatstate_store_pg::PgNotifyListener>),
}

impl Feed {
    /// The next `chat:update` of the chat (waits for it).
    pub async fn next_update(&mut self) -> Notification {
        loop {
            let n = match self {
                Feed::Mem(rx, chat) => {
                    let n = rx
                        .recv()
                        .await
                        .expect("bus open")
                        .notification()
                        .expect("well-formed payload");
                    if n.chat_id() != *chat {
                        continue;
                    }
                    n
                }
                Feed::Pg(listener) => match listener.recv().await.expect("listener") {
                    chatstate_store_pg::ListenerEvent::Notification(n) => n,
                    other => panic!("unexpected listener event {other:?}"),
                },
            };
            if matches!(n, Notification::Update { .. }) {
                return n;
            }
        }
    }
}

/// The in-memory store on a manual clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemBackend;

/// The start of the manual clock in tests (2026-01-01T00:00:00Z).
pub const TEST_EPOCH: Timestamp = Timestamp(1_767_225_600_000_000);

impl Backend for MemBackend {
    type S = MemStore;

    fn name(&self) -> &'static str {
        "mem"
    }

    async fn store(&self) -> MemStore {
        MemStore::with_clock(MemClock::manual(TEST_EPOCH))
    }

    async fn lock_waiters(&self, store: &MemStore) -> usize {
        store.lock_waiters()
    }

    async fn heartbeat_rows(&self, store: &MemStore) -> usize {
        store.heartbeat_rows()
    }

    async fn listen(&self, store: &MemStore, chat: ChatId) -> Feed {
        Feed::Mem(store.subscribe(), chat)
    }
}

/// PostgreSQL: a fresh, migrated database per store on the throwaway cluster
/// the harness starts itself (or on `DATABASE_URL`). Without either, the
/// test fails with a message naming both remedies; it never skips.
#[derive(Clone, Copy, Debug, Default)]
pub struct PgBackend;

impl Backend for PgBackend {
    type S = chatstate_store_pg::PgStore;

    fn name(&self) -> &'static str {
        "pg"
    }

    async fn store(&self) -> chatstate_store_pg::PgStore {
        let cluster = chatstate_testing::throwaway::Cluster::shared()
            .unwrap_or_else(|e| panic!("Postgres tests cannot run: {e}"));
        let pool = cluster
            .new_database()
            .await
            .unwrap_or_else(|e| panic!("Postgres tests cannot create a database: {e}"));
        chatstate_store_pg::PgStore::new(pool)
    }

    async fn lock_waiters(&self, store: &chatstate_store_pg::PgStore) -> usize {
        store.lock_waiters().await.expect("count lock waiters")
    }

    async fn heartbeat_rows(&self, store: &chatstate_store_pg::PgStore) -> usize {
        store.heartbeat_rows().await.expect("count heartbeat rows")
    }

    async fn listen(&self, store: &chatstate_store_pg::PgStore, chat: ChatId) -> Feed {
        let mut listener = chatstate_store_pg::PgNotifyListener::connect(store.pool())
            .await
            .expect("connect listener");
        listener.listen_chats([chat]).await.expect("listen");
        Feed::Pg(Box::new(listener))
    }
}

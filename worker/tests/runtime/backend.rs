//! The two stores the runtime tests run on, behind one trait: the
//! in-memory store (after-commit publisher, injected clock) and Postgres
//! (a fresh database of the throwaway cluster, NOTIFY with the commit).

use std::sync::Arc;
use std::time::Duration;

use chatstate::{
    BroadcastPublisher, ChatId, ChatMachine, ChatRecord, CreateChat, NewMessage, Notify, Options,
    Published, Store, TestControl, Timestamp, create_chat,
};
use chatstate_store_mem::{MemClock, MemStore};
use chatstate_store_pg::{PgNotifyListener, PgStore};
use chatstate_testing::throwaway::Cluster;
use chatstate_worker::{HintEvent, HintSource};
use tokio::sync::broadcast;

/// A store under test.
pub(crate) trait Backend: Send + Sync + 'static {
    /// The store.
    type S: Store + TestControl;

    /// A fresh, empty store.
    fn new() -> impl Future<Output = Self> + Send
    where
        Self: Sized;

    /// The store (cheap clone).
    fn store(&self) -> Self::S;

    /// Where Updates publish.
    fn notify(&self) -> Notify;

    /// A new subscription to ownership hints.
    fn hints(&self) -> impl Future<Output = Hints> + Send;

    /// True when store time is injected (the in-memory clock).
    fn injected_clock(&self) -> bool;

    /// A machine on `chat` with `options`.
    fn machine(&self, chat: ChatId, options: Options) -> ChatMachine<Self::S> {
        ChatMachine::new(self.store(), self.notify(), chat, options)
    }

    /// Creates a running chat with one user message.
    fn create(&self, text: &str) -> impl Future<Output = ChatId> + Send {
        let (store, notify) = (self.store(), self.notify());
        let text = text.to_owned();
        async move {
            let created = create_chat(
                &store,
                &notify,
                CreateChat {
                    messages: vec![NewMessage::user(text)],
                    ..CreateChat::default()
                },
            )
            .await
            .expect("create chat");
            created.chat_id
        }
    }

    /// Reads a chat.
    fn load(&self, chat: ChatId) -> impl Future<Output = ChatRecord> + Send {
        let machine = self.machine(chat, Options::default());
        async move { machine.load().await.expect("load chat") }
    }

    /// Ages every lease by `by` (moves the in-memory clock; ages the stored
    /// heartbeats on Postgres).
    fn age_leases(&self, by: Duration) -> impl Future<Output = ()> + Send {
        let store = self.store();
        async move { store.advance_clock(by).await.expect("advance clock") }
    }
}

/// The in-memory store on a manual clock, publishing after commit through
/// a broadcast publisher.
pub(crate) struct Mem {
    store: MemStore,
    publisher: Arc<BroadcastPublisher>,
}

impl Backend for Mem {
    type S = MemStore;

    async fn new() -> Self {
        Mem {
            store: MemStore::with_clock(MemClock::manual(Timestamp(1_800_000_000_000_000))),
            publisher: Arc::new(BroadcastPublisher::new(4096)),
        }
    }

    fn store(&self) -> MemStore {
        self.store.clone()
    }

    fn notify(&self) -> Notify {
        self.publisher.clone().into()
    }

    async fn hints(&self) -> Hints {
        Hints::Mem(self.publisher.subscribe())
    }

    fn injected_clock(&self) -> bool {
        true
    }
}

/// Postgres: a fresh migrated database of the throwaway cluster,
/// notifications delivered with the commit.
pub(crate) struct Pg {
    store: PgStore,
}

impl Backend for Pg {
    type S = PgStore;

    async fn new() -> Self {
        let cluster = Cluster::shared().unwrap_or_else(|e| panic!("{e}"));
        let pool = cluster
            .new_database()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        Pg {
            store: PgStore::new(pool),
        }
    }

    fn store(&self) -> PgStore {
        self.store.clone()
    }

    fn notify(&self) -> Notify {
        Notify::InTransaction
    }

    async fn hints(&self) -> Hints {
        Hints::Pg(
            chatstate_worker::pg::ownership_listener(&self.store)
                .await
                .expect("listen on chat:ownership"),
        )
    }

    fn injected_clock(&self) -> bool {
        false
    }
}

/// Either store's hint source.
pub(crate) enum Hints {
    /// The broadcast publisher's subscription.
    Mem(broadcast::Receiver<Published>),
    /// The Postgres listener.
    Pg(PgNotifyListener),
}

impl HintSource for Hints {
    async fn recv(&mut self) -> HintEvent {
        match self {
            Hints::Mem(rx) => HintSource::recv(rx).await,
            Hints::Pg(listener) => HintSource::recv(listener).await,
        }
    }
}

/// Waits until `condition` holds (a runtime's counters reached a value),
/// checking every few milliseconds; fails after 20 s.
pub(crate) async fn until(what: &str, condition: impl Fn() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting until {what}");
}

/// Runs a generic test on both stores, as `<name>::mem` and `<name>::pg`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mem() {
                super::$name::<crate::backend::Mem>().await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pg() {
                super::$name::<crate::backend::Pg>().await
            }
        }
    )*};
}

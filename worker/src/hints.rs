//! Sources of ownership hints: where the runtime hears that a chat needs an
//! owner.
//!
//! A hint is only a hint. It may be lost (a listener reconnecting, a
//! subscriber lagging, a worker crashing between commit and publish), it may
//! arrive twice, and it may be stale by the time it is read. The runtime
//! therefore filters hints cheaply before claiming, claims with
//! `ChatMachine::try_acquire` (which decides under the row lock), and runs a
//! periodic sweep of `Store::claimable` for what no hint announced.
//!
//! [`HintSource`] is the one thing a source implements. This crate provides
//! it for the in-process [`BroadcastPublisher`](chatstate::BroadcastPublisher)
//! subscription (and the in-memory store's bus, which has the same type) and,
//! with the `pg` feature, for the Postgres listener.

use std::future::Future;

use chatstate::model::OWNERSHIP_CHANNEL;
use chatstate::{ChatId, Notification, Published, StoreError};
use tokio::sync::broadcast;

/// What a [`HintSource`] yields.
#[derive(Debug)]
#[non_exhaustive]
pub enum HintEvent {
    /// This chat may need an owner.
    Chat(ChatId),
    /// Hints may have been lost (a reconnect, a lagging subscription): the
    /// runtime sweeps for claimable chats at once.
    Missed,
    /// The source failed; the runtime waits a heartbeat interval and asks
    /// again. Sweeps go on meanwhile.
    Failed(StoreError),
    /// The source has ended for good; the runtime goes on with sweeps
    /// alone.
    Closed,
}

/// A stream of ownership hints.
///
/// `recv` is called in a loop by a task of the runtime until it returns
/// [`HintEvent::Closed`] or the runtime stops; it must be cancel-safe in
/// the sense that dropping a pending `recv` loses at most that hint.
pub trait HintSource: Send + 'static {
    /// Waits for the next hint.
    fn recv(&mut self) -> impl Future<Output = HintEvent> + Send;
}

/// The in-process publisher's subscription
/// ([`BroadcastPublisher::subscribe`](chatstate::BroadcastPublisher::subscribe)),
/// or the in-memory store's bus (`MemStore::subscribe`): ownership hints
/// become [`HintEvent::Chat`], a lagging receiver [`HintEvent::Missed`].
impl HintSource for broadcast::Receiver<Published> {
    async fn recv(&mut self) -> HintEvent {
        loop {
            match broadcast::Receiver::recv(self).await {
                Ok(published) => {
                    if published.channel != OWNERSHIP_CHANNEL {
                        continue;
                    }
                    // A malformed hint is skipped: the sweep covers it.
                    if let Ok(Notification::Ownership(hint)) = published.notification() {
                        return HintEvent::Chat(hint.chat_id);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => return HintEvent::Missed,
                Err(broadcast::error::RecvError::Closed) => return HintEvent::Closed,
            }
        }
    }
}

/// The Postgres hint source: a [`PgNotifyListener`] subscribed to
/// `chat:ownership`.
///
/// [`PgNotifyListener`]: chatstate_store_pg::PgNotifyListener
#[cfg(feature = "pg")]
pub mod pg {
    use chatstate::Notification;
    use chatstate::StoreError;
    use chatstate_store_pg::{ListenerEvent, PgNotifyListener, PgStore};

    use super::{HintEvent, HintSource};

    /// A listener on its own connection to the database of `store`,
    /// subscribed to `chat:ownership`.
    pub async fn ownership_listener(store: &PgStore) -> Result<PgNotifyListener, StoreError> {
        let mut listener = PgNotifyListener::connect(store.pool()).await?;
        listener.listen_ownership().await?;
        Ok(listener)
    }

    /// Ownership hints become [`HintEvent::Chat`]; a reconnect (whatever
    /// was committed meanwhile is lost) becomes [`HintEvent::Missed`];
    /// `chat:update` notifications, if the listener also follows chats, are
    /// skipped.
    impl HintSource for PgNotifyListener {
        async fn recv(&mut self) -> HintEvent {
            loop {
                match PgNotifyListener::recv(self).await {
                    Ok(ListenerEvent::Notification(Notification::Ownership(hint))) => {
                        return HintEvent::Chat(hint.chat_id);
                    }
                    Ok(ListenerEvent::Reconnected) => return HintEvent::Missed,
                    Ok(_) => {}
                    Err(e) => return HintEvent::Failed(e),
                }
            }
        }
    }
}

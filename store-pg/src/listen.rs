//! Receiving `chat:update:<id>` and `chat:ownership` notifications over
//! `LISTEN`.
//!
//! Notifications are hints and Postgres keeps none for a session that is
//! not connected: whatever is committed while the listener reconnects is
//! lost. The listener therefore reports every reconnect as
//! [`ListenerEvent::Reconnected`]; a receiver then reloads the chats it
//! follows, or notices the gap when the next `snapshot_version` it sees is
//! more than one above its high-water mark.

use chatstate::{StoreError, StoreErrorKind};
use chatstate_model::{ChatId, Notification, OWNERSHIP_CHANNEL, UPDATE_CHANNEL_PREFIX};
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};

use crate::error::store_error;

/// The `application_name` of listener sessions (so tests and operators can
/// find them in `pg_stat_activity`).
pub const LISTENER_APPLICATION_NAME: &str = "chatstate-listener";

/// What [`PgNotifyListener::recv`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenerEvent {
    /// A notification on a subscribed channel.
    Notification(Notification),
    /// The connection was lost and is back, listening on every subscribed
    /// channel again. Notifications committed in between are lost.
    Reconnected,
}

/// A typed listener on the store's notification channels, with its own
/// connection (not one of the store pool's).
pub struct PgNotifyListener {
    pool: PgPool,
    /// `None` only while a rebuild is under way (or after it failed).
    listener: Option<PgListener>,
    channels: Vec<String>,
}

impl std::fmt::Debug for PgNotifyListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgNotifyListener")
            .field("channels", &self.channels)
            .finish_non_exhaustive()
    }
}

/// The update channel of a chat.
pub fn update_channel(chat: ChatId) -> String {
    format!("{UPDATE_CHANNEL_PREFIX}{chat}")
}

impl PgNotifyListener {
    /// A listener on the database of `pool`, subscribed to nothing yet.
    /// It opens a dedicated connection with the pool's connect options.
    pub async fn connect(pool: &PgPool) -> Result<Self, StoreError> {
        let options = (*pool.connect_options())
            .clone()
            .application_name(LISTENER_APPLICATION_NAME);
        // One connection, never recycled by age or idleness: a listener
        // must stay connected to hear anything.
        let own = PgPoolOptions::new()
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(|e| store_error("connect listener", e))?;
        let listener = PgListener::connect_with(&own)
            .await
            .map_err(|e| store_error("connect listener", e))?;
        Ok(PgNotifyListener {
            pool: own,
            listener: Some(listener),
            channels: Vec::new(),
        })
    }

    /// Subscribes to `chat:ownership`.
    pub async fn listen_ownership(&mut self) -> Result<(), StoreError> {
        self.listen_channels(vec![OWNERSHIP_CHANNEL.to_owned()])
            .await
    }

    /// Subscribes to the update channels of `chats`, in one round trip.
    pub async fn listen_chats(
        &mut self,
        chats: impl IntoIterator<Item = ChatId>,
    ) -> Result<(), StoreError> {
        self.listen_channels(chats.into_iter().map(update_channel).collect())
            .await
    }

    async fn listen_channels(&mut self, channels: Vec<String>) -> Result<(), StoreError> {
        let new: Vec<String> = channels
            .into_iter()
            .filter(|c| !self.channels.contains(c))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        if let Some(listener) = self.listener.as_mut() {
            listener
                .listen_all(new.iter().map(String::as_str))
                .await
                .map_err(|e| store_error("listen", e))?;
        }
        // Without a listener (a failed rebuild) the next rebuild listens
        // on every channel, these included.
        self.channels.extend(new);
        Ok(())
    }

    /// The channels subscribed to.
    pub fn channels(&self) -> &[String] {
        &self.channels
    }

    /// Waits for the next notification, or for a reconnect.
    ///
    /// Notifications on a channel this crate does not know, or with a
    /// malformed payload, are skipped: they are hints, and a broken hint
    /// must not stop the stream. An error means the listener could not
    /// reconnect; calling `recv` again tries again.
    pub async fn recv(&mut self) -> Result<ListenerEvent, StoreError> {
        loop {
            let Some(listener) = self.listener.as_mut() else {
                self.rebuild().await?;
                return Ok(ListenerEvent::Reconnected);
            };
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    if let Ok(n) = Notification::parse(n.channel(), n.payload().as_bytes()) {
                        return Ok(ListenerEvent::Notification(n));
                    }
                }
                // sqlx saw the connection end, reconnected and listens
                // again on every channel.
                Ok(None) => return Ok(ListenerEvent::Reconnected),
                Err(e) => {
                    let err = store_error("receive notification", e);
                    if err.kind != StoreErrorKind::Connection {
                        return Err(err);
                    }
                    // A connection failure sqlx does not recover from by
                    // itself: start over on a fresh connection.
                    self.rebuild().await?;
                    return Ok(ListenerEvent::Reconnected);
                }
            }
        }
    }

    async fn rebuild(&mut self) -> Result<(), StoreError> {
        // Release the dead connection first: the pool holds only one.
        self.listener = None;
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .map_err(|e| store_error("reconnect listener", e))?;
        if !self.channels.is_empty() {
            listener
                .listen_all(self.channels.iter().map(String::as_str))
                .await
                .map_err(|e| store_error("reconnect listener", e))?;
        }
        self.listener = Some(listener);
        Ok(())
    }
}

//! Receiving `chat:update:<id>` and `chat:ownership` notifications over
//! `LISTEN`.
//!
//! Notifications are hints and Postgres keeps none for a session that is
//! not connected: whatever is committed while the listener reconnects is
//! lost. The listener therefore reports every reconnect as
//! [`ListenerEvent::Reconnected`]; a receiver then reloads the chats it
//! follows, or notices the gap when the next `snapshot_version` it sees is
//! more than one above its high-water mark.
//!
//! # Cancel safety
//!
//! [`PgNotifyListener::recv`] is cancel-safe: it may be raced in
//! `tokio::select!` or wrapped in a timeout, and a call that is dropped
//! before it completes loses nothing. Everything that must survive lives
//! in the listener, not in the future:
//!
//! - a notification is handed out in the same poll that takes it from the
//!   connection (there is no await between the two);
//! - a lost connection is recorded in the listener before anything else
//!   is awaited (sqlx's own eager reconnect, which would reconnect inside
//!   a cancellable call and so could swallow the loss, is off), and the
//!   [`ListenerEvent::Reconnected`] it owes is reported by whichever call
//!   sees the new connection ready;
//! - reconnecting runs in a task of its own, so it makes progress even
//!   if every `recv` is cancelled after a millisecond, and a later call
//!   picks up its result.
//!
//! # Direct connections only
//!
//! `LISTEN` belongs to a server session. Behind a transaction pooler the
//! session that listened goes back to the pooler after the statement and
//! the client hears nothing, silently. So the listener connects to the
//! server directly (give it a pool on the server's own URL, not the
//! pooler's), and [`PgNotifyListener::connect`] proves it: it listens on
//! a probe channel of its own, notifies it from another connection, and
//! fails with [`PgStoreFault::ListenerNotDelivered`](crate::PgStoreFault::ListenerNotDelivered)
//! if the probe does not arrive within two seconds.
//!
//! # Tracing
//!
//! Connecting runs in a `listener_connect` span, each reconnect in a
//! `listener_reconnect` span (target `chatstate_store_pg`). A lost
//! connection, a reconnect and a failed reconnect are each a `warn` event:
//! notifications are lost in between, which an operator wants to see.

use chatstate::{StoreError, StoreErrorKind};
use chatstate_model::{ChatId, Notification, OWNERSHIP_CHANNEL, UPDATE_CHANNEL_PREFIX};
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::error::{PgStoreFault, store_error};

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
///
/// See the module's "cancel safety" section: [`PgNotifyListener::recv`]
/// can be cancelled at any point without losing a notification or a
/// [`ListenerEvent::Reconnected`].
pub struct PgNotifyListener {
    pool: PgPool,
    state: State,
    channels: Vec<String>,
}

/// Where the listener's connection stands. Anything but `Ready` means the
/// connection was lost and a [`ListenerEvent::Reconnected`] is owed.
enum State {
    /// Connected and listening on every channel.
    Ready(PgListener),
    /// A task is connecting and listening on every channel.
    Reconnecting(JoinHandle<Result<PgListener, StoreError>>),
    /// Lost, and no reconnect under way (the last one failed, or the
    /// channels changed while it ran): the next `recv` starts one.
    Lost,
}

impl std::fmt::Debug for PgNotifyListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            State::Ready(_) => "ready",
            State::Reconnecting(_) => "reconnecting",
            State::Lost => "lost",
        };
        f.debug_struct("PgNotifyListener")
            .field("state", &state)
            .field("channels", &self.channels)
            .finish_non_exhaustive()
    }
}

impl Drop for PgNotifyListener {
    fn drop(&mut self) {
        if let State::Reconnecting(task) = &self.state {
            task.abort();
        }
    }
}

/// Reports a lost listener connection (`error`: what the receive said, if
/// it failed rather than ended).
fn lost(error: Option<&StoreError>) {
    tracing::warn!(
        target: "chatstate_store_pg",
        error = error.map(tracing::field::display),
        "listener connection lost; reconnecting"
    );
}

/// The update channel of a chat.
pub fn update_channel(chat: ChatId) -> String {
    format!("{UPDATE_CHANNEL_PREFIX}{chat}")
}

/// A listener on the one connection of `pool`, listening on `channels`.
async fn listen_on(pool: &PgPool, channels: &[String]) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // A lost connection must come back as `None` at once, not after a
    // reconnect inside `try_recv` that a cancelled call could swallow.
    listener.eager_reconnect(false);
    if !channels.is_empty() {
        listener
            .listen_all(channels.iter().map(String::as_str))
            .await?;
    }
    Ok(listener)
}

/// How long [`probe`] waits for its notification.
const PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Proves that `listener` hears what is committed: it listens on a channel
/// of its own, another connection notifies it, and the notification must
/// arrive within [`PROBE_WAIT`] (see the module's "direct connections
/// only").
async fn probe(listener: &mut PgListener, pool: &PgPool) -> Result<(), StoreError> {
    use sqlx::Connection;
    const CONTEXT: &str = "probe listener";
    let channel = format!("chatstate_probe_{}", uuid::Uuid::new_v4().simple());
    listener
        .listen(&channel)
        .await
        .map_err(|e| store_error(CONTEXT, e))?;
    let mut other = sqlx::PgConnection::connect_with(&pool.connect_options())
        .await
        .map_err(|e| store_error(CONTEXT, e))?;
    // The channel name is this function's own: a prefix and hex digits.
    let sent = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("NOTIFY {channel}")))
        .execute(&mut other)
        .await;
    let _ = other.close().await;
    let not_delivered =
        || PgStoreFault::ListenerNotDelivered { waited: PROBE_WAIT }.into_store(CONTEXT);
    match sent {
        Ok(_) => {}
        // The notification reached the connection that sent it: the
        // pooler ran its NOTIFY on the very server session that had
        // listened (a direct session never listens for another).
        Err(sqlx::Error::Protocol(_)) => return Err(not_delivered()),
        Err(e) => return Err(store_error(CONTEXT, e)),
    }
    let heard = tokio::time::timeout(PROBE_WAIT, async {
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) if n.channel() == channel => return Ok(()),
                // Nothing else is listened to yet; skip it all the same.
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(StoreError::new(
                        CONTEXT,
                        StoreErrorKind::Connection,
                        std::io::Error::other("the listener's connection closed"),
                    ));
                }
                Err(e) => return Err(store_error(CONTEXT, e)),
            }
        }
    })
    .await;
    match heard {
        Ok(result) => result?,
        Err(_) => return Err(not_delivered()),
    }
    listener
        .unlisten(&channel)
        .await
        .map_err(|e| store_error(CONTEXT, e))
}

impl PgNotifyListener {
    /// A listener on the database of `pool`, subscribed to nothing yet.
    /// It opens a dedicated connection with the pool's connect options,
    /// which must reach the server directly, not through a transaction
    /// pooler: it proves that it hears notifications before it returns
    /// (see the module's "direct connections only").
    pub async fn connect(pool: &PgPool) -> Result<Self, StoreError> {
        let span = tracing::info_span!(target: "chatstate_store_pg", "listener_connect");
        Self::connect_now(pool).instrument(span).await
    }

    async fn connect_now(pool: &PgPool) -> Result<Self, StoreError> {
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
        let mut listener = listen_on(&own, &[])
            .await
            .map_err(|e| store_error("connect listener", e))?;
        probe(&mut listener, &own).await?;
        Ok(PgNotifyListener {
            pool: own,
            state: State::Ready(listener),
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
        match &mut self.state {
            State::Ready(listener) => {
                listener
                    .listen_all(new.iter().map(String::as_str))
                    .await
                    .map_err(|e| store_error("listen", e))?;
            }
            // A reconnect under way listens on the channels it was given:
            // start over, so the next one listens on these too.
            State::Reconnecting(task) => {
                task.abort();
                self.state = State::Lost;
            }
            // The next reconnect listens on every channel, these included.
            State::Lost => {}
        }
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
    /// reconnect; calling `recv` again tries again. Cancel-safe (see the
    /// module's "cancel safety" section).
    pub async fn recv(&mut self) -> Result<ListenerEvent, StoreError> {
        loop {
            match &mut self.state {
                State::Ready(listener) => match listener.try_recv().await {
                    Ok(Some(n)) => {
                        if let Ok(n) = Notification::parse(n.channel(), n.payload().as_bytes()) {
                            return Ok(ListenerEvent::Notification(n));
                        }
                    }
                    // The connection ended: record it before any await.
                    Ok(None) => {
                        self.state = State::Lost;
                        lost(None);
                    }
                    Err(e) => {
                        let err = store_error("receive notification", e);
                        if err.kind != StoreErrorKind::Connection {
                            return Err(err);
                        }
                        self.state = State::Lost;
                        lost(Some(&err));
                    }
                },
                State::Reconnecting(task) => {
                    // Awaiting the handle by reference: a cancelled call
                    // leaves the task running and the handle in place.
                    let done = task.await;
                    match done {
                        Ok(Ok(listener)) => {
                            self.state = State::Ready(listener);
                            tracing::warn!(
                                target: "chatstate_store_pg",
                                channels = self.channels.len(),
                                "listener reconnected; notifications committed meanwhile were lost"
                            );
                            return Ok(ListenerEvent::Reconnected);
                        }
                        Ok(Err(e)) => {
                            self.state = State::Lost;
                            tracing::warn!(
                                target: "chatstate_store_pg",
                                error = %e,
                                "listener reconnect failed"
                            );
                            return Err(e);
                        }
                        Err(join) => {
                            self.state = State::Lost;
                            if join.is_panic() {
                                std::panic::resume_unwind(join.into_panic());
                            }
                            return Err(StoreError::new(
                                "reconnect listener",
                                StoreErrorKind::Connection,
                                join,
                            ));
                        }
                    }
                }
                State::Lost => {
                    // The dead listener is gone (the pool's one connection
                    // is free again); connect in a task of its own.
                    let pool = self.pool.clone();
                    let channels = self.channels.clone();
                    let span = tracing::info_span!(
                        target: "chatstate_store_pg",
                        "listener_reconnect",
                        channels = channels.len(),
                    );
                    self.state = State::Reconnecting(tokio::spawn(
                        async move {
                            listen_on(&pool, &channels)
                                .await
                                .map_err(|e| store_error("reconnect listener", e))
                        }
                        .instrument(span),
                    ));
                }
            }
        }
    }
}

//! Publication of notifications: the publisher interface, the buffer that
//! holds notifications until commit, and an in-process publisher.
//!
//! An Update never hands a notification to a publisher before its
//! transaction commits. Either the machine buffers them in a
//! [`PublishBuffer`] and flushes it after commit ([`Notify::AfterCommit`]),
//! or the store delivers them atomically with the commit
//! ([`Notify::InTransaction`], Postgres `NOTIFY`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chatstate_model::{ChatId, Notification};
use tokio::sync::broadcast;

use crate::error::{FlushError, PublishError};

/// Receives notifications after commit.
pub trait Publisher: Send + Sync {
    /// Publishes one payload on a channel.
    fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), PublishError>;
}

/// Where an Update's notifications go.
#[derive(Clone)]
pub enum Notify {
    /// Buffered during the transaction, handed to this publisher after
    /// commit.
    AfterCommit(Arc<dyn Publisher>),
    /// Handed to the store, which delivers them atomically with the commit
    /// (Postgres `NOTIFY`; the in-memory store's own bus).
    InTransaction,
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notify::AfterCommit(_) => f.write_str("AfterCommit(..)"),
            Notify::InTransaction => f.write_str("InTransaction"),
        }
    }
}

impl<P: Publisher + 'static> From<Arc<P>> for Notify {
    fn from(p: Arc<P>) -> Self {
        Notify::AfterCommit(p)
    }
}

#[derive(Default)]
struct BufferInner {
    pending: Vec<(String, Vec<u8>)>,
    flushed: bool,
    discarded: bool,
}

/// Holds notifications until the transaction they describe has committed.
///
/// Contract: [`PublishBuffer::publish`] appends (a copy) before flush or
/// discard, silently drops after discard, and fails after flush.
/// [`PublishBuffer::flush`] forwards everything pending in order, trying all
/// of them, once; later calls do nothing. [`PublishBuffer::discard`] drops
/// everything pending and disables the buffer; it is idempotent and safe
/// after flush. A buffer is itself a [`Publisher`], so a nested Update can
/// publish into an outer one.
pub struct PublishBuffer {
    inner: Arc<dyn Publisher>,
    state: Mutex<BufferInner>,
}

impl PublishBuffer {
    /// A buffer in front of `inner`.
    pub fn new(inner: Arc<dyn Publisher>) -> Self {
        PublishBuffer {
            inner,
            state: Mutex::new(BufferInner::default()),
        }
    }

    /// Buffers a notification.
    pub fn publish_notification(&self, n: &Notification) -> Result<(), PublishError> {
        self.publish(&n.channel(), &n.payload())
    }

    /// Forwards every pending notification to the inner publisher, in
    /// order; the first call only.
    pub fn flush(&self) -> Result<(), FlushError> {
        let pending = {
            let mut st = self.state.lock().expect("buffer lock");
            if st.flushed || st.discarded {
                st.flushed = true;
                return Ok(());
            }
            st.flushed = true;
            std::mem::take(&mut st.pending)
        };
        let errors: Vec<PublishError> = pending
            .iter()
            .filter_map(|(ch, payload)| self.inner.publish(ch, payload).err())
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(FlushError(errors))
        }
    }

    /// Drops every pending notification and disables the buffer.
    pub fn discard(&self) {
        let mut st = self.state.lock().expect("buffer lock");
        st.pending.clear();
        st.discarded = true;
    }

    /// The channels of the pending notifications, in order.
    pub fn buffered_channels(&self) -> Vec<String> {
        let st = self.state.lock().expect("buffer lock");
        st.pending.iter().map(|(c, _)| c.clone()).collect()
    }
}

impl Publisher for PublishBuffer {
    fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), PublishError> {
        let mut st = self.state.lock().expect("buffer lock");
        if st.discarded {
            return Ok(());
        }
        if st.flushed {
            return Err(PublishError {
                channel: channel.to_owned(),
                source: "publish after flush".into(),
            });
        }
        st.pending.push((channel.to_owned(), payload.to_vec()));
        Ok(())
    }
}

/// A notification as received: channel and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// Channel.
    pub channel: String,
    /// Payload bytes (JSON).
    pub payload: Vec<u8>,
}

impl Published {
    /// Parses the typed notification.
    pub fn notification(&self) -> Result<Notification, chatstate_model::NotificationParseError> {
        Notification::parse(&self.channel, &self.payload)
    }
}

/// An in-process publisher on a tokio broadcast channel.
///
/// Publishing with no subscriber is not an error. A subscriber that falls
/// more than `capacity` notifications behind loses the oldest ones and
/// learns so from the receiver; the high-water mark lets it catch up.
pub struct BroadcastPublisher {
    sender: broadcast::Sender<Published>,
}

impl BroadcastPublisher {
    /// A publisher keeping up to `capacity` notifications per lagging
    /// subscriber.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        BroadcastPublisher { sender }
    }

    /// A new subscription to everything published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Published> {
        self.sender.subscribe()
    }
}

impl Default for BroadcastPublisher {
    fn default() -> Self {
        Self::new(1024)
    }
}

impl Publisher for BroadcastPublisher {
    fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), PublishError> {
        // No subscribers is fine: notifications are hints.
        let _ = self.sender.send(Published {
            channel: channel.to_owned(),
            payload: payload.to_vec(),
        });
        Ok(())
    }
}

/// A publisher that records everything, and can be told to refuse
/// (for tests and diagnostics).
#[derive(Default)]
pub struct RecordingPublisher {
    log: Mutex<Vec<Published>>,
    failing: Mutex<bool>,
}

impl RecordingPublisher {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything published so far, in order.
    pub fn published(&self) -> Vec<Published> {
        self.log.lock().expect("recorder lock").clone()
    }

    /// The typed notifications published so far.
    pub fn notifications(&self) -> Vec<Notification> {
        self.published()
            .iter()
            .map(|p| p.notification().expect("recorded payloads are well formed"))
            .collect()
    }

    /// Forgets everything recorded.
    pub fn clear(&self) {
        self.log.lock().expect("recorder lock").clear();
    }

    /// Makes every later publish fail (or succeed again).
    pub fn set_failing(&self, failing: bool) {
        *self.failing.lock().expect("recorder lock") = failing;
    }
}

impl Publisher for RecordingPublisher {
    fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), PublishError> {
        if *self.failing.lock().expect("recorder lock") {
            return Err(PublishError {
                channel: channel.to_owned(),
                source: "recording publisher set to fail".into(),
            });
        }
        self.log.lock().expect("recorder lock").push(Published {
            channel: channel.to_owned(),
            payload: payload.to_vec(),
        });
        Ok(())
    }
}

/// A receiver's per-chat high-water mark of `snapshot_version`.
///
/// Notifications may be lost, duplicated or reordered; a receiver that
/// accepts only versions above its mark acts at most once per snapshot and
/// never goes backwards.
#[derive(Clone, Debug, Default)]
pub struct HighWaterMark {
    marks: HashMap<ChatId, i64>,
}

impl HighWaterMark {
    /// An empty mark.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts a `chat:update` above the chat's mark (raising it) and
    /// returns true; returns false for anything at or below it. Ownership
    /// hints never move the mark.
    pub fn accept(&mut self, n: &Notification) -> bool {
        let Notification::Update { chat_id, update } = n else {
            return false;
        };
        let mark = self.marks.entry(*chat_id).or_insert(0);
        if update.snapshot_version > *mark {
            *mark = update.snapshot_version;
            true
        } else {
            false
        }
    }

    /// The chat's mark (0: nothing seen).
    pub fn mark(&self, chat: ChatId) -> i64 {
        self.marks.get(&chat).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer() -> (Arc<RecordingPublisher>, PublishBuffer) {
        let rec = Arc::new(RecordingPublisher::new());
        let buf = PublishBuffer::new(rec.clone());
        (rec, buf)
    }

    #[test]
    fn nothing_reaches_the_publisher_before_flush() {
        let (rec, buf) = buffer();
        buf.publish("a", b"1").unwrap();
        buf.publish("b", b"2").unwrap();
        assert!(rec.published().is_empty());
        assert_eq!(buf.buffered_channels(), ["a", "b"]);
        buf.flush().unwrap();
        let got: Vec<_> = rec.published().into_iter().map(|p| p.channel).collect();
        assert_eq!(got, ["a", "b"]);
    }

    #[test]
    fn flush_tries_everything_and_joins_errors() {
        let (rec, buf) = buffer();
        buf.publish("a", b"1").unwrap();
        buf.publish("b", b"2").unwrap();
        rec.set_failing(true);
        let err = buf.flush().unwrap_err();
        assert_eq!(err.0.len(), 2);
        assert!(err.to_string().contains("a, b"));
    }

    #[test]
    fn publish_after_flush_fails_and_second_flush_is_a_no_op() {
        let (rec, buf) = buffer();
        buf.flush().unwrap();
        let err = buf.publish("late", b"x").unwrap_err();
        assert_eq!(err.channel, "late");
        buf.flush().unwrap();
        assert!(rec.published().is_empty());
    }

    #[test]
    fn discard_drops_and_disables() {
        let (rec, buf) = buffer();
        buf.publish("a", b"1").unwrap();
        buf.discard();
        buf.publish("b", b"2").unwrap();
        buf.discard();
        assert!(buf.buffered_channels().is_empty());
        buf.flush().unwrap();
        assert!(rec.published().is_empty());
    }

    #[test]
    fn high_water_mark_never_goes_back() {
        use chatstate_model::ChatUpdate;
        let chat = ChatId(uuid::Uuid::nil());
        let n = |v| Notification::Update {
            chat_id: chat,
            update: ChatUpdate {
                snapshot_version: v,
                worker_id: None,
                runner_id: None,
                history_version: 0,
                queue_version: 0,
                retry_state_version: 0,
                generation_attempt: 0,
                status: "running".into(),
                archived: false,
            },
        };
        let mut hwm = HighWaterMark::new();
        assert!(hwm.accept(&n(2)));
        assert!(!hwm.accept(&n(1)));
        assert!(!hwm.accept(&n(2)));
        assert!(hwm.accept(&n(3)));
        assert_eq!(hwm.mark(chat), 3);
    }
}

//! Notifications: the `chat:update` and `chat:ownership` payloads.
//!
//! Both are hints. Receivers keep a per-chat high-water mark of
//! `snapshot_version`, drop anything at or below it, and reload the chat
//! before acting. The payloads are built from the committed row only.

use serde::{Deserialize, Serialize};

use crate::data::{ChatId, ChatRow, RunnerId, WorkerId};
use crate::rules::Snapshot;

/// The global channel of ownership hints.
pub const OWNERSHIP_CHANNEL: &str = "chat:ownership";

/// The prefix of per-chat update channels (`chat:update:<uuid>`).
pub const UPDATE_CHANNEL_PREFIX: &str = "chat:update:";

/// Postgres NOTIFY payloads must be shorter than this many bytes.
pub const MAX_PAYLOAD_BYTES: usize = 8000;

/// The payload of `chat:update:<chat_id>`: the committed row's versions,
/// ownership and status. All nine keys are always present; an unowned chat
/// has explicit `null` worker and runner ids.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChatUpdate {
    /// Snapshot version of the committed row.
    pub snapshot_version: i64,
    /// Owning worker.
    pub worker_id: Option<WorkerId>,
    /// Owning runner.
    pub runner_id: Option<RunnerId>,
    /// History version.
    pub history_version: i64,
    /// Queue version.
    pub queue_version: i64,
    /// Retry-state version.
    pub retry_state_version: i64,
    /// Generation attempt.
    pub generation_attempt: i64,
    /// Stored status text.
    pub status: String,
    /// Archived flag.
    pub archived: bool,
}

impl ChatUpdate {
    /// The payload for a committed row.
    pub fn from_row(row: &ChatRow) -> Self {
        ChatUpdate {
            snapshot_version: row.versions.snapshot,
            worker_id: row.owner.map(|o| o.worker_id),
            runner_id: row.owner.map(|o| o.runner_id),
            history_version: row.versions.history,
            queue_version: row.versions.queue,
            retry_state_version: row.versions.retry_state,
            generation_attempt: row.generation_attempt,
            status: row.status.as_str().to_owned(),
            archived: row.archived,
        }
    }
}

/// The payload of `chat:ownership`: a runnable chat has no live lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OwnershipHint {
    /// The chat needing an owner.
    pub chat_id: ChatId,
    /// Snapshot version of the committed row.
    pub snapshot_version: i64,
}

/// One notification.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Notification {
    /// `chat:update:<chat_id>`.
    Update {
        /// The chat (named by the channel, not the payload).
        chat_id: ChatId,
        /// The payload.
        update: ChatUpdate,
    },
    /// `chat:ownership`.
    Ownership(OwnershipHint),
}

/// A payload that cannot be read back into a notification.
#[derive(Debug, thiserror::Error)]
pub enum NotificationParseError {
    /// The channel is neither `chat:ownership` nor `chat:update:<uuid>`.
    #[error("unknown notification channel {0:?}")]
    UnknownChannel(String),
    /// The payload is not the channel's JSON shape.
    #[error("malformed payload on {channel}")]
    Payload {
        /// The channel.
        channel: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

impl Notification {
    /// The channel name.
    pub fn channel(&self) -> String {
        match self {
            Notification::Update { chat_id, .. } => format!("{UPDATE_CHANNEL_PREFIX}{chat_id}"),
            Notification::Ownership(_) => OWNERSHIP_CHANNEL.to_owned(),
        }
    }

    /// The JSON payload.
    pub fn payload(&self) -> Vec<u8> {
        match self {
            Notification::Update { update, .. } => serde_json::to_vec(update),
            Notification::Ownership(hint) => serde_json::to_vec(hint),
        }
        .expect("notification payloads always serialize")
    }

    /// The chat this notification is about.
    pub fn chat_id(&self) -> ChatId {
        match self {
            Notification::Update { chat_id, .. } => *chat_id,
            Notification::Ownership(h) => h.chat_id,
        }
    }

    /// The snapshot version it announces.
    pub fn snapshot_version(&self) -> i64 {
        match self {
            Notification::Update { update, .. } => update.snapshot_version,
            Notification::Ownership(h) => h.snapshot_version,
        }
    }

    /// Reads a notification back from its channel and payload.
    pub fn parse(channel: &str, payload: &[u8]) -> Result<Self, NotificationParseError> {
        let bad = |source| NotificationParseError::Payload {
            channel: channel.to_owned(),
            source,
        };
        if channel == OWNERSHIP_CHANNEL {
            return Ok(Notification::Ownership(
                serde_json::from_slice(payload).map_err(bad)?,
            ));
        }
        let chat = channel
            .strip_prefix(UPDATE_CHANNEL_PREFIX)
            .and_then(|id| uuid::Uuid::parse_str(id).ok())
            .ok_or_else(|| NotificationParseError::UnknownChannel(channel.to_owned()))?;
        Ok(Notification::Update {
            chat_id: ChatId(chat),
            update: serde_json::from_slice(payload).map_err(bad)?,
        })
    }
}

/// The notifications of a committed Update: one `chat:update`, then a
/// `chat:ownership` hint if the chat is runnable and its lease is missing
/// or stale.
pub fn after_update(snap: &Snapshot) -> Vec<Notification> {
    after_commit(&snap.row, snap.needs_hint())
}

/// [`after_update`] from the committed row and whether it needs a hint
/// (for callers that hold no snapshot and need none other).
pub(crate) fn after_commit(row: &ChatRow, needs_hint: bool) -> Vec<Notification> {
    let mut out = vec![Notification::Update {
        chat_id: row.id,
        update: ChatUpdate::from_row(row),
    }];
    if needs_hint {
        out.push(Notification::Ownership(OwnershipHint {
            chat_id: row.id,
            snapshot_version: row.versions.snapshot,
        }));
    }
    out
}

/// The notifications of CreateChat: one `chat:update` and, since a new
/// chat is running and has no owner, always a hint.
pub fn after_create(row: &ChatRow) -> Vec<Notification> {
    vec![
        Notification::Update {
            chat_id: row.id,
            update: ChatUpdate::from_row(row),
        },
        Notification::Ownership(OwnershipHint {
            chat_id: row.id,
            snapshot_version: row.versions.snapshot,
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_payload_has_nine_keys_and_explicit_nulls() {
        let n = Notification::Update {
            chat_id: ChatId(uuid::Uuid::nil()),
            update: ChatUpdate {
                snapshot_version: 3,
                worker_id: None,
                runner_id: None,
                history_version: 2,
                queue_version: 0,
                retry_state_version: 0,
                generation_attempt: 0,
                status: "running".into(),
                archived: false,
            },
        };
        let v: serde_json::Value = serde_json::from_slice(&n.payload()).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 9);
        assert!(obj["worker_id"].is_null() && obj["runner_id"].is_null());
        let back = Notification::parse(&n.channel(), &n.payload()).unwrap();
        assert_eq!(back, n);
        assert!(n.payload().len() < MAX_PAYLOAD_BYTES);
    }

    #[test]
    fn ownership_hint_payload_carries_the_snapshot_version() {
        let n = Notification::Ownership(OwnershipHint {
            chat_id: ChatId(uuid::Uuid::nil()),
            snapshot_version: 7,
        });
        assert_eq!(
            n.payload(),
            br#"{"chat_id":"00000000-0000-0000-0000-000000000000","snapshot_version":7}"#
        );
        assert_eq!(Notification::parse(&n.channel(), &n.payload()).unwrap(), n);
        assert_eq!(n.snapshot_version(), 7);
    }
}

//! Transition inputs and the tunables that shape them.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::data::{JsonText, MessageId, NewMessage, Owner, Part, QueuedMessageId};
use crate::transition::Transition;

/// Tunables of the state machine.
///
/// Every field has bounds ([`Options::validate`]) that both stores hold
/// identically: durations are whole Postgres intervals, and store time plus
/// a duration is still a Postgres timestamp. `Options::default()` is valid;
/// the machine checks options once when it is built and refuses every call
/// of a machine built with invalid ones before it reaches its store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Options {
    /// Queue appends fail with `MessageQueueFull` at this many queued
    /// messages. Between [`Options::MIN_QUEUE_SIZE`] and
    /// [`Options::MAX_QUEUE_SIZE`].
    pub max_queue_size: u32,
    /// A lease whose heartbeat is this old (by store time) is stale.
    /// Between [`Options::MIN_DURATION`] and [`Options::MAX_DURATION`].
    pub heartbeat_stale: Duration,
    /// EnterRequiresAction sets the deadline this far after store time.
    /// Between [`Options::MIN_DURATION`] and [`Options::MAX_DURATION`].
    pub requires_action_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_queue_size: 20,
            heartbeat_stale: Duration::from_secs(30),
            requires_action_timeout: Duration::from_secs(5 * 60),
        }
    }
}

impl Options {
    /// The smallest queue cap: a chat can always queue one message.
    pub const MIN_QUEUE_SIZE: u32 = 1;
    /// The largest queue cap.
    pub const MAX_QUEUE_SIZE: u32 = 1_000_000;
    /// The shortest duration (Postgres keeps microseconds; below a
    /// millisecond a lease or a deadline means nothing).
    pub const MIN_DURATION: Duration = Duration::from_millis(1);
    /// The longest duration: 100 years of 365.25 days. Store time plus this
    /// stays far inside Postgres `timestamptz` (up to the year 294276), and
    /// it is far inside an `interval`.
    pub const MAX_DURATION: Duration = Duration::from_secs(36_525 * 24 * 60 * 60);

    /// Checks every field against its bounds.
    pub fn validate(&self) -> Result<(), OptionsError> {
        if !(Self::MIN_QUEUE_SIZE..=Self::MAX_QUEUE_SIZE).contains(&self.max_queue_size) {
            return Err(OptionsError::QueueSize {
                value: self.max_queue_size,
            });
        }
        for (field, value) in [
            ("heartbeat_stale", self.heartbeat_stale),
            ("requires_action_timeout", self.requires_action_timeout),
        ] {
            if !(Self::MIN_DURATION..=Self::MAX_DURATION).contains(&value) {
                return Err(OptionsError::Duration { field, value });
            }
        }
        Ok(())
    }
}

/// Options out of their bounds (see [`Options`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum OptionsError {
    /// `max_queue_size` is outside its bounds.
    #[error(
        "max_queue_size {value} is out of range ({}..={})",
        Options::MIN_QUEUE_SIZE,
        Options::MAX_QUEUE_SIZE
    )]
    QueueSize {
        /// The value given.
        value: u32,
    },
    /// A duration is outside its bounds.
    #[error(
        "{field} of {value:?} is out of range ({:?}..={:?})",
        Options::MIN_DURATION,
        Options::MAX_DURATION
    )]
    Duration {
        /// The field.
        field: &'static str,
        /// The value given.
        value: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_bounds() {
        assert_eq!(Options::default().validate(), Ok(()));
        let with = |f: fn(&mut Options)| {
            let mut o = Options::default();
            f(&mut o);
            o.validate()
        };
        assert_eq!(
            Options::MAX_DURATION,
            Duration::from_secs(3_155_760_000),
            "100 years"
        );
        let ok: [fn(&mut Options); 4] = [
            |o| o.max_queue_size = 1,
            |o| o.max_queue_size = Options::MAX_QUEUE_SIZE,
            |o| o.heartbeat_stale = Options::MIN_DURATION,
            |o| o.requires_action_timeout = Options::MAX_DURATION,
        ];
        for f in ok {
            assert_eq!(with(f), Ok(()));
        }
        let bad: [fn(&mut Options); 6] = [
            |o| o.max_queue_size = 0,
            |o| o.max_queue_size = u32::MAX,
            |o| o.heartbeat_stale = Duration::ZERO,
            |o| o.heartbeat_stale = Duration::from_secs(u64::MAX),
            |o| o.requires_action_timeout = Duration::from_micros(999),
            |o| o.requires_action_timeout = Options::MAX_DURATION + Duration::from_nanos(1),
        ];
        for f in bad {
            assert!(with(f).is_err());
        }
        let e = with(|o| o.heartbeat_stale = Duration::ZERO).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("heartbeat_stale of 0ns is out of range"),
            "{e}"
        );
    }
}

/// What SendMessage does when the chat is busy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusyBehavior {
    /// Queue the message behind the current turn.
    Queue,
    /// Queue the message and interrupt the current turn.
    Interrupt,
}

/// One client-supplied result for a pending dynamic tool call.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ToolResultInput {
    /// The pending call it answers.
    pub tool_call_id: String,
    /// The output as JSON text; it must parse.
    pub output: String,
    /// True if the tool failed.
    #[serde(default)]
    pub is_error: bool,
}

/// The input of one transition applied inside an Update.
///
/// CreateChat is not here: it is not applied to an existing chat (see
/// [`crate::NewChat`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Input {
    /// Archive (`true`) or unarchive (`false`).
    SetArchived {
        /// The new flag; it must differ from the current one.
        archived: bool,
    },
    /// Admit a user message.
    SendMessage {
        /// The message; its role must be `user`.
        message: NewMessage,
        /// What to do when the chat is busy.
        busy_behavior: BusyBehavior,
    },
    /// Replace an active user message and discard everything after it.
    EditMessage {
        /// The message to replace.
        message_id: MessageId,
        /// The replacement content.
        content: Vec<Part>,
        /// Author of the replacement.
        created_by: Option<Uuid>,
        /// Model configuration override (else the target's).
        model_config_id: Option<Uuid>,
    },
    /// Ask for a manual compaction turn.
    RequestCompaction,
    /// Remove one queued message.
    DeleteQueuedMessage {
        /// The queued message.
        id: QueuedMessageId,
    },
    /// Move a queued message to the head or promote it.
    PromoteQueuedMessage {
        /// The queued message.
        id: QueuedMessageId,
    },
    /// Interrupt generation or a requires-action wait.
    Interrupt {
        /// Text of synthetic cancellations; `None` or empty means the default.
        reason: Option<String>,
    },
    /// Submit results for the pending dynamic tool calls.
    CompleteRequiresAction {
        /// One result per pending call.
        results: Vec<ToolResultInput>,
        /// Author of the result messages.
        created_by: Option<Uuid>,
        /// Model configuration of the result messages.
        model_config_id: Option<Uuid>,
    },
    /// Count a generation attempt.
    RecordGenerationAttempt,
    /// Store the retry payload.
    RecordRetryState {
        /// JSON text; must be present, valid and not `null`.
        retry_state: String,
    },
    /// Append a worker step's messages.
    CommitStep {
        /// At least one message, any roles.
        messages: Vec<NewMessage>,
        /// Clear a pending compaction marker.
        consume_compaction_request: bool,
    },
    /// Wait for client tool results.
    EnterRequiresAction,
    /// Finalise an interruption.
    FinishInterruption {
        /// Partial output to commit first; afterwards no tool call may be
        /// outstanding.
        partial_messages: Vec<NewMessage>,
    },
    /// End the turn.
    FinishTurn,
    /// Stop with an error.
    FinishError {
        /// The error payload (replaces the previous one; `None` clears it).
        last_error: Option<JsonText>,
    },
    /// Cancel pending dynamic tool calls.
    CancelRequiresAction {
        /// Text of the cancellations; `None` or empty means the default.
        reason: Option<String>,
    },
    /// Repair an Invalid row.
    ReconcileInvalidState {
        /// Error payload; `None` means the default payload.
        last_error: Option<JsonText>,
        /// Text of the cancellations; `None` or empty means the default.
        cancellation_reason: Option<String>,
    },
    /// Take ownership.
    Acquire {
        /// The new owner.
        owner: Owner,
    },
    /// Give up ownership.
    Abandon,
}

impl Input {
    /// The transition this input applies.
    pub fn transition(&self) -> Transition {
        match self {
            Input::SetArchived { .. } => Transition::SetArchived,
            Input::SendMessage { .. } => Transition::SendMessage,
            Input::EditMessage { .. } => Transition::EditMessage,
            Input::RequestCompaction => Transition::RequestCompaction,
            Input::DeleteQueuedMessage { .. } => Transition::DeleteQueuedMessage,
            Input::PromoteQueuedMessage { .. } => Transition::PromoteQueuedMessage,
            Input::Interrupt { .. } => Transition::Interrupt,
            Input::CompleteRequiresAction { .. } => Transition::CompleteRequiresAction,
            Input::RecordGenerationAttempt => Transition::RecordGenerationAttempt,
            Input::RecordRetryState { .. } => Transition::RecordRetryState,
            Input::CommitStep { .. } => Transition::CommitStep,
            Input::EnterRequiresAction => Transition::EnterRequiresAction,
            Input::FinishInterruption { .. } => Transition::FinishInterruption,
            Input::FinishTurn => Transition::FinishTurn,
            Input::FinishError { .. } => Transition::FinishError,
            Input::CancelRequiresAction { .. } => Transition::CancelRequiresAction,
            Input::ReconcileInvalidState { .. } => Transition::ReconcileInvalidState,
            Input::Acquire { .. } => Transition::Acquire,
            Input::Abandon => Transition::Abandon,
        }
    }
}

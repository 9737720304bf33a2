//! Transition inputs and the tunables that shape them.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::data::{JsonText, MessageId, NewMessage, Owner, Part, QueuedMessageId};
use crate::transition::Transition;

/// Tunables of the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Options {
    /// Queue appends fail with `MessageQueueFull` at this many queued
    /// messages. Zero disables queueing.
    pub max_queue_size: u32,
    /// A lease whose heartbeat is this old (by store time) is stale.
    pub heartbeat_stale: Duration,
    /// EnterRequiresAction sets the deadline this far after store time.
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
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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

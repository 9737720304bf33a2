//! Why a transition was rejected.
//!
//! A rejection is an expected domain outcome, never an infrastructure
//! failure: the chat is unchanged, nothing was published, and the caller can
//! match on [`RejectionKind`] without reading strings.

use crate::data::{MessageId, QueuedMessageId, RunnerId};
use crate::state::ExecutionState;
use crate::transition::Transition;

/// A rejected transition: which one, from which state, and why.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{}", render(self))]
pub struct Rejection {
    /// The transition that was refused.
    pub transition: Transition,
    /// The state it was attempted from.
    pub from: ExecutionState,
    /// The reason.
    pub kind: RejectionKind,
}

/// The kinds of rejection (the sentinels and typed errors of the state model).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectionKind {
    /// The matrix does not allow the transition from the state, or an input
    /// is invalid in an allowed state (then `reason` says which).
    TransitionNotAllowed {
        /// Input validation failure; `None` for a plain matrix rejection.
        reason: Option<&'static str>,
    },
    /// The chat classifies as Invalid; only ReconcileInvalidState applies.
    InvalidState,
    /// The chat row does not exist.
    ChatNotFound,
    /// The queued message is not in this chat's queue.
    QueuedMessageNotFound {
        /// The id asked for.
        id: QueuedMessageId,
    },
    /// The message is missing, belongs to another chat, or is soft-deleted.
    MessageNotFound {
        /// The id asked for.
        id: MessageId,
    },
    /// Only user messages can be edited.
    EditedMessageNotUser {
        /// The id asked for.
        id: MessageId,
    },
    /// The queue is at its cap.
    MessageQueueFull {
        /// The cap.
        max: u32,
    },
    /// The same tool_call_id was submitted twice.
    ToolResultDuplicate {
        /// The repeated id.
        tool_call_id: String,
    },
    /// A tool result's output is not valid JSON.
    ToolResultInvalidJson {
        /// The result's id.
        tool_call_id: String,
    },
    /// A pending dynamic tool call got no result.
    ToolResultMissing {
        /// The unanswered id.
        tool_call_id: String,
    },
    /// A result answers no pending dynamic tool call.
    ToolResultUnexpected {
        /// The unexpected id.
        tool_call_id: String,
    },
    /// A JSON input (a tool result's output, a retry payload) is nested
    /// deeper than [`crate::MAX_JSON_DEPTH`].
    JsonTooDeep {
        /// The input's depth.
        depth: usize,
        /// The limit.
        max: usize,
    },
    /// A fenced worker call found another runner (or none) owning the chat.
    LeaseLost {
        /// The runner the caller holds.
        expected: RunnerId,
        /// The chat's runner now.
        actual: Option<RunnerId>,
    },
    /// A call generated from a known history found the history changed
    /// since (an edit, a send, another step): its step is stale.
    HistoryChanged {
        /// The `history_version` the caller generated from.
        expected: i64,
        /// The chat's `history_version` now.
        actual: i64,
    },
}

impl RejectionKind {
    /// The kind's name, as used in traces (`TransitionNotAllowed`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            RejectionKind::TransitionNotAllowed { .. } => "TransitionNotAllowed",
            RejectionKind::InvalidState => "InvalidState",
            RejectionKind::ChatNotFound => "ChatNotFound",
            RejectionKind::QueuedMessageNotFound { .. } => "QueuedMessageNotFound",
            RejectionKind::MessageNotFound { .. } => "MessageNotFound",
            RejectionKind::EditedMessageNotUser { .. } => "EditedMessageNotUser",
            RejectionKind::MessageQueueFull { .. } => "MessageQueueFull",
            RejectionKind::ToolResultDuplicate { .. } => "ToolResultDuplicate",
            RejectionKind::ToolResultInvalidJson { .. } => "ToolResultInvalidJson",
            RejectionKind::ToolResultMissing { .. } => "ToolResultMissing",
            RejectionKind::ToolResultUnexpected { .. } => "ToolResultUnexpected",
            RejectionKind::JsonTooDeep { .. } => "JsonTooDeep",
            RejectionKind::LeaseLost { .. } => "LeaseLost",
            RejectionKind::HistoryChanged { .. } => "HistoryChanged",
        }
    }

    /// The human reason, when the kind has one.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            RejectionKind::TransitionNotAllowed { reason } => *reason,
            RejectionKind::EditedMessageNotUser { .. } => Some(reasons::EDITED_NOT_USER),
            RejectionKind::ToolResultDuplicate { .. } => Some(reasons::TOOL_RESULT_DUPLICATE),
            RejectionKind::ToolResultInvalidJson { .. } => Some(reasons::TOOL_RESULT_INVALID_JSON),
            RejectionKind::ToolResultMissing { .. } => Some(reasons::TOOL_RESULT_MISSING),
            RejectionKind::ToolResultUnexpected { .. } => Some(reasons::TOOL_RESULT_UNEXPECTED),
            RejectionKind::JsonTooDeep { .. } => Some(reasons::JSON_TOO_DEEP),
            _ => None,
        }
    }
}

impl Rejection {
    /// True for every rejection that means "this transition is not allowed
    /// here": matrix rejections, input validation, edits of non-user
    /// messages and tool-result validation.
    pub fn is_transition_not_allowed(&self) -> bool {
        matches!(
            self.kind,
            RejectionKind::TransitionNotAllowed { .. }
                | RejectionKind::EditedMessageNotUser { .. }
                | RejectionKind::ToolResultDuplicate { .. }
                | RejectionKind::ToolResultInvalidJson { .. }
                | RejectionKind::ToolResultMissing { .. }
                | RejectionKind::ToolResultUnexpected { .. }
                | RejectionKind::JsonTooDeep { .. }
        )
    }
}

fn render(r: &Rejection) -> String {
    use RejectionKind as K;
    let base = format!(
        "chat state transition {} not allowed from state {}",
        r.transition, r.from
    );
    match &r.kind {
        K::TransitionNotAllowed { reason: None } => base,
        K::TransitionNotAllowed {
            reason: Some(reason),
        } => format!("{base}: {reason}"),
        K::InvalidState => "chat is in an invalid execution state".to_owned(),
        K::ChatNotFound => "chat not found".to_owned(),
        K::QueuedMessageNotFound { id } => format!("queued message not found: {id}"),
        K::MessageNotFound { id } => format!("chat message not found: {id}"),
        K::EditedMessageNotUser { id } => {
            format!("{base}: {}: message {id}", reasons::EDITED_NOT_USER)
        }
        K::MessageQueueFull { max } => format!("chat message queue is full (max {max})"),
        K::ToolResultDuplicate { tool_call_id }
        | K::ToolResultInvalidJson { tool_call_id }
        | K::ToolResultMissing { tool_call_id }
        | K::ToolResultUnexpected { tool_call_id } => format!(
            "{base}: {}: {tool_call_id}",
            r.kind.reason().unwrap_or_default()
        ),
        K::JsonTooDeep { depth, max } => format!(
            "{base}: {}: nested {depth} deep, the limit is {max}",
            reasons::JSON_TOO_DEEP
        ),
        K::LeaseLost { expected, actual } => match actual {
            Some(actual) => format!(
                "lease lost: chat is held by runner {actual}, not {expected} ({})",
                r.transition
            ),
            None => format!(
                "lease lost: chat has no runner, expected {expected} ({})",
                r.transition
            ),
        },
        K::HistoryChanged { expected, actual } => format!(
            "history changed: chat is at history version {actual}, not {expected} ({})",
            r.transition
        ),
    }
}

/// The fixed reason texts of input-validation rejections.
pub mod reasons {
    /// SetArchived with the current flag.
    pub const ARCHIVED_UNCHANGED: &str = "SetArchived input matches the current archived flag";
    /// SendMessage with a non-user message.
    pub const SEND_NOT_USER: &str = "SendMessage requires a user message";
    /// EditMessage on a non-user message.
    pub const EDITED_NOT_USER: &str = "only user messages can be edited";
    /// RecordRetryState with nothing.
    pub const RETRY_MISSING: &str = "RecordRetryState requires a retry payload";
    /// RecordRetryState with invalid JSON.
    pub const RETRY_INVALID: &str = "retry payload is not valid JSON";
    /// CommitStep with no messages.
    pub const COMMIT_EMPTY: &str = "CommitStep requires at least one message";
    /// EnterRequiresAction with nothing to wait for.
    pub const NO_PENDING_DYNAMIC: &str = "no pending dynamic tool calls";
    /// CancelRequiresAction with nothing to cancel.
    pub const NOTHING_TO_CANCEL: &str = "no pending dynamic tool calls to cancel";
    /// FinishInterruption leaving calls unanswered.
    pub const OUTSTANDING_AFTER_PARTIAL: &str =
        "outstanding tool calls remain after partial commit";
    /// ReconcileInvalidState from a valid state.
    pub const RECONCILE_VALID: &str = "reconcile is only valid for invalid states";
    /// Abandon of an unowned chat.
    pub const NOT_OWNED: &str = "chat is not owned";
    /// CreateChat with no messages.
    pub const CREATE_EMPTY: &str = "initial messages must include at least one message";
    /// CreateChat with the nil UUID as the chat's id.
    pub const CREATE_NIL_ID: &str = "a chat id must not be the nil UUID";
    /// A JSON input nested past the limit.
    pub const JSON_TOO_DEEP: &str = "JSON input is nested too deep";
    /// CreateChat for an id that exists.
    pub const CREATE_EXISTS: &str = "a chat with this id already exists";
    /// Duplicate tool result.
    pub const TOOL_RESULT_DUPLICATE: &str = "duplicate tool_call_id submitted";
    /// Tool result output not JSON.
    pub const TOOL_RESULT_INVALID_JSON: &str = "tool result output is not valid JSON";
    /// Pending call without a result.
    pub const TOOL_RESULT_MISSING: &str = "submitted tool results do not match pending tool calls";
    /// Result for no pending call.
    pub const TOOL_RESULT_UNEXPECTED: &str =
        "submitted tool_call_id does not match a pending dynamic tool call";
}

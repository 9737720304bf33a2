//! The pure state model of a chat's execution state.
//!
//! This crate holds the one definition of what a chat may do: the states and
//! their classifier ([`ExecutionState`]), the transitions and the matrix
//! ([`Transition`], [`MATRIX`]), and the semantics of every transition as a
//! single decision function ([`decide`]) with its reference application to a
//! whole chat ([`step`], [`update`]). It performs no I/O and knows nothing
//! of async runtimes or databases; the machine, the stores, the model
//! checker, the property tests and the generated docs all build on it.
//!
//! With the `check` feature it also holds the stateright models that check
//! the matrix against the semantics exhaustively ([`check`]).

#![cfg_attr(docsrs, feature(doc_cfg))]

mod chat;
mod data;
mod input;
mod notify;
mod reject;
mod rules;
mod state;
mod transition;

pub mod oracle;
pub mod render;

#[cfg(feature = "check")]
pub mod check;

pub use chat::{Call, Chat, Committed, NewChat, StepEnv, UpdateRejected, step, update};
pub use data::{
    ChatId, ChatRow, JsonError, JsonText, MAX_JSON_DEPTH, Message, MessageId, NewMessage,
    NewQueued, Owner, Part, QueuedMessage, QueuedMessageId, Role, RunnerId, Timestamp, ToolCallRef,
    ToolState, Versions, Visibility, WorkerId, content_from_value, content_to_value, json_depth,
};
pub use input::{BusyBehavior, Input, Options, OptionsError, ToolResultInput};
pub use notify::{
    ChatUpdate, MAX_PAYLOAD_BYTES, Notification, NotificationParseError, OWNERSHIP_CHANNEL,
    OwnershipHint, UPDATE_CHANNEL_PREFIX, after_create, after_update,
};
pub use reject::{Rejection, RejectionKind, reasons};
pub use rules::{
    Assigned, EditContext, EditTarget, Env, Outcome, Plan, Promotion, Snapshot, cancel_reasons,
    decide, default_reconcile_error,
};
pub use state::{ChatStatus, ExecutionState};
pub use transition::{
    Cell, MATRIX, Matrix, Transition, Triple, allowed_input_states, allowed_outputs,
    allowed_transitions_from,
};

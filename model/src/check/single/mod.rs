//! The exhaustive single-chat model: one chat under every transition.
//!
//! [`SingleChat`] is a stateright [`Model`] whose initial states are N (no
//! chat) and the twelve (status, archived, queue) combinations that classify
//! as Invalid, and whose actions are every transition with small but
//! representative inputs ([`Op`]), a few two-transition bundles, an Update
//! with no transition, CreateChat, a heartbeat and "the lease goes stale".
//! Every Update goes through [`crate::update`], so the snapshot bump and the
//! rollback of a rejected bundle are the reference ones.
//!
//! # What is checked
//!
//! Checks about a *step* (did it land in its matrix cell, did the snapshot
//! rise by one, ...) run inside [`Model::next_state`], against the values
//! before normalisation. A failed check is recorded in the next state as a
//! [`Violation`], and the property of that check is "no state carries such a
//! violation". A state with a violation has no successors, so a counter
//! example ends where the check failed. Checks about a *state* (queue cap,
//! reconciliation, an idle state is reachable) are plain state predicates;
//! "an idle or error state is reachable" is a breadth-first search of at
//! most [`REST_SEARCH_DEPTH`] steps, first over the actions that end work
//! and only then over all of them. Every non-Invalid state has a
//! `sometimes` property.
//!
//! Besides the stateright properties, the report lists which matrix triples
//! the run realised ("triple ...", one `sometimes` verdict each, so a dead
//! matrix cell fails the check) and which rejection kinds it produced
//! ("rejects with ..."): the representative inputs are meant to exercise
//! every one of them, MessageQueueFull included.
//!
//! # Keeping the space finite
//!
//! After every step the chat is normalised: soft-deleted messages are
//! dropped and message and queue ids renumbered from 1 (a decision reads ids
//! only for order and identity, never their values); `generation_attempt`
//! is capped at [`GENERATION_CAP`]; version counters become canonical
//! constants (snapshot 1, the stamped versions and message revisions 0,
//! i.e. "older than the snapshot"); the deadline and the compaction marker
//! keep only whether they are set; store time is always the same instant,
//! so the only heartbeat kept is the owner's, either fresh (at store time)
//! or just past the staleness threshold; promoted messages forget their
//! queued-row id. None of these values is read by a transition's decision,
//! which is why folding them loses no behaviour. Updates that would leave
//! more than [`MAX_HISTORY`] active messages are not offered, and every
//! message of one kind has the same content, so histories stay few.
//!
//! Which matrix triples the run realised is not part of the state: each
//! committed step sets the bit of its triple (the last execution transition
//! of its Update) in a bitset, as the rejection kinds are recorded, and the
//! report turns the bits into one `sometimes` verdict per triple. Keeping
//! the last triple in the state instead multiplied the state count by about
//! 2.5 (78,616 unique states with it, 31,189 without: the same chats, each
//! reached by several last transitions).
//!
//! The checker explores depth first (stateright's DFS keeps the current
//! path, not a frontier, so memory stays small), which makes its own paths
//! long: a property that fails gets a shortest counterexample re-derived by
//! a breadth-first search before it is reported.
//!
//! Rejected Updates lead to no new state (the chat is kept as it was), so
//! they cost time but no states. A (transition, from-state) pair the matrix
//! forbids is tried with one input only, since the matrix gate runs before
//! any input is looked at; allowed pairs are tried with every input.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use stateright::{Checker, Model, Property};
use uuid::Uuid;

use super::{CheckReport, Expectation, PropertyVerdict};
use crate::{
    BusyBehavior, Call, Chat, ChatId, ChatRow, ChatStatus, ChatUpdate, Committed, ExecutionState,
    Input, JsonText, Matrix, Message, MessageId, NewChat, NewMessage, Notification, Options, Owner,
    Part, QueuedMessage, QueuedMessageId, RejectionKind, Role, RunnerId, StepEnv, Timestamp,
    ToolResultInput, ToolState, Transition, Triple, UpdateRejected, Versions, WorkerId, step,
    update,
};

/// The queue cap of the model: small enough that MessageQueueFull is reached.
pub const QUEUE_CAP: u32 = 2;

/// The longest active history the model explores. Updates that would leave
/// more active messages are not offered.
pub const MAX_HISTORY: usize = 4;

/// `generation_attempt` values above this are folded onto it: a transition
/// only cares whether the count changes, never about its value.
pub const GENERATION_CAP: i64 = 1;

/// How many steps the search for an idle or error state may take from a
/// runnable state.
pub const REST_SEARCH_DEPTH: usize = 4;

/// Store time of every step. Time never moves for real: "the lease goes
/// stale" moves it past the threshold and then rebases it to this instant.
const NOW: Timestamp = Timestamp(1_700_000_000_000_000);
const CHAT_ID: ChatId = ChatId(Uuid::from_u128(0xc4a7));
const USER: Uuid = Uuid::from_u128(0x05e4);
const WORKER: Owner = Owner {
    worker_id: WorkerId(Uuid::from_u128(0x3041)),
    runner_id: RunnerId(Uuid::from_u128(0x4144)),
};
const DYNAMIC_TOOL: &str = "ask_user";
const SERVER_TOOL: &str = "search";
const DYNAMIC_CALL: &str = "call-ask";
const SERVER_CALL: &str = "call-search";
const UNEXPECTED_CALL: &str = "call-unknown";
const USER_TEXT: &str = "hi";
const ASSISTANT_TEXT: &str = "ok";
/// A message or queued-message id no chat of the model ever holds.
const UNKNOWN_ID: i64 = 99;
/// The legacy status of the Invalid initial states.
const LEGACY_STATUS: &str = "paused";

/// The tunables of the model: the default staleness and timeout, and a
/// queue cap of [`QUEUE_CAP`].
pub fn options() -> Options {
    Options {
        max_queue_size: QUEUE_CAP,
        ..Options::default()
    }
}

mod actions;
mod display;
mod model;
mod properties;
mod report;
mod state;
#[cfg(test)]
mod tests;

pub use self::actions::*;
use self::display::*;
pub use self::model::*;
use self::properties::*;
pub use self::report::*;
pub use self::state::*;

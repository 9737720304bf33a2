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
//! and only then over all of them. Every matrix triple and every non-Invalid state has a `sometimes`
//! property, so a dead matrix cell fails the check.
//!
//! Besides the stateright properties, the report lists which rejection kinds
//! the run produced ("rejects with ..."): the representative inputs are meant
//! to exercise every one of them, MessageQueueFull included.
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
//! The state also keeps the last execution transition as a matrix triple
//! (`last`), which the `sometimes` properties read. It multiplies the state
//! count by about 2.5 (78,616 unique states with it, 31,190 without), the
//! price of checking every triple as a stateright property.
//!
//! Rejected Updates lead to no new state (the chat is kept as it was), so
//! they cost time but no states. A (transition, from-state) pair the matrix
//! forbids is tried with one input only, since the matrix gate runs before
//! any input is looked at; allowed pairs are tried with every input.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU32, Ordering};
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

// ---------------------------------------------------------------------------
// Actions
// ---------------------------------------------------------------------------

/// Which message EditMessage targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EditPick {
    /// The last active user message (the usual edit).
    LastUser,
    /// The last active assistant message (EditedMessageNotUser).
    Assistant,
    /// An id no message has (MessageNotFound).
    Unknown,
}

/// Which queued message Delete/PromoteQueuedMessage targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueuePick {
    /// The head of the queue.
    Head,
    /// The tail of the queue.
    Tail,
    /// An id no queued message has (QueuedMessageNotFound).
    Unknown,
}

/// The tool results CompleteRequiresAction submits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResultsPick {
    /// Exactly one result per pending dynamic call.
    Exact,
    /// The first pending call has no result (ToolResultMissing).
    Missing,
    /// One result too many, for a call nobody made (ToolResultUnexpected).
    Unexpected,
    /// The first result twice (ToolResultDuplicate).
    Duplicate,
    /// The first result's output is not JSON (ToolResultInvalidJson).
    InvalidJson,
}

/// The payload RecordRetryState stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryPick {
    /// A valid payload; applied twice it is "the same value again".
    Value,
    /// Text that is not JSON (rejected).
    InvalidJson,
}

/// The messages CommitStep appends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepPick {
    /// An assistant message calling the dynamic (client-side) tool.
    DynamicCall,
    /// An assistant message calling a server-side tool.
    ServerCall,
    /// A plain assistant text.
    Text,
    /// A tool message answering every outstanding call (offered only when
    /// some call is outstanding).
    ToolResults,
    /// No message at all (rejected).
    Empty,
    /// A plain assistant text that consumes the compaction marker.
    ConsumeCompaction,
}

/// The partial output FinishInterruption commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PartialPick {
    /// Nothing (rejected while a call is outstanding).
    None,
    /// A tool message answering every outstanding call (offered only when
    /// some call is outstanding).
    AnswerOutstanding,
}

/// How CreateChat is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CreatePick {
    /// With one user message.
    UserMessage,
    /// With no messages (rejected).
    NoMessages,
}

/// One transition with a representative input. Inputs that name a message,
/// a queued message or pending tool calls are built from the chat the
/// Update starts from.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// SetArchived to this flag.
    SetArchived(bool),
    /// SendMessage with a user message and this busy behaviour.
    SendMessage(BusyBehavior),
    /// SendMessage with an assistant message (rejected).
    SendNonUserMessage,
    /// EditMessage of the picked message.
    EditMessage(EditPick),
    /// RequestCompaction.
    RequestCompaction,
    /// DeleteQueuedMessage of the picked row.
    DeleteQueuedMessage(QueuePick),
    /// PromoteQueuedMessage of the picked row.
    PromoteQueuedMessage(QueuePick),
    /// Interrupt with the default reason.
    Interrupt,
    /// CompleteRequiresAction with the picked results.
    CompleteRequiresAction(ResultsPick),
    /// RecordGenerationAttempt.
    RecordGenerationAttempt,
    /// RecordRetryState with the picked payload.
    RecordRetryState(RetryPick),
    /// CommitStep with the picked messages.
    CommitStep(StepPick),
    /// EnterRequiresAction.
    EnterRequiresAction,
    /// FinishInterruption with the picked partial output.
    FinishInterruption(PartialPick),
    /// FinishTurn.
    FinishTurn,
    /// FinishError with an error payload.
    FinishError,
    /// CancelRequiresAction with the default reason.
    CancelRequiresAction,
    /// ReconcileInvalidState with the default error and reason.
    ReconcileInvalidState,
    /// Acquire by the model's one worker.
    Acquire,
    /// Abandon.
    Abandon,
}

impl Op {
    /// Every op, each applied alone in an Update from every state.
    pub const ALL: &'static [Op] = &[
        Op::SetArchived(true),
        Op::SetArchived(false),
        Op::SendMessage(BusyBehavior::Queue),
        Op::SendMessage(BusyBehavior::Interrupt),
        Op::SendNonUserMessage,
        Op::EditMessage(EditPick::LastUser),
        Op::EditMessage(EditPick::Assistant),
        Op::EditMessage(EditPick::Unknown),
        Op::RequestCompaction,
        Op::DeleteQueuedMessage(QueuePick::Head),
        Op::DeleteQueuedMessage(QueuePick::Tail),
        Op::DeleteQueuedMessage(QueuePick::Unknown),
        Op::PromoteQueuedMessage(QueuePick::Head),
        Op::PromoteQueuedMessage(QueuePick::Tail),
        Op::PromoteQueuedMessage(QueuePick::Unknown),
        Op::Interrupt,
        Op::CompleteRequiresAction(ResultsPick::Exact),
        Op::CompleteRequiresAction(ResultsPick::Missing),
        Op::CompleteRequiresAction(ResultsPick::Unexpected),
        Op::CompleteRequiresAction(ResultsPick::Duplicate),
        Op::CompleteRequiresAction(ResultsPick::InvalidJson),
        Op::RecordGenerationAttempt,
        Op::RecordRetryState(RetryPick::Value),
        Op::RecordRetryState(RetryPick::InvalidJson),
        Op::CommitStep(StepPick::DynamicCall),
        Op::CommitStep(StepPick::ServerCall),
        Op::CommitStep(StepPick::Text),
        Op::CommitStep(StepPick::ToolResults),
        Op::CommitStep(StepPick::Empty),
        Op::CommitStep(StepPick::ConsumeCompaction),
        Op::EnterRequiresAction,
        Op::FinishInterruption(PartialPick::None),
        Op::FinishInterruption(PartialPick::AnswerOutstanding),
        Op::FinishTurn,
        Op::FinishError,
        Op::CancelRequiresAction,
        Op::ReconcileInvalidState,
        Op::Acquire,
        Op::Abandon,
    ];

    /// The bundles of two transitions in one Update: a worker ending a
    /// turn with its last step, a worker stopping for client tools, a
    /// bundle whose second call is always rejected (so the first must roll
    /// back), and a client unarchiving and sending at once.
    pub const BUNDLES: &'static [(Op, Op)] = &[
        (Op::CommitStep(StepPick::Text), Op::FinishTurn),
        (
            Op::CommitStep(StepPick::DynamicCall),
            Op::EnterRequiresAction,
        ),
        (Op::FinishTurn, Op::FinishTurn),
        (Op::SetArchived(false), Op::SendMessage(BusyBehavior::Queue)),
    ];

    /// The transition this op applies.
    pub fn transition(self) -> Transition {
        match self {
            Op::SetArchived(_) => Transition::SetArchived,
            Op::SendMessage(_) | Op::SendNonUserMessage => Transition::SendMessage,
            Op::EditMessage(_) => Transition::EditMessage,
            Op::RequestCompaction => Transition::RequestCompaction,
            Op::DeleteQueuedMessage(_) => Transition::DeleteQueuedMessage,
            Op::PromoteQueuedMessage(_) => Transition::PromoteQueuedMessage,
            Op::Interrupt => Transition::Interrupt,
            Op::CompleteRequiresAction(_) => Transition::CompleteRequiresAction,
            Op::RecordGenerationAttempt => Transition::RecordGenerationAttempt,
            Op::RecordRetryState(_) => Transition::RecordRetryState,
            Op::CommitStep(_) => Transition::CommitStep,
            Op::EnterRequiresAction => Transition::EnterRequiresAction,
            Op::FinishInterruption(_) => Transition::FinishInterruption,
            Op::FinishTurn => Transition::FinishTurn,
            Op::FinishError => Transition::FinishError,
            Op::CancelRequiresAction => Transition::CancelRequiresAction,
            Op::ReconcileInvalidState => Transition::ReconcileInvalidState,
            Op::Acquire => Transition::Acquire,
            Op::Abandon => Transition::Abandon,
        }
    }

    /// The input this op applies to `chat`, or `None` when the op does not
    /// apply (for example "edit the last user message" of a chat without
    /// one, or "answer the outstanding calls" when none is outstanding).
    pub fn input(self, chat: Option<&Chat>) -> Option<Input> {
        let input = match self {
            Op::SetArchived(archived) => Input::SetArchived { archived },
            Op::SendMessage(busy_behavior) => Input::SendMessage {
                message: user_message(),
                busy_behavior,
            },
            Op::SendNonUserMessage => Input::SendMessage {
                message: assistant_text(),
                busy_behavior: BusyBehavior::Queue,
            },
            Op::EditMessage(pick) => Input::EditMessage {
                message_id: pick.target(chat)?,
                content: vec![Part::text(USER_TEXT)],
                created_by: Some(USER),
                model_config_id: None,
            },
            Op::RequestCompaction => Input::RequestCompaction,
            Op::DeleteQueuedMessage(pick) => Input::DeleteQueuedMessage {
                id: pick.target(chat)?,
            },
            Op::PromoteQueuedMessage(pick) => Input::PromoteQueuedMessage {
                id: pick.target(chat)?,
            },
            Op::Interrupt => Input::Interrupt { reason: None },
            Op::CompleteRequiresAction(pick) => Input::CompleteRequiresAction {
                results: pick.results(&outstanding(chat, true))?,
                created_by: Some(USER),
                model_config_id: None,
            },
            Op::RecordGenerationAttempt => Input::RecordGenerationAttempt,
            Op::RecordRetryState(pick) => Input::RecordRetryState {
                retry_state: match pick {
                    RetryPick::Value => r#"{"attempt":1,"delay_ms":500}"#.to_owned(),
                    RetryPick::InvalidJson => "{".to_owned(),
                },
            },
            Op::CommitStep(pick) => {
                let messages = match pick {
                    StepPick::DynamicCall => vec![assistant_call(DYNAMIC_CALL, DYNAMIC_TOOL)],
                    StepPick::ServerCall => vec![assistant_call(SERVER_CALL, SERVER_TOOL)],
                    StepPick::Text | StepPick::ConsumeCompaction => vec![assistant_text()],
                    StepPick::ToolResults => vec![answers(chat)?],
                    StepPick::Empty => Vec::new(),
                };
                Input::CommitStep {
                    messages,
                    consume_compaction_request: pick == StepPick::ConsumeCompaction,
                }
            }
            Op::EnterRequiresAction => Input::EnterRequiresAction,
            Op::FinishInterruption(pick) => Input::FinishInterruption {
                partial_messages: match pick {
                    PartialPick::None => Vec::new(),
                    PartialPick::AnswerOutstanding => vec![answers(chat)?],
                },
            },
            Op::FinishTurn => Input::FinishTurn,
            Op::FinishError => Input::FinishError {
                last_error: Some(
                    JsonText::from_value(&serde_json::json!({"message": "provider failed"}))
                        .expect("a flat object is within the depth limit"),
                ),
            },
            Op::CancelRequiresAction => Input::CancelRequiresAction { reason: None },
            Op::ReconcileInvalidState => Input::ReconcileInvalidState {
                last_error: None,
                cancellation_reason: None,
            },
            Op::Acquire => Input::Acquire { owner: WORKER },
            Op::Abandon => Input::Abandon,
        };
        Some(input)
    }
}

impl EditPick {
    fn target(self, chat: Option<&Chat>) -> Option<MessageId> {
        let last_of = |role| {
            chat?
                .active_history()
                .filter(|m| m.role == role)
                .last()
                .map(|m| m.id)
        };
        match self {
            EditPick::LastUser => last_of(Role::User),
            EditPick::Assistant => last_of(Role::Assistant),
            EditPick::Unknown => Some(MessageId(UNKNOWN_ID)),
        }
    }
}

impl QueuePick {
    fn target(self, chat: Option<&Chat>) -> Option<QueuedMessageId> {
        match self {
            QueuePick::Head => chat?.queue.first().map(|q| q.id),
            QueuePick::Tail => chat?.queue.last().map(|q| q.id),
            QueuePick::Unknown => Some(QueuedMessageId(UNKNOWN_ID)),
        }
    }
}

impl ResultsPick {
    /// The results for these pending dynamic calls; `None` when the pick
    /// needs a pending call and there is none.
    fn results(self, pending: &[(String, String)]) -> Option<Vec<ToolResultInput>> {
        let result = |id: &str| ToolResultInput {
            tool_call_id: id.to_owned(),
            output: r#""done""#.to_owned(),
            is_error: false,
        };
        let mut exact: Vec<ToolResultInput> = pending.iter().map(|(id, _)| result(id)).collect();
        if pending.is_empty() && !matches!(self, ResultsPick::Exact | ResultsPick::Unexpected) {
            return None;
        }
        match self {
            ResultsPick::Exact => {}
            ResultsPick::Missing => {
                exact.remove(0);
            }
            ResultsPick::Unexpected => exact.push(result(UNEXPECTED_CALL)),
            ResultsPick::Duplicate => exact.push(exact[0].clone()),
            ResultsPick::InvalidJson => exact[0].output = "{".to_owned(),
        }
        Some(exact)
    }
}

/// One step of the model.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// CreateChat (from N only; there is no row to lock yet).
    CreateChat(CreatePick),
    /// An Update applying one transition.
    Update(Op),
    /// An Update applying two transitions in order.
    Bundle(Op, Op),
    /// An Update applying no transition (a metadata-only Update).
    EmptyUpdate,
    /// The owner's heartbeat (no Update: no bump, no publication).
    Heartbeat,
    /// Store time moves past the staleness threshold of the owner's lease.
    LeaseGoesStale,
}

// ---------------------------------------------------------------------------
// States
// ---------------------------------------------------------------------------

/// The always-properties that check a step rather than a state. A step
/// that fails one records a [`Violation`] naming it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Check {
    /// No committed Update takes a valid chat into Invalid, so every state
    /// reached from N classifies as valid.
    StaysValid,
    /// Every transition lands in its matrix cell, and the outcome it reports
    /// is the state the chat classifies as.
    Landing,
    /// A rejected Update leaves the chat as it was and names the transition
    /// and the from-state it was attempted from, consistently with the
    /// matrix.
    Rejection,
    /// The snapshot rises by exactly one per committed Update.
    Snapshot,
    /// History, queue and retry-state versions, message revisions and the
    /// generation attempt follow the writes of the Update.
    Versions,
    /// A committed Update publishes one `chat:update` of the committed row,
    /// then a hint exactly when the chat is runnable without a fresh lease.
    Notifications,
    /// Deciding and applying a transition never panics.
    NoPanic,
}

impl Check {
    /// Every check, in property order.
    pub const ALL: [Check; 7] = [
        Check::StaysValid,
        Check::Landing,
        Check::Rejection,
        Check::Snapshot,
        Check::Versions,
        Check::Notifications,
        Check::NoPanic,
    ];

    /// The name of the property this check backs.
    pub const fn property_name(self) -> &'static str {
        match self {
            Check::StaysValid => "reached from N classifies valid",
            Check::Landing => "landed state is in its matrix cell",
            Check::Rejection => "rejected update changes nothing",
            Check::Snapshot => "snapshot rises by one per update",
            Check::Versions => "versions follow their writes",
            Check::Notifications => "update publishes the committed row and needed hint",
            Check::NoPanic => "transitions never panic",
        }
    }
}

/// A failed step check, recorded in the state the step led to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Violation {
    /// Which check failed.
    pub check: Check,
    /// What was wrong, in one line.
    pub detail: String,
}

impl Violation {
    fn new(check: Check, detail: impl Into<String>) -> Self {
        Violation {
            check,
            detail: detail.into(),
        }
    }
}

/// A state of the model: the normalised chat, the last execution
/// transition, and the checks that failed on the way in.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ChatState {
    /// The chat; `None` before CreateChat (state N).
    pub chat: Option<Chat>,
    /// The last execution transition committed, as a matrix triple (kept
    /// by ownership-only Updates, heartbeats and staleness).
    pub last: Option<Triple>,
    /// Step checks that failed on the step into this state; empty in every
    /// healthy state. A state with a violation has no successors.
    pub violations: Vec<Violation>,
}

impl ChatState {
    /// The classified execution state.
    pub fn state(&self) -> ExecutionState {
        self.chat.as_ref().map_or(ExecutionState::N, Chat::state)
    }

    fn with_violations(&self, violations: Vec<Violation>) -> ChatState {
        ChatState {
            chat: self.chat.clone(),
            last: self.last,
            violations,
        }
    }
}

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

type Condition = fn(&SingleChat, &ChatState) -> bool;

/// The single-chat model over one matrix.
pub struct SingleChat {
    matrix: Matrix,
    options: Options,
    triples: Vec<Triple>,
    initial: Vec<ChatState>,
    properties: Vec<Property<SingleChat>>,
    /// Bit `i` is set once a step was rejected with `EXPECTED_REJECTIONS[i]`.
    /// Written by `next_state` on any thread; read only after the run.
    rejections: AtomicU32,
}

impl SingleChat {
    /// The model over `matrix` (the reference one outside tests).
    ///
    /// # Panics
    ///
    /// If the matrix has more than 128 triples (there is one property
    /// function per triple index; the reference matrix has 70).
    pub fn new(matrix: Matrix) -> Self {
        let triples = matrix.triples();
        let properties = properties(&triples);
        SingleChat {
            matrix,
            options: options(),
            triples,
            initial: initial_states(),
            properties,
            rejections: AtomicU32::new(0),
        }
    }

    /// The matrix the model gates on and checks landings against.
    pub fn matrix(&self) -> Matrix {
        self.matrix
    }

    fn env(&self) -> StepEnv<'_> {
        StepEnv {
            now: NOW,
            options: &self.options,
            matrix: self.matrix,
            fence: None,
        }
    }

    fn saw(&self, kind: &RejectionKind) {
        if let Some(i) = EXPECTED_REJECTIONS.iter().position(|n| *n == kind.name()) {
            self.rejections.fetch_or(1 << i, Ordering::Relaxed);
        }
    }

    fn create(&self, s: &ChatState, pick: CreatePick) -> Option<ChatState> {
        if s.chat.is_some() {
            return None;
        }
        let new = NewChat {
            id: CHAT_ID,
            owner_id: USER,
            dynamic_tools: [DYNAMIC_TOOL.to_owned()].into(),
            last_model_config_id: None,
            messages: match pick {
                CreatePick::UserMessage => vec![user_message()],
                CreatePick::NoMessages => Vec::new(),
            },
        };
        let created = match Chat::create(&new) {
            Ok(chat) => chat,
            Err(rejection) => {
                self.saw(&rejection.kind);
                let expected = pick == CreatePick::NoMessages
                    && rejection.transition == Transition::CreateChat
                    && rejection.from == ExecutionState::N
                    && matches!(
                        rejection.kind,
                        RejectionKind::TransitionNotAllowed { reason: Some(_) }
                    );
                return (!expected).then(|| {
                    s.with_violations(vec![Violation::new(
                        Check::Rejection,
                        format!("CreateChat({pick:?}) rejected unexpectedly: {rejection}"),
                    )])
                });
            }
        };
        let mut violations = Vec::new();
        let to = created.state();
        if !self
            .matrix
            .allows_landing(Transition::CreateChat, ExecutionState::N, to)
        {
            violations.push(self.landing_violation(Transition::CreateChat, ExecutionState::N, to));
        }
        if to == ExecutionState::Invalid {
            violations.push(Violation::new(
                Check::StaysValid,
                "CreateChat created an Invalid chat",
            ));
        }
        let v = created.row.versions;
        if v.snapshot != 1 {
            violations.push(Violation::new(
                Check::Snapshot,
                format!("CreateChat left snapshot {} (expected 1)", v.snapshot),
            ));
        }
        let revisions_ok = created.history.iter().all(|m| m.revision == 1);
        if (v.history, v.queue, v.retry_state) != (1, 0, 0)
            || created.row.generation_attempt != 0
            || !revisions_ok
        {
            violations.push(Violation::new(
                Check::Versions,
                format!(
                    "CreateChat left versions {v:?}, attempt {}, revisions ok: {revisions_ok} \
                     (expected history 1, queue 0, retry 0, attempt 0, revisions 1)",
                    created.row.generation_attempt
                ),
            ));
        }
        Some(ChatState {
            chat: Some(normalise(created, &self.options)),
            last: Some((Transition::CreateChat, ExecutionState::N, to)),
            violations,
        })
    }

    fn apply_update(&self, s: &ChatState, ops: &[Op]) -> Option<ChatState> {
        let chat = s.chat.as_ref();
        let calls: Vec<Call> = ops
            .iter()
            .map(|op| op.input(chat).map(Call::from))
            .collect::<Option<_>>()?;
        let env = self.env();
        let result = match catch_unwind(AssertUnwindSafe(|| update(chat, &calls, &env))) {
            Ok(result) => result,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                return Some(s.with_violations(vec![Violation::new(
                    Check::NoPanic,
                    format!("{} from {} panicked: {message}", ops_label(ops), s.state()),
                )]));
            }
        };
        match result {
            Err(rejected) => {
                self.saw(&rejected.rejection.kind);
                let violations = self.check_rejection(chat, &calls, &rejected);
                (!violations.is_empty()).then(|| s.with_violations(violations))
            }
            Ok(committed) => {
                let before = chat.expect("an Update commits only on an existing chat");
                let violations = self.check_committed(before, &committed);
                let last = committed
                    .outcomes
                    .iter()
                    .rev()
                    .find(|o| !o.transition.is_ownership())
                    .map(|o| (o.transition, o.from, o.to))
                    .or(s.last);
                let after = normalise(committed.chat, &self.options);
                if violations.is_empty() && after.history.len() > MAX_HISTORY {
                    // Bounded history: this Update is simply not offered.
                    return None;
                }
                Some(ChatState {
                    chat: Some(after),
                    last,
                    violations,
                })
            }
        }
    }

    /// Checks a rejected Update: the rejection names the failing call's
    /// transition and the state that call started from, and agrees with the
    /// matrix. The chat itself is kept as it was (the rollback).
    fn check_rejection(
        &self,
        chat: Option<&Chat>,
        calls: &[Call],
        rejected: &UpdateRejected,
    ) -> Vec<Violation> {
        let UpdateRejected { index, rejection } = rejected;
        let bad = |detail: String| vec![Violation::new(Check::Rejection, detail)];
        let Some(call) = calls.get(*index) else {
            return bad(format!(
                "rejection names call {index} of an Update with {} calls",
                calls.len()
            ));
        };
        // The from-state of the failing call: replay the calls before it on
        // a bumped copy, as the Update did.
        let from = match chat {
            None => ExecutionState::N,
            Some(chat) => {
                let mut current = chat.clone();
                current.row.versions.snapshot += 1;
                let env = self.env();
                for (i, earlier) in calls[..*index].iter().enumerate() {
                    match step(&current, &earlier.input, &env) {
                        Ok((next, _)) => current = next,
                        Err(r) => {
                            return bad(format!(
                                "Update reported call {index} rejected, but call {i} already \
                                 fails alone: {r}"
                            ));
                        }
                    }
                }
                current.state()
            }
        };
        let transition = call.input.transition();
        let mut out = Vec::new();
        if rejection.transition != transition || rejection.from != from {
            out.push(Violation::new(
                Check::Rejection,
                format!(
                    "{transition} from {from} was rejected as {} from {}",
                    rejection.transition, rejection.from
                ),
            ));
        }
        let allowed = self.matrix.allows(transition, from);
        let kind = &rejection.kind;
        let plain = matches!(
            kind,
            RejectionKind::TransitionNotAllowed { reason: None }
                | RejectionKind::InvalidState
                | RejectionKind::ChatNotFound
        );
        if allowed && plain {
            out.push(Violation::new(
                Check::Rejection,
                format!(
                    "the matrix allows {transition} from {from}, yet it was rejected: {rejection}"
                ),
            ));
        }
        if !allowed {
            let expected = match from {
                ExecutionState::N => matches!(kind, RejectionKind::ChatNotFound),
                ExecutionState::Invalid
                    if !transition.is_ownership()
                        && transition != Transition::ReconcileInvalidState =>
                {
                    matches!(kind, RejectionKind::InvalidState)
                }
                // Reconcile from a valid state says why (spec invariant 13).
                _ if transition == Transition::ReconcileInvalidState => {
                    matches!(kind, RejectionKind::TransitionNotAllowed { .. })
                }
                _ => matches!(kind, RejectionKind::TransitionNotAllowed { reason: None }),
            };
            if !expected {
                out.push(Violation::new(
                    Check::Rejection,
                    format!(
                        "the matrix forbids {transition} from {from}, but the rejection is \
                         {}: {rejection}",
                        kind.name()
                    ),
                ));
            }
        }
        out
    }

    /// Checks a committed Update against the chat it started from, before
    /// normalisation.
    fn check_committed(&self, before: &Chat, committed: &Committed) -> Vec<Violation> {
        let mut out = Vec::new();
        let after = &committed.chat;
        let (s0, s1) = (before.row.versions.snapshot, after.row.versions.snapshot);
        if s1 != s0 + 1 {
            out.push(Violation::new(
                Check::Snapshot,
                format!("snapshot went from {s0} to {s1}"),
            ));
        }
        if let Some(first) = committed.outcomes.first()
            && first.from != before.state()
        {
            out.push(Violation::new(
                Check::Landing,
                format!(
                    "{} reports from-state {} but the chat was {}",
                    first.transition,
                    first.from,
                    before.state()
                ),
            ));
        }
        for o in &committed.outcomes {
            if !self.matrix.allows_landing(o.transition, o.from, o.to) {
                out.push(self.landing_violation(o.transition, o.from, o.to));
            }
            if o.from != ExecutionState::Invalid && o.to == ExecutionState::Invalid {
                out.push(Violation::new(
                    Check::StaysValid,
                    format!("{} took {} into Invalid", o.transition, o.from),
                ));
            }
        }
        let reported = committed.outcomes.last().map_or(before.state(), |o| o.to);
        if after.state() != reported {
            out.push(Violation::new(
                Check::Landing,
                format!(
                    "the last outcome reports {reported}, but the chat classifies as {}",
                    after.state()
                ),
            ));
        }
        if let Some(detail) = version_mismatch(before, after) {
            out.push(Violation::new(Check::Versions, detail));
        }
        if let Some(detail) = self.notification_mismatch(committed) {
            out.push(Violation::new(Check::Notifications, detail));
        }
        out
    }

    fn landing_violation(
        &self,
        transition: Transition,
        from: ExecutionState,
        to: ExecutionState,
    ) -> Violation {
        let detail = if transition.is_ownership() {
            format!("{transition} changed the state from {from} to {to}")
        } else {
            match self.matrix.cell(transition, from) {
                Some(cell) => format!(
                    "{transition} {from}->{to} is not in the matrix cell ({transition}, {from}) \
                     -> [{}]",
                    join(cell.to.iter())
                ),
                None => format!(
                    "{transition} landed {from}->{to}, but the matrix does not allow \
                     {transition} from {from}"
                ),
            }
        };
        Violation::new(Check::Landing, detail)
    }

    fn notification_mismatch(&self, committed: &Committed) -> Option<String> {
        let chat = &committed.chat;
        let row = &chat.row;
        let needs_hint = chat.state().is_runnable() && !chat.lease_fresh(NOW, &self.options);
        let (update, rest) = match committed.notifications.as_slice() {
            [Notification::Update { chat_id, update }, rest @ ..] if *chat_id == row.id => {
                (update, rest)
            }
            other => {
                return Some(format!(
                    "expected a chat:update first, got {} notifications",
                    other.len()
                ));
            }
        };
        if *update != ChatUpdate::from_row(row) {
            return Some("the chat:update payload is not the committed row's".to_owned());
        }
        match rest {
            [] if !needs_hint => None,
            [] => Some(format!(
                "{} without a fresh lease published no hint",
                chat.state()
            )),
            [Notification::Ownership(hint)]
                if needs_hint
                    && hint.chat_id == row.id
                    && hint.snapshot_version == row.versions.snapshot =>
            {
                None
            }
            _ => Some(format!(
                "unexpected notifications after the chat:update ({} with lease {})",
                chat.state(),
                if needs_hint {
                    "missing or stale"
                } else {
                    "fresh or not needed"
                }
            )),
        }
    }

    fn heartbeat(&self, s: &ChatState) -> Option<ChatState> {
        let chat = s.chat.as_ref()?;
        let owner = chat.row.owner?;
        if chat.lease_fresh(NOW, &self.options) {
            return None;
        }
        let mut next = chat.clone();
        next.heartbeats.insert(owner.runner_id, NOW);
        Some(ChatState {
            chat: Some(normalise(next, &self.options)),
            last: s.last,
            violations: Vec::new(),
        })
    }

    fn lease_goes_stale(&self, s: &ChatState) -> Option<ChatState> {
        let chat = s.chat.as_ref()?;
        chat.row.owner?;
        if !chat.lease_fresh(NOW, &self.options) {
            return None;
        }
        // Store time moves just past the threshold; shifting every stored
        // instant back by the same amount puts store time at NOW again.
        let delta = self.options.heartbeat_stale + Duration::from_secs(1);
        let mut next = chat.clone();
        for beat in next.heartbeats.values_mut() {
            *beat = beat.minus(delta);
        }
        let row = &mut next.row;
        row.requires_action_deadline_at = row.requires_action_deadline_at.map(|t| t.minus(delta));
        row.compaction_requested_at = row.compaction_requested_at.map(|t| t.minus(delta));
        Some(ChatState {
            chat: Some(normalise(next, &self.options)),
            last: s.last,
            violations: Vec::new(),
        })
    }

    /// True if a state at rest (W, E0, E1) is reachable from `start` within
    /// [`REST_SEARCH_DEPTH`] steps of the actions `actions` offers.
    fn reaches_rest(
        &self,
        start: &ChatState,
        actions: impl Fn(&ChatState, &mut Vec<Action>),
    ) -> bool {
        let mut seen: HashSet<ChatState> = HashSet::from([start.clone()]);
        let mut frontier = vec![start.clone()];
        let mut offered = Vec::new();
        for _ in 0..REST_SEARCH_DEPTH {
            let mut next = Vec::new();
            for state in &frontier {
                offered.clear();
                actions(state, &mut offered);
                for &action in &offered {
                    let Some(n) = self.next_state(state, action) else {
                        continue;
                    };
                    if !n.violations.is_empty() {
                        continue;
                    }
                    if n.state().is_at_rest() {
                        return true;
                    }
                    if seen.insert(n.clone()) {
                        next.push(n);
                    }
                }
            }
            if next.is_empty() {
                break;
            }
            frontier = next;
        }
        false
    }

    fn rejection_coverage(&self) -> Vec<PropertyVerdict> {
        let seen = self.rejections.load(Ordering::Relaxed);
        EXPECTED_REJECTIONS
            .iter()
            .enumerate()
            .map(|(i, name)| PropertyVerdict {
                name: format!("rejects with {name}"),
                expectation: Expectation::Sometimes,
                holds: seen & (1 << i) != 0,
                path: None,
            })
            .collect()
    }
}

impl Model for SingleChat {
    type State = ChatState;
    type Action = Action;

    fn init_states(&self) -> Vec<ChatState> {
        self.initial.clone()
    }

    fn actions(&self, state: &ChatState, actions: &mut Vec<Action>) {
        if !state.violations.is_empty() {
            return;
        }
        // The matrix gate runs before any input is examined, so a pair the
        // matrix forbids is tried with the first op of its transition only.
        let from = state.state();
        let ops = Op::ALL.iter().enumerate().filter(|&(i, op)| {
            let t = op.transition();
            self.matrix.allows(t, from)
                || Op::ALL.iter().position(|o| o.transition() == t) == Some(i)
        });
        let Some(chat) = &state.chat else {
            actions.push(Action::CreateChat(CreatePick::UserMessage));
            actions.push(Action::CreateChat(CreatePick::NoMessages));
            // Every Update on a missing chat is rejected (ChatNotFound).
            actions.extend(ops.map(|(_, &op)| Action::Update(op)));
            return;
        };
        actions.extend(ops.map(|(_, &op)| Action::Update(op)));
        actions.extend(Op::BUNDLES.iter().map(|&(a, b)| Action::Bundle(a, b)));
        actions.push(Action::EmptyUpdate);
        if chat.row.owner.is_some() {
            actions.push(Action::Heartbeat);
            actions.push(Action::LeaseGoesStale);
        }
    }

    fn next_state(&self, state: &ChatState, action: Action) -> Option<ChatState> {
        if !state.violations.is_empty() {
            return None;
        }
        match action {
            Action::CreateChat(pick) => self.create(state, pick),
            Action::Update(op) => self.apply_update(state, &[op]),
            Action::Bundle(a, b) => self.apply_update(state, &[a, b]),
            Action::EmptyUpdate => {
                state.chat.as_ref()?;
                self.apply_update(state, &[])
            }
            Action::Heartbeat => self.heartbeat(state),
            Action::LeaseGoesStale => self.lease_goes_stale(state),
        }
    }

    fn format_action(&self, action: &Action) -> String {
        action.to_string()
    }

    fn format_step(&self, last_state: &ChatState, action: Action) -> Option<String> {
        self.next_state(last_state, action).map(|s| s.to_string())
    }

    fn properties(&self) -> Vec<Property<Self>> {
        self.properties.clone()
    }
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

/// The rejection kinds the representative inputs must produce.
const EXPECTED_REJECTIONS: [&str; 11] = [
    "TransitionNotAllowed",
    "InvalidState",
    "ChatNotFound",
    "QueuedMessageNotFound",
    "MessageNotFound",
    "EditedMessageNotUser",
    "MessageQueueFull",
    "ToolResultDuplicate",
    "ToolResultInvalidJson",
    "ToolResultMissing",
    "ToolResultUnexpected",
];

const QUEUE_CAP_NAME: &str = "queue never exceeds the cap";
const RECONCILE_NAME: &str = "Invalid reconciles into E0/E1";
const REST_NAME: &str = "idle or error reachable from runnable";

fn properties(triples: &[Triple]) -> Vec<Property<SingleChat>> {
    assert!(
        triples.len() <= TRIPLE_CONDITIONS.len(),
        "the single-chat model supports at most {} matrix triples, got {}",
        TRIPLE_CONDITIONS.len(),
        triples.len()
    );
    let mut out: Vec<Property<SingleChat>> = vec![
        Property::always(
            Check::StaysValid.property_name(),
            holds::<{ Check::StaysValid as usize }>,
        ),
        Property::always(
            Check::Landing.property_name(),
            holds::<{ Check::Landing as usize }>,
        ),
        Property::always(
            Check::Rejection.property_name(),
            holds::<{ Check::Rejection as usize }>,
        ),
        Property::always(QUEUE_CAP_NAME, queue_within_cap),
        Property::always(
            Check::Snapshot.property_name(),
            holds::<{ Check::Snapshot as usize }>,
        ),
        Property::always(
            Check::Versions.property_name(),
            holds::<{ Check::Versions as usize }>,
        ),
        Property::always(
            Check::Notifications.property_name(),
            holds::<{ Check::Notifications as usize }>,
        ),
        Property::always(
            Check::NoPanic.property_name(),
            holds::<{ Check::NoPanic as usize }>,
        ),
        Property::always(RECONCILE_NAME, invalid_reconciles),
        Property::always(REST_NAME, rest_reachable),
    ];
    for (i, (t, from, to)) in triples.iter().enumerate() {
        out.push(Property::sometimes(
            intern(format!("triple {t} {from}->{to}")),
            TRIPLE_CONDITIONS[i],
        ));
    }
    for (i, state) in ExecutionState::ALL.iter().enumerate() {
        if *state != ExecutionState::Invalid {
            out.push(Property::sometimes(
                intern(format!("reach {state}")),
                REACH_CONDITIONS[i],
            ));
        }
    }
    out
}

/// Property names must be `&'static str`; the triple and state names are
/// built at run time, so each distinct name is leaked once and reused by
/// every later model (a few dozen bytes per name, bounded by the matrices
/// a process ever checks).
fn intern(name: String) -> &'static str {
    static NAMES: OnceLock<Mutex<BTreeSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(known) = names.get(name.as_str()) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    names.insert(leaked);
    leaked
}

fn holds<const CHECK: usize>(_: &SingleChat, s: &ChatState) -> bool {
    !s.violations.iter().any(|v| v.check as usize == CHECK)
}

fn queue_within_cap(m: &SingleChat, s: &ChatState) -> bool {
    s.chat
        .as_ref()
        .is_none_or(|c| c.queue.len() <= m.options.max_queue_size as usize)
}

fn invalid_reconciles(m: &SingleChat, s: &ChatState) -> bool {
    let Some(chat) = &s.chat else { return true };
    if chat.state() != ExecutionState::Invalid {
        return true;
    }
    let Some(input) = Op::ReconcileInvalidState.input(Some(chat)) else {
        return false;
    };
    let env = m.env();
    match catch_unwind(AssertUnwindSafe(|| {
        update(Some(chat), &[input.into()], &env)
    })) {
        Ok(Ok(done)) => {
            matches!(done.chat.state(), ExecutionState::E0 | ExecutionState::E1)
                && done.chat.queue.len() == chat.queue.len()
        }
        _ => false,
    }
}

/// The actions that end work, tried first: most runnable states reach rest
/// through one or two of them, so the full action set is searched only when
/// these do not suffice.
const REST_ACTIONS: [Action; 9] = [
    Action::Update(Op::FinishTurn),
    Action::Update(Op::FinishError),
    Action::Update(Op::FinishInterruption(PartialPick::None)),
    Action::Update(Op::FinishInterruption(PartialPick::AnswerOutstanding)),
    Action::Update(Op::Interrupt),
    Action::Update(Op::CancelRequiresAction),
    Action::Update(Op::CompleteRequiresAction(ResultsPick::Exact)),
    Action::Update(Op::CommitStep(StepPick::ToolResults)),
    Action::Update(Op::EditMessage(EditPick::LastUser)),
];

fn rest_reachable(m: &SingleChat, s: &ChatState) -> bool {
    if !s.violations.is_empty() || !s.state().is_runnable() {
        return true;
    }
    m.reaches_rest(s, |_, out| out.extend(REST_ACTIONS))
        || m.reaches_rest(s, |state, out| m.actions(state, out))
}

fn triple_reached<const I: usize>(m: &SingleChat, s: &ChatState) -> bool {
    s.last.is_some() && m.triples.get(I) == s.last.as_ref()
}

fn state_reached<const I: usize>(_: &SingleChat, s: &ChatState) -> bool {
    s.state() == ExecutionState::ALL[I]
}

/// One function per index, since a stateright condition is a plain `fn`.
macro_rules! indexed {
    ($f:ident; $($i:literal)*) => { [$($f::<$i> as Condition),*] };
}

const TRIPLE_CONDITIONS: [Condition; 128] = indexed!(triple_reached;
    0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31
    32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61
    62 63 64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90 91
    92 93 94 95 96 97 98 99 100 101 102 103 104 105 106 107 108 109 110 111 112 113 114 115
    116 117 118 119 120 121 122 123 124 125 126 127);

const REACH_CONDITIONS: [Condition; 14] = indexed!(state_reached; 0 1 2 3 4 5 6 7 8 9 10 11 12 13);

// ---------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------

/// Runs the exhaustive check of the reference matrix.
pub fn run(threads: usize) -> CheckReport {
    run_with_matrix(Matrix::REFERENCE, threads)
}

/// Runs the exhaustive check against `matrix` (tests pass altered copies to
/// show that a wrong cell is caught).
pub fn run_with_matrix(matrix: Matrix, threads: usize) -> CheckReport {
    let threads = threads.max(1);
    let started = Instant::now();
    let checker = SingleChat::new(matrix)
        .checker()
        .threads(threads)
        .spawn_bfs()
        .join();
    let seconds = started.elapsed().as_secs_f64();
    let model = checker.model();
    let mut discoveries = checker.discoveries();
    let mut properties: Vec<PropertyVerdict> = model
        .properties
        .iter()
        .map(|p| {
            let found = discoveries.remove(p.name);
            match p.expectation {
                stateright::Expectation::Sometimes => PropertyVerdict {
                    name: p.name.to_owned(),
                    expectation: Expectation::Sometimes,
                    holds: found.is_some(),
                    path: None,
                },
                ref e => PropertyVerdict {
                    name: p.name.to_owned(),
                    expectation: if *e == stateright::Expectation::Always {
                        Expectation::Always
                    } else {
                        Expectation::Eventually
                    },
                    holds: found.is_none(),
                    path: found.map(|path| {
                        // stateright keeps the last counterexample it met,
                        // often a long one: show a shortest one instead.
                        let steps = shortest_counterexample(model, p.condition)
                            .unwrap_or_else(|| path.into_vec());
                        render_path(p.name, &steps)
                    }),
                },
            }
        })
        .collect();
    properties.extend(model.rejection_coverage());
    CheckReport {
        model: "single-chat",
        unique_states: checker.unique_state_count(),
        max_depth: checker.max_depth(),
        seconds,
        threads,
        properties,
    }
}

/// A shortest path from an initial state to a state where `condition`
/// fails, by breadth-first search over the model (only run for a property
/// that failed, so the search usually stops early).
fn shortest_counterexample(
    model: &SingleChat,
    condition: Condition,
) -> Option<Vec<(ChatState, Option<Action>)>> {
    let mut parents: HashMap<ChatState, Option<(ChatState, Action)>> = HashMap::new();
    let mut queue = VecDeque::new();
    for s in model.init_states() {
        if !parents.contains_key(&s) {
            parents.insert(s.clone(), None);
            queue.push_back(s);
        }
    }
    let mut offered = Vec::new();
    while let Some(state) = queue.pop_front() {
        if !condition(model, &state) {
            let mut steps = vec![(state.clone(), None)];
            let mut current = state;
            while let Some(Some((parent, action))) = parents.get(&current) {
                steps.push((parent.clone(), Some(*action)));
                current = parent.clone();
            }
            steps.reverse();
            return Some(steps);
        }
        model.actions(&state, &mut offered);
        for action in offered.drain(..) {
            if let Some(next) = model.next_state(&state, action)
                && !parents.contains_key(&next)
            {
                parents.insert(next.clone(), Some((state.clone(), action)));
                queue.push_back(next);
            }
        }
    }
    None
}

/// Renders a counterexample: its initial state, one line per step
/// ("R0 --SendMessage(queue)--> R1"), the final state in full and the
/// failed checks of `property`.
pub fn render_path(property: &str, steps: &[(ChatState, Option<Action>)]) -> Vec<String> {
    let mut lines = Vec::with_capacity(steps.len() + 2);
    if let Some((first, _)) = steps.first() {
        lines.push(format!("start: {first}"));
    }
    for pair in steps.windows(2) {
        if let [(from, Some(action)), (to, _)] = pair {
            lines.push(format!("{} --{action}--> {}", from.state(), to.state()));
        }
    }
    if let Some((last, _)) = steps.last() {
        lines.push(format!("end: {}", last.with_violations(Vec::new())));
        for v in &last.violations {
            if v.check.property_name() == property {
                lines.push(format!("violation: {}", v.detail));
            }
        }
    }
    lines
}

// ---------------------------------------------------------------------------
// Initial states and normalisation
// ---------------------------------------------------------------------------

/// N, then every (status, archived, queue) combination that classifies as
/// Invalid, in a fixed order (stateright replays paths by index).
fn initial_states() -> Vec<ChatState> {
    let statuses = ChatStatus::KNOWN
        .into_iter()
        .chain([ChatStatus::Other(LEGACY_STATUS.to_owned())]);
    let mut out = vec![ChatState {
        chat: None,
        last: None,
        violations: Vec::new(),
    }];
    for status in statuses {
        for archived in [false, true] {
            for queued in [false, true] {
                if ExecutionState::classify(&status, archived, queued) == ExecutionState::Invalid {
                    out.push(ChatState {
                        chat: Some(invalid_chat(status.clone(), archived, queued)),
                        last: None,
                        violations: Vec::new(),
                    });
                }
            }
        }
    }
    out
}

/// A chat left behind in an Invalid combination: a user message and an
/// assistant message with an unanswered dynamic call (so reconciliation has
/// something to cancel), and one queued message if `queued`.
fn invalid_chat(status: ChatStatus, archived: bool, queued: bool) -> Chat {
    let message = |id: i64, m: NewMessage| Message {
        id: MessageId(id),
        role: m.role,
        content: m.content,
        visibility: m.visibility,
        model_config_id: m.model_config_id,
        created_by: m.created_by,
        queued_message_id: None,
        deleted: false,
        revision: 0,
    };
    let queue = if queued {
        vec![QueuedMessage {
            id: QueuedMessageId(1),
            content: vec![Part::text(USER_TEXT)],
            model_config_id: None,
            created_by: USER,
        }]
    } else {
        Vec::new()
    };
    let chat = Chat {
        row: ChatRow {
            id: CHAT_ID,
            owner_id: USER,
            status,
            archived,
            owner: None,
            last_error: None,
            retry_state: None,
            generation_attempt: 0,
            requires_action_deadline_at: None,
            compaction_requested_at: None,
            versions: CANONICAL_VERSIONS,
            dynamic_tools: [DYNAMIC_TOOL.to_owned()].into(),
            last_model_config_id: None,
        },
        queue,
        history: vec![
            message(1, user_message()),
            message(2, assistant_call(DYNAMIC_CALL, DYNAMIC_TOOL)),
        ],
        heartbeats: BTreeMap::new(),
        next_message_id: 3,
        next_queued_id: 2,
    };
    normalise(chat, &options())
}

/// Versions after normalisation: the snapshot is 1, and every stamped
/// version is 0 ("older than the snapshot"), like every message revision.
const CANONICAL_VERSIONS: Versions = Versions {
    snapshot: 1,
    history: 0,
    queue: 0,
    retry_state: 0,
};

/// Folds a chat onto its canonical representative (see the module docs).
fn normalise(mut chat: Chat, options: &Options) -> Chat {
    chat.history.retain(|m| !m.deleted);
    for (i, m) in chat.history.iter_mut().enumerate() {
        m.id = MessageId(i as i64 + 1);
        m.revision = 0;
        m.queued_message_id = None;
    }
    for (i, q) in chat.queue.iter_mut().enumerate() {
        q.id = QueuedMessageId(i as i64 + 1);
    }
    chat.next_message_id = chat.history.len() as i64 + 1;
    chat.next_queued_id = chat.queue.len() as i64 + 1;
    let fresh = chat.lease_fresh(NOW, options);
    let row = &mut chat.row;
    row.versions = CANONICAL_VERSIONS;
    row.generation_attempt = row.generation_attempt.min(GENERATION_CAP);
    row.requires_action_deadline_at = row
        .requires_action_deadline_at
        .map(|_| NOW.plus(options.requires_action_timeout));
    row.compaction_requested_at = row.compaction_requested_at.map(|_| NOW);
    // Only the owner's heartbeat is ever read, and only for freshness.
    chat.heartbeats = match chat.row.owner {
        Some(owner) => {
            let beat = if fresh { NOW } else { stale_beat(options) };
            BTreeMap::from([(owner.runner_id, beat)])
        }
        None => BTreeMap::new(),
    };
    chat
}

fn stale_beat(options: &Options) -> Timestamp {
    NOW.minus(options.heartbeat_stale + Duration::from_secs(1))
}

/// Checks the version rules of design §3 on a committed Update, before
/// normalisation: a history change stamps `history_version`, resets the
/// attempt count and stamps every written message; a queue change stamps
/// `queue_version`; a retry-state change stamps `retry_state_version`; a
/// changed attempt count clears the retry state. Unchanged parts keep their
/// versions.
fn version_mismatch(before: &Chat, after: &Chat) -> Option<String> {
    let s = after.row.versions.snapshot;
    let (b, a) = (&before.row.versions, &after.row.versions);
    // `before` is normalised, so it holds no soft-deleted message.
    let history_changed =
        after.history.len() != before.history.len() || after.history.iter().any(|m| m.deleted);
    let queue_ids = |c: &Chat| c.queue.iter().map(|q| q.id).collect::<Vec<_>>();
    let queue_changed = queue_ids(before) != queue_ids(after);
    let retry_changed = before.row.retry_state != after.row.retry_state;
    let expect = |changed: bool, old: i64| if changed { s } else { old };
    if a.history != expect(history_changed, b.history) {
        return Some(format!(
            "history_version {} after an Update that {} the history (snapshot {s})",
            a.history,
            if history_changed { "changed" } else { "kept" }
        ));
    }
    if a.queue != expect(queue_changed, b.queue) {
        return Some(format!(
            "queue_version {} after an Update that {} the queue (snapshot {s})",
            a.queue,
            if queue_changed { "changed" } else { "kept" }
        ));
    }
    if a.retry_state != expect(retry_changed, b.retry_state) {
        return Some(format!(
            "retry_state_version {} after an Update that {} the retry state (snapshot {s})",
            a.retry_state,
            if retry_changed { "changed" } else { "kept" }
        ));
    }
    if history_changed && after.row.generation_attempt != 0 {
        return Some(format!(
            "generation_attempt {} after a history change",
            after.row.generation_attempt
        ));
    }
    if after.row.generation_attempt != before.row.generation_attempt
        && after.row.retry_state.is_some()
    {
        return Some("the attempt count changed but the retry state survived".to_owned());
    }
    for m in &after.history {
        let old = before.history.iter().find(|o| o.id == m.id);
        let written = old.is_none() || m.deleted;
        let expected = if written {
            s
        } else {
            old.map_or(s, |o| o.revision)
        };
        if m.revision != expected {
            return Some(format!(
                "message {} has revision {} (expected {expected})",
                m.id, m.revision
            ));
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

fn user_message() -> NewMessage {
    NewMessage {
        created_by: Some(USER),
        ..NewMessage::user(USER_TEXT)
    }
}

fn assistant_text() -> NewMessage {
    NewMessage::assistant(ASSISTANT_TEXT)
}

fn assistant_call(id: &str, tool: &str) -> NewMessage {
    NewMessage::new(Role::Assistant, vec![Part::tool_call(id, tool)])
}

/// The outstanding calls of the chat's last assistant message (only the
/// dynamic ones with `dynamic_only`).
fn outstanding(chat: Option<&Chat>, dynamic_only: bool) -> Vec<(String, String)> {
    let Some(chat) = chat else {
        return Vec::new();
    };
    ToolState::from_history(
        chat.active_history()
            .map(|m| (m.role, m.content.as_slice())),
    )
    .outstanding(dynamic_only.then_some(&chat.row.dynamic_tools))
}

/// A tool message answering every outstanding call, if there is one.
fn answers(chat: Option<&Chat>) -> Option<NewMessage> {
    let pending = outstanding(chat, false);
    if pending.is_empty() {
        return None;
    }
    let parts = pending
        .into_iter()
        .map(|(id, name)| Part::tool_result(id, name, JsonText::string("done")))
        .collect();
    Some(NewMessage::new(Role::Tool, parts))
}

// ---------------------------------------------------------------------------
// Display
// ---------------------------------------------------------------------------

fn join<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn ops_label(ops: &[Op]) -> String {
    if ops.is_empty() {
        "Update(no transitions)".to_owned()
    } else {
        ops.iter()
            .map(|op| op.to_string())
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

fn describe_message(m: &Message) -> String {
    match m.role {
        Role::User | Role::System => m.role.as_str().to_owned(),
        Role::Assistant | Role::Tool => {
            let parts = m.content.iter().map(|p| match p {
                Part::Text { .. } => "text".to_owned(),
                Part::ToolCall { tool_name, .. } => format!("call {tool_name}"),
                Part::ToolResult {
                    tool_name,
                    is_error: true,
                    ..
                } => format!("error {tool_name}"),
                Part::ToolResult { tool_name, .. } => format!("result {tool_name}"),
                Part::Other(_) => "other".to_owned(),
            });
            format!("{}[{}]", m.role.as_str(), join(parts))
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.transition();
        let detail = match self {
            Op::SetArchived(archived) => Some(archived.to_string()),
            Op::SendMessage(BusyBehavior::Queue) => Some("queue".to_owned()),
            Op::SendMessage(BusyBehavior::Interrupt) => Some("interrupt".to_owned()),
            Op::SendNonUserMessage => Some("assistant message".to_owned()),
            Op::EditMessage(pick) => Some(
                match pick {
                    EditPick::LastUser => "last user message",
                    EditPick::Assistant => "assistant message",
                    EditPick::Unknown => "unknown id",
                }
                .to_owned(),
            ),
            Op::DeleteQueuedMessage(pick) | Op::PromoteQueuedMessage(pick) => Some(
                match pick {
                    QueuePick::Head => "head",
                    QueuePick::Tail => "tail",
                    QueuePick::Unknown => "unknown id",
                }
                .to_owned(),
            ),
            Op::CompleteRequiresAction(pick) => Some(
                match pick {
                    ResultsPick::Exact => "pending calls",
                    ResultsPick::Missing => "missing result",
                    ResultsPick::Unexpected => "unexpected result",
                    ResultsPick::Duplicate => "duplicate result",
                    ResultsPick::InvalidJson => "invalid JSON",
                }
                .to_owned(),
            ),
            Op::RecordRetryState(pick) => Some(
                match pick {
                    RetryPick::Value => "value",
                    RetryPick::InvalidJson => "invalid JSON",
                }
                .to_owned(),
            ),
            Op::CommitStep(pick) => Some(
                match pick {
                    StepPick::DynamicCall => "dynamic tool call",
                    StepPick::ServerCall => "server tool call",
                    StepPick::Text => "text",
                    StepPick::ToolResults => "tool results",
                    StepPick::Empty => "no messages",
                    StepPick::ConsumeCompaction => "consume compaction",
                }
                .to_owned(),
            ),
            Op::FinishInterruption(PartialPick::AnswerOutstanding) => {
                Some("partial tool results".to_owned())
            }
            _ => None,
        };
        match detail {
            Some(d) => write!(f, "{t}({d})"),
            None => write!(f, "{t}"),
        }
    }
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::CreateChat(CreatePick::UserMessage) => f.write_str("CreateChat(user message)"),
            Action::CreateChat(CreatePick::NoMessages) => f.write_str("CreateChat(no messages)"),
            Action::Update(op) => write!(f, "{op}"),
            Action::Bundle(a, b) => write!(f, "{a} + {b}"),
            Action::EmptyUpdate => f.write_str("Update(no transitions)"),
            Action::Heartbeat => f.write_str("Heartbeat"),
            Action::LeaseGoesStale => f.write_str("LeaseGoesStale"),
        }
    }
}

impl fmt::Debug for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One line: the state, then only what differs from a fresh chat, for
/// example `A1 | history: user, assistant[call ask_user] | queue: 1 |
/// owned, lease fresh | deadline | last: SendMessage A0->A1`.
impl fmt::Display for ChatState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(chat) = &self.chat else {
            f.write_str("N")?;
            for v in &self.violations {
                write!(f, " | VIOLATION: {}", v.detail)?;
            }
            return Ok(());
        };
        let state = chat.state();
        let row = &chat.row;
        write!(f, "{state}")?;
        if state == ExecutionState::Invalid {
            write!(
                f,
                " (status {}, {}, queue {})",
                row.status,
                if row.archived {
                    "archived"
                } else {
                    "not archived"
                },
                chat.queue.len()
            )?;
        }
        let history: Vec<String> = chat.active_history().map(describe_message).collect();
        if history.is_empty() {
            f.write_str(" | history: empty")?;
        } else {
            write!(f, " | history: {}", history.join(", "))?;
        }
        if !chat.queue.is_empty() {
            write!(f, " | queue: {}", chat.queue.len())?;
        }
        if let Some(owner) = row.owner {
            let fresh = chat.heartbeats.get(&owner.runner_id) == Some(&NOW);
            write!(
                f,
                " | owned, lease {}",
                if fresh { "fresh" } else { "stale" }
            )?;
        }
        if let Some(e) = &row.last_error {
            write!(f, " | last_error {e}")?;
        }
        if row.retry_state.is_some() {
            f.write_str(" | retry_state")?;
        }
        if row.generation_attempt > 0 {
            write!(f, " | attempt {}", row.generation_attempt)?;
        }
        if row.requires_action_deadline_at.is_some() {
            f.write_str(" | deadline")?;
        }
        if row.compaction_requested_at.is_some() {
            f.write_str(" | compaction requested")?;
        }
        if let Some((t, from, to)) = self.last {
            write!(f, " | last: {t} {from}->{to}")?;
        }
        for v in &self.violations {
            write!(f, " | VIOLATION: {}", v.detail)?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChatState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_states_are_n_and_twelve_invalid_combinations() {
        let init = initial_states();
        assert_eq!(init.len(), 13);
        assert_eq!(init[0].state(), ExecutionState::N);
        assert!(
            init[1..]
                .iter()
                .all(|s| s.state() == ExecutionState::Invalid)
        );
        let distinct: HashSet<_> = init.iter().collect();
        assert_eq!(distinct.len(), 13);
    }

    #[test]
    fn normalisation_folds_ids_versions_and_time() {
        let m = SingleChat::new(Matrix::REFERENCE);
        let created = m
            .next_state(
                &initial_states()[0],
                Action::CreateChat(CreatePick::UserMessage),
            )
            .expect("CreateChat commits");
        let chat = created.chat.as_ref().expect("chat exists");
        assert_eq!(chat.row.versions, CANONICAL_VERSIONS);
        assert_eq!(chat.history[0].id, MessageId(1));
        // Acquire, go stale, heartbeat: back to a fresh lease, same chat.
        let owned = m
            .next_state(&created, Action::Update(Op::Acquire))
            .expect("Acquire commits");
        let stale = m
            .next_state(&owned, Action::LeaseGoesStale)
            .expect("the lease was fresh");
        assert_ne!(stale, owned);
        assert!(m.next_state(&stale, Action::LeaseGoesStale).is_none());
        let fresh = m
            .next_state(&stale, Action::Heartbeat)
            .expect("the lease was stale");
        assert_eq!(fresh, owned);
    }

    /// The chat right after CreateChat, normalised.
    fn created(m: &SingleChat) -> Chat {
        m.next_state(
            &initial_states()[0],
            Action::CreateChat(CreatePick::UserMessage),
        )
        .and_then(|s| s.chat)
        .expect("CreateChat commits")
    }

    fn commit(m: &SingleChat, chat: &Chat, op: Op) -> Committed {
        let input = op.input(Some(chat)).expect("the op applies");
        update(Some(chat), &[input.into()], &m.env()).expect("the update commits")
    }

    #[test]
    fn the_version_check_catches_a_missed_stamp() {
        let m = SingleChat::new(Matrix::REFERENCE);
        let chat = created(&m);
        let done = commit(&m, &chat, Op::CommitStep(StepPick::Text));
        assert_eq!(version_mismatch(&chat, &done.chat), None);
        let mut history_kept = done.chat.clone();
        history_kept.row.versions.history = chat.row.versions.history;
        assert!(version_mismatch(&chat, &history_kept).is_some());
        let mut queue_stamped = done.chat.clone();
        queue_stamped.row.versions.queue = queue_stamped.row.versions.snapshot;
        assert!(version_mismatch(&chat, &queue_stamped).is_some());
        let mut old_revision = done.chat.clone();
        old_revision.history.last_mut().expect("a message").revision = 0;
        assert!(version_mismatch(&chat, &old_revision).is_some());
    }

    #[test]
    fn the_notification_check_catches_a_missing_hint() {
        let m = SingleChat::new(Matrix::REFERENCE);
        let chat = created(&m);
        // Unowned and running: the Update must hint.
        let mut done = commit(&m, &chat, Op::RecordGenerationAttempt);
        assert_eq!(m.notification_mismatch(&done), None);
        done.notifications.truncate(1);
        assert!(m.notification_mismatch(&done).is_some());
    }

    #[test]
    fn the_rejection_check_catches_a_wrong_from_state() {
        let m = SingleChat::new(Matrix::REFERENCE);
        let chat = created(&m);
        let calls = [Call::from(Input::FinishTurn), Call::from(Input::FinishTurn)];
        let rejected = update(Some(&chat), &calls, &m.env()).expect_err("twice is too many");
        assert_eq!(rejected.index, 1);
        assert_eq!(rejected.rejection.from, ExecutionState::W);
        assert!(m.check_rejection(Some(&chat), &calls, &rejected).is_empty());
        let mut wrong = rejected.clone();
        wrong.rejection.from = ExecutionState::R0;
        assert_eq!(
            m.check_rejection(Some(&chat), &calls, &wrong)[0].check,
            Check::Rejection
        );
        // A plain matrix rejection of a pair the matrix allows is wrong too.
        let mut plain = rejected;
        plain.index = 0;
        plain.rejection.from = ExecutionState::R0;
        assert!(!m.check_rejection(Some(&chat), &calls, &plain).is_empty());
    }

    #[test]
    fn display_is_one_readable_line() {
        let m = SingleChat::new(Matrix::REFERENCE);
        let created = m
            .next_state(
                &initial_states()[0],
                Action::CreateChat(CreatePick::UserMessage),
            )
            .expect("CreateChat commits");
        assert_eq!(
            created.to_string(),
            "R0 | history: user | last: CreateChat N->R0"
        );
        assert_eq!(
            Action::Bundle(Op::CommitStep(StepPick::Text), Op::FinishTurn).to_string(),
            "CommitStep(text) + FinishTurn"
        );
        assert_eq!(
            format!("{:?}", Action::Update(Op::SendMessage(BusyBehavior::Queue))),
            "SendMessage(queue)"
        );
    }
}

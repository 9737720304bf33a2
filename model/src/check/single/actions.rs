//! The actions of the model: the representative inputs of every transition
//! ([`Op`] and its picks), the steps ([`Action`]) and the message fixtures
//! the inputs are built from.

use super::*;

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
                last_error: Some(last_error().clone()),
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
    pub(super) fn target(self, chat: Option<&Chat>) -> Option<MessageId> {
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
    pub(super) fn target(self, chat: Option<&Chat>) -> Option<QueuedMessageId> {
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
    pub(super) fn results(self, pending: &[(String, String)]) -> Option<Vec<ToolResultInput>> {
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

pub(super) fn user_message() -> NewMessage {
    NewMessage {
        created_by: Some(USER),
        ..NewMessage::user(USER_TEXT)
    }
}

pub(super) fn assistant_text() -> NewMessage {
    NewMessage::assistant(ASSISTANT_TEXT)
}

pub(super) fn assistant_call(id: &str, tool: &str) -> NewMessage {
    NewMessage::new(Role::Assistant, vec![Part::tool_call(id, tool)])
}

/// The outstanding calls of the chat's last assistant message (only the
/// dynamic ones with `dynamic_only`).
pub(super) fn outstanding(chat: Option<&Chat>, dynamic_only: bool) -> Vec<(String, String)> {
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
pub(super) fn answers(chat: Option<&Chat>) -> Option<NewMessage> {
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

/// The error FinishError records, built once (it is offered from every
/// state the model visits).
fn last_error() -> &'static JsonText {
    static LAST_ERROR: OnceLock<JsonText> = OnceLock::new();
    LAST_ERROR.get_or_init(|| {
        JsonText::from_value(&serde_json::json!({"message": "provider failed"}))
            .expect("a flat object is within the depth limit")
    })
}

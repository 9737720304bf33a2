//! A compiled trace: operations with resolved identifiers, whose message
//! references each backend resolves against its own view of the chat.

use std::time::Duration;

use chatstate::{CreateChat, LockMode};
use chatstate_model::{
    ChatId, ChatStatus, Input, MessageId, NewChat, Options, Part, QueuedMessageId, RunnerId,
};
use uuid::Uuid;

use super::names::Names;

/// A message or queued message, by position or by raw id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// 0-based position in the active history / the queue.
    Index(usize),
    /// A raw row id (backend-specific).
    Id(i64),
}

/// The id a position outside the history or queue resolves to: no store
/// and no model chat ever hands it out, so the transition reports the
/// message as not found on every backend.
pub(crate) const MISSING_ID: i64 = i64::MAX;

/// A transition input whose message references are resolved late.
#[derive(Clone, Debug)]
pub(crate) enum InputSpec {
    /// Needs no resolution.
    Ready(Input),
    EditMessage {
        target: Target,
        content: Vec<Part>,
        created_by: Option<Uuid>,
        model_config_id: Option<Uuid>,
    },
    DeleteQueued(Target),
    PromoteQueued(Target),
}

impl InputSpec {
    /// True if resolving needs the active history.
    pub(crate) fn needs_history(&self) -> bool {
        matches!(
            self,
            InputSpec::EditMessage {
                target: Target::Index(_),
                ..
            }
        )
    }

    /// The input, with positions resolved against `queue` (the queue's ids
    /// in order) and `history` (the active history's ids in order; only
    /// consulted when [`InputSpec::needs_history`]).
    pub(crate) fn resolve(&self, queue: &[QueuedMessageId], history: &[MessageId]) -> Input {
        let queued = |t: &Target| match *t {
            Target::Index(i) => queue.get(i).copied().unwrap_or(QueuedMessageId(MISSING_ID)),
            Target::Id(id) => QueuedMessageId(id),
        };
        match self {
            InputSpec::Ready(input) => input.clone(),
            InputSpec::EditMessage {
                target,
                content,
                created_by,
                model_config_id,
            } => Input::EditMessage {
                message_id: match *target {
                    Target::Index(i) => history.get(i).copied().unwrap_or(MessageId(MISSING_ID)),
                    Target::Id(id) => MessageId(id),
                },
                content: content.clone(),
                created_by: *created_by,
                model_config_id: *model_config_id,
            },
            InputSpec::DeleteQueued(t) => Input::DeleteQueuedMessage { id: queued(t) },
            InputSpec::PromoteQueued(t) => Input::PromoteQueuedMessage { id: queued(t) },
        }
    }
}

/// One transition of an Update, compiled.
#[derive(Clone, Debug)]
pub(crate) struct CallSpec {
    pub(crate) input: InputSpec,
    pub(crate) fence: Option<RunnerId>,
}

/// A compiled step. `chat` is an index into [`Compiled::chats`].
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Create {
        chat: usize,
        create: CreateChat,
    },
    Update {
        chat: usize,
        calls: Vec<CallSpec>,
    },
    Heartbeat {
        chat: usize,
        runner: RunnerId,
    },
    Advance(Duration),
    SetRaw {
        chat: usize,
        status: ChatStatus,
        archived: Option<bool>,
    },
    Lock {
        chat: usize,
        mode: LockMode,
    },
}

impl Op {
    pub(crate) fn chat(&self) -> Option<usize> {
        match self {
            Op::Create { chat, .. }
            | Op::Update { chat, .. }
            | Op::Heartbeat { chat, .. }
            | Op::SetRaw { chat, .. }
            | Op::Lock { chat, .. } => Some(*chat),
            Op::Advance(_) => None,
        }
    }
}

/// A trace ready to run on any backend.
#[derive(Clone, Debug)]
pub(crate) struct Compiled {
    pub(crate) options: Options,
    pub(crate) names: Names,
    /// Chat ids by index, and their names.
    pub(crate) chats: Vec<(ChatId, String)>,
    pub(crate) ops: Vec<Op>,
}

impl Compiled {
    /// The model's NewChat of a create op.
    pub(crate) fn new_chat(create: &CreateChat) -> NewChat {
        NewChat {
            id: create.id.expect("compiled creates carry their id"),
            owner_id: create.owner_id,
            dynamic_tools: create.dynamic_tools.clone(),
            last_model_config_id: create.last_model_config_id,
            messages: create.messages.clone(),
        }
    }
}

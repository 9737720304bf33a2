//! The states of the model: the normalised chat and the step checks that
//! failed on the way in, the initial states, and the normalisation that
//! keeps the space finite.

use super::*;

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
    pub(super) fn new(check: Check, detail: impl Into<String>) -> Self {
        Violation {
            check,
            detail: detail.into(),
        }
    }
}

/// A state of the model: the normalised chat and the checks that failed on
/// the way in. Which matrix triples were realised is not part of the
/// state: the model records it in a bitset as the steps happen.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ChatState {
    /// The chat; `None` before CreateChat (state N).
    pub chat: Option<Chat>,
    /// Step checks that failed on the step into this state; empty in every
    /// healthy state. A state with a violation has no successors.
    pub violations: Vec<Violation>,
}

impl ChatState {
    /// The classified execution state.
    pub fn state(&self) -> ExecutionState {
        self.chat.as_ref().map_or(ExecutionState::N, Chat::state)
    }

    pub(super) fn with_violations(&self, violations: Vec<Violation>) -> ChatState {
        ChatState {
            chat: self.chat.clone(),
            violations,
        }
    }
}

/// N, then every (status, archived, queue) combination that classifies as
/// Invalid, in a fixed order (stateright replays paths by index).
pub(super) fn initial_states() -> Vec<ChatState> {
    let statuses = ChatStatus::KNOWN
        .into_iter()
        .chain([ChatStatus::Other(LEGACY_STATUS.to_owned())]);
    let mut out = vec![ChatState {
        chat: None,
        violations: Vec::new(),
    }];
    for status in statuses {
        for archived in [false, true] {
            for queued in [false, true] {
                if ExecutionState::classify(&status, archived, queued) == ExecutionState::Invalid {
                    out.push(ChatState {
                        chat: Some(invalid_chat(status.clone(), archived, queued)),
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
pub(super) fn invalid_chat(status: ChatStatus, archived: bool, queued: bool) -> Chat {
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
pub(super) const CANONICAL_VERSIONS: Versions = Versions {
    snapshot: 1,
    history: 0,
    queue: 0,
    retry_state: 0,
};

/// Folds a chat onto its canonical representative (see the module docs).
pub(super) fn normalise(mut chat: Chat, options: &Options) -> Chat {
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

pub(super) fn stale_beat(options: &Options) -> Timestamp {
    NOW.minus(options.heartbeat_stale + Duration::from_secs(1))
}

//! The abstract chat and the reference step function.
//!
//! [`Chat`] is a whole chat as the model sees it: the row, the full queue,
//! the full history (soft deletes included) and the heartbeat rows. [`step`]
//! applies one transition to it by deciding a plan against the chat's
//! snapshot and applying that plan; [`update`] applies a bundle the way a
//! store transaction does (one snapshot bump first, all or nothing, then the
//! notifications). The stateright models and the conformance tests use these
//! as the reference the real stores must match.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::{
    ChatId, ChatRow, Message, MessageId, NewMessage, QueuedMessage, QueuedMessageId, RunnerId,
    Timestamp, ToolState, Versions,
};
use crate::input::{Input, Options};
use crate::notify::Notification;
use crate::reject::{Rejection, RejectionKind, reasons};
use crate::rules::{Assigned, EditContext, EditTarget, Env, Outcome, Plan, Snapshot, decide, gate};
use crate::state::{ChatStatus, ExecutionState};
use crate::transition::{Matrix, Transition};

/// What a new chat is made of.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NewChat {
    /// The chat's id.
    pub id: ChatId,
    /// The user owning the chat.
    pub owner_id: uuid::Uuid,
    /// Names of client-executed tools.
    #[serde(default)]
    pub dynamic_tools: std::collections::BTreeSet<String>,
    /// Model configuration for synthetic messages.
    #[serde(default)]
    pub last_model_config_id: Option<uuid::Uuid>,
    /// The initial history; must not be empty.
    pub messages: Vec<NewMessage>,
}

/// A whole chat, as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Chat {
    /// The row.
    pub row: ChatRow,
    /// Queued messages, head first.
    pub queue: Vec<QueuedMessage>,
    /// Every history message in id order, soft-deleted ones included.
    pub history: Vec<Message>,
    /// Last heartbeat per runner.
    pub heartbeats: BTreeMap<RunnerId, Timestamp>,
    /// Next message id this model chat hands out.
    pub next_message_id: i64,
    /// Next queued-message id this model chat hands out.
    pub next_queued_id: i64,
}

/// Store time and tunables for a step.
#[derive(Clone, Copy, Debug)]
pub struct StepEnv<'a> {
    /// Store time.
    pub now: Timestamp,
    /// Tunables.
    pub options: &'a Options,
    /// Matrix to gate on.
    pub matrix: Matrix,
    /// Runner fence for fenced worker calls.
    pub fence: Option<RunnerId>,
}

impl<'a> StepEnv<'a> {
    /// An environment with the reference matrix and no fence.
    pub fn new(now: Timestamp, options: &'a Options) -> Self {
        StepEnv {
            now,
            options,
            matrix: Matrix::REFERENCE,
            fence: None,
        }
    }
}

impl Chat {
    /// Creates a chat (the N -> R0 transition): status running, snapshot 1,
    /// history 1 (every initial message has revision 1), queue 0.
    ///
    /// A nil chat id is refused: the nil UUID stands for "no chat" to
    /// callers and to the Go original, so it must never name a row. Other
    /// ids may be nil (the owner, a message's author or model
    /// configuration, a worker or runner): they are attributes, stored and
    /// read back as given.
    ///
    /// Like every message insert, the initial history sets
    /// `last_model_config_id` to its last non-null model configuration.
    pub fn create(new: &NewChat) -> Result<Chat, Rejection> {
        let refuse = |reason| Rejection {
            transition: Transition::CreateChat,
            from: ExecutionState::N,
            kind: RejectionKind::TransitionNotAllowed {
                reason: Some(reason),
            },
        };
        if new.id.0.is_nil() {
            return Err(refuse(reasons::CREATE_NIL_ID));
        }
        if new.messages.is_empty() {
            return Err(refuse(reasons::CREATE_EMPTY));
        }
        let mut chat = Chat {
            row: ChatRow {
                id: new.id,
                owner_id: new.owner_id,
                status: ChatStatus::Running,
                archived: false,
                owner: None,
                last_error: None,
                retry_state: None,
                generation_attempt: 0,
                requires_action_deadline_at: None,
                compaction_requested_at: None,
                versions: Versions {
                    snapshot: 1,
                    history: 1,
                    queue: 0,
                    retry_state: 0,
                },
                dynamic_tools: new.dynamic_tools.clone(),
                last_model_config_id: crate::rules::last_model_config(
                    new.last_model_config_id,
                    &new.messages,
                ),
            },
            queue: Vec::new(),
            history: Vec::new(),
            heartbeats: BTreeMap::new(),
            next_message_id: 1,
            next_queued_id: 1,
        };
        for m in &new.messages {
            chat.push_message(m.clone(), None, 1);
        }
        Ok(chat)
    }

    /// The classified state.
    pub fn state(&self) -> ExecutionState {
        self.row.classify(!self.queue.is_empty())
    }

    /// The active (not soft-deleted) history, in id order.
    pub fn active_history(&self) -> impl Iterator<Item = &Message> {
        self.history.iter().filter(|m| !m.deleted)
    }

    /// True if the owner's runner has a heartbeat younger than the threshold.
    pub fn lease_fresh(&self, now: Timestamp, options: &Options) -> bool {
        let Some(owner) = self.row.owner else {
            return false;
        };
        let cutoff = now.minus(options.heartbeat_stale);
        self.heartbeats
            .get(&owner.runner_id)
            .is_some_and(|beat| *beat > cutoff)
    }

    /// The snapshot a transition would see.
    pub fn snapshot(&self, now: Timestamp, options: &Options) -> Snapshot {
        Snapshot {
            row: self.row.clone(),
            queue: self.queue.iter().map(|q| q.id).collect(),
            tools: ToolState::from_history(
                self.active_history()
                    .map(|m| (m.role, m.content.as_slice())),
            ),
            lease_fresh: self.lease_fresh(now, options),
            now,
        }
    }

    /// What EditMessage needs to know about `message_id`.
    pub fn edit_context(&self, message_id: MessageId) -> EditContext {
        let target = self
            .active_history()
            .find(|m| m.id == message_id)
            .map(|m| EditTarget {
                role: m.role,
                visibility: m.visibility,
                model_config_id: m.model_config_id,
            });
        EditContext {
            message_id,
            target,
            from_target: self
                .active_history()
                .filter(|m| m.id >= message_id)
                .map(|m| m.id)
                .collect(),
            tools_before: ToolState::from_history(
                self.active_history()
                    .filter(|m| m.id < message_id)
                    .map(|m| (m.role, m.content.as_slice())),
            ),
        }
    }

    fn push_message(
        &mut self,
        m: NewMessage,
        queued: Option<QueuedMessageId>,
        revision: i64,
    ) -> MessageId {
        let id = MessageId(self.next_message_id);
        self.next_message_id += 1;
        self.history.push(m.stored(id, queued, revision));
        id
    }

    /// Applies a plan decided against this chat's snapshot, handing out ids
    /// the way a store would, and returns them.
    pub fn apply(&mut self, plan: &Plan, now: Timestamp) -> Assigned {
        let revision = plan.row.versions.snapshot;
        for m in &mut self.history {
            if plan.soft_delete.contains(&m.id) {
                m.deleted = true;
                m.revision = revision;
            }
        }
        if let Some(id) = plan.reorder_to_head
            && let Some(pos) = self.queue.iter().position(|q| q.id == id)
        {
            let item = self.queue.remove(pos);
            self.queue.insert(0, item);
        }
        self.queue.retain(|q| !plan.delete_queued.contains(&q.id));
        let mut assigned = Assigned::default();
        if let Some(new) = &plan.append_queued {
            let id = QueuedMessageId(self.next_queued_id);
            self.next_queued_id += 1;
            self.queue.push(QueuedMessage {
                id,
                content: new.content.clone(),
                model_config_id: new.model_config_id,
                created_by: new.created_by,
            });
            assigned.queued = Some(id);
        }
        for m in &plan.messages {
            assigned
                .messages
                .push(self.push_message(m.clone(), None, revision));
        }
        if let Some(qid) = plan.promote {
            let pos = self
                .queue
                .iter()
                .position(|q| q.id == qid)
                .expect("promoted row is queued");
            let row = self.queue.remove(pos);
            // The fallback is the chat's model configuration as the plan's
            // own messages left it.
            let msg = row.promoted(plan.row.last_model_config_id);
            assigned
                .messages
                .push(self.push_message(msg, Some(qid), revision));
        }
        if plan.prune_heartbeats {
            self.heartbeats.retain(|r, _| Some(*r) == plan.heartbeat);
        }
        if let Some(runner) = plan.heartbeat {
            self.heartbeats.insert(runner, now);
        }
        self.row = plan.row.clone();
        assigned
    }
}

/// The reference step: applies one transition to a chat.
///
/// Pure: the input chat is untouched; a rejection returns no chat at all.
/// The snapshot bump is not part of a step but of the Update around it
/// (see [`update`]).
pub fn step(chat: &Chat, input: &Input, env: &StepEnv<'_>) -> Result<(Chat, Outcome), Rejection> {
    let plan = plan(chat, false, input, env)?;
    let mut next = chat.clone();
    let assigned = next.apply(&plan, env.now);
    Ok((next, plan.outcome(&assigned)))
}

/// The plan of one transition on `chat` (seen with its snapshot bumped by
/// one when `bump`, as inside an Update that has not applied a call yet).
/// The gate runs first, on the chat itself: a transition the matrix
/// forbids is rejected without building a snapshot.
fn plan(chat: &Chat, bump: bool, input: &Input, env: &StepEnv<'_>) -> Result<Plan, Rejection> {
    let rules_env = Env {
        options: env.options,
        matrix: env.matrix,
        fence: env.fence,
        history: None,
        edit: None,
    };
    gate(input.transition(), chat.state(), &chat.row, &rules_env)?;
    let mut snap = chat.snapshot(env.now, env.options);
    if bump {
        snap.row.versions.snapshot += 1;
    }
    let edit = match input {
        Input::EditMessage { message_id, .. } => Some(chat.edit_context(*message_id)),
        _ => None,
    };
    decide(
        &snap,
        input,
        &Env {
            edit: edit.as_ref(),
            ..rules_env
        },
    )
}

/// One transition of an Update, with its optional runner fence.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Call {
    /// The input.
    pub input: Input,
    /// The runner a fenced worker call expects to own the chat.
    pub fence: Option<RunnerId>,
}

impl From<Input> for Call {
    fn from(input: Input) -> Self {
        Call { input, fence: None }
    }
}

/// A committed Update: the chat afterwards, each transition's outcome and
/// the notifications published after commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The chat afterwards.
    pub chat: Chat,
    /// One outcome per call, in order.
    pub outcomes: Vec<Outcome>,
    /// `chat:update`, then a `chat:ownership` hint when needed.
    pub notifications: Vec<Notification>,
}

/// A rolled-back Update: which call failed and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("call {index} rejected: {rejection}")]
pub struct UpdateRejected {
    /// Index of the failing call.
    pub index: usize,
    /// The rejection.
    pub rejection: Rejection,
}

/// The reference Update: bump the snapshot once, apply every call in order
/// against the effects of the earlier ones, and publish one `chat:update`
/// (plus a hint when the chat ends runnable without a fresh lease). Any
/// rejection discards everything.
///
/// A missing chat is rejected with ChatNotFound before anything runs.
pub fn update(
    chat: Option<&Chat>,
    calls: &[Call],
    env: &StepEnv<'_>,
) -> Result<Committed, UpdateRejected> {
    let Some(chat) = chat else {
        let transition = calls
            .first()
            .map(|c| c.input.transition())
            .unwrap_or(Transition::CreateChat);
        return Err(UpdateRejected {
            index: 0,
            rejection: Rejection {
                transition,
                from: ExecutionState::N,
                kind: RejectionKind::ChatNotFound,
            },
        });
    };
    // The chat is copied (and its copy bumped) only once the first call is
    // accepted; every call then applies to that one copy in place, and a
    // rejection drops it.
    let mut bumped: Option<Chat> = None;
    let mut outcomes = Vec::with_capacity(calls.len());
    for (index, call) in calls.iter().enumerate() {
        let env = StepEnv {
            fence: call.fence,
            ..*env
        };
        let plan = plan(
            bumped.as_ref().unwrap_or(chat),
            bumped.is_none(),
            &call.input,
            &env,
        )
        .map_err(|rejection| UpdateRejected { index, rejection })?;
        let current = bumped.get_or_insert_with(|| bump(chat));
        let assigned = current.apply(&plan, env.now);
        outcomes.push(plan.outcome(&assigned));
    }
    let current = bumped.unwrap_or_else(|| bump(chat));
    // What `after_update` reads of a snapshot, without building one.
    let needs_hint = current.state().is_runnable() && !current.lease_fresh(env.now, env.options);
    let notifications = crate::notify::after_commit(&current.row, needs_hint);
    Ok(Committed {
        chat: current,
        outcomes,
        notifications,
    })
}

/// A copy of `chat` with its snapshot version bumped, as an Update holds it.
fn bump(chat: &Chat) -> Chat {
    let mut copy = chat.clone();
    copy.row.versions.snapshot += 1;
    copy
}

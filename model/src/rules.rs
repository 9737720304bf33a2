//! The semantics of every transition, as one pure decision function.
//!
//! [`decide`] looks at a [`Snapshot`] of a locked chat (its row, the ids of
//! its queue in order, the tool-call bookkeeping of its history, whether its
//! lease is fresh, and store time) and returns a [`Plan`]: every write the
//! transition makes and the row as it will be afterwards, version counters
//! included. Nothing else in the project decides what a transition does:
//! the abstract model applies plans to a full chat ([`crate::step`]), the
//! machine hands them to a store, and both stores write them verbatim.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::data::{
    ChatRow, JsonError, JsonText, MessageId, NewMessage, NewQueued, Part, QueuedMessageId, Role,
    RunnerId, Timestamp, ToolState, Visibility,
};
use crate::input::{BusyBehavior, Input, Options};
use crate::reject::{Rejection, RejectionKind, reasons};
use crate::state::{ChatStatus, ExecutionState};
use crate::transition::{Matrix, Transition};

/// Default texts of synthetic tool cancellations.
pub mod cancel_reasons {
    /// A direct send to an idle chat.
    pub const NEW_USER_MESSAGE: &str = "Tool execution interrupted by new user message";
    /// A queued message was promoted into history.
    pub const QUEUE_PROMOTION: &str = "Tool execution interrupted by queued message promotion";
    /// An interrupting send during requires-action.
    pub const USER_MESSAGE: &str = "Tool execution interrupted by user message";
    /// An edit of history.
    pub const MESSAGE_EDIT: &str = "Tool execution interrupted by message edit";
    /// Interrupt (default).
    pub const USER: &str = "Tool execution interrupted by user";
    /// CancelRequiresAction (default).
    pub const TIMED_OUT: &str = "Tool execution timed out";
    /// ReconcileInvalidState (default).
    pub const INVALID_STATE: &str = "Tool execution canceled due to invalid chat state";
}

/// The `last_error` ReconcileInvalidState stores when given none.
pub fn default_reconcile_error() -> JsonText {
    JsonText::from_value(&serde_json::json!({
        "message": "chat was in an invalid state; send a new message or edit history to continue"
    }))
    .expect("a flat object is within the depth limit")
}

/// The chat's `last_model_config_id` after inserting `messages`: the last
/// non-null model configuration among them, else `current` (spec: every
/// message insert sets it, so synthetic cancellations and the promotion
/// fallback follow the conversation).
pub(crate) fn last_model_config(
    current: Option<uuid::Uuid>,
    messages: &[NewMessage],
) -> Option<uuid::Uuid> {
    messages
        .iter()
        .rev()
        .find_map(|m| m.model_config_id)
        .or(current)
}

/// What one transition sees of a locked chat.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Snapshot {
    /// The row (inside an Update: already bumped).
    pub row: ChatRow,
    /// The queue's ids in queue order (head first).
    pub queue: Vec<QueuedMessageId>,
    /// Tool-call bookkeeping of the active history.
    pub tools: ToolState,
    /// True if the chat is owned and the owner's runner has a heartbeat
    /// younger than the staleness threshold.
    pub lease_fresh: bool,
    /// Store time of the transaction.
    pub now: Timestamp,
}

impl Snapshot {
    /// The classified state.
    pub fn state(&self) -> ExecutionState {
        self.row.classify(!self.queue.is_empty())
    }

    /// True when an Update ending here must publish an ownership hint:
    /// the state is runnable and the lease is missing or stale.
    pub fn needs_hint(&self) -> bool {
        self.state().is_runnable() && !self.lease_fresh
    }

    /// Moves the snapshot past an applied plan, given the ids the store
    /// assigned to inserted rows.
    pub fn apply(&mut self, plan: &Plan, assigned: &Assigned) {
        self.row = plan.row.clone();
        self.queue = plan.queue_after(&self.queue, assigned.queued);
        self.tools = plan.tools.clone();
        self.lease_fresh = plan.lease_fresh;
    }
}

/// What EditMessage needs to know about its target, read under the lock.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EditContext {
    /// The id asked for.
    pub message_id: MessageId,
    /// The target, if it is an active message of this chat.
    pub target: Option<EditTarget>,
    /// Active message ids from the target on, in id order (target first).
    pub from_target: Vec<MessageId>,
    /// Tool-call bookkeeping of the active history before the target.
    pub tools_before: ToolState,
}

/// The fields of an edit target the replacement copies.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EditTarget {
    /// Role (must be user).
    pub role: Role,
    /// Visibility, copied to the replacement.
    pub visibility: Visibility,
    /// Model configuration, copied unless overridden.
    pub model_config_id: Option<uuid::Uuid>,
}

/// Everything a decision may consult besides the snapshot.
#[derive(Clone, Copy, Debug)]
pub struct Env<'a> {
    /// Tunables.
    pub options: &'a Options,
    /// The matrix to gate on ([`Matrix::REFERENCE`] outside tests).
    pub matrix: Matrix,
    /// For fenced worker calls: the runner the caller holds.
    pub fence: Option<RunnerId>,
    /// For calls generated from a known history: the `history_version` it
    /// had (a step generated from an older history is refused).
    pub history: Option<i64>,
    /// For EditMessage: the target's context.
    pub edit: Option<&'a EditContext>,
}

impl<'a> Env<'a> {
    /// An environment with the reference matrix, no fence, no history
    /// expectation and no edit context.
    pub fn new(options: &'a Options) -> Self {
        Env {
            options,
            matrix: Matrix::REFERENCE,
            fence: None,
            history: None,
            edit: None,
        }
    }
}

/// The writes of one transition and the row it leaves behind.
///
/// Stores apply a plan in this order: soft deletes, queue reorder, queue
/// deletes, queue append, message inserts (`messages` in order, then the
/// promoted queued row as a user message, then delete of that row), the
/// heartbeat prune and upsert, and the row write. Every written message gets
/// `revision = row.versions.snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Plan {
    /// The transition.
    pub transition: Transition,
    /// Its from-state.
    pub from: ExecutionState,
    /// Its landing state.
    pub to: ExecutionState,
    /// The row afterwards (write all of it when `row_changed`).
    pub row: ChatRow,
    /// True when `row` differs from the row before.
    pub row_changed: bool,
    /// Active messages to soft-delete.
    pub soft_delete: Vec<MessageId>,
    /// Queued message to move to the head of the queue.
    pub reorder_to_head: Option<QueuedMessageId>,
    /// Queued messages to delete (the promoted one excluded).
    pub delete_queued: Vec<QueuedMessageId>,
    /// Queued message to append at the tail.
    pub append_queued: Option<NewQueued>,
    /// Messages to insert, in order.
    pub messages: Vec<NewMessage>,
    /// How many of `messages` (from the start) are synthetic cancellations.
    pub cancellations: usize,
    /// Queued message to promote into history after `messages`, then delete.
    pub promote: Option<QueuedMessageId>,
    /// Runner whose heartbeat to upsert at store time.
    pub heartbeat: Option<RunnerId>,
    /// Delete every heartbeat row of the chat except `heartbeat`'s (all of
    /// them when `heartbeat` is `None`): set by the transitions that change
    /// the lease (Acquire, Abandon), so the heartbeat rows stay bounded by
    /// the chats owned.
    pub prune_heartbeats: bool,
    /// Tool bookkeeping afterwards.
    pub tools: ToolState,
    /// Lease freshness afterwards.
    pub lease_fresh: bool,
    /// True when PromoteQueuedMessage moved its target to the head.
    pub moved_to_head: bool,
}

impl Plan {
    /// The queue after this plan, given the queue before and the id the
    /// store assigned to the appended row.
    pub fn queue_after(
        &self,
        before: &[QueuedMessageId],
        appended: Option<QueuedMessageId>,
    ) -> Vec<QueuedMessageId> {
        let mut q: Vec<QueuedMessageId> = before.to_vec();
        if let Some(id) = self.reorder_to_head
            && let Some(pos) = q.iter().position(|x| *x == id)
        {
            let item = q.remove(pos);
            q.insert(0, item);
        }
        q.retain(|id| !self.delete_queued.contains(id) && Some(*id) != self.promote);
        if let Some(id) = appended {
            q.push(id);
        }
        q
    }

    /// The number of history rows this plan inserts.
    pub fn inserted_len(&self) -> usize {
        self.messages.len() + usize::from(self.promote.is_some())
    }

    /// True if the plan changes the history (insert or soft delete).
    pub fn changes_history(&self) -> bool {
        !self.messages.is_empty() || self.promote.is_some() || !self.soft_delete.is_empty()
    }

    /// True if the plan changes the queue (insert, delete or move).
    pub fn changes_queue(&self) -> bool {
        self.append_queued.is_some()
            || !self.delete_queued.is_empty()
            || self.reorder_to_head.is_some()
            || self.promote.is_some()
    }

    /// The transition's result, once the store has assigned ids.
    pub fn outcome(&self, assigned: &Assigned) -> Outcome {
        assert_eq!(
            assigned.messages.len(),
            self.inserted_len(),
            "store assigned ids for every inserted message"
        );
        assert_eq!(assigned.queued.is_some(), self.append_queued.is_some());
        Outcome {
            transition: self.transition,
            from: self.from,
            to: self.to,
            inserted: assigned.messages.clone(),
            cancellations: self.cancellations,
            queued: assigned.queued,
            promoted: self.promote.map(|queued| Promotion {
                queued,
                message: *assigned.messages.last().expect("promoted row was inserted"),
            }),
            deleted_messages: self.soft_delete.clone(),
            deleted_queued: self.delete_queued.clone(),
            moved_to_head: self.moved_to_head,
            generation_attempt: (self.transition == Transition::RecordGenerationAttempt)
                .then_some(self.row.generation_attempt),
            requires_action_deadline: (self.transition == Transition::EnterRequiresAction)
                .then_some(self.row.requires_action_deadline_at)
                .flatten(),
        }
    }
}

/// Ids a store assigned while applying a plan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Assigned {
    /// One id per inserted history row, in insertion order.
    pub messages: Vec<MessageId>,
    /// The id of the appended queued row.
    pub queued: Option<QueuedMessageId>,
}

/// A queued row promoted into history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Promotion {
    /// The queued row (now deleted).
    pub queued: QueuedMessageId,
    /// The history row it became.
    pub message: MessageId,
}

/// The result of one applied transition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Outcome {
    /// The transition.
    pub transition: Transition,
    /// Where it started.
    pub from: ExecutionState,
    /// Where it landed.
    pub to: ExecutionState,
    /// Inserted history rows in order: synthetic cancellations first, then
    /// the transition's own messages, then a promoted row.
    pub inserted: Vec<MessageId>,
    /// How many of `inserted` are synthetic cancellations.
    pub cancellations: usize,
    /// The queued row this transition appended.
    pub queued: Option<QueuedMessageId>,
    /// The queued row promoted into history.
    pub promoted: Option<Promotion>,
    /// Soft-deleted messages (EditMessage), target first.
    pub deleted_messages: Vec<MessageId>,
    /// Deleted queued rows (the promoted one excluded).
    pub deleted_queued: Vec<QueuedMessageId>,
    /// PromoteQueuedMessage moved its target to the head.
    pub moved_to_head: bool,
    /// RecordGenerationAttempt: the new attempt number.
    pub generation_attempt: Option<i64>,
    /// EnterRequiresAction: the deadline.
    pub requires_action_deadline: Option<Timestamp>,
}

/// The checks [`decide`] makes before it looks at the input: the fence,
/// the history expectation, then the matrix (with InvalidState for an
/// Invalid chat and a reason for reconciling a valid one). They read only
/// the transition, the from-state and the row, so a caller holding a whole
/// chat can run them before it builds a [`Snapshot`].
pub(crate) fn gate(
    transition: Transition,
    from: ExecutionState,
    row: &ChatRow,
    env: &Env<'_>,
) -> Result<(), Rejection> {
    let reject = |kind| Rejection {
        transition,
        from,
        kind,
    };
    // Fenced worker calls first: a worker that lost its lease learns that,
    // whatever state the chat is in now.
    if let Some(expected) = env.fence {
        let actual = row.owner.map(|o| o.runner_id);
        if actual != Some(expected) {
            return Err(reject(RejectionKind::LeaseLost { expected, actual }));
        }
    }
    // A step generated from an old history (an EditMessage keeps the owner,
    // so the fence alone cannot tell) is refused.
    if let Some(expected) = env.history {
        let actual = row.versions.history;
        if actual != expected {
            return Err(reject(RejectionKind::HistoryChanged { expected, actual }));
        }
    }
    match transition {
        Transition::Acquire | Transition::Abandon => Ok(()),
        Transition::ReconcileInvalidState if from != ExecutionState::Invalid => {
            Err(reject(RejectionKind::TransitionNotAllowed {
                reason: Some(reasons::RECONCILE_VALID),
            }))
        }
        Transition::ReconcileInvalidState => Ok(()),
        _ if from == ExecutionState::Invalid => Err(reject(RejectionKind::InvalidState)),
        _ if !env.matrix.allows(transition, from) => {
            Err(reject(RejectionKind::TransitionNotAllowed { reason: None }))
        }
        _ => Ok(()),
    }
}

/// Decides one transition against a snapshot.
///
/// Validation order: the runner fence (fenced calls only), then the
/// history expectation (calls that carry one), then Invalid (every
/// transition but ReconcileInvalidState, Acquire and Abandon), then the
/// matrix, then the inputs. A rejection leaves everything unchanged.
///
/// The history expectation comes after the fence (a worker that lost its
/// lease learns that first: it must stop, whatever happened to the
/// history) and before everything else (a step generated from an old
/// history is refused whatever the state now, so the worker regenerates or
/// gives up instead of reading a matrix rejection it cannot act on).
pub fn decide(snap: &Snapshot, input: &Input, env: &Env<'_>) -> Result<Plan, Rejection> {
    let transition = input.transition();
    let from = snap.state();
    let reject = |kind| Rejection {
        transition,
        from,
        kind,
    };
    let not_allowed = |reason| {
        reject(RejectionKind::TransitionNotAllowed {
            reason: Some(reason),
        })
    };
    gate(transition, from, &snap.row, env)?;

    let mut d = Draft::new(snap, transition, from);
    let options = env.options;
    use ExecutionState as S;
    match input {
        Input::SetArchived { archived } => {
            if *archived == snap.row.archived {
                return Err(not_allowed(reasons::ARCHIVED_UNCHANGED));
            }
            // matrix: SetArchived flips W/E0/E1 <-> XW/XE0/XE1; all else kept.
            d.row.archived = *archived;
        }
        Input::SendMessage {
            message,
            busy_behavior,
        } => {
            if message.role != Role::User {
                return Err(not_allowed(reasons::SEND_NOT_USER));
            }
            match from {
                // matrix: SendMessage from W/E0 inserts directly.
                S::W | S::E0 => {
                    d.cancel_all(cancel_reasons::NEW_USER_MESSAGE);
                    d.insert(message.clone());
                    d.resume_running();
                }
                // matrix: SendMessage from E1 queues the message and promotes the head.
                S::E1 => {
                    d.append(message, options).map_err(reject)?;
                    d.cancel_all(cancel_reasons::QUEUE_PROMOTION);
                    d.promote_head();
                    d.resume_running();
                }
                // matrix: SendMessage from R*/I* queues; interrupt also sets interrupting.
                S::R0 | S::R1 | S::I0 | S::I1 => {
                    d.append(message, options).map_err(reject)?;
                    if *busy_behavior == BusyBehavior::Interrupt {
                        d.row.status = ChatStatus::Interrupting;
                    }
                }
                // matrix: SendMessage from A* queues; interrupt cancels the
                // pending dynamic calls and resumes running.
                S::A0 | S::A1 => {
                    if *busy_behavior == BusyBehavior::Interrupt {
                        d.cancel_dynamic(cancel_reasons::USER_MESSAGE);
                        d.append(message, options).map_err(reject)?;
                        d.row.status = ChatStatus::Running;
                        d.row.requires_action_deadline_at = None;
                    } else {
                        d.append(message, options).map_err(reject)?;
                    }
                }
                _ => unreachable!("matrix gate admits SendMessage only from W, E*, R*, I*, A*"),
            }
        }
        Input::EditMessage {
            message_id,
            content,
            created_by,
            model_config_id,
        } => {
            let ctx = env
                .edit
                .filter(|c| c.message_id == *message_id)
                .expect("EditMessage is decided with the target's edit context");
            let Some(target) = &ctx.target else {
                return Err(reject(RejectionKind::MessageNotFound { id: *message_id }));
            };
            if target.role != Role::User {
                return Err(reject(RejectionKind::EditedMessageNotUser {
                    id: *message_id,
                }));
            }
            // Truncate: soft-delete the target and everything after it, then
            // reason about tool calls as the surviving history leaves them.
            d.soft_delete = ctx.from_target.clone();
            d.tools = ctx.tools_before.clone();
            d.cancel_all(cancel_reasons::MESSAGE_EDIT);
            d.insert(NewMessage {
                role: Role::User,
                content: content.clone(),
                visibility: target.visibility,
                model_config_id: model_config_id.or(target.model_config_id),
                created_by: *created_by,
            });
            d.clear_queue();
            d.resume_running();
        }
        Input::RequestCompaction => {
            // matrix: RequestCompaction W -> R0; the owner is cleared so the
            // missing lease hints workers.
            d.row.status = ChatStatus::Running;
            d.row.owner = None;
            d.lease_fresh = false;
            d.row.last_error = None;
            d.row.requires_action_deadline_at = None;
            d.row.compaction_requested_at = Some(snap.now);
        }
        Input::DeleteQueuedMessage { id } => {
            d.require_queued(*id).map_err(reject)?;
            d.delete_queued.push(*id);
        }
        Input::PromoteQueuedMessage { id } => {
            d.require_queued(*id).map_err(reject)?;
            match from {
                // matrix: PromoteQueuedMessage from R1/I1 reorders and interrupts.
                S::R1 | S::I1 => {
                    if snap.queue.first() != Some(id) {
                        d.reorder_to_head = Some(*id);
                        d.moved_to_head = true;
                    }
                    d.row.status = ChatStatus::Interrupting;
                    d.row.compaction_requested_at = None;
                }
                // matrix: PromoteQueuedMessage from E1/A1 promotes into history.
                S::E1 | S::A1 => {
                    d.cancel_all(cancel_reasons::QUEUE_PROMOTION);
                    d.promote = Some(*id);
                    d.resume_running();
                }
                _ => {
                    unreachable!("matrix gate admits PromoteQueuedMessage only from E1, R1, I1, A1")
                }
            }
        }
        Input::Interrupt { reason } => match from {
            // matrix: Interrupt R0 -> I0, R1 -> I1, owned or not.
            S::R0 | S::R1 => {
                d.row.status = ChatStatus::Interrupting;
                d.row.compaction_requested_at = None;
            }
            // matrix: Interrupt A0 -> R0, A1 -> R1.
            S::A0 | S::A1 => {
                d.cancel_dynamic(reason_or(reason, cancel_reasons::USER));
                d.row.status = ChatStatus::Running;
                d.row.requires_action_deadline_at = None;
                d.row.compaction_requested_at = None;
            }
            _ => unreachable!("matrix gate admits Interrupt only from R*, A*"),
        },
        Input::CompleteRequiresAction {
            results,
            created_by,
            model_config_id,
        } => {
            let pending = snap.tools.outstanding(Some(&snap.row.dynamic_tools));
            let mut outputs = Vec::with_capacity(results.len());
            let mut seen = BTreeSet::new();
            for r in results {
                if !seen.insert(r.tool_call_id.as_str()) {
                    return Err(reject(RejectionKind::ToolResultDuplicate {
                        tool_call_id: r.tool_call_id.clone(),
                    }));
                }
                let output = match JsonText::parse(&r.output) {
                    Ok(output) => output,
                    Err(JsonError::TooDeep { depth, max }) => {
                        return Err(reject(RejectionKind::JsonTooDeep { depth, max }));
                    }
                    Err(_) => {
                        return Err(reject(RejectionKind::ToolResultInvalidJson {
                            tool_call_id: r.tool_call_id.clone(),
                        }));
                    }
                };
                outputs.push(output);
            }
            if let Some((id, _)) = pending.iter().find(|(id, _)| !seen.contains(id.as_str())) {
                return Err(reject(RejectionKind::ToolResultMissing {
                    tool_call_id: id.clone(),
                }));
            }
            if let Some(r) = results
                .iter()
                .find(|r| !pending.iter().any(|(id, _)| *id == r.tool_call_id))
            {
                return Err(reject(RejectionKind::ToolResultUnexpected {
                    tool_call_id: r.tool_call_id.clone(),
                }));
            }
            for (r, output) in results.iter().zip(outputs) {
                let name = pending
                    .iter()
                    .find(|(id, _)| *id == r.tool_call_id)
                    .map(|(_, name)| name.clone())
                    .expect("validated against pending");
                d.insert(NewMessage {
                    role: Role::Tool,
                    content: vec![Part::ToolResult {
                        tool_call_id: r.tool_call_id.clone(),
                        tool_name: name,
                        result: output,
                        is_error: r.is_error,
                    }],
                    visibility: Visibility::Both,
                    model_config_id: *model_config_id,
                    created_by: *created_by,
                });
            }
            // matrix: CompleteRequiresAction A0 -> R0, A1 -> R1.
            d.row.status = ChatStatus::Running;
            d.row.requires_action_deadline_at = None;
            d.row.compaction_requested_at = None;
        }
        Input::RecordGenerationAttempt => {
            d.row.generation_attempt += 1;
        }
        Input::RecordRetryState { retry_state } => {
            if retry_state.trim().is_empty() {
                return Err(not_allowed(reasons::RETRY_MISSING));
            }
            let value = match JsonText::parse(retry_state) {
                Ok(value) => value,
                Err(JsonError::TooDeep { depth, max }) => {
                    return Err(reject(RejectionKind::JsonTooDeep { depth, max }));
                }
                Err(_) => return Err(not_allowed(reasons::RETRY_INVALID)),
            };
            if value.is_null() {
                return Err(not_allowed(reasons::RETRY_MISSING));
            }
            d.row.retry_state = Some(value);
        }
        Input::CommitStep {
            messages,
            consume_compaction_request,
        } => {
            if messages.is_empty() {
                return Err(not_allowed(reasons::COMMIT_EMPTY));
            }
            for m in messages {
                d.insert(m.clone());
            }
            // The compaction marker is one-shot: only a consuming step clears it.
            if *consume_compaction_request {
                d.row.compaction_requested_at = None;
            }
        }
        Input::EnterRequiresAction => {
            if snap
                .tools
                .outstanding(Some(&snap.row.dynamic_tools))
                .is_empty()
            {
                return Err(not_allowed(reasons::NO_PENDING_DYNAMIC));
            }
            // matrix: EnterRequiresAction R0 -> A0, R1 -> A1.
            d.row.status = ChatStatus::RequiresAction;
            d.row.requires_action_deadline_at =
                Some(snap.now.plus(options.requires_action_timeout));
            d.row.compaction_requested_at = None;
        }
        Input::FinishInterruption { partial_messages } => {
            for m in partial_messages {
                d.insert(m.clone());
            }
            if !d.tools.outstanding(None).is_empty() {
                return Err(not_allowed(reasons::OUTSTANDING_AFTER_PARTIAL));
            }
            // matrix: FinishInterruption I0 -> W; I1 promotes the head -> R0/R1.
            if from == S::I1 {
                d.promote_head();
                d.row.status = ChatStatus::Running;
            } else {
                d.row.status = ChatStatus::Waiting;
            }
            d.row.requires_action_deadline_at = None;
            d.row.compaction_requested_at = None;
        }
        Input::FinishTurn => {
            // matrix: FinishTurn R0 -> W; R1 promotes the head -> R0/R1.
            if from == S::R1 {
                d.cancel_all(cancel_reasons::QUEUE_PROMOTION);
                d.promote_head();
                d.row.status = ChatStatus::Running;
            } else {
                d.row.status = ChatStatus::Waiting;
            }
            d.row.requires_action_deadline_at = None;
            d.row.compaction_requested_at = None;
        }
        Input::FinishError { last_error } => {
            // matrix: FinishError R0 -> E0, R1 -> E1.
            d.row.status = ChatStatus::Error;
            d.row.last_error = last_error.clone();
            d.row.requires_action_deadline_at = None;
            d.row.compaction_requested_at = None;
        }
        Input::CancelRequiresAction { reason } => {
            if d.cancel_dynamic(reason_or(reason, cancel_reasons::TIMED_OUT)) == 0 {
                return Err(not_allowed(reasons::NOTHING_TO_CANCEL));
            }
            // matrix: CancelRequiresAction A0 -> R0, A1 -> R1.
            d.row.status = ChatStatus::Running;
            d.row.requires_action_deadline_at = None;
            d.row.compaction_requested_at = None;
        }
        Input::ReconcileInvalidState {
            last_error,
            cancellation_reason,
        } => {
            d.cancel_dynamic(reason_or(
                cancellation_reason,
                cancel_reasons::INVALID_STATE,
            ));
            // matrix: ReconcileInvalidState Invalid -> E0/E1; the queue is kept.
            d.row.status = ChatStatus::Error;
            d.row.archived = false;
            d.row.last_error = Some(last_error.clone().unwrap_or_else(default_reconcile_error));
            d.row.requires_action_deadline_at = None;
            d.row.compaction_requested_at = None;
        }
        Input::Acquire { owner } => {
            // Ownership is orthogonal: no matrix, no check of the current owner.
            d.row.owner = Some(*owner);
            d.heartbeat = Some(owner.runner_id);
            // Earlier runners' heartbeat rows can never make a lease fresh
            // again (only an Acquire can, and it writes its own).
            d.prune_heartbeats = true;
            d.lease_fresh = true;
        }
        Input::Abandon => {
            if snap.row.owner.is_none() {
                return Err(not_allowed(reasons::NOT_OWNED));
            }
            d.row.owner = None;
            d.prune_heartbeats = true;
            d.lease_fresh = false;
        }
    }
    Ok(d.finish())
}

fn reason_or<'a>(reason: &'a Option<String>, default: &'a str) -> &'a str {
    match reason.as_deref() {
        Some(r) if !r.is_empty() => r,
        _ => default,
    }
}

/// A plan under construction.
struct Draft<'s> {
    snap: &'s Snapshot,
    transition: Transition,
    from: ExecutionState,
    row: ChatRow,
    tools: ToolState,
    lease_fresh: bool,
    soft_delete: Vec<MessageId>,
    reorder_to_head: Option<QueuedMessageId>,
    delete_queued: Vec<QueuedMessageId>,
    append_queued: Option<NewQueued>,
    messages: Vec<NewMessage>,
    cancellations: usize,
    promote: Option<QueuedMessageId>,
    heartbeat: Option<RunnerId>,
    prune_heartbeats: bool,
    moved_to_head: bool,
}

impl<'s> Draft<'s> {
    fn new(snap: &'s Snapshot, transition: Transition, from: ExecutionState) -> Self {
        Draft {
            snap,
            transition,
            from,
            row: snap.row.clone(),
            tools: snap.tools.clone(),
            lease_fresh: snap.lease_fresh,
            soft_delete: Vec::new(),
            reorder_to_head: None,
            delete_queued: Vec::new(),
            append_queued: None,
            messages: Vec::new(),
            cancellations: 0,
            promote: None,
            heartbeat: None,
            prune_heartbeats: false,
            moved_to_head: false,
        }
    }

    /// Appends a history message and accounts for its tool parts and its
    /// model configuration.
    fn insert(&mut self, m: NewMessage) {
        self.tools.observe(m.role, &m.content);
        self.row.last_model_config_id =
            last_model_config(self.row.last_model_config_id, std::slice::from_ref(&m));
        self.messages.push(m);
    }

    /// Inserts one synthetic cancellation per outstanding call (before any
    /// other message of this transition) and returns how many.
    fn cancel(&mut self, reason: &str, dynamic_only: bool) -> usize {
        debug_assert_eq!(
            self.messages.len(),
            self.cancellations,
            "cancellations come before the transition's own messages"
        );
        let dynamic = dynamic_only.then_some(&self.row.dynamic_tools);
        let outstanding = self.tools.outstanding(dynamic);
        for (id, name) in &outstanding {
            let m = NewMessage {
                role: Role::Tool,
                content: vec![Part::ToolResult {
                    tool_call_id: id.clone(),
                    tool_name: name.clone(),
                    result: JsonText::string(reason),
                    is_error: true,
                }],
                visibility: Visibility::Both,
                model_config_id: self.row.last_model_config_id,
                created_by: None,
            };
            self.insert(m);
        }
        self.cancellations += outstanding.len();
        outstanding.len()
    }

    fn cancel_all(&mut self, reason: &str) -> usize {
        self.cancel(reason, false)
    }

    fn cancel_dynamic(&mut self, reason: &str) -> usize {
        self.cancel(reason, true)
    }

    fn queue_len(&self) -> usize {
        self.snap.queue.len() - self.delete_queued.len() - usize::from(self.promote.is_some())
            + usize::from(self.append_queued.is_some())
    }

    /// Appends a message at the queue's tail, checking the cap first.
    fn append(&mut self, m: &NewMessage, options: &Options) -> Result<(), RejectionKind> {
        let max = options.max_queue_size;
        if self.queue_len() >= max as usize {
            return Err(RejectionKind::MessageQueueFull { max });
        }
        self.append_queued = Some(NewQueued {
            content: m.content.clone(),
            model_config_id: m.model_config_id,
            created_by: m.created_by.unwrap_or(self.row.owner_id),
        });
        Ok(())
    }

    fn require_queued(&self, id: QueuedMessageId) -> Result<(), RejectionKind> {
        if self.snap.queue.contains(&id) {
            Ok(())
        } else {
            Err(RejectionKind::QueuedMessageNotFound { id })
        }
    }

    /// Promotes the current head (the matrix only asks for this in states
    /// whose queue is non-empty).
    fn promote_head(&mut self) {
        let head = *self
            .snap
            .queue
            .first()
            .expect("promotion happens only from states with a queue");
        self.promote = Some(head);
    }

    fn clear_queue(&mut self) {
        self.delete_queued = self.snap.queue.clone();
    }

    /// The execution write of transitions that (re)start a turn from user
    /// input: running, not archived, error, deadline and compaction cleared.
    fn resume_running(&mut self) {
        self.row.status = ChatStatus::Running;
        self.row.archived = false;
        self.row.last_error = None;
        self.row.requires_action_deadline_at = None;
        self.row.compaction_requested_at = None;
    }

    /// Applies the version rules and classifies the landing state.
    fn finish(self) -> Plan {
        let queue_len = self.queue_len();
        let mut row = self.row;
        let old = &self.snap.row;
        let snapshot = row.versions.snapshot;
        let history_changed =
            !self.messages.is_empty() || self.promote.is_some() || !self.soft_delete.is_empty();
        let queue_changed = self.append_queued.is_some()
            || !self.delete_queued.is_empty()
            || self.reorder_to_head.is_some()
            || self.promote.is_some();
        // versions: a history change stamps history_version and restarts the
        // attempt count; a new attempt count clears the retry state; a changed
        // retry state stamps retry_state_version; a queue change stamps
        // queue_version.
        if history_changed {
            row.versions.history = snapshot;
            row.generation_attempt = 0;
        }
        if row.generation_attempt != old.generation_attempt {
            row.retry_state = None;
        }
        if row.retry_state != old.retry_state {
            row.versions.retry_state = snapshot;
        }
        if queue_changed {
            row.versions.queue = snapshot;
        }
        let to = row.classify(queue_len > 0);
        let row_changed = row != *old;
        Plan {
            transition: self.transition,
            from: self.from,
            to,
            row,
            row_changed,
            soft_delete: self.soft_delete,
            reorder_to_head: self.reorder_to_head,
            delete_queued: self.delete_queued,
            append_queued: self.append_queued,
            messages: self.messages,
            cancellations: self.cancellations,
            promote: self.promote,
            heartbeat: self.heartbeat,
            prune_heartbeats: self.prune_heartbeats,
            tools: self.tools,
            lease_fresh: self.lease_fresh,
            moved_to_head: self.moved_to_head,
        }
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::chat::{Chat, NewChat, StepEnv, step};
    use crate::data::ChatId;

    fn with(m: NewMessage, config: Option<Uuid>) -> NewMessage {
        NewMessage {
            model_config_id: config,
            ..m
        }
    }

    /// Spec (model.md §7.6): a message insert sets `last_model_config_id`
    /// to the last non-null model configuration of the batch; a batch
    /// without one leaves it; synthetic cancellations carry it.
    #[test]
    fn inserts_set_the_last_model_config() {
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let options = Options::default();
        let env = StepEnv::new(Timestamp(0), &options);
        let chat = Chat::create(&NewChat {
            id: ChatId(Uuid::from_u128(9)),
            owner_id: Uuid::from_u128(8),
            dynamic_tools: Default::default(),
            last_model_config_id: Some(c),
            messages: vec![
                with(NewMessage::user("one"), Some(a)),
                with(NewMessage::user("two"), None),
            ],
        })
        .unwrap();
        assert_eq!(
            chat.row.last_model_config_id,
            Some(a),
            "creation inserts too"
        );
        let commit = |messages| Input::CommitStep {
            messages,
            consume_compaction_request: false,
        };
        let call = NewMessage::new(Role::Assistant, vec![Part::tool_call("s1", "srv")]);
        let (chat, _) = step(
            &chat,
            &commit(vec![
                with(call, Some(b)),
                with(NewMessage::assistant("late"), None),
            ]),
            &env,
        )
        .unwrap();
        assert_eq!(chat.row.last_model_config_id, Some(b));
        let (chat, _) = step(&chat, &commit(vec![NewMessage::assistant("x")]), &env).unwrap();
        assert_eq!(chat.row.last_model_config_id, Some(b), "no config: kept");
        let (chat, _) = step(&chat, &Input::FinishTurn, &env).unwrap();
        let call = NewMessage::new(Role::Assistant, vec![Part::tool_call("s2", "srv")]);
        let (chat, _) = step(
            &chat,
            &Input::SendMessage {
                message: with(NewMessage::user("go"), Some(c)),
                busy_behavior: BusyBehavior::Queue,
            },
            &env,
        )
        .unwrap();
        assert_eq!(chat.row.last_model_config_id, Some(c));
        let (chat, _) = step(&chat, &commit(vec![call]), &env).unwrap();
        let (chat, out) = step(&chat, &Input::Interrupt { reason: None }, &env).unwrap();
        assert_eq!(out.to, ExecutionState::I0);
        let (chat, out) = step(
            &chat,
            &Input::FinishInterruption {
                partial_messages: vec![with(
                    NewMessage::new(
                        Role::Tool,
                        vec![Part::tool_result("s2", "srv", JsonText::null())],
                    ),
                    Some(a),
                )],
            },
            &env,
        )
        .unwrap();
        assert_eq!(out.to, ExecutionState::W);
        assert_eq!(chat.row.last_model_config_id, Some(a));
    }
}

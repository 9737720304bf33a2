//! What a step leaves behind: the same [`Record`] on every backend, the
//! printed [`Line`] and a detail compared but printed only on a divergence.
//! Store-assigned row ids never appear in either: results count rows
//! instead, so the backends are comparable byte for byte.

use chatstate::{Error, LockMode};
use chatstate_model::{
    ChatRow, ExecutionState, Message, Notification, Outcome, QueuedMessage, Rejection,
    RejectionKind, content_to_value,
};
use serde::Serialize;
use serde_json::{Value, json};

use super::names::Names;
use super::ops::Op;

/// One step's result on one backend.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Record {
    pub(crate) line: Line,
    /// Everything about the chat afterwards, compared but not printed.
    pub(crate) detail: Value,
}

/// The printed line of a step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Line {
    pub(crate) step: usize,
    pub(crate) op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) chat: Option<String>,
    pub(crate) ok: bool,
    /// The chat's state after the step (`N`: it does not exist).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) state: Option<&'static str>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub(crate) view: Option<RowView>,
    /// Channels published by the step, in order, without the chat id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) published: Option<Vec<&'static str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) result: Option<StepResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<ErrorView>,
}

/// The chat's counters after a step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct RowView {
    owned: bool,
    lease_fresh: bool,
    snapshot_version: i64,
    history_version: i64,
    queue_version: i64,
    generation_attempt: i64,
    retry_state_version: i64,
    queue_len: usize,
    history_len: usize,
}

/// A failed step.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(crate) struct ErrorView {
    /// `TransitionNotAllowed`, `ChatNotFound`, ..., or `Store`.
    pub(crate) kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    transition: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    /// Index of the failing transition within the Update.
    #[serde(skip_serializing_if = "Option::is_none")]
    call: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max: Option<u32>,
    /// LeaseLost: the runner the caller held and the chat's runner.
    #[serde(skip_serializing_if = "Option::is_none")]
    expected: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    actual: Option<String>,
    /// Store failures: the error chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

impl ErrorView {
    pub(crate) fn chat_not_found() -> Self {
        ErrorView {
            kind: "ChatNotFound".to_owned(),
            ..ErrorView::default()
        }
    }

    pub(crate) fn rejection(r: &Rejection, call: Option<usize>, names: &Names) -> Self {
        if r.kind == RejectionKind::ChatNotFound {
            return Self::chat_not_found();
        }
        let mut v = ErrorView {
            kind: r.kind.name().to_owned(),
            transition: Some(r.transition.as_str()),
            from: Some(r.from.as_str()),
            reason: r.kind.reason(),
            call,
            ..ErrorView::default()
        };
        match &r.kind {
            RejectionKind::ToolResultDuplicate { tool_call_id }
            | RejectionKind::ToolResultInvalidJson { tool_call_id }
            | RejectionKind::ToolResultMissing { tool_call_id }
            | RejectionKind::ToolResultUnexpected { tool_call_id } => {
                v.tool_call_id = Some(tool_call_id.clone());
            }
            RejectionKind::MessageQueueFull { max } => v.max = Some(*max),
            RejectionKind::LeaseLost { expected, actual } => {
                v.expected = Some(names.name(expected.0));
                v.actual = actual.map(|a| names.name(a.0));
            }
            _ => {}
        }
        v
    }

    pub(crate) fn error(e: &Error, call: Option<usize>, names: &Names) -> Self {
        match e {
            Error::Rejected(r) => Self::rejection(r, call, names),
            Error::ChatNotFound(_) => Self::chat_not_found(),
            Error::Store(_) => ErrorView {
                kind: "Store".to_owned(),
                message: Some(crate::error_chain(e)),
                ..ErrorView::default()
            },
            other => ErrorView {
                kind: other.kind_name().to_owned(),
                message: Some(crate::error_chain(other)),
                ..ErrorView::default()
            },
        }
    }
}

/// A chat as any backend sees it after a step.
pub(crate) struct Seen<'a> {
    pub(crate) row: &'a ChatRow,
    pub(crate) queue: &'a [QueuedMessage],
    pub(crate) history: &'a [Message],
    pub(crate) lease_fresh: bool,
}

impl Seen<'_> {
    fn state(&self) -> ExecutionState {
        self.row.classify(!self.queue.is_empty())
    }

    fn view(&self) -> RowView {
        let v = &self.row.versions;
        RowView {
            owned: self.row.owner.is_some(),
            lease_fresh: self.lease_fresh,
            snapshot_version: v.snapshot,
            history_version: v.history,
            queue_version: v.queue,
            generation_attempt: self.row.generation_attempt,
            retry_state_version: v.retry_state,
            queue_len: self.queue.len(),
            history_len: self.history.iter().filter(|m| !m.deleted).count(),
        }
    }

    /// Everything but row ids and timestamps (timestamps only by presence:
    /// Postgres keeps its own clock).
    fn detail(&self, names: &Names) -> Value {
        let r = self.row;
        let user = |u: Option<uuid::Uuid>| u.map(|u| names.name(u));
        json!({
            "row": {
                "status": r.status.as_str(),
                "archived": r.archived,
                "owner": r.owner.map(|o| json!({
                    "worker": names.name(o.worker_id.0),
                    "runner": names.name(o.runner_id.0),
                })),
                "last_error": r.last_error.as_ref().map(|j| j.to_value()),
                "retry_state": r.retry_state.as_ref().map(|j| j.to_value()),
                "generation_attempt": r.generation_attempt,
                "requires_action_deadline": r.requires_action_deadline_at.is_some(),
                "compaction_requested": r.compaction_requested_at.is_some(),
                "versions": r.versions,
                "dynamic_tools": r.dynamic_tools,
                "owner_id": names.name(r.owner_id),
                "last_model_config": user(r.last_model_config_id),
            },
            "queue": self.queue.iter().map(|q| json!({
                "content": content_to_value(&q.content),
                "model_config": user(q.model_config_id),
                "created_by": names.name(q.created_by),
            })).collect::<Vec<_>>(),
            "history": self.history.iter().map(|m| json!({
                "role": m.role.as_str(),
                "content": content_to_value(&m.content),
                "visibility": m.visibility.as_str(),
                "model_config": user(m.model_config_id),
                "created_by": user(m.created_by),
                "promoted": m.queued_message_id.is_some(),
                "deleted": m.deleted,
                "revision": m.revision,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Builds a chat step's record.
pub(crate) struct Finish<'a> {
    pub(crate) step: usize,
    pub(crate) op: &'static str,
    pub(crate) chat: &'a str,
    pub(crate) names: &'a Names,
}

impl Finish<'_> {
    pub(crate) fn record(
        &self,
        seen: Option<Seen<'_>>,
        published: &[Notification],
        outcome: Result<Option<StepResult>, ErrorView>,
    ) -> Record {
        let (ok, result, error) = match outcome {
            Ok(result) => (true, result, None),
            Err(e) => (false, None, Some(e)),
        };
        let mut detail = match &seen {
            Some(s) => s.detail(self.names),
            None => json!({"exists": false}),
        };
        detail["notifications"] = published
            .iter()
            .map(|n| {
                json!({
                    "channel": n.channel(),
                    "payload": serde_json::from_slice::<Value>(&n.payload())
                        .expect("notification payloads are JSON"),
                })
            })
            .collect();
        Record {
            line: Line {
                step: self.step,
                op: self.op,
                chat: Some(self.chat.to_owned()),
                ok,
                state: Some(
                    seen.as_ref()
                        .map_or(ExecutionState::N, Seen::state)
                        .as_str(),
                ),
                view: seen.as_ref().map(Seen::view),
                published: Some(published.iter().map(short_channel).collect()),
                result,
                error,
            },
            detail,
        }
    }
}

fn short_channel(n: &Notification) -> &'static str {
    match n {
        Notification::Update { .. } => "chat:update",
        Notification::Ownership(_) => "chat:ownership",
    }
}

pub(crate) fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Create { .. } => "create_chat",
        Op::Update { .. } => "update",
        Op::Heartbeat { .. } => "heartbeat",
        Op::Advance(_) => "advance_clock",
        Op::SetRaw { .. } => "set_raw_status",
        Op::Lock {
            mode: LockMode::Exclusive,
            ..
        } => "lock",
        Op::Lock { .. } => "read_lock",
    }
}

pub(crate) fn advance_record(
    step: usize,
    d: std::time::Duration,
    error: Option<ErrorView>,
) -> Record {
    Record {
        line: Line {
            step,
            op: "advance_clock",
            chat: None,
            ok: error.is_none(),
            state: None,
            view: None,
            published: None,
            result: error.is_none().then_some(StepResult::Advance {
                seconds: d.as_secs_f64(),
            }),
            error,
        },
        detail: Value::Null,
    }
}

/// An Update's result: one object per transition, with row ids replaced by
/// counts.
pub(crate) fn outcomes_value(outcomes: &[Outcome]) -> StepResult {
    StepResult::Update {
        transitions: outcomes.iter().map(OutcomeView::new).collect(),
    }
}

/// What a successful step returns.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub(crate) enum StepResult {
    /// An Update: one entry per transition.
    Update { transitions: Vec<OutcomeView> },
    /// CreateChat: the number of initial messages.
    Create { messages: usize },
    /// advance_clock.
    Advance { seconds: f64 },
}

/// One transition's outcome without row ids.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct OutcomeView {
    transition: &'static str,
    from: &'static str,
    to: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    inserted: usize,
    #[serde(skip_serializing_if = "is_zero")]
    cancellations: usize,
    #[serde(skip_serializing_if = "is_false")]
    queued: bool,
    #[serde(skip_serializing_if = "is_false")]
    promoted: bool,
    #[serde(skip_serializing_if = "is_zero")]
    deleted_messages: usize,
    #[serde(skip_serializing_if = "is_zero")]
    deleted_queued: usize,
    #[serde(skip_serializing_if = "is_false")]
    moved_to_head: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation_attempt: Option<i64>,
    #[serde(skip_serializing_if = "is_false")]
    requires_action_deadline: bool,
}

impl OutcomeView {
    fn new(o: &Outcome) -> Self {
        OutcomeView {
            transition: o.transition.as_str(),
            from: o.from.as_str(),
            to: o.to.as_str(),
            inserted: o.inserted.len(),
            cancellations: o.cancellations,
            queued: o.queued.is_some(),
            promoted: o.promoted.is_some(),
            deleted_messages: o.deleted_messages.len(),
            deleted_queued: o.deleted_queued.len(),
            moved_to_head: o.moved_to_head,
            generation_attempt: o.generation_attempt,
            requires_action_deadline: o.requires_action_deadline.is_some(),
        }
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

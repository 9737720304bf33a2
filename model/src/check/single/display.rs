//! Readable one-line renderings of ops, actions and states (the
//! Explorer and the counterexamples print them).

use super::*;

pub(super) fn join<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn ops_label(ops: &[Op]) -> String {
    if ops.is_empty() {
        "Update(no transitions)".to_owned()
    } else {
        ops.iter()
            .map(|op| op.to_string())
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

pub(super) fn describe_message(m: &Message) -> String {
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
/// owned, lease fresh | deadline`.
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

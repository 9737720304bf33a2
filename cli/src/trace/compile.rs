//! Compiling a trace's steps into operations, resolving every name.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use anyhow::{Context as _, bail};
use chatstate::{CreateChat, LockMode};
use chatstate_model::{
    ChatId, ChatStatus, Input, JsonText, NewMessage, Options, Owner, RunnerId, WorkerId,
};

use super::format::{Step, Trace, TraceMessage, TraceTransition};
use super::names::{Kind, Names};
use super::ops::{CallSpec, Compiled, InputSpec, Op, Target};

/// Resolves every name of a trace whose `generate` block, if it had one,
/// was expanded into steps already (generation runs the model, which sits
/// above this layer).
pub(crate) fn compile(trace: &Trace, names: Names) -> anyhow::Result<Compiled> {
    assert!(
        trace.generate.is_none(),
        "a trace's generate block is expanded before it is compiled"
    );
    let options = trace.options.options()?;
    let mut compiler = Compiler::new(names);
    let ops = trace
        .steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            compiler
                .op(step)
                .with_context(|| format!("step {i}: {}", step_name(step)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Compiled {
        options,
        names: compiler.names,
        chats: compiler.chats,
        ops,
    })
}

/// Compiles steps one at a time, giving each new chat name the next index.
pub(crate) struct Compiler {
    pub(crate) names: Names,
    slots: HashMap<String, usize>,
    pub(crate) chats: Vec<(ChatId, String)>,
}

impl Compiler {
    pub(crate) fn new(names: Names) -> Self {
        Compiler {
            names,
            slots: HashMap::new(),
            chats: Vec::new(),
        }
    }

    /// Compiles one step.
    pub(crate) fn op(&mut self, step: &Step) -> anyhow::Result<Op> {
        let chat = step.chat().map(|name| match self.slots.get(name) {
            Some(slot) => *slot,
            None => {
                let id = ChatId(self.names.id(Kind::Chat, name));
                self.chats.push((id, name.to_owned()));
                self.slots.insert(name.to_owned(), self.chats.len() - 1);
                self.chats.len() - 1
            }
        });
        compile_step(step, chat, &mut self.names, &self.chats)
    }
}

fn step_name(step: &Step) -> &'static str {
    match step {
        Step::CreateChat(_) => "create_chat",
        Step::Update(_) => "update",
        Step::Heartbeat(_) => "heartbeat",
        Step::AdvanceClock(_) => "advance_clock",
        Step::SetRawStatus(_) => "set_raw_status",
        Step::Lock(_) => "lock",
        Step::ReadLock(_) => "read_lock",
    }
}

fn compile_step(
    step: &Step,
    chat: Option<usize>,
    names: &mut Names,
    chats: &[(ChatId, String)],
) -> anyhow::Result<Op> {
    let slot = || chat.expect("chat steps have a chat");
    Ok(match step {
        Step::CreateChat(s) => {
            let owner = s.owner.as_deref().unwrap_or("owner");
            let messages = s
                .messages
                .iter()
                .map(|m| message(m, names))
                .collect::<Vec<_>>();
            Op::Create {
                chat: slot(),
                create: CreateChat {
                    id: Some(chats[slot()].0),
                    owner_id: names.id(Kind::User, owner),
                    dynamic_tools: s.dynamic_tools.iter().cloned().collect::<BTreeSet<_>>(),
                    last_model_config_id: s
                        .last_model_config
                        .as_deref()
                        .map(|c| names.id(Kind::Config, c)),
                    messages,
                    ..CreateChat::default()
                },
            }
        }
        Step::Update(s) => Op::Update {
            chat: slot(),
            calls: s
                .transitions
                .iter()
                .enumerate()
                .map(|(j, t)| call(t, names).with_context(|| format!("transition {j}")))
                .collect::<anyhow::Result<_>>()?,
        },
        Step::Heartbeat(s) => Op::Heartbeat {
            chat: slot(),
            runner: RunnerId(names.id(Kind::Runner, &s.runner)),
        },
        Step::AdvanceClock(s) => Op::Advance(advance(s.seconds)?),
        Step::SetRawStatus(s) => Op::SetRaw {
            chat: slot(),
            status: ChatStatus::parse(&s.status),
            archived: s.archived,
        },
        Step::Lock(_) => Op::Lock {
            chat: slot(),
            mode: LockMode::Exclusive,
        },
        Step::ReadLock(_) => Op::Lock {
            chat: slot(),
            mode: LockMode::Shared,
        },
    })
}

fn message(m: &TraceMessage, names: &mut Names) -> NewMessage {
    NewMessage {
        role: m.role,
        content: m.content.parts(),
        visibility: m.visibility.unwrap_or_default(),
        model_config_id: m.model_config.as_deref().map(|c| names.id(Kind::Config, c)),
        created_by: m.created_by.as_deref().map(|u| names.id(Kind::User, u)),
    }
}

fn target(index: Option<usize>, id: Option<i64>, what: &str) -> anyhow::Result<Target> {
    match (index, id) {
        (Some(i), None) => Ok(Target::Index(i)),
        (None, Some(id)) => Ok(Target::Id(id)),
        _ => bail!("give exactly one of {what} and id"),
    }
}

/// The longest single `advance_clock` step: the longest duration the
/// options allow (store time plus it must stay a Postgres timestamp).
pub(crate) const MAX_ADVANCE: Duration = Options::MAX_DURATION;

/// An `advance_clock` amount: finite, not negative, at most [`MAX_ADVANCE`].
fn advance(seconds: f64) -> anyhow::Result<Duration> {
    match Duration::try_from_secs_f64(seconds) {
        Ok(d) if d <= MAX_ADVANCE => Ok(d),
        _ => bail!(
            "seconds must be a number from 0 to {} (100 years), not {seconds}",
            MAX_ADVANCE.as_secs()
        ),
    }
}

fn json(v: &Option<serde_json::Value>) -> anyhow::Result<Option<JsonText>> {
    Ok(v.as_ref().map(JsonText::from_value).transpose()?)
}

fn fence_of(names: &mut Names, runner: &Option<String>) -> Option<RunnerId> {
    runner
        .as_deref()
        .map(|r| RunnerId(names.id(Kind::Runner, r)))
}

fn call(t: &TraceTransition, names: &mut Names) -> anyhow::Result<CallSpec> {
    use TraceTransition as T;
    let (input, fence) = match t {
        T::SetArchived { archived } => (
            InputSpec::Ready(Input::SetArchived {
                archived: *archived,
            }),
            None,
        ),
        T::SendMessage {
            message: m,
            busy_behavior,
        } => (
            InputSpec::Ready(Input::SendMessage {
                message: message(m, names),
                busy_behavior: *busy_behavior,
            }),
            None,
        ),
        T::EditMessage {
            history_index,
            id,
            content,
            created_by,
            model_config,
        } => (
            InputSpec::EditMessage {
                target: target(*history_index, *id, "history_index")?,
                content: content.parts(),
                created_by: created_by.as_deref().map(|u| names.id(Kind::User, u)),
                model_config_id: model_config.as_deref().map(|c| names.id(Kind::Config, c)),
            },
            None,
        ),
        T::RequestCompaction {} => (InputSpec::Ready(Input::RequestCompaction), None),
        T::DeleteQueuedMessage { queue_index, id } => (
            InputSpec::DeleteQueued(target(*queue_index, *id, "queue_index")?),
            None,
        ),
        T::PromoteQueuedMessage { queue_index, id } => (
            InputSpec::PromoteQueued(target(*queue_index, *id, "queue_index")?),
            None,
        ),
        T::Interrupt { reason } => (
            InputSpec::Ready(Input::Interrupt {
                reason: reason.clone(),
            }),
            None,
        ),
        T::CompleteRequiresAction {
            results,
            created_by,
        } => (
            InputSpec::Ready(Input::CompleteRequiresAction {
                results: results
                    .iter()
                    .map(|r| chatstate_model::ToolResultInput {
                        tool_call_id: r.tool_call_id.clone(),
                        output: match (&r.output_text, &r.output) {
                            (Some(text), _) => text.clone(),
                            (None, Some(v)) => v.to_string(),
                            (None, None) => "null".to_owned(),
                        },
                        is_error: r.is_error,
                    })
                    .collect(),
                created_by: created_by.as_deref().map(|u| names.id(Kind::User, u)),
                model_config_id: None,
            }),
            None,
        ),
        T::Acquire { worker, runner } => (
            InputSpec::Ready(Input::Acquire {
                owner: Owner {
                    worker_id: WorkerId(names.id(Kind::Worker, worker)),
                    runner_id: RunnerId(names.id(Kind::Runner, runner)),
                },
            }),
            None,
        ),
        T::Abandon { fence } => (InputSpec::Ready(Input::Abandon), fence_of(names, fence)),
        T::RecordGenerationAttempt { fence } => (
            InputSpec::Ready(Input::RecordGenerationAttempt),
            fence_of(names, fence),
        ),
        T::RecordRetryState {
            retry_state,
            retry_state_text,
            fence,
        } => (
            InputSpec::Ready(Input::RecordRetryState {
                retry_state: match (retry_state_text, retry_state) {
                    (Some(text), _) => text.clone(),
                    (None, Some(v)) => v.to_string(),
                    (None, None) => String::new(),
                },
            }),
            fence_of(names, fence),
        ),
        T::CommitStep {
            messages,
            consume_compaction_request,
            fence,
        } => {
            let fence = fence_of(names, fence);
            (
                InputSpec::Ready(Input::CommitStep {
                    messages: messages.iter().map(|m| message(m, names)).collect(),
                    consume_compaction_request: *consume_compaction_request,
                }),
                fence,
            )
        }
        T::EnterRequiresAction { fence } => (
            InputSpec::Ready(Input::EnterRequiresAction),
            fence_of(names, fence),
        ),
        T::FinishInterruption {
            partial_messages,
            fence,
        } => {
            let fence = fence_of(names, fence);
            (
                InputSpec::Ready(Input::FinishInterruption {
                    partial_messages: partial_messages.iter().map(|m| message(m, names)).collect(),
                }),
                fence,
            )
        }
        T::FinishTurn { fence } => (InputSpec::Ready(Input::FinishTurn), fence_of(names, fence)),
        T::FinishError { last_error, fence } => (
            InputSpec::Ready(Input::FinishError {
                last_error: json(last_error)?,
            }),
            fence_of(names, fence),
        ),
        T::CancelRequiresAction { reason, fence } => (
            InputSpec::Ready(Input::CancelRequiresAction {
                reason: reason.clone(),
            }),
            fence_of(names, fence),
        ),
        T::ReconcileInvalidState {
            last_error,
            cancellation_reason,
        } => (
            InputSpec::Ready(Input::ReconcileInvalidState {
                last_error: json(last_error)?,
                cancellation_reason: cancellation_reason.clone(),
            }),
            None,
        ),
    };
    Ok(CallSpec { input, fence })
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_example_parses() {
        let text = r#"{"options": {"max_queue_size": 20, "heartbeat_stale_secs": 30, "requires_action_timeout_secs": 300},
 "steps": [
  {"create_chat": {"chat": "c1", "dynamic_tools": ["ask_user"], "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}},
  {"update": {"chat": "c1", "transitions": [{"Acquire": {"worker": "w1", "runner": "r1"}}, {"CommitStep": {"messages": [{"role": "assistant", "content": "hello"}]}}]}},
  {"update": {"chat": "c1", "transitions": [{"SendMessage": {"message": {"role": "user", "content": [{"type": "text", "text": "next"}]}, "busy_behavior": "queue"}}]}},
  {"update": {"chat": "c1", "transitions": [{"DeleteQueuedMessage": {"queue_index": 0}}]}},
  {"update": {"chat": "c1", "transitions": [{"EditMessage": {"history_index": 0, "content": [{"type": "text", "text": "edited"}]}}]}},
  {"heartbeat": {"chat": "c1", "runner": "r1"}},
  {"advance_clock": {"seconds": 31}},
  {"set_raw_status": {"chat": "c1", "status": "paused"}},
  {"update": {"chat": "c1", "transitions": [{"FinishTurn": {}}, {"ReconcileInvalidState": {}}]}}
 ]}"#;
        let trace: Trace = serde_json::from_str(text).unwrap();
        let c = compile(&trace, Names::default()).unwrap();
        assert_eq!(c.ops.len(), 9);
        assert_eq!(c.chats.len(), 1);
        // The trace round-trips through its own serialisation.
        let again: Trace = serde_json::from_str(&serde_json::to_string(&trace).unwrap()).unwrap();
        assert_eq!(compile(&again, Names::default()).unwrap().ops.len(), 9);
    }

    #[test]
    fn bad_targets_and_unknown_fields_are_errors() {
        let both = r#"{"steps": [{"update": {"chat": "c", "transitions": [{"DeleteQueuedMessage": {"queue_index": 0, "id": 3}}]}}]}"#;
        let trace: Trace = serde_json::from_str(both).unwrap();
        let err = compile(&trace, Names::default()).unwrap_err();
        assert!(format!("{err:#}").contains("step 0"), "{err:#}");
        let typo = r#"{"steps": [{"update": {"chat": "c", "transitions": [{"FinishTurn": {"fenc": "r"}}]}}]}"#;
        assert!(serde_json::from_str::<Trace>(typo).is_err());
    }
}

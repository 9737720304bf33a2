//! The reference run: a compiled trace through the model's `update`.

use std::collections::BTreeMap;

use chatstate_model::{
    Call, Chat, MessageId, Rejection, RejectionKind, StepEnv, Timestamp, reasons, step, update,
};

use super::names::Names;
use super::ops::{CallSpec, Compiled, Op};
use super::record::{
    ErrorView, Finish, Record, Seen, StepResult, advance_record, op_name, outcomes_value,
};

/// Store time at the start of a replay on the model and the in-memory
/// store (2026-01-01T00:00:00Z). Postgres runs on its own clock; no output
/// shows a timestamp, so the two never need to agree.
pub(crate) const EPOCH: Timestamp = Timestamp(1_767_225_600_000_000);

/// Replays a trace through the model's reference `update`.
pub(crate) fn run_model(c: &Compiled) -> Vec<Record> {
    let mut world = ModelWorld::new(c.options);
    c.ops
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let chat = op.chat().map_or("", |slot| c.chats[slot].1.as_str());
            world.apply(i, op, chat, &c.names)
        })
        .collect()
}

/// The chats of a trace as the model sees them, and store time.
pub(crate) struct ModelWorld {
    /// Existing chats by index.
    pub(crate) chats: BTreeMap<usize, Chat>,
    pub(crate) now: Timestamp,
    pub(crate) options: chatstate_model::Options,
}

impl ModelWorld {
    pub(crate) fn new(options: chatstate_model::Options) -> Self {
        ModelWorld {
            chats: BTreeMap::new(),
            now: EPOCH,
            options,
        }
    }

    /// Runs step `i` (`chat` is its chat's name).
    pub(crate) fn apply(&mut self, i: usize, op: &Op, chat: &str, names: &Names) -> Record {
        let Some(slot) = op.chat() else {
            let Op::Advance(d) = op else {
                unreachable!("only advance_clock has no chat")
            };
            self.now = self.now.plus(*d);
            return advance_record(i, *d, None);
        };
        let finish = Finish {
            step: i,
            op: op_name(op),
            chat,
            names,
        };
        let options = self.options;
        let env = StepEnv::new(self.now, &options);
        let chats = &mut self.chats;
        let (published, outcome) = match op {
            Op::Create { create, .. } => match chats.get(&slot) {
                Some(existing) => (
                    Vec::new(),
                    Err(ErrorView::rejection(
                        &Rejection {
                            transition: chatstate_model::Transition::CreateChat,
                            from: existing.state(),
                            kind: RejectionKind::TransitionNotAllowed {
                                reason: Some(reasons::CREATE_EXISTS),
                            },
                        },
                        None,
                        names,
                    )),
                ),
                None => match Chat::create(&Compiled::new_chat(create)) {
                    Ok(chat) => {
                        let notes = chatstate_model::after_create(&chat.row);
                        let n = chat.history.len();
                        chats.insert(slot, chat);
                        (notes, Ok(Some(StepResult::Create { messages: n })))
                    }
                    Err(r) => (Vec::new(), Err(ErrorView::rejection(&r, None, names))),
                },
            },
            Op::Update { calls, .. } => match model_update(chats.get(&slot), calls, &env) {
                Ok(done) => {
                    let result = outcomes_value(&done.outcomes);
                    chats.insert(slot, done.chat);
                    (done.notifications, Ok(Some(result)))
                }
                Err(e) => (
                    Vec::new(),
                    Err(ErrorView::rejection(&e.rejection, Some(e.index), names)),
                ),
            },
            Op::Heartbeat { runner, .. } => match chats.get_mut(&slot) {
                Some(chat) => {
                    chat.heartbeats.insert(*runner, self.now);
                    (Vec::new(), Ok(None))
                }
                None => (Vec::new(), Err(ErrorView::chat_not_found())),
            },
            Op::SetRaw {
                status, archived, ..
            } => match chats.get_mut(&slot) {
                Some(chat) => {
                    chat.row.status = status.clone();
                    chat.row.archived = archived.unwrap_or(chat.row.archived);
                    (Vec::new(), Ok(None))
                }
                None => (Vec::new(), Err(ErrorView::chat_not_found())),
            },
            Op::Lock { .. } => match chats.get(&slot) {
                Some(_) => (Vec::new(), Ok(None)),
                None => (Vec::new(), Err(ErrorView::chat_not_found())),
            },
            Op::Advance(_) => unreachable!("handled above"),
        };
        let seen = chats.get(&slot).map(|chat| Seen {
            row: &chat.row,
            queue: &chat.queue,
            history: &chat.history,
            lease_fresh: chat.lease_fresh(self.now, &options),
        });
        finish.record(seen, &published, outcome)
    }
}

/// The model's Update of trace calls: positions are resolved against the
/// chat as the earlier calls of the same Update leave it, then the
/// reference [`update`] decides the whole bundle.
fn model_update(
    chat: Option<&Chat>,
    calls: &[CallSpec],
    env: &StepEnv<'_>,
) -> Result<chatstate_model::Committed, chatstate_model::UpdateRejected> {
    let Some(chat) = chat else {
        let resolved: Vec<Call> = calls
            .iter()
            .map(|c| Call {
                input: c.input.resolve(&[], &[]),
                fence: c.fence,
            })
            .collect();
        return update(None, &resolved, env);
    };
    let mut current = chat.clone();
    let mut resolved = Vec::with_capacity(calls.len());
    for call in calls {
        let queue: Vec<_> = current.queue.iter().map(|q| q.id).collect();
        let history: Vec<MessageId> = if call.input.needs_history() {
            current.active_history().map(|m| m.id).collect()
        } else {
            Vec::new()
        };
        let input = call.input.resolve(&queue, &history);
        let env = StepEnv {
            fence: call.fence,
            ..*env
        };
        let next = step(&current, &input, &env);
        resolved.push(Call {
            input,
            fence: call.fence,
        });
        match next {
            Ok((next, _)) => current = next,
            // `update` fails on this call too and ignores the rest.
            Err(_) => break,
        }
    }
    update(Some(chat), &resolved, env)
}

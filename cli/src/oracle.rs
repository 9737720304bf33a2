//! The linearizability oracle of `chatstate simulate`: every committed
//! Update, replayed in snapshot order through the model's reference
//! [`update`], must give the same outcomes, the same snapshot and the same
//! notifications the store gave, and each chat must end as the model ends.
//!
//! Concurrent Updates of one chat are serialised by its row lock, and
//! `snapshot_version` numbers them: if the store is right, sorting a chat's
//! committed Updates by snapshot version gives a sequential history the
//! model accepts step by step. Store time and lease freshness, the two
//! inputs the model cannot know, are taken from what each Update saw when
//! it locked the row. Row ids differ between the store (global sequences)
//! and the model (per chat from 1), so the oracle pairs them as rows appear
//! and checks that the pairing stays one-to-one.

use std::collections::{BTreeMap, HashMap};

use chatstate::ChatRecord;
use chatstate_model::{
    Call, Chat, ChatId, Input, MessageId, NewChat, Notification, Options, Outcome, QueuedMessageId,
    Snapshot, StepEnv, Timestamp, after_create, update,
};

/// A committed Update, as the store side saw it.
#[derive(Clone, Debug)]
pub(crate) struct CommittedUpdate {
    pub(crate) chat: ChatId,
    /// The snapshot version it committed (allocated by its lock).
    pub(crate) snapshot: i64,
    /// Store time of its transaction.
    pub(crate) now: Timestamp,
    /// Lease freshness when it locked the row.
    pub(crate) lease_fresh: bool,
    /// Its transitions, with store ids.
    pub(crate) calls: Vec<Call>,
    /// Their outcomes, with store ids.
    pub(crate) outcomes: Vec<Outcome>,
    /// The snapshot at the end of the callback.
    pub(crate) end: Snapshot,
}

/// A created chat and the ids the store gave its messages.
#[derive(Clone, Debug)]
pub(crate) struct CreatedChat {
    pub(crate) new: NewChat,
    pub(crate) ids: Vec<MessageId>,
}

/// What the oracle found.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    pub(crate) updates_checked: usize,
    pub(crate) chats_checked: usize,
    /// One line per violation (at most one per chat: after the first, a
    /// chat's model no longer follows the store).
    pub(crate) violations: Vec<String>,
}

/// Checks every chat.
pub(crate) fn check(
    options: &Options,
    created: Vec<CreatedChat>,
    committed: Vec<CommittedUpdate>,
    published: &HashMap<(ChatId, i64), Vec<Notification>>,
    finals: &HashMap<ChatId, ChatRecord>,
) -> Verdict {
    let mut by_chat: HashMap<ChatId, Vec<CommittedUpdate>> = HashMap::new();
    for c in committed {
        by_chat.entry(c.chat).or_default().push(c);
    }
    let mut verdict = Verdict::default();
    for chat in created {
        let id = chat.new.id;
        let mut updates = by_chat.remove(&id).unwrap_or_default();
        updates.sort_by_key(|u| u.snapshot);
        verdict.chats_checked += 1;
        let mut checker = ChatCheck::default();
        if let Err(why) = checker.run(options, &chat, &updates, published, finals.get(&id)) {
            verdict.violations.push(format!("chat {id}: {why}"));
        }
        verdict.updates_checked += checker.checked;
    }
    for (id, updates) in by_chat {
        verdict.violations.push(format!(
            "chat {id}: {} committed Updates, but its creation was not recorded",
            updates.len()
        ));
    }
    verdict
}

/// A one-to-one pairing of store row ids and model row ids.
#[derive(Debug, Default)]
struct IdMap {
    to_model: BTreeMap<i64, i64>,
    to_store: BTreeMap<i64, i64>,
}

impl IdMap {
    fn pair(&mut self, store: i64, model: i64, what: &str) -> Result<(), String> {
        let a = *self.to_model.entry(store).or_insert(model);
        let b = *self.to_store.entry(model).or_insert(store);
        if a != model || b != store {
            return Err(format!(
                "{what} ids are not one-to-one: store {store} ~ model {a}, model {model} ~ store {b}"
            ));
        }
        Ok(())
    }

    fn model(&self, store: i64, what: &str) -> Result<i64, String> {
        self.to_model
            .get(&store)
            .copied()
            .ok_or_else(|| format!("{what} {store} was never seen being created"))
    }
}

#[derive(Debug, Default)]
struct ChatCheck {
    messages: IdMap,
    queued: IdMap,
    checked: usize,
}

impl ChatCheck {
    fn run(
        &mut self,
        options: &Options,
        created: &CreatedChat,
        updates: &[CommittedUpdate],
        published: &HashMap<(ChatId, i64), Vec<Notification>>,
        last: Option<&ChatRecord>,
    ) -> Result<(), String> {
        let id = created.new.id;
        let mut model = Chat::create(&created.new)
            .map_err(|r| format!("the model refuses its creation: {r}"))?;
        if model.history.len() != created.ids.len() {
            return Err("the store created a different number of messages".to_owned());
        }
        for (m, s) in model.history.iter().zip(&created.ids) {
            self.messages.pair(s.0, m.id.0, "message")?;
        }
        let notes = published.get(&(id, 1)).cloned().unwrap_or_default();
        if notes != after_create(&model.row) {
            return Err(format!("creation published {notes:?}"));
        }
        for u in updates {
            let expected = model.row.versions.snapshot + 1;
            if u.snapshot != expected {
                return Err(format!(
                    "committed snapshot {} where {expected} comes next (a bump lost, doubled or \
                     rolled back after commit)",
                    u.snapshot
                ));
            }
            self.step(options, &mut model, u, published)
                .map_err(|why| format!("snapshot {}: {why}", u.snapshot))?;
            self.checked += 1;
        }
        let Some(last) = last else {
            return Err("the chat could not be read at the end".to_owned());
        };
        self.compare_final(&model, last)
    }

    fn step(
        &mut self,
        options: &Options,
        model: &mut Chat,
        u: &CommittedUpdate,
        published: &HashMap<(ChatId, i64), Vec<Notification>>,
    ) -> Result<(), String> {
        // Lease freshness as the store saw it when locking: the heartbeats
        // themselves run outside Updates, concurrently.
        model.heartbeats.clear();
        match (model.row.owner, u.lease_fresh) {
            (Some(owner), true) => {
                model.heartbeats.insert(owner.runner_id, u.now);
            }
            (None, true) => return Err("a fresh lease on an unowned chat".to_owned()),
            (_, false) => {}
        }
        let calls: Vec<Call> = u
            .calls
            .iter()
            .map(|c| {
                Ok(Call {
                    input: self.to_model_input(&c.input)?,
                    fence: c.fence,
                })
            })
            .collect::<Result<_, String>>()?;
        let env = StepEnv::new(u.now, options);
        let done = update(Some(model), &calls, &env)
            .map_err(|e| format!("the model rejects a committed Update: {e}"))?;
        if done.outcomes.len() != u.outcomes.len() {
            return Err("a different number of outcomes".to_owned());
        }
        for (store, expected) in u.outcomes.iter().zip(&done.outcomes) {
            let got = self.pair_outcome(store, expected)?;
            if got != *expected {
                return Err(format!(
                    "outcome differs: store {got:?}, model {expected:?}"
                ));
            }
        }
        let snap = done.chat.snapshot(u.now, options);
        let end = Snapshot {
            queue: u
                .end
                .queue
                .iter()
                .map(|q| {
                    self.queued
                        .model(q.0, "queued message")
                        .map(QueuedMessageId)
                })
                .collect::<Result<_, _>>()?,
            ..u.end.clone()
        };
        if end != snap {
            return Err(format!("snapshot differs: store {end:?}, model {snap:?}"));
        }
        let notes = published
            .get(&(u.chat, u.snapshot))
            .cloned()
            .unwrap_or_default();
        if notes != done.notifications {
            return Err(format!(
                "published {notes:?}, the model publishes {:?}",
                done.notifications
            ));
        }
        *model = done.chat;
        Ok(())
    }

    fn to_model_input(&self, input: &Input) -> Result<Input, String> {
        Ok(match input {
            Input::EditMessage {
                message_id,
                content,
                created_by,
                model_config_id,
            } => Input::EditMessage {
                message_id: MessageId(self.messages.model(message_id.0, "message")?),
                content: content.clone(),
                created_by: *created_by,
                model_config_id: *model_config_id,
            },
            Input::DeleteQueuedMessage { id } => Input::DeleteQueuedMessage {
                id: QueuedMessageId(self.queued.model(id.0, "queued message")?),
            },
            Input::PromoteQueuedMessage { id } => Input::PromoteQueuedMessage {
                id: QueuedMessageId(self.queued.model(id.0, "queued message")?),
            },
            other => other.clone(),
        })
    }

    /// The store's outcome in model ids, pairing the rows it created with
    /// the model's.
    fn pair_outcome(&mut self, store: &Outcome, model: &Outcome) -> Result<Outcome, String> {
        if store.inserted.len() != model.inserted.len() {
            return Err(format!(
                "{} inserted {} rows, the model {}",
                store.transition,
                store.inserted.len(),
                model.inserted.len()
            ));
        }
        for (s, m) in store.inserted.iter().zip(&model.inserted) {
            self.messages.pair(s.0, m.0, "message")?;
        }
        if let (Some(s), Some(m)) = (store.queued, model.queued) {
            self.queued.pair(s.0, m.0, "queued message")?;
        }
        let msg = |id: &MessageId| self.messages.model(id.0, "message").map(MessageId);
        let queued = |id: &QueuedMessageId| {
            self.queued
                .model(id.0, "queued message")
                .map(QueuedMessageId)
        };
        Ok(Outcome {
            inserted: store.inserted.iter().map(msg).collect::<Result<_, _>>()?,
            queued: store.queued.as_ref().map(queued).transpose()?,
            promoted: store
                .promoted
                .map(|p| -> Result<_, String> {
                    Ok(chatstate_model::Promotion {
                        queued: queued(&p.queued)?,
                        message: msg(&p.message)?,
                    })
                })
                .transpose()?,
            deleted_messages: store
                .deleted_messages
                .iter()
                .map(msg)
                .collect::<Result<_, _>>()?,
            deleted_queued: store
                .deleted_queued
                .iter()
                .map(queued)
                .collect::<Result<_, _>>()?,
            ..store.clone()
        })
    }

    fn compare_final(&self, model: &Chat, last: &ChatRecord) -> Result<(), String> {
        if last.row.versions.snapshot != model.row.versions.snapshot {
            return Err(format!(
                "the store is at snapshot {}, but only Updates up to {} were recorded \
                 (a commit nobody saw)",
                last.row.versions.snapshot, model.row.versions.snapshot
            ));
        }
        if last.row != model.row {
            return Err(format!(
                "final row differs: store {:?}, model {:?}",
                last.row, model.row
            ));
        }
        if last.queue.len() != model.queue.len() || last.history.len() != model.history.len() {
            return Err("final queue or history lengths differ".to_owned());
        }
        for (s, m) in last.queue.iter().zip(&model.queue) {
            if self.queued.model(s.id.0, "queued message")? != m.id.0
                || (&s.content, s.model_config_id, s.created_by)
                    != (&m.content, m.model_config_id, m.created_by)
            {
                return Err(format!("final queue differs at store id {}", s.id));
            }
        }
        for (s, m) in last.history.iter().zip(&model.history) {
            let promoted_from = s
                .queued_message_id
                .map(|q| self.queued.model(q.0, "queued message"))
                .transpose()?;
            let same = self.messages.model(s.id.0, "message")? == m.id.0
                && promoted_from == m.queued_message_id.map(|q| q.0)
                && (
                    s.role,
                    &s.content,
                    s.visibility,
                    s.model_config_id,
                    s.created_by,
                    s.deleted,
                    s.revision,
                ) == (
                    m.role,
                    &m.content,
                    m.visibility,
                    m.model_config_id,
                    m.created_by,
                    m.deleted,
                    m.revision,
                );
            if !same {
                return Err(format!("final history differs at store id {}", s.id));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatstate::ChatMetadata;
    use chatstate_model::{
        BusyBehavior, NewMessage, Owner, Promotion, RunnerId, StepEnv, WorkerId,
    };

    /// Store ids are the model's plus this, as if other chats had taken
    /// the lower ones.
    const SHIFT: i64 = 1000;

    fn shift_outcome(o: &Outcome) -> Outcome {
        let m = |id: &MessageId| MessageId(id.0 + SHIFT);
        let q = |id: &QueuedMessageId| QueuedMessageId(id.0 + SHIFT);
        Outcome {
            inserted: o.inserted.iter().map(m).collect(),
            queued: o.queued.as_ref().map(q),
            promoted: o.promoted.map(|p| Promotion {
                queued: q(&p.queued),
                message: m(&p.message),
            }),
            deleted_messages: o.deleted_messages.iter().map(m).collect(),
            deleted_queued: o.deleted_queued.iter().map(q).collect(),
            ..o.clone()
        }
    }

    fn shift_input(i: &Input) -> Input {
        match i {
            Input::EditMessage {
                message_id,
                content,
                created_by,
                model_config_id,
            } => Input::EditMessage {
                message_id: MessageId(message_id.0 + SHIFT),
                content: content.clone(),
                created_by: *created_by,
                model_config_id: *model_config_id,
            },
            Input::DeleteQueuedMessage { id } => Input::DeleteQueuedMessage {
                id: QueuedMessageId(id.0 + SHIFT),
            },
            other => other.clone(),
        }
    }

    struct Run {
        options: Options,
        created: CreatedChat,
        committed: Vec<CommittedUpdate>,
        published: HashMap<(ChatId, i64), Vec<Notification>>,
        finals: HashMap<ChatId, ChatRecord>,
    }

    /// A chat driven through the model, recorded as a store would record
    /// it (with shifted ids).
    fn run() -> Run {
        let options = Options::default();
        let new = NewChat {
            id: ChatId(uuid::Uuid::from_u128(7)),
            owner_id: uuid::Uuid::from_u128(8),
            dynamic_tools: Default::default(),
            last_model_config_id: None,
            messages: vec![NewMessage::user("hi")],
        };
        let mut chat = Chat::create(&new).unwrap();
        let mut published = HashMap::new();
        published.insert((new.id, 1), after_create(&chat.row));
        let runner = RunnerId(uuid::Uuid::from_u128(9));
        let owner = Owner {
            worker_id: WorkerId(uuid::Uuid::from_u128(10)),
            runner_id: runner,
        };
        let bundles: Vec<Vec<Input>> = vec![
            vec![
                Input::Acquire { owner },
                Input::CommitStep {
                    messages: vec![NewMessage::assistant("hello")],
                    consume_compaction_request: false,
                },
            ],
            vec![Input::SendMessage {
                message: NewMessage::user("more"),
                busy_behavior: BusyBehavior::Queue,
            }],
            vec![Input::SendMessage {
                message: NewMessage::user("and more"),
                busy_behavior: BusyBehavior::Queue,
            }],
            vec![Input::DeleteQueuedMessage {
                id: QueuedMessageId(2),
            }],
            vec![Input::FinishTurn],
            vec![Input::EditMessage {
                message_id: MessageId(1),
                content: vec![chatstate_model::Part::text("hi again")],
                created_by: None,
                model_config_id: None,
            }],
        ];
        let mut committed = Vec::new();
        for (i, inputs) in bundles.into_iter().enumerate() {
            let now = Timestamp(1_000_000 * (i as i64 + 1));
            let lease_fresh = chat.row.owner.is_some();
            if let Some(o) = chat.row.owner {
                chat.heartbeats.insert(o.runner_id, now);
            }
            let calls: Vec<Call> = inputs.into_iter().map(Call::from).collect();
            let done = update(Some(&chat), &calls, &StepEnv::new(now, &options)).unwrap();
            let end = done.chat.snapshot(now, &options);
            committed.push(CommittedUpdate {
                chat: new.id,
                snapshot: done.chat.row.versions.snapshot,
                now,
                lease_fresh,
                calls: calls
                    .iter()
                    .map(|c| Call {
                        input: shift_input(&c.input),
                        fence: c.fence,
                    })
                    .collect(),
                outcomes: done.outcomes.iter().map(shift_outcome).collect(),
                end: Snapshot {
                    queue: end
                        .queue
                        .iter()
                        .map(|q| QueuedMessageId(q.0 + SHIFT))
                        .collect(),
                    ..end
                },
            });
            published.insert(
                (new.id, done.chat.row.versions.snapshot),
                done.notifications,
            );
            chat = done.chat;
        }
        let mut last = ChatRecord {
            row: chat.row.clone(),
            metadata: ChatMetadata::default(),
            queue: chat.queue.clone(),
            history: chat.history.clone(),
        };
        for m in &mut last.history {
            m.id = MessageId(m.id.0 + SHIFT);
            m.queued_message_id = m.queued_message_id.map(|q| QueuedMessageId(q.0 + SHIFT));
        }
        for q in &mut last.queue {
            q.id = QueuedMessageId(q.id.0 + SHIFT);
        }
        Run {
            options,
            created: CreatedChat {
                ids: chat
                    .history
                    .iter()
                    .take(1)
                    .map(|m| MessageId(m.id.0 + SHIFT))
                    .collect(),
                new,
            },
            committed,
            published,
            finals: [(ChatId(uuid::Uuid::from_u128(7)), last)].into(),
        }
    }

    /// Runs the oracle on a recorded run, after `tamper`, and returns the
    /// violations.
    fn check_tampered(tamper: impl FnOnce(&mut Run)) -> Vec<String> {
        let mut r = run();
        tamper(&mut r);
        check(
            &r.options,
            vec![r.created],
            r.committed,
            &r.published,
            &r.finals,
        )
        .violations
    }

    #[test]
    fn a_faithful_store_passes() {
        assert_eq!(check_tampered(|_| {}), Vec::<String>::new());
    }

    #[test]
    fn a_lost_commit_is_a_gap() {
        let v = check_tampered(|r| {
            r.committed.remove(2);
        });
        assert!(
            v[0].contains("committed snapshot 5 where 4 comes next"),
            "{v:?}"
        );
    }

    #[test]
    fn an_unrecorded_commit_at_the_end_is_found() {
        let v = check_tampered(|r| {
            r.committed.pop();
        });
        assert!(v[0].contains("a commit nobody saw"), "{v:?}");
    }

    #[test]
    fn a_wrong_landing_state_is_found() {
        let v =
            check_tampered(|r| r.committed[4].outcomes[0].to = chatstate_model::ExecutionState::R1);
        assert!(v[0].contains("outcome differs"), "{v:?}");
    }

    #[test]
    fn a_wrong_version_is_found() {
        let v = check_tampered(|r| r.committed[1].end.row.versions.queue += 1);
        assert!(v[0].contains("snapshot differs"), "{v:?}");
    }

    #[test]
    fn a_missing_hint_is_found() {
        // A new chat is runnable and unowned: its creation must hint.
        let v = check_tampered(|r| {
            let notes = r.published.get_mut(&(r.created.new.id, 1)).unwrap();
            notes.pop();
        });
        assert!(v[0].contains("creation published"), "{v:?}");
    }

    #[test]
    fn ids_that_are_not_one_to_one_are_found() {
        let v = check_tampered(|r| {
            // The second send claims the id the first send's row got.
            let first = r.committed[1].outcomes[0].queued;
            r.committed[2].outcomes[0].queued = first;
        });
        assert!(v[0].contains("not one-to-one"), "{v:?}");
    }

    #[test]
    fn a_different_final_history_is_found() {
        let v = check_tampered(|r| {
            let last = r.finals.values_mut().next().unwrap();
            last.history[1].deleted = !last.history[1].deleted;
        });
        assert!(v[0].contains("final history differs"), "{v:?}");
    }
}

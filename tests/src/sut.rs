//! The system under test of the model-based tests: a real store driven by
//! the machine, compared with the [`World`] after every operation.
//!
//! [`Sut::check`] runs one [`Op`] on the store (through `ChatMachine`, with
//! notifications going to a [`RecordingPublisher`] after commit) and
//! compares, with the model's expectation: the outcome of every call or the
//! error (kind, transition, from-state, reason, failing call), the exact
//! notifications (channels and payload bytes), and then the whole chat
//! (classified state, row with ownership and all four versions, queue in
//! order, every history message with roles, parts, soft deletes and
//! revisions).
//!
//! Row ids differ between the store and the model. History rows are never
//! removed (edits soft-delete), so a message is identified by its position in
//! the chat's full history on both sides. Queued rows are deleted, so the
//! pairing of store and model queued ids is learned as rows appear (from
//! outcomes and from the queue order) and checked to stay one-to-one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chatstate::{
    ChatMachine, ChatRecord, CreateChat, Created, Error, LeaseStatus, Notify, Published,
    RecordingPublisher, Store, StoreError, TestControl, create_chat,
};
use chatstate_model::{
    Call, Chat, ChatId, ChatRow, Input, MessageId, Notification, Options, Outcome, QueuedMessageId,
    Rejection, RejectionKind, Snapshot, Timestamp,
};

use crate::world::{Expect, Foreign, Op, View, World, resolve, runner};

/// A result of a check: `Err` says what differed.
pub type Check = Result<(), String>;

/// A one-to-one pairing of store ids and model ids.
#[derive(Clone, Debug, Default)]
pub struct IdMap {
    to_model: BTreeMap<i64, i64>,
    to_store: BTreeMap<i64, i64>,
}

impl IdMap {
    /// Records that store id `store` is model id `model`; fails if either
    /// is already paired with another.
    pub fn pair(&mut self, store: i64, model: i64) -> Check {
        if let Some(m) = self.to_model.get(&store)
            && *m != model
        {
            return Err(format!(
                "store queued id {store} is model id {m}, now also {model}"
            ));
        }
        if let Some(s) = self.to_store.get(&model)
            && *s != store
        {
            return Err(format!(
                "model queued id {model} is store id {s}, now also {store}"
            ));
        }
        self.to_model.insert(store, model);
        self.to_store.insert(model, store);
        Ok(())
    }

    /// The model id of a store id, if paired.
    pub fn model(&self, store: i64) -> Option<i64> {
        self.to_model.get(&store).copied()
    }
}

/// A store driven through the machine, with what the tests learned about
/// its ids.
pub struct Sut<S: Store + TestControl> {
    /// The store.
    pub store: S,
    /// Receives every notification after commit.
    pub publisher: Arc<RecordingPublisher>,
    /// Tunables (the world's).
    pub options: Options,
    /// Chat id of every slot.
    pub ids: Vec<ChatId>,
    /// Compare store timestamps exactly (the store's clock is the model's).
    /// Postgres runs on real time: there only presence is compared.
    pub exact_time: bool,
    /// The last record read of every slot.
    cache: Vec<Option<ChatRecord>>,
    /// Store queued id -> model queued id, per slot.
    queued: Vec<IdMap>,
    /// A read taken right after the last operation, per slot.
    fresh: Vec<Option<ChatRecord>>,
}

/// What the store did with one operation, before any comparison.
#[derive(Debug)]
pub enum Ran {
    /// CreateChat.
    Created(Result<Created, Error>),
    /// An Update: the calls as the store side resolved them, and the result.
    Updated {
        /// Resolved calls, up to the failing one.
        resolved: Vec<Call>,
        /// Outcomes, or the error.
        result: Result<Vec<Outcome>, Error>,
    },
    /// Lock or ReadLock: the snapshot seen.
    Locked(Result<Snapshot, Error>),
    /// A heartbeat.
    Heartbeat(Result<LeaseStatus, Error>),
    /// A clock move.
    Advanced(Result<(), StoreError>),
    /// A raw write (`None`: skipped, the chat does not exist).
    Raw(Option<Result<(), StoreError>>),
}

impl Ran {
    /// The store failure the operation ended with, if it ended with one.
    pub fn store_error(&self) -> Option<&StoreError> {
        fn machine(e: &Error) -> Option<&StoreError> {
            match e {
                Error::Store(e) => Some(e),
                _ => None,
            }
        }
        match self {
            Ran::Created(Err(e))
            | Ran::Updated { result: Err(e), .. }
            | Ran::Locked(Err(e))
            | Ran::Heartbeat(Err(e)) => machine(e),
            Ran::Advanced(Err(e)) | Ran::Raw(Some(Err(e))) => Some(e),
            _ => None,
        }
    }
}

/// True if the backend's store time is the model's (the in-memory store's
/// manual clock).
pub fn exact_time(name: &str) -> bool {
    name == "mem"
}

impl<S: Store + TestControl> Sut<S> {
    /// A driver for a store with the chats of `world`.
    pub fn new(store: S, world: &World, exact_time: bool) -> Self {
        Sut {
            store,
            publisher: Arc::new(RecordingPublisher::new()),
            options: world.options,
            ids: world.ids.clone(),
            exact_time,
            cache: vec![None; world.ids.len()],
            queued: vec![IdMap::default(); world.ids.len()],
            fresh: vec![None; world.ids.len()],
        }
    }

    /// The machine of a slot's chat.
    pub fn machine(&self, slot: usize) -> ChatMachine<S> {
        ChatMachine::new(
            self.store.clone(),
            Notify::AfterCommit(self.publisher.clone()),
            self.ids[slot],
            self.options,
        )
    }

    /// The rows of the next chat that "foreign" inputs name.
    pub(crate) fn foreign(&self, world: &World, slot: u8) -> Foreign {
        let rec = self.cache[world.foreign_slot(slot)].as_ref();
        Foreign {
            message: rec
                .and_then(|r| r.active_history().next().map(|m| m.id))
                .unwrap_or(MessageId(i64::MAX - 1)),
            queued: rec
                .and_then(|r| r.queue.first().map(|q| q.id))
                .unwrap_or(QueuedMessageId(i64::MAX - 1)),
        }
    }

    /// Runs `op` on the store and compares it with the model: `before` is
    /// the world the operation started from, `after` and `expect` what
    /// [`World::step`] made of it.
    pub async fn check(
        &mut self,
        op: &Op,
        before: &World,
        after: &World,
        expect: &Expect,
    ) -> Check {
        self.run(op, before, after, expect).await?;
        self.check_published(expect)?;
        if let Some(slot) = op.slot() {
            self.verify(after, after.index(slot)).await?;
        }
        Ok(())
    }

    /// Runs `op` and compares its direct result (not yet the notifications
    /// or the stored chat).
    pub async fn run(&mut self, op: &Op, before: &World, after: &World, expect: &Expect) -> Check {
        let ran = self.exec(op, before).await;
        self.compare(ran, before, after, expect).await
    }

    /// Runs `op` on the store, comparing nothing.
    pub async fn exec(&self, op: &Op, before: &World) -> Ran {
        match op {
            Op::Create {
                slot,
                msgs,
                dynamic,
                config,
            } => {
                let new = before.new_chat(*slot, msgs, *dynamic, *config);
                Ran::Created(
                    create_chat(
                        &self.store,
                        &Notify::AfterCommit(self.publisher.clone()),
                        CreateChat::from(new),
                    )
                    .await,
                )
            }
            Op::Update { slot, calls } => {
                let m = self.machine(before.index(*slot));
                let foreign = self.foreign(before, *slot);
                let mut resolved: Vec<Call> = Vec::new();
                let result = m
                    .update(async |tx| {
                        let mut outcomes = Vec::with_capacity(calls.len());
                        for c in calls {
                            let rec = tx.load().await?;
                            let input = resolve(&c.spec, &View::of_record(&rec), &foreign);
                            let fence = c.fence.map(runner);
                            resolved.push(Call {
                                input: input.clone(),
                                fence,
                            });
                            let out = match fence {
                                Some(r) => tx.fenced(r).apply_input(input).await?,
                                None => tx.apply(input).await?,
                            };
                            outcomes.push(out);
                        }
                        Ok(outcomes)
                    })
                    .await;
                Ran::Updated { resolved, result }
            }
            Op::Lock { slot, shared } => {
                let m = self.machine(before.index(*slot));
                Ran::Locked(if *shared {
                    m.read_lock(async |r| Ok(r.snapshot().clone())).await
                } else {
                    m.lock(async |l| Ok(l.snapshot().clone())).await
                })
            }
            Op::Heartbeat { slot, runner: r } => Ran::Heartbeat(
                self.machine(before.index(*slot))
                    .heartbeat(runner(*r))
                    .await,
            ),
            Op::Advance { secs } => Ran::Advanced(
                self.store
                    .advance_clock(Duration::from_secs(u64::from(*secs)))
                    .await,
            ),
            Op::Raw {
                slot,
                status,
                archived,
            } => {
                // A raw write needs a row; for a missing chat the model
                // skips it, and so does the store.
                if before.chat(*slot).is_none() {
                    return Ran::Raw(None);
                }
                Ran::Raw(Some(
                    self.store
                        .set_raw_state(self.ids[before.index(*slot)], &status.status(), *archived)
                        .await,
                ))
            }
        }
    }

    /// Compares what the store did with what the model expects.
    pub async fn compare(
        &mut self,
        ran: Ran,
        before: &World,
        after: &World,
        expect: &Expect,
    ) -> Check {
        match ran {
            Ran::Created(got) => match (got, expect) {
                (Ok(created), Expect::Created { chat, .. }) => {
                    self.rows_equal(&chat.row, &created.row)?;
                    if created.messages.len() != chat.history.len() {
                        return Err(format!(
                            "created {} messages, model {}",
                            created.messages.len(),
                            chat.history.len()
                        ));
                    }
                    Ok(())
                }
                (Err(Error::Rejected(got)), Expect::CreateRejected(want)) => {
                    same(&got, want, "create rejection")
                }
                (got, want) => Err(mismatch(&got.map(|c| c.chat_id), want)),
            },
            Ran::Updated { resolved, result } => {
                match (result, expect) {
                    (
                        Ok(outs),
                        Expect::Committed {
                            calls: want_calls,
                            outcomes,
                            ..
                        },
                    ) => {
                        let slot = self.committed_slot(before, after)?;
                        let rec = self
                            .machine(slot)
                            .load()
                            .await
                            .map_err(|e| format!("reload: {e}"))?;
                        // Outcomes first: they pair the queued rows this
                        // Update appended, which later calls may name.
                        self.compare_outcomes(slot, &outs, outcomes, &rec)?;
                        self.compare_calls(slot, &resolved, want_calls, &rec, after)?;
                        // Nothing can change the chat before the next
                        // verification: it may use this read.
                        self.fresh[slot] = Some(rec);
                        Ok(())
                    }
                    (
                        Err(Error::Rejected(got)),
                        Expect::Rejected {
                            calls: want_calls,
                            index,
                            rejection,
                        },
                    ) => {
                        if resolved.len() != index + 1 {
                            return Err(format!(
                                "the store rejected call {} ({got}), the model call {index} ({rejection})",
                                resolved.len().saturating_sub(1)
                            ));
                        }
                        let got = normalise(&got, &resolved[*index].input)?;
                        let want = normalise(rejection, &want_calls[*index].input)?;
                        same(&got, &want, "rejection")
                    }
                    (Err(Error::ChatNotFound(_)), Expect::ChatNotFound) => Ok(()),
                    (got, want) => Err(mismatch(&got.map(|o| o.len()), want)),
                }
            }
            Ran::Locked(got) => match (got, expect) {
                (Ok(snap), Expect::Locked(want)) => {
                    let slot = self.slot_of(snap.row.id)?;
                    self.compare_snapshot(slot, &snap, want)
                }
                (Err(Error::ChatNotFound(_)), Expect::ChatNotFound) => Ok(()),
                (got, want) => Err(mismatch(&got.map(|s| s.state()), want)),
            },
            Ran::Heartbeat(got) => match (got, expect) {
                (Ok(got), Expect::Heartbeat(want)) if got == *want => Ok(()),
                (Ok(LeaseStatus::ChatGone), Expect::ChatNotFound) => Ok(()),
                (got, want) => Err(mismatch(&got, want)),
            },
            Ran::Advanced(got) => got.map_err(|e| format!("advance clock: {e}")),
            Ran::Raw(None) => Ok(()),
            Ran::Raw(Some(got)) => got.map_err(|e| format!("raw write: {e}")),
        }
    }

    fn slot_of(&self, id: ChatId) -> Result<usize, String> {
        self.ids
            .iter()
            .position(|c| *c == id)
            .ok_or_else(|| format!("chat {id} is not in the world"))
    }

    /// The slot whose chat a committed Update changed.
    fn committed_slot(&self, before: &World, after: &World) -> Result<usize, String> {
        (0..self.ids.len())
            .find(|i| {
                after.chats[*i].as_ref().map(|c| c.row.versions.snapshot)
                    != before.chats[*i].as_ref().map(|c| c.row.versions.snapshot)
            })
            .ok_or_else(|| "a committed Update changed no chat of the model".to_owned())
    }

    /// Compares what was published since the last check with what the
    /// model says the operation publishes, byte for byte, and forgets it.
    pub fn check_published(&self, expect: &Expect) -> Check {
        let want: Vec<Published> = match expect {
            Expect::Created { notes, .. } | Expect::Committed { notes, .. } => notes
                .iter()
                .map(|n: &Notification| Published {
                    channel: n.channel(),
                    payload: n.payload(),
                })
                .collect(),
            _ => Vec::new(),
        };
        let got = self.publisher.published();
        self.publisher.clear();
        if got != want {
            let show = |ps: &[Published]| {
                ps.iter()
                    .map(|p| format!("{} {}", p.channel, String::from_utf8_lossy(&p.payload)))
                    .collect::<Vec<_>>()
            };
            return Err(format!(
                "published {:#?}\nmodel publishes {:#?}",
                show(&got),
                show(&want)
            ));
        }
        Ok(())
    }

    /// Reloads a slot's chat and compares it with the world.
    pub async fn verify(&mut self, world: &World, slot: usize) -> Check {
        let got = match self.fresh[slot].take() {
            Some(rec) => Ok(rec),
            None => self.machine(slot).load().await,
        };
        match (&world.chats[slot], got) {
            (None, Err(Error::ChatNotFound(_))) => {
                self.cache[slot] = None;
                Ok(())
            }
            (Some(chat), Ok(rec)) => {
                let r = self.compare_chat(slot, chat, &rec);
                self.cache[slot] = Some(rec);
                r.map_err(|e| format!("chat{slot}: {e}"))
            }
            (want, got) => Err(format!(
                "chat{slot}: store {:?}, model {:?}",
                got.map(|r| r.state()),
                want.as_ref().map(Chat::state)
            )),
        }
    }

    /// Verifies every slot.
    pub async fn verify_all(&mut self, world: &World) -> Check {
        for slot in 0..world.ids.len() {
            self.verify(world, slot).await?;
        }
        Ok(())
    }

    /// The last record read of a slot.
    pub fn cached(&self, slot: usize) -> Option<&ChatRecord> {
        self.cache[slot].as_ref()
    }

    fn time(&self, t: Option<Timestamp>) -> Option<Timestamp> {
        if self.exact_time {
            t
        } else {
            t.map(|_| Timestamp(0))
        }
    }

    fn row(&self, row: &ChatRow) -> ChatRow {
        let mut row = row.clone();
        row.requires_action_deadline_at = self.time(row.requires_action_deadline_at);
        row.compaction_requested_at = self.time(row.compaction_requested_at);
        row
    }

    /// Compares rows (timestamps by presence only off the manual clock).
    pub fn rows_equal(&self, model: &ChatRow, store: &ChatRow) -> Check {
        if self.row(model) != self.row(store) {
            return Err(format!("row differs:\nstore {store:#?}\nmodel {model:#?}"));
        }
        Ok(())
    }

    fn compare_chat(&mut self, slot: usize, chat: &Chat, rec: &ChatRecord) -> Check {
        if rec.state() != chat.state() {
            return Err(format!("state {} (model {})", rec.state(), chat.state()));
        }
        self.rows_equal(&chat.row, &rec.row)?;
        if rec.history.len() != chat.history.len() {
            return Err(format!(
                "history has {} messages (model {}):\nstore {:#?}\nmodel {:#?}",
                rec.history.len(),
                chat.history.len(),
                rec.history,
                chat.history
            ));
        }
        for (i, (s, m)) in rec.history.iter().zip(&chat.history).enumerate() {
            assert_eq!(m.id, MessageId(i as i64 + 1), "model ids count from 1");
            if let (Some(sq), Some(mq)) = (s.queued_message_id, m.queued_message_id) {
                self.queued[slot].pair(sq.0, mq.0)?;
            }
            let same = s.role == m.role
                && s.content == m.content
                && s.visibility == m.visibility
                && s.model_config_id == m.model_config_id
                && s.created_by == m.created_by
                && s.queued_message_id.is_some() == m.queued_message_id.is_some()
                && s.deleted == m.deleted
                && s.revision == m.revision;
            if !same {
                return Err(format!("history[{i}] differs:\nstore {s:#?}\nmodel {m:#?}"));
            }
        }
        if rec.queue.len() != chat.queue.len() {
            return Err(format!(
                "queue has {} rows (model {})",
                rec.queue.len(),
                chat.queue.len()
            ));
        }
        for (i, (s, m)) in rec.queue.iter().zip(&chat.queue).enumerate() {
            self.queued[slot].pair(s.id.0, m.id.0)?;
            if s.content != m.content
                || s.model_config_id != m.model_config_id
                || s.created_by != m.created_by
            {
                return Err(format!("queue[{i}] differs:\nstore {s:#?}\nmodel {m:#?}"));
            }
        }
        Ok(())
    }

    fn message_position(rec: &ChatRecord, id: MessageId) -> MessageId {
        rec.history
            .iter()
            .position(|m| m.id == id)
            .map_or(MessageId(-1), |p| MessageId(p as i64 + 1))
    }

    fn queued_model(&self, slot: usize, id: QueuedMessageId) -> QueuedMessageId {
        QueuedMessageId(self.queued[slot].model(id.0).unwrap_or(-1))
    }

    /// Compares the inputs both sides resolved, with store ids translated
    /// to model ids and ids of no row of the chat folded to -1.
    fn compare_calls(
        &self,
        slot: usize,
        got: &[Call],
        want: &[Call],
        rec: &ChatRecord,
        after: &World,
    ) -> Check {
        let model = after.chats[slot].as_ref().expect("committed chat exists");
        let model_msg = |id: MessageId| {
            if id.0 >= 1 && (id.0 as usize) <= model.history.len() {
                id
            } else {
                MessageId(-1)
            }
        };
        let model_queued = |id: QueuedMessageId| {
            if id.0 >= 1 && id.0 < model.next_queued_id {
                id
            } else {
                QueuedMessageId(-1)
            }
        };
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let g = map_ids(
                &g.input,
                |id| Self::message_position(rec, id),
                |id| self.queued_model(slot, id),
            );
            let w = map_ids(&w.input, model_msg, model_queued);
            if g != w {
                return Err(format!(
                    "call {i} resolved differently:\nstore {g:#?}\nmodel {w:#?}"
                ));
            }
        }
        if got.len() != want.len() {
            return Err(format!(
                "store ran {} calls, model {}",
                got.len(),
                want.len()
            ));
        }
        Ok(())
    }

    fn compare_outcomes(
        &mut self,
        slot: usize,
        got: &[Outcome],
        want: &[Outcome],
        rec: &ChatRecord,
    ) -> Check {
        if got.len() != want.len() {
            return Err(format!("{} outcomes, model {}", got.len(), want.len()));
        }
        for (g, w) in got.iter().zip(want) {
            if let (Some(gq), Some(wq)) = (g.queued, w.queued) {
                self.queued[slot].pair(gq.0, wq.0)?;
            }
        }
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let mut g = g.clone();
            let pos = |id| Self::message_position(rec, id);
            g.inserted = g.inserted.iter().map(|id| pos(*id)).collect();
            g.deleted_messages = g.deleted_messages.iter().map(|id| pos(*id)).collect();
            g.queued = g.queued.map(|id| self.queued_model(slot, id));
            g.deleted_queued = g
                .deleted_queued
                .iter()
                .map(|id| self.queued_model(slot, *id))
                .collect();
            if let Some(p) = &mut g.promoted {
                p.queued = self.queued_model(slot, p.queued);
                p.message = pos(p.message);
            }
            g.requires_action_deadline = self.time(g.requires_action_deadline);
            let mut w = w.clone();
            w.requires_action_deadline = self.time(w.requires_action_deadline);
            if g != w {
                return Err(format!("outcome {i} differs:\nstore {g:#?}\nmodel {w:#?}"));
            }
        }
        Ok(())
    }

    fn compare_snapshot(&self, slot: usize, got: &Snapshot, want: &Snapshot) -> Check {
        self.rows_equal(&want.row, &got.row)?;
        let queue: Vec<QueuedMessageId> = got
            .queue
            .iter()
            .map(|id| self.queued_model(slot, *id))
            .collect();
        if queue != want.queue {
            return Err(format!("locked queue {queue:?}, model {:?}", want.queue));
        }
        if got.tools != want.tools {
            return Err(format!(
                "locked tools {:?}, model {:?}",
                got.tools, want.tools
            ));
        }
        if got.lease_fresh != want.lease_fresh {
            return Err(format!(
                "locked lease_fresh {}, model {}",
                got.lease_fresh, want.lease_fresh
            ));
        }
        if self.exact_time && got.now != want.now {
            return Err(format!("locked at {:?}, model {:?}", got.now, want.now));
        }
        Ok(())
    }
}

/// The input with every message and queued id passed through the maps.
pub fn map_ids(
    input: &Input,
    msg: impl Fn(MessageId) -> MessageId,
    queued: impl Fn(QueuedMessageId) -> QueuedMessageId,
) -> Input {
    let mut input = input.clone();
    match &mut input {
        Input::EditMessage { message_id, .. } => *message_id = msg(*message_id),
        Input::DeleteQueuedMessage { id } | Input::PromoteQueuedMessage { id } => *id = queued(*id),
        _ => {}
    }
    input
}

/// A rejection with the row id it carries replaced by 0, after checking
/// that the id is the one the rejected input named.
pub fn normalise(r: &Rejection, input: &Input) -> Result<Rejection, String> {
    let mut r = r.clone();
    let named_message = match input {
        Input::EditMessage { message_id, .. } => Some(*message_id),
        _ => None,
    };
    let named_queued = match input {
        Input::DeleteQueuedMessage { id } | Input::PromoteQueuedMessage { id } => Some(*id),
        _ => None,
    };
    match &mut r.kind {
        RejectionKind::MessageNotFound { id } | RejectionKind::EditedMessageNotUser { id } => {
            if Some(*id) != named_message {
                return Err(format!(
                    "{} names message {id}, the input {named_message:?}",
                    r.transition
                ));
            }
            *id = MessageId(0);
        }
        RejectionKind::QueuedMessageNotFound { id } => {
            if Some(*id) != named_queued {
                return Err(format!(
                    "{} names queued {id}, the input {named_queued:?}",
                    r.transition
                ));
            }
            *id = QueuedMessageId(0);
        }
        _ => {}
    }
    Ok(r)
}

fn same(got: &Rejection, want: &Rejection, what: &str) -> Check {
    if got != want {
        return Err(format!(
            "{what}: store {got:?} ({got}), model {want:?} ({want})"
        ));
    }
    Ok(())
}

fn mismatch<T: std::fmt::Debug>(got: &Result<T, Error>, want: &Expect) -> String {
    let want = match want {
        Expect::Created { .. } => "created".to_owned(),
        Expect::CreateRejected(r) => format!("create rejected: {r}"),
        Expect::Committed { outcomes, .. } => format!(
            "committed {:?}",
            outcomes
                .iter()
                .map(|o| format!("{} {}->{}", o.transition, o.from, o.to))
                .collect::<Vec<_>>()
        ),
        Expect::Rejected {
            index, rejection, ..
        } => format!("call {index} rejected: {rejection} ({:?})", rejection.kind),
        Expect::ChatNotFound => "ChatNotFound".to_owned(),
        Expect::Locked(s) => format!("locked in {}", s.state()),
        Expect::Heartbeat(status) => format!("heartbeat {status:?}"),
        Expect::Done => "done".to_owned(),
    };
    match got {
        Ok(v) => format!("store succeeded ({v:?}), model: {want}"),
        Err(e) => format!("store failed with {} ({e}), model: {want}", e.kind_name()),
    }
}

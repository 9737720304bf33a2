//! The linearizability oracle: a store's committed Updates, replayed in
//! snapshot order through the reference [`update`], must give the outcomes,
//! the snapshots and the notifications the store gave, and every chat must
//! end stored as the model ends it.
//!
//! Concurrent Updates of one chat are serialised by its row lock, and
//! `snapshot_version` numbers them: if the store is right, sorting a chat's
//! committed Updates by snapshot version gives a sequential history the
//! model accepts step by step. Per chat, [`check`] asserts that
//!
//! - the creation published what [`after_create`] says;
//! - the committed snapshot versions are 2, 3, ... without a gap or a
//!   duplicate, and the stored chat is at the last of them (a rolled-back
//!   Update left no trace, and no commit went unrecorded);
//! - replayed in that order, every Update commits in the model with the same
//!   outcomes, ends its callback at the same snapshot, and published the
//!   same notifications, byte for byte;
//! - the stored row, queue and history are the model's.
//!
//! Store time and lease freshness, the two inputs the model cannot know,
//! are taken from what each Update saw when it locked the row. Row ids
//! differ between the store (global sequences) and the model (per chat from
//! 1), so the oracle pairs them as rows appear and checks that the pairing
//! stays one-to-one.
//!
//! An Update whose commit outcome was unknown to the caller (the store
//! lost the connection after `COMMIT` was sent and could not resolve it)
//! is recorded as *maybe committed* ([`check_with_unknown`]). The stored
//! chat settles it: snapshot versions are allocated by the row lock, so a
//! maybe-committed Update with snapshot `s` committed exactly when `s` is
//! at most the stored chat's snapshot version and no Update recorded as
//! committed has `s`. When several maybe-committed Updates share an
//! unclaimed `s` (each rolled back but the last), the one whose replay the
//! model accepts is taken.
//!
//! The oracle is pure: its callers (`chatstate simulate`, the concurrency
//! fuzz tests) record what their store did and hand the record over
//! afterwards.

use std::collections::BTreeMap;
use std::fmt;

use crate::chat::{Call, Chat, NewChat, StepEnv, update};
use crate::data::{ChatId, ChatRow, Message, MessageId, QueuedMessage, QueuedMessageId, Timestamp};
use crate::input::{Input, Options};
use crate::notify::{Notification, after_create};
use crate::rules::{Outcome, Promotion, Snapshot};

/// How the oracle compares the store with the model.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// The tunables the store ran with.
    pub options: Options,
    /// Compare store times (each Update's `now`, requires-action deadlines,
    /// compaction requests) exactly. Off, only their presence is compared:
    /// for a store on a clock the caller does not control.
    pub exact_time: bool,
}

/// A notification as it went out: its channel and its payload bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Published {
    /// The channel.
    pub channel: String,
    /// The payload (JSON).
    pub payload: Vec<u8>,
}

impl From<&Notification> for Published {
    fn from(n: &Notification) -> Self {
        Published {
            channel: n.channel(),
            payload: n.payload(),
        }
    }
}

impl fmt::Debug for Published {
    /// The channel and the payload as text, so that a difference reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}",
            self.channel,
            String::from_utf8_lossy(&self.payload)
        )
    }
}

/// A created chat, as the store side saw it.
#[derive(Clone, Debug)]
pub struct CreatedChat {
    /// What it was created from.
    pub new: NewChat,
    /// The ids the store gave its messages, in order.
    pub ids: Vec<MessageId>,
    /// What its creation published.
    pub published: Vec<Published>,
}

/// A committed Update, as the store side saw it.
#[derive(Clone, Debug)]
pub struct CommittedUpdate {
    /// The chat.
    pub chat: ChatId,
    /// The snapshot version it committed (allocated by its lock).
    pub snapshot: i64,
    /// Store time of its transaction.
    pub now: Timestamp,
    /// Lease freshness when it locked the row.
    pub lease_fresh: bool,
    /// Its transitions, with store ids.
    pub calls: Vec<Call>,
    /// Their outcomes, with store ids.
    pub outcomes: Vec<Outcome>,
    /// The snapshot at the end of the callback, with store ids.
    pub end: Snapshot,
    /// What it published after commit.
    pub published: Vec<Published>,
}

/// A chat as the store holds it at the end, with store ids.
#[derive(Clone, Debug)]
pub struct StoredChat {
    /// The row.
    pub row: ChatRow,
    /// The queue, head first.
    pub queue: Vec<QueuedMessage>,
    /// Every message in id order, soft-deleted ones included.
    pub history: Vec<Message>,
}

/// What the oracle found.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Committed Updates the model replayed successfully.
    pub updates_checked: usize,
    /// Chats whose creation was recorded.
    pub chats_checked: usize,
    /// At most one per chat: after the first, a chat's model no longer
    /// follows the store.
    pub violations: Vec<Violation>,
}

/// Where a chat's store and model parted.
///
/// Displays on one line; the alternate form (`{:#}`) puts the two sides of
/// a difference on lines of their own, pretty-printed.
#[derive(Debug)]
pub struct Violation {
    /// The chat.
    pub chat: ChatId,
    /// The committed Update the replay stopped at, if it stopped at one.
    pub snapshot: Option<i64>,
    /// What is wrong.
    pub reason: String,
    /// The store's and the model's side, when two values differ.
    pub sides: Option<Sides>,
}

/// The two sides of a difference.
#[derive(Debug)]
pub struct Sides {
    /// What the store has.
    pub store: Box<dyn fmt::Debug + Send + Sync>,
    /// What the model has.
    pub model: Box<dyn fmt::Debug + Send + Sync>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chat {}: ", self.chat)?;
        if let Some(snapshot) = self.snapshot {
            write!(f, "snapshot {snapshot}: ")?;
        }
        f.write_str(&self.reason)?;
        match &self.sides {
            Some(s) if f.alternate() => write!(f, ":\nstore {:#?}\nmodel {:#?}", s.store, s.model),
            Some(s) => write!(f, ": store {:?}, model {:?}", s.store, s.model),
            None => Ok(()),
        }
    }
}

/// Checks every chat: `created` are the recorded creations, `committed`
/// the recorded Updates (of those chats, in any order), `stored` the chats
/// as the store holds them once nothing runs any more.
pub fn check<'a>(
    config: &Config,
    created: &[CreatedChat],
    committed: impl IntoIterator<Item = &'a CommittedUpdate>,
    stored: &BTreeMap<ChatId, StoredChat>,
) -> Verdict {
    check_with_unknown(config, created, committed, [], stored)
}

/// [`check`], with Updates whose commit outcome is unknown (`maybe`,
/// recorded as if committed: what their callback did and would have
/// published). Each counts as committed or not as the stored snapshot
/// versions say (see the module docs); a maybe-committed Update that
/// committed must replay like any other.
pub fn check_with_unknown<'a>(
    config: &Config,
    created: &[CreatedChat],
    committed: impl IntoIterator<Item = &'a CommittedUpdate>,
    maybe: impl IntoIterator<Item = &'a CommittedUpdate>,
    stored: &BTreeMap<ChatId, StoredChat>,
) -> Verdict {
    let mut by_chat: BTreeMap<ChatId, Vec<&CommittedUpdate>> = BTreeMap::new();
    for u in committed {
        by_chat.entry(u.chat).or_default().push(u);
    }
    let mut maybe_by_chat: BTreeMap<ChatId, Vec<&CommittedUpdate>> = BTreeMap::new();
    for u in maybe {
        maybe_by_chat.entry(u.chat).or_default().push(u);
    }
    let mut verdict = Verdict::default();
    for chat in created {
        let id = chat.new.id;
        let updates = by_chat.remove(&id).unwrap_or_default();
        let maybe = maybe_by_chat.remove(&id).unwrap_or_default();
        let last = stored.get(&id).map(|s| s.row.versions.snapshot);
        let steps = steps(updates, maybe, last);
        verdict.chats_checked += 1;
        let mut checker = ChatCheck::new(config);
        if let Err(f) = checker.run(chat, &steps, stored.get(&id)) {
            verdict.violations.push(Violation {
                chat: id,
                snapshot: f.snapshot,
                reason: f.reason,
                sides: f.sides,
            });
        }
        verdict.updates_checked += checker.checked;
    }
    // A maybe-committed Update of a chat nobody recorded creating is not
    // evidence of anything by itself; the committed ones are.
    for (id, updates) in by_chat {
        verdict.violations.push(Violation {
            chat: id,
            snapshot: None,
            reason: format!(
                "{} committed Updates, but its creation was not recorded",
                updates.len()
            ),
            sides: None,
        });
    }
    verdict
}

/// A chat's Updates in snapshot order, as candidates per step: the
/// committed ones each alone (duplicates stay, for the replay to report),
/// and for a snapshot version no committed Update has, the maybe-committed
/// ones with it, if the stored chat reached it (`last`).
fn steps<'a>(
    committed: Vec<&'a CommittedUpdate>,
    maybe: Vec<&'a CommittedUpdate>,
    last: Option<i64>,
) -> Vec<Step<'a>> {
    let mut by_snapshot: BTreeMap<i64, (Vec<&CommittedUpdate>, Vec<&CommittedUpdate>)> =
        BTreeMap::new();
    for u in committed {
        by_snapshot.entry(u.snapshot).or_default().0.push(u);
    }
    for u in maybe {
        if last.is_some_and(|last| u.snapshot <= last) {
            by_snapshot.entry(u.snapshot).or_default().1.push(u);
        }
    }
    let mut steps = Vec::new();
    for (_, (committed, maybe)) in by_snapshot {
        if committed.is_empty() {
            steps.push(Step {
                maybe: true,
                candidates: maybe,
            });
        } else {
            steps.extend(committed.into_iter().map(|u| Step {
                maybe: false,
                candidates: vec![u],
            }));
        }
    }
    steps
}

/// One committed Update of a chat's replay, or the maybe-committed ones
/// of which one committed.
struct Step<'a> {
    /// The candidates were recorded as maybe committed: their caller saw
    /// no commit, so a publisher after commit got nothing from them.
    maybe: bool,
    candidates: Vec<&'a CommittedUpdate>,
}

/// Why a chat's replay stopped.
struct Fail {
    snapshot: Option<i64>,
    reason: String,
    sides: Option<Sides>,
}

impl From<String> for Fail {
    fn from(reason: String) -> Self {
        Fail {
            snapshot: None,
            reason,
            sides: None,
        }
    }
}

impl From<&str> for Fail {
    fn from(reason: &str) -> Self {
        reason.to_owned().into()
    }
}

impl Fail {
    fn differs<S, M>(reason: &str, store: S, model: M) -> Fail
    where
        S: fmt::Debug + Send + Sync + 'static,
        M: fmt::Debug + Send + Sync + 'static,
    {
        Fail {
            snapshot: None,
            reason: reason.to_owned(),
            sides: Some(Sides {
                store: Box::new(store),
                model: Box::new(model),
            }),
        }
    }

    fn at(self, snapshot: i64) -> Fail {
        Fail {
            snapshot: Some(snapshot),
            ..self
        }
    }
}

/// A one-to-one pairing of store row ids and model row ids.
#[derive(Clone, Debug, Default)]
struct IdMap {
    to_model: BTreeMap<i64, i64>,
    to_store: BTreeMap<i64, i64>,
}

impl IdMap {
    fn pair(&mut self, store: i64, model: i64, what: &str) -> Result<(), String> {
        let a = *self.to_model.get(&store).unwrap_or(&model);
        let b = *self.to_store.get(&model).unwrap_or(&store);
        if a != model || b != store {
            return Err(format!(
                "{what} ids are not one-to-one: store {store} ~ model {a}, model {model} ~ store {b}"
            ));
        }
        self.to_model.insert(store, model);
        self.to_store.insert(model, store);
        Ok(())
    }

    fn model(&self, store: i64, what: &str) -> Result<i64, String> {
        self.to_model
            .get(&store)
            .copied()
            .ok_or_else(|| format!("{what} {store} was never seen being created"))
    }
}

/// One chat's replay.
struct ChatCheck<'a> {
    config: &'a Config,
    messages: IdMap,
    queued: IdMap,
    checked: usize,
}

impl<'a> ChatCheck<'a> {
    fn new(config: &'a Config) -> Self {
        ChatCheck {
            config,
            messages: IdMap::default(),
            queued: IdMap::default(),
            checked: 0,
        }
    }

    fn run(
        &mut self,
        created: &CreatedChat,
        steps: &[Step<'_>],
        stored: Option<&StoredChat>,
    ) -> Result<(), Fail> {
        let mut model = Chat::create(&created.new)
            .map_err(|r| format!("the model refuses its creation: {r}"))?;
        if model.history.len() != created.ids.len() {
            return Err("the store created a different number of messages".into());
        }
        for (m, s) in model.history.iter().zip(&created.ids) {
            self.messages.pair(s.0, m.id.0, "message")?;
        }
        let want = published(&after_create(&model.row));
        if created.published != want {
            return Err(Fail::differs(
                "creation published",
                created.published.clone(),
                want,
            ));
        }
        for Step { maybe, candidates } in steps {
            let Some(u) = candidates.first() else {
                continue;
            };
            let expected = model.row.versions.snapshot + 1;
            if u.snapshot != expected {
                return Err(format!(
                    "committed snapshot {} where {expected} comes next (a bump lost, doubled or \
                     rolled back after commit)",
                    u.snapshot
                )
                .into());
            }
            if let [u] = candidates.as_slice() {
                self.step(&mut model, u, *maybe)
                    .map_err(|f| f.at(u.snapshot))?;
            } else {
                self.step_one_of(&mut model, candidates)?;
            }
            self.checked += 1;
        }
        let Some(stored) = stored else {
            return Err("the chat could not be read at the end".into());
        };
        self.compare_final(&model, stored)
    }

    /// Steps the first of several maybe-committed Updates (of one snapshot
    /// version) whose replay the model accepts; the failure of the first
    /// if none does.
    fn step_one_of(
        &mut self,
        model: &mut Chat,
        candidates: &[&CommittedUpdate],
    ) -> Result<(), Fail> {
        let mut first = None;
        for u in candidates {
            let (mut m, messages, queued) =
                (model.clone(), self.messages.clone(), self.queued.clone());
            match self.step(&mut m, u, true) {
                Ok(()) => {
                    *model = m;
                    return Ok(());
                }
                Err(f) => {
                    self.messages = messages;
                    self.queued = queued;
                    first.get_or_insert(f.at(u.snapshot));
                }
            }
        }
        Err(first.unwrap_or_else(|| "no candidate Update".into()))
    }

    /// Replays one committed Update. Of a `maybe` committed one, what was
    /// published may also be nothing (an unknown outcome publishes nothing
    /// after commit; notifications sent with the commit went out).
    fn step(&mut self, model: &mut Chat, u: &CommittedUpdate, maybe: bool) -> Result<(), Fail> {
        let options = &self.config.options;
        // Lease freshness as the store saw it when locking: the heartbeats
        // themselves run outside Updates, concurrently.
        model.heartbeats.clear();
        match (model.row.owner, u.lease_fresh) {
            (Some(owner), true) => {
                model.heartbeats.insert(owner.runner_id, u.now);
            }
            (None, true) => return Err("a fresh lease on an unowned chat".into()),
            (_, false) => {}
        }
        // The model numbers the rows an Update inserts consecutively from
        // its counters. Pair the store's ids with those first, so that a
        // call naming a row inserted earlier in the same Update translates;
        // `pair_outcome` then checks the model did number them so.
        let mut next_message = model.next_message_id;
        let mut next_queued = model.next_queued_id;
        for o in &u.outcomes {
            if let Some(q) = o.queued {
                self.queued.pair(q.0, next_queued, "queued message")?;
                next_queued += 1;
            }
            for m in &o.inserted {
                self.messages.pair(m.0, next_message, "message")?;
                next_message += 1;
            }
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
            return Err("a different number of outcomes".into());
        }
        for (store, expected) in u.outcomes.iter().zip(&done.outcomes) {
            let got = self.pair_outcome(store, expected)?;
            let got = self.outcome(got);
            let expected = self.outcome(expected.clone());
            if got != expected {
                return Err(Fail::differs("outcome differs", got, expected));
            }
        }
        let snap = self.snapshot(done.chat.snapshot(u.now, options));
        let end = self.snapshot(Snapshot {
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
        });
        if end != snap {
            return Err(Fail::differs("snapshot differs", end, snap));
        }
        let want = published(&done.notifications);
        if u.published != want && !(maybe && u.published.is_empty()) {
            return Err(Fail::differs("published", u.published.clone(), want));
        }
        *model = done.chat;
        Ok(())
    }

    fn to_model_input(&self, input: &Input) -> Result<Input, String> {
        let mut input = input.clone();
        match &mut input {
            Input::EditMessage { message_id, .. } => {
                *message_id = MessageId(self.messages.model(message_id.0, "message")?);
            }
            Input::DeleteQueuedMessage { id } | Input::PromoteQueuedMessage { id } => {
                *id = QueuedMessageId(self.queued.model(id.0, "queued message")?);
            }
            _ => {}
        }
        Ok(input)
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
                    Ok(Promotion {
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

    fn compare_final(&self, model: &Chat, last: &StoredChat) -> Result<(), Fail> {
        if last.row.versions.snapshot != model.row.versions.snapshot {
            return Err(format!(
                "the store is at snapshot {}, but only Updates up to {} were recorded \
                 (a commit nobody saw)",
                last.row.versions.snapshot, model.row.versions.snapshot
            )
            .into());
        }
        if self.row(last.row.clone()) != self.row(model.row.clone()) {
            return Err(Fail::differs(
                "final row differs",
                last.row.clone(),
                model.row.clone(),
            ));
        }
        if last.queue.len() != model.queue.len() || last.history.len() != model.history.len() {
            return Err("final queue or history lengths differ".into());
        }
        for (s, m) in last.queue.iter().zip(&model.queue) {
            if self.queued.model(s.id.0, "queued message")? != m.id.0
                || (&s.content, s.model_config_id, s.created_by)
                    != (&m.content, m.model_config_id, m.created_by)
            {
                return Err(format!("final queue differs at store id {}", s.id).into());
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
                return Err(format!("final history differs at store id {}", s.id).into());
            }
        }
        Ok(())
    }

    /// A store time as compared: itself, or off an exact clock only
    /// whether there is one.
    fn time(&self, t: Timestamp) -> Timestamp {
        if self.config.exact_time {
            t
        } else {
            Timestamp(0)
        }
    }

    fn row(&self, row: ChatRow) -> ChatRow {
        ChatRow {
            requires_action_deadline_at: row.requires_action_deadline_at.map(|t| self.time(t)),
            compaction_requested_at: row.compaction_requested_at.map(|t| self.time(t)),
            ..row
        }
    }

    fn snapshot(&self, snap: Snapshot) -> Snapshot {
        Snapshot {
            row: self.row(snap.row),
            now: self.time(snap.now),
            ..snap
        }
    }

    fn outcome(&self, o: Outcome) -> Outcome {
        Outcome {
            requires_action_deadline: o.requires_action_deadline.map(|t| self.time(t)),
            ..o
        }
    }
}

fn published(notifications: &[Notification]) -> Vec<Published> {
    notifications.iter().map(Published::from).collect()
}

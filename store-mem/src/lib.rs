//! An in-memory [`Store`] for chatstate with real transactions.
//!
//! Each chat has a row lock that blocks asynchronously like a database row
//! lock (exclusive for Update and Lock, shared for ReadLock; waiters queue
//! fairly). Transactions that would wait for each other in a cycle (nested
//! Updates of two chats in opposite order) are detected when the cycle
//! closes, and the transaction that closed it fails with
//! [`StoreErrorKind::Deadlock`], as Postgres breaks such a deadlock (the
//! `locks` module keeps the wait-for graph). A transaction writes in place under its lock and keeps an undo
//! log; committing forgets the log, rolling back (explicitly, on error, or
//! by dropping the transaction) replays it, so nothing of a rolled-back
//! transaction is ever seen by another. History is never copied per Update:
//! the undo log records lengths, indices and the small queue.
//!
//! Store time comes from an injectable clock ([`MemClock`]); tests move it
//! with [`TestControl::advance_clock`]. Fault injection ([`MemStore::fail_nth_call`],
//! [`MemStore::fail_every_nth_call`]) makes store calls fail on purpose;
//! [`MemStore::lose_nth_commit`] and [`MemStore::lose_every_nth_commit`]
//! make a commit apply and then report its outcome as unknown, as a
//! connection lost after `COMMIT` was sent does on a real database.
//! Notifications given to a commit ([`Notify::InTransaction`](chatstate::Notify))
//! go out on the store's own bus ([`MemStore::subscribe`]) at the moment of
//! commit, in commit order per chat. The application's own writes ride
//! along as hooks run inside the commit ([`MemApp::on_commit`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chatstate::{
    ChatMetadata, ChatRecord, CreateOutcome, LeaseStatus, LockMode, MetadataPatch, Published,
    Store, StoreError, StoreErrorKind, StoreTx, TestControl,
};
use chatstate_model::{
    Assigned, ChatId, ChatRow, ChatStatus, EditContext, EditTarget, Message, MessageId, NewMessage,
    Notification, Options, Owner, Plan, QueuedMessage, QueuedMessageId, Role, RunnerId, Snapshot,
    Timestamp, ToolState,
};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock, broadcast};

use crate::locks::{Holding, LockTable, TxId};

mod app;
mod locks;

pub use app::MemApp;

/// Store time for the in-memory store: a base instant plus an offset that
/// tests can advance.
#[derive(Clone, Debug)]
pub struct MemClock {
    manual_base: Option<Timestamp>,
    offset_micros: Arc<AtomicI64>,
}

impl MemClock {
    /// Real time (plus whatever [`MemClock::advance`] adds).
    pub fn system() -> Self {
        MemClock {
            manual_base: None,
            offset_micros: Arc::new(AtomicI64::new(0)),
        }
    }

    /// A clock that stands still at `start` until advanced.
    pub fn manual(start: Timestamp) -> Self {
        MemClock {
            manual_base: Some(start),
            offset_micros: Arc::new(AtomicI64::new(0)),
        }
    }

    /// The current store time.
    pub fn now(&self) -> Timestamp {
        let base = self.manual_base.unwrap_or_else(|| {
            let since = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            Timestamp(i64::try_from(since.as_micros()).unwrap_or(i64::MAX))
        });
        Timestamp(base.0 + self.offset_micros.load(Ordering::SeqCst))
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let micros = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        self.offset_micros.fetch_add(micros, Ordering::SeqCst);
    }
}

/// The in-memory store. Cloning is cheap and shares the data.
#[derive(Clone)]
pub struct MemStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStore")
            .field("chats", &self.inner.chats.lock().expect("chat map").len())
            .finish_non_exhaustive()
    }
}

struct Inner {
    chats: Mutex<HashMap<ChatId, Arc<Slot>>>,
    clock: MemClock,
    next_message_id: AtomicI64,
    next_queued_id: AtomicI64,
    faults: Faults,
    bus: broadcast::Sender<Published>,
    lock_waiters: AtomicUsize,
    /// Who holds and who waits for which row lock (deadlock detection).
    lock_table: Arc<Mutex<LockTable>>,
    next_tx: AtomicU64,
}

#[derive(Default)]
struct Faults {
    calls: AtomicU64,
    /// The absolute call number that fails (0: none).
    fail_at: AtomicU64,
    /// Every n-th call fails (0: none).
    fail_every: AtomicU64,
    injected: AtomicU64,
    /// Commits (of Updates, Locks and chat creations) so far.
    commits: AtomicU64,
    /// The absolute commit number whose outcome is lost (0: none).
    lose_at: AtomicU64,
    /// Every n-th commit's outcome is lost (0: none).
    lose_every: AtomicU64,
}

/// One chat: its row lock and its data. The data mutex is held only for
/// short, synchronous sections; the row lock is what transactions wait on.
struct Slot {
    lock: Arc<RwLock<()>>,
    data: Mutex<ChatData>,
}

struct ChatData {
    row: ChatRow,
    metadata: ChatMetadata,
    queue: Vec<QueuedMessage>,
    /// Every message in id order, soft-deleted ones included.
    history: Vec<Message>,
    heartbeats: HashMap<RunnerId, Timestamp>,
    /// The owner as last committed. An open transaction writes `row` in
    /// place, but a heartbeat, which never waits for the row lock, must
    /// judge by the committed lease (as a database read would).
    committed_owner: Option<Owner>,
    /// Store time of the last write of execution state (the row), the
    /// order of [`Store::claimable`].
    updated_at: Timestamp,
    /// The tool bookkeeping of the active history, derived from it by this
    /// store (never taken from a plan), kept up to date as messages are
    /// appended and dropped (`None`) when history is truncated or rolled
    /// back, to be derived again on the next read.
    tools: Option<ToolState>,
}

impl ChatData {
    fn lease_fresh(&self, now: Timestamp, options: &Options) -> bool {
        let Some(owner) = self.row.owner else {
            return false;
        };
        let cutoff = now.minus(options.heartbeat_stale);
        self.heartbeats
            .get(&owner.runner_id)
            .is_some_and(|beat| *beat > cutoff)
    }

    /// Tool bookkeeping of the active history before `limit` (all of it if
    /// `None`). Only the tail from the last active assistant message on is
    /// read: the fold restarts at every assistant message anyway.
    fn tools_before(&self, limit: Option<MessageId>) -> ToolState {
        let end = match limit {
            Some(id) => self.history.partition_point(|m| m.id < id),
            None => self.history.len(),
        };
        let active = &self.history[..end];
        let start = active
            .iter()
            .rposition(|m| !m.deleted && m.role == Role::Assistant)
            .unwrap_or(0);
        ToolState::from_history(
            active[start..]
                .iter()
                .filter(|m| !m.deleted)
                .map(|m| (m.role, m.content.as_slice())),
        )
    }

    /// The tool bookkeeping of the whole active history (cached).
    fn tools(&mut self) -> ToolState {
        if self.tools.is_none() {
            self.tools = Some(self.tools_before(None));
        }
        self.tools.clone().expect("just derived")
    }

    /// Appends a message to the history, keeping the cached bookkeeping.
    fn push(&mut self, m: Message) {
        if let Some(tools) = &mut self.tools {
            tools.observe(m.role, &m.content);
        }
        self.history.push(m);
    }

    fn snapshot(&mut self, now: Timestamp, options: &Options) -> Snapshot {
        Snapshot {
            row: self.row.clone(),
            queue: self.queue.iter().map(|q| q.id).collect(),
            tools: self.tools(),
            lease_fresh: self.lease_fresh(now, options),
            now,
        }
    }
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(MemClock::system())
    }

    /// An empty store on the given clock.
    pub fn with_clock(clock: MemClock) -> Self {
        let (bus, _) = broadcast::channel(4096);
        MemStore {
            inner: Arc::new(Inner {
                chats: Mutex::new(HashMap::new()),
                clock,
                next_message_id: AtomicI64::new(1),
                next_queued_id: AtomicI64::new(1),
                faults: Faults::default(),
                bus,
                lock_waiters: AtomicUsize::new(0),
                lock_table: Arc::default(),
                next_tx: AtomicU64::new(1),
            }),
        }
    }

    /// The store's clock.
    pub fn clock(&self) -> &MemClock {
        &self.inner.clock
    }

    /// Subscribes to the notifications committed with
    /// [`Notify::InTransaction`](chatstate::Notify).
    pub fn subscribe(&self) -> broadcast::Receiver<Published> {
        self.inner.bus.subscribe()
    }

    /// Makes the `n`-th store call from now fail (1 = the next one).
    /// Rollbacks never fail.
    pub fn fail_nth_call(&self, n: u64) {
        let f = &self.inner.faults;
        f.fail_at
            .store(f.calls.load(Ordering::SeqCst) + n, Ordering::SeqCst);
    }

    /// Makes every `n`-th store call fail from now on (0 turns it off).
    pub fn fail_every_nth_call(&self, n: u64) {
        self.inner.faults.fail_every.store(n, Ordering::SeqCst);
    }

    /// Makes the `n`-th commit from now (1 = the next one; Updates, Locks
    /// and chat creations count) apply, deliver its notifications, and then
    /// fail with [`StoreErrorKind::OutcomeUnknown`], as if the connection
    /// had been lost after `COMMIT` was sent.
    pub fn lose_nth_commit(&self, n: u64) {
        let f = &self.inner.faults;
        f.lose_at
            .store(f.commits.load(Ordering::SeqCst) + n, Ordering::SeqCst);
    }

    /// Makes every `n`-th commit from now on apply and then report an
    /// unknown outcome (0 turns it off); see [`MemStore::lose_nth_commit`].
    pub fn lose_every_nth_commit(&self, n: u64) {
        self.inner.faults.lose_every.store(n, Ordering::SeqCst);
    }

    /// Store calls made so far.
    pub fn calls(&self) -> u64 {
        self.inner.faults.calls.load(Ordering::SeqCst)
    }

    /// Faults injected so far.
    pub fn injected_faults(&self) -> u64 {
        self.inner.faults.injected.load(Ordering::SeqCst)
    }

    fn slot(&self, chat: ChatId) -> Option<Arc<Slot>> {
        self.inner
            .chats
            .lock()
            .expect("chat map")
            .get(&chat)
            .cloned()
    }

    /// How many heartbeat rows the store holds, over every chat (lets tests
    /// check that they stay bounded by the chats owned).
    pub fn heartbeat_rows(&self) -> usize {
        let slots: Vec<Arc<Slot>> = self
            .inner
            .chats
            .lock()
            .expect("chat map")
            .values()
            .cloned()
            .collect();
        slots
            .iter()
            .map(|slot| slot.data.lock().expect("chat data").heartbeats.len())
            .sum()
    }

    /// How many transactions are waiting for a row lock right now (lets
    /// tests observe blocking without sleeping).
    pub fn lock_waiters(&self) -> usize {
        self.inner.lock_waiters.load(Ordering::SeqCst)
    }

    /// Takes the row lock of `chat` for transaction `tx`, waiting for it
    /// like a database row lock. Fails with [`StoreErrorKind::Deadlock`]
    /// instead of waiting when the wait would close a cycle of
    /// transactions waiting for each other. `None` if the chat does not
    /// exist.
    async fn lock(
        &self,
        chat: ChatId,
        mode: LockMode,
        tx: TxId,
    ) -> Result<Option<(Arc<Slot>, Guard)>, StoreError> {
        let Some(slot) = self.slot(chat) else {
            return Ok(None);
        };
        let _waiting = Waiting::new(&self.inner.lock_waiters);
        let entry = LockTable::wait(&self.inner.lock_table, tx, chat).map_err(|cycle| {
            StoreError::new("lock chat", StoreErrorKind::Deadlock, cycle.to_string())
        })?;
        let row = match mode {
            LockMode::Exclusive => RowGuard::Write(slot.lock.clone().write_owned().await),
            LockMode::Shared => RowGuard::Read(slot.lock.clone().read_owned().await),
        };
        let guard = Guard {
            _holding: entry.acquired(),
            row,
        };
        Ok(Some((slot, guard)))
    }

    fn begin(&self) -> MemTx {
        MemTx {
            id: self.inner.next_tx.fetch_add(1, Ordering::SeqCst),
            inner: self.inner.clone(),
            locks: Vec::new(),
            undo: Vec::new(),
            open: true,
            hooks: Vec::new(),
        }
    }
}

impl Inner {
    /// Counts a commit that has been applied, and reports its outcome as
    /// unknown if a lost commit is due.
    fn committed(&self, context: &'static str) -> Result<(), StoreError> {
        let f = &self.faults;
        let n = f.commits.fetch_add(1, Ordering::SeqCst) + 1;
        let every = f.lose_every.load(Ordering::SeqCst);
        if f.lose_at.load(Ordering::SeqCst) == n || (every > 0 && n.is_multiple_of(every)) {
            f.injected.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::new(
                context,
                StoreErrorKind::OutcomeUnknown,
                "injected: the commit applied, its outcome was lost",
            ));
        }
        Ok(())
    }

    /// Counts a store call and fails it if a fault is due.
    fn call(&self, context: &'static str) -> Result<(), StoreError> {
        let f = &self.faults;
        let n = f.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let every = f.fail_every.load(Ordering::SeqCst);
        if f.fail_at.load(Ordering::SeqCst) == n || (every > 0 && n.is_multiple_of(every)) {
            f.injected.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::injected(context));
        }
        Ok(())
    }

    fn deliver(&self, notify: &[Notification]) {
        for n in notify {
            // No subscriber is fine: notifications are hints.
            let _ = self.bus.send(Published {
                channel: n.channel(),
                payload: n.payload(),
            });
        }
    }
}

/// Counts a waiter for as long as it lives (a cancelled wait uncounts too).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Waiting(counter)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A held row lock and its entry in the lock table.
struct Guard {
    // Fields drop in order: the table forgets the holder before the row
    // lock is released, so it never lists a holder that is gone.
    _holding: Holding,
    row: RowGuard,
}

enum RowGuard {
    // The guards are held for their Drop, which releases the row lock.
    Write(#[allow(dead_code)] OwnedRwLockWriteGuard<()>),
    Read(#[allow(dead_code)] OwnedRwLockReadGuard<()>),
}

impl Guard {
    fn exclusive(&self) -> bool {
        matches!(self.row, RowGuard::Write(_))
    }
}

/// An undo record: how to put one piece back.
enum Undo {
    Row(Arc<Slot>, Box<ChatRow>),
    Metadata(Arc<Slot>, Box<ChatMetadata>),
    HistoryLen(Arc<Slot>, usize),
    SoftDelete(Arc<Slot>, usize, i64),
    Queue(Arc<Slot>, Vec<QueuedMessage>),
    Heartbeat(Arc<Slot>, RunnerId, Option<Timestamp>),
    UpdatedAt(Arc<Slot>, Timestamp),
}

/// A transaction of the in-memory store.
pub struct MemTx {
    id: TxId,
    inner: Arc<Inner>,
    locks: Vec<(ChatId, Arc<Slot>, Guard)>,
    undo: Vec<Undo>,
    open: bool,
    /// The application's hooks, run at commit (see [`MemApp::on_commit`]).
    hooks: Vec<CommitHook>,
}

/// An application's write, run when its transaction commits.
type CommitHook = Box<dyn FnOnce() + Send>;

impl std::fmt::Debug for MemTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemTx")
            .field("chats", &self.locks.iter().map(|l| l.0).collect::<Vec<_>>())
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl MemTx {
    fn held(&self, chat: ChatId, exclusive: bool) -> Result<&Arc<Slot>, StoreError> {
        self.locks
            .iter()
            .find(|(id, _, g)| *id == chat && (!exclusive || g.exclusive()))
            .map(|(_, slot, _)| slot)
            .ok_or_else(|| {
                StoreError::new(
                    "chat is not locked by this transaction",
                    StoreErrorKind::Other,
                    format!("chat {chat}"),
                )
            })
    }

    fn undo_all(&mut self) {
        while let Some(u) = self.undo.pop() {
            match u {
                Undo::Row(slot, row) => slot.data.lock().expect("chat data").row = *row,
                Undo::Metadata(slot, m) => slot.data.lock().expect("chat data").metadata = *m,
                Undo::HistoryLen(slot, len) => {
                    let mut d = slot.data.lock().expect("chat data");
                    d.history.truncate(len);
                    d.tools = None;
                }
                Undo::SoftDelete(slot, index, revision) => {
                    let mut d = slot.data.lock().expect("chat data");
                    d.tools = None;
                    let m = &mut d.history[index];
                    m.deleted = false;
                    m.revision = revision;
                }
                Undo::Queue(slot, q) => slot.data.lock().expect("chat data").queue = q,
                Undo::Heartbeat(slot, runner, old) => {
                    let mut d = slot.data.lock().expect("chat data");
                    match old {
                        Some(t) => d.heartbeats.insert(runner, t),
                        None => d.heartbeats.remove(&runner),
                    };
                }
                Undo::UpdatedAt(slot, t) => slot.data.lock().expect("chat data").updated_at = t,
            }
        }
    }

    /// Locks and bumps `chat` inside this transaction.
    async fn lock_and_bump(
        &mut self,
        chat: ChatId,
        options: &Options,
    ) -> Result<Option<Snapshot>, StoreError> {
        let store = MemStore {
            inner: self.inner.clone(),
        };
        let already = self
            .locks
            .iter()
            .any(|(id, _, g)| *id == chat && g.exclusive());
        if !already {
            let Some((slot, guard)) = store.lock(chat, LockMode::Exclusive, self.id).await? else {
                return Ok(None);
            };
            self.locks.push((chat, slot, guard));
        }
        let slot = self.held(chat, true)?.clone();
        let now = self.inner.clock.now();
        let mut d = slot.data.lock().expect("chat data");
        self.undo
            .push(Undo::Row(slot.clone(), Box::new(d.row.clone())));
        d.row.versions.snapshot += 1;
        Ok(Some(d.snapshot(now, options)))
    }
}

impl Drop for MemTx {
    fn drop(&mut self) {
        if self.open {
            self.undo_all();
        }
    }
}

impl Store for MemStore {
    type Tx = MemTx;

    async fn begin_update(
        &self,
        chat: ChatId,
        options: &Options,
    ) -> Result<Option<(MemTx, Snapshot)>, StoreError> {
        self.inner.call("lock chat and bump snapshot")?;
        let mut tx = self.begin();
        match tx.lock_and_bump(chat, options).await? {
            Some(snap) => Ok(Some((tx, snap))),
            None => Ok(None),
        }
    }

    async fn begin_locked(
        &self,
        chat: ChatId,
        mode: LockMode,
        options: &Options,
    ) -> Result<Option<(MemTx, Snapshot)>, StoreError> {
        self.inner.call("lock chat")?;
        let mut tx = self.begin();
        let Some((slot, guard)) = self.lock(chat, mode, tx.id).await? else {
            return Ok(None);
        };
        let now = self.inner.clock.now();
        let snap = slot.data.lock().expect("chat data").snapshot(now, options);
        tx.locks.push((chat, slot, guard));
        Ok(Some((tx, snap)))
    }

    async fn create_chat(
        &self,
        row: &ChatRow,
        metadata: &ChatMetadata,
        messages: &[NewMessage],
        notify: &[Notification],
    ) -> Result<CreateOutcome, StoreError> {
        self.inner.call("create chat")?;
        let mut chats = self.inner.chats.lock().expect("chat map");
        if let Some(existing) = chats.get(&row.id) {
            let d = existing.data.lock().expect("chat data");
            return Ok(CreateOutcome::AlreadyExists(
                d.row.classify(!d.queue.is_empty()),
            ));
        }
        let revision = row.versions.snapshot;
        let history: Vec<Message> = messages
            .iter()
            .map(|m| self.inner.message(m.clone(), None, revision))
            .collect();
        let ids = history.iter().map(|m| m.id).collect();
        chats.insert(
            row.id,
            Arc::new(Slot {
                lock: Arc::new(RwLock::new(())),
                data: Mutex::new(ChatData {
                    row: row.clone(),
                    metadata: metadata.clone(),
                    queue: Vec::new(),
                    history,
                    heartbeats: HashMap::new(),
                    committed_owner: row.owner,
                    updated_at: self.inner.clock.now(),
                    tools: None,
                }),
            }),
        );
        // Delivered while the map is still locked: no one can lock the new
        // chat before its creation is announced.
        self.inner.deliver(notify);
        drop(chats);
        self.inner.committed("create chat")?;
        Ok(CreateOutcome::Created(ids))
    }

    async fn heartbeat(&self, chat: ChatId, runner: RunnerId) -> Result<LeaseStatus, StoreError> {
        self.inner.call("upsert heartbeat")?;
        let Some(slot) = self.slot(chat) else {
            return Ok(LeaseStatus::ChatGone);
        };
        let now = self.inner.clock.now();
        let mut d = slot.data.lock().expect("chat data");
        // Written only while `runner` holds the committed lease: a worker
        // whose chat was taken over learns it here, and its heartbeat row
        // does not come back after the takeover deleted it.
        match d.committed_owner {
            Some(owner) if owner.runner_id == runner => {
                d.heartbeats.insert(runner, now);
                Ok(LeaseStatus::Held)
            }
            owner => Ok(LeaseStatus::Lost { owner }),
        }
    }

    async fn claimable(&self, options: &Options, limit: usize) -> Result<Vec<ChatId>, StoreError> {
        self.inner.call("find claimable chats")?;
        let mut found = self.inner.claimable(options, |_| true);
        found.truncate(limit);
        Ok(found)
    }

    async fn claimable_among(
        &self,
        chats: &[ChatId],
        options: &Options,
    ) -> Result<Vec<ChatId>, StoreError> {
        self.inner.call("find claimable chats")?;
        Ok(self.inner.claimable(options, |id| chats.contains(&id)))
    }
}

impl Inner {
    /// The chats `among` accepts that need an owner, oldest first.
    fn claimable(&self, options: &Options, among: impl Fn(ChatId) -> bool) -> Vec<ChatId> {
        let slots: Vec<Arc<Slot>> = self
            .chats
            .lock()
            .expect("chat map")
            .iter()
            .filter(|(id, _)| among(**id))
            .map(|(_, slot)| slot.clone())
            .collect();
        let now = self.clock.now();
        let mut found = Vec::new();
        for slot in slots {
            // SKIP LOCKED: a row another transaction holds is skipped, never
            // waited for. While the try-lock is held, the data is committed.
            let Ok(_guard) = slot.lock.try_write() else {
                continue;
            };
            let d = slot.data.lock().expect("chat data");
            let state = d.row.classify(!d.queue.is_empty());
            if state.is_runnable() && !d.lease_fresh(now, options) {
                found.push((d.updated_at, d.row.id));
            }
        }
        found.sort_unstable_by_key(|(at, id)| (*at, id.0));
        found.into_iter().map(|(_, id)| id).collect()
    }
    fn message(&self, m: NewMessage, queued: Option<QueuedMessageId>, revision: i64) -> Message {
        let id = MessageId(self.next_message_id.fetch_add(1, Ordering::SeqCst));
        m.stored(id, queued, revision)
    }
}

impl StoreTx for MemTx {
    type App<'a> = MemApp<'a>;

    fn app(&mut self) -> MemApp<'_> {
        MemApp::new(self)
    }

    async fn apply(&mut self, chat: ChatId, plan: &Plan) -> Result<Assigned, StoreError> {
        self.inner.call("apply plan")?;
        let slot = self.held(chat, true)?.clone();
        let now = self.inner.clock.now();
        let revision = plan.row.versions.snapshot;
        let mut d = slot.data.lock().expect("chat data");

        // Check everything the plan refers to before writing anything, so a
        // bad plan leaves the chat untouched.
        let bad = |what: &str| {
            StoreError::new(
                "apply plan",
                StoreErrorKind::Data,
                format!("plan refers to {what}"),
            )
        };
        let soft: Vec<usize> = plan
            .soft_delete
            .iter()
            .map(|id| {
                d.history
                    .binary_search_by_key(id, |m| m.id)
                    .ok()
                    .filter(|&i| !d.history[i].deleted)
                    .ok_or_else(|| bad("a message that is not active"))
            })
            .collect::<Result<_, _>>()?;
        let queued_ids = plan
            .delete_queued
            .iter()
            .chain(plan.reorder_to_head.iter())
            .chain(plan.promote.iter());
        for id in queued_ids {
            if !d.queue.iter().any(|q| q.id == *id) {
                return Err(bad("a queued message that is not queued"));
            }
        }

        if !soft.is_empty() {
            d.tools = None;
        }
        for i in soft {
            self.undo
                .push(Undo::SoftDelete(slot.clone(), i, d.history[i].revision));
            let m = &mut d.history[i];
            m.deleted = true;
            m.revision = revision;
        }
        let mut assigned = Assigned::default();
        if plan.changes_queue() {
            self.undo.push(Undo::Queue(slot.clone(), d.queue.clone()));
        }
        if let Some(id) = plan.reorder_to_head {
            let pos = d.queue.iter().position(|q| q.id == id).expect("checked");
            let item = d.queue.remove(pos);
            d.queue.insert(0, item);
        }
        d.queue.retain(|q| !plan.delete_queued.contains(&q.id));
        if let Some(new) = &plan.append_queued {
            let id = QueuedMessageId(self.inner.next_queued_id.fetch_add(1, Ordering::SeqCst));
            d.queue.push(QueuedMessage {
                id,
                content: new.content.clone(),
                model_config_id: new.model_config_id,
                created_by: new.created_by,
            });
            assigned.queued = Some(id);
        }
        if plan.inserted_len() > 0 {
            self.undo
                .push(Undo::HistoryLen(slot.clone(), d.history.len()));
        }
        for m in &plan.messages {
            let msg = self.inner.message(m.clone(), None, revision);
            assigned.messages.push(msg.id);
            d.push(msg);
        }
        if let Some(qid) = plan.promote {
            let pos = d.queue.iter().position(|q| q.id == qid).expect("checked");
            let row = d.queue.remove(pos);
            let msg = self.inner.message(
                row.promoted(plan.row.last_model_config_id),
                Some(qid),
                revision,
            );
            assigned.messages.push(msg.id);
            d.push(msg);
        }
        if plan.prune_heartbeats {
            let pruned: Vec<(RunnerId, Timestamp)> = d
                .heartbeats
                .iter()
                .filter(|(r, _)| Some(**r) != plan.heartbeat)
                .map(|(r, t)| (*r, *t))
                .collect();
            for (runner, at) in pruned {
                d.heartbeats.remove(&runner);
                self.undo
                    .push(Undo::Heartbeat(slot.clone(), runner, Some(at)));
            }
        }
        if let Some(runner) = plan.heartbeat {
            let old = d.heartbeats.insert(runner, now);
            self.undo.push(Undo::Heartbeat(slot.clone(), runner, old));
        }
        if plan.row_changed {
            let old = std::mem::replace(&mut d.row, plan.row.clone());
            self.undo.push(Undo::Row(slot.clone(), Box::new(old)));
            let old = std::mem::replace(&mut d.updated_at, now);
            self.undo.push(Undo::UpdatedAt(slot.clone(), old));
        }
        Ok(assigned)
    }

    async fn edit_context(
        &mut self,
        chat: ChatId,
        message: MessageId,
    ) -> Result<EditContext, StoreError> {
        self.inner.call("read edit context")?;
        let slot = self.held(chat, false)?;
        let d = slot.data.lock().expect("chat data");
        let target = d
            .history
            .binary_search_by_key(&message, |m| m.id)
            .ok()
            .map(|i| &d.history[i])
            .filter(|m| !m.deleted)
            .map(|m| EditTarget {
                role: m.role,
                visibility: m.visibility,
                model_config_id: m.model_config_id,
            });
        let from_target = if target.is_some() {
            let start = d.history.partition_point(|m| m.id < message);
            d.history[start..]
                .iter()
                .filter(|m| !m.deleted)
                .map(|m| m.id)
                .collect()
        } else {
            Vec::new()
        };
        Ok(EditContext {
            message_id: message,
            target,
            from_target,
            tools_before: d.tools_before(Some(message)),
        })
    }

    async fn begin_nested(
        &mut self,
        chat: ChatId,
        options: &Options,
    ) -> Result<Option<Snapshot>, StoreError> {
        self.inner.call("lock nested chat and bump snapshot")?;
        self.lock_and_bump(chat, options).await
    }

    async fn load(&mut self, chat: ChatId) -> Result<ChatRecord, StoreError> {
        self.inner.call("load chat")?;
        let slot = self.held(chat, false)?;
        let d = slot.data.lock().expect("chat data");
        Ok(ChatRecord {
            row: d.row.clone(),
            metadata: d.metadata.clone(),
            queue: d.queue.clone(),
            history: d.history.clone(),
        })
    }

    async fn write_metadata(
        &mut self,
        chat: ChatId,
        patch: &MetadataPatch,
    ) -> Result<(), StoreError> {
        self.inner.call("write metadata")?;
        let slot = self.held(chat, true)?.clone();
        let mut d = slot.data.lock().expect("chat data");
        self.undo
            .push(Undo::Metadata(slot.clone(), Box::new(d.metadata.clone())));
        if let Some(title) = &patch.title {
            d.metadata.title = title.clone();
        }
        if let Some(labels) = &patch.labels {
            d.metadata.labels = labels.clone();
        }
        if let Some(metadata) = &patch.metadata {
            d.metadata.metadata = metadata.clone();
        }
        Ok(())
    }

    async fn commit(mut self, notify: &[Notification]) -> Result<(), StoreError> {
        // A failed commit did not happen: Drop rolls back.
        self.inner.call("commit")?;
        self.open = false;
        self.undo.clear();
        for (_, slot, guard) in &self.locks {
            if guard.exclusive() {
                let mut d = slot.data.lock().expect("chat data");
                d.committed_owner = d.row.owner;
            }
        }
        // The application's writes, under the row locks still held: atomic
        // with the chat's change for every reader that locks the chat.
        for hook in std::mem::take(&mut self.hooks) {
            hook();
        }
        // Deliver before the row locks are released, so notifications of
        // one chat leave in commit order.
        self.inner.deliver(notify);
        self.locks.clear();
        self.inner.committed("commit")
    }

    async fn rollback(self) -> Result<(), StoreError> {
        // Drop replays the undo log and releases the locks.
        drop(self);
        Ok(())
    }
}

impl TestControl for MemStore {
    async fn advance_clock(&self, by: Duration) -> Result<(), StoreError> {
        self.inner.clock.advance(by);
        Ok(())
    }

    async fn set_raw_state(
        &self,
        chat: ChatId,
        status: &ChatStatus,
        archived: bool,
    ) -> Result<(), StoreError> {
        // Like a raw UPDATE: it waits for the row lock, changes no version.
        let id = self.inner.next_tx.fetch_add(1, Ordering::SeqCst);
        let Some((slot, _guard)) = self.lock(chat, LockMode::Exclusive, id).await? else {
            return Err(StoreError::new(
                "set raw state",
                StoreErrorKind::Data,
                format!("chat {chat} not found"),
            ));
        };
        let mut d = slot.data.lock().expect("chat data");
        d.row.status = status.clone();
        d.row.archived = archived;
        Ok(())
    }
}

//! The concurrency model: one chat row shared by clients, workers, a clock,
//! a store and a receiver of `chat:update`, checked exhaustively.
//!
//! [`single`](super::single) checks the matrix against the semantics; this
//! model checks the protocol around it: row locks, the one snapshot bump
//! per Update, publication after commit through a PublishBuffer, heartbeat
//! leases, ownership hints, fencing of stale workers, and recovery of a
//! runnable chat by a live worker. [`run`] checks it with fencing on,
//! [`run_unfenced`] with fencing off.
//!
//! # Actors and steps
//!
//! - **Clients** `c1`, `c2`, `c3` run, any number of times, an Update
//!   applying SendMessage (busy behaviour: queue) or Interrupt, a Lock, or
//!   a ReadLock.
//! - **Workers** `w1`, `w2` acquire (a scan of the committed row without a
//!   lock, then a lock request, then a re-check under the lock with the
//!   real [`Snapshot::needs_hint`] before Acquire), heartbeat their runner,
//!   run worker steps (the transition the locked state calls for:
//!   CommitStep in R0, FinishTurn in R1, FinishInterruption in I0/I1),
//!   abandon, and may crash at any point. A crash stops the worker for
//!   good: it never heartbeats again, its open transaction rolls back, and
//!   a committed Update it had not flushed yet loses its notifications
//!   (the PublishBuffer dies with the process).
//! - **The clock** ticks; a heartbeat is stale [`STALE_AFTER`] ticks after
//!   it was written, so a lease crosses the staleness threshold in steps.
//! - **The store** holds the committed row, the heartbeat of the current
//!   runner and the row lock (one exclusive holder, or any number of shared
//!   holders). A transaction works on a private copy of the row and either
//!   commits it (last writer wins, as in the database) or rolls back.
//! - **The receiver** keeps the chat's high-water mark of
//!   `snapshot_version` and drops every notification at or below it.
//!
//! An Update is separate steps, as in `ChatMachine::update`: the lock
//! request, granted when compatible (row lock taken, `snapshot_version`
//! bumped in the transaction, store time and lease freshness read); the
//! callback (the transition is decided and the notifications buffered, or a
//! rejection rolls back); the commit (which may instead fail, rolling back
//! and discarding the filled buffer); the flush (delivery to the receiver).
//! Flushes of different Updates interleave in any order. Lock and ReadLock
//! are a lock request and a release. A request that would block is modelled
//! as not enabled until the lock is compatible: waiting has no visible
//! effect, so this loses no interleaving. Acquisition alone has a separate
//! request step, because what it saw at the scan may have changed by the
//! time the lock is granted, which is what the re-check is for.
//!
//! # Abstraction
//!
//! The chat is a deliberately tiny abstraction of the row: its execution
//! state (only W, R0, R1, I0, I1 are reachable with these transitions),
//! its owner (which worker's runner holds the lease), and its snapshot
//! version. Every transition is decided by the real [`decide`] on a real
//! [`Snapshot`] built from that abstraction (with the queue capped at
//! [`QUEUE_CAP`], so SendMessage to a full queue is rejected with
//! MessageQueueFull and rolls back), moved on with the real
//! [`Snapshot::apply`], and announced with the real [`after_update`]; the
//! result is abstracted back. Fencing is the real `decide` fence, the one
//! behind the machine's `Tx::fenced(runner)`: in the fenced variant a
//! stale worker's call fails with `LeaseLost` (and the worker drops its
//! lease), in the unfenced variant it is decided like anyone's.
//!
//! Simplifications, each on purpose:
//! - A worker holds at most one runner and acquires only when it holds
//!   none, so each worker has one runner id (`w1` holds `r1`). Reusing it
//!   across acquisitions is invisible to fencing, because a worker is one
//!   sequential process with at most one operation in flight.
//! - Store time is the time of the row lock (the first statement), not of
//!   BEGIN. The clock may tick while a transaction is open, which covers
//!   the same "the lease went stale meanwhile" interleavings.
//! - Only the current runner's heartbeat is kept: heartbeats of runners
//!   that lost the lease are never read again.
//! - One receiver: the order in which flushes reach it is already
//!   arbitrary, which is all a second receiver would add.
//! - At most one worker crashes, so some worker always keeps running.
//! - The only counter is bounded: once [`Config::max_commits`] Updates
//!   have committed no new Update starts (those under way finish), so
//!   `snapshot_version` stays small. Locks, ReadLocks, rolled-back
//!   Updates, heartbeats and ticks are unbounded; they only close cycles.
//!
//! # Properties
//!
//! Safety properties are checked in every reachable state. Some are state
//! invariants; the others read monitor flags that a step sets when it
//! observes a violation, so correct runs never carry them:
//! [`names::LOCKS`], [`names::SNAPSHOT`], [`names::NOTIFY_AFTER_COMMIT`],
//! [`names::HWM_MONOTONE`], [`names::HWM_CONVERGES`], [`names::HINT`],
//! [`names::FENCE`].
//!
//! Bounded liveness, [`names::RECOVERY`], is checked from every state by
//! running the worker recovery protocol of
//! [`ConcurrencyModel::recovery_steps`]: one live worker runs without a
//! commit budget, the clock stands still, and the other actors only finish
//! what they hold. [`names::NOT_STRANDED`] asks the same without the bound
//! (up to [`STRANDED_AFTER`] steps, where the protocol can only be looping),
//! and [`names::RECOVERY_TIGHT`] shows the bound is the least that works.
//!
//! `sometimes` properties show the model is not vacuous (ReadLocks share,
//! flushes race, hints go out, leases are taken over, a stale worker gets
//! to its callback, a crash loses a notification).
//!
//! With fencing off, [`names::STALE_COMMITS`] is found and
//! [`names::FENCE`] fails with the same trace; so do both liveness
//! properties: a stale worker's unfenced Abandon can clear the new owner's
//! lease, and a worker whose lease was cleared that way never learns it
//! (nothing tells it `LeaseLost`), so it never acquires again.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::time::Instant;

use stateright::{Checker, Model, Path, Property};
use uuid::Uuid;

use super::{CheckReport, Expectation, PropertyVerdict};
use crate::{
    Assigned, BusyBehavior, ChatId, ChatRow, ChatStatus, Env, ExecutionState, Input, Matrix,
    MessageId, NewMessage, Notification, Options, Owner, QueuedMessageId, Rejection, RejectionKind,
    RunnerId, Snapshot, Timestamp, ToolState, Transition, Versions, WorkerId, after_update, decide,
};

/// Clock ticks after which a heartbeat is stale.
pub const STALE_AFTER: u8 = 2;

/// The queue cap the model runs with (`Options::max_queue_size`).
pub const QUEUE_CAP: u32 = 1;

/// Worker steps within which a live worker brings a runnable chat to an
/// owned-and-fresh state (see [`names::RECOVERY`]).
pub const RECOVERY_BOUND: usize = 7;

/// The step limit under which a chat that no live worker recovers counts
/// as stranded (see [`names::NOT_STRANDED`]); far above any recovery the
/// protocol needs, so hitting it means the protocol loops.
pub const STRANDED_AFTER: usize = 64;

/// The number of workers.
pub const WORKERS: u8 = 2;

/// The most clients a [`Config`] may ask for.
pub const MAX_CLIENTS: u8 = 3;

const MAX_ACTORS: usize = MAX_CLIENTS as usize + WORKERS as usize;

/// The names of the model's properties.
pub mod names {
    /// Row locks: at most one exclusive holder, and never together with
    /// shared holders.
    pub const LOCKS: &str =
        "exclusive locks are exclusive; shared locks coexist only with shared locks";
    /// The snapshot is 1 plus the committed Updates; each commit raises it
    /// by exactly one; Lock, ReadLock and rollbacks never do.
    pub const SNAPSHOT: &str = "snapshot_version rises by exactly one per committed Update and never on Lock, ReadLock or rollback";
    /// Only committed Updates are delivered, and only after commit.
    pub const NOTIFY_AFTER_COMMIT: &str =
        "no notification is delivered for a rolled-back Update, nor before its commit";
    /// The receiver's high-water mark never goes back.
    pub const HWM_MONOTONE: &str = "a receiver's high-water mark never decreases";
    /// With no flush pending, the receiver has seen the last commit (unless
    /// a crash lost exactly that notification).
    pub const HWM_CONVERGES: &str =
        "once all flushes are delivered, the high-water mark equals the last committed snapshot";
    /// A runnable chat committed without a fresh lease is hinted.
    pub const HINT: &str =
        "an Update committing a runnable state whose lease is missing or stale publishes a hint";
    /// Fencing: only the lease holder's runner commits worker transitions.
    pub const FENCE: &str =
        "a worker whose lease was taken over never commits a worker transition afterwards";
    /// Bounded liveness.
    pub const RECOVERY: &str =
        "a runnable chat reaches an owned-and-fresh state within 7 steps of a live worker";
    /// Unbounded liveness: the recovery protocol ends at all.
    pub const NOT_STRANDED: &str =
        "no runnable chat is stranded: a live worker's recovery always ends owned-and-fresh";
    /// Unfenced variant: the hazard fencing prevents.
    pub const STALE_COMMITS: &str = "a stale worker commits a worker transition";
    /// Non-vacuity: ReadLocks share the row.
    pub const SHARED_READS: &str = "two ReadLocks hold the row at once";
    /// Non-vacuity: flushes can race.
    pub const FLUSH_RACE: &str = "two committed Updates wait to flush at once";
    /// Non-vacuity: hints are published.
    pub const HINTED: &str = "a committed Update carries an ownership hint";
    /// Non-vacuity: takeovers happen while the old owner still runs.
    pub const TAKEOVER: &str = "a live worker's lease is taken over";
    /// Non-vacuity: a stale worker gets as far as its callback.
    pub const STALE_CALLBACK: &str = "a worker whose lease was taken over holds the row lock";
    /// Non-vacuity: a crash can lose the last commit's notification.
    pub const LOST_FLUSH: &str = "a crash loses the notification of the last commit";
    /// The bound of [`RECOVERY`] is tight.
    pub const RECOVERY_TIGHT: &str = "some state needs all 7 recovery steps";
}

/// The bounds and the variant of one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    /// Worker transitions go through the fenced API (`Tx::fenced`).
    pub fenced: bool,
    /// Clients, 1 to [`MAX_CLIENTS`].
    pub clients: u8,
    /// Committed Updates after which no new Update starts (Updates already
    /// under way still finish), which bounds `snapshot_version`.
    pub max_commits: u8,
    /// Worker crashes allowed in one run.
    pub max_crashes: u8,
    /// Whether a commit may fail after the callback (rolling back and
    /// discarding a filled buffer).
    pub commit_failures: bool,
}

impl Config {
    /// The checked configuration: three clients, two workers, at most four
    /// committed Updates, one crash, failing commits.
    pub const fn new(fenced: bool) -> Self {
        Config {
            fenced,
            clients: 3,
            max_commits: 4,
            max_crashes: 1,
            commit_failures: true,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::new(true)
    }
}

/// An actor of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Who {
    /// Client number n (0-based; shown 1-based).
    Client(u8),
    /// Worker number n (0-based; shown 1-based).
    Worker(u8),
}

impl Who {
    fn index(self) -> usize {
        match self {
            Who::Client(n) => n as usize,
            Who::Worker(n) => MAX_CLIENTS as usize + n as usize,
        }
    }

    fn from_index(i: usize) -> Who {
        if i < MAX_CLIENTS as usize {
            Who::Client(i as u8)
        } else {
            Who::Worker((i - MAX_CLIENTS as usize) as u8)
        }
    }
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Who::Client(n) => write!(f, "client c{}", n + 1),
            Who::Worker(n) => write!(f, "worker w{}", n + 1),
        }
    }
}

/// The runner a worker holds, shown as `r1`, `r2`.
struct Runner(u8);

impl fmt::Display for Runner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0 + 1)
    }
}

/// One operation an actor runs against the chat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Update applying SendMessage (busy behaviour: queue).
    Send,
    /// Update applying Interrupt.
    Interrupt,
    /// Exclusive row lock, no bump, no publication.
    Lock,
    /// Shared row lock, no bump, no publication.
    ReadLock,
    /// Update that re-checks the candidate and applies Acquire.
    Acquire,
    /// Update applying the worker transition the locked state calls for
    /// (fenced in the fenced variant): CommitStep in R0, FinishTurn in R1
    /// (promoting the queued message), FinishInterruption in I0/I1, and
    /// CommitStep anywhere else (where the matrix rejects it).
    Work,
    /// Update applying Abandon (fenced in the fenced variant).
    Abandon,
}

impl Op {
    /// True for the operations that run an Update.
    pub const fn is_update(self) -> bool {
        !matches!(self, Op::Lock | Op::ReadLock)
    }

    /// True for the worker operations that may be fenced.
    pub const fn is_fenceable(self) -> bool {
        matches!(self, Op::Work | Op::Abandon)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Send => "Update(SendMessage)",
            Op::Interrupt => "Update(Interrupt)",
            Op::Lock => "Lock",
            Op::ReadLock => "ReadLock",
            Op::Acquire => "Update(Acquire)",
            Op::Work => "Update(worker step)",
            Op::Abandon => "Update(Abandon)",
        })
    }
}

/// The abstract chat row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Row {
    /// Execution state.
    pub state: ExecutionState,
    /// The worker whose runner holds the lease.
    pub owner: Option<u8>,
    /// `snapshot_version`.
    pub snapshot: u8,
}

impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.state)?;
        match self.owner {
            Some(w) => write!(f, "owned by w{}/{}", w + 1, Runner(w))?,
            None => f.write_str("unowned")?,
        }
        write!(f, ", snapshot {}", self.snapshot)
    }
}

/// An open Update transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tx {
    /// The row as this transaction sees it (bumped at the grant).
    pub row: Row,
    /// The machine's view of the lease (`Snapshot::lease_fresh`, kept by
    /// the decided plans).
    pub lease_fresh: bool,
    /// The store's own account of whether the lease is fresh at store
    /// time, from the heartbeat rows it holds and writes.
    pub store_fresh: bool,
    /// Clock ticks since store time (tracked for Acquire only, whose
    /// heartbeat is written at store time), capped at [`STALE_AFTER`].
    pub since: u8,
    /// The transition the callback applied.
    pub applied: Option<Transition>,
}

/// The notifications an Update buffered (PublishBuffer contents).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Buffer {
    /// The `chat:update` payload's `snapshot_version`.
    pub snapshot: u8,
    /// A `chat:ownership` hint follows the update.
    pub hint: bool,
    /// Ghost: the Update has committed.
    pub committed: bool,
}

impl fmt::Display for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chat:update {}", self.snapshot)?;
        if self.hint {
            f.write_str(" + chat:ownership")?;
        }
        Ok(())
    }
}

/// Where an actor is in its current operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Phase {
    /// No operation in flight.
    #[default]
    Idle,
    /// Waiting for the row lock.
    Requesting(Op),
    /// Holding a Lock or ReadLock.
    Held(Op),
    /// Update: lock held and snapshot bumped; the callback runs next.
    Locked(Op, Tx),
    /// Update: callback done, notifications buffered; commit next.
    Called(Op, Tx, Buffer),
    /// Update committed; the buffer waits to be flushed.
    Committed(Buffer),
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Idle => f.write_str("idle"),
            Phase::Requesting(op) => write!(f, "{op} waits for the row lock"),
            Phase::Held(op) => write!(f, "holds {op}"),
            Phase::Locked(op, tx) => {
                write!(
                    f,
                    "{op} locked at snapshot {}, callback next",
                    tx.row.snapshot
                )
            }
            Phase::Called(op, tx, buf) => {
                write!(
                    f,
                    "{op} called ({}), buffered {buf}, commit next",
                    tx.row.state
                )
            }
            Phase::Committed(buf) => write!(f, "committed, flush of {buf} next"),
        }
    }
}

/// One actor's local state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Actor {
    /// The operation in flight.
    pub phase: Phase,
    /// Worker: believes it holds its runner's lease.
    pub holds: bool,
    /// Worker: crashed (stopped for good).
    pub crashed: bool,
}

/// Monitor flags: set by a step that observes a violation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(u8);

impl Flags {
    const SNAPSHOT_SKEW: u8 = 1;
    const EARLY_DELIVERY: u8 = 1 << 1;
    const HWM_BACK: u8 = 1 << 2;
    const MISSING_HINT: u8 = 1 << 3;
    const STALE_COMMIT: u8 = 1 << 4;

    fn set(&mut self, bit: u8) {
        self.0 |= bit;
    }

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

impl fmt::Display for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Self::SNAPSHOT_SKEW, "snapshot skew"),
            (Self::EARLY_DELIVERY, "early delivery"),
            (Self::HWM_BACK, "high-water mark went back"),
            (Self::MISSING_HINT, "missing hint"),
            (Self::STALE_COMMIT, "stale worker committed"),
        ];
        let set: Vec<&str> = names
            .iter()
            .filter(|(bit, _)| self.has(*bit))
            .map(|(_, name)| *name)
            .collect();
        if set.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&set.join(", "))
        }
    }
}

/// A state of the whole system. Its `Debug` is its readable `Display`
/// (the stateright Explorer shows states through `Debug`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct State {
    /// The committed row.
    pub row: Row,
    /// Age in ticks of the current runner's heartbeat, capped at
    /// [`STALE_AFTER`] (0 when unowned).
    pub lease_age: u8,
    /// The exclusive row-lock holder.
    pub exclusive: Option<Who>,
    /// Shared row-lock holders, a bit per actor index.
    pub shared: u8,
    /// Clients (indices 0..3) and workers (3..5).
    pub actors: [Actor; MAX_ACTORS],
    /// The receiver's high-water mark of `snapshot_version`.
    pub hwm: u8,
    /// Ghost: committed Updates.
    pub commits: u8,
    /// Ghost: the last commit's notification was lost in a crash.
    pub last_lost: bool,
    /// Crashes so far.
    pub crashes: u8,
    /// Monitor flags.
    pub flags: Flags,
}

impl State {
    fn actor(&self, who: Who) -> &Actor {
        &self.actors[who.index()]
    }

    fn actor_mut(&mut self, who: Who) -> &mut Actor {
        &mut self.actors[who.index()]
    }

    /// True if the committed lease is held and its heartbeat is fresh.
    pub fn lease_fresh(&self) -> bool {
        self.row.owner.is_some() && self.lease_age < STALE_AFTER
    }

    /// True if the chat is runnable and owned with a fresh lease, or not
    /// runnable at all (the goal of [`names::RECOVERY`]).
    pub fn settled(&self) -> bool {
        !self.row.state.is_runnable() || self.lease_fresh()
    }

    fn release(&mut self, who: Who) {
        if self.exclusive == Some(who) {
            self.exclusive = None;
        }
        self.shared &= !(1 << who.index());
    }

    fn canonicalize(&mut self) {
        if self.row.owner.is_none() {
            self.lease_age = 0;
        }
    }
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chat {}", self.row)?;
        if self.row.owner.is_some() {
            if self.lease_fresh() {
                write!(f, " (heartbeat {} old, fresh)", self.lease_age)?;
            } else {
                f.write_str(" (heartbeat stale)")?;
            }
        }
        write!(f, "; receiver hwm {}", self.hwm)?;
        match (self.exclusive, self.shared) {
            (Some(w), _) => write!(f, "; row lock: exclusive {w}")?,
            (None, 0) => f.write_str("; row lock: free")?,
            (None, bits) => {
                f.write_str("; row lock: shared")?;
                for i in 0..MAX_ACTORS {
                    if bits & (1 << i) != 0 {
                        write!(f, " {}", Who::from_index(i))?;
                    }
                }
            }
        }
        for (i, a) in self.actors.iter().enumerate() {
            let who = Who::from_index(i);
            write!(f, "; {who}: ")?;
            if a.crashed {
                f.write_str("crashed")?;
                continue;
            }
            if let Who::Worker(n) = who
                && a.holds
            {
                write!(f, "holds {}, ", Runner(n))?;
            }
            write!(f, "{}", a.phase)?;
        }
        if self.last_lost {
            f.write_str("; last commit's notification lost")?;
        }
        if self.flags != Flags::default() {
            write!(f, "; VIOLATION: {}", self.flags)?;
        }
        Ok(())
    }
}

/// One step of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// The actor starts an operation: BEGIN and the row-lock request,
    /// granted at once (a request that would block is not enabled until
    /// the lock is compatible). An Update also bumps the snapshot.
    Begin(Who, Op),
    /// A worker's acquisition scan (no lock) finds the chat a candidate;
    /// the worker requests the row lock to acquire it.
    Scan(Who),
    /// The store grants the row lock a scan requested (and bumps).
    Grant(Who),
    /// The Update's callback runs.
    Callback(Who),
    /// The Update commits.
    Commit(Who),
    /// The Update's commit fails: rollback, buffer discarded.
    CommitFails(Who),
    /// The committed Update's buffer is flushed to the receiver.
    Flush(Who),
    /// A Lock or ReadLock ends.
    Release(Who),
    /// A worker refreshes its runner's heartbeat.
    Heartbeat(Who),
    /// A worker crashes.
    Crash(Who),
    /// The clock advances one step.
    Tick,
}

impl Action {
    /// The actor taking the step (none for the clock).
    pub fn who(&self) -> Option<Who> {
        match *self {
            Action::Begin(w, _)
            | Action::Scan(w)
            | Action::Grant(w)
            | Action::Callback(w)
            | Action::Commit(w)
            | Action::CommitFails(w)
            | Action::Flush(w)
            | Action::Release(w)
            | Action::Heartbeat(w)
            | Action::Crash(w) => Some(w),
            Action::Tick => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Begin(w, op) => write!(f, "{w} begins {op}"),
            Action::Scan(w) => write!(f, "{w} scans and requests the row lock to acquire"),
            Action::Grant(w) => write!(f, "{w} is granted the row lock"),
            Action::Callback(w) => write!(f, "{w} runs its callback"),
            Action::Commit(w) => write!(f, "{w} commits"),
            Action::CommitFails(w) => write!(f, "{w}'s commit fails"),
            Action::Flush(w) => write!(f, "{w} flushes its buffer"),
            Action::Release(w) => write!(f, "{w} releases its lock"),
            Action::Heartbeat(w) => write!(f, "{w} heartbeats"),
            Action::Crash(w) => write!(f, "{w} crashes"),
            Action::Tick => f.write_str("the clock ticks"),
        }
    }
}

/// What a callback did.
#[derive(Clone, Debug, PartialEq, Eq)]
enum CallbackOutcome {
    /// The transition was applied; the transaction and buffer afterwards.
    Applied { tx: Tx, buffer: Buffer },
    /// Acquire's re-check under the lock found no candidate.
    NotCandidate,
    /// The transition was rejected.
    Rejected(Rejection),
}

/// The concurrency model (a stateright [`Model`]).
#[derive(Clone, Debug)]
pub struct ConcurrencyModel {
    /// Bounds and variant.
    pub config: Config,
    options: Options,
}

impl ConcurrencyModel {
    /// A model of `config`.
    pub fn new(config: Config) -> Self {
        assert!(
            (1..=MAX_CLIENTS).contains(&config.clients),
            "1 to {MAX_CLIENTS} clients"
        );
        ConcurrencyModel {
            config,
            options: Options {
                max_queue_size: QUEUE_CAP,
                ..Options::default()
            },
        }
    }

    /// The model's name in reports.
    pub fn name(&self) -> &'static str {
        if self.config.fenced {
            "concurrency"
        } else {
            "concurrency (unfenced)"
        }
    }

    fn actors(&self) -> impl Iterator<Item = Who> + use<> {
        (0..self.config.clients)
            .map(Who::Client)
            .chain((0..WORKERS).map(Who::Worker))
    }

    // --- Real model glue -------------------------------------------------

    fn chat_id() -> ChatId {
        ChatId(Uuid::from_u128(0xc4a7))
    }

    fn runner_id(w: u8) -> RunnerId {
        RunnerId(Uuid::from_u128(0x5200 + u128::from(w)))
    }

    fn worker_id(w: u8) -> WorkerId {
        WorkerId(Uuid::from_u128(0x3000 + u128::from(w)))
    }

    fn worker_of(owner: &Owner) -> u8 {
        (0..WORKERS)
            .find(|w| Self::runner_id(*w) == owner.runner_id)
            .expect("every runner in the model belongs to a worker")
    }

    /// The real snapshot a transaction on `row` sees.
    fn snapshot(row: &Row, lease_fresh: bool) -> Snapshot {
        use ExecutionState as S;
        let status = match row.state {
            S::W => ChatStatus::Waiting,
            S::R0 | S::R1 => ChatStatus::Running,
            S::I0 | S::I1 => ChatStatus::Interrupting,
            other => unreachable!("the concurrency model never reaches {other}"),
        };
        Snapshot {
            row: ChatRow {
                id: Self::chat_id(),
                owner_id: Uuid::from_u128(0x05e7),
                status,
                archived: false,
                owner: row.owner.map(|w| Owner {
                    worker_id: Self::worker_id(w),
                    runner_id: Self::runner_id(w),
                }),
                last_error: None,
                retry_state: None,
                generation_attempt: 0,
                requires_action_deadline_at: None,
                compaction_requested_at: None,
                versions: Versions {
                    snapshot: i64::from(row.snapshot),
                    history: 1,
                    queue: 0,
                    retry_state: 0,
                },
                dynamic_tools: BTreeSet::new(),
                last_model_config_id: None,
            },
            queue: if row.state.queue_non_empty() {
                vec![QueuedMessageId(1)]
            } else {
                Vec::new()
            },
            tools: ToolState::default(),
            lease_fresh,
            now: Timestamp(0),
        }
    }

    fn input(op: Op, state: ExecutionState, who: Who) -> Input {
        match op {
            Op::Send => Input::SendMessage {
                message: NewMessage::user("more"),
                busy_behavior: BusyBehavior::Queue,
            },
            Op::Interrupt => Input::Interrupt { reason: None },
            Op::Acquire => {
                let Who::Worker(w) = who else {
                    unreachable!("only workers acquire")
                };
                Input::Acquire {
                    owner: Owner {
                        worker_id: Self::worker_id(w),
                        runner_id: Self::runner_id(w),
                    },
                }
            }
            Op::Work => match state {
                ExecutionState::R1 => Input::FinishTurn,
                ExecutionState::I0 | ExecutionState::I1 => Input::FinishInterruption {
                    partial_messages: Vec::new(),
                },
                _ => Input::CommitStep {
                    messages: vec![NewMessage::assistant("step")],
                    consume_compaction_request: false,
                },
            },
            Op::Abandon => Input::Abandon,
            Op::Lock | Op::ReadLock => unreachable!("Lock and ReadLock run no callback"),
        }
    }

    /// Runs an Update's callback the way `ChatMachine::update` does: the
    /// decision is the real `decide` on the locked snapshot, the snapshot
    /// moves on with the real `Snapshot::apply`, and the buffer is filled
    /// with the real `after_update`.
    fn callback(&self, who: Who, op: Op, tx: &Tx) -> CallbackOutcome {
        let mut snap = Self::snapshot(&tx.row, tx.lease_fresh);
        // The worker's re-check of a candidate under the lock: runnable and
        // without a fresh lease (exactly the hint condition).
        if op == Op::Acquire && !snap.needs_hint() {
            return CallbackOutcome::NotCandidate;
        }
        let fence = match who {
            Who::Worker(w) if self.config.fenced && op.is_fenceable() => Some(Self::runner_id(w)),
            _ => None,
        };
        let input = Self::input(op, tx.row.state, who);
        let env = Env {
            options: &self.options,
            matrix: Matrix::REFERENCE,
            fence,
            history: None,
            edit: None,
        };
        let plan = match decide(&snap, &input, &env) {
            Ok(plan) => plan,
            Err(rejection) => return CallbackOutcome::Rejected(rejection),
        };
        // matrix: every landed state is in its cell (the machine asserts it
        // after every transition; so does the model).
        assert!(
            Matrix::REFERENCE.allows_landing(plan.transition, plan.from, plan.to),
            "{} from {} landed in {}",
            plan.transition,
            plan.from,
            plan.to
        );
        let assigned = Assigned {
            messages: (0..plan.inserted_len())
                .map(|i| MessageId(100 + i as i64))
                .collect(),
            queued: plan.append_queued.as_ref().map(|_| QueuedMessageId(2)),
        };
        snap.apply(&plan, &assigned);
        assert_eq!(
            snap.row.versions.snapshot,
            i64::from(tx.row.snapshot),
            "a transition never bumps; the Update did, once, at the lock"
        );
        let owner = snap.row.owner.as_ref().map(Self::worker_of);
        // The store's account of freshness at store time: a heartbeat upserted
        // by this transaction is fresh; a new or cleared owner without one is
        // not; otherwise what the store read at the grant still holds.
        let store_fresh = match owner {
            None => false,
            Some(w) if plan.heartbeat == Some(Self::runner_id(w)) => true,
            Some(_) if owner != tx.row.owner => false,
            Some(_) => tx.store_fresh,
        };
        let notes = after_update(&snap);
        let buffer = Buffer {
            snapshot: u8::try_from(notes[0].snapshot_version())
                .expect("snapshot versions stay small"),
            hint: notes
                .iter()
                .any(|n| matches!(n, Notification::Ownership(_))),
            committed: false,
        };
        assert!(matches!(notes[0], Notification::Update { .. }));
        CallbackOutcome::Applied {
            tx: Tx {
                row: Row {
                    state: snap.state(),
                    owner,
                    snapshot: tx.row.snapshot,
                },
                lease_fresh: snap.lease_fresh,
                store_fresh,
                since: tx.since,
                applied: Some(plan.transition),
            },
            buffer,
        }
    }

    // --- Steps -----------------------------------------------------------

    fn lock_free_for(s: &State, op: Op) -> bool {
        match op {
            Op::ReadLock => s.exclusive.is_none(),
            _ => s.exclusive.is_none() && s.shared == 0,
        }
    }

    /// True while new Updates may start (the commit budget is not spent).
    /// Both counters are consulted, so that a model with a broken bump
    /// still has a finite state space and fails [`names::SNAPSHOT`].
    fn may_update(&self, s: &State) -> bool {
        s.commits < self.config.max_commits && s.row.snapshot <= self.config.max_commits
    }

    /// The acquisition scan's condition, read from the committed row
    /// without a lock: runnable, and no fresh lease.
    fn candidate(s: &State) -> bool {
        s.row.state.is_runnable() && !s.lease_fresh()
    }

    fn collect_actions(&self, s: &State, out: &mut Vec<Action>) {
        for who in self.actors() {
            let a = s.actor(who);
            if a.crashed {
                continue;
            }
            match a.phase {
                Phase::Idle => {
                    let updates = self.may_update(s);
                    match who {
                        Who::Client(_) => {
                            for op in [Op::Send, Op::Interrupt, Op::Lock, Op::ReadLock] {
                                if (updates || !op.is_update()) && Self::lock_free_for(s, op) {
                                    out.push(Action::Begin(who, op));
                                }
                            }
                        }
                        Who::Worker(_) if a.holds => {
                            if updates && Self::lock_free_for(s, Op::Work) {
                                out.push(Action::Begin(who, Op::Work));
                                out.push(Action::Begin(who, Op::Abandon));
                            }
                        }
                        Who::Worker(_) => {
                            if updates && Self::candidate(s) {
                                out.push(Action::Scan(who));
                            }
                        }
                    }
                }
                Phase::Requesting(op) => {
                    if Self::lock_free_for(s, op) {
                        out.push(Action::Grant(who));
                    }
                }
                Phase::Held(_) => out.push(Action::Release(who)),
                Phase::Locked(..) => out.push(Action::Callback(who)),
                Phase::Called(..) => {
                    out.push(Action::Commit(who));
                    if self.config.commit_failures {
                        out.push(Action::CommitFails(who));
                    }
                }
                Phase::Committed(_) => out.push(Action::Flush(who)),
            }
            if let Who::Worker(w) = who {
                if a.holds && s.row.owner == Some(w) && s.lease_age > 0 {
                    out.push(Action::Heartbeat(who));
                }
                if s.crashes < self.config.max_crashes {
                    out.push(Action::Crash(who));
                }
            }
        }
        out.push(Action::Tick);
    }

    fn rollback(s: &mut State, who: Who) {
        s.release(who);
        // The buffer (if any) is discarded with the phase.
        s.actor_mut(who).phase = Phase::Idle;
    }

    /// LockChatAndBumpSnapshotVersion: lock, bump, and read the row and the
    /// lease freshness at store time.
    fn open_update(s: &State, op: Op) -> Phase {
        let fresh = s.lease_fresh();
        Phase::Locked(
            op,
            Tx {
                row: Row {
                    snapshot: s.row.snapshot + 1,
                    ..s.row
                },
                lease_fresh: fresh,
                store_fresh: fresh,
                since: 0,
                applied: None,
            },
        )
    }

    fn take_lock(s: &mut State, who: Who, op: Op) {
        if op == Op::ReadLock {
            s.shared |= 1 << who.index();
        } else {
            s.exclusive = Some(who);
        }
    }

    fn step(&self, s: &State, action: Action) -> Option<State> {
        let mut n = s.clone();
        match action {
            Action::Begin(who, op) => {
                Self::take_lock(&mut n, who, op);
                n.actor_mut(who).phase = if op.is_update() {
                    Self::open_update(s, op)
                } else {
                    Phase::Held(op)
                };
            }
            Action::Scan(who) => {
                n.actor_mut(who).phase = Phase::Requesting(Op::Acquire);
            }
            Action::Grant(who) => {
                let Phase::Requesting(op) = s.actor(who).phase else {
                    unreachable!("grant without request")
                };
                Self::take_lock(&mut n, who, op);
                n.actor_mut(who).phase = Self::open_update(s, op);
            }
            Action::Callback(who) => {
                let Phase::Locked(op, tx) = s.actor(who).phase else {
                    unreachable!("callback without lock")
                };
                match self.callback(who, op, &tx) {
                    CallbackOutcome::Applied { tx, buffer } => {
                        n.actor_mut(who).phase = Phase::Called(op, tx, buffer);
                    }
                    CallbackOutcome::NotCandidate => Self::rollback(&mut n, who),
                    CallbackOutcome::Rejected(rejection) => {
                        Self::rollback(&mut n, who);
                        if matches!(rejection.kind, RejectionKind::LeaseLost { .. }) {
                            // The worker learns it no longer owns the chat.
                            n.actor_mut(who).holds = false;
                        }
                    }
                }
            }
            Action::Commit(who) => {
                let Phase::Called(op, tx, mut buffer) = s.actor(who).phase else {
                    unreachable!("commit without callback")
                };
                if tx.row.snapshot != s.row.snapshot + 1 {
                    n.flags.set(Flags::SNAPSHOT_SKEW);
                }
                if tx.row.state.is_runnable() && !tx.store_fresh && !buffer.hint {
                    n.flags.set(Flags::MISSING_HINT);
                }
                if let Who::Worker(w) = who {
                    let worker_transition = tx.applied.is_some_and(Transition::is_worker);
                    if worker_transition && s.row.owner != Some(w) {
                        n.flags.set(Flags::STALE_COMMIT);
                    }
                }
                n.row = tx.row;
                n.commits += 1;
                n.last_lost = false;
                if tx.applied == Some(Transition::Acquire) {
                    // The heartbeat was written at store time.
                    n.lease_age = tx.since;
                }
                n.release(who);
                buffer.committed = true;
                let a = n.actor_mut(who);
                a.phase = Phase::Committed(buffer);
                match op {
                    Op::Acquire => a.holds = true,
                    Op::Abandon => a.holds = false,
                    _ => {}
                }
            }
            Action::CommitFails(who) => Self::rollback(&mut n, who),
            Action::Flush(who) => {
                let Phase::Committed(buffer) = s.actor(who).phase else {
                    unreachable!("flush without commit")
                };
                if !buffer.committed || buffer.snapshot > s.row.snapshot {
                    n.flags.set(Flags::EARLY_DELIVERY);
                }
                // The receiver drops anything at or below its high-water mark.
                let hwm = if buffer.snapshot > s.hwm {
                    buffer.snapshot
                } else {
                    s.hwm
                };
                if hwm < s.hwm {
                    n.flags.set(Flags::HWM_BACK);
                }
                n.hwm = hwm;
                n.actor_mut(who).phase = Phase::Idle;
            }
            Action::Release(who) => Self::rollback(&mut n, who),
            Action::Heartbeat(who) => {
                let Who::Worker(w) = who else {
                    unreachable!("only workers heartbeat")
                };
                if s.row.owner != Some(w) || s.lease_age == 0 {
                    return None;
                }
                n.lease_age = 0;
            }
            Action::Crash(who) => {
                match s.actor(who).phase {
                    Phase::Committed(buffer) => {
                        // A committed Update's buffer dies with the process.
                        n.last_lost |= buffer.snapshot == s.row.snapshot;
                    }
                    // The session dies: the store rolls its transaction back.
                    _ => n.release(who),
                }
                n.crashes += 1;
                *n.actor_mut(who) = Actor {
                    crashed: true,
                    ..Actor::default()
                };
            }
            Action::Tick => {
                let mut changed = false;
                if s.row.owner.is_some() && s.lease_age < STALE_AFTER {
                    n.lease_age += 1;
                    changed = true;
                }
                for a in &mut n.actors {
                    if let Phase::Locked(Op::Acquire, tx) | Phase::Called(Op::Acquire, tx, _) =
                        &mut a.phase
                        && tx.since < STALE_AFTER
                    {
                        tx.since += 1;
                        changed = true;
                    }
                }
                if !changed {
                    return None;
                }
            }
        }
        n.canonicalize();
        Some(n)
    }

    // --- Liveness --------------------------------------------------------

    /// The steps one live worker takes to bring the chat from `s` to a
    /// settled state (not runnable, or owned with a fresh lease), at best
    /// over the live workers; `None` if no live worker gets there within
    /// [`RECOVERY_BOUND`] steps.
    pub fn recovery_steps(&self, s: &State) -> Option<usize> {
        self.recovery_steps_within(s, RECOVERY_BOUND)
    }

    /// As [`ConcurrencyModel::recovery_steps`], within `limit` steps.
    ///
    /// The worker runs its recovery protocol while the clock stands still,
    /// its commit budget is lifted, and the other actors only finish what
    /// they hold (their callbacks, commits, flushes and releases; none of
    /// this counts as a worker step). The protocol: finish the operation in
    /// flight; heartbeat a stale lease it still holds; check a lease it
    /// believes it holds with a fenced Abandon (which fails with LeaseLost
    /// if the lease was taken over); otherwise scan and acquire.
    pub fn recovery_steps_within(&self, s: &State, limit: usize) -> Option<usize> {
        if s.settled() {
            return Some(0);
        }
        (0..WORKERS)
            .filter(|w| !s.actor(Who::Worker(*w)).crashed)
            .filter_map(|w| self.recover_with(s, w, limit))
            .min()
    }

    fn recover_with(&self, s: &State, w: u8, limit: usize) -> Option<usize> {
        let me = Who::Worker(w);
        let mut st = s.clone();
        // The others finish what they hold, in actor order.
        while let Some(action) =
            self.actors()
                .filter(|who| *who != me)
                .find_map(|who| match st.actor(who).phase {
                    Phase::Held(_) => Some(Action::Release(who)),
                    Phase::Locked(..) => Some(Action::Callback(who)),
                    Phase::Called(..) => Some(Action::Commit(who)),
                    Phase::Committed(_) => Some(Action::Flush(who)),
                    Phase::Idle | Phase::Requesting(_) => None,
                })
        {
            st = self.step(&st, action)?;
        }
        let mut steps = 0;
        while !st.settled() {
            if steps == limit {
                return None;
            }
            let a = st.actor(me);
            let action = if a.holds && st.row.owner == Some(w) && st.lease_age > 0 {
                Action::Heartbeat(me)
            } else {
                match a.phase {
                    Phase::Idle if a.holds => Action::Begin(me, Op::Abandon),
                    Phase::Idle => Action::Scan(me),
                    Phase::Requesting(_) => Action::Grant(me),
                    Phase::Locked(..) => Action::Callback(me),
                    Phase::Called(..) => Action::Commit(me),
                    Phase::Committed(_) => Action::Flush(me),
                    Phase::Held(_) => Action::Release(me),
                }
            };
            st = self.step(&st, action)?;
            steps += 1;
        }
        Some(steps)
    }

    // --- Rendering -------------------------------------------------------

    /// One readable line for a step from `before`.
    pub fn describe(&self, before: &State, action: Action) -> String {
        let after = self.step(before, action);
        match action {
            Action::Scan(who) => format!(
                "{who} scans: chat {} needs an owner ({}); requests the row lock to acquire",
                before.row.state,
                lease_words(before)
            ),
            Action::Begin(who, Op::ReadLock) => format!("{who} takes a shared row lock (ReadLock)"),
            Action::Begin(who, Op::Lock) => {
                format!("{who} takes the exclusive row lock (Lock: no bump)")
            }
            Action::Begin(who, op) => self.lock_and_bump(who, op, before),
            Action::Grant(who) => match before.actor(who).phase {
                Phase::Requesting(op) => self.lock_and_bump(who, op, before),
                _ => action.to_string(),
            },
            Action::Callback(who) => {
                let Phase::Locked(op, tx) = before.actor(who).phase else {
                    return action.to_string();
                };
                match self.callback(who, op, &tx) {
                    CallbackOutcome::Applied { tx: done, buffer } => {
                        let t = done.applied.expect("applied");
                        let what = match (op, who) {
                            (Op::Acquire, Who::Worker(w)) => {
                                format!("{who} acquires (runner {})", Runner(w))
                            }
                            _ => format!("{who} applies {t}{}", self.fence_words(who, op, &tx)),
                        };
                        format!(
                            "{what}: {} -> {}; buffers {buffer}",
                            tx.row.state, done.row.state
                        )
                    }
                    CallbackOutcome::NotCandidate => format!(
                        "{who} re-checks under the lock: no longer a candidate ({}, {}); \
                         rolls back",
                        tx.row.state,
                        lease_words_tx(&tx)
                    ),
                    CallbackOutcome::Rejected(r) => {
                        let learns = if matches!(r.kind, RejectionKind::LeaseLost { .. }) {
                            "; the worker drops its lease"
                        } else {
                            ""
                        };
                        format!(
                            "{who}'s {} from {} is rejected ({}); rolls back, bump undone{learns}",
                            r.transition,
                            r.from,
                            rejection_words(&r.kind)
                        )
                    }
                }
            }
            Action::Commit(who) => {
                let Phase::Called(_, tx, buffer) = before.actor(who).phase else {
                    return action.to_string();
                };
                let t = tx.applied.expect("applied");
                let mut notes = vec![format!("snapshot {}", tx.row.snapshot)];
                if let Who::Worker(w) = who
                    && t.is_worker()
                    && before.row.owner != Some(w)
                {
                    notes.push(if self.config.fenced {
                        "lease lost".to_owned()
                    } else {
                        "lease lost, unfenced".to_owned()
                    });
                }
                if buffer.hint {
                    notes.push("hint buffered".to_owned());
                }
                format!("{who} commits {t} ({})", notes.join("; "))
            }
            Action::CommitFails(who) => {
                format!("{who}'s commit fails: rolls back (bump undone), buffer discarded")
            }
            Action::Flush(who) => {
                let Phase::Committed(buffer) = before.actor(who).phase else {
                    return action.to_string();
                };
                let hwm = after.as_ref().map_or(before.hwm, |a| a.hwm);
                let fate = if hwm > before.hwm {
                    format!("receiver hwm {} -> {hwm}", before.hwm)
                } else {
                    format!("receiver drops it (hwm {})", before.hwm)
                };
                format!("{who} flushes {buffer}: {fate}")
            }
            Action::Release(who) => {
                let op = match before.actor(who).phase {
                    Phase::Held(op) => op.to_string(),
                    _ => "lock".to_owned(),
                };
                format!("{who} ends its {op} (no bump, nothing published)")
            }
            Action::Heartbeat(who) => match who {
                Who::Worker(w) => {
                    format!("{who} heartbeats runner {} (lease fresh again)", Runner(w))
                }
                Who::Client(_) => action.to_string(),
            },
            Action::Crash(who) => {
                let what = match before.actor(who).phase {
                    Phase::Committed(_) => "; its unflushed notifications are lost",
                    Phase::Locked(..) | Phase::Called(..) | Phase::Held(_) => {
                        "; its open transaction rolls back"
                    }
                    _ => "",
                };
                format!("{who} crashes (stops heartbeating for good){what}")
            }
            Action::Tick => {
                let Some(after) = after else {
                    return "the clock ticks".to_owned();
                };
                match after.row.owner {
                    Some(w) => format!(
                        "the clock ticks: heartbeat of {} is {} old ({})",
                        Runner(w),
                        after.lease_age,
                        if after.lease_fresh() {
                            "fresh"
                        } else {
                            "stale"
                        }
                    ),
                    None => "the clock ticks".to_owned(),
                }
            }
        }
    }

    fn lock_and_bump(&self, who: Who, op: Op, before: &State) -> String {
        format!(
            "{who} locks the row for {op}, bumping snapshot_version to {} in its transaction \
             (chat {}, {})",
            before.row.snapshot + 1,
            before.row.state,
            lease_words(before)
        )
    }

    fn fence_words(&self, who: Who, op: Op, tx: &Tx) -> String {
        let Who::Worker(w) = who else {
            return String::new();
        };
        if !op.is_fenceable() {
            return String::new();
        }
        let lost = tx.row.owner != Some(w);
        match (self.config.fenced, lost) {
            (true, _) => format!(" (fenced by {})", Runner(w)),
            (false, true) => " (lease lost, unfenced)".to_owned(),
            (false, false) => " (unfenced)".to_owned(),
        }
    }

    /// For each property, the shortest path (breadth first, in action
    /// order) to a state that discovers it: a state violating an `always`
    /// property, or satisfying a `sometimes` one. `None` where no reachable
    /// state does.
    pub fn shortest_witnesses(
        &self,
        targets: &[&Property<Self>],
    ) -> Vec<Option<Path<State, Action>>> {
        let discovers = |p: &Property<Self>, s: &State| match p.expectation {
            stateright::Expectation::Sometimes => (p.condition)(self, s),
            _ => !(p.condition)(self, s),
        };
        let fingerprint = |s: &State| {
            let mut h = DefaultHasher::new();
            s.hash(&mut h);
            h.finish()
        };
        let init = self.init_states();
        let mut found: Vec<Option<usize>> = vec![None; targets.len()];
        let mut remaining = targets.len();
        // (parent node, action from the parent) per visited state.
        let mut nodes: Vec<(usize, Option<Action>)> = Vec::new();
        let mut seen = HashSet::new();
        let mut queue = VecDeque::new();
        for s in &init {
            if seen.insert(fingerprint(s)) {
                nodes.push((usize::MAX, None));
                queue.push_back((s.clone(), nodes.len() - 1));
            }
        }
        let mut actions = Vec::new();
        while let Some((s, node)) = queue.pop_front() {
            if remaining == 0 {
                break;
            }
            for (i, p) in targets.iter().enumerate() {
                if found[i].is_none() && discovers(p, &s) {
                    found[i] = Some(node);
                    remaining -= 1;
                }
            }
            actions.clear();
            self.collect_actions(&s, &mut actions);
            for &action in &actions {
                if let Some(next) = self.step(&s, action)
                    && seen.insert(fingerprint(&next))
                {
                    nodes.push((node, Some(action)));
                    queue.push_back((next, nodes.len() - 1));
                }
            }
        }
        found
            .into_iter()
            .map(|node| {
                let mut node = node?;
                let mut steps = Vec::new();
                while let (parent, Some(action)) = nodes[node] {
                    steps.push(action);
                    node = parent;
                }
                steps.reverse();
                Some(
                    Path::from_actions(self, init[0].clone(), &steps)
                        .expect("a witness replays from the initial state"),
                )
            })
            .collect()
    }

    /// A path rendered one readable line per step, starting with the
    /// initial state.
    pub fn render_path(&self, path: &Path<State, Action>) -> Vec<String> {
        let steps = path.clone().into_vec();
        let mut lines = Vec::with_capacity(steps.len() + 1);
        if let Some((first, _)) = steps.first() {
            lines.push(format!("start: {first}"));
        }
        for (state, action) in &steps {
            if let Some(action) = action {
                lines.push(self.describe(state, *action));
            }
        }
        if let Some((last, _)) = steps.last() {
            lines.push(format!("end: {last}"));
        }
        lines
    }
}

fn lease_words(s: &State) -> String {
    match s.row.owner {
        None => "no lease".to_owned(),
        Some(w) if s.lease_fresh() => format!("lease of {} fresh", Runner(w)),
        Some(w) => format!("lease of {} stale", Runner(w)),
    }
}

fn lease_words_tx(tx: &Tx) -> String {
    match tx.row.owner {
        None => "no lease".to_owned(),
        Some(w) if tx.lease_fresh => format!("lease of {} fresh", Runner(w)),
        Some(w) => format!("lease of {} stale", Runner(w)),
    }
}

fn rejection_words(kind: &RejectionKind) -> String {
    match kind {
        RejectionKind::LeaseLost { actual, .. } => {
            let owner = actual
                .map(|r| {
                    (0..WORKERS)
                        .find(|w| ConcurrencyModel::runner_id(*w) == r)
                        .map_or_else(|| r.to_string(), |w| Runner(w).to_string())
                })
                .unwrap_or_else(|| "nobody".to_owned());
            format!("LeaseLost: the chat's runner is {owner}")
        }
        other => match other.reason() {
            Some(reason) => format!("{}: {reason}", other.name()),
            None => other.name().to_owned(),
        },
    }
}

impl Model for ConcurrencyModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        // Right after CreateChat: R0, unowned, snapshot 1; its chat:update
        // has reached the receiver.
        vec![State {
            row: Row {
                state: ExecutionState::R0,
                owner: None,
                snapshot: 1,
            },
            lease_age: 0,
            exclusive: None,
            shared: 0,
            actors: [Actor::default(); MAX_ACTORS],
            hwm: 1,
            commits: 0,
            last_lost: false,
            crashes: 0,
            flags: Flags::default(),
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        self.collect_actions(state, actions);
    }

    fn next_state(&self, last_state: &State, action: Action) -> Option<State> {
        self.step(last_state, action)
    }

    fn format_action(&self, action: &Action) -> String {
        action.to_string()
    }

    fn format_step(&self, last_state: &State, action: Action) -> Option<String> {
        self.step(last_state, action)
            .map(|next| format!("{}\n{next}", self.describe(last_state, action)))
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut props = vec![
            Property::always(names::LOCKS, |_, s: &State| {
                let mut exclusive = 0;
                let mut shared = 0;
                for a in &s.actors {
                    match a.phase {
                        Phase::Held(Op::ReadLock) => shared += 1,
                        Phase::Held(_) | Phase::Locked(..) | Phase::Called(..) => exclusive += 1,
                        _ => {}
                    }
                }
                exclusive <= 1 && (exclusive == 0 || shared == 0)
            }),
            Property::always(names::SNAPSHOT, |_, s: &State| {
                let in_flight_ok = s.actors.iter().all(|a| match a.phase {
                    Phase::Locked(_, tx) | Phase::Called(_, tx, _) => {
                        tx.row.snapshot == s.row.snapshot + 1
                    }
                    _ => true,
                });
                !s.flags.has(Flags::SNAPSHOT_SKEW)
                    && u16::from(s.row.snapshot) == 1 + u16::from(s.commits)
                    && in_flight_ok
            }),
            Property::always(names::NOTIFY_AFTER_COMMIT, |_, s: &State| {
                !s.flags.has(Flags::EARLY_DELIVERY)
            }),
            Property::always(names::HWM_MONOTONE, |_, s: &State| {
                !s.flags.has(Flags::HWM_BACK) && s.hwm <= s.row.snapshot
            }),
            Property::always(names::HWM_CONVERGES, |_, s: &State| {
                let pending = s
                    .actors
                    .iter()
                    .any(|a| matches!(a.phase, Phase::Committed(_)));
                pending || s.hwm == s.row.snapshot || s.last_lost
            }),
            Property::always(names::HINT, |_, s: &State| {
                !s.flags.has(Flags::MISSING_HINT)
            }),
            Property::always(names::FENCE, |_, s: &State| {
                !s.flags.has(Flags::STALE_COMMIT)
            }),
            Property::always(names::RECOVERY, |m: &ConcurrencyModel, s: &State| {
                m.recovery_steps(s).is_some()
            }),
            Property::always(names::NOT_STRANDED, |m: &ConcurrencyModel, s: &State| {
                m.recovery_steps_within(s, STRANDED_AFTER).is_some()
            }),
            Property::sometimes(names::SHARED_READS, |_, s: &State| {
                s.shared.count_ones() >= 2
            }),
            Property::sometimes(names::FLUSH_RACE, |_, s: &State| {
                s.actors
                    .iter()
                    .filter(|a| matches!(a.phase, Phase::Committed(_)))
                    .count()
                    >= 2
            }),
            Property::sometimes(names::HINTED, |_, s: &State| {
                s.actors
                    .iter()
                    .any(|a| matches!(a.phase, Phase::Committed(b) if b.hint))
            }),
            Property::sometimes(names::TAKEOVER, |_, s: &State| {
                (0..WORKERS).any(|w| {
                    let a = s.actor(Who::Worker(w));
                    !a.crashed && a.holds && s.row.owner.is_some_and(|o| o != w)
                })
            }),
            Property::sometimes(names::STALE_CALLBACK, |_, s: &State| {
                (0..WORKERS).any(|w| {
                    let a = s.actor(Who::Worker(w));
                    matches!(a.phase, Phase::Locked(op, tx)
                        if op.is_fenceable() && tx.row.owner.is_some_and(|o| o != w))
                })
            }),
            Property::sometimes(names::LOST_FLUSH, |_, s: &State| s.last_lost),
            Property::sometimes(names::RECOVERY_TIGHT, |m: &ConcurrencyModel, s: &State| {
                m.recovery_steps(s) == Some(RECOVERY_BOUND)
            }),
        ];
        if !self.config.fenced {
            props.push(Property::sometimes(names::STALE_COMMITS, |_, s: &State| {
                s.flags.has(Flags::STALE_COMMIT)
            }));
        }
        props
    }
}

/// Checks one variant exhaustively (breadth first) and reports every
/// property, with a readable path for each discovery.
pub fn run_variant(fenced: bool, threads: usize) -> CheckReport {
    check(Config::new(fenced), threads)
}

/// Checks `config` exhaustively (breadth first) on `threads` threads.
///
/// `seconds` is the exhaustive check alone. The paths are then recomputed
/// as shortest witnesses (see [`ConcurrencyModel::shortest_witnesses`]),
/// because stateright keeps the last state it saw for a discovery, which
/// is rarely the clearest one.
pub fn check(config: Config, threads: usize) -> CheckReport {
    let model = ConcurrencyModel::new(config);
    let properties = model.properties();
    let start = Instant::now();
    let checker = model.clone().checker().threads(threads).spawn_bfs().join();
    let seconds = start.elapsed().as_secs_f64();
    let discoveries = checker.discoveries();
    let discovered: Vec<&Property<ConcurrencyModel>> = properties
        .iter()
        .filter(|p| discoveries.contains_key(p.name))
        .collect();
    let witnesses: HashMap<&str, Path<State, Action>> = discovered
        .iter()
        .zip(model.shortest_witnesses(&discovered))
        .map(|(p, path)| {
            let path = path.unwrap_or_else(|| panic!("no witness for {:?}", p.name));
            (p.name, path)
        })
        .collect();
    let properties = properties
        .iter()
        .map(|p| {
            let found = witnesses.get(p.name);
            let (expectation, holds) = match p.expectation {
                stateright::Expectation::Always => (Expectation::Always, found.is_none()),
                stateright::Expectation::Eventually => (Expectation::Eventually, found.is_none()),
                stateright::Expectation::Sometimes => (Expectation::Sometimes, found.is_some()),
            };
            PropertyVerdict {
                name: p.name.to_owned(),
                expectation,
                holds,
                path: found.map(|path| model.render_path(path)),
            }
        })
        .collect();
    CheckReport {
        model: model.name(),
        unique_states: checker.unique_state_count(),
        max_depth: checker.max_depth(),
        seconds,
        threads,
        properties,
    }
}

/// The fenced model: every property must hold.
pub fn run(threads: usize) -> CheckReport {
    run_variant(true, threads)
}

/// The model with fencing off: [`names::STALE_COMMITS`] must be found (and
/// [`names::FENCE`] fails with a counterexample).
pub fn run_unfenced(threads: usize) -> CheckReport {
    run_variant(false, threads)
}

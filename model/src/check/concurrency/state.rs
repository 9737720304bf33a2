//! The model's state: the actors, the abstract row, an open transaction,
//! the buffered notifications, each actor's phase, the monitor flags and
//! the whole system's [`State`], each with its readable rendering.

use std::fmt;

use super::{MAX_ACTORS, MAX_CLIENTS, STALE_AFTER};
use crate::{ExecutionState, Transition};

/// An actor of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Who {
    /// Client number n (0-based; shown 1-based).
    Client(u8),
    /// Worker number n (0-based; shown 1-based).
    Worker(u8),
}

impl Who {
    pub(super) fn index(self) -> usize {
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
pub(super) struct Runner(pub(super) u8);

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
    pub(super) const SNAPSHOT_SKEW: u8 = 1;
    pub(super) const EARLY_DELIVERY: u8 = 1 << 1;
    pub(super) const HWM_BACK: u8 = 1 << 2;
    pub(super) const MISSING_HINT: u8 = 1 << 3;
    pub(super) const STALE_COMMIT: u8 = 1 << 4;

    pub(super) fn set(&mut self, bit: u8) {
        self.0 |= bit;
    }

    pub(super) fn has(self, bit: u8) -> bool {
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
    pub(super) fn actor(&self, who: Who) -> &Actor {
        &self.actors[who.index()]
    }

    pub(super) fn actor_mut(&mut self, who: Who) -> &mut Actor {
        &mut self.actors[who.index()]
    }

    /// True if the committed lease is held and its heartbeat is fresh.
    pub fn lease_fresh(&self) -> bool {
        self.row.owner.is_some() && self.lease_age < STALE_AFTER
    }

    /// True if the chat is runnable and owned with a fresh lease, or not
    /// runnable at all (the goal of [`names::RECOVERY`](super::names::RECOVERY)).
    pub fn settled(&self) -> bool {
        !self.row.state.is_runnable() || self.lease_fresh()
    }

    pub(super) fn release(&mut self, who: Who) {
        if self.exclusive == Some(who) {
            self.exclusive = None;
        }
        self.shared &= !(1 << who.index());
    }

    pub(super) fn canonicalize(&mut self) {
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

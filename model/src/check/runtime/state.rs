//! The runtime model's states and steps: the chat row as the store holds
//! it, each worker's runtime (claim loop, handler, heartbeat task), the
//! client, and the clock.

use std::fmt;

use crate::ExecutionState;

/// Clock ticks after which a heartbeat is stale.
pub const STALE_AFTER: u8 = 2;

/// The most workers a [`super::Config`] may ask for.
pub const MAX_WORKERS: usize = 3;

/// The abstract chat row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Row {
    /// Execution state.
    pub state: ExecutionState,
    /// The worker whose runner holds the lease.
    pub owner: Option<u8>,
}

/// Whether a worker process runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Status {
    /// Running: claims, heartbeats, handles.
    #[default]
    Live,
    /// Shutting down gracefully: claims nothing, finishes or hands back
    /// what it holds, then stops.
    Stopping,
    /// Crashed: does nothing ever again.
    Crashed,
}

/// What a worker's runtime is doing with the chat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Task {
    /// Not holding the chat; the claim loop waits for a hint or a sweep.
    #[default]
    Idle,
    /// A hint or a sweep named the chat; `try_acquire` waits for the row lock.
    Wants,
    /// `try_acquire` holds the row lock; `fresh` is the lease freshness it
    /// read at store time.
    Claiming {
        /// The lease was fresh at store time.
        fresh: bool,
    },
    /// The handler runs, believing it holds the lease. `current`: the
    /// history its next step was generated from is the chat's history now
    /// (ghost; the runtime only knows the version it read).
    Running {
        /// The generation base is the current history.
        current: bool,
    },
    /// The handler ended (or the worker is shutting down): the runtime
    /// hands the chat back with a fenced Abandon.
    Releasing,
}

impl Task {
    /// True while the runtime believes it holds the lease.
    pub const fn holds(self) -> bool {
        matches!(self, Task::Running { .. } | Task::Releasing)
    }
}

/// One worker process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Worker {
    /// Running, shutting down, or crashed.
    pub status: Status,
    /// What it does with the chat.
    pub task: Task,
    /// A hint for the chat reached this worker and waits to be read.
    pub inbox: bool,
    /// A committed Update of this worker waits to flush its hint.
    pub flush: bool,
}

impl Worker {
    /// True for a worker that runs and claims (not crashed, not stopping).
    pub fn live(&self) -> bool {
        self.status == Status::Live
    }

    /// True for a worker that will never act again.
    pub fn gone(&self) -> bool {
        match self.status {
            Status::Live => false,
            Status::Crashed => true,
            Status::Stopping => self.task == Task::Idle && !self.flush,
        }
    }
}

/// Monitor flags: set by a step that observes a violation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(pub(super) u8);

impl Flags {
    /// A worker committed a worker transition without being the chat's runner.
    pub const STALE_COMMIT: u8 = 1;
    /// A losing claim committed (bumped and published).
    pub const LOUD_LOSS: u8 = 1 << 1;
    /// A claim took over a fresh lease.
    pub const STEAL: u8 = 1 << 2;
    /// A reply generated from an old history was committed.
    pub const STALE_REPLY: u8 = 1 << 3;

    pub(super) fn set(&mut self, bit: u8) {
        self.0 |= bit;
    }

    /// True if `bit` is set.
    pub fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

impl fmt::Display for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (Self::STALE_COMMIT, "stale runner committed"),
            (Self::LOUD_LOSS, "losing claim bumped"),
            (Self::STEAL, "fresh lease taken over"),
            (Self::STALE_REPLY, "stale reply committed"),
        ];
        let set: Vec<&str> = names
            .iter()
            .filter(|(bit, _)| self.has(*bit))
            .map(|(_, name)| *name)
            .collect();
        f.write_str(&set.join(", "))
    }
}

/// A state of the whole system. Its `Debug` is its readable `Display`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct State {
    /// The committed row.
    pub row: Row,
    /// Age in ticks of the owner's heartbeat, capped at [`STALE_AFTER`]
    /// (0 when unowned).
    pub lease_age: u8,
    /// The worker whose `try_acquire` holds the row lock. Every other
    /// Update is one step, so only a claim holds the lock across steps.
    pub lock: Option<u8>,
    /// The number of workers taking part (the first `n` of `workers`).
    pub n: u8,
    /// The workers.
    pub workers: [Worker; MAX_WORKERS],
    /// Client Updates left.
    pub client_left: u8,
    /// The client's committed Update waits to flush its hint.
    pub client_flush: bool,
    /// Ghost: a shutting-down worker handed the chat back runnable, and
    /// nobody has acquired it since.
    pub handed_back: bool,
    /// Monitor flags.
    pub flags: Flags,
}

impl State {
    /// True if the chat is owned and its heartbeat is fresh.
    pub fn lease_fresh(&self) -> bool {
        self.row.owner.is_some() && self.lease_age < STALE_AFTER
    }

    /// The worker `w`.
    pub fn worker(&self, w: u8) -> &Worker {
        &self.workers[usize::from(w)]
    }

    pub(super) fn worker_mut(&mut self, w: u8) -> &mut Worker {
        &mut self.workers[usize::from(w)]
    }

    pub(super) fn canonicalize(&mut self) {
        if self.row.owner.is_none() {
            self.lease_age = 0;
        }
        for w in &mut self.workers {
            if w.status == Status::Crashed {
                *w = Worker {
                    status: Status::Crashed,
                    ..Worker::default()
                };
            } else if w.status == Status::Stopping {
                w.inbox = false;
            }
        }
    }
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A runner, shown as `r1`, `r2`: worker `wN` claims with runner `rN`.
pub(super) struct Runner(pub u8);

impl fmt::Display for Runner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0 + 1)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chat {} ", self.row.state)?;
        match self.row.owner {
            Some(w) if self.lease_fresh() => write!(
                f,
                "owned by w{}/{} (heartbeat {} old, fresh)",
                w + 1,
                Runner(w),
                self.lease_age
            )?,
            Some(w) => write!(f, "owned by w{}/{} (heartbeat stale)", w + 1, Runner(w))?,
            None => f.write_str("unowned")?,
        }
        if let Some(w) = self.lock {
            write!(f, "; row locked by w{}", w + 1)?;
        }
        write!(f, "; client: {} Updates left", self.client_left)?;
        if self.client_flush {
            f.write_str(", hint to flush")?;
        }
        for (i, w) in self.workers.iter().enumerate() {
            if i >= usize::from(self.n) {
                break;
            }
            write!(f, "; w{}: ", i + 1)?;
            match w.status {
                Status::Crashed => {
                    f.write_str("crashed")?;
                    continue;
                }
                Status::Stopping if w.gone() => {
                    f.write_str("stopped")?;
                    continue;
                }
                Status::Stopping => f.write_str("stopping, ")?,
                Status::Live => {}
            }
            match w.task {
                Task::Idle => f.write_str("idle")?,
                Task::Wants => f.write_str("wants to claim")?,
                Task::Claiming { fresh } => write!(
                    f,
                    "claiming under the lock (read lease {})",
                    if fresh { "fresh" } else { "missing/stale" }
                )?,
                Task::Running { current: true } => f.write_str("handler runs")?,
                Task::Running { current: false } => {
                    f.write_str("handler runs on an old history")?
                }
                Task::Releasing => f.write_str("handing back")?,
            }
            if w.inbox {
                f.write_str(", hint in inbox")?;
            }
            if w.flush {
                f.write_str(", hint to flush")?;
            }
        }
        if self.handed_back {
            f.write_str("; handed back")?;
        }
        if self.flags != Flags::default() {
            write!(f, "; VIOLATION: {}", self.flags)?;
        }
        Ok(())
    }
}

/// What a handler commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Work {
    /// A generated step (CommitStep).
    Step,
    /// The end of the turn (FinishTurn, or FinishInterruption when the
    /// chat was interrupted).
    Finish,
}

/// A client operation (one Update).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientOp {
    /// SendMessage (busy behaviour: queue).
    Send,
    /// EditMessage of the first user message (keeps the owner).
    Edit,
    /// Interrupt.
    Interrupt,
}

impl fmt::Display for ClientOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientOp::Send => "SendMessage",
            ClientOp::Edit => "EditMessage",
            ClientOp::Interrupt => "Interrupt",
        })
    }
}

/// One step of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// The client runs one Update (lock, callback, commit).
    Client(ClientOp),
    /// The client's buffer is flushed: its hint reaches every live worker.
    ClientFlush,
    /// The client dies before its flush: the hint is lost.
    ClientFlushLost,
    /// The worker's periodic sweep (`Store::claimable`, SKIP LOCKED).
    Sweep(u8),
    /// The worker reads a hint from its inbox.
    ReadHint(u8),
    /// `try_acquire` is granted the row lock and reads the lease.
    ClaimLock(u8),
    /// `try_acquire` decides under the lock: Acquire, or roll back.
    ClaimEnd(u8),
    /// The heartbeat task heartbeats the runner.
    Heartbeat(u8),
    /// The handler commits a fenced step with its history expectation.
    Work(u8, Work),
    /// A shutting-down worker's grace period ends: hand the chat back.
    GraceOver(u8),
    /// The runtime's fenced Abandon.
    Abandon(u8),
    /// The worker flushes its committed Update's hint.
    Flush(u8),
    /// The worker crashes.
    Crash(u8),
    /// The worker begins a graceful shutdown.
    Shutdown(u8),
    /// The clock advances.
    Tick,
}

impl Action {
    /// The fairness class of the step: a step of a class that stays
    /// enabled is eventually taken. Clients, crashes, shutdowns and lost
    /// hints are not fair: they may never happen.
    pub fn fairness(self) -> Option<usize> {
        let per_worker = |w: u8, k: usize| Some(1 + usize::from(w) * 7 + k);
        match self {
            Action::Client(_)
            | Action::ClientFlushLost
            | Action::Crash(_)
            | Action::Shutdown(_) => None,
            Action::ClientFlush => Some(0),
            Action::Sweep(w) => per_worker(w, 0),
            Action::ReadHint(w) => per_worker(w, 1),
            Action::ClaimLock(w) | Action::ClaimEnd(w) => per_worker(w, 2),
            Action::Heartbeat(w) => per_worker(w, 3),
            Action::Work(w, _) | Action::Abandon(w) => per_worker(w, 4),
            Action::Flush(w) => per_worker(w, 5),
            Action::GraceOver(w) => per_worker(w, 6),
            Action::Tick => Some(1 + MAX_WORKERS * 7),
        }
    }

    /// True for the classes that are strongly fair: the steps that wait
    /// for the row lock (a claim's lock, a handler step, Abandon). The
    /// model enables a waiting request only while the lock is free, which
    /// under weak fairness would let other workers' claims starve it;
    /// Postgres grants row locks to waiters in queue order, so a waiter
    /// whose lock is released again and again is granted.
    pub const fn is_strong(class: usize) -> bool {
        class >= 1 && class < 1 + MAX_WORKERS * 7 && matches!((class - 1) % 7, 2 | 4)
    }

    /// The number of fairness classes.
    pub const FAIRNESS_CLASSES: usize = 2 + MAX_WORKERS * 7;
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Action::Client(op) => write!(f, "client runs {op}"),
            Action::ClientFlush => f.write_str("client flushes"),
            Action::ClientFlushLost => f.write_str("client dies before its flush"),
            Action::Sweep(w) => write!(f, "w{} sweeps", w + 1),
            Action::ReadHint(w) => write!(f, "w{} reads a hint", w + 1),
            Action::ClaimLock(w) => write!(f, "w{} try_acquire locks the row", w + 1),
            Action::ClaimEnd(w) => write!(f, "w{} try_acquire decides", w + 1),
            Action::Heartbeat(w) => write!(f, "w{} heartbeats", w + 1),
            Action::Work(w, Work::Step) => write!(f, "w{} commits a step", w + 1),
            Action::Work(w, Work::Finish) => write!(f, "w{} finishes the turn", w + 1),
            Action::GraceOver(w) => write!(f, "w{} grace period ends", w + 1),
            Action::Abandon(w) => write!(f, "w{} abandons", w + 1),
            Action::Flush(w) => write!(f, "w{} flushes", w + 1),
            Action::Crash(w) => write!(f, "w{} crashes", w + 1),
            Action::Shutdown(w) => write!(f, "w{} begins a graceful shutdown", w + 1),
            Action::Tick => f.write_str("the clock ticks"),
        }
    }
}

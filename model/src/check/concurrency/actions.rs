//! The model's steps: which [`Action`]s are enabled in a state, and the
//! state each one leads to.

use std::fmt;

use super::callback::CallbackOutcome;
use super::state::{Actor, Flags, Op, Phase, Row, State, Tx, Who};
use super::{ConcurrencyModel, STALE_AFTER};
use crate::{RejectionKind, Transition};

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
impl ConcurrencyModel {
    fn lock_free_for(s: &State, op: Op) -> bool {
        match op {
            Op::ReadLock => s.exclusive.is_none(),
            _ => s.exclusive.is_none() && s.shared == 0,
        }
    }

    /// True while new Updates may start (the commit budget is not spent).
    /// Both counters are consulted, so that a model with a broken bump
    /// still has a finite state space and fails [`names::SNAPSHOT`](super::names::SNAPSHOT).
    fn may_update(&self, s: &State) -> bool {
        s.commits < self.config.max_commits && s.row.snapshot <= self.config.max_commits
    }

    /// The acquisition scan's condition, read from the committed row
    /// without a lock: runnable, and no fresh lease.
    fn candidate(s: &State) -> bool {
        s.row.state.is_runnable() && !s.lease_fresh()
    }

    pub(super) fn collect_actions(&self, s: &State, out: &mut Vec<Action>) {
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

    pub(super) fn step(&self, s: &State, action: Action) -> Option<State> {
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
}

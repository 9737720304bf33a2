//! The model's properties: their names, their conditions, and the bounded
//! recovery protocol the liveness properties run from every state.

use stateright::Property;

use super::state::{Flags, Op, Phase, State, Who};
use super::{Action, ConcurrencyModel, RECOVERY_BOUND, STRANDED_AFTER, WORKERS};

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
impl ConcurrencyModel {
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

    /// Every property the model is checked against (see the module docs).
    pub(super) fn property_list(&self) -> Vec<Property<Self>> {
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

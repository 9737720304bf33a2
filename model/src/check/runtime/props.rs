//! The runtime model's properties: safety (`always`), non-vacuity
//! (`sometimes`) and liveness (leads-to under fairness).

use super::graph::Pred;
use super::model::RuntimeModel;
use super::state::{Flags, State, Status, Task};

/// The names of the model's properties.
pub mod names {
    /// (a) Mutual exclusion of worker commits.
    pub const MUTEX: &str = "only the chat's runner commits worker transitions: once another runner \
                             acquired the chat, the old one never commits again";
    /// (c) Quiet losing claims.
    pub const QUIET_LOSS: &str =
        "a claim that loses leaves snapshot_version unchanged and publishes nothing";
    /// Claims take only missing or stale leases.
    pub const NO_STEAL: &str = "a claim never takes over a fresh lease";
    /// (e) The history expectation.
    pub const NO_STALE_REPLY: &str =
        "no step generated from an old history is committed after the history changed";
    /// (b) Recovery, as leads-to under fairness.
    pub const RECOVERY: &str = "a runnable chat with a live worker is eventually owned by a live \
                                worker holding a fresh lease (fair runs)";
    /// (d) Hand-back, as leads-to under fairness.
    pub const HANDED_BACK: &str = "a chat handed back at shutdown is eventually re-owned by a live \
                                   worker, if one lives (fair runs)";
    /// Non-vacuity: two claims race.
    pub const CLAIM_RACE: &str = "a worker claims under the lock while another waits to claim";
    /// Non-vacuity: a sweep skips a locked row.
    pub const SKIPPED: &str = "a sweep-eligible worker sees the chat locked by another's claim";
    /// Non-vacuity: only the sweeper can rescue the chat.
    pub const HINT_LOST: &str =
        "a runnable chat needs an owner and no hint for it is on its way to anyone";
    /// Non-vacuity: a worker believes it holds a lease taken over.
    pub const TAKEOVER: &str = "a live worker's handler runs on a lease another runner took over";
    /// Non-vacuity: an edit lands between generation and commit.
    pub const STALE_GENERATION: &str = "a handler holds a step generated from an old history";
    /// Non-vacuity: the owner crashes before heartbeating.
    pub const CRASHED_OWNER: &str = "the chat is owned by a crashed worker's runner";
    /// Non-vacuity: a chat is handed back at shutdown.
    pub const HAND_BACK: &str = "a shutting-down worker handed the runnable chat back";
}

/// An `always` or `sometimes` property.
pub(super) struct StateProperty {
    pub(super) name: &'static str,
    pub(super) always: bool,
    pub(super) pred: Pred,
}

/// A leads-to property: every `p` state is followed, on every fair path,
/// by a `g` state.
pub(super) struct LeadsTo {
    pub(super) name: &'static str,
    pub(super) p: Pred,
    pub(super) g: Pred,
}

/// True if some configured worker is live.
fn any_live(m: &RuntimeModel, s: &State) -> bool {
    m.workers().any(|w| s.worker(w).live())
}

/// The goal of recovery: the chat needs nobody, nobody live could take
/// it, or a live worker owns it with a fresh lease and knows it.
fn settled(m: &RuntimeModel, s: &State) -> bool {
    !s.row.state.is_runnable()
        || !any_live(m, s)
        || s.row.owner.is_some_and(|w| {
            let wk = s.worker(w);
            wk.live() && wk.task.holds() && s.lease_fresh()
        })
}

pub(super) fn state_properties() -> Vec<StateProperty> {
    let always = |name, pred| StateProperty {
        name,
        always: true,
        pred,
    };
    let sometimes = |name, pred| StateProperty {
        name,
        always: false,
        pred,
    };
    vec![
        always(names::MUTEX, |_, s| !s.flags.has(Flags::STALE_COMMIT)),
        always(names::QUIET_LOSS, |_, s| !s.flags.has(Flags::LOUD_LOSS)),
        always(names::NO_STEAL, |_, s| !s.flags.has(Flags::STEAL)),
        always(names::NO_STALE_REPLY, |_, s| {
            !s.flags.has(Flags::STALE_REPLY)
        }),
        sometimes(names::CLAIM_RACE, |m, s| {
            s.lock.is_some() && m.workers().any(|w| s.worker(w).task == Task::Wants)
        }),
        sometimes(names::SKIPPED, |m, s| {
            s.lock.is_some()
                && s.row.state.is_runnable()
                && !s.lease_fresh()
                && m.workers().any(|w| {
                    let wk = s.worker(w);
                    wk.live() && wk.task == Task::Idle && !wk.flush
                })
        }),
        sometimes(names::HINT_LOST, |m, s| {
            s.row.state.is_runnable()
                && s.row.owner.is_none()
                && !s.client_flush
                && s.lock.is_none()
                && any_live(m, s)
                && m.workers().all(|w| {
                    let wk = s.worker(w);
                    !wk.inbox && !wk.flush && wk.task == Task::Idle
                })
        }),
        sometimes(names::TAKEOVER, |m, s| {
            m.workers().any(|w| {
                let wk = s.worker(w);
                wk.live()
                    && matches!(wk.task, Task::Running { .. })
                    && s.row.owner.is_some_and(|o| o != w)
            })
        }),
        sometimes(names::STALE_GENERATION, |m, s| {
            m.workers()
                .any(|w| s.worker(w).task == Task::Running { current: false })
        }),
        sometimes(names::CRASHED_OWNER, |_, s| {
            s.row
                .owner
                .is_some_and(|w| s.worker(w).status == Status::Crashed)
        }),
        sometimes(names::HAND_BACK, |_, s| s.handed_back),
    ]
}

pub(super) fn liveness_properties() -> Vec<LeadsTo> {
    vec![
        LeadsTo {
            name: names::RECOVERY,
            p: |m, s| !settled(m, s),
            g: settled,
        },
        LeadsTo {
            name: names::HANDED_BACK,
            p: |_, s| s.handed_back,
            g: settled,
        },
    ]
}

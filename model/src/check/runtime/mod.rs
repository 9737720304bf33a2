//! The runtime model: several worker runtimes, a client, a clock and the
//! store around one chat, checked exhaustively with the protocol the
//! worker runtime runs on top of the primitives (`try_acquire`, heartbeats
//! that report the lease status, `Store::claimable` with SKIP LOCKED,
//! fenced steps with a history expectation, Abandon at shutdown).
//!
//! [`concurrency`](super::concurrency) checks the machinery inside an
//! Update (row locks, the bump, publication after commit, fencing); this
//! model takes that machinery as given and checks the protocol a worker
//! builds from it.
//!
//! # Actors and steps
//!
//! - **Workers** `w1`..`w3` (a [`Config`] picks 2 or 3), each a runtime
//!   with a claim loop, a heartbeat task and a handler for the chat:
//!   - the claim loop learns of the chat from a **hint** in its inbox or
//!     from its periodic **sweep** (`Store::claimable`: runnable, lease
//!     missing or stale; a row locked by another transaction is skipped,
//!     not waited for: SKIP LOCKED), then runs `try_acquire`: the row lock
//!     (store time: the lease is read), then the check under the lock
//!     (runnable, lease missing or stale) and Acquire, or a quiet rollback
//!     (no bump, nothing published);
//!   - the handler commits fenced steps (CommitStep, FinishTurn, or
//!     FinishInterruption after an Interrupt) with the history expectation
//!     of the version it generated from; HistoryChanged makes it
//!     regenerate from the new history; LeaseLost stops it; when the chat
//!     stops being runnable it hands the chat back with a fenced Abandon;
//!   - the heartbeat task heartbeats the runner; `Lost` stops the handler;
//!   - a graceful shutdown stops claiming (a claim under way rolls back),
//!     lets the handler go on for a grace period, then hands the chat back
//!     (Abandon, whose hint goes out to the other workers) and stops;
//!   - a worker may crash at any point (up to [`Config::max_crashes`]):
//!     its claim rolls back, its unflushed hint is lost, it never
//!     heartbeats again.
//! - **The client** runs SendMessage (queue), EditMessage (which keeps the
//!   owner: R0 -> R0, the case the history expectation exists for) and,
//!   optionally, Interrupt; [`Config::client_updates`] of them in all. It
//!   may die between commit and flush, losing its hint.
//! - **The clock** ticks; a heartbeat is stale [`STALE_AFTER`] ticks after
//!   it was written.
//! - **Hints** are published after commit by the Update that leaves the
//!   chat runnable without a fresh lease (the real `after_update`
//!   condition) and reach the inbox of every live worker when flushed.
//!
//! # Abstraction
//!
//! One chat. Claimable's scan and the hint filter decide per row, so a
//! second chat adds interleavings of independent rows and nothing that
//! crosses them (capacity limits are left out). Every transition is
//! decided by the real [`decide`](crate::decide) on a real snapshot built
//! from the abstract row (state, owner, lease freshness), fenced with the
//! worker's runner as `Tx::fenced` does.
//!
//! Simplifications, each on purpose:
//! - Every Update but a claim is one step (lock, callback, commit), and its
//!   flush another. The steps inside an Update are the concurrency model's
//!   subject; here only the windows the runtime sees matter: between
//!   commit and flush (a crash loses the hint), and between a claim's lock
//!   and its decision (a concurrent heartbeat may still say `Held`).
//! - Versions are not counted, so worker loops (claim, step, hand back,
//!   claim again) close cycles instead of growing the state. A handler
//!   remembers only whether the history it generated from is the current
//!   one; its expectation names the chat's `history_version` or the one
//!   before, which is all `decide` compares. A losing claim's bump is
//!   observed at its end (it rolls back, or in the broken variant
//!   commits).
//! - A worker claims with one runner id (`w1` with `r1`) and at most one
//!   claim or handler for the chat at a time: the runtime dedupes a chat
//!   it holds or claims, so a re-claim starts only after the handler ended.
//!
//! # Properties
//!
//! Safety, in every reachable state (monitor flags set by the step that
//! observes a violation): [`names::MUTEX`] (a), [`names::QUIET_LOSS`] (c),
//! [`names::NO_STEAL`], [`names::NO_STALE_REPLY`] (e).
//!
//! Liveness, as leads-to under fairness over the explored graph (an SCC
//! pass over the strongly connected components): [`names::RECOVERY`] (b) and [`names::HANDED_BACK`]
//! (d). Every worker step is weakly fair (a step that stays enabled is
//! taken: sweeps, hint reads, claims, heartbeats, handler steps, flushes,
//! the end of a grace period), and so is the clock; the steps that wait for
//! the row lock are strongly fair (see [`Action::is_strong`]: Postgres
//! queues lock waiters, so a waiter is not starved by later claims); the
//! client, crashes, shutdowns and lost hints are not fair at all, so a run
//! may stop in any state where only they could act.
//!
//! `sometimes` properties show the model is not vacuous (claims race,
//! sweeps skip a locked row, hints get lost, leases are taken over, edits
//! land under a handler, owners crash, chats are handed back).
//!
//! # Broken variants
//!
//! [`Variant`] names each, with the property that catches it:
//! no history expectation breaks (e); loud claims (a losing claim commits
//! its Update) break (c); blind claims (no re-check under the lock) break
//! [`names::NO_STEAL`]; no sweeper breaks (b): a lost hint strands the
//! chat.

mod graph;
mod model;
mod props;
mod state;

use std::time::Instant;

use stateright::{Checker, Model, Property};

pub use model::{QUEUE_CAP, RuntimeModel};
pub use props::names;
pub use state::{
    Action, ClientOp, Flags, MAX_WORKERS, Row, STALE_AFTER, State, Status, Task, Work, Worker,
};

use super::{CheckReport, Expectation, PropertyVerdict};
use graph::Graph;

/// Which protocol the workers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The runtime's protocol.
    Runtime,
    /// Handlers commit without the history expectation.
    NoHistoryExpectation,
    /// A losing claim commits its Update (bump and empty chat:update)
    /// instead of rolling back.
    LoudClaims,
    /// `try_acquire` trusts the hint or sweep and acquires without the
    /// check under the lock (an unconditional takeover).
    BlindClaims,
    /// No periodic sweep: hints are the only source of work.
    NoSweep,
}

impl Variant {
    fn model_name(self, workers: u8) -> &'static str {
        match self {
            Variant::Runtime if workers == 3 => "runtime (three workers)",
            Variant::Runtime => "runtime",
            Variant::NoHistoryExpectation => "runtime (no history expectation)",
            Variant::LoudClaims => "runtime (loud losing claims)",
            Variant::BlindClaims => "runtime (claims without the check under the lock)",
            Variant::NoSweep => "runtime (no sweeper)",
        }
    }
}

/// The bounds and the variant of one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    /// The protocol.
    pub variant: Variant,
    /// Workers, 2 to [`MAX_WORKERS`].
    pub workers: u8,
    /// Client Updates in one run.
    pub client_updates: u8,
    /// Whether the client may Interrupt.
    pub interrupts: bool,
    /// Worker crashes in one run.
    pub max_crashes: u8,
    /// Graceful shutdowns in one run.
    pub max_shutdowns: u8,
}

impl Config {
    /// The checked configuration of `variant`: two workers, three client
    /// Updates with Interrupt among them, one crash, one graceful shutdown.
    pub const fn new(variant: Variant) -> Self {
        Config {
            variant,
            workers: 2,
            client_updates: 3,
            interrupts: true,
            max_crashes: 1,
            max_shutdowns: 1,
        }
    }

    /// Three workers (one may crash and one shut down while the third
    /// lives), with a smaller client: two Updates, no Interrupt.
    pub const fn three_workers(variant: Variant) -> Self {
        Config {
            variant,
            workers: 3,
            client_updates: 2,
            interrupts: false,
            max_crashes: 1,
            max_shutdowns: 1,
        }
    }
}

impl Model for RuntimeModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![self.init()]
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

    fn properties(&self) -> Vec<Property<Self>> {
        props::state_properties()
            .into_iter()
            .map(|p| {
                if p.always {
                    Property::always(p.name, p.pred)
                } else {
                    Property::sometimes(p.name, p.pred)
                }
            })
            .collect()
    }
}

/// Checks the runtime's protocol with two workers (every property must
/// hold).
pub fn run(threads: usize) -> CheckReport {
    check(Config::new(Variant::Runtime), threads)
}

/// Checks the runtime's protocol with three workers (every property must
/// hold).
pub fn run_three_workers(threads: usize) -> CheckReport {
    check(Config::three_workers(Variant::Runtime), threads)
}

/// Checks `config` exhaustively.
///
/// First stateright's breadth-first search on `threads` threads (states,
/// depth, the `always` and `sometimes` verdicts), then one pass over the
/// explicit state graph, which yields the shortest witness of every
/// discovery and decides the leads-to properties. `seconds` covers both.
pub fn check(config: Config, threads: usize) -> CheckReport {
    let model = RuntimeModel::new(config);
    let start = Instant::now();
    let checker = model.clone().checker().threads(threads).spawn_bfs().join();
    let graph = Graph::explore(&model);
    assert_eq!(
        graph.states.len(),
        checker.unique_state_count(),
        "the explicit graph and stateright explore the same states"
    );
    let discoveries = checker.discoveries();
    let mut properties = Vec::new();
    for p in props::state_properties() {
        let found = if p.always {
            graph.first(&model, |m, s| !(p.pred)(m, s))
        } else {
            graph.first(&model, p.pred)
        };
        assert_eq!(
            found.is_some(),
            discoveries.contains_key(p.name),
            "stateright and the graph agree on {:?}",
            p.name
        );
        properties.push(PropertyVerdict {
            name: p.name.to_owned(),
            expectation: if p.always {
                Expectation::Always
            } else {
                Expectation::Sometimes
            },
            holds: found.is_some() != p.always,
            path: found.map(|i| render(&model, &graph, &graph.path_to(i), i)),
        });
    }
    for p in props::liveness_properties() {
        let lasso = graph.leads_to(&model, p.p, p.g);
        properties.push(PropertyVerdict {
            name: p.name.to_owned(),
            expectation: Expectation::Eventually,
            holds: lasso.is_none(),
            path: lasso.map(|l| render_lasso(&model, &graph, &l)),
        });
    }
    let seconds = start.elapsed().as_secs_f64();
    CheckReport {
        model: model.name(),
        unique_states: checker.unique_state_count(),
        max_depth: checker.max_depth(),
        seconds,
        threads,
        properties,
    }
}

fn render(model: &RuntimeModel, g: &Graph, steps: &[(usize, Action)], end: usize) -> Vec<String> {
    let mut lines = vec![format!("start: {}", g.states[0])];
    for &(from, action) in steps {
        lines.push(describe(model, &g.states[from], action));
    }
    lines.push(format!("end: {}", g.states[end]));
    lines
}

fn render_lasso(model: &RuntimeModel, g: &Graph, l: &graph::Lasso) -> Vec<String> {
    let mut lines = vec![format!("start: {}", g.states[0])];
    for &(from, action, _) in &l.prefix {
        lines.push(describe(model, &g.states[from], action));
    }
    let end = l.prefix.last().map_or(0, |&(_, _, to)| to);
    lines.push(format!("then: {}", g.states[end]));
    if l.cycle.is_empty() {
        lines.push(
            "and no worker step, flush or tick is enabled: the run may stay here forever"
                .to_owned(),
        );
    } else {
        lines.push(
            "and the run may cycle here forever, fairly, never reaching the goal; one way round:"
                .to_owned(),
        );
        for &(from, action, _) in &l.cycle {
            lines.push(format!("  {}", describe(model, &g.states[from], action)));
        }
    }
    lines
}

/// One readable line for a step from `before`.
pub fn describe(model: &RuntimeModel, before: &State, action: Action) -> String {
    describe::line(model, before, action)
}

mod describe;

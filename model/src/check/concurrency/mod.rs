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
//!   real [`Snapshot::needs_hint`](crate::Snapshot::needs_hint) before Acquire), heartbeat their runner,
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
//! version. Every transition is decided by the real [`decide`](crate::decide) on a real
//! [`Snapshot`](crate::Snapshot) built from that abstraction (with the queue capped at
//! [`QUEUE_CAP`], so SendMessage to a full queue is rejected with
//! MessageQueueFull and rolls back), moved on with the real
//! [`Snapshot::apply`](crate::Snapshot::apply), and announced with the real [`after_update`](crate::after_update); the
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
//!
//! # Layout
//!
//! This file holds the bounds, the [`Config`] and the stateright [`Model`]
//! impl; `state.rs` the state and its parts, `actions.rs` the steps,
//! `callback.rs` the glue to the real `decide`, `properties.rs` the
//! properties and the recovery protocol, `render.rs` the readable lines of
//! a path, and `report.rs` the check itself and its [`CheckReport`](super::CheckReport).

mod actions;
mod callback;
mod properties;
mod render;
mod report;
mod state;

use stateright::{Model, Property};

use crate::{ExecutionState, Options};

pub use actions::Action;
pub use properties::names;
pub use report::{check, run, run_unfenced, run_variant};
pub use state::{Actor, Buffer, Flags, Op, Phase, Row, State, Tx, Who};

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
        self.property_list()
    }
}

//! The lease guard: what a handler gets for a claimed chat.
//!
//! A [`Lease`] gives fenced Updates only: every worker transition it runs is
//! checked under the row lock against the runner that claimed the chat
//! (`LeaseLost` otherwise) and, by default, against the history version the
//! handler last read (`HistoryChanged` otherwise), so neither a worker that
//! lost its lease nor a step generated from an old history can commit.
//!
//! A heartbeat task starts with the lease and is aborted when the lease is
//! dropped, so a handler that panics or is cancelled leaks nothing: its
//! lease simply goes stale. Heartbeats report whether the runner still
//! holds the lease; when one finds it lost, or an Update fails with
//! `LeaseLost`, [`Lease::lost`] resolves so a long generation can stop
//! early, and a `warn` event says why (target `chatstate_worker`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatstate::{
    ChatId, ChatMachine, ChatRecord, Error, ExecutionState, Fenced, LeaseStatus, Owner,
    RejectionKind, RunnerId, Snapshot, Store, Versions,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::Instrument;

use crate::stats::{Counters, bump};

/// A claimed chat, held by one runner of this runtime.
///
/// Dropping it stops its heartbeat; it does not write anything (the runtime
/// releases the chat as the handler's [`Released`](crate::Released) says).
pub struct Lease<S: Store> {
    machine: ChatMachine<S>,
    owner: Owner,
    claimed: Snapshot,
    /// The history version fenced Updates expect (`None`: no check).
    history: Mutex<Option<i64>>,
    signal: Arc<LostSignal>,
    /// Set once a committed Update of this lease left the chat without our
    /// runner (the handler abandoned it itself).
    released: AtomicBool,
    stopping: CancellationToken,
    heartbeat: Mutex<Option<AbortOnDrop>>,
    heartbeat_stopped: watch::Receiver<()>,
    counters: Arc<Counters>,
    /// Counts this lease in the leases-held gauge while it lives.
    _held: Held,
}

/// One lease in the `chatstate_worker_leases_held` gauge, from its start
/// until it is dropped (nothing without the `metrics` feature).
#[derive(Debug)]
struct Held;

impl Held {
    fn new() -> Self {
        #[cfg(feature = "metrics")]
        metrics::gauge!("chatstate_worker_leases_held").increment(1.0);
        Held
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        metrics::gauge!("chatstate_worker_leases_held").decrement(1.0);
    }
}

impl<S: Store> std::fmt::Debug for Lease<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("chat_id", &self.chat_id())
            .field("owner", &self.owner)
            .field("expected_history", &self.expected_history())
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}

/// Resolves [`Lease::lost`] once, counting and reporting the loss once.
#[derive(Debug)]
struct LostSignal {
    token: CancellationToken,
    counted: AtomicBool,
    counters: Arc<Counters>,
    owner: Owner,
    chat: ChatId,
}

impl LostSignal {
    /// The lease is gone; `cause` says how this runner found out.
    fn lose(&self, cause: &'static str) {
        if !self.counted.swap(true, Ordering::SeqCst) {
            bump(&self.counters.leases_lost);
            tracing::warn!(
                target: "chatstate_worker",
                chat_id = %self.chat,
                worker_id = %self.owner.worker_id,
                runner_id = %self.owner.runner_id,
                cause,
                "lease lost"
            );
            #[cfg(feature = "metrics")]
            metrics::counter!("chatstate_worker_leases_lost_total").increment(1);
        }
        self.token.cancel();
    }
}

/// Aborts a task when dropped.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<S: Store> Lease<S> {
    /// Starts the lease of a won claim: the heartbeat task begins one
    /// interval after the claim (which wrote a fresh heartbeat itself).
    pub(crate) fn start(
        machine: ChatMachine<S>,
        owner: Owner,
        claimed: Snapshot,
        heartbeat_interval: Duration,
        stopping: CancellationToken,
        counters: Arc<Counters>,
    ) -> Self {
        let signal = Arc::new(LostSignal {
            token: CancellationToken::new(),
            counted: AtomicBool::new(false),
            counters: counters.clone(),
            owner,
            chat: machine.chat_id(),
        });
        let (alive, heartbeat_stopped) = watch::channel(());
        // In the span of whoever holds the lease (the runtime's lease span).
        let task = tokio::spawn(
            heartbeat(
                machine.clone(),
                owner.runner_id,
                heartbeat_interval,
                signal.clone(),
                counters.clone(),
                alive,
            )
            .in_current_span(),
        );
        Lease {
            history: Mutex::new(Some(claimed.row.versions.history)),
            machine,
            owner,
            claimed,
            signal,
            released: AtomicBool::new(false),
            stopping,
            heartbeat: Mutex::new(Some(AbortOnDrop(task))),
            heartbeat_stopped,
            counters,
            _held: Held::new(),
        }
    }

    /// The chat.
    pub fn chat_id(&self) -> ChatId {
        self.machine.chat_id()
    }

    /// The worker and runner holding the lease.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// The runner holding the lease.
    pub fn runner(&self) -> RunnerId {
        self.owner.runner_id
    }

    /// The snapshot as the claim committed it (owner = this runner).
    pub fn claimed(&self) -> &Snapshot {
        &self.claimed
    }

    /// The history version fenced Updates expect, if any.
    pub fn expected_history(&self) -> Option<i64> {
        *self.history.lock().expect("history expectation")
    }

    /// Sets (or, with `None`, drops) the history expectation.
    pub fn expect_history(&self, version: Option<i64>) {
        *self.history.lock().expect("history expectation") = version;
    }

    /// Reads the whole chat (a shared row lock; no bump) and makes its
    /// history version the expectation of later Updates, unless the
    /// expectation was dropped: this is the read a step is generated from.
    /// Finding another runner (or none) owning the chat resolves
    /// [`Lease::lost`].
    pub async fn load(&self) -> Result<ChatRecord, Error> {
        let record = match self.machine.load().await {
            Ok(record) => record,
            Err(e) => {
                self.learn(&e);
                return Err(e);
            }
        };
        if record.row.owner != Some(self.owner) && !self.is_released() {
            self.signal.lose("a load found another owner");
        }
        let mut history = self.history.lock().expect("history expectation");
        if history.is_some() {
            *history = Some(record.row.versions.history);
        }
        Ok(record)
    }

    /// Runs `f` in an Update with the worker transitions fenced by this
    /// lease's runner and, unless dropped, by the expected history version.
    ///
    /// A `LeaseLost` rejection (or a vanished chat) resolves
    /// [`Lease::lost`]. After a commit the expectation follows the lease's
    /// own history changes: if this Update wrote history, the expectation
    /// becomes the new version; a change by anyone else is never adopted
    /// silently, so the next fenced step fails with `HistoryChanged` until
    /// the handler reads the history again ([`Lease::load`]).
    pub async fn update<T>(
        &self,
        f: impl AsyncFnOnce(&mut Fenced<'_, '_, S>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let runner = self.owner.runner_id;
        let expected = self.expected_history();
        let mut committed: Option<(Versions, Option<Owner>)> = None;
        let result = self
            .machine
            .update(async |tx| {
                let value = {
                    let mut fenced = tx.fenced(runner);
                    if let Some(version) = expected {
                        fenced = fenced.expect_history(version);
                    }
                    f(&mut fenced).await?
                };
                let row = &tx.snapshot().row;
                committed = Some((row.versions, row.owner));
                Ok(value)
            })
            .await;
        match &result {
            Ok(_) => {}
            // Committed all the same: the versions are the committed ones.
            Err(e) if e.is_committed() => {}
            Err(e) => {
                self.learn(e);
                return result;
            }
        }
        if let Some((versions, owner)) = committed {
            self.after_commit(expected, versions, owner);
        }
        result
    }

    /// Moves the expectation past this lease's own commit, and notices an
    /// Abandon the handler committed itself.
    fn after_commit(&self, expected: Option<i64>, versions: Versions, owner: Option<Owner>) {
        if owner != Some(self.owner) {
            self.released.store(true, Ordering::SeqCst);
            self.stop_heartbeat();
        }
        // Under the row lock our fenced steps checked the expectation, so a
        // history version equal to this Update's snapshot was written by us
        // after passing the check.
        if expected.is_some() && versions.history == versions.snapshot {
            self.expect_history(Some(versions.history));
        }
    }

    /// Resolves [`Lease::lost`] if `e` says the lease is gone.
    pub(crate) fn learn(&self, e: &Error) {
        let cause = match e {
            Error::ChatNotFound(_) => Some("the chat is gone"),
            e => matches!(
                e.rejection().map(|r| &r.kind),
                Some(RejectionKind::LeaseLost { .. })
            )
            .then_some("a fenced update was rejected with LeaseLost"),
        };
        if let Some(cause) = cause {
            self.signal.lose(cause);
        }
    }

    /// Resolves when the lease is known lost: a heartbeat found another
    /// runner (or none) owning the chat, or the chat gone, or a fenced
    /// Update failed with `LeaseLost`. A handler selects on it to stop a
    /// long generation early; committing after it resolved fails anyway.
    pub fn lost(&self) -> WaitForCancellationFuture<'_> {
        self.signal.token.cancelled()
    }

    /// True once [`Lease::lost`] has resolved.
    pub fn is_lost(&self) -> bool {
        self.signal.token.is_cancelled()
    }

    /// True once an Update of this lease committed an Abandon (the handler
    /// released the chat itself; the runtime then writes nothing more).
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    /// Resolves when the runtime is shutting down: the handler should
    /// finish or return [`Released::HandBack`](crate::Released::HandBack)
    /// within the grace period, after which the runtime aborts it and
    /// abandons the chat.
    pub fn stopping(&self) -> WaitForCancellationFuture<'_> {
        self.stopping.cancelled()
    }

    /// True once the runtime is shutting down.
    pub fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// A watch on this lease's heartbeat task, usable after the lease is
    /// gone: [`HeartbeatWatch::stopped`] resolves once the task has ended.
    pub fn heartbeat_watch(&self) -> HeartbeatWatch {
        HeartbeatWatch {
            rx: self.heartbeat_stopped.clone(),
        }
    }

    /// Stops the heartbeat task (before the runtime releases the chat, so
    /// that a heartbeat racing the Abandon cannot report a loss).
    pub(crate) fn stop_heartbeat(&self) {
        self.heartbeat.lock().expect("heartbeat handle").take();
    }

    /// Abandons the chat if this runner still holds it (fenced: a lost
    /// lease writes nothing) and returns the state it was left in.
    pub(crate) async fn abandon(&self) -> Result<ExecutionState, Error> {
        let runner = self.owner.runner_id;
        abandon(&self.machine, runner).await
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }
}

/// A fenced Abandon by `runner`: `LeaseLost` (nothing written) unless it
/// still holds the chat. Returns the state the chat was left in.
pub(crate) async fn abandon<S: Store>(
    machine: &ChatMachine<S>,
    runner: RunnerId,
) -> Result<ExecutionState, Error> {
    machine
        .update(async |tx| {
            tx.fenced(runner).abandon().await?;
            Ok(tx.state())
        })
        .await
}

/// Observes a lease's heartbeat task from outside.
#[derive(Clone, Debug)]
pub struct HeartbeatWatch {
    rx: watch::Receiver<()>,
}

impl HeartbeatWatch {
    /// Resolves once the heartbeat task has ended (the lease was dropped,
    /// its task aborted, or the lease found lost).
    pub async fn stopped(mut self) {
        // The sender lives in the task; `changed` fails once it is gone.
        while self.rx.changed().await.is_ok() {}
    }

    /// True once the heartbeat task has ended.
    pub fn is_stopped(&self) -> bool {
        self.rx.has_changed().is_err()
    }
}

/// The heartbeat task of one lease: refreshes the runner's heartbeat every
/// `interval` until it finds the lease lost or is aborted.
async fn heartbeat<S: Store>(
    machine: ChatMachine<S>,
    runner: RunnerId,
    interval: Duration,
    signal: Arc<LostSignal>,
    counters: Arc<Counters>,
    _alive: watch::Sender<()>,
) {
    let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
    // After a slow heartbeat, keep the spacing rather than bursting.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match machine.heartbeat(runner).await {
            Ok(LeaseStatus::Held) => bump(&counters.heartbeats),
            // Lost to another runner or to nobody, or the chat is gone.
            Ok(LeaseStatus::Lost { .. }) => {
                signal.lose("a heartbeat found another owner or none");
                return;
            }
            Ok(_) | Err(Error::ChatNotFound(_)) => {
                signal.lose("a heartbeat found the chat gone");
                return;
            }
            // A store failure: try again on the next tick. If the lease goes
            // stale meanwhile and someone takes it, the next heartbeat says
            // so, and fencing refuses our commits in the meantime.
            Err(_) => bump(&counters.heartbeat_errors),
        }
    }
}

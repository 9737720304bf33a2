//! What every task of a run shares: the store, the publisher that keeps
//! what was sent, the commit recorder, the stop signal, and the tally of
//! what the users' and handlers' Updates ran into.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chatstate::{
    BroadcastPublisher, ChatId, ChatMachine, CommitState, Error, Notification, Notify, Options,
    PublishError, Publisher, Store, Transition,
};
use chatstate_model::oracle::{CreatedChat, Published};
use rand::Rng;
use rand::rngs::StdRng;
use tokio::sync::{broadcast, watch};

use super::record::Recorder;
use super::{Args, Stop};

/// Publishes after commit: keeps every notification, as sent, by (chat,
/// snapshot) for the oracle, and passes everything on to the in-process
/// bus the worker runtimes take their ownership hints from.
pub(super) struct SimPublisher {
    seen: Mutex<HashMap<(ChatId, i64), Vec<Published>>>,
    hints: AtomicU64,
    bus: BroadcastPublisher,
}

impl SimPublisher {
    /// Room for this many notifications per lagging subscriber; a runtime
    /// further behind sweeps instead.
    const BUS_CAPACITY: usize = 4096;

    pub(super) fn new() -> Self {
        SimPublisher {
            seen: Mutex::new(HashMap::new()),
            hints: AtomicU64::new(0),
            bus: BroadcastPublisher::new(Self::BUS_CAPACITY),
        }
    }

    /// A runtime's hint source: everything published from now on.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<chatstate::Published> {
        self.bus.subscribe()
    }

    /// Ownership hints published so far.
    pub(super) fn hints(&self) -> u64 {
        self.hints.load(Ordering::Relaxed)
    }

    /// Everything published, by (chat, snapshot version).
    pub(super) fn take(&self) -> HashMap<(ChatId, i64), Vec<Published>> {
        std::mem::take(&mut *self.seen.lock().expect("publisher lock"))
    }
}

impl Publisher for SimPublisher {
    fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), PublishError> {
        let n = Notification::parse(channel, payload).map_err(|e| PublishError {
            channel: channel.to_owned(),
            source: Box::new(e),
        })?;
        if matches!(n, Notification::Ownership(_)) {
            self.hints.fetch_add(1, Ordering::Relaxed);
        }
        self.seen
            .lock()
            .expect("publisher lock")
            .entry((n.chat_id(), n.snapshot_version()))
            .or_default()
            .push(Published {
                channel: channel.to_owned(),
                payload: payload.to_vec(),
            });
        self.bus.publish(channel, payload)
    }
}

/// What the users' and handlers' Updates ran into (their commits are the
/// recorder's).
#[derive(Default)]
pub(super) struct Tally {
    pub(super) latencies_us: Vec<u32>,
    /// (transition, outcome) -> count; outcome is "rolled back" or a
    /// rejection kind (committed transitions are counted from the record).
    pub(super) calls: BTreeMap<(Transition, &'static str), u64>,
    pub(super) created: Vec<CreatedChat>,
    /// Handlers that slept for longer than the heartbeat staleness.
    pub(super) stalls: u64,
    /// The first few store failures, and how many there were.
    pub(super) store_errors: Vec<String>,
    pub(super) store_failures: u64,
    /// Chats whose final read failed in the store (left out of the check).
    pub(super) unread_chats: u64,
}

impl Tally {
    pub(super) fn store_failure(&mut self, e: &Error) {
        self.store_failures += 1;
        if self.store_errors.len() < 5 {
            self.store_errors.push(crate::error_chain(e));
        }
    }

    pub(super) fn count(&mut self, t: Transition, outcome: &'static str) {
        *self.calls.entry((t, outcome)).or_default() += 1;
    }

    /// Counts transitions an Update applied and then lost to its rollback.
    pub(super) fn rolled_back(&mut self, applied: &[Transition]) {
        for &t in applied {
            self.count(t, "rolled back");
        }
    }
}

/// The run's shared state.
pub(super) struct Shared<S: Store> {
    pub(super) store: S,
    pub(super) notify: Notify,
    pub(super) publisher: Arc<SimPublisher>,
    pub(super) recorder: Arc<Recorder>,
    pub(super) options: Options,
    pub(super) args: Args,
    stop: Stop,
    stopped: AtomicBool,
    /// Wakes sleepers when the run stops.
    stop_signal: watch::Sender<bool>,
    pub(super) started: Instant,
    /// When the run stopped (the end of the measured time).
    stopped_at: Mutex<Option<Instant>>,
    /// Chats created so far (reserved before creating).
    pub(super) reserved: AtomicUsize,
    /// Update attempts that ran to a commit or a rejection.
    pub(super) attempts: AtomicU64,
    tally: Mutex<Tally>,
}

impl<S: Store> Shared<S> {
    pub(super) fn new(
        store: S,
        publisher: Arc<SimPublisher>,
        recorder: Arc<Recorder>,
        options: Options,
        args: &Args,
        stop: Stop,
    ) -> Self {
        Shared {
            store,
            notify: Notify::AfterCommit(publisher.clone()),
            publisher,
            recorder,
            options,
            args: args.clone(),
            stop,
            stopped: AtomicBool::new(false),
            stop_signal: watch::Sender::new(false),
            started: Instant::now(),
            stopped_at: Mutex::new(None),
            reserved: AtomicUsize::new(0),
            attempts: AtomicU64::new(0),
            tally: Mutex::new(Tally::default()),
        }
    }

    /// A handle on `chat` whose Updates are recorded.
    pub(super) fn machine(&self, chat: ChatId) -> ChatMachine<S> {
        ChatMachine::new(self.store.clone(), self.notify.clone(), chat, self.options)
            .observed(self.recorder.clone())
    }

    pub(super) fn tally(&self) -> MutexGuard<'_, Tally> {
        self.tally.lock().expect("tally lock")
    }

    pub(super) fn take_tally(&self) -> Tally {
        std::mem::take(&mut *self.tally())
    }

    pub(super) fn stop(&self) -> Stop {
        self.stop
    }

    pub(super) fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    pub(super) fn halt(&self) {
        if !self.stopped.swap(true, Ordering::Relaxed) {
            *self.stopped_at.lock().expect("stop time") = Some(Instant::now());
            self.stop_signal.send_replace(true);
        }
    }

    /// How long the run ran until it stopped (or until now).
    pub(super) fn elapsed(&self) -> Duration {
        self.stopped_at
            .lock()
            .expect("stop time")
            .map_or_else(|| self.started.elapsed(), |t| t - self.started)
    }

    /// Resolves once the run stops.
    pub(super) async fn until_stopped(&self) {
        let mut stop = self.stop_signal.subscribe();
        let _ = stop.wait_for(|stopped| *stopped).await;
    }

    /// Sleeps, waking early when the run stops.
    pub(super) async fn sleep(&self, d: Duration) {
        if d.is_zero() {
            tokio::task::yield_now().await;
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            () = self.until_stopped() => {}
        }
    }

    /// A random pause around `mean_ms`.
    pub(super) fn pause(&self, rng: &mut StdRng, mean_ms: f64) -> Duration {
        if mean_ms <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(rng.random_range(0.0..2.0 * mean_ms) / 1000.0)
    }

    /// Counts how an Update of a user or a handler ended. `applied` are
    /// the transitions its callback applied (rolled back unless it
    /// committed); a commit is the recorder's to note. Stops the run when
    /// `--ops` is reached.
    pub(super) fn settle<T>(
        &self,
        applied: &[Transition],
        result: &Result<T, Error>,
        started: Instant,
    ) {
        let micros = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        let mut tally = self.tally();
        let attempted = match result {
            Ok(_) => true,
            // Failed at or after commit: the recorder holds it as
            // committed or maybe committed.
            Err(e) if e.commit_state() != CommitState::NotCommitted => {
                tally.store_failure(e);
                false
            }
            Err(Error::Rejected(r)) => {
                tally.rolled_back(applied);
                tally.count(r.transition, r.kind.name());
                true
            }
            Err(e) if super::users::is_idle(e) => false,
            Err(e) => {
                tally.store_failure(e);
                false
            }
        };
        if !attempted {
            return;
        }
        tally.latencies_us.push(micros);
        drop(tally);
        let n = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        if let Stop::Ops(max) = self.stop
            && n >= max
        {
            self.halt();
        }
    }
}

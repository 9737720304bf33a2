//! The runtime: a builder, the handle of a running runtime, and its
//! timing defaults. The claim loop itself is in [`crate::claim`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chatstate::{CommitObserver, Notify, Options, Store, WorkerId};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::claim::{ClaimLoop, Shared};
use crate::handler::Handler;
use crate::hints::{HintEvent, HintSource};
use crate::stats::{Counters, Stats, bump};

/// How many hints may wait between the sources and the claim loop; a
/// source that gets further ahead is held back (a broadcast subscription
/// then lags, which becomes a sweep).
const HINT_BUFFER: usize = 1024;

/// The default number of chats one runtime holds at once.
pub const DEFAULT_CAPACITY: usize = 16;

/// The runtime's timing. [`Timing::derived`] gives the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Timing {
    /// How often a held lease's heartbeat is refreshed.
    pub heartbeat_interval: Duration,
    /// How often `Store::claimable` is swept for chats whose hint was lost.
    pub sweep_interval: Duration,
    /// How long a graceful shutdown lets handlers finish before it aborts
    /// them and abandons their chats.
    pub grace: Duration,
}

impl Timing {
    /// The defaults, derived from `options.heartbeat_stale`: heartbeats at
    /// a third of it (two may fail before a lease goes stale), sweeps at
    /// half of it (a crashed worker's chat is re-owned within 1.5 ×
    /// `heartbeat_stale`), and a grace of a third of it. With the default
    /// 30 s staleness: 10 s, 15 s and 10 s.
    pub fn derived(options: &Options) -> Self {
        let stale = options.heartbeat_stale;
        Timing {
            heartbeat_interval: stale / 3,
            sweep_interval: stale / 2,
            grace: stale / 3,
        }
    }
}

/// A runtime configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A runtime must be able to hold at least one chat.
    #[error("capacity must be at least 1")]
    ZeroCapacity,
    /// Heartbeats must come more often than leases go stale.
    #[error(
        "heartbeat interval {interval:?} must be positive and shorter than heartbeat_stale {stale:?}"
    )]
    HeartbeatInterval {
        /// The interval asked for.
        interval: Duration,
        /// `Options::heartbeat_stale`.
        stale: Duration,
    },
    /// A zero sweep interval would sweep without pause.
    #[error("sweep interval must be positive")]
    ZeroSweepInterval,
}

/// Starts a hint source's forwarding task, once the runtime exists.
type StartSource = Box<
    dyn FnOnce(
            mpsc::Sender<HintEvent>,
            Arc<Counters>,
            Duration,
        ) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send,
>;

/// Configures a [`Runtime`]; see [`Runtime::builder`].
pub struct Builder<S: Store, H: Handler<S>> {
    store: S,
    notify: Notify,
    handler: H,
    options: Options,
    worker: WorkerId,
    capacity: usize,
    heartbeat_interval: Option<Duration>,
    sweep_interval: Option<Duration>,
    grace: Option<Duration>,
    sources: Vec<StartSource>,
    stop: CancellationToken,
    observer: Option<Arc<dyn CommitObserver>>,
}

impl<S: Store, H: Handler<S>> std::fmt::Debug for Builder<S, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("worker", &self.worker)
            .field("capacity", &self.capacity)
            .field("options", &self.options)
            .field("hint_sources", &self.sources.len())
            .finish_non_exhaustive()
    }
}

impl<S: Store, H: Handler<S>> Builder<S, H> {
    /// The machine's tunables (`heartbeat_stale` decides lease freshness,
    /// the sweep and the timing defaults). Default: `Options::default()`.
    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    /// This worker's id, written as the owner of every chat it claims.
    /// Default: a random one.
    pub fn worker_id(mut self, worker: WorkerId) -> Self {
        self.worker = worker;
        self
    }

    /// The most chats held (or being claimed) at once. Default:
    /// [`DEFAULT_CAPACITY`].
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Default: a third of `heartbeat_stale` ([`Timing::derived`]).
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = Some(interval);
        self
    }

    /// Default: half of `heartbeat_stale` ([`Timing::derived`]).
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = Some(interval);
        self
    }

    /// Default: a third of `heartbeat_stale` ([`Timing::derived`]).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    /// Adds a source of ownership hints (more than one may be added).
    /// Without any, the runtime finds work by sweeping alone.
    pub fn hints(mut self, mut source: impl HintSource) -> Self {
        self.sources.push(Box::new(move |tx, counters, backoff| {
            Box::pin(async move {
                loop {
                    match source.recv().await {
                        HintEvent::Closed => return,
                        HintEvent::Failed(_) => {
                            bump(&counters.source_errors);
                            tokio::time::sleep(backoff).await;
                        }
                        event => {
                            if tx.send(event).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            })
        }));
        self
    }

    /// Tells `observer` about every Update the runtime makes (claims,
    /// handlers' [`Lease::update`](crate::Lease::update)s, hand-backs) that
    /// tries to commit; see `chatstate::CommitObserver`.
    pub fn observer(mut self, observer: Arc<dyn CommitObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Shuts the runtime down gracefully when `token` is cancelled (the
    /// runtime's own stop is a child of it).
    pub fn stop_on(mut self, token: &CancellationToken) -> Self {
        self.stop = token.child_token();
        self
    }

    /// Checks the configuration and starts the runtime on the current
    /// tokio runtime: it sweeps at once, then claims on hints and sweeps.
    pub fn spawn(self) -> Result<Runtime, ConfigError> {
        let derived = Timing::derived(&self.options);
        let timing = Timing {
            heartbeat_interval: self
                .heartbeat_interval
                .unwrap_or(derived.heartbeat_interval),
            sweep_interval: self.sweep_interval.unwrap_or(derived.sweep_interval),
            grace: self.grace.unwrap_or(derived.grace),
        };
        if self.capacity == 0 {
            return Err(ConfigError::ZeroCapacity);
        }
        let stale = self.options.heartbeat_stale;
        if timing.heartbeat_interval.is_zero() || timing.heartbeat_interval >= stale {
            return Err(ConfigError::HeartbeatInterval {
                interval: timing.heartbeat_interval,
                stale,
            });
        }
        if timing.sweep_interval.is_zero() {
            return Err(ConfigError::ZeroSweepInterval);
        }
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel(HINT_BUFFER);
        let mut sources = JoinSet::new();
        for start in self.sources {
            sources.spawn(start(
                tx.clone(),
                counters.clone(),
                timing.heartbeat_interval,
            ));
        }
        drop(tx);
        let shared = Arc::new(Shared {
            store: self.store,
            notify: self.notify,
            options: self.options,
            worker: self.worker,
            handler: self.handler,
            timing,
            stop: self.stop.clone(),
            counters: counters.clone(),
            observer: self.observer,
        });
        let span = tracing::info_span!(
            target: "chatstate_worker",
            "worker",
            worker_id = %self.worker,
            capacity = self.capacity,
        );
        let main = tokio::spawn(
            ClaimLoop::new(shared, self.capacity, rx, sources)
                .run()
                .instrument(span),
        );
        Ok(Runtime {
            worker: self.worker,
            timing,
            stop: self.stop,
            main: Some(main),
            counters,
        })
    }
}

/// A running runtime.
///
/// Dropping the handle (or [`Runtime::abort`]) stops it at once, like a
/// crash: every handler and heartbeat task is aborted and nothing is
/// written, so its leases go stale and other runtimes' sweeps re-own the
/// chats. [`Runtime::shutdown`] stops it gracefully.
#[derive(Debug)]
pub struct Runtime {
    worker: WorkerId,
    timing: Timing,
    stop: CancellationToken,
    main: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl Runtime {
    /// A builder for a runtime claiming the chats of `store`, publishing
    /// through `notify`, and running `handler` on every chat it wins.
    pub fn builder<S: Store, H: Handler<S>>(
        store: S,
        notify: impl Into<Notify>,
        handler: H,
    ) -> Builder<S, H> {
        Builder {
            store,
            notify: notify.into(),
            handler,
            options: Options::default(),
            worker: WorkerId::new_random(),
            capacity: DEFAULT_CAPACITY,
            heartbeat_interval: None,
            sweep_interval: None,
            grace: None,
            sources: Vec::new(),
            stop: CancellationToken::new(),
            observer: None,
        }
    }

    /// The worker id it claims as.
    pub fn worker_id(&self) -> WorkerId {
        self.worker
    }

    /// The timing it runs with.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Its counters now.
    pub fn stats(&self) -> Stats {
        self.counters.stats()
    }

    /// The token that stops it gracefully when cancelled.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stops gracefully: no more claims, handlers get the grace period to
    /// finish (their leases' `stopping()` resolves), then the rest are
    /// aborted and their chats abandoned, so ownership hints go out to
    /// other workers. Returns the final counters.
    pub async fn shutdown(mut self) -> Stats {
        self.stop.cancel();
        self.join().await
    }

    /// Waits until the runtime has stopped (its stop token was cancelled
    /// and the shutdown finished). Returns the final counters.
    pub async fn stopped(mut self) -> Stats {
        self.join().await
    }

    /// Stops at once, like a crash (the same as dropping the handle).
    /// Returns the counters at that moment.
    pub fn abort(self) -> Stats {
        self.stats()
    }

    async fn join(&mut self) -> Stats {
        if let Some(main) = self.main.take()
            && let Err(e) = main.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
        self.stats()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(main) = self.main.take() {
            main.abort();
        }
    }
}

//! The runtime's counters: what it claimed, lost, kept alive and handed
//! back. Shared by the claim loop, the chat tasks and the heartbeat tasks;
//! read as a [`Stats`] copy.

use std::sync::atomic::{AtomicU64, Ordering};

/// A copy of a runtime's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Claims that took a chat (`Claim::Won`).
    pub claims_won: u64,
    /// Claims that found another runner's fresh lease (`Claim::Held`):
    /// nothing was bumped, written or published.
    pub claims_held: u64,
    /// Claims that found the chat not runnable (`Claim::NotRunnable`):
    /// nothing was bumped, written or published.
    pub claims_not_runnable: u64,
    /// Claims that failed: the chat is gone, or the store failed.
    pub claims_failed: u64,
    /// Hinted chats that `Store::claimable_among` found not needing an
    /// owner (held, not runnable, or being claimed by another worker right
    /// now): no claim transaction was opened.
    pub claims_skipped: u64,
    /// Heartbeats that found the lease still held and refreshed it.
    pub heartbeats: u64,
    /// Heartbeats the store failed (retried on the next tick).
    pub heartbeat_errors: u64,
    /// Leases found lost while held: a heartbeat said Lost or ChatGone, or
    /// a fenced Update failed with `LeaseLost`.
    pub leases_lost: u64,
    /// Chats handed back with a committed Abandon: by the handler's
    /// [`Released::HandBack`](crate::Released::HandBack) or by a shutdown.
    pub handed_back: u64,
    /// Handlers that returned [`Released::Finished`](crate::Released::Finished).
    pub finished: u64,
    /// Handlers that returned [`Released::Errored`](crate::Released::Errored)
    /// or panicked.
    pub errored: u64,
    /// Ownership hints received.
    pub hints: u64,
    /// Hints dropped by the local filter: the chat is held or being claimed
    /// here already.
    pub hints_deduplicated: u64,
    /// Hints dropped because the runtime was at capacity (a sweep follows
    /// when a slot frees).
    pub hints_at_capacity: u64,
    /// Sweeps of `Store::claimable` that have answered (or failed).
    pub sweeps: u64,
    /// Chats the sweeps returned.
    pub swept: u64,
    /// Sweeps or hint sources that failed.
    pub source_errors: u64,
}

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// The live counters behind [`Stats`].
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $name: AtomicU64,)*
        }

        impl Counters {
            pub(crate) fn stats(&self) -> Stats {
                Stats {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters!(
    claims_won,
    claims_held,
    claims_not_runnable,
    claims_failed,
    claims_skipped,
    heartbeats,
    heartbeat_errors,
    leases_lost,
    handed_back,
    finished,
    errored,
    hints,
    hints_deduplicated,
    hints_at_capacity,
    sweeps,
    swept,
    source_errors,
);

/// Adds one to a counter.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

//! The handler: the application's work on a claimed chat.

use std::future::Future;

use chatstate::Store;

use crate::lease::Lease;

/// What a handler does with a chat it holds: typically load the history,
/// generate a step, commit it through [`Lease::update`], and repeat until
/// the turn ends.
///
/// The runtime calls it once per won claim, on a task of its own, with the
/// lease's heartbeat already running. A panic counts as
/// [`Released::Errored`].
pub trait Handler<S: Store>: Send + Sync + 'static {
    /// Works on the chat and says how it lets go of it.
    fn handle(&self, lease: &Lease<S>) -> impl Future<Output = Released> + Send;
}

/// How a handler let go of its chat; the runtime writes the release.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Released {
    /// The handler is done for now (typically the chat is idle, waiting or
    /// in error). The runtime abandons the chat if this runner still holds
    /// it (one Update; an ownership hint goes out if the chat is runnable
    /// again, and this runtime offers it to itself too), so a later user
    /// message never waits for a lingering lease to go stale. Nothing is
    /// written if the handler abandoned it itself or the lease was lost.
    Finished,
    /// The handler failed. The runtime writes nothing: the heartbeat stops
    /// and the lease goes stale, so the chat is retried by a sweep after
    /// `heartbeat_stale` (a natural back-off for a failing provider). A
    /// handler that wants the chat to stop for good commits `FinishError`
    /// itself and returns [`Released::Finished`].
    Errored,
    /// Hand the chat to another worker now: the runtime abandons it
    /// (fenced), which publishes an ownership hint if it is runnable.
    HandBack,
}

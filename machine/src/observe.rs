//! Observing what Updates commit: a hook told, after every Update that
//! tried to commit, exactly which transitions it applied and how the commit
//! ended.
//!
//! An application attaches a [`CommitObserver`] to a handle with
//! [`ChatMachine::observed`]; the worker runtime passes its own to every
//! handle it makes. The report carries what a linearizability check needs
//! (the snapshot version the Update allocated, its store time and lease
//! freshness, the accepted transitions with their fences and outcomes, the
//! snapshot it ended at, its notifications) and whether the commit is
//! durable ([`Error::commit_state`] of the failure, if any).
//!
//! Only Updates whose callback returned `Ok` are reported: one that failed
//! or was skipped before commit left nothing behind. Rejected transitions
//! are left out of the report (they wrote nothing). Without an observer the
//! machine records nothing, so the hook costs nothing when unused.

use std::fmt;

use chatstate_model::oracle::{CommittedUpdate, Published};
use chatstate_model::{Call, ChatId, Notification, Outcome, Snapshot, Timestamp};

use crate::error::Error;

#[cfg(doc)]
use crate::machine::ChatMachine;

/// What one Update did to one chat (an Update with nested Updates changes
/// several chats, one [`ChatChange`] each).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ChatChange {
    /// The chat.
    pub chat_id: ChatId,
    /// The snapshot version the Update allocated when it locked the row
    /// (the one it commits, if it commits).
    pub snapshot_version: i64,
    /// Store time of the transaction.
    pub now: Timestamp,
    /// Whether the lease was fresh when the row was locked.
    pub lease_fresh: bool,
    /// The accepted transitions, in order, with their fences.
    pub calls: Vec<Call>,
    /// Their outcomes, one per call.
    pub outcomes: Vec<Outcome>,
    /// The snapshot at the end of the callback.
    pub end: Snapshot,
    /// The notifications the Update publishes for this chat if it commits.
    pub notifications: Vec<Notification>,
}

impl ChatChange {
    /// The change as the linearizability oracle takes it
    /// ([`chatstate_model::oracle`]), its notifications as they went out.
    pub fn to_committed_update(&self) -> CommittedUpdate {
        CommittedUpdate {
            chat: self.chat_id,
            snapshot: self.snapshot_version,
            now: self.now,
            lease_fresh: self.lease_fresh,
            calls: self.calls.clone(),
            outcomes: self.outcomes.clone(),
            end: self.end.clone(),
            published: self.notifications.iter().map(Published::from).collect(),
        }
    }
}

/// An Update that tried to commit, as told to a [`CommitObserver`].
#[derive(Debug)]
#[non_exhaustive]
pub struct CommitReport<'a> {
    /// The chats it changed: the handle's chat first, then nested Updates
    /// in the order they ended.
    pub changes: &'a [ChatChange],
    /// `Ok` if it committed and published; otherwise the error the caller
    /// gets, whose [`Error::commit_state`] says whether the change is
    /// durable anyway.
    pub result: Result<(), &'a Error>,
}

/// Told about every Update that tries to commit: just before the commit is
/// sent, and after the commit and the publication, before the caller gets
/// the result.
///
/// The call is synchronous and runs on the Update's task: keep it short
/// (record, count, send to a channel). It must not panic.
pub trait CommitObserver: Send + Sync + 'static {
    /// An Update is about to send its commit: `changes` are what it commits
    /// if the commit succeeds. A process that may die at any instant (and
    /// wants every commit accounted for) writes them down here as *maybe
    /// committed*, and settles them in [`CommitObserver::commit_ended`].
    /// Default: nothing.
    fn before_commit(&self, changes: &[ChatChange]) {
        let _ = changes;
    }

    /// One Update ended at or after its commit.
    fn commit_ended(&self, report: &CommitReport<'_>);
}

/// What a transaction records for its observer while the callback runs.
#[derive(Default)]
pub(crate) struct Recording {
    pub(crate) calls: Vec<Call>,
    pub(crate) outcomes: Vec<Outcome>,
}

impl fmt::Debug for dyn CommitObserver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CommitObserver")
    }
}

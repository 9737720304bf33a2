//! Claims: taking a chat only when it needs a worker, ending an Update
//! without committing, and what a heartbeat found.
//!
//! A worker that finds a chat to run (by [`Store::claimable`] or an
//! ownership hint) calls [`ChatMachine::try_acquire`]. Under the row lock it
//! takes the chat only when it is runnable and its lease is missing or
//! stale; otherwise the Update ends without a commit, so a losing claim
//! bumps nothing and publishes nothing. Every committed Update still bumps
//! `snapshot_version` exactly once.

use chatstate_model::{ExecutionState, Owner, RunnerId, Snapshot, WorkerId};

use crate::error::Error;
use crate::machine::ChatMachine;
use crate::store::Store;
use crate::tx::Tx;

/// What a claim attempt found ([`ChatMachine::try_acquire`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
#[allow(clippy::large_enum_variant)] // returned once per claim, never stored in bulk
pub enum Claim {
    /// Acquired: the chat is ours; the snapshot as committed by the claim
    /// (owner = us, lease fresh).
    Won {
        /// The snapshot after the Acquire.
        snapshot: Snapshot,
    },
    /// A runner holds a fresh lease (possibly the caller's own): nothing was
    /// bumped, written or published.
    Held {
        /// The holder.
        owner: Owner,
    },
    /// Not runnable (idle, error, archived, Invalid): nothing was bumped,
    /// written or published.
    NotRunnable {
        /// The chat's state.
        state: ExecutionState,
    },
}

/// How the callback of [`ChatMachine::update_or_skip`] ends its Update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending<T> {
    /// Commit, exactly as [`ChatMachine::update`] does.
    Commit(T),
    /// Roll back (the bump included) and publish nothing.
    Skip(T),
}

impl<T> Ending<T> {
    /// The value, however the Update ended.
    pub fn into_inner(self) -> T {
        match self {
            Ending::Commit(v) | Ending::Skip(v) => v,
        }
    }

    /// True for [`Ending::Commit`].
    pub fn is_commit(&self) -> bool {
        matches!(self, Ending::Commit(_))
    }
}

/// What a heartbeat found ([`ChatMachine::heartbeat`], [`Store::heartbeat`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LeaseStatus {
    /// The runner still holds the lease; its heartbeat was refreshed (store
    /// time).
    Held,
    /// The chat is owned by another runner, or by nobody: the heartbeat was
    /// NOT written.
    Lost {
        /// The chat's committed owner.
        owner: Option<Owner>,
    },
    /// The chat does not exist (any more).
    ChatGone,
}

/// The error a skipping callback ends [`ChatMachine::update`] with, so that
/// the Update takes the one rollback path every failing callback takes; it
/// never reaches a caller.
#[derive(Debug, thiserror::Error)]
#[error("update skipped")]
pub(crate) struct Skipped;

impl<S: Store> ChatMachine<S> {
    /// Like [`ChatMachine::update`], but the callback may end the Update
    /// without committing anything: `Ok(Ending::Skip(v))` rolls back (the
    /// bump included), publishes nothing and returns `Ok(Ending::Skip(v))`;
    /// `Ok(Ending::Commit(v))` is exactly `update`. Every COMMITTED Update
    /// still bumps once.
    pub async fn update_or_skip<T>(
        &self,
        f: impl AsyncFnOnce(&mut Tx<'_, S>) -> Result<Ending<T>, Error>,
    ) -> Result<Ending<T>, Error> {
        let mut skipped = None;
        let out = self
            .update(async |tx| match f(tx).await? {
                Ending::Commit(v) => Ok(v),
                Ending::Skip(v) => {
                    skipped = Some(v);
                    Err(Error::callback(Skipped))
                }
            })
            .await;
        match (out, skipped) {
            (Ok(v), _) => Ok(Ending::Commit(v)),
            (Err(Error::Callback(e)), Some(v)) if e.is::<Skipped>() => Ok(Ending::Skip(v)),
            (Err(e), _) => Err(e),
        }
    }

    /// Takes the chat only when it is runnable and its lease is missing or
    /// stale (by store time, under the row lock). A losing claim rolls back
    /// quietly: no snapshot bump, no publication. A missing chat is
    /// `Err(Error::ChatNotFound)`.
    ///
    /// Workers claim with this, never with an unconditional
    /// [`Tx::acquire`]: it takes over only a lease nobody keeps alive.
    pub async fn try_acquire(&self, worker: WorkerId, runner: RunnerId) -> Result<Claim, Error> {
        let ending = self
            .update_or_skip(async |tx| {
                let snap = tx.snapshot();
                let state = snap.state();
                if !state.is_runnable() {
                    return Ok(Ending::Skip(Claim::NotRunnable { state }));
                }
                if snap.lease_fresh
                    && let Some(owner) = snap.row.owner
                {
                    return Ok(Ending::Skip(Claim::Held { owner }));
                }
                tx.acquire(worker, runner).await?;
                Ok(Ending::Commit(Claim::Won {
                    snapshot: tx.snapshot().clone(),
                }))
            })
            .await?;
        Ok(ending.into_inner())
    }
}

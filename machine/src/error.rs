//! Errors of the machine and of stores.
//!
//! Three families are kept apart so callers can match on them: a rejected
//! transition (an expected domain outcome, nothing changed), a store failure
//! (infrastructure; nothing changed unless the variant says otherwise), and
//! a publication failure after a commit (the change IS committed).
//!
//! # Commit outcomes
//!
//! Every error of an Update says whether its change is durable, through
//! [`Error::commit_state`]:
//!
//! - [`CommitState::NotCommitted`]: nothing changed and nothing was
//!   published; the Update may be retried as it is. This covers rejections,
//!   callback errors, refused commits ([`Error::Poisoned`],
//!   [`Error::NestedUpdateFailed`]) and every store failure but one, a lost
//!   connection included once the store has resolved the transaction as
//!   rolled back.
//! - [`CommitState::Committed`]: the change is durable
//!   ([`Error::PublishAfterCommit`]); do not retry it, receivers catch up on
//!   their next reload. A commit whose connection was lost but that the
//!   store resolved as committed is not an error at all: the Update returns
//!   `Ok` and publishes as after any commit.
//! - [`CommitState::Unknown`]: the connection was lost after the commit was
//!   sent and the store could not find out how the transaction ended
//!   ([`StoreErrorKind::OutcomeUnknown`]). The change may or may not be
//!   durable and nothing was published; reload the chat (its
//!   `snapshot_version` says whether the Update landed) before deciding to
//!   retry.

use std::error::Error as StdError;

use chatstate_model::{ChatId, OptionsError, Rejection, RejectionKind};

/// Everything the machine can return.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A transition was rejected; the Update rolled back and published nothing.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The chat does not exist (the lock found no row).
    #[error("chat not found: {0}")]
    ChatNotFound(ChatId),
    /// The store failed. The transaction rolled back, unless the kind is
    /// [`StoreErrorKind::OutcomeUnknown`] (see [`Error::commit_state`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The transaction committed, but handing a notification to the
    /// publisher failed. The change is durable; receivers catch up on their
    /// next reload.
    #[error("committed snapshot {snapshot_version}, but publishing failed")]
    PublishAfterCommit {
        /// The committed snapshot version.
        snapshot_version: i64,
        /// What failed.
        #[source]
        source: FlushError,
    },
    /// A nested Update failed inside this transaction, so this transaction
    /// may hold its partial writes and refuses to commit.
    #[error("a nested update on chat {0} failed; the enclosing update cannot commit")]
    NestedUpdateFailed(ChatId),
    /// The machine was built with options out of their bounds; the call
    /// did not reach the store.
    #[error("invalid options: {0}")]
    InvalidOptions(#[source] OptionsError),
    /// The callback failed with an error of its own.
    #[error("update callback failed")]
    Callback(#[source] Box<dyn StdError + Send + Sync>),
    /// A store error inside this transaction (returned to the callback,
    /// which carried on) poisoned it: the store may hold part of that
    /// statement's writes, so the transaction refuses to commit, rolls
    /// back and publishes nothing.
    #[error("a store error ({kind:?} in {context}) poisoned the transaction; it rolled back")]
    Poisoned {
        /// What the store was doing when it failed (the first failure).
        context: &'static str,
        /// The kind of that failure.
        kind: StoreErrorKind,
    },
}

/// Whether the change of a failed Update (or Lock, or chat creation) is
/// durable. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CommitState {
    /// The change is durable.
    Committed,
    /// Nothing changed; the operation may be retried.
    NotCommitted,
    /// The connection was lost after the commit was sent and the outcome
    /// could not be resolved.
    Unknown,
}

impl Error {
    /// Wraps a caller's error so a callback can return it with `?`.
    pub fn callback(e: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Error::Callback(e.into())
    }

    /// The rejection, if this is one.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            Error::Rejected(r) => Some(r),
            _ => None,
        }
    }

    /// Whether the change is durable despite the error.
    pub fn commit_state(&self) -> CommitState {
        match self {
            Error::PublishAfterCommit { .. } => CommitState::Committed,
            Error::Store(e) if e.kind == StoreErrorKind::OutcomeUnknown => CommitState::Unknown,
            _ => CommitState::NotCommitted,
        }
    }

    /// True if the change was committed despite the error (and only then:
    /// an unknown outcome is not committed, see [`Error::commit_state`]).
    pub fn is_committed(&self) -> bool {
        self.commit_state() == CommitState::Committed
    }

    /// True if the chat does not exist, however that was found out: the
    /// lock found no row ([`Error::ChatNotFound`]), or a transition was
    /// rejected with [`RejectionKind::ChatNotFound`]. Ask this rather than
    /// matching either form.
    pub fn is_not_found(&self) -> bool {
        match self {
            Error::ChatNotFound(_) => true,
            Error::Rejected(r) => r.kind == RejectionKind::ChatNotFound,
            _ => false,
        }
    }

    /// True exactly when running the same Update again is safe and may
    /// succeed: the failed attempt rolled back, and its cause is transient
    /// (see [`StoreErrorKind::is_retryable`]).
    ///
    /// Never for a rejection (the same input is rejected again), a chat
    /// that does not exist, an error of the callback, a failed nested
    /// Update (its cause was the callback's to see),
    /// [`Error::PublishAfterCommit`] (the change is committed: retrying
    /// would apply it twice) or [`StoreErrorKind::OutcomeUnknown`] (it may
    /// be committed). [`crate::ChatMachine::update_with_retry`] retries on exactly this.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Store(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// A stable name for the error's kind: the rejection kind's name
    /// (`TransitionNotAllowed`, `InvalidState`, ...), `ChatNotFound`, or the
    /// variant name for the other families.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Error::Rejected(r) => r.kind.name(),
            Error::ChatNotFound(_) => "ChatNotFound",
            Error::Store(_) => "Store",
            Error::PublishAfterCommit { .. } => "PublishAfterCommit",
            Error::NestedUpdateFailed(_) => "NestedUpdateFailed",
            Error::InvalidOptions(_) => "InvalidOptions",
            Error::Callback(_) => "Callback",
            Error::Poisoned { .. } => "Poisoned",
        }
    }
}

/// A store failure. Stores map their native errors to this in one place.
///
/// It displays its context followed by its chain of causes
/// (`store: upsert heartbeat: error communicating with database: ...`), so
/// a log line says what failed and why; the native error stays reachable
/// through [`std::error::Error::source`] too.
#[derive(Debug, thiserror::Error)]
#[error("store: {context}{}", causes(.source.as_deref()))]
pub struct StoreError {
    /// What the store was doing.
    pub context: &'static str,
    /// Broad classification.
    pub kind: StoreErrorKind,
    /// The native error.
    #[source]
    pub source: Option<Box<dyn StdError + Send + Sync>>,
}

/// Broad classes of store failure.
///
/// Every kind but [`StoreErrorKind::OutcomeUnknown`] means the transaction
/// did not commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The connection was lost or the server went away before the commit
    /// was sent (or the commit was resolved as rolled back); the
    /// transaction did not commit.
    Connection,
    /// The connection was lost after the commit was sent and a fresh
    /// connection could not tell whether the transaction committed. The
    /// change may or may not be durable; never retry blindly.
    OutcomeUnknown,
    /// The server could not serialise the transaction (SQLSTATE 40001);
    /// it rolled back.
    Serialization,
    /// The server broke a deadlock by aborting this transaction (SQLSTATE
    /// 40P01, or the in-memory store's lock-cycle detection); it rolled
    /// back.
    Deadlock,
    /// A lock, statement or idle-in-transaction timeout ended the
    /// transaction (SQLSTATE 55P03, 57014, 25P03); it rolled back.
    Timeout,
    /// The server accepts no writes (a standby, or a read-only
    /// transaction: SQLSTATE 25006); it rolled back.
    ReadOnly,
    /// The store refused the data (constraint, malformed row).
    Data,
    /// A fault injected by a test.
    Injected,
    /// Anything else.
    Other,
}

impl StoreErrorKind {
    /// True for the kinds after which the transaction certainly rolled
    /// back and a new attempt may succeed: [`StoreErrorKind::Connection`],
    /// [`StoreErrorKind::Serialization`], [`StoreErrorKind::Deadlock`],
    /// [`StoreErrorKind::Timeout`], [`StoreErrorKind::ReadOnly`] (after a
    /// failover the new primary accepts writes) and
    /// [`StoreErrorKind::Injected`] (a test's stand-in for a transient
    /// failure). Never [`StoreErrorKind::OutcomeUnknown`] (it may have
    /// committed), [`StoreErrorKind::Data`] (the same data is refused
    /// again) or [`StoreErrorKind::Other`] (unclassified).
    pub fn is_retryable(self) -> bool {
        match self {
            StoreErrorKind::Connection
            | StoreErrorKind::Serialization
            | StoreErrorKind::Deadlock
            | StoreErrorKind::Timeout
            | StoreErrorKind::ReadOnly
            | StoreErrorKind::Injected => true,
            StoreErrorKind::OutcomeUnknown | StoreErrorKind::Data | StoreErrorKind::Other => false,
        }
    }
}

impl StoreError {
    /// True if the transaction rolled back for a transient cause (see
    /// [`StoreErrorKind::is_retryable`]).
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    /// A store error of a kind, with its source.
    pub fn new(
        context: &'static str,
        kind: StoreErrorKind,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        StoreError {
            context,
            kind,
            source: Some(source.into()),
        }
    }

    /// A fault injected by a test harness.
    pub fn injected(context: &'static str) -> Self {
        StoreError {
            context,
            kind: StoreErrorKind::Injected,
            source: None,
        }
    }
}

/// A publisher refused a notification.
#[derive(Debug, thiserror::Error)]
#[error("publish to {channel} failed")]
pub struct PublishError {
    /// The channel.
    pub channel: String,
    /// Why.
    #[source]
    pub source: Box<dyn StdError + Send + Sync>,
}

/// Every failure of a flush, one per refused notification, in order.
#[derive(Debug, thiserror::Error)]
#[error("{} notification(s) failed: {}", .0.len(), channels(.0))]
pub struct FlushError(pub Vec<PublishError>);

/// `": cause: its cause: ..."` for a chain of causes. A cause whose text
/// the previous one already shows (an error wrapping an I/O error and
/// repeating its message) is left out.
fn causes(source: Option<&(dyn StdError + Send + Sync + 'static)>) -> String {
    let mut out = String::new();
    let mut last = String::new();
    let mut next: Option<&(dyn StdError + 'static)> = match source {
        Some(e) => Some(e),
        None => None,
    };
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !last.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        next = e.source();
    }
    out
}

fn channels(errors: &[PublishError]) -> String {
    errors
        .iter()
        .map(|e| e.channel.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

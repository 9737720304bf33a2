//! Errors of the machine and of stores.
//!
//! Three families are kept apart so callers can match on them: a rejected
//! transition (an expected domain outcome, nothing changed), a store failure
//! (infrastructure; nothing changed unless the variant says otherwise), and
//! a publication failure after a commit (the change IS committed).

use std::error::Error as StdError;

use chatstate_model::{ChatId, OptionsError, Rejection};

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
    /// The store failed; the transaction rolled back.
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

    /// True if the change was committed despite the error.
    pub fn is_committed(&self) -> bool {
        matches!(self, Error::PublishAfterCommit { .. })
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
        }
    }
}

/// A store failure. Stores map their native errors to this in one place.
#[derive(Debug, thiserror::Error)]
#[error("store: {context}")]
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

impl StoreError {
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

fn channels(errors: &[PublishError]) -> String {
    errors
        .iter()
        .map(|e| e.channel.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

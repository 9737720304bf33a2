//! Errors: the one mapping from `sqlx::Error` to [`StoreError`], and the
//! failures this store detects itself.

use chatstate::{StoreError, StoreErrorKind};

/// Maps a sqlx error to a store error. This is the only place that
/// classifies database failures, so every caller sees the same kinds.
///
/// - lost or refused connections, I/O, pool exhaustion or closure, and a
///   backend terminated by an administrator → [`StoreErrorKind::Connection`]
///   (the transaction did not commit);
/// - constraint violations, malformed values and undecodable rows →
///   [`StoreErrorKind::Data`];
/// - everything else → [`StoreErrorKind::Other`].
pub(crate) fn store_error(context: &'static str, e: sqlx::Error) -> StoreError {
    let kind = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => StoreErrorKind::Connection,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // Class 08: connection exception. 57P01..57P03: the backend was
            // terminated (administrator, crash shutdown, not accepting).
            Some(code) if code.starts_with("08") => StoreErrorKind::Connection,
            Some("57P01" | "57P02" | "57P03") => StoreErrorKind::Connection,
            // Class 22: data exception (bad JSON, out of range, ...).
            // Class 23: integrity constraint violation.
            Some(code) if code.starts_with("22") || code.starts_with("23") => StoreErrorKind::Data,
            _ => StoreErrorKind::Other,
        },
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::Encode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => StoreErrorKind::Data,
        _ => StoreErrorKind::Other,
    };
    StoreError::new(context, kind, e)
}

/// True for a foreign-key violation (the referenced chat is gone).
pub(crate) fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23503"))
}

/// A failure this store detects itself (not reported by the database).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgStoreFault {
    /// A notification payload does not fit Postgres NOTIFY.
    #[error("notification payload on {channel} is {len} bytes, the limit is {max}")]
    PayloadTooLarge {
        /// The channel.
        channel: String,
        /// The payload's length in bytes.
        len: usize,
        /// The limit ([`chatstate_model::MAX_PAYLOAD_BYTES`]).
        max: usize,
    },
    /// A value to inline into SQL text holds a NUL byte, which Postgres
    /// text cannot carry.
    #[error("value to inline into SQL holds a NUL byte")]
    NulInLiteral,
    /// Writing a plan touched a different number of rows than the plan
    /// names: the stored chat is not the snapshot the plan was decided on.
    #[error("plan write mismatch in {what}: expected {expected} row(s), wrote {actual}")]
    PlanMismatch {
        /// Which part of the plan.
        what: &'static str,
        /// Rows the plan names.
        expected: usize,
        /// Rows written.
        actual: usize,
    },
    /// A stored value cannot be read back into the model's types.
    #[error("malformed stored value in {column}: {reason}")]
    Malformed {
        /// The column.
        column: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An earlier statement of this transaction failed, so Postgres has
    /// aborted it; it can only be rolled back.
    #[error("the transaction was aborted by an earlier error")]
    TransactionAborted,
    /// The chat this transaction was asked about is not locked by it.
    #[error("the chat is not locked by this transaction")]
    NotLocked,
    /// The chat does not exist (a test-control write to a missing chat).
    #[error("chat {0} not found")]
    ChatNotFound(chatstate_model::ChatId),
}

impl PgStoreFault {
    /// Wraps the fault in a store error of kind Data (or Other for
    /// transaction misuse).
    pub(crate) fn into_store(self, context: &'static str) -> StoreError {
        let kind = match self {
            PgStoreFault::TransactionAborted | PgStoreFault::NotLocked => StoreErrorKind::Other,
            _ => StoreErrorKind::Data,
        };
        StoreError::new(context, kind, self)
    }
}

/// A malformed stored value, as a store error.
pub(crate) fn malformed(
    context: &'static str,
    column: &'static str,
    reason: impl ToString,
) -> StoreError {
    PgStoreFault::Malformed {
        column,
        reason: reason.to_string(),
    }
    .into_store(context)
}

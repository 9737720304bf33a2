//! Errors: the one mapping from `sqlx::Error` to [`StoreError`], and the
//! failures this store detects itself.

use chatstate::{StoreError, StoreErrorKind};

/// Maps a sqlx error to a store error. This is the only place that
/// classifies database failures, so every caller sees the same kinds.
///
/// - lost or refused connections, I/O, pool exhaustion or closure, and a
///   backend terminated by an administrator → [`StoreErrorKind::Connection`]
///   (the transaction did not commit);
/// - serialization failures (40001) → [`StoreErrorKind::Serialization`];
/// - deadlocks broken by the server (40P01) → [`StoreErrorKind::Deadlock`];
/// - a lock not obtained within `lock_timeout` (55P03), a statement
///   cancelled by `statement_timeout` (57014, also a cancel request), and
///   a session ended by `idle_in_transaction_session_timeout` (25P03) →
///   [`StoreErrorKind::Timeout`];
/// - a write in a read-only transaction or on a standby (25006) →
///   [`StoreErrorKind::ReadOnly`];
/// - constraint violations, malformed values and undecodable rows →
///   [`StoreErrorKind::Data`];
/// - everything else → [`StoreErrorKind::Other`].
///
/// Every one of these means the transaction did not commit: the server
/// reports them for a statement of an open transaction (which it then
/// aborts) or instead of running it. 25P03 in particular can surface as
/// the answer to `COMMIT`, but the server ended the session before it read
/// the `COMMIT`. Whether a connection lost *during* `COMMIT` committed is
/// for the caller of the commit to resolve, not for this mapping.
pub(crate) fn store_error(context: &'static str, e: sqlx::Error) -> StoreError {
    if let Some(detail) = session_changed(&e) {
        return PgStoreFault::SessionChanged { detail }.into_store(context);
    }
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
            Some("40001") => StoreErrorKind::Serialization,
            Some("40P01") => StoreErrorKind::Deadlock,
            Some("55P03" | "57014" | "25P03") => StoreErrorKind::Timeout,
            Some("25006") => StoreErrorKind::ReadOnly,
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

/// The SQLSTATE of a store error the database reported.
pub(crate) fn sqlstate(e: &StoreError) -> Option<String> {
    match e.source.as_deref()?.downcast_ref::<sqlx::Error>()? {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// The server's message if `e` says that a prepared statement the client
/// counted on is missing (26000) or already exists (42P05): the session
/// the client prepared it in is not the one it now talks to, as behind a
/// transaction pooler.
fn session_changed(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("26000" | "42P05")) => {
            Some(db.message().to_owned())
        }
        _ => None,
    }
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
    /// The application's statements ended the store's transaction
    /// (`COMMIT`, `ROLLBACK`, or sqlx's `begin()` on the lent connection)
    /// before the Update committed. The store sent nothing after finding
    /// out, but what the application's own `COMMIT` made durable it cannot
    /// tell: the outcome is unknown ([`StoreErrorKind::OutcomeUnknown`]).
    #[error("the application's statements ended the transaction before the update committed")]
    TransactionEndedByCaller,
    /// The chat this transaction was asked about is not locked by it.
    #[error("the chat is not locked by this transaction")]
    NotLocked,
    /// The chat does not exist (a test-control write to a missing chat).
    #[error("chat {0} not found")]
    ChatNotFound(chatstate_model::ChatId),
    /// The database's schema was migrated by a newer binary: it holds a
    /// migration this binary does not know. Nothing was migrated; run a
    /// binary at least as new as the schema.
    #[error("the database schema is at migration {database}, newer than this binary's {binary}")]
    SchemaNewerThanBinary {
        /// The highest migration version applied to the database.
        database: i64,
        /// The highest migration version this binary embeds.
        binary: i64,
    },
    /// A statement prepared in the session is gone or belongs to somebody
    /// else: the connection's server session changed between transactions,
    /// as behind a transaction pooler. Nothing was written; use
    /// [`Pooling::Transaction`](crate::Pooling::Transaction).
    #[error(
        "the server session changed under the connection ({detail}): behind a transaction \
         pooler, use Pooling::Transaction"
    )]
    SessionChanged {
        /// The server's message.
        detail: String,
    },
    /// A listener did not hear its own probe notification: its connection
    /// does not keep a server session (a transaction pooler between it and
    /// the server?). Connect listeners to the server directly.
    #[error(
        "the listener did not receive its probe notification within {waited:?}: connect it to \
         the server directly, not through a transaction pooler"
    )]
    ListenerNotDelivered {
        /// How long it waited.
        waited: std::time::Duration,
    },
    /// Behind a transaction pooler the database's
    /// `default_transaction_isolation` must be `read committed`.
    #[error(
        "default_transaction_isolation is {level}; behind a transaction pooler it must be \
         read committed (ALTER DATABASE ... SET default_transaction_isolation = 'read committed')"
    )]
    IsolationNotReadCommitted {
        /// The database's setting.
        level: String,
    },
}

impl PgStoreFault {
    /// The fault a store error carries, if this store detected it (for
    /// matching, e.g. on [`PgStoreFault::SchemaNewerThanBinary`] after
    /// [`crate::migrate`]).
    pub fn of(e: &StoreError) -> Option<&PgStoreFault> {
        e.source.as_deref()?.downcast_ref()
    }

    /// Wraps the fault in a store error of kind Data (or Other for
    /// transaction misuse, OutcomeUnknown for a transaction the
    /// application ended).
    pub(crate) fn into_store(self, context: &'static str) -> StoreError {
        let kind = match self {
            PgStoreFault::TransactionAborted
            | PgStoreFault::NotLocked
            | PgStoreFault::SchemaNewerThanBinary { .. }
            | PgStoreFault::SessionChanged { .. }
            | PgStoreFault::ListenerNotDelivered { .. }
            | PgStoreFault::IsolationNotReadCommitted { .. } => StoreErrorKind::Other,
            PgStoreFault::TransactionEndedByCaller => StoreErrorKind::OutcomeUnknown,
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

#[cfg(test)]
mod tests {
    //! Each SQLSTATE the mapping names, provoked for real on a throwaway
    //! server, maps to its kind.

    use std::time::Duration;

    use sqlx::{Connection, Executor, PgConnection};

    use super::*;

    async fn connect(name: &str) -> PgConnection {
        let cluster =
            chatstate_testing::throwaway::Cluster::shared().unwrap_or_else(|e| panic!("{e}"));
        PgConnection::connect_with(&cluster.connect_options(name))
            .await
            .unwrap()
    }

    /// Runs `setup` and then `failing` on one connection of a fresh
    /// database (while `other` holds whatever it took on another), and
    /// returns the kind `failing`'s error maps to.
    async fn kind_of(
        name: &str,
        other: &[&'static str],
        setup: &[&'static str],
        failing: &'static str,
    ) -> StoreErrorKind {
        let mut holder = connect(name).await;
        for q in other {
            holder.execute(*q).await.unwrap();
        }
        let mut conn = connect(name).await;
        for q in setup {
            conn.execute(*q).await.unwrap();
        }
        let e = conn.execute(failing).await.expect_err(failing);
        let mapped = store_error("test", e);
        let _ = holder.close().await;
        mapped.kind
    }

    /// What it is, statements another session runs first, this session's
    /// setup, the failing statement, the kind it must map to.
    type Case = (
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
        &'static str,
        StoreErrorKind,
    );

    #[tokio::test]
    async fn sqlstates_provoked_on_a_server_map_to_their_kinds() {
        let cluster =
            chatstate_testing::throwaway::Cluster::shared().unwrap_or_else(|e| panic!("{e}"));
        let db = cluster.create_database().await.unwrap();
        let mut admin = connect(&db).await;
        admin
            .execute(
                "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 0), (2, 0)",
            )
            .await
            .unwrap();
        const HOLD: &[&str] = &["BEGIN", "SELECT * FROM t WHERE id = 1 FOR UPDATE"];
        let cases: [Case; 4] = [
            (
                "55P03 lock timeout",
                HOLD,
                &["SET lock_timeout = '50ms'", "BEGIN"],
                "SELECT * FROM t WHERE id = 1 FOR UPDATE",
                StoreErrorKind::Timeout,
            ),
            (
                "57014 statement timeout",
                &[],
                &["SET statement_timeout = '50ms'"],
                "SELECT pg_sleep(5)",
                StoreErrorKind::Timeout,
            ),
            (
                "25006 read-only transaction",
                &[],
                &["SET default_transaction_read_only = on", "BEGIN"],
                "UPDATE t SET v = 1",
                StoreErrorKind::ReadOnly,
            ),
            (
                "23505 unique violation",
                &[],
                &[],
                "INSERT INTO t VALUES (1, 0)",
                StoreErrorKind::Data,
            ),
        ];
        for (what, other, setup, failing, want) in cases {
            assert_eq!(kind_of(&db, other, setup, failing).await, want, "{what}");
        }

        // 40001: a concurrent update commits after this transaction's
        // snapshot was taken.
        let mut a = connect(&db).await;
        a.execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT * FROM t")
            .await
            .unwrap();
        admin
            .execute("UPDATE t SET v = v + 1 WHERE id = 2")
            .await
            .unwrap();
        let e = a
            .execute("UPDATE t SET v = v + 1 WHERE id = 2")
            .await
            .unwrap_err();
        assert_eq!(store_error("test", e).kind, StoreErrorKind::Serialization);

        // 40P01: two transactions lock two rows in opposite order.
        let mut b = connect(&db).await;
        let mut c = connect(&db).await;
        b.execute("SET deadlock_timeout = '10ms'; BEGIN; UPDATE t SET v = 1 WHERE id = 1")
            .await
            .unwrap();
        c.execute("SET deadlock_timeout = '10ms'; BEGIN; UPDATE t SET v = 1 WHERE id = 2")
            .await
            .unwrap();
        let (rb, rc) = tokio::join!(
            b.execute("UPDATE t SET v = 2 WHERE id = 2"),
            c.execute("UPDATE t SET v = 2 WHERE id = 1"),
        );
        let kinds: Vec<_> = [rb, rc]
            .into_iter()
            .filter_map(|r| r.err())
            .map(|e| store_error("test", e).kind)
            .collect();
        assert_eq!(kinds, [StoreErrorKind::Deadlock]);
        // Both end their transactions (the survivor's locks would block
        // what follows).
        let _ = b.close().await;
        let _ = c.close().await;

        // 25P03: the server ends a session idle in a transaction and says
        // why. A client that can still read it (TCP) gets 25P03; over a
        // Unix socket, as here, writing the next statement to the closed
        // socket fails first (EPIPE) and the reason is never read. Either
        // way the transaction did not commit and the kind is retryable.
        let mut idle = connect(&db).await;
        idle.execute("SET idle_in_transaction_session_timeout = '50ms'; BEGIN; UPDATE t SET v = 9")
            .await
            .unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut idle)
            .await
            .unwrap();
        wait_until_gone(&mut admin, pid).await;
        let e = idle.execute("COMMIT").await.unwrap_err();
        let mapped = store_error("commit", e);
        assert!(
            matches!(
                mapped.kind,
                StoreErrorKind::Timeout | StoreErrorKind::Connection
            ),
            "{mapped}"
        );
        let v: i32 = sqlx::query_scalar("SELECT max(v) FROM t")
            .fetch_one(&mut admin)
            .await
            .unwrap();
        assert_ne!(v, 9, "nothing committed");
    }

    /// Waits (bounded) until backend `pid` has exited.
    async fn wait_until_gone(admin: &mut PgConnection, pid: i32) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let alive: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                    .bind(pid)
                    .fetch_one(&mut *admin)
                    .await
                    .unwrap();
            if !alive {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "backend {pid} lives on"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

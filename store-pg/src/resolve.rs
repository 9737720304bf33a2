//! Resolving a commit whose connection was lost.
//!
//! When the connection fails after `COMMIT` was sent, the transaction may
//! have committed (the server applied it and the reply was lost) or not
//! (the message never arrived, or the server died first). The exclusive
//! lock of every opening returns the transaction id (`xid`), so the store
//! asks a fresh connection `pg_xact_status(xid)`:
//!
//! - `committed`: the commit is reported as a success;
//! - `aborted`: as a lost connection ([`StoreErrorKind::Connection`]), which
//!   means it did not commit;
//! - `in progress`: the server has not yet ended the dying backend (it is
//!   still running the commit, or has not noticed the closed socket). The
//!   store asks again, with growing pauses, until [`BUDGET`] has passed;
//! - anything else, or no answer within the budget (the server is down,
//!   unreachable, or the backend stays in progress):
//!   [`StoreErrorKind::OutcomeUnknown`].
//!
//! The fresh connection is made from the pool's connect options, not taken
//! from the pool: after a server restart every pooled connection is dead.

use std::sync::Arc;
use std::time::Duration;

use chatstate::{StoreError, StoreErrorKind};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::time::{Instant, sleep, timeout_at};

use crate::decode::get;
use crate::sql;

/// How long a resolution may take before the outcome is declared unknown.
pub(crate) const BUDGET: Duration = Duration::from_secs(5);

/// The first pause between two attempts; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_millis(250);

/// Why a commit whose connection was lost failed (the source of the
/// [`StoreError`] the commit returns).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommitLost {
    /// A fresh connection found the transaction rolled back.
    #[error("the connection was lost during commit; transaction {xid} rolled back")]
    RolledBack {
        /// The transaction id.
        xid: i64,
        /// The failure of the commit's connection.
        #[source]
        source: StoreError,
    },
    /// No fresh connection could tell how the transaction ended.
    #[error(
        "the connection was lost during commit; the outcome of transaction {xid} is unknown ({reason})"
    )]
    Unresolved {
        /// The transaction id.
        xid: i64,
        /// Why the resolution failed (its last failure).
        reason: String,
        /// The failure of the commit's connection.
        #[source]
        source: StoreError,
    },
    /// The statement carried its own commit (an implicit transaction), so
    /// no transaction id was known before it was sent.
    #[error("the connection was lost during a statement that commits on its own")]
    Implicit(#[source] StoreError),
}

/// What a fresh connection says about a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Committed,
    Aborted,
}

/// Asks fresh connections how transactions ended.
#[derive(Clone, Debug)]
pub(crate) struct Resolver {
    options: Arc<PgConnectOptions>,
}

impl Resolver {
    pub(crate) fn new(options: Arc<PgConnectOptions>) -> Self {
        Resolver { options }
    }

    /// The outcome of a commit of transaction `xid` that failed with
    /// `lost` (a lost connection): `Ok` if it committed, else the error to
    /// report (Connection if it rolled back, OutcomeUnknown if no answer).
    pub(crate) async fn commit(
        &self,
        context: &'static str,
        xid: i64,
        incarnation: &str,
        lost: StoreError,
    ) -> Result<(), StoreError> {
        match self.status(xid, incarnation).await {
            Ok(Status::Committed) => Ok(()),
            Ok(Status::Aborted) => Err(StoreError::new(
                context,
                StoreErrorKind::Connection,
                CommitLost::RolledBack { xid, source: lost },
            )),
            Err(reason) => Err(StoreError::new(
                context,
                StoreErrorKind::OutcomeUnknown,
                CommitLost::Unresolved {
                    xid,
                    reason,
                    source: lost,
                },
            )),
        }
    }

    /// Polls `pg_xact_status` until it says committed or aborted, or the
    /// budget is spent (the reason of the last failure).
    async fn status(&self, xid: i64, incarnation: &str) -> Result<Status, String> {
        let deadline = Instant::now() + BUDGET;
        let mut pause = FIRST_PAUSE;
        let mut conn: Option<PgConnection> = None;
        let mut last = String::from("no attempt finished");
        loop {
            if conn.is_none() {
                match timeout_at(deadline, PgConnection::connect_with(&self.options)).await {
                    Ok(Ok(c)) => conn = Some(c),
                    Ok(Err(e)) => last = format!("connect: {e}"),
                    Err(_) => return Err(format!("timed out; last: {last}")),
                }
            }
            if let Some(c) = conn.as_mut() {
                // Unnamed: the poll may run behind a transaction pooler, where a
                // named statement would not outlive its transaction.
                let query = sqlx::query(sql::XACT_STATUS)
                    .persistent(false)
                    .bind(xid)
                    .fetch_one(&mut *c);
                match timeout_at(deadline, query).await {
                    Ok(Ok(row)) => {
                        let status: Option<String> = get(&row, "resolve commit", "status")
                            .map_err(|e| format!("read status: {e}"))?;
                        let now: String = get(&row, "resolve commit", "incarnation")
                            .map_err(|e| format!("read incarnation: {e}"))?;
                        // Another incarnation (a restart, or a failover)
                        // since the transaction took its id: the server may
                        // have given the same id to a transaction of its
                        // own. The id tells nothing there.
                        if now != incarnation {
                            let _ = close(conn, Status::Aborted).await;
                            return Err(format!(
                                "the server was restarted or failed over since the \
                                 transaction took its id ({incarnation} then, {now} now): \
                                 the id may name another transaction there"
                            ));
                        }
                        match status.as_deref() {
                            Some("committed") => return close(conn, Status::Committed).await,
                            Some("aborted") => return close(conn, Status::Aborted).await,
                            Some("in progress") => last = String::from("still in progress"),
                            other => return Err(format!("pg_xact_status says {other:?}")),
                        }
                    }
                    Ok(Err(e)) => {
                        last = format!("query: {e}");
                        conn = None;
                    }
                    Err(_) => return Err(format!("timed out; last: {last}")),
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("timed out; last: {last}"));
            }
            sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
}

async fn close(conn: Option<PgConnection>, status: Status) -> Result<Status, String> {
    if let Some(c) = conn {
        let _ = c.close().await;
    }
    Ok(status)
}

/// The error of a statement that commits on its own (an implicit
/// transaction: chat creation, heartbeat) and failed: a lost connection
/// may have come after the server committed, so it is reported as an
/// unknown outcome; every other failure means it did not commit.
pub(crate) fn implicit(err: StoreError) -> StoreError {
    if err.kind == StoreErrorKind::Connection {
        let context = err.context;
        StoreError::new(
            context,
            StoreErrorKind::OutcomeUnknown,
            CommitLost::Implicit(err),
        )
    } else {
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost() -> StoreError {
        StoreError::new(
            "commit",
            StoreErrorKind::Connection,
            std::io::Error::other("connection lost"),
        )
    }

    /// A transaction id is looked up only on the server incarnation it was
    /// assigned on: the same committed id asked about for another
    /// incarnation (as after a restart, or a failover, where ids the old
    /// server never wrote to disk or replicated are given out again) is an
    /// unknown outcome, never "committed".
    #[tokio::test]
    async fn an_id_is_trusted_only_on_its_own_incarnation() {
        let cluster =
            chatstate_testing::throwaway::Cluster::shared().unwrap_or_else(|e| panic!("{e}"));
        let pool = cluster
            .new_database()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // An implicit transaction that takes an id and commits.
        let row = sqlx::query(concat!(
            "SELECT pg_current_xact_id()::text::bigint AS xid, ",
            incarnation!(),
            " AS incarnation"
        ))
        .fetch_one(&pool)
        .await
        .unwrap();
        let xid: i64 = get(&row, "test", "xid").unwrap();
        let incarnation: String = get(&row, "test", "incarnation").unwrap();
        let resolver = Resolver::new(pool.connect_options());

        resolver
            .commit("commit", xid, &incarnation, lost())
            .await
            .expect("committed, on its own incarnation");
        let err = resolver
            .commit("commit", xid, &format!("{incarnation}0"), lost())
            .await
            .unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::OutcomeUnknown, "{err}");
        assert!(
            err.to_string().contains("restarted or failed over"),
            "{err}"
        );
    }
}

//! Connection poolers: what the store may keep in a database session
//! (see [`Pooling`]).

use sqlx::Postgres;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;

/// How the store uses database sessions, by what sits between it and the
/// server (docs/deployment.md).
///
/// A transaction pooler (PgBouncer with `pool_mode = transaction`) gives a
/// client connection a server connection for one transaction at a time,
/// and the next transaction may run on another one. State a session keeps
/// between transactions is then gone, or belongs to somebody else:
///
/// - the statements the lean opening prepares with SQL `PREPARE`;
/// - sqlx's named protocol-level prepared statements (`sqlx_s_1`, ...),
///   which PgBouncer 1.18 does not track;
/// - `SET SESSION` settings (the store pins READ COMMITTED for the single
///   statements it runs outside transactions);
/// - `LISTEN`: notifications reach the session that listened, which is
///   no longer this client's.
///
/// [`Pooling::Transaction`] keeps none of it: the opening inlines the
/// statements it would have executed (the server plans them on every
/// Update), every statement with parameters is sent unnamed (prepared and
/// executed in two requests), and nothing is set on the session. Every
/// guarantee stays (the transaction is the same), at one round trip more
/// per statement with parameters: four for an Update of one transition
/// instead of three.
///
/// Behind a transaction pooler the database's `default_transaction_isolation`
/// must be `read committed` (PostgreSQL's default): chat creation,
/// heartbeats and claim queries run as single statements that take it.
/// [`PgStore::check_pooling`](crate::PgStore::check_pooling) verifies it.
/// The listener ([`crate::PgNotifyListener`]) must connect to the server
/// directly, never through the transaction pooler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Pooling {
    /// A session is this client's for as long as the connection lives: a
    /// direct connection, or a pooler in session mode. The lean path:
    /// statements prepared once per session, three round trips per
    /// Update.
    #[default]
    Session,
    /// A transaction pooler (PgBouncer `pool_mode = transaction`): no
    /// state is kept in the session between transactions. Four round
    /// trips per Update of one transition.
    Transaction,
}

impl Pooling {
    /// Whether statements with parameters may be kept prepared in the
    /// session (named, cached by sqlx).
    pub(crate) fn persistent(self) -> bool {
        self == Pooling::Session
    }

    /// Requests a statement with parameters costs: an unnamed statement is
    /// parsed in one request and bound and executed in another.
    pub(crate) fn requests_per_statement(self) -> u64 {
        match self {
            Pooling::Session => 1,
            Pooling::Transaction => 2,
        }
    }

    /// A statement with parameters, prepared the way this pooling allows.
    pub(crate) fn query<'q>(self, sql: &'static str) -> Query<'q, Postgres, PgArguments> {
        sqlx::query(sql).persistent(self.persistent())
    }
}

/// How long the probe waits for a server connection before it concludes
/// that one is being withheld (only a pooler makes a session wait).
const PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether the connections of `pool` run on a transaction pooler: true if
/// a client connection's server session (`pg_backend_pid()`) changes
/// between its transactions, or if it has to wait for one.
///
/// Two connections, A and B: A asks for its backend; B opens a
/// transaction and asks for its own (a LIFO pooler hands B the server
/// connection A just released); A asks again while B holds it, then again
/// after B commits; B asks once more. On a direct connection (or a
/// session pooler) each sees one backend throughout. A transaction pooler
/// shows A another backend while B holds A's (LIFO), or rotates every
/// request (FIFO), or makes A wait when the pool has one server
/// connection.
pub(crate) async fn runs_on_transaction_pooler(pool: &sqlx::PgPool) -> Result<bool, sqlx::Error> {
    let mut a = pool.acquire().await?;
    let mut b = pool.acquire().await?;
    let a1 = backend(&mut a, "SELECT pg_backend_pid() AS pid").await?;
    let b1 = backend(&mut b, "BEGIN; SELECT pg_backend_pid() AS pid").await?;
    let a2 = match tokio::time::timeout(
        PROBE_WAIT,
        backend(&mut a, "SELECT pg_backend_pid() AS pid"),
    )
    .await
    {
        Ok(pid) => pid?,
        Err(_) => {
            // A waits for a server connection: close it (it may still be
            // waiting) and end B's transaction.
            a.close_on_drop();
            sqlx::raw_sql("COMMIT").execute(&mut *b).await?;
            return Ok(true);
        }
    };
    sqlx::raw_sql("COMMIT").execute(&mut *b).await?;
    let a3 = backend(&mut a, "SELECT pg_backend_pid() AS pid").await?;
    let b2 = backend(&mut b, "SELECT pg_backend_pid() AS pid").await?;
    Ok(a1 != a2 || a2 != a3 || b1 != b2)
}

/// The backend pid the last row of a simple query names.
async fn backend(
    conn: &mut sqlx::pool::PoolConnection<Postgres>,
    text: &'static str,
) -> Result<i32, sqlx::Error> {
    use sqlx::Row;
    let rows = sqlx::raw_sql(text).fetch_all(&mut **conn).await?;
    let row = rows
        .last()
        .ok_or_else(|| sqlx::Error::Protocol("no row for pg_backend_pid()".into()))?;
    row.try_get("pid")
}

//! The PostgreSQL store of chatstate, on sqlx.
//!
//! [`PgStore`] implements [`chatstate::Store`]: it locks chat rows, writes
//! the [`Plan`](chatstate_model::Plan)s the machine decides, verbatim, and
//! delivers notifications with the commit (`NOTIFY`). It holds no
//! transition rules and computes no versions: every number it writes comes
//! from the pure model.
//!
//! # The lean path
//!
//! An Update of one transition costs three round trips (four for
//! EditMessage), counted by [`PgStore::round_trips`]:
//!
//! 1. `BEGIN`, the row lock, and the read of the snapshot (the row, which
//!    also carries the queue ids and the tool bookkeeping, the lease
//!    freshness and store time), in one simple-query message;
//! 2. the plan's writes, in one statement, which also writes the snapshot
//!    bump with the row (EditMessage first reads its target: one more);
//! 3. the notifications and `COMMIT`, in one simple-query message (with
//!    the bump, when no plan wrote the row).
//!
//! An empty Update, Lock and ReadLock cost two (open, end). The Go
//! original's statement sequence on the same schema takes ten
//! (`chatstate-testing`'s `goshape`, which `chatstate bench` compares
//! with).
//!
//! # Pieces
//!
//! - [`migrate`] applies the embedded schema migrations.
//! - [`PgNotifyListener`] receives the notifications as typed
//!   [`chatstate_model::Notification`]s and reports reconnects.
//! - [`PgApp::connection`] and [`PgApp::defer`] run the application's own
//!   statements in an Update's transaction (the handle
//!   [`chatstate::Tx::app`] returns), and [`create_chat_in`] creates a
//!   chat in the application's transaction (`docs/transactions.md`).
//! - [`migrations`] reports a database's migrations and prints the SQL
//!   of the pending ones.
//!
//! # Connection pools
//!
//! Build the pool with [`pool_options`]: it prepares the statements that
//! open transactions on every new connection, and does not ping a
//! connection when it is checked out (sqlx's default, one more round trip
//! per transaction). Any other pool works, at the price of those pings and
//! of preparing on a connection's first use.
//!
//! A sqlx pool also pings every connection that comes back to it (one
//! more round trip per transaction, in a task of its own). So a
//! [`PgStore`] keeps the connections of its finished transactions, up to
//! half the pool's maximum, and reuses them. One goes back to the pool
//! when something went wrong on it, when the store next needs a
//! connection after it sat unused for ten seconds, or when the last clone
//! of the store is dropped. A pool shared with other code therefore lends
//! the store up to half its connections between transactions.
//!
//! # Example
//!
//! ```
//! use chatstate::{ChatMachine, CreateChat, Notify, NewMessage, Options, create_chat};
//! use chatstate_store_pg::PgStore;
//! use chatstate_testing::throwaway::Cluster;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A fresh migrated database on a throwaway cluster (or DATABASE_URL).
//! let store = PgStore::new(Cluster::shared()?.new_database().await?);
//! let created = create_chat(&store, &Notify::InTransaction, CreateChat {
//!     messages: vec![NewMessage::user("hello")],
//!     ..CreateChat::default()
//! }).await?;
//! let chat = ChatMachine::new(store.clone(), Notify::InTransaction, created.chat_id,
//!                             Options::default());
//! let before = store.round_trips();
//! chat.update(async |tx| tx.commit_step(vec![NewMessage::assistant("hi")], false).await)
//!     .await?;
//! assert_eq!(store.round_trips() - before, 3);
//! # Ok(())
//! # }
//! ```

// First: the SQL fragments are macros, visible to the modules after it.
#[macro_use]
mod sql;
mod decode;
mod embedded;
mod error;
mod idle;
pub mod inspect;
mod jsonb;
mod listen;
pub mod migrations;
mod pooling;
mod resolve;
mod shared;
mod tx;

use std::sync::Arc;
use std::time::Duration;

use chatstate::{
    ChatMetadata, CreateOutcome, LeaseStatus, LockMode, Store, StoreError, StoreErrorKind,
    TestControl,
};
use chatstate_model::{
    ChatId, ChatRow, ChatStatus, ExecutionState, NewMessage, Notification, Options, Owner,
    RunnerId, Snapshot, WorkerId,
};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};

pub use error::PgStoreFault;
pub use inspect::{ChatFilter, inspect_chat, list_chats};
pub use listen::{LISTENER_APPLICATION_NAME, ListenerEvent, PgNotifyListener, update_channel};
pub use migrations::{MigrationStatus, migration_status, pending_sql};
pub use pooling::Pooling;
pub use resolve::CommitLost;
pub use shared::{PgApp, app_error, create_chat_in, sql_literal};
pub use tx::PgTx;

use crate::decode::get;
use crate::embedded::MIGRATOR;
use crate::error::{is_foreign_key_violation, store_error};
use crate::idle::IdleConnections;
use crate::resolve::Resolver;
use crate::sql::Opening;
use crate::tx::{RoundTrips, TxContext, micros};

/// The status values the schema accepts besides the model's
/// [`ChatStatus::KNOWN`]: legacy values a row may still hold, which
/// classify as Invalid.
pub const LEGACY_STATUSES: [&str; 3] = ["pending", "paused", "completed"];

/// Applies the embedded migrations (`store-pg/migrations/`) that are not
/// applied yet.
///
/// It migrates on a connection of its own, opened with the pool's connect
/// options and closed afterwards, whatever happened: the migrator holds a
/// session-level advisory lock while it works, and a failure would
/// otherwise leave that lock on a pooled connection, making every other
/// process's `migrate` wait for as long as that connection lives.
///
/// A database migrated by a newer binary (a migration applied that this
/// binary does not embed) is refused before anything runs, with
/// [`PgStoreFault::SchemaNewerThanBinary`] (kind
/// [`StoreErrorKind::Other`]; see [`PgStoreFault::of`]).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect_with(&*pool.connect_options())
        .await
        .map_err(|e| store_error("migrate", e))?;
    let result = migrate_with(&mut conn).await;
    // Ending the session releases the lock even if the migrator left it
    // held; a failure to say goodbye politely changes nothing.
    let _ = conn.close().await;
    result
}

/// The highest migration version this binary embeds.
fn binary_schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The highest migration version applied to the database, `None` before
/// the first migration.
async fn database_schema_version(conn: &mut sqlx::PgConnection) -> Result<Option<i64>, StoreError> {
    const CONTEXT: &str = "read the schema version";
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| store_error(CONTEXT, e))?;
    if !exists {
        return Ok(None);
    }
    sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| store_error(CONTEXT, e))
}

/// Applies the migrations on one connection (refusing a schema newer than
/// this binary first). The caller owns the connection and must close it
/// if this fails: the migrator's advisory lock may still be held on it.
///
/// It calls the migrator on a concrete connection type: the generic
/// `Migrator::run` over `Acquire` makes the returned future impossible to
/// prove `Send` in callers that need it (a known sqlx limitation).
async fn migrate_with(conn: &mut sqlx::PgConnection) -> Result<(), StoreError> {
    const CONTEXT: &str = "migrate";
    let binary = binary_schema_version();
    let newer = |database| PgStoreFault::SchemaNewerThanBinary { database, binary };
    if let Some(database) = database_schema_version(conn).await?
        && database > binary
    {
        return Err(newer(database).into_store(CONTEXT));
    }
    MIGRATOR
        .run_direct(None, conn, false)
        .await
        .map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => store_error(CONTEXT, e),
            sqlx::migrate::MigrateError::ExecuteMigration(e, _) => store_error(CONTEXT, e),
            // A newer binary migrated between the check and the lock.
            sqlx::migrate::MigrateError::VersionMissing(v) if v > binary => {
                newer(v).into_store(CONTEXT)
            }
            other => StoreError::new(CONTEXT, StoreErrorKind::Other, other),
        })
}

/// Records `n` as the `round_trips` field of the current span: the
/// machine's span of the Update, Lock, ReadLock, chat creation or
/// heartbeat the requests belong to (a span without the field ignores it).
pub(crate) fn record_round_trips(n: u64) {
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("round_trips", n);
    }
}

/// Pool options suited to this store: every new connection prepares the
/// statements that open transactions, and a connection is not pinged when
/// it is checked out (the lean path counts on one round trip to open a
/// transaction). Other pools work too; a connection then prepares on its
/// first opening, three round trips more, once.
///
/// Without the check, a connection that died with a server restart
/// fails the one Update that next uses it, with a retryable
/// [`StoreErrorKind::Connection`] (see
/// [`chatstate::ChatMachine::update_with_retry`]). The check would not
/// prevent that: the store hands out the connections it keeps itself,
/// without the pool (measured in docs/postgres.md, "Checking connections
/// on checkout").
pub fn pool_options() -> PgPoolOptions {
    pool_options_for(Pooling::Session)
}

/// Pool options for a store with the given [`Pooling`]:
/// [`pool_options`] for [`Pooling::Session`]; for
/// [`Pooling::Transaction`] the same without the session set-up (nothing
/// prepared, no session settings: a transaction pooler would hand them to
/// somebody else). Other code that shares such a pool must send its
/// statements unnamed too (sqlx's `.persistent(false)`, or `raw_sql`):
/// sqlx names the statements it prepares, even with its statement cache
/// turned off, and a name does not outlive its transaction there.
pub fn pool_options_for(pooling: Pooling) -> PgPoolOptions {
    if !pooling.persistent() {
        return PgPoolOptions::new()
            .test_before_acquire(false)
            .max_connections(16);
    }
    PgPoolOptions::new()
        .test_before_acquire(false)
        .max_connections(16)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                // Chat creation and heartbeats run as single statements in
                // implicit transactions, which take the session's default
                // isolation level; pin it whatever the database's default
                // is (transactions the store opens state it themselves).
                sqlx::raw_sql(sql::SESSION_READ_COMMITTED)
                    .execute(&mut *conn)
                    .await?;
                // The tables may not exist yet (a pool made before
                // migrating): then the openings prepare on first use.
                let _ = tx::prepare(conn, &[]).await;
                Ok(())
            })
        })
}

/// The PostgreSQL store.
///
/// Cheap to clone; clones share the pool and the round-trip counter.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    round_trips: RoundTrips,
    /// Connections between transactions (see the `idle` module).
    idle: Arc<IdleConnections>,
    /// What the store may keep in a session (see [`Pooling`]).
    pooling: Pooling,
}

impl PgStore {
    /// A store on a pool of a migrated database (see [`migrate`] and
    /// [`pool_options`]).
    pub fn new(pool: PgPool) -> Self {
        let options = pool.options();
        let idle = IdleConnections::new(
            (options.get_max_connections() / 2) as usize,
            options.get_min_connections(),
        );
        PgStore {
            pool,
            round_trips: RoundTrips::default(),
            idle: Arc::new(idle),
            pooling: Pooling::Session,
        }
    }

    /// The same store, for what sits between it and the server: behind a
    /// transaction pooler (PgBouncer `pool_mode = transaction`), give
    /// [`Pooling::Transaction`] and build the pool with
    /// [`pool_options_for`]`(Pooling::Transaction)`. See [`Pooling`].
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// What the store keeps in a session.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Checks that what sits between the store and the server suits its
    /// [`Pooling`]; run it once at start-up.
    ///
    /// - [`Pooling::Session`]: the connections must keep their server
    ///   session between transactions. A probe on two connections of the
    ///   pool (a few requests; skipped for a pool of one connection) tells
    ///   a transaction pooler by the backend changing under a connection:
    ///   [`PgStoreFault::SessionChanged`] then. The store's session state
    ///   (prepared statements, settings) would otherwise meet another
    ///   client's.
    /// - [`Pooling::Transaction`]: the store cannot pin the isolation level
    ///   of the statements it runs outside transactions, so the database's
    ///   `default_transaction_isolation` must be `read committed`
    ///   ([`PgStoreFault::IsolationNotReadCommitted`] otherwise).
    pub async fn check_pooling(&self) -> Result<(), StoreError> {
        const CONTEXT: &str = "check pooling";
        if self.pooling.persistent() {
            if self.pool.options().get_max_connections() < 2 {
                return Ok(());
            }
            let pooled = pooling::runs_on_transaction_pooler(&self.pool)
                .await
                .map_err(|e| store_error(CONTEXT, e))?;
            if pooled {
                let detail = "the backend changed between a connection's transactions".to_owned();
                return Err(PgStoreFault::SessionChanged { detail }.into_store(CONTEXT));
            }
            return Ok(());
        }
        let mut conn = self.connection().await?;
        self.round_trips.tick();
        let level: String = sqlx::query_scalar("SHOW default_transaction_isolation")
            .persistent(false)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| store_error(CONTEXT, e))?;
        self.keep(conn);
        if level != "read committed" {
            return Err(PgStoreFault::IsolationNotReadCommitted { level }.into_store(CONTEXT));
        }
        Ok(())
    }

    /// Counts the requests of one statement with parameters sent outside
    /// a transaction, and records them on the current span.
    fn tick_statement(&self, so_far: u64) -> u64 {
        let n = self.pooling.requests_per_statement();
        for _ in 0..n {
            self.round_trips.tick();
        }
        record_round_trips(so_far + n);
        so_far + n
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Requests awaited from the server so far by this store and its
    /// transactions (every statement or batch of statements sent,
    /// `BEGIN`, `COMMIT` and `ROLLBACK` included). The first use of a
    /// prepared statement on a connection also prepares it, which this
    /// counter does not see; it counts the steady state.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.get()
    }

    /// How many heartbeat rows the database holds, over every chat (a test
    /// aid to check that they stay bounded by the chats owned).
    pub async fn heartbeat_rows(&self) -> Result<usize, StoreError> {
        const CONTEXT: &str = "count heartbeat rows";
        self.round_trips.tick();
        let row = self
            .pooling
            .query(sql::HEARTBEAT_ROWS)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| store_error(CONTEXT, e))?;
        let n: i64 = get(&row, CONTEXT, "count")?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// How many backends of this database wait for a lock right now (a
    /// test aid to observe that a transaction blocks).
    pub async fn lock_waiters(&self) -> Result<usize, StoreError> {
        const CONTEXT: &str = "count lock waiters";
        self.round_trips.tick();
        let row = self
            .pooling
            .query(sql::LOCK_WAITERS)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| store_error(CONTEXT, e))?;
        let n: i64 = get(&row, CONTEXT, "count")?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    async fn open(
        &self,
        opening: Opening,
        chat: ChatId,
        options: &Options,
    ) -> Result<Option<(PgTx, Snapshot)>, StoreError> {
        let conn = self.connection().await?;
        let context = TxContext {
            idle: self.idle.clone(),
            round_trips: self.round_trips.clone(),
            resolver: Resolver::new(self.pool.connect_options()),
            pooling: self.pooling,
        };
        PgTx::open(conn, context, opening, chat, options).await
    }

    /// A connection: one this store kept from an earlier request, else one
    /// from the pool.
    pub(crate) async fn connection(&self) -> Result<PoolConnection<Postgres>, StoreError> {
        match self.idle.take() {
            Some(conn) => Ok(conn),
            None => self
                .pool
                .acquire()
                .await
                .map_err(|e| store_error("acquire connection", e)),
        }
    }

    /// Keeps a connection whose last request succeeded, outside a
    /// transaction, for the next request.
    pub(crate) fn keep(&self, conn: PoolConnection<Postgres>) {
        self.idle.put(conn);
    }
}

/// The execution state of a stored (status, archived, queue non-empty).
fn classify(status: &str, archived: bool, queued: bool) -> ExecutionState {
    ExecutionState::classify(&ChatStatus::parse(status), archived, queued)
}

impl Store for PgStore {
    type Tx = PgTx;

    async fn begin_update(
        &self,
        chat: ChatId,
        options: &Options,
    ) -> Result<Option<(PgTx, Snapshot)>, StoreError> {
        self.open(Opening::Update, chat, options).await
    }

    async fn begin_locked(
        &self,
        chat: ChatId,
        mode: LockMode,
        options: &Options,
    ) -> Result<Option<(PgTx, Snapshot)>, StoreError> {
        let opening = match mode {
            LockMode::Exclusive => Opening::Exclusive,
            LockMode::Shared => Opening::Shared,
        };
        self.open(opening, chat, options).await
    }

    async fn create_chat(
        &self,
        row: &ChatRow,
        metadata: &ChatMetadata,
        messages: &[NewMessage],
        notify: &[Notification],
    ) -> Result<CreateOutcome, StoreError> {
        const CONTEXT: &str = "create chat";
        let mut conn = self.connection().await?;
        let trips = self.tick_statement(0);
        let inserted = shared::insert_chat(
            &mut conn,
            CONTEXT,
            self.pooling,
            row,
            metadata,
            messages,
            notify,
        )
        .await
        // The statement commits on its own; a lost connection may have
        // come after its commit (see `resolve::implicit`).
        .map_err(resolve::implicit)?;
        let outcome = match inserted {
            shared::Inserted::Done(outcome) => outcome,
            // The conflicting row was committed by a concurrent create
            // after the statement's snapshot was taken: read it now.
            shared::Inserted::Raced => {
                self.tick_statement(trips);
                CreateOutcome::AlreadyExists(
                    shared::chat_state(&mut conn, CONTEXT, self.pooling, row).await?,
                )
            }
        };
        self.keep(conn);
        Ok(outcome)
    }

    async fn heartbeat(&self, chat: ChatId, runner: RunnerId) -> Result<LeaseStatus, StoreError> {
        const CONTEXT: &str = "upsert heartbeat";
        let mut conn = self.connection().await?;
        self.tick_statement(0);
        let row = match self
            .pooling
            .query(sql::HEARTBEAT)
            .bind(chat.0)
            .bind(runner.0)
            .fetch_one(&mut *conn)
            .await
        {
            Ok(row) => row,
            // The chat was deleted between the read and the foreign-key
            // check: it does not exist.
            Err(e) if is_foreign_key_violation(&e) => return Ok(LeaseStatus::ChatGone),
            Err(e) => return Err(resolve::implicit(store_error(CONTEXT, e))),
        };
        self.keep(conn);
        if !get::<bool>(&row, CONTEXT, "found")? {
            return Ok(LeaseStatus::ChatGone);
        }
        if get::<i64>(&row, CONTEXT, "written")? == 1 {
            return Ok(LeaseStatus::Held);
        }
        let worker: Option<uuid::Uuid> = get(&row, CONTEXT, "worker_id")?;
        let runner: Option<uuid::Uuid> = get(&row, CONTEXT, "runner_id")?;
        Ok(LeaseStatus::Lost {
            owner: worker.zip(runner).map(|(w, r)| Owner {
                worker_id: WorkerId(w),
                runner_id: RunnerId(r),
            }),
        })
    }

    async fn claimable(&self, options: &Options, limit: usize) -> Result<Vec<ChatId>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.claimable_query(options, Among::All { limit }).await
    }

    async fn claimable_among(
        &self,
        chats: &[ChatId],
        options: &Options,
    ) -> Result<Vec<ChatId>, StoreError> {
        if chats.is_empty() {
            return Ok(Vec::new());
        }
        let ids = chats.iter().map(|c| c.0).collect();
        self.claimable_query(options, Among::These(ids)).await
    }
}

/// Which chats a claimable query looks at.
enum Among {
    /// All of them, at most `limit` ([`sql::CLAIMABLE`]).
    All { limit: i64 },
    /// These ([`sql::CLAIMABLE_AMONG`]).
    These(Vec<uuid::Uuid>),
}

impl PgStore {
    /// Runs a claimable query: `$1` the model's runnable statuses (not a
    /// list re-stated here), `$2` the staleness, `$3` the limit or the ids.
    async fn claimable_query(
        &self,
        options: &Options,
        among: Among,
    ) -> Result<Vec<ChatId>, StoreError> {
        const CONTEXT: &str = "find claimable chats";
        let statuses: Vec<String> = ChatStatus::runnable()
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect();
        let stale = micros(options.heartbeat_stale);
        let query = match among {
            Among::All { limit } => self
                .pooling
                .query(sql::CLAIMABLE)
                .bind(statuses)
                .bind(stale)
                .bind(limit),
            Among::These(ids) => self
                .pooling
                .query(sql::CLAIMABLE_AMONG)
                .bind(statuses)
                .bind(stale)
                .bind(ids),
        };
        let mut conn = self.connection().await?;
        self.tick_statement(0);
        let rows = query
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| store_error(CONTEXT, e))?;
        self.keep(conn);
        rows.iter()
            .map(|r| get::<uuid::Uuid>(r, CONTEXT, "id").map(ChatId))
            .collect()
    }
}

impl TestControl for PgStore {
    /// Postgres time cannot move, so every stored instant (heartbeats,
    /// requires-action deadlines, compaction markers) moves back by `by`.
    async fn advance_clock(&self, by: Duration) -> Result<(), StoreError> {
        const CONTEXT: &str = "advance clock";
        self.round_trips.tick();
        self.pooling
            .query(sql::ADVANCE_CLOCK)
            .bind(micros(by))
            .execute(&self.pool)
            .await
            .map_err(|e| store_error(CONTEXT, e))?;
        Ok(())
    }

    async fn set_raw_state(
        &self,
        chat: ChatId,
        status: &ChatStatus,
        archived: bool,
    ) -> Result<(), StoreError> {
        const CONTEXT: &str = "set raw state";
        self.round_trips.tick();
        let done = self
            .pooling
            .query(sql::SET_RAW_STATE)
            .bind(chat.0)
            .bind(status.as_str())
            .bind(archived)
            .execute(&self.pool)
            .await
            .map_err(|e| store_error(CONTEXT, e))?;
        if done.rows_affected() == 0 {
            // As the in-memory store says it.
            return Err(PgStoreFault::ChatNotFound(chat).into_store(CONTEXT));
        }
        Ok(())
    }
}

//! [`PgTx`]: one open Postgres transaction holding chat row locks, and the
//! [`StoreTx`] operations on it.
//!
//! Every request sent on the connection ticks the store's round-trip
//! counter. A transaction handle that is dropped while its transaction is
//! open (a cancelled Update future, an error half-way) never goes back to
//! the pool: its connection is closed instead, so the server rolls the
//! transaction back and no later user inherits it. A handle whose
//! transaction ended hands its connection back to the store (see
//! `idle.rs`).
//!
//! # The snapshot bump
//!
//! An Update's bump of `snapshot_version` is taken by the opening (the
//! snapshot handed to the machine carries the bumped version) but written
//! later, by the first statement that writes the chat row anyway: the
//! plan's row write, which sets every version from the plan, or, when no
//! plan writes the row, one `EXECUTE chatstate_set_version` in the commit
//! message. The row lock is held from the opening on and nobody else sees
//! the row before the commit, so this is observably the same as bumping
//! first; [`StoreTx::load`] reports the bumped version too. It saves one
//! row update (a new row version, its constraint checks and WAL) per
//! Update, and no round trip is added.
//!
//! # The snapshot caches
//!
//! The chat row carries the queue ids and the tool bookkeeping (migration
//! 0002), so the opening reads no other table. Every plan that changes
//! the queue or the history rewrites them, with the version they belong
//! to, in the statement that writes the plan: the queue the plan leaves
//! ([`Plan::queue_after`] of the queue this transaction holds, then the id
//! the server gives an appended row) and the plan's tool bookkeeping
//! ([`Plan::tools`], the pure model's). The in-memory store derives both
//! from its tables instead, so the conformance tests would catch a cache
//! that strays.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chatstate::{ChatRecord, MetadataPatch, StoreError, StoreErrorKind, StoreTx};
use chatstate_model::{
    Assigned, ChatId, EditContext, EditTarget, JsonText, MAX_PAYLOAD_BYTES, MessageId,
    Notification, Options, Plan, QueuedMessageId, Snapshot, ToolState, content_to_value,
};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Postgres};

use crate::decode::{self, get};
use crate::error::{PgStoreFault, store_error};
use crate::idle::IdleConnections;
use crate::jsonb;
use crate::pooling::Pooling;
use crate::resolve::Resolver;
use crate::sql::{self, Opening};

/// Counts requests awaited from the server, shared by a store and its
/// transactions.
#[derive(Clone, Debug, Default)]
pub(crate) struct RoundTrips(Arc<AtomicU64>);

impl RoundTrips {
    pub(crate) fn tick(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// True if a statement named a prepared statement this session lacks.
fn is_unprepared(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("26000"))
}

/// Prepares the statements the openings execute that are not in
/// `existing` (one round trip, or none).
pub(crate) async fn prepare(
    conn: &mut sqlx::PgConnection,
    existing: &[String],
) -> Result<(), sqlx::Error> {
    let missing = sql::prepare_missing(existing);
    if !missing.is_empty() {
        sqlx::raw_sql(AssertSqlSafe(missing)).execute(conn).await?;
    }
    Ok(())
}

/// Microseconds of a duration, as SQL takes them.
pub(crate) fn micros(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// An open transaction of a [`crate::PgStore`].
///
/// Dropping it without [`StoreTx::commit`] or [`StoreTx::rollback`] closes
/// its connection, which makes the server roll the transaction back.
pub struct PgTx {
    /// `Some` until dropped.
    conn: Option<PoolConnection<Postgres>>,
    /// Where the connection goes after the transaction.
    idle: Arc<IdleConnections>,
    round_trips: RoundTrips,
    /// Requests this transaction sent (its share of `round_trips`).
    trips: u64,
    /// The server holds an open transaction for this handle.
    open: bool,
    /// A statement failed, so the server has aborted the transaction.
    aborted: bool,
    /// Chats this transaction locked exclusively (Update, nested Update,
    /// Lock), with their snapshot versions; only these may be written.
    exclusive: Vec<Versioned>,
    /// Chats this transaction locked at all.
    locked: Vec<ChatId>,
    /// The transaction id, returned by the exclusive lock (a shared lock
    /// writes nothing, so its commit needs no resolution).
    xid: Option<i64>,
    /// The server's incarnation when the exclusive lock was taken: the
    /// transaction id means this transaction only on it.
    incarnation: Option<String>,
    /// Resolves a commit whose connection was lost.
    resolver: Resolver,
    /// The application was handed the connection
    /// ([`crate::PgApp::connection`]): the commit checks that the
    /// transaction is still this one and alive.
    lent: bool,
    /// The application's statements deferred to the commit message
    /// ([`crate::PgApp::defer`]), each followed by a `;` line.
    deferred: String,
    /// What the session may keep (see [`crate::pooling`]).
    pooling: Pooling,
}

/// What a transaction shares with its store.
pub(crate) struct TxContext {
    /// Where the connection goes after the transaction.
    pub(crate) idle: Arc<IdleConnections>,
    pub(crate) round_trips: RoundTrips,
    /// Resolves a commit whose connection was lost.
    pub(crate) resolver: Resolver,
    /// What the session may keep.
    pub(crate) pooling: Pooling,
}

/// The snapshot version of an exclusively locked chat: as stored (in this
/// transaction) and as it must be at commit (one more per Update opened on
/// it).
#[derive(Clone, Debug)]
struct Versioned {
    chat: ChatId,
    stored: i64,
    target: i64,
    /// The queue as this transaction left it (the plans' writes keep the
    /// chat row's copy of it).
    queue: Vec<QueuedMessageId>,
}

impl std::fmt::Debug for PgTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTx")
            .field("open", &self.open)
            .field("aborted", &self.aborted)
            .field("locked", &self.locked)
            .finish_non_exhaustive()
    }
}

impl Drop for PgTx {
    fn drop(&mut self) {
        if self.open {
            // Returning the connection to the pool would hand an open (and
            // possibly mid-statement) transaction to the next user. Closing
            // it ends the session, and the server rolls back.
            if let Some(conn) = &mut self.conn {
                conn.close_on_drop();
            }
        } else if let Some(conn) = self.conn.take() {
            self.idle.put(conn);
        }
    }
}

/// The application's own statements in this transaction, through
/// [`crate::PgApp`] (the rules are there, a worked example in
/// `docs/transactions.md`).
impl PgTx {
    /// The open transaction's connection, lent to the application: from
    /// now on the commit checks that the transaction is still this one
    /// and alive.
    pub(crate) fn lend_connection(&mut self) -> &mut sqlx::PgConnection {
        self.lent = true;
        self.conn()
    }

    /// Appends one of the application's statements to the commit message.
    pub(crate) fn defer(&mut self, statement: impl sqlx::SqlSafeStr) {
        // The separator on a line of its own: a statement ending in a `--`
        // comment must not swallow it.
        self.deferred
            .push_str(statement.into_sql_str().as_str().trim_end());
        self.deferred.push_str("\n;\n");
    }

    /// The statement the commit message carries when the application
    /// wrote in this transaction: it fails with
    /// [`sql::ENDED_BY_CALLER`] if the transaction is no longer the one
    /// this handle opened (the application ended it), and with 25P02 if
    /// a failed statement aborted it (which `COMMIT` alone would turn
    /// into a silent rollback).
    fn guard(&self) -> Option<String> {
        let xid = self.xid?;
        (self.lent || !self.deferred.is_empty()).then(|| sql::same_transaction(xid))
    }
}

impl PgTx {
    /// Opens a transaction on `chat` with one simple query and returns the
    /// snapshot; `None` when the chat does not exist, with no transaction
    /// left open (one more round trip: `ROLLBACK`).
    pub(crate) async fn open(
        conn: PoolConnection<Postgres>,
        context: TxContext,
        opening: Opening,
        chat: ChatId,
        options: &Options,
    ) -> Result<Option<(PgTx, Snapshot)>, StoreError> {
        let TxContext {
            idle,
            round_trips,
            resolver,
            pooling,
        } = context;
        let mut tx = PgTx {
            conn: Some(conn),
            idle,
            round_trips,
            trips: 0,
            // Set before BEGIN is sent: if this future is dropped while the
            // request is in flight, Drop must not return the connection.
            open: true,
            aborted: false,
            exclusive: Vec::new(),
            locked: Vec::new(),
            xid: None,
            incarnation: None,
            resolver,
            lent: false,
            deferred: String::new(),
            pooling,
        };
        match tx.lock(opening, chat, options).await? {
            Some(snap) => Ok(Some((tx, snap))),
            None => {
                tx.rollback_now("end transaction on a missing chat").await?;
                Ok(None)
            }
        }
    }

    /// Sends one opening (lock, maybe bump, snapshot) and records the lock.
    async fn lock(
        &mut self,
        opening: Opening,
        chat: ChatId,
        options: &Options,
    ) -> Result<Option<Snapshot>, StoreError> {
        const CONTEXT: &str = "lock chat and read snapshot";
        let text = sql::opening(
            opening,
            chat.0,
            micros(options.heartbeat_stale),
            self.pooling,
        );
        self.tick();
        let rows = match sqlx::raw_sql(AssertSqlSafe(text.clone()))
            .fetch_all(&mut **self.conn())
            .await
        {
            Ok(rows) => rows,
            // A session whose statements were never prepared (a pool not
            // made with `pool_options`, or one reset by a pooler): prepare
            // them and open again. A nested opening cannot get here, since
            // the outer opening ran on this session. Such a session was not
            // set up by `pool_options` either, so it gets the isolation
            // level of chat creation and heartbeats pinned here too.
            Err(e)
                if is_unprepared(&e) && opening != Opening::Nested && self.pooling.persistent() =>
            {
                self.tick();
                let names = sqlx::raw_sql(AssertSqlSafe(format!(
                    "ROLLBACK; {}; {}",
                    sql::SESSION_READ_COMMITTED,
                    sql::PREPARED_NAMES
                )))
                .fetch_all(&mut **self.conn())
                .await
                .map_err(|e| self.failed(CONTEXT, e))?;
                let names: Vec<String> = names
                    .iter()
                    .map(|r| get(r, CONTEXT, "name"))
                    .collect::<Result<_, _>>()?;
                self.tick();
                prepare(self.conn(), &names)
                    .await
                    .map_err(|e| self.failed(CONTEXT, e))?;
                self.simple(CONTEXT, text).await?
            }
            Err(e) => return Err(self.failed(CONTEXT, e)),
        };
        // The exclusive lock's row carries the transaction id only; the
        // shared lock's has no columns; the snapshot's row comes last.
        let is_xid = |r: &PgRow| sqlx::Row::try_column(r, "xid").is_ok();
        if let Some(row) = rows.iter().find(|r| is_xid(r)) {
            self.xid = Some(get(row, CONTEXT, "xid")?);
            self.incarnation = Some(get(row, CONTEXT, "incarnation")?);
        }
        let Some(row) = rows
            .iter()
            .rev()
            .find(|r| !sqlx::Row::is_empty(*r) && !is_xid(r))
        else {
            return Ok(None);
        };
        let mut snap = decode::snapshot(row, CONTEXT)?;
        if !self.locked.contains(&chat) {
            self.locked.push(chat);
        }
        let bump = i64::from(matches!(opening, Opening::Update | Opening::Nested));
        match self.exclusive.iter_mut().find(|v| v.chat == chat) {
            // Locked exclusively before (a nested Update of a chat this
            // transaction holds): one more bump on top of the pending ones.
            Some(v) => {
                v.target += bump;
                snap.row.versions.snapshot = v.target;
                v.queue.clone_from(&snap.queue);
            }
            None if opening != Opening::Shared => {
                let stored = snap.row.versions.snapshot;
                self.exclusive.push(Versioned {
                    chat,
                    stored,
                    target: stored + bump,
                    queue: snap.queue.clone(),
                });
                snap.row.versions.snapshot = stored + bump;
            }
            None => {}
        }
        Ok(Some(snap))
    }

    /// Counts one request sent on this transaction's connection.
    fn tick(&mut self) {
        self.round_trips.tick();
        self.trips += 1;
    }

    /// Counts the requests of one statement with parameters (two when it
    /// cannot stay prepared in the session).
    fn tick_statement(&mut self) {
        for _ in 0..self.pooling.requests_per_statement() {
            self.tick();
        }
    }

    /// The connection (present until the handle is dropped).
    fn conn(&mut self) -> &mut PoolConnection<Postgres> {
        self.conn
            .as_mut()
            .expect("the connection is taken only on drop")
    }

    /// Sends a simple query (several statements, one round trip).
    async fn simple(
        &mut self,
        context: &'static str,
        text: String,
    ) -> Result<Vec<PgRow>, StoreError> {
        self.tick();
        sqlx::raw_sql(AssertSqlSafe(text))
            .fetch_all(&mut **self.conn())
            .await
            .map_err(|e| self.failed(context, e))
    }

    /// Records that the server aborted the transaction and maps the error.
    fn failed(&mut self, context: &'static str, e: sqlx::Error) -> StoreError {
        self.aborted = true;
        store_error(context, e)
    }

    /// The versions of a chat this transaction locked exclusively.
    fn require_exclusive(
        &mut self,
        chat: ChatId,
        context: &'static str,
    ) -> Result<&mut Versioned, StoreError> {
        self.exclusive
            .iter_mut()
            .find(|v| v.chat == chat)
            .ok_or_else(|| PgStoreFault::NotLocked.into_store(context))
    }

    fn require_locked(&self, chat: ChatId, context: &'static str) -> Result<(), StoreError> {
        if self.locked.contains(&chat) {
            Ok(())
        } else {
            Err(PgStoreFault::NotLocked.into_store(context))
        }
    }

    /// `ROLLBACK`; afterwards the connection may go back to the pool.
    async fn rollback_now(&mut self, context: &'static str) -> Result<(), StoreError> {
        self.tick();
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut **self.conn())
            .await
            .map_err(|e| store_error(context, e))?;
        self.open = false;
        crate::record_round_trips(self.trips);
        Ok(())
    }
}

/// What a failed commit message means when it carried the application's
/// statements: the guard's own failures become this store's faults, any
/// other error (an application statement's, a lost connection) stays as
/// it is. The transaction never committed in the first two cases; the
/// handle stays open, so its connection is closed rather than reused.
fn guard_failure(context: &'static str, e: StoreError) -> StoreError {
    match crate::error::sqlstate(&e).as_deref() {
        Some(sql::ENDED_BY_CALLER) => PgStoreFault::TransactionEndedByCaller.into_store(context),
        Some("25P02") => PgStoreFault::TransactionAborted.into_store(context),
        _ => e,
    }
}

/// The notifications of a commit as `SELECT pg_notify(...);` statements,
/// with every value quoted as an escape-string literal.
pub(crate) fn notify_statements(notify: &[Notification]) -> Result<String, PgStoreFault> {
    let mut out = String::new();
    for n in notify {
        let channel = n.channel();
        let payload = n.payload();
        if payload.len() >= MAX_PAYLOAD_BYTES {
            return Err(PgStoreFault::PayloadTooLarge {
                channel,
                len: payload.len(),
                max: MAX_PAYLOAD_BYTES,
            });
        }
        let payload = String::from_utf8(payload).map_err(|e| PgStoreFault::Malformed {
            column: "payload",
            reason: e.to_string(),
        })?;
        out.push_str("SELECT pg_notify(");
        out.push_str(&quote_literal(&channel)?);
        out.push_str(", ");
        out.push_str(&quote_literal(&payload)?);
        out.push_str("); ");
    }
    Ok(out)
}

/// Quotes text as a Postgres escape-string literal (`E'...'`): backslashes
/// and single quotes doubled. Postgres text cannot hold NUL, so a NUL is
/// refused rather than silently truncated.
pub(crate) fn quote_literal(s: &str) -> Result<String, PgStoreFault> {
    if s.contains('\0') {
        return Err(PgStoreFault::NulInLiteral);
    }
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("E'");
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("''"),
            c => out.push(c),
        }
    }
    out.push('\'');
    Ok(out)
}

/// The stored JSON text of a model JSON value (see [`jsonb`]).
/// Binds the execution-state columns of a row, in the order every
/// statement that writes a whole row takes them: status, archived, worker,
/// runner, last error, retry state, generation attempt, deadline,
/// compaction marker, then the four versions.
pub(crate) fn bind_row<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    row: &'q chatstate_model::ChatRow,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(row.status.as_str())
        .bind(row.archived)
        .bind(row.owner.map(|o| o.worker_id.0))
        .bind(row.owner.map(|o| o.runner_id.0))
        .bind(row.last_error.as_ref().map(stored_json))
        .bind(row.retry_state.as_ref().map(stored_json))
        .bind(row.generation_attempt)
        .bind(row.requires_action_deadline_at.map(|t| t.0))
        .bind(row.compaction_requested_at.map(|t| t.0))
        .bind(row.versions.snapshot)
        .bind(row.versions.history)
        .bind(row.versions.queue)
        .bind(row.versions.retry_state)
}

pub(crate) fn stored_json(j: &JsonText) -> String {
    jsonb::encode_text(&j.to_value())
}

/// The stored JSON text of the tool bookkeeping (the `tool_state` column).
pub(crate) fn tool_state_json(tools: &ToolState) -> String {
    let value = serde_json::to_value(tools).expect("tool bookkeeping serialises to JSON");
    jsonb::encode_text(&value)
}

/// A message as the insert statements read it (one element of a JSON
/// array).
pub(crate) fn message_json(m: &chatstate_model::NewMessage) -> serde_json::Value {
    serde_json::json!({
        "role": m.role.as_str(),
        "content": jsonb::encode(&content_to_value(&m.content)),
        "visibility": m.visibility.as_str(),
        "model_config_id": m.model_config_id,
        "created_by": m.created_by,
    })
}

fn count(row: &PgRow, context: &'static str, col: &str) -> Result<usize, StoreError> {
    let n: i64 = get(row, context, col)?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

fn check_rows(what: &'static str, expected: usize, actual: usize) -> Result<(), StoreError> {
    if expected == actual {
        Ok(())
    } else {
        Err(PgStoreFault::PlanMismatch {
            what,
            expected,
            actual,
        }
        .into_store("apply plan"))
    }
}

/// True when a plan writes nothing at all (so no statement is needed).
fn writes_nothing(plan: &Plan) -> bool {
    !plan.row_changed
        && plan.soft_delete.is_empty()
        && plan.reorder_to_head.is_none()
        && plan.delete_queued.is_empty()
        && plan.append_queued.is_none()
        && plan.messages.is_empty()
        && plan.promote.is_none()
        && plan.heartbeat.is_none()
        && !plan.prune_heartbeats
}

impl StoreTx for PgTx {
    type App<'a> = crate::PgApp<'a>;

    fn app(&mut self) -> crate::PgApp<'_> {
        crate::PgApp::new(self)
    }

    async fn apply(&mut self, chat: ChatId, plan: &Plan) -> Result<Assigned, StoreError> {
        const CONTEXT: &str = "apply plan";
        let versioned = self.require_exclusive(chat, CONTEXT)?;
        if writes_nothing(plan) {
            // A pending bump waits for the commit.
            return Ok(Assigned::default());
        }
        let stored = versioned.stored;
        let row = &plan.row;
        let shape = sql::Shape {
            soft: !plan.soft_delete.is_empty(),
            reorder: plan.reorder_to_head.is_some(),
            dequeue: !plan.delete_queued.is_empty() || plan.promote.is_some(),
            enqueue: plan.append_queued.is_some(),
            // One message on its own binds its fields; with a promoted row
            // after it, or more, the messages go as a JSON array.
            messages: match plan.messages.len() {
                0 => sql::Messages::None,
                1 if plan.promote.is_none() => sql::Messages::One,
                _ => sql::Messages::Many,
            },
            promote: plan.promote.is_some(),
            beat: plan.heartbeat.is_some(),
            prune: plan.prune_heartbeats,
            row: plan.row_changed,
            // A row write sets the version anyway; without one, a pending
            // bump rides along with this statement instead of the commit.
            bump: !plan.row_changed && stored != row.versions.snapshot,
        };
        // The queue the plan leaves, but for the appended row (whose id the
        // statement appends): kept on the chat row with the queue.
        let queue_after = shape.queue().then(|| {
            plan.queue_after(&versioned.queue, None)
                .iter()
                .map(|q| q.0)
                .collect::<Vec<i64>>()
        });
        let ids = |v: &[MessageId]| v.iter().map(|m| m.0).collect::<Vec<i64>>();
        let qids = |v: &[QueuedMessageId]| v.iter().map(|q| q.0).collect::<Vec<i64>>();
        let append = plan.append_queued.as_ref();
        let single = match plan.messages.as_slice() {
            [one] if shape.messages == sql::Messages::One => Some(one),
            _ => None,
        };
        let messages = (shape.messages == sql::Messages::Many).then(|| {
            serde_json::Value::Array(plan.messages.iter().map(message_json).collect()).to_string()
        });
        // The tool bookkeeping goes with every change of the history (the
        // snapshot reads it instead of folding the history).
        let tools = shape.history().then(|| tool_state_json(&plan.tools));
        let query = self
            .pooling
            .query(sql::apply(shape))
            .bind(chat.0)
            .bind(row.versions.snapshot)
            .bind(ids(&plan.soft_delete))
            .bind(plan.reorder_to_head.map(|q| q.0))
            .bind(qids(&plan.delete_queued))
            .bind(append.map(|a| jsonb::encode_text(&content_to_value(&a.content))))
            .bind(append.and_then(|a| a.model_config_id))
            .bind(append.map(|a| a.created_by))
            .bind(messages)
            .bind(plan.promote.map(|q| q.0))
            .bind(plan.heartbeat.map(|r| r.0));
        let query = bind_row(query, row)
            .bind(tools)
            .bind(queue_after)
            .bind(single.map(|m| m.role.as_str()))
            .bind(single.map(|m| jsonb::encode_text(&content_to_value(&m.content))))
            .bind(single.map(|m| m.visibility.as_str()))
            .bind(single.and_then(|m| m.model_config_id))
            .bind(single.and_then(|m| m.created_by))
            .bind(row.last_model_config_id);
        self.tick_statement();
        let result = query.fetch_all(&mut **self.conn()).await;
        let rows = result.map_err(|e| self.failed(CONTEXT, e))?;
        // The plan was decided on the snapshot this transaction locked, so
        // every part must touch exactly the rows it names. Anything else
        // means the chat was written outside a transition; the caller's
        // error rolls the whole transaction back. The statement returns
        // rows only if it wrote the chat row (one per inserted message, or
        // one).
        let Some(out) = rows.first() else {
            return Err(PgStoreFault::PlanMismatch {
                what: if shape.inserts() {
                    "row write with history insert"
                } else {
                    "row write"
                },
                expected: if shape.inserts() {
                    plan.inserted_len()
                } else {
                    1
                },
                actual: 0,
            }
            .into_store(CONTEXT));
        };
        let counted = |on: bool, col: &str| -> Result<usize, StoreError> {
            if on { count(out, CONTEXT, col) } else { Ok(0) }
        };
        check_rows(
            "soft deletes",
            plan.soft_delete.len(),
            counted(shape.soft, "soft_deleted")?,
        )?;
        check_rows(
            "queue reorder",
            usize::from(plan.reorder_to_head.is_some()),
            counted(shape.reorder, "reordered")?,
        )?;
        check_rows(
            "queue deletes",
            plan.delete_queued.len() + usize::from(plan.promote.is_some()),
            counted(shape.dequeue, "dequeued")?,
        )?;
        check_rows(
            "heartbeat",
            usize::from(plan.heartbeat.is_some()),
            counted(shape.beat, "beats")?,
        )?;
        let mut inserted = Vec::new();
        if shape.inserts() {
            for r in &rows {
                inserted.push(get::<i64>(r, CONTEXT, "id")?);
            }
            // Ids follow insertion order, which is plan order.
            inserted.sort_unstable();
        }
        check_rows("message inserts", plan.inserted_len(), inserted.len())?;
        let queued: Option<i64> = if shape.enqueue {
            get(out, CONTEXT, "queued_id")?
        } else {
            None
        };
        check_rows(
            "queue append",
            usize::from(plan.append_queued.is_some()),
            usize::from(queued.is_some()),
        )?;
        let assigned = Assigned {
            messages: inserted.into_iter().map(MessageId).collect(),
            queued: queued.map(QueuedMessageId),
        };
        let versioned = self.require_exclusive(chat, CONTEXT)?;
        if shape.writes_chat() {
            versioned.stored = row.versions.snapshot;
        }
        versioned.queue = plan.queue_after(&versioned.queue, assigned.queued);
        Ok(assigned)
    }

    async fn edit_context(
        &mut self,
        chat: ChatId,
        message: MessageId,
    ) -> Result<EditContext, StoreError> {
        const CONTEXT: &str = "read edit context";
        self.require_locked(chat, CONTEXT)?;
        self.tick_statement();
        let row = self
            .pooling
            .query(sql::EDIT_CONTEXT)
            .bind(chat.0)
            .bind(message.0)
            .fetch_one(&mut **self.conn())
            .await
            .map_err(|e| self.failed(CONTEXT, e))?;
        let role: Option<String> = get(&row, CONTEXT, "role")?;
        let target = match role {
            None => None,
            Some(role) => {
                let visibility: String = get(&row, CONTEXT, "visibility")?;
                Some(EditTarget {
                    role: decode::role(&role, CONTEXT)?,
                    visibility: decode::visibility(&visibility, CONTEXT)?,
                    model_config_id: get(&row, CONTEXT, "model_config_id")?,
                })
            }
        };
        let from_target: Vec<i64> = get(&row, CONTEXT, "from_target")?;
        let tools: String = get(&row, CONTEXT, "tools")?;
        Ok(EditContext {
            message_id: message,
            target,
            from_target: from_target.into_iter().map(MessageId).collect(),
            tools_before: decode::tool_state(&tools, CONTEXT)?,
        })
    }

    async fn begin_nested(
        &mut self,
        chat: ChatId,
        options: &Options,
    ) -> Result<Option<Snapshot>, StoreError> {
        self.lock(Opening::Nested, chat, options).await
    }

    async fn load(&mut self, chat: ChatId) -> Result<ChatRecord, StoreError> {
        const CONTEXT: &str = "load chat";
        self.require_locked(chat, CONTEXT)?;
        self.tick_statement();
        let row = self
            .pooling
            .query(sql::LOAD_ROW)
            .bind(chat.0)
            .fetch_one(&mut **self.conn())
            .await
            .map_err(|e| self.failed(CONTEXT, e))?;
        self.tick_statement();
        let queue = self
            .pooling
            .query(sql::LOAD_QUEUE)
            .bind(chat.0)
            .fetch_all(&mut **self.conn())
            .await
            .map_err(|e| self.failed(CONTEXT, e))?;
        self.tick_statement();
        let history = self
            .pooling
            .query(sql::LOAD_HISTORY)
            .bind(chat.0)
            .fetch_all(&mut **self.conn())
            .await
            .map_err(|e| self.failed(CONTEXT, e))?;
        let mut chat_row = decode::chat_row(&row, CONTEXT)?;
        // The row as this transaction's Updates left it, their bumps
        // included even if not written yet.
        if let Some(v) = self.exclusive.iter().find(|v| v.chat == chat) {
            chat_row.versions.snapshot = v.target;
        }
        Ok(ChatRecord {
            row: chat_row,
            metadata: decode::metadata(&row, CONTEXT)?,
            queue: queue
                .iter()
                .map(|r| decode::queued(r, CONTEXT))
                .collect::<Result<_, _>>()?,
            history: history
                .iter()
                .map(|r| decode::message(r, CONTEXT))
                .collect::<Result<_, _>>()?,
        })
    }

    async fn write_metadata(
        &mut self,
        chat: ChatId,
        patch: &MetadataPatch,
    ) -> Result<(), StoreError> {
        const CONTEXT: &str = "write metadata";
        self.require_exclusive(chat, CONTEXT)?;
        if patch.title.is_none() && patch.labels.is_none() && patch.metadata.is_none() {
            return Ok(());
        }
        let labels = patch
            .labels
            .as_ref()
            .map(|l| jsonb::encode_text(&serde_json::json!(l)));
        let metadata = patch
            .metadata
            .as_ref()
            .and_then(|m| m.as_ref().map(stored_json));
        self.tick_statement();
        let done = self
            .pooling
            .query(sql::WRITE_METADATA)
            .bind(chat.0)
            .bind(patch.title.as_deref().map(jsonb::encode_str))
            .bind(labels)
            .bind(patch.metadata.is_some())
            .bind(metadata)
            .execute(&mut **self.conn())
            .await
            .map_err(|e| self.failed(CONTEXT, e))?;
        check_rows("metadata", 1, done.rows_affected() as usize)
    }

    async fn commit(mut self, notify: &[Notification]) -> Result<(), StoreError> {
        const CONTEXT: &str = "commit";
        if self.aborted {
            // COMMIT of an aborted transaction "succeeds" as a rollback;
            // say what really happened.
            self.rollback_now(CONTEXT).await?;
            return Err(PgStoreFault::TransactionAborted.into_store(CONTEXT));
        }
        let notifications = match notify_statements(notify) {
            Ok(text) => text,
            Err(fault) => {
                self.rollback_now(CONTEXT).await?;
                return Err(fault.into_store(CONTEXT));
            }
        };
        // The bumps no plan wrote (an Update without a row write), then
        // the notifications: NOTIFY is transactional, so Postgres delivers
        // them only if this COMMIT succeeds, in order, and never on
        // rollback.
        let mut text = String::new();
        for v in self.exclusive.iter().filter(|v| v.stored != v.target) {
            text.push_str(&sql::set_version(v.chat.0, v.target, self.pooling));
        }
        // The application's deferred statements, then the check that the
        // transaction is still this one and alive: a failure in either
        // stops the message before COMMIT.
        text.push_str(&self.deferred);
        let guarded = self.guard();
        if let Some(guard) = &guarded {
            text.push_str(guard);
        }
        text.push_str(&notifications);
        text.push_str("COMMIT");
        let committed = self.simple(CONTEXT, text).await;
        crate::record_round_trips(self.trips);
        let committed = match committed {
            Err(e) if guarded.is_some() => Err(guard_failure(CONTEXT, e)),
            other => other,
        };
        match committed {
            Ok(_) => {
                self.open = false;
                Ok(())
            }
            // The connection failed with COMMIT sent (or about to be): the
            // server may have committed. Ask a fresh connection (see
            // `resolve`). The dead connection stays marked open, so Drop
            // closes it instead of reusing it.
            Err(lost) if lost.kind == StoreErrorKind::Connection => match self.xid {
                Some(xid) => {
                    let incarnation = self.incarnation.clone().unwrap_or_default();
                    self.resolver.commit(CONTEXT, xid, &incarnation, lost).await
                }
                // Only a shared lock has no id, and it wrote nothing:
                // committed or not, nothing changed.
                None => Err(lost),
            },
            // The server answered with an error: it rolled back.
            Err(e) => Err(e),
        }
    }

    async fn rollback(mut self) -> Result<(), StoreError> {
        self.rollback_now("rollback").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_escaped() {
        assert_eq!(quote_literal("a'b\\c").unwrap(), r"E'a''b\\c'");
        assert_eq!(quote_literal("").unwrap(), "E''");
        assert!(matches!(
            quote_literal("a\0b"),
            Err(PgStoreFault::NulInLiteral)
        ));
    }

    #[test]
    fn oversized_payloads_are_refused() {
        use chatstate_model::{ChatUpdate, OwnershipHint};
        let chat = ChatId(uuid::Uuid::nil());
        let ok = Notification::Ownership(OwnershipHint {
            chat_id: chat,
            snapshot_version: 1,
        });
        let text = notify_statements(std::slice::from_ref(&ok)).unwrap();
        assert!(text.starts_with("SELECT pg_notify(E'chat:ownership', E'{"));
        let big = Notification::Update {
            chat_id: chat,
            update: ChatUpdate {
                snapshot_version: 1,
                worker_id: None,
                runner_id: None,
                history_version: 0,
                queue_version: 0,
                retry_state_version: 0,
                generation_attempt: 0,
                status: "x".repeat(MAX_PAYLOAD_BYTES),
                archived: false,
            },
        };
        assert!(matches!(
            notify_statements(&[ok, big]),
            Err(PgStoreFault::PayloadTooLarge { .. })
        ));
    }
}

//! The application's writes in chatstate's transactions, and chatstate's
//! writes in the application's.
//!
//! Both directions put the application's own rows (billing, an outbox, an
//! audit trail) and the chat's change in one Postgres transaction, so they
//! commit or roll back together:
//!
//! - **In an Update**: [`chatstate::Tx::app`] hands the callback a
//!   [`PgApp`], which offers the open connection ([`PgApp::connection`],
//!   one round trip per statement) and statements deferred into the commit
//!   message ([`PgApp::defer`], no round trip at all), and none of the
//!   store transaction's own methods.
//! - **Creating a chat in the application's transaction**:
//!   [`create_chat_in`] inserts the chat on a connection whose transaction
//!   the application opened and commits itself.
//!
//! The chat tables stay writable through transitions alone, and a failed
//! application statement can never let a half of the transaction commit:
//! see [`PgApp::connection`] for the rules and `docs/transactions.md` for
//! a worked example.

use chatstate::{
    ChatMetadata, CreateChat, CreateOutcome, CreatedPending, Error, Notify, StoreError,
};
use chatstate_model::{ChatRow, ExecutionState, MessageId, NewMessage, Notification, ToolState};
use sqlx::PgConnection;

use crate::decode::get;
use crate::error::{PgStoreFault, store_error};
use crate::pooling::Pooling;
use crate::tx::{self, PgTx, bind_row, message_json, stored_json, tool_state_json};
use crate::{classify, jsonb, sql};

/// What the application may do in an Update's transaction on Postgres
/// ([`chatstate::StoreTx::App`] of [`PgTx`]), reached with
/// [`chatstate::Tx::app`]: run statements on its own tables on the open
/// connection, or defer them to the commit.
///
/// The handle borrows the transaction but offers none of its methods (no
/// plan, no chat row, no metadata, no nested lock): those stay with the
/// Update's transitions. The connection it lends is for the application's
/// tables only, like any other connection the application has; see
/// [`PgApp::connection`] for the rules.
///
/// ```compile_fail,E0599
/// # use chatstate::{Error, MetadataPatch, StoreTx, Tx};
/// # use chatstate_store_pg::PgStore;
/// async fn bypass(tx: &mut Tx<'_, PgStore>) -> Result<(), Error> {
///     let chat = tx.chat_id();
///     // No `write_metadata` (nor `apply`, `load`, `begin_nested`) here.
///     tx.app().write_metadata(chat, &MetadataPatch::default()).await?;
///     Ok(())
/// }
/// ```
pub struct PgApp<'a> {
    tx: &'a mut PgTx,
}

impl std::fmt::Debug for PgApp<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgApp").field("tx", &self.tx).finish()
    }
}

impl<'a> PgApp<'a> {
    pub(crate) fn new(tx: &'a mut PgTx) -> Self {
        PgApp { tx }
    }

    /// The connection of this open transaction, to run the application's
    /// own statements on its own tables in the same database transaction
    /// as the Update's transitions: committed with them, rolled back with
    /// them.
    ///
    /// Every statement costs its own round trip (the store's
    /// [`crate::PgStore::round_trips`] does not count them);
    /// [`PgApp::defer`] costs none.
    ///
    /// Rules, checked where they can be:
    /// - Only the application's tables, as on any other connection the
    ///   application has. The chat tables are written through transitions
    ///   alone; a write to them here bypasses the matrix and the versions.
    ///   The store notices some such writes (a later plan that finds other
    ///   rows than it was decided on fails with
    ///   [`crate::PgStoreFault::PlanMismatch`] and the Update rolls back)
    ///   but not all of them.
    /// - A failed statement aborts the Postgres transaction. Return its
    ///   error from the callback (map it with [`crate::app_error`]) and
    ///   the Update rolls back. If the callback swallows it, the commit
    ///   finds the transaction aborted and fails with
    ///   [`crate::PgStoreFault::TransactionAborted`]: nothing commits,
    ///   nothing is published.
    /// - Never end the transaction here (`COMMIT`, `ROLLBACK`, sqlx's
    ///   `begin()` on this connection, which sends a second `BEGIN` and a
    ///   `COMMIT`). The commit checks that the transaction it opened is
    ///   still open; if not, it sends nothing more and fails with
    ///   [`crate::PgStoreFault::TransactionEndedByCaller`], an unknown
    ///   outcome. Savepoints (`SAVEPOINT`, `ROLLBACK TO SAVEPOINT`) are
    ///   fine.
    /// - Behind a transaction pooler ([`crate::Pooling::Transaction`]),
    ///   send statements unnamed (`.persistent(false)`, or `raw_sql`): a
    ///   statement sqlx names and keeps would not outlive the transaction
    ///   there (docs/deployment.md).
    pub fn connection(&mut self) -> &mut PgConnection {
        self.tx.lend_connection()
    }

    /// Defers one of the application's statements to the commit: it is
    /// sent in the commit's own message, after the transitions' writes and
    /// before `COMMIT`, so it costs no round trip. Its results are not
    /// returned, and it takes no bind parameters (the commit message is a
    /// simple query): inline values with [`crate::sql_literal`]. The
    /// statement text is a [`sqlx::SqlSafeStr`], as for sqlx's own
    /// queries: a `&'static str`, or text the caller vouches for with
    /// [`sqlx::AssertSqlSafe`].
    ///
    /// If it fails (a unique violation, say), Postgres runs nothing after
    /// it, `COMMIT` included: the Update fails with that error
    /// ([`chatstate::CommitState::NotCommitted`]) and nothing of it
    /// commits. The rules of [`PgApp::connection`] apply.
    pub fn defer(&mut self, statement: impl sqlx::SqlSafeStr) {
        self.tx.defer(statement);
    }
}

/// The machine error for a failed application statement in an Update's
/// transaction: a store error classified like the store's own (a unique
/// violation is [`chatstate::StoreErrorKind::Data`], a lost connection
/// [`chatstate::StoreErrorKind::Connection`] and retryable, ...). Return
/// it from the Update's callback and the Update rolls back.
pub fn app_error(e: sqlx::Error) -> Error {
    Error::Store(store_error("application statement", e))
}

/// Quotes text as a Postgres string literal, for the values of a
/// statement given to [`PgApp::defer`] (which takes
/// no bind parameters). Text holding a NUL byte, which Postgres text
/// cannot carry, is refused.
pub fn sql_literal(text: &str) -> Result<String, PgStoreFault> {
    tx::quote_literal(text)
}

/// Creates a chat inside a transaction the application opened on `conn`
/// (an `&mut *` of a [`sqlx::Transaction`], or a connection after
/// `BEGIN`): the chat and whatever else the application writes in that
/// transaction commit together, when the application commits.
///
/// The creation's notifications (a `chat:update` and an ownership hint)
/// must not leave before that commit, and must never leave if the
/// application rolls back:
///
/// - with [`Notify::InTransaction`] they are issued with `pg_notify` in
///   the application's transaction, which Postgres delivers at its commit
///   and drops on rollback; [`CreatedPending::notifications`] is empty;
/// - with [`Notify::AfterCommit`] nothing is published here: they are
///   returned in [`CreatedPending::notifications`], and the application
///   calls [`CreatedPending::publish`] once its commit has succeeded.
///
/// A chat with the same id is a rejection, as for
/// [`chatstate::create_chat`]; nothing was written and the application's
/// transaction stays usable. Any other failure is a store error after
/// which the application's transaction is aborted: roll it back. (A lost
/// connection means it did not commit: the application had not committed
/// yet.)
///
/// Its statements are sent unnamed, so it works on a connection behind a
/// transaction pooler too (see [`Pooling`](crate::Pooling)); that costs
/// one round trip more than a statement kept prepared.
///
/// ```no_run
/// # use chatstate::{CreateChat, NewMessage, Notify};
/// # async fn f(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// let mut tx = pool.begin().await?;
/// let pending = chatstate_store_pg::create_chat_in(&mut tx, &Notify::InTransaction,
///     CreateChat { messages: vec![NewMessage::user("hello")], ..CreateChat::default() },
/// ).await?;
/// sqlx::query("INSERT INTO conversations (chat_id) VALUES ($1)")
///     .bind(pending.created.chat_id.0)
///     .execute(&mut *tx)
///     .await?;
/// tx.commit().await?; // the chat, the application's row and the notifications
/// # Ok(())
/// # }
/// ```
pub async fn create_chat_in(
    conn: &mut PgConnection,
    notify: &Notify,
    input: CreateChat,
) -> Result<CreatedPending, Error> {
    const CONTEXT: &str = "create chat in the application's transaction";
    let prepared = input.prepare()?;
    let in_tx: &[Notification] = match notify {
        Notify::InTransaction => &prepared.notifications,
        Notify::AfterCommit(_) => &[],
    };
    // Unnamed statements: the application's connection may run behind a
    // transaction pooler, where a name would not outlive this transaction
    // (one round trip more than a named statement, for a rare operation).
    let pooling = Pooling::Transaction;
    let outcome = insert_chat(
        conn,
        CONTEXT,
        pooling,
        &prepared.row,
        &prepared.metadata,
        &prepared.messages,
        in_tx,
    )
    .await?;
    let outcome = match outcome {
        Inserted::Done(outcome) => outcome,
        Inserted::Raced => {
            CreateOutcome::AlreadyExists(chat_state(conn, CONTEXT, pooling, &prepared.row).await?)
        }
    };
    let mut created = prepared.created(outcome)?;
    if matches!(notify, Notify::InTransaction) {
        created.notifications.clear();
    }
    Ok(created)
}

/// What [`insert_chat`] found.
pub(crate) enum Inserted {
    /// Created, or found existing in the statement's snapshot.
    Done(CreateOutcome),
    /// The id conflicted with a chat committed after the statement's
    /// snapshot was taken: read its state with [`chat_state`].
    Raced,
}

/// Inserts a chat and its initial history in one statement on `conn`
/// (the caller's transaction, or an implicit one), issuing `notify` with
/// `pg_notify` in the same transaction when the row was created.
pub(crate) async fn insert_chat(
    conn: &mut PgConnection,
    context: &'static str,
    pooling: Pooling,
    row: &ChatRow,
    metadata: &ChatMetadata,
    messages: &[NewMessage],
    notify: &[Notification],
) -> Result<Inserted, StoreError> {
    let mut channels = Vec::with_capacity(notify.len());
    let mut payloads = Vec::with_capacity(notify.len());
    for n in notify {
        // The same checks as an Update's commit, before anything is sent.
        tx::notify_statements(std::slice::from_ref(n))
            .map_err(|fault| fault.into_store(context))?;
        channels.push(n.channel());
        payloads.push(String::from_utf8(n.payload()).expect("notify_statements checked UTF-8"));
    }
    // The tool bookkeeping of the initial history, kept on the row from
    // now on (every later change of the history comes with a plan).
    let tool_state = tool_state_json(&ToolState::from_history(
        messages.iter().map(|m| (m.role, m.content.as_slice())),
    ));
    let messages =
        serde_json::Value::Array(messages.iter().map(message_json).collect()).to_string();
    let labels = jsonb::encode_text(&serde_json::json!(metadata.labels));
    let tools = jsonb::encode_text(&serde_json::json!(row.dynamic_tools));
    let query = pooling
        .query(sql::CREATE_CHAT)
        .bind(row.id.0)
        .bind(row.owner_id);
    let out = bind_row(query, row)
        .bind(tools)
        .bind(row.last_model_config_id)
        .bind(jsonb::encode_str(&metadata.title))
        .bind(labels)
        .bind(metadata.metadata.as_ref().map(stored_json))
        .bind(messages)
        .bind(row.versions.snapshot)
        .bind(channels)
        .bind(payloads)
        .bind(tool_state)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| store_error(context, e))?;
    let created: i64 = get(&out, context, "created")?;
    if created == 1 {
        let ids: Vec<i64> = get(&out, context, "message_ids")?;
        return Ok(Inserted::Done(CreateOutcome::Created(
            ids.into_iter().map(MessageId).collect(),
        )));
    }
    match get::<Option<String>>(&out, context, "status")? {
        Some(status) => Ok(Inserted::Done(CreateOutcome::AlreadyExists(classify(
            &status,
            get(&out, context, "archived")?,
            get(&out, context, "queued")?,
        )))),
        None => Ok(Inserted::Raced),
    }
}

/// The state of an existing chat, read after a creation lost a race.
pub(crate) async fn chat_state(
    conn: &mut PgConnection,
    context: &'static str,
    pooling: Pooling,
    row: &ChatRow,
) -> Result<ExecutionState, StoreError> {
    let existing = pooling
        .query(sql::CHAT_STATE)
        .bind(row.id.0)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|e| store_error(context, e))?;
    Ok(match existing {
        Some(r) => classify(
            &get::<String>(&r, context, "status")?,
            get(&r, context, "archived")?,
            get(&r, context, "queued")?,
        ),
        // Created and deleted again in between; deletion is not ours.
        None => ExecutionState::N,
    })
}

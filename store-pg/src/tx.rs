//! [`PgTx`]: one open Postgres transaction holding chat row locks, and the
//! [`StoreTx`] operations on it.
//!
//! Every request sent on the connection ticks the store's round-trip
//! counter. A transaction handle that is dropped while its transaction is
//! open (a cancelled Update future, an error half-way) never goes back to
//! the pool: its connection is closed instead, so the server rolls the
//! transaction back and no later user inherits it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chatstate::{ChatRecord, MetadataPatch, StoreError, StoreTx};
use chatstate_model::{
    Assigned, ChatId, EditContext, EditTarget, JsonText, MAX_PAYLOAD_BYTES, MessageId,
    Notification, Options, Plan, QueuedMessageId, Snapshot, content_to_value,
};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Postgres};

use crate::decode::{self, get};
use crate::error::{PgStoreFault, store_error};
use crate::jsonb;
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
    conn: PoolConnection<Postgres>,
    round_trips: RoundTrips,
    /// The server holds an open transaction for this handle.
    open: bool,
    /// A statement failed, so the server has aborted the transaction.
    aborted: bool,
    /// Chats this transaction locked exclusively (Update, nested Update,
    /// Lock); only these may be written.
    exclusive: Vec<ChatId>,
    /// Chats this transaction locked at all.
    locked: Vec<ChatId>,
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
            self.conn.close_on_drop();
        }
    }
}

impl PgTx {
    /// Opens a transaction on `chat` with one simple query and returns the
    /// snapshot; `None` when the chat does not exist, with no transaction
    /// left open (one more round trip: `ROLLBACK`).
    pub(crate) async fn open(
        conn: PoolConnection<Postgres>,
        round_trips: RoundTrips,
        opening: Opening,
        chat: ChatId,
        options: &Options,
    ) -> Result<Option<(PgTx, Snapshot)>, StoreError> {
        let mut tx = PgTx {
            conn,
            round_trips,
            // Set before BEGIN is sent: if this future is dropped while the
            // request is in flight, Drop must not return the connection.
            open: true,
            aborted: false,
            exclusive: Vec::new(),
            locked: Vec::new(),
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
        let text = sql::opening(opening, chat.0, micros(options.heartbeat_stale));
        self.round_trips.tick();
        let rows = match sqlx::raw_sql(AssertSqlSafe(text.clone()))
            .fetch_all(&mut *self.conn)
            .await
        {
            Ok(rows) => rows,
            // A session whose statements were never prepared (a pool not
            // made with `pool_options`, or one reset by a pooler): prepare
            // them and open again. A nested opening cannot get here, since
            // the outer opening ran on this session.
            Err(e) if is_unprepared(&e) && opening != Opening::Nested => {
                self.round_trips.tick();
                let names =
                    sqlx::raw_sql(AssertSqlSafe(format!("ROLLBACK; {}", sql::PREPARED_NAMES)))
                        .fetch_all(&mut *self.conn)
                        .await
                        .map_err(|e| self.failed(CONTEXT, e))?;
                let names: Vec<String> = names
                    .iter()
                    .map(|r| get(r, CONTEXT, "name"))
                    .collect::<Result<_, _>>()?;
                self.round_trips.tick();
                prepare(&mut self.conn, &names)
                    .await
                    .map_err(|e| self.failed(CONTEXT, e))?;
                self.simple(CONTEXT, text).await?
            }
            Err(e) => return Err(self.failed(CONTEXT, e)),
        };
        // The lock statement's rows have no columns; the snapshot's has.
        let Some(row) = rows.iter().rev().find(|r| !sqlx::Row::is_empty(*r)) else {
            return Ok(None);
        };
        let snap = decode::snapshot(row, CONTEXT)?;
        self.locked.push(chat);
        if opening != Opening::Shared {
            self.exclusive.push(chat);
        }
        Ok(Some(snap))
    }

    /// Sends a simple query (several statements, one round trip).
    async fn simple(
        &mut self,
        context: &'static str,
        text: String,
    ) -> Result<Vec<PgRow>, StoreError> {
        self.round_trips.tick();
        sqlx::raw_sql(AssertSqlSafe(text))
            .fetch_all(&mut *self.conn)
            .await
            .map_err(|e| self.failed(context, e))
    }

    /// Records that the server aborted the transaction and maps the error.
    fn failed(&mut self, context: &'static str, e: sqlx::Error) -> StoreError {
        self.aborted = true;
        store_error(context, e)
    }

    fn require_exclusive(&self, chat: ChatId, context: &'static str) -> Result<(), StoreError> {
        if self.exclusive.contains(&chat) {
            Ok(())
        } else {
            Err(PgStoreFault::NotLocked.into_store(context))
        }
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
        self.round_trips.tick();
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut *self.conn)
            .await
            .map_err(|e| store_error(context, e))?;
        self.open = false;
        Ok(())
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
}

impl StoreTx for PgTx {
    async fn apply(&mut self, chat: ChatId, plan: &Plan) -> Result<Assigned, StoreError> {
        const CONTEXT: &str = "apply plan";
        self.require_exclusive(chat, CONTEXT)?;
        if writes_nothing(plan) {
            return Ok(Assigned::default());
        }
        let row = &plan.row;
        let ids = |v: &[MessageId]| v.iter().map(|m| m.0).collect::<Vec<i64>>();
        let qids = |v: &[QueuedMessageId]| v.iter().map(|q| q.0).collect::<Vec<i64>>();
        let messages =
            serde_json::Value::Array(plan.messages.iter().map(message_json).collect()).to_string();
        let append = plan.append_queued.as_ref();
        self.round_trips.tick();
        let shape = sql::Shape {
            soft: !plan.soft_delete.is_empty(),
            reorder: plan.reorder_to_head.is_some(),
            dequeue: !plan.delete_queued.is_empty() || plan.promote.is_some(),
            enqueue: append.is_some(),
            messages: !plan.messages.is_empty(),
            promote: plan.promote.is_some(),
            beat: plan.heartbeat.is_some(),
            row: plan.row_changed,
        };
        let query = sqlx::query(sql::apply(shape))
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
        let result = bind_row(query, row).fetch_one(&mut *self.conn).await;
        let out = result.map_err(|e| self.failed(CONTEXT, e))?;
        // The plan was decided on the snapshot this transaction locked, so
        // every part must touch exactly the rows it names. Anything else
        // means the chat was written outside a transition; the caller's
        // error rolls the whole transaction back.
        check_rows(
            "soft deletes",
            plan.soft_delete.len(),
            count(&out, CONTEXT, "soft_deleted")?,
        )?;
        check_rows(
            "queue reorder",
            usize::from(plan.reorder_to_head.is_some()),
            count(&out, CONTEXT, "reordered")?,
        )?;
        check_rows(
            "queue deletes",
            plan.delete_queued.len() + usize::from(plan.promote.is_some()),
            count(&out, CONTEXT, "dequeued")?,
        )?;
        check_rows(
            "heartbeat",
            usize::from(plan.heartbeat.is_some()),
            count(&out, CONTEXT, "beats")?,
        )?;
        check_rows(
            "row write",
            usize::from(plan.row_changed),
            count(&out, CONTEXT, "rows_written")?,
        )?;
        let inserted: Vec<i64> = get(&out, CONTEXT, "message_ids")?;
        check_rows("message inserts", plan.inserted_len(), inserted.len())?;
        let queued: Option<i64> = get(&out, CONTEXT, "queued_id")?;
        check_rows(
            "queue append",
            usize::from(plan.append_queued.is_some()),
            usize::from(queued.is_some()),
        )?;
        Ok(Assigned {
            messages: inserted.into_iter().map(MessageId).collect(),
            queued: queued.map(QueuedMessageId),
        })
    }

    async fn edit_context(
        &mut self,
        chat: ChatId,
        message: MessageId,
    ) -> Result<EditContext, StoreError> {
        const CONTEXT: &str = "read edit context";
        self.require_locked(chat, CONTEXT)?;
        self.round_trips.tick();
        let row = sqlx::query(sql::EDIT_CONTEXT)
            .bind(chat.0)
            .bind(message.0)
            .fetch_one(&mut *self.conn)
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
        self.round_trips.tick();
        let row = sqlx::query(sql::LOAD_ROW)
            .bind(chat.0)
            .fetch_one(&mut *self.conn)
            .await
            .map_err(|e| self.failed(CONTEXT, e))?;
        self.round_trips.tick();
        let queue = sqlx::query(sql::LOAD_QUEUE)
            .bind(chat.0)
            .fetch_all(&mut *self.conn)
            .await
            .map_err(|e| self.failed(CONTEXT, e))?;
        self.round_trips.tick();
        let history = sqlx::query(sql::LOAD_HISTORY)
            .bind(chat.0)
            .fetch_all(&mut *self.conn)
            .await
            .map_err(|e| self.failed(CONTEXT, e))?;
        Ok(ChatRecord {
            row: decode::chat_row(&row, CONTEXT)?,
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
        self.round_trips.tick();
        let done = sqlx::query(sql::WRITE_METADATA)
            .bind(chat.0)
            .bind(patch.title.as_deref().map(jsonb::encode_str))
            .bind(labels)
            .bind(patch.metadata.is_some())
            .bind(metadata)
            .execute(&mut *self.conn)
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
        let mut text = match notify_statements(notify) {
            Ok(text) => text,
            Err(fault) => {
                self.rollback_now(CONTEXT).await?;
                return Err(fault.into_store(CONTEXT));
            }
        };
        // NOTIFY is transactional: Postgres delivers these only if this
        // COMMIT succeeds, in order, and never on rollback.
        text.push_str("COMMIT");
        self.simple(CONTEXT, text).await?;
        self.open = false;
        Ok(())
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

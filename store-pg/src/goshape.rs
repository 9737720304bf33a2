//! The Go original's statement sequence for one Update, on this schema, as
//! a baseline for benchmarks (design.md §4.6 and §6).
//!
//! The Go machine caches nothing: every transition re-reads the row and
//! counts the queue, and so does the end of the Update; each write is a
//! statement of its own; the lease check is one more query. This module
//! replays exactly that sequence for two representative transitions, so a
//! benchmark can run it against [`crate::PgStore`]'s Update on the same
//! server and compare throughput and round trips:
//!
//! 1. `BEGIN`
//! 2. lock and bump: `UPDATE chats ... RETURNING` the row
//! 3. re-read the row; 4. count the queue (the transition's `loadState`)
//! 5. the transition's writes, one statement each (two here)
//! 6. re-read the row; 7. count the queue (the Update's final `loadState`)
//! 8. the heartbeat staleness check (only for an owned, runnable chat)
//! 9. `COMMIT`
//!
//! That is 10 round trips for an owned chat (9 unowned), against 3 for
//! the lean path. The Go schema maintained the versions with triggers
//! inside its write statements; here those effects are folded into the
//! chat-row write, so the replay costs no more round trips than the Go
//! code did. Notifications are not sent (the comparison is of database
//! work). This is a benchmark baseline, not a store path: the machine
//! never calls it.

use chatstate::StoreError;
use chatstate_model::{
    ChatId, ExecutionState, Matrix, NewMessage, Options, Transition, content_to_value,
};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row};

use crate::PgStore;
use crate::decode::{self, get};
use crate::error::store_error;
use crate::tx::micros;

/// What a go-shaped Update did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GoShapedOutcome {
    /// Committed at this snapshot version.
    Committed {
        /// The committed snapshot version.
        snapshot_version: i64,
        /// Round trips this Update took.
        round_trips: u64,
    },
    /// The matrix does not allow the transition from the chat's state;
    /// rolled back.
    NotAllowed {
        /// The chat's state.
        from: ExecutionState,
        /// Round trips this attempt took.
        round_trips: u64,
    },
    /// The chat does not exist.
    ChatNotFound,
}

const ROW: &str = concat!("SELECT ", row_columns!(), " FROM chats c WHERE c.id = $1");
const LOCK_AND_BUMP: &str = concat!(
    "UPDATE chats c SET snapshot_version = c.snapshot_version + 1 WHERE c.id = $1 RETURNING ",
    row_columns!()
);
const COUNT_QUEUE: &str = "SELECT count(*) AS n FROM chat_queued_messages WHERE chat_id = $1";
const INSERT_MESSAGE: &str = "\
INSERT INTO chat_messages (chat_id, role, content, visibility, model_config_id, created_by, revision)
VALUES ($1, $2, $3::text::jsonb, $4, $5, $6, $7)";
const INSERT_QUEUED: &str = "\
INSERT INTO chat_queued_messages (chat_id, content, model_config_id, created_by)
VALUES ($1, $2::text::jsonb, $3, $4)";
/// What the Go history and retry-state triggers did after a message insert.
const HISTORY_WRITE: &str = "\
UPDATE chats SET history_version = snapshot_version, generation_attempt = 0, retry_state = NULL,
       retry_state_version = CASE WHEN retry_state IS NULL THEN retry_state_version
                                  ELSE snapshot_version END,
       updated_at = now()
 WHERE id = $1";
/// What the Go queue trigger did after a queue insert.
const QUEUE_WRITE: &str =
    "UPDATE chats SET queue_version = snapshot_version, updated_at = now() WHERE id = $1";
const LEASE_STALE: &str = "\
SELECT NOT EXISTS (SELECT 1 FROM chat_heartbeats
                    WHERE chat_id = $1 AND runner_id = $2
                      AND heartbeat_at > now() - $3::bigint * interval '1 microsecond') AS stale";

/// The writes of the replayed transition.
enum Writes<'a> {
    CommitStep(&'a NewMessage),
    SendQueued(&'a NewMessage),
}

/// A connection in a go-shaped transaction, counting its requests.
struct Session<'s> {
    store: &'s PgStore,
    /// `Some` until dropped.
    conn: Option<PoolConnection<Postgres>>,
    open: bool,
    local: u64,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if self.open {
            if let Some(conn) = &mut self.conn {
                conn.close_on_drop();
            }
        } else if let Some(conn) = self.conn.take() {
            // Kept by the store, as the lean path's are.
            self.store.keep(conn);
        }
    }
}

impl Session<'_> {
    fn tick(&mut self) {
        self.store.round_trips.tick();
        self.local += 1;
    }

    async fn simple(&mut self, sql: &'static str) -> Result<(), StoreError> {
        self.tick();
        sqlx::raw_sql(sql)
            .execute(&mut **self.conn.as_mut().expect("taken only on drop"))
            .await
            .map_err(|e| store_error("go-shaped update", e))?;
        Ok(())
    }

    async fn one(
        &mut self,
        q: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Option<PgRow>, StoreError> {
        self.tick();
        q.fetch_optional(&mut **self.conn.as_mut().expect("taken only on drop"))
            .await
            .map_err(|e| store_error("go-shaped update", e))
    }

    /// Re-reads the row and counts the queue (Go's `loadState`).
    async fn load_state(
        &mut self,
        chat: ChatId,
    ) -> Result<(chatstate_model::ChatRow, ExecutionState), StoreError> {
        const CONTEXT: &str = "go-shaped load state";
        let row = self
            .one(sqlx::query(ROW).bind(chat.0))
            .await?
            .ok_or_else(|| crate::error::malformed(CONTEXT, "id", "locked chat vanished"))?;
        let row = decode::chat_row(&row, CONTEXT)?;
        let count = self
            .one(sqlx::query(COUNT_QUEUE).bind(chat.0))
            .await?
            .expect("count returns a row");
        let n: i64 = get(&count, CONTEXT, "n")?;
        let state = row.classify(n > 0);
        Ok((row, state))
    }
}

impl PgStore {
    /// Runs the Go-shaped Update of one CommitStep inserting `message`.
    pub async fn go_shaped_commit_step(
        &self,
        chat: ChatId,
        message: &NewMessage,
        options: &Options,
    ) -> Result<GoShapedOutcome, StoreError> {
        self.go_shaped(chat, Writes::CommitStep(message), options)
            .await
    }

    /// Runs the Go-shaped Update of one SendMessage that queues `message`
    /// (from a running chat, busy behaviour "queue").
    pub async fn go_shaped_send_queued(
        &self,
        chat: ChatId,
        message: &NewMessage,
        options: &Options,
    ) -> Result<GoShapedOutcome, StoreError> {
        self.go_shaped(chat, Writes::SendQueued(message), options)
            .await
    }

    async fn go_shaped(
        &self,
        chat: ChatId,
        writes: Writes<'_>,
        options: &Options,
    ) -> Result<GoShapedOutcome, StoreError> {
        const CONTEXT: &str = "go-shaped update";
        // Connections come and go the way the lean path's do.
        let conn = self.connection().await?;
        let mut s = Session {
            store: self,
            conn: Some(conn),
            open: true,
            local: 0,
        };
        s.simple("BEGIN").await?;
        if s.one(sqlx::query(LOCK_AND_BUMP).bind(chat.0))
            .await?
            .is_none()
        {
            s.simple("ROLLBACK").await?;
            s.open = false;
            return Ok(GoShapedOutcome::ChatNotFound);
        }
        let (row, from) = s.load_state(chat).await?;
        let transition = match writes {
            Writes::CommitStep(_) => Transition::CommitStep,
            Writes::SendQueued(_) => Transition::SendMessage,
        };
        let queues = matches!(
            from,
            ExecutionState::R0 | ExecutionState::R1 | ExecutionState::I0 | ExecutionState::I1
        );
        let allowed = Matrix::REFERENCE.allows(transition, from)
            && (transition != Transition::SendMessage || queues);
        if !allowed {
            s.simple("ROLLBACK").await?;
            s.open = false;
            return Ok(GoShapedOutcome::NotAllowed {
                from,
                round_trips: s.local,
            });
        }
        match writes {
            Writes::CommitStep(m) => {
                s.one(
                    sqlx::query(INSERT_MESSAGE)
                        .bind(chat.0)
                        .bind(m.role.as_str())
                        .bind(crate::jsonb::encode_text(&content_to_value(&m.content)))
                        .bind(m.visibility.as_str())
                        .bind(m.model_config_id)
                        .bind(m.created_by)
                        .bind(row.versions.snapshot),
                )
                .await?;
                s.one(sqlx::query(HISTORY_WRITE).bind(chat.0)).await?;
            }
            Writes::SendQueued(m) => {
                s.one(
                    sqlx::query(INSERT_QUEUED)
                        .bind(chat.0)
                        .bind(crate::jsonb::encode_text(&content_to_value(&m.content)))
                        .bind(m.model_config_id)
                        .bind(m.created_by.unwrap_or(row.owner_id)),
                )
                .await?;
                s.one(sqlx::query(QUEUE_WRITE).bind(chat.0)).await?;
            }
        }
        let (row, state) = s.load_state(chat).await?;
        if state.is_runnable()
            && let Some(owner) = row.owner
        {
            let stale = s
                .one(
                    sqlx::query(LEASE_STALE)
                        .bind(chat.0)
                        .bind(owner.runner_id.0)
                        .bind(micros(options.heartbeat_stale)),
                )
                .await?
                .expect("a select returns a row");
            // The Go code would buffer an ownership hint when stale.
            let _stale: bool = stale
                .try_get("stale")
                .map_err(|e| store_error(CONTEXT, e))?;
        }
        s.simple("COMMIT").await?;
        s.open = false;
        Ok(GoShapedOutcome::Committed {
            snapshot_version: row.versions.snapshot,
            round_trips: s.local,
        })
    }
}

//! The Go original's statement sequence for one Update, on chatstate's
//! schema, as a baseline for benchmarks (design.md §4.6 and §6).
//!
//! The Go machine caches nothing: every transition re-reads the row and
//! counts the queue, and so does the end of the Update; each write is a
//! statement of its own; the lease check is one more query. [`GoShaped`]
//! replays exactly that sequence for two representative transitions, so a
//! benchmark can run it next to a [`chatstate_store_pg::PgStore`]'s Update
//! on the same server and compare throughput and round trips:
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
//! work). This is a benchmark baseline, not a store path: it uses only
//! the schema and the store's public API, and reads rows with its own
//! small decoding.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chatstate_model::{
    ChatId, ChatStatus, ExecutionState, Matrix, NewMessage, Options, Part, Transition,
    content_to_value,
};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row};
use uuid::Uuid;

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

/// Why a go-shaped Update failed (it did not commit).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GoShapedError {
    /// A statement failed, or a column did not decode.
    #[error("go-shaped update: {0}")]
    Database(#[from] sqlx::Error),
    /// The message holds a value the store would write in its escaped form
    /// (a string with U+0000 or starting with U+E000, a number with an
    /// exponent or negative zero); the baseline writes plain JSON only.
    #[error("go-shaped update: the message holds a value the baseline cannot write ({0})")]
    Unsupported(&'static str),
    /// The chat row read back is not one the schema allows.
    #[error("go-shaped update: malformed chat row ({0})")]
    Malformed(&'static str),
}

/// Every column of the chat row, as the Go code read it.
macro_rules! columns {
    () => {
        "c.id, c.owner_id, c.status, c.archived, c.worker_id, c.runner_id, \
         c.last_error::text AS last_error, c.retry_state::text AS retry_state, \
         c.generation_attempt, \
         (extract(epoch FROM c.requires_action_deadline_at) * 1000000)::bigint \
             AS requires_action_deadline_us, \
         (extract(epoch FROM c.compaction_requested_at) * 1000000)::bigint \
             AS compaction_requested_us, \
         c.snapshot_version, c.history_version, c.queue_version, c.retry_state_version, \
         c.dynamic_tools::text AS dynamic_tools, c.last_model_config_id"
    };
}

const ROW: &str = concat!("SELECT ", columns!(), " FROM chats c WHERE c.id = $1");
const LOCK_AND_BUMP: &str = concat!(
    "UPDATE chats c SET snapshot_version = c.snapshot_version + 1 WHERE c.id = $1 RETURNING ",
    columns!()
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

/// The Go-shaped baseline on a pool.
///
/// Like a [`chatstate_store_pg::PgStore`], it keeps the connections of its
/// finished transactions (up to half the pool's maximum) and reuses them,
/// instead of handing each back to the pool, which would ping it: both
/// run on the same terms. Cheap to clone; clones share the connections
/// and the round-trip counter.
#[derive(Clone, Debug)]
pub struct GoShaped {
    pool: PgPool,
    round_trips: Arc<AtomicU64>,
    idle: Arc<Mutex<VecDeque<PoolConnection<Postgres>>>>,
    keep: usize,
}

impl GoShaped {
    /// The baseline on `pool` (a pool of a migrated database).
    pub fn new(pool: PgPool) -> Self {
        let keep = (pool.options().get_max_connections() / 2) as usize;
        GoShaped {
            pool,
            round_trips: Arc::default(),
            idle: Arc::default(),
            keep,
        }
    }

    /// Requests awaited from the server so far by this baseline and its
    /// clones (`BEGIN`, `COMMIT` and `ROLLBACK` included).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Runs the Go-shaped Update of one CommitStep inserting `message`.
    pub async fn commit_step(
        &self,
        chat: ChatId,
        message: &NewMessage,
        options: &Options,
    ) -> Result<GoShapedOutcome, GoShapedError> {
        self.update(chat, Writes::CommitStep(message), options)
            .await
    }

    /// Runs the Go-shaped Update of one SendMessage that queues `message`
    /// (from a running chat, busy behaviour "queue").
    pub async fn send_queued(
        &self,
        chat: ChatId,
        message: &NewMessage,
        options: &Options,
    ) -> Result<GoShapedOutcome, GoShapedError> {
        self.update(chat, Writes::SendQueued(message), options)
            .await
    }

    async fn update(
        &self,
        chat: ChatId,
        writes: Writes<'_>,
        options: &Options,
    ) -> Result<GoShapedOutcome, GoShapedError> {
        let message = match writes {
            Writes::CommitStep(m) | Writes::SendQueued(m) => m,
        };
        let content = plain_json(&message.content)?;
        let kept = self.idle.lock().expect("not poisoned").pop_front();
        let conn = match kept {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        let mut s = Session {
            baseline: self,
            conn: Some(conn),
            open: true,
            local: 0,
        };
        s.simple("BEGIN").await?;
        let Some(_locked) = s.one(sqlx::query(LOCK_AND_BUMP).bind(chat.0)).await? else {
            s.end("ROLLBACK").await?;
            return Ok(GoShapedOutcome::ChatNotFound);
        };
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
            s.end("ROLLBACK").await?;
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
                        .bind(content)
                        .bind(m.visibility.as_str())
                        .bind(m.model_config_id)
                        .bind(m.created_by)
                        .bind(row.snapshot_version),
                )
                .await?;
                s.one(sqlx::query(HISTORY_WRITE).bind(chat.0)).await?;
            }
            Writes::SendQueued(m) => {
                s.one(
                    sqlx::query(INSERT_QUEUED)
                        .bind(chat.0)
                        .bind(content)
                        .bind(m.model_config_id)
                        .bind(m.created_by.unwrap_or(row.owner_id)),
                )
                .await?;
                s.one(sqlx::query(QUEUE_WRITE).bind(chat.0)).await?;
            }
        }
        let (row, state) = s.load_state(chat).await?;
        if state.is_runnable()
            && let Some(runner) = row.runner
        {
            let stale = s
                .one(
                    sqlx::query(LEASE_STALE)
                        .bind(chat.0)
                        .bind(runner)
                        .bind(micros(options.heartbeat_stale)),
                )
                .await?
                .ok_or(sqlx::Error::RowNotFound)?;
            // The Go code would buffer an ownership hint when stale.
            let _stale: bool = stale.try_get("stale")?;
        }
        s.end("COMMIT").await?;
        Ok(GoShapedOutcome::Committed {
            snapshot_version: row.snapshot_version,
            round_trips: s.local,
        })
    }
}

/// The writes of the replayed transition.
#[derive(Clone, Copy)]
enum Writes<'a> {
    CommitStep(&'a NewMessage),
    SendQueued(&'a NewMessage),
}

/// What the baseline reads of a chat row: every column decoded, as the Go
/// code did, of which the sequence uses a few.
struct GoRow {
    owner_id: Uuid,
    runner: Option<Uuid>,
    state_of: (ChatStatus, bool),
    snapshot_version: i64,
}

impl GoRow {
    fn decode(row: &PgRow) -> Result<GoRow, GoShapedError> {
        let _id: Uuid = row.try_get("id")?;
        let worker: Option<Uuid> = row.try_get("worker_id")?;
        let runner: Option<Uuid> = row.try_get("runner_id")?;
        if worker.is_some() != runner.is_some() {
            return Err(GoShapedError::Malformed("lease with only one id"));
        }
        for column in ["last_error", "retry_state"] {
            if let Some(text) = row.try_get::<Option<String>, _>(column)? {
                json(&text)?;
            }
        }
        json(&row.try_get::<String, _>("dynamic_tools")?)?;
        let _: i64 = row.try_get("generation_attempt")?;
        let _: Option<i64> = row.try_get("requires_action_deadline_us")?;
        let _: Option<i64> = row.try_get("compaction_requested_us")?;
        for column in ["history_version", "queue_version", "retry_state_version"] {
            let _: i64 = row.try_get(column)?;
        }
        let _: Option<Uuid> = row.try_get("last_model_config_id")?;
        let status: String = row.try_get("status")?;
        Ok(GoRow {
            owner_id: row.try_get("owner_id")?,
            runner,
            state_of: (ChatStatus::parse(&status), row.try_get("archived")?),
            snapshot_version: row.try_get("snapshot_version")?,
        })
    }

    fn classify(&self, queued: bool) -> ExecutionState {
        ExecutionState::classify(&self.state_of.0, self.state_of.1, queued)
    }
}

fn json(text: &str) -> Result<serde_json::Value, GoShapedError> {
    serde_json::from_str(text).map_err(|_| GoShapedError::Malformed("a JSON column"))
}

/// The content as the JSON text the store would write, when it needs none
/// of the store's escapes.
fn plain_json(content: &[Part]) -> Result<String, GoShapedError> {
    fn check(v: &serde_json::Value) -> Result<(), GoShapedError> {
        use serde_json::Value;
        let plain_str = |s: &str| !s.contains('\0') && !s.starts_with('\u{E000}');
        match v {
            Value::String(s) if !plain_str(s) => Err(GoShapedError::Unsupported("a string")),
            Value::Number(n) => {
                let text = n.to_string();
                if text.contains(['e', 'E']) || text == "-0" || text == "-0.0" {
                    Err(GoShapedError::Unsupported("a number"))
                } else {
                    Ok(())
                }
            }
            Value::Array(items) => items.iter().try_for_each(check),
            Value::Object(map) => map.iter().try_for_each(|(k, v)| {
                if plain_str(k) {
                    check(v)
                } else {
                    Err(GoShapedError::Unsupported("a key"))
                }
            }),
            Value::String(_) | Value::Null | Value::Bool(_) => Ok(()),
        }
    }
    let value = content_to_value(content);
    check(&value)?;
    Ok(value.to_string())
}

fn micros(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A connection in a go-shaped transaction, counting its requests.
struct Session<'s> {
    baseline: &'s GoShaped,
    /// `Some` until dropped.
    conn: Option<PoolConnection<Postgres>>,
    /// Inside the transaction: a connection dropped now is closed, not
    /// kept or pooled.
    open: bool,
    local: u64,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if self.open {
            conn.close_on_drop();
            return;
        }
        let mut idle = self.baseline.idle.lock().expect("not poisoned");
        if idle.len() < self.baseline.keep {
            idle.push_back(conn);
        }
    }
}

impl Session<'_> {
    fn conn(&mut self) -> &mut sqlx::PgConnection {
        self.conn.as_mut().expect("taken only on drop")
    }

    fn tick(&mut self) {
        self.baseline.round_trips.fetch_add(1, Ordering::Relaxed);
        self.local += 1;
    }

    async fn simple(&mut self, sql: &'static str) -> Result<(), GoShapedError> {
        self.tick();
        sqlx::raw_sql(sql).execute(self.conn()).await?;
        Ok(())
    }

    /// Ends the transaction with `COMMIT` or `ROLLBACK`.
    async fn end(&mut self, sql: &'static str) -> Result<(), GoShapedError> {
        self.simple(sql).await?;
        self.open = false;
        Ok(())
    }

    async fn one(
        &mut self,
        q: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Option<PgRow>, GoShapedError> {
        self.tick();
        Ok(q.fetch_optional(self.conn()).await?)
    }

    /// Re-reads the row and counts the queue (Go's `loadState`).
    async fn load_state(&mut self, chat: ChatId) -> Result<(GoRow, ExecutionState), GoShapedError> {
        let row = self
            .one(sqlx::query(ROW).bind(chat.0))
            .await?
            .ok_or(GoShapedError::Malformed("the locked chat vanished"))?;
        let row = GoRow::decode(&row)?;
        let count = self
            .one(sqlx::query(COUNT_QUEUE).bind(chat.0))
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        let n: i64 = count.try_get("n")?;
        let state = row.classify(n > 0);
        Ok((row, state))
    }
}

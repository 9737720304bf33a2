//! Read-only queries for operators: one chat in full ([`inspect_chat`])
//! and chats by state or lease ([`list_chats`]).
//!
//! Each runs in one `REPEATABLE READ READ ONLY` transaction, so what it
//! returns is one consistent picture and it can write nothing. It takes no
//! row lock: an open Update neither blocks it nor is blocked by it, and it
//! sees the last committed state. The execution state and what a chat may
//! do next come from the model (the classifier and
//! [`Matrix::REFERENCE`]); no rule is restated in SQL.

use chatstate::{ChatMetadata, StoreError};
use chatstate_model::{
    ChatId, ChatRow, ChatStatus, ExecutionState, Matrix, Message, Options, Owner, QueuedMessage,
    RunnerId, Timestamp, Transition, WorkerId,
};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Transaction};

use crate::decode::{self, get};
use crate::error::{malformed, store_error};
use crate::tx::micros;
use crate::{LEGACY_STATUSES, jsonb, sql};

/// How fresh a chat's lease is, by store time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LeaseFreshness {
    /// No owner.
    Unowned,
    /// The owner's runner heartbeated within the staleness threshold.
    Fresh,
    /// The owner's runner's last heartbeat is older than the threshold.
    Stale,
    /// Owned, but no heartbeat of the owner's runner is stored (never
    /// written, or lost with the unlogged table in a crash): as stale.
    Missing,
}

/// A chat's lease as the store sees it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LeaseInfo {
    /// The owner (worker and runner), if any.
    pub owner: Option<Owner>,
    /// The last heartbeat of the owner's runner.
    pub heartbeat_at: Option<Timestamp>,
    /// Store time minus that heartbeat, in microseconds.
    pub heartbeat_age_us: Option<i64>,
    /// Fresh or not, by the threshold the query was given.
    pub freshness: LeaseFreshness,
}

impl LeaseInfo {
    /// True unless the lease is fresh: a runnable chat in this case needs
    /// an owner (the condition of [`chatstate::Store::claimable`]).
    pub fn is_stale_or_missing(&self) -> bool {
        self.freshness != LeaseFreshness::Fresh
    }
}

/// One transition a chat may take next, by the matrix, and where it may
/// land.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct NextTransition {
    /// The transition.
    pub transition: Transition,
    /// The states it may land in.
    pub to: Vec<ExecutionState>,
}

/// The transitions allowed from `state`: the matrix row in canonical
/// order, then the ownership transitions (outside the matrix: Acquire
/// from every existing state, Abandon when the chat has an owner).
pub fn next_transitions(state: ExecutionState, owned: bool) -> Vec<NextTransition> {
    let matrix = Matrix::REFERENCE;
    let mut out: Vec<NextTransition> = matrix
        .transitions_from(state)
        .into_iter()
        .map(|transition| NextTransition {
            transition,
            to: matrix.outputs(transition, state),
        })
        .collect();
    if state != ExecutionState::N {
        for transition in Transition::OWNERSHIP {
            if transition == Transition::Acquire || owned {
                out.push(NextTransition {
                    transition,
                    to: vec![state],
                });
            }
        }
    }
    out
}

/// Everything about one chat, read in one read-only transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ChatInspection {
    /// The chat row (status, archived, owner, error, retry state, versions).
    pub row: ChatRow,
    /// Title, labels and free metadata.
    pub metadata: ChatMetadata,
    /// The classified execution state.
    pub state: ExecutionState,
    /// The lease and its freshness.
    pub lease: LeaseInfo,
    /// True when the chat is runnable and its lease stale or missing: a
    /// worker's sweep would claim it.
    pub needs_worker: bool,
    /// Store time of the read.
    pub store_time: Timestamp,
    /// When the row was created.
    pub created_at: Timestamp,
    /// The row's last write of execution state.
    pub updated_at: Timestamp,
    /// The queue, head first.
    pub queue: Vec<QueuedMessage>,
    /// History rows stored, soft-deleted ones included.
    pub history_rows: u64,
    /// History rows not soft-deleted.
    pub active_history_rows: u64,
    /// The last history rows (soft-deleted ones included), in id order.
    pub recent_history: Vec<Message>,
    /// What the chat may do next, by the matrix.
    pub next: Vec<NextTransition>,
}

/// One chat in a listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ChatSummary {
    /// The chat.
    pub id: ChatId,
    /// The stored status.
    pub status: ChatStatus,
    /// The archived flag.
    pub archived: bool,
    /// The classified execution state.
    pub state: ExecutionState,
    /// Queued messages.
    pub queue_len: u64,
    /// The lease and its freshness.
    pub lease: LeaseInfo,
    /// True when the chat is runnable and its lease stale or missing.
    pub needs_worker: bool,
    /// The snapshot version.
    pub snapshot_version: i64,
    /// The title.
    pub title: String,
    /// The row's last write of execution state (the listing's order).
    pub updated_at: Timestamp,
}

/// Which chats [`list_chats`] returns. Every condition given must hold;
/// the default lists every chat, at most 100.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatFilter {
    /// Only chats in one of these execution states (any when empty).
    pub states: Vec<ExecutionState>,
    /// Only chats with one of these stored statuses (any when empty).
    pub statuses: Vec<ChatStatus>,
    /// Only archived (`Some(true)`) or unarchived (`Some(false)`) chats.
    pub archived: Option<bool>,
    /// Only runnable chats whose lease is stale or missing: the chats a
    /// worker's sweep would claim (without skipping locked rows).
    pub stale_lease: bool,
    /// At most this many, oldest first.
    pub limit: usize,
}

impl Default for ChatFilter {
    fn default() -> Self {
        ChatFilter {
            states: Vec::new(),
            statuses: Vec::new(),
            archived: None,
            stale_lease: false,
            limit: 100,
        }
    }
}

/// Begins the read-only transaction of a query.
async fn read_only(
    pool: &PgPool,
    context: &'static str,
) -> Result<Transaction<'static, Postgres>, StoreError> {
    pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| store_error(context, e))
}

/// The chat row with its metadata, times, heartbeat and history counts.
/// `$1` chat, `$2` staleness threshold (µs).
const INSPECT_ROW: &str = concat!(
    "SELECT ",
    row_columns!(),
    ", c.title, c.labels::text AS labels, c.metadata::text AS metadata, \
     (extract(epoch FROM c.created_at) * 1000000)::bigint AS created_us, \
     (extract(epoch FROM c.updated_at) * 1000000)::bigint AS updated_us, \
     (extract(epoch FROM now()) * 1000000)::bigint AS now_us, \
     (extract(epoch FROM h.heartbeat_at) * 1000000)::bigint AS heartbeat_us, \
     (h.heartbeat_at > now() - interval '1 microsecond' * $2) AS heartbeat_fresh, \
     (SELECT count(*) FROM chat_messages m WHERE m.chat_id = c.id) AS history_rows, \
     (SELECT count(*) FROM chat_messages m WHERE m.chat_id = c.id AND NOT m.deleted) \
         AS active_rows \
     FROM chats c \
     LEFT JOIN chat_heartbeats h ON h.chat_id = c.id AND h.runner_id = c.runner_id \
     WHERE c.id = $1"
);

/// The last `$2` history rows of chat `$1`, in id order.
const RECENT_HISTORY: &str = "\
SELECT * FROM (
    SELECT id, role, content::text AS content, visibility, model_config_id, created_by,
           queued_message_id, deleted, revision
      FROM chat_messages WHERE chat_id = $1 ORDER BY id DESC LIMIT $2
) AS recent ORDER BY id";

/// The lease from the columns `worker_id`, `runner_id`, `now_us`,
/// `heartbeat_us` and `heartbeat_fresh`.
fn lease(row: &PgRow, context: &'static str) -> Result<LeaseInfo, StoreError> {
    let worker: Option<uuid::Uuid> = get(row, context, "worker_id")?;
    let runner: Option<uuid::Uuid> = get(row, context, "runner_id")?;
    let owner = match (worker, runner) {
        (Some(w), Some(r)) => Some(Owner {
            worker_id: WorkerId(w),
            runner_id: RunnerId(r),
        }),
        (None, None) => None,
        // The schema forbids this (chats_lease_both_or_neither).
        _ => return Err(malformed(context, "worker_id", "lease with only one id")),
    };
    let now: i64 = get(row, context, "now_us")?;
    let heartbeat: Option<i64> = get(row, context, "heartbeat_us")?;
    let fresh: Option<bool> = get(row, context, "heartbeat_fresh")?;
    let freshness = match (owner, fresh) {
        (None, _) => LeaseFreshness::Unowned,
        (Some(_), None) => LeaseFreshness::Missing,
        (Some(_), Some(true)) => LeaseFreshness::Fresh,
        (Some(_), Some(false)) => LeaseFreshness::Stale,
    };
    Ok(LeaseInfo {
        owner,
        heartbeat_at: heartbeat.map(Timestamp),
        heartbeat_age_us: heartbeat.map(|h| now.saturating_sub(h)),
        freshness,
    })
}

fn count(row: &PgRow, context: &'static str, column: &str) -> Result<u64, StoreError> {
    Ok(u64::try_from(get::<i64>(row, context, column)?).unwrap_or(0))
}

/// A chat in full: the row, its state, lease and freshness by store time
/// (stale after `options.heartbeat_stale`), versions, the queue, the last
/// `history_rows` history rows and what it may do next. `None` when the
/// chat does not exist.
pub async fn inspect_chat(
    pool: &PgPool,
    chat: ChatId,
    history_rows: usize,
    options: &Options,
) -> Result<Option<ChatInspection>, StoreError> {
    const CONTEXT: &str = "inspect chat";
    let mut tx = read_only(pool, CONTEXT).await?;
    let Some(row) = sqlx::query(INSPECT_ROW)
        .bind(chat.0)
        .bind(micros(options.heartbeat_stale))
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| store_error(CONTEXT, e))?
    else {
        return Ok(None);
    };
    let queue = sqlx::query(sql::LOAD_QUEUE)
        .bind(chat.0)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| store_error(CONTEXT, e))?;
    let history = sqlx::query(RECENT_HISTORY)
        .bind(chat.0)
        .bind(i64::try_from(history_rows).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| store_error(CONTEXT, e))?;
    // Read only: ending it either way changes nothing.
    let _ = tx.rollback().await;

    let chat_row = decode::chat_row(&row, CONTEXT)?;
    let queue = queue
        .iter()
        .map(|r| decode::queued(r, CONTEXT))
        .collect::<Result<Vec<_>, _>>()?;
    let state = chat_row.classify(!queue.is_empty());
    let lease = lease(&row, CONTEXT)?;
    Ok(Some(ChatInspection {
        metadata: decode::metadata(&row, CONTEXT)?,
        state,
        needs_worker: state.is_runnable() && lease.is_stale_or_missing(),
        next: next_transitions(state, lease.owner.is_some()),
        lease,
        store_time: Timestamp(get(&row, CONTEXT, "now_us")?),
        created_at: Timestamp(get(&row, CONTEXT, "created_us")?),
        updated_at: Timestamp(get(&row, CONTEXT, "updated_us")?),
        history_rows: count(&row, CONTEXT, "history_rows")?,
        active_history_rows: count(&row, CONTEXT, "active_rows")?,
        recent_history: history
            .iter()
            .map(|r| decode::message(r, CONTEXT))
            .collect::<Result<_, _>>()?,
        queue,
        row: chat_row,
    }))
}

/// Chats matching `filter`, oldest first by `updated_at`, then id.
///
/// The queue length comes from the row's queue cache while it is valid
/// (migration 0002: `queue_ids` at `queue_version`), so a listing reads
/// the queue table only for chats whose cache is stale.
///
/// `$1` staleness threshold (µs); `$2` filter by state?, `$3..$5` the
/// (status, archived, queued) tuples of the wanted states, `$6` Invalid
/// wanted (then a status outside the known and legacy ones, `$7`, matches
/// too); `$8` statuses (any when empty); `$9` archived (any when NULL);
/// `$10` only stale or missing leases of runnable chats, `$11` the
/// runnable statuses; `$12` limit.
const LIST_CHATS: &str = "\
SELECT c.id, c.status, c.archived, c.worker_id, c.runner_id, c.snapshot_version, c.title,
       q.queued,
       (extract(epoch FROM c.updated_at) * 1000000)::bigint AS updated_us,
       (extract(epoch FROM now()) * 1000000)::bigint AS now_us,
       (extract(epoch FROM h.heartbeat_at) * 1000000)::bigint AS heartbeat_us,
       (h.heartbeat_at > now() - interval '1 microsecond' * $1) AS heartbeat_fresh
  FROM chats c
 CROSS JOIN LATERAL (
        SELECT CASE WHEN c.queue_ids_version = c.queue_version
                    THEN cardinality(c.queue_ids)::bigint
                    ELSE (SELECT count(*) FROM chat_queued_messages m WHERE m.chat_id = c.id)
               END AS queued) AS q
  LEFT JOIN chat_heartbeats h ON h.chat_id = c.id AND h.runner_id = c.runner_id
 WHERE (NOT $2::bool
        OR (c.status, c.archived, q.queued > 0) IN (
               SELECT * FROM unnest($3::text[], $4::bool[], $5::bool[]))
        OR ($6::bool AND NOT c.status = ANY($7::text[])))
   AND (cardinality($8::text[]) = 0 OR c.status = ANY($8::text[]))
   AND ($9::bool IS NULL OR c.archived = $9::bool)
   AND (NOT $10::bool
        OR (c.status = ANY($11::text[]) AND NOT c.archived
            AND (h.heartbeat_at IS NULL
                 OR h.heartbeat_at <= now() - interval '1 microsecond' * $1)))
 ORDER BY c.updated_at, c.id
 LIMIT $12";

/// Every status a row can hold: the model's and the legacy ones.
fn storable_statuses() -> Vec<ChatStatus> {
    ChatStatus::KNOWN
        .into_iter()
        .chain(LEGACY_STATUSES.map(|s| ChatStatus::Other(s.to_owned())))
        .collect()
}

/// The stored (status, archived, queue non-empty) tuples that classify as
/// one of `states`, by the model's classifier over every storable status.
fn tuples_of(states: &[ExecutionState]) -> (Vec<String>, Vec<bool>, Vec<bool>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for status in storable_statuses() {
        for archived in [false, true] {
            for queued in [false, true] {
                if states.contains(&ExecutionState::classify(&status, archived, queued)) {
                    out.0.push(status.as_str().to_owned());
                    out.1.push(archived);
                    out.2.push(queued);
                }
            }
        }
    }
    out
}

fn texts(statuses: &[ChatStatus]) -> Vec<String> {
    statuses.iter().map(|s| s.as_str().to_owned()).collect()
}

/// Chats matching `filter` (lease freshness by `options.heartbeat_stale`),
/// oldest first by the row's last write of execution state, then id.
pub async fn list_chats(
    pool: &PgPool,
    filter: &ChatFilter,
    options: &Options,
) -> Result<Vec<ChatSummary>, StoreError> {
    const CONTEXT: &str = "list chats";
    let (statuses, archived, queued) = tuples_of(&filter.states);
    let mut tx = read_only(pool, CONTEXT).await?;
    let rows = sqlx::query(LIST_CHATS)
        .bind(micros(options.heartbeat_stale))
        .bind(!filter.states.is_empty())
        .bind(statuses)
        .bind(archived)
        .bind(queued)
        .bind(filter.states.contains(&ExecutionState::Invalid))
        .bind(texts(&storable_statuses()))
        .bind(texts(&filter.statuses))
        .bind(filter.archived)
        .bind(filter.stale_lease)
        .bind(texts(&ChatStatus::runnable()))
        .bind(i64::try_from(filter.limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| store_error(CONTEXT, e))?;
    let _ = tx.rollback().await;
    rows.iter().map(|r| summary(r, CONTEXT)).collect()
}

fn summary(row: &PgRow, context: &'static str) -> Result<ChatSummary, StoreError> {
    let status = ChatStatus::parse(&get::<String>(row, context, "status")?);
    let archived: bool = get(row, context, "archived")?;
    let queue_len = count(row, context, "queued")?;
    let state = ExecutionState::classify(&status, archived, queue_len > 0);
    let lease = lease(row, context)?;
    let title: String = get(row, context, "title")?;
    Ok(ChatSummary {
        id: ChatId(get(row, context, "id")?),
        needs_worker: state.is_runnable() && lease.is_stale_or_missing(),
        status,
        archived,
        state,
        queue_len,
        lease,
        snapshot_version: get(row, context, "snapshot_version")?,
        title: jsonb::decode_str(&title).into_owned(),
        updated_at: Timestamp(get(row, context, "updated_us")?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_filters_become_the_tuples_the_classifier_maps_to_them() {
        let (s, a, q) = tuples_of(&[ExecutionState::R1, ExecutionState::XW]);
        let got: Vec<(&str, bool, bool)> = s
            .iter()
            .zip(a)
            .zip(q)
            .map(|((s, a), q)| (s.as_str(), a, q))
            .collect();
        assert_eq!(got, [("waiting", true, false), ("running", false, true)]);
        // Every storable tuple lands in exactly one state.
        let all = tuples_of(&ExecutionState::ALL);
        assert_eq!(all.0.len(), storable_statuses().len() * 4);
        assert!(tuples_of(&[ExecutionState::N]).0.is_empty());
    }

    #[test]
    fn next_transitions_are_the_matrix_row_then_ownership() {
        let names = |state, owned| -> Vec<&str> {
            next_transitions(state, owned)
                .iter()
                .map(|n| n.transition.as_str())
                .collect()
        };
        assert_eq!(names(ExecutionState::XW, false), ["SetArchived", "Acquire"]);
        assert_eq!(
            names(ExecutionState::XW, true),
            ["SetArchived", "Acquire", "Abandon"]
        );
        assert!(names(ExecutionState::N, false) == ["CreateChat"]);
        let r0 = next_transitions(ExecutionState::R0, true);
        let send = r0
            .iter()
            .find(|n| n.transition == Transition::SendMessage)
            .unwrap();
        assert_eq!(send.to, [ExecutionState::R1, ExecutionState::I1]);
    }
}

//! The SQL this store sends, in one place.
//!
//! Timestamps cross the boundary as the model's microseconds since the
//! epoch, converted in SQL and never by a client-side date library:
//! `'epoch'::timestamptz + n * interval '1 microsecond'` one way and
//! `(extract(epoch from ts) * 1000000)::bigint` (exact: `extract` returns
//! numeric) the other.
//!
//! Statements with bind parameters have fixed texts, so sqlx prepares each
//! once per connection and reuses it. The statements that open a
//! transaction are simple queries instead (several statements in one
//! message, one round trip), with the chat id and the staleness threshold
//! inlined as literals: both are produced by this crate (a `Uuid`'s
//! canonical text and an integer), never by a user.

use crate::pooling::Pooling;

/// The chat row's columns, from `chats c`, in the order
/// [`crate::decode::chat_row`] reads them.
macro_rules! row_columns {
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

/// Everything a transition sees of a chat, read after the row lock is
/// held: the row, the queue ids in order, the lease freshness, store time
/// and the tool bookkeeping. `$1` chat, `$2` staleness threshold (µs).
///
/// The queue ids and the tool bookkeeping come from the chat row
/// (`queue_ids`, `tool_state`: migration 0002), written with every plan
/// that changes the queue or the history, so neither table is read. A
/// cache whose version is not the row's `queue_version` /
/// `history_version` is stale (a chat from before that migration, or
/// written by an older binary): then the select reads the tables instead,
/// through functions that are called only in that case (a function call,
/// unlike a subquery, costs nothing to set up when it is not evaluated).
///
/// It is a statement of its own, after the lock statement, on purpose:
/// under READ COMMITTED a statement that had to wait for the row lock
/// re-reads only the locked row at its newest version, while any subquery
/// keeps the snapshot taken before the wait. Reading the heartbeats (or,
/// for a stale cache, the queue and the history) in the lock statement
/// would return what the previous lock holder saw, not what it committed.
macro_rules! include_snapshot_select {
    () => {
        concat!(
            "SELECT ",
            row_columns!(),
            ", CASE WHEN c.queue_ids_version = c.queue_version THEN c.queue_ids \
            ELSE chatstate_queue_ids(c.id) END AS queue, \
       (c.worker_id IS NOT NULL AND c.runner_id IS NOT NULL AND EXISTS ( \
           SELECT 1 FROM chat_heartbeats h \
            WHERE h.chat_id = c.id AND h.runner_id = c.runner_id \
              AND h.heartbeat_at > now() - interval '1 microsecond' * $2)) AS lease_fresh, \
       (extract(epoch FROM now()) * 1000000)::bigint AS now_us, \
       CASE WHEN c.tool_state_version = c.history_version THEN c.tool_state::text END \
           AS tool_state, \
       CASE WHEN c.tool_state_version = c.history_version THEN NULL \
            ELSE chatstate_tool_tail(c.id, NULL) END AS tools \
       FROM chats c WHERE c.id = $1"
        )
    };
}

/// Which incarnation of which server a statement runs on: its timeline
/// (the first eight hex digits of the name of the WAL file being written)
/// and the start time of its postmaster, as text. A transaction id is only
/// looked up on the incarnation it was assigned on (see `crate::resolve`):
/// an id the server gave out but never wrote to disk (the server crashed
/// before the transaction's first WAL flush) is given out again after a
/// restart, and a promoted standby, on a new timeline, may give out the
/// ids of transactions the old primary never replicated.
macro_rules! incarnation {
    () => {
        "(substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) || '/' || \
          extract(epoch FROM pg_postmaster_start_time())::text)"
    };
}

/// The session-level prepared statements the openings execute, by name.
///
/// A transaction opens with one simple-query message (`BEGIN` and the
/// statements after it), and a simple query cannot carry bind parameters.
/// Sending the snapshot select as text would make the server plan it on
/// every Update, which costs more than executing it; `EXECUTE` of a
/// statement prepared once per session reuses the plan.
///
/// `chatstate_set_version` writes a snapshot bump that no plan wrote (an
/// Update without a row write; see [`crate::tx`]), in the commit message.
pub(crate) const PREPARED: [(&str, &str); 4] = [
    (
        "chatstate_set_version",
        "(uuid, bigint) AS UPDATE chats SET snapshot_version = $2 WHERE id = $1",
    ),
    // The exclusive lock also returns the transaction id (the row lock
    // assigns one anyway), so that a commit whose connection is lost can
    // be resolved without a round trip more (see `crate::resolve`).
    (
        "chatstate_lock_exclusive",
        concat!(
            "(uuid) AS SELECT pg_current_xact_id()::text::bigint AS xid, ",
            incarnation!(),
            " AS incarnation FROM chats WHERE id = $1 FOR NO KEY UPDATE"
        ),
    ),
    (
        "chatstate_lock_shared",
        "(uuid) AS SELECT FROM chats WHERE id = $1 FOR SHARE",
    ),
    (
        "chatstate_snapshot",
        concat!("(uuid, bigint) AS ", include_snapshot_select!()),
    ),
];

/// The names of [`PREPARED`] that exist in this session.
pub(crate) const PREPARED_NAMES: &str =
    "SELECT name FROM pg_prepared_statements WHERE name LIKE 'chatstate\\_%'";

/// `PREPARE` statements for those of [`PREPARED`] not in `existing`.
pub(crate) fn prepare_missing(existing: &[String]) -> String {
    let mut out = String::new();
    for (name, body) in PREPARED {
        if !existing.iter().any(|e| e == name) {
            out.push_str("PREPARE ");
            out.push_str(name);
            out.push(' ');
            out.push_str(body);
            out.push_str("; ");
        }
    }
    out
}

/// How a transaction starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Opening {
    /// `BEGIN`, FOR NO KEY UPDATE, snapshot; the snapshot is bumped.
    Update,
    /// FOR NO KEY UPDATE and snapshot inside an open transaction (nested
    /// Update); the snapshot is bumped.
    Nested,
    /// `BEGIN`, FOR NO KEY UPDATE, snapshot.
    Exclusive,
    /// `BEGIN`, FOR SHARE, snapshot.
    Shared,
}

/// Sets the session's default isolation level to READ COMMITTED, for the
/// single statements that run in implicit transactions (chat creation,
/// heartbeats). Sent once per connection, when it is set up.
pub(crate) const SESSION_READ_COMMITTED: &str =
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED";

/// The status of a transaction by id (`'committed'`, `'aborted'`, `'in
/// progress'`, or NULL when it is too old to tell), and the server's
/// incarnation (see `incarnation!`). `$1` the id.
pub(crate) const XACT_STATUS: &str = concat!(
    "SELECT pg_xact_status($1::text::xid8) AS status, ",
    incarnation!(),
    " AS incarnation"
);

/// The simple query that opens a transaction (or a nested Update) on a
/// chat: one message, one round trip. The exclusive lock statement returns
/// the transaction id (`xid`), the shared one no columns; the snapshot's
/// row is the last one.
///
/// Every transaction begins with `BEGIN ISOLATION LEVEL READ COMMITTED`:
/// the isolation level is stated, never inherited, since the locking
/// protocol is built on READ COMMITTED (a statement that waited for a row
/// lock sees the row as its holder committed it). Under a database default
/// of REPEATABLE READ or SERIALIZABLE, contended Updates would otherwise
/// fail with serialization errors.
///
/// Update and Lock take the same FOR NO KEY UPDATE row lock (an Update's
/// bump is written later, with the plan's row or with the commit; see
/// [`crate::tx`]). It conflicts with FOR SHARE (ReadLock) and with itself
/// (Update, Lock), but not with the FOR KEY SHARE lock that a foreign-key
/// check takes, so heartbeat upserts never wait for an open Update.
pub(crate) fn opening(
    opening: Opening,
    chat: uuid::Uuid,
    stale_us: i64,
    pooling: Pooling,
) -> String {
    let begin = "BEGIN ISOLATION LEVEL READ COMMITTED; ";
    let (begin, lock) = match opening {
        Opening::Update | Opening::Exclusive => (begin, "chatstate_lock_exclusive"),
        Opening::Nested => ("", "chatstate_lock_exclusive"),
        Opening::Shared => (begin, "chatstate_lock_shared"),
    };
    let chat = format!("'{}'::uuid", chat.hyphenated());
    let stale = stale_us.to_string();
    format!(
        "{begin}{}; {}",
        call(pooling, lock, &[&chat]),
        call(pooling, "chatstate_snapshot", &[&chat, &stale])
    )
}

/// The SQLSTATE the commit's transaction check raises when the
/// transaction is no longer the one the store opened (class `CS`: this
/// store's own).
pub(crate) const ENDED_BY_CALLER: &str = "CS001";

/// The commit message's check that the transaction is still the one the
/// store opened (transaction id `xid`): it raises [`ENDED_BY_CALLER`]
/// otherwise, and, like any statement, fails with 25P02 in an aborted
/// transaction. Sent only when the application wrote in the transaction.
pub(crate) fn same_transaction(xid: i64) -> String {
    format!(
        "DO $chatstate$ BEGIN \
           IF pg_current_xact_id_if_assigned() IS DISTINCT FROM '{xid}'::xid8 THEN \
             RAISE EXCEPTION 'the transaction was ended by the application' \
               USING ERRCODE = '{ENDED_BY_CALLER}'; \
           END IF; \
         END $chatstate$; "
    )
}

/// The statement that writes a pending snapshot bump, for the commit
/// message (the chat id is this crate's, the version an integer).
pub(crate) fn set_version(chat: uuid::Uuid, version: i64, pooling: Pooling) -> String {
    let chat = format!("'{}'::uuid", chat.hyphenated());
    format!(
        "{}; ",
        call(
            pooling,
            "chatstate_set_version",
            &[&chat, &version.to_string()]
        )
    )
}

/// Runs one of [`PREPARED`] with literal arguments: `EXECUTE` of the
/// session's prepared statement, or (when the session keeps nothing) its
/// body with the arguments in place of the parameters. The arguments are
/// this crate's own literals (a quoted UUID, integers), never caller text.
fn call(pooling: Pooling, name: &str, args: &[&str]) -> String {
    if pooling.persistent() {
        return format!("EXECUTE {name}({})", args.join(", "));
    }
    let (_, definition) = PREPARED
        .iter()
        .find(|(n, _)| *n == name)
        .expect("a statement of PREPARED");
    let (_, body) = definition
        .split_once(") AS ")
        .expect("a PREPARED definition is `(types) AS body`");
    // From the highest parameter down, so `$1` never matches in `$12`
    // (the bodies have at most two parameters, which is checked below).
    let mut text = body.to_owned();
    for (i, arg) in args.iter().enumerate().rev() {
        text = text.replace(&format!("${}", i + 1), arg);
    }
    debug_assert!(!text.contains('$'), "every parameter of {name} inlined");
    text
}

/// What EditMessage needs: the target (if active and in this chat), the
/// active ids from it on, and the tool bookkeeping before it.
/// `$1` chat, `$2` message id.
/// The tool bookkeeping before the target is folded from the history
/// tail before it (`chatstate_tool_tail`, migration 0002).
pub(crate) const EDIT_CONTEXT: &str = "\
SELECT t.role, t.visibility, t.model_config_id,
       coalesce((SELECT array_agg(m.id ORDER BY m.id) FROM chat_messages m
                  WHERE m.chat_id = $1 AND NOT m.deleted AND m.id >= $2), '{}') AS from_target,
       chatstate_tool_tail($1, $2) AS tools
  FROM (SELECT 1) AS one
  LEFT JOIN chat_messages t ON t.id = $2 AND t.chat_id = $1 AND NOT t.deleted";

/// How many messages a plan inserts from its own list (the promoted
/// queued row aside).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Messages {
    /// None.
    #[default]
    None,
    /// Exactly one and no promoted row: its fields are bound one by one
    /// (`$27..$31`), which spares the server parsing a JSON array.
    One,
    /// Several, or one before a promoted row: a JSON array (`$9`).
    Many,
}

/// Which parts of [`apply`] a plan needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Shape {
    /// Soft deletes.
    pub(crate) soft: bool,
    /// A queue reorder.
    pub(crate) reorder: bool,
    /// Queued rows to delete (the promoted one included).
    pub(crate) dequeue: bool,
    /// A queued row to append.
    pub(crate) enqueue: bool,
    /// Messages to insert.
    pub(crate) messages: Messages,
    /// A queued row to promote.
    pub(crate) promote: bool,
    /// A heartbeat upsert.
    pub(crate) beat: bool,
    /// A delete of the chat's other heartbeat rows.
    pub(crate) prune: bool,
    /// A row write.
    pub(crate) row: bool,
    /// Without a row write: the Update's snapshot bump is still to be
    /// written.
    pub(crate) bump: bool,
}

impl Shape {
    /// Every shape, by index (for tests).
    #[cfg(test)]
    pub(crate) fn all() -> impl Iterator<Item = Shape> {
        // Bits 4 and 5 are the message count (0, 1, 2: never 3).
        (0..SHAPES).filter(|i| i & 0b11_0000 != 0b11_0000).map(|i| {
            let bit = |b: usize| i & (1 << b) != 0;
            Shape {
                soft: bit(0),
                reorder: bit(1),
                dequeue: bit(2),
                enqueue: bit(3),
                messages: match (bit(4), bit(5)) {
                    (false, false) => Messages::None,
                    (true, _) => Messages::One,
                    (false, true) => Messages::Many,
                },
                promote: bit(6),
                beat: bit(7),
                row: bit(8),
                bump: bit(9),
                prune: bit(10),
            }
        })
    }

    /// True when the plan changes the history (inserts or soft-deletes
    /// messages): the chat row's tool bookkeeping is written too.
    pub(crate) fn history(self) -> bool {
        self.soft || self.messages != Messages::None || self.promote
    }

    /// True when the plan changes the queue: the chat row's queue ids are
    /// written too.
    pub(crate) fn queue(self) -> bool {
        self.reorder || self.dequeue || self.enqueue || self.promote
    }

    /// True when the statement writes the chat row (and so returns a row
    /// only if the chat row was written).
    pub(crate) fn writes_chat(self) -> bool {
        self.row || self.bump || self.history() || self.queue()
    }

    /// True when the statement inserts history (and returns one row per
    /// inserted message).
    pub(crate) fn inserts(self) -> bool {
        self.messages != Messages::None || self.promote
    }

    fn index(self) -> usize {
        let messages = match self.messages {
            Messages::None => 0,
            Messages::One => 1,
            Messages::Many => 2,
        };
        [
            usize::from(self.soft),
            usize::from(self.reorder) << 1,
            usize::from(self.dequeue) << 2,
            usize::from(self.enqueue) << 3,
            messages << 4,
            usize::from(self.promote) << 6,
            usize::from(self.beat) << 7,
            usize::from(self.row) << 8,
            usize::from(self.bump) << 9,
            usize::from(self.prune) << 10,
        ]
        .iter()
        .sum()
    }
}

/// Index bound of [`Shape`]s.
const SHAPES: usize = 1 << 11;

/// The statement that writes a plan of `shape`: one statement whatever
/// the plan holds, made of the parts the plan needs. Its text depends on
/// the shape only (a few dozen shapes occur), so each is prepared once per
/// connection and reused; leaving out the parts a plan does not need
/// keeps the server from running empty scans and inserts on every Update.
///
/// Every data-modifying CTE sees the same snapshot (the one before the
/// statement), so each part names its rows by the plan's ids, not by what
/// another part wrote:
///
/// - `soft`: soft deletes, stamped with the plan's revision;
/// - `reorder`: the reorder-to-head target gets the chat's minimum
///   position minus one (never a row this plan also deletes);
/// - `promoted`: the promoted queued row, read;
/// - `dequeue`: deleted queued rows and the promoted one;
/// - `enqueue`: the appended queued row (its position comes from the
///   global sequence, so it is the tail);
/// - `prune`: deletes the chat's heartbeat rows but the upserted runner's
///   (all of them without one: `IS DISTINCT FROM NULL` holds for every
///   row), so the table stays bounded by the chats owned;
/// - `beat`: the heartbeat upsert at store time;
/// - the chat row: every execution-state column of the plan's row (or,
///   without a row change, only the snapshot version, which carries a
///   pending bump), the tool bookkeeping with its version when the plan
///   changes the history, the queue ids with their version when it changes
///   the queue (the ids the plan keeps, in order, then the appended row's);
/// - the history insert: the plan's messages in plan order, then the
///   promoted row as a user message, in ONE insert ordered by ordinality
///   so the ids follow that order (two inserts in one statement would run
///   in no defined order).
///
/// The main statement is the cheapest that returns what the caller
/// checks, without aggregating over the chat-row write:
///
/// - with history to insert: the insert, fed by the chat-row write's
///   `RETURNING` (a CTE), returning one row per message: no row at all
///   means the chat row was not written;
/// - else, with a chat-row write: that `UPDATE`, returning one row;
/// - else (a heartbeat alone): a `SELECT`.
///
/// Each returned row also carries the counts of the other parts present
/// (`soft_deleted`, `reordered`, `dequeued`, `beats`) and the appended
/// queued id (`queued_id`), which the caller checks against the plan.
///
/// Parameters (the same for every shape; a shape may leave some unused):
/// `$1` chat, `$2` revision, `$3` soft deletes, `$4` reorder target, `$5`
/// queued deletes, `$6` appended content (JSON text), `$7` its model
/// config, `$8` its creator, `$9` messages (JSON array), `$10` promoted
/// queued id, `$11` heartbeat runner, `$12..$24` the row's status,
/// archived, worker, runner, last_error, retry_state, generation_attempt,
/// deadline (µs), compaction marker (µs), snapshot, history, queue and
/// retry-state versions, `$25` the tool bookkeeping afterwards (JSON),
/// `$26` the queue afterwards without the appended row, `$27..$31` the
/// single message's role, content (JSON text), visibility, model config
/// and creator, `$32` the row's last model configuration.
pub(crate) fn apply(shape: Shape) -> &'static str {
    static TEXTS: [std::sync::OnceLock<String>; SHAPES] =
        [const { std::sync::OnceLock::new() }; SHAPES];
    TEXTS[shape.index()].get_or_init(|| apply_text(shape))
}

/// The `SET` list of the chat-row write.
fn chat_sets(shape: Shape) -> String {
    let mut sets = vec![if shape.row {
        "status = $12, archived = $13, worker_id = $14, runner_id = $15,
        last_error = $16::text::jsonb, retry_state = $17::text::jsonb, generation_attempt = $18,
        requires_action_deadline_at = 'epoch'::timestamptz + $19::bigint * interval '1 microsecond',
        compaction_requested_at = 'epoch'::timestamptz + $20::bigint * interval '1 microsecond',
        snapshot_version = $21, history_version = $22, queue_version = $23,
        retry_state_version = $24, last_model_config_id = $32, updated_at = now()"
    } else {
        "snapshot_version = $21"
    }];
    if shape.history() {
        sets.push("tool_state = $25::text::jsonb, tool_state_version = $22");
    }
    if shape.queue() {
        sets.push(if shape.enqueue {
            "queue_ids = array_append($26::bigint[], (SELECT id FROM enqueue)), \
             queue_ids_version = $23"
        } else {
            "queue_ids = $26::bigint[], queue_ids_version = $23"
        });
    }
    sets.join(",\n        ")
}

/// The rows the history insert takes (`chat_id` from the chat-row write).
fn history_source(shape: Shape) -> &'static str {
    const PLAN_MESSAGES: &str =
        "SELECT m.o AS ord, m.v ->> 'role' AS role, m.v -> 'content' AS content,
                   m.v ->> 'visibility' AS visibility,
                   (m.v ->> 'model_config_id')::uuid AS model_config_id,
                   (m.v ->> 'created_by')::uuid AS created_by,
                   NULL::bigint AS queued_message_id
              FROM jsonb_array_elements($9::text::jsonb) WITH ORDINALITY AS m(v, o)";
    // The promoted queued row as a user message, after every plan message:
    // content and creator copied, its model configuration or else the
    // chat's last one as the plan's messages left it ($32).
    const PROMOTED: &str = "SELECT 9223372036854775807 AS ord, 'user' AS role, p.content,
                   'both' AS visibility,
                   coalesce(p.model_config_id, $32::uuid) AS model_config_id,
                   p.created_by, p.id AS queued_message_id
              FROM promoted p";
    const COLUMNS: &str = "SELECT w.id, n.role, n.content, n.visibility, n.model_config_id, \
                           n.created_by, n.queued_message_id, $2\n      FROM written w CROSS JOIN (";
    static TEXTS: [std::sync::OnceLock<String>; 3] = [const { std::sync::OnceLock::new() }; 3];
    match (shape.messages, shape.promote) {
        (Messages::One, false) => {
            "SELECT w.id, $27::text, $28::text::jsonb, $29::text, $30::uuid, $31::uuid, \
             NULL::bigint, $2 FROM written w"
        }
        (Messages::None, _) => TEXTS[0].get_or_init(|| format!("{COLUMNS}{PROMOTED}) AS n")),
        (_, false) => {
            TEXTS[1].get_or_init(|| format!("{COLUMNS}{PLAN_MESSAGES}) AS n ORDER BY n.ord"))
        }
        (_, true) => TEXTS[2].get_or_init(|| {
            format!(
                "{COLUMNS}{PLAN_MESSAGES}\n             UNION ALL {PROMOTED}) AS n ORDER BY n.ord"
            )
        }),
    }
}

fn apply_text(shape: Shape) -> String {
    let mut ctes: Vec<String> = Vec::new();
    let mut cols: Vec<&str> = Vec::new();
    let mut part = |on: bool, cte: &str, col: &'static str| {
        if on {
            ctes.push(cte.to_owned());
            if !col.is_empty() {
                cols.push(col);
            }
        }
    };
    part(
        shape.soft,
        "soft AS (
    UPDATE chat_messages SET deleted = true, revision = $2
     WHERE chat_id = $1 AND id = ANY($3::bigint[]) AND NOT deleted
    RETURNING id)",
        "(SELECT count(*) FROM soft) AS soft_deleted",
    );
    part(
        shape.reorder,
        "reorder AS (
    UPDATE chat_queued_messages
       SET position = (SELECT min(q.position) FROM chat_queued_messages q WHERE q.chat_id = $1) - 1
     WHERE chat_id = $1 AND id = $4::bigint
       AND NOT (id = ANY($5::bigint[])) AND id IS DISTINCT FROM $10::bigint
    RETURNING id)",
        "(SELECT count(*) FROM reorder) AS reordered",
    );
    part(
        shape.promote,
        "promoted AS (
    SELECT q.id, q.content, q.model_config_id, q.created_by
      FROM chat_queued_messages q WHERE q.chat_id = $1 AND q.id = $10::bigint)",
        "",
    );
    part(
        shape.dequeue,
        "dequeue AS (
    DELETE FROM chat_queued_messages
     WHERE chat_id = $1 AND (id = ANY($5::bigint[]) OR id = $10::bigint)
    RETURNING id)",
        "(SELECT count(*) FROM dequeue) AS dequeued",
    );
    part(
        shape.enqueue,
        "enqueue AS (
    INSERT INTO chat_queued_messages (chat_id, content, model_config_id, created_by)
    VALUES ($1, $6::text::jsonb, $7::uuid, $8::uuid)
    RETURNING id)",
        "(SELECT id FROM enqueue) AS queued_id",
    );
    // Nothing reads its output: a data-modifying CTE runs to completion
    // whether or not the main statement refers to it.
    part(
        shape.prune,
        "prune AS (
    DELETE FROM chat_heartbeats
     WHERE chat_id = $1 AND runner_id IS DISTINCT FROM $11::uuid)",
        "",
    );
    part(
        shape.beat,
        "beat AS (
    INSERT INTO chat_heartbeats (chat_id, runner_id, heartbeat_at)
    VALUES ($1, $11::uuid, now())
    ON CONFLICT (chat_id, runner_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at
    RETURNING 1)",
        "(SELECT count(*) FROM beat) AS beats",
    );
    let chat_write = format!(
        "UPDATE chats SET\n        {}\n     WHERE id = $1",
        chat_sets(shape)
    );
    let with = |ctes: &[String]| {
        if ctes.is_empty() {
            String::new()
        } else {
            format!("WITH {}\n", ctes.join(",\n"))
        }
    };
    let returning = |first: &str| {
        let mut all = vec![first];
        all.extend(cols.iter().copied());
        all.join(", ")
    };
    if shape.inserts() {
        ctes.push(format!("written AS (\n    {chat_write}\n    RETURNING id)"));
        format!(
            "{}INSERT INTO chat_messages
    (chat_id, role, content, visibility, model_config_id, created_by, queued_message_id, revision)
{}
RETURNING {}",
            with(&ctes),
            history_source(shape),
            returning("id")
        )
    } else if shape.writes_chat() {
        format!(
            "{}{chat_write}\nRETURNING {}",
            with(&ctes),
            returning("1 AS written")
        )
    } else {
        format!("{}SELECT {}", with(&ctes), returning("1 AS written"))
    }
}

/// Creates a chat with its initial history and metadata in one statement
/// (autocommit: one round trip). `ON CONFLICT DO NOTHING` detects an
/// existing chat, whose state the same statement reads; the in-transaction
/// notifications are sent only when the row was created, and Postgres
/// delivers them with the statement's commit.
///
/// Parameters: `$1` id, `$2` owner, `$3..$15` status, archived, worker,
/// runner, last_error, retry_state, generation_attempt, deadline (µs),
/// compaction marker (µs), snapshot, history, queue and retry-state
/// versions, `$16` dynamic tools (JSON), `$17` last model config, `$18`
/// title, `$19` labels (JSON), `$20` metadata (JSON), `$21` messages (JSON
/// array), `$22` revision, `$23` channels, `$24` payloads, `$25` the tool
/// bookkeeping of the initial messages (JSON). The row's caches (migration
/// 0002) start valid: the tool bookkeeping at the history version, the
/// empty queue at the queue version.
pub(crate) const CREATE_CHAT: &str = "\
WITH new_chat AS (
    INSERT INTO chats (id, owner_id, status, archived, worker_id, runner_id, last_error, retry_state,
                       generation_attempt, requires_action_deadline_at, compaction_requested_at,
                       snapshot_version, history_version, queue_version, retry_state_version,
                       dynamic_tools, last_model_config_id, title, labels, metadata,
                       tool_state, tool_state_version, queue_ids, queue_ids_version)
    VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8::text::jsonb, $9,
            'epoch'::timestamptz + $10::bigint * interval '1 microsecond',
            'epoch'::timestamptz + $11::bigint * interval '1 microsecond',
            $12, $13, $14, $15, $16::text::jsonb, $17, $18, $19::text::jsonb, $20::text::jsonb,
            $25::text::jsonb, $13, '{}', $14)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
), new_messages AS (
    INSERT INTO chat_messages (chat_id, role, content, visibility, model_config_id, created_by, revision)
    SELECT n.id, m.v ->> 'role', m.v -> 'content', m.v ->> 'visibility',
           (m.v ->> 'model_config_id')::uuid, (m.v ->> 'created_by')::uuid, $22
      FROM new_chat n CROSS JOIN jsonb_array_elements($21::text::jsonb) WITH ORDINALITY AS m(v, o)
     ORDER BY m.o
    RETURNING id
), existing AS (
    SELECT c.status, c.archived,
           EXISTS (SELECT 1 FROM chat_queued_messages q WHERE q.chat_id = c.id) AS queued
      FROM chats c WHERE c.id = $1
)
SELECT (SELECT count(*) FROM new_chat) AS created,
       coalesce((SELECT array_agg(id ORDER BY id) FROM new_messages), '{}') AS message_ids,
       (SELECT count(pg_notify(n.channel, n.payload)::text)
          FROM (SELECT u.channel, u.payload
                  FROM unnest($23::text[], $24::text[]) WITH ORDINALITY AS u(channel, payload, o)
                 WHERE EXISTS (SELECT 1 FROM new_chat)
                 ORDER BY u.o) AS n) AS notified,
       e.status, e.archived, e.queued
  FROM (SELECT 1) AS one LEFT JOIN existing e ON true";

/// The state of an existing chat (for a create that lost a race).
pub(crate) const CHAT_STATE: &str = "\
SELECT c.status, c.archived,
       EXISTS (SELECT 1 FROM chat_queued_messages q WHERE q.chat_id = c.id) AS queued
  FROM chats c WHERE c.id = $1";

/// The row and its metadata. `$1` chat.
pub(crate) const LOAD_ROW: &str = concat!(
    "SELECT ",
    row_columns!(),
    ", c.title, c.labels::text AS labels, c.metadata::text AS metadata \
     FROM chats c WHERE c.id = $1"
);

/// The queue, head first. `$1` chat.
pub(crate) const LOAD_QUEUE: &str = "\
SELECT id, content::text AS content, model_config_id, created_by
  FROM chat_queued_messages WHERE chat_id = $1 ORDER BY position, id";

/// Every message, soft-deleted ones included, in id order. `$1` chat.
pub(crate) const LOAD_HISTORY: &str = "\
SELECT id, role, content::text AS content, visibility, model_config_id, created_by,
       queued_message_id, deleted, revision
  FROM chat_messages WHERE chat_id = $1 ORDER BY id";

/// Metadata only; `NULL` leaves a field. `$1` chat, `$2` title, `$3`
/// labels (JSON), `$4` write metadata?, `$5` metadata (JSON).
pub(crate) const WRITE_METADATA: &str = "\
UPDATE chats SET title = coalesce($2, title),
                 labels = coalesce($3::text::jsonb, labels),
                 metadata = CASE WHEN $4 THEN $5::text::jsonb ELSE metadata END
 WHERE id = $1";

/// Heartbeat upsert at store time, only while `$2` is the chat's runner,
/// in one statement that also says what it found: `found` (the chat
/// exists), `written` (the heartbeat was upserted) and the committed owner.
/// `$1` chat, `$2` runner.
///
/// The chat row is read without a lock (the last committed version, as of
/// the statement's start), and the foreign-key check takes FOR KEY SHARE
/// on it, which does not conflict with an Update's FOR NO KEY UPDATE: an
/// open Update never makes a heartbeat wait. (An open Acquire or Abandon
/// that deleted this runner's row holds that heartbeat row, so the old
/// runner's upsert waits for it; only a runner being replaced can wait.)
pub(crate) const HEARTBEAT: &str = "\
WITH c AS (
    SELECT c.id, c.worker_id, c.runner_id FROM chats c WHERE c.id = $1
), beat AS (
    INSERT INTO chat_heartbeats (chat_id, runner_id, heartbeat_at)
    SELECT c.id, $2, now() FROM c WHERE c.runner_id = $2
    ON CONFLICT (chat_id, runner_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at
    RETURNING 1
)
SELECT c.id IS NOT NULL AS found, (SELECT count(*) FROM beat) AS written,
       c.worker_id, c.runner_id
  FROM (SELECT 1) AS one LEFT JOIN c ON true";

/// The chats that need an owner, oldest first (`updated_at`, then id), at
/// most `$3`: status in `$1` (the model's runnable statuses), not archived,
/// no heartbeat of the owner's runner younger than `$2` µs (without an
/// owner, `h.runner_id = NULL` matches nothing: an anti-join, no `OR`).
///
/// The filter on status and `NOT archived` is the predicate of the
/// acquisition index `chats_acquisition_candidates (status, updated_at, id)
/// WHERE NOT archived` (migration 0001), which serves it.
///
/// `FOR NO KEY UPDATE SKIP LOCKED`: a row another transaction holds (an
/// Update or Lock, FOR NO KEY UPDATE; a ReadLock, FOR SHARE) is skipped
/// instead of waited for, and does not count towards the limit (the lock
/// step runs below the limit). The statement runs on its own, so the row
/// locks it takes end with it; FOR NO KEY UPDATE is the weakest lock SKIP
/// LOCKED can test an Update's lock with, and it lets heartbeats (FOR KEY
/// SHARE) through.
pub(crate) const CLAIMABLE: &str = "\
SELECT c.id FROM chats c
 WHERE c.status = ANY($1::text[]) AND NOT c.archived
   AND NOT EXISTS (
        SELECT 1 FROM chat_heartbeats h
         WHERE h.chat_id = c.id AND h.runner_id = c.runner_id
           AND h.heartbeat_at > now() - interval '1 microsecond' * $2)
 ORDER BY c.updated_at, c.id
 LIMIT $3
   FOR NO KEY UPDATE OF c SKIP LOCKED";

/// [`CLAIMABLE`] among the chats `$3` (no limit: the list bounds it).
pub(crate) const CLAIMABLE_AMONG: &str = "\
SELECT c.id FROM chats c
 WHERE c.id = ANY($3::uuid[])
   AND c.status = ANY($1::text[]) AND NOT c.archived
   AND NOT EXISTS (
        SELECT 1 FROM chat_heartbeats h
         WHERE h.chat_id = c.id AND h.runner_id = c.runner_id
           AND h.heartbeat_at > now() - interval '1 microsecond' * $2)
 ORDER BY c.updated_at, c.id
   FOR NO KEY UPDATE OF c SKIP LOCKED";

/// Ages every stored instant by `$1` microseconds (TestControl: store
/// time cannot move, so the data moves the other way).
pub(crate) const ADVANCE_CLOCK: &str = "\
WITH beats AS (
    UPDATE chat_heartbeats SET heartbeat_at = heartbeat_at - $1::bigint * interval '1 microsecond'
    RETURNING 1
)
UPDATE chats
   SET requires_action_deadline_at =
           requires_action_deadline_at - $1::bigint * interval '1 microsecond',
       compaction_requested_at = compaction_requested_at - $1::bigint * interval '1 microsecond'
 WHERE requires_action_deadline_at IS NOT NULL OR compaction_requested_at IS NOT NULL";

/// Writes status and archived directly (TestControl). `$1` chat, `$2`
/// status, `$3` archived.
pub(crate) const SET_RAW_STATE: &str = "UPDATE chats SET status = $2, archived = $3 WHERE id = $1";

/// Heartbeat rows, over every chat.
pub(crate) const HEARTBEAT_ROWS: &str = "SELECT count(*) FROM chat_heartbeats";

/// Backends of this database waiting for a lock.
pub(crate) const LOCK_WAITERS: &str = "\
SELECT count(*) FROM pg_stat_activity
 WHERE datname = current_database() AND wait_event_type = 'Lock'";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_inlines_only_our_literals() {
        let id = uuid::Uuid::nil();
        let nil = "'00000000-0000-0000-0000-000000000000'::uuid";
        assert_eq!(
            opening(Opening::Update, id, 30_000_000, Pooling::Session),
            format!(
                "BEGIN ISOLATION LEVEL READ COMMITTED; EXECUTE chatstate_lock_exclusive({nil}); \
                 EXECUTE chatstate_snapshot({nil}, 30000000)"
            )
        );
        let session = Pooling::Session;
        assert!(
            opening(Opening::Nested, id, 1, session)
                .starts_with("EXECUTE chatstate_lock_exclusive(")
        );
        assert!(opening(Opening::Shared, id, 1, session).contains("chatstate_lock_shared"));
        assert!(opening(Opening::Exclusive, id, 1, session).contains("chatstate_lock_exclusive"));
        assert_eq!(
            set_version(id, 7, session),
            format!("EXECUTE chatstate_set_version({nil}, 7); ")
        );
    }

    /// Behind a transaction pooler nothing is executed by name: the bodies
    /// of the prepared statements, with the same literals in place of
    /// every parameter.
    #[test]
    fn transaction_pooling_inlines_the_bodies() {
        let id = uuid::Uuid::nil();
        let nil = "'00000000-0000-0000-0000-000000000000'::uuid";
        let pooled = Pooling::Transaction;
        for opening_kind in [
            Opening::Update,
            Opening::Nested,
            Opening::Shared,
            Opening::Exclusive,
        ] {
            let text = opening(opening_kind, id, 30_000_000, pooled);
            assert!(!text.contains("EXECUTE") && !text.contains('$'), "{text}");
            assert!(text.contains(&format!("WHERE id = {nil}")), "{text}");
            assert!(
                text.contains("interval '1 microsecond' * 30000000"),
                "{text}"
            );
            assert_eq!(text.starts_with("BEGIN"), opening_kind != Opening::Nested);
        }
        assert!(opening(Opening::Update, id, 1, pooled).contains("FOR NO KEY UPDATE"));
        assert!(opening(Opening::Shared, id, 1, pooled).contains("FOR SHARE"));
        assert_eq!(
            set_version(id, 7, pooled),
            format!("UPDATE chats SET snapshot_version = 7 WHERE id = {nil}; ")
        );
    }

    #[test]
    fn prepares_only_what_is_missing() {
        let all = prepare_missing(&[]);
        assert_eq!(all.matches("PREPARE ").count(), PREPARED.len());
        assert!(all.contains("PREPARE chatstate_snapshot (uuid, bigint) AS SELECT c.id"));
        let some = prepare_missing(&["chatstate_set_version".to_owned()]);
        assert!(!some.contains("chatstate_set_version"));
        assert_eq!(some.matches("PREPARE ").count(), PREPARED.len() - 1);
    }

    #[test]
    fn shapes_index_uniquely() {
        let mut seen = std::collections::BTreeSet::new();
        for (i, shape) in Shape::all().enumerate() {
            assert!(seen.insert(shape.index()), "{i}: {shape:?}");
        }
        assert_eq!(seen.len(), SHAPES * 3 / 4);
    }

    /// The claimable sweep reads the acquisition index of migration 0001
    /// (`chats_acquisition_candidates`), not the whole table: 20,000 idle
    /// chats and 20 runnable ones, analysed, then the server's plan.
    #[tokio::test]
    async fn claimable_uses_the_acquisition_index() {
        use sqlx::Connection;
        let cluster =
            chatstate_testing::throwaway::Cluster::shared().unwrap_or_else(|e| panic!("{e}"));
        let pool = cluster
            .new_database()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query(
            "INSERT INTO chats (id, owner_id, status, archived, updated_at)
             SELECT gen_random_uuid(), gen_random_uuid(),
                    CASE WHEN i % 1000 = 0 THEN 'running' ELSE 'waiting' END,
                    i % 3 = 0, now() - i * interval '1 second'
               FROM generate_series(1, 20020) AS i",
        )
        .execute(&mut *conn)
        .await
        .unwrap();
        sqlx::query("ANALYZE chats")
            .execute(&mut *conn)
            .await
            .unwrap();
        let statuses: Vec<String> = chatstate_model::ChatStatus::runnable()
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect();
        let explain = |analyze: bool| {
            let options = if analyze {
                "(ANALYZE, COSTS OFF)"
            } else {
                "(COSTS OFF)"
            };
            format!("EXPLAIN {options} {CLAIMABLE}")
        };
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain(false)))
            .bind(&statuses)
            .bind(30_000_000_i64)
            .bind(10_i64)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains("chats_acquisition_candidates"),
            "the sweep does not use the acquisition index:\n{plan}"
        );
        assert!(!plan.contains("Seq Scan on chats"), "{plan}");
        let mut tx = conn.begin().await.unwrap();
        let analysed: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain(true)))
            .bind(&statuses)
            .bind(30_000_000_i64)
            .bind(10_i64)
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        println!("{}", analysed.join("\n"));
        tx.rollback().await.unwrap();
    }

    /// Every shape's statement parses and type-checks on the server, with
    /// the parameter types the store binds.
    #[tokio::test]
    async fn every_apply_shape_prepares() {
        use sqlx::{AssertSqlSafe, Connection};
        let cluster =
            chatstate_testing::throwaway::Cluster::shared().unwrap_or_else(|e| panic!("{e}"));
        let name = cluster
            .create_database()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut conn = sqlx::PgConnection::connect_with(&cluster.connect_options(&name))
            .await
            .unwrap();
        const TYPES: &str = "uuid, bigint, bigint[], bigint, bigint[], text, uuid, uuid, text, \
                             bigint, uuid, text, bool, uuid, uuid, text, text, bigint, bigint, \
                             bigint, bigint, bigint, bigint, bigint, text, bigint[], text, text, \
                             text, uuid, uuid";
        for shape in Shape::all().filter(|s| *s != Shape::default()) {
            let text = format!("PREPARE s({TYPES}) AS {}; DEALLOCATE s", apply(shape));
            sqlx::raw_sql(AssertSqlSafe(text))
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{shape:?}: {e}"));
        }
    }
}

-- The durable execution state of chats: rows, history, queue, heartbeats.
--
-- Append-only: never edit this file once released; add a new migration.
--
-- There are no triggers. Every version counter, message revision and
-- generation attempt is computed by the pure model (`chatstate_model::decide`)
-- and written verbatim by the store, so the numbers cannot depend on which
-- store ran the transition.
--
-- JSON columns hold what the store writes through its reversible escaping
-- (store-pg/src/jsonb.rs): jsonb cannot hold U+0000 and rewrites some
-- numbers, and the store must give back exactly what it was given.
--
-- Statuses, roles and visibilities are `text` with CHECK constraints rather
-- than enum types: built-in types cost no type lookups on the client side,
-- and a legacy status can still be stored so that Invalid rows exist.

CREATE TABLE chats (
    id uuid PRIMARY KEY,
    owner_id uuid NOT NULL,
    -- The five model statuses plus the legacy values (classified Invalid).
    status text NOT NULL CHECK (status IN (
        'waiting', 'running', 'interrupting', 'requires_action', 'error',
        'pending', 'paused', 'completed'
    )),
    archived boolean NOT NULL DEFAULT false,
    -- The lease: both ids or neither.
    worker_id uuid,
    runner_id uuid,
    last_error jsonb,
    retry_state jsonb,
    generation_attempt bigint NOT NULL DEFAULT 0 CHECK (generation_attempt >= 0),
    requires_action_deadline_at timestamptz,
    compaction_requested_at timestamptz,
    snapshot_version bigint NOT NULL DEFAULT 1 CHECK (snapshot_version >= 1),
    history_version bigint NOT NULL DEFAULT 0 CHECK (history_version >= 0),
    queue_version bigint NOT NULL DEFAULT 0 CHECK (queue_version >= 0),
    retry_state_version bigint NOT NULL DEFAULT 0 CHECK (retry_state_version >= 0),
    -- Names of the dynamic (client-executed) tools, a JSON array of strings.
    dynamic_tools jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(dynamic_tools) = 'array'),
    last_model_config_id uuid,
    -- Metadata (not execution state).
    title text NOT NULL DEFAULT '',
    labels jsonb NOT NULL DEFAULT '{}' CHECK (
        jsonb_typeof(labels) = 'object'
        AND NOT jsonb_path_exists(labels, '$.* ? (@.type() != "string")')
    ),
    metadata jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT chats_lease_both_or_neither CHECK ((worker_id IS NULL) = (runner_id IS NULL))
);

-- Worker acquisition scans runnable, unarchived chats oldest first.
CREATE INDEX chats_acquisition_candidates ON chats (status, updated_at, id) WHERE NOT archived;

CREATE TABLE chat_messages (
    id bigserial PRIMARY KEY,
    chat_id uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    role text NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content jsonb NOT NULL,
    visibility text NOT NULL DEFAULT 'both' CHECK (visibility IN ('user', 'model', 'both')),
    model_config_id uuid,
    created_by uuid,
    -- The queued row this message was promoted from (that row is gone, so
    -- no foreign key).
    queued_message_id bigint,
    deleted boolean NOT NULL DEFAULT false,
    -- Snapshot version of the Update that last wrote the row; always given
    -- explicitly by the store from the plan.
    revision bigint NOT NULL CHECK (revision >= 1),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- History in id order per chat (load, edit truncation, tool bookkeeping).
CREATE INDEX chat_messages_chat_id_id ON chat_messages (chat_id, id);
-- The last active assistant message, found by a backward scan.
CREATE INDEX chat_messages_active_assistant ON chat_messages (chat_id, id)
    WHERE role = 'assistant' AND NOT deleted;

-- One global sequence orders every queue; reorder-to-head takes the chat's
-- minimum minus one, so positions may go negative.
CREATE SEQUENCE chat_queued_message_position_seq AS bigint;

CREATE TABLE chat_queued_messages (
    id bigserial PRIMARY KEY,
    chat_id uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    content jsonb NOT NULL,
    model_config_id uuid,
    created_by uuid NOT NULL,
    position bigint NOT NULL DEFAULT nextval('chat_queued_message_position_seq'),
    created_at timestamptz NOT NULL DEFAULT now()
);

ALTER SEQUENCE chat_queued_message_position_seq OWNED BY chat_queued_messages.position;

-- Queue order is (position, id).
CREATE INDEX chat_queued_messages_order ON chat_queued_messages (chat_id, position, id);

-- Leases. UNLOGGED: after a crash the rows are gone, which reads as "stale",
-- which is safe (workers re-acquire).
CREATE UNLOGGED TABLE chat_heartbeats (
    chat_id uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    runner_id uuid NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    PRIMARY KEY (chat_id, runner_id)
);

CREATE INDEX chat_heartbeats_heartbeat_at ON chat_heartbeats (heartbeat_at);

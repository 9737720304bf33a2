-- What a transaction's snapshot needs of the history and the queue, kept on
-- the chat row, so that opening a transaction reads the chat row (and the
-- lease's heartbeat) and nothing else.
--
-- Append-only: never edit this file once released; add a new migration.
--
-- - `tool_state`: the model's `ToolState` of the active history (the tool
--   calls of the last active assistant message and the call ids answered
--   since), as JSON in the store's reversible escaped form, valid while
--   `tool_state_version` equals `history_version`;
-- - `queue_ids`: the ids of the queue in queue order (position, id), valid
--   while `queue_ids_version` equals `queue_version`.
--
-- The store writes them, with their versions, in the statement that writes
-- a plan changing the history or the queue (`Plan::tools`, computed by the
-- pure model, and the queue the plan leaves), and when it creates a chat.
-- Nothing else writes history or queue. Every change of the history or the
-- queue moves `history_version` or `queue_version` to the new snapshot
-- version, so a cached value whose version differs is known to be stale:
-- chats from before this migration (versions NULL), or a chat written by a
-- binary that predates it. The store then reads the tables instead, through
-- the two functions below (called only in that case), and the next plan
-- that changes the history or the queue writes the cache again.

ALTER TABLE chats
    ADD COLUMN tool_state jsonb,
    ADD COLUMN tool_state_version bigint,
    ADD COLUMN queue_ids bigint[],
    ADD COLUMN queue_ids_version bigint;

-- The input of the tool bookkeeping's fold: the last active assistant
-- message of a chat and every active tool message after it (without any
-- assistant message: every active tool message), only messages with an id
-- below `p_before` when it is not NULL, as a JSON array of `{role, parts}`
-- in id order. Parts are reduced to the fields the model's parser reads
-- for tool calls and results (type, tool_call_id, tool_name,
-- provider_executed), so arguments and outputs never leave the server;
-- the store folds the array with the model's own `ToolState::observe`.
--
-- The bounds are range conditions on `chat_messages (chat_id, id)` (the
-- lower one a row comparison, which the primary key on `id` alone cannot
-- serve), so every plan reads this chat's tail and nothing else.
--
-- PL/pgSQL caches its plans per session. STABLE: it reads with the
-- snapshot of the statement that calls it.
CREATE FUNCTION chatstate_tool_tail(p_chat uuid, p_before bigint) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    upper_bound bigint := coalesce(p_before, 9223372036854775807);
    last_assistant bigint;
BEGIN
    SELECT a.id INTO last_assistant
      FROM chat_messages a
     WHERE a.chat_id = p_chat AND a.id < upper_bound
       AND a.role = 'assistant' AND NOT a.deleted
     ORDER BY a.id DESC
     LIMIT 1;
    RETURN (
        SELECT coalesce(jsonb_agg(jsonb_build_object('role', t.role, 'parts', t.parts)
                                  ORDER BY t.id), '[]'::jsonb)::text
          FROM (SELECT m.id, m.role,
                       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                                   'type', p.e -> 'type',
                                   'tool_call_id', p.e -> 'tool_call_id',
                                   'tool_name', p.e -> 'tool_name',
                                   'provider_executed', p.e -> 'provider_executed')
                                 ORDER BY p.o), '[]'::jsonb)
                          FROM jsonb_array_elements(CASE WHEN jsonb_typeof(m.content) = 'array'
                                                         THEN m.content ELSE '[]'::jsonb END)
                               WITH ORDINALITY AS p(e, o)
                         WHERE p.e ->> 'type' IN ('tool-call', 'tool-result')) AS parts
                  FROM chat_messages m
                 WHERE m.chat_id = p_chat
                   AND (m.chat_id, m.id) >= (p_chat, coalesce(last_assistant, 0))
                   AND m.id < upper_bound
                   AND m.role IN ('assistant', 'tool') AND NOT m.deleted) AS t);
END;
$$;

-- The ids of a chat's queue in queue order.
CREATE FUNCTION chatstate_queue_ids(p_chat uuid) RETURNS bigint[]
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce((SELECT array_agg(q.id ORDER BY q.position, q.id)
                       FROM chat_queued_messages q
                      WHERE q.chat_id = p_chat), '{}');
END;
$$;

//! Reading rows back into the model's types.
//!
//! JSON columns arrive as text and are parsed here; JSON values pass
//! through [`JsonText`], whose canonical form makes a value read back from
//! `jsonb` (which reorders keys) equal to the value written.

use std::collections::{BTreeMap, BTreeSet};

use chatstate::{ChatMetadata, StoreError};
use chatstate_model::{
    ChatId, ChatRow, ChatStatus, JsonText, Message, MessageId, Owner, Part, QueuedMessage,
    QueuedMessageId, Role, RunnerId, Snapshot, Timestamp, ToolState, Versions, Visibility,
    WorkerId, content_from_value,
};
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::error::{malformed, store_error};
use crate::jsonb;

/// Reads a column, mapping a decode failure to a store error.
pub(crate) fn get<'r, T>(row: &'r PgRow, context: &'static str, col: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(col).map_err(|e| store_error(context, e))
}

fn json_text(
    context: &'static str,
    column: &'static str,
    text: Option<String>,
) -> Result<Option<JsonText>, StoreError> {
    text.map(|t| {
        let value = json_value(context, column, &t)?;
        JsonText::from_value(&value).map_err(|e| malformed(context, column, e))
    })
    .transpose()
}

/// Parses stored JSON text and undoes the store's escaping (see
/// [`crate::jsonb`]).
fn json_value(
    context: &'static str,
    column: &'static str,
    text: &str,
) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text)
        .map(jsonb::decode)
        .map_err(|e| malformed(context, column, e))
}

/// The chat row from the columns of `row_columns!`.
pub(crate) fn chat_row(row: &PgRow, context: &'static str) -> Result<ChatRow, StoreError> {
    let worker: Option<Uuid> = get(row, context, "worker_id")?;
    let runner: Option<Uuid> = get(row, context, "runner_id")?;
    let owner = match (worker, runner) {
        (Some(w), Some(r)) => Some(Owner {
            worker_id: WorkerId(w),
            runner_id: RunnerId(r),
        }),
        (None, None) => None,
        // The schema forbids this (chats_lease_both_or_neither).
        _ => return Err(malformed(context, "worker_id", "lease with only one id")),
    };
    let tools_text: String = get(row, context, "dynamic_tools")?;
    let dynamic_tools: BTreeSet<String> =
        serde_json::from_value(json_value(context, "dynamic_tools", &tools_text)?)
            .map_err(|e| malformed(context, "dynamic_tools", e))?;
    let status: String = get(row, context, "status")?;
    Ok(ChatRow {
        id: ChatId(get(row, context, "id")?),
        owner_id: get(row, context, "owner_id")?,
        status: ChatStatus::parse(&status),
        archived: get(row, context, "archived")?,
        owner,
        last_error: json_text(context, "last_error", get(row, context, "last_error")?)?,
        retry_state: json_text(context, "retry_state", get(row, context, "retry_state")?)?,
        generation_attempt: get(row, context, "generation_attempt")?,
        requires_action_deadline_at: get::<Option<i64>>(
            row,
            context,
            "requires_action_deadline_us",
        )?
        .map(Timestamp),
        compaction_requested_at: get::<Option<i64>>(row, context, "compaction_requested_us")?
            .map(Timestamp),
        versions: Versions {
            snapshot: get(row, context, "snapshot_version")?,
            history: get(row, context, "history_version")?,
            queue: get(row, context, "queue_version")?,
            retry_state: get(row, context, "retry_state_version")?,
        },
        dynamic_tools,
        last_model_config_id: get(row, context, "last_model_config_id")?,
    })
}

/// Folds the `chatstate_tool_tail` JSON (`[{role, parts}]`) into the model's tool
/// bookkeeping, parsing each part with the model's own parser.
pub(crate) fn tool_state(text: &str, context: &'static str) -> Result<ToolState, StoreError> {
    let value = json_value(context, "tools", text)?;
    let items = value
        .as_array()
        .ok_or_else(|| malformed(context, "tools", "not an array"))?;
    let mut state = ToolState::default();
    for item in items {
        let role = item
            .get("role")
            .and_then(|r| r.as_str())
            .and_then(Role::parse)
            .ok_or_else(|| malformed(context, "tools", "message without a known role"))?;
        let parts: Vec<Part> = item
            .get("parts")
            .map(content_from_value)
            .transpose()
            .map_err(|e| malformed(context, "tools", e))?
            .unwrap_or_default();
        state.observe(role, &parts);
    }
    Ok(state)
}

/// The tool bookkeeping stored on the chat row (`tool_state`).
pub(crate) fn stored_tool_state(
    text: &str,
    context: &'static str,
) -> Result<ToolState, StoreError> {
    serde_json::from_value(json_value(context, "tool_state", text)?)
        .map_err(|e| malformed(context, "tool_state", e))
}

/// The snapshot from the opening select.
pub(crate) fn snapshot(row: &PgRow, context: &'static str) -> Result<Snapshot, StoreError> {
    let queue: Vec<i64> = get(row, context, "queue")?;
    // The row's bookkeeping; only a chat from before migration 0002 has
    // none, and then the select folded the history tail instead.
    let tools = match get::<Option<String>>(row, context, "tool_state")? {
        Some(stored) => stored_tool_state(&stored, context)?,
        None => tool_state(&get::<String>(row, context, "tools")?, context)?,
    };
    Ok(Snapshot {
        row: chat_row(row, context)?,
        queue: queue.into_iter().map(QueuedMessageId).collect(),
        tools,
        lease_fresh: get(row, context, "lease_fresh")?,
        now: Timestamp(get(row, context, "now_us")?),
    })
}

/// Metadata from the load select.
pub(crate) fn metadata(row: &PgRow, context: &'static str) -> Result<ChatMetadata, StoreError> {
    let labels: String = get(row, context, "labels")?;
    let labels: BTreeMap<String, String> =
        serde_json::from_value(json_value(context, "labels", &labels)?)
            .map_err(|e| malformed(context, "labels", e))?;
    let title: String = get(row, context, "title")?;
    Ok(ChatMetadata {
        title: jsonb::decode_str(&title).into_owned(),
        labels,
        metadata: json_text(context, "metadata", get(row, context, "metadata")?)?,
    })
}

fn content(row: &PgRow, context: &'static str) -> Result<Vec<Part>, StoreError> {
    let text: String = get(row, context, "content")?;
    content_from_value(&json_value(context, "content", &text)?)
        .map_err(|e| malformed(context, "content", e))
}

/// A queued message from the load select.
pub(crate) fn queued(row: &PgRow, context: &'static str) -> Result<QueuedMessage, StoreError> {
    Ok(QueuedMessage {
        id: QueuedMessageId(get(row, context, "id")?),
        content: content(row, context)?,
        model_config_id: get(row, context, "model_config_id")?,
        created_by: get(row, context, "created_by")?,
    })
}

/// Parses a stored role.
pub(crate) fn role(text: &str, context: &'static str) -> Result<Role, StoreError> {
    Role::parse(text).ok_or_else(|| malformed(context, "role", format!("unknown role {text:?}")))
}

/// Parses a stored visibility.
pub(crate) fn visibility(text: &str, context: &'static str) -> Result<Visibility, StoreError> {
    Visibility::parse(text).ok_or_else(|| {
        malformed(
            context,
            "visibility",
            format!("unknown visibility {text:?}"),
        )
    })
}

/// A history message from the load select.
pub(crate) fn message(row: &PgRow, context: &'static str) -> Result<Message, StoreError> {
    let role_text: String = get(row, context, "role")?;
    let visibility_text: String = get(row, context, "visibility")?;
    Ok(Message {
        id: MessageId(get(row, context, "id")?),
        role: role(&role_text, context)?,
        content: content(row, context)?,
        visibility: visibility(&visibility_text, context)?,
        model_config_id: get(row, context, "model_config_id")?,
        created_by: get(row, context, "created_by")?,
        queued_message_id: get::<Option<i64>>(row, context, "queued_message_id")?
            .map(QueuedMessageId),
        deleted: get(row, context, "deleted")?,
        revision: get(row, context, "revision")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_state_folds_reduced_parts_like_the_model() {
        // What chatstate_tool_tail returns for: assistant [call c1 (dyn), call c2
        // (provider-executed), result c0], then a tool message answering c1.
        let text = r#"[
            {"role": "assistant", "parts": [
                {"type": "tool-call", "tool_call_id": "c1", "tool_name": "dyn", "provider_executed": null},
                {"type": "tool-call", "tool_call_id": "c2", "tool_name": "srv", "provider_executed": true},
                {"type": "tool-result", "tool_call_id": "c0", "tool_name": "x", "provider_executed": null}
            ]},
            {"role": "tool", "parts": [
                {"type": "tool-result", "tool_call_id": "c1", "tool_name": "dyn", "provider_executed": null}
            ]}
        ]"#;
        let st = tool_state(text, "test").unwrap();
        assert_eq!(st.calls.len(), 2);
        assert!(st.calls[1].provider_executed);
        assert_eq!(
            st.handled,
            ["c0".to_string(), "c1".to_string()].into_iter().collect()
        );
        assert!(st.outstanding(None).is_empty());
        // A call without a name is not a call (Part::Other), as in the model.
        let odd = r#"[{"role": "assistant", "parts": [
            {"type": "tool-call", "tool_call_id": "c9", "tool_name": null, "provider_executed": null}
        ]}]"#;
        assert!(tool_state(odd, "test").unwrap().calls.is_empty());
    }
}

//! The data a chat is made of: identifiers, JSON payloads, message parts,
//! messages, queued messages, the chat row and its version counters.
//!
//! These types are shared by the model, the machine and both stores, so the
//! shape written to a store is the shape the model reasons about.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::state::{ChatStatus, ExecutionState};

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh random identifier.
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

macro_rules! row_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(
    /// Identifies a chat.
    ChatId
);
uuid_id!(
    /// Identifies a worker process (one per server replica and start).
    WorkerId
);
uuid_id!(
    /// Identifies one acquisition of a chat by a worker; heartbeats are kept
    /// per (chat, runner).
    RunnerId
);
row_id!(
    /// Identifies a history message; ids grow in insertion order.
    MessageId
);
row_id!(
    /// Identifies a queued message.
    QueuedMessageId
);

/// Store time, in microseconds since the Unix epoch (Postgres resolution).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// This instant plus a duration (saturating).
    pub fn plus(self, d: std::time::Duration) -> Self {
        let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Timestamp(self.0.saturating_add(micros))
    }

    /// This instant minus a duration (saturating).
    pub fn minus(self, d: std::time::Duration) -> Self {
        let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Timestamp(self.0.saturating_sub(micros))
    }
}

/// The deepest nesting of arrays and objects a JSON value may have.
///
/// A scalar has depth 0, `[]` and `{}` depth 1, `[[1]]` depth 2. Every JSON
/// value enters the model as a [`JsonText`] (message parts, tool arguments
/// and results, `last_error`, `retry_state`, metadata), so this one limit
/// bounds everything a store is given. It is chosen so the stored forms
/// read back everywhere: serde_json refuses documents nested 128 deep, and
/// the widest wrapping a store adds is three levels (Postgres keeps a part
/// inside the content array, and its tool-call tail wraps a part's fields
/// in `[{"parts": [{...}]}]`), which leaves room for a trace file or a
/// report that embeds a chat.
pub const MAX_JSON_DEPTH: usize = 100;

/// Why a JSON value was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// The text is not valid JSON.
    #[error("invalid JSON")]
    Invalid(#[source] serde_json::Error),
    /// The value is nested deeper than [`MAX_JSON_DEPTH`].
    #[error("JSON nested {depth} deep, past the limit of {max}")]
    TooDeep {
        /// The value's depth.
        depth: usize,
        /// The limit ([`MAX_JSON_DEPTH`]).
        max: usize,
    },
}

/// The nesting depth of a value (a scalar is 0), computed without
/// recursion so a value built in code at any depth cannot exhaust the stack.
pub fn json_depth(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    let mut max = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        let depth = depth + 1;
        max = max.max(depth);
        stack.extend(children.map(|c| (c, depth)));
    }
    max
}

/// The nesting depth of JSON text, by a scan that only tracks strings and
/// brackets: exact for valid JSON, and cheap to run before a parser that
/// would refuse deep text with an error that does not say why.
fn text_depth(text: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

fn check_depth(depth: usize) -> Result<(), JsonError> {
    if depth > MAX_JSON_DEPTH {
        return Err(JsonError::TooDeep {
            depth,
            max: MAX_JSON_DEPTH,
        });
    }
    Ok(())
}

/// A JSON value kept as canonical text: compact, object keys sorted, and
/// nested at most [`MAX_JSON_DEPTH`] deep.
///
/// Canonical text makes JSON payloads comparable and hashable, so the model
/// can decide "did the retry state change" by equality, and values read back
/// from Postgres `jsonb` compare equal to what was written. The depth bound
/// holds by construction, so every `JsonText` can be stored, parsed back
/// and serialised.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JsonText(String);

impl JsonText {
    /// Canonicalises a parsed value; refuses one nested too deep.
    pub fn from_value(value: &serde_json::Value) -> Result<Self, JsonError> {
        check_depth(json_depth(value))?;
        let mut out = String::new();
        write_canonical(value, &mut out);
        Ok(JsonText(out))
    }

    /// Parses and canonicalises JSON text; refuses invalid text and text
    /// nested too deep (the depth is checked first, so deep text is
    /// reported as such).
    pub fn parse(text: &str) -> Result<Self, JsonError> {
        check_depth(text_depth(text))?;
        let value: serde_json::Value = serde_json::from_str(text).map_err(JsonError::Invalid)?;
        Self::from_value(&value)
    }

    /// A JSON string holding `s`.
    pub fn string(s: &str) -> Self {
        JsonText(serde_json::Value::String(s.to_owned()).to_string())
    }

    /// The JSON `null` literal.
    pub fn null() -> Self {
        JsonText("null".to_owned())
    }

    /// True for the JSON `null` literal.
    pub fn is_null(&self) -> bool {
        self.0 == "null"
    }

    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value, parsed.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(&self.0)
            .expect("JsonText holds valid JSON within the parser's depth limit")
    }
}

impl fmt::Display for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for JsonText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        JsonText::from_value(&v).map_err(serde::de::Error::custom)
    }
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The author role of a history message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// System prompt material.
    System,
    /// A person.
    User,
    /// The model.
    Assistant,
    /// Tool results.
    Tool,
}

impl Role {
    /// The stored text of the role.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    /// Parses stored text.
    pub fn parse(s: &str) -> Option<Self> {
        [Role::System, Role::User, Role::Assistant, Role::Tool]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// Who sees a history message.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Shown to the user only.
    User,
    /// Sent to the model only.
    Model,
    /// Both.
    #[default]
    Both,
}

impl Visibility {
    /// The stored text of the visibility.
    pub const fn as_str(self) -> &'static str {
        match self {
            Visibility::User => "user",
            Visibility::Model => "model",
            Visibility::Both => "both",
        }
    }

    /// Parses stored text.
    pub fn parse(s: &str) -> Option<Self> {
        [Visibility::User, Visibility::Model, Visibility::Both]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// One typed part of a message's content.
///
/// The model reads tool calls and tool results; every other part is carried
/// through untouched as [`Part::Other`]. The JSON form is an object with a
/// `type` field (`text`, `tool-call`, `tool-result`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// Plain text.
    Text {
        /// The text.
        text: String,
    },
    /// A tool invocation by the model.
    ToolCall {
        /// Correlates the call with its result.
        tool_call_id: String,
        /// The tool's name; dynamic tools are listed on the chat.
        tool_name: String,
        /// The arguments.
        args: JsonText,
        /// True when the provider ran the tool itself: never outstanding.
        provider_executed: bool,
    },
    /// The result of a tool invocation.
    ToolResult {
        /// The call this answers.
        tool_call_id: String,
        /// The tool's name.
        tool_name: String,
        /// The output.
        result: JsonText,
        /// True when the tool failed (synthetic cancellations are errors).
        is_error: bool,
    },
    /// Any other part, kept verbatim.
    Other(JsonText),
}

impl Part {
    /// A text part.
    pub fn text(text: impl Into<String>) -> Self {
        Part::Text { text: text.into() }
    }

    /// A client-side tool call (not provider-executed) with empty arguments.
    pub fn tool_call(id: impl Into<String>, name: impl Into<String>) -> Self {
        Part::ToolCall {
            tool_call_id: id.into(),
            tool_name: name.into(),
            args: JsonText(String::from("{}")),
            provider_executed: false,
        }
    }

    /// A successful tool result.
    pub fn tool_result(id: impl Into<String>, name: impl Into<String>, result: JsonText) -> Self {
        Part::ToolResult {
            tool_call_id: id.into(),
            tool_name: name.into(),
            result,
            is_error: false,
        }
    }

    /// The part as a JSON value.
    pub fn to_value(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Part::Text { text } => json!({"type": "text", "text": text}),
            Part::ToolCall {
                tool_call_id,
                tool_name,
                args,
                provider_executed,
            } => json!({
                "type": "tool-call",
                "tool_call_id": tool_call_id,
                "tool_name": tool_name,
                "args": args.to_value(),
                "provider_executed": provider_executed,
            }),
            Part::ToolResult {
                tool_call_id,
                tool_name,
                result,
                is_error,
            } => json!({
                "type": "tool-result",
                "tool_call_id": tool_call_id,
                "tool_name": tool_name,
                "result": result.to_value(),
                "is_error": is_error,
            }),
            Part::Other(v) => v.to_value(),
        }
    }

    /// Reads a part from a JSON value; unknown shapes become [`Part::Other`].
    /// Refuses a value whose JSON payload (the part itself for an unknown
    /// shape, else its arguments or result) is nested too deep.
    pub fn from_value(v: &serde_json::Value) -> Result<Self, JsonError> {
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let j = |k: &str| {
            v.get(k)
                .map_or_else(|| Ok(JsonText::null()), JsonText::from_value)
        };
        let b = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
        let other = || JsonText::from_value(v).map(Part::Other);
        Ok(match v.get("type").and_then(|t| t.as_str()) {
            Some("text") => match s("text") {
                Some(text) => Part::Text { text },
                None => other()?,
            },
            Some("tool-call") => match (s("tool_call_id"), s("tool_name")) {
                (Some(tool_call_id), Some(tool_name)) => Part::ToolCall {
                    tool_call_id,
                    tool_name,
                    args: j("args")?,
                    provider_executed: b("provider_executed"),
                },
                _ => other()?,
            },
            Some("tool-result") => match (s("tool_call_id"), s("tool_name")) {
                (Some(tool_call_id), Some(tool_name)) => Part::ToolResult {
                    tool_call_id,
                    tool_name,
                    result: j("result")?,
                    is_error: b("is_error"),
                },
                _ => other()?,
            },
            _ => other()?,
        })
    }
}

impl Serialize for Part {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Part {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Part::from_value(&v).map_err(serde::de::Error::custom)
    }
}

/// Content as JSON: an array of parts.
pub fn content_to_value(parts: &[Part]) -> serde_json::Value {
    serde_json::Value::Array(parts.iter().map(Part::to_value).collect())
}

/// Content from JSON; anything but an array is one [`Part::Other`].
/// Refuses content holding a part nested too deep.
pub fn content_from_value(v: &serde_json::Value) -> Result<Vec<Part>, JsonError> {
    match v {
        serde_json::Value::Array(items) => items.iter().map(Part::from_value).collect(),
        serde_json::Value::Null => Ok(Vec::new()),
        other => Ok(vec![Part::Other(JsonText::from_value(other)?)]),
    }
}

/// A message to insert into history (as given by a caller or built by a
/// transition).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NewMessage {
    /// Author role.
    pub role: Role,
    /// Content parts.
    pub content: Vec<Part>,
    /// Who sees it.
    #[serde(default)]
    pub visibility: Visibility,
    /// The model configuration that produced or will consume it.
    #[serde(default)]
    pub model_config_id: Option<Uuid>,
    /// The user who wrote it, if any.
    #[serde(default)]
    pub created_by: Option<Uuid>,
}

impl NewMessage {
    /// A message of one role with the given parts, visible to both.
    pub fn new(role: Role, content: Vec<Part>) -> Self {
        NewMessage {
            role,
            content,
            visibility: Visibility::Both,
            model_config_id: None,
            created_by: None,
        }
    }

    /// A user message with one text part.
    pub fn user(text: impl Into<String>) -> Self {
        Self::new(Role::User, vec![Part::text(text)])
    }

    /// An assistant message with one text part.
    pub fn assistant(text: impl Into<String>) -> Self {
        Self::new(Role::Assistant, vec![Part::text(text)])
    }

    /// The stored row this message becomes: active, with the id a store
    /// gave it, the queued row it was promoted from, and the revision of
    /// the Update that wrote it.
    pub fn stored(
        self,
        id: MessageId,
        queued_message_id: Option<QueuedMessageId>,
        revision: i64,
    ) -> Message {
        Message {
            id,
            role: self.role,
            content: self.content,
            visibility: self.visibility,
            model_config_id: self.model_config_id,
            created_by: self.created_by,
            queued_message_id,
            deleted: false,
            revision,
        }
    }
}

/// A stored history message.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// Row id (history order).
    pub id: MessageId,
    /// Author role.
    pub role: Role,
    /// Content parts.
    pub content: Vec<Part>,
    /// Who sees it.
    pub visibility: Visibility,
    /// Model configuration.
    pub model_config_id: Option<Uuid>,
    /// Author user.
    pub created_by: Option<Uuid>,
    /// The queued message this was promoted from, if any.
    pub queued_message_id: Option<QueuedMessageId>,
    /// Soft-deleted (no longer part of the active history).
    pub deleted: bool,
    /// Snapshot version of the Update that last wrote this row.
    pub revision: i64,
}

/// A message waiting in a chat's queue.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QueuedMessage {
    /// Row id.
    pub id: QueuedMessageId,
    /// Content parts.
    pub content: Vec<Part>,
    /// Model configuration requested for the turn.
    pub model_config_id: Option<Uuid>,
    /// The user who queued it (falls back to the chat's owner).
    pub created_by: Uuid,
}

impl QueuedMessage {
    /// The history message a promotion inserts for this queued row: a user
    /// message visible to both, with the row's content and creator, and the
    /// row's model configuration or else the chat's last one.
    pub fn promoted(&self, fallback_model_config: Option<Uuid>) -> NewMessage {
        NewMessage {
            role: Role::User,
            content: self.content.clone(),
            visibility: Visibility::Both,
            model_config_id: self.model_config_id.or(fallback_model_config),
            created_by: Some(self.created_by),
        }
    }
}

/// A message to append to the queue.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NewQueued {
    /// Content parts.
    pub content: Vec<Part>,
    /// Model configuration.
    pub model_config_id: Option<Uuid>,
    /// The creator (the message's, else the chat owner).
    pub created_by: Uuid,
}

/// Ownership of a chat: the worker and the runner (acquisition) holding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Owner {
    /// The worker process.
    pub worker_id: WorkerId,
    /// The acquisition; its heartbeat row keeps the lease alive.
    pub runner_id: RunnerId,
}

/// The four version counters of a chat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Versions {
    /// +1 per committed Update; 1 after creation.
    pub snapshot: i64,
    /// Snapshot of the last Update that inserted or soft-deleted a message.
    pub history: i64,
    /// Snapshot of the last Update that inserted, deleted or moved a queued row.
    pub queue: i64,
    /// Snapshot of the last Update that changed `retry_state`.
    pub retry_state: i64,
}

/// The execution-state columns of a chat row, plus the few row fields the
/// transitions read (owner, dynamic tools, last model configuration).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChatRow {
    /// The chat.
    pub id: ChatId,
    /// The user owning the chat; the creator of queued messages by default.
    pub owner_id: Uuid,
    /// Stored status.
    pub status: ChatStatus,
    /// Archived flag.
    pub archived: bool,
    /// Worker and runner, if owned.
    pub owner: Option<Owner>,
    /// Last error payload.
    pub last_error: Option<JsonText>,
    /// Client-visible retry payload.
    pub retry_state: Option<JsonText>,
    /// Attempts under the current history version.
    pub generation_attempt: i64,
    /// Deadline for client tool results (requires-action states).
    pub requires_action_deadline_at: Option<Timestamp>,
    /// One-shot manual compaction marker.
    pub compaction_requested_at: Option<Timestamp>,
    /// Version counters.
    pub versions: Versions,
    /// Names of the dynamic (client-executed) tools.
    pub dynamic_tools: BTreeSet<String>,
    /// Model configuration stamped on synthetic messages and used for
    /// promoted queue rows that carry none.
    pub last_model_config_id: Option<Uuid>,
}

impl ChatRow {
    /// The state of this row given whether its queue is non-empty.
    pub fn classify(&self, queue_non_empty: bool) -> ExecutionState {
        ExecutionState::classify(&self.status, self.archived, queue_non_empty)
    }
}

// Serde support for ChatStatus as its stored text.
impl Serialize for ChatStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ChatStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(ChatStatus::parse(&s))
    }
}

/// The tool-call bookkeeping of the active history: the tool calls of the
/// last active assistant message and the ids already answered.
///
/// It is a fold over the active history in id order ([`ToolState::observe`]),
/// so a store can compute it from the tail of the history alone, and a
/// transition can update it with the messages it inserts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ToolState {
    /// Tool calls of the last active assistant message, in content order.
    pub calls: Vec<ToolCallRef>,
    /// Ids answered by results in that message or in later tool messages.
    pub handled: BTreeSet<String>,
}

/// A tool call as the bookkeeping sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ToolCallRef {
    /// Call id.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Run by the provider (never outstanding).
    pub provider_executed: bool,
}

impl ToolState {
    /// Folds the tool state over an active history, in id order.
    pub fn from_history<'a>(messages: impl IntoIterator<Item = (Role, &'a [Part])>) -> Self {
        let mut st = ToolState::default();
        for (role, content) in messages {
            st.observe(role, content);
        }
        st
    }

    /// Accounts for one more active message appended to the history.
    ///
    /// An assistant message starts over (it becomes the last assistant
    /// message); a tool message answers calls; other roles change nothing.
    pub fn observe(&mut self, role: Role, content: &[Part]) {
        match role {
            Role::Assistant => {
                self.calls.clear();
                self.handled.clear();
                for part in content {
                    match part {
                        Part::ToolCall {
                            tool_call_id,
                            tool_name,
                            provider_executed,
                            ..
                        } => self.calls.push(ToolCallRef {
                            id: tool_call_id.clone(),
                            name: tool_name.clone(),
                            provider_executed: *provider_executed,
                        }),
                        Part::ToolResult { tool_call_id, .. } => {
                            self.handled.insert(tool_call_id.clone());
                        }
                        _ => {}
                    }
                }
            }
            Role::Tool => {
                for part in content {
                    if let Part::ToolResult { tool_call_id, .. } = part {
                        self.handled.insert(tool_call_id.clone());
                    }
                }
            }
            Role::User | Role::System => {}
        }
    }

    /// The outstanding calls, `(id, name)` in content order: not
    /// provider-executed and not answered. With `dynamic` set, only calls of
    /// tools in `dynamic_tools`. Duplicate ids count once.
    pub fn outstanding(&self, dynamic: Option<&BTreeSet<String>>) -> Vec<(String, String)> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for call in &self.calls {
            if call.provider_executed || self.handled.contains(&call.id) {
                continue;
            }
            if let Some(dynamic) = dynamic
                && !dynamic.contains(&call.name)
            {
                continue;
            }
            if seen.insert(call.id.clone()) {
                out.push((call.id.clone(), call.name.clone()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_text_is_canonical() {
        let a = JsonText::parse(r#"{ "b": 1, "a": [1, {"z": null, "y": "x"}] }"#).unwrap();
        assert_eq!(a.as_str(), r#"{"a":[1,{"y":"x","z":null}],"b":1}"#);
        assert_eq!(JsonText::string("it's").as_str(), r#""it's""#);
        assert!(JsonText::parse("{").is_err());
    }

    fn nested(depth: usize) -> serde_json::Value {
        let mut v = serde_json::Value::Null;
        for _ in 0..depth {
            v = serde_json::Value::Array(vec![v]);
        }
        v
    }

    #[test]
    fn json_depth_counts_containers() {
        for (text, depth) in [
            ("1", 0),
            ("\"[{\"", 0),
            ("[]", 1),
            ("{}", 1),
            (r#"{"a":[1,{"b":"]]"}],"c":{}}"#, 3),
            (r#"["\\\"[", [[]]]"#, 3),
        ] {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(json_depth(&v), depth, "{text}");
            assert_eq!(text_depth(text), depth, "{text}");
        }
    }

    #[test]
    fn json_text_is_bounded_by_the_depth_limit() {
        let at = nested(MAX_JSON_DEPTH);
        let text = JsonText::from_value(&at).expect("at the limit");
        assert_eq!(text.to_value(), at);
        assert_eq!(JsonText::parse(text.as_str()).unwrap(), text);
        // Serialising and reading back the widest stored form works too.
        let wrapped = format!(r#"[{{"role":"tool","parts":[{{"x":{text}}}]}}]"#);
        assert!(serde_json::from_str::<serde_json::Value>(&wrapped).is_ok());
        for over in [MAX_JSON_DEPTH + 1, 127, 128, 200, 100_000] {
            let v = nested(over);
            assert!(
                matches!(JsonText::from_value(&v), Err(JsonError::TooDeep { depth, max })
                    if depth == over && max == MAX_JSON_DEPTH),
                "{over}"
            );
            let text = format!("{}{}", "[".repeat(over), "]".repeat(over));
            assert!(matches!(
                JsonText::parse(&text),
                Err(JsonError::TooDeep { depth, .. }) if depth == over
            ));
            // A value nested this deep, built in code, drops without recursion
            // trouble only if the caller unwinds it; leak the deepest one.
            if over > 1_000 {
                std::mem::forget(v);
            }
        }
        assert!(matches!(JsonText::parse("[1,"), Err(JsonError::Invalid(_))));
        let deep_part = serde_json::json!({"type": "tool-call", "tool_call_id": "c",
            "tool_name": "t", "args": nested(MAX_JSON_DEPTH + 1)});
        assert!(Part::from_value(&deep_part).is_err());
        assert!(serde_json::from_value::<Part>(deep_part).is_err());
        let ok_part = serde_json::json!({"type": "tool-call", "tool_call_id": "c",
            "tool_name": "t", "args": nested(MAX_JSON_DEPTH)});
        assert!(Part::from_value(&ok_part).is_ok());
    }

    #[test]
    fn parts_round_trip() {
        let parts = vec![
            Part::text("hi"),
            Part::tool_call("c1", "ask_user"),
            Part::tool_result("c1", "ask_user", JsonText::string("ok")),
            Part::Other(JsonText::parse(r#"{"type":"reasoning","text":"..."}"#).unwrap()),
        ];
        let v = content_to_value(&parts);
        assert_eq!(content_from_value(&v).unwrap(), parts);
    }

    #[test]
    fn tool_state_tracks_last_assistant_message() {
        let a1 = vec![Part::tool_call("c1", "dyn"), Part::tool_call("c2", "srv")];
        let t1 = vec![Part::tool_result("c1", "dyn", JsonText::null())];
        let a2 = vec![Part::tool_call("c3", "srv")];
        let dynamic: BTreeSet<String> = ["dyn".to_string()].into();
        let mut st = ToolState::default();
        st.observe(Role::Assistant, &a1);
        assert_eq!(st.outstanding(None).len(), 2);
        assert_eq!(st.outstanding(Some(&dynamic)).len(), 1);
        st.observe(Role::Tool, &t1);
        st.observe(Role::User, &[Part::text("x")]);
        assert_eq!(
            st.outstanding(None),
            vec![("c2".to_string(), "srv".to_string())]
        );
        st.observe(Role::Assistant, &a2);
        assert_eq!(
            st.outstanding(None),
            vec![("c3".to_string(), "srv".to_string())]
        );
        assert!(st.outstanding(Some(&dynamic)).is_empty());
    }
}

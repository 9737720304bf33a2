//! The JSON format of a trace (documented in `docs/traces.md`): options,
//! steps, transitions, messages, and the `generate` object.

use std::time::Duration;

use anyhow::Context as _;
use chatstate_model::{BusyBehavior, Options, Part, Role, Visibility};
use serde::{Deserialize, Serialize};

/// A trace: tunables, explicit steps, and optionally generated ones.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Trace {
    /// Tunables of the state machine.
    #[serde(default)]
    pub(crate) options: TraceOptions,
    /// The steps, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) steps: Vec<Step>,
    /// Steps to generate deterministically and append after `steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) generate: Option<GenerateSpec>,
}

/// The `options` object of a trace.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TraceOptions {
    /// Queue cap.
    pub(crate) max_queue_size: u32,
    /// Heartbeat staleness, seconds.
    pub(crate) heartbeat_stale_secs: u64,
    /// Requires-action timeout, seconds.
    pub(crate) requires_action_timeout_secs: u64,
}

impl Default for TraceOptions {
    fn default() -> Self {
        let o = Options::default();
        TraceOptions {
            max_queue_size: o.max_queue_size,
            heartbeat_stale_secs: o.heartbeat_stale.as_secs(),
            requires_action_timeout_secs: o.requires_action_timeout.as_secs(),
        }
    }
}

impl TraceOptions {
    /// The options, validated: a trace with options out of bounds is
    /// refused before anything runs.
    pub(crate) fn options(&self) -> anyhow::Result<Options> {
        let options = Options {
            max_queue_size: self.max_queue_size,
            heartbeat_stale: Duration::from_secs(self.heartbeat_stale_secs),
            requires_action_timeout: Duration::from_secs(self.requires_action_timeout_secs),
        };
        options.validate().context("trace options")?;
        Ok(options)
    }
}

/// One step of a trace.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Step {
    /// CreateChat (N -> R0).
    CreateChat(CreateStep),
    /// One Update: zero or more transitions in one transaction.
    Update(UpdateStep),
    /// A heartbeat of a runner on a chat.
    Heartbeat(HeartbeatStep),
    /// Moves store time forward (all chats).
    AdvanceClock(AdvanceClockStep),
    /// Writes a status (and archived flag) directly, bypassing the matrix.
    SetRawStatus(RawStatusStep),
    /// Takes and releases the exclusive row lock (no bump, no publish).
    Lock(ChatStep),
    /// Takes and releases the shared row lock (no bump, no publish).
    ReadLock(ChatStep),
}

impl Step {
    /// The chat a step is about (`None`: all chats).
    pub(crate) fn chat(&self) -> Option<&str> {
        match self {
            Step::CreateChat(s) => Some(&s.chat),
            Step::Update(s) => Some(&s.chat),
            Step::Heartbeat(s) => Some(&s.chat),
            Step::SetRawStatus(s) => Some(&s.chat),
            Step::Lock(s) | Step::ReadLock(s) => Some(&s.chat),
            Step::AdvanceClock(_) => None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateStep {
    pub(crate) chat: String,
    /// The user owning the chat (default "owner").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) owner: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) dynamic_tools: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) last_model_config: Option<String>,
    #[serde(default)]
    pub(crate) messages: Vec<TraceMessage>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateStep {
    pub(crate) chat: String,
    #[serde(default)]
    pub(crate) transitions: Vec<TraceTransition>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeartbeatStep {
    pub(crate) chat: String,
    pub(crate) runner: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdvanceClockStep {
    pub(crate) seconds: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStatusStep {
    pub(crate) chat: String,
    pub(crate) status: String,
    /// The archived flag to write; unchanged when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) archived: Option<bool>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChatStep {
    pub(crate) chat: String,
}

/// A message as a trace writes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TraceMessage {
    pub(crate) role: Role,
    pub(crate) content: Content,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) visibility: Option<Visibility>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) model_config: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) created_by: Option<String>,
}

impl TraceMessage {
    pub(crate) fn new(role: Role, parts: Vec<Part>) -> Self {
        TraceMessage {
            role,
            content: Content::Parts(parts),
            visibility: None,
            model_config: None,
            created_by: None,
        }
    }

    pub(crate) fn text(role: Role, text: &str) -> Self {
        TraceMessage {
            content: Content::Text(text.to_owned()),
            ..TraceMessage::new(role, Vec::new())
        }
    }
}

/// Message content: a list of parts, or a string as one text part.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

impl<'de> Deserialize<'de> for Content {
    /// By hand rather than untagged, so a part the model refuses (nested
    /// too deep) says why instead of "did not match any variant".
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(text) => Ok(Content::Text(text)),
            serde_json::Value::Array(items) => items
                .iter()
                .map(Part::from_value)
                .collect::<Result<_, _>>()
                .map(Content::Parts)
                .map_err(D::Error::custom),
            other => Err(D::Error::custom(format!(
                "content must be a string or an array of parts, not {other}"
            ))),
        }
    }
}

impl Content {
    pub(crate) fn parts(&self) -> Vec<Part> {
        match self {
            Content::Text(t) => vec![Part::text(t.clone())],
            Content::Parts(p) => p.clone(),
        }
    }
}

/// One client-supplied tool result.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TraceToolResult {
    pub(crate) tool_call_id: String,
    /// The output, any JSON value (default `null`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) output: Option<serde_json::Value>,
    /// The output as raw text, taken verbatim (to submit invalid JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) output_text: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) is_error: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn queue() -> BusyBehavior {
    BusyBehavior::Queue
}

fn is_queue(b: &BusyBehavior) -> bool {
    *b == BusyBehavior::Queue
}

/// One transition of an Update. Names are the matrix's; a transition
/// without input is written `{}`. Worker transitions take an optional
/// `fence`: the runner the caller holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(clippy::enum_variant_names)]
pub(crate) enum TraceTransition {
    SetArchived {
        archived: bool,
    },
    SendMessage {
        message: TraceMessage,
        #[serde(default = "queue", skip_serializing_if = "is_queue")]
        busy_behavior: BusyBehavior,
    },
    EditMessage {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        history_index: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<i64>,
        content: Content,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        created_by: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model_config: Option<String>,
    },
    RequestCompaction {},
    DeleteQueuedMessage {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        queue_index: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<i64>,
    },
    PromoteQueuedMessage {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        queue_index: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<i64>,
    },
    Interrupt {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    CompleteRequiresAction {
        results: Vec<TraceToolResult>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        created_by: Option<String>,
    },
    Acquire {
        worker: String,
        runner: String,
    },
    Abandon {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fence: Option<String>,
    },
    RecordGenerationAttempt {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fence: Option<String>,
    },
    RecordRetryState {
        /// The payload, any JSON value.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_state: Option<serde_json::Value>,
        /// The payload as raw text (to submit invalid JSON).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_state_text: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fence: Option<String>,
    },
    CommitStep {
        messages: Vec<TraceMessage>,
        #[serde(default, skip_serializing_if = "is_false")]
        consume_compaction_request: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fence: Option<String>,
    },
    EnterRequiresAction {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fence: Option<String>,
    },
    FinishInterruption {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        partial_messages: Vec<TraceMessage>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fence: Option<String>,
    },
    FinishTurn {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fence: Option<String>,
    },
    FinishError {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_error: Option<serde_json::Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fence: Option<String>,
    },
    CancelRequiresAction {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fence: Option<String>,
    },
    ReconcileInvalidState {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_error: Option<serde_json::Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cancellation_reason: Option<String>,
    },
}

/// The `generate` object of a trace.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GenerateSpec {
    /// How many chats.
    pub(crate) chats: usize,
    /// Steps per chat (the first creates it).
    pub(crate) steps_per_chat: usize,
    /// The seed.
    #[serde(default)]
    pub(crate) seed: u64,
}

/// Reads a trace file (JSON).
pub(crate) fn load(path: &std::path::Path) -> anyhow::Result<Trace> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing trace {}", path.display()))
}

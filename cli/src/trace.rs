//! The trace format of `chatstate replay` (documented in `docs/traces.md`)
//! and its compilation into operations with resolved identifiers.
//!
//! A trace names chats, workers, runners, users and model configurations
//! symbolically ("c1", "w1"). [`Names`] maps every name to a UUID derived
//! from the name alone, so the same trace gives byte-identical notification
//! payloads on every backend. Messages and queued messages are named by
//! position (in the active history, in the queue) or by raw id; positions
//! are resolved by each backend against its own view of the chat, right
//! before the transition runs ([`InputSpec::resolve`]).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use anyhow::{Context as _, bail};
use chatstate::{CreateChat, LockMode};
use chatstate_model::{
    BusyBehavior, ChatId, ChatStatus, Input, JsonText, MessageId, NewChat, NewMessage, Options,
    Owner, Part, QueuedMessageId, Role, RunnerId, Visibility, WorkerId,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

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
    pub(crate) generate: Option<crate::tracegen::GenerateSpec>,
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
    fn parts(&self) -> Vec<Part> {
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

// ---------------------------------------------------------------------------
// Names

/// The kinds of symbolic name; each has its own UUID space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Chat,
    Worker,
    Runner,
    User,
    Config,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Worker => "worker",
            Kind::Runner => "runner",
            Kind::User => "user",
            Kind::Config => "config",
        }
    }
}

/// Symbolic names and their UUIDs, both ways.
#[derive(Clone, Debug, Default)]
pub(crate) struct Names {
    /// Mixed into chat ids only (see [`Names::with_chat_namespace`]).
    chat_namespace: String,
    forward: HashMap<(Kind, String), Uuid>,
    back: HashMap<Uuid, String>,
}

impl Names {
    /// Names whose chat ids also depend on `namespace` (empty: on the name
    /// alone). Replays on a long-lived database use a fresh namespace per
    /// run, so a second run does not collide with the chats of the first.
    pub(crate) fn with_chat_namespace(namespace: &str) -> Self {
        Names {
            chat_namespace: namespace.to_owned(),
            ..Names::default()
        }
    }

    /// The UUID of a name: the name itself if it is a UUID, else derived
    /// from the kind and the name.
    pub(crate) fn id(&mut self, kind: Kind, name: &str) -> Uuid {
        if let Some(id) = self.forward.get(&(kind, name.to_owned())) {
            return *id;
        }
        let id = Uuid::parse_str(name).unwrap_or_else(|_| {
            let ns = if kind == Kind::Chat {
                self.chat_namespace.as_str()
            } else {
                ""
            };
            derived_uuid(&format!("chatstate-trace/{ns}/{}/{name}", kind.tag()))
        });
        self.forward.insert((kind, name.to_owned()), id);
        self.back.insert(id, name.to_owned());
        id
    }

    /// The name of a UUID handed out here, else the UUID as text.
    pub(crate) fn name(&self, id: Uuid) -> String {
        self.back
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }
}

/// A UUID (version 8, "custom") from FNV-1a over `text`: stable across
/// platforms and releases, which `std`'s hasher does not promise.
fn derived_uuid(text: &str) -> Uuid {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let mut h = OFFSET;
    for b in text.bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(PRIME);
    }
    let mut bytes = h.to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Uuid::from_bytes(bytes)
}

// ---------------------------------------------------------------------------
// Compiled traces

/// A message or queued message, by position or by raw id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// 0-based position in the active history / the queue.
    Index(usize),
    /// A raw row id (backend-specific).
    Id(i64),
}

/// The id a position outside the history or queue resolves to: no store
/// and no model chat ever hands it out, so the transition reports the
/// message as not found on every backend.
pub(crate) const MISSING_ID: i64 = i64::MAX;

/// A transition input whose message references are resolved late.
#[derive(Clone, Debug)]
pub(crate) enum InputSpec {
    /// Needs no resolution.
    Ready(Input),
    EditMessage {
        target: Target,
        content: Vec<Part>,
        created_by: Option<Uuid>,
        model_config_id: Option<Uuid>,
    },
    DeleteQueued(Target),
    PromoteQueued(Target),
}

impl InputSpec {
    /// True if resolving needs the active history.
    pub(crate) fn needs_history(&self) -> bool {
        matches!(
            self,
            InputSpec::EditMessage {
                target: Target::Index(_),
                ..
            }
        )
    }

    /// The input, with positions resolved against `queue` (the queue's ids
    /// in order) and `history` (the active history's ids in order; only
    /// consulted when [`InputSpec::needs_history`]).
    pub(crate) fn resolve(&self, queue: &[QueuedMessageId], history: &[MessageId]) -> Input {
        let queued = |t: &Target| match *t {
            Target::Index(i) => queue.get(i).copied().unwrap_or(QueuedMessageId(MISSING_ID)),
            Target::Id(id) => QueuedMessageId(id),
        };
        match self {
            InputSpec::Ready(input) => input.clone(),
            InputSpec::EditMessage {
                target,
                content,
                created_by,
                model_config_id,
            } => Input::EditMessage {
                message_id: match *target {
                    Target::Index(i) => history.get(i).copied().unwrap_or(MessageId(MISSING_ID)),
                    Target::Id(id) => MessageId(id),
                },
                content: content.clone(),
                created_by: *created_by,
                model_config_id: *model_config_id,
            },
            InputSpec::DeleteQueued(t) => Input::DeleteQueuedMessage { id: queued(t) },
            InputSpec::PromoteQueued(t) => Input::PromoteQueuedMessage { id: queued(t) },
        }
    }
}

/// One transition of an Update, compiled.
#[derive(Clone, Debug)]
pub(crate) struct CallSpec {
    pub(crate) input: InputSpec,
    pub(crate) fence: Option<RunnerId>,
}

/// A compiled step. `chat` is an index into [`Compiled::chats`].
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Create {
        chat: usize,
        create: CreateChat,
    },
    Update {
        chat: usize,
        calls: Vec<CallSpec>,
    },
    Heartbeat {
        chat: usize,
        runner: RunnerId,
    },
    Advance(Duration),
    SetRaw {
        chat: usize,
        status: ChatStatus,
        archived: Option<bool>,
    },
    Lock {
        chat: usize,
        mode: LockMode,
    },
}

impl Op {
    pub(crate) fn chat(&self) -> Option<usize> {
        match self {
            Op::Create { chat, .. }
            | Op::Update { chat, .. }
            | Op::Heartbeat { chat, .. }
            | Op::SetRaw { chat, .. }
            | Op::Lock { chat, .. } => Some(*chat),
            Op::Advance(_) => None,
        }
    }
}

/// A trace ready to run on any backend.
#[derive(Clone, Debug)]
pub(crate) struct Compiled {
    pub(crate) options: Options,
    pub(crate) names: Names,
    /// Chat ids by index, and their names.
    pub(crate) chats: Vec<(ChatId, String)>,
    pub(crate) ops: Vec<Op>,
}

impl Compiled {
    /// The model's NewChat of a create op.
    pub(crate) fn new_chat(create: &CreateChat) -> NewChat {
        NewChat {
            id: create.id.expect("compiled creates carry their id"),
            owner_id: create.owner_id,
            dynamic_tools: create.dynamic_tools.clone(),
            last_model_config_id: create.last_model_config_id,
            messages: create.messages.clone(),
        }
    }
}

/// Reads a trace file (JSON).
pub(crate) fn load(path: &std::path::Path) -> anyhow::Result<Trace> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing trace {}", path.display()))
}

/// Expands the generated part and resolves every name.
pub(crate) fn compile(trace: &Trace, names: Names) -> anyhow::Result<Compiled> {
    let options = trace.options.options()?;
    let mut steps = trace.steps.clone();
    if let Some(spec) = &trace.generate {
        steps.extend(crate::tracegen::generate(spec, &options)?);
    }
    let mut compiler = Compiler::new(names);
    let ops = steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            compiler
                .op(step)
                .with_context(|| format!("step {i}: {}", step_name(step)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Compiled {
        options,
        names: compiler.names,
        chats: compiler.chats,
        ops,
    })
}

/// Compiles steps one at a time, giving each new chat name the next index.
pub(crate) struct Compiler {
    pub(crate) names: Names,
    slots: HashMap<String, usize>,
    pub(crate) chats: Vec<(ChatId, String)>,
}

impl Compiler {
    pub(crate) fn new(names: Names) -> Self {
        Compiler {
            names,
            slots: HashMap::new(),
            chats: Vec::new(),
        }
    }

    /// Compiles one step.
    pub(crate) fn op(&mut self, step: &Step) -> anyhow::Result<Op> {
        let chat = step.chat().map(|name| match self.slots.get(name) {
            Some(slot) => *slot,
            None => {
                let id = ChatId(self.names.id(Kind::Chat, name));
                self.chats.push((id, name.to_owned()));
                self.slots.insert(name.to_owned(), self.chats.len() - 1);
                self.chats.len() - 1
            }
        });
        compile_step(step, chat, &mut self.names, &self.chats)
    }
}

fn step_name(step: &Step) -> &'static str {
    match step {
        Step::CreateChat(_) => "create_chat",
        Step::Update(_) => "update",
        Step::Heartbeat(_) => "heartbeat",
        Step::AdvanceClock(_) => "advance_clock",
        Step::SetRawStatus(_) => "set_raw_status",
        Step::Lock(_) => "lock",
        Step::ReadLock(_) => "read_lock",
    }
}

fn compile_step(
    step: &Step,
    chat: Option<usize>,
    names: &mut Names,
    chats: &[(ChatId, String)],
) -> anyhow::Result<Op> {
    let slot = || chat.expect("chat steps have a chat");
    Ok(match step {
        Step::CreateChat(s) => {
            let owner = s.owner.as_deref().unwrap_or("owner");
            let messages = s
                .messages
                .iter()
                .map(|m| message(m, names))
                .collect::<Vec<_>>();
            Op::Create {
                chat: slot(),
                create: CreateChat {
                    id: Some(chats[slot()].0),
                    owner_id: names.id(Kind::User, owner),
                    dynamic_tools: s.dynamic_tools.iter().cloned().collect::<BTreeSet<_>>(),
                    last_model_config_id: s
                        .last_model_config
                        .as_deref()
                        .map(|c| names.id(Kind::Config, c)),
                    messages,
                    ..CreateChat::default()
                },
            }
        }
        Step::Update(s) => Op::Update {
            chat: slot(),
            calls: s
                .transitions
                .iter()
                .enumerate()
                .map(|(j, t)| call(t, names).with_context(|| format!("transition {j}")))
                .collect::<anyhow::Result<_>>()?,
        },
        Step::Heartbeat(s) => Op::Heartbeat {
            chat: slot(),
            runner: RunnerId(names.id(Kind::Runner, &s.runner)),
        },
        Step::AdvanceClock(s) => Op::Advance(advance(s.seconds)?),
        Step::SetRawStatus(s) => Op::SetRaw {
            chat: slot(),
            status: ChatStatus::parse(&s.status),
            archived: s.archived,
        },
        Step::Lock(_) => Op::Lock {
            chat: slot(),
            mode: LockMode::Exclusive,
        },
        Step::ReadLock(_) => Op::Lock {
            chat: slot(),
            mode: LockMode::Shared,
        },
    })
}

fn message(m: &TraceMessage, names: &mut Names) -> NewMessage {
    NewMessage {
        role: m.role,
        content: m.content.parts(),
        visibility: m.visibility.unwrap_or_default(),
        model_config_id: m.model_config.as_deref().map(|c| names.id(Kind::Config, c)),
        created_by: m.created_by.as_deref().map(|u| names.id(Kind::User, u)),
    }
}

fn target(index: Option<usize>, id: Option<i64>, what: &str) -> anyhow::Result<Target> {
    match (index, id) {
        (Some(i), None) => Ok(Target::Index(i)),
        (None, Some(id)) => Ok(Target::Id(id)),
        _ => bail!("give exactly one of {what} and id"),
    }
}

/// The longest single `advance_clock` step: the longest duration the
/// options allow (store time plus it must stay a Postgres timestamp).
pub(crate) const MAX_ADVANCE: Duration = Options::MAX_DURATION;

/// An `advance_clock` amount: finite, not negative, at most [`MAX_ADVANCE`].
fn advance(seconds: f64) -> anyhow::Result<Duration> {
    match Duration::try_from_secs_f64(seconds) {
        Ok(d) if d <= MAX_ADVANCE => Ok(d),
        _ => bail!(
            "seconds must be a number from 0 to {} (100 years), not {seconds}",
            MAX_ADVANCE.as_secs()
        ),
    }
}

fn json(v: &Option<serde_json::Value>) -> anyhow::Result<Option<JsonText>> {
    Ok(v.as_ref().map(JsonText::from_value).transpose()?)
}

fn fence_of(names: &mut Names, runner: &Option<String>) -> Option<RunnerId> {
    runner
        .as_deref()
        .map(|r| RunnerId(names.id(Kind::Runner, r)))
}

fn call(t: &TraceTransition, names: &mut Names) -> anyhow::Result<CallSpec> {
    use TraceTransition as T;
    let (input, fence) = match t {
        T::SetArchived { archived } => (
            InputSpec::Ready(Input::SetArchived {
                archived: *archived,
            }),
            None,
        ),
        T::SendMessage {
            message: m,
            busy_behavior,
        } => (
            InputSpec::Ready(Input::SendMessage {
                message: message(m, names),
                busy_behavior: *busy_behavior,
            }),
            None,
        ),
        T::EditMessage {
            history_index,
            id,
            content,
            created_by,
            model_config,
        } => (
            InputSpec::EditMessage {
                target: target(*history_index, *id, "history_index")?,
                content: content.parts(),
                created_by: created_by.as_deref().map(|u| names.id(Kind::User, u)),
                model_config_id: model_config.as_deref().map(|c| names.id(Kind::Config, c)),
            },
            None,
        ),
        T::RequestCompaction {} => (InputSpec::Ready(Input::RequestCompaction), None),
        T::DeleteQueuedMessage { queue_index, id } => (
            InputSpec::DeleteQueued(target(*queue_index, *id, "queue_index")?),
            None,
        ),
        T::PromoteQueuedMessage { queue_index, id } => (
            InputSpec::PromoteQueued(target(*queue_index, *id, "queue_index")?),
            None,
        ),
        T::Interrupt { reason } => (
            InputSpec::Ready(Input::Interrupt {
                reason: reason.clone(),
            }),
            None,
        ),
        T::CompleteRequiresAction {
            results,
            created_by,
        } => (
            InputSpec::Ready(Input::CompleteRequiresAction {
                results: results
                    .iter()
                    .map(|r| chatstate_model::ToolResultInput {
                        tool_call_id: r.tool_call_id.clone(),
                        output: match (&r.output_text, &r.output) {
                            (Some(text), _) => text.clone(),
                            (None, Some(v)) => v.to_string(),
                            (None, None) => "null".to_owned(),
                        },
                        is_error: r.is_error,
                    })
                    .collect(),
                created_by: created_by.as_deref().map(|u| names.id(Kind::User, u)),
                model_config_id: None,
            }),
            None,
        ),
        T::Acquire { worker, runner } => (
            InputSpec::Ready(Input::Acquire {
                owner: Owner {
                    worker_id: WorkerId(names.id(Kind::Worker, worker)),
                    runner_id: RunnerId(names.id(Kind::Runner, runner)),
                },
            }),
            None,
        ),
        T::Abandon { fence } => (InputSpec::Ready(Input::Abandon), fence_of(names, fence)),
        T::RecordGenerationAttempt { fence } => (
            InputSpec::Ready(Input::RecordGenerationAttempt),
            fence_of(names, fence),
        ),
        T::RecordRetryState {
            retry_state,
            retry_state_text,
            fence,
        } => (
            InputSpec::Ready(Input::RecordRetryState {
                retry_state: match (retry_state_text, retry_state) {
                    (Some(text), _) => text.clone(),
                    (None, Some(v)) => v.to_string(),
                    (None, None) => String::new(),
                },
            }),
            fence_of(names, fence),
        ),
        T::CommitStep {
            messages,
            consume_compaction_request,
            fence,
        } => {
            let fence = fence_of(names, fence);
            (
                InputSpec::Ready(Input::CommitStep {
                    messages: messages.iter().map(|m| message(m, names)).collect(),
                    consume_compaction_request: *consume_compaction_request,
                }),
                fence,
            )
        }
        T::EnterRequiresAction { fence } => (
            InputSpec::Ready(Input::EnterRequiresAction),
            fence_of(names, fence),
        ),
        T::FinishInterruption {
            partial_messages,
            fence,
        } => {
            let fence = fence_of(names, fence);
            (
                InputSpec::Ready(Input::FinishInterruption {
                    partial_messages: partial_messages.iter().map(|m| message(m, names)).collect(),
                }),
                fence,
            )
        }
        T::FinishTurn { fence } => (InputSpec::Ready(Input::FinishTurn), fence_of(names, fence)),
        T::FinishError { last_error, fence } => (
            InputSpec::Ready(Input::FinishError {
                last_error: json(last_error)?,
            }),
            fence_of(names, fence),
        ),
        T::CancelRequiresAction { reason, fence } => (
            InputSpec::Ready(Input::CancelRequiresAction {
                reason: reason.clone(),
            }),
            fence_of(names, fence),
        ),
        T::ReconcileInvalidState {
            last_error,
            cancellation_reason,
        } => (
            InputSpec::Ready(Input::ReconcileInvalidState {
                last_error: json(last_error)?,
                cancellation_reason: cancellation_reason.clone(),
            }),
            None,
        ),
    };
    Ok(CallSpec { input, fence })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct_per_kind() {
        let mut a = Names::default();
        let mut b = Names::default();
        let c1 = a.id(Kind::Chat, "c1");
        assert_eq!(c1, b.id(Kind::Chat, "c1"));
        assert_ne!(c1, a.id(Kind::Runner, "c1"));
        assert_eq!(a.name(c1), "c1");
        assert_eq!(c1.get_version_num(), 8);
        // Pinned: a change here changes every trace's payloads.
        assert_eq!(c1.to_string(), "253c4f06-531a-8c4f-83f0-ca01b14ac061");
        let mut ns = Names::with_chat_namespace("run-2");
        assert_ne!(ns.id(Kind::Chat, "c1"), c1);
        assert_eq!(ns.id(Kind::Runner, "r1"), a.id(Kind::Runner, "r1"));
    }

    #[test]
    fn the_issue_example_parses() {
        let text = r#"{"options": {"max_queue_size": 20, "heartbeat_stale_secs": 30, "requires_action_timeout_secs": 300},
 "steps": [
  {"create_chat": {"chat": "c1", "dynamic_tools": ["ask_user"], "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}},
  {"update": {"chat": "c1", "transitions": [{"Acquire": {"worker": "w1", "runner": "r1"}}, {"CommitStep": {"messages": [{"role": "assistant", "content": "hello"}]}}]}},
  {"update": {"chat": "c1", "transitions": [{"SendMessage": {"message": {"role": "user", "content": [{"type": "text", "text": "next"}]}, "busy_behavior": "queue"}}]}},
  {"update": {"chat": "c1", "transitions": [{"DeleteQueuedMessage": {"queue_index": 0}}]}},
  {"update": {"chat": "c1", "transitions": [{"EditMessage": {"history_index": 0, "content": [{"type": "text", "text": "edited"}]}}]}},
  {"heartbeat": {"chat": "c1", "runner": "r1"}},
  {"advance_clock": {"seconds": 31}},
  {"set_raw_status": {"chat": "c1", "status": "paused"}},
  {"update": {"chat": "c1", "transitions": [{"FinishTurn": {}}, {"ReconcileInvalidState": {}}]}}
 ]}"#;
        let trace: Trace = serde_json::from_str(text).unwrap();
        let c = compile(&trace, Names::default()).unwrap();
        assert_eq!(c.ops.len(), 9);
        assert_eq!(c.chats.len(), 1);
        // The trace round-trips through its own serialisation.
        let again: Trace = serde_json::from_str(&serde_json::to_string(&trace).unwrap()).unwrap();
        assert_eq!(compile(&again, Names::default()).unwrap().ops.len(), 9);
    }

    #[test]
    fn bad_targets_and_unknown_fields_are_errors() {
        let both = r#"{"steps": [{"update": {"chat": "c", "transitions": [{"DeleteQueuedMessage": {"queue_index": 0, "id": 3}}]}}]}"#;
        let trace: Trace = serde_json::from_str(both).unwrap();
        let err = compile(&trace, Names::default()).unwrap_err();
        assert!(format!("{err:#}").contains("step 0"), "{err:#}");
        let typo = r#"{"steps": [{"update": {"chat": "c", "transitions": [{"FinishTurn": {"fenc": "r"}}]}}]}"#;
        assert!(serde_json::from_str::<Trace>(typo).is_err());
    }
}

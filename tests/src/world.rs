//! The reference world of the model-based tests: several chats of the pure
//! model, store time, and the symbolic operations that drive both the model
//! and a real store.
//!
//! Operations never carry row ids. A store hands out message and queued ids
//! from global sequences while the model numbers each chat from 1, so an
//! operation names a message by its position in the active history and a
//! queued message by its position in the queue, and each side resolves it
//! against its own view of the chat ([`resolve`]). Chat, worker and runner
//! ids are chosen here, so notification payloads are byte-identical on
//! every side.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use chatstate::{ChatRecord, LeaseStatus};
use chatstate_model::{
    BusyBehavior, Call, Chat, ChatId, ChatStatus, Input, JsonText, MessageId, NewChat, NewMessage,
    Notification, Options, Outcome, Owner, Part, QueuedMessageId, Rejection, Role, RunnerId,
    Snapshot, StepEnv, Timestamp, ToolResultInput, ToolState, Transition, Triple, Visibility,
    WorkerId, after_create, step, update,
};
use uuid::Uuid;

use crate::TEST_EPOCH;

/// How many chats a conformance world holds.
pub const SLOTS: usize = 3;

/// The dynamic (client-executed) tool of world chats.
pub const DYNAMIC_TOOL: &str = "ask_user";
/// A server-side tool.
pub const SERVER_TOOL: &str = "web_search";

/// The two workers (with one runner each) that acquire chats.
pub const OWNERS: [Owner; 2] = [
    Owner {
        worker_id: WorkerId(Uuid::from_u128(0x3041_0000_0000_0000_0000_0000_0000_0001)),
        runner_id: RunnerId(Uuid::from_u128(0x4144_0000_0000_0000_0000_0000_0000_0001)),
    },
    Owner {
        worker_id: WorkerId(Uuid::from_u128(0x3041_0000_0000_0000_0000_0000_0000_0002)),
        runner_id: RunnerId(Uuid::from_u128(0x4144_0000_0000_0000_0000_0000_0000_0002)),
    },
];

/// A runner that never owns a chat (its heartbeats and fences lead nowhere).
pub const IDLE_RUNNER: RunnerId =
    RunnerId(Uuid::from_u128(0x4144_0000_0000_0000_0000_0000_0000_00ff));

/// Users that author messages.
pub const USERS: [Uuid; 2] = [
    Uuid::from_u128(0x05e4_0000_0000_0000_0000_0000_0000_0001),
    Uuid::from_u128(0x05e4_0000_0000_0000_0000_0000_0000_0002),
];

/// Model configurations messages may name.
pub const CONFIGS: [Uuid; 2] = [
    Uuid::from_u128(0xc0f1_0000_0000_0000_0000_0000_0000_0001),
    Uuid::from_u128(0xc0f1_0000_0000_0000_0000_0000_0000_0002),
];

/// The id a message or queued message of no chat has on every side.
pub const UNKNOWN_ID: i64 = i64::MAX;

/// What the model resolves "a message of another chat" to: an id its own
/// chat never hands out (model ids count from 1 per chat).
pub const MODEL_FOREIGN_ID: i64 = 1 << 40;

/// The chat ids of a default world.
pub fn default_ids() -> Vec<ChatId> {
    (0..SLOTS)
        .map(|i| {
            ChatId(Uuid::from_u128(
                0xc4a7_0000_0000_0000_0000_0000_0000_0000 + i as u128 + 1,
            ))
        })
        .collect()
}

/// The user owning the chat in a slot.
pub fn chat_owner(slot: usize) -> Uuid {
    Uuid::from_u128(0x0a11_0000_0000_0000_0000_0000_0000_0000 + slot as u128)
}

/// The tunables of the world: the defaults with a queue cap of 3, so
/// MessageQueueFull is reachable in a few steps.
pub fn options() -> Options {
    Options {
        max_queue_size: 3,
        ..Options::default()
    }
}

/// A runner by index: the two owners' runners, then [`IDLE_RUNNER`].
pub fn runner(n: u8) -> RunnerId {
    match n % 3 {
        2 => IDLE_RUNNER,
        i => OWNERS[i as usize].runner_id,
    }
}

// ---------------------------------------------------------------------------
// Symbolic inputs
// ---------------------------------------------------------------------------

const CANNED_TEXT: [&str; 5] = [
    "hello",
    "and then?",
    "",
    "ünïcødé 🦀 \"quoted\" \\ back\\slash\nnew line\ttab",
    "<script>alert('x')</script> '; DROP TABLE chats; --",
];

/// Text of a message, reason or title.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Text {
    /// One of a few canned texts (empty and hostile ones included).
    Canned(u8),
    /// Anything.
    Any(String),
}

impl Text {
    /// The text.
    pub fn resolve(&self) -> String {
        match self {
            Text::Canned(n) => CANNED_TEXT[*n as usize % CANNED_TEXT.len()].to_owned(),
            Text::Any(s) => s.clone(),
        }
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        short(f, &self.resolve())
    }
}

/// Writes a string's Debug form, cut after 120 characters.
fn short(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    if s.chars().count() > 120 {
        let head: String = s.chars().take(120).collect();
        write!(f, "{head:?}... ({} bytes)", s.len())
    } else {
        write!(f, "{s:?}")
    }
}

const CANNED_JSON: [&str; 7] = [
    r#"{"attempt":1,"delay_ms":500}"#,
    r#"{"b":1,"a":{"y":null,"x":[true,false,"ü"]}}"#,
    r#""just a string""#,
    "[1,2,3]",
    "0",
    r#"{"nested":{"deeper":{"deepest":[{},[],""]}}}"#,
    "-1.5e3",
];

/// A JSON payload given as text (retry state, tool output, error payload).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Json {
    /// One of a few canned valid documents.
    Canned(u8),
    /// Any text, usually not JSON at all.
    Raw(String),
}

impl Json {
    /// The text.
    pub fn text(&self) -> String {
        match self {
            Json::Canned(n) => CANNED_JSON[*n as usize % CANNED_JSON.len()].to_owned(),
            Json::Raw(s) => s.clone(),
        }
    }

    /// A JSON value: the text parsed, or the text as a JSON string when it
    /// does not parse.
    pub fn value(&self) -> JsonText {
        let text = self.text();
        JsonText::parse(&text).unwrap_or_else(|_| JsonText::string(&text))
    }
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "json")?;
        short(f, &self.text())
    }
}

/// Authorship and routing of a message.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Meta {
    /// Index into [`USERS`].
    pub created_by: Option<u8>,
    /// Index into [`CONFIGS`].
    pub model_config: Option<u8>,
    /// Visibility.
    pub visibility: Visibility,
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Meta::default() {
            return Ok(());
        }
        write!(f, "{{")?;
        if let Some(u) = self.created_by {
            write!(f, "by user{u} ")?;
        }
        if let Some(c) = self.model_config {
            write!(f, "config{c} ")?;
        }
        write!(f, "{}}}", self.visibility.as_str())
    }
}

fn user(n: Option<u8>) -> Option<Uuid> {
    n.map(|i| USERS[i as usize % USERS.len()])
}

fn config(n: Option<u8>) -> Option<Uuid> {
    n.map(|i| CONFIGS[i as usize % CONFIGS.len()])
}

/// A message to send, commit or create a chat with.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Msg {
    /// One text part.
    Text {
        /// Role.
        role: Role,
        /// Text.
        text: Text,
        /// Authorship.
        meta: Meta,
    },
    /// An assistant message with a text and one tool call `call-<n>`.
    Call {
        /// Call number.
        call: u8,
        /// A call of the dynamic tool (else a server tool).
        dynamic: bool,
        /// Run by the provider (never outstanding).
        provider_executed: bool,
    },
    /// An assistant message calling a server tool and the dynamic tool.
    TwoCalls {
        /// Number of the first call; the second is one more.
        call: u8,
    },
    /// A tool message answering every outstanding call of the view.
    Answer {
        /// Results flagged as errors.
        is_error: bool,
    },
    /// A tool message answering `call-<n>`, outstanding or not.
    Stray {
        /// Call number.
        call: u8,
    },
    /// An assistant message with a part the model carries verbatim.
    Other(u8),
    /// A message with no content at all.
    Empty(Role),
}

impl fmt::Debug for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Msg::Text { role, text, meta } => write!(f, "{}{text:?}{meta:?}", role.as_str()),
            Msg::Call {
                call,
                dynamic,
                provider_executed,
            } => write!(
                f,
                "call-{call}({}{})",
                if *dynamic { DYNAMIC_TOOL } else { SERVER_TOOL },
                if *provider_executed { ", provider" } else { "" }
            ),
            Msg::TwoCalls { call } => write!(f, "calls-{call}+{}", call + 1),
            Msg::Answer { is_error } => {
                write!(f, "answer{}", if *is_error { "(error)" } else { "" })
            }
            Msg::Stray { call } => write!(f, "result-for-call-{call}"),
            Msg::Other(n) => write!(f, "other-part{n}"),
            Msg::Empty(role) => write!(f, "empty-{}", role.as_str()),
        }
    }
}

fn call_id(n: u8) -> String {
    format!("call-{n}")
}

fn tool_call(id: String, name: &str, provider_executed: bool) -> Part {
    Part::ToolCall {
        tool_call_id: id,
        tool_name: name.to_owned(),
        args: JsonText::from_value(&serde_json::json!({"q": "x"})).expect("shallow"),
        provider_executed,
    }
}

const OTHER_PARTS: [&str; 3] = [
    r#"{"type":"reasoning","text":"thinking","signature":"abc"}"#,
    r#"{"type":"file","media_type":"image/png","data":"aGVsbG8="}"#,
    r#"{"type":"source","url":"https://example.invalid/","title":null}"#,
];

impl Msg {
    /// The message, given the outstanding calls of the history it joins.
    pub fn resolve(&self, view: &View) -> NewMessage {
        match self {
            Msg::Text { role, text, meta } => NewMessage {
                role: *role,
                content: vec![Part::text(text.resolve())],
                visibility: meta.visibility,
                model_config_id: config(meta.model_config),
                created_by: user(meta.created_by),
            },
            Msg::Call {
                call,
                dynamic,
                provider_executed,
            } => NewMessage::new(
                Role::Assistant,
                vec![
                    Part::text("calling a tool"),
                    tool_call(
                        call_id(*call),
                        if *dynamic { DYNAMIC_TOOL } else { SERVER_TOOL },
                        *provider_executed,
                    ),
                ],
            ),
            Msg::TwoCalls { call } => NewMessage::new(
                Role::Assistant,
                vec![
                    tool_call(call_id(*call), SERVER_TOOL, false),
                    tool_call(call_id(call.wrapping_add(1)), DYNAMIC_TOOL, false),
                ],
            ),
            Msg::Answer { is_error } => NewMessage::new(
                Role::Tool,
                view.tools
                    .outstanding(None)
                    .into_iter()
                    .map(|(id, name)| Part::ToolResult {
                        tool_call_id: id,
                        tool_name: name,
                        result: JsonText::string("done"),
                        is_error: *is_error,
                    })
                    .collect(),
            ),
            Msg::Stray { call } => NewMessage::new(
                Role::Tool,
                vec![Part::tool_result(
                    call_id(*call),
                    SERVER_TOOL,
                    JsonText::from_value(&serde_json::json!({"late": true})).expect("shallow"),
                )],
            ),
            Msg::Other(n) => NewMessage::new(
                Role::Assistant,
                vec![Part::Other(
                    JsonText::parse(OTHER_PARTS[*n as usize % OTHER_PARTS.len()])
                        .expect("canned part is JSON"),
                )],
            ),
            Msg::Empty(role) => NewMessage::new(*role, Vec::new()),
        }
    }
}

/// A history message, named by position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsgRef {
    /// The n-th active message.
    Active(u8),
    /// The last active user message.
    LastUser,
    /// The last active assistant message.
    LastAssistant,
    /// An id no chat has.
    Unknown,
    /// A raw id no store or model hands out (zero, negative or huge).
    Raw(i64),
    /// The first active message of the next chat of the world.
    Foreign,
}

/// A queued message, named by position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QRef {
    /// The n-th queued message (0 is the head).
    At(u8),
    /// An id no chat has.
    Unknown,
    /// A raw id no store or model hands out.
    Raw(i64),
    /// The head of the next chat's queue.
    Foreign,
}

/// Which tool results CompleteRequiresAction submits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Results {
    /// One per pending dynamic call, in order.
    Exact {
        /// Flag them as tool errors.
        is_error: bool,
        /// Output (index into the canned JSON documents).
        output: u8,
    },
    /// One per pending dynamic call, in reverse order.
    Reversed,
    /// The first pending call unanswered.
    Missing,
    /// An extra result for a call nobody made.
    Unexpected,
    /// The first result twice.
    Duplicate,
    /// The first result's output is not JSON.
    InvalidJson,
    /// No results.
    Empty,
}

/// One transition's input, symbolically.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Spec {
    /// SetArchived.
    SetArchived(bool),
    /// SendMessage.
    Send {
        /// The message.
        msg: Msg,
        /// Busy behaviour.
        busy: BusyBehavior,
    },
    /// EditMessage.
    Edit {
        /// The target.
        target: MsgRef,
        /// Replacement text.
        text: Text,
        /// Author (index into [`USERS`]).
        created_by: Option<u8>,
        /// Configuration override (index into [`CONFIGS`]).
        model_config: Option<u8>,
    },
    /// RequestCompaction.
    RequestCompaction,
    /// DeleteQueuedMessage.
    DeleteQueued(QRef),
    /// PromoteQueuedMessage.
    PromoteQueued(QRef),
    /// Interrupt.
    Interrupt(Option<Text>),
    /// CompleteRequiresAction.
    Complete {
        /// The results.
        results: Results,
        /// Author.
        created_by: Option<u8>,
    },
    /// RecordGenerationAttempt.
    RecordAttempt,
    /// RecordRetryState.
    RecordRetry(Json),
    /// CommitStep.
    Commit {
        /// The messages.
        msgs: Vec<Msg>,
        /// Consume the compaction marker.
        consume: bool,
    },
    /// EnterRequiresAction.
    Enter,
    /// FinishInterruption with partial messages.
    FinishInterruption(Vec<Msg>),
    /// FinishTurn.
    FinishTurn,
    /// FinishError.
    FinishError(Option<Json>),
    /// CancelRequiresAction.
    Cancel(Option<Text>),
    /// ReconcileInvalidState.
    Reconcile {
        /// Error payload.
        error: Option<Json>,
        /// Cancellation text.
        reason: Option<Text>,
    },
    /// Acquire by an owner (index into [`OWNERS`]).
    Acquire(u8),
    /// Abandon.
    Abandon,
    /// A literal input, for hostile values that need no resolution (row ids
    /// in it must name no row on any side).
    Literal(Box<Input>),
}

/// Debug output short enough for a failing sequence: literal inputs (which
/// may hold megabytes) are cut.
#[derive(Debug)]
#[allow(dead_code)] // Read through Debug only.
enum SpecView<'a> {
    SetArchived(bool),
    Send {
        msg: &'a Msg,
        busy: BusyBehavior,
    },
    Edit {
        target: MsgRef,
        text: &'a Text,
        created_by: Option<u8>,
        model_config: Option<u8>,
    },
    RequestCompaction,
    DeleteQueued(QRef),
    PromoteQueued(QRef),
    Interrupt(&'a Option<Text>),
    Complete {
        results: Results,
        created_by: Option<u8>,
    },
    RecordAttempt,
    RecordRetry(&'a Json),
    Commit {
        msgs: &'a [Msg],
        consume: bool,
    },
    Enter,
    FinishInterruption(&'a [Msg]),
    FinishTurn,
    FinishError(&'a Option<Json>),
    Cancel(&'a Option<Text>),
    Reconcile {
        error: &'a Option<Json>,
        reason: &'a Option<Text>,
    },
    Acquire(u8),
    Abandon,
}

impl fmt::Debug for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = match self {
            Spec::Literal(input) => {
                let text = format!("{input:?}");
                return if text.len() > 240 {
                    let cut = (0..=240)
                        .rev()
                        .find(|i| text.is_char_boundary(*i))
                        .unwrap_or(0);
                    write!(f, "Literal({}... {} bytes)", &text[..cut], text.len())
                } else {
                    write!(f, "Literal({text})")
                };
            }
            Spec::SetArchived(a) => SpecView::SetArchived(*a),
            Spec::Send { msg, busy } => SpecView::Send { msg, busy: *busy },
            Spec::Edit {
                target,
                text,
                created_by,
                model_config,
            } => SpecView::Edit {
                target: *target,
                text,
                created_by: *created_by,
                model_config: *model_config,
            },
            Spec::RequestCompaction => SpecView::RequestCompaction,
            Spec::DeleteQueued(q) => SpecView::DeleteQueued(*q),
            Spec::PromoteQueued(q) => SpecView::PromoteQueued(*q),
            Spec::Interrupt(r) => SpecView::Interrupt(r),
            Spec::Complete {
                results,
                created_by,
            } => SpecView::Complete {
                results: *results,
                created_by: *created_by,
            },
            Spec::RecordAttempt => SpecView::RecordAttempt,
            Spec::RecordRetry(j) => SpecView::RecordRetry(j),
            Spec::Commit { msgs, consume } => SpecView::Commit {
                msgs,
                consume: *consume,
            },
            Spec::Enter => SpecView::Enter,
            Spec::FinishInterruption(m) => SpecView::FinishInterruption(m),
            Spec::FinishTurn => SpecView::FinishTurn,
            Spec::FinishError(e) => SpecView::FinishError(e),
            Spec::Cancel(r) => SpecView::Cancel(r),
            Spec::Reconcile { error, reason } => SpecView::Reconcile { error, reason },
            Spec::Acquire(n) => SpecView::Acquire(*n),
            Spec::Abandon => SpecView::Abandon,
        };
        v.fmt(f)
    }
}

impl Spec {
    /// The transition this input applies.
    pub fn transition(&self) -> Transition {
        match self {
            Spec::SetArchived(_) => Transition::SetArchived,
            Spec::Send { .. } => Transition::SendMessage,
            Spec::Edit { .. } => Transition::EditMessage,
            Spec::RequestCompaction => Transition::RequestCompaction,
            Spec::DeleteQueued(_) => Transition::DeleteQueuedMessage,
            Spec::PromoteQueued(_) => Transition::PromoteQueuedMessage,
            Spec::Interrupt(_) => Transition::Interrupt,
            Spec::Complete { .. } => Transition::CompleteRequiresAction,
            Spec::RecordAttempt => Transition::RecordGenerationAttempt,
            Spec::RecordRetry(_) => Transition::RecordRetryState,
            Spec::Commit { .. } => Transition::CommitStep,
            Spec::Enter => Transition::EnterRequiresAction,
            Spec::FinishInterruption(_) => Transition::FinishInterruption,
            Spec::FinishTurn => Transition::FinishTurn,
            Spec::FinishError(_) => Transition::FinishError,
            Spec::Cancel(_) => Transition::CancelRequiresAction,
            Spec::Reconcile { .. } => Transition::ReconcileInvalidState,
            Spec::Acquire(_) => Transition::Acquire,
            Spec::Abandon => Transition::Abandon,
            Spec::Literal(input) => input.transition(),
        }
    }
}

/// One call of an Update: an input and, for fenced worker calls, the runner
/// (see [`runner`]) the caller believes it holds.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CallSpec {
    /// The input.
    pub spec: Spec,
    /// The fence.
    pub fence: Option<u8>,
}

impl fmt::Debug for CallSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.spec)?;
        if let Some(r) = self.fence {
            write!(f, " fenced by runner{}", r % 3)?;
        }
        Ok(())
    }
}

impl From<Spec> for CallSpec {
    fn from(spec: Spec) -> Self {
        CallSpec { spec, fence: None }
    }
}

/// A legacy or inconsistent status written raw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RawStatus {
    /// `waiting`
    Waiting,
    /// `running`
    Running,
    /// `interrupting`
    Interrupting,
    /// `requires_action`
    RequiresAction,
    /// `error`
    Error,
    /// A legacy value the schema still accepts (`pending`, `paused`,
    /// `completed`).
    Legacy(u8),
}

impl RawStatus {
    /// The stored status.
    pub fn status(self) -> ChatStatus {
        const LEGACY: [&str; 3] = ["pending", "paused", "completed"];
        match self {
            RawStatus::Waiting => ChatStatus::Waiting,
            RawStatus::Running => ChatStatus::Running,
            RawStatus::Interrupting => ChatStatus::Interrupting,
            RawStatus::RequiresAction => ChatStatus::RequiresAction,
            RawStatus::Error => ChatStatus::Error,
            RawStatus::Legacy(n) => ChatStatus::Other(LEGACY[n as usize % LEGACY.len()].into()),
        }
    }
}

/// One operation on the world.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// CreateChat in a slot.
    Create {
        /// The slot.
        slot: u8,
        /// The initial history (may be empty: rejected).
        msgs: Vec<Msg>,
        /// Whether the chat lists the dynamic tool.
        dynamic: bool,
        /// Whether the chat has a last model configuration.
        config: bool,
    },
    /// An Update with these calls (none: an empty Update).
    Update {
        /// The slot.
        slot: u8,
        /// The calls, in order.
        calls: Vec<CallSpec>,
    },
    /// Lock (exclusive) or ReadLock (shared), reading the snapshot.
    Lock {
        /// The slot.
        slot: u8,
        /// ReadLock if true.
        shared: bool,
    },
    /// A heartbeat of a runner (see [`runner`]).
    Heartbeat {
        /// The slot.
        slot: u8,
        /// The runner.
        runner: u8,
    },
    /// Store time moves on (Postgres: stored heartbeats age).
    Advance {
        /// Seconds.
        secs: u32,
    },
    /// A raw write of status and archived flag.
    Raw {
        /// The slot.
        slot: u8,
        /// Status.
        status: RawStatus,
        /// Archived flag.
        archived: bool,
    },
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Create {
                slot,
                msgs,
                dynamic,
                config,
            } => write!(
                f,
                "Create(chat{slot}, {msgs:?}{}{})",
                if *dynamic { ", dynamic tool" } else { "" },
                if *config { ", config" } else { "" }
            ),
            Op::Update { slot, calls } => write!(f, "Update(chat{slot}, {calls:?})"),
            Op::Lock { slot, shared } => write!(
                f,
                "{}(chat{slot})",
                if *shared { "ReadLock" } else { "Lock" }
            ),
            Op::Heartbeat { slot, runner } => {
                write!(f, "Heartbeat(chat{slot}, runner{})", runner % 3)
            }
            Op::Advance { secs } => write!(f, "Advance({secs}s)"),
            Op::Raw {
                slot,
                status,
                archived,
            } => write!(
                f,
                "Raw(chat{slot}, {}{})",
                status.status(),
                if *archived { ", archived" } else { "" }
            ),
        }
    }
}

impl Op {
    /// The slot the operation touches, if any.
    pub fn slot(&self) -> Option<u8> {
        match self {
            Op::Create { slot, .. }
            | Op::Update { slot, .. }
            | Op::Lock { slot, .. }
            | Op::Heartbeat { slot, .. }
            | Op::Raw { slot, .. } => Some(*slot),
            Op::Advance { .. } => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Resolution
// ---------------------------------------------------------------------------

/// What resolution needs to know about a chat, read from either side.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// Active history: ids and roles, in order.
    pub active: Vec<(MessageId, Role)>,
    /// The queue's ids, head first.
    pub queue: Vec<QueuedMessageId>,
    /// Tool bookkeeping of the active history.
    pub tools: ToolState,
    /// The chat's dynamic tools.
    pub dynamic_tools: BTreeSet<String>,
}

impl View {
    /// The view of a model chat.
    pub fn of_chat(c: &Chat) -> View {
        View {
            active: c.active_history().map(|m| (m.id, m.role)).collect(),
            queue: c.queue.iter().map(|q| q.id).collect(),
            tools: ToolState::from_history(
                c.active_history().map(|m| (m.role, m.content.as_slice())),
            ),
            dynamic_tools: c.row.dynamic_tools.clone(),
        }
    }

    /// The view of a stored chat.
    pub fn of_record(r: &ChatRecord) -> View {
        View {
            active: r.active_history().map(|m| (m.id, m.role)).collect(),
            queue: r.queue.iter().map(|q| q.id).collect(),
            tools: ToolState::from_history(
                r.active_history().map(|m| (m.role, m.content.as_slice())),
            ),
            dynamic_tools: r.row.dynamic_tools.clone(),
        }
    }

    /// The view of a chat that does not exist (no history, no queue).
    pub fn empty() -> View {
        View::default()
    }

    /// The pending dynamic calls.
    pub fn pending_dynamic(&self) -> Vec<(String, String)> {
        self.tools.outstanding(Some(&self.dynamic_tools))
    }
}

/// Ids of the "next" chat, for inputs that name another chat's rows.
#[derive(Clone, Copy, Debug)]
pub struct Foreign {
    /// A message of another chat.
    pub message: MessageId,
    /// A queued message of another chat.
    pub queued: QueuedMessageId,
}

impl Foreign {
    /// What the model uses: ids its chats never hand out.
    pub const MODEL: Foreign = Foreign {
        message: MessageId(MODEL_FOREIGN_ID),
        queued: QueuedMessageId(MODEL_FOREIGN_ID),
    };
}

fn message_ref(r: MsgRef, view: &View, foreign: &Foreign) -> MessageId {
    let last = |role| {
        view.active
            .iter()
            .rev()
            .find(|(_, r)| *r == role)
            .map(|(id, _)| *id)
    };
    let id = match r {
        MsgRef::Active(i) => view.active.get(i as usize).map(|(id, _)| *id),
        MsgRef::LastUser => last(Role::User),
        MsgRef::LastAssistant => last(Role::Assistant),
        MsgRef::Unknown => None,
        MsgRef::Raw(raw) => Some(MessageId(raw)),
        MsgRef::Foreign => Some(foreign.message),
    };
    id.unwrap_or(MessageId(UNKNOWN_ID))
}

fn queued_ref(r: QRef, view: &View, foreign: &Foreign) -> QueuedMessageId {
    let id = match r {
        QRef::At(i) => view.queue.get(i as usize).copied(),
        QRef::Unknown => None,
        QRef::Raw(raw) => Some(QueuedMessageId(raw)),
        QRef::Foreign => Some(foreign.queued),
    };
    id.unwrap_or(QueuedMessageId(UNKNOWN_ID))
}

fn results(r: Results, pending: &[(String, String)]) -> Vec<ToolResultInput> {
    let result = |id: &str, output: String, is_error: bool| ToolResultInput {
        tool_call_id: id.to_owned(),
        output,
        is_error,
    };
    let exact = |output: String, is_error| -> Vec<ToolResultInput> {
        pending
            .iter()
            .map(|(id, _)| result(id, output.clone(), is_error))
            .collect()
    };
    let done = || r#""done""#.to_owned();
    match r {
        Results::Exact { is_error, output } => exact(Json::Canned(output).text(), is_error),
        Results::Reversed => {
            let mut out = exact(done(), false);
            out.reverse();
            out
        }
        Results::Missing => exact(done(), false).into_iter().skip(1).collect(),
        Results::Unexpected => {
            let mut out = exact(done(), false);
            out.push(result("call-nobody-made", done(), false));
            out
        }
        Results::Duplicate => {
            let mut out = exact(done(), false);
            if let Some(first) = out.first().cloned() {
                out.push(first);
            }
            out
        }
        Results::InvalidJson => {
            let mut out = exact(done(), false);
            match out.first_mut() {
                Some(first) => first.output = "{not json".to_owned(),
                None => out.push(result("call-nobody-made", "{not json".to_owned(), false)),
            }
            out
        }
        Results::Empty => Vec::new(),
    }
}

/// Resolves a symbolic input against one side's view of the chat.
pub fn resolve(spec: &Spec, view: &View, foreign: &Foreign) -> Input {
    let msgs = |msgs: &[Msg]| -> Vec<NewMessage> {
        // Later messages of one step see the earlier ones: an answer after
        // a call answers that call.
        let mut view = view.clone();
        msgs.iter()
            .map(|m| {
                let new = m.resolve(&view);
                view.tools.observe(new.role, &new.content);
                new
            })
            .collect()
    };
    match spec {
        Spec::SetArchived(archived) => Input::SetArchived {
            archived: *archived,
        },
        Spec::Send { msg, busy } => Input::SendMessage {
            message: msg.resolve(view),
            busy_behavior: *busy,
        },
        Spec::Edit {
            target,
            text,
            created_by,
            model_config,
        } => Input::EditMessage {
            message_id: message_ref(*target, view, foreign),
            content: vec![Part::text(text.resolve())],
            created_by: user(*created_by),
            model_config_id: config(*model_config),
        },
        Spec::RequestCompaction => Input::RequestCompaction,
        Spec::DeleteQueued(q) => Input::DeleteQueuedMessage {
            id: queued_ref(*q, view, foreign),
        },
        Spec::PromoteQueued(q) => Input::PromoteQueuedMessage {
            id: queued_ref(*q, view, foreign),
        },
        Spec::Interrupt(reason) => Input::Interrupt {
            reason: reason.as_ref().map(Text::resolve),
        },
        Spec::Complete {
            results: r,
            created_by,
        } => Input::CompleteRequiresAction {
            results: results(*r, &view.pending_dynamic()),
            created_by: user(*created_by),
            model_config_id: None,
        },
        Spec::RecordAttempt => Input::RecordGenerationAttempt,
        Spec::RecordRetry(json) => Input::RecordRetryState {
            retry_state: json.text(),
        },
        Spec::Commit { msgs: m, consume } => Input::CommitStep {
            messages: msgs(m),
            consume_compaction_request: *consume,
        },
        Spec::Enter => Input::EnterRequiresAction,
        Spec::FinishInterruption(m) => Input::FinishInterruption {
            partial_messages: msgs(m),
        },
        Spec::FinishTurn => Input::FinishTurn,
        Spec::FinishError(e) => Input::FinishError {
            last_error: e.as_ref().map(Json::value),
        },
        Spec::Cancel(reason) => Input::CancelRequiresAction {
            reason: reason.as_ref().map(Text::resolve),
        },
        Spec::Reconcile { error, reason } => Input::ReconcileInvalidState {
            last_error: error.as_ref().map(Json::value),
            cancellation_reason: reason.as_ref().map(Text::resolve),
        },
        Spec::Acquire(n) => Input::Acquire {
            owner: OWNERS[*n as usize % OWNERS.len()],
        },
        Spec::Abandon => Input::Abandon,
        Spec::Literal(input) => (**input).clone(),
    }
}

// ---------------------------------------------------------------------------
// The world
// ---------------------------------------------------------------------------

/// Several model chats, store time and the tunables.
#[derive(Clone, Debug)]
pub struct World {
    /// The chat id of every slot.
    pub ids: Vec<ChatId>,
    /// The chat in every slot (`None`: not created).
    pub chats: Vec<Option<Chat>>,
    /// Store time.
    pub now: Timestamp,
    /// Tunables.
    pub options: Options,
}

impl Default for World {
    fn default() -> Self {
        World::with_ids(default_ids())
    }
}

/// What the model says an operation does.
#[derive(Clone, Debug)]
pub enum Expect {
    /// CreateChat committed this chat and published these.
    Created {
        /// The chat.
        chat: Box<Chat>,
        /// `chat:update` and the hint.
        notes: Vec<Notification>,
    },
    /// CreateChat was rejected.
    CreateRejected(Rejection),
    /// The Update committed.
    Committed {
        /// The calls as the model resolved them.
        calls: Vec<Call>,
        /// One outcome per call.
        outcomes: Vec<Outcome>,
        /// Published after commit.
        notes: Vec<Notification>,
    },
    /// Call `index` of the Update was rejected; everything rolled back.
    Rejected {
        /// The calls resolved up to the rejected one.
        calls: Vec<Call>,
        /// Which call.
        index: usize,
        /// Why.
        rejection: Rejection,
    },
    /// The chat does not exist.
    ChatNotFound,
    /// Lock or ReadLock saw this snapshot.
    Locked(Box<Snapshot>),
    /// A heartbeat found this lease status.
    Heartbeat(LeaseStatus),
    /// Done, nothing to report (clock, raw write).
    Done,
}

impl Expect {
    /// The matrix triples of a committed Update or creation (ownership
    /// transitions excluded).
    pub fn triples(&self) -> Vec<Triple> {
        match self {
            Expect::Created { .. } => vec![(
                Transition::CreateChat,
                chatstate_model::ExecutionState::N,
                chatstate_model::ExecutionState::R0,
            )],
            Expect::Committed { outcomes, .. } => outcomes
                .iter()
                .filter(|o| !o.transition.is_ownership())
                .map(|o| (o.transition, o.from, o.to))
                .collect(),
            _ => Vec::new(),
        }
    }
}

impl World {
    /// An empty world over these chat ids, at [`TEST_EPOCH`], with
    /// [`options`].
    pub fn with_ids(ids: Vec<ChatId>) -> Self {
        World {
            chats: vec![None; ids.len()],
            ids,
            now: TEST_EPOCH,
            options: options(),
        }
    }

    /// The step environment at the world's time.
    pub fn env(&self) -> StepEnv<'_> {
        StepEnv::new(self.now, &self.options)
    }

    /// The index of a slot.
    pub fn index(&self, slot: u8) -> usize {
        slot as usize % self.ids.len()
    }

    /// The chat in a slot.
    pub fn chat(&self, slot: u8) -> Option<&Chat> {
        self.chats[self.index(slot)].as_ref()
    }

    /// The slot whose rows "foreign" references name.
    pub fn foreign_slot(&self, slot: u8) -> usize {
        (self.index(slot) + 1) % self.ids.len()
    }

    /// The chat CreateChat would create in a slot.
    pub fn new_chat(&self, slot: u8, msgs: &[Msg], dynamic: bool, config: bool) -> NewChat {
        let i = self.index(slot);
        let mut view = View::empty();
        NewChat {
            id: self.ids[i],
            owner_id: chat_owner(i),
            dynamic_tools: if dynamic {
                BTreeSet::from([DYNAMIC_TOOL.to_owned()])
            } else {
                BTreeSet::new()
            },
            last_model_config_id: config.then_some(CONFIGS[1]),
            messages: msgs
                .iter()
                .map(|m| {
                    let new = m.resolve(&view);
                    view.tools.observe(new.role, &new.content);
                    new
                })
                .collect(),
        }
    }

    /// Applies an operation to the model: the world afterwards and what the
    /// operation is expected to do.
    pub fn step(&self, op: &Op) -> (World, Expect) {
        let mut next = self.clone();
        let expect = match op {
            Op::Create {
                slot,
                msgs,
                dynamic,
                config,
            } => {
                let new = self.new_chat(*slot, msgs, *dynamic, *config);
                match Chat::create(&new) {
                    Err(r) => Expect::CreateRejected(r),
                    Ok(_) if self.chat(*slot).is_some() => Expect::CreateRejected(Rejection {
                        transition: Transition::CreateChat,
                        from: self.chat(*slot).expect("exists").state(),
                        kind: chatstate_model::RejectionKind::TransitionNotAllowed {
                            reason: Some(chatstate_model::reasons::CREATE_EXISTS),
                        },
                    }),
                    Ok(chat) => {
                        let notes = after_create(&chat.row);
                        next.chats[self.index(*slot)] = Some(chat.clone());
                        Expect::Created {
                            chat: Box::new(chat),
                            notes,
                        }
                    }
                }
            }
            Op::Update { slot, calls } => match self.chat(*slot) {
                None => Expect::ChatNotFound,
                Some(chat) => {
                    let env = self.env();
                    let resolved = resolve_model_calls(chat, calls, &env);
                    match update(Some(chat), &resolved, &env) {
                        Ok(done) => {
                            next.chats[self.index(*slot)] = Some(done.chat);
                            Expect::Committed {
                                calls: resolved,
                                outcomes: done.outcomes,
                                notes: done.notifications,
                            }
                        }
                        Err(r) => Expect::Rejected {
                            calls: resolved,
                            index: r.index,
                            rejection: r.rejection,
                        },
                    }
                }
            },
            Op::Lock { slot, .. } => match self.chat(*slot) {
                None => Expect::ChatNotFound,
                Some(chat) => Expect::Locked(Box::new(chat.snapshot(self.now, &self.options))),
            },
            Op::Heartbeat { slot, runner: r } => {
                let now = self.now;
                match next.chats[self.index(*slot)].as_mut() {
                    None => Expect::ChatNotFound,
                    // Written only while the runner holds the lease.
                    Some(chat) => match chat.row.owner {
                        Some(owner) if owner.runner_id == runner(*r) => {
                            chat.heartbeats.insert(runner(*r), now);
                            Expect::Heartbeat(LeaseStatus::Held)
                        }
                        owner => Expect::Heartbeat(LeaseStatus::Lost { owner }),
                    },
                }
            }
            Op::Advance { secs } => {
                next.now = self.now.plus(Duration::from_secs(u64::from(*secs)));
                Expect::Done
            }
            Op::Raw {
                slot,
                status,
                archived,
            } => match next.chats[self.index(*slot)].as_mut() {
                None => Expect::ChatNotFound,
                Some(chat) => {
                    chat.row.status = status.status();
                    chat.row.archived = *archived;
                    Expect::Done
                }
            },
        };
        (next, expect)
    }
}

/// Resolves an Update's calls on the model: each against the chat as the
/// calls before it left it (inside the Update, after the bump), stopping
/// after the first rejected one.
pub fn resolve_model_calls(chat: &Chat, calls: &[CallSpec], env: &StepEnv<'_>) -> Vec<Call> {
    let mut current = chat.clone();
    current.row.versions.snapshot += 1;
    let mut out = Vec::with_capacity(calls.len());
    for c in calls {
        let input = resolve(&c.spec, &View::of_chat(&current), &Foreign::MODEL);
        let fence = c.fence.map(runner);
        out.push(Call {
            input: input.clone(),
            fence,
        });
        match step(&current, &input, &StepEnv { fence, ..*env }) {
            Ok((next, _)) => current = next,
            Err(_) => break,
        }
    }
    out
}

//! `chatstate replay`: runs a trace (see `docs/traces.md`) on the model, the
//! in-memory store or Postgres and prints one JSON line per step; with
//! `--compare`, runs it on all three and stops at the first step where they
//! differ.
//!
//! Every backend produces the same [`Record`] per step: the printed
//! [`Line`] (state, versions, lengths, published channels, the result or
//! the error), and a detail that is compared but only printed on a
//! divergence (the whole row, queue and history, and the notification
//! payloads). Store-assigned row ids never appear in either: results count
//! rows instead, so the three backends are comparable byte for byte.
//!
//! Chats are independent, so the store backends run the steps of different
//! chats concurrently, each chat's steps in order; an `advance_clock` step
//! is a barrier, since it moves time for every chat.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use chatstate::{
    ChatMachine, ChatRecord, Error, LockMode, Notify, RecordingPublisher, Store, TestControl,
    create_chat,
};
use chatstate_model::{
    Call, Chat, ChatRow, ExecutionState, Message, MessageId, Notification, Outcome, QueuedMessage,
    Rejection, RejectionKind, StepEnv, Timestamp, content_to_value, reasons, step, update,
};
use chatstate_store_mem::{MemClock, MemStore};
use serde::Serialize;
use serde_json::{Value, json};

use crate::trace::{CallSpec, Compiled, Names, Op};

/// Arguments of `chatstate replay`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The trace file (JSON).
    trace: PathBuf,
    /// The backend to run on.
    #[arg(long, value_enum, default_value_t = Backend::Model)]
    store: Backend,
    /// Run on the model, the in-memory store and Postgres, and fail on the
    /// first step where they differ (printing both sides).
    #[arg(long)]
    compare: bool,
    /// Postgres URL [default: DATABASE_URL, else a throwaway cluster].
    #[arg(long)]
    database_url: Option<String>,
    /// Chats replayed at once on a store.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    parallel: u16,
    /// Add each chat's full row, queue, history and notification payloads
    /// to every line.
    #[arg(long)]
    detail: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Backend {
    /// The pure model (`chatstate_model::update`).
    Model,
    /// The in-memory store, on a manual clock.
    Mem,
    /// PostgreSQL.
    Pg,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Model => "model",
            Backend::Mem => "mem",
            Backend::Pg => "pg",
        }
    }
}

/// Store time at the start of a replay on the model and the in-memory
/// store (2026-01-01T00:00:00Z). Postgres runs on its own clock; no output
/// shows a timestamp, so the two never need to agree.
const EPOCH: Timestamp = Timestamp(1_767_225_600_000_000);

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let trace = crate::trace::load(&args.trace)?;
    // Options out of bounds are refused before any store is touched.
    trace.options.options()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let parallel = usize::from(args.parallel);
    runtime.block_on(async {
        if args.compare {
            return compare(&trace, args, parallel).await;
        }
        let started = Instant::now();
        let (records, description) = match args.store {
            Backend::Model => {
                let c = crate::trace::compile(&trace, Names::default())?;
                (run_model(&c), "the model".to_owned())
            }
            Backend::Mem => {
                let c = Arc::new(crate::trace::compile(&trace, Names::default())?);
                (
                    run_store(mem_store(), c, parallel).await?,
                    "the in-memory store".to_owned(),
                )
            }
            Backend::Pg => {
                let target = crate::pg::connect(args.database_url.as_deref()).await?;
                let c = Arc::new(crate::trace::compile(&trace, pg_names(target.external))?);
                (
                    run_store(target.store, c, parallel).await?,
                    target.description,
                )
            }
        };
        let mut out = io::stdout().lock();
        let mut infra = 0;
        for r in &records {
            infra += usize::from(r.line.error.as_ref().is_some_and(|e| e.kind == "Store"));
            print_record(&mut out, r, args.detail)?;
        }
        out.flush()?;
        eprintln!(
            "replayed {} steps on {description} in {:.2} s",
            records.len(),
            started.elapsed().as_secs_f64()
        );
        if infra > 0 {
            eprintln!("{infra} step(s) failed in the store itself (kind Store)");
            return Ok(ExitCode::FAILURE);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Names for a Postgres replay: on a database the user named, chat ids get
/// a fresh namespace so that replaying twice does not collide.
fn pg_names(external: bool) -> Names {
    if external {
        Names::with_chat_namespace(&uuid::Uuid::new_v4().to_string())
    } else {
        Names::default()
    }
}

fn mem_store() -> MemStore {
    MemStore::with_clock(MemClock::manual(EPOCH))
}

async fn compare(
    trace: &crate::trace::Trace,
    args: &Args,
    parallel: usize,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let target = crate::pg::connect(args.database_url.as_deref()).await?;
    // One set of names for all three, so payloads compare byte for byte.
    let c = Arc::new(crate::trace::compile(trace, pg_names(target.external))?);
    let runs = [
        (Backend::Model, run_model(&c)),
        (
            Backend::Mem,
            run_store(mem_store(), c.clone(), parallel).await?,
        ),
        (
            Backend::Pg,
            run_store(target.store, c.clone(), parallel).await?,
        ),
    ];
    let mut out = io::stdout().lock();
    let (_, reference) = &runs[0];
    for (i, r) in reference.iter().enumerate() {
        if runs[1..].iter().all(|(_, rs)| rs[i] == *r) {
            print_record(&mut out, r, args.detail)?;
            continue;
        }
        out.flush()?;
        let mut err = io::stderr().lock();
        writeln!(err, "divergence at step {i}:")?;
        for (backend, rs) in &runs {
            writeln!(
                err,
                "  {:<5} {}",
                backend.name(),
                serde_json::to_string(&rs[i].line)?
            )?;
        }
        for (backend, rs) in &runs {
            writeln!(err, "  {:<5} detail {}", backend.name(), rs[i].detail)?;
        }
        return Ok(ExitCode::FAILURE);
    }
    out.flush()?;
    eprintln!(
        "{} steps agree on the model, the in-memory store and Postgres ({:.2} s)",
        reference.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn print_record(out: &mut impl Write, r: &Record, detail: bool) -> anyhow::Result<()> {
    /// A line with its detail appended (keys in the line's order).
    #[derive(Serialize)]
    struct WithDetail<'a> {
        #[serde(flatten)]
        line: &'a Line,
        detail: &'a Value,
    }
    let text = if detail {
        serde_json::to_string(&WithDetail {
            line: &r.line,
            detail: &r.detail,
        })?
    } else {
        serde_json::to_string(&r.line)?
    };
    writeln!(out, "{text}")?;
    Ok(())
}

// ---------------------------------------------------------------------------
// What a step leaves behind

/// One step's result on one backend.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Record {
    pub(crate) line: Line,
    /// Everything about the chat afterwards, compared but not printed.
    pub(crate) detail: Value,
}

/// The printed line of a step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Line {
    pub(crate) step: usize,
    pub(crate) op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) chat: Option<String>,
    pub(crate) ok: bool,
    /// The chat's state after the step (`N`: it does not exist).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) state: Option<&'static str>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub(crate) view: Option<RowView>,
    /// Channels published by the step, in order, without the chat id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) published: Option<Vec<&'static str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) result: Option<StepResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<ErrorView>,
}

/// The chat's counters after a step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct RowView {
    owned: bool,
    lease_fresh: bool,
    snapshot_version: i64,
    history_version: i64,
    queue_version: i64,
    generation_attempt: i64,
    retry_state_version: i64,
    queue_len: usize,
    history_len: usize,
}

/// A failed step.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(crate) struct ErrorView {
    /// `TransitionNotAllowed`, `ChatNotFound`, ..., or `Store`.
    pub(crate) kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    transition: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    /// Index of the failing transition within the Update.
    #[serde(skip_serializing_if = "Option::is_none")]
    call: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max: Option<u32>,
    /// LeaseLost: the runner the caller held and the chat's runner.
    #[serde(skip_serializing_if = "Option::is_none")]
    expected: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    actual: Option<String>,
    /// Store failures: the error chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

impl ErrorView {
    fn chat_not_found() -> Self {
        ErrorView {
            kind: "ChatNotFound".to_owned(),
            ..ErrorView::default()
        }
    }

    fn rejection(r: &Rejection, call: Option<usize>, names: &Names) -> Self {
        if r.kind == RejectionKind::ChatNotFound {
            return Self::chat_not_found();
        }
        let mut v = ErrorView {
            kind: r.kind.name().to_owned(),
            transition: Some(r.transition.as_str()),
            from: Some(r.from.as_str()),
            reason: r.kind.reason(),
            call,
            ..ErrorView::default()
        };
        match &r.kind {
            RejectionKind::ToolResultDuplicate { tool_call_id }
            | RejectionKind::ToolResultInvalidJson { tool_call_id }
            | RejectionKind::ToolResultMissing { tool_call_id }
            | RejectionKind::ToolResultUnexpected { tool_call_id } => {
                v.tool_call_id = Some(tool_call_id.clone());
            }
            RejectionKind::MessageQueueFull { max } => v.max = Some(*max),
            RejectionKind::LeaseLost { expected, actual } => {
                v.expected = Some(names.name(expected.0));
                v.actual = actual.map(|a| names.name(a.0));
            }
            _ => {}
        }
        v
    }

    fn error(e: &Error, call: Option<usize>, names: &Names) -> Self {
        match e {
            Error::Rejected(r) => Self::rejection(r, call, names),
            Error::ChatNotFound(_) => Self::chat_not_found(),
            Error::Store(_) => ErrorView {
                kind: "Store".to_owned(),
                message: Some(crate::error_chain(e)),
                ..ErrorView::default()
            },
            other => ErrorView {
                kind: other.kind_name().to_owned(),
                message: Some(crate::error_chain(other)),
                ..ErrorView::default()
            },
        }
    }
}

/// A chat as any backend sees it after a step.
struct Seen<'a> {
    row: &'a ChatRow,
    queue: &'a [QueuedMessage],
    history: &'a [Message],
    lease_fresh: bool,
}

impl Seen<'_> {
    fn state(&self) -> ExecutionState {
        self.row.classify(!self.queue.is_empty())
    }

    fn view(&self) -> RowView {
        let v = &self.row.versions;
        RowView {
            owned: self.row.owner.is_some(),
            lease_fresh: self.lease_fresh,
            snapshot_version: v.snapshot,
            history_version: v.history,
            queue_version: v.queue,
            generation_attempt: self.row.generation_attempt,
            retry_state_version: v.retry_state,
            queue_len: self.queue.len(),
            history_len: self.history.iter().filter(|m| !m.deleted).count(),
        }
    }

    /// Everything but row ids and timestamps (timestamps only by presence:
    /// Postgres keeps its own clock).
    fn detail(&self, names: &Names) -> Value {
        let r = self.row;
        let user = |u: Option<uuid::Uuid>| u.map(|u| names.name(u));
        json!({
            "row": {
                "status": r.status.as_str(),
                "archived": r.archived,
                "owner": r.owner.map(|o| json!({
                    "worker": names.name(o.worker_id.0),
                    "runner": names.name(o.runner_id.0),
                })),
                "last_error": r.last_error.as_ref().map(|j| j.to_value()),
                "retry_state": r.retry_state.as_ref().map(|j| j.to_value()),
                "generation_attempt": r.generation_attempt,
                "requires_action_deadline": r.requires_action_deadline_at.is_some(),
                "compaction_requested": r.compaction_requested_at.is_some(),
                "versions": r.versions,
                "dynamic_tools": r.dynamic_tools,
                "owner_id": names.name(r.owner_id),
                "last_model_config": user(r.last_model_config_id),
            },
            "queue": self.queue.iter().map(|q| json!({
                "content": content_to_value(&q.content),
                "model_config": user(q.model_config_id),
                "created_by": names.name(q.created_by),
            })).collect::<Vec<_>>(),
            "history": self.history.iter().map(|m| json!({
                "role": m.role.as_str(),
                "content": content_to_value(&m.content),
                "visibility": m.visibility.as_str(),
                "model_config": user(m.model_config_id),
                "created_by": user(m.created_by),
                "promoted": m.queued_message_id.is_some(),
                "deleted": m.deleted,
                "revision": m.revision,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Builds a chat step's record.
struct Finish<'a> {
    step: usize,
    op: &'static str,
    chat: &'a str,
    names: &'a Names,
}

impl Finish<'_> {
    fn record(
        &self,
        seen: Option<Seen<'_>>,
        published: &[Notification],
        outcome: Result<Option<StepResult>, ErrorView>,
    ) -> Record {
        let (ok, result, error) = match outcome {
            Ok(result) => (true, result, None),
            Err(e) => (false, None, Some(e)),
        };
        let mut detail = match &seen {
            Some(s) => s.detail(self.names),
            None => json!({"exists": false}),
        };
        detail["notifications"] = published
            .iter()
            .map(|n| {
                json!({
                    "channel": n.channel(),
                    "payload": serde_json::from_slice::<Value>(&n.payload())
                        .expect("notification payloads are JSON"),
                })
            })
            .collect();
        Record {
            line: Line {
                step: self.step,
                op: self.op,
                chat: Some(self.chat.to_owned()),
                ok,
                state: Some(
                    seen.as_ref()
                        .map_or(ExecutionState::N, Seen::state)
                        .as_str(),
                ),
                view: seen.as_ref().map(Seen::view),
                published: Some(published.iter().map(short_channel).collect()),
                result,
                error,
            },
            detail,
        }
    }
}

fn short_channel(n: &Notification) -> &'static str {
    match n {
        Notification::Update { .. } => "chat:update",
        Notification::Ownership(_) => "chat:ownership",
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Create { .. } => "create_chat",
        Op::Update { .. } => "update",
        Op::Heartbeat { .. } => "heartbeat",
        Op::Advance(_) => "advance_clock",
        Op::SetRaw { .. } => "set_raw_status",
        Op::Lock {
            mode: LockMode::Exclusive,
            ..
        } => "lock",
        Op::Lock { .. } => "read_lock",
    }
}

fn advance_record(step: usize, d: std::time::Duration, error: Option<ErrorView>) -> Record {
    Record {
        line: Line {
            step,
            op: "advance_clock",
            chat: None,
            ok: error.is_none(),
            state: None,
            view: None,
            published: None,
            result: error.is_none().then_some(StepResult::Advance {
                seconds: d.as_secs_f64(),
            }),
            error,
        },
        detail: Value::Null,
    }
}

/// An Update's result: one object per transition, with row ids replaced by
/// counts.
fn outcomes_value(outcomes: &[Outcome]) -> StepResult {
    StepResult::Update {
        transitions: outcomes.iter().map(OutcomeView::new).collect(),
    }
}

/// What a successful step returns.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub(crate) enum StepResult {
    /// An Update: one entry per transition.
    Update { transitions: Vec<OutcomeView> },
    /// CreateChat: the number of initial messages.
    Create { messages: usize },
    /// advance_clock.
    Advance { seconds: f64 },
}

/// One transition's outcome without row ids.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct OutcomeView {
    transition: &'static str,
    from: &'static str,
    to: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    inserted: usize,
    #[serde(skip_serializing_if = "is_zero")]
    cancellations: usize,
    #[serde(skip_serializing_if = "is_false")]
    queued: bool,
    #[serde(skip_serializing_if = "is_false")]
    promoted: bool,
    #[serde(skip_serializing_if = "is_zero")]
    deleted_messages: usize,
    #[serde(skip_serializing_if = "is_zero")]
    deleted_queued: usize,
    #[serde(skip_serializing_if = "is_false")]
    moved_to_head: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation_attempt: Option<i64>,
    #[serde(skip_serializing_if = "is_false")]
    requires_action_deadline: bool,
}

impl OutcomeView {
    fn new(o: &Outcome) -> Self {
        OutcomeView {
            transition: o.transition.as_str(),
            from: o.from.as_str(),
            to: o.to.as_str(),
            inserted: o.inserted.len(),
            cancellations: o.cancellations,
            queued: o.queued.is_some(),
            promoted: o.promoted.is_some(),
            deleted_messages: o.deleted_messages.len(),
            deleted_queued: o.deleted_queued.len(),
            moved_to_head: o.moved_to_head,
            generation_attempt: o.generation_attempt,
            requires_action_deadline: o.requires_action_deadline.is_some(),
        }
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

// ---------------------------------------------------------------------------
// The model

/// Replays a trace through the model's reference `update`.
pub(crate) fn run_model(c: &Compiled) -> Vec<Record> {
    let mut world = ModelWorld::new(c.options);
    c.ops
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let chat = op.chat().map_or("", |slot| c.chats[slot].1.as_str());
            world.apply(i, op, chat, &c.names)
        })
        .collect()
}

/// The chats of a trace as the model sees them, and store time.
pub(crate) struct ModelWorld {
    /// Existing chats by index.
    pub(crate) chats: BTreeMap<usize, Chat>,
    pub(crate) now: Timestamp,
    pub(crate) options: chatstate_model::Options,
}

impl ModelWorld {
    pub(crate) fn new(options: chatstate_model::Options) -> Self {
        ModelWorld {
            chats: BTreeMap::new(),
            now: EPOCH,
            options,
        }
    }

    /// Runs step `i` (`chat` is its chat's name).
    pub(crate) fn apply(&mut self, i: usize, op: &Op, chat: &str, names: &Names) -> Record {
        let Some(slot) = op.chat() else {
            let Op::Advance(d) = op else {
                unreachable!("only advance_clock has no chat")
            };
            self.now = self.now.plus(*d);
            return advance_record(i, *d, None);
        };
        let finish = Finish {
            step: i,
            op: op_name(op),
            chat,
            names,
        };
        let options = self.options;
        let env = StepEnv::new(self.now, &options);
        let chats = &mut self.chats;
        let (published, outcome) = match op {
            Op::Create { create, .. } => match chats.get(&slot) {
                Some(existing) => (
                    Vec::new(),
                    Err(ErrorView::rejection(
                        &Rejection {
                            transition: chatstate_model::Transition::CreateChat,
                            from: existing.state(),
                            kind: RejectionKind::TransitionNotAllowed {
                                reason: Some(reasons::CREATE_EXISTS),
                            },
                        },
                        None,
                        names,
                    )),
                ),
                None => match Chat::create(&Compiled::new_chat(create)) {
                    Ok(chat) => {
                        let notes = chatstate_model::after_create(&chat.row);
                        let n = chat.history.len();
                        chats.insert(slot, chat);
                        (notes, Ok(Some(StepResult::Create { messages: n })))
                    }
                    Err(r) => (Vec::new(), Err(ErrorView::rejection(&r, None, names))),
                },
            },
            Op::Update { calls, .. } => match model_update(chats.get(&slot), calls, &env) {
                Ok(done) => {
                    let result = outcomes_value(&done.outcomes);
                    chats.insert(slot, done.chat);
                    (done.notifications, Ok(Some(result)))
                }
                Err(e) => (
                    Vec::new(),
                    Err(ErrorView::rejection(&e.rejection, Some(e.index), names)),
                ),
            },
            Op::Heartbeat { runner, .. } => match chats.get_mut(&slot) {
                Some(chat) => {
                    chat.heartbeats.insert(*runner, self.now);
                    (Vec::new(), Ok(None))
                }
                None => (Vec::new(), Err(ErrorView::chat_not_found())),
            },
            Op::SetRaw {
                status, archived, ..
            } => match chats.get_mut(&slot) {
                Some(chat) => {
                    chat.row.status = status.clone();
                    chat.row.archived = archived.unwrap_or(chat.row.archived);
                    (Vec::new(), Ok(None))
                }
                None => (Vec::new(), Err(ErrorView::chat_not_found())),
            },
            Op::Lock { .. } => match chats.get(&slot) {
                Some(_) => (Vec::new(), Ok(None)),
                None => (Vec::new(), Err(ErrorView::chat_not_found())),
            },
            Op::Advance(_) => unreachable!("handled above"),
        };
        let seen = chats.get(&slot).map(|chat| Seen {
            row: &chat.row,
            queue: &chat.queue,
            history: &chat.history,
            lease_fresh: chat.lease_fresh(self.now, &options),
        });
        finish.record(seen, &published, outcome)
    }
}

/// The model's Update of trace calls: positions are resolved against the
/// chat as the earlier calls of the same Update leave it, then the
/// reference [`update`] decides the whole bundle.
fn model_update(
    chat: Option<&Chat>,
    calls: &[CallSpec],
    env: &StepEnv<'_>,
) -> Result<chatstate_model::Committed, chatstate_model::UpdateRejected> {
    let Some(chat) = chat else {
        let resolved: Vec<Call> = calls
            .iter()
            .map(|c| Call {
                input: c.input.resolve(&[], &[]),
                fence: c.fence,
            })
            .collect();
        return update(None, &resolved, env);
    };
    let mut current = chat.clone();
    let mut resolved = Vec::with_capacity(calls.len());
    for call in calls {
        let queue: Vec<_> = current.queue.iter().map(|q| q.id).collect();
        let history: Vec<MessageId> = if call.input.needs_history() {
            current.active_history().map(|m| m.id).collect()
        } else {
            Vec::new()
        };
        let input = call.input.resolve(&queue, &history);
        let env = StepEnv {
            fence: call.fence,
            ..*env
        };
        let next = step(&current, &input, &env);
        resolved.push(Call {
            input,
            fence: call.fence,
        });
        match next {
            Ok((next, _)) => current = next,
            // `update` fails on this call too and ignores the rest.
            Err(_) => break,
        }
    }
    update(Some(chat), &resolved, env)
}

// ---------------------------------------------------------------------------
// The stores

/// Replays a trace on a store through `ChatMachine`.
pub(crate) async fn run_store<S: Store + TestControl>(
    store: S,
    c: Arc<Compiled>,
    parallel: usize,
) -> anyhow::Result<Vec<Record>> {
    let mut drivers: Vec<Option<Driver<S>>> = (0..c.chats.len())
        .map(|slot| Some(Driver::new(store.clone(), &c, slot)))
        .collect();
    let mut out: Vec<Option<Record>> = vec![None; c.ops.len()];
    let permits = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut i = 0;
    while i < c.ops.len() {
        if let Op::Advance(d) = c.ops[i] {
            let error = store
                .advance_clock(d)
                .await
                .err()
                .map(|e| ErrorView::error(&Error::Store(e), None, &c.names));
            out[i] = Some(advance_record(i, d, error));
            i += 1;
            continue;
        }
        let end = (i..c.ops.len())
            .find(|&j| matches!(c.ops[j], Op::Advance(_)))
            .unwrap_or(c.ops.len());
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for j in i..end {
            let slot = c.ops[j].chat().expect("only advance_clock has no chat");
            groups.entry(slot).or_default().push(j);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (slot, steps) in groups {
            let driver = drivers[slot].take().expect("one task per chat");
            let c = c.clone();
            let permit = permits.clone().acquire_owned().await?;
            tasks.spawn(async move {
                let mut records = Vec::with_capacity(steps.len());
                for j in steps {
                    records.push((j, driver.exec(j, &c).await));
                }
                drop(permit);
                (slot, driver, records)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let (slot, driver, records) = joined.context("a replay task panicked")?;
            drivers[slot] = Some(driver);
            for (j, r) in records {
                out[j] = Some(r);
            }
        }
        i = end;
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every step ran"))
        .collect())
}

/// One chat of a store replay: its machine and what it published.
struct Driver<S: Store> {
    store: S,
    machine: ChatMachine<S>,
    recorder: Arc<RecordingPublisher>,
    slot: usize,
}

impl<S: Store + TestControl> Driver<S> {
    fn new(store: S, c: &Compiled, slot: usize) -> Self {
        let recorder = Arc::new(RecordingPublisher::new());
        Driver {
            machine: ChatMachine::new(
                store.clone(),
                Notify::AfterCommit(recorder.clone()),
                c.chats[slot].0,
                c.options,
            ),
            store,
            recorder,
            slot,
        }
    }

    /// What the step published (and forgets it).
    fn published(&self) -> Vec<Notification> {
        let n = self.recorder.notifications();
        self.recorder.clear();
        n
    }

    /// Reads the chat under a shared lock: the record and lease freshness.
    async fn observe(&self) -> Result<Option<(ChatRecord, bool)>, Error> {
        let read = self
            .machine
            .read_lock(async |r| {
                let fresh = r.snapshot().lease_fresh;
                Ok((r.load().await?, fresh))
            })
            .await;
        match read {
            Ok(seen) => Ok(Some(seen)),
            Err(Error::ChatNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn exec(&self, i: usize, c: &Compiled) -> Record {
        let op = &c.ops[i];
        let finish = Finish {
            step: i,
            op: op_name(op),
            chat: &c.chats[self.slot].1,
            names: &c.names,
        };
        let names = &c.names;
        // Either the step read the chat itself (inside its transaction) or
        // it is read afterwards.
        let mut seen: Option<(ChatRecord, bool)> = None;
        let outcome: Result<Option<StepResult>, ErrorView> = match op {
            Op::Create { create, .. } => create_chat(
                &self.store,
                &Notify::AfterCommit(self.recorder.clone()),
                create.clone(),
            )
            .await
            .map(|created| {
                Some(StepResult::Create {
                    messages: created.messages.len(),
                })
            })
            .map_err(|e| ErrorView::error(&e, None, names)),
            Op::Update { calls, .. } => {
                let mut failed = None;
                let done = self
                    .machine
                    .update(async |tx| {
                        let mut outcomes = Vec::with_capacity(calls.len());
                        for (j, call) in calls.iter().enumerate() {
                            failed = Some(j);
                            let history: Vec<MessageId> = if call.input.needs_history() {
                                tx.load().await?.active_history().map(|m| m.id).collect()
                            } else {
                                Vec::new()
                            };
                            let input = call.input.resolve(&tx.snapshot().queue, &history);
                            let outcome = match call.fence {
                                Some(runner) => tx.fenced(runner).apply_input(input).await?,
                                None => tx.apply(input).await?,
                            };
                            outcomes.push(outcome);
                        }
                        failed = None;
                        let fresh = tx.snapshot().lease_fresh;
                        Ok((outcomes, tx.load().await?, fresh))
                    })
                    .await;
                match done {
                    Ok((outcomes, record, fresh)) => {
                        seen = Some((record, fresh));
                        Ok(Some(outcomes_value(&outcomes)))
                    }
                    Err(e) => Err(ErrorView::error(&e, failed, names)),
                }
            }
            Op::Heartbeat { runner, .. } => self
                .machine
                .heartbeat(*runner)
                .await
                .and_then(|status| match status {
                    // Traces record a heartbeat of a missing chat as
                    // ChatNotFound, whatever the lease status says.
                    chatstate::LeaseStatus::ChatGone => {
                        Err(Error::ChatNotFound(self.machine.chat_id()))
                    }
                    _ => Ok(None),
                })
                .map_err(|e| ErrorView::error(&e, None, names)),
            Op::SetRaw {
                status, archived, ..
            } => match self.observe().await {
                Ok(Some((record, _))) => self
                    .store
                    .set_raw_state(
                        self.machine.chat_id(),
                        status,
                        archived.unwrap_or(record.row.archived),
                    )
                    .await
                    .map(|()| None)
                    .map_err(|e| ErrorView::error(&Error::Store(e), None, names)),
                Ok(None) => Err(ErrorView::chat_not_found()),
                Err(e) => Err(ErrorView::error(&e, None, names)),
            },
            Op::Lock { mode, .. } => match mode {
                LockMode::Exclusive => self.machine.lock(async |_| Ok(())).await,
                LockMode::Shared => self.machine.read_lock(async |_| Ok(())).await,
            }
            .map(|()| None)
            .map_err(|e| ErrorView::error(&e, None, names)),
            Op::Advance(_) => unreachable!("advance_clock runs outside chat tasks"),
        };
        let published = self.published();
        if seen.is_none() {
            match self.observe().await {
                Ok(s) => seen = s,
                Err(e) => {
                    let err = ErrorView::error(&e, None, names);
                    return finish.record(None, &published, Err(err));
                }
            }
        }
        let seen = seen.as_ref().map(|(record, fresh)| Seen {
            row: &record.row,
            queue: &record.queue,
            history: &record.history,
            lease_fresh: *fresh,
        });
        finish.record(seen, &published, outcome)
    }
}

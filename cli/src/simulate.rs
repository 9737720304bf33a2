//! `chatstate simulate`: a chat server's workload on one store, with every
//! committed Update re-checked against the model afterwards.
//!
//! Users create chats and act on them: send (directly, queued or
//! interrupting), edit, archive, delete and promote queued messages, answer
//! client tool calls, interrupt, ask for compaction. Workers learn about
//! chats that need an owner from `chat:ownership` hints (and from a sweeper
//! that finds lapsed leases, as a server's periodic scan would), acquire
//! them, heartbeat, and run turns through fenced worker transitions: commit
//! steps, call tools, wait for client results, finish turns and errors. A
//! worker may crash, inside an Update or between two: its transaction rolls
//! back, its leases lapse, and another worker takes its chats over.
//!
//! Every task draws its choices from its own RNG seeded from `--seed`, so
//! the choices are reproducible; the interleaving is not (it is real
//! concurrency). The committed history is checked by the model's oracle,
//! [`chatstate_model::oracle`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chatstate::{
    BusyBehavior, ChatId, ChatMachine, CommitState, CreateChat, Error, ExecutionState, Input,
    JsonText, MessageId, NewMessage, Notify, Options, Outcome, Owner, Part, PublishError,
    Publisher, Rejection, Role, RunnerId, Snapshot, Store, ToolResultInput, Transition, Tx,
    WorkerId, create_chat,
};
use chatstate_model::oracle::{
    self, CommittedUpdate, Config, CreatedChat, Published, StoredChat, Verdict,
};
use chatstate_model::{Call, NewChat, Notification};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::broadcast;

/// Arguments of `chatstate simulate`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    /// The store to run on.
    #[arg(long, value_enum, default_value_t = StoreKind::Mem)]
    pub(crate) store: StoreKind,
    /// Chats the users create.
    #[arg(long, default_value_t = 50)]
    pub(crate) chats: usize,
    /// Users (each creates and drives its own chats).
    #[arg(long, default_value_t = 8)]
    pub(crate) users: usize,
    /// Workers (each runs several chats at once).
    #[arg(long, default_value_t = 4)]
    pub(crate) workers: usize,
    /// Run for this many seconds [default: 10 unless --ops is given].
    #[arg(long)]
    pub(crate) duration: Option<f64>,
    /// Stop after this many Update attempts.
    #[arg(long, conflicts_with = "duration")]
    pub(crate) ops: Option<u64>,
    /// Seed of every choice [default: random, printed].
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Chance that a worker crashes at a step (and half that, that it
    /// stalls for longer than the heartbeat staleness).
    #[arg(long, default_value_t = 0.002)]
    pub(crate) crash_rate: f64,
    /// Postgres URL [default: DATABASE_URL, else a throwaway cluster].
    #[arg(long)]
    pub(crate) database_url: Option<String>,
    /// Heartbeat staleness in milliseconds (short, so that takeovers happen
    /// within a run).
    #[arg(long, default_value_t = 1000)]
    pub(crate) heartbeat_stale_ms: u64,
    /// Mean pause of a user between two actions, in milliseconds.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) think_ms: f64,
    /// Mean time a worker spends between two steps of a turn, in
    /// milliseconds.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) step_ms: f64,
    /// Chats a worker runs at once.
    #[arg(long, default_value_t = 16)]
    pub(crate) worker_capacity: usize,
}

impl Default for Args {
    /// The command line's defaults.
    fn default() -> Self {
        use clap::FromArgMatches as _;
        let matches = <Args as clap::Args>::augment_args(clap::Command::new("simulate"))
            .get_matches_from(["simulate"]);
        Args::from_arg_matches(&matches).expect("the defaults parse")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StoreKind {
    /// The in-memory store.
    Mem,
    /// PostgreSQL.
    Pg,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let summary = runtime.block_on(simulate(args))?;
    print!("{}", summary.render());
    Ok(if summary.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs the workload on the chosen store and checks it.
pub(crate) async fn simulate(args: &Args) -> anyhow::Result<Summary> {
    // Without chats or users nothing happens, and `--ops` would never be
    // reached.
    anyhow::ensure!(args.chats > 0, "--chats must be at least 1");
    anyhow::ensure!(args.users > 0, "--users must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.crash_rate),
        "--crash-rate is a probability (0 to 1)"
    );
    let seed = args.seed.unwrap_or_else(rand::random);
    let stop = match (args.duration, args.ops) {
        (_, Some(ops)) => Stop::Ops(ops),
        (Some(secs), None) => Stop::Time(Duration::from_secs_f64(secs)),
        (None, None) => Stop::Time(Duration::from_secs(10)),
    };
    let (summary, store) = match args.store {
        StoreKind::Mem => (
            run_on(chatstate_store_mem::MemStore::new(), args, seed, stop).await?,
            "mem".to_owned(),
        ),
        StoreKind::Pg => {
            let target = crate::pg::connect(args.database_url.as_deref()).await?;
            (
                run_on(target.store, args, seed, stop).await?,
                format!("pg ({})", target.description),
            )
        }
    };
    Ok(Summary { store, ..summary })
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    Time(Duration),
    Ops(u64),
}

// ---------------------------------------------------------------------------
// Shared state

/// Publishes after commit: remembers every notification, as sent, by
/// (chat, snapshot) for the oracle and forwards ownership hints to the
/// workers.
struct SimPublisher {
    seen: Mutex<HashMap<(ChatId, i64), Vec<Published>>>,
    hints: AtomicU64,
    hint_tx: broadcast::Sender<ChatId>,
}

impl Publisher for SimPublisher {
    fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), PublishError> {
        let n = Notification::parse(channel, payload).map_err(|e| PublishError {
            channel: channel.to_owned(),
            source: Box::new(e),
        })?;
        if let Notification::Ownership(hint) = &n {
            self.hints.fetch_add(1, Ordering::Relaxed);
            // No worker listening (yet) is fine: hints are hints.
            let _ = self.hint_tx.send(hint.chat_id);
        }
        self.seen
            .lock()
            .expect("publisher lock")
            .entry((n.chat_id(), n.snapshot_version()))
            .or_default()
            .push(Published {
                channel: channel.to_owned(),
                payload: payload.to_vec(),
            });
        Ok(())
    }
}

struct Shared<S: Store> {
    store: S,
    notify: Notify,
    publisher: Arc<SimPublisher>,
    options: Options,
    args: Args,
    stop: Stop,
    stopped: AtomicBool,
    /// Wakes sleepers when the run stops.
    stop_signal: tokio::sync::watch::Sender<bool>,
    started: Instant,
    /// When the run stopped (the end of the measured time).
    stopped_at: Mutex<Option<Instant>>,
    /// Chats created so far (reserved before creating).
    reserved: AtomicUsize,
    /// Every created chat (the sweeper's list).
    registry: Mutex<Vec<ChatId>>,
    attempts: AtomicU64,
    committed: AtomicU64,
}

impl<S: Store> Shared<S> {
    fn machine(&self, chat: ChatId) -> ChatMachine<S> {
        ChatMachine::new(self.store.clone(), self.notify.clone(), chat, self.options)
    }

    fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    fn halt(&self) {
        if !self.stopped.swap(true, Ordering::Relaxed) {
            *self.stopped_at.lock().expect("stop time") = Some(Instant::now());
            self.stop_signal.send_replace(true);
        }
    }

    /// Sleeps, waking early when the run stops.
    async fn sleep(&self, d: Duration) {
        if d.is_zero() {
            tokio::task::yield_now().await;
            return;
        }
        let mut stop = self.stop_signal.subscribe();
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            _ = stop.wait_for(|stopped| *stopped) => {}
        }
    }

    /// Counts an Update attempt and stops the run when `--ops` is reached.
    fn count_attempt(&self) {
        let n = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        if let Stop::Ops(max) = self.stop
            && n >= max
        {
            self.halt();
        }
    }

    fn pause(&self, rng: &mut StdRng, mean_ms: f64) -> Duration {
        if mean_ms <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(rng.random_range(0.0..2.0 * mean_ms) / 1000.0)
    }
}

/// Why a callback ended without committing, on purpose.
#[derive(Debug, thiserror::Error)]
enum Signal {
    /// Nothing to do in this state: roll back (no bump).
    #[error("nothing to do")]
    Idle,
    /// The worker crashes in the middle of its transaction.
    #[error("worker crashed")]
    Crash,
}

fn signal(e: &Error) -> Option<&Signal> {
    match e {
        Error::Callback(inner) => inner.downcast_ref::<Signal>(),
        _ => None,
    }
}

/// What one task saw; merged at the end.
#[derive(Default)]
struct Stats {
    latencies_us: Vec<u32>,
    /// (transition, outcome) -> count; outcome is "ok", "rolled back" or
    /// a rejection kind.
    calls: BTreeMap<(Transition, &'static str), u64>,
    committed: Vec<CommittedUpdate>,
    /// Updates whose commit outcome was unknown.
    maybe_committed: Vec<CommittedUpdate>,
    created: Vec<CreatedChat>,
    acquisitions: u64,
    takeovers: u64,
    lease_lost: u64,
    crashes: u64,
    stalls: u64,
    heartbeats: u64,
    stale_found: u64,
    /// The first few store failures, and how many there were.
    store_errors: Vec<String>,
    store_failures: u64,
    /// Chats whose final read failed in the store (left out of the check).
    unread_chats: u64,
}

impl Stats {
    fn store_failure(&mut self, e: &Error) {
        self.store_failures += 1;
        if self.store_errors.len() < 5 {
            self.store_errors.push(crate::error_chain(e));
        }
    }

    fn merge(&mut self, o: Stats) {
        self.latencies_us.extend(o.latencies_us);
        for (k, v) in o.calls {
            *self.calls.entry(k).or_default() += v;
        }
        self.committed.extend(o.committed);
        self.maybe_committed.extend(o.maybe_committed);
        self.created.extend(o.created);
        self.acquisitions += o.acquisitions;
        self.takeovers += o.takeovers;
        self.lease_lost += o.lease_lost;
        self.crashes += o.crashes;
        self.stalls += o.stalls;
        self.heartbeats += o.heartbeats;
        self.stale_found += o.stale_found;
        self.store_errors.extend(o.store_errors);
        self.store_failures += o.store_failures;
        self.unread_chats += o.unread_chats;
    }
}

/// The transitions an Update applied, for the record.
#[derive(Default)]
struct Log {
    calls: Vec<Call>,
    outcomes: Vec<Outcome>,
}

/// Applies one transition (fenced when `fence` is given) and logs it.
async fn apply<S: Store>(
    tx: &mut Tx<'_, S>,
    log: &mut Log,
    input: Input,
    fence: Option<RunnerId>,
) -> Result<Outcome, Error> {
    let outcome = match fence {
        Some(runner) => tx.fenced(runner).apply_input(input.clone()).await?,
        None => tx.apply(input.clone()).await?,
    };
    log.calls.push(Call { input, fence });
    log.outcomes.push(outcome.clone());
    Ok(outcome)
}

/// How an Update attempt ended.
enum Attempted<T> {
    Committed(T),
    Rejected(Rejection),
    Idle,
    Crashed,
    Failed,
}

/// Runs one Update, times it, counts its transitions and records it if it
/// commits.
async fn attempt<S: Store, T>(
    sh: &Shared<S>,
    machine: &ChatMachine<S>,
    st: &mut Stats,
    f: impl AsyncFnOnce(&mut Tx<'_, S>, &mut Log) -> Result<T, Error>,
) -> Attempted<T> {
    let started = Instant::now();
    let mut log = Log::default();
    // What the callback saw, kept outside it: an Update that fails at
    // commit may still have committed (see `record`).
    let mut seen = None;
    let result = machine
        .update(async |tx| {
            let snap = tx.snapshot();
            let start = (snap.row.versions.snapshot, snap.now, snap.lease_fresh);
            let value = f(tx, &mut log).await?;
            seen = Some((start, tx.snapshot().clone()));
            Ok(value)
        })
        .await;
    let record = |log: Log, ((snapshot, now, lease_fresh), end): ((i64, _, bool), Snapshot)| {
        CommittedUpdate {
            chat: machine.chat_id(),
            snapshot,
            now,
            lease_fresh,
            calls: log.calls,
            outcomes: log.outcomes,
            end,
            // Taken from the publisher's record at the end.
            published: Vec::new(),
        }
    };
    let micros = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
    let mut count = |t: Transition, outcome: &'static str| {
        *st.calls.entry((t, outcome)).or_default() += 1;
    };
    match result {
        Ok(value) => {
            for c in &log.calls {
                count(c.input.transition(), "ok");
            }
            st.latencies_us.push(micros);
            sh.count_attempt();
            sh.committed.fetch_add(1, Ordering::Relaxed);
            let seen = seen.expect("a committed Update ran its callback to the end");
            st.committed.push(record(log, seen));
            Attempted::Committed(value)
        }
        // The store failed at or after commit; the error says whether the
        // change is durable. Committed (publishing failed): recorded as
        // committed. Unknown: recorded as maybe committed, for the oracle
        // to settle from the stored snapshot versions.
        Err(e) if e.commit_state() != CommitState::NotCommitted && seen.is_some() => {
            let seen = seen.expect("checked");
            st.store_failure(&e);
            if e.commit_state() == CommitState::Committed {
                sh.committed.fetch_add(1, Ordering::Relaxed);
                st.committed.push(record(log, seen));
            } else {
                st.maybe_committed.push(record(log, seen));
            }
            Attempted::Failed
        }
        Err(Error::Rejected(r)) => {
            for c in &log.calls {
                count(c.input.transition(), "rolled back");
            }
            count(r.transition, r.kind.name());
            st.latencies_us.push(micros);
            sh.count_attempt();
            Attempted::Rejected(r)
        }
        Err(e) => match signal(&e) {
            Some(Signal::Idle) => Attempted::Idle,
            Some(Signal::Crash) => {
                for c in &log.calls {
                    count(c.input.transition(), "rolled back");
                }
                Attempted::Crashed
            }
            None => {
                st.store_failure(&e);
                Attempted::Failed
            }
        },
    }
}

fn idle<T>() -> Result<T, Error> {
    Err(Error::callback(Signal::Idle))
}

// ---------------------------------------------------------------------------
// Users

const DYNAMIC_TOOL: &str = "ask_user";

async fn user<S: Store>(sh: Arc<Shared<S>>, index: usize, mut rng: StdRng) -> Stats {
    let mut st = Stats::default();
    let me = uuid::Builder::from_random_bytes(rng.random()).into_uuid();
    let mut mine: Vec<ChatId> = Vec::new();
    let mut said = 0u64;
    while !sh.stopped() {
        let want_new = mine.is_empty() || rng.random_ratio(1, 20);
        if want_new && sh.reserved.fetch_add(1, Ordering::Relaxed) < sh.args.chats {
            if let Some(chat) = create(&sh, &mut rng, me, index, &mut st).await {
                mine.push(chat);
            }
        } else if !mine.is_empty() {
            let chat = mine[rng.random_range(0..mine.len())];
            let machine = sh.machine(chat);
            said += 1;
            let text = format!("user {index} says {said}");
            let roll = rng.random_range(0..100u32);
            let pick = rng.random::<u64>();
            attempt(&sh, &machine, &mut st, async |tx, log| {
                user_step(tx, log, roll, pick, &text, me).await
            })
            .await;
        }
        let pause = sh.pause(&mut rng, sh.args.think_ms);
        sh.sleep(pause).await;
    }
    st
}

async fn create<S: Store>(
    sh: &Shared<S>,
    rng: &mut StdRng,
    me: uuid::Uuid,
    index: usize,
    st: &mut Stats,
) -> Option<ChatId> {
    let id = ChatId::new_random();
    let messages: Vec<NewMessage> = (0..rng.random_range(1..=2))
        .map(|i| NewMessage {
            created_by: Some(me),
            ..NewMessage::user(format!("user {index} opens with {i}"))
        })
        .collect();
    let new = NewChat {
        id,
        owner_id: me,
        dynamic_tools: [DYNAMIC_TOOL.to_owned()].into(),
        last_model_config_id: None,
        messages,
    };
    match create_chat(&sh.store, &sh.notify, CreateChat::from(new.clone())).await {
        Ok(created) => {
            *st.calls.entry((Transition::CreateChat, "ok")).or_default() += 1;
            st.created.push(CreatedChat {
                new,
                ids: created.messages,
                // Taken from the publisher's record at the end.
                published: Vec::new(),
            });
            sh.registry.lock().expect("registry").push(id);
            Some(id)
        }
        Err(e) => {
            st.store_failure(&e);
            None
        }
    }
}

/// One user action, chosen from the chat's state under the lock. `roll`
/// picks the action, `pick` a message or queue entry.
async fn user_step<S: Store>(
    tx: &mut Tx<'_, S>,
    log: &mut Log,
    roll: u32,
    pick: u64,
    text: &str,
    me: uuid::Uuid,
) -> Result<(), Error> {
    use ExecutionState as St;
    let state = tx.state();
    let queue = tx.snapshot().queue.clone();
    let message = NewMessage {
        created_by: Some(me),
        ..NewMessage::user(text)
    };
    let send = |busy_behavior| Input::SendMessage {
        message: message.clone(),
        busy_behavior,
    };
    let nth = |len: usize| (pick % len.max(1) as u64) as usize;
    // A user acting on a stale screen: what they see is no longer so.
    if roll < 2 {
        let stale = match pick % 4 {
            0 => Input::SetArchived { archived: true },
            1 => Input::DeleteQueuedMessage {
                id: chatstate::QueuedMessageId(i64::MAX),
            },
            2 => Input::Interrupt { reason: None },
            _ => Input::CompleteRequiresAction {
                results: Vec::new(),
                created_by: Some(me),
                model_config_id: None,
            },
        };
        apply(tx, log, stale, None).await?;
        return Ok(());
    }
    let input = match state {
        St::W | St::E0 | St::E1 => match roll {
            0..70 => send(BusyBehavior::Queue),
            70..78 => return edit(tx, log, pick, text, me).await,
            78..84 => Input::SetArchived { archived: true },
            84..88 if state == St::W => Input::RequestCompaction,
            84..94 if state == St::E1 => Input::PromoteQueuedMessage {
                id: queue[nth(queue.len())],
            },
            _ => return idle(),
        },
        St::XW | St::XE0 | St::XE1 => match roll {
            0..50 => Input::SetArchived { archived: false },
            _ => return idle(),
        },
        St::R0 | St::R1 | St::I0 | St::I1 => match roll {
            0..20 => send(BusyBehavior::Queue),
            20..24 => send(BusyBehavior::Interrupt),
            24..28 if matches!(state, St::R0 | St::R1) => Input::Interrupt { reason: None },
            28..33 if !queue.is_empty() => Input::DeleteQueuedMessage {
                id: queue[nth(queue.len())],
            },
            33..37 if !queue.is_empty() => Input::PromoteQueuedMessage {
                id: queue[nth(queue.len())],
            },
            37..39 => return edit(tx, log, pick, text, me).await,
            _ => return idle(),
        },
        St::A0 | St::A1 => {
            let pending = tx
                .snapshot()
                .tools
                .outstanding(Some(&tx.row().dynamic_tools));
            match roll {
                0..60 => Input::CompleteRequiresAction {
                    results: pending
                        .into_iter()
                        .map(|(id, _)| ToolResultInput {
                            tool_call_id: id,
                            output: format!("{{\"answer\": {pick}}}"),
                            is_error: false,
                        })
                        .collect(),
                    created_by: Some(me),
                    model_config_id: None,
                },
                60..63 => Input::CompleteRequiresAction {
                    results: vec![ToolResultInput {
                        tool_call_id: "not-asked".to_owned(),
                        output: "{}".to_owned(),
                        is_error: false,
                    }],
                    created_by: Some(me),
                    model_config_id: None,
                },
                63..70 => Input::Interrupt { reason: None },
                70..76 => send(BusyBehavior::Interrupt),
                76..82 => send(BusyBehavior::Queue),
                _ => return idle(),
            }
        }
        St::Invalid => Input::ReconcileInvalidState {
            last_error: None,
            cancellation_reason: None,
        },
        St::N => unreachable!("an Update holds an existing chat"),
    };
    apply(tx, log, input, None).await?;
    Ok(())
}

/// EditMessage of one of the chat's active user messages.
async fn edit<S: Store>(
    tx: &mut Tx<'_, S>,
    log: &mut Log,
    pick: u64,
    text: &str,
    me: uuid::Uuid,
) -> Result<(), Error> {
    let record = tx.load().await?;
    let users: Vec<MessageId> = record
        .active_history()
        .filter(|m| m.role == Role::User)
        .map(|m| m.id)
        .collect();
    let Some(&target) = users.get((pick % users.len().max(1) as u64) as usize) else {
        return idle();
    };
    let input = Input::EditMessage {
        message_id: target,
        content: vec![Part::text(format!("{text} (edited)"))],
        created_by: Some(me),
        model_config_id: None,
    };
    apply(tx, log, input, None).await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Workers

/// One start of a worker process: its id, its chats, and whether it died.
struct Incarnation {
    worker: WorkerId,
    crashed: AtomicBool,
    /// The runner this incarnation runs each of its chats with.
    held: Mutex<HashMap<ChatId, RunnerId>>,
}

impl Incarnation {
    /// Claims `chat` for `runner`, unless another runner has it.
    fn hold(&self, chat: ChatId, runner: RunnerId) -> bool {
        *self
            .held
            .lock()
            .expect("held")
            .entry(chat)
            .or_insert(runner)
            == runner
    }

    /// Gives `chat` up, if `runner` still has it.
    fn release(&self, chat: ChatId, runner: RunnerId) {
        let mut held = self.held.lock().expect("held");
        if held.get(&chat) == Some(&runner) {
            held.remove(&chat);
        }
    }
}

async fn worker<S: Store>(sh: Arc<Shared<S>>, mut rng: StdRng) -> Stats {
    let mut st = Stats::default();
    while !sh.stopped() {
        let inc = Arc::new(Incarnation {
            worker: WorkerId(uuid::Builder::from_random_bytes(rng.random()).into_uuid()),
            crashed: AtomicBool::new(false),
            held: Mutex::new(HashMap::new()),
        });
        let mut hints = sh.publisher.hint_tx.subscribe();
        let beats = tokio::spawn(heartbeats(sh.clone(), inc.clone()));
        let mut runners = tokio::task::JoinSet::new();
        let tick = Duration::from_millis(20);
        while !sh.stopped() && !inc.crashed.load(Ordering::Relaxed) {
            tokio::select! {
                hint = hints.recv() => match hint {
                    Ok(chat) => {
                        let busy = inc.held.lock().expect("held").len() >= sh.args.worker_capacity;
                        if !busy && !inc.held.lock().expect("held").contains_key(&chat) {
                            let seed = rng.random();
                            runners.spawn(run_chat(sh.clone(), inc.clone(), chat, StdRng::seed_from_u64(seed)));
                        }
                    }
                    // Missed hints: the sweeper finds those chats again.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                Some(done) = runners.join_next() => {
                    if let Ok(s) = done {
                        st.merge(s);
                    }
                }
                () = sh.sleep(tick) => {}
            }
        }
        while let Some(done) = runners.join_next().await {
            if let Ok(s) = done {
                st.merge(s);
            }
        }
        inc.crashed.store(true, Ordering::Relaxed);
        st.heartbeats += beats.await.unwrap_or(0);
        if !sh.stopped() {
            st.crashes += 1;
            // A restart takes a while.
            sh.sleep(sh.options.heartbeat_stale / 4).await;
        }
    }
    st
}

/// Keeps the leases of an incarnation's chats alive until it dies.
async fn heartbeats<S: Store>(sh: Arc<Shared<S>>, inc: Arc<Incarnation>) -> u64 {
    let mut n = 0;
    let every = sh.options.heartbeat_stale / 4;
    while !sh.stopped() && !inc.crashed.load(Ordering::Relaxed) {
        sh.sleep(every).await;
        let held: Vec<(ChatId, RunnerId)> = inc
            .held
            .lock()
            .expect("held")
            .iter()
            .map(|(c, r)| (*c, *r))
            .collect();
        for (chat, runner) in held {
            if inc.crashed.load(Ordering::Relaxed) {
                break;
            }
            if matches!(
                sh.store.heartbeat(chat, runner).await,
                Ok(chatstate::LeaseStatus::Held)
            ) {
                n += 1;
            }
        }
    }
    n
}

/// What a worker does next with a chat.
enum Next {
    Continue,
    Release,
}

/// Acquires a chat and runs it until it comes to rest, the lease is lost,
/// or the worker dies.
async fn run_chat<S: Store>(
    sh: Arc<Shared<S>>,
    inc: Arc<Incarnation>,
    chat: ChatId,
    mut rng: StdRng,
) -> Stats {
    let mut st = Stats::default();
    let machine = sh.machine(chat);
    let runner = RunnerId(uuid::Builder::from_random_bytes(rng.random()).into_uuid());
    let owner = Owner {
        worker_id: inc.worker,
        runner_id: runner,
    };
    if !inc.hold(chat, runner) {
        return st;
    }
    let acquired = attempt(&sh, &machine, &mut st, async |tx, log| {
        let snap = tx.snapshot();
        if !snap.state().is_runnable() || snap.lease_fresh {
            return idle();
        }
        let takeover = snap.row.owner.is_some();
        apply(tx, log, Input::Acquire { owner }, None).await?;
        Ok(takeover)
    })
    .await;
    match acquired {
        Attempted::Committed(takeover) => {
            st.acquisitions += 1;
            st.takeovers += u64::from(takeover);
        }
        _ => {
            inc.release(chat, runner);
            return st;
        }
    }
    let mut turn = Turn::default();
    let mut misses = 0;
    loop {
        let pause = sh.pause(&mut rng, sh.args.step_ms);
        sh.sleep(pause).await;
        if sh.stopped() || inc.crashed.load(Ordering::Relaxed) {
            break;
        }
        if rng.random_bool((sh.args.crash_rate / 2.0).clamp(0.0, 1.0)) {
            // A stall (a long pause, a partition): no heartbeats for longer
            // than the staleness, then the worker carries on as if nothing
            // happened. Its fenced calls fail if the chat was taken over.
            st.stalls += 1;
            inc.release(chat, runner);
            sh.sleep(sh.options.heartbeat_stale * 3 / 2).await;
            // Another runner of this worker may have taken the chat over
            // meanwhile; this one then learns so from its fence.
            inc.hold(chat, runner);
        }
        let crash = rng.random_bool(sh.args.crash_rate.clamp(0.0, 1.0));
        let roll = rng.random_range(0..100u32);
        let step = attempt(&sh, &machine, &mut st, async |tx, log| {
            let next = worker_step(tx, log, runner, roll, &mut turn).await?;
            if crash {
                // Dies with the transaction open: everything rolls back.
                return Err(Error::callback(Signal::Crash));
            }
            Ok(next)
        })
        .await;
        match step {
            Attempted::Committed(Next::Continue) | Attempted::Idle => misses = 0,
            Attempted::Committed(Next::Release) => break,
            Attempted::Crashed => {
                inc.crashed.store(true, Ordering::Relaxed);
                break;
            }
            Attempted::Rejected(r) if r.kind.name() == "LeaseLost" => {
                st.lease_lost += 1;
                break;
            }
            Attempted::Rejected(_) => {
                misses += 1;
                if misses > 20 {
                    break;
                }
            }
            Attempted::Failed => break,
        }
        if crash {
            // Dies between two transactions.
            inc.crashed.store(true, Ordering::Relaxed);
            break;
        }
    }
    inc.release(chat, runner);
    st
}

/// A worker's memory of the turn it runs.
#[derive(Default)]
struct Turn {
    steps: u32,
    calls: u64,
    /// Steps spent waiting for client tool results.
    waited: u32,
}

/// One step of a turn, fenced by the worker's runner.
async fn worker_step<S: Store>(
    tx: &mut Tx<'_, S>,
    log: &mut Log,
    runner: RunnerId,
    roll: u32,
    turn: &mut Turn,
) -> Result<Next, Error> {
    use ExecutionState as St;
    let fence = Some(runner);
    let say = |text: String| NewMessage::assistant(text);
    match tx.state() {
        St::R0 | St::R1 => {
            turn.steps += 1;
            turn.waited = 0;
            if tx.row().compaction_requested_at.is_some() {
                let input = Input::CommitStep {
                    messages: vec![say("summary of the conversation".into())],
                    consume_compaction_request: true,
                };
                apply(tx, log, input, fence).await?;
                return Ok(Next::Continue);
            }
            match roll {
                0..15 => {
                    apply(tx, log, Input::RecordGenerationAttempt, fence).await?;
                    if roll < 5 {
                        let retry = Input::RecordRetryState {
                            retry_state: format!(
                                "{{\"attempt\": {}, \"delay_ms\": 250}}",
                                turn.steps
                            ),
                        };
                        apply(tx, log, retry, fence).await?;
                    }
                }
                15..45 => {
                    let input = Input::CommitStep {
                        messages: vec![say(format!("step {}", turn.steps))],
                        consume_compaction_request: false,
                    };
                    apply(tx, log, input, fence).await?;
                }
                45..55 => {
                    turn.calls += 1;
                    let id = format!("{runner}-ask-{}", turn.calls);
                    let input = Input::CommitStep {
                        messages: vec![NewMessage::new(
                            Role::Assistant,
                            vec![Part::text("a question"), Part::tool_call(id, DYNAMIC_TOOL)],
                        )],
                        consume_compaction_request: false,
                    };
                    apply(tx, log, input, fence).await?;
                    apply(tx, log, Input::EnterRequiresAction, fence).await?;
                }
                55..62 => {
                    turn.calls += 1;
                    let id = format!("{runner}-search-{}", turn.calls);
                    let result = Part::ToolResult {
                        tool_call_id: id.clone(),
                        tool_name: "web_search".into(),
                        result: JsonText::string("three hits"),
                        is_error: false,
                    };
                    let input = Input::CommitStep {
                        messages: vec![
                            NewMessage::new(
                                Role::Assistant,
                                vec![Part::tool_call(id, "web_search")],
                            ),
                            NewMessage::new(Role::Tool, vec![result]),
                        ],
                        consume_compaction_request: false,
                    };
                    apply(tx, log, input, fence).await?;
                }
                62..92 => {
                    let input = Input::CommitStep {
                        messages: vec![say("the answer".into())],
                        consume_compaction_request: false,
                    };
                    apply(tx, log, input, fence).await?;
                    let done = apply(tx, log, Input::FinishTurn, fence).await?;
                    turn.steps = 0;
                    if done.to == St::W {
                        // Mostly a worker gives the chat up; sometimes it
                        // just stops heartbeating and the lease lapses.
                        if roll < 89 {
                            apply(tx, log, Input::Abandon, fence).await?;
                        }
                        return Ok(Next::Release);
                    }
                }
                _ => {
                    let input = Input::FinishError {
                        last_error: Some(JsonText::string("the model is overloaded")),
                    };
                    apply(tx, log, input, fence).await?;
                    if roll < 99 {
                        apply(tx, log, Input::Abandon, fence).await?;
                    }
                    return Ok(Next::Release);
                }
            }
            Ok(Next::Continue)
        }
        St::I0 | St::I1 => {
            // Answer the calls left open by the interrupted step, then stop.
            let open = tx.snapshot().tools.outstanding(None);
            let partial: Vec<NewMessage> = open
                .into_iter()
                .map(|(id, name)| {
                    NewMessage::new(
                        Role::Tool,
                        vec![Part::ToolResult {
                            tool_call_id: id,
                            tool_name: name,
                            result: JsonText::string("interrupted"),
                            is_error: true,
                        }],
                    )
                })
                .collect();
            let done = apply(
                tx,
                log,
                Input::FinishInterruption {
                    partial_messages: partial,
                },
                fence,
            )
            .await?;
            if done.to == St::W {
                apply(tx, log, Input::Abandon, fence).await?;
                return Ok(Next::Release);
            }
            Ok(Next::Continue)
        }
        St::A0 | St::A1 => {
            // The worker enforces the deadline (here: a number of steps).
            turn.waited += 1;
            if turn.waited < 25 {
                return idle();
            }
            turn.waited = 0;
            apply(tx, log, Input::CancelRequiresAction { reason: None }, fence).await?;
            Ok(Next::Continue)
        }
        _ => {
            // At rest, archived or invalid: nothing to run.
            if roll < 90 {
                apply(tx, log, Input::Abandon, fence).await?;
                Ok(Next::Release)
            } else {
                idle()
            }
        }
    }
}

/// Finds runnable chats whose lease lapsed (a crashed worker's) and hints
/// them, as a server's periodic scan would.
async fn sweeper<S: Store>(sh: Arc<Shared<S>>) -> Stats {
    let mut st = Stats::default();
    let every = sh.options.heartbeat_stale / 2;
    while !sh.stopped() {
        sh.sleep(every).await;
        let chats: Vec<ChatId> = sh.registry.lock().expect("registry").clone();
        for chat in chats {
            if sh.stopped() {
                break;
            }
            let seen = sh
                .machine(chat)
                .read_lock(async |r| Ok((r.state(), r.snapshot().lease_fresh)))
                .await;
            if let Ok((state, false)) = seen
                && state.is_runnable()
            {
                st.stale_found += 1;
                let _ = sh.publisher.hint_tx.send(chat);
            }
        }
    }
    st
}

// ---------------------------------------------------------------------------
// The run

async fn run_on<S: Store>(store: S, args: &Args, seed: u64, stop: Stop) -> anyhow::Result<Summary> {
    let (hint_tx, _) = broadcast::channel(4096);
    let publisher = Arc::new(SimPublisher {
        seen: Mutex::new(HashMap::new()),
        hints: AtomicU64::new(0),
        hint_tx,
    });
    let options = Options {
        heartbeat_stale: Duration::from_millis(args.heartbeat_stale_ms.max(1)),
        ..Options::default()
    };
    let sh = Arc::new(Shared {
        store,
        notify: Notify::AfterCommit(publisher.clone()),
        publisher,
        options,
        args: args.clone(),
        stop,
        stopped: AtomicBool::new(false),
        stop_signal: tokio::sync::watch::Sender::new(false),
        started: Instant::now(),
        stopped_at: Mutex::new(None),
        reserved: AtomicUsize::new(0),
        registry: Mutex::new(Vec::new()),
        attempts: AtomicU64::new(0),
        committed: AtomicU64::new(0),
    });
    let mut master = StdRng::seed_from_u64(seed);
    let mut tasks = tokio::task::JoinSet::new();
    // Seeds in a fixed order: workers, then users.
    for _ in 0..args.workers {
        tasks.spawn(worker(sh.clone(), StdRng::seed_from_u64(master.random())));
    }
    for u in 0..args.users {
        tasks.spawn(user(sh.clone(), u, StdRng::seed_from_u64(master.random())));
    }
    tasks.spawn(sweeper(sh.clone()));
    let bar = progress_bar(stop);
    let ticker = {
        let sh = sh.clone();
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                let elapsed = sh.started.elapsed();
                match sh.stop {
                    Stop::Time(limit) => {
                        bar.set_position(elapsed.as_millis() as u64);
                        if elapsed >= limit {
                            sh.halt();
                        }
                    }
                    Stop::Ops(_) => bar.set_position(sh.attempts.load(Ordering::Relaxed)),
                }
                let committed = sh.committed.load(Ordering::Relaxed);
                bar.set_message(format!(
                    "{committed} updates, {:.0}/s",
                    committed as f64 / elapsed.as_secs_f64().max(1e-3)
                ));
                if sh.stopped() {
                    break;
                }
                sh.sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut stats = Stats::default();
    while let Some(done) = tasks.join_next().await {
        stats.merge(done.context("a simulation task panicked")?);
    }
    let elapsed = sh
        .stopped_at
        .lock()
        .expect("stop time")
        .map_or_else(|| sh.started.elapsed(), |t| t - sh.started);
    ticker.await.context("the progress task panicked")?;
    bar.finish_and_clear();

    // Every task has stopped: read each chat once more and check it all.
    let finals = read_finals(|id| sh.machine(id), &mut stats).await;
    let published = std::mem::take(&mut *sh.publisher.seen.lock().expect("publisher lock"));
    let published_at = |chat, snapshot| published.get(&(chat, snapshot)).cloned();
    let mut committed = std::mem::take(&mut stats.committed);
    let mut created = std::mem::take(&mut stats.created);
    for c in &mut created {
        c.published = published_at(c.new.id, 1).unwrap_or_default();
    }
    for u in &mut committed {
        u.published = published_at(u.chat, u.snapshot).unwrap_or_default();
    }
    let chats = created.len();
    // Each Update is replayed at the store time it saw, so times compare
    // exactly on either store.
    let config = Config {
        options,
        exact_time: true,
    };
    let mut maybe = std::mem::take(&mut stats.maybe_committed);
    for u in &mut maybe {
        u.published = published_at(u.chat, u.snapshot).unwrap_or_default();
    }
    let verdict = oracle::check_with_unknown(&config, &created, &committed, &maybe, &finals);
    let mut latencies = std::mem::take(&mut stats.latencies_us);
    latencies.sort_unstable();
    Ok(Summary {
        store: String::new(),
        seed,
        args: args.clone(),
        chats,
        elapsed,
        committed: sh.committed.load(Ordering::Relaxed),
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        hints: sh.publisher.hints.load(Ordering::Relaxed),
        stats,
        verdict,
    })
}

/// Reads every created chat once more at the end of a run.
///
/// A read the store fails (after [`final_read`]'s retries) is a failure of
/// the run, counted as a store failure, not a finding about the model: the
/// chat and its Updates are left out of the oracle's check rather than
/// reported as a violation.
async fn read_finals<S: Store>(
    machine: impl Fn(ChatId) -> ChatMachine<S>,
    stats: &mut Stats,
) -> BTreeMap<ChatId, StoredChat> {
    let mut finals = BTreeMap::new();
    let mut unread = BTreeSet::new();
    for c in &stats.created {
        match final_read(&machine(c.new.id)).await {
            Ok(record) => {
                let stored = StoredChat {
                    row: record.row,
                    queue: record.queue,
                    history: record.history,
                };
                finals.insert(c.new.id, stored);
            }
            // A created chat that is gone is the oracle's to report.
            Err(Error::ChatNotFound(_)) => {}
            Err(e) => {
                unread.insert(c.new.id);
                if stats.store_errors.len() < 5 {
                    stats.store_errors.push(crate::error_chain(&e));
                }
            }
        }
    }
    stats.store_failures += unread.len() as u64;
    stats.unread_chats += unread.len() as u64;
    stats.created.retain(|c| !unread.contains(&c.new.id));
    stats.committed.retain(|u| !unread.contains(&u.chat));
    finals
}

/// How often the final read of a chat is tried before the store's failure
/// counts.
const FINAL_READ_ATTEMPTS: u32 = 5;

/// Reads a chat at the end of a run, retrying store failures (a transient
/// connection or timeout error must not fail the run) a bounded number of
/// times with a growing pause.
async fn final_read<S: Store>(machine: &ChatMachine<S>) -> Result<chatstate::ChatRecord, Error> {
    let mut attempt = 1;
    loop {
        match machine.load().await {
            Err(Error::Store(_)) if attempt < FINAL_READ_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                attempt += 1;
            }
            read => return read,
        }
    }
}

fn progress_bar(stop: Stop) -> ProgressBar {
    let len = match stop {
        Stop::Time(d) => d.as_millis() as u64,
        Stop::Ops(n) => n,
    };
    let bar = ProgressBar::new(len);
    if std::io::stdout().is_terminal() {
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
                .expect("a valid template"),
        );
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar
}

pub(crate) fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The result of a simulation.
pub(crate) struct Summary {
    store: String,
    seed: u64,
    args: Args,
    chats: usize,
    elapsed: Duration,
    committed: u64,
    p50_us: u32,
    p99_us: u32,
    hints: u64,
    stats: Stats,
    verdict: Verdict,
}

impl Summary {
    /// No invariant violation and no store failure.
    pub(crate) fn ok(&self) -> bool {
        self.verdict.violations.is_empty() && self.stats.store_failures == 0
    }

    pub(crate) fn render(&self) -> String {
        let mut s = String::new();
        let a = &self.args;
        let secs = self.elapsed.as_secs_f64();
        let _ = writeln!(
            s,
            "simulate: store {}, seed {}, {} chats, {} users, {} workers, crash rate {}",
            self.store, self.seed, self.chats, a.users, a.workers, a.crash_rate
        );
        let _ = writeln!(
            s,
            "  {} committed Updates in {secs:.2} s: {:.0} Updates/s, latency p50 {:.3} ms, p99 {:.3} ms",
            self.committed,
            self.committed as f64 / secs.max(1e-9),
            f64::from(self.p50_us) / 1000.0,
            f64::from(self.p99_us) / 1000.0,
        );
        let _ = writeln!(s, "  transitions (ok / rolled back / rejected):");
        let mut by_t: BTreeMap<Transition, Vec<(&'static str, u64)>> = BTreeMap::new();
        for ((t, outcome), n) in &self.stats.calls {
            by_t.entry(*t).or_default().push((outcome, *n));
        }
        for (t, outcomes) in by_t {
            let get = |k: &str| {
                outcomes
                    .iter()
                    .find(|(o, _)| *o == k)
                    .map_or(0, |(_, n)| *n)
            };
            let rejected: Vec<String> = outcomes
                .iter()
                .filter(|(o, _)| *o != "ok" && *o != "rolled back")
                .map(|(o, n)| format!("{o} {n}"))
                .collect();
            let _ = writeln!(
                s,
                "    {:<24} {:>8} {:>6}   {}",
                t.as_str(),
                get("ok"),
                get("rolled back"),
                if rejected.is_empty() {
                    "-".to_owned()
                } else {
                    rejected.join(", ")
                }
            );
        }
        let st = &self.stats;
        let _ = writeln!(
            s,
            "  hints sent: {}, lapsed leases found by the sweeper: {}, heartbeats: {}",
            self.hints, st.stale_found, st.heartbeats
        );
        let _ = writeln!(
            s,
            "  acquisitions: {} (takeovers of another runner's lapsed lease: {}), worker crashes: {}, stalls: {}, fenced calls that found the lease lost: {}",
            st.acquisitions, st.takeovers, st.crashes, st.stalls, st.lease_lost
        );
        if st.store_failures > 0 {
            let _ = writeln!(s, "  store failures: {}", st.store_failures);
            if st.unread_chats > 0 {
                let _ = writeln!(
                    s,
                    "  chats whose final read failed (not checked): {}",
                    st.unread_chats
                );
            }
            for e in st.store_errors.iter().take(5) {
                let _ = writeln!(s, "    {e}");
            }
        }
        let v = &self.verdict;
        let _ = writeln!(
            s,
            "  invariant violations: {} ({} committed Updates of {} chats replayed through the model)",
            v.violations.len(),
            v.updates_checked,
            v.chats_checked
        );
        for line in v.violations.iter().take(10) {
            let _ = writeln!(s, "    {line}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use chatstate::{CreateChat, NewMessage, create_chat};
    use chatstate_model::oracle::{Config, CreatedChat, check};
    use chatstate_model::{NewChat, Options};
    use chatstate_store_mem::MemStore;

    use super::*;

    /// A store with one chat, and the record of its creation.
    async fn one_chat() -> (MemStore, CreatedChat, ChatMachine<MemStore>) {
        let store = MemStore::default();
        let new = NewChat {
            id: ChatId::new_random(),
            owner_id: uuid::Uuid::new_v4(),
            dynamic_tools: Default::default(),
            last_model_config_id: None,
            messages: vec![NewMessage::user("hi")],
        };
        let notify = Notify::InTransaction;
        let created = create_chat(&store, &notify, CreateChat::from(new.clone()))
            .await
            .expect("created");
        let machine = ChatMachine::new(store.clone(), notify, new.id, Options::default());
        let record = CreatedChat {
            new,
            ids: created.messages,
            published: Vec::new(),
        };
        (store, record, machine)
    }

    fn block_on<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn a_transient_failure_of_the_final_read_is_retried() {
        block_on(async {
            let (store, created, machine) = one_chat().await;
            store.fail_nth_call(1);
            let mut stats = Stats {
                created: vec![created],
                ..Stats::default()
            };
            let finals = read_finals(|_| machine.clone(), &mut stats).await;
            assert_eq!(store.injected_faults(), 1);
            assert_eq!(finals.len(), 1);
            assert_eq!((stats.store_failures, stats.unread_chats), (0, 0));
        });
    }

    #[test]
    fn a_final_read_the_store_keeps_failing_fails_the_run_not_the_oracle() {
        block_on(async {
            let (store, created, machine) = one_chat().await;
            store.fail_every_nth_call(1);
            let mut stats = Stats {
                created: vec![created],
                ..Stats::default()
            };
            let finals = read_finals(|_| machine.clone(), &mut stats).await;
            assert_eq!(
                store.injected_faults(),
                u64::from(FINAL_READ_ATTEMPTS),
                "bounded retries"
            );
            assert!(finals.is_empty());
            assert_eq!((stats.store_failures, stats.unread_chats), (1, 1));
            assert_eq!(stats.store_errors.len(), 1);
            // The oracle is not asked about the chat it could not see.
            let config = Config {
                options: Options::default(),
                exact_time: true,
            };
            let verdict = check(&config, &stats.created, &stats.committed, &finals);
            assert!(verdict.violations.is_empty(), "{:?}", verdict.violations);
        });
    }
}

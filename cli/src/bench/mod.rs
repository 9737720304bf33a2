//! `chatstate bench`: Updates per second, latency and round trips per
//! Update for representative transitions, with 1 and 8 clients, on
//! distinct chats and on one hot chat; on Postgres, side by side with the
//! Go original's statement sequence (`chatstate_testing::goshape`) on the
//! same server.
//!
//! Each case gets fresh chats, a short warm-up (connections, prepared
//! statements), then `--seconds` of measurement. Some cases need
//! housekeeping to stay repeatable and realistic (draining a queue that
//! sends fill; after a promotion, the worker's reply and, when the queue
//! runs short, a refill); that runs in Updates of its own, outside the
//! timed ones, and its time is not counted: a case's Updates/s is timed
//! Updates divided by the measured time less the clients' mean time in
//! housekeeping. Round trips per Update come from the one-client run, where each
//! timed Update's share of the store's counter is exact.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chatstate::{
    BusyBehavior, ChatId, ChatMachine, CreateChat, Error, Input, NewMessage, Notify, Options,
    RunnerId, Store, WorkerId, create_chat,
};
use chatstate_store_mem::MemStore;
use chatstate_testing::goshape::{GoShaped, GoShapedOutcome};
use serde::Serialize;

use crate::simulate::{StoreKind, percentile};

mod routes;

/// Arguments of `chatstate bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The store to measure.
    #[arg(long, value_enum, default_value_t = StoreKind::Mem)]
    store: StoreKind,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Measured seconds per case.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Postgres URL [default: DATABASE_URL, else a throwaway cluster].
    #[arg(long)]
    database_url: Option<String>,
    /// Also measure CommitStep through PgBouncer (session and transaction
    /// mode) beside the direct connection, started in front of the
    /// throwaway cluster (Postgres only; needs the `pgbouncer` package).
    #[arg(long)]
    pgbouncer: bool,
    /// Repetitions of the `--pgbouncer` cases (the routes alternate).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

/// What a timed Update does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// An Update with no transition (lock, bump, publish).
    Empty,
    /// A fenced CommitStep of one assistant message.
    CommitStep,
    /// SendMessage to a running chat, busy behaviour "queue".
    SendQueue,
    /// A fenced FinishTurn from R1 that promotes the queue head.
    FinishTurnPromote,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::CommitStep,
        Kind::SendQueue,
        Kind::Empty,
        Kind::FinishTurnPromote,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Empty => "Update (no transition)",
            Kind::CommitStep => "CommitStep (1 message)",
            Kind::SendQueue => "SendMessage (queue)",
            Kind::FinishTurnPromote => "FinishTurn (promotes)",
        }
    }

    /// Cases the Go-shaped sequence exists for.
    fn has_go_shape(self) -> bool {
        matches!(self, Kind::CommitStep | Kind::SendQueue)
    }
}

/// Our Update, or the Go-shaped statement sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Shape {
    Ours,
    Go,
}

/// One measured case.
#[derive(Clone, Debug, Serialize)]
struct Row {
    transition: &'static str,
    shape: Shape,
    clients: usize,
    /// `distinct` (one chat per client) or `hot` (one chat for all).
    chats: &'static str,
    updates: u64,
    updates_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Postgres round trips (in-memory store: store calls) per Update,
    /// from the one-client case.
    per_update: Option<f64>,
}

const QUEUE_BATCH: usize = 64;

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let seconds = Duration::from_secs_f64(args.seconds.max(0.01));
        anyhow::ensure!(
            !args.pgbouncer || (args.store == StoreKind::Pg && crate::pg::url(args.database_url.as_deref()).is_none()),
            "--pgbouncer needs --store pg on the throwaway cluster (no --database-url or DATABASE_URL)"
        );
        let mut by_route = Vec::new();
        let (rows, store) = match args.store {
            StoreKind::Mem => {
                let store = MemStore::new();
                let counter = {
                    let s = store.clone();
                    Arc::new(move || s.calls()) as Counter
                };
                (
                    measure(store, None, counter, seconds, show_progress()).await?,
                    "mem".to_owned(),
                )
            }
            StoreKind::Pg => {
                let target = crate::pg::connect(args.database_url.as_deref()).await?;
                let go = GoShaped::new(target.store.pool().clone());
                // A case runs either shape; the sum counts whichever ran.
                let counter = {
                    let (s, g) = (target.store.clone(), go.clone());
                    Arc::new(move || s.round_trips() + g.round_trips()) as Counter
                };
                let go = Some(go);
                if args.pgbouncer {
                    by_route = routes::measure(target.store.clone(), seconds, args.repeat).await?;
                }
                (
                    measure(target.store, go, counter, seconds, show_progress()).await?,
                    format!("pg ({})", target.description),
                )
            }
        };
        let mut out = std::io::stdout().lock();
        if args.json {
            if args.pgbouncer {
                let both = serde_json::json!({ "cases": rows, "routes": by_route });
                writeln!(out, "{}", serde_json::to_string_pretty(&both)?)?;
            } else {
                writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
            }
        } else {
            write!(out, "{}", render(&rows, &store, args))?;
            if args.pgbouncer {
                write!(out, "{}", routes::render(&by_route))?;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The case under way is shown on stderr, when that is a terminal.
fn show_progress() -> bool {
    use std::io::IsTerminal as _;
    std::io::stderr().is_terminal()
}

type Counter = Arc<dyn Fn() -> u64 + Send + Sync>;

async fn measure<S: Store>(
    store: S,
    go: Option<GoShaped>,
    counter: Counter,
    seconds: Duration,
    progress: bool,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for kind in Kind::ALL {
        let shapes: &[Shape] = if go.is_some() && kind.has_go_shape() {
            &[Shape::Ours, Shape::Go]
        } else {
            &[Shape::Ours]
        };
        for &shape in shapes {
            let mut per_update = None;
            for (clients, hot) in [(1, false), (8, false), (8, true)] {
                if progress {
                    eprint!(
                        "\r{:<24} {:<5} {clients} client(s) {:<8}",
                        kind.name(),
                        format!("{shape:?}"),
                        if hot { "hot" } else { "distinct" }
                    );
                }
                let case = Case {
                    kind,
                    shape,
                    clients,
                    hot,
                };
                let mut row = run_case(&store, go.as_ref(), &counter, case, seconds).await?;
                if clients == 1 {
                    per_update = row.per_update;
                }
                row.per_update = per_update;
                rows.push(row);
            }
        }
    }
    if progress {
        eprint!("\r{:60}\r", "");
    }
    Ok(rows)
}

#[derive(Clone, Copy, Debug)]
struct Case {
    kind: Kind,
    shape: Shape,
    clients: usize,
    hot: bool,
}

/// A chat set up for a case: running, owned by `runner`.
#[derive(Clone, Copy)]
struct BenchChat {
    id: ChatId,
    runner: RunnerId,
}

fn options() -> Options {
    Options {
        // Room for the queue cases; they drain and refill it themselves.
        max_queue_size: 1_000_000,
        ..Options::default()
    }
}

async fn setup<S: Store>(store: &S, notify: &Notify, kind: Kind) -> anyhow::Result<BenchChat> {
    let created = create_chat(
        store,
        notify,
        CreateChat {
            messages: vec![NewMessage::user("benchmark")],
            ..CreateChat::default()
        },
    )
    .await
    .context("creating a benchmark chat")?;
    let runner = RunnerId::new_random();
    let machine = ChatMachine::new(store.clone(), notify.clone(), created.chat_id, options());
    machine
        .update(async |tx| {
            tx.acquire(WorkerId::new_random(), runner).await?;
            if kind == Kind::FinishTurnPromote {
                for i in 0..QUEUE_BATCH {
                    tx.send_message(NewMessage::user(format!("q{i}")), BusyBehavior::Queue)
                        .await?;
                }
            }
            Ok(())
        })
        .await
        .context("preparing a benchmark chat")?;
    Ok(BenchChat {
        id: created.chat_id,
        runner,
    })
}

async fn run_case<S: Store>(
    store: &S,
    go: Option<&GoShaped>,
    counter: &Counter,
    case: Case,
    seconds: Duration,
) -> anyhow::Result<Row> {
    // Notifications go to an in-process publisher nobody reads: the
    // benchmark measures the store, not a consumer.
    let notify = Notify::AfterCommit(Arc::new(BlackHole));
    let chats = if case.hot { 1 } else { case.clients };
    let mut set = Vec::with_capacity(chats);
    for _ in 0..chats {
        set.push(setup(store, &notify, case.kind).await?);
    }
    let warmup = (seconds / 5).min(Duration::from_millis(300));
    let start = Instant::now();
    let measure_from = start + warmup;
    let until = measure_from + seconds;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..case.clients {
        let chat = set[c % chats];
        let client = Client {
            machine: ChatMachine::new(store.clone(), notify.clone(), chat.id, options()),
            go: go.cloned(),
            chat,
            case,
            counter: counter.clone(),
        };
        tasks.spawn(client.run(measure_from, until));
    }
    let mut total = Measured::default();
    while let Some(done) = tasks.join_next().await {
        total.merge(done.context("a benchmark client panicked")??);
    }
    total.latencies_us.sort_unstable();
    // The clients' mean measured time, less their mean housekeeping.
    let timed =
        (total.window.saturating_sub(total.housekeeping)).as_secs_f64() / case.clients as f64;
    Ok(Row {
        transition: case.kind.name(),
        shape: case.shape,
        clients: case.clients,
        chats: if case.hot { "hot" } else { "distinct" },
        updates: total.ops,
        updates_per_sec: total.ops as f64 / timed.max(1e-9),
        p50_ms: f64::from(percentile(&total.latencies_us, 0.50)) / 1000.0,
        p99_ms: f64::from(percentile(&total.latencies_us, 0.99)) / 1000.0,
        per_update: (total.ops > 0).then(|| total.trips as f64 / total.ops as f64),
    })
}

struct BlackHole;

impl chatstate::Publisher for BlackHole {
    fn publish(&self, _: &str, _: &[u8]) -> Result<(), chatstate::PublishError> {
        Ok(())
    }
}

#[derive(Default)]
struct Measured {
    ops: u64,
    /// Measured time, summed over clients.
    window: Duration,
    /// Time in housekeeping Updates within the window, summed over clients.
    housekeeping: Duration,
    latencies_us: Vec<u32>,
    /// Store round trips (calls) of the timed Updates; exact with one
    /// client only.
    trips: u64,
}

impl Measured {
    fn merge(&mut self, o: Measured) {
        self.ops += o.ops;
        self.window += o.window;
        self.housekeeping += o.housekeeping;
        self.latencies_us.extend(o.latencies_us);
        self.trips += o.trips;
    }
}

struct Client<S: Store> {
    machine: ChatMachine<S>,
    go: Option<GoShaped>,
    chat: BenchChat,
    case: Case,
    counter: Counter,
}

/// What a timed Update left for the housekeeping.
enum After {
    Nothing,
    /// The queue is this long now.
    Queue(usize),
    /// FinishTurn found no queue to promote (another client drained it).
    Missed,
}

impl<S: Store> Client<S> {
    async fn run(self, measure_from: Instant, until: Instant) -> anyhow::Result<Measured> {
        let mut m = Measured::default();
        let mut sent = 0usize;
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            let trips_before = (self.counter)();
            let started = Instant::now();
            let after = self.timed().await?;
            let took = started.elapsed();
            let trips = (self.counter)() - trips_before;
            if now >= measure_from {
                m.ops += 1;
                m.latencies_us
                    .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
                m.trips += trips;
            }
            let house = Instant::now();
            match after {
                After::Nothing => {}
                After::Queue(len) => {
                    sent += 1;
                    if self.case.kind == Kind::SendQueue && sent.is_multiple_of(QUEUE_BATCH) {
                        self.drain().await?;
                    }
                    if self.case.kind == Kind::FinishTurnPromote {
                        self.reply(len < 16).await?;
                    }
                }
                After::Missed => self.refill(true).await?,
            }
            if now >= measure_from {
                m.housekeeping += house.elapsed();
            }
        }
        m.window = Instant::now().saturating_duration_since(measure_from);
        Ok(m)
    }

    async fn timed(&self) -> anyhow::Result<After> {
        let runner = self.chat.runner;
        let message = match self.case.kind {
            Kind::CommitStep => NewMessage::assistant("a step of the turn"),
            _ => NewMessage::user("one more thing"),
        };
        if self.case.shape == Shape::Go {
            let go = self.go.as_ref().expect("go-shaped cases run on Postgres");
            let outcome = match self.case.kind {
                Kind::CommitStep => go.commit_step(self.chat.id, &message, &options()).await?,
                Kind::SendQueue => go.send_queued(self.chat.id, &message, &options()).await?,
                other => unreachable!("no Go shape for {other:?}"),
            };
            if !matches!(outcome, GoShapedOutcome::Committed { .. }) {
                anyhow::bail!("the Go-shaped Update did not commit: {outcome:?}");
            }
            return Ok(match self.case.kind {
                Kind::SendQueue => After::Queue(0),
                _ => After::Nothing,
            });
        }
        let after = match self.case.kind {
            Kind::Empty => {
                self.machine.update(async |_| Ok(())).await?;
                After::Nothing
            }
            Kind::CommitStep => {
                self.machine
                    .update(async |tx| tx.fenced(runner).commit_step(vec![message], false).await)
                    .await?;
                After::Nothing
            }
            Kind::SendQueue => {
                self.machine
                    .update(async |tx| tx.send_message(message, BusyBehavior::Queue).await)
                    .await?;
                After::Queue(0)
            }
            Kind::FinishTurnPromote => {
                let done = self
                    .machine
                    .update(async |tx| {
                        let outcome = tx.fenced(runner).finish_turn().await?;
                        Ok((outcome.promoted.is_some(), tx.snapshot().queue.len()))
                    })
                    .await;
                match done {
                    Ok((true, len)) => After::Queue(len),
                    Ok((false, _)) | Err(Error::Rejected(_)) => After::Missed,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        Ok(after)
    }

    /// Empties the queue in one Update: an edit of the first message
    /// discards the queue (and the rest of the history) in one transition.
    async fn drain(&self) -> anyhow::Result<()> {
        self.machine
            .update(async |tx| {
                let first = tx
                    .load()
                    .await?
                    .active_history()
                    .next()
                    .map(|m| m.id)
                    .expect("a chat has history");
                tx.apply(Input::EditMessage {
                    message_id: first,
                    content: vec![chatstate::Part::text("benchmark")],
                    created_by: None,
                    model_config_id: None,
                })
                .await?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// The rest of the turn the promotion started: the worker's reply (so
    /// the history looks like a conversation: the tool bookkeeping reads
    /// back to the last assistant message), and a new batch of queued
    /// messages when the queue runs short.
    async fn reply(&self, refill: bool) -> anyhow::Result<()> {
        let runner = self.chat.runner;
        self.machine
            .update(async |tx| {
                if tx.state().is_runnable() {
                    tx.fenced(runner)
                        .commit_step(vec![NewMessage::assistant("the reply")], false)
                        .await?;
                }
                if refill {
                    for i in 0..QUEUE_BATCH {
                        tx.send_message(NewMessage::user(format!("q{i}")), BusyBehavior::Queue)
                            .await?;
                    }
                }
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// Queues another batch; `restart` first brings a chat that went idle
    /// back to running.
    async fn refill(&self, restart: bool) -> anyhow::Result<()> {
        self.machine
            .update(async |tx| {
                if restart && !tx.state().is_runnable() {
                    tx.send_message(NewMessage::user("again"), BusyBehavior::Queue)
                        .await?;
                }
                for i in 0..QUEUE_BATCH {
                    tx.send_message(NewMessage::user(format!("q{i}")), BusyBehavior::Queue)
                        .await?;
                }
                Ok(())
            })
            .await?;
        Ok(())
    }
}

fn render(rows: &[Row], store: &str, args: &Args) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let unit = if args.store == StoreKind::Pg {
        "round trips"
    } else {
        "store calls"
    };
    let _ = writeln!(
        s,
        "bench: store {store}, {:.1} s per case; {unit} per Update from the 1-client case",
        args.seconds
    );
    let has_go = rows.iter().any(|r| r.shape == Shape::Go);
    let _ = write!(
        s,
        "{:<24} {:>7} {:<8} {:>10} {:>8} {:>8} {:>7}",
        "transition", "clients", "chats", "Updates/s", "p50 ms", "p99 ms", "per Upd"
    );
    if has_go {
        let _ = write!(s, " | {:>10} {:>7} {:>7}", "Go Upd/s", "per Upd", "ratio");
    }
    let _ = writeln!(s);
    for r in rows.iter().filter(|r| r.shape == Shape::Ours) {
        let _ = write!(
            s,
            "{:<24} {:>7} {:<8} {:>10.0} {:>8.3} {:>8.3} {:>7}",
            r.transition,
            r.clients,
            r.chats,
            r.updates_per_sec,
            r.p50_ms,
            r.p99_ms,
            r.per_update.map_or("-".to_owned(), |p| format!("{p:.1}"))
        );
        let go = rows.iter().find(|g| {
            g.shape == Shape::Go
                && g.transition == r.transition
                && g.clients == r.clients
                && g.chats == r.chats
        });
        if let Some(g) = go {
            let _ = write!(
                s,
                " | {:>10.0} {:>7} {:>6.2}x",
                g.updates_per_sec,
                g.per_update.map_or("-".to_owned(), |p| format!("{p:.1}")),
                r.updates_per_sec / g.updates_per_sec.max(1e-9)
            );
        }
        let _ = writeln!(s);
    }
    s
}

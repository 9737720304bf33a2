//! `chatstate work`: one worker process on a Postgres database.
//!
//! It runs one `chatstate_worker::Runtime` on a `PgStore` with
//! `Notify::InTransaction`, so the ownership hints of its commits go out
//! with the COMMIT and reach every process listening on `chat:ownership`;
//! it hears them through `chatstate_worker::pg::ownership_listener` and
//! sweeps for what no hint announced. Its handler plays the model side of a
//! chat: each claimed chat's turn is generated step by step (a short pause
//! stands for the model), sometimes calling a server tool and answering it
//! in the next step, and finished, which promotes a queued message; it goes
//! on while the chat stays ours and runnable.
//!
//! With `--record FILE`, every Update it tries to commit is written to FILE
//! as it happens (see [`crate::record`]), so that a check can replay what
//! several such processes committed even if one was killed. SIGTERM or
//! ctrl-c stops it gracefully; its counters go to stdout as one JSON line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chatstate::model::ToolState;
use chatstate::{
    ChatMachine, ChatRecord, CommitObserver, Error, ExecutionState, Input, JsonText, NewMessage,
    Notify, Options, Part, RejectionKind, Role, WorkerId,
};
use chatstate_store_pg::{PgNotifyListener, PgStore, Pooling};
use chatstate_worker::{DEFAULT_CAPACITY, Handler, Lease, Released, Runtime, Stats};

use crate::record::Recorder;

/// The name of the server tool the handler calls.
const SERVER_TOOL: &str = "web_search";

/// How many refused steps in a row (the chat moved on under us in a way
/// that is not a history change) before the handler gives the chat up.
const MAX_REFUSED: u32 = 5;

/// Arguments of `chatstate work`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The database to work on (migrated if needed).
    #[arg(long)]
    database_url: String,
    /// What sits between this process and the server: `session` (a direct
    /// connection or a session pooler) or `transaction` (a transaction
    /// pooler such as PgBouncer in transaction mode; the database must be
    /// migrated already, and the listener needs `--listen-url`).
    #[arg(long, value_enum, default_value_t = PoolingArg::Session)]
    pooling: PoolingArg,
    /// The URL the `chat:ownership` listener connects to: the server
    /// itself, never a transaction pooler (LISTEN needs a session of its
    /// own). Defaults to `--database-url`.
    #[arg(long, value_name = "URL")]
    listen_url: Option<String>,
    /// Write every Update this process tries to commit to FILE, one JSON
    /// line each, flushed as it happens.
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// A lease whose heartbeat is this old is stale (the heartbeat, sweep
    /// and grace intervals follow from it).
    #[arg(long, default_value_t = 30_000)]
    heartbeat_stale_ms: u64,
    /// The most chats held at once.
    #[arg(long, default_value_t = DEFAULT_CAPACITY)]
    capacity: usize,
    /// How long generating one step takes.
    #[arg(long, default_value_t = 50)]
    step_ms: u64,
    /// This worker's id (a UUID); a random one if not given.
    #[arg(long)]
    worker_id: Option<uuid::Uuid>,
    /// A deliberately broken worker, for checking that the checks catch
    /// it: steps are committed unfenced, without the lease's runner check
    /// or history expectation.
    #[arg(long, hide = true)]
    unfenced: bool,
}

/// `--pooling`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum PoolingArg {
    /// A session per connection (direct, or a session pooler).
    Session,
    /// A transaction pooler.
    Transaction,
}

impl From<PoolingArg> for Pooling {
    fn from(p: PoolingArg) -> Pooling {
        match p {
            PoolingArg::Session => Pooling::Session,
            PoolingArg::Transaction => Pooling::Transaction,
        }
    }
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let stats = rt.block_on(work(args))?;
    println!("{stats}");
    Ok(ExitCode::SUCCESS)
}

/// Runs the worker until SIGTERM or ctrl-c; returns its final counters as
/// a JSON line.
async fn work(args: &Args) -> anyhow::Result<String> {
    let options = Options {
        heartbeat_stale: Duration::from_millis(args.heartbeat_stale_ms),
        ..Options::default()
    };
    options.validate().context("--heartbeat-stale-ms")?;
    // The runtime checks the rest when it starts; refuse before touching
    // the database or the record file.
    anyhow::ensure!(args.capacity > 0, "--capacity must be at least 1");
    let recorder: Option<Arc<dyn CommitObserver>> = match &args.record {
        Some(path) => {
            Some(Arc::new(Recorder::create(path).with_context(|| {
                format!("creating the record file {}", path.display())
            })?))
        }
        None => None,
    };
    let store = crate::pg::connect_pooled(&args.database_url, args.pooling.into()).await?;
    let listen_url = args.listen_url.as_deref().unwrap_or(&args.database_url);
    // The listener reads the connect options only; it opens its own
    // connection.
    let listen_pool = chatstate_store_pg::pool_options()
        .max_connections(1)
        .connect_lazy(listen_url)
        .context("parsing --listen-url")?;
    let mut listener = PgNotifyListener::connect(&listen_pool)
        .await
        .context("connecting the listener (--listen-url)")?;
    listener
        .listen_ownership()
        .await
        .context("listening on chat:ownership")?;
    let handler = Work {
        store: store.clone(),
        options,
        step: Duration::from_millis(args.step_ms),
        observer: recorder.clone(),
        unfenced: args.unfenced,
    };
    let mut builder = Runtime::builder(store, Notify::InTransaction, handler)
        .options(options)
        .capacity(args.capacity)
        .hints(listener);
    if let Some(id) = args.worker_id {
        builder = builder.worker_id(WorkerId(id));
    }
    if let Some(recorder) = recorder {
        builder = builder.observer(recorder);
    }
    let runtime = builder.spawn()?;
    let worker = runtime.worker_id();
    eprintln!("chatstate work: worker {} running", worker.0);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("listening for ctrl-c")?,
    }
    let stats = runtime.shutdown().await;
    Ok(stats_line(worker, &stats))
}

/// The final counters as one JSON line.
fn stats_line(worker: WorkerId, s: &Stats) -> String {
    serde_json::json!({
        "worker_id": worker.0,
        "claims_won": s.claims_won,
        "claims_held": s.claims_held,
        "claims_not_runnable": s.claims_not_runnable,
        "claims_failed": s.claims_failed,
        "claims_skipped": s.claims_skipped,
        "heartbeats": s.heartbeats,
        "heartbeat_errors": s.heartbeat_errors,
        "leases_lost": s.leases_lost,
        "handed_back": s.handed_back,
        "finished": s.finished,
        "errored": s.errored,
        "hints": s.hints,
        "hints_deduplicated": s.hints_deduplicated,
        "hints_at_capacity": s.hints_at_capacity,
        "sweeps": s.sweeps,
        "swept": s.swept,
        "source_errors": s.source_errors,
    })
    .to_string()
}

/// The handler: generates each claimed chat's turns.
struct Work {
    store: PgStore,
    options: Options,
    step: Duration,
    observer: Option<Arc<dyn CommitObserver>>,
    unfenced: bool,
}

impl Handler<PgStore> for Work {
    async fn handle(&self, lease: &Lease<PgStore>) -> Released {
        let mut refused = 0;
        loop {
            if lease.is_lost() {
                return Released::Finished;
            }
            if lease.is_stopping() {
                return Released::HandBack;
            }
            // The history this step is generated from; the fenced commit
            // expects it unchanged.
            let record = match lease.load().await {
                Ok(record) => record,
                Err(_) if lease.is_lost() => return Released::Finished,
                Err(_) => return Released::Errored,
            };
            if record.row.owner != Some(lease.owner()) || !record.state().is_runnable() {
                return Released::Finished;
            }
            let Some(inputs) = next_step(&record) else {
                return Released::Finished;
            };
            tokio::select! {
                () = tokio::time::sleep(self.step) => {}
                () = lease.lost() => return Released::Finished,
                () = lease.stopping() => return Released::HandBack,
            }
            let committed = if self.unfenced {
                self.commit_unfenced(lease, inputs).await
            } else {
                lease
                    .update(async |tx| {
                        for input in inputs {
                            tx.apply_input(input).await?;
                        }
                        Ok(())
                    })
                    .await
            };
            match committed {
                Ok(()) => refused = 0,
                Err(e) if e.is_committed() => refused = 0,
                // The user edited meanwhile: generate from the new history.
                Err(e) if is_history_changed(&e) => {}
                Err(_) if lease.is_lost() => return Released::Finished,
                // The chat moved on another way (an interruption): look
                // again, a few times.
                Err(Error::Rejected(_)) if refused < MAX_REFUSED => refused += 1,
                Err(_) => return Released::Errored,
            }
        }
    }
}

impl Work {
    /// The broken variant: the same step through an unfenced handle.
    async fn commit_unfenced(
        &self,
        lease: &Lease<PgStore>,
        inputs: Vec<Input>,
    ) -> Result<(), Error> {
        let mut machine = ChatMachine::new(
            self.store.clone(),
            Notify::InTransaction,
            lease.chat_id(),
            self.options,
        );
        if let Some(observer) = &self.observer {
            machine = machine.observed(observer.clone());
        }
        machine
            .update(async |tx| {
                for input in inputs {
                    tx.apply(input).await?;
                }
                Ok(())
            })
            .await
    }
}

fn is_history_changed(e: &Error) -> bool {
    matches!(
        e.rejection().map(|r| &r.kind),
        Some(RejectionKind::HistoryChanged { .. })
    )
}

/// The next step of a runnable chat, as read: finalise an interruption;
/// answer an outstanding server tool call and finish the turn; or, for a
/// fresh turn, either call the server tool (answered next step) or answer
/// and finish. `None` for a chat this worker does not drive (one waiting
/// for client tool results).
fn next_step(record: &ChatRecord) -> Option<Vec<Input>> {
    use ExecutionState as St;
    let step = |messages: Vec<NewMessage>, consume: bool| Input::CommitStep {
        messages,
        consume_compaction_request: consume,
    };
    match record.state() {
        St::I0 | St::I1 => Some(vec![Input::FinishInterruption {
            partial_messages: Vec::new(),
        }]),
        St::R0 | St::R1 => {
            if record.row.compaction_requested_at.is_some() {
                let summary = NewMessage::assistant("a summary of the conversation");
                return Some(vec![step(vec![summary], true)]);
            }
            let tools = ToolState::from_history(
                record
                    .active_history()
                    .map(|m| (m.role, m.content.as_slice())),
            );
            let open: Vec<_> = tools
                .calls
                .iter()
                .filter(|c| !c.provider_executed && !tools.handled.contains(&c.id))
                .collect();
            let answer =
                NewMessage::assistant(format!("answer at history {}", record.row.versions.history));
            if !open.is_empty() {
                let results = open
                    .iter()
                    .map(|c| Part::tool_result(&c.id, &c.name, JsonText::string("three hits")))
                    .collect();
                return Some(vec![
                    step(vec![NewMessage::new(Role::Tool, results), answer], false),
                    Input::FinishTurn,
                ]);
            }
            // A third of the turns call the server tool first.
            let pick = record.row.id.0.as_u128() as u64 ^ record.row.versions.history as u64;
            if pick.is_multiple_of(3) {
                let id = format!("search-{}-{}", record.row.id.0, record.row.versions.history);
                let call = NewMessage::new(
                    Role::Assistant,
                    vec![Part::text("let me look"), Part::tool_call(id, SERVER_TOOL)],
                );
                Some(vec![step(vec![call], false)])
            } else {
                Some(vec![step(vec![answer], false), Input::FinishTurn])
            }
        }
        _ => None,
    }
}

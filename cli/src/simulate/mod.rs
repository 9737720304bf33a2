//! `chatstate simulate`: a chat server's workload on one store, with every
//! committed Update re-checked against the model afterwards.
//!
//! Users ([`users`]) create chats and act on them: send (directly, queued or
//! interrupting), edit, archive, delete and promote queued messages, answer
//! client tool calls, interrupt, ask for compaction. Workers ([`workers`])
//! are instances of the shipped worker runtime, `chatstate_worker::Runtime`:
//! they hear `chat:ownership` hints from the run's publisher, sweep for
//! lapsed leases, claim, heartbeat, and run turns through a handler that
//! commits fenced worker steps: commit steps, call tools, wait for client
//! results, finish turns and errors, hand chats back. A runtime may crash
//! (`Runtime::abort`, inside an Update or between two): its transactions
//! roll back, its leases lapse, and another runtime's sweep takes its chats
//! over.
//!
//! Every Update, the users' and the runtimes', is recorded through a
//! `CommitObserver` ([`record`]); at the end every chat is read once more
//! ([`finals`]) and the record is replayed by the model's oracle,
//! [`chatstate_model::oracle`]. [`summary`] says what happened.
//!
//! Every task draws its choices from its own RNG seeded from `--seed`, so
//! the choices are reproducible; the interleaving is not (it is real
//! concurrency).

mod finals;
mod prometheus;
mod record;
mod shared;
mod summary;
mod users;
mod workers;

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use chatstate::{Options, Store, Transition};
use chatstate_model::oracle::{self, Config};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use record::Recorder;
use shared::{Shared, SimPublisher};
pub(crate) use summary::{Summary, percentile};
use workers::Totals;

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
    /// Workers: worker runtimes, each running several chats at once.
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
    /// Chance that a worker's handler crashes its runtime at a step (and
    /// half that, that it stalls for longer than the heartbeat staleness).
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
    /// After the summary, print the metrics the run recorded (Updates and
    /// transitions by outcome, Update latency, lock waits, the worker
    /// runtimes' claims and leases) in the Prometheus text format; see
    /// docs/observability.md.
    #[arg(long)]
    pub(crate) metrics: bool,
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
    let metrics = args
        .metrics
        .then(prometheus::Metrics::install)
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let summary = runtime.block_on(async {
        let upkeep = metrics.as_ref().map(|m| tokio::spawn(m.upkeep()));
        let summary = simulate(args).await;
        if let Some(upkeep) = upkeep {
            upkeep.abort();
        }
        summary
    })?;
    print!("{}", summary.render());
    if let Some(metrics) = &metrics {
        print!("{}", metrics.render());
    }
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
            run_on(
                chatstate_store_mem::MemStore::new(),
                args,
                seed,
                stop,
                Recorder::new(),
            )
            .await?,
            "mem".to_owned(),
        ),
        StoreKind::Pg => {
            let target = crate::pg::connect(args.database_url.as_deref()).await?;
            (
                run_on(target.store, args, seed, stop, Recorder::new()).await?,
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

/// Runs the workload on `store`, recording through `recorder`, and checks
/// it.
async fn run_on<S: Store>(
    store: S,
    args: &Args,
    seed: u64,
    stop: Stop,
    recorder: Recorder,
) -> anyhow::Result<Summary> {
    let options = Options {
        heartbeat_stale: Duration::from_millis(args.heartbeat_stale_ms.max(1)),
        ..Options::default()
    };
    let publisher = Arc::new(SimPublisher::new());
    let sh = Arc::new(Shared::new(
        store,
        publisher,
        Arc::new(recorder),
        options,
        args,
        stop,
    ));
    let mut master = StdRng::seed_from_u64(seed);
    // Seeds in a fixed order: workers, then users.
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.workers {
        let rng = StdRng::seed_from_u64(master.random());
        workers.spawn(workers::worker(sh.clone(), rng));
    }
    let mut users = tokio::task::JoinSet::new();
    for u in 0..args.users {
        let rng = StdRng::seed_from_u64(master.random());
        users.spawn(users::user(sh.clone(), u, rng));
    }
    let bar = progress_bar(stop);
    let ticker = tokio::spawn(progress(sh.clone(), bar.clone()));
    while let Some(done) = users.join_next().await {
        done.context("a user task panicked")?;
    }
    let mut totals = Totals::default();
    while let Some(done) = workers.join_next().await {
        totals.add(done.context("a worker task panicked")??);
    }
    let elapsed = sh.elapsed();
    ticker.await.context("the progress task panicked")?;
    bar.finish_and_clear();

    // Every task has stopped: read each chat once more and check it all.
    let mut recorded = sh.recorder.finish();
    let mut tally = sh.take_tally();
    let finals = finals::read_finals(|id| sh.machine(id), &mut tally).await;
    recorded.forget(|chat| finals.unread.contains(&chat));
    let published = sh.publisher.take();
    let notifications_differing = recorded.attach_published(&published);
    for c in &mut tally.created {
        c.published = published.get(&(c.new.id, 1)).cloned().unwrap_or_default();
    }
    for (t, n) in recorded.transitions() {
        *tally.calls.entry((t, "ok")).or_default() += n;
    }
    let created = tally.created.len() as u64;
    *tally
        .calls
        .entry((Transition::CreateChat, "ok"))
        .or_default() += created;
    // Each Update is replayed at the store time it saw, so times compare
    // exactly on either store.
    let config = Config {
        options,
        exact_time: true,
    };
    let verdict = oracle::check_with_unknown(
        &config,
        &tally.created,
        recorded.committed(),
        recorded.maybe(),
        &finals.stored,
    );
    let mut latencies = std::mem::take(&mut tally.latencies_us);
    latencies.sort_unstable();
    Ok(Summary {
        store: String::new(),
        seed,
        args: args.clone(),
        chats: tally.created.len(),
        elapsed,
        committed: recorded.committed().count() as u64,
        maybe_committed: recorded.maybe().len(),
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        hints: sh.publisher.hints(),
        workers: totals,
        takeovers: recorded.takeovers(),
        notifications_differing,
        tally,
        verdict,
    })
}

/// Moves the progress bar and stops the run when its time is up.
async fn progress<S: Store>(sh: Arc<Shared<S>>, bar: ProgressBar) {
    loop {
        let elapsed = sh.started.elapsed();
        match sh.stop() {
            Stop::Time(limit) => {
                bar.set_position(elapsed.as_millis() as u64);
                if elapsed >= limit {
                    sh.halt();
                }
            }
            Stop::Ops(_) => bar.set_position(sh.attempts.load(Ordering::Relaxed)),
        }
        let committed = sh.recorder.committed();
        bar.set_message(format!(
            "{committed} updates, {:.0}/s",
            committed as f64 / elapsed.as_secs_f64().max(1e-3)
        ));
        if sh.stopped() {
            break;
        }
        sh.sleep(Duration::from_millis(50)).await;
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

#[cfg(test)]
mod tests {
    use chatstate_store_mem::MemStore;

    use super::*;

    /// A short in-memory run of `ops` Update attempts.
    async fn short_run(crash_rate: f64, ops: u64, recorder: Recorder) -> Summary {
        let args = Args {
            chats: 12,
            users: 4,
            workers: 3,
            crash_rate,
            ..Args::default()
        };
        run_on(MemStore::new(), &args, 11, Stop::Ops(ops), recorder)
            .await
            .expect("the run completes")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crashed_runtimes_are_replaced_and_their_chats_taken_over() {
        let summary = short_run(0.05, 3000, Recorder::new()).await;
        let v = &summary.verdict;
        assert!(v.violations.is_empty(), "{}", summary.render());
        assert!(summary.ok(), "{}", summary.render());
        let w = &summary.workers;
        assert!(w.crashes > 0, "{}", summary.render());
        assert!(
            w.claims_won > 0 && summary.takeovers > 0,
            "{}",
            summary.render()
        );
        assert!(
            v.updates_checked as u64 >= summary.committed,
            "{}",
            summary.render()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_record_is_a_violation() {
        // The 40th committed Update (users' and runtimes' alike) is left
        // out of the record: the replay finds its snapshot missing.
        let summary = short_run(0.0, 600, Recorder::dropping(40)).await;
        assert!(
            !summary.verdict.violations.is_empty(),
            "{}",
            summary.render()
        );
        assert!(!summary.ok());
    }
}

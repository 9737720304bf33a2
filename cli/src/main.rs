//! `chatstate`: the command-line tool of the chatstate workspace.
//!
//! Each subcommand lives in its own module, which owns its clap arguments
//! and a `run` function returning the process exit code; `main` only parses
//! and dispatches. Adding a subcommand means one new module and one variant
//! of [`Command`]. Modules shared by subcommands: [`trace`] (the trace
//! format, its compiler, the step records and the model's reference run,
//! below [`tracegen`] and [`replay`], which depend on it and never the
//! other way; `tests/layers.rs` checks it) and [`pg`] (where `--store pg`
//! finds its database).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod check;
mod demo;
mod explore;
mod inspect;
mod matrix;
mod migrate;
mod pg;
mod record;
mod replay;
mod show;
mod simulate;
mod trace;
mod tracegen;
mod work;

/// mimalloc instead of the system allocator: `chatstate check` spends much
/// of its time allocating and freeing small chat states.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The chat execution state toolkit: model checks, the matrix, trace
/// replay, simulation, benchmarks and the model Explorer.
#[derive(Debug, Parser)]
#[command(name = "chatstate", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the exhaustive model checks; exits non-zero if a property fails.
    Check(check::Args),
    /// Print the transition matrix (markdown, Mermaid, Graphviz dot, JSON,
    /// or the whole docs/state-model.md).
    Matrix(matrix::Args),
    /// Replay a trace on the model, the in-memory store or Postgres, one
    /// JSON line per step; `--compare` runs all three and fails on the first
    /// difference.
    Replay(replay::Args),
    /// Run a workload of users and workers on many chats and re-check every
    /// committed Update against the model.
    Simulate(simulate::Args),
    /// Measure Updates/s and round trips per Update (on Postgres, against
    /// the Go-shaped statement sequence).
    Bench(bench::Args),
    /// Serve the stateright Explorer on the model.
    Explore(explore::Args),
    /// The model checks, then a short simulated workload in memory.
    Demo(demo::Args),
    /// Print a generated trace (many chats, deterministic).
    TraceGen(tracegen::Args),
    /// Run one worker process on a Postgres database until SIGTERM.
    Work(work::Args),
    /// Schema migrations of a database: status, up, or the SQL to apply.
    Migrate(migrate::Args),
    /// Show one chat of a database: state, lease, versions, queue, recent
    /// history and what it may do next.
    Inspect(inspect::InspectArgs),
    /// List the chats of a database by state, status or stale lease.
    Chats(inspect::ChatsArgs),
}

fn main() -> ExitCode {
    match dispatch(Cli::parse().command) {
        Ok(code) => code,
        // Output piped into `head` and the like: stop quietly.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line; no backtrace, whatever
            // RUST_BACKTRACE says: these are a user's errors, not bugs.
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// An error and its sources, on one line. A source whose text its parent
/// already ends with (sqlx's database errors repeat theirs) is skipped.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Check(args) => check::run(&args, check::MODELS),
        Command::Matrix(args) => matrix::run(&args),
        Command::Replay(args) => replay::run(&args),
        Command::Simulate(args) => simulate::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Explore(args) => explore::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::TraceGen(args) => tracegen::run(&args),
        Command::Work(args) => work::run(&args),
        Command::Migrate(args) => migrate::run(&args),
        Command::Inspect(args) => inspect::run_inspect(&args),
        Command::Chats(args) => inspect::run_chats(&args),
    }
}

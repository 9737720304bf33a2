//! `chatstate`: the command-line tool of the chatstate workspace.
//!
//! Each subcommand lives in its own module, which owns its clap arguments
//! and a `run` function returning the process exit code; `main` only parses
//! and dispatches. Adding a subcommand (replay, simulate, bench, explore)
//! means one new module and one variant of [`Command`].

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod check;
mod matrix;

/// The chat execution state toolkit: model checks and the matrix.
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
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Check(args) => check::run(
            &args,
            &[
                chatstate_model::check::single::run,
                chatstate_model::check::concurrency::run,
            ],
        ),
        Command::Matrix(args) => matrix::run(&args),
    }
}

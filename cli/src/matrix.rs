//! `chatstate matrix`: prints the transition matrix in one of several
//! formats, all rendered by `chatstate_model::render`. `--format doc`
//! prints the whole `docs/state-model.md`.

use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::Context as _;
use chatstate_model::{Matrix, render};

/// Arguments of `chatstate matrix`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value_t = Format::Markdown)]
    format: Format,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Format {
    /// One markdown table per from-state, with the counts.
    Markdown,
    /// A Mermaid state diagram.
    Mermaid,
    /// A Graphviz digraph.
    Dot,
    /// States, transitions, pairs and triples as JSON.
    Json,
    /// The whole docs/state-model.md.
    Doc,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let matrix = Matrix::REFERENCE;
    let text = match args.format {
        Format::Markdown => render::markdown(&matrix),
        Format::Mermaid => render::mermaid(&matrix),
        Format::Dot => render::dot(&matrix),
        Format::Json => render::json(&matrix),
        Format::Doc => render::state_model_doc(&matrix),
    };
    io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("writing the matrix")?;
    Ok(ExitCode::SUCCESS)
}

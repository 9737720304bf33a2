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
//! The step records and the model's run are the trace layer's
//! ([`crate::trace::record`], [`crate::trace::model`]); the stores' run is
//! [`store`].
//!
//! Chats are independent, so the store backends run the steps of different
//! chats concurrently, each chat's steps in order; an `advance_clock` step
//! is a barrier, since it moves time for every chat.

mod store;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use chatstate_store_mem::{MemClock, MemStore};
use serde::Serialize;
use serde_json::Value;

use crate::trace::{EPOCH, Line, Names, Record, run_model};
use store::run_store;

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
pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let trace = crate::tracegen::expand(crate::trace::load(&args.trace)?)?;
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

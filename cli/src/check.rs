//! `chatstate check`: runs the exhaustive model checks and prints, for each
//! model, the unique states, the depth, the time and every property with
//! its verdict; a failed property comes with its counterexample, one step
//! per line.

use std::io::{self, Write};
use std::num::NonZeroUsize;
use std::process::ExitCode;

use anyhow::Context as _;
use chatstate_model::check::{CheckReport, Expectation};

/// Arguments of `chatstate check`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Checker threads [default: the number of CPUs].
    #[arg(long, short = 't', value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// Run only this model [default: every model, in order].
    #[arg(long, value_enum)]
    model: Option<Which>,
}

/// A model `chatstate check --model` can run alone (for timing one model).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    /// One chat under every transition (the matrix against the semantics).
    Single,
    /// Clients and workers on one chat row (the Update protocol).
    Concurrency,
    /// Worker runtimes on one chat, two workers then three.
    Runtime,
}

impl Args {
    /// Arguments with the given thread count (`None`: one per CPU).
    pub(crate) fn with_threads(threads: Option<u16>) -> Self {
        Args {
            threads,
            model: None,
        }
    }
}

/// One exhaustive model check, run with the given number of threads.
pub(crate) type ModelCheck = fn(usize) -> CheckReport;

/// The models `chatstate check` runs, in order: the matrix on one chat, the
/// Update protocol around it, and the worker runtime's protocol on top of
/// that (two workers, then three).
pub(crate) const MODELS: &[ModelCheck] = &[
    chatstate_model::check::single::run,
    chatstate_model::check::concurrency::run,
    chatstate_model::check::runtime::run,
    chatstate_model::check::runtime::run_three_workers,
];

/// The entries of [`MODELS`] that `--model` selects.
fn selected(which: Which) -> &'static [ModelCheck] {
    match which {
        Which::Single => &MODELS[..1],
        Which::Concurrency => &MODELS[1..2],
        Which::Runtime => &MODELS[2..],
    }
}

/// Runs every check in order and prints its report; fails the process if
/// any property of any model fails.
pub(crate) fn run(args: &Args, checks: &[ModelCheck]) -> anyhow::Result<ExitCode> {
    let threads = args.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        usize::from,
    );
    let checks: &[ModelCheck] = match args.model {
        Some(which) => selected(which),
        None => checks,
    };
    let mut all_hold = true;
    for check in checks {
        let report = check(threads);
        let mut out = io::stdout().lock();
        print_report(&mut out, &report).context("writing the check report")?;
        all_hold &= report.ok();
    }
    Ok(if all_hold {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_report(out: &mut impl Write, report: &CheckReport) -> io::Result<()> {
    writeln!(
        out,
        "{}: {} unique states, max depth {}, {:.2} s on {} thread{}",
        report.model,
        report.unique_states,
        report.max_depth,
        report.seconds,
        report.threads,
        if report.threads == 1 { "" } else { "s" }
    )?;
    for p in &report.properties {
        let verdict = if p.holds { "ok" } else { "FAIL" };
        writeln!(
            out,
            "  {verdict:<4}  {:<9}  {}",
            p.expectation.to_string(),
            p.name
        )?;
        if p.holds {
            continue;
        }
        match (&p.path, p.expectation) {
            (Some(path), _) => {
                for line in path {
                    writeln!(out, "          {line}")?;
                }
            }
            (None, Expectation::Sometimes) => {
                writeln!(out, "          no reachable state satisfies it")?;
            }
            (None, _) => writeln!(out, "          (no path recorded)")?,
        }
    }
    let failed = report.properties.iter().filter(|p| !p.holds).count();
    writeln!(
        out,
        "{}: {} properties, {}",
        report.model,
        report.properties.len(),
        if failed == 0 {
            "all hold".to_owned()
        } else {
            format!("{failed} FAILED")
        }
    )
}

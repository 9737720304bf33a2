//! `chatstate demo`: the README's main job. Runs the exhaustive model
//! checks (as `chatstate check`), then a few seconds of simulated users and
//! workers on the in-memory store with every commit re-checked against the
//! model (as `chatstate simulate --store mem`), prints both, and fails if
//! either finds anything.

use std::process::ExitCode;

use anyhow::Context as _;

use crate::check;
use crate::simulate::{self, StoreKind};

/// Arguments of `chatstate demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Seconds of simulation.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seed of the simulation [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Checker threads [default: the number of CPUs].
    #[arg(long, short = 't', value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    println!("== exhaustive model checks");
    let checked = check::run(
        &check::Args::with_threads(args.threads),
        &[
            chatstate_model::check::single::run,
            chatstate_model::check::concurrency::run,
        ],
    )?;
    println!();
    println!("== simulated workload on the in-memory store");
    let sim = simulate::Args {
        store: StoreKind::Mem,
        duration: Some(args.seconds),
        seed: args.seed,
        ..simulate::Args::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let summary = runtime.block_on(simulate::simulate(&sim))?;
    print!("{}", summary.render());
    let ok = checked == ExitCode::SUCCESS && summary.ok();
    println!();
    println!(
        "demo: {}",
        if ok {
            "every property holds and every committed Update agrees with the model"
        } else {
            "FAILED (see above)"
        }
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

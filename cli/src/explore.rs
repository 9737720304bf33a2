//! `chatstate explore`: serves stateright's Explorer, a web page to click
//! through the states of the single-chat model (or, with `--model
//! concurrency`, of the concurrency model) one action at a time, and to run
//! the checker on demand.
//!
//! The Explorer prints states with `{:#?}`; both models' states
//! debug-print as their readable one-line Display.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;

use anyhow::Context as _;
use chatstate_model::Matrix;
use chatstate_model::check::concurrency::{ConcurrencyModel, Config};
use chatstate_model::check::single::SingleChat;
use stateright::Model;

/// Arguments of `chatstate explore`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
    /// The model to explore.
    #[arg(long, value_enum, default_value_t = Which::Single)]
    model: Which,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Which {
    /// One chat under every transition (the matrix against the semantics).
    Single,
    /// Clients and workers on one chat row (locks, leases, notifications).
    Concurrency,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    // The Explorer panics on an address it cannot bind; fail politely
    // instead (the port could still be taken in between, rarely).
    drop(TcpListener::bind(args.addr).with_context(|| format!("cannot listen on {}", args.addr))?);
    let name = match args.model {
        Which::Single => "single-chat",
        Which::Concurrency => "concurrency",
    };
    println!(
        "Explorer of the {name} model on http://{}/ (Ctrl-C to stop)",
        args.addr
    );
    std::io::stdout().flush()?;
    match args.model {
        Which::Single => {
            SingleChat::new(Matrix::REFERENCE)
                .checker()
                .serve(args.addr);
        }
        Which::Concurrency => {
            ConcurrencyModel::new(Config::default())
                .checker()
                .serve(args.addr);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_states_debug_print_readably() {
        let model = ConcurrencyModel::new(Config::default());
        let init = &model.init_states()[0];
        assert_eq!(format!("{init:#?}"), init.to_string());
    }
}

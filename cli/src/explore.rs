//! `chatstate explore`: serves stateright's Explorer, a web page to click
//! through the states of the single-chat model (or, with `--model
//! concurrency`, of the concurrency model) one action at a time, and to run
//! the checker on demand.
//!
//! The Explorer prints states with `{:#?}`. The single-chat model's states
//! already debug-print as their one-line Display; the concurrency model's
//! derive Debug, so the CLI wraps that model in [`Readable`], whose states
//! debug-print as their Display.

use std::fmt;
use std::hash::Hash;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;

use anyhow::Context as _;
use chatstate_model::Matrix;
use chatstate_model::check::concurrency::{ConcurrencyModel, Config};
use chatstate_model::check::single::SingleChat;
use stateright::{Model, Property};

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
            Readable::new(ConcurrencyModel::new(Config::default()))
                .checker()
                .serve(args.addr);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A state shown by its Display, also where Debug is asked for.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct Shown<T>(T);

impl<T: fmt::Display> fmt::Debug for Shown<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// A model whose states print through Display: the same states, actions
/// and properties as the model it wraps.
pub(crate) struct Readable<M: Model> {
    inner: M,
    properties: Vec<Property<M>>,
}

impl<M: Model> Readable<M> {
    fn new(inner: M) -> Self {
        let properties = inner.properties();
        assert!(
            properties.len() <= TRAMPOLINES,
            "Readable forwards at most {TRAMPOLINES} properties"
        );
        Readable { inner, properties }
    }
}

/// Property conditions are plain function pointers, which cannot capture
/// the wrapped model's condition; one monomorphised function per property
/// index forwards to it instead.
const TRAMPOLINES: usize = 32;

type Condition<M> = fn(&Readable<M>, &Shown<<M as Model>::State>) -> bool;

fn forward<M: Model, const I: usize>(m: &Readable<M>, s: &Shown<M::State>) -> bool {
    (m.properties[I].condition)(&m.inner, &s.0)
}

fn trampolines<M: Model>() -> [Condition<M>; TRAMPOLINES] {
    macro_rules! table {
        ($($i:literal)*) => { [$(forward::<M, $i> as Condition<M>),*] };
    }
    table!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31)
}

impl<M> Model for Readable<M>
where
    M: Model,
    M::State: fmt::Display + fmt::Debug,
    M::Action: fmt::Debug,
{
    type State = Shown<M::State>;
    type Action = M::Action;

    fn init_states(&self) -> Vec<Self::State> {
        self.inner.init_states().into_iter().map(Shown).collect()
    }

    fn actions(&self, state: &Self::State, actions: &mut Vec<Self::Action>) {
        self.inner.actions(&state.0, actions);
    }

    fn next_state(&self, last: &Self::State, action: Self::Action) -> Option<Self::State> {
        self.inner.next_state(&last.0, action).map(Shown)
    }

    fn format_action(&self, action: &Self::Action) -> String {
        self.inner.format_action(action)
    }

    fn format_step(&self, last: &Self::State, action: Self::Action) -> Option<String> {
        self.inner.format_step(&last.0, action)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let table = trampolines::<M>();
        self.properties
            .iter()
            .zip(table)
            .map(|(p, condition)| Property {
                expectation: p.expectation.clone(),
                name: p.name,
                condition,
            })
            .collect()
    }

    fn within_boundary(&self, state: &Self::State) -> bool {
        self.inner.within_boundary(&state.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_forwards_properties_and_prints_display() {
        let model = Readable::new(ConcurrencyModel::new(Config::default()));
        let props = model.properties();
        assert_eq!(props.len(), model.inner.properties().len());
        let init = &model.init_states()[0];
        for (p, q) in props.iter().zip(model.inner.properties()) {
            assert_eq!(
                (p.condition)(&model, init),
                (q.condition)(&model.inner, &init.0),
                "{}",
                p.name
            );
        }
        assert_eq!(format!("{init:#?}"), init.0.to_string());
    }
}

//! Stateright models of the chat state machine (feature `check`).
//!
//! - [`single`]: one chat under every transition with small representative
//!   inputs; checks the matrix against the semantics exhaustively.
//! - [`concurrency`]: one chat row shared by clients and workers running
//!   Updates, Locks, ReadLocks and heartbeats; checks the protocol around
//!   the matrix (locks, bumps, post-commit publication, leases, fencing).
//! - [`runtime`]: worker runtimes claiming, heartbeating, handling and
//!   handing back one chat; checks the protocol built on those primitives
//!   (mutual exclusion of worker commits, quiet losing claims, the history
//!   expectation, and recovery under weak fairness).
//!
//! All produce a [`CheckReport`], which `chatstate check` prints and the
//! tests in `model/tests/` assert on.

use std::fmt;

pub mod concurrency;
pub mod runtime;
pub mod single;

/// How a property is meant to hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expectation {
    /// In every reachable state.
    Always,
    /// In at least one reachable state.
    Sometimes,
    /// On every path, eventually.
    Eventually,
}

impl fmt::Display for Expectation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expectation::Always => "always",
            Expectation::Sometimes => "sometimes",
            Expectation::Eventually => "eventually",
        })
    }
}

/// The verdict on one named property.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PropertyVerdict {
    /// The property's name.
    pub name: String,
    /// How it is meant to hold.
    pub expectation: Expectation,
    /// True if it holds within the bounds.
    pub holds: bool,
    /// For a failed property (or a `sometimes` example when asked for), the
    /// path from an initial state, one readable line per step.
    pub path: Option<Vec<String>>,
}

/// The result of one exhaustive run.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckReport {
    /// Which model.
    pub model: &'static str,
    /// Unique states visited.
    pub unique_states: usize,
    /// Deepest path explored.
    pub max_depth: usize,
    /// Wall time.
    pub seconds: f64,
    /// Threads used.
    pub threads: usize,
    /// One verdict per property.
    pub properties: Vec<PropertyVerdict>,
}

impl CheckReport {
    /// True if every property holds.
    pub fn ok(&self) -> bool {
        self.properties.iter().all(|p| p.holds)
    }

    /// The verdict of a property by name.
    pub fn property(&self, name: &str) -> Option<&PropertyVerdict> {
        self.properties.iter().find(|p| p.name == name)
    }
}

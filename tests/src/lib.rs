//! Test support for chatstate: backends to run the same tests on, canned
//! ways to bring a chat into every state, and the generic store suite.
//!
//! Every test in [`suite`] is generic over a [`Backend`]: the in-memory
//! store ([`MemBackend`]) and Postgres ([`PgBackend`], a fresh database per
//! test on a throwaway cluster the harness starts itself). The test binaries
//! in `tests/tests/` instantiate the suite once per backend.

pub mod fixture;
pub mod suite;

use std::future::Future;

use chatstate::{Store, TestControl};
use chatstate_model::Timestamp;
use chatstate_store_mem::{MemClock, MemStore};

pub use fixture::{Fx, Setup, SetupStep};

/// A store implementation the generic tests can run on.
pub trait Backend: Send + Sync + 'static {
    /// The store.
    type S: Store + TestControl;

    /// A name for messages.
    fn name(&self) -> &'static str;

    /// A fresh, empty store (for Postgres: a new database).
    fn store(&self) -> impl Future<Output = Self::S> + Send;

    /// How many transactions are waiting for a row lock right now.
    fn lock_waiters(&self, store: &Self::S) -> impl Future<Output = usize> + Send;
}

/// The in-memory store on a manual clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemBackend;

/// The start of the manual clock in tests (2026-01-01T00:00:00Z).
pub const TEST_EPOCH: Timestamp = Timestamp(1_767_225_600_000_000);

impl Backend for MemBackend {
    type S = MemStore;

    fn name(&self) -> &'static str {
        "mem"
    }

    async fn store(&self) -> MemStore {
        MemStore::with_clock(MemClock::manual(TEST_EPOCH))
    }

    async fn lock_waiters(&self, store: &MemStore) -> usize {
        store.lock_waiters()
    }
}

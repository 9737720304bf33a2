//! A worker runtime for chatstate: it finds runnable chats, claims them
//! one runner at a time, keeps their leases alive while a handler works,
//! and hands them back, following the protocol the concurrency model
//! checks (fenced worker steps, heartbeat leases, hints after commit, and
//! recovery of a runnable chat whose owner died).
//!
//! # Tour
//!
//! - [`Runtime::builder`] takes a store, where notifications go, and a
//!   [`Handler`]; [`Builder::spawn`] starts the claim loop. Capacity,
//!   heartbeat and sweep intervals and the shutdown grace are optional;
//!   [`Timing::derived`] says how the defaults follow from
//!   `Options::heartbeat_stale`.
//! - Work is found two ways. [`HintSource`]s (the in-process
//!   `BroadcastPublisher` subscription; with the `pg` feature, the Postgres
//!   listener on `chat:ownership`) announce chats that need an owner; a hint
//!   passes a local filter (already held here, or no room) before one
//!   `ChatMachine::try_acquire`. A periodic sweep of `Store::claimable`
//!   rescues chats whose hint was lost, such as a crashed worker's, whose
//!   lease goes stale without anyone being told.
//! - A won claim becomes a [`Lease`]: fenced Updates only
//!   ([`Lease::update`]), a history expectation that refuses a step
//!   generated from an old history with `HistoryChanged`, a heartbeat task
//!   that lives exactly as long as the lease, and [`Lease::lost`] to stop a
//!   long generation when the lease is gone.
//! - The handler returns [`Released`]: finished (the runtime abandons the
//!   chat if it still holds it), errored (the lease is left to go stale: a
//!   back-off), or handed back (abandoned now).
//! - [`Runtime::shutdown`] (or cancelling the token given to
//!   [`Builder::stop_on`]) stops claiming, lets handlers finish within the
//!   grace period, then abandons what is left so hints reach other
//!   workers. Dropping the [`Runtime`] is a crash: nothing is written, the
//!   leases go stale.
//! - [`Stats`] counts claims won and lost, heartbeats, leases lost and
//!   chats handed back. The runtime, its sweeps, claims and leases run in
//!   `tracing` spans (target `chatstate_worker`), a lost lease is a `warn`
//!   event, and with the `metrics` feature claims, lost leases and the
//!   leases held are also reported through the `metrics` facade
//!   (`docs/observability.md`).
//!
//! `docs/workers.md` describes the guarantees and failure cases.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use chatstate::{BroadcastPublisher, CreateChat, Error, ExecutionState, NewMessage, Options,
//!                 Store, create_chat};
//! use chatstate_store_mem::MemStore;
//! use chatstate_worker::{Handler, Lease, Released, Runtime};
//! use tokio::sync::mpsc;
//!
//! /// Answers every user message with "hi" and ends the turn.
//! struct Echo(mpsc::UnboundedSender<ExecutionState>);
//!
//! impl<S: Store> Handler<S> for Echo {
//!     async fn handle(&self, lease: &Lease<S>) -> Released {
//!         let done = async {
//!             lease.load().await?; // the history a real worker generates from
//!             lease.update(async |tx| {
//!                 tx.commit_step(vec![NewMessage::assistant("hi")], false).await?;
//!                 tx.finish_turn().await
//!             }).await
//!         };
//!         match done.await {
//!             Ok(outcome) => {
//!                 let _ = self.0.send(outcome.to);
//!                 Released::Finished
//!             }
//!             Err(_) => Released::Errored,
//!         }
//!     }
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Error> {
//! let store = MemStore::new();
//! let publisher = Arc::new(BroadcastPublisher::default());
//! let (done, mut turns) = mpsc::unbounded_channel();
//! let runtime = Runtime::builder(store.clone(), publisher.clone(), Echo(done))
//!     .hints(publisher.subscribe())
//!     .spawn()
//!     .expect("a valid configuration");
//!
//! create_chat(&store, &publisher.clone().into(), CreateChat {
//!     messages: vec![NewMessage::user("hello")],
//!     ..CreateChat::default()
//! }).await?;
//! assert_eq!(turns.recv().await, Some(ExecutionState::W));
//!
//! let stats = runtime.shutdown().await;
//! assert_eq!(stats.claims_won, 1);
//! # Ok(())
//! # }
//! ```

mod claim;
mod handler;
mod hints;
mod lease;
mod runtime;
mod stats;

pub use handler::{Handler, Released};
#[cfg(feature = "pg")]
pub use hints::pg;
pub use hints::{HintEvent, HintSource};
pub use lease::{HeartbeatWatch, Lease};
pub use runtime::{Builder, ConfigError, DEFAULT_CAPACITY, Runtime, Timing};
pub use stats::Stats;

//! The worker runtime, on both stores: claims shared by two runtimes,
//! recovery after a crash, graceful shutdown, and fencing of a handler
//! whose lease or history moved on, and what the runtime tells tracing
//! and metrics.

#[macro_use]
mod backend;
mod handlers;

mod claims;
mod config;
mod crash;
mod fencing;
mod hints;
mod observed;
mod shutdown;
mod telemetry;

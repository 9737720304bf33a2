//! The test and tooling harness of chatstate: what the test suites, the
//! examples and the `chatstate` command need around the production crates,
//! kept out of them so that an application depending on
//! `chatstate-store-pg` builds none of it.
//!
//! - [`throwaway`] starts a disposable PostgreSQL cluster (or uses the
//!   server of `DATABASE_URL`) and hands out freshly migrated databases.
//! - [`pgbouncer`] starts a disposable PgBouncer in front of the
//!   throwaway cluster.
//! - [`capture`] makes tracing capture in tests independent of the order
//!   the tests of a binary run in.
//! - [`failover`] starts a primary with a synchronous streaming standby
//!   and fails it over.
//! - [`goshape`] replays the Go original's statement sequence for one
//!   Update, the baseline `chatstate bench` compares the store with.
//!
//! It is not published: nothing here is an API for applications.

pub mod capture;
pub mod failover;
pub mod goshape;
pub mod pgbouncer;
pub mod throwaway;

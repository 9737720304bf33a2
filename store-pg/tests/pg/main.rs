//! Integration tests of the PostgreSQL store. Each test gets its own
//! database on a throwaway cluster this binary starts itself (or on
//! `DATABASE_URL`); without either, every test fails with an error naming
//! both remedies.

mod caches;
mod claims;
mod commit;
mod common;
mod failures;
mod faults;
mod inspection;
mod listener_cancel;
mod listener_spans;
mod locking;
mod migration_tooling;
mod misc;
mod notify;
mod pooler;
mod proxy;
mod round_trips;
mod schema;
mod shared_tx;
mod versions;

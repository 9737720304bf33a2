//! Connections kept between transactions, out of the pool.
//!
//! Whenever a connection goes back to a sqlx pool, the pool tests it
//! with a ping (a Sync message and its answer: one more round trip, in a
//! task of its own) before another task may take it. For a transaction of
//! three round trips that is a fourth, in CPU on both sides, and in latency
//! when the next transaction has to wait for that connection. So a
//! [`crate::PgStore`] keeps the connections of its finished transactions
//! (and of its other statements) itself and hands them to its next ones:
//!
//! - only a connection whose last request succeeded and that is outside a
//!   transaction is kept (anything else goes back to the pool, or is
//!   closed, as before);
//! - at most `cap` of them (half the pool's maximum, so the pool always
//!   has connections for others), handed out in the order they came back
//!   (first in, first out, as the pool's own idle queue does: consecutive
//!   transactions run on different backends when there are several);
//! - a connection kept longer than [`KEEP`] unused goes back to the pool
//!   when the store next takes one, so the pool's idle limits apply to a
//!   store that went quiet;
//! - every one goes back to the pool when the last clone of the store is
//!   dropped (or is closed, if that happens outside an async runtime,
//!   where the pool cannot take it back).
//!
//! The Go-shaped benchmark baseline (`chatstate-testing`'s `goshape`)
//! keeps its connections the same way, so both run on the same terms.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::Postgres;
use sqlx::pool::PoolConnection;

/// How long an unused connection stays with the store.
pub(crate) const KEEP: Duration = Duration::from_secs(10);

/// The store's idle connections (shared by its clones).
#[derive(Debug)]
pub(crate) struct IdleConnections {
    /// In the order they came back, each with the instant it did.
    conns: Mutex<VecDeque<(Instant, PoolConnection<Postgres>)>>,
    cap: usize,
    /// The pool keeps no minimum of connections (so a connection can be
    /// closed without a task that replaces it).
    no_minimum: bool,
}

impl IdleConnections {
    /// Keeps at most `cap` connections of a pool with `min_connections`.
    pub(crate) fn new(cap: usize, min_connections: u32) -> Self {
        IdleConnections {
            conns: Mutex::new(VecDeque::new()),
            cap,
            no_minimum: min_connections == 0,
        }
    }

    /// The connection that came back first, if any; those unused for
    /// longer than [`KEEP`] go back to the pool instead.
    pub(crate) fn take(&self) -> Option<PoolConnection<Postgres>> {
        let mut stale = Vec::new();
        let conn = {
            let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            loop {
                match conns.pop_front() {
                    Some((at, conn)) if now.duration_since(at) > KEEP => stale.push(conn),
                    other => break other.map(|(_, conn)| conn),
                }
            }
        };
        // Dropped outside the lock: each goes back to the pool (in a task
        // of its own).
        drop(stale);
        conn
    }

    /// Keeps a connection that is idle, outside a transaction and
    /// healthy as far as its last request tells; beyond the cap, it goes
    /// back to the pool.
    pub(crate) fn put(&self, conn: PoolConnection<Postgres>) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() < self.cap {
            conns.push_back((Instant::now(), conn));
            return;
        }
        drop(conns);
        drop(conn);
    }
}

impl Drop for IdleConnections {
    fn drop(&mut self) {
        let conns = std::mem::take(self.conns.get_mut().unwrap_or_else(|e| e.into_inner()));
        if tokio::runtime::Handle::try_current().is_ok() {
            // Back to the pool, each in a task of its own.
            drop(conns);
            return;
        }
        // The last clone of the store went away outside an async runtime,
        // where sqlx cannot take a connection back (that needs a task):
        // close them here instead, and give their places back to the pool.
        for (_, conn) in conns {
            if self.no_minimum {
                drop(conn.detach());
            } else {
                // Replacing it would need a task too.
                std::mem::forget(conn);
            }
        }
    }
}

//! The wait-for graph over the store's row locks, for deadlock detection.
//!
//! The row locks themselves are tokio `RwLock`s, which queue waiters
//! fairly and never give up. This table mirrors who holds and who waits
//! for each of them. A transaction that is about to wait for a row lock
//! first follows the edges "waits for" → "is held (or queued ahead) by"
//! from that lock; if they lead back to itself, waiting would never end,
//! and it fails instead. Postgres finds the same cycles (after
//! `deadlock_timeout`, one second by default) and aborts one transaction
//! of the cycle with SQLSTATE 40P01; here the one that closes the cycle
//! fails at once, so no test waits a second.
//!
//! A cycle can only form when an edge is added. Edges leave a waiting
//! transaction, so they are added when a transaction starts to wait
//! (checked here) or when a lock someone waits for changes hands; the new
//! holder is running, not waiting, so a cycle through it closes only when
//! it waits itself, which is checked then.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chatstate_model::ChatId;

/// A transaction of the store (each `MemTx`, and each raw test-control
/// write, gets a fresh one).
pub(crate) type TxId = u64;

/// Who holds and who waits for the row lock of each chat.
#[derive(Debug, Default)]
pub(crate) struct LockTable {
    holders: HashMap<ChatId, Vec<TxId>>,
    /// Waiters per chat, in arrival order (the order the fair lock serves).
    waiters: HashMap<ChatId, Vec<TxId>>,
    /// What each waiting transaction waits for.
    waiting: HashMap<TxId, ChatId>,
}

/// Waiting would close a cycle of transactions waiting for each other.
#[derive(Debug)]
pub(crate) struct Cycle {
    tx: TxId,
    chat: ChatId,
}

impl std::fmt::Display for Cycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "deadlock detected: transaction {} would wait for the row lock of chat {}, \
             whose holders wait for it",
            self.tx, self.chat
        )
    }
}

impl LockTable {
    /// Registers `tx` as waiting for the row lock of `chat`, or refuses if
    /// that wait would close a cycle. The entry unregisters itself when
    /// dropped (a cancelled wait), unless the lock was acquired.
    pub(crate) fn wait(
        table: &Arc<Mutex<LockTable>>,
        tx: TxId,
        chat: ChatId,
    ) -> Result<WaitEntry, Cycle> {
        let mut t = table.lock().expect("lock table");
        if t.reaches(chat, None, tx) {
            return Err(Cycle { tx, chat });
        }
        t.waiters.entry(chat).or_default().push(tx);
        t.waiting.insert(tx, chat);
        Ok(WaitEntry {
            table: table.clone(),
            tx,
            chat,
        })
    }

    /// The transactions a waiter for `chat` waits for: the holders, and
    /// the waiters queued ahead of it (`waiter`; a new waiter queues
    /// behind all of them).
    fn blockers(&self, chat: ChatId, waiter: Option<TxId>) -> Vec<TxId> {
        let mut out: Vec<TxId> = self.holders.get(&chat).cloned().unwrap_or_default();
        if let Some(queue) = self.waiters.get(&chat) {
            let ahead = match waiter {
                Some(w) => queue.iter().position(|&q| q == w).unwrap_or(queue.len()),
                None => queue.len(),
            };
            out.extend_from_slice(&queue[..ahead]);
        }
        out.retain(|&b| Some(b) != waiter);
        out
    }

    /// Whether following "waits for" edges from a waiter for `chat` leads
    /// to `target`.
    fn reaches(&self, chat: ChatId, waiter: Option<TxId>, target: TxId) -> bool {
        let mut stack = self.blockers(chat, waiter);
        let mut seen = HashSet::new();
        while let Some(tx) = stack.pop() {
            if tx == target {
                return true;
            }
            if !seen.insert(tx) {
                continue;
            }
            if let Some(&next) = self.waiting.get(&tx) {
                stack.extend(self.blockers(next, Some(tx)));
            }
        }
        false
    }

    fn stop_waiting(&mut self, tx: TxId, chat: ChatId) {
        self.waiting.remove(&tx);
        if let Some(queue) = self.waiters.get_mut(&chat) {
            queue.retain(|&q| q != tx);
            if queue.is_empty() {
                self.waiters.remove(&chat);
            }
        }
    }
}

/// A registered wait; [`WaitEntry::acquired`] turns it into a holding.
pub(crate) struct WaitEntry {
    table: Arc<Mutex<LockTable>>,
    tx: TxId,
    chat: ChatId,
}

impl WaitEntry {
    /// The lock was granted: `tx` now holds it.
    pub(crate) fn acquired(self) -> Holding {
        let mut t = self.table.lock().expect("lock table");
        t.stop_waiting(self.tx, self.chat);
        t.holders.entry(self.chat).or_default().push(self.tx);
        drop(t);
        let holding = Holding {
            table: self.table.clone(),
            tx: self.tx,
            chat: self.chat,
        };
        // Already unregistered as a waiter.
        std::mem::forget(self);
        holding
    }
}

impl Drop for WaitEntry {
    fn drop(&mut self) {
        self.table
            .lock()
            .expect("lock table")
            .stop_waiting(self.tx, self.chat);
    }
}

/// A held row lock, as the table knows it; dropping it forgets it.
pub(crate) struct Holding {
    table: Arc<Mutex<LockTable>>,
    tx: TxId,
    chat: ChatId,
}

impl Drop for Holding {
    fn drop(&mut self) {
        let mut t = self.table.lock().expect("lock table");
        if let Some(holders) = t.holders.get_mut(&self.chat) {
            if let Some(i) = holders.iter().position(|&h| h == self.tx) {
                holders.swap_remove(i);
            }
            if holders.is_empty() {
                t.holders.remove(&self.chat);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(n: u128) -> ChatId {
        ChatId(uuid::Uuid::from_u128(n))
    }

    #[test]
    fn opposite_order_closes_a_cycle_and_a_released_lock_opens_it() {
        let table = Arc::new(Mutex::new(LockTable::default()));
        let (a, b, c) = (chat(1), chat(2), chat(3));
        let t1_a = LockTable::wait(&table, 1, a).unwrap().acquired();
        let t2_b = LockTable::wait(&table, 2, b).unwrap().acquired();
        let t1_waits_b = LockTable::wait(&table, 1, b).unwrap();
        // 2 -> a (held by 1) -> 1 waits for b (held by 2): a cycle.
        let cycle = LockTable::wait(&table, 2, a).err().expect("cycle");
        assert!(cycle.to_string().contains("deadlock"), "{cycle}");
        // A third transaction queued behind 1 for b waits for 2 and 1,
        // which wait for nothing it holds: no cycle.
        let t3_waits_b = LockTable::wait(&table, 3, b).unwrap();
        // Waiting for a lock nobody holds is fine.
        drop(LockTable::wait(&table, 2, c).unwrap());
        // 1 gives up waiting: 2's wait for a closes nothing now.
        drop(t1_waits_b);
        let t2_waits_a = LockTable::wait(&table, 2, a).unwrap();
        drop((t2_waits_a, t3_waits_b, t2_b, t1_a));
        let t = table.lock().unwrap();
        assert!(t.holders.is_empty() && t.waiters.is_empty() && t.waiting.is_empty());
    }
}

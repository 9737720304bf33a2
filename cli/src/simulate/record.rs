//! The record the oracle checks: every Update of the run, users' and
//! worker runtimes' alike, as its handle's [`CommitObserver`] was told.
//!
//! An Update is written down as *maybe committed* just before its commit is
//! sent and settled when the commit ends: committed (the result is `Ok`, or
//! the failure says `Committed`), left maybe committed (`Unknown`), or
//! dropped (`NotCommitted`). A runtime aborted in the middle of a commit
//! never settles its Updates; they stay maybe committed, for the oracle to
//! settle from the stored snapshot versions.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use chatstate::{ChatChange, ChatId, CommitObserver, CommitReport, CommitState, Transition};
use chatstate_model::oracle::{CommittedUpdate, Published};

/// Records what every observed Update committed.
pub(crate) struct Recorder {
    records: Mutex<Records>,
    committed: AtomicU64,
    /// A deliberately broken recorder (to show that the check notices):
    /// the n-th committed Update (from 1) is left out of the record.
    drop_nth: Option<u64>,
}

#[derive(Default)]
struct Records {
    /// Sent for commit, not settled yet.
    pending: HashMap<(ChatId, i64), Vec<ChatChange>>,
    committed: Vec<Committed>,
    maybe: Vec<CommittedUpdate>,
}

/// A committed Update, and what it said it would publish if it published
/// (its commit succeeded and its result was `Ok`).
struct Committed {
    update: CommittedUpdate,
    announced: Option<Vec<Published>>,
}

impl Recorder {
    pub(crate) fn new() -> Self {
        Recorder {
            records: Mutex::new(Records::default()),
            committed: AtomicU64::new(0),
            drop_nth: None,
        }
    }

    /// A recorder that loses the `n`-th committed Update (from 1).
    #[cfg(test)]
    pub(crate) fn dropping(n: u64) -> Self {
        Recorder {
            drop_nth: Some(n),
            ..Recorder::new()
        }
    }

    /// Updates known committed so far.
    pub(crate) fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// The record once nothing runs any more: what is still unsettled
    /// counts as maybe committed.
    pub(crate) fn finish(&self) -> Recorded {
        let mut records = std::mem::take(&mut *self.records.lock().expect("record lock"));
        let unsettled = records.pending.drain().flat_map(|(_, changes)| changes);
        records.maybe.extend(unsettled.map(|c| update(&c)));
        Recorded {
            committed: records.committed,
            maybe: records.maybe,
        }
    }
}

impl CommitObserver for Recorder {
    fn before_commit(&self, changes: &[ChatChange]) {
        let mut records = self.records.lock().expect("record lock");
        for c in changes {
            records
                .pending
                .entry((c.chat_id, c.snapshot_version))
                .or_default()
                .push(c.clone());
        }
    }

    fn commit_ended(&self, report: &CommitReport<'_>) {
        let state = match report.result {
            Ok(()) => CommitState::Committed,
            Err(e) => e.commit_state(),
        };
        let mut records = self.records.lock().expect("record lock");
        for c in report.changes {
            let key = (c.chat_id, c.snapshot_version);
            if let Some(pending) = records.pending.get_mut(&key) {
                if let Some(i) = pending.iter().position(|p| p == c) {
                    pending.swap_remove(i);
                }
                if pending.is_empty() {
                    records.pending.remove(&key);
                }
            }
            match state {
                CommitState::Committed => {
                    let n = self.committed.fetch_add(1, Ordering::Relaxed) + 1;
                    if self.drop_nth == Some(n) {
                        continue;
                    }
                    let announced = report
                        .result
                        .is_ok()
                        .then(|| c.notifications.iter().map(Published::from).collect());
                    records.committed.push(Committed {
                        update: update(c),
                        announced,
                    });
                }
                CommitState::Unknown => records.maybe.push(update(c)),
                // Rolled back: nothing to check.
                _ => {}
            }
        }
    }
}

/// The oracle's form of one chat's change; what it published is replaced
/// by the publisher's record at the end (see `attach_published`).
fn update(c: &ChatChange) -> CommittedUpdate {
    c.to_committed_update()
}

/// The record of a finished run.
pub(crate) struct Recorded {
    committed: Vec<Committed>,
    maybe: Vec<CommittedUpdate>,
}

impl Recorded {
    /// Fills in what each Update published, from the publisher's record by
    /// (chat, snapshot), and returns how many Updates that committed and
    /// published had announced notifications other than those sent (byte
    /// for byte).
    pub(crate) fn attach_published(
        &mut self,
        published: &HashMap<(ChatId, i64), Vec<Published>>,
    ) -> u64 {
        let at = |u: &CommittedUpdate| {
            published
                .get(&(u.chat, u.snapshot))
                .cloned()
                .unwrap_or_default()
        };
        let mut differing = 0;
        for c in &mut self.committed {
            c.update.published = at(&c.update);
            if c.announced
                .as_ref()
                .is_some_and(|a| *a != c.update.published)
            {
                differing += 1;
            }
        }
        for u in &mut self.maybe {
            u.published = at(u);
        }
        differing
    }

    /// Leaves out the Updates of `chats` (chats the check cannot see).
    pub(crate) fn forget(&mut self, chats: impl Fn(ChatId) -> bool) {
        self.committed.retain(|c| !chats(c.update.chat));
        self.maybe.retain(|u| !chats(u.chat));
    }

    pub(crate) fn committed(&self) -> impl Iterator<Item = &CommittedUpdate> {
        self.committed.iter().map(|c| &c.update)
    }

    pub(crate) fn maybe(&self) -> &[CommittedUpdate] {
        &self.maybe
    }

    /// Committed transitions by kind.
    pub(crate) fn transitions(&self) -> HashMap<Transition, u64> {
        let mut n = HashMap::new();
        for u in self.committed() {
            for c in &u.calls {
                *n.entry(c.input.transition()).or_default() += 1;
            }
        }
        n
    }

    /// Committed claims of a chat another runner still owned (its lease
    /// had lapsed): the Update with the snapshot before the claim's left
    /// an owner behind.
    pub(crate) fn takeovers(&self) -> u64 {
        let ends: HashMap<(ChatId, i64), bool> = self
            .maybe
            .iter()
            .chain(self.committed())
            .map(|u| ((u.chat, u.snapshot), u.end.row.owner.is_some()))
            .collect();
        self.committed()
            .filter(|u| {
                u.calls
                    .iter()
                    .any(|c| c.input.transition() == Transition::Acquire)
                    && ends.get(&(u.chat, u.snapshot - 1)) == Some(&true)
            })
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chatstate::{ChatMachine, CreateChat, Input, NewMessage, Notify, Options, create_chat};
    use chatstate_store_mem::MemStore;

    use super::super::shared::SimPublisher;
    use super::*;

    /// One chat on a fresh store, a handle on it observed by `observer`,
    /// and the publisher it publishes through.
    async fn observed_chat(
        observer: Arc<dyn CommitObserver>,
    ) -> (ChatMachine<MemStore>, Arc<SimPublisher>) {
        let store = MemStore::default();
        let publisher = Arc::new(SimPublisher::new());
        let notify = Notify::AfterCommit(publisher.clone());
        let created = create_chat(
            &store,
            &notify,
            CreateChat {
                messages: vec![NewMessage::user("hi")],
                ..CreateChat::default()
            },
        )
        .await
        .expect("created");
        let machine =
            ChatMachine::new(store, notify, created.chat_id, Options::default()).observed(observer);
        (machine, publisher)
    }

    #[tokio::test]
    async fn a_committed_update_is_recorded_with_the_notifications_it_sent() {
        let recorder = Arc::new(Recorder::new());
        let (machine, publisher) = observed_chat(recorder.clone()).await;
        machine
            .update(async |tx| tx.interrupt(None).await)
            .await
            .expect("committed");
        assert_eq!(recorder.committed(), 1);
        let mut recorded = recorder.finish();
        assert!(recorded.maybe().is_empty());
        assert_eq!(
            recorded.attach_published(&publisher.take()),
            0,
            "the announced notifications are the ones sent, byte for byte"
        );
        let u = recorded.committed().next().expect("one record");
        assert_eq!((u.chat, u.snapshot), (machine.chat_id(), 2));
        assert_eq!(u.calls.len(), 1);
        assert!(!u.published.is_empty());
    }

    #[tokio::test]
    async fn a_rejected_update_leaves_nothing() {
        let recorder = Arc::new(Recorder::new());
        let (machine, _) = observed_chat(recorder.clone()).await;
        // Nothing to complete: the chat is running, not waiting.
        let complete = Input::CompleteRequiresAction {
            results: Vec::new(),
            created_by: None,
            model_config_id: None,
        };
        let rejected = machine.update(async |tx| tx.apply(complete).await).await;
        assert!(matches!(rejected, Err(chatstate::Error::Rejected(_))));
        let recorded = recorder.finish();
        assert_eq!(recorded.committed().count(), 0);
        assert!(recorded.maybe().is_empty());
    }

    /// Passes on only the news that a commit is about to be sent, as a
    /// process that dies inside its commit would.
    struct DiesInCommit(Arc<Recorder>);

    impl CommitObserver for DiesInCommit {
        fn before_commit(&self, changes: &[ChatChange]) {
            self.0.before_commit(changes);
        }

        fn commit_ended(&self, _: &CommitReport<'_>) {}
    }

    #[tokio::test]
    async fn a_commit_that_never_ended_stays_maybe_committed() {
        let recorder = Arc::new(Recorder::new());
        let (machine, _) = observed_chat(Arc::new(DiesInCommit(recorder.clone()))).await;
        machine
            .update(async |tx| tx.interrupt(None).await)
            .await
            .expect("committed");
        let recorded = recorder.finish();
        assert_eq!(recorded.committed().count(), 0);
        assert_eq!(recorded.maybe().len(), 1);
        assert_eq!(recorded.maybe()[0].snapshot, 2);
    }
}

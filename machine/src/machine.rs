//! `ChatMachine`: Update, Lock and ReadLock on one chat, and publishing
//! with the commit.

use std::sync::Arc;

use chatstate_model::{ChatId, Notification, Options, OptionsError, RunnerId, after_update};
use tracing::Instrument;
use tracing::field::Empty;

use crate::claim::LeaseStatus;
use crate::error::Error;
use crate::locked::{Locked, ReadLocked};
use crate::observe::{CommitObserver, CommitReport, Recording};
use crate::publish::{Notify, PublishBuffer};
use crate::store::{ChatRecord, LockMode, Store, StoreTx};
use crate::telemetry::{self, Probe, op_span};
use crate::tx::{Start, Tx};

/// A cheap handle on one chat of a store.
///
/// It caches nothing between calls: every [`ChatMachine::update`],
/// [`ChatMachine::lock`] and [`ChatMachine::read_lock`] runs in a fresh
/// store transaction that starts by locking the chat's row.
#[derive(Clone, Debug)]
pub struct ChatMachine<S: Store> {
    store: S,
    notify: Notify,
    chat_id: ChatId,
    options: Options,
    /// The verdict of [`Options::validate`], taken once at construction.
    invalid_options: Option<OptionsError>,
    /// Told about every Update that tried to commit.
    observer: Option<Arc<dyn CommitObserver>>,
}

impl<S: Store> ChatMachine<S> {
    /// A handle on `chat_id` in `store`, publishing through `notify`.
    ///
    /// The options are validated here, once; if they are out of bounds,
    /// every call on the handle fails with [`Error::InvalidOptions`] before
    /// it touches the store.
    pub fn new(store: S, notify: impl Into<Notify>, chat_id: ChatId, options: Options) -> Self {
        ChatMachine {
            store,
            notify: notify.into(),
            chat_id,
            options,
            invalid_options: options.validate().err(),
            observer: None,
        }
    }

    /// This handle, telling `observer` about every Update that tries to
    /// commit (see [`CommitObserver`]). Without an observer nothing is
    /// recorded.
    #[must_use]
    pub fn observed(mut self, observer: Arc<dyn CommitObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The observer, if any.
    pub fn observer(&self) -> Option<&Arc<dyn CommitObserver>> {
        self.observer.as_ref()
    }

    /// Refuses calls of a handle built with invalid options.
    fn check_options(&self) -> Result<(), Error> {
        match &self.invalid_options {
            Some(e) => Err(Error::InvalidOptions(e.clone())),
            None => Ok(()),
        }
    }

    /// The chat.
    pub fn chat_id(&self) -> ChatId {
        self.chat_id
    }

    /// The tunables.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Runs `f` in a transaction that first locks the chat's row and bumps
    /// its `snapshot_version` by exactly one, whatever `f` then does.
    ///
    /// Transitions applied through the [`Tx`] each validate against the
    /// effects of the ones before. If `f` fails, or the returned future is
    /// dropped, everything rolls back, the bump included, and nothing is
    /// published. On success exactly one `chat:update` is published after
    /// commit, plus a `chat:ownership` hint when the chat ends runnable
    /// without a fresh lease.
    ///
    /// A rejected transition leaves the transaction usable, but a store
    /// error returned by any [`Tx`] method poisons it: even if `f` carries
    /// on and returns `Ok`, the Update rolls back and fails with
    /// [`Error::Poisoned`] (or [`Error::NestedUpdateFailed`] for a failed
    /// nested Update). A failure at commit says whether the change is
    /// durable ([`Error::commit_state`]); a commit whose connection was lost
    /// but that the store resolved as committed returns `Ok` and publishes
    /// as usual.
    pub async fn update<T>(
        &self,
        f: impl AsyncFnOnce(&mut Tx<'_, S>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let span = op_span!(
            INFO,
            "update",
            chat_id = %self.chat_id,
            transitions = Empty,
            from = Empty,
            to = Empty,
            snapshot_version = Empty,
            outcome = Empty,
            lock_wait_us = Empty,
            callback_us = Empty,
            plan_write_us = Empty,
            commit_us = Empty,
            publish_us = Empty,
            round_trips = Empty,
        );
        let mut probe = Probe::start(span.clone());
        let result = self.run_update(f, &mut probe).instrument(span).await;
        probe.end_update(result.as_ref().map(|_| ()));
        result
    }

    /// The body of [`ChatMachine::update`], inside its span.
    async fn run_update<T>(
        &self,
        f: impl AsyncFnOnce(&mut Tx<'_, S>) -> Result<T, Error>,
        probe: &mut Probe,
    ) -> Result<T, Error> {
        self.check_options()?;
        let Some((mut stx, snap)) = self.store.begin_update(self.chat_id, &self.options).await?
        else {
            return Err(Error::ChatNotFound(self.chat_id));
        };
        probe.locked("update", &snap);
        let mut nested = Vec::new();
        let mut poisoned = None;
        let mut changes = Vec::new();
        let start = Start::of(&snap);
        let mut tx = Tx {
            stx: &mut stx,
            chat_id: self.chat_id,
            snap,
            options: &self.options,
            nested: &mut nested,
            poisoned: &mut poisoned,
            recording: self.observer.as_ref().map(|_| Recording::default()),
            changes: &mut changes,
            applied: probe.keeps_transitions().then(Vec::new),
            probe: &mut *probe,
        };
        let called = f(&mut tx).await;
        let applied = tx.applied.take();
        tx.probe.called_back(applied.as_deref(), &tx.snap);
        tx.probe.accepted(applied);
        let value = match called {
            Ok(v) => v,
            Err(e) => {
                // The rollback's own failure is secondary: the transaction
                // is gone either way.
                let _ = stx.rollback().await;
                return Err(e);
            }
        };
        let snap = tx.snap;
        let recording = tx.recording;
        if let Some(poison) = poisoned {
            let _ = stx.rollback().await;
            return Err(poison.into_error());
        }
        let own = after_update(&snap);
        let version = snap.row.versions.snapshot;
        // The observer's copy of the notifications is made only when there
        // is an observer.
        let observer = self.observer.as_ref().zip(recording).map(|(o, recording)| {
            changes.insert(0, start.change(self.chat_id, recording, snap, own.clone()));
            o.before_commit(&changes);
            o
        });
        let mut notes = nested;
        notes.extend(own);
        let result = publish_with_commit(&self.notify, stx, &notes, version, probe).await;
        if let Some(observer) = observer {
            observer.commit_ended(&CommitReport {
                changes: &changes,
                result: result.as_ref().map(|_| ()),
            });
        }
        result?;
        Ok(value)
    }

    /// Runs `f` holding the chat's row lock exclusively, without a bump and
    /// without publishing. It excludes Updates, Locks and ReadLocks.
    pub async fn lock<T>(
        &self,
        f: impl AsyncFnOnce(&mut Locked<'_, S>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let span = op_span!(
            INFO,
            "lock",
            chat_id = %self.chat_id,
            from = Empty,
            snapshot_version = Empty,
            outcome = Empty,
            lock_wait_us = Empty,
            callback_us = Empty,
            commit_us = Empty,
            round_trips = Empty,
        );
        let mut probe = Probe::start(span.clone());
        let result = self.run_lock(f, &mut probe).instrument(span).await;
        probe.end(result.as_ref().map(|_| ()));
        result
    }

    /// The body of [`ChatMachine::lock`], inside its span.
    async fn run_lock<T>(
        &self,
        f: impl AsyncFnOnce(&mut Locked<'_, S>) -> Result<T, Error>,
        probe: &mut Probe,
    ) -> Result<T, Error> {
        self.check_options()?;
        let Some((mut stx, snap)) = self
            .store
            .begin_locked(self.chat_id, LockMode::Exclusive, &self.options)
            .await?
        else {
            return Err(Error::ChatNotFound(self.chat_id));
        };
        probe.locked("lock", &snap);
        let mut locked = Locked {
            view: ReadLocked {
                stx: &mut stx,
                chat_id: self.chat_id,
                snap,
                poisoned: None,
            },
        };
        let called = f(&mut locked).await;
        probe.lap("callback_us");
        match called {
            // A store error the callback carried on after: as in an Update,
            // the transaction may hold part of a write and must not commit.
            Ok(_) if locked.view.poisoned.is_some() => {
                let poison = locked.view.poisoned.take().expect("checked");
                let _ = stx.rollback().await;
                Err(poison.into_error())
            }
            Ok(v) => {
                let committed = stx.commit(&[]).await;
                probe.lap("commit_us");
                committed?;
                Ok(v)
            }
            Err(e) => {
                let _ = stx.rollback().await;
                Err(e)
            }
        }
    }

    /// Runs `f` holding the chat's row lock shared, without a bump and
    /// without publishing. ReadLocks coexist; Updates and Locks wait.
    pub async fn read_lock<T>(
        &self,
        f: impl AsyncFnOnce(&mut ReadLocked<'_, S>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let span = op_span!(
            INFO,
            "read_lock",
            chat_id = %self.chat_id,
            from = Empty,
            snapshot_version = Empty,
            outcome = Empty,
            lock_wait_us = Empty,
            callback_us = Empty,
            round_trips = Empty,
        );
        let mut probe = Probe::start(span.clone());
        let result = self.run_read_lock(f, &mut probe).instrument(span).await;
        probe.end(result.as_ref().map(|_| ()));
        result
    }

    /// The body of [`ChatMachine::read_lock`], inside its span.
    async fn run_read_lock<T>(
        &self,
        f: impl AsyncFnOnce(&mut ReadLocked<'_, S>) -> Result<T, Error>,
        probe: &mut Probe,
    ) -> Result<T, Error> {
        self.check_options()?;
        let Some((mut stx, snap)) = self
            .store
            .begin_locked(self.chat_id, LockMode::Shared, &self.options)
            .await?
        else {
            return Err(Error::ChatNotFound(self.chat_id));
        };
        probe.locked("read_lock", &snap);
        let mut view = ReadLocked {
            stx: &mut stx,
            chat_id: self.chat_id,
            snap,
            poisoned: None,
        };
        let out = f(&mut view).await;
        probe.lap("callback_us");
        // Nothing was written: commit and rollback end the lock alike.
        let _ = stx.rollback().await;
        out
    }

    /// Reads the whole chat under a shared lock.
    pub async fn load(&self) -> Result<ChatRecord, Error> {
        self.read_lock(async |r| r.load().await).await
    }

    /// Refreshes the lease of `runner` if, and only if, `runner` is still
    /// the chat's runner (store time). Never bumps, never publishes, and
    /// does not wait for the row lock. The status tells a worker whether it
    /// still holds the chat: [`LeaseStatus::Lost`] and
    /// [`LeaseStatus::ChatGone`] mean it must stop.
    pub async fn heartbeat(&self, runner: RunnerId) -> Result<LeaseStatus, Error> {
        let span = op_span!(
            DEBUG,
            "heartbeat",
            chat_id = %self.chat_id,
            runner_id = %runner,
            status = Empty,
            round_trips = Empty,
        );
        let result = async {
            self.check_options()?;
            Ok(self.store.heartbeat(self.chat_id, runner).await?)
        }
        .instrument(span.clone())
        .await;
        if !span.is_disabled() {
            let status = match &result {
                Ok(LeaseStatus::Held) => "held",
                Ok(LeaseStatus::Lost { .. }) => "lost",
                Ok(LeaseStatus::ChatGone) => "chat_gone",
                Err(e) => telemetry::outcome(Err(e)),
            };
            span.record("status", status);
        }
        result
    }
}

/// Commits and publishes: in-transaction notifications go with the commit;
/// otherwise they wait in a buffer that is flushed only once the commit has
/// succeeded.
async fn publish_with_commit<T: StoreTx>(
    notify: &Notify,
    stx: T,
    notes: &[Notification],
    snapshot_version: i64,
    probe: &mut Probe,
) -> Result<(), Error> {
    match notify {
        Notify::InTransaction => {
            let committed = stx.commit(notes).await;
            probe.lap("commit_us");
            committed?;
            Ok(())
        }
        Notify::AfterCommit(publisher) => {
            let buffer = PublishBuffer::new(publisher.clone());
            for n in notes {
                buffer
                    .publish_notification(n)
                    .expect("a fresh buffer accepts notifications");
            }
            let committed = stx.commit(&[]).await;
            probe.lap("commit_us");
            if let Err(e) = committed {
                buffer.discard();
                return Err(e.into());
            }
            let flushed = buffer.flush();
            probe.lap("publish_us");
            flushed.map_err(|source| Error::PublishAfterCommit {
                snapshot_version,
                source,
            })
        }
    }
}

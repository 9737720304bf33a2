//! `ChatMachine`: Update, Lock and ReadLock on one chat, the transaction
//! handle with one method per transition, and chat creation.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chatstate_model::{
    BusyBehavior, Call, Chat, ChatId, ChatRow, EditContext, Env, ExecutionState, Input, JsonText,
    Matrix, MessageId, NewChat, NewMessage, Notification, Options, OptionsError, Outcome, Owner,
    Part, QueuedMessageId, Rejection, RejectionKind, RunnerId, Snapshot, Timestamp,
    ToolResultInput, Transition, WorkerId, after_create, after_update, decide, reasons,
};
use tracing::Instrument;
use tracing::field::Empty;
use uuid::Uuid;

use crate::claim::LeaseStatus;
use crate::error::{Error, StoreError, StoreErrorKind};
use crate::observe::{ChatChange, CommitObserver, CommitReport, Recording};
use crate::publish::{Notify, PublishBuffer};
use crate::store::{
    ChatMetadata, ChatRecord, CreateOutcome, LockMode, MetadataPatch, Store, StoreTx,
};
use crate::telemetry::{self, Probe, op_span};

/// The worker transitions, defined once for [`Tx`] (unfenced) and
/// [`Fenced`]; each type's private `worker` method says how they apply.
macro_rules! worker_transitions {
    ($fence:literal) => {
        #[doc = concat!("Abandon", $fence, ".")]
        pub async fn abandon(&mut self) -> Result<Outcome, Error> {
            self.worker(Input::Abandon).await
        }

        #[doc = concat!("RecordGenerationAttempt", $fence, ".")]
        pub async fn record_generation_attempt(&mut self) -> Result<Outcome, Error> {
            self.worker(Input::RecordGenerationAttempt).await
        }

        #[doc = concat!("RecordRetryState", $fence, ".")]
        pub async fn record_retry_state(&mut self, retry_state: &str) -> Result<Outcome, Error> {
            self.worker(Input::RecordRetryState {
                retry_state: retry_state.to_owned(),
            })
            .await
        }

        #[doc = concat!("CommitStep", $fence, ".")]
        pub async fn commit_step(
            &mut self,
            messages: Vec<NewMessage>,
            consume_compaction_request: bool,
        ) -> Result<Outcome, Error> {
            self.worker(Input::CommitStep {
                messages,
                consume_compaction_request,
            })
            .await
        }

        #[doc = concat!("EnterRequiresAction", $fence, ".")]
        pub async fn enter_requires_action(&mut self) -> Result<Outcome, Error> {
            self.worker(Input::EnterRequiresAction).await
        }

        #[doc = concat!("FinishInterruption", $fence, ".")]
        pub async fn finish_interruption(
            &mut self,
            partial_messages: Vec<NewMessage>,
        ) -> Result<Outcome, Error> {
            self.worker(Input::FinishInterruption { partial_messages })
                .await
        }

        #[doc = concat!("FinishTurn", $fence, ".")]
        pub async fn finish_turn(&mut self) -> Result<Outcome, Error> {
            self.worker(Input::FinishTurn).await
        }

        #[doc = concat!("FinishError", $fence, ".")]
        pub async fn finish_error(
            &mut self,
            last_error: Option<JsonText>,
        ) -> Result<Outcome, Error> {
            self.worker(Input::FinishError { last_error }).await
        }

        #[doc = concat!("CancelRequiresAction", $fence, ".")]
        pub async fn cancel_requires_action(
            &mut self,
            reason: Option<String>,
        ) -> Result<Outcome, Error> {
            self.worker(Input::CancelRequiresAction { reason }).await
        }
    };
}

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
        let mut notes = nested;
        notes.extend(own.iter().cloned());
        let version = snap.row.versions.snapshot;
        let observer = self.observer.as_ref().zip(recording).map(|(o, recording)| {
            changes.insert(0, start.change(self.chat_id, recording, snap, own));
            o.before_commit(&changes);
            o
        });
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

/// Why a transaction refuses to commit.
#[derive(Clone, Copy, Debug)]
enum Poison {
    /// A nested Update of this chat failed.
    Nested(ChatId),
    /// A store operation failed (the first such failure).
    Store {
        context: &'static str,
        kind: StoreErrorKind,
    },
}

impl Poison {
    fn into_error(self) -> Error {
        match self {
            Poison::Nested(chat) => Error::NestedUpdateFailed(chat),
            Poison::Store { context, kind } => Error::Poisoned { context, kind },
        }
    }
}

/// Passes a store result through, recording the first store error in
/// `poisoned`: a statement that failed may have written part of its rows
/// (Postgres aborts the transaction; the in-memory store may not), so
/// nothing after it may commit.
fn poison_on_error<T>(
    poisoned: &mut Option<Poison>,
    result: Result<T, StoreError>,
) -> Result<T, Error> {
    result.map_err(|e| {
        if poisoned.is_none() {
            *poisoned = Some(Poison::Store {
                context: e.context,
                kind: e.kind,
            });
        }
        Error::Store(e)
    })
}

/// The transaction of an Update: one method per transition, the current
/// snapshot, and a metadata view. There is no other access to the store, so
/// execution state can only change through transitions.
pub struct Tx<'a, S: Store> {
    stx: &'a mut S::Tx,
    chat_id: ChatId,
    snap: Snapshot,
    options: &'a Options,
    nested: &'a mut Vec<Notification>,
    poisoned: &'a mut Option<Poison>,
    /// The accepted transitions, when an observer wants them.
    recording: Option<Recording>,
    /// What nested Updates did, when an observer wants it.
    changes: &'a mut Vec<ChatChange>,
    /// The accepted transitions of this chat, when a span or the metrics
    /// want them.
    applied: Option<Vec<Transition>>,
    /// The Update's measurements (shared with nested Updates).
    probe: &'a mut Probe,
}

/// What an Update's observer report needs from the locked snapshot.
#[derive(Clone, Copy)]
struct Start {
    snapshot_version: i64,
    now: Timestamp,
    lease_fresh: bool,
}

impl Start {
    fn of(snap: &Snapshot) -> Self {
        Start {
            snapshot_version: snap.row.versions.snapshot,
            now: snap.now,
            lease_fresh: snap.lease_fresh,
        }
    }

    fn change(
        self,
        chat_id: ChatId,
        recording: Recording,
        end: Snapshot,
        notifications: Vec<Notification>,
    ) -> ChatChange {
        ChatChange {
            chat_id,
            snapshot_version: self.snapshot_version,
            now: self.now,
            lease_fresh: self.lease_fresh,
            calls: recording.calls,
            outcomes: recording.outcomes,
            end,
            notifications,
        }
    }
}

impl<S: Store> std::fmt::Debug for Tx<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("chat_id", &self.chat_id)
            .field("state", &self.snap.state())
            .finish_non_exhaustive()
    }
}

impl<'a, S: Store> Tx<'a, S> {
    /// The chat.
    pub fn chat_id(&self) -> ChatId {
        self.chat_id
    }

    /// The chat as the transaction sees it now (after the bump and every
    /// transition applied so far).
    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    /// The classified state now.
    pub fn state(&self) -> ExecutionState {
        self.snap.state()
    }

    /// The row now.
    pub fn row(&self) -> &ChatRow {
        &self.snap.row
    }

    /// Applies one transition.
    ///
    /// The model decides it against the current snapshot (validation order:
    /// Invalid, matrix, inputs); a rejection writes nothing and leaves the
    /// transaction usable. Otherwise the store writes the plan, and the
    /// landed state is asserted to be in the matrix cell.
    pub async fn apply(&mut self, input: Input) -> Result<Outcome, Error> {
        self.apply_fenced(input, None, None).await
    }

    /// Applies one transition with an optional runner fence and history
    /// expectation, both checked by the model under the lock.
    async fn apply_fenced(
        &mut self,
        input: Input,
        fence: Option<RunnerId>,
        history: Option<i64>,
    ) -> Result<Outcome, Error> {
        let edit: Option<EditContext> = match &input {
            Input::EditMessage { message_id, .. } => {
                let context = self.stx.edit_context(self.chat_id, *message_id).await;
                if let Err(e) = &context {
                    telemetry::store_failed(input.transition(), e.kind);
                }
                Some(poison_on_error(self.poisoned, context)?)
            }
            _ => None,
        };
        let decided = decide(
            &self.snap,
            &input,
            &Env {
                options: self.options,
                matrix: Matrix::REFERENCE,
                fence,
                history,
                edit: edit.as_ref(),
            },
        );
        let plan = match decided {
            Ok(plan) => plan,
            Err(rejection) => {
                telemetry::rejected(&rejection);
                return Err(rejection.into());
            }
        };
        let since = self.probe.clock();
        let assigned = self.stx.apply(self.chat_id, &plan).await;
        self.probe.wrote_plan(since);
        if let Err(e) = &assigned {
            telemetry::store_failed(plan.transition, e.kind);
        }
        let assigned = poison_on_error(self.poisoned, assigned)?;
        self.snap.apply(&plan, &assigned);
        // matrix: every landed state is in its cell. The model checker proves
        // this for the model; the assertion keeps the runtime honest.
        assert!(
            Matrix::REFERENCE.allows_landing(plan.transition, plan.from, plan.to),
            "{} from {} landed in {}, outside its matrix cell",
            plan.transition,
            plan.from,
            plan.to
        );
        debug_assert_eq!(self.snap.state(), plan.to);
        let outcome = plan.outcome(&assigned);
        if let Some(applied) = &mut self.applied {
            applied.push(plan.transition);
        }
        if let Some(recording) = &mut self.recording {
            recording.calls.push(Call { input, fence });
            recording.outcomes.push(outcome.clone());
        }
        Ok(outcome)
    }

    /// SetArchived: archive or unarchive an idle or error chat.
    pub async fn set_archived(&mut self, archived: bool) -> Result<Outcome, Error> {
        self.apply(Input::SetArchived { archived }).await
    }

    /// SendMessage: insert, queue, or queue and interrupt, by state.
    pub async fn send_message(
        &mut self,
        message: NewMessage,
        busy_behavior: BusyBehavior,
    ) -> Result<Outcome, Error> {
        self.apply(Input::SendMessage {
            message,
            busy_behavior,
        })
        .await
    }

    /// EditMessage: replace an active user message, truncating after it.
    pub async fn edit_message(
        &mut self,
        message_id: MessageId,
        content: Vec<Part>,
        created_by: Option<Uuid>,
    ) -> Result<Outcome, Error> {
        self.apply(Input::EditMessage {
            message_id,
            content,
            created_by,
            model_config_id: None,
        })
        .await
    }

    /// RequestCompaction: ask for a manual compaction turn (W -> R0).
    pub async fn request_compaction(&mut self) -> Result<Outcome, Error> {
        self.apply(Input::RequestCompaction).await
    }

    /// DeleteQueuedMessage.
    pub async fn delete_queued_message(&mut self, id: QueuedMessageId) -> Result<Outcome, Error> {
        self.apply(Input::DeleteQueuedMessage { id }).await
    }

    /// PromoteQueuedMessage.
    pub async fn promote_queued_message(&mut self, id: QueuedMessageId) -> Result<Outcome, Error> {
        self.apply(Input::PromoteQueuedMessage { id }).await
    }

    /// Interrupt (`None` reason: the default cancellation text).
    pub async fn interrupt(&mut self, reason: Option<String>) -> Result<Outcome, Error> {
        self.apply(Input::Interrupt { reason }).await
    }

    /// CompleteRequiresAction.
    pub async fn complete_requires_action(
        &mut self,
        results: Vec<ToolResultInput>,
        created_by: Option<Uuid>,
    ) -> Result<Outcome, Error> {
        self.apply(Input::CompleteRequiresAction {
            results,
            created_by,
            model_config_id: None,
        })
        .await
    }

    /// Acquire: take ownership and write a fresh heartbeat, unconditionally:
    /// it takes over even a fresh lease (tests and trace replays rely on
    /// that). Workers claim with [`ChatMachine::try_acquire`] instead, which
    /// takes the chat only when it is runnable and nobody keeps its lease
    /// alive.
    pub async fn acquire(
        &mut self,
        worker_id: WorkerId,
        runner_id: RunnerId,
    ) -> Result<Outcome, Error> {
        self.apply(Input::Acquire {
            owner: Owner {
                worker_id,
                runner_id,
            },
        })
        .await
    }

    /// How the unfenced worker transitions apply: no runner check.
    async fn worker(&mut self, input: Input) -> Result<Outcome, Error> {
        self.apply_fenced(input, None, None).await
    }

    worker_transitions!("");

    /// ReconcileInvalidState.
    pub async fn reconcile_invalid_state(
        &mut self,
        last_error: Option<JsonText>,
        cancellation_reason: Option<String>,
    ) -> Result<Outcome, Error> {
        self.apply(Input::ReconcileInvalidState {
            last_error,
            cancellation_reason,
        })
        .await
    }

    /// The worker transitions, fenced by the runner the caller holds: each
    /// first checks, under the lock, that the chat's runner is `runner` and
    /// otherwise fails with `LeaseLost`, whatever the state.
    pub fn fenced(&mut self, runner: RunnerId) -> Fenced<'_, 'a, S> {
        Fenced {
            tx: self,
            runner,
            history: None,
        }
    }

    /// Reads the whole chat (row, metadata, queue, history) as this
    /// transaction sees it.
    pub async fn load(&mut self) -> Result<ChatRecord, Error> {
        let record = self.stx.load(self.chat_id).await;
        poison_on_error(self.poisoned, record)
    }

    /// Writes metadata atomically with the transitions of this Update.
    pub async fn write_metadata(&mut self, patch: MetadataPatch) -> Result<(), Error> {
        let done = self.stx.write_metadata(self.chat_id, &patch).await;
        poison_on_error(self.poisoned, done)
    }

    /// Sets the title.
    pub async fn set_title(&mut self, title: impl Into<String>) -> Result<(), Error> {
        self.write_metadata(MetadataPatch {
            title: Some(title.into()),
            ..MetadataPatch::default()
        })
        .await
    }

    /// Replaces the labels.
    pub async fn set_labels(&mut self, labels: BTreeMap<String, String>) -> Result<(), Error> {
        self.write_metadata(MetadataPatch {
            labels: Some(labels),
            ..MetadataPatch::default()
        })
        .await
    }

    /// Replaces the free metadata JSON.
    pub async fn set_metadata(&mut self, metadata: Option<JsonText>) -> Result<(), Error> {
        self.write_metadata(MetadataPatch {
            metadata: Some(metadata),
            ..MetadataPatch::default()
        })
        .await
    }

    /// Runs a nested Update of another chat inside this transaction: its
    /// row is locked and bumped here, its notifications are published only
    /// after this transaction commits, and if it fails this transaction can
    /// no longer commit (there is no partial rollback).
    pub async fn update_nested<T>(
        &mut self,
        chat: ChatId,
        f: impl AsyncFnOnce(&mut Tx<'_, S>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let snap = match self.stx.begin_nested(chat, self.options).await {
            Ok(Some(snap)) => snap,
            Ok(None) => return Err(Error::ChatNotFound(chat)),
            Err(e) => {
                *self.poisoned = Some(Poison::Nested(chat));
                return Err(e.into());
            }
        };
        let start = Start::of(&snap);
        let span = op_span!(
            INFO,
            "update_nested",
            chat_id = %chat,
            transitions = Empty,
            from = snap.state().as_str(),
            to = Empty,
            snapshot_version = snap.row.versions.snapshot,
        );
        let mut inner = Tx {
            stx: &mut *self.stx,
            chat_id: chat,
            snap,
            options: self.options,
            nested: &mut *self.nested,
            poisoned: &mut *self.poisoned,
            recording: self.recording.as_ref().map(|_| Recording::default()),
            changes: &mut *self.changes,
            applied: self.applied.as_ref().map(|_| Vec::new()),
            probe: &mut *self.probe,
        };
        let called = f(&mut inner).instrument(span.clone()).await;
        let applied = inner.applied.take();
        telemetry::nested_ended(&span, applied.as_deref(), &inner.snap);
        // Counted with the enclosing Update's outcome, which a failure
        // here makes a rollback.
        inner.probe.accepted(applied);
        match called {
            Ok(v) => {
                let notes = after_update(&inner.snap);
                let change = inner.recording.take().map(|recording| {
                    start.change(chat, recording, inner.snap.clone(), notes.clone())
                });
                self.nested.extend(notes);
                self.changes.extend(change);
                Ok(v)
            }
            Err(e) => {
                *self.poisoned = Some(Poison::Nested(chat));
                Err(e)
            }
        }
    }
}

/// Worker transitions fenced by a runner id (see [`Tx::fenced`]).
pub struct Fenced<'t, 'a, S: Store> {
    tx: &'t mut Tx<'a, S>,
    runner: RunnerId,
    /// The `history_version` the caller generated from, if it said so.
    history: Option<i64>,
}

impl<S: Store> Fenced<'_, '_, S> {
    /// From now on, each fenced transition of this handle first checks
    /// (under the lock, after the runner check) that the chat's
    /// `history_version` equals `version`, else fails with
    /// `RejectionKind::HistoryChanged { expected, actual }` (a rejection:
    /// nothing written, the Update may go on or end). A worker passes the
    /// version of the history it generated its step from, so a step built
    /// on a history that was edited meanwhile (an edit keeps the owner, so
    /// the runner fence alone lets it through) is refused.
    ///
    /// The handle's own transitions do not count as a change: after one of
    /// them succeeds, the expectation moves to the history it left, so a
    /// worker can commit a step and then finish its turn through the same
    /// handle. (Nothing else can change the history in between: the Update
    /// holds the row lock.)
    pub fn expect_history(self, version: i64) -> Self {
        Fenced {
            history: Some(version),
            ..self
        }
    }

    /// How the fenced worker transitions apply: the runner is checked
    /// first, then the history expectation.
    async fn worker(&mut self, input: Input) -> Result<Outcome, Error> {
        let out = self
            .tx
            .apply_fenced(input, Some(self.runner), self.history)
            .await?;
        if self.history.is_some() {
            self.history = Some(self.tx.snap.row.versions.history);
        }
        Ok(out)
    }

    worker_transitions!(", if the chat's runner is still ours (else `LeaseLost`)");

    /// Any transition by input, fenced.
    pub async fn apply_input(&mut self, input: Input) -> Result<Outcome, Error> {
        self.worker(input).await
    }
}

/// A chat held under a shared row lock (ReadLock): reads only.
pub struct ReadLocked<'a, S: Store> {
    stx: &'a mut S::Tx,
    chat_id: ChatId,
    snap: Snapshot,
    /// The first store error seen (a Lock then refuses to commit).
    poisoned: Option<Poison>,
}

impl<S: Store> ReadLocked<'_, S> {
    /// The chat.
    pub fn chat_id(&self) -> ChatId {
        self.chat_id
    }

    /// The snapshot taken with the lock.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    /// The classified state.
    pub fn state(&self) -> ExecutionState {
        self.snap.state()
    }

    /// Reads the whole chat.
    pub async fn load(&mut self) -> Result<ChatRecord, Error> {
        let record = self.stx.load(self.chat_id).await;
        poison_on_error(&mut self.poisoned, record)
    }
}

/// A chat held under an exclusive row lock (Lock): reads, and metadata
/// writes that roll back with the callback.
pub struct Locked<'a, S: Store> {
    view: ReadLocked<'a, S>,
}

impl<'a, S: Store> std::ops::Deref for Locked<'a, S> {
    type Target = ReadLocked<'a, S>;
    fn deref(&self) -> &Self::Target {
        &self.view
    }
}

impl<S: Store> std::ops::DerefMut for Locked<'_, S> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.view
    }
}

impl<S: Store> Locked<'_, S> {
    /// Writes metadata (committed with the lock's transaction).
    pub async fn write_metadata(&mut self, patch: MetadataPatch) -> Result<(), Error> {
        let done = self
            .view
            .stx
            .write_metadata(self.view.chat_id, &patch)
            .await;
        poison_on_error(&mut self.view.poisoned, done)
    }
}

/// The input of [`create_chat`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateChat {
    /// The id to use; a random one when `None`.
    pub id: Option<ChatId>,
    /// The owning user (creator of queued messages by default).
    pub owner_id: Uuid,
    /// Names of client-executed tools.
    pub dynamic_tools: BTreeSet<String>,
    /// Model configuration of synthetic messages.
    pub last_model_config_id: Option<Uuid>,
    /// Metadata.
    pub metadata: ChatMetadata,
    /// The initial history; must not be empty.
    pub messages: Vec<NewMessage>,
}

impl From<NewChat> for CreateChat {
    /// The model's creation input, with its id and empty metadata (the
    /// model does not hold metadata).
    fn from(new: NewChat) -> Self {
        CreateChat {
            id: Some(new.id),
            owner_id: new.owner_id,
            dynamic_tools: new.dynamic_tools,
            last_model_config_id: new.last_model_config_id,
            metadata: ChatMetadata::default(),
            messages: new.messages,
        }
    }
}

/// A created chat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    /// Its id.
    pub chat_id: ChatId,
    /// Its row (running, snapshot 1, history 1).
    pub row: ChatRow,
    /// The initial messages' ids.
    pub messages: Vec<MessageId>,
}

/// CreateChat (N -> R0): inserts the row and its initial history in one
/// transaction, then publishes a `chat:update` and, always, an ownership
/// hint. No lock is taken; the row starts at snapshot 1.
pub async fn create_chat<S: Store>(
    store: &S,
    notify: &Notify,
    input: CreateChat,
) -> Result<Created, Error> {
    let id = input.id.unwrap_or_else(ChatId::new_random);
    let span = op_span!(
        INFO,
        "create_chat",
        chat_id = %id,
        messages = input.messages.len(),
        outcome = Empty,
        commit_us = Empty,
        publish_us = Empty,
        round_trips = Empty,
    );
    let mut probe = Probe::start(span.clone());
    let result = run_create_chat(store, notify, input, id, &mut probe)
        .instrument(span)
        .await;
    probe.end(result.as_ref().map(|_| ()));
    result
}

/// The body of [`create_chat`], inside its span.
async fn run_create_chat<S: Store>(
    store: &S,
    notify: &Notify,
    input: CreateChat,
    id: ChatId,
    probe: &mut Probe,
) -> Result<Created, Error> {
    let chat = Chat::create(&NewChat {
        id,
        owner_id: input.owner_id,
        dynamic_tools: input.dynamic_tools,
        last_model_config_id: input.last_model_config_id,
        messages: input.messages.clone(),
    })?;
    let notes = after_create(&chat.row);
    let in_tx: &[Notification] = match notify {
        Notify::InTransaction => &notes,
        Notify::AfterCommit(_) => &[],
    };
    let created = store
        .create_chat(&chat.row, &input.metadata, &input.messages, in_tx)
        .await;
    probe.lap("commit_us");
    let messages = match created? {
        CreateOutcome::Created(ids) => ids,
        CreateOutcome::AlreadyExists(state) => {
            return Err(Error::Rejected(Rejection {
                transition: chatstate_model::Transition::CreateChat,
                from: state,
                kind: RejectionKind::TransitionNotAllowed {
                    reason: Some(reasons::CREATE_EXISTS),
                },
            }));
        }
    };
    if let Notify::AfterCommit(publisher) = notify {
        let buffer = PublishBuffer::new(publisher.clone());
        for n in &notes {
            buffer
                .publish_notification(n)
                .expect("a fresh buffer accepts notifications");
        }
        let flushed = buffer.flush();
        probe.lap("publish_us");
        flushed.map_err(|source| Error::PublishAfterCommit {
            snapshot_version: chat.row.versions.snapshot,
            source,
        })?;
    }
    Ok(Created {
        chat_id: id,
        row: chat.row,
        messages,
    })
}

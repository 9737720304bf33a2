//! The transaction of an Update: `Tx` with one method per transition,
//! `Fenced` worker transitions, and the poisoning of a transaction by a
//! store error.

use std::collections::BTreeMap;

use chatstate_model::{
    BusyBehavior, Call, ChatId, ChatRow, EditContext, Env, ExecutionState, Input, JsonText, Matrix,
    MessageId, NewMessage, Notification, Options, Outcome, Owner, Part, QueuedMessageId, RunnerId,
    Snapshot, Timestamp, ToolResultInput, Transition, WorkerId, after_update, decide,
};
use tracing::Instrument;
use tracing::field::Empty;
use uuid::Uuid;

use crate::error::{Error, StoreError, StoreErrorKind};
use crate::observe::{ChatChange, Recording};
use crate::store::{ChatRecord, MetadataPatch, Store, StoreTx};
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

/// Why a transaction refuses to commit.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Poison {
    /// A nested Update of this chat failed.
    Nested(ChatId),
    /// A store operation failed (the first such failure).
    Store {
        context: &'static str,
        kind: StoreErrorKind,
    },
}

impl Poison {
    pub(crate) fn into_error(self) -> Error {
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
pub(crate) fn poison_on_error<T>(
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
/// snapshot, a metadata view, and the store's handle for the application's
/// own writes ([`Tx::app`]). There is no other access to the store, so
/// execution state can only change through transitions.
pub struct Tx<'a, S: Store> {
    pub(crate) stx: &'a mut S::Tx,
    pub(crate) chat_id: ChatId,
    pub(crate) snap: Snapshot,
    pub(crate) options: &'a Options,
    pub(crate) nested: &'a mut Vec<Notification>,
    pub(crate) poisoned: &'a mut Option<Poison>,
    /// The accepted transitions, when an observer wants them.
    pub(crate) recording: Option<Recording>,
    /// What nested Updates did, when an observer wants it.
    pub(crate) changes: &'a mut Vec<ChatChange>,
    /// The accepted transitions of this chat, when a span or the metrics
    /// want them.
    pub(crate) applied: Option<Vec<Transition>>,
    /// The Update's measurements (shared with nested Updates).
    pub(crate) probe: &'a mut Probe,
}

/// What an Update's observer report needs from the locked snapshot.
#[derive(Clone, Copy)]
pub(crate) struct Start {
    snapshot_version: i64,
    now: Timestamp,
    lease_fresh: bool,
}

impl Start {
    pub(crate) fn of(snap: &Snapshot) -> Self {
        Start {
            snapshot_version: snap.row.versions.snapshot,
            now: snap.now,
            lease_fresh: snap.lease_fresh,
        }
    }

    pub(crate) fn change(
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

    /// The application's handle on this Update's transaction, for its own
    /// writes (its billing rows, its outbox, its audit trail), committed
    /// or rolled back with the transitions of this Update.
    ///
    /// The handle is the store's [`StoreTx::App`], not the store's
    /// transaction: it offers what the application needs and nothing that
    /// writes a plan, a chat row or metadata, so execution state still
    /// changes only through transitions. Each store documents its handle
    /// (`chatstate-store-pg`: `PgApp`, the open connection for the
    /// application's tables and statements deferred to the commit;
    /// `chatstate-store-mem`: `MemApp`, hooks run at commit) and the
    /// rules, among them that a failed application write never commits
    /// silently (see `docs/transactions.md`).
    ///
    /// Inside a nested Update this is the same transaction.
    ///
    /// ```
    /// # use chatstate::{ChatMachine, CreateChat, NewMessage, Options, RecordingPublisher, create_chat};
    /// # use chatstate_store_mem::MemStore;
    /// # use std::sync::{Arc, atomic::{AtomicU64, Ordering}};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), chatstate::Error> {
    /// # let store = MemStore::new();
    /// # let publisher = Arc::new(RecordingPublisher::new());
    /// # let created = create_chat(&store, &publisher.clone().into(), CreateChat {
    /// #     messages: vec![NewMessage::user("hello")], ..CreateChat::default() }).await?;
    /// let chat = ChatMachine::new(store, publisher, created.chat_id, Options::default());
    /// let tokens_billed = Arc::new(AtomicU64::new(0));
    /// let billed = tokens_billed.clone();
    /// chat.update(async |tx| {
    ///     tx.commit_step(vec![NewMessage::assistant("hi")], false).await?;
    ///     // Runs only if, and when, this Update commits.
    ///     tx.app().on_commit(move || {
    ///         billed.fetch_add(42, Ordering::SeqCst);
    ///     });
    ///     Ok(())
    /// }).await?;
    /// assert_eq!(tokens_billed.load(Ordering::SeqCst), 42);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// The store transaction's own methods are out of reach: a plan the
    /// model did not decide cannot be written through the handle,
    ///
    /// ```compile_fail,E0599
    /// # use chatstate::{Error, StoreTx, Tx, model::Plan};
    /// # use chatstate_store_mem::MemStore;
    /// async fn bypass(tx: &mut Tx<'_, MemStore>, plan: &Plan) -> Result<(), Error> {
    ///     let chat = tx.chat_id();
    ///     tx.app().apply(chat, plan).await?; // no method `apply` on the handle
    ///     Ok(())
    /// }
    /// ```
    ///
    /// nor metadata written past [`Tx::write_metadata`], even naming the
    /// trait:
    ///
    /// ```compile_fail,E0277
    /// # use chatstate::{Error, MetadataPatch, StoreTx, Tx};
    /// # use chatstate_store_mem::MemStore;
    /// async fn bypass(tx: &mut Tx<'_, MemStore>) -> Result<(), Error> {
    ///     let chat = tx.chat_id();
    ///     // The handle is not a `StoreTx`.
    ///     StoreTx::write_metadata(&mut tx.app(), chat, &MetadataPatch::default()).await?;
    ///     Ok(())
    /// }
    /// ```
    pub fn app(&mut self) -> <S::Tx as StoreTx>::App<'_> {
        self.stx.app()
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
    /// that). Workers claim with [`ChatMachine::try_acquire`](crate::ChatMachine::try_acquire) instead, which
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

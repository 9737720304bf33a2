//! Chat creation: `create_chat` and its input.

use std::collections::BTreeSet;

use chatstate_model::{
    Chat, ChatId, ChatRow, MessageId, NewChat, NewMessage, Notification, Rejection, RejectionKind,
    after_create, reasons,
};
use tracing::Instrument;
use tracing::field::Empty;
use uuid::Uuid;

use crate::error::{Error, FlushError};
use crate::publish::{Notify, Publisher};
use crate::store::{ChatMetadata, CreateOutcome, Store};
use crate::telemetry::{Probe, op_span};

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
    let prepared = CreateChat {
        id: Some(id),
        ..input
    }
    .prepare()?;
    let in_tx: &[Notification] = match notify {
        Notify::InTransaction => &prepared.notifications,
        Notify::AfterCommit(_) => &[],
    };
    let created = store
        .create_chat(&prepared.row, &prepared.metadata, &prepared.messages, in_tx)
        .await;
    probe.lap("commit_us");
    let created = prepared.created(created?)?;
    if let Notify::AfterCommit(publisher) = notify {
        let flushed = created.publish(publisher.as_ref());
        probe.lap("publish_us");
        flushed?;
    }
    Ok(created.created)
}

/// A chat creation validated by the model and ready for a store to insert
/// (see [`CreateChat::prepare`]): what a store-specific creation inside an
/// application's own transaction writes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PreparedChat {
    /// The new row (running, snapshot 1, history 1).
    pub row: ChatRow,
    /// Metadata.
    pub metadata: ChatMetadata,
    /// The initial history.
    pub messages: Vec<NewMessage>,
    /// What the creation announces once committed: a `chat:update` and an
    /// ownership hint.
    pub notifications: Vec<Notification>,
}

/// A chat a store inserted, and the notifications still to publish once
/// the creation's transaction has committed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreatedPending {
    /// The chat.
    pub created: Created,
    /// The creation's notifications (see [`PreparedChat::notifications`]).
    pub notifications: Vec<Notification>,
}

impl CreateChat {
    /// Validates the creation with the model (non-empty initial history)
    /// and builds the row and the notifications, without touching a store.
    /// [`create_chat`] is this, one store call, and the publication; a
    /// store that creates chats inside an application's transaction builds
    /// on it.
    pub fn prepare(self) -> Result<PreparedChat, Error> {
        let id = self.id.unwrap_or_else(ChatId::new_random);
        let chat = Chat::create(&NewChat {
            id,
            owner_id: self.owner_id,
            dynamic_tools: self.dynamic_tools,
            last_model_config_id: self.last_model_config_id,
            messages: self.messages.clone(),
        })?;
        Ok(PreparedChat {
            notifications: after_create(&chat.row),
            row: chat.row,
            metadata: self.metadata,
            messages: self.messages,
        })
    }
}

impl PreparedChat {
    /// What the store's answer means: the created chat, or the rejection
    /// of a creation whose id exists already (nothing was written).
    pub fn created(self, outcome: CreateOutcome) -> Result<CreatedPending, Error> {
        match outcome {
            CreateOutcome::Created(messages) => Ok(CreatedPending {
                created: Created {
                    chat_id: self.row.id,
                    row: self.row,
                    messages,
                },
                notifications: self.notifications,
            }),
            CreateOutcome::AlreadyExists(state) => Err(Error::Rejected(Rejection {
                transition: chatstate_model::Transition::CreateChat,
                from: state,
                kind: RejectionKind::TransitionNotAllowed {
                    reason: Some(reasons::CREATE_EXISTS),
                },
            })),
        }
    }
}

impl CreatedPending {
    /// Hands the notifications to `publisher`, in order. Call it once the
    /// creation's transaction has committed, and never if it did not; a
    /// refusal is [`Error::PublishAfterCommit`] (the chat exists).
    pub fn publish(&self, publisher: &dyn Publisher) -> Result<(), Error> {
        let errors: Vec<_> = self
            .notifications
            .iter()
            .filter_map(|n| publisher.publish(&n.channel(), &n.payload()).err())
            .collect();
        if errors.is_empty() {
            return Ok(());
        }
        Err(Error::PublishAfterCommit {
            snapshot_version: self.created.row.versions.snapshot,
            source: FlushError(errors),
        })
    }
}

//! Chat creation: `create_chat` and its input.

use std::collections::BTreeSet;

use chatstate_model::{
    Chat, ChatId, ChatRow, MessageId, NewChat, NewMessage, Notification, Rejection, RejectionKind,
    after_create, reasons,
};
use tracing::Instrument;
use tracing::field::Empty;
use uuid::Uuid;

use crate::error::Error;
use crate::publish::{Notify, PublishBuffer};
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

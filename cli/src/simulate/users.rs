//! The users: each creates its own chats and acts on them, choosing each
//! action from the chat's state under the row lock: send (directly, queued
//! or interrupting), edit, archive, promote and delete queued messages,
//! answer client tool calls, interrupt, ask for compaction, and now and
//! then act on a stale screen (an action that no longer applies).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use chatstate::{
    BusyBehavior, ChatId, CreateChat, Error, ExecutionState, Input, MessageId, NewMessage, Part,
    Role, Store, ToolResultInput, Transition, Tx, create_chat,
};
use chatstate_model::NewChat;
use chatstate_model::oracle::CreatedChat;
use rand::Rng;
use rand::rngs::StdRng;

use super::shared::Shared;

/// Why a callback ended without committing, on purpose.
#[derive(Debug, thiserror::Error)]
enum Signal {
    /// Nothing to do in this state: roll back (no bump).
    #[error("nothing to do")]
    Idle,
}

fn idle<T>() -> Result<T, Error> {
    Err(Error::callback(Signal::Idle))
}

/// True for the error of a callback that found nothing to do.
pub(super) fn is_idle(e: &Error) -> bool {
    match e {
        Error::Callback(inner) => inner.downcast_ref::<Signal>().is_some(),
        _ => false,
    }
}

/// Applies one unfenced transition and notes it.
async fn apply<S: Store>(
    tx: &mut Tx<'_, S>,
    applied: &mut Vec<Transition>,
    input: Input,
) -> Result<(), Error> {
    let t = input.transition();
    tx.apply(input).await?;
    applied.push(t);
    Ok(())
}

/// The client tool the workers ask users to run.
pub(super) const DYNAMIC_TOOL: &str = "ask_user";

/// One user, until the run stops.
pub(super) async fn user<S: Store>(sh: Arc<Shared<S>>, index: usize, mut rng: StdRng) {
    let me = uuid::Builder::from_random_bytes(rng.random()).into_uuid();
    let mut mine: Vec<ChatId> = Vec::new();
    let mut said = 0u64;
    while !sh.stopped() {
        let want_new = mine.is_empty() || rng.random_ratio(1, 20);
        if want_new && sh.reserved.fetch_add(1, Ordering::Relaxed) < sh.args.chats {
            if let Some(chat) = create(&sh, &mut rng, me, index).await {
                mine.push(chat);
            }
        } else if !mine.is_empty() {
            let chat = mine[rng.random_range(0..mine.len())];
            let machine = sh.machine(chat);
            said += 1;
            let text = format!("user {index} says {said}");
            let roll = rng.random_range(0..100u32);
            let pick = rng.random::<u64>();
            let started = Instant::now();
            let mut applied = Vec::new();
            let result = machine
                .update(async |tx| user_step(tx, &mut applied, roll, pick, &text, me).await)
                .await;
            sh.settle(&applied, &result, started);
        }
        let pause = sh.pause(&mut rng, sh.args.think_ms);
        sh.sleep(pause).await;
    }
}

/// Creates a chat of this user's.
async fn create<S: Store>(
    sh: &Shared<S>,
    rng: &mut StdRng,
    me: uuid::Uuid,
    index: usize,
) -> Option<ChatId> {
    let id = ChatId::new_random();
    let messages: Vec<NewMessage> = (0..rng.random_range(1..=2))
        .map(|i| NewMessage {
            created_by: Some(me),
            ..NewMessage::user(format!("user {index} opens with {i}"))
        })
        .collect();
    let new = NewChat {
        id,
        owner_id: me,
        dynamic_tools: [DYNAMIC_TOOL.to_owned()].into(),
        last_model_config_id: None,
        messages,
    };
    match create_chat(&sh.store, &sh.notify, CreateChat::from(new.clone())).await {
        Ok(created) => {
            sh.tally().created.push(CreatedChat {
                new,
                ids: created.messages,
                // Taken from the publisher's record at the end.
                published: Vec::new(),
            });
            Some(id)
        }
        Err(e) => {
            sh.tally().store_failure(&e);
            None
        }
    }
}

/// One user action, chosen from the chat's state under the lock. `roll`
/// picks the action, `pick` a message or queue entry.
async fn user_step<S: Store>(
    tx: &mut Tx<'_, S>,
    applied: &mut Vec<Transition>,
    roll: u32,
    pick: u64,
    text: &str,
    me: uuid::Uuid,
) -> Result<(), Error> {
    use ExecutionState as St;
    let state = tx.state();
    let queue = tx.snapshot().queue.clone();
    let message = NewMessage {
        created_by: Some(me),
        ..NewMessage::user(text)
    };
    let send = |busy_behavior| Input::SendMessage {
        message: message.clone(),
        busy_behavior,
    };
    let nth = |len: usize| (pick % len.max(1) as u64) as usize;
    // A user acting on a stale screen: what they see is no longer so.
    if roll < 2 {
        let stale = match pick % 4 {
            0 => Input::SetArchived { archived: true },
            1 => Input::DeleteQueuedMessage {
                id: chatstate::QueuedMessageId(i64::MAX),
            },
            2 => Input::Interrupt { reason: None },
            _ => Input::CompleteRequiresAction {
                results: Vec::new(),
                created_by: Some(me),
                model_config_id: None,
            },
        };
        apply(tx, applied, stale).await?;
        return Ok(());
    }
    let input = match state {
        St::W | St::E0 | St::E1 => match roll {
            0..70 => send(BusyBehavior::Queue),
            70..78 => return edit(tx, applied, pick, text, me).await,
            78..84 => Input::SetArchived { archived: true },
            84..88 if state == St::W => Input::RequestCompaction,
            84..94 if state == St::E1 => Input::PromoteQueuedMessage {
                id: queue[nth(queue.len())],
            },
            _ => return idle(),
        },
        St::XW | St::XE0 | St::XE1 => match roll {
            0..50 => Input::SetArchived { archived: false },
            _ => return idle(),
        },
        St::R0 | St::R1 | St::I0 | St::I1 => match roll {
            0..20 => send(BusyBehavior::Queue),
            20..24 => send(BusyBehavior::Interrupt),
            24..28 if matches!(state, St::R0 | St::R1) => Input::Interrupt { reason: None },
            28..33 if !queue.is_empty() => Input::DeleteQueuedMessage {
                id: queue[nth(queue.len())],
            },
            33..37 if !queue.is_empty() => Input::PromoteQueuedMessage {
                id: queue[nth(queue.len())],
            },
            37..39 => return edit(tx, applied, pick, text, me).await,
            _ => return idle(),
        },
        St::A0 | St::A1 => {
            let pending = tx
                .snapshot()
                .tools
                .outstanding(Some(&tx.row().dynamic_tools));
            match roll {
                0..60 => Input::CompleteRequiresAction {
                    results: pending
                        .into_iter()
                        .map(|(id, _)| ToolResultInput {
                            tool_call_id: id,
                            output: format!("{{\"answer\": {pick}}}"),
                            is_error: false,
                        })
                        .collect(),
                    created_by: Some(me),
                    model_config_id: None,
                },
                60..63 => Input::CompleteRequiresAction {
                    results: vec![ToolResultInput {
                        tool_call_id: "not-asked".to_owned(),
                        output: "{}".to_owned(),
                        is_error: false,
                    }],
                    created_by: Some(me),
                    model_config_id: None,
                },
                63..70 => Input::Interrupt { reason: None },
                70..76 => send(BusyBehavior::Interrupt),
                76..82 => send(BusyBehavior::Queue),
                _ => return idle(),
            }
        }
        St::Invalid => Input::ReconcileInvalidState {
            last_error: None,
            cancellation_reason: None,
        },
        St::N => unreachable!("an Update holds an existing chat"),
    };
    apply(tx, applied, input).await?;
    Ok(())
}

/// EditMessage of one of the chat's active user messages.
async fn edit<S: Store>(
    tx: &mut Tx<'_, S>,
    applied: &mut Vec<Transition>,
    pick: u64,
    text: &str,
    me: uuid::Uuid,
) -> Result<(), Error> {
    let record = tx.load().await?;
    let users: Vec<MessageId> = record
        .active_history()
        .filter(|m| m.role == Role::User)
        .map(|m| m.id)
        .collect();
    let Some(&target) = users.get((pick % users.len().max(1) as u64) as usize) else {
        return idle();
    };
    let input = Input::EditMessage {
        message_id: target,
        content: vec![Part::text(format!("{text} (edited)"))],
        created_by: Some(me),
        model_config_id: None,
    };
    apply(tx, applied, input).await?;
    Ok(())
}

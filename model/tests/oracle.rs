//! The linearizability oracle catches a store that strays from the model.
//!
//! A chat is driven through the model and recorded as a store would record
//! it (with ids shifted, as if other chats had taken the lower ones); the
//! faithful record passes, and each tampered copy fails with the violation
//! it plants.

use std::collections::BTreeMap;

use chatstate_model::oracle::{
    CommittedUpdate, Config, CreatedChat, Published, StoredChat, Violation, check,
};
use chatstate_model::{
    BusyBehavior, Call, Chat, ChatId, ExecutionState, Input, MessageId, NewChat, NewMessage,
    Options, Outcome, Owner, Part, Promotion, QueuedMessageId, RunnerId, Snapshot, StepEnv,
    Timestamp, WorkerId, after_create, update,
};
use uuid::Uuid;

/// Store ids are the model's plus this, as if other chats had taken the
/// lower ones.
const SHIFT: i64 = 1000;

fn message(id: MessageId) -> MessageId {
    MessageId(id.0 + SHIFT)
}

fn queued(id: QueuedMessageId) -> QueuedMessageId {
    QueuedMessageId(id.0 + SHIFT)
}

fn shift_outcome(o: &Outcome) -> Outcome {
    Outcome {
        inserted: o.inserted.iter().copied().map(message).collect(),
        queued: o.queued.map(queued),
        promoted: o.promoted.map(|p| Promotion {
            queued: queued(p.queued),
            message: message(p.message),
        }),
        deleted_messages: o.deleted_messages.iter().copied().map(message).collect(),
        deleted_queued: o.deleted_queued.iter().copied().map(queued).collect(),
        ..o.clone()
    }
}

fn shift_input(i: &Input) -> Input {
    let mut i = i.clone();
    match &mut i {
        Input::EditMessage { message_id, .. } => *message_id = message(*message_id),
        Input::DeleteQueuedMessage { id } | Input::PromoteQueuedMessage { id } => {
            *id = queued(*id);
        }
        _ => {}
    }
    i
}

struct Run {
    config: Config,
    created: CreatedChat,
    committed: Vec<CommittedUpdate>,
    stored: BTreeMap<ChatId, StoredChat>,
}

fn owner() -> Owner {
    Owner {
        worker_id: WorkerId(Uuid::from_u128(10)),
        runner_id: RunnerId(Uuid::from_u128(9)),
    }
}

/// The chat most tests tamper with: a turn that queues two messages,
/// deletes one, finishes (promoting the other) and is followed by an edit.
fn bundles() -> Vec<Vec<Input>> {
    vec![
        vec![
            Input::Acquire { owner: owner() },
            Input::CommitStep {
                messages: vec![NewMessage::assistant("hello")],
                consume_compaction_request: false,
            },
        ],
        vec![Input::SendMessage {
            message: NewMessage::user("more"),
            busy_behavior: BusyBehavior::Queue,
        }],
        vec![Input::SendMessage {
            message: NewMessage::user("and more"),
            busy_behavior: BusyBehavior::Queue,
        }],
        vec![Input::DeleteQueuedMessage {
            id: QueuedMessageId(2),
        }],
        vec![Input::FinishTurn],
        vec![Input::EditMessage {
            message_id: MessageId(1),
            content: vec![Part::text("hi again")],
            created_by: None,
            model_config_id: None,
        }],
    ]
}

/// A chat driven through the model by `bundles` (one Update each),
/// recorded as a store would record it.
fn run_of(bundles: Vec<Vec<Input>>) -> Run {
    let options = Options::default();
    let new = NewChat {
        id: ChatId(Uuid::from_u128(7)),
        owner_id: Uuid::from_u128(8),
        dynamic_tools: Default::default(),
        last_model_config_id: None,
        messages: vec![NewMessage::user("hi")],
    };
    let mut chat = Chat::create(&new).unwrap();
    let created = CreatedChat {
        new: new.clone(),
        ids: chat.history.iter().map(|m| message(m.id)).collect(),
        published: after_create(&chat.row)
            .iter()
            .map(Published::from)
            .collect(),
    };
    let mut committed = Vec::new();
    for (i, inputs) in bundles.into_iter().enumerate() {
        let now = Timestamp(1_000_000 * (i as i64 + 1));
        let lease_fresh = chat.row.owner.is_some();
        if let Some(o) = chat.row.owner {
            chat.heartbeats.insert(o.runner_id, now);
        }
        let calls: Vec<Call> = inputs.into_iter().map(Call::from).collect();
        let done = update(Some(&chat), &calls, &StepEnv::new(now, &options)).unwrap();
        let end = done.chat.snapshot(now, &options);
        committed.push(CommittedUpdate {
            chat: new.id,
            snapshot: done.chat.row.versions.snapshot,
            now,
            lease_fresh,
            calls: calls
                .iter()
                .map(|c| Call {
                    input: shift_input(&c.input),
                    fence: c.fence,
                })
                .collect(),
            outcomes: done.outcomes.iter().map(shift_outcome).collect(),
            end: Snapshot {
                queue: end.queue.iter().copied().map(queued).collect(),
                ..end
            },
            published: done.notifications.iter().map(Published::from).collect(),
        });
        chat = done.chat;
    }
    let mut last = StoredChat {
        row: chat.row.clone(),
        queue: chat.queue.clone(),
        history: chat.history.clone(),
    };
    for m in &mut last.history {
        m.id = message(m.id);
        m.queued_message_id = m.queued_message_id.map(queued);
    }
    for q in &mut last.queue {
        q.id = queued(q.id);
    }
    Run {
        config: Config {
            options,
            exact_time: true,
        },
        created,
        committed,
        stored: [(new.id, last)].into(),
    }
}

fn violations(r: Run) -> Vec<Violation> {
    check(&r.config, &[r.created], &r.committed, &r.stored).violations
}

/// Runs the oracle on the standard run, after `tamper`, and returns the
/// violations, one line each.
fn check_tampered(tamper: impl FnOnce(&mut Run)) -> Vec<String> {
    let mut r = run_of(bundles());
    tamper(&mut r);
    violations(r).iter().map(Violation::to_string).collect()
}

#[test]
fn a_faithful_store_passes() {
    let r = run_of(bundles());
    let verdict = check(&r.config, &[r.created], &r.committed, &r.stored);
    assert!(verdict.violations.is_empty(), "{:?}", verdict.violations);
    assert_eq!((verdict.chats_checked, verdict.updates_checked), (1, 6));
}

#[test]
fn a_lost_commit_is_a_gap() {
    let v = check_tampered(|r| {
        r.committed.remove(2);
    });
    assert!(
        v[0].contains("committed snapshot 5 where 4 comes next"),
        "{v:?}"
    );
}

#[test]
fn an_unrecorded_commit_at_the_end_is_found() {
    let v = check_tampered(|r| {
        r.committed.pop();
    });
    assert!(v[0].contains("a commit nobody saw"), "{v:?}");
}

#[test]
fn an_unrecorded_creation_is_found() {
    let v = check_tampered(|r| r.created.new.id = ChatId(Uuid::from_u128(70)));
    assert!(
        v.iter()
            .any(|v| v.contains("6 committed Updates, but its creation was not recorded")),
        "{v:?}"
    );
}

#[test]
fn a_wrong_landing_state_is_found() {
    let mut r = run_of(bundles());
    r.committed[4].outcomes[0].to = ExecutionState::R1;
    let v = violations(r);
    assert!(v[0].to_string().contains("outcome differs"), "{v:?}");
    // The alternate form shows both sides on lines of their own.
    let pretty = format!("{:#}", v[0]);
    assert!(
        pretty.contains("snapshot 6: outcome differs:\nstore Outcome {\n"),
        "{pretty}"
    );
}

#[test]
fn a_wrong_version_is_found() {
    let v = check_tampered(|r| r.committed[1].end.row.versions.queue += 1);
    assert!(v[0].contains("snapshot differs"), "{v:?}");
}

#[test]
fn store_time_is_compared_exactly_on_an_exact_clock_only() {
    let tamper = |r: &mut Run| r.committed[1].end.now.0 += 1;
    let v = check_tampered(tamper);
    assert!(v[0].contains("snapshot differs"), "{v:?}");
    let mut r = run_of(bundles());
    tamper(&mut r);
    r.config.exact_time = false;
    assert!(violations(r).is_empty());
}

#[test]
fn a_missing_hint_is_found() {
    // A new chat is runnable and unowned: its creation must hint.
    let v = check_tampered(|r| {
        r.created.published.pop();
    });
    assert!(v[0].contains("creation published"), "{v:?}");
}

#[test]
fn notifications_are_compared_byte_for_byte() {
    // The same JSON, one space longer.
    let v = check_tampered(|r| r.committed[1].published[0].payload.insert(1, b' '));
    assert!(v[0].contains("snapshot 3: published"), "{v:?}");
}

#[test]
fn a_fresh_lease_on_an_unowned_chat_is_found() {
    let v = check_tampered(|r| r.committed[0].lease_fresh = true);
    assert!(v[0].contains("a fresh lease on an unowned chat"), "{v:?}");
}

#[test]
fn ids_that_are_not_one_to_one_are_found() {
    let v = check_tampered(|r| {
        // The second send claims the id the first send's row got.
        let first = r.committed[1].outcomes[0].queued;
        r.committed[2].outcomes[0].queued = first;
    });
    assert!(v[0].contains("not one-to-one"), "{v:?}");
}

#[test]
fn a_row_inserted_earlier_in_the_same_update_can_be_named() {
    let r = run_of(vec![
        vec![Input::Acquire { owner: owner() }],
        vec![
            Input::SendMessage {
                message: NewMessage::user("more"),
                busy_behavior: BusyBehavior::Queue,
            },
            Input::DeleteQueuedMessage {
                id: QueuedMessageId(1),
            },
        ],
    ]);
    assert_eq!(
        r.committed[1].outcomes[0].queued,
        Some(queued(QueuedMessageId(1)))
    );
    let v = violations(r);
    assert!(v.is_empty(), "{v:?}");
}

#[test]
fn a_different_final_history_is_found() {
    let v = check_tampered(|r| {
        let last = r.stored.values_mut().next().unwrap();
        last.history[1].deleted = !last.history[1].deleted;
    });
    assert!(v[0].contains("final history differs"), "{v:?}");
}

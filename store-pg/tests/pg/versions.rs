//! Versions, attempts, revisions and history: a sequence of Updates on
//! Postgres leaves exactly what the reference model (`chatstate_model::
//! update`) predicts for the same sequence.

use std::collections::BTreeSet;

use chatstate::{BusyBehavior, ChatRecord, CreateChat, Notify, create_chat};
use chatstate_model::{
    Call, Chat, Input, JsonText, NewChat, NewMessage, Part, StepEnv, Timestamp, update,
};

use crate::common::{DYNAMIC_TOOL, dynamic_call, dynamic_result, fx};

/// One Update of the sequence. Ids differ between the model and the
/// store, so inputs naming rows name them by position.
enum Op {
    /// One transition.
    In(Input),
    /// Several transitions in one Update.
    Bundle(Vec<Input>),
    /// An Update that applies nothing (a touch).
    Empty,
    /// EditMessage of the n-th active message.
    EditNth(usize),
    /// DeleteQueuedMessage of the n-th queued message.
    DeleteQueuedNth(usize),
    /// PromoteQueuedMessage of the n-th queued message.
    PromoteQueuedNth(usize),
}

fn queue(text: &str) -> Input {
    Input::SendMessage {
        message: NewMessage::user(text),
        busy_behavior: BusyBehavior::Queue,
    }
}

fn commit(message: NewMessage) -> Input {
    Input::CommitStep {
        messages: vec![message],
        consume_compaction_request: true,
    }
}

fn ops(owner: chatstate_model::Owner) -> Vec<Op> {
    use Op::*;
    vec![
        In(Input::RecordGenerationAttempt),
        In(Input::RecordRetryState {
            retry_state: r#"{"a": 1}"#.into(),
        }),
        In(Input::RecordGenerationAttempt),
        In(Input::RecordRetryState {
            retry_state: r#"{"b": [2, 3]}"#.into(),
        }),
        In(commit(dynamic_call())),
        In(queue("q1")),
        In(Input::EnterRequiresAction),
        In(queue("q2")),
        In(Input::CompleteRequiresAction {
            results: vec![dynamic_result()],
            created_by: None,
            model_config_id: None,
        }),
        DeleteQueuedNth(1),
        Empty,
        In(queue("q3")),
        PromoteQueuedNth(1),
        In(Input::FinishInterruption {
            partial_messages: vec![NewMessage::assistant("partial")],
        }),
        In(Input::RecordGenerationAttempt),
        Bundle(vec![
            Input::RecordRetryState {
                retry_state: r#""retrying""#.into(),
            },
            commit(NewMessage::assistant("done")),
            Input::FinishTurn,
        ]),
        In(Input::FinishTurn),
        EditNth(0),
        In(Input::Acquire { owner }),
        In(commit(dynamic_call())),
        Bundle(vec![
            Input::SendMessage {
                message: NewMessage::user("stop"),
                busy_behavior: BusyBehavior::Interrupt,
            },
            queue("q4"),
        ]),
        In(Input::Abandon),
        In(Input::FinishInterruption {
            partial_messages: vec![NewMessage::new(
                chatstate_model::Role::Tool,
                vec![Part::tool_result(
                    crate::common::DYNAMIC_CALL,
                    DYNAMIC_TOOL,
                    JsonText::string("late"),
                )],
            )],
        }),
        In(Input::FinishError {
            last_error: Some(JsonText::parse(r#"{"message": "x", "kind": "generic"}"#).unwrap()),
        }),
        In(Input::SetArchived { archived: true }),
        In(Input::SetArchived { archived: false }),
        PromoteQueuedNth(0),
        In(Input::FinishTurn),
        In(Input::RequestCompaction),
        In(commit(NewMessage::assistant("compacted"))),
        In(Input::Interrupt { reason: None }),
        In(Input::FinishInterruption {
            partial_messages: vec![],
        }),
        In(Input::SendMessage {
            message: NewMessage::user("fresh start"),
            busy_behavior: BusyBehavior::Queue,
        }),
        // Several messages in one plan keep their order; a turn that ends
        // with an outstanding call inserts the cancellation before the
        // promoted queue head.
        In(Input::CommitStep {
            messages: vec![
                NewMessage::assistant("one"),
                NewMessage::user("two"),
                dynamic_call(),
            ],
            consume_compaction_request: false,
        }),
        In(queue("q5")),
        In(queue("q6")),
        In(Input::FinishTurn),
        In(commit(dynamic_call())),
        In(Input::EnterRequiresAction),
        In(Input::Interrupt {
            reason: Some("user's \\ reason".into()),
        }),
    ]
}

/// The inputs of an op against one side's rows.
fn resolve(
    op: &Op,
    active: &[chatstate_model::MessageId],
    queued: &[chatstate_model::QueuedMessageId],
) -> Vec<Input> {
    match op {
        Op::In(i) => vec![i.clone()],
        Op::Bundle(v) => v.clone(),
        Op::Empty => vec![],
        Op::EditNth(n) => vec![Input::EditMessage {
            message_id: active[*n],
            content: vec![Part::text("edited")],
            created_by: None,
            model_config_id: None,
        }],
        Op::DeleteQueuedNth(n) => vec![Input::DeleteQueuedMessage { id: queued[*n] }],
        Op::PromoteQueuedNth(n) => vec![Input::PromoteQueuedMessage { id: queued[*n] }],
    }
}

fn compare(at: usize, model: &Chat, rec: &ChatRecord) {
    let (m, s) = (&model.row, &rec.row);
    let ctx = format!("after op {at}");
    assert_eq!(s.versions, m.versions, "{ctx}: versions");
    assert_eq!(s.generation_attempt, m.generation_attempt, "{ctx}: attempt");
    assert_eq!(s.status, m.status, "{ctx}: status");
    assert_eq!(s.archived, m.archived, "{ctx}: archived");
    assert_eq!(s.owner, m.owner, "{ctx}: owner");
    assert_eq!(s.retry_state, m.retry_state, "{ctx}: retry state");
    assert_eq!(s.last_error, m.last_error, "{ctx}: last error");
    assert_eq!(s.dynamic_tools, m.dynamic_tools, "{ctx}: tools");
    assert_eq!(
        s.last_model_config_id, m.last_model_config_id,
        "{ctx}: model config"
    );
    // Store time is not model time: compare presence only.
    assert_eq!(
        s.requires_action_deadline_at.is_some(),
        m.requires_action_deadline_at.is_some(),
        "{ctx}: deadline"
    );
    assert_eq!(
        s.compaction_requested_at.is_some(),
        m.compaction_requested_at.is_some(),
        "{ctx}: compaction marker"
    );
    assert_eq!(
        rec.history.len(),
        model.history.len(),
        "{ctx}: history length"
    );
    for (i, (s, m)) in rec.history.iter().zip(&model.history).enumerate() {
        let what = format!("{ctx}: message {i}");
        assert_eq!(s.role, m.role, "{what}: role");
        assert_eq!(s.content, m.content, "{what}: content");
        assert_eq!(s.visibility, m.visibility, "{what}: visibility");
        assert_eq!(s.model_config_id, m.model_config_id, "{what}: model config");
        assert_eq!(s.created_by, m.created_by, "{what}: created_by");
        assert_eq!(s.deleted, m.deleted, "{what}: deleted");
        assert_eq!(s.revision, m.revision, "{what}: revision");
        assert_eq!(
            s.queued_message_id.is_some(),
            m.queued_message_id.is_some(),
            "{what}: promoted"
        );
    }
    let contents = |q: &[chatstate_model::QueuedMessage]| {
        q.iter()
            .map(|q| (q.content.clone(), q.model_config_id, q.created_by))
            .collect::<Vec<_>>()
    };
    assert_eq!(contents(&rec.queue), contents(&model.queue), "{ctx}: queue");
}

#[tokio::test]
async fn updates_match_the_reference_model() {
    let fx = fx().await;
    let owner_id = uuid::Uuid::new_v4();
    let model_config = Some(uuid::Uuid::new_v4());
    let tools = BTreeSet::from([DYNAMIC_TOOL.to_owned()]);
    let first = vec![NewMessage::user("hello"), NewMessage::assistant("hi")];
    let created = create_chat(
        &fx.store,
        &Notify::InTransaction,
        CreateChat {
            owner_id,
            dynamic_tools: tools.clone(),
            last_model_config_id: model_config,
            messages: first.clone(),
            ..CreateChat::default()
        },
    )
    .await
    .unwrap();
    let mut model = Chat::create(&NewChat {
        id: created.chat_id,
        owner_id,
        dynamic_tools: tools,
        last_model_config_id: model_config,
        messages: first,
    })
    .unwrap();
    let m = fx.machine(created.chat_id);
    let load = async || m.load().await.unwrap();
    compare(0, &model, &load().await);

    let now = Timestamp(1_767_225_600_000_000);
    for (at, op) in ops(fx.owner).iter().enumerate() {
        let active: Vec<_> = model.active_history().map(|m| m.id).collect();
        let queued: Vec<_> = model.queue.iter().map(|q| q.id).collect();
        let calls: Vec<Call> = resolve(op, &active, &queued)
            .into_iter()
            .map(Call::from)
            .collect();
        let expected = update(Some(&model), &calls, &StepEnv::new(now, &fx.options))
            .unwrap_or_else(|e| panic!("model rejects op {at}: {e}"));

        let rec = load().await;
        let active: Vec<_> = rec.active_history().map(|m| m.id).collect();
        let queued: Vec<_> = rec.queue.iter().map(|q| q.id).collect();
        let inputs = resolve(op, &active, &queued);
        let outcomes = m
            .update(async move |tx| {
                let mut outs = Vec::new();
                for input in inputs {
                    outs.push(tx.apply(input).await?);
                }
                Ok(outs)
            })
            .await
            .unwrap_or_else(|e| panic!("store rejects op {at}: {e}"));
        assert_eq!(outcomes.len(), expected.outcomes.len());
        for (s, m) in outcomes.iter().zip(&expected.outcomes) {
            assert_eq!(
                (s.transition, s.from, s.to),
                (m.transition, m.from, m.to),
                "op {at}"
            );
            assert_eq!(s.cancellations, m.cancellations, "op {at}: cancellations");
            assert_eq!(s.inserted.len(), m.inserted.len(), "op {at}: inserted");
            assert_eq!(s.moved_to_head, m.moved_to_head, "op {at}: moved");
            assert_eq!(
                s.generation_attempt, m.generation_attempt,
                "op {at}: attempt"
            );
        }
        model = expected.chat;
        compare(at + 1, &model, &load().await);
    }
}

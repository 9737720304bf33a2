//! Round trips per operation: every transition of `Input`, from a state
//! where it is allowed, costs 3 round trips in one Update (EditMessage 4);
//! an empty Update 2; Lock and ReadLock 2.

use chatstate::{BusyBehavior, Error};
use chatstate_model::{ExecutionState as S, Input, JsonText, NewMessage, Part, Transition};

use crate::common::{Fx, Step, TestChat, dynamic_result, fx};

/// One case: the steps that reach the from-state, and the input.
pub(crate) struct Case {
    pub(crate) from: S,
    pub(crate) setup: &'static [Step],
    pub(crate) input: fn(&Fx, &TestChat) -> Input,
}

pub(crate) fn cases() -> Vec<Case> {
    use Step::*;
    let c = |from, setup, input| Case { from, setup, input };
    vec![
        c(S::W, &[FinishTurn], |_, _| Input::SetArchived {
            archived: true,
        }),
        c(S::XW, &[FinishTurn, Archive], |_, _| Input::SetArchived {
            archived: false,
        }),
        c(S::W, &[FinishTurn], |_, _| Input::SendMessage {
            message: NewMessage::user("again"),
            busy_behavior: BusyBehavior::Queue,
        }),
        c(S::W, &[FinishTurn], |_, chat| Input::EditMessage {
            message_id: chat.first_message,
            content: vec![Part::text("edited")],
            created_by: None,
            model_config_id: None,
        }),
        c(S::W, &[FinishTurn], |_, _| Input::RequestCompaction),
        c(S::R1, &[Queue], |_, chat| Input::DeleteQueuedMessage {
            id: chat.queued[0],
        }),
        c(
            S::E1,
            &[CommitDynamicCall, Queue, FinishError],
            |_, chat| Input::PromoteQueuedMessage { id: chat.queued[0] },
        ),
        c(S::R0, &[], |_, _| Input::Interrupt { reason: None }),
        c(S::A0, &[CommitDynamicCall, Enter], |_, _| {
            Input::CompleteRequiresAction {
                results: vec![dynamic_result()],
                created_by: None,
                model_config_id: None,
            }
        }),
        c(S::R0, &[], |_, _| Input::RecordGenerationAttempt),
        c(S::R0, &[], |_, _| Input::RecordRetryState {
            retry_state: r#"{"attempt": 1}"#.to_owned(),
        }),
        c(S::R0, &[], |_, _| Input::CommitStep {
            messages: vec![NewMessage::assistant("step")],
            consume_compaction_request: false,
        }),
        c(S::R0, &[CommitDynamicCall], |_, _| {
            Input::EnterRequiresAction
        }),
        c(S::I1, &[Queue, Interrupt], |_, _| {
            Input::FinishInterruption {
                partial_messages: vec![NewMessage::assistant("partial")],
            }
        }),
        c(S::R1, &[CommitDynamicCall, Queue], |_, _| Input::FinishTurn),
        c(S::R0, &[], |_, _| Input::FinishError {
            last_error: Some(JsonText::string("failed")),
        }),
        c(S::A0, &[CommitDynamicCall, Enter], |_, _| {
            Input::CancelRequiresAction { reason: None }
        }),
        c(S::Invalid, &[RawPaused], |_, _| {
            Input::ReconcileInvalidState {
                last_error: None,
                cancellation_reason: None,
            }
        }),
        c(S::R0, &[], |fx, _| Input::Acquire { owner: fx.owner }),
        c(S::R0, &[Acquire], |_, _| Input::Abandon),
    ]
}

fn expected(t: Transition) -> u64 {
    // BEGIN+lock+snapshot, the plan's writes, notify+COMMIT; EditMessage
    // reads its target first.
    if t == Transition::EditMessage { 4 } else { 3 }
}

#[tokio::test]
async fn every_transition_costs_three_round_trips_edit_four() {
    let fx = fx().await;
    let cases = cases();
    let mut covered: Vec<Transition> = Vec::new();
    let mut report = Vec::new();
    for case in &cases {
        for in_tx in [true, false] {
            let chat = fx.reach(case.setup, case.from).await;
            let input = (case.input)(&fx, &chat);
            let t = input.transition();
            let m = if in_tx {
                fx.machine_in_tx(chat.id)
            } else {
                fx.machine(chat.id)
            };
            let before = fx.store.round_trips();
            let out = m
                .update(async |tx| tx.apply(input).await)
                .await
                .unwrap_or_else(|e| panic!("{t} from {:?}: {e}", case.from));
            let spent = fx.store.round_trips() - before;
            assert_eq!(out.from, case.from);
            assert_eq!(
                spent,
                expected(t),
                "{t} from {:?} (in-transaction notify: {in_tx}) landed in {:?}",
                case.from,
                out.to
            );
            if in_tx {
                report.push(format!("{t} {:?}->{:?}: {spent}", case.from, out.to));
            }
            covered.push(t);
        }
    }
    covered.sort();
    covered.dedup();
    // Every input of the model (CreateChat is not an Input).
    assert_eq!(covered.len(), 19, "covered {covered:?}");
    println!("round trips per Update:\n{}", report.join("\n"));
}

#[tokio::test]
async fn empty_update_lock_read_lock_and_rejection_round_trips() {
    let fx = fx().await;
    let chat = fx.create().await;
    let check = |what: &str, before: u64, expect: u64| {
        let spent = fx.store.round_trips() - before;
        assert_eq!(spent, expect, "{what}");
    };
    for m in [fx.machine(chat.id), fx.machine_in_tx(chat.id)] {
        let before = fx.store.round_trips();
        m.update(async |_| Ok(())).await.unwrap();
        check("empty update", before, 2);

        let before = fx.store.round_trips();
        m.lock(async |l| Ok(l.state())).await.unwrap();
        check("lock", before, 2);

        let before = fx.store.round_trips();
        m.read_lock(async |r| Ok(r.state())).await.unwrap();
        check("read lock", before, 2);

        // A rejected transition writes nothing and rolls back.
        let before = fx.store.round_trips();
        let err = m
            .update(async |tx| tx.finish_interruption(vec![]).await)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Rejected(_)), "{err}");
        check("rejected transition", before, 2);
    }
    // A missing chat: the opening finds nothing and ends its transaction.
    let missing = fx.machine(chatstate_model::ChatId::new_random());
    let before = fx.store.round_trips();
    let err = missing.update(async |_| Ok(())).await.unwrap_err();
    assert!(matches!(err, Error::ChatNotFound(_)));
    check("missing chat", before, 2);
}

/// A pool not made with `pool_options` has not prepared the opening
/// statements: the first opening on its connection prepares them (three
/// round trips more, once), later ones cost the usual.
#[tokio::test]
async fn an_unprepared_session_prepares_on_first_use() {
    let fx = fx().await;
    let chat = fx.create().await;
    let plain = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect_with((*fx.store.pool().connect_options()).clone())
        .await
        .unwrap();
    let store = chatstate_store_pg::PgStore::new(plain);
    let m = chatstate::ChatMachine::new(
        store.clone(),
        chatstate::Notify::InTransaction,
        chat.id,
        fx.options,
    );
    for expected in [2 + 3, 2, 2] {
        let before = store.round_trips();
        m.update(async |_| Ok(())).await.unwrap();
        assert_eq!(store.round_trips() - before, expected);
    }
    assert_eq!(m.load().await.unwrap().row.versions.snapshot, 4);
}

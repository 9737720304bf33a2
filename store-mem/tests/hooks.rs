//! The application's writes at commit on the in-memory store
//! (`MemApp::on_commit`, reached with `Tx::app`): a billing row kept
//! beside a committed step is there exactly when the step is, and the hook
//! runs once on commit, never on rollback.

use std::sync::{Arc, Mutex};

use chatstate::{
    ChatMachine, CommitState, CreateChat, Error, NewMessage, Notify, Options, RecordingPublisher,
    Role, StoreErrorKind, Tx, create_chat,
};
use chatstate_model::ChatId;
use chatstate_store_mem::MemStore;

/// The application's own "table": one billing row per billed step.
type Billing = Arc<Mutex<Vec<String>>>;

async fn chat(store: &MemStore) -> ChatId {
    create_chat(
        store,
        &Notify::InTransaction,
        CreateChat {
            messages: vec![NewMessage::user("hello")],
            ..CreateChat::default()
        },
    )
    .await
    .unwrap()
    .chat_id
}

/// Bills `step` at commit, refusing (as a unique key would) a step
/// already billed.
fn bill(tx: &mut Tx<'_, MemStore>, billing: &Billing, step: &str) -> Result<(), Error> {
    if billing.lock().unwrap().iter().any(|s| s == step) {
        return Err(Error::callback(format!("step {step} is billed already")));
    }
    let (billing, step) = (billing.clone(), step.to_owned());
    tx.app()
        .on_commit(move || billing.lock().unwrap().push(step));
    Ok(())
}

/// What the callback does after committing a step and billing it.
#[derive(Clone, Copy, Debug)]
enum Then {
    /// Nothing: the Update commits.
    Commit,
    /// Fails with an error of its own.
    CallbackFails,
    /// Archives the running chat, which the matrix rejects.
    LaterRejected,
    /// Bills a step billed already: the application's own write fails.
    Duplicate,
    /// Makes the next store call (a transition) fail, and carries on.
    StoreErrorSwallowed,
    /// Makes the commit itself fail.
    CommitFails,
    /// The commit applies but its outcome is lost.
    CommitLost,
}

#[tokio::test]
async fn the_billing_row_is_there_exactly_when_the_step_is() {
    let store = MemStore::new();
    let publisher = Arc::new(RecordingPublisher::new());
    let billing = Billing::default();
    billing.lock().unwrap().push("taken".to_owned());
    let cases = [
        (Then::Commit, Some(CommitState::Committed)),
        (Then::CallbackFails, Some(CommitState::NotCommitted)),
        (Then::LaterRejected, Some(CommitState::NotCommitted)),
        (Then::Duplicate, Some(CommitState::NotCommitted)),
        (Then::StoreErrorSwallowed, Some(CommitState::NotCommitted)),
        (Then::CommitFails, Some(CommitState::NotCommitted)),
        (Then::CommitLost, Some(CommitState::Unknown)),
    ];
    for (then, state) in cases {
        let label = format!("{then:?}");
        let id = chat(&store).await;
        let m = ChatMachine::new(store.clone(), publisher.clone(), id, Options::default());
        let before = m.load().await.unwrap().row.versions.snapshot;
        let step = if matches!(then, Then::Duplicate) {
            "taken".to_owned()
        } else {
            label.clone()
        };
        let got = m
            .update(async |tx| {
                tx.commit_step(vec![NewMessage::assistant("step")], false)
                    .await?;
                bill(tx, &billing, &step)?;
                match then {
                    Then::Commit | Then::Duplicate | Then::CommitLost => {}
                    Then::CallbackFails => return Err(Error::callback("changed its mind")),
                    Then::LaterRejected => {
                        tx.set_archived(true).await?;
                    }
                    Then::StoreErrorSwallowed => {
                        store.fail_nth_call(1);
                        let failed = tx.record_generation_attempt().await;
                        assert!(failed.is_err(), "{label}: the injected fault");
                    }
                    Then::CommitFails => store.fail_nth_call(1),
                }
                if matches!(then, Then::CommitLost) {
                    store.lose_nth_commit(1);
                }
                Ok(())
            })
            .await;
        let got_state = match &got {
            Ok(()) => CommitState::Committed,
            Err(e) => e.commit_state(),
        };
        assert_eq!(Some(got_state), state, "{label}: {got:?}");
        if matches!(then, Then::CommitFails) {
            assert!(
                matches!(&got, Err(Error::Store(e)) if e.kind == StoreErrorKind::Injected),
                "{label}: {got:?}"
            );
        }
        // Committed, or applied with its outcome lost: the step and its
        // row. Otherwise neither.
        let landed = got_state != CommitState::NotCommitted;
        let rec = m.load().await.unwrap();
        assert_eq!(
            rec.row.versions.snapshot,
            before + i64::from(landed),
            "{label}"
        );
        let steps = rec
            .active_history()
            .filter(|m| m.role == Role::Assistant)
            .count();
        assert_eq!(steps, usize::from(landed), "{label}: steps");
        let rows = billing
            .lock()
            .unwrap()
            .iter()
            .filter(|s| **s == step)
            .count();
        let want = if matches!(then, Then::Duplicate) {
            1 // the row that was there before
        } else {
            usize::from(landed)
        };
        assert_eq!(rows, want, "{label}: billing rows");
    }
}

#[tokio::test]
async fn hooks_run_once_in_order_at_the_outer_commit_of_nested_updates() {
    let store = MemStore::new();
    let (outer, inner) = (chat(&store).await, chat(&store).await);
    let publisher = Arc::new(RecordingPublisher::new());
    let m = ChatMachine::new(store.clone(), publisher, outer, Options::default());
    let log = Billing::default();
    let (a, b) = (log.clone(), log.clone());
    let seen_during = Arc::new(Mutex::new(None));
    let seen = seen_during.clone();
    m.update(async |tx| {
        tx.app()
            .on_commit(move || a.lock().unwrap().push("outer".into()));
        tx.update_nested(inner, async |n| {
            n.commit_step(vec![NewMessage::assistant("nested")], false)
                .await?;
            n.app()
                .on_commit(move || b.lock().unwrap().push("nested".into()));
            Ok(())
        })
        .await?;
        // Nothing has run before the commit.
        *seen.lock().unwrap() = Some(log.lock().unwrap().len());
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(*seen_during.lock().unwrap(), Some(0));
    assert_eq!(*log.lock().unwrap(), ["outer", "nested"]);
    // A later Update does not run them again.
    m.update(async |tx| tx.record_generation_attempt().await)
        .await
        .unwrap();
    assert_eq!(log.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_dropped_update_never_runs_its_hook() {
    let store = MemStore::new();
    let id = chat(&store).await;
    let m = ChatMachine::new(
        store.clone(),
        Arc::new(RecordingPublisher::new()),
        id,
        Options::default(),
    );
    let log = Billing::default();
    let l = log.clone();
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    let m2 = m.clone();
    let task = tokio::spawn(async move {
        m2.update(async move |tx| {
            tx.app()
                .on_commit(move || l.lock().unwrap().push("never".into()));
            entered_tx.send(()).unwrap();
            std::future::pending::<()>().await;
            Ok(())
        })
        .await
    });
    entered.await.unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    m.update(async |tx| tx.record_generation_attempt().await)
        .await
        .unwrap();
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_under_the_chat_lock_sees_the_step_and_its_row_together() {
    let store = MemStore::new();
    let id = chat(&store).await;
    let m = ChatMachine::new(
        store.clone(),
        Arc::new(RecordingPublisher::new()),
        id,
        Options::default(),
    );
    let billing = Billing::default();
    const STEPS: usize = 200;
    let writer = {
        let (m, billing) = (m.clone(), billing.clone());
        tokio::spawn(async move {
            for n in 0..STEPS {
                m.update(async |tx| {
                    tx.commit_step(vec![NewMessage::assistant("step")], false)
                        .await?;
                    bill(tx, &billing, &format!("step {n}"))
                })
                .await
                .unwrap();
            }
        })
    };
    // Every read under the chat's lock, taken while the writer commits,
    // finds as many billing rows as committed steps.
    loop {
        let (steps, rows) = m
            .read_lock(async |r| {
                let steps = r
                    .load()
                    .await?
                    .active_history()
                    .filter(|m| m.role == Role::Assistant)
                    .count();
                Ok((steps, billing.lock().unwrap().len()))
            })
            .await
            .unwrap();
        assert_eq!(
            steps, rows,
            "a step without its row, or a row without its step"
        );
        if steps == STEPS {
            break;
        }
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
}

//! The generic store suite: the machine's contract, checked on any
//! [`Backend`]. Each function is one named test; [`crate::store_suite!`]
//! instantiates all of them for a backend.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chatstate::{
    BusyBehavior, ChatMachine, Claim, CreateChat, Ending, Error, LeaseStatus, MetadataPatch,
    Notify, Store, TestControl, create_chat,
};
use chatstate_model::{
    ChatId, ExecutionState, Input, JsonText, Matrix, MessageId, NewMessage, Notification, Owner,
    Part, RejectionKind, Role, RunnerId, ToolResultInput, Transition, WorkerId, cancel_reasons,
    reasons,
};

use crate::Backend;
use crate::fixture::{
    DYNAMIC_TOOL, Facts, Fx, SERVER_TOOL, Setup, SetupStep, apply_one, assistant_call, candidates,
    setups,
};
pub use crate::observed::observer_reports_what_committed;

/// Instantiates every suite test as a `#[tokio::test]` for a backend
/// expression.
#[macro_export]
macro_rules! store_suite {
    ($backend:expr) => {
        $crate::store_suite!(@tests $backend;
            matrix_triples_land_in_their_cells,
            disallowed_pairs_are_rejected_without_trace,
            update_on_missing_chat_is_chat_not_found,
            create_chat_postconditions,
            create_chat_rejects_empty_history_and_duplicate_ids,
            concurrent_updates_serialise,
            lock_blocks_update_until_it_ends,
            read_locks_share_and_exclude_updates,
            lock_and_read_lock_never_bump_or_publish,
            failing_bundle_rolls_back_everything,
            nothing_published_before_commit,
            one_update_per_bundle,
            payload_keys_and_explicit_nulls,
            hints_on_missing_or_stale_lease_only,
            versions_and_revisions,
            queue_cap,
            tool_result_validation,
            edit_truncates_and_cancels,
            cancellations_come_before_user_messages,
            dropped_update_rolls_back,
            publish_failure_after_commit_is_distinct,
            fenced_calls_fail_after_takeover,
            nested_update_publishes_after_outer_commit,
            metadata_writes_roll_back_with_the_callback,
            in_transaction_notifications_arrive_after_commit_only,
            compaction_marker_is_one_shot,
            reconcile_repairs_invalid_rows,
            claims_win_hold_skip_and_take_over,
            update_or_skip_rolls_back_a_skip,
            heartbeat_reports_the_lease,
            heartbeat_rows_stay_bounded,
            history_expectation_refuses_stale_steps,
            claimable_lists_chats_that_need_a_worker,
            observer_reports_what_committed,
        );
    };
    (@tests $backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::suite::$name(&$backend).await;
            }
        )*
    };
}

async fn fixture<B: Backend>(b: &B) -> Fx<B::S> {
    Fx::new(b.store().await)
}

fn owner<S: Store + chatstate::TestControl>(fx: &Fx<S>) -> Owner {
    Owner {
        worker_id: fx.worker,
        runner_id: fx.runner,
    }
}

/// Every one of the 70 matrix triples is driven to its landing state, each
/// success bumps the snapshot by exactly one and publishes one update, and
/// the set of triples reached equals the matrix.
pub async fn matrix_triples_land_in_their_cells<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let mut reached = BTreeSet::new();
    // CreateChat: N -> R0.
    let m = fx.create().await;
    assert_eq!(m.load().await.unwrap().state(), ExecutionState::R0);
    reached.insert((
        Transition::CreateChat,
        ExecutionState::N,
        ExecutionState::R0,
    ));
    for setup in setups() {
        for t in Matrix::REFERENCE.transitions_from(setup.state) {
            let probe = fx.reach(&setup).await;
            let facts = Facts::of(&probe.load().await.unwrap());
            for input in candidates(t, &facts, owner(&fx)) {
                let m = fx.reach(&setup).await;
                let before = m.load().await.unwrap();
                let input = rebind(&input, &facts, &Facts::of(&before));
                fx.publisher.clear();
                let out = match apply_one(&m, input.clone()).await {
                    Ok(out) => out,
                    // This setup cannot feed this transition valid input
                    // (e.g. EnterRequiresAction with no pending dynamic
                    // call); another setup of the same state covers it.
                    Err(Error::Rejected(r))
                        if matches!(
                            r.kind,
                            RejectionKind::TransitionNotAllowed { reason: Some(_) }
                        ) =>
                    {
                        assert_eq!(m.load().await.unwrap(), before);
                        continue;
                    }
                    Err(e) => panic!("{t} from {:?}: {e}", setup.steps),
                };
                let after = m.load().await.unwrap();
                assert_eq!(out.from, setup.state);
                assert_eq!(after.state(), out.to, "{t} from {:?}", setup.steps);
                assert!(
                    Matrix::REFERENCE.allows_landing(t, setup.state, out.to),
                    "{t} {} -> {} not in the matrix",
                    setup.state,
                    out.to
                );
                assert_eq!(
                    after.row.versions.snapshot,
                    before.row.versions.snapshot + 1
                );
                let updates: Vec<_> = fx
                    .published_for(m.chat_id())
                    .into_iter()
                    .filter(|n| matches!(n, Notification::Update { .. }))
                    .collect();
                assert_eq!(updates.len(), 1);
                assert_eq!(updates[0].snapshot_version(), after.row.versions.snapshot);
                reached.insert((t, setup.state, out.to));
            }
        }
    }
    let all: BTreeSet<_> = Matrix::REFERENCE.triples().into_iter().collect();
    let missing: Vec<_> = all.difference(&reached).collect();
    assert!(missing.is_empty(), "triples never reached: {missing:?}");
    assert_eq!(reached, all);
}

/// Inputs carry ids of the chat they were built for; rebuild them for a
/// fresh chat reached by the same setup (same shape, other ids).
fn rebind(input: &Input, old: &Facts, new: &Facts) -> Input {
    let map_q = |id| {
        old.queue
            .iter()
            .position(|x| *x == id)
            .map(|i| new.queue[i])
            .unwrap_or(id)
    };
    match input {
        Input::DeleteQueuedMessage { id } => Input::DeleteQueuedMessage { id: map_q(*id) },
        Input::PromoteQueuedMessage { id } => Input::PromoteQueuedMessage { id: map_q(*id) },
        Input::EditMessage {
            message_id,
            content,
            created_by,
            model_config_id,
        } => Input::EditMessage {
            message_id: if Some(*message_id) == old.first_user {
                new.first_user.unwrap_or(*message_id)
            } else {
                *message_id
            },
            content: content.clone(),
            created_by: *created_by,
            model_config_id: *model_config_id,
        },
        other => other.clone(),
    }
}

/// Every disallowed (transition, from) pair: Invalid gives InvalidState,
/// every other state TransitionNotAllowed (Reconcile from a valid state with
/// its reason); nothing changes and nothing is published.
pub async fn disallowed_pairs_are_rejected_without_trace<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let mut seen = BTreeSet::new();
    let mut firsts: Vec<Setup> = Vec::new();
    for s in setups() {
        if !firsts.iter().any(|f| f.state == s.state) {
            firsts.push(s);
        }
    }
    for setup in &firsts {
        let m = fx.reach(setup).await;
        let facts = Facts::of(&m.load().await.unwrap());
        for t in Transition::EXECUTION {
            if t == Transition::CreateChat || Matrix::REFERENCE.allows(t, setup.state) {
                continue;
            }
            let before = m.load().await.unwrap();
            fx.publisher.clear();
            let input = candidates(t, &facts, owner(&fx)).remove(0);
            let err = apply_one(&m, input).await.expect_err("disallowed");
            let r = err
                .rejection()
                .unwrap_or_else(|| panic!("{t} from {}: {err}", setup.state));
            assert_eq!((r.transition, r.from), (t, setup.state));
            match (setup.state, t) {
                (ExecutionState::Invalid, _) => {
                    assert_eq!(r.kind, RejectionKind::InvalidState)
                }
                (_, Transition::ReconcileInvalidState) => assert_eq!(
                    r.kind,
                    RejectionKind::TransitionNotAllowed {
                        reason: Some(reasons::RECONCILE_VALID)
                    }
                ),
                _ => assert_eq!(r.kind, RejectionKind::TransitionNotAllowed { reason: None }),
            }
            let after = m.load().await.unwrap();
            assert_eq!(after, before, "{t} from {} changed the chat", setup.state);
            assert!(fx.published_for(m.chat_id()).is_empty());
            seen.insert((t, setup.state));
        }
    }
    let expected: BTreeSet<_> = Matrix::REFERENCE.disallowed_pairs().into_iter().collect();
    assert_eq!(seen, expected);
}

/// An Update of a chat that does not exist fails before its callback runs.
pub async fn update_on_missing_chat_is_chat_not_found<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.machine(ChatId::new_random());
    let ran = AtomicBool::new(false);
    let err = m
        .update(async |_tx| {
            ran.store(true, Ordering::SeqCst);
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ChatNotFound(_)), "{err}");
    assert!(!ran.load(Ordering::SeqCst));
    assert!(fx.publisher.published().is_empty());
    assert!(matches!(
        m.lock(async |_| Ok(())).await,
        Err(Error::ChatNotFound(_))
    ));
    assert!(matches!(
        m.read_lock(async |_| Ok(())).await,
        Err(Error::ChatNotFound(_))
    ));
}

/// After CreateChat: R0, snapshot 1, history 1, queue 0, attempt 0, first
/// message revision 1, one update (snapshot 1, running) and a hint.
pub async fn create_chat_postconditions<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    let rec = m.load().await.unwrap();
    assert_eq!(rec.state(), ExecutionState::R0);
    let v = rec.row.versions;
    assert_eq!(
        (v.snapshot, v.history, v.queue, v.retry_state),
        (1, 1, 0, 0)
    );
    assert_eq!(rec.row.generation_attempt, 0);
    assert_eq!(rec.history.len(), 1);
    assert_eq!(rec.history[0].revision, 1);
    assert!(rec.row.owner.is_none());
    let notes = fx.published_for(m.chat_id());
    assert_eq!(notes.len(), 2, "{notes:?}");
    match &notes[0] {
        Notification::Update { update, .. } => {
            assert_eq!(update.snapshot_version, 1);
            assert_eq!(update.status, "running");
        }
        other => panic!("first notification {other:?}"),
    }
    assert!(matches!(notes[1], Notification::Ownership(h) if h.snapshot_version == 1));
}

/// CreateChat with no messages is TransitionNotAllowed from N; an id in use
/// is TransitionNotAllowed from the existing chat's state. Neither writes
/// or publishes.
pub async fn create_chat_rejects_empty_history_and_duplicate_ids<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let err = create_chat(&fx.store, &fx.notify(), CreateChat::default())
        .await
        .unwrap_err();
    let r = err.rejection().expect("rejection");
    assert_eq!(
        (r.transition, r.from),
        (Transition::CreateChat, ExecutionState::N)
    );
    assert_eq!(
        r.kind,
        RejectionKind::TransitionNotAllowed {
            reason: Some(reasons::CREATE_EMPTY)
        }
    );
    assert!(fx.publisher.published().is_empty());
    let m = fx.create().await;
    fx.publisher.clear();
    let err = create_chat(
        &fx.store,
        &fx.notify(),
        CreateChat {
            id: Some(m.chat_id()),
            messages: vec![NewMessage::user("again")],
            ..CreateChat::default()
        },
    )
    .await
    .unwrap_err();
    let r = err.rejection().expect("rejection");
    assert_eq!(r.from, ExecutionState::R0);
    assert!(fx.publisher.published().is_empty());
    assert_eq!(m.load().await.unwrap().history.len(), 1);
}

/// N concurrent empty Updates all succeed and the snapshot ends at +N.
pub async fn concurrent_updates_serialise<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    const N: i64 = 16;
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let m = m.clone();
            tokio::spawn(async move { m.update(async |tx| Ok(tx.row().versions.snapshot)).await })
        })
        .collect();
    let mut seen = BTreeSet::new();
    for t in tasks {
        seen.insert(t.await.unwrap().unwrap());
    }
    assert_eq!(
        seen,
        (2..=N + 1).collect::<BTreeSet<_>>(),
        "each bump distinct"
    );
    assert_eq!(m.load().await.unwrap().row.versions.snapshot, 1 + N);
}

async fn wait_for_waiters<B: Backend>(b: &B, store: &B::S, n: usize) {
    // Polls a store-side count of lock waiters: a condition, not a guess
    // at how long the other task needs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while b.lock_waiters(store).await < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no transaction ever waited for the row lock"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// While a Lock callback runs, a concurrent Update waits at its lock and
/// enters its callback only after the Lock ends.
pub async fn lock_blocks_update_until_it_ends<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    let entered = Arc::new(AtomicBool::new(false));
    let mut waiting = None;
    m.lock(async |_locked| {
        let (m2, entered2) = (m.clone(), entered.clone());
        let upd = tokio::spawn(async move {
            m2.update(async |_tx| {
                entered2.store(true, Ordering::SeqCst);
                Ok(())
            })
            .await
        });
        wait_for_waiters(b, &fx.store, 1).await;
        assert!(!entered.load(Ordering::SeqCst), "update ran under a Lock");
        waiting = Some(upd);
        Ok(())
    })
    .await
    .unwrap();
    // Once the Lock has ended, the waiting update gets the row and commits.
    waiting.unwrap().await.unwrap().unwrap();
    assert!(entered.load(Ordering::SeqCst));
    assert_eq!(m.load().await.unwrap().row.versions.snapshot, 2);
}

/// ReadLocks coexist with ReadLocks and exclude Updates.
pub async fn read_locks_share_and_exclude_updates<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    let entered = Arc::new(AtomicBool::new(false));
    let mut waiting = None;
    m.read_lock(async |_r1| {
        // A second ReadLock is granted while the first is held.
        let state = m.read_lock(async |r2| Ok(r2.state())).await?;
        assert_eq!(state, ExecutionState::R0);
        let (m2, entered2) = (m.clone(), entered.clone());
        let upd = tokio::spawn(async move {
            m2.update(async |_tx| {
                entered2.store(true, Ordering::SeqCst);
                Ok(())
            })
            .await
        });
        wait_for_waiters(b, &fx.store, 1).await;
        assert!(
            !entered.load(Ordering::SeqCst),
            "update ran under a ReadLock"
        );
        waiting = Some(upd);
        Ok(())
    })
    .await
    .unwrap();
    waiting.unwrap().await.unwrap().unwrap();
    assert!(entered.load(Ordering::SeqCst));
    assert_eq!(m.load().await.unwrap().row.versions.snapshot, 2);
}

/// Lock and ReadLock never bump and never publish, even with metadata writes.
pub async fn lock_and_read_lock_never_bump_or_publish<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    fx.publisher.clear();
    m.lock(async |l| {
        l.write_metadata(MetadataPatch {
            title: Some("locked".into()),
            ..MetadataPatch::default()
        })
        .await
    })
    .await
    .unwrap();
    m.read_lock(async |r| r.load().await.map(|_| ()))
        .await
        .unwrap();
    let rec = m.load().await.unwrap();
    assert_eq!(rec.row.versions.snapshot, 1);
    assert_eq!(rec.metadata.title, "locked");
    assert!(fx.publisher.published().is_empty());
}

/// A bundle whose second FinishTurn is rejected rolls back the first too.
pub async fn failing_bundle_rolls_back_everything<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    let before = m.load().await.unwrap();
    fx.publisher.clear();
    let err = m
        .update(async |tx| {
            tx.commit_step(vec![NewMessage::assistant("partial")], false)
                .await?;
            tx.finish_turn().await?;
            tx.finish_turn().await?;
            Ok(())
        })
        .await
        .unwrap_err();
    let r = err.rejection().expect("rejection");
    assert_eq!(
        (r.transition, r.from),
        (Transition::FinishTurn, ExecutionState::W)
    );
    assert!(r.is_transition_not_allowed());
    assert_eq!(m.load().await.unwrap(), before);
    assert!(fx.publisher.published().is_empty());
    // A callback error of the caller's own rolls back the same way.
    let err = m
        .update(async |tx| {
            tx.finish_turn().await?;
            Err::<(), _>(Error::callback("caller gave up"))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Callback(_)));
    assert_eq!(m.load().await.unwrap(), before);
    assert!(fx.publisher.published().is_empty());
}

/// While an Update's callback runs, nothing of it has been published; after
/// commit exactly one update has.
pub async fn nothing_published_before_commit<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    fx.publisher.clear();
    let publisher = fx.publisher.clone();
    m.update(async |tx| {
        tx.send_message(NewMessage::user("more"), BusyBehavior::Queue)
            .await?;
        assert!(publisher.published().is_empty());
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(fx.published_for(m.chat_id()).len(), 2, "update and hint");
}

/// A bundle of several transitions publishes one update and lands where the
/// last transition left it; an empty Update still bumps and publishes.
pub async fn one_update_per_bundle<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    let (w, r) = (fx.worker, fx.runner);
    fx.publisher.clear();
    m.update(async |tx| {
        tx.acquire(w, r).await?;
        tx.commit_step(vec![NewMessage::assistant("a")], false)
            .await?;
        tx.send_message(NewMessage::user("b"), BusyBehavior::Queue)
            .await?;
        tx.finish_turn().await?;
        Ok(())
    })
    .await
    .unwrap();
    let rec = m.load().await.unwrap();
    assert_eq!(rec.state(), ExecutionState::R0);
    assert_eq!(rec.row.versions.snapshot, 2);
    let notes = fx.published_for(m.chat_id());
    assert_eq!(
        notes.len(),
        1,
        "one update, no hint (fresh lease): {notes:?}"
    );
    fx.publisher.clear();
    m.update(async |_| Ok(())).await.unwrap();
    let notes = fx.published_for(m.chat_id());
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].snapshot_version(), 3);
}

/// The update payload has all nine keys; worker and runner are explicit
/// nulls when unowned and the ids after Acquire.
pub async fn payload_keys_and_explicit_nulls<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    let first = fx.publisher.published()[0].clone();
    let v: serde_json::Value = serde_json::from_slice(&first.payload).unwrap();
    let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "snapshot_version",
            "worker_id",
            "runner_id",
            "history_version",
            "queue_version",
            "retry_state_version",
            "generation_attempt",
            "status",
            "archived"
        ])
    );
    assert!(v["worker_id"].is_null() && v["runner_id"].is_null());
    assert_eq!(first.channel, format!("chat:update:{}", m.chat_id()));
    fx.publisher.clear();
    let (w, r) = (fx.worker, fx.runner);
    m.update(async |tx| tx.acquire(w, r).await).await.unwrap();
    let p = fx.publisher.published()[0].clone();
    let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(v["worker_id"], serde_json::json!(w.to_string()));
    assert_eq!(v["runner_id"], serde_json::json!(r.to_string()));
}

/// A hint goes out for a runnable chat whose lease is missing or stale, and
/// not for a fresh one; Abandon of a runnable chat hints.
pub async fn hints_on_missing_or_stale_lease_only<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    let hints = |fx: &Fx<B::S>| {
        fx.published_for(m.chat_id())
            .into_iter()
            .filter(|n| matches!(n, Notification::Ownership(_)))
            .count()
    };
    fx.publisher.clear();
    m.update(async |_| Ok(())).await.unwrap();
    assert_eq!(hints(&fx), 1, "unowned runnable chat");
    fx.publisher.clear();
    let (w, r) = (fx.worker, fx.runner);
    m.update(async |tx| tx.acquire(w, r).await).await.unwrap();
    m.update(async |_| Ok(())).await.unwrap();
    assert_eq!(hints(&fx), 0, "fresh lease");
    fx.store
        .advance_clock(Duration::from_secs(31))
        .await
        .unwrap();
    m.update(async |_| Ok(())).await.unwrap();
    assert_eq!(hints(&fx), 1, "stale lease");
    fx.publisher.clear();
    assert_eq!(m.heartbeat(r).await.unwrap(), LeaseStatus::Held);
    m.update(async |_| Ok(())).await.unwrap();
    assert_eq!(hints(&fx), 0, "heartbeat refreshed the lease");
    m.update(async |tx| tx.abandon().await).await.unwrap();
    assert_eq!(hints(&fx), 1, "abandoned runnable chat");
    // Idle chats never hint.
    fx.publisher.clear();
    m.update(async |tx| tx.finish_turn().await).await.unwrap();
    assert_eq!(hints(&fx), 0);
    // Heartbeats never bump and never publish.
    let before = m.load().await.unwrap().row.versions.snapshot;
    assert_eq!(
        m.heartbeat(RunnerId::new_random()).await.unwrap(),
        LeaseStatus::Lost { owner: None }
    );
    assert_eq!(m.load().await.unwrap().row.versions.snapshot, before);
    assert!(fx.published_for(m.chat_id()).len() == 1);
    assert_eq!(
        fx.machine(ChatId::new_random())
            .heartbeat(RunnerId::new_random())
            .await
            .unwrap(),
        LeaseStatus::ChatGone
    );
}

/// Version and revision numbers: history, queue and retry versions take the
/// snapshot of the Update that changed them; revisions too.
pub async fn versions_and_revisions<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    // snapshot 2: queue append moves queue_version only.
    m.update(async |tx| {
        tx.send_message(NewMessage::user("q"), BusyBehavior::Queue)
            .await
    })
    .await
    .unwrap();
    let v = m.load().await.unwrap().row.versions;
    assert_eq!(
        (v.snapshot, v.history, v.queue, v.retry_state),
        (2, 1, 2, 0)
    );
    // snapshot 3: retry state and an attempt.
    m.update(async |tx| {
        tx.record_generation_attempt().await?;
        tx.record_retry_state(r#"{"try":1}"#).await
    })
    .await
    .unwrap();
    let rec = m.load().await.unwrap();
    assert_eq!(rec.row.generation_attempt, 1);
    assert_eq!(rec.row.versions.retry_state, 3);
    assert_eq!(
        rec.row.retry_state,
        Some(JsonText::parse(r#"{"try":1}"#).unwrap())
    );
    // snapshot 4: the same retry payload again does not move the version.
    m.update(async |tx| tx.record_retry_state(r#"{ "try": 1 }"#).await)
        .await
        .unwrap();
    assert_eq!(m.load().await.unwrap().row.versions.retry_state, 3);
    // snapshot 5: a step moves history, resets the attempt, clears retry.
    m.update(async |tx| {
        tx.commit_step(vec![NewMessage::assistant("a")], false)
            .await
    })
    .await
    .unwrap();
    let rec = m.load().await.unwrap();
    let v = rec.row.versions;
    assert_eq!(
        (v.snapshot, v.history, v.queue, v.retry_state),
        (5, 5, 2, 5)
    );
    assert_eq!(rec.row.generation_attempt, 0);
    assert_eq!(rec.row.retry_state, None);
    assert_eq!(rec.history.last().unwrap().revision, 5);
    assert_eq!(rec.history[0].revision, 1);
    // snapshot 6: promotion moves history and queue together.
    m.update(async |tx| tx.finish_turn().await).await.unwrap();
    let rec = m.load().await.unwrap();
    let v = rec.row.versions;
    assert_eq!((v.snapshot, v.history, v.queue), (6, 6, 6));
    let promoted = rec.history.last().unwrap();
    assert_eq!(promoted.role, Role::User);
    assert!(promoted.queued_message_id.is_some());
    assert_eq!(promoted.revision, 6);
}

/// The queue cap: the append at the cap fails with MessageQueueFull and
/// moves nothing.
pub async fn queue_cap<B: Backend>(b: &B) {
    let mut fx = fixture(b).await;
    fx.options.max_queue_size = 2;
    let m = fx.create().await;
    for _ in 0..2 {
        m.update(async |tx| {
            tx.send_message(NewMessage::user("q"), BusyBehavior::Queue)
                .await
        })
        .await
        .unwrap();
    }
    let before = m.load().await.unwrap();
    fx.publisher.clear();
    let err = m
        .update(async |tx| {
            tx.send_message(NewMessage::user("one too many"), BusyBehavior::Interrupt)
                .await
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.rejection().unwrap().kind,
        RejectionKind::MessageQueueFull { max: 2 }
    );
    assert_eq!(m.load().await.unwrap(), before);
    assert!(fx.publisher.published().is_empty());
}

/// CompleteRequiresAction rejects missing, unexpected, duplicate and
/// invalid-JSON results without trace, and accepts exactly the pending set.
pub async fn tool_result_validation<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    m.update(async |tx| {
        tx.commit_step(
            vec![NewMessage::new(
                Role::Assistant,
                vec![
                    Part::tool_call("d1", DYNAMIC_TOOL),
                    Part::tool_call("d2", DYNAMIC_TOOL),
                    Part::tool_call("s1", SERVER_TOOL),
                ],
            )],
            false,
        )
        .await?;
        tx.enter_requires_action().await
    })
    .await
    .unwrap();
    let before = m.load().await.unwrap();
    assert_eq!(before.state(), ExecutionState::A0);
    let res = |id: &str, out: &str| ToolResultInput {
        tool_call_id: id.to_owned(),
        output: out.to_owned(),
        is_error: false,
    };
    let cases = [
        (vec![res("d1", "1")], "ToolResultMissing"),
        (
            vec![res("d1", "1"), res("d2", "2"), res("s1", "3")],
            "ToolResultUnexpected",
        ),
        (vec![res("d1", "1"), res("d1", "1")], "ToolResultDuplicate"),
        (
            vec![res("d1", "{"), res("d2", "2")],
            "ToolResultInvalidJson",
        ),
    ];
    fx.publisher.clear();
    for (results, want) in cases {
        let err = m
            .update(async |tx| tx.complete_requires_action(results, None).await)
            .await
            .unwrap_err();
        let r = err.rejection().unwrap();
        assert_eq!(r.kind.name(), want);
        assert_eq!(r.from, ExecutionState::A0);
        assert!(r.is_transition_not_allowed());
        assert_eq!(m.load().await.unwrap(), before);
    }
    assert!(fx.publisher.published().is_empty());
    let out = m
        .update(async |tx| {
            tx.complete_requires_action(vec![res("d2", "\"b\""), res("d1", "\"a\"")], None)
                .await
        })
        .await
        .unwrap();
    assert_eq!(out.to, ExecutionState::R0);
    assert_eq!(out.inserted.len(), 2);
    let rec = m.load().await.unwrap();
    let ids: Vec<_> = rec
        .active_history()
        .filter(|m| m.role == Role::Tool)
        .map(|m| match &m.content[0] {
            Part::ToolResult { tool_call_id, .. } => tool_call_id.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids, ["d2", "d1"], "results in submission order");
    assert!(rec.row.requires_action_deadline_at.is_none());
}

/// EditMessage soft-deletes the target and everything after it, cancels
/// calls left outstanding before the edit point, clears the queue and
/// lands in R0; editing a non-user, deleted or foreign message is rejected.
pub async fn edit_truncates_and_cancels<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    // history: u0 (hello), a1 (server call), u2, a3; one queued message
    // A worker step may carry a user message itself (no cancellation runs
    // then), which leaves the server call outstanding before it.
    m.update(async |tx| {
        tx.commit_step(
            vec![
                assistant_call("srv-1", SERVER_TOOL),
                NewMessage::user("second"),
                NewMessage::assistant("answer"),
            ],
            false,
        )
        .await?;
        tx.send_message(NewMessage::user("third"), BusyBehavior::Queue)
            .await?;
        Ok(())
    })
    .await
    .unwrap();
    let rec = m.load().await.unwrap();
    let users: Vec<MessageId> = rec
        .active_history()
        .filter(|m| m.role == Role::User)
        .map(|m| m.id)
        .collect();
    let assistant = rec
        .active_history()
        .find(|m| m.role == Role::Assistant)
        .unwrap()
        .id;
    assert_eq!(rec.queue.len(), 1);
    let err = m
        .update(async |tx| {
            tx.edit_message(assistant, vec![Part::text("x")], None)
                .await
        })
        .await
        .unwrap_err();
    assert_eq!(err.rejection().unwrap().kind.name(), "EditedMessageNotUser");
    let err = m
        .update(async |tx| {
            tx.edit_message(MessageId(i64::MAX), vec![Part::text("x")], None)
                .await
        })
        .await
        .unwrap_err();
    assert_eq!(err.rejection().unwrap().kind.name(), "MessageNotFound");
    // Another chat's message is not found either.
    let other = fx.create().await;
    let foreign = other.load().await.unwrap().history[0].id;
    let err = m
        .update(async |tx| tx.edit_message(foreign, vec![Part::text("x")], None).await)
        .await
        .unwrap_err();
    assert_eq!(err.rejection().unwrap().kind.name(), "MessageNotFound");

    let out = m
        .update(async |tx| {
            tx.edit_message(users[1], vec![Part::text("second, edited")], None)
                .await
        })
        .await
        .unwrap();
    assert_eq!(out.to, ExecutionState::R0);
    assert_eq!(out.deleted_messages.first(), Some(&users[1]));
    assert_eq!(out.deleted_queued.len(), 1);
    assert_eq!(
        out.cancellations, 1,
        "the server call before the edit point"
    );
    let rec = m.load().await.unwrap();
    assert!(rec.queue.is_empty());
    let active: Vec<(Role, String)> = rec
        .active_history()
        .map(|m| {
            let text = match &m.content[0] {
                Part::Text { text } => text.clone(),
                Part::ToolResult { result, .. } => result.to_string(),
                Part::ToolCall { .. } => "call".into(),
                Part::Other(v) => v.to_string(),
            };
            (m.role, text)
        })
        .collect();
    assert_eq!(
        active,
        vec![
            (Role::User, "hello".to_owned()),
            (Role::Assistant, "calling a tool".to_owned()),
            (
                Role::Tool,
                JsonText::string(cancel_reasons::MESSAGE_EDIT).to_string()
            ),
            (Role::User, "second, edited".to_owned()),
        ]
    );
    let deleted = rec.history.iter().filter(|m| m.deleted).count();
    assert_eq!(deleted, out.deleted_messages.len());
    assert!(
        rec.history
            .iter()
            .filter(|m| m.deleted)
            .all(|m| m.revision == rec.row.versions.snapshot)
    );
    // Editing a soft-deleted message is MessageNotFound.
    let err = m
        .update(async |tx| tx.edit_message(users[1], vec![Part::text("x")], None).await)
        .await
        .unwrap_err();
    assert_eq!(err.rejection().unwrap().kind.name(), "MessageNotFound");
}

/// Synthetic cancellations are inserted before the user message of the same
/// transition, one per outstanding call, as errors.
pub async fn cancellations_come_before_user_messages<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    m.update(async |tx| {
        tx.commit_step(
            vec![NewMessage::new(
                Role::Assistant,
                vec![
                    Part::tool_call("s1", SERVER_TOOL),
                    Part::tool_call("d1", DYNAMIC_TOOL),
                ],
            )],
            false,
        )
        .await?;
        tx.finish_turn().await
    })
    .await
    .unwrap();
    let out = m
        .update(async |tx| {
            tx.send_message(NewMessage::user("next"), BusyBehavior::Queue)
                .await
        })
        .await
        .unwrap();
    assert_eq!(out.cancellations, 2);
    let rec = m.load().await.unwrap();
    let active: Vec<_> = rec.active_history().collect();
    let tail: Vec<_> = active.iter().rev().take(3).collect();
    assert_eq!(tail[0].role, Role::User);
    for (m, id) in [(tail[2], "s1"), (tail[1], "d1")] {
        match &m.content[..] {
            [
                Part::ToolResult {
                    tool_call_id,
                    is_error,
                    result,
                    ..
                },
            ] => {
                assert_eq!(tool_call_id, id);
                assert!(is_error);
                assert_eq!(result, &JsonText::string(cancel_reasons::NEW_USER_MESSAGE));
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Dropping an Update future mid-way rolls back and publishes nothing; the
/// chat stays usable.
pub async fn dropped_update_rolls_back<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    let before = m.load().await.unwrap();
    fx.publisher.clear();
    let (tx_in, rx_in) = tokio::sync::oneshot::channel::<()>();
    let m2 = m.clone();
    let task = tokio::spawn(async move {
        m2.update(async |tx| {
            tx.commit_step(vec![NewMessage::assistant("never")], false)
                .await?;
            let _ = tx_in.send(());
            std::future::pending::<()>().await;
            Ok(())
        })
        .await
    });
    rx_in.await.unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(m.load().await.unwrap(), before);
    assert!(fx.publisher.published().is_empty());
    m.update(async |tx| {
        tx.commit_step(vec![NewMessage::assistant("works")], false)
            .await
    })
    .await
    .unwrap();
    assert_eq!(m.load().await.unwrap().row.versions.snapshot, 2);
}

/// A publisher failure after commit is reported as committed, distinct from
/// a rollback.
pub async fn publish_failure_after_commit_is_distinct<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    fx.publisher.set_failing(true);
    let err = m.update(async |_| Ok(())).await.unwrap_err();
    assert!(err.is_committed(), "{err}");
    assert!(matches!(
        err,
        Error::PublishAfterCommit {
            snapshot_version: 2,
            ..
        }
    ));
    fx.publisher.set_failing(false);
    assert_eq!(m.load().await.unwrap().row.versions.snapshot, 2);
}

/// Fenced worker calls fail with LeaseLost once another runner took over,
/// whatever the state, and change nothing.
pub async fn fenced_calls_fail_after_takeover<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    let (w1, r1) = (fx.worker, fx.runner);
    let (w2, r2) = (WorkerId::new_random(), RunnerId::new_random());
    m.update(async |tx| tx.acquire(w1, r1).await).await.unwrap();
    m.update(async |tx| {
        tx.fenced(r1)
            .commit_step(vec![NewMessage::assistant("mine")], false)
            .await
    })
    .await
    .unwrap();
    m.update(async |tx| tx.acquire(w2, r2).await).await.unwrap();
    let before = m.load().await.unwrap();
    fx.publisher.clear();
    let stale: Vec<Input> = vec![
        Input::CommitStep {
            messages: vec![NewMessage::assistant("stale")],
            consume_compaction_request: false,
        },
        Input::FinishTurn,
        Input::FinishError { last_error: None },
        Input::RecordGenerationAttempt,
        Input::Abandon,
        Input::EnterRequiresAction,
    ];
    for input in stale {
        let err = m
            .update(async |tx| tx.fenced(r1).apply_input(input).await)
            .await
            .unwrap_err();
        let r = err.rejection().expect("rejection");
        assert_eq!(
            r.kind,
            RejectionKind::LeaseLost {
                expected: r1,
                actual: Some(r2)
            }
        );
    }
    assert_eq!(m.load().await.unwrap(), before);
    assert!(fx.publisher.published().is_empty());
    // The new owner's fenced calls work; after it abandons, r2 is fenced out too.
    m.update(async |tx| tx.fenced(r2).finish_turn().await)
        .await
        .unwrap();
    m.update(async |tx| tx.fenced(r2).abandon().await)
        .await
        .unwrap();
    let err = m
        .update(async |tx| tx.fenced(r2).abandon().await)
        .await
        .unwrap_err();
    assert_eq!(
        err.rejection().unwrap().kind,
        RejectionKind::LeaseLost {
            expected: r2,
            actual: None
        }
    );
}

/// A nested Update on another chat in the same transaction: both bump, both
/// publish after the outer commit (inner first); a failed nested Update
/// makes the outer one roll back.
pub async fn nested_update_publishes_after_outer_commit<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let outer = fx.create().await;
    let inner = fx.create().await;
    fx.publisher.clear();
    let publisher = fx.publisher.clone();
    let inner_id = inner.chat_id();
    outer
        .update(async |tx| {
            tx.update_nested(inner_id, async |itx| {
                itx.send_message(NewMessage::user("nested"), BusyBehavior::Queue)
                    .await
            })
            .await?;
            assert!(publisher.published().is_empty());
            tx.commit_step(vec![NewMessage::assistant("outer")], false)
                .await?;
            Ok(())
        })
        .await
        .unwrap();
    let channels: Vec<ChatId> = fx
        .publisher
        .notifications()
        .iter()
        .filter(|n| matches!(n, Notification::Update { .. }))
        .map(|n| n.chat_id())
        .collect();
    assert_eq!(channels, [inner_id, outer.chat_id()]);
    assert_eq!(inner.load().await.unwrap().state(), ExecutionState::R1);
    assert_eq!(inner.load().await.unwrap().row.versions.snapshot, 2);
    // A failed nested update: the outer update refuses to commit even if the
    // callback swallows the error.
    let before_outer = outer.load().await.unwrap();
    let before_inner = inner.load().await.unwrap();
    fx.publisher.clear();
    let err = outer
        .update(async |tx| {
            let nested = tx
                .update_nested(inner_id, async |itx| {
                    itx.commit_step(vec![NewMessage::assistant("x")], false)
                        .await?;
                    // Not allowed from R1: the nested update fails.
                    itx.set_archived(true).await
                })
                .await;
            assert!(nested.is_err());
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NestedUpdateFailed(id) if id == inner_id));
    assert_eq!(outer.load().await.unwrap(), before_outer);
    assert_eq!(inner.load().await.unwrap(), before_inner);
    assert!(fx.publisher.published().is_empty());
}

/// Metadata written in an Update commits with it, and rolls back with it.
pub async fn metadata_writes_roll_back_with_the_callback<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    m.update(async |tx| {
        tx.set_title("first").await?;
        tx.set_metadata(Some(JsonText::parse(r#"{"k":1}"#).unwrap()))
            .await
    })
    .await
    .unwrap();
    let _ = m
        .update(async |tx| {
            tx.set_title("second").await?;
            tx.finish_error(None).await?;
            tx.finish_error(None).await
        })
        .await
        .unwrap_err();
    let rec = m.load().await.unwrap();
    assert_eq!(rec.metadata.title, "first");
    assert_eq!(
        rec.metadata.metadata,
        Some(JsonText::parse(r#"{"k":1}"#).unwrap())
    );
    assert_eq!(rec.state(), ExecutionState::R0);
}

/// Notifications the store delivers with the commit (`Notify::InTransaction`)
/// arrive for committed Updates only, in commit order, and never reach an
/// after-commit publisher.
pub async fn in_transaction_notifications_arrive_after_commit_only<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let created = create_chat(
        &fx.store,
        &Notify::InTransaction,
        CreateChat {
            messages: vec![NewMessage::user("hi")],
            ..CreateChat::default()
        },
    )
    .await
    .unwrap();
    let m = ChatMachine::new(
        fx.store.clone(),
        Notify::InTransaction,
        created.chat_id,
        fx.options,
    );
    let mut feed = b.listen(&fx.store, m.chat_id()).await;
    m.update(async |_| Ok(())).await.unwrap();
    let _ = m
        .update(async |tx| {
            tx.commit_step(vec![NewMessage::assistant("rolled back")], false)
                .await?;
            Err::<(), _>(Error::callback("no"))
        })
        .await
        .unwrap_err();
    m.update(async |tx| {
        tx.send_message(NewMessage::user("q"), BusyBehavior::Queue)
            .await
    })
    .await
    .unwrap();
    // The rolled-back Update sent nothing: the feed goes 2, then 3.
    assert_eq!(feed.next_update().await.snapshot_version(), 2);
    let third = feed.next_update().await;
    assert_eq!(third.snapshot_version(), 3);
    match third {
        Notification::Update { update, .. } => assert_eq!(update.queue_version, 3),
        other => panic!("{other:?}"),
    }
    assert!(fx.publisher.published().is_empty());
    assert_eq!(m.load().await.unwrap().row.versions.snapshot, 3);
}

/// The compaction marker: set by RequestCompaction (which also clears the
/// owner and hints), kept by a plain step, cleared by a consuming step.
pub async fn compaction_marker_is_one_shot<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    let (w, r) = (fx.worker, fx.runner);
    m.update(async |tx| {
        tx.acquire(w, r).await?;
        tx.finish_turn().await
    })
    .await
    .unwrap();
    fx.publisher.clear();
    let out = m
        .update(async |tx| tx.request_compaction().await)
        .await
        .unwrap();
    assert_eq!(out.to, ExecutionState::R0);
    let rec = m.load().await.unwrap();
    assert!(rec.row.compaction_requested_at.is_some());
    assert!(rec.row.owner.is_none());
    assert!(
        fx.published_for(m.chat_id())
            .iter()
            .any(|n| matches!(n, Notification::Ownership(_)))
    );
    m.update(async |tx| {
        tx.acquire(w, r).await?;
        tx.commit_step(vec![NewMessage::assistant("thinking")], false)
            .await
    })
    .await
    .unwrap();
    assert!(
        m.load()
            .await
            .unwrap()
            .row
            .compaction_requested_at
            .is_some()
    );
    m.update(async |tx| {
        tx.commit_step(vec![NewMessage::assistant("summary")], true)
            .await
    })
    .await
    .unwrap();
    assert!(
        m.load()
            .await
            .unwrap()
            .row
            .compaction_requested_at
            .is_none()
    );
}

/// Rows with legacy or inconsistent statuses classify Invalid, refuse every
/// transition but reconciliation, and reconcile into E0/E1 keeping the queue.
pub async fn reconcile_repairs_invalid_rows<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    for setup in setups()
        .into_iter()
        .filter(|s| s.state == ExecutionState::Invalid)
    {
        let m = fx.reach(&setup).await;
        let queued = !m.load().await.unwrap().queue.is_empty();
        let err = m
            .update(async |tx| tx.finish_turn().await)
            .await
            .unwrap_err();
        assert_eq!(err.rejection().unwrap().kind, RejectionKind::InvalidState);
        let out = m
            .update(async |tx| tx.reconcile_invalid_state(None, None).await)
            .await
            .unwrap();
        let want = if queued {
            ExecutionState::E1
        } else {
            ExecutionState::E0
        };
        assert_eq!(out.to, want, "{:?}", setup.steps);
        let rec = m.load().await.unwrap();
        assert!(!rec.row.archived);
        assert_eq!(
            rec.row.last_error,
            Some(chatstate_model::default_reconcile_error())
        );
    }
    let _ = SetupStep::Acquire;
}

/// The state of a claim's chat: the whole record and the notifications
/// published for it so far.
async fn claim_trace<B: Backend>(fx: &Fx<B::S>, m: &ChatMachine<B::S>) -> (usize, i64) {
    let rec = m.load().await.unwrap();
    (
        fx.published_for(m.chat_id()).len(),
        rec.row.versions.snapshot,
    )
}

/// `try_acquire`: won when nobody keeps the lease alive, held by a fresh
/// lease, not runnable when idle or archived, a stale lease taken over; a
/// losing claim bumps nothing, writes nothing and publishes nothing.
pub async fn claims_win_hold_skip_and_take_over<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    let (w1, r1) = (WorkerId::new_random(), RunnerId::new_random());
    let (w2, r2) = (WorkerId::new_random(), RunnerId::new_random());
    let me = |w, r| Owner {
        worker_id: w,
        runner_id: r,
    };
    fx.publisher.clear();
    let before = m.load().await.unwrap();
    // Won: committed once, the lease fresh, one update and no hint.
    let Claim::Won { snapshot } = m.try_acquire(w1, r1).await.unwrap() else {
        panic!("an unowned R0 chat is claimable");
    };
    assert_eq!(snapshot.row.owner, Some(me(w1, r1)));
    assert!(snapshot.lease_fresh);
    assert_eq!(
        snapshot.row.versions.snapshot,
        before.row.versions.snapshot + 1
    );
    let after = m.load().await.unwrap();
    assert_eq!(after.row, snapshot.row);
    let published = fx.published_for(m.chat_id());
    assert_eq!(published.len(), 1, "one update, no hint: {published:?}");
    assert!(matches!(published[0], Notification::Update { .. }));
    // Held by a fresh lease (anyone's, the claimant's own included).
    for (w, r) in [(w2, r2), (w1, r1)] {
        let trace = claim_trace::<B>(&fx, &m).await;
        assert_eq!(
            m.try_acquire(w, r).await.unwrap(),
            Claim::Held { owner: me(w1, r1) }
        );
        assert_eq!(
            claim_trace::<B>(&fx, &m).await,
            trace,
            "a lost claim left a trace"
        );
        assert_eq!(m.load().await.unwrap(), after);
    }
    // A stale lease is taken over.
    fx.store
        .advance_clock(Duration::from_secs(31))
        .await
        .unwrap();
    let Claim::Won { snapshot } = m.try_acquire(w2, r2).await.unwrap() else {
        panic!("a stale lease is claimable");
    };
    assert_eq!(snapshot.row.owner, Some(me(w2, r2)));
    assert_eq!(
        snapshot.row.versions.snapshot,
        after.row.versions.snapshot + 1
    );
    // Not runnable: idle, then archived.
    m.update(async |tx| tx.fenced(r2).finish_turn().await)
        .await
        .unwrap();
    let trace = claim_trace::<B>(&fx, &m).await;
    assert_eq!(
        m.try_acquire(w1, r1).await.unwrap(),
        Claim::NotRunnable {
            state: ExecutionState::W
        }
    );
    assert_eq!(claim_trace::<B>(&fx, &m).await, trace);
    m.update(async |tx| tx.set_archived(true).await)
        .await
        .unwrap();
    let trace = claim_trace::<B>(&fx, &m).await;
    assert_eq!(
        m.try_acquire(w1, r1).await.unwrap(),
        Claim::NotRunnable {
            state: ExecutionState::XW
        }
    );
    assert_eq!(claim_trace::<B>(&fx, &m).await, trace);
    // A missing chat.
    assert!(matches!(
        fx.machine(ChatId::new_random()).try_acquire(w1, r1).await,
        Err(Error::ChatNotFound(_))
    ));
}

/// `update_or_skip`: Skip rolls back everything, the bump included, and
/// publishes nothing; Commit is `update`.
pub async fn update_or_skip_rolls_back_a_skip<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    fx.publisher.clear();
    let before = m.load().await.unwrap();
    let got = m
        .update_or_skip(async |tx| {
            tx.send_message(NewMessage::user("never"), BusyBehavior::Queue)
                .await?;
            tx.set_title("never").await?;
            Ok(Ending::Skip(tx.row().versions.snapshot))
        })
        .await
        .unwrap();
    assert_eq!(got, Ending::Skip(before.row.versions.snapshot + 1));
    assert_eq!(m.load().await.unwrap(), before);
    assert!(fx.publisher.published().is_empty());
    let got = m
        .update_or_skip(async |tx| {
            tx.set_title("kept").await?;
            Ok(Ending::Commit(7))
        })
        .await
        .unwrap();
    assert_eq!(got, Ending::Commit(7));
    let after = m.load().await.unwrap();
    assert_eq!(after.metadata.title, "kept");
    assert_eq!(
        after.row.versions.snapshot,
        before.row.versions.snapshot + 1
    );
    assert_eq!(fx.published_for(m.chat_id()).len(), 2, "update and hint");
    // An error is an error, and rolls back too.
    let err = m
        .update_or_skip(async |tx| {
            tx.set_title("gone").await?;
            tx.finish_interruption(vec![]).await?;
            Ok(Ending::Commit(()))
        })
        .await
        .unwrap_err();
    assert!(err.rejection().is_some(), "{err}");
    assert_eq!(m.load().await.unwrap(), after);
}

/// A heartbeat is written only while its runner holds the lease, and says
/// so: Held, Lost (to another runner or to nobody), ChatGone.
pub async fn heartbeat_reports_the_lease<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    let (w1, r1) = (WorkerId::new_random(), RunnerId::new_random());
    let (w2, r2) = (WorkerId::new_random(), RunnerId::new_random());
    assert_eq!(
        m.heartbeat(r1).await.unwrap(),
        LeaseStatus::Lost { owner: None }
    );
    m.update(async |tx| tx.acquire(w1, r1).await).await.unwrap();
    assert_eq!(m.heartbeat(r1).await.unwrap(), LeaseStatus::Held);
    // An unconditional takeover: the old runner learns it from its heartbeat.
    m.update(async |tx| tx.acquire(w2, r2).await).await.unwrap();
    let taken = LeaseStatus::Lost {
        owner: Some(Owner {
            worker_id: w2,
            runner_id: r2,
        }),
    };
    assert_eq!(m.heartbeat(r1).await.unwrap(), taken);
    // The old runner's heartbeat wrote nothing: once the new one goes
    // stale, the old one's keeps nothing alive.
    fx.store
        .advance_clock(Duration::from_secs(31))
        .await
        .unwrap();
    assert_eq!(m.heartbeat(r1).await.unwrap(), taken);
    assert!(
        !m.update(async |tx| Ok(tx.snapshot().lease_fresh))
            .await
            .unwrap()
    );
    assert_eq!(m.heartbeat(r2).await.unwrap(), LeaseStatus::Held);
    assert!(
        m.update(async |tx| Ok(tx.snapshot().lease_fresh))
            .await
            .unwrap()
    );
    m.update(async |tx| tx.abandon().await).await.unwrap();
    assert_eq!(
        m.heartbeat(r2).await.unwrap(),
        LeaseStatus::Lost { owner: None }
    );
    assert_eq!(
        fx.machine(ChatId::new_random())
            .heartbeat(r2)
            .await
            .unwrap(),
        LeaseStatus::ChatGone
    );
}

/// Acquire deletes the chat's heartbeat rows but the new runner's; Abandon
/// deletes them all: the rows stay bounded by the chats owned.
pub async fn heartbeat_rows_stay_bounded<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let chats = [fx.create().await, fx.create().await, fx.create().await];
    let mut runners: Vec<Option<RunnerId>> = vec![None; chats.len()];
    for _round in 0..5 {
        for (i, m) in chats.iter().enumerate() {
            let (w, r) = (WorkerId::new_random(), RunnerId::new_random());
            assert!(matches!(
                m.try_acquire(w, r).await.unwrap(),
                Claim::Won { .. }
            ));
            // The runner taken over heartbeats in vain.
            if let Some(prev) = runners[i] {
                assert!(matches!(
                    m.heartbeat(prev).await.unwrap(),
                    LeaseStatus::Lost { .. }
                ));
            }
            assert_eq!(m.heartbeat(r).await.unwrap(), LeaseStatus::Held);
            runners[i] = Some(r);
            let owned = runners.iter().flatten().count();
            assert_eq!(b.heartbeat_rows(&fx.store).await, owned);
        }
        // Every lease goes stale: the next round takes each chat over.
        fx.store
            .advance_clock(Duration::from_secs(31))
            .await
            .unwrap();
    }
    // A takeover in an Update that rolls back keeps the old row.
    let (w, r) = (WorkerId::new_random(), RunnerId::new_random());
    let ended = chats[0]
        .update_or_skip(async |tx| {
            tx.acquire(w, r).await?;
            Ok(Ending::Skip(()))
        })
        .await
        .unwrap();
    assert_eq!(ended, Ending::Skip(()));
    assert_eq!(b.heartbeat_rows(&fx.store).await, chats.len());
    let kept = runners[0].unwrap();
    assert_eq!(chats[0].heartbeat(kept).await.unwrap(), LeaseStatus::Held);
    for m in &chats {
        m.update(async |tx| tx.abandon().await).await.unwrap();
    }
    assert_eq!(b.heartbeat_rows(&fx.store).await, 0);
}

/// `Fenced::expect_history`: a step generated from an old history is
/// refused with HistoryChanged (after the runner check), writes nothing,
/// and leaves the Update usable; the handle's own steps move the
/// expectation along.
pub async fn history_expectation_refuses_stale_steps<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let m = fx.create().await;
    let (w, r) = (fx.worker, fx.runner);
    let Claim::Won { snapshot } = m.try_acquire(w, r).await.unwrap() else {
        panic!("claimable");
    };
    let generated_from = snapshot.row.versions.history;
    // The user edits the first message: the owner stays, the history moves.
    let first = m.load().await.unwrap().history[0].id;
    m.update(async |tx| {
        tx.edit_message(first, vec![Part::text("edited")], None)
            .await
    })
    .await
    .unwrap();
    let edited = m.load().await.unwrap();
    assert_eq!(edited.row.owner.map(|o| o.runner_id), Some(r));
    assert_ne!(edited.row.versions.history, generated_from);
    fx.publisher.clear();
    let err = m
        .update(async |tx| {
            tx.fenced(r)
                .expect_history(generated_from)
                .commit_step(vec![NewMessage::assistant("stale reply")], false)
                .await
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.rejection().unwrap().kind,
        RejectionKind::HistoryChanged {
            expected: generated_from,
            actual: edited.row.versions.history
        }
    );
    assert_eq!(m.load().await.unwrap(), edited);
    assert!(fx.publisher.published().is_empty());
    // The runner check comes first.
    let other = RunnerId::new_random();
    let err = m
        .update(async |tx| {
            tx.fenced(other)
                .expect_history(generated_from)
                .finish_turn()
                .await
        })
        .await
        .unwrap_err();
    assert!(matches!(
        err.rejection().unwrap().kind,
        RejectionKind::LeaseLost { .. }
    ));
    // A rejection leaves the Update usable: regenerate from the history now
    // and commit a step, then finish through the same handle.
    let current = edited.row.versions.history;
    let (stale, to) = m
        .update(async |tx| {
            let stale = tx
                .fenced(r)
                .expect_history(generated_from)
                .finish_turn()
                .await
                .unwrap_err();
            let mut f = tx.fenced(r).expect_history(current);
            f.commit_step(vec![NewMessage::assistant("fresh reply")], false)
                .await?;
            let done = f.finish_turn().await?;
            Ok((stale, done.to))
        })
        .await
        .unwrap();
    assert_eq!(stale.rejection().unwrap().kind.name(), "HistoryChanged");
    assert_eq!(to, ExecutionState::W);
    let after = m.load().await.unwrap();
    assert_eq!(
        after.active_history().last().unwrap().content,
        vec![Part::text("fresh reply")]
    );
}

/// `Store::claimable`: runnable, unarchived chats whose lease is missing or
/// stale, oldest first, at most `limit`; a chat whose row another
/// transaction holds is skipped, not waited for.
pub async fn claimable_lists_chats_that_need_a_worker<B: Backend>(b: &B) {
    let fx = fixture(b).await;
    let tick = async || {
        fx.store
            .advance_clock(Duration::from_secs(1))
            .await
            .unwrap()
    };
    let (w, r) = (fx.worker, fx.runner);
    // Oldest: an unowned R0 chat.
    let unowned = fx.create().await;
    tick().await;
    // An owned chat in requires-action whose lease goes stale.
    let stale = fx.create().await;
    stale
        .update(async |tx| {
            tx.acquire(w, r).await?;
            tx.commit_step(vec![assistant_call("call-dyn", DYNAMIC_TOOL)], false)
                .await?;
            tx.enter_requires_action().await
        })
        .await
        .unwrap();
    tick().await;
    // An owned chat whose lease is kept alive.
    let (w2, r2) = (WorkerId::new_random(), RunnerId::new_random());
    let fresh = fx.create().await;
    fresh
        .update(async |tx| tx.acquire(w2, r2).await)
        .await
        .unwrap();
    tick().await;
    // Idle, archived and Invalid chats never need a worker.
    let idle = fx.create().await;
    idle.update(async |tx| tx.finish_turn().await)
        .await
        .unwrap();
    let archived = fx.create().await;
    archived
        .update(async |tx| {
            tx.finish_turn().await?;
            tx.set_archived(true).await
        })
        .await
        .unwrap();
    let invalid = fx.create().await;
    fx.store
        .set_raw_state(invalid.chat_id(), &chatstate::ChatStatus::Running, true)
        .await
        .unwrap();
    tick().await;
    // Every lease goes stale; the fresh chat's runner heartbeats again.
    fx.store
        .advance_clock(Duration::from_secs(31))
        .await
        .unwrap();
    assert_eq!(fresh.heartbeat(r2).await.unwrap(), LeaseStatus::Held);
    let claimable = async |limit| fx.store.claimable(&fx.options, limit).await.unwrap();
    assert_eq!(claimable(10).await, [unowned.chat_id(), stale.chat_id()]);
    assert_eq!(claimable(1).await, [unowned.chat_id()]);
    assert!(claimable(0).await.is_empty());
    // Skipped, not waited for, while an Update holds the row; a locked row
    // does not count towards the limit.
    let seen = unowned
        .update_or_skip(async |_tx| Ok(Ending::Skip(claimable(1).await)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen, [stale.chat_id()]);
    // Among given chats: the same rules, oldest first, unknown ids ignored,
    // a locked row skipped.
    let all = [
        stale.chat_id(),
        fresh.chat_id(),
        idle.chat_id(),
        archived.chat_id(),
        invalid.chat_id(),
        ChatId::new_random(),
        unowned.chat_id(),
    ];
    let among =
        async |chats: &[ChatId]| fx.store.claimable_among(chats, &fx.options).await.unwrap();
    assert_eq!(among(&all).await, [unowned.chat_id(), stale.chat_id()]);
    assert_eq!(among(&all[1..6]).await, []);
    assert!(among(&[]).await.is_empty());
    let seen = unowned
        .update_or_skip(async |_tx| Ok(Ending::Skip(among(&all).await)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen, [stale.chat_id()]);
    // Claimed chats leave the list.
    assert!(matches!(
        unowned.try_acquire(w2, r2).await.unwrap(),
        Claim::Won { .. }
    ));
    assert_eq!(claimable(10).await, [stale.chat_id()]);
    assert!(matches!(
        stale.try_acquire(w, r).await.unwrap(),
        Claim::Won { .. }
    ));
    assert!(claimable(10).await.is_empty());
    assert!(among(&all).await.is_empty());
}

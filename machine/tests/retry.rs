//! Errors a caller matches (`is_retryable`, `is_not_found`, the cause
//! chain in Display) and the retrying Update, on the in-memory store with
//! injected faults.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chatstate::{
    ChatId, ChatMachine, CreateChat, Error, ExecutionState, FlushError, NewMessage, Notify,
    Options, RecordingPublisher, Rejection, RejectionKind, RetryPolicy, StoreError, StoreErrorKind,
    Transition, create_chat,
};
use chatstate_store_mem::MemStore;

fn store_error(kind: StoreErrorKind) -> Error {
    Error::Store(StoreError::new("test", kind, "cause"))
}

#[test]
fn retryable_exactly_where_the_update_rolled_back_for_a_transient_cause() {
    use StoreErrorKind::*;
    for (kind, retryable) in [
        (Connection, true),
        (Serialization, true),
        (Deadlock, true),
        (Timeout, true),
        (ReadOnly, true),
        (Injected, true),
        (OutcomeUnknown, false),
        (Data, false),
        (Other, false),
    ] {
        assert_eq!(store_error(kind).is_retryable(), retryable, "{kind:?}");
        assert_eq!(kind.is_retryable(), retryable, "{kind:?}");
    }
    let chat = ChatId(uuid::Uuid::nil());
    let never = [
        Error::Rejected(Rejection {
            transition: Transition::FinishTurn,
            from: ExecutionState::W,
            kind: RejectionKind::TransitionNotAllowed { reason: None },
        }),
        Error::ChatNotFound(chat),
        Error::PublishAfterCommit {
            snapshot_version: 2,
            source: FlushError(Vec::new()),
        },
        Error::NestedUpdateFailed(chat),
        Error::callback("mine"),
    ];
    for e in never {
        assert!(!e.is_retryable(), "{e:?}");
    }
}

#[test]
fn not_found_is_one_question_for_both_forms() {
    let chat = ChatId(uuid::Uuid::nil());
    assert!(Error::ChatNotFound(chat).is_not_found());
    let rejected = |kind| {
        Error::Rejected(Rejection {
            transition: Transition::SetArchived,
            from: ExecutionState::N,
            kind,
        })
    };
    assert!(rejected(RejectionKind::ChatNotFound).is_not_found());
    assert!(!rejected(RejectionKind::InvalidState).is_not_found());
    assert!(!store_error(StoreErrorKind::Data).is_not_found());
}

#[test]
fn store_errors_display_their_cause_chain() {
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
    let e = StoreError::new("upsert heartbeat", StoreErrorKind::Connection, io);
    assert_eq!(e.to_string(), "store: upsert heartbeat: connection refused");
    // Through the machine's error too (it is transparent).
    assert_eq!(
        Error::Store(e).to_string(),
        "store: upsert heartbeat: connection refused"
    );

    // A wrapper whose message repeats its source's is shown once; a
    // deeper, different cause is shown after it.
    #[derive(Debug, thiserror::Error)]
    #[error("error communicating with database: {0}")]
    struct Wrapper(#[source] std::io::Error);
    let e = StoreError::new(
        "commit",
        StoreErrorKind::Connection,
        Wrapper(std::io::Error::other("broken pipe")),
    );
    assert_eq!(
        e.to_string(),
        "store: commit: error communicating with database: broken pipe"
    );
    #[derive(Debug, thiserror::Error)]
    #[error("reconnect failed")]
    struct Outer(#[source] std::io::Error);
    let e = StoreError::new(
        "listen",
        StoreErrorKind::Connection,
        Outer(std::io::Error::other("server closed the connection")),
    );
    assert_eq!(
        e.to_string(),
        "store: listen: reconnect failed: server closed the connection"
    );
    // Without a source: the context alone.
    assert_eq!(StoreError::injected("commit").to_string(), "store: commit");
}

async fn chat() -> (MemStore, Arc<RecordingPublisher>, ChatMachine<MemStore>) {
    let store = MemStore::new();
    let publisher = Arc::new(RecordingPublisher::new());
    let created = create_chat(
        &store,
        &Notify::AfterCommit(publisher.clone()),
        CreateChat {
            messages: vec![NewMessage::user("hello")],
            ..CreateChat::default()
        },
    )
    .await
    .unwrap();
    let m = ChatMachine::new(
        store.clone(),
        publisher.clone(),
        created.chat_id,
        Options::default(),
    );
    publisher.clear();
    (store, publisher, m)
}

/// A quick policy: the waits are not what these tests are about.
fn quick(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
    }
}

/// Attempt `k` (1-based) of `faults` fails at store call `faults[k-1]` of
/// that attempt (1: the lock, 2: the transition's write, 3: the commit).
/// Returns the result and the number of attempts made.
async fn run(
    store: &MemStore,
    m: &ChatMachine<MemStore>,
    faults: &[u64],
    policy: RetryPolicy,
) -> (Result<(), Error>, u32) {
    let attempts = AtomicU32::new(0);
    let result = m
        .update_with_retry(&policy, || {
            let k = attempts.fetch_add(1, Ordering::SeqCst) as usize;
            if let Some(&call) = faults.get(k) {
                store.fail_nth_call(call);
            }
            async |tx| {
                tx.record_generation_attempt().await?;
                Ok(())
            }
        })
        .await;
    (result, attempts.load(Ordering::SeqCst))
}

#[tokio::test]
async fn the_retrying_update_commits_exactly_once_after_injected_faults() {
    let (store, publisher, m) = chat().await;
    let before = m.load().await.unwrap().row;
    // Failing at the commit, at the write, at the lock; then succeeding.
    let (result, attempts) = run(&store, &m, &[3, 2, 1], quick(5)).await;
    result.expect("the fourth attempt commits");
    assert_eq!(attempts, 4);
    assert_eq!(store.injected_faults(), 3);
    let after = m.load().await.unwrap().row;
    assert_eq!(after.versions.snapshot, before.versions.snapshot + 1);
    assert_eq!(after.generation_attempt, before.generation_attempt + 1);
    let updates = publisher
        .notifications()
        .into_iter()
        .filter(|n| matches!(n, chatstate::Notification::Update { .. }))
        .count();
    assert_eq!(updates, 1, "published once, for the attempt that committed");
}

#[tokio::test]
async fn the_retrying_update_gives_up_after_max_attempts_with_the_last_error() {
    let (store, publisher, m) = chat().await;
    let before = m.load().await.unwrap().row;
    let (result, attempts) = run(&store, &m, &[1, 2, 3], quick(3)).await;
    let err = result.unwrap_err();
    assert_eq!(attempts, 3);
    assert!(
        matches!(&err, Error::Store(e) if e.kind == StoreErrorKind::Injected && e.context == "commit"),
        "{err:?}"
    );
    assert_eq!(m.load().await.unwrap().row, before, "nothing committed");
    assert!(publisher.notifications().is_empty());
}

#[tokio::test]
async fn the_retrying_update_never_retries_a_rejection_or_a_callback_error() {
    let (_store, _publisher, m) = chat().await;
    let attempts = AtomicU32::new(0);
    let err = m
        .update_with_retry(&quick(5), || {
            attempts.fetch_add(1, Ordering::SeqCst);
            // matrix: RequestCompaction is allowed from W only; the chat
            // is in R0.
            async |tx| tx.request_compaction().await.map(|_| ())
        })
        .await
        .unwrap_err();
    assert!(err.rejection().is_some(), "{err}");
    assert_eq!(attempts.load(Ordering::SeqCst), 1);

    let attempts = AtomicU32::new(0);
    let err = m
        .update_with_retry(&quick(5), || {
            attempts.fetch_add(1, Ordering::SeqCst);
            async |_tx| -> Result<(), Error> { Err(Error::callback("no")) }
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Callback(_)));
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
}

//! A lease fences what its handler commits: after a takeover the commit
//! fails with LeaseLost (whether or not the handler listened to `lost()`),
//! a step generated before an EditMessage fails with HistoryChanged, and a
//! heartbeat that finds the lease taken resolves `lost()`.

use std::sync::Arc;
use std::time::Duration;

use chatstate::{Claim, Error, MessageId, Options, Part, RejectionKind, RunnerId, WorkerId};
use chatstate_worker::Runtime;
use tokio::sync::{Notify, mpsc};
use tokio::time::timeout;

use crate::backend::Backend;
use crate::handlers::{Gate, Gated, WaitLost};

const WAIT: Duration = Duration::from_secs(20);

fn rejection(result: &Result<(), Error>) -> Option<&RejectionKind> {
    result
        .as_ref()
        .err()
        .and_then(|e| e.rejection())
        .map(|r| &r.kind)
}

/// A runtime with the gated handler on one new chat; returns it once the
/// handler has read the history (and its version).
async fn gated<B: Backend>(
    b: &B,
) -> (
    Runtime,
    chatstate::ChatId,
    i64,
    Arc<Notify>,
    mpsc::UnboundedReceiver<Gate>,
) {
    let chat = b.create("question").await;
    let (events, mut rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Notify::new());
    // Default options: the next heartbeat is 10 s away, so nothing but the
    // test moves the lease during it.
    let runtime = Runtime::builder(
        b.store(),
        b.notify(),
        Gated {
            events,
            gate: gate.clone(),
        },
    )
    .options(Options::default())
    .spawn()
    .unwrap();
    let Gate::Generated {
        chat: got,
        history_version,
    } = timeout(WAIT, rx.recv()).await.unwrap().unwrap()
    else {
        panic!("expected the history read first");
    };
    assert_eq!(got, chat);
    (runtime, chat, history_version, gate, rx)
}

async fn committed(rx: &mut mpsc::UnboundedReceiver<Gate>) -> (Result<(), Error>, bool) {
    match timeout(WAIT, rx.recv()).await.unwrap().unwrap() {
        Gate::Committed { result, lost } => (result, lost),
        other => panic!("expected a commit, got {other:?}"),
    }
}

async fn a_commit_after_a_takeover_fails_with_lease_lost<B: Backend>() {
    let b = B::new().await;
    let (runtime, chat, _, gate, mut rx) = gated(&b).await;

    // Another worker takes the chat once the lease is stale.
    b.age_leases(Options::default().heartbeat_stale).await;
    let thief = RunnerId::new_random();
    let claim = b
        .machine(chat, Options::default())
        .try_acquire(WorkerId::new_random(), thief)
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Won { .. }), "{claim:?}");

    gate.notify_one();
    for attempt in ["first", "after reading again"] {
        let (result, lost) = committed(&mut rx).await;
        assert!(
            matches!(
                rejection(&result),
                Some(RejectionKind::LeaseLost { actual: Some(r), .. }) if *r == thief
            ),
            "{attempt}: {result:?}"
        );
        assert!(lost, "{attempt}: lost() resolved");
    }
    let stats = runtime.shutdown().await;
    assert_eq!((stats.leases_lost, stats.handed_back), (1, 0), "{stats:?}");
    let record = b.load(chat).await;
    // Create 1, claim 2, takeover 3: the refused commits moved nothing, and
    // the runtime released nothing it no longer held.
    assert_eq!(record.row.versions.snapshot, 3);
    assert_eq!(record.row.owner.map(|o| o.runner_id), Some(thief));
}

async fn a_step_generated_before_an_edit_fails_with_history_changed<B: Backend>() {
    let b = B::new().await;
    let (runtime, chat, read, gate, mut rx) = gated(&b).await;

    // The user edits the first message between generation and commit.
    let first: MessageId = b.load(chat).await.history[0].id;
    let machine = b.machine(chat, Options::default());
    machine
        .update(async |tx| {
            tx.edit_message(first, vec![Part::text("edited")], None)
                .await
        })
        .await
        .unwrap();
    let edited = b.load(chat).await.row.versions.history;
    assert!(edited > read);

    gate.notify_one();
    let (result, lost) = committed(&mut rx).await;
    assert!(
        matches!(
            rejection(&result),
            Some(RejectionKind::HistoryChanged { expected, actual })
                if *expected == read && *actual == edited
        ),
        "{result:?}"
    );
    assert!(!lost, "the lease is still held");
    // Read again: the step generated from the new history commits.
    let (result, _) = committed(&mut rx).await;
    result.unwrap();
    let stats = runtime.shutdown().await;
    assert_eq!((stats.leases_lost, stats.finished), (0, 1), "{stats:?}");
    let record = b.load(chat).await;
    assert_eq!(record.row.owner, None, "released after finishing");
    // Create, claim, edit, the step and end of turn, the release.
    assert_eq!(record.row.versions.snapshot, 5);
}

async fn a_heartbeat_that_finds_the_lease_taken_resolves_lost<B: Backend>() {
    let b = B::new().await;
    let chat = b.create("question").await;
    let (started, mut started_rx) = mpsc::unbounded_channel();
    let (lost, mut lost_rx) = mpsc::unbounded_channel();
    let runtime = Runtime::builder(b.store(), b.notify(), WaitLost { started, lost })
        .options(Options::default())
        .heartbeat_interval(Duration::from_millis(50))
        .spawn()
        .unwrap();
    let s = timeout(WAIT, started_rx.recv()).await.unwrap().unwrap();
    assert_eq!(s.chat, chat);

    // An unfenced Acquire overwrites even a fresh lease.
    let machine = b.machine(chat, Options::default());
    machine
        .update(async |tx| {
            tx.acquire(WorkerId::new_random(), RunnerId::new_random())
                .await
        })
        .await
        .unwrap();
    assert_eq!(timeout(WAIT, lost_rx.recv()).await.unwrap(), Some(chat));
    timeout(WAIT, s.heartbeat.stopped())
        .await
        .expect("the heartbeat task ends with the lease");
    let stats = runtime.shutdown().await;
    assert_eq!((stats.leases_lost, stats.handed_back), (1, 0), "{stats:?}");
}

on_both_stores!(
    a_commit_after_a_takeover_fails_with_lease_lost,
    a_step_generated_before_an_edit_fails_with_history_changed,
    a_heartbeat_that_finds_the_lease_taken_resolves_lost,
);

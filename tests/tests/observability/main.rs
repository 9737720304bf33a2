//! What the machine tells tracing and metrics about its operations, on
//! both stores: the spans of one Update (transitions, from and to states,
//! snapshot version, outcome, phase times; round trips on Postgres), of a
//! rejected Update, a chat creation, a ReadLock, a nested Update and a
//! heartbeat; the rejection events; and the counters and histograms a
//! metrics recorder sees after an Update and a rejection.

mod capture;

use std::collections::BTreeSet;

use chatstate::{Error, NewMessage, StoreErrorKind};
use chatstate_tests::fixture::Fx;
use chatstate_tests::{Backend, MemBackend, PgBackend};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::{CompositeKey, MetricKind};
use tracing::Level;
use tracing::instrument::WithSubscriber;

use crate::capture::Capture;

/// The phases every committed Update times (microseconds).
const PHASES: [&str; 5] = [
    "lock_wait_us",
    "callback_us",
    "plan_write_us",
    "commit_us",
    "publish_us",
];

/// One Update that acquires, has a transition rejected and carries on,
/// and commits a step; then one that fails with a rejection.
async fn two_updates<S: chatstate::Store>(fx: &Fx<S>, m: &chatstate::ChatMachine<S>) -> Error {
    let (worker, runner) = (fx.worker, fx.runner);
    m.update(async |tx| {
        tx.acquire(worker, runner).await?;
        // Archiving a running chat is rejected; the Update goes on.
        assert!(tx.set_archived(true).await.is_err());
        tx.fenced(runner)
            .commit_step(vec![NewMessage::assistant("hi")], false)
            .await
    })
    .await
    .expect("the first Update commits");
    m.update(async |tx| tx.set_archived(true).await)
        .await
        .expect_err("the second Update is rejected")
}

async fn spans_of_one_update<B: Backend>(b: &B) {
    let pg = b.name() == "pg";
    let fx = Fx::new(b.store().await);
    let capture = Capture::default();
    let (m, other, rejected) = async {
        let m = fx.create().await;
        let other = fx.create().await;
        let rejected = two_updates(&fx, &m).await;
        m.load().await.expect("load");
        m.update(async |tx| {
            tx.update_nested(other.chat_id(), async |n| n.interrupt(None).await)
                .await
        })
        .await
        .expect("nested Update");
        m.heartbeat(fx.runner).await.expect("heartbeat");
        (m, other, rejected)
    }
    .with_subscriber(capture.dispatch())
    .await;
    assert_eq!(rejected.kind_name(), "TransitionNotAllowed");

    let created = capture.named("create_chat");
    assert_eq!(created.len(), 2);
    let c = &created[0];
    assert_eq!(c.target, "chatstate");
    assert_eq!(c.field("chat_id"), m.chat_id().to_string());
    assert_eq!(c.field("outcome"), "ok");
    assert_eq!(c.number("messages"), 1);
    c.number("commit_us");
    c.number("publish_us");
    if pg {
        assert_eq!(c.number("round_trips"), 1, "one statement creates a chat");
    }

    let updates = capture.named("update");
    assert_eq!(updates.len(), 3);
    let u = &updates[0];
    assert_eq!(u.target, "chatstate");
    assert_eq!(u.parent, None);
    assert_eq!(u.field("chat_id"), m.chat_id().to_string());
    assert_eq!(u.field("transitions"), "Acquire,CommitStep");
    assert_eq!(u.field("from"), "R0");
    assert_eq!(u.field("to"), "R0");
    assert_eq!(u.number("snapshot_version"), 2);
    assert_eq!(u.field("outcome"), "ok");
    for phase in PHASES {
        u.number(phase);
    }
    assert!(u.number("plan_write_us") <= u.number("callback_us"));
    if pg {
        // Lock and read, Acquire's plan, CommitStep's plan, commit.
        assert_eq!(u.number("round_trips"), 4);
    } else {
        assert!(!u.fields.contains_key("round_trips"), "mem counts none");
    }

    let r = &updates[1];
    assert_eq!(r.field("transitions"), "");
    assert_eq!(r.field("from"), "R0");
    assert_eq!(
        r.number("snapshot_version"),
        3,
        "allocated, then rolled back"
    );
    assert_eq!(r.field("outcome"), "rejected:TransitionNotAllowed");
    assert!(
        !r.fields.contains_key("commit_us"),
        "it never reached its commit"
    );
    if pg {
        assert_eq!(r.number("round_trips"), 2, "lock, rollback");
    }

    // The rejections are debug events inside their Updates.
    let rejections: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|e| e.fields.get("message").map(String::as_str) == Some("transition rejected"))
        .collect();
    assert_eq!(rejections.len(), 2);
    for e in &rejections {
        assert_eq!(e.level, Level::DEBUG);
        assert_eq!(e.target, "chatstate");
        assert_eq!(e.span, Some("update"));
        assert_eq!(e.fields["transition"], "SetArchived");
        assert_eq!(e.fields["from"], "R0");
        assert_eq!(e.fields["kind"], "TransitionNotAllowed");
    }

    let reads = capture.named("read_lock");
    assert_eq!(reads.len(), 1);
    assert_eq!(reads[0].field("outcome"), "ok");
    assert_eq!(reads[0].field("from"), "R0");
    assert_eq!(
        reads[0].number("snapshot_version"),
        2,
        "a ReadLock does not bump"
    );
    reads[0].number("lock_wait_us");
    if pg {
        assert!(reads[0].number("round_trips") >= 2);
    }

    // The nested Update has a span of its own inside the enclosing one.
    let with_nested = &updates[2];
    assert_eq!(with_nested.field("transitions"), "");
    assert_eq!(with_nested.field("outcome"), "ok");
    let nested = capture.named("update_nested");
    assert_eq!(nested.len(), 1);
    let n = &nested[0];
    assert_eq!(n.parent, Some("update"));
    assert_eq!(n.field("chat_id"), other.chat_id().to_string());
    assert_eq!(n.field("transitions"), "Interrupt");
    assert_eq!(n.field("from"), "R0");
    assert_eq!(n.field("to"), "I0");
    assert_eq!(n.number("snapshot_version"), 2);

    let beats = capture.named("heartbeat");
    assert_eq!(beats.len(), 1);
    assert_eq!(beats[0].field("status"), "held");
    if pg {
        assert_eq!(beats[0].number("round_trips"), 1);
    }
}

/// The value of the one metric of `kind` named `name` with exactly
/// `labels`.
fn metric<'a>(
    snapshot: &'a [(CompositeKey, DebugValue)],
    kind: MetricKind,
    name: &str,
    labels: &[(&str, &str)],
) -> &'a DebugValue {
    let want: BTreeSet<(&str, &str)> = labels.iter().copied().collect();
    let found: Vec<&DebugValue> = snapshot
        .iter()
        .filter(|(k, _)| {
            let have: BTreeSet<(&str, &str)> =
                k.key().labels().map(|l| (l.key(), l.value())).collect();
            k.kind() == kind && k.key().name() == name && have == want
        })
        .map(|(_, v)| v)
        .collect();
    match found.as_slice() {
        [one] => one,
        other => panic!("{name} {labels:?}: {} found in {snapshot:#?}", other.len()),
    }
}

fn counter(snapshot: &[(CompositeKey, DebugValue)], name: &str, labels: &[(&str, &str)]) -> u64 {
    match metric(snapshot, MetricKind::Counter, name, labels) {
        DebugValue::Counter(n) => *n,
        other => panic!("{name} is {other:?}"),
    }
}

fn samples(snapshot: &[(CompositeKey, DebugValue)], name: &str, labels: &[(&str, &str)]) -> usize {
    match metric(snapshot, MetricKind::Histogram, name, labels) {
        DebugValue::Histogram(values) => {
            assert!(values.iter().all(|v| v.0 >= 0.0), "{name}: {values:?}");
            values.len()
        }
        other => panic!("{name} is {other:?}"),
    }
}

async fn metrics_of_updates<B: Backend>(b: &B) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // This thread's recorder: the test runs on a current-thread runtime,
    // so every poll of the Updates happens here.
    let _recorder = metrics::set_default_local_recorder(&recorder);
    let fx = Fx::new(b.store().await);
    let m = fx.create().await;
    two_updates(&fx, &m).await;
    let snapshot: Vec<(CompositeKey, DebugValue)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(k, _, _, v)| (k, v))
        .collect();

    let updates = "chatstate_updates_total";
    assert_eq!(counter(&snapshot, updates, &[("outcome", "ok")]), 1);
    let rejected = "rejected:TransitionNotAllowed";
    assert_eq!(counter(&snapshot, updates, &[("outcome", rejected)]), 1);
    let transitions = "chatstate_transitions_total";
    for (transition, outcome, n) in [
        ("Acquire", "ok", 1),
        ("CommitStep", "ok", 1),
        ("SetArchived", rejected, 2),
    ] {
        let labels = [("transition", transition), ("outcome", outcome)];
        assert_eq!(counter(&snapshot, transitions, &labels), n, "{labels:?}");
    }
    assert_eq!(
        samples(&snapshot, "chatstate_update_duration_seconds", &[]),
        2
    );
    assert_eq!(
        samples(
            &snapshot,
            "chatstate_lock_wait_seconds",
            &[("operation", "update")]
        ),
        2
    );
}

/// A store failure inside an Update is counted with its kind, for the
/// Update and for the transition whose write failed; a commit whose
/// outcome is unknown is counted so, and is an error event.
async fn metrics_of_store_failures() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _recorder = metrics::set_default_local_recorder(&recorder);
    let capture = Capture::default();
    let fx = Fx::new(MemBackend.store().await);
    let m = fx.create().await;
    let store = fx.store.clone();
    let (failed, unknown) = async {
        let failed = m
            .update(async |tx| {
                // The next store call is the Interrupt's write.
                store.fail_nth_call(1);
                tx.interrupt(None).await
            })
            .await
            .expect_err("the injected fault fails the Update");
        store.lose_nth_commit(1);
        let unknown = m
            .update(async |tx| tx.interrupt(None).await)
            .await
            .expect_err("the commit is lost");
        (failed, unknown)
    }
    .with_subscriber(capture.dispatch())
    .await;
    assert!(matches!(failed, Error::Store(ref s) if s.kind == StoreErrorKind::Injected));
    assert!(matches!(unknown, Error::Store(ref s) if s.kind == StoreErrorKind::OutcomeUnknown));
    let snapshot: Vec<(CompositeKey, DebugValue)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(k, _, _, v)| (k, v))
        .collect();
    for outcome in ["store:Injected", "store:OutcomeUnknown"] {
        let labels = [("outcome", outcome)];
        assert_eq!(counter(&snapshot, "chatstate_updates_total", &labels), 1);
        let labels = [("transition", "Interrupt"), ("outcome", outcome)];
        assert_eq!(
            counter(&snapshot, "chatstate_transitions_total", &labels),
            1
        );
    }

    let outcomes: Vec<String> = capture
        .named("update")
        .iter()
        .map(|u| u.field("outcome").to_owned())
        .collect();
    assert_eq!(outcomes, ["store:Injected", "store:OutcomeUnknown"]);
    let errors: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|e| e.level == Level::ERROR)
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].span, Some("update"));
    assert!(errors[0].fields["message"].starts_with("commit outcome unknown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_one_update_mem() {
    spans_of_one_update(&MemBackend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_one_update_pg() {
    spans_of_one_update(&PgBackend).await;
}

#[tokio::test]
async fn metrics_of_updates_mem() {
    metrics_of_updates(&MemBackend).await;
}

#[tokio::test]
async fn metrics_of_updates_pg() {
    metrics_of_updates(&PgBackend).await;
}

#[tokio::test]
async fn metrics_of_store_failures_mem() {
    metrics_of_store_failures().await;
}

//! What the runtime tells tracing and metrics: a claim span inside the
//! worker's span, the Update it runs inside the claim span, a lease span
//! that says how the handler let go, a `lease lost` warning with its
//! cause, and the claim counter, the lease-loss counter and the
//! leases-held gauge.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatstate::{Claim, Options, RunnerId, WorkerId};
use chatstate_worker::Runtime;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::{CompositeKey, MetricKind};
use tokio::sync::{Notify, mpsc};
use tokio::time::timeout;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use crate::backend::Backend;
use crate::handlers::{Gate, Gated};

const WAIT: Duration = Duration::from_secs(20);

/// A span or an event: its name (events: their message), the span it is
/// in, its fields.
#[derive(Clone, Debug)]
struct Seen {
    level: Level,
    name: String,
    parent: Option<&'static str>,
    fields: BTreeMap<&'static str, String>,
}

/// Keeps spans (with their fields as last recorded) and events.
#[derive(Clone, Default)]
struct Capture {
    spans: Arc<Mutex<Vec<Seen>>>,
    events: Arc<Mutex<Vec<Seen>>>,
}

struct Index(usize);

struct Fields<'a>(&'a mut BTreeMap<&'static str, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name(), format!("{value:?}"));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let span = ctx.span(id).expect("registered");
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push(Seen {
            level: *attrs.metadata().level(),
            name: attrs.metadata().name().to_owned(),
            parent: span.parent().map(|p| p.name()),
            fields,
        });
        span.extensions_mut().insert(Index(spans.len() - 1));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).expect("registered");
        let index = span.extensions().get::<Index>().expect("indexed").0;
        values.record(&mut Fields(&mut self.spans.lock().unwrap()[index].fields));
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        self.events.lock().unwrap().push(Seen {
            level: *event.metadata().level(),
            name: fields.get("message").cloned().unwrap_or_default(),
            parent: ctx.event_span(event).map(|s| s.name()),
            fields,
        });
    }
}

impl Capture {
    fn named(&self, name: &str) -> Vec<Seen> {
        let spans = self.spans.lock().unwrap();
        spans.iter().filter(|s| s.name == name).cloned().collect()
    }
}

fn metric<'a>(
    snapshot: &'a [(CompositeKey, DebugValue)],
    kind: MetricKind,
    name: &str,
    labels: &[(&str, &str)],
) -> &'a DebugValue {
    let found: Vec<_> = snapshot
        .iter()
        .filter(|(k, _)| {
            let have: Vec<(&str, &str)> = k.key().labels().map(|l| (l.key(), l.value())).collect();
            k.kind() == kind && k.key().name() == name && have == labels
        })
        .collect();
    match found.as_slice() {
        [(_, v)] => v,
        other => panic!("{name} {labels:?}: {} found in {snapshot:#?}", other.len()),
    }
}

/// A claim won, a lease lost to a takeover (the handler's fenced commit
/// is refused), the handler finishing, and the runtime shut down.
async fn runtime_spans_and_metrics<B: Backend>() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Thread-local: the test runs on a current-thread runtime, where the
    // runtime's tasks run too.
    let _recorder = metrics::set_default_local_recorder(&recorder);
    let capture = Capture::default();
    let _tracing =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    // See chatstate_testing::capture.
    chatstate_testing::capture::heal_callsites();
    let snapshot = || -> Vec<(CompositeKey, DebugValue)> {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(k, _, _, v)| (k, v))
            .collect()
    };

    let b = B::new().await;
    let chat = b.create("question").await;
    let (events, mut rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Notify::new());
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
    let Gate::Generated { chat: got, .. } = timeout(WAIT, rx.recv()).await.unwrap().unwrap() else {
        panic!("expected the history read first");
    };
    assert_eq!(got, chat);
    let now = snapshot();
    let held = "chatstate_worker_leases_held";
    assert!(
        matches!(metric(&now, MetricKind::Gauge, held, &[]), DebugValue::Gauge(g) if g.0 == 1.0)
    );
    let claims = "chatstate_worker_claims_total";
    let won = metric(&now, MetricKind::Counter, claims, &[("outcome", "won")]);
    assert!(matches!(won, DebugValue::Counter(1)), "{won:?}");

    // Another worker takes the chat; the handler's commits are refused.
    b.age_leases(Options::default().heartbeat_stale).await;
    let claim = b
        .machine(chat, Options::default())
        .try_acquire(WorkerId::new_random(), RunnerId::new_random())
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Won { .. }), "{claim:?}");
    gate.notify_one();
    for _ in 0..2 {
        let Gate::Committed { result, .. } = timeout(WAIT, rx.recv()).await.unwrap().unwrap()
        else {
            panic!("expected a commit");
        };
        assert!(result.is_err());
    }
    let worker_id = runtime.worker_id();
    let stats = runtime.shutdown().await;
    assert_eq!(stats.leases_lost, 1, "{stats:?}");

    let now = snapshot();
    // A snapshot drains what it reads: this one holds the moves since the
    // last, the lease's end taking the gauge from 1 back to 0.
    let gauge = metric(&now, MetricKind::Gauge, held, &[]);
    assert!(
        matches!(gauge, DebugValue::Gauge(g) if g.0 == -1.0),
        "{gauge:?}"
    );
    let lost = metric(
        &now,
        MetricKind::Counter,
        "chatstate_worker_leases_lost_total",
        &[],
    );
    assert!(matches!(lost, DebugValue::Counter(1)), "{lost:?}");

    let worker = capture.named("worker");
    assert_eq!(worker.len(), 1);
    assert_eq!(worker[0].fields["worker_id"], worker_id.to_string());
    let claimed = capture.named("claim");
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(claimed[0].parent, Some("worker"));
    assert_eq!(claimed[0].fields["chat_id"], chat.to_string());
    assert_eq!(claimed[0].fields["outcome"], "won");
    let leases = capture.named("lease");
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].parent, Some("worker"));
    assert_eq!(leases[0].fields["released"], "finished");
    // The claim's own Update, inside the claim span.
    let updates = capture.named("update");
    let in_claim: Vec<_> = updates
        .iter()
        .filter(|u| u.parent == Some("claim"))
        .collect();
    assert_eq!(in_claim.len(), 1);
    assert_eq!(in_claim[0].fields["transitions"], "Acquire");
    assert_eq!(in_claim[0].fields["outcome"], "ok");
    // The handler's refused commits, inside the lease span.
    let refused = updates
        .iter()
        .filter(|u| u.parent == Some("lease") && u.fields["outcome"] == "rejected:LeaseLost")
        .count();
    assert_eq!(refused, 2);
    let sweeps = capture.named("sweep");
    assert!(!sweeps.is_empty());
    assert!(sweeps.iter().all(|s| s.level == Level::DEBUG));

    let warnings: Vec<Seen> = capture
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.level == Level::WARN)
        .cloned()
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let w = &warnings[0];
    assert_eq!(w.name, "lease lost");
    assert_eq!(w.parent, Some("lease"));
    assert_eq!(w.fields["chat_id"], chat.to_string());
    assert_eq!(
        w.fields["cause"],
        "a fenced update was rejected with LeaseLost"
    );
}

#[tokio::test]
async fn runtime_spans_and_metrics_mem() {
    runtime_spans_and_metrics::<crate::backend::Mem>().await;
}

#[tokio::test]
async fn runtime_spans_and_metrics_pg() {
    runtime_spans_and_metrics::<crate::backend::Pg>().await;
}

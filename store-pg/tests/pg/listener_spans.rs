//! What the listener tells tracing: a span per connection and per
//! reconnect, and a warning when the connection is lost and when it is
//! back (notifications committed in between are lost).

use std::sync::{Arc, Mutex};

use chatstate_store_pg::{LISTENER_APPLICATION_NAME, ListenerEvent, PgNotifyListener};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};

use crate::common::{Step, fx, next};

/// Span names, and events as (level, message, fields).
#[derive(Clone, Default)]
struct Capture {
    spans: Arc<Mutex<Vec<(&'static str, String)>>>,
    events: Arc<Mutex<Vec<(Level, String, String)>>>,
}

/// `name=value` pairs, the message apart.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.rest.push_str(&format!("{}={value:?} ", field.name()));
        }
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let span = (attrs.metadata().name(), fields.rest);
        self.spans.lock().unwrap().push(span);
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != "chatstate_store_pg" {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let seen = (*event.metadata().level(), fields.message, fields.rest);
        self.events.lock().unwrap().push(seen);
    }
}

/// Sends this thread's spans and events to `capture` (see
/// `chatstate_testing::capture` for why the callsites are healed).
fn capture_here(capture: &Capture) -> tracing::subscriber::DefaultGuard {
    let guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    chatstate_testing::capture::heal_callsites();
    guard
}

#[tokio::test]
async fn a_killed_listener_warns_and_reconnects_in_a_span() {
    let capture = Capture::default();
    // Thread-local, and the current-thread runtime runs the reconnect
    // task on this thread too.
    let _default = capture_here(&capture);
    let fx = fx().await;
    let chat = fx
        .reach(&[Step::Acquire], chatstate_model::ExecutionState::R0)
        .await;
    let pool = fx.store.pool().clone();
    let mut listener = PgNotifyListener::connect(&pool).await.unwrap();
    listener.listen_chats([chat.id]).await.unwrap();

    let pid: i32 = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
          WHERE application_name = $1 AND datname = current_database()",
    )
    .bind(LISTENER_APPLICATION_NAME)
    .fetch_one(&pool)
    .await
    .unwrap();
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 10000)")
        .bind(pid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(killed);
    assert_eq!(next(&mut listener).await, ListenerEvent::Reconnected);

    let spans = capture.spans.lock().unwrap().clone();
    let names: Vec<&str> = spans
        .iter()
        .map(|(name, _)| *name)
        .filter(|n| n.starts_with("listener"))
        .collect();
    assert_eq!(names, ["listener_connect", "listener_reconnect"]);
    let reconnect = spans.iter().find(|(n, _)| *n == "listener_reconnect");
    assert_eq!(reconnect.unwrap().1, "channels=1 ");
    let events = capture.events.lock().unwrap().clone();
    let warnings: Vec<(Level, &str)> = events.iter().map(|(l, m, _)| (*l, m.as_str())).collect();
    assert_eq!(
        warnings,
        [
            (Level::WARN, "listener connection lost; reconnecting"),
            (
                Level::WARN,
                "listener reconnected; notifications committed meanwhile were lost"
            ),
        ]
    );
    assert_eq!(events[1].2, "channels=1 ");
}

//! A tracing layer that keeps every span (with its fields as last
//! recorded) and every event, for tests to assert on.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// A span as the layer saw it.
#[derive(Clone, Debug)]
pub(crate) struct SpanSeen {
    pub(crate) name: &'static str,
    pub(crate) target: String,
    /// Every field recorded, by name, in its `Debug` (strings: plain) form.
    pub(crate) fields: BTreeMap<&'static str, String>,
    /// The name of the parent span, if any.
    pub(crate) parent: Option<&'static str>,
}

impl SpanSeen {
    /// A field's value; panics, naming the span, if it was never recorded.
    pub(crate) fn field(&self, name: &str) -> &str {
        self.fields
            .get(name)
            .unwrap_or_else(|| panic!("span {} has no field {name}: {:?}", self.name, self.fields))
    }

    /// A field's value as a number.
    pub(crate) fn number(&self, name: &str) -> u64 {
        self.field(name)
            .parse()
            .unwrap_or_else(|e| panic!("{name} of {}: {e}", self.name))
    }
}

/// An event as the layer saw it.
#[derive(Clone, Debug)]
pub(crate) struct EventSeen {
    pub(crate) level: tracing::Level,
    pub(crate) target: String,
    pub(crate) fields: BTreeMap<&'static str, String>,
    /// The span it happened in, if any.
    pub(crate) span: Option<&'static str>,
}

#[derive(Default)]
struct Seen {
    spans: Vec<SpanSeen>,
    events: Vec<EventSeen>,
}

/// The layer and the view of what it kept (clones share it).
#[derive(Clone, Default)]
pub(crate) struct Capture(Arc<Mutex<Seen>>);

impl Capture {
    /// The spans seen so far, in creation order.
    pub(crate) fn spans(&self) -> Vec<SpanSeen> {
        self.0.lock().unwrap().spans.clone()
    }

    /// The spans named `name`, in creation order.
    pub(crate) fn named(&self, name: &str) -> Vec<SpanSeen> {
        self.spans()
            .into_iter()
            .filter(|s| s.name == name)
            .collect()
    }

    /// The events seen so far.
    pub(crate) fn events(&self) -> Vec<EventSeen> {
        self.0.lock().unwrap().events.clone()
    }

    /// A dispatcher that sends everything to this capture.
    pub(crate) fn dispatch(&self) -> tracing::Dispatch {
        use tracing_subscriber::layer::SubscriberExt;
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(self.clone()));
        // A callsite another test reached first on a thread without a
        // subscriber would stay disabled (see chatstate_testing::capture).
        chatstate_testing::capture::heal_callsites();
        dispatch
    }
}

/// Where a span's record lives in the capture.
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
        let span = ctx.span(id).expect("a new span is registered");
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut seen = self.0.lock().unwrap();
        seen.spans.push(SpanSeen {
            name: attrs.metadata().name(),
            target: attrs.metadata().target().to_owned(),
            fields,
            parent: span.parent().map(|p| p.name()),
        });
        span.extensions_mut().insert(Index(seen.spans.len() - 1));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).expect("a recorded span is registered");
        let index = span.extensions().get::<Index>().expect("indexed").0;
        let mut seen = self.0.lock().unwrap();
        values.record(&mut Fields(&mut seen.spans[index].fields));
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        let span = ctx.event_span(event).map(|s| s.name());
        self.0.lock().unwrap().events.push(EventSeen {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            fields,
            span,
        });
    }
}

//! Tracing spans, events and (with the `metrics` feature) metrics of the
//! machine: what an Update, a Lock, a ReadLock, a chat creation and a
//! heartbeat did and how long each phase took.
//!
//! Every span is created with empty fields, filled in as the operation
//! goes. Nothing is measured or formatted unless a subscriber wants the
//! span or the `metrics` feature is compiled in: without either, a call
//! costs a disabled span (one level check) and a few branches. The names
//! of spans, fields, events and metrics are a contract, listed in
//! `docs/observability.md`; the tests in `chatstate-tests` pin them.

use std::time::{Duration, Instant};

use chatstate_model::{Rejection, Snapshot, Transition};
use tracing::Span;

use crate::claim::Skipped;
use crate::error::{Error, StoreErrorKind};

/// A span of the machine (target `chatstate`) at `$level`, or
/// `Span::none()` when no subscriber enables that level.
///
/// The level check comes first on purpose: tracing's own macros, when no
/// subscriber was ever installed and its `log` compatibility is compiled
/// in (the Postgres store's database driver turns it on), hand every
/// disabled span's fields and every enter and exit to the `log` crate's
/// checks, a few hundred instructions per Update for nothing. A
/// `Span::none()` costs a branch.
macro_rules! op_span {
    ($level:ident, $($rest:tt)*) => {
        if tracing::level_enabled!(tracing::Level::$level) {
            tracing::span!(target: "chatstate", tracing::Level::$level, $($rest)*)
        } else {
            tracing::Span::none()
        }
    };
}
pub(crate) use op_span;

/// The labels of rejected outcomes, one per rejection kind (by
/// `RejectionKind::name`).
const REJECTED: [&str; 14] = [
    "rejected:TransitionNotAllowed",
    "rejected:InvalidState",
    "rejected:ChatNotFound",
    "rejected:QueuedMessageNotFound",
    "rejected:MessageNotFound",
    "rejected:EditedMessageNotUser",
    "rejected:MessageQueueFull",
    "rejected:ToolResultDuplicate",
    "rejected:ToolResultInvalidJson",
    "rejected:ToolResultMissing",
    "rejected:ToolResultUnexpected",
    "rejected:JsonTooDeep",
    "rejected:LeaseLost",
    "rejected:HistoryChanged",
];

impl StoreErrorKind {
    /// The kind's name (`Connection`, `OutcomeUnknown`, ...), as spans and
    /// metric labels show it after `store:`.
    pub fn name(self) -> &'static str {
        self.label().trim_start_matches("store:")
    }

    /// `store:<name>`, the outcome label of a failure of this kind.
    fn label(self) -> &'static str {
        match self {
            StoreErrorKind::Connection => "store:Connection",
            StoreErrorKind::OutcomeUnknown => "store:OutcomeUnknown",
            StoreErrorKind::Serialization => "store:Serialization",
            StoreErrorKind::Deadlock => "store:Deadlock",
            StoreErrorKind::Timeout => "store:Timeout",
            StoreErrorKind::ReadOnly => "store:ReadOnly",
            StoreErrorKind::Data => "store:Data",
            StoreErrorKind::Injected => "store:Injected",
            StoreErrorKind::Other => "store:Other",
        }
    }
}

/// `rejected:<kind>` of a rejection (a kind this table does not know yet
/// gets plain `rejected`).
fn rejected_label(rejection: &Rejection) -> &'static str {
    let name = rejection.kind.name();
    REJECTED
        .iter()
        .copied()
        .find(|label| label["rejected:".len()..] == *name)
        .unwrap_or("rejected")
}

/// The outcome label of an operation: `ok`, `rejected:<kind>` (a missing
/// chat is `rejected:ChatNotFound` however it was found missing),
/// `store:<kind>` (a store failure, or a transaction a store failure
/// poisoned), `callback` (the callback's own error), `skipped` (an
/// `update_or_skip` that skipped), `nested_failed`, `publish` (committed,
/// but publishing failed) or `invalid_options`.
pub(crate) fn outcome(result: Result<(), &Error>) -> &'static str {
    match result {
        Ok(()) => "ok",
        Err(Error::Rejected(r)) => rejected_label(r),
        Err(Error::ChatNotFound(_)) => "rejected:ChatNotFound",
        Err(Error::Store(e)) => e.kind.label(),
        Err(Error::Poisoned { kind, .. }) => kind.label(),
        Err(Error::Callback(e)) if e.is::<Skipped>() => "skipped",
        Err(Error::Callback(_)) => "callback",
        Err(Error::NestedUpdateFailed(_)) => "nested_failed",
        Err(Error::PublishAfterCommit { .. }) => "publish",
        Err(Error::InvalidOptions(_)) => "invalid_options",
    }
}

/// Whole microseconds of a phase, as span fields carry them.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What an Update, Lock, ReadLock or chat creation measures about itself
/// while it runs, for its span and its metrics.
#[derive(Debug)]
pub(crate) struct Probe {
    /// The operation's span (disabled when no subscriber wants it).
    pub(crate) span: Span,
    /// Whether the span is enabled: fields are worth recording.
    traced: bool,
    /// When the operation started; `None` when nothing is measured.
    start: Option<Instant>,
    /// When the last phase ended.
    last: Option<Instant>,
    /// Time spent writing plans (`StoreTx::apply`), summed.
    plan_write: Duration,
    /// Accepted transitions of every chat the Update changed, counted with
    /// the Update's outcome at its end.
    #[cfg(feature = "metrics")]
    accepted: Vec<Transition>,
}

impl Probe {
    /// Starts measuring, if anyone will look: a subscriber that wants
    /// `span`, or the metrics.
    pub(crate) fn start(span: Span) -> Self {
        let traced = !span.is_disabled();
        let start = (traced || cfg!(feature = "metrics")).then(Instant::now);
        Probe {
            span,
            traced,
            start,
            last: start,
            plan_write: Duration::ZERO,
            #[cfg(feature = "metrics")]
            accepted: Vec::new(),
        }
    }

    /// Whether accepted transitions are worth keeping.
    pub(crate) fn keeps_transitions(&self) -> bool {
        self.start.is_some()
    }

    /// Ends a phase: records its time in `field` and returns it.
    pub(crate) fn lap(&mut self, field: &'static str) -> Option<Duration> {
        let last = self.last?;
        let now = Instant::now();
        self.last = Some(now);
        let took = now - last;
        if self.traced {
            self.span.record(field, micros(took));
        }
        Some(took)
    }

    /// The chat was locked: records where it started, and the lock wait.
    pub(crate) fn locked(&mut self, operation: &'static str, snap: &Snapshot) {
        let waited = self.lap("lock_wait_us");
        if self.traced {
            self.span.record("from", snap.state().as_str());
            self.span
                .record("snapshot_version", snap.row.versions.snapshot);
        }
        #[cfg(feature = "metrics")]
        if let Some(waited) = waited {
            metrics::histogram!("chatstate_lock_wait_seconds", "operation" => operation)
                .record(waited);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (operation, waited);
    }

    /// Times one plan write.
    pub(crate) fn clock(&self) -> Option<Instant> {
        self.start.map(|_| Instant::now())
    }

    /// Adds the time since `since` (from [`Probe::clock`]) to the plan
    /// writes.
    pub(crate) fn wrote_plan(&mut self, since: Option<Instant>) {
        if let Some(since) = since {
            self.plan_write += since.elapsed();
        }
    }

    /// The callback ended: its time, the plan writes within it, and where
    /// the chat is left.
    pub(crate) fn called_back(&mut self, applied: Option<&[Transition]>, end: &Snapshot) {
        self.lap("callback_us");
        if self.traced {
            self.span.record("plan_write_us", micros(self.plan_write));
            self.span.record("to", end.state().as_str());
            if let Some(applied) = applied {
                self.span.record("transitions", compact(applied));
            }
        }
    }

    /// Keeps the accepted transitions of a chat of this Update (the
    /// handle's or a nested one's) for the transition counters.
    pub(crate) fn accepted(&mut self, applied: Option<Vec<Transition>>) {
        #[cfg(feature = "metrics")]
        self.accepted.extend(applied.into_iter().flatten());
        #[cfg(not(feature = "metrics"))]
        let _ = applied;
    }

    /// The operation ended: its outcome, and, for an Update, the metrics.
    pub(crate) fn end(&self, result: Result<(), &Error>) -> &'static str {
        let outcome = outcome(result);
        if self.traced {
            self.span.record("outcome", outcome);
        }
        if let Err(e) = result
            && e.commit_state() == crate::CommitState::Unknown
        {
            tracing::error!(target: "chatstate", parent: &self.span, error = %e,
                "commit outcome unknown: reload the chat before retrying");
        }
        outcome
    }

    /// Ends an Update: its outcome, then the Update and transition
    /// counters and the duration histogram.
    pub(crate) fn end_update(&self, result: Result<(), &Error>) {
        let outcome = self.end(result);
        #[cfg(feature = "metrics")]
        {
            metrics::counter!("chatstate_updates_total", "outcome" => outcome).increment(1);
            if let Some(start) = self.start {
                metrics::histogram!("chatstate_update_duration_seconds").record(start.elapsed());
            }
            let settled = settled(outcome);
            for t in &self.accepted {
                metrics::counter!(
                    "chatstate_transitions_total",
                    "transition" => t.as_str(),
                    "outcome" => settled,
                )
                .increment(1);
            }
        }
        #[cfg(not(feature = "metrics"))]
        let _ = outcome;
    }
}

/// What became of a transition the model accepted, by its Update's
/// outcome: committed (`ok`, or `publish`: committed, publication failed),
/// lost to a store failure (`store:<kind>`, `OutcomeUnknown` included), or
/// rolled back with the Update for any other reason.
#[cfg(feature = "metrics")]
fn settled(update_outcome: &'static str) -> &'static str {
    match update_outcome {
        "ok" | "publish" => "ok",
        s if s.starts_with("store:") => s,
        _ => "rolled_back",
    }
}

/// The transitions as one short string: `Acquire,CommitStep`.
fn compact(applied: &[Transition]) -> String {
    let mut out = String::new();
    for (i, t) in applied.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(t.as_str());
    }
    out
}

/// A transition was rejected: a debug event, and its counter.
pub(crate) fn rejected(rejection: &Rejection) {
    tracing::debug!(
        target: "chatstate",
        transition = rejection.transition.as_str(),
        from = rejection.from.as_str(),
        kind = rejection.kind.name(),
        reason = rejection.kind.reason(),
        "transition rejected"
    );
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "chatstate_transitions_total",
        "transition" => rejection.transition.as_str(),
        "outcome" => rejected_label(rejection),
    )
    .increment(1);
}

/// A transition's own store work failed (reading what it needs, or
/// writing its plan): its counter.
pub(crate) fn store_failed(transition: Transition, kind: StoreErrorKind) {
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "chatstate_transitions_total",
        "transition" => transition.as_str(),
        "outcome" => kind.label(),
    )
    .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (transition, kind);
}

/// Records a nested Update's fields in its span.
pub(crate) fn nested_ended(span: &Span, applied: Option<&[Transition]>, end: &Snapshot) {
    if span.is_disabled() {
        return;
    }
    span.record("to", end.state().as_str());
    if let Some(applied) = applied {
        span.record("transitions", compact(applied));
    }
}

#[cfg(test)]
mod tests {
    use chatstate_model::{ExecutionState, RejectionKind, Transition};

    use super::*;

    fn rejection(kind: RejectionKind) -> Error {
        Error::Rejected(Rejection {
            transition: Transition::SetArchived,
            from: ExecutionState::R0,
            kind,
        })
    }

    /// Every label the outcome function gives, by error.
    #[test]
    fn outcome_labels() {
        let cases: Vec<(Result<(), Error>, &str)> = vec![
            (Ok(()), "ok"),
            (
                Err(rejection(RejectionKind::TransitionNotAllowed {
                    reason: None,
                })),
                "rejected:TransitionNotAllowed",
            ),
            (
                Err(rejection(RejectionKind::HistoryChanged {
                    expected: 1,
                    actual: 2,
                })),
                "rejected:HistoryChanged",
            ),
            (
                Err(Error::ChatNotFound(chatstate_model::ChatId(
                    uuid::Uuid::nil(),
                ))),
                "rejected:ChatNotFound",
            ),
            (
                Err(Error::Store(crate::StoreError::injected("x"))),
                "store:Injected",
            ),
            (
                Err(Error::Poisoned {
                    context: "x",
                    kind: StoreErrorKind::Deadlock,
                }),
                "store:Deadlock",
            ),
            (Err(Error::callback(Skipped)), "skipped"),
            (Err(Error::callback("mine")), "callback"),
        ];
        for (result, label) in cases {
            assert_eq!(outcome(result.as_ref().map(|_| ())), label, "{result:?}");
        }
    }

    /// Every rejection kind has a label of its own, and every store kind
    /// its name.
    #[test]
    fn every_kind_is_labelled() {
        use chatstate_model::{MessageId, QueuedMessageId, RunnerId};
        let call = || "call".to_owned();
        let kinds = [
            RejectionKind::TransitionNotAllowed { reason: None },
            RejectionKind::InvalidState,
            RejectionKind::ChatNotFound,
            RejectionKind::QueuedMessageNotFound {
                id: QueuedMessageId(1),
            },
            RejectionKind::MessageNotFound { id: MessageId(1) },
            RejectionKind::EditedMessageNotUser { id: MessageId(1) },
            RejectionKind::MessageQueueFull { max: 1 },
            RejectionKind::ToolResultDuplicate {
                tool_call_id: call(),
            },
            RejectionKind::ToolResultInvalidJson {
                tool_call_id: call(),
            },
            RejectionKind::ToolResultMissing {
                tool_call_id: call(),
            },
            RejectionKind::ToolResultUnexpected {
                tool_call_id: call(),
            },
            RejectionKind::JsonTooDeep { depth: 2, max: 1 },
            RejectionKind::LeaseLost {
                expected: RunnerId(uuid::Uuid::nil()),
                actual: None,
            },
            RejectionKind::HistoryChanged {
                expected: 1,
                actual: 2,
            },
        ];
        let labels: Vec<&str> = kinds
            .into_iter()
            .map(|kind| outcome(Err(&rejection(kind))))
            .collect();
        assert_eq!(labels, REJECTED);
        assert_eq!(StoreErrorKind::OutcomeUnknown.name(), "OutcomeUnknown");
        assert_eq!(StoreErrorKind::Connection.label(), "store:Connection");
    }

    #[test]
    fn transitions_are_compact() {
        assert_eq!(compact(&[]), "");
        assert_eq!(
            compact(&[Transition::Acquire, Transition::CommitStep]),
            "Acquire,CommitStep"
        );
    }
}

//! Execution states, chat statuses and the classifier.
//!
//! A chat's execution state is derived, never stored: it is a pure function of
//! whether the row exists, its `status`, its `archived` flag and whether its
//! queue holds at least one message. This module owns that function and the
//! canonical enumeration of states.

use std::fmt;

/// The classified execution state of one chat.
///
/// The variants are listed in canonical order (see [`ExecutionState::ALL`]);
/// tests, generated docs and error messages rely on that order and on the
/// exact spelling of [`ExecutionState::as_str`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum ExecutionState {
    /// The chat row does not exist.
    N,
    /// Idle: waiting, not archived, queue empty.
    W,
    /// Stopped by an error, queue empty.
    E0,
    /// Stopped by an error, with queued messages.
    E1,
    /// A worker should be generating, queue empty.
    R0,
    /// Generating, with a queued message next.
    R1,
    /// The user interrupted; the worker must finalise, queue empty.
    I0,
    /// Interrupted; after finalising, the queue head is promoted.
    I1,
    /// Waiting for client-side (dynamic) tool results, queue empty.
    A0,
    /// Waiting for client-side tool results, with queued messages.
    A1,
    /// Archived while waiting.
    XW,
    /// Archived while in error, queue empty.
    XE0,
    /// Archived while in error, with queued messages.
    XE1,
    /// Any stored combination outside the model; only reconciliation applies.
    Invalid,
}

impl ExecutionState {
    /// Every state, in canonical order.
    pub const ALL: [ExecutionState; 14] = [
        Self::N,
        Self::W,
        Self::E0,
        Self::E1,
        Self::R0,
        Self::R1,
        Self::I0,
        Self::I1,
        Self::A0,
        Self::A1,
        Self::XW,
        Self::XE0,
        Self::XE1,
        Self::Invalid,
    ];

    /// The state's name as it appears in errors, traces and docs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::N => "N",
            Self::W => "W",
            Self::E0 => "E0",
            Self::E1 => "E1",
            Self::R0 => "R0",
            Self::R1 => "R1",
            Self::I0 => "I0",
            Self::I1 => "I1",
            Self::A0 => "A0",
            Self::A1 => "A1",
            Self::XW => "XW",
            Self::XE0 => "XE0",
            Self::XE1 => "XE1",
            Self::Invalid => "Invalid",
        }
    }

    /// Parses a name produced by [`ExecutionState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// True for the states a worker must own: R0, R1, I0, I1, A0, A1.
    ///
    /// Requires-action states count because a worker enforces the deadline.
    /// Only runnable states can produce an ownership hint.
    pub const fn is_runnable(self) -> bool {
        matches!(
            self,
            Self::R0 | Self::R1 | Self::I0 | Self::I1 | Self::A0 | Self::A1
        )
    }

    /// True for XW, XE0 and XE1.
    pub const fn is_archived(self) -> bool {
        matches!(self, Self::XW | Self::XE0 | Self::XE1)
    }

    /// True for the states whose queue is non-empty: E1, R1, I1, A1, XE1.
    pub const fn queue_non_empty(self) -> bool {
        matches!(self, Self::E1 | Self::R1 | Self::I1 | Self::A1 | Self::XE1)
    }

    /// True for idle and error states: W, E0, E1 (nothing for a worker to do).
    pub const fn is_at_rest(self) -> bool {
        matches!(self, Self::W | Self::E0 | Self::E1)
    }

    /// Classifies an existing chat row.
    ///
    /// Exactly 12 of the (status, archived, queue) tuples over the five
    /// meaningful statuses are valid; everything else, including every
    /// unknown status, is [`ExecutionState::Invalid`].
    pub fn classify(status: &ChatStatus, archived: bool, queue_non_empty: bool) -> Self {
        use ChatStatus as S;
        match (status, archived, queue_non_empty) {
            (S::Waiting, false, false) => Self::W,
            (S::Waiting, true, false) => Self::XW,
            (S::Error, false, false) => Self::E0,
            (S::Error, false, true) => Self::E1,
            (S::Error, true, false) => Self::XE0,
            (S::Error, true, true) => Self::XE1,
            (S::Running, false, false) => Self::R0,
            (S::Running, false, true) => Self::R1,
            (S::Interrupting, false, false) => Self::I0,
            (S::Interrupting, false, true) => Self::I1,
            (S::RequiresAction, false, false) => Self::A0,
            (S::RequiresAction, false, true) => Self::A1,
            _ => Self::Invalid,
        }
    }

    /// Classifies a possibly missing row: `None` is [`ExecutionState::N`].
    pub fn classify_row(row: Option<(&ChatStatus, bool, bool)>) -> Self {
        match row {
            None => Self::N,
            Some((status, archived, queue)) => Self::classify(status, archived, queue),
        }
    }
}

impl fmt::Display for ExecutionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `status` column of a chat row.
///
/// Only the first five variants are meaningful to the model. A row may still
/// hold a legacy or unknown value (for example `paused`); it is kept verbatim
/// in [`ChatStatus::Other`] and classifies as [`ExecutionState::Invalid`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChatStatus {
    /// `waiting`
    Waiting,
    /// `running`
    Running,
    /// `interrupting`
    Interrupting,
    /// `requires_action`
    RequiresAction,
    /// `error`
    Error,
    /// Any other stored value (legacy `pending`, `paused`, `completed`, ...).
    Other(String),
}

impl ChatStatus {
    /// The five statuses the model gives meaning to, in schema order.
    pub const KNOWN: [ChatStatus; 5] = [
        Self::Waiting,
        Self::Running,
        Self::Interrupting,
        Self::RequiresAction,
        Self::Error,
    ];

    /// The stored text of this status.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::Interrupting => "interrupting",
            Self::RequiresAction => "requires_action",
            Self::Error => "error",
            Self::Other(s) => s,
        }
    }

    /// The statuses in which a chat needs a worker, derived from the
    /// classifier: a stored (status, archived, queue) is runnable exactly
    /// when it is not archived and its status is one of these, whatever the
    /// queue (a test checks every tuple). So a store can find the chats that
    /// need a worker from the chat row alone, without reading the queue.
    pub fn runnable() -> Vec<ChatStatus> {
        Self::KNOWN
            .into_iter()
            .filter(|s| {
                [false, true]
                    .into_iter()
                    .any(|queue| ExecutionState::classify(s, false, queue).is_runnable())
            })
            .collect()
    }

    /// Maps stored text to a status; unknown text becomes [`ChatStatus::Other`].
    pub fn parse(s: &str) -> Self {
        Self::KNOWN
            .into_iter()
            .find(|k| k.as_str() == s)
            .unwrap_or_else(|| Self::Other(s.to_owned()))
    }
}

impl fmt::Display for ChatStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_twelve_valid_tuples() {
        let statuses = [
            ChatStatus::Waiting,
            ChatStatus::Running,
            ChatStatus::Interrupting,
            ChatStatus::RequiresAction,
            ChatStatus::Error,
            ChatStatus::Other("pending".into()),
        ];
        let mut valid = Vec::new();
        for s in &statuses {
            for archived in [false, true] {
                for queue in [false, true] {
                    let st = ExecutionState::classify(s, archived, queue);
                    if st != ExecutionState::Invalid {
                        valid.push(st);
                    }
                }
            }
        }
        assert_eq!(valid.len(), 12);
        let mut dedup = valid.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), 12, "each valid state has exactly one tuple");
        assert_eq!(ExecutionState::classify_row(None), ExecutionState::N);
    }

    #[test]
    fn runnable_and_queue_sets() {
        let runnable: Vec<_> = ExecutionState::ALL
            .into_iter()
            .filter(|s| s.is_runnable())
            .map(ExecutionState::as_str)
            .collect();
        assert_eq!(runnable, ["R0", "R1", "I0", "I1", "A0", "A1"]);
        let queued: Vec<_> = ExecutionState::ALL
            .into_iter()
            .filter(|s| s.queue_non_empty())
            .map(ExecutionState::as_str)
            .collect();
        assert_eq!(queued, ["E1", "R1", "I1", "A1", "XE1"]);
    }

    /// `ChatStatus::runnable` and "not archived" decide runnability from
    /// the row alone: for every stored tuple they agree with the classifier.
    #[test]
    fn runnable_statuses_match_the_classifier() {
        let runnable = ChatStatus::runnable();
        let statuses = ChatStatus::KNOWN
            .into_iter()
            .chain(["pending", "paused", "completed"].map(ChatStatus::parse));
        for s in statuses {
            for archived in [false, true] {
                for queue in [false, true] {
                    assert_eq!(
                        ExecutionState::classify(&s, archived, queue).is_runnable(),
                        !archived && runnable.contains(&s),
                        "{s} archived={archived} queue={queue}"
                    );
                }
            }
        }
        let names: Vec<_> = runnable.iter().map(ChatStatus::as_str).collect();
        assert_eq!(names, ["running", "interrupting", "requires_action"]);
    }

    #[test]
    fn names_round_trip() {
        for s in ExecutionState::ALL {
            assert_eq!(ExecutionState::parse(s.as_str()), Some(s));
        }
        for s in ChatStatus::KNOWN {
            assert_eq!(ChatStatus::parse(s.as_str()), s);
        }
        assert_eq!(
            ChatStatus::parse("paused"),
            ChatStatus::Other("paused".into())
        );
    }
}

//! Transitions and the transition matrix, as data.
//!
//! The matrix lists, for every allowed (transition, from-state) pair, the set
//! of states the transition may land in. It is the one table every other part
//! of the project reads: the step function gates on it, the machine asserts
//! landed states against it, the model checker proves every cell live and
//! sound, and `docs/state-model.md` is generated from it.

use std::fmt;

use crate::state::ExecutionState;

/// A named change of a chat's execution state.
///
/// The first eighteen variants are the execution transitions (in canonical
/// order, see [`Transition::EXECUTION`]); [`Transition::Acquire`] and
/// [`Transition::Abandon`] change ownership only and are outside the matrix.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Transition {
    /// Create the chat row and its first history (N -> R0).
    CreateChat,
    /// Archive or unarchive an idle or error chat.
    SetArchived,
    /// Admit a user message: insert it, queue it, or queue it and interrupt.
    SendMessage,
    /// Replace an earlier user message and discard everything after it.
    EditMessage,
    /// Ask a worker for a manual compaction turn (W -> R0).
    RequestCompaction,
    /// Remove one queued message.
    DeleteQueuedMessage,
    /// Move a queued message to the head, or promote it into history.
    PromoteQueuedMessage,
    /// Stop generation, or close a requires-action wait.
    Interrupt,
    /// Store client results for the pending dynamic tool calls.
    CompleteRequiresAction,
    /// Count one more generation attempt under the current history.
    RecordGenerationAttempt,
    /// Store the client-visible retry payload.
    RecordRetryState,
    /// Append the messages a worker produced in one step.
    CommitStep,
    /// Wait for client-side tool results (with a deadline).
    EnterRequiresAction,
    /// Finalise an interruption; promote the queue head if there is one.
    FinishInterruption,
    /// End a turn; promote the queue head if there is one.
    FinishTurn,
    /// Stop with an error.
    FinishError,
    /// Cancel the pending dynamic tool calls (for example on timeout).
    CancelRequiresAction,
    /// Repair a row that classifies as Invalid (-> E0/E1).
    ReconcileInvalidState,
    /// Take ownership (worker and runner) and write a fresh heartbeat.
    Acquire,
    /// Give up ownership.
    Abandon,
}

impl Transition {
    /// The execution transitions, in canonical order (the matrix's columns):
    /// every transition but the two ownership ones, which come last.
    pub const EXECUTION: [Transition; 18] = {
        let mut out = [Self::CreateChat; 18];
        let mut i = 0;
        while i < 18 {
            out[i] = Self::ALL[i];
            i += 1;
        }
        out
    };

    /// The ownership transitions, allowed from every existing state.
    pub const OWNERSHIP: [Transition; 2] = [Self::Acquire, Self::Abandon];

    /// Every transition in canonical order: the execution transitions, then
    /// the ownership transitions.
    pub const ALL: [Transition; 20] = [
        Self::CreateChat,
        Self::SetArchived,
        Self::SendMessage,
        Self::EditMessage,
        Self::RequestCompaction,
        Self::DeleteQueuedMessage,
        Self::PromoteQueuedMessage,
        Self::Interrupt,
        Self::CompleteRequiresAction,
        Self::RecordGenerationAttempt,
        Self::RecordRetryState,
        Self::CommitStep,
        Self::EnterRequiresAction,
        Self::FinishInterruption,
        Self::FinishTurn,
        Self::FinishError,
        Self::CancelRequiresAction,
        Self::ReconcileInvalidState,
        Self::Acquire,
        Self::Abandon,
    ];

    /// The transition's name (PascalCase, as in the matrix and in traces).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::CreateChat => "CreateChat",
            Self::SetArchived => "SetArchived",
            Self::SendMessage => "SendMessage",
            Self::EditMessage => "EditMessage",
            Self::RequestCompaction => "RequestCompaction",
            Self::DeleteQueuedMessage => "DeleteQueuedMessage",
            Self::PromoteQueuedMessage => "PromoteQueuedMessage",
            Self::Interrupt => "Interrupt",
            Self::CompleteRequiresAction => "CompleteRequiresAction",
            Self::RecordGenerationAttempt => "RecordGenerationAttempt",
            Self::RecordRetryState => "RecordRetryState",
            Self::CommitStep => "CommitStep",
            Self::EnterRequiresAction => "EnterRequiresAction",
            Self::FinishInterruption => "FinishInterruption",
            Self::FinishTurn => "FinishTurn",
            Self::FinishError => "FinishError",
            Self::CancelRequiresAction => "CancelRequiresAction",
            Self::ReconcileInvalidState => "ReconcileInvalidState",
            Self::Acquire => "Acquire",
            Self::Abandon => "Abandon",
        }
    }

    /// Parses a name produced by [`Transition::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// True for Acquire and Abandon, which skip the matrix.
    pub const fn is_ownership(self) -> bool {
        matches!(self, Self::Acquire | Self::Abandon)
    }

    /// True for the transitions a worker applies to a chat it owns; these
    /// accept a runner fence (see the fenced API of the machine).
    pub const fn is_worker(self) -> bool {
        matches!(
            self,
            Self::RecordGenerationAttempt
                | Self::RecordRetryState
                | Self::CommitStep
                | Self::EnterRequiresAction
                | Self::FinishInterruption
                | Self::FinishTurn
                | Self::FinishError
                | Self::CancelRequiresAction
                | Self::Abandon
        )
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One matrix cell: a transition allowed from a state, and where it may land.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cell {
    /// The transition.
    pub transition: Transition,
    /// The state it is allowed from.
    pub from: ExecutionState,
    /// Every state it may land in, in canonical order.
    pub to: &'static [ExecutionState],
}

/// A (transition, from, to) triple of the matrix.
pub type Triple = (Transition, ExecutionState, ExecutionState);

use ExecutionState::{A0, A1, E0, E1, I0, I1, Invalid, N, R0, R1, W, XE0, XE1, XW};
use Transition::*;

const fn cell(transition: Transition, from: ExecutionState, to: &'static [ExecutionState]) -> Cell {
    Cell {
        transition,
        from,
        to,
    }
}

/// The transition matrix: 57 allowed (transition, from) pairs and 70 triples.
///
/// Rows are grouped by from-state in canonical order, and within a row by
/// transition in canonical order, so every query below returns canonical
/// order without sorting.
pub const MATRIX: &[Cell] = &[
    // N: only creation.
    cell(CreateChat, N, &[R0]),
    // W: idle.
    cell(SetArchived, W, &[XW]),
    cell(SendMessage, W, &[R0]),
    cell(EditMessage, W, &[R0]),
    cell(RequestCompaction, W, &[R0]),
    // E0: error, queue empty.
    cell(SetArchived, E0, &[XE0]),
    cell(SendMessage, E0, &[R0]),
    cell(EditMessage, E0, &[R0]),
    // E1: error with a queue.
    cell(SetArchived, E1, &[XE1]),
    cell(SendMessage, E1, &[R1]),
    cell(EditMessage, E1, &[R0]),
    cell(DeleteQueuedMessage, E1, &[E0, E1]),
    cell(PromoteQueuedMessage, E1, &[R0, R1]),
    // R0: running, queue empty.
    cell(SendMessage, R0, &[R1, I1]),
    cell(EditMessage, R0, &[R0]),
    cell(Interrupt, R0, &[I0]),
    cell(RecordGenerationAttempt, R0, &[R0]),
    cell(RecordRetryState, R0, &[R0]),
    cell(CommitStep, R0, &[R0]),
    cell(EnterRequiresAction, R0, &[A0]),
    cell(FinishTurn, R0, &[W]),
    cell(FinishError, R0, &[E0]),
    // R1: running with a queue.
    cell(SendMessage, R1, &[R1, I1]),
    cell(EditMessage, R1, &[R0]),
    cell(DeleteQueuedMessage, R1, &[R0, R1]),
    cell(PromoteQueuedMessage, R1, &[I1]),
    cell(Interrupt, R1, &[I1]),
    cell(RecordGenerationAttempt, R1, &[R1]),
    cell(RecordRetryState, R1, &[R1]),
    cell(CommitStep, R1, &[R1]),
    cell(EnterRequiresAction, R1, &[A1]),
    cell(FinishTurn, R1, &[R0, R1]),
    cell(FinishError, R1, &[E1]),
    // I0: interrupting, queue empty.
    cell(SendMessage, I0, &[I1]),
    cell(EditMessage, I0, &[R0]),
    cell(FinishInterruption, I0, &[W]),
    // I1: interrupting with a queue.
    cell(SendMessage, I1, &[I1]),
    cell(EditMessage, I1, &[R0]),
    cell(DeleteQueuedMessage, I1, &[I0, I1]),
    cell(PromoteQueuedMessage, I1, &[I1]),
    cell(FinishInterruption, I1, &[R0, R1]),
    // A0: requires action, queue empty.
    cell(SendMessage, A0, &[R1, A1]),
    cell(EditMessage, A0, &[R0]),
    cell(Interrupt, A0, &[R0]),
    cell(CompleteRequiresAction, A0, &[R0]),
    cell(CancelRequiresAction, A0, &[R0]),
    // A1: requires action with a queue.
    cell(SendMessage, A1, &[R1, A1]),
    cell(EditMessage, A1, &[R0]),
    cell(DeleteQueuedMessage, A1, &[A0, A1]),
    cell(PromoteQueuedMessage, A1, &[R0, R1]),
    cell(Interrupt, A1, &[R1]),
    cell(CompleteRequiresAction, A1, &[R1]),
    cell(CancelRequiresAction, A1, &[R1]),
    // Archived states: only unarchiving.
    cell(SetArchived, XW, &[W]),
    cell(SetArchived, XE0, &[E0]),
    cell(SetArchived, XE1, &[E1]),
    // Invalid: only reconciliation.
    cell(ReconcileInvalidState, Invalid, &[E0, E1]),
];

/// A view of a transition matrix. [`Matrix::REFERENCE`] is the one the
/// project runs on; tests build altered copies to show that the model
/// checker notices a wrong cell.
#[derive(Clone, Copy)]
pub struct Matrix {
    cells: &'static [Cell],
    /// The index in `cells` of each (transition, from) cell, [`NO_CELL`]
    /// where the pair is not allowed: the exhaustive checks look cells up
    /// about a hundred times per state, and a scan of the cells is slower.
    index: [[u8; ExecutionState::ALL.len()]; Transition::ALL.len()],
}

/// An entry of [`Matrix::index`] for a pair without a cell.
const NO_CELL: u8 = u8::MAX;

impl fmt::Debug for Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Matrix")
            .field("cells", &self.cells)
            .finish_non_exhaustive()
    }
}

impl Matrix {
    /// The reference matrix ([`MATRIX`]).
    pub const REFERENCE: Matrix = Matrix::from_cells(MATRIX);

    /// A matrix over other cells (for tests that mutate the matrix).
    ///
    /// # Panics
    ///
    /// If there are 255 cells or more (the reference matrix has 51); a
    /// pair listed twice keeps its first cell, as a scan would.
    pub const fn from_cells(cells: &'static [Cell]) -> Self {
        assert!(cells.len() < NO_CELL as usize, "too many matrix cells");
        let mut index = [[NO_CELL; ExecutionState::ALL.len()]; Transition::ALL.len()];
        let mut i = cells.len();
        // Backwards, so that the first of duplicate cells wins.
        while i > 0 {
            i -= 1;
            let c = &cells[i];
            index[c.transition as usize][c.from as usize] = i as u8;
        }
        Matrix { cells, index }
    }

    /// Every cell, grouped by from-state in canonical order.
    pub fn cells(&self) -> &'static [Cell] {
        self.cells
    }

    /// The cell of (transition, from), if the pair is allowed.
    pub fn cell(&self, transition: Transition, from: ExecutionState) -> Option<&'static Cell> {
        let cells = self.cells;
        match self.index[transition as usize][from as usize] {
            NO_CELL => None,
            i => Some(&cells[usize::from(i)]),
        }
    }

    /// True if the matrix allows `transition` from `from`.
    ///
    /// Acquire and Abandon are outside the matrix: this answers for them
    /// whether the chat exists.
    pub fn allows(&self, transition: Transition, from: ExecutionState) -> bool {
        if transition.is_ownership() {
            return from != ExecutionState::N;
        }
        self.cell(transition, from).is_some()
    }

    /// True if (transition, from, to) is a triple of the matrix. For
    /// ownership transitions the state must be unchanged.
    pub fn allows_landing(
        &self,
        transition: Transition,
        from: ExecutionState,
        to: ExecutionState,
    ) -> bool {
        if transition.is_ownership() {
            return from != ExecutionState::N && from == to;
        }
        self.cell(transition, from)
            .is_some_and(|c| c.to.contains(&to))
    }

    /// The transitions allowed from a state, in canonical order.
    pub fn transitions_from(&self, from: ExecutionState) -> Vec<Transition> {
        let mut out: Vec<Transition> = self
            .cells
            .iter()
            .filter(|c| c.from == from)
            .map(|c| c.transition)
            .collect();
        out.sort();
        out
    }

    /// The states a transition is allowed from, in canonical order.
    pub fn input_states(&self, transition: Transition) -> Vec<ExecutionState> {
        let mut out: Vec<ExecutionState> = self
            .cells
            .iter()
            .filter(|c| c.transition == transition)
            .map(|c| c.from)
            .collect();
        out.sort();
        out
    }

    /// The states a (transition, from) cell may land in, in canonical order;
    /// empty if the pair is not allowed.
    pub fn outputs(&self, transition: Transition, from: ExecutionState) -> Vec<ExecutionState> {
        self.cell(transition, from)
            .map(|c| c.to.to_vec())
            .unwrap_or_default()
    }

    /// Every (transition, from, to) triple, grouped by from-state.
    pub fn triples(&self) -> Vec<Triple> {
        self.cells
            .iter()
            .flat_map(|c| c.to.iter().map(move |&to| (c.transition, c.from, to)))
            .collect()
    }

    /// Every (execution transition, existing from-state) pair the matrix
    /// rejects, CreateChat excluded (it has no existing from-state).
    pub fn disallowed_pairs(&self) -> Vec<(Transition, ExecutionState)> {
        let mut out = Vec::new();
        for from in ExecutionState::ALL {
            if from == ExecutionState::N {
                continue;
            }
            for t in Transition::EXECUTION {
                if t != CreateChat && !self.allows(t, from) {
                    out.push((t, from));
                }
            }
        }
        out
    }
}

/// The transitions allowed from a state in the reference matrix.
pub fn allowed_transitions_from(from: ExecutionState) -> Vec<Transition> {
    Matrix::REFERENCE.transitions_from(from)
}

/// The states a transition is allowed from in the reference matrix.
pub fn allowed_input_states(transition: Transition) -> Vec<ExecutionState> {
    Matrix::REFERENCE.input_states(transition)
}

/// The outputs of a reference-matrix cell (empty when disallowed).
pub fn allowed_outputs(transition: Transition, from: ExecutionState) -> Vec<ExecutionState> {
    Matrix::REFERENCE.outputs(transition, from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        let m = Matrix::REFERENCE;
        assert_eq!(m.cells().len(), 57);
        assert_eq!(m.triples().len(), 70);
        // 13 existing states x 17 execution transitions (CreateChat excluded).
        assert_eq!(m.disallowed_pairs().len(), 13 * 17 - 56);
    }

    #[test]
    fn cells_are_canonical_and_unique() {
        let mut prev: Option<(ExecutionState, Transition)> = None;
        for c in MATRIX {
            let key = (c.from, c.transition);
            if let Some(p) = prev {
                assert!(p < key, "cell {key:?} out of order after {p:?}");
            }
            prev = Some(key);
            assert!(!c.to.is_empty());
            assert!(c.to.windows(2).all(|w| w[0] < w[1]), "outputs sorted");
            assert!(!c.transition.is_ownership());
        }
    }

    #[test]
    fn execution_is_all_but_ownership() {
        assert_eq!(&Transition::ALL[..18], &Transition::EXECUTION);
        assert_eq!(&Transition::ALL[18..], &Transition::OWNERSHIP);
        assert!(Transition::EXECUTION.iter().all(|t| !t.is_ownership()));
    }

    #[test]
    fn queries() {
        assert_eq!(
            allowed_transitions_from(ExecutionState::W),
            [SetArchived, SendMessage, EditMessage, RequestCompaction]
        );
        assert_eq!(allowed_input_states(DeleteQueuedMessage), [E1, R1, I1, A1]);
        assert_eq!(allowed_outputs(SendMessage, R0), [R1, I1]);
        assert!(allowed_outputs(FinishTurn, W).is_empty());
        assert!(Matrix::REFERENCE.allows(Acquire, Invalid));
        assert!(!Matrix::REFERENCE.allows(Acquire, N));
        for t in Transition::ALL {
            assert_eq!(Transition::parse(t.as_str()), Some(t));
        }
    }
}

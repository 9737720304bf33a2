//! Renderings of the transition matrix for people and tools: markdown
//! tables, a Mermaid state diagram, Graphviz dot, JSON, and the whole of
//! `docs/state-model.md`.
//!
//! Every function here is a pure function of a [`Matrix`] and the
//! classifier, so the generated docs cannot drift from the code: a test in
//! `model/tests/` fails when the committed `docs/state-model.md` differs from
//! [`state_model_doc`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::state::{ChatStatus, ExecutionState};
use crate::transition::{Matrix, Transition};

/// The command that regenerates `docs/state-model.md` (run from the
/// workspace root).
pub const DOC_COMMAND: &str =
    "cargo run -p chatstate-cli -- matrix --format doc > docs/state-model.md";

/// The (status, archived, queue non-empty) tuple a state classifies from;
/// `None` for N (no row) and Invalid (every other tuple).
pub fn state_tuple(state: ExecutionState) -> Option<(ChatStatus, bool, bool)> {
    if matches!(state, ExecutionState::N | ExecutionState::Invalid) {
        return None;
    }
    for status in ChatStatus::KNOWN {
        for archived in [false, true] {
            for queue in [false, true] {
                if ExecutionState::classify(&status, archived, queue) == state {
                    return Some((status, archived, queue));
                }
            }
        }
    }
    None
}

/// What a state means, in one sentence.
pub fn state_meaning(state: ExecutionState) -> &'static str {
    use ExecutionState as S;
    match state {
        S::N => "The chat row does not exist yet.",
        S::W => "Idle: nothing for a worker to do.",
        S::E0 => "Stopped by an error that needs the user.",
        S::E1 => "Stopped by an error; queued messages wait until the error is cleared.",
        S::R0 => "A worker should be generating.",
        S::R1 => "Generating; a queued message runs next.",
        S::I0 => "The user interrupted; the worker commits partial output and stops.",
        S::I1 => "Interrupted; once finalised, the queue head is promoted.",
        S::A0 => "Waiting, with a deadline, for the client's dynamic-tool results.",
        S::A1 => "Waiting for dynamic-tool results, with queued messages.",
        S::XW => "Archived while idle; unarchiving returns to W.",
        S::XE0 => "Archived while in error.",
        S::XE1 => "Archived while in error, with queued messages.",
        S::Invalid => {
            "Any other stored combination (legacy rows); only ReconcileInvalidState applies."
        }
    }
}

/// What a transition does, in one sentence.
pub fn transition_summary(transition: Transition) -> &'static str {
    use Transition as T;
    match transition {
        T::CreateChat => "Creates the row and its first history; the chat starts running.",
        T::SetArchived => "Archives or unarchives an idle or error chat.",
        T::SendMessage => {
            "Admits a user message: inserts it when idle, otherwise queues it \
             (and with `interrupt`, interrupts the turn)."
        }
        T::EditMessage => {
            "Replaces a user message, drops everything after it and the whole queue, \
             and starts a turn."
        }
        T::RequestCompaction => "Asks a worker for a manual compaction turn.",
        T::DeleteQueuedMessage => "Removes one queued message.",
        T::PromoteQueuedMessage => {
            "Runs a queued message next: interrupts a turn in progress, or promotes it \
             into history when the chat is stopped."
        }
        T::Interrupt => "Stops generation, or closes a requires-action wait.",
        T::CompleteRequiresAction => "Stores the client's results for the pending dynamic calls.",
        T::RecordGenerationAttempt => "Counts one more attempt under the current history.",
        T::RecordRetryState => "Stores the client-visible retry payload.",
        T::CommitStep => "Appends the messages a worker produced in one step.",
        T::EnterRequiresAction => "Waits for client-side tool results, with a deadline.",
        T::FinishInterruption => "Finalises an interruption; promotes the queue head if any.",
        T::FinishTurn => "Ends a turn; promotes the queue head if any.",
        T::FinishError => "Stops the chat with an error.",
        T::CancelRequiresAction => "Cancels the pending dynamic calls (for example on timeout).",
        T::ReconcileInvalidState => {
            "Repairs an Invalid row into an error state, keeping the queue."
        }
        T::Acquire => "Takes ownership and writes a fresh heartbeat (outside the matrix).",
        T::Abandon => "Gives up ownership (outside the matrix; needs an owner).",
    }
}

fn states_list(states: &[ExecutionState]) -> String {
    states
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// The one-line count of a matrix: allowed pairs and triples.
pub fn counts(matrix: &Matrix) -> String {
    format!(
        "{} allowed (transition, from-state) pairs, {} (transition, from, to) triples.",
        matrix.cells().len(),
        matrix.triples().len()
    )
}

/// The matrix as markdown: the counts, then one table per from-state
/// (transition -> the states it may land in), in canonical order.
pub fn markdown(matrix: &Matrix) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", counts(matrix));
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Acquire and Abandon are outside the matrix: they are allowed from every existing \
         state (Abandon needs an owner) and never change it."
    );
    for from in ExecutionState::ALL {
        let transitions = matrix.transitions_from(from);
        if transitions.is_empty() {
            continue;
        }
        let triples: usize = transitions
            .iter()
            .map(|&t| matrix.outputs(t, from).len())
            .sum();
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "### From {from} ({}, {})",
            plural(transitions.len(), "transition"),
            plural(triples, "triple")
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "| Transition | Lands in |");
        let _ = writeln!(out, "| --- | --- |");
        for t in transitions {
            let _ = writeln!(out, "| {t} | {} |", states_list(&matrix.outputs(t, from)));
        }
    }
    out
}

/// Edges of the state graph: (from, to) -> the transitions between them,
/// in canonical order of from-state, then to-state.
fn edges(matrix: &Matrix) -> BTreeMap<(ExecutionState, ExecutionState), Vec<Transition>> {
    let mut edges: BTreeMap<_, Vec<Transition>> = BTreeMap::new();
    for (t, from, to) in matrix.triples() {
        let labels = edges.entry((from, to)).or_default();
        if !labels.contains(&t) {
            labels.push(t);
        }
    }
    for labels in edges.values_mut() {
        labels.sort();
    }
    edges
}

fn labels(transitions: &[Transition]) -> String {
    transitions
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The matrix as a Mermaid state diagram: one arrow per (from, to) pair,
/// labelled with every transition that may take it; runnable states bold.
pub fn mermaid(matrix: &Matrix) -> String {
    let mut out = String::from("stateDiagram-v2\n");
    let _ = writeln!(out, "    [*] --> N");
    for ((from, to), transitions) in edges(matrix) {
        let _ = writeln!(out, "    {from} --> {to}: {}", labels(&transitions));
    }
    let runnable: Vec<_> = ExecutionState::ALL
        .into_iter()
        .filter(|s| s.is_runnable())
        .collect();
    let _ = writeln!(out, "    classDef runnable font-weight:bold");
    let _ = writeln!(
        out,
        "    class {} runnable",
        runnable
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    out
}

/// The matrix as a Graphviz digraph: one edge per (from, to) pair, runnable
/// states bold, archived states dashed, Invalid red.
pub fn dot(matrix: &Matrix) -> String {
    let mut out = String::from("digraph chatstate {\n    rankdir=LR;\n    node [shape=ellipse];\n");
    for s in ExecutionState::ALL {
        let style = if s.is_runnable() {
            " [style=bold]"
        } else if s.is_archived() {
            " [style=dashed]"
        } else if s == ExecutionState::Invalid {
            " [color=red]"
        } else if s == ExecutionState::N {
            " [shape=plaintext]"
        } else {
            ""
        };
        let _ = writeln!(out, "    \"{s}\"{style};");
    }
    for ((from, to), transitions) in edges(matrix) {
        let _ = writeln!(
            out,
            "    \"{from}\" -> \"{to}\" [label=\"{}\"];",
            labels(&transitions).replace(", ", "\\n")
        );
    }
    out.push_str("}\n");
    out
}

/// The matrix as JSON: `states` (with their status, archived flag, queue
/// and runnable flag), `transitions`, `pairs` (one per allowed pair, with
/// its outputs) and `triples`.
pub fn json_value(matrix: &Matrix) -> serde_json::Value {
    use serde_json::json;
    let states: Vec<_> = ExecutionState::ALL
        .into_iter()
        .map(|s| {
            let tuple = state_tuple(s);
            json!({
                "name": s.as_str(),
                "status": tuple.as_ref().map(|(status, _, _)| status.as_str().to_owned()),
                "archived": tuple.as_ref().map(|(_, archived, _)| *archived),
                "queue_non_empty": tuple.as_ref().map(|(_, _, queue)| *queue),
                "runnable": s.is_runnable(),
                "meaning": state_meaning(s),
            })
        })
        .collect();
    let transitions: Vec<_> = Transition::ALL
        .into_iter()
        .map(|t| {
            json!({
                "name": t.as_str(),
                "ownership": t.is_ownership(),
                "summary": transition_summary(t),
            })
        })
        .collect();
    let pairs: Vec<_> = matrix
        .cells()
        .iter()
        .map(|c| {
            json!({
                "transition": c.transition.as_str(),
                "from": c.from.as_str(),
                "to": c.to.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let triples: Vec<_> = matrix
        .triples()
        .into_iter()
        .map(|(t, from, to)| {
            json!({"transition": t.as_str(), "from": from.as_str(), "to": to.as_str()})
        })
        .collect();
    json!({
        "states": states,
        "transitions": transitions,
        "pairs": pairs,
        "triples": triples,
    })
}

/// [`json_value`] as pretty-printed text with a trailing newline.
pub fn json(matrix: &Matrix) -> String {
    let mut out =
        serde_json::to_string_pretty(&json_value(matrix)).expect("a JSON value always serializes");
    out.push('\n');
    out
}

/// The whole of `docs/state-model.md`: a generated-file header, the state
/// table, the runnable set, the transitions, the matrix tables and the
/// Mermaid diagram.
pub fn state_model_doc(matrix: &Matrix) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<!-- Generated from model/src/render.rs by `{DOC_COMMAND}`. Do not edit by hand: \
         the test model/tests/state_model_doc.rs fails when this file is stale. -->"
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "# Chat state model");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "A chat's execution state is never stored: it is classified from whether the row \
         exists, its `status`, its `archived` flag and whether its queue holds a message. \
         Every change is a transition, allowed only where the matrix below says so and \
         landing only in the states its cell lists. The same matrix gates the runtime, is \
         asserted after every transition, and is checked exhaustively against the semantics \
         by `chatstate check`."
    );

    let _ = writeln!(out);
    let _ = writeln!(out, "## States");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| State | Status | Archived | Queue | Runnable | Meaning |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- |");
    for s in ExecutionState::ALL {
        let (status, archived, queue) = match (s, state_tuple(s)) {
            (_, Some((status, archived, queue))) => (
                format!("`{status}`"),
                if archived { "yes" } else { "no" }.to_owned(),
                if queue { "non-empty" } else { "empty" }.to_owned(),
            ),
            (ExecutionState::N, None) => ("(no row)".into(), "".into(), "".into()),
            _ => ("any other combination".into(), "".into(), "".into()),
        };
        let _ = writeln!(
            out,
            "| {s} | {status} | {archived} | {queue} | {} | {} |",
            if s.is_runnable() { "yes" } else { "no" },
            state_meaning(s)
        );
    }
    let runnable: Vec<_> = ExecutionState::ALL
        .into_iter()
        .filter(|s| s.is_runnable())
        .collect();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Runnable states: {}. A worker must own a runnable chat (requires-action states \
         count, because the worker enforces the deadline); an Update that leaves a chat \
         runnable without a fresh lease publishes an ownership hint. Every status other \
         than the five above (for example a legacy `paused`) classifies as Invalid.",
        states_list(&runnable)
    );

    let _ = writeln!(out);
    let _ = writeln!(out, "## Transitions");
    let _ = writeln!(out);
    let _ = writeln!(out, "| Transition | Allowed from | What it does |");
    let _ = writeln!(out, "| --- | --- | --- |");
    for t in Transition::ALL {
        let from = if t.is_ownership() {
            "every existing state".to_owned()
        } else {
            states_list(&matrix.input_states(t))
        };
        let _ = writeln!(out, "| {t} | {from} | {} |", transition_summary(t));
    }

    let _ = writeln!(out);
    let _ = writeln!(out, "## Validation order");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "A transition is checked in this order, and the first failure is the rejection: \
         (1) the runner fence, for fenced worker calls (`LeaseLost`: a worker that lost its \
         lease learns that first, whatever the state); (2) the history expectation, for \
         calls that carry one (`HistoryChanged`: a step generated from an older history, \
         for example before an EditMessage, which keeps the owner, is refused whatever the \
         state); (3) Invalid (every transition but ReconcileInvalidState, Acquire and \
         Abandon); (4) the matrix; (5) the inputs. A rejection writes nothing."
    );

    let _ = writeln!(out);
    let _ = writeln!(out, "## Matrix");
    let _ = writeln!(out);
    out.push_str(&markdown(matrix));

    let _ = writeln!(out);
    let _ = writeln!(out, "## Diagram");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "One arrow per (from, to) pair, labelled with the transitions that may take it; \
         runnable states are bold."
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "```mermaid");
    out.push_str(&mermaid(matrix));
    let _ = writeln!(out, "```");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lists_every_pair_and_triple() {
        let v = json_value(&Matrix::REFERENCE);
        assert_eq!(v["pairs"].as_array().map(Vec::len), Some(57));
        assert_eq!(v["triples"].as_array().map(Vec::len), Some(70));
        assert_eq!(v["states"].as_array().map(Vec::len), Some(14));
        assert_eq!(v["transitions"].as_array().map(Vec::len), Some(20));
        assert_eq!(v["states"][4]["name"], "R0");
        assert_eq!(v["states"][4]["status"], "running");
        assert_eq!(v["states"][13]["status"], serde_json::Value::Null);
    }

    #[test]
    fn every_valid_state_has_its_tuple() {
        for s in ExecutionState::ALL {
            match state_tuple(s) {
                Some((status, archived, queue)) => {
                    assert_eq!(ExecutionState::classify(&status, archived, queue), s);
                }
                None => assert!(matches!(s, ExecutionState::N | ExecutionState::Invalid)),
            }
        }
    }

    #[test]
    fn diagrams_have_one_edge_per_state_pair() {
        let m = Matrix::REFERENCE;
        let pairs = edges(&m).len();
        assert_eq!(
            mermaid(&m).matches(" --> ").count(),
            pairs + 1,
            "plus [*] --> N"
        );
        assert_eq!(dot(&m).matches(" -> ").count(), pairs);
        assert!(
            mermaid(&m).contains("    W --> R0: SendMessage, EditMessage, RequestCompaction\n")
        );
    }

    #[test]
    fn markdown_has_a_table_per_from_state() {
        let md = markdown(&Matrix::REFERENCE);
        assert_eq!(md.matches("### From ").count(), 14);
        assert!(md.contains("| SendMessage | R1, I1 |"));
        assert!(md.starts_with("57 allowed (transition, from-state) pairs, 70 "));
    }
}

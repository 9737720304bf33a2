//! The exhaustive single-chat model check (feature `check`).
//!
//! Runs the checker to completion over the reference matrix, pins the number
//! of unique states and asserts every property; then shows, on test-only
//! copies of the matrix with one cell altered, that the checker catches a
//! wrong output and a dead one.

#![cfg(feature = "check")]

use chatstate_model::check::{CheckReport, single};
use chatstate_model::{Cell, ExecutionState, MATRIX, Matrix, Transition};

use ExecutionState::{E0, R0, R1, W};

/// Unique states of the full run over the reference matrix. When this
/// changes, the model, its inputs or the semantics changed: find out which
/// before updating the number. (It was 78,616 while each state also kept the
/// last matrix triple; the chats are the same 31,189.)
const UNIQUE_STATES: usize = 31_189;

/// Always-properties, matrix triples, reachable states, rejection kinds.
const PROPERTIES: usize = 10 + 70 + 13 + 11;

/// The failing properties, with their counterexamples, for assertion messages.
fn failures(report: &CheckReport) -> String {
    let mut out = String::new();
    for p in report.properties.iter().filter(|p| !p.holds) {
        out.push_str(&format!("FAIL {} {}\n", p.expectation, p.name));
        for line in p.path.iter().flatten() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

fn failing(report: &CheckReport) -> Vec<&str> {
    report
        .properties
        .iter()
        .filter(|p| !p.holds)
        .map(|p| p.name.as_str())
        .collect()
}

/// A copy of the reference matrix whose (transition, from) cell lists `to`.
fn altered(transition: Transition, from: ExecutionState, to: &'static [ExecutionState]) -> Matrix {
    let cells: Vec<Cell> = MATRIX
        .iter()
        .map(|c| {
            if (c.transition, c.from) == (transition, from) {
                Cell { to, ..*c }
            } else {
                *c
            }
        })
        .collect();
    assert_ne!(cells, MATRIX, "the cell exists");
    Matrix::from_cells(Box::leak(cells.into_boxed_slice()))
}

#[test]
fn reference_matrix_holds_every_property() {
    let report = single::run(2);
    assert!(report.ok(), "{}", failures(&report));
    assert_eq!(report.properties.len(), PROPERTIES);
    assert_eq!(report.unique_states, UNIQUE_STATES);
    assert!(report.max_depth > 1);
}

#[test]
fn a_flipped_output_is_caught() {
    // SendMessage from W lands in R0; this copy claims it lands in R1.
    let report = single::run_with_matrix(altered(Transition::SendMessage, W, &[R1]), 1);
    assert_eq!(
        failing(&report),
        [
            "landed state is in its matrix cell",
            "triple SendMessage W->R1"
        ],
        "{}",
        failures(&report)
    );
    let landing = report
        .property("landed state is in its matrix cell")
        .expect("the property is reported");
    let path = landing.path.as_ref().expect("a counterexample path");
    let text = path.join("\n");
    // A shortest counterexample, one readable line per step.
    assert_eq!(
        path[..4],
        [
            "start: N",
            "N --CreateChat(user message)--> R0",
            "R0 --FinishTurn--> W",
            "W --SendMessage(queue)--> R0",
        ],
        "{text}"
    );
    assert!(
        path[4].starts_with("end: R0 | history: user, user"),
        "{text}"
    );
    assert_eq!(
        path[5], "violation: SendMessage W->R0 is not in the matrix cell (SendMessage, W) -> [R1]",
        "{text}"
    );
    assert_eq!(path.len(), 6, "{text}");
}

#[test]
fn an_output_no_rule_produces_is_caught() {
    // FinishTurn from R0 always lands in W; this copy also lists E0.
    let report = single::run_with_matrix(altered(Transition::FinishTurn, R0, &[W, E0]), 1);
    assert_eq!(
        failing(&report),
        ["triple FinishTurn R0->E0"],
        "{}",
        failures(&report)
    );
    // Nothing else moved: the same states are reached as with the reference.
    assert_eq!(report.unique_states, UNIQUE_STATES);
}

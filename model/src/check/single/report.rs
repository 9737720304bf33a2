//! Running the checker and turning its discoveries into a [`CheckReport`],
//! with shortest counterexamples rendered one step per line.

use super::*;

/// Runs the exhaustive check of the reference matrix.
pub fn run(threads: usize) -> CheckReport {
    run_with_matrix(Matrix::REFERENCE, threads)
}

/// Runs the exhaustive check against `matrix` (tests pass altered copies to
/// show that a wrong cell is caught).
pub fn run_with_matrix(matrix: Matrix, threads: usize) -> CheckReport {
    let threads = threads.max(1);
    let started = Instant::now();
    let checker = SingleChat::new(matrix)
        .checker()
        .threads(threads)
        .spawn_dfs()
        .join();
    let seconds = started.elapsed().as_secs_f64();
    let model = checker.model();
    let mut discoveries = checker.discoveries();
    let mut properties: Vec<PropertyVerdict> = model
        .properties
        .iter()
        .map(|p| {
            let found = discoveries.remove(p.name);
            match p.expectation {
                stateright::Expectation::Sometimes => PropertyVerdict {
                    name: p.name.to_owned(),
                    expectation: Expectation::Sometimes,
                    holds: found.is_some(),
                    path: None,
                },
                ref e => PropertyVerdict {
                    name: p.name.to_owned(),
                    expectation: if *e == stateright::Expectation::Always {
                        Expectation::Always
                    } else {
                        Expectation::Eventually
                    },
                    holds: found.is_none(),
                    path: found.map(|path| {
                        // stateright keeps the last counterexample it met,
                        // often a long one: show a shortest one instead.
                        let steps = shortest_counterexample(model, p.condition)
                            .unwrap_or_else(|| path.into_vec());
                        render_path(p.name, &steps)
                    }),
                },
            }
        })
        .collect();
    // The triples come right after the always-properties, as they did
    // when each was a stateright property; the rejection kinds close.
    let always = properties
        .iter()
        .take_while(|p| p.expectation == Expectation::Always)
        .count();
    properties.splice(always..always, model.triple_coverage());
    properties.extend(model.rejection_coverage());
    CheckReport {
        model: "single-chat",
        unique_states: checker.unique_state_count(),
        max_depth: checker.max_depth(),
        seconds,
        threads,
        properties,
    }
}

/// A shortest path from an initial state to a state where `condition`
/// fails, by breadth-first search over the model (only run for a property
/// that failed, so the search usually stops early).
pub(super) fn shortest_counterexample(
    model: &SingleChat,
    condition: Condition,
) -> Option<Vec<(ChatState, Option<Action>)>> {
    let mut parents: HashMap<ChatState, Option<(ChatState, Action)>> = HashMap::new();
    let mut queue = VecDeque::new();
    for s in model.init_states() {
        if !parents.contains_key(&s) {
            parents.insert(s.clone(), None);
            queue.push_back(s);
        }
    }
    let mut offered = Vec::new();
    while let Some(state) = queue.pop_front() {
        if !condition(model, &state) {
            let mut steps = vec![(state.clone(), None)];
            let mut current = state;
            while let Some(Some((parent, action))) = parents.get(&current) {
                steps.push((parent.clone(), Some(*action)));
                current = parent.clone();
            }
            steps.reverse();
            return Some(steps);
        }
        model.actions(&state, &mut offered);
        for action in offered.drain(..) {
            if let Some(next) = model.next_state(&state, action)
                && !parents.contains_key(&next)
            {
                parents.insert(next.clone(), Some((state.clone(), action)));
                queue.push_back(next);
            }
        }
    }
    None
}

/// Renders a counterexample: its initial state, one line per step
/// ("R0 --SendMessage(queue)--> R1"), the final state in full and the
/// failed checks of `property`.
pub fn render_path(property: &str, steps: &[(ChatState, Option<Action>)]) -> Vec<String> {
    let mut lines = Vec::with_capacity(steps.len() + 2);
    if let Some((first, _)) = steps.first() {
        lines.push(format!("start: {first}"));
    }
    for pair in steps.windows(2) {
        if let [(from, Some(action)), (to, _)] = pair {
            lines.push(format!("{} --{action}--> {}", from.state(), to.state()));
        }
    }
    if let Some((last, _)) = steps.last() {
        lines.push(format!("end: {}", last.with_violations(Vec::new())));
        for v in &last.violations {
            if v.check.property_name() == property {
                lines.push(format!("violation: {}", v.detail));
            }
        }
    }
    lines
}

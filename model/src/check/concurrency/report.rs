//! Running the check: the exhaustive breadth-first run, the shortest
//! witness of every discovery, and the [`CheckReport`] built from them.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::Instant;

use stateright::{Checker, Model, Path, Property};

use super::super::{CheckReport, Expectation, PropertyVerdict};
use super::{Action, ConcurrencyModel, Config, State};

impl ConcurrencyModel {
    /// For each property, the shortest path (breadth first, in action
    /// order) to a state that discovers it: a state violating an `always`
    /// property, or satisfying a `sometimes` one. `None` where no reachable
    /// state does.
    pub fn shortest_witnesses(
        &self,
        targets: &[&Property<Self>],
    ) -> Vec<Option<Path<State, Action>>> {
        let discovers = |p: &Property<Self>, s: &State| match p.expectation {
            stateright::Expectation::Sometimes => (p.condition)(self, s),
            _ => !(p.condition)(self, s),
        };
        let fingerprint = |s: &State| {
            let mut h = DefaultHasher::new();
            s.hash(&mut h);
            h.finish()
        };
        let init = self.init_states();
        let mut found: Vec<Option<usize>> = vec![None; targets.len()];
        let mut remaining = targets.len();
        // (parent node, action from the parent) per visited state.
        let mut nodes: Vec<(usize, Option<Action>)> = Vec::new();
        let mut seen = HashSet::new();
        let mut queue = VecDeque::new();
        for s in &init {
            if seen.insert(fingerprint(s)) {
                nodes.push((usize::MAX, None));
                queue.push_back((s.clone(), nodes.len() - 1));
            }
        }
        let mut actions = Vec::new();
        while let Some((s, node)) = queue.pop_front() {
            if remaining == 0 {
                break;
            }
            for (i, p) in targets.iter().enumerate() {
                if found[i].is_none() && discovers(p, &s) {
                    found[i] = Some(node);
                    remaining -= 1;
                }
            }
            actions.clear();
            self.collect_actions(&s, &mut actions);
            for &action in &actions {
                if let Some(next) = self.step(&s, action)
                    && seen.insert(fingerprint(&next))
                {
                    nodes.push((node, Some(action)));
                    queue.push_back((next, nodes.len() - 1));
                }
            }
        }
        found
            .into_iter()
            .map(|node| {
                let mut node = node?;
                let mut steps = Vec::new();
                while let (parent, Some(action)) = nodes[node] {
                    steps.push(action);
                    node = parent;
                }
                steps.reverse();
                Some(
                    Path::from_actions(self, init[0].clone(), &steps)
                        .expect("a witness replays from the initial state"),
                )
            })
            .collect()
    }
}

/// Checks one variant exhaustively (breadth first) and reports every
/// property, with a readable path for each discovery.
pub fn run_variant(fenced: bool, threads: usize) -> CheckReport {
    check(Config::new(fenced), threads)
}

/// Checks `config` exhaustively (breadth first) on `threads` threads.
///
/// `seconds` is the exhaustive check alone. The paths are then recomputed
/// as shortest witnesses (see [`ConcurrencyModel::shortest_witnesses`]),
/// because stateright keeps the last state it saw for a discovery, which
/// is rarely the clearest one.
pub fn check(config: Config, threads: usize) -> CheckReport {
    let model = ConcurrencyModel::new(config);
    let properties = model.properties();
    let start = Instant::now();
    let checker = model.clone().checker().threads(threads).spawn_bfs().join();
    let seconds = start.elapsed().as_secs_f64();
    let discoveries = checker.discoveries();
    let discovered: Vec<&Property<ConcurrencyModel>> = properties
        .iter()
        .filter(|p| discoveries.contains_key(p.name))
        .collect();
    let witnesses: HashMap<&str, Path<State, Action>> = discovered
        .iter()
        .zip(model.shortest_witnesses(&discovered))
        .map(|(p, path)| {
            let path = path.unwrap_or_else(|| panic!("no witness for {:?}", p.name));
            (p.name, path)
        })
        .collect();
    let properties = properties
        .iter()
        .map(|p| {
            let found = witnesses.get(p.name);
            let (expectation, holds) = match p.expectation {
                stateright::Expectation::Always => (Expectation::Always, found.is_none()),
                stateright::Expectation::Eventually => (Expectation::Eventually, found.is_none()),
                stateright::Expectation::Sometimes => (Expectation::Sometimes, found.is_some()),
            };
            PropertyVerdict {
                name: p.name.to_owned(),
                expectation,
                holds,
                path: found.map(|path| model.render_path(path)),
            }
        })
        .collect();
    CheckReport {
        model: model.name(),
        unique_states: checker.unique_state_count(),
        max_depth: checker.max_depth(),
        seconds,
        threads,
        properties,
    }
}

/// The fenced model: every property must hold.
pub fn run(threads: usize) -> CheckReport {
    run_variant(true, threads)
}

/// The model with fencing off: [`names::STALE_COMMITS`](super::names::STALE_COMMITS) must be found (and
/// [`names::FENCE`](super::names::FENCE) fails with a counterexample).
pub fn run_unfenced(threads: usize) -> CheckReport {
    run_variant(false, threads)
}

//! The explicit state graph of the runtime model, and the checks run over
//! it: shortest witnesses for `always`/`sometimes` properties, and
//! leads-to properties under weak fairness by a pass over its strongly
//! connected components.
//!
//! Fairness: every step class of [`Action::fairness`] is weakly fair, and
//! the classes of [`Action::is_strong`] (the steps that wait for the row
//! lock) strongly fair.
//!
//! Why not stateright's `eventually`: it is checked per path as the search
//! goes and is unsound where paths merge (a state reached first by a path
//! that already met the condition is not explored again for a path that
//! did not). The sound way is on the whole graph: `P leads to G` fails
//! exactly when some reachable `P` state outside `G` can reach, without
//! entering `G`, a state where no fair step is enabled (a run may stay
//! there forever) or a *fair* cycle avoiding `G`.
//! Under weak fairness a strongly connected component `C` of the graph
//! restricted to `not G` holds a fair cycle iff it holds a cycle at all
//! and every fairness class either has a step inside `C` or is disabled
//! in some state of `C` (the cycle through every state and every edge of
//! `C` is then fair; no smaller cycle is fair when that one is not);
//! strong fairness needs the refinement of [`Graph::fair_cycle`].

use std::collections::{HashMap, HashSet, VecDeque};

use super::model::RuntimeModel;
use super::state::{Action, State};

/// A state predicate.
pub(super) type Pred = fn(&RuntimeModel, &State) -> bool;

/// The reachable graph: states in breadth-first order, each with the step
/// that discovered it and its outgoing steps.
pub(super) struct Graph {
    pub(super) states: Vec<State>,
    /// (parent, step from the parent); the initial state has none.
    pub(super) parent: Vec<Option<(u32, Action)>>,
    /// Outgoing edges of state `i`: `edges[offsets[i]..offsets[i + 1]]`.
    offsets: Vec<u32>,
    edges: Vec<(u32, Action)>,
    /// Breadth-first depth of each state.
    pub(super) depth: Vec<u16>,
}

impl Graph {
    /// Explores every state reachable from the model's initial state.
    pub(super) fn explore(model: &RuntimeModel) -> Graph {
        let init = model.init();
        let mut index: HashMap<State, u32> = HashMap::new();
        let mut g = Graph {
            states: vec![init.clone()],
            parent: vec![None],
            offsets: vec![0],
            edges: Vec::new(),
            depth: vec![0],
        };
        index.insert(init, 0);
        let mut actions = Vec::new();
        let mut i = 0;
        while i < g.states.len() {
            actions.clear();
            model.collect_actions(&g.states[i], &mut actions);
            for &action in &actions {
                let Some(next) = model.step(&g.states[i], action) else {
                    continue;
                };
                let target = match index.get(&next) {
                    Some(&t) => t,
                    None => {
                        let t = u32::try_from(g.states.len()).expect("fewer than 2^32 states");
                        index.insert(next.clone(), t);
                        g.states.push(next);
                        g.parent.push(Some((i as u32, action)));
                        g.depth.push(g.depth[i] + 1);
                        t
                    }
                };
                g.edges.push((target, action));
            }
            g.offsets
                .push(u32::try_from(g.edges.len()).expect("fewer than 2^32 edges"));
            i += 1;
        }
        g
    }

    /// The outgoing edges of state `i`.
    pub(super) fn out(&self, i: usize) -> &[(u32, Action)] {
        &self.edges[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    /// The steps from the initial state to `i`.
    pub(super) fn path_to(&self, i: usize) -> Vec<(usize, Action)> {
        let mut steps = Vec::new();
        let mut node = i;
        while let Some((p, action)) = self.parent[node] {
            steps.push((p as usize, action));
            node = p as usize;
        }
        steps.reverse();
        steps
    }

    /// The first state (in breadth-first order, so at the least depth)
    /// satisfying `pred`.
    pub(super) fn first(
        &self,
        model: &RuntimeModel,
        pred: impl Fn(&RuntimeModel, &State) -> bool,
    ) -> Option<usize> {
        self.states.iter().position(|s| pred(model, s))
    }

    /// Checks `p leads to g` under the model's fairness. On failure,
    /// returns a lasso: the steps from the initial state to a `p` state and
    /// on into a bad end, then the bad end: a fair cycle that avoids `g`
    /// forever, or nothing when the end is a state with no successor.
    pub(super) fn leads_to(&self, model: &RuntimeModel, p: Pred, g: Pred) -> Option<Lasso> {
        let n = self.states.len();
        let outside: Vec<bool> = self.states.iter().map(|s| !g(model, s)).collect();
        let sccs = self.sccs(&outside);
        // Tarjan emits components sinks first, so whether a component can
        // reach a bad end is known for every successor component.
        let mut comp = vec![u32::MAX; n];
        let mut reaches_bad = vec![false; sccs.len()];
        // Bad ends: states with no successor, and the members of fair
        // cycles (each fair set once, indexed by `bad_set`).
        let mut bad: HashMap<u32, usize> = HashMap::new();
        let mut bad_sets: Vec<Vec<u32>> = Vec::new();
        for (c, members) in sccs.iter().enumerate() {
            for &u in members {
                comp[u as usize] = c as u32;
            }
            let end = match members.iter().find(|&&u| self.stutters(u as usize)) {
                Some(&u) => Some(vec![u]),
                None => self.fair_cycle(members),
            };
            if let Some(set) = end {
                for &u in &set {
                    bad.insert(u, bad_sets.len());
                }
                bad_sets.push(set);
                reaches_bad[c] = true;
                continue;
            }
            reaches_bad[c] = members.iter().any(|&u| {
                self.out(u as usize).iter().any(|&(v, _)| {
                    outside[v as usize]
                        && comp[v as usize] != c as u32
                        && reaches_bad[comp[v as usize] as usize]
                })
            });
        }
        let start = (0..n)
            .find(|&i| outside[i] && p(model, &self.states[i]) && reaches_bad[comp[i] as usize])?;
        // From the p state, the shortest way (outside g) into a bad end.
        let entry = self.bfs(start, |v| outside[v], |v| bad.contains_key(&(v as u32)))?;
        let end = entry.last().map_or(start, |&(_, _, v)| v);
        let set: HashSet<u32> = bad_sets[bad[&(end as u32)]].iter().copied().collect();
        let cycle = if self.stutters(end) {
            Vec::new()
        } else {
            // One way round the fair set, from `end` back to `end`.
            let &(first, action) = self
                .out(end)
                .iter()
                .find(|&&(v, _)| set.contains(&v))
                .expect("a fair set is strongly connected");
            let mut cycle = vec![(end, action, first as usize)];
            if first as usize != end {
                let back = self
                    .bfs(first as usize, |v| set.contains(&(v as u32)), |v| v == end)
                    .expect("a fair set is strongly connected");
                cycle.extend(back);
            }
            cycle
        };
        let path = self.path_to(start);
        let mut prefix: Vec<(usize, Action, usize)> = path
            .iter()
            .enumerate()
            .map(|(k, &(from, a))| (from, a, path.get(k + 1).map_or(start, |&(to, _)| to)))
            .collect();
        prefix.extend(entry);
        Some(Lasso { prefix, cycle })
    }

    /// True if no fair step is enabled in state `i`: a run may stay there
    /// forever (nothing obliges the client to act, or a worker to crash).
    fn stutters(&self, i: usize) -> bool {
        self.out(i).iter().all(|(_, a)| a.fairness().is_none())
    }

    /// The states of a fair cycle inside the strongly connected `members`,
    /// if there is one.
    ///
    /// Weakly fair classes: the cycle through every state and edge of the
    /// component is fair iff each class is taken inside it or disabled
    /// somewhere in it, and when that cycle is not fair no smaller one is.
    /// Strongly fair classes (enabled infinitely often, then taken): a
    /// class enabled somewhere but never taken inside rules out every cycle
    /// through the states where it is enabled, so those states go and the
    /// rest is searched again, component by component (the Streett check).
    fn fair_cycle(&self, members: &[u32]) -> Option<Vec<u32>> {
        let set: HashSet<u32> = members.iter().copied().collect();
        let classes = Action::FAIRNESS_CLASSES;
        let mut taken = vec![false; classes];
        let mut enabled_somewhere = vec![false; classes];
        let mut disabled_somewhere = vec![false; classes];
        let mut cyclic = members.len() > 1;
        let mut enabled_at: Vec<Vec<bool>> = Vec::with_capacity(members.len());
        for &u in members {
            let mut enabled = vec![false; classes];
            for &(v, a) in self.out(u as usize) {
                cyclic |= v == u;
                let Some(k) = a.fairness() else { continue };
                enabled[k] = true;
                taken[k] |= set.contains(&v);
            }
            for k in 0..classes {
                enabled_somewhere[k] |= enabled[k];
                disabled_somewhere[k] |= !enabled[k];
            }
            enabled_at.push(enabled);
        }
        if !cyclic {
            return None;
        }
        let weak_ok = (0..classes)
            .filter(|&k| !Action::is_strong(k))
            .all(|k| taken[k] || disabled_somewhere[k]);
        if !weak_ok {
            return None;
        }
        let starved: Vec<usize> = (0..classes)
            .filter(|&k| Action::is_strong(k) && enabled_somewhere[k] && !taken[k])
            .collect();
        if starved.is_empty() {
            return Some(members.to_vec());
        }
        let rest: Vec<u32> = members
            .iter()
            .zip(&enabled_at)
            .filter(|(_, enabled)| starved.iter().all(|&k| !enabled[k]))
            .map(|(&u, _)| u)
            .collect();
        self.sccs_among(&rest)
            .iter()
            .find_map(|sub| self.fair_cycle(sub))
    }

    /// The strongly connected components of the subgraph induced by
    /// `nodes` (a small set: the recursion of [`Graph::fair_cycle`]).
    fn sccs_among(&self, nodes: &[u32]) -> Vec<Vec<u32>> {
        let inside: HashSet<u32> = nodes.iter().copied().collect();
        let mut index: HashMap<u32, (u32, u32)> = HashMap::new();
        let mut on_stack: HashSet<u32> = HashSet::new();
        let mut stack = Vec::new();
        let mut out = Vec::new();
        let mut next = 0u32;
        for &root in nodes {
            if index.contains_key(&root) {
                continue;
            }
            let mut call: Vec<(u32, usize)> = vec![(root, 0)];
            index.insert(root, (next, next));
            next += 1;
            stack.push(root);
            on_stack.insert(root);
            while let Some(&(u, e)) = call.last() {
                let edges = self.out(u as usize);
                if e < edges.len() {
                    call.last_mut().expect("not empty").1 += 1;
                    let v = edges[e].0;
                    if !inside.contains(&v) {
                        continue;
                    }
                    if let Some(&(vi, _)) = index.get(&v) {
                        if on_stack.contains(&v) {
                            let entry = index.get_mut(&u).expect("visited");
                            entry.1 = entry.1.min(vi);
                        }
                    } else {
                        index.insert(v, (next, next));
                        next += 1;
                        stack.push(v);
                        on_stack.insert(v);
                        call.push((v, 0));
                    }
                    continue;
                }
                call.pop();
                let (ui, ul) = index[&u];
                if let Some(&(parent, _)) = call.last() {
                    let entry = index.get_mut(&parent).expect("visited");
                    entry.1 = entry.1.min(ul);
                }
                if ul == ui {
                    let mut members = Vec::new();
                    loop {
                        let v = stack.pop().expect("the root is on the stack");
                        on_stack.remove(&v);
                        members.push(v);
                        if v == u {
                            break;
                        }
                    }
                    out.push(members);
                }
            }
        }
        out
    }

    /// Shortest path from `from` through states satisfying `within` to a
    /// state satisfying `to` (empty if `from` satisfies it).
    fn bfs(
        &self,
        from: usize,
        within: impl Fn(usize) -> bool,
        to: impl Fn(usize) -> bool,
    ) -> Option<Vec<(usize, Action, usize)>> {
        if to(from) {
            return Some(Vec::new());
        }
        let mut prev: HashMap<usize, (usize, Action)> = HashMap::new();
        let mut queue = VecDeque::from([from]);
        while let Some(u) = queue.pop_front() {
            for &(v, a) in self.out(u) {
                let v = v as usize;
                if v == from || prev.contains_key(&v) || !within(v) {
                    continue;
                }
                prev.insert(v, (u, a));
                if to(v) {
                    let mut steps = Vec::new();
                    let mut node = v;
                    while node != from {
                        let (p, a) = prev[&node];
                        steps.push((p, a, node));
                        node = p;
                    }
                    steps.reverse();
                    return Some(steps);
                }
                queue.push_back(v);
            }
        }
        None
    }

    /// Tarjan's strongly connected components of the subgraph of states
    /// with `inside`, iteratively, in the order Tarjan emits them (every
    /// component after all components it reaches).
    fn sccs(&self, inside: &[bool]) -> Vec<Vec<u32>> {
        const NONE: u32 = u32::MAX;
        let n = self.states.len();
        let mut index = vec![NONE; n];
        let mut low = vec![0u32; n];
        let mut on_stack = vec![false; n];
        let mut stack: Vec<u32> = Vec::new();
        let mut out = Vec::new();
        let mut next = 0u32;
        // (node, next edge offset to look at)
        let mut call: Vec<(u32, u32)> = Vec::new();
        for root in 0..n {
            if !inside[root] || index[root] != NONE {
                continue;
            }
            call.push((root as u32, self.offsets[root]));
            index[root] = next;
            low[root] = next;
            next += 1;
            stack.push(root as u32);
            on_stack[root] = true;
            while let Some(&mut (u, ref mut e)) = call.last_mut() {
                let u = u as usize;
                if *e < self.offsets[u + 1] {
                    let v = self.edges[*e as usize].0 as usize;
                    *e += 1;
                    if !inside[v] {
                        continue;
                    }
                    if index[v] == NONE {
                        index[v] = next;
                        low[v] = next;
                        next += 1;
                        stack.push(v as u32);
                        on_stack[v] = true;
                        call.push((v as u32, self.offsets[v]));
                    } else if on_stack[v] {
                        low[u] = low[u].min(index[v]);
                    }
                    continue;
                }
                call.pop();
                if let Some(&(parent, _)) = call.last() {
                    let parent = parent as usize;
                    low[parent] = low[parent].min(low[u]);
                }
                if low[u] == index[u] {
                    let mut members = Vec::new();
                    loop {
                        let v = stack.pop().expect("the component's root is on the stack");
                        on_stack[v as usize] = false;
                        members.push(v);
                        if v as usize == u {
                            break;
                        }
                    }
                    out.push(members);
                }
            }
        }
        out
    }
}

/// A counterexample to a leads-to property.
pub(super) struct Lasso {
    /// (from, step, to) from the initial state into the bad end.
    pub(super) prefix: Vec<(usize, Action, usize)>,
    /// (from, step, to) around a fair cycle that avoids the goal; empty
    /// when the prefix ends in a state where no fair step is enabled.
    pub(super) cycle: Vec<(usize, Action, usize)>,
}

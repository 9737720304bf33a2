//! Matrix coverage from model paths: for every matrix triple and every
//! disallowed (transition, from-state) pair, a shortest path from N found by
//! a breadth-first search over the model's [`World::step`] (that is,
//! `chatstate_model::update`) with a small input alphabet, replayed on a
//! store and compared with the model at every step.
//!
//! The set of probes is derived from [`Matrix::REFERENCE`], so a cell added
//! to the matrix without a path that reaches it fails [`probes`] (and the
//! test), instead of going silently untested.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use chatstate_model::{
    BusyBehavior, ChatId, ExecutionState, Matrix, RejectionKind, Role, ToolState, Transition,
    Triple, reasons,
};
use uuid::Uuid;

use chatstate::{Store, TestControl};

use crate::Backend;
use crate::sut::{Sut, exact_time};
use crate::world::{
    CallSpec, Expect, Json, Meta, Msg, MsgRef, Op, QRef, RawStatus, Results, Spec, Text, World,
};

/// How deep the search goes; the deepest cell (a queue of two during
/// requires-action) needs six steps.
pub const MAX_DEPTH: usize = 8;

/// What a probe drives a store to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// A matrix triple: the last operation lands there.
    Triple(Triple),
    /// A disallowed pair: the last operation is rejected there.
    Disallowed(Transition, ExecutionState),
}

/// A path from N and the operation that hits the target.
#[derive(Clone, Debug)]
pub struct Probe {
    /// The target.
    pub target: Target,
    /// Operations from N to the from-state.
    pub path: Vec<Op>,
    /// The operation applied there.
    pub op: Op,
}

fn update(spec: Spec) -> Op {
    Op::Update {
        slot: 0,
        calls: vec![CallSpec::from(spec)],
    }
}

fn user_text() -> Msg {
    Msg::Text {
        role: Role::User,
        text: Text::Canned(0),
        meta: Meta::default(),
    }
}

/// The input alphabet of the search: CreateChat, every transition with a
/// representative input (valid where the state allows it), and the raw
/// writes that make Invalid rows.
pub fn alphabet() -> Vec<Op> {
    let mut ops = vec![Op::Create {
        slot: 0,
        msgs: vec![user_text()],
        dynamic: true,
        config: true,
    }];
    let specs = [
        Spec::SetArchived(true),
        Spec::SetArchived(false),
        Spec::Send {
            msg: user_text(),
            busy: BusyBehavior::Queue,
        },
        Spec::Send {
            msg: user_text(),
            busy: BusyBehavior::Interrupt,
        },
        Spec::Edit {
            target: MsgRef::LastUser,
            text: Text::Canned(1),
            created_by: Some(0),
            model_config: None,
        },
        Spec::RequestCompaction,
        Spec::DeleteQueued(QRef::At(0)),
        Spec::DeleteQueued(QRef::At(1)),
        Spec::PromoteQueued(QRef::At(0)),
        Spec::PromoteQueued(QRef::At(1)),
        Spec::Interrupt(None),
        Spec::Complete {
            results: Results::Exact {
                is_error: false,
                output: 0,
            },
            created_by: Some(0),
        },
        Spec::RecordAttempt,
        Spec::RecordRetry(Json::Canned(0)),
        Spec::Commit {
            msgs: vec![Msg::Text {
                role: Role::Assistant,
                text: Text::Canned(1),
                meta: Meta::default(),
            }],
            consume: false,
        },
        Spec::Commit {
            msgs: vec![Msg::Call {
                call: 1,
                dynamic: true,
                provider_executed: false,
            }],
            consume: false,
        },
        Spec::Commit {
            msgs: vec![Msg::Call {
                call: 2,
                dynamic: false,
                provider_executed: false,
            }],
            consume: false,
        },
        Spec::Commit {
            msgs: vec![Msg::Answer { is_error: false }],
            consume: true,
        },
        Spec::Enter,
        Spec::FinishInterruption(Vec::new()),
        Spec::FinishInterruption(vec![Msg::Answer { is_error: true }]),
        Spec::FinishTurn,
        Spec::FinishError(Some(Json::Canned(1))),
        Spec::Cancel(None),
        Spec::Reconcile {
            error: None,
            reason: None,
        },
        Spec::Acquire(0),
        Spec::Abandon,
    ];
    ops.extend(specs.into_iter().map(update));
    ops.extend(
        [
            (RawStatus::Legacy(1), false),
            (RawStatus::Running, true),
            (RawStatus::Waiting, false),
        ]
        .into_iter()
        .map(|(status, archived)| Op::Raw {
            slot: 0,
            status,
            archived,
        }),
    );
    ops
}

/// What the search tells chats apart by: everything the alphabet's
/// transitions decide on.
fn signature(world: &World) -> Option<(ExecutionState, usize, bool, usize, usize, bool, bool)> {
    let chat = world.chat(0)?;
    let tools = ToolState::from_history(
        chat.active_history()
            .map(|m| (m.role, m.content.as_slice())),
    );
    Some((
        chat.state(),
        chat.queue.len(),
        chat.row.archived,
        tools.outstanding(None).len().min(2),
        tools
            .outstanding(Some(&chat.row.dynamic_tools))
            .len()
            .min(2),
        chat.active_history().any(|m| m.role == Role::User),
        chat.row.owner.is_some(),
    ))
}

/// The rejection a disallowed pair must produce.
pub fn disallowed_kind(t: Transition, from: ExecutionState) -> RejectionKind {
    match (from, t) {
        (ExecutionState::Invalid, _) => RejectionKind::InvalidState,
        (_, Transition::ReconcileInvalidState) => RejectionKind::TransitionNotAllowed {
            reason: Some(reasons::RECONCILE_VALID),
        },
        _ => RejectionKind::TransitionNotAllowed { reason: None },
    }
}

/// One probe per matrix triple and per disallowed pair, each with a
/// shortest path (in alphabet steps) from N.
///
/// # Panics
///
/// If some target is not reached within [`MAX_DEPTH`] steps: a matrix cell
/// (or a disallowed pair) without a path is a failure, not a gap.
pub fn probes() -> Vec<Probe> {
    let alphabet = alphabet();
    let matrix = Matrix::REFERENCE;
    let want_triples: BTreeSet<Triple> = matrix.triples().into_iter().collect();
    let want_pairs: BTreeSet<(Transition, ExecutionState)> =
        matrix.disallowed_pairs().into_iter().collect();
    let mut found: BTreeMap<Target, Probe> = BTreeMap::new();
    // Any id but nil (which creation refuses) will do: replays use their own.
    let start = World::with_ids(vec![ChatId(Uuid::from_u128(1))]);
    let mut queue = VecDeque::from([(start, Vec::<Op>::new())]);
    let mut seen = HashSet::new();
    seen.insert(None);
    while let Some((world, path)) = queue.pop_front() {
        let from = world.chat(0).map_or(ExecutionState::N, |c| c.state());
        for op in &alphabet {
            let (next, expect) = world.step(op);
            let transition = match op {
                Op::Update { calls, .. } => Some(calls[0].spec.transition()),
                _ => None,
            };
            let target = match (&expect, transition) {
                (Expect::Created { .. }, _) => {
                    expect.triples().first().copied().map(Target::Triple)
                }
                (Expect::Committed { .. }, Some(t)) if !t.is_ownership() => {
                    expect.triples().first().copied().map(Target::Triple)
                }
                (Expect::Rejected { rejection, .. }, Some(t))
                    if from != ExecutionState::N
                        && !t.is_ownership()
                        && !matrix.allows(t, from)
                        && rejection.kind == disallowed_kind(t, from) =>
                {
                    Some(Target::Disallowed(t, from))
                }
                _ => None,
            };
            if let Some(target) = target {
                found.entry(target).or_insert_with(|| Probe {
                    target,
                    path: path.clone(),
                    op: op.clone(),
                });
            }
            if path.len() + 1 < MAX_DEPTH && seen.insert(signature(&next)) {
                let mut p = path.clone();
                p.push(op.clone());
                queue.push_back((next, p));
            }
        }
    }
    let triples: BTreeSet<Triple> = found
        .keys()
        .filter_map(|t| match t {
            Target::Triple(t) => Some(*t),
            Target::Disallowed(..) => None,
        })
        .collect();
    let pairs: BTreeSet<(Transition, ExecutionState)> = found
        .keys()
        .filter_map(|t| match t {
            Target::Disallowed(t, s) => Some((*t, *s)),
            Target::Triple(_) => None,
        })
        .collect();
    assert!(
        triples.is_subset(&want_triples),
        "the model landed outside the matrix: {:?}",
        triples.difference(&want_triples).collect::<Vec<_>>()
    );
    assert_eq!(
        triples,
        want_triples,
        "matrix triples without a model path of at most {MAX_DEPTH} steps: {:?}",
        want_triples.difference(&triples).collect::<Vec<_>>()
    );
    assert_eq!(
        pairs,
        want_pairs,
        "disallowed pairs without a model path: {:?}",
        want_pairs.difference(&pairs).collect::<Vec<_>>()
    );
    found.into_values().collect()
}

/// Replays one probe on a chat of its own and checks that its last step
/// hit its target.
async fn replay_probe<S: Store + TestControl>(
    store: S,
    exact: bool,
    k: usize,
    probe: &Probe,
) -> Result<(), String> {
    let id = ChatId(Uuid::from_u128(
        0xa7a7_0000_0000_0000_0000_0000_0000_0000 + k as u128,
    ));
    let mut world = World::with_ids(vec![id]);
    let mut sut = Sut::new(store, &world, exact);
    let mut last = Expect::Done;
    let describe = || {
        let steps: Vec<String> = probe
            .path
            .iter()
            .chain([&probe.op])
            .map(|op| format!("{op:?}"))
            .collect();
        format!("{:?} via {}", probe.target, steps.join(" ; "))
    };
    for op in probe.path.iter().chain([&probe.op]) {
        let (next, expect) = world.step(op);
        sut.check(op, &world, &next, &expect)
            .await
            .map_err(|e| format!("probe {}: at {op:?}: {e}", describe()))?;
        world = next;
        last = expect;
    }
    let hit = match (probe.target, &last) {
        (Target::Triple(t), e) => e.triples().contains(&t),
        (Target::Disallowed(t, from), Expect::Rejected { rejection, .. }) => {
            (rejection.transition, rejection.from, &rejection.kind)
                == (t, from, &disallowed_kind(t, from))
        }
        _ => false,
    };
    if !hit {
        return Err(format!("probe {} ended with {last:?}", describe()));
    }
    Ok(())
}

/// How many probes replay at once (each on its own chat): Postgres round
/// trips dominate, and they overlap.
const PARALLEL_PROBES: usize = 8;

/// Replays every probe on one store of the backend (each on a chat of its
/// own, several at a time), comparing store and model after every step,
/// and checks that the last step of each hit its target.
pub async fn matrix_paths<B: Backend>(backend: &B) {
    let probes = probes();
    let store = backend.store().await;
    let exact = exact_time(backend.name());
    let longest = probes.iter().map(|p| p.path.len() + 1).max().unwrap_or(0);
    let mut failures = Vec::new();
    for (chunk, batch) in probes.chunks(PARALLEL_PROBES).enumerate() {
        let mut set = tokio::task::JoinSet::new();
        for (i, probe) in batch.iter().enumerate() {
            let (store, probe) = (store.clone(), probe.clone());
            let k = chunk * PARALLEL_PROBES + i;
            set.spawn(async move { replay_probe(store, exact, k, &probe).await });
        }
        while let Some(done) = set.join_next().await {
            if let Err(e) = done.expect("probe task panicked") {
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} store: {} of {} probes failed:\n{}",
        backend.name(),
        failures.len(),
        probes.len(),
        failures.join("\n")
    );
    eprintln!(
        "matrix paths on {}: {} probes ({} triples, {} disallowed pairs), longest path {longest} steps",
        backend.name(),
        probes.len(),
        Matrix::REFERENCE.triples().len(),
        Matrix::REFERENCE.disallowed_pairs().len(),
    );
}

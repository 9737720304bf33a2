//! Sequential model-based conformance: random operation sequences run
//! through the pure model and through a real store, compared after every
//! operation (proptest-state-machine).
//!
//! The model is the [`ReferenceStateMachine`] [`Conformance`]: its state is a
//! [`World`] of several chats, and it generates operations from that state,
//! biased towards what the state allows (inputs that name existing rows,
//! tool results for the calls actually pending, EnterRequiresAction only
//! with a dynamic call to wait for) so that deep states are reached, while a
//! share of operations are random and often invalid. The system under test
//! is a [`Sut`] on a [`Backend`].
//!
//! Why not `StateMachineTest`/`prop_state_machine!`: their `init_test` is a
//! static function, so the system under test could not come from a backend
//! value (a Postgres backend hands out a fresh database per case). [`run`]
//! drives the same sequential strategy with its own loop, which also counts
//! the operations it saw (so shrinking drops the unseen tail first), prints
//! the seed and the minimal failing sequence, and measures which matrix
//! triples the run reached.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chatstate::{ChatRecord, Store, TestControl};
use chatstate_model::{
    BusyBehavior, Chat, ChatId, ChatRow, ExecutionState, Matrix, Message, Role, ToolState,
    Transition, Triple, Visibility, allowed_transitions_from,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::strategy::Union;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngSeed, TestCaseError, TestError, TestRunner,
};
use proptest_state_machine::ReferenceStateMachine;
use uuid::Uuid;

use crate::Backend;
use crate::sut::{Sut, exact_time};
use crate::world::{
    CallSpec, Expect, Json, Meta, Msg, MsgRef, OWNERS, Op, QRef, RawStatus, Results, Spec, Text,
    World,
};

/// The seed of a run when `PROPTEST_RNG_SEED` is not set: runs are
/// deterministic unless asked otherwise.
pub const DEFAULT_SEED: u64 = 0x00c4_a7c0_f0e5;

/// The longest generated sequence.
pub const MAX_OPS: usize = 64;

/// The reference state machine of the conformance tests.
#[derive(Clone, Copy, Debug)]
pub struct Conformance;

impl ReferenceStateMachine for Conformance {
    type State = World;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<World> {
        Just(World::default()).boxed()
    }

    fn transitions(world: &World) -> BoxedStrategy<Op> {
        ops(world)
    }

    fn apply(world: World, op: &Op) -> World {
        world.step(op).0
    }

    fn preconditions(world: &World, op: &Op) -> bool {
        // A raw write needs a row; shrinking may have removed the creation.
        match op {
            Op::Raw { slot, .. } => world.chat(*slot).is_some(),
            _ => true,
        }
    }
}

// ---------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------

/// What generation looks at in a chat.
#[derive(Clone, Debug)]
pub(crate) struct Facts {
    state: ExecutionState,
    archived: bool,
    queue: usize,
    users: Vec<u8>,
    outstanding: usize,
    pending_dynamic: usize,
    owner: Option<u8>,
}

impl Facts {
    fn of(chat: &Chat) -> Facts {
        Facts::of_parts(
            &chat.row,
            chat.queue.len(),
            chat.history.iter().filter(|m| !m.deleted),
        )
    }

    /// The facts of a stored chat.
    pub(crate) fn of_record(rec: &ChatRecord) -> Facts {
        Facts::of_parts(
            &rec.row,
            rec.queue.len(),
            rec.history.iter().filter(|m| !m.deleted),
        )
    }

    fn of_parts<'a>(
        row: &ChatRow,
        queue: usize,
        active: impl Iterator<Item = &'a Message> + Clone,
    ) -> Facts {
        let tools = ToolState::from_history(active.clone().map(|m| (m.role, m.content.as_slice())));
        Facts {
            state: row.classify(queue > 0),
            archived: row.archived,
            queue,
            users: active
                .enumerate()
                .filter(|(_, m)| m.role == Role::User)
                .map(|(i, _)| i.min(255) as u8)
                .collect(),
            outstanding: tools.outstanding(None).len(),
            pending_dynamic: tools.outstanding(Some(&row.dynamic_tools)).len(),
            owner: row
                .owner
                .and_then(|o| OWNERS.iter().position(|w| *w == o))
                .map(|i| i as u8),
        }
    }
}

fn weighted<T: std::fmt::Debug + 'static>(
    choices: Vec<(u32, BoxedStrategy<T>)>,
) -> BoxedStrategy<T> {
    Union::new_weighted(choices).boxed()
}

fn text() -> BoxedStrategy<Text> {
    prop_oneof![
        8 => (0u8..5).prop_map(Text::Canned),
        1 => "\\PC{0,24}".prop_map(Text::Any),
    ]
    .boxed()
}

fn json_valid() -> BoxedStrategy<Json> {
    (0u8..7).prop_map(Json::Canned).boxed()
}

fn json_any() -> BoxedStrategy<Json> {
    prop_oneof![
        4 => json_valid(),
        1 => prop_oneof![
            Just(String::new()),
            Just("null".to_owned()),
            Just("{".to_owned()),
            Just("  ".to_owned()),
            Just("1e400".to_owned()),
            "\\PC{0,12}",
        ]
        .prop_map(Json::Raw),
    ]
    .boxed()
}

fn meta() -> BoxedStrategy<Meta> {
    (
        option::of(0u8..2),
        option::of(0u8..2),
        prop_oneof![
            4 => Just(Visibility::Both),
            1 => Just(Visibility::User),
            1 => Just(Visibility::Model),
        ],
    )
        .prop_map(|(created_by, model_config, visibility)| Meta {
            created_by,
            model_config,
            visibility,
        })
        .boxed()
}

fn role() -> BoxedStrategy<Role> {
    prop_oneof![
        Just(Role::User),
        Just(Role::Assistant),
        Just(Role::System),
        Just(Role::Tool)
    ]
    .boxed()
}

fn user_msg() -> BoxedStrategy<Msg> {
    (text(), meta())
        .prop_map(|(text, meta)| Msg::Text {
            role: Role::User,
            text,
            meta,
        })
        .boxed()
}

fn call_msg(dynamic: bool) -> BoxedStrategy<Msg> {
    (0u8..4)
        .prop_map(move |call| Msg::Call {
            call,
            dynamic,
            provider_executed: false,
        })
        .boxed()
}

/// A message a worker step plausibly commits.
fn step_msg(outstanding: bool) -> BoxedStrategy<Msg> {
    let mut choices: Vec<(u32, BoxedStrategy<Msg>)> = vec![
        (
            4,
            (text(), meta())
                .prop_map(|(text, meta)| Msg::Text {
                    role: Role::Assistant,
                    text,
                    meta,
                })
                .boxed(),
        ),
        (3, call_msg(true)),
        (2, call_msg(false)),
        (
            1,
            (0u8..4)
                .prop_map(|call| Msg::Call {
                    call,
                    dynamic: true,
                    provider_executed: true,
                })
                .boxed(),
        ),
        (1, (0u8..4).prop_map(|call| Msg::TwoCalls { call }).boxed()),
        (1, (0u8..3).prop_map(Msg::Other).boxed()),
        (1, (0u8..4).prop_map(|call| Msg::Stray { call }).boxed()),
    ];
    if outstanding {
        choices.push((
            4,
            any::<bool>()
                .prop_map(|is_error| Msg::Answer { is_error })
                .boxed(),
        ));
    }
    weighted(choices)
}

/// Any message at all.
fn msg_any() -> BoxedStrategy<Msg> {
    prop_oneof![
        4 => (role(), text(), meta()).prop_map(|(role, text, meta)| Msg::Text { role, text, meta }),
        2 => (0u8..4, any::<bool>(), any::<bool>()).prop_map(|(call, dynamic, provider_executed)| Msg::Call {
            call,
            dynamic,
            provider_executed
        }),
        1 => (0u8..4).prop_map(|call| Msg::TwoCalls { call }),
        1 => any::<bool>().prop_map(|is_error| Msg::Answer { is_error }),
        1 => (0u8..4).prop_map(|call| Msg::Stray { call }),
        1 => (0u8..3).prop_map(Msg::Other),
        1 => role().prop_map(Msg::Empty),
    ]
    .boxed()
}

fn raw_id() -> BoxedStrategy<i64> {
    prop_oneof![
        Just(0i64),
        Just(-1i64),
        Just(i64::MIN),
        (1i64 << 50)..i64::MAX
    ]
    .boxed()
}

fn msg_ref_any() -> BoxedStrategy<MsgRef> {
    prop_oneof![
        3 => (0u8..8).prop_map(MsgRef::Active),
        2 => Just(MsgRef::LastUser),
        1 => Just(MsgRef::LastAssistant),
        1 => Just(MsgRef::Unknown),
        1 => raw_id().prop_map(MsgRef::Raw),
        1 => Just(MsgRef::Foreign),
    ]
    .boxed()
}

fn qref_any() -> BoxedStrategy<QRef> {
    prop_oneof![
        4 => (0u8..4).prop_map(QRef::At),
        1 => Just(QRef::Unknown),
        1 => raw_id().prop_map(QRef::Raw),
        1 => Just(QRef::Foreign),
    ]
    .boxed()
}

fn results_any() -> BoxedStrategy<Results> {
    prop_oneof![
        3 => (any::<bool>(), 0u8..7).prop_map(|(is_error, output)| Results::Exact { is_error, output }),
        1 => Just(Results::Reversed),
        1 => Just(Results::Missing),
        1 => Just(Results::Unexpected),
        1 => Just(Results::Duplicate),
        1 => Just(Results::InvalidJson),
        1 => Just(Results::Empty),
    ]
    .boxed()
}

fn busy() -> BoxedStrategy<BusyBehavior> {
    prop_oneof![Just(BusyBehavior::Queue), Just(BusyBehavior::Interrupt)].boxed()
}

fn user_index() -> BoxedStrategy<Option<u8>> {
    option::of(0u8..2).boxed()
}

/// Any input of any transition, most of them invalid somewhere.
pub(crate) fn spec_any() -> BoxedStrategy<Spec> {
    let choices: Vec<BoxedStrategy<Spec>> = vec![
        any::<bool>().prop_map(Spec::SetArchived).boxed(),
        (msg_any(), busy())
            .prop_map(|(msg, busy)| Spec::Send { msg, busy })
            .boxed(),
        (msg_ref_any(), text(), user_index(), user_index())
            .prop_map(|(target, text, created_by, model_config)| Spec::Edit {
                target,
                text,
                created_by,
                model_config,
            })
            .boxed(),
        Just(Spec::RequestCompaction).boxed(),
        qref_any().prop_map(Spec::DeleteQueued).boxed(),
        qref_any().prop_map(Spec::PromoteQueued).boxed(),
        option::of(text()).prop_map(Spec::Interrupt).boxed(),
        (results_any(), user_index())
            .prop_map(|(results, created_by)| Spec::Complete {
                results,
                created_by,
            })
            .boxed(),
        Just(Spec::RecordAttempt).boxed(),
        json_any().prop_map(Spec::RecordRetry).boxed(),
        (vec(msg_any(), 0..=2), any::<bool>())
            .prop_map(|(msgs, consume)| Spec::Commit { msgs, consume })
            .boxed(),
        Just(Spec::Enter).boxed(),
        vec(msg_any(), 0..=1)
            .prop_map(Spec::FinishInterruption)
            .boxed(),
        Just(Spec::FinishTurn).boxed(),
        option::of(json_any()).prop_map(Spec::FinishError).boxed(),
        option::of(text()).prop_map(Spec::Cancel).boxed(),
        (option::of(json_any()), option::of(text()))
            .prop_map(|(error, reason)| Spec::Reconcile { error, reason })
            .boxed(),
        (0u8..2).prop_map(Spec::Acquire).boxed(),
        Just(Spec::Abandon).boxed(),
    ];
    Union::new(choices).boxed()
}

/// An input of `t` that the chat's facts make valid most of the time.
fn valid_spec(t: Transition, f: &Facts) -> BoxedStrategy<Spec> {
    match t {
        Transition::SetArchived => Just(Spec::SetArchived(!f.archived)).boxed(),
        Transition::SendMessage => (user_msg(), busy())
            .prop_map(|(msg, busy)| Spec::Send { msg, busy })
            .boxed(),
        Transition::EditMessage => {
            let target = if f.users.is_empty() {
                Just(MsgRef::LastUser).boxed()
            } else {
                proptest::sample::select(f.users.clone())
                    .prop_map(MsgRef::Active)
                    .boxed()
            };
            (target, text(), user_index(), user_index())
                .prop_map(|(target, text, created_by, model_config)| Spec::Edit {
                    target,
                    text,
                    created_by,
                    model_config,
                })
                .boxed()
        }
        Transition::RequestCompaction => Just(Spec::RequestCompaction).boxed(),
        Transition::DeleteQueuedMessage => (0..f.queue.max(1) as u8)
            .prop_map(|i| Spec::DeleteQueued(QRef::At(i)))
            .boxed(),
        Transition::PromoteQueuedMessage => (0..f.queue.max(1) as u8)
            .prop_map(|i| Spec::PromoteQueued(QRef::At(i)))
            .boxed(),
        Transition::Interrupt => option::weighted(0.2, text())
            .prop_map(Spec::Interrupt)
            .boxed(),
        // Mostly the right results; sometimes each way of getting them
        // wrong (rejected, and everything rolls back).
        Transition::CompleteRequiresAction => prop_oneof![
            12 => (any::<bool>(), 0u8..7).prop_map(|(is_error, output)| Results::Exact { is_error, output }),
            3 => Just(Results::Reversed),
            1 => Just(Results::Missing),
            1 => Just(Results::Unexpected),
            1 => Just(Results::Duplicate),
            1 => Just(Results::InvalidJson),
        ]
        .prop_map(|results| Spec::Complete {
            results,
            created_by: Some(0),
        })
        .boxed(),
        Transition::RecordGenerationAttempt => Just(Spec::RecordAttempt).boxed(),
        Transition::RecordRetryState => json_valid().prop_map(Spec::RecordRetry).boxed(),
        Transition::CommitStep => (
            vec(step_msg(f.outstanding > 0), 1..=2),
            proptest::bool::weighted(0.3),
        )
            .prop_map(|(msgs, consume)| Spec::Commit { msgs, consume })
            .boxed(),
        Transition::EnterRequiresAction => Just(Spec::Enter).boxed(),
        Transition::FinishInterruption => {
            if f.outstanding > 0 {
                Just(Spec::FinishInterruption(vec![Msg::Answer { is_error: true }])).boxed()
            } else {
                prop_oneof![
                    3 => Just(Vec::new()),
                    1 => vec(step_msg(false), 1..=1),
                ]
                .prop_map(Spec::FinishInterruption)
                .boxed()
            }
        }
        Transition::FinishTurn => Just(Spec::FinishTurn).boxed(),
        Transition::FinishError => option::weighted(0.8, json_valid())
            .prop_map(Spec::FinishError)
            .boxed(),
        Transition::CancelRequiresAction => option::weighted(0.3, text())
            .prop_map(Spec::Cancel)
            .boxed(),
        Transition::ReconcileInvalidState => (option::of(json_valid()), option::of(text()))
            .prop_map(|(error, reason)| Spec::Reconcile { error, reason })
            .boxed(),
        Transition::Acquire => (0u8..2).prop_map(Spec::Acquire).boxed(),
        Transition::Abandon => Just(Spec::Abandon).boxed(),
        Transition::CreateChat => unreachable!("CreateChat is not an Update call"),
    }
}

/// The runner a worker call is fenced with: mostly the owner's, sometimes
/// none, sometimes another (LeaseLost).
fn fence(f: &Facts) -> BoxedStrategy<Option<u8>> {
    match f.owner {
        Some(o) => prop_oneof![
            8 => Just(Some(o)),
            6 => Just(None),
            1 => Just(Some(1 - o)),
            1 => Just(Some(2)),
        ]
        .boxed(),
        None => prop_oneof![12 => Just(None), 1 => (0u8..3).prop_map(Some)].boxed(),
    }
}

/// One mostly valid step of a chat: usually one call, or the two calls
/// that make a transition possible at all (a dynamic call, then waiting for
/// it).
pub(crate) fn valid_calls(f: &Facts) -> BoxedStrategy<Vec<CallSpec>> {
    let mut choices: Vec<(u32, BoxedStrategy<Vec<CallSpec>>)> = Vec::new();
    let call = |t: Transition, f: &Facts| -> BoxedStrategy<Vec<CallSpec>> {
        let fenced = t.is_worker();
        (
            valid_spec(t, f),
            if fenced { fence(f) } else { Just(None).boxed() },
        )
            .prop_map(|(spec, fence)| vec![CallSpec { spec, fence }])
            .boxed()
    };
    for t in allowed_transitions_from(f.state) {
        let weight = match t {
            Transition::SetArchived => 1,
            Transition::EnterRequiresAction if f.pending_dynamic == 0 => {
                // Give the worker something to wait for first.
                choices.push((
                    3,
                    (0u8..4)
                        .prop_map(|call| {
                            vec![
                                CallSpec::from(Spec::Commit {
                                    msgs: vec![Msg::Call {
                                        call,
                                        dynamic: true,
                                        provider_executed: false,
                                    }],
                                    consume: false,
                                }),
                                CallSpec::from(Spec::Enter),
                            ]
                        })
                        .boxed(),
                ));
                continue;
            }
            // Queues of two or more and requires-action waits are where
            // the rarest matrix triples live (A1 -> A1, E1 -> R1, ...).
            Transition::SendMessage if f.queue < 2 => 6,
            Transition::EnterRequiresAction | Transition::FinishError => 4,
            _ => 3,
        };
        choices.push((weight, call(t, f)));
    }
    if f.state != ExecutionState::N {
        let owned_weight = if f.state.is_runnable() && f.owner.is_none() {
            3
        } else {
            1
        };
        choices.push((owned_weight, call(Transition::Acquire, f)));
        if f.owner.is_some() {
            choices.push((1, call(Transition::Abandon, f)));
        }
    }
    weighted(choices)
}

fn creation(slot: u8) -> BoxedStrategy<Op> {
    let initial = prop_oneof![
        6 => user_msg(),
        1 => (text(), meta()).prop_map(|(text, meta)| Msg::Text { role: Role::System, text, meta }),
        1 => call_msg(true),
        1 => (0u8..3).prop_map(Msg::Other),
    ];
    (
        prop_oneof![20 => vec(initial, 1..=3), 1 => Just(Vec::new())],
        proptest::bool::weighted(0.85),
        any::<bool>(),
    )
        .prop_map(move |(msgs, dynamic, config)| Op::Create {
            slot,
            msgs,
            dynamic,
            config,
        })
        .boxed()
}

fn raw_status() -> BoxedStrategy<RawStatus> {
    prop_oneof![
        Just(RawStatus::Waiting),
        Just(RawStatus::Running),
        Just(RawStatus::Interrupting),
        Just(RawStatus::RequiresAction),
        Just(RawStatus::Error),
        (0u8..3).prop_map(RawStatus::Legacy),
    ]
    .boxed()
}

/// The operations offered from a world.
fn ops(world: &World) -> BoxedStrategy<Op> {
    let mut choices: Vec<(u32, BoxedStrategy<Op>)> = Vec::new();
    let exists = world.chats.iter().any(Option::is_some);
    for (i, chat) in world.chats.iter().enumerate() {
        let slot = i as u8;
        // The first chat gets most of the attention, so that long paths
        // reach deep states; the others exercise several chats at once.
        let scale = if i == 0 { 3 } else { 1 };
        let Some(chat) = chat else {
            choices.push((if exists { 2 * scale } else { 20 }, creation(slot)));
            choices.push((
                1,
                vec(spec_any().prop_map(CallSpec::from), 0..=1)
                    .prop_map(move |calls| Op::Update { slot, calls })
                    .boxed(),
            ));
            continue;
        };
        let f = Facts::of(chat);
        choices.push((
            20 * scale,
            valid_calls(&f)
                .prop_map(move |calls| Op::Update { slot, calls })
                .boxed(),
        ));
        // Bundles: a valid step, then a step valid after it, sometimes a
        // random third call (which may roll everything back).
        let after_world = world.clone();
        choices.push((
            5 * scale,
            valid_calls(&f)
                .prop_flat_map(move |first| {
                    let (next, _) = after_world.step(&Op::Update {
                        slot,
                        calls: first.clone(),
                    });
                    let f2 = next.chat(slot).map(Facts::of).expect("chat exists");
                    (
                        Just(first),
                        valid_calls(&f2),
                        option::weighted(0.25, (spec_any(), option::weighted(0.2, 0u8..3))),
                    )
                })
                .prop_map(move |(mut calls, second, third)| {
                    calls.extend(second);
                    if let Some((spec, fence)) = third {
                        calls.push(CallSpec { spec, fence });
                    }
                    Op::Update { slot, calls }
                })
                .boxed(),
        ));
        choices.push((
            4 * scale,
            vec(
                (spec_any(), option::weighted(0.3, 0u8..3))
                    .prop_map(|(spec, fence)| CallSpec { spec, fence }),
                1..=2,
            )
            .prop_map(move |calls| Op::Update { slot, calls })
            .boxed(),
        ));
        choices.push((
            1,
            Just(Op::Update {
                slot,
                calls: vec![],
            })
            .boxed(),
        ));
        choices.push((
            2,
            any::<bool>()
                .prop_map(move |shared| Op::Lock { slot, shared })
                .boxed(),
        ));
        let heartbeat_runner = match f.owner {
            Some(o) => prop_oneof![4 => Just(o), 1 => 0u8..3].boxed(),
            None => (0u8..3).boxed(),
        };
        choices.push((
            2 * scale,
            heartbeat_runner
                .prop_map(move |runner| Op::Heartbeat { slot, runner })
                .boxed(),
        ));
        choices.push((
            1,
            (raw_status(), any::<bool>())
                .prop_map(move |(status, archived)| Op::Raw {
                    slot,
                    status,
                    archived,
                })
                .boxed(),
        ));
        choices.push((1, creation(slot)));
    }
    if exists {
        choices.push((
            3,
            prop_oneof![Just(10u32), Just(31u32), Just(300u32)]
                .prop_map(|secs| Op::Advance { secs })
                .boxed(),
        ));
    }
    weighted(choices)
}

// ---------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------

/// What a run covered.
#[derive(Clone, Debug, Default)]
pub struct Coverage {
    /// Cases run (shrinking runs included).
    pub cases: usize,
    /// Operations run.
    pub ops: usize,
    /// Matrix triples reached by committed Updates and creations.
    pub triples: BTreeSet<Triple>,
    /// Execution states the chats were in after an operation.
    pub states: BTreeSet<ExecutionState>,
    /// Updates that committed, and those rolled back.
    pub committed: usize,
    /// Updates rolled back by a rejection.
    pub rejected: usize,
    /// Rejection kinds seen, with counts.
    pub rejections: BTreeMap<&'static str, usize>,
}

impl Coverage {
    fn record(&mut self, after: &World, expect: &Expect) {
        self.ops += 1;
        self.triples.extend(expect.triples());
        match expect {
            Expect::Committed { .. } => self.committed += 1,
            Expect::Rejected { rejection, .. } => {
                self.rejected += 1;
                *self.rejections.entry(rejection.kind.name()).or_default() += 1;
            }
            Expect::CreateRejected(r) => {
                *self.rejections.entry(r.kind.name()).or_default() += 1;
            }
            Expect::ChatNotFound => *self.rejections.entry("ChatNotFound").or_default() += 1,
            _ => {}
        }
        for c in after.chats.iter().flatten() {
            self.states.insert(c.state());
        }
    }

    /// The matrix triples never reached.
    pub fn missing(&self) -> Vec<Triple> {
        Matrix::REFERENCE
            .triples()
            .into_iter()
            .filter(|t| !self.triples.contains(t))
            .collect()
    }

    /// A one-paragraph summary.
    pub fn summary(&self) -> String {
        let total = Matrix::REFERENCE.triples().len();
        format!(
            "{} cases, {} operations ({} updates committed, {} rolled back); \
             {}/{} matrix triples reached{}; states {:?}; rejections {:?}",
            self.cases,
            self.ops,
            self.committed,
            self.rejected,
            self.triples.len(),
            total,
            if self.triples.len() == total {
                String::new()
            } else {
                format!(" (missing {:?})", self.missing())
            },
            self.states,
            self.rejections
        )
    }
}

/// The seed of the run: `PROPTEST_RNG_SEED` if set, else [`DEFAULT_SEED`].
pub fn seed() -> u64 {
    match Config::default().rng_seed {
        RngSeed::Fixed(s) => s,
        RngSeed::Random => DEFAULT_SEED,
    }
}

/// How many cases to run: `PROPTEST_CASES` if set, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs one sequence on a fresh store of the backend.
pub async fn run_case<B: Backend>(
    backend: &B,
    init: &World,
    ops: &[Op],
    seen: Option<&AtomicUsize>,
    coverage: &Mutex<Coverage>,
) -> Result<(), String> {
    let store = backend.store().await;
    run_case_on(store, exact_time(backend.name()), init, ops, seen, coverage).await
}

/// Runs one sequence on a given store.
pub async fn run_case_on<S: Store + TestControl>(
    store: S,
    exact: bool,
    init: &World,
    ops: &[Op],
    seen: Option<&AtomicUsize>,
    coverage: &Mutex<Coverage>,
) -> Result<(), String> {
    let mut sut = Sut::new(store, init, exact);
    let mut world = init.clone();
    coverage.lock().expect("coverage").cases += 1;
    for (i, op) in ops.iter().enumerate() {
        if let Some(seen) = seen {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        let (next, expect) = world.step(op);
        sut.check(op, &world, &next, &expect)
            .await
            .map_err(|e| format!("operation {} {op:?}: {e}", i + 1))?;
        coverage.lock().expect("coverage").record(&next, &expect);
        world = next;
    }
    sut.verify_all(&world)
        .await
        .map_err(|e| format!("after the last operation: {e}"))
}

/// Runs the conformance property on a backend: `default_cases` sequences
/// (or `PROPTEST_CASES`) of up to [`MAX_OPS`] operations, each on a fresh
/// store. Panics with the seed and the shrunk sequence on a difference;
/// returns what the run covered.
pub fn run<B: Backend>(backend: &B, default_cases: u32) -> Coverage {
    let seed = seed();
    let config = Config {
        cases: cases(default_cases),
        source_file: Some(file!()),
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..Config::default()
    };
    let cases = config.cases;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let coverage = Mutex::new(Coverage::default());
    let strategy = Conformance::sequential_strategy(1..=MAX_OPS);
    let started = Instant::now();
    let mut runner = TestRunner::new(config);
    // A store on the model's clock (the in-memory one) is fresh per case,
    // since the clock moves. On real time (Postgres) cases share one
    // database, each on chats of its own: a database per case would cost
    // more than the case.
    let exact = exact_time(backend.name());
    let shared = (!exact).then(|| rt.block_on(backend.store()));
    let case_number = AtomicUsize::new(0);
    let run_one = |init: &World, ops: &[Op], seen: Option<&AtomicUsize>| -> Result<(), String> {
        let n = case_number.fetch_add(1, Ordering::SeqCst) as u128;
        rt.block_on(async {
            match &shared {
                None => run_case(backend, init, ops, seen, &coverage).await,
                Some(store) => {
                    let mut init = init.clone();
                    init.ids = (0..init.ids.len() as u128)
                        .map(|i| {
                            ChatId(Uuid::from_u128(
                                0xca5e_0000_0000_0000_0000_0000_0000_0000 + n * 16 + i,
                            ))
                        })
                        .collect();
                    run_case_on(store.clone(), exact, &init, ops, seen, &coverage).await
                }
            }
        })
    };
    let result = runner.run(
        &strategy,
        |(init, ops, seen): (World, Vec<Op>, Option<Arc<AtomicUsize>>)| {
            run_one(&init, &ops, seen.as_deref()).map_err(TestCaseError::fail)
        },
    );
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, (init, ops, _))) => {
            let (ops, why) = minimise(&init, ops, why.to_string(), |ops| run_one(&init, ops, None));
            panic!(
                "the {} store disagrees with the model (seed {seed}; rerun with \
                 PROPTEST_RNG_SEED={seed})\n{why}\nminimal failing sequence ({} operations):\n{}",
                backend.name(),
                ops.len(),
                ops.iter()
                    .enumerate()
                    .map(|(i, op)| format!("  {:>2}. {op:?}", i + 1))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        }
        Err(TestError::Abort(why)) => {
            panic!(
                "conformance on {} aborted (seed {seed}): {why}",
                backend.name()
            )
        }
    }
    let coverage = coverage.into_inner().expect("coverage");
    eprintln!(
        "conformance on {} (seed {seed}, {cases} cases) in {:.1?}: {}",
        backend.name(),
        started.elapsed(),
        coverage.summary()
    );
    coverage
}

/// Makes a failing sequence 1-minimal: proptest-state-machine deletes
/// operations in one backwards pass and then simplifies them, so an
/// operation that became irrelevant after simplification (or was never
/// reached) can survive. This drops everything after the first failing
/// prefix, then single operations or single calls of a bundle, for as
/// long as the sequence still fails (keeping raw writes only where their
/// chat exists).
fn minimise(
    init: &World,
    mut ops: Vec<Op>,
    mut why: String,
    fails: impl Fn(&[Op]) -> Result<(), String>,
) -> (Vec<Op>, String) {
    const BUDGET: usize = 2000;
    let mut runs = 0;
    let valid = |ops: &[Op]| {
        let mut w = init.clone();
        ops.iter().all(|op| {
            let ok = Conformance::preconditions(&w, op);
            w = w.step(op).0;
            ok
        })
    };
    if let Some(k) = (1..=ops.len()).find(|k| {
        runs += 1;
        fails(&ops[..*k]).is_err()
    }) {
        ops.truncate(k);
    }
    let mut changed = true;
    while changed && runs < BUDGET {
        changed = false;
        // Smaller candidates: the sequence without one operation, or with
        // one call fewer in one Update.
        let mut candidates = Vec::new();
        for i in (0..ops.len()).rev() {
            let mut fewer = ops.clone();
            fewer.remove(i);
            candidates.push(fewer);
            if let Op::Update { calls, .. } = &ops[i] {
                for c in (0..calls.len()).rev() {
                    let mut fewer = ops.clone();
                    if let Op::Update { calls, .. } = &mut fewer[i] {
                        calls.remove(c);
                    }
                    candidates.push(fewer);
                }
            }
        }
        for fewer in candidates {
            if runs >= BUDGET || !valid(&fewer) {
                continue;
            }
            runs += 1;
            if let Err(e) = fails(&fewer) {
                ops = fewer;
                why = e;
                changed = true;
                break;
            }
        }
    }
    if let Err(e) = fails(&ops) {
        why = e;
    }
    (ops, why)
}

/// Runs the given sequence (a frozen regression) on a fresh store of the
/// backend and panics with the first difference.
pub fn replay<B: Backend>(backend: &B, ops: &[Op]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let coverage = Mutex::new(Coverage::default());
    if let Err(e) = rt.block_on(run_case(backend, &World::default(), ops, None, &coverage)) {
        panic!("{} store: {e}", backend.name());
    }
}

/// How many cases the default seed needs to reach every matrix triple.
pub const FULL_COVERAGE_CASES: u32 = 256;

/// Asserts that a run with the default seed and at least
/// [`FULL_COVERAGE_CASES`] cases reached every matrix triple. Other seeds only report:
/// their coverage is whatever they draw.
pub fn assert_coverage(coverage: &Coverage, default_cases: u32) {
    if seed() == DEFAULT_SEED && cases(default_cases) >= FULL_COVERAGE_CASES {
        assert!(
            coverage.missing().is_empty(),
            "the generator no longer reaches every matrix triple with the default seed: {}",
            coverage.summary()
        );
    }
}

/// Instantiates the model-based tests for a backend expression:
/// conformance (proptest-state-machine), matrix paths, concurrency fuzzing
/// and hostile inputs. Optional `cases = n, rounds = m` scale the
/// conformance cases and the fuzzing rounds.
#[macro_export]
macro_rules! model_suite {
    ($backend:expr) => {
        $crate::model_suite!($backend, cases = 256, rounds = 6);
    };
    ($backend:expr, cases = $cases:expr, rounds = $rounds:expr) => {
        #[test]
        fn conformance() {
            let coverage = $crate::conformance::run(&$backend, $cases);
            $crate::conformance::assert_coverage(&coverage, $cases);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn matrix_paths() {
            $crate::paths::matrix_paths(&$backend).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrency_fuzz() {
            $crate::concurrency::fuzz(&$backend, $rounds, $crate::concurrency::Shape::default())
                .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn hostile_inputs() {
            $crate::hostile::hostile_inputs(&$backend).await;
        }

        #[test]
        fn hostile_strings() {
            $crate::hostile::hostile_strings(&$backend, 64);
        }

        $crate::regression_tests!($backend);
    };
}

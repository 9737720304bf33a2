//! Fault injection: a fixed scenario is run once per store call it makes,
//! with exactly that call failing.
//!
//! After each fault: the operation returned a store error, nothing partial
//! is visible (the chat reloads exactly as the model had it before the
//! operation), nothing was published, and the same operation then works,
//! as does the rest of the scenario.
//!
//! The in-memory store fails the n-th store call on request
//! ([`FaultyStore`], [`every_call_fails_once`]). On Postgres the connection
//! of an open transaction is killed with `pg_terminate_backend` at every
//! point of every Update of the scenario ([`KillableStore`],
//! [`killed_connections`]).

use std::future::Future;

use chatstate::{Store, StoreErrorKind, TestControl};
use chatstate_model::{BusyBehavior, ChatId, Role};
use chatstate_store_mem::MemStore;
use chatstate_store_pg::PgStore;
use uuid::Uuid;

use crate::Backend;
use crate::sut::{Sut, exact_time};
use crate::world::{
    CallSpec, Expect, Json, Meta, Msg, MsgRef, Op, QRef, RawStatus, Results, Spec, Text, View,
    World, resolve, runner,
};

/// A store whose calls can be made to fail on purpose.
pub trait FaultyStore: Store + TestControl {
    /// Store calls made so far.
    fn calls(&self) -> u64;
    /// Makes the `n`-th store call from now fail (`n >= 1`); 0 disarms.
    fn fail_nth(&self, n: u64);
    /// The kind of error an injected fault surfaces as.
    fn fault_kind(&self) -> StoreErrorKind;
}

impl FaultyStore for MemStore {
    fn calls(&self) -> u64 {
        MemStore::calls(self)
    }

    fn fail_nth(&self, n: u64) {
        // fail_nth_call(0) aims at a call already made: nothing fails.
        self.fail_nth_call(n);
    }

    fn fault_kind(&self) -> StoreErrorKind {
        StoreErrorKind::Injected
    }
}

fn update(slot: u8, calls: Vec<CallSpec>) -> Op {
    Op::Update { slot, calls }
}

fn fenced(spec: Spec) -> CallSpec {
    CallSpec {
        spec,
        fence: Some(0),
    }
}

fn user(n: u8) -> Msg {
    Msg::Text {
        role: Role::User,
        text: Text::Canned(n),
        meta: Meta::default(),
    }
}

/// The scenario: two chats through creation, ownership, bundles, queueing,
/// requires-action, tool results, an edit, promotion, interruption, error,
/// archiving, an empty Update, locks, a heartbeat and a reconciliation.
pub fn scenario() -> Vec<Op> {
    use Spec::*;
    vec![
        Op::Create {
            slot: 0,
            msgs: vec![user(0)],
            dynamic: true,
            config: true,
        },
        Op::Create {
            slot: 1,
            msgs: vec![user(1)],
            dynamic: false,
            config: false,
        },
        update(
            0,
            vec![
                Acquire(0).into(),
                fenced(Commit {
                    msgs: vec![Msg::Text {
                        role: Role::Assistant,
                        text: Text::Canned(1),
                        meta: Meta::default(),
                    }],
                    consume: false,
                }),
            ],
        ),
        update(
            0,
            vec![
                Send {
                    msg: user(0),
                    busy: BusyBehavior::Queue,
                }
                .into(),
            ],
        ),
        update(
            0,
            vec![
                fenced(Commit {
                    msgs: vec![Msg::TwoCalls { call: 1 }],
                    consume: false,
                }),
                fenced(Commit {
                    msgs: vec![Msg::Stray { call: 1 }],
                    consume: false,
                }),
                fenced(Enter),
            ],
        ),
        Op::Heartbeat { slot: 0, runner: 0 },
        update(
            0,
            vec![
                Complete {
                    results: Results::Exact {
                        is_error: false,
                        output: 1,
                    },
                    created_by: Some(0),
                }
                .into(),
            ],
        ),
        Op::Lock {
            slot: 0,
            shared: false,
        },
        Op::Lock {
            slot: 0,
            shared: true,
        },
        update(
            0,
            vec![
                Edit {
                    target: MsgRef::LastUser,
                    text: Text::Canned(3),
                    created_by: Some(1),
                    model_config: Some(0),
                }
                .into(),
            ],
        ),
        update(
            0,
            vec![
                Send {
                    msg: user(1),
                    busy: BusyBehavior::Queue,
                }
                .into(),
                Send {
                    msg: user(2),
                    busy: BusyBehavior::Queue,
                }
                .into(),
                fenced(RecordRetry(Json::Canned(0))),
            ],
        ),
        update(0, vec![PromoteQueued(QRef::At(1)).into()]),
        update(0, vec![fenced(FinishInterruption(Vec::new()))]),
        update(0, vec![fenced(FinishError(Some(Json::Canned(1))))]),
        update(0, vec![SetArchived(true).into()]),
        update(
            0,
            vec![SetArchived(false).into(), PromoteQueued(QRef::At(0)).into()],
        ),
        update(0, vec![]),
        Op::Raw {
            slot: 1,
            status: RawStatus::Legacy(1),
            archived: false,
        },
        update(
            1,
            vec![
                Reconcile {
                    error: None,
                    reason: None,
                }
                .into(),
            ],
        ),
        update(0, vec![fenced(FinishTurn), RequestCompaction.into()]),
        update(
            0,
            vec![
                Acquire(1).into(),
                CallSpec {
                    spec: Commit {
                        msgs: vec![Msg::Other(0)],
                        consume: true,
                    },
                    fence: Some(1),
                },
                CallSpec {
                    spec: Abandon,
                    fence: Some(1),
                },
            ],
        ),
    ]
}

/// Runs the scenario without faults, checking every step, and returns how
/// many store calls each operation made.
async fn dry_run<S: FaultyStore>(store: S, exact: bool) -> Vec<u64> {
    let mut world = World::default();
    let mut sut = Sut::new(store.clone(), &world, exact);
    let mut calls = Vec::new();
    for (i, op) in scenario().iter().enumerate() {
        let (next, expect) = world.step(op);
        assert!(
            !matches!(expect, Expect::Rejected { .. } | Expect::CreateRejected(_)),
            "scenario step {} {op:?} is rejected by the model: {expect:?}",
            i + 1
        );
        let before = store.calls();
        let ran = sut.exec(op, &world).await;
        calls.push(store.calls() - before);
        let checked = async {
            sut.compare(ran, &world, &next, &expect).await?;
            sut.check_published(&expect)?;
            sut.verify_all(&next).await
        };
        if let Err(e) = checked.await {
            panic!("scenario step {} {op:?} without faults: {e}", i + 1);
        }
        world = next;
    }
    calls
}

/// Fails every store call of the scenario in turn (`n` = 1..=K over the
/// whole scenario) and checks the aftermath of each fault.
pub async fn every_call_fails_once<B: Backend>(backend: &B)
where
    B::S: FaultyStore,
{
    let exact = exact_time(backend.name());
    let ops = scenario();
    let per_op = dry_run(backend.store().await, exact).await;
    let total: u64 = per_op.iter().sum();
    let mut faults = 0;
    for (j, op) in ops.iter().enumerate() {
        for k in 1..=per_op[j] {
            let n = per_op[..j].iter().sum::<u64>() + k;
            let fail = |what: String| -> ! {
                panic!(
                    "{} store, fault at store call {n} of {total} (call {k} of step {} {op:?}): {what}",
                    backend.name(),
                    j + 1
                )
            };
            let store = backend.store().await;
            let mut world = World::default();
            let mut sut = Sut::new(store.clone(), &world, exact);
            for (i, op) in ops.iter().enumerate() {
                let (next, expect) = world.step(op);
                if i == j {
                    store.fail_nth(k);
                    let ran = sut.exec(op, &world).await;
                    store.fail_nth(0);
                    match ran.store_error() {
                        Some(e) if e.kind == store.fault_kind() => {}
                        _ => fail(format!(
                            "the operation did not fail with the fault: {ran:?}"
                        )),
                    }
                    if let Err(e) = sut.check_published(&Expect::Done) {
                        fail(format!("published after a fault: {e}"));
                    }
                    if let Err(e) = sut.verify_all(&world).await {
                        fail(format!("partial effects visible after the fault: {e}"));
                    }
                    faults += 1;
                }
                // The operation works (again, after a fault), and so does
                // the rest of the scenario.
                if let Err(e) = sut.check(op, &world, &next, &expect).await {
                    fail(format!("step {} {op:?} after the fault: {e}", i + 1));
                }
                world = next;
            }
            if let Err(e) = sut.verify_all(&world).await {
                fail(format!("at the end: {e}"));
            }
        }
    }
    assert_eq!(
        faults, total,
        "every store call of the scenario was failed once"
    );
    eprintln!(
        "fault injection on {}: {} scenario steps, {total} store calls, each failed once",
        backend.name(),
        ops.len()
    );
}

/// A store whose open transaction a test can kill from outside (Postgres:
/// `pg_terminate_backend` on the backend that is idle in a transaction).
pub trait KillableStore: Store + TestControl {
    /// Kills the connection of every transaction open on this store right
    /// now and waits until they are gone; returns how many there were.
    fn kill_open_transactions(&self) -> impl Future<Output = usize> + Send;
}

impl KillableStore for PgStore {
    async fn kill_open_transactions(&self) -> usize {
        // With a timeout, pg_terminate_backend waits until the backend is
        // gone, so the next statement of the victim surely fails.
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity \
              WHERE datname = current_database() AND state = 'idle in transaction' \
                AND pid <> pg_backend_pid()",
        )
        .fetch_all(self.pool())
        .await
        .expect("terminate backends");
        assert!(killed.iter().all(|k| *k), "a killed backend did not exit");
        killed.len()
    }
}

/// Runs the Update of a scenario step and, from inside its callback,
/// kills the transaction's connection just before call `kill_at` (or just
/// before the commit when `kill_at` is the number of calls).
async fn update_killed_at<S: KillableStore>(
    sut: &Sut<S>,
    world: &World,
    slot: u8,
    calls: &[CallSpec],
    kill_at: usize,
) -> Result<(), chatstate::Error> {
    let m = sut.machine(world.index(slot));
    let foreign = sut.foreign(world, slot);
    let store = sut.store.clone();
    let kill = async || {
        let n = store.kill_open_transactions().await;
        assert_eq!(n, 1, "exactly the paused Update's transaction was open");
    };
    m.update(async |tx| {
        for (i, c) in calls.iter().enumerate() {
            if i == kill_at {
                kill().await;
            }
            let rec = tx.load().await?;
            let input = resolve(&c.spec, &View::of_record(&rec), &foreign);
            match c.fence.map(runner) {
                Some(r) => tx.fenced(r).apply_input(input).await?,
                None => tx.apply(input).await?,
            };
        }
        if kill_at == calls.len() {
            kill().await;
        }
        Ok(())
    })
    .await
}

/// Kills the connection of every Update of the scenario at every point
/// (before each call, before the commit) and checks the aftermath: a store
/// error, nothing partial visible, nothing published, and the Update and
/// the rest of the scenario then work.
pub async fn killed_connections<B: Backend>(backend: &B)
where
    B::S: KillableStore,
{
    let exact = exact_time(backend.name());
    let ops = scenario();
    let store = backend.store().await;
    let mut runs = 0u128;
    for (j, op) in ops.iter().enumerate() {
        let Op::Update { slot, calls } = op else {
            continue;
        };
        for kill_at in 0..=calls.len() {
            runs += 1;
            let fail = |what: String| -> ! {
                panic!(
                    "{} store, connection killed before {} of step {} {op:?}: {what}",
                    backend.name(),
                    if kill_at == calls.len() {
                        "the commit".to_owned()
                    } else {
                        format!("call {kill_at}")
                    },
                    j + 1
                )
            };
            // Each run on chats of its own, in one database.
            let ids = (0..2u128)
                .map(|i| {
                    ChatId(Uuid::from_u128(
                        0xdead_0000_0000_0000_0000_0000_0000_0000 + runs * 4 + i,
                    ))
                })
                .collect();
            let mut world = World::with_ids(ids);
            let mut sut = Sut::new(store.clone(), &world, exact);
            for (i, op) in ops.iter().enumerate() {
                let (next, expect) = world.step(op);
                if i == j {
                    match update_killed_at(&sut, &world, *slot, calls, kill_at).await {
                        Err(chatstate::Error::Store(_)) => {}
                        other => fail(format!(
                            "the Update did not fail with a store error: {other:?}"
                        )),
                    }
                    if let Err(e) = sut.check_published(&Expect::Done) {
                        fail(format!("published after the kill: {e}"));
                    }
                    if let Err(e) = sut.verify_all(&world).await {
                        fail(format!("partial effects visible after the kill: {e}"));
                    }
                }
                if let Err(e) = sut.check(op, &world, &next, &expect).await {
                    fail(format!("step {} {op:?} after the kill: {e}", i + 1));
                }
                world = next;
            }
        }
    }
    eprintln!(
        "killed connections on {}: {runs} Updates killed mid-transaction",
        backend.name()
    );
}

/// Instantiates the connection-killing tests for a backend whose store
/// implements [`KillableStore`].
#[macro_export]
macro_rules! kill_suite {
    ($backend:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn connections_killed_mid_update() {
            $crate::faults::killed_connections(&$backend).await;
        }
    };
}

/// Instantiates the fault-injection tests for a backend whose store
/// implements [`FaultyStore`].
#[macro_export]
macro_rules! fault_suite {
    ($backend:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn every_store_call_fails_once() {
            $crate::faults::every_call_fails_once(&$backend).await;
        }
    };
}

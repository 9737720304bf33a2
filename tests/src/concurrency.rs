//! Concurrency fuzzing with a linearizability oracle.
//!
//! Many tasks (users and workers) issue random Updates (bundles of mostly
//! valid transitions, chosen inside the transaction from the state the
//! lock revealed), Locks, ReadLocks and heartbeats against a handful of
//! chats at once, on a multi-threaded runtime, so row locks are really
//! contended. Every committed Update is recorded with the calls it applied
//! (store ids), their outcomes and what it published.
//!
//! The oracle, per chat: the committed Updates ordered by snapshot version
//! have versions 2, 3, ... without gaps or duplicates and end at the final
//! snapshot (so every rejected Update left no trace); replayed in that order
//! through the model's `update`, with store ids mapped to model ids as the
//! replay goes, they commit with the same outcomes and the same
//! notifications (byte for byte), and end in exactly the stored chat; and a
//! receiver keeping a [`HighWaterMark`] over everything published ends on
//! the last committed snapshot, whatever order or duplication it sees.
//!
//! The store's clock stands still during a round, so every lease a worker
//! acquires stays fresh and the hint decisions are deterministic given the
//! order; heartbeats exercise the lock-free path without changing that.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chatstate::{
    BroadcastPublisher, ChatMachine, CreateChat, Error, HighWaterMark, Notify, PublishError,
    Published, Publisher, RecordingPublisher, Store, create_chat,
};
use chatstate_model::{
    Call, Chat, ChatId, Input, MessageId, NewChat, Notification, Outcome, Owner, QueuedMessageId,
    RunnerId, StepEnv, Timestamp, WorkerId, update,
};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use crate::Backend;
use crate::conformance::{Facts, spec_any, valid_calls};
use crate::sut::{IdMap, Sut, exact_time, map_ids};
use crate::world::{CallSpec, Foreign, Msg, Text, UNKNOWN_ID, View, World, options, resolve};

/// The shape of one fuzzing round.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Chats contended for.
    pub chats: usize,
    /// Client tasks.
    pub users: usize,
    /// Worker tasks (each with a runner of its own).
    pub workers: usize,
    /// Operations per task.
    pub ops: usize,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            chats: 3,
            users: 4,
            workers: 3,
            ops: 40,
        }
    }
}

/// One committed Update as its task saw it.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The chat (index).
    pub chat: usize,
    /// The task that ran it.
    pub task: usize,
    /// The task's operation number.
    pub op: usize,
    /// The snapshot version it committed.
    pub snapshot: i64,
    /// The calls, with store ids.
    pub calls: Vec<Call>,
    /// Their outcomes.
    pub outcomes: Vec<Outcome>,
    /// What it published.
    pub published: Vec<Published>,
}

/// Publishes to the task's own recorder and to the shared bus.
struct Tee {
    own: Arc<RecordingPublisher>,
    bus: Arc<BroadcastPublisher>,
}

impl Publisher for Tee {
    fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), PublishError> {
        self.own.publish(channel, payload)?;
        self.bus.publish(channel, payload)
    }
}

#[derive(Clone, Copy, Debug)]
enum Role {
    User,
    Worker(Owner),
}

fn sample<T: std::fmt::Debug>(runner: &mut TestRunner, s: impl Strategy<Value = T>) -> T {
    s.new_tree(runner)
        .expect("generation never rejects")
        .current()
}

fn worker_owner(task: usize) -> Owner {
    Owner {
        worker_id: WorkerId(Uuid::from_u128(
            0x3041_7a5c_0000_0000_0000_0000_0000_0000 + task as u128,
        )),
        runner_id: RunnerId(Uuid::from_u128(
            0x4144_7a5c_0000_0000_0000_0000_0000_0000 + task as u128,
        )),
    }
}

/// What one task did besides its committed Updates.
#[derive(Debug, Default)]
struct TaskReport {
    rejected: usize,
    locks: usize,
    heartbeats: usize,
}

async fn run_task<S: Store>(
    task: usize,
    role: Role,
    seed: u64,
    machines: Vec<ChatMachine<S>>,
    own: Arc<RecordingPublisher>,
    ops: usize,
    log: Arc<Mutex<Vec<Entry>>>,
) -> Result<TaskReport, String> {
    let mut rng = StdRng::seed_from_u64(seed ^ (task as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut bytes = [0u8; 32];
    rng.fill(&mut bytes);
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let mut report = TaskReport::default();
    for op in 0..ops {
        let chat = rng.random_range(0..machines.len());
        let m = &machines[chat];
        let roll = rng.random_range(0..100);
        if roll < 8 {
            let shared = rng.random_bool(0.5);
            // Under the lock, the snapshot and a full read agree: nothing
            // moves while the lock is held, and taking it bumped nothing.
            let got = if shared {
                m.read_lock(async |r| {
                    let snap = r.snapshot().clone();
                    let rec = r.load().await?;
                    lock_consistent(&snap, &rec)
                })
                .await
            } else {
                m.lock(async |l| {
                    let snap = l.snapshot().clone();
                    let rec = l.load().await?;
                    lock_consistent(&snap, &rec)
                })
                .await
            };
            got.map_err(|e| format!("task {task} op {op}: lock: {e}"))?;
            report.locks += 1;
        } else if roll < 14 {
            let runner_id = match role {
                Role::Worker(me) => me.runner_id,
                Role::User => RunnerId(Uuid::from_u128(0x4144_0000 + task as u128)),
            };
            m.heartbeat(runner_id)
                .await
                .map_err(|e| format!("task {task} op {op}: heartbeat: {e}"))?;
            report.heartbeats += 1;
        } else {
            let mut calls: Vec<Call> = Vec::new();
            let bundles = match rng.random_range(0..20) {
                0 => 0,
                1..=14 => 1,
                _ => 2,
            };
            let got = m
                .update(async |tx| {
                    let mut outcomes = Vec::new();
                    for _ in 0..bundles {
                        let rec = tx.load().await?;
                        let specs: Vec<CallSpec> = if rng.random_bool(0.85) {
                            sample(&mut runner, valid_calls(&Facts::of_record(&rec)))
                        } else {
                            vec![CallSpec::from(sample(&mut runner, spec_any()))]
                        };
                        for c in specs {
                            // A scheduling point while holding the row
                            // lock, so other tasks really queue up on it
                            // (the in-memory store never suspends
                            // otherwise). Not a sleep: nothing waits on time.
                            if rng.random_bool(0.5) {
                                tokio::task::yield_now().await;
                            }
                            let rec = tx.load().await?;
                            let mut input =
                                resolve(&c.spec, &View::of_record(&rec), &Foreign::MODEL);
                            let mut fence = None;
                            if let Role::Worker(me) = role {
                                if let Input::Acquire { owner } = &mut input {
                                    *owner = me;
                                }
                                if input.transition().is_worker() && rng.random_bool(0.85) {
                                    fence = Some(me.runner_id);
                                }
                            }
                            calls.push(Call {
                                input: input.clone(),
                                fence,
                            });
                            outcomes.push(match fence {
                                Some(r) => tx.fenced(r).apply_input(input).await?,
                                None => tx.apply(input).await?,
                            });
                        }
                    }
                    Ok((tx.row().versions.snapshot, outcomes))
                })
                .await;
            match got {
                Ok((snapshot, outcomes)) => {
                    let published = own.published();
                    own.clear();
                    log.lock().expect("log").push(Entry {
                        chat,
                        task,
                        op,
                        snapshot,
                        calls,
                        outcomes,
                        published,
                    });
                }
                Err(Error::Rejected(_)) => report.rejected += 1,
                Err(e) => return Err(format!("task {task} op {op}: update failed: {e}")),
            }
        }
        if !own.published().is_empty() {
            return Err(format!(
                "task {task} op {op}: published without a committed Update: {:?}",
                own.published()
            ));
        }
        // Let the other tasks in between operations, not only at locks.
        if rng.random_bool(0.3) {
            tokio::task::yield_now().await;
        }
    }
    Ok(report)
}

fn lock_consistent(snap: &chatstate::Snapshot, rec: &chatstate::ChatRecord) -> Result<(), Error> {
    if rec.row != snap.row || rec.queue.len() != snap.queue.len() {
        return Err(Error::callback(format!(
            "locked snapshot {:?} but read {:?}",
            snap.row.versions, rec.row.versions
        )));
    }
    Ok(())
}

fn time(exact: bool, t: Option<Timestamp>) -> Option<Timestamp> {
    if exact { t } else { t.map(|_| Timestamp(0)) }
}

/// Replays a chat's committed Updates, in snapshot order, through the
/// model, checking versions, outcomes and notifications on the way.
fn replay(
    new: &NewChat,
    created: &[MessageId],
    entries: &[&Entry],
    env: &StepEnv<'_>,
    exact: bool,
) -> Result<Chat, String> {
    let mut model = Chat::create(new).map_err(|e| format!("create: {e}"))?;
    let mut msgs: BTreeMap<i64, i64> = created
        .iter()
        .enumerate()
        .map(|(i, id)| (id.0, i as i64 + 1))
        .collect();
    let mut queued = IdMap::default();
    for e in entries {
        let want = model.row.versions.snapshot + 1;
        if e.snapshot != want {
            return Err(format!(
                "snapshot {} committed after snapshot {} (a gap or a duplicate)",
                e.snapshot,
                want - 1
            ));
        }
        // The model numbers the rows an Update inserts consecutively from
        // its counters; pair the store's ids with those first, so calls
        // naming rows inserted earlier in the same Update translate.
        let mut next_msg = model.next_message_id;
        let mut next_queued = model.next_queued_id;
        for o in &e.outcomes {
            if let Some(s) = o.queued {
                queued.pair(s.0, next_queued)?;
                next_queued += 1;
            }
            for s in &o.inserted {
                msgs.insert(s.0, next_msg);
                next_msg += 1;
            }
        }
        let calls: Vec<Call> = e
            .calls
            .iter()
            .map(|c| Call {
                input: map_ids(
                    &c.input,
                    |id| MessageId(msgs.get(&id.0).copied().unwrap_or(UNKNOWN_ID)),
                    |id| QueuedMessageId(queued.model(id.0).unwrap_or(UNKNOWN_ID)),
                ),
                fence: c.fence,
            })
            .collect();
        let done = update(Some(&model), &calls, env).map_err(|r| {
            format!(
                "snapshot {} (task {} op {}) committed in the store, the model rejects it: {r}",
                e.snapshot, e.task, e.op
            )
        })?;
        if done.outcomes.len() != e.outcomes.len() {
            return Err(format!("snapshot {}: outcome count differs", e.snapshot));
        }
        for (g, w) in e.outcomes.iter().zip(&done.outcomes) {
            if g.inserted.len() != w.inserted.len() {
                return Err(format!(
                    "snapshot {}: {} inserted {} messages, the model {}",
                    e.snapshot,
                    g.transition,
                    g.inserted.len(),
                    w.inserted.len()
                ));
            }
            let mut g = g.clone();
            let msg = |id: MessageId| MessageId(msgs.get(&id.0).copied().unwrap_or(-1));
            let q = |id: QueuedMessageId| QueuedMessageId(queued.model(id.0).unwrap_or(-1));
            g.inserted = g.inserted.iter().map(|id| msg(*id)).collect();
            g.deleted_messages = g.deleted_messages.iter().map(|id| msg(*id)).collect();
            g.queued = g.queued.map(q);
            g.deleted_queued = g.deleted_queued.iter().map(|id| q(*id)).collect();
            if let Some(p) = &mut g.promoted {
                p.queued = q(p.queued);
                p.message = msg(p.message);
            }
            g.requires_action_deadline = time(exact, g.requires_action_deadline);
            let mut w = w.clone();
            w.requires_action_deadline = time(exact, w.requires_action_deadline);
            if g != w {
                return Err(format!(
                    "snapshot {}: outcome differs:\nstore {g:#?}\nmodel {w:#?}",
                    e.snapshot
                ));
            }
        }
        let want: Vec<Published> = done
            .notifications
            .iter()
            .map(|n| Published {
                channel: n.channel(),
                payload: n.payload(),
            })
            .collect();
        if want != e.published {
            return Err(format!(
                "snapshot {}: published {:?}, the model {:?}",
                e.snapshot,
                e.published
                    .iter()
                    .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
                    .collect::<Vec<_>>(),
                want.iter()
                    .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
                    .collect::<Vec<_>>()
            ));
        }
        model = done.chat;
    }
    Ok(model)
}

fn schedule(entries: &[&Entry]) -> String {
    entries
        .iter()
        .map(|e| {
            let calls: Vec<String> = e
                .calls
                .iter()
                .map(|c| {
                    format!(
                        "{}{}",
                        c.input.transition(),
                        if c.fence.is_some() { "(fenced)" } else { "" }
                    )
                })
                .collect();
            let outs: Vec<String> = e
                .outcomes
                .iter()
                .map(|o| format!("{}->{}", o.from, o.to))
                .collect();
            format!(
                "  snapshot {:>3} task {} op {:>2}: [{}] {}",
                e.snapshot,
                e.task,
                e.op,
                calls.join(", "),
                outs.join(" ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One fuzzing round: tasks against a fresh store; returns how many Updates
/// committed, how many were rejected, and the most transactions seen
/// waiting for a row lock at once.
pub async fn round<B: Backend>(backend: &B, seed: u64, shape: Shape) -> (usize, usize, usize) {
    let store = backend.store().await;
    let exact = exact_time(backend.name());
    let ids: Vec<ChatId> = (0..shape.chats)
        .map(|i| {
            ChatId(Uuid::from_u128(
                0xf022_0000_0000_0000_0000_0000_0000_0000 + (seed as u128) * 64 + i as u128,
            ))
        })
        .collect();
    let mut world = World::with_ids(ids.clone());
    world.options = options();
    let bus = Arc::new(BroadcastPublisher::new(1 << 16));
    let mut receiver = bus.subscribe();
    let mut created = Vec::new();
    let mut news = Vec::new();
    for i in 0..shape.chats {
        let msgs = vec![
            Msg::Text {
                role: chatstate_model::Role::User,
                text: Text::Canned(0),
                meta: Default::default(),
            };
            1 + i % 2
        ];
        let new = world.new_chat(i as u8, &msgs, true, i % 2 == 0);
        let c = create_chat(
            &store,
            &Notify::AfterCommit(bus.clone()),
            CreateChat {
                id: Some(new.id),
                owner_id: new.owner_id,
                dynamic_tools: new.dynamic_tools.clone(),
                last_model_config_id: new.last_model_config_id,
                metadata: Default::default(),
                messages: new.messages.clone(),
            },
        )
        .await
        .expect("create chat");
        created.push(c.messages);
        news.push(new);
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for task in 0..shape.users + shape.workers {
        let role = if task < shape.users {
            Role::User
        } else {
            Role::Worker(worker_owner(task))
        };
        let own = Arc::new(RecordingPublisher::new());
        let notify = Notify::AfterCommit(Arc::new(Tee {
            own: own.clone(),
            bus: bus.clone(),
        }));
        let machines: Vec<_> = ids
            .iter()
            .map(|id| ChatMachine::new(store.clone(), notify.clone(), *id, world.options))
            .collect();
        let log = log.clone();
        handles.push(tokio::spawn(run_task(
            task, role, seed, machines, own, shape.ops, log,
        )));
    }
    // Watch the row locks while the tasks run: the contention is real if
    // transactions are seen waiting for one.
    let mut max_waiters = 0;
    while !handles.iter().all(|h| h.is_finished()) {
        max_waiters = max_waiters.max(backend.lock_waiters(&store).await);
        tokio::task::yield_now().await;
    }
    let mut rejected = 0;
    let mut failures = Vec::new();
    for h in handles {
        match h.await.expect("task panicked") {
            Ok(r) => rejected += r.rejected,
            Err(e) => failures.push(e),
        }
    }
    let log = Arc::try_unwrap(log)
        .expect("tasks done")
        .into_inner()
        .expect("log");
    let fail = |what: String, entries: &[&Entry]| -> ! {
        panic!(
            "concurrency fuzz on {} (seed {seed}, {shape:?}): {what}\nschedule:\n{}",
            backend.name(),
            schedule(entries)
        )
    };
    if !failures.is_empty() {
        let all: Vec<&Entry> = log.iter().collect();
        fail(failures.join("\n"), &all);
    }

    // Replay every chat's committed history through the model.
    let base = world.clone();
    let env = base.env();
    for i in 0..shape.chats {
        let mut entries: Vec<&Entry> = log.iter().filter(|e| e.chat == i).collect();
        entries.sort_by_key(|e| e.snapshot);
        match replay(&news[i], &created[i], &entries, &env, exact) {
            Ok(chat) => world.chats[i] = Some(chat),
            Err(e) => fail(format!("chat{i}: {e}"), &entries),
        }
    }
    // The stored chats are exactly the replayed ones, and every rejected
    // Update left no trace: the final snapshot counts committed ones only.
    let mut sut = Sut::new(store.clone(), &world, exact);
    if let Err(e) = sut.verify_all(&world).await {
        let all: Vec<&Entry> = log.iter().collect();
        fail(format!("final state: {e}"), &all);
    }
    let mut finals = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        let snapshot = sut.cached(i).expect("verified").row.versions.snapshot;
        let committed = log.iter().filter(|e| e.chat == i).count() as i64;
        if snapshot != 1 + committed {
            let entries: Vec<&Entry> = log.iter().filter(|e| e.chat == i).collect();
            fail(
                format!("chat{i}: final snapshot {snapshot} after {committed} committed updates"),
                &entries,
            );
        }
        finals.insert(*id, snapshot);
    }

    // A receiver with a high-water mark ends on the last committed snapshot,
    // live and whatever order or duplication it is given.
    let mut live = HighWaterMark::new();
    loop {
        match receiver.try_recv() {
            Ok(p) => {
                let n = p.notification().expect("well-formed payload");
                live.accept(&n);
            }
            Err(tokio::sync::broadcast::error::TryRecvError::Empty) => break,
            Err(e) => panic!("bus receiver: {e}"),
        }
    }
    let mut shuffled: Vec<Notification> = log
        .iter()
        .flat_map(|e| e.published.iter())
        .map(|p| p.notification().expect("well-formed payload"))
        .collect();
    let extra: Vec<Notification> = shuffled.iter().step_by(3).cloned().collect();
    shuffled.extend(extra);
    shuffled.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut replayed = HighWaterMark::new();
    for n in &shuffled {
        replayed.accept(n);
    }
    for (id, snapshot) in &finals {
        for (what, hwm) in [("live", &live), ("shuffled", &replayed)] {
            // The creation published snapshot 1; later ones count too.
            if hwm.mark(*id) != *snapshot && !(hwm.mark(*id) == 0 && *snapshot == 1) {
                let all: Vec<&Entry> = log.iter().collect();
                fail(
                    format!(
                        "{what} receiver ended chat {id} at {} instead of {snapshot}",
                        hwm.mark(*id)
                    ),
                    &all,
                );
            }
        }
    }
    (log.len(), rejected, max_waiters)
}

/// Runs `rounds` fuzzing rounds (seeds derived from `CHATSTATE_SEED` or
/// [`crate::conformance::DEFAULT_SEED`]) and prints a summary.
pub async fn fuzz<B: Backend>(backend: &B, rounds: u64, shape: Shape) {
    let base = std::env::var("CHATSTATE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(crate::conformance::DEFAULT_SEED);
    let started = std::time::Instant::now();
    let (mut committed, mut rejected, mut waiters) = (0, 0, 0);
    for r in 0..rounds {
        let (c, x, w) = round(backend, base + r, shape).await;
        committed += c;
        rejected += x;
        waiters = waiters.max(w);
    }
    assert!(
        waiters > 0,
        "no transaction ever waited for a row lock: the fuzzing did not contend"
    );
    eprintln!(
        "concurrency fuzz on {}: {rounds} rounds from seed {base} ({shape:?}): {committed} updates \
         committed, {rejected} rejected, up to {waiters} transactions waiting for a row lock, in {:.1?}",
        backend.name(),
        started.elapsed()
    );
}

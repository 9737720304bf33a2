//! Concurrency fuzzing with a linearizability oracle.
//!
//! Many tasks (users and workers) issue random Updates (bundles of mostly
//! valid transitions, chosen inside the transaction from the state the
//! lock revealed), Locks, ReadLocks and heartbeats against a handful of
//! chats at once, on a multi-threaded runtime, so row locks are really
//! contended. Every committed Update is recorded with the calls it applied
//! (store ids), their outcomes and what it published.
//!
//! The oracle is the model's ([`chatstate_model::oracle`]), per chat: the
//! committed Updates ordered by snapshot version have versions 2, 3, ...
//! without gaps or duplicates and end at the final snapshot (so every
//! rejected Update left no trace); replayed in that order through the
//! model's `update`, with store ids mapped to model ids as the replay goes,
//! they commit with the same outcomes, end their callbacks at the same
//! snapshots and publish the same notifications (byte for byte), and end in
//! exactly the stored chat. Besides, a receiver keeping a [`HighWaterMark`]
//! over everything published ends on the last committed snapshot, whatever
//! order or duplication it sees.
//!
//! The store's clock stands still during a round (on the in-memory store;
//! Postgres's moves by far less than a heartbeat's staleness), so every
//! lease a worker acquires stays fresh and the hint decisions are
//! deterministic given the order; heartbeats exercise the lock-free path
//! without changing that. Every Update asserts so when it locks the row, and
//! on the in-memory store every Update must see the round's time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chatstate::{
    BroadcastPublisher, ChatMachine, CreateChat, Error, HighWaterMark, Notify, PublishError,
    Publisher, RecordingPublisher, Store, create_chat,
};
use chatstate_model::oracle::{self, CommittedUpdate, CreatedChat, StoredChat};
use chatstate_model::{Call, ChatId, Input, Notification, Owner, RunnerId, WorkerId};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use crate::Backend;
use crate::conformance::{Facts, spec_any, valid_calls};
use crate::sut::exact_time;
use crate::world::{CallSpec, Foreign, Msg, Text, View, World, options, resolve};

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
    /// The Update, for the oracle.
    pub update: CommittedUpdate,
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
                    let snap = tx.snapshot();
                    let (now, lease_fresh) = (snap.now, snap.lease_fresh);
                    // The clock stands still (or nearly): a lease is fresh
                    // exactly when the chat is owned.
                    if lease_fresh != snap.row.owner.is_some() {
                        return Err(Error::callback(format!(
                            "locked with lease_fresh {lease_fresh}, owner {:?}",
                            snap.row.owner
                        )));
                    }
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
                    Ok((now, lease_fresh, outcomes, tx.snapshot().clone()))
                })
                .await;
            match got {
                Ok((now, lease_fresh, outcomes, end)) => {
                    log.lock().expect("log").push(Entry {
                        chat,
                        task,
                        op,
                        update: CommittedUpdate {
                            chat: m.chat_id(),
                            snapshot: end.row.versions.snapshot,
                            now,
                            lease_fresh,
                            calls,
                            outcomes,
                            end,
                            published: sent(&own),
                        },
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

/// What `own` recorded, for the oracle, forgetting it.
fn sent(own: &RecordingPublisher) -> Vec<oracle::Published> {
    let sent = own
        .published()
        .into_iter()
        .map(|p| oracle::Published {
            channel: p.channel,
            payload: p.payload,
        })
        .collect();
    own.clear();
    sent
}

fn schedule(entries: &[&Entry]) -> String {
    entries
        .iter()
        .map(|e| {
            let u = &e.update;
            let calls: Vec<String> = u
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
            let outs: Vec<String> = u
                .outcomes
                .iter()
                .map(|o| format!("{}->{}", o.from, o.to))
                .collect();
            format!(
                "  snapshot {:>3} task {} op {:>2}: [{}] {}",
                u.snapshot,
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
    let creator = Arc::new(RecordingPublisher::new());
    let create_notify = Notify::AfterCommit(Arc::new(Tee {
        own: creator.clone(),
        bus: bus.clone(),
    }));
    let mut created = Vec::new();
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
        let c = create_chat(&store, &create_notify, CreateChat::from(new.clone()))
            .await
            .expect("create chat");
        created.push(CreatedChat {
            new,
            ids: c.messages,
            published: sent(&creator),
        });
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
    let fail = |what: String| -> ! {
        panic!(
            "concurrency fuzz on {} (seed {seed}, {shape:?}): {what}",
            backend.name()
        )
    };
    // What went wrong, and the schedule: one chat's committed Updates in
    // snapshot order, or (`None`) every chat's in the order they were logged.
    let with_schedule = |what: String, chat: Option<ChatId>| -> String {
        let mut entries: Vec<&Entry> = log
            .iter()
            .filter(|e| chat.is_none_or(|c| e.update.chat == c))
            .collect();
        if chat.is_some() {
            entries.sort_by_key(|e| e.update.snapshot);
        }
        format!("{what}\nschedule:\n{}", schedule(&entries))
    };
    if !failures.is_empty() {
        fail(with_schedule(failures.join("\n"), None));
    }
    if exact {
        // The clock stood still: every Update ran at the round's time.
        if let Some(e) = log.iter().find(|e| e.update.now != world.now) {
            fail(with_schedule(
                format!(
                    "snapshot {} of chat{} ran at {:?}, not at the round's {:?}",
                    e.update.snapshot, e.chat, e.update.now, world.now
                ),
                Some(e.update.chat),
            ));
        }
    }

    // Read every chat once more and replay its committed history through
    // the model.
    let mut stored = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        let machine = ChatMachine::new(
            store.clone(),
            Notify::AfterCommit(bus.clone()),
            *id,
            world.options,
        );
        match machine.load().await {
            Ok(r) => {
                let chat = StoredChat {
                    row: r.row,
                    queue: r.queue,
                    history: r.history,
                };
                stored.insert(*id, chat);
            }
            Err(e) => fail(with_schedule(
                format!("chat{i}: final read: {e}"),
                Some(*id),
            )),
        }
    }
    let config = oracle::Config {
        options: world.options,
        exact_time: exact,
    };
    let verdict = oracle::check(&config, &created, log.iter().map(|e| &e.update), &stored);
    if !verdict.violations.is_empty() {
        let each: Vec<String> = verdict
            .violations
            .iter()
            .map(|v| with_schedule(format!("{v:#}"), Some(v.chat)))
            .collect();
        fail(each.join("\n"));
    }
    let finals: BTreeMap<ChatId, i64> = stored
        .iter()
        .map(|(id, chat)| (*id, chat.row.versions.snapshot))
        .collect();

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
        .flat_map(|e| e.update.published.iter())
        .map(|p| Notification::parse(&p.channel, &p.payload).expect("well-formed payload"))
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
                fail(with_schedule(
                    format!(
                        "{what} receiver ended chat {id} at {} instead of {snapshot}",
                        hwm.mark(*id)
                    ),
                    None,
                ));
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

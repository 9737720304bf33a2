//! Worker runtimes in three OS processes (`chatstate work`) on one Postgres
//! database, with users acting on the chats from this process, and one
//! worker killed with SIGKILL mid-run.
//!
//! Every process records each Update it tries to commit (a `maybe` line
//! before the commit, a settling line after; see `cli/src/record.rs`). At
//! the end the merged records are checked: the oracle replays them against
//! the stored chats (the killed process's unsettled lines count as maybe
//! committed), no two runners' worker transitions interleave on a chat,
//! and every runnable chat was re-owned by a live worker soon after the
//! kill. A second run with deliberately unfenced workers, and a record with
//! one commit dropped, must fail those checks.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chatstate::model::oracle::{self, CommittedUpdate, Config, CreatedChat, StoredChat};
use chatstate::model::{NewChat, Transition};
use chatstate::{
    BusyBehavior, ChatId, ChatMachine, CommitObserver, CreateChat, Error, Input, NewMessage,
    Notify, Options, Part, Role, RunnerId, Snapshot, create_chat,
};
use chatstate_store_pg::PgStore;
use chatstate_testing::throwaway::Cluster;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use crate::scratch;

/// The record format, shared with the binary.
#[allow(dead_code, unreachable_pub)]
#[path = "../../src/record.rs"]
mod record;

use record::{Change, Line, Note, Recorder};

/// Lease staleness the workers run with; the runtime's sweep interval is
/// half of it.
const STALE: Duration = Duration::from_millis(2000);
const SWEEP: Duration = Duration::from_millis(1000);
/// How long generating a step takes in the workers, and in the one that
/// is killed.
const STEP: Duration = Duration::from_millis(30);
const VICTIM_STEP: Duration = Duration::from_millis(400);
/// How often the killed worker's chats are read until re-owned.
const HELD_POLL: Duration = Duration::from_millis(10);
/// What the measurement may add to the guarantee: the claim itself and
/// the read that sees it, on a machine the workers share with Postgres.
const MARGIN: Duration = Duration::from_millis(200);
/// How often every chat is read.
const POLL: Duration = Duration::from_millis(50);

/// One scenario.
struct Scenario {
    name: &'static str,
    workers: usize,
    chats: usize,
    /// How long users act.
    duration: Duration,
    /// When one worker is killed, if one is.
    kill_at: Option<Duration>,
    unfenced: bool,
    seed: u64,
}

/// What a scenario left behind.
struct Run {
    options: Options,
    created: Vec<CreatedChat>,
    committed: Vec<Change>,
    maybe: Vec<Change>,
    stored: BTreeMap<ChatId, StoredChat>,
    stats: Vec<serde_json::Value>,
    /// When the last chat the killed worker held was seen re-owned.
    reowned_in: Option<Duration>,
    /// When every runnable chat was first seen owned by a live worker.
    all_owned_in: Option<Duration>,
}

impl Run {
    fn verdict(&self) -> oracle::Verdict {
        let config = Config {
            options: self.options,
            exact_time: true,
        };
        let committed: Vec<CommittedUpdate> = self.committed.iter().map(oracle_form).collect();
        let maybe: Vec<CommittedUpdate> = self.maybe.iter().map(oracle_form).collect();
        oracle::check_with_unknown(&config, &self.created, &committed, &maybe, &self.stored)
    }
}

#[test]
fn processes_three_workers_one_killed_agree_with_the_oracle() {
    let run = scenario(&Scenario {
        name: "killed",
        workers: 3,
        chats: 20,
        duration: Duration::from_secs(12),
        kill_at: Some(Duration::from_secs(4)),
        unfenced: false,
        seed: 11,
    });
    let verdict = run.verdict();
    let violations: Vec<String> = verdict
        .violations
        .iter()
        .map(|v| format!("{v:#}"))
        .collect();
    assert!(
        violations.is_empty(),
        "oracle violations:\n{}",
        violations.join("\n")
    );
    assert_eq!(verdict.chats_checked, 20);
    let fencing = interleavings(&run.committed, &run.maybe, &run.stored);
    // A step by a runner that had lost the chat, planted in the records,
    // is what the interleaving check reports.
    let mut planted = run.committed.clone();
    let chat = plant_stale_step(&mut planted).expect("a chat that changed runners");
    let found = interleavings(&planted, &run.maybe, &run.stored);
    assert!(
        found.iter().any(|f| f.contains(&chat.to_string())),
        "a stale runner's step went unnoticed: {found:?}"
    );
    assert!(
        fencing.is_empty(),
        "interleaved runners:\n{}",
        fencing.join("\n")
    );

    let mut won_total = 0;
    let mut lost_total = 0;
    for s in &run.stats {
        let won = s["claims_won"].as_u64().expect("claims_won");
        let lost = s["claims_held"].as_u64().expect("claims_held")
            + s["claims_not_runnable"]
                .as_u64()
                .expect("claims_not_runnable");
        won_total += won;
        lost_total += lost;
        println!(
            "worker {}: claims won {won}, lost {lost}, hints skipped before claiming {}, \
             leases lost {}, handed back {}",
            s["worker_id"], s["claims_skipped"], s["leases_lost"], s["handed_back"]
        );
    }
    let wasted = lost_total as f64 / (won_total + lost_total).max(1) as f64;
    let reowned = run
        .reowned_in
        .expect("the killed worker's chats were re-owned");
    let all_owned = run
        .all_owned_in
        .expect("every runnable chat was owned by a live worker");
    println!(
        "claims won {won_total}, lost {lost_total}, wasted ratio {wasted:.3}; \
         time to re-own after SIGKILL {reowned:?} (bound {:?}), every runnable chat \
         owned by a live worker after {all_owned:?}; Updates checked {} \
         ({} recorded committed, {} maybe committed)",
        STALE + SWEEP,
        verdict.updates_checked,
        run.committed.len(),
        run.maybe.len()
    );
    assert_eq!(
        run.stats.len(),
        2,
        "both live workers printed their counters"
    );
    assert!(won_total > 0, "the live workers claimed chats");
    assert!(
        reowned <= STALE + SWEEP + MARGIN,
        "re-owned after {reowned:?}, later than heartbeat_stale + a sweep interval"
    );
    // The checks have something to check: worker steps and user actions
    // from several processes, and chats that changed hands between them.
    let mut workers_per_chat: BTreeMap<ChatId, Vec<uuid::Uuid>> = BTreeMap::new();
    for c in &run.committed {
        for call in &c.calls {
            if let Input::Acquire { owner } = &call.input {
                let seen = workers_per_chat.entry(c.chat).or_default();
                if !seen.contains(&owner.worker_id.0) {
                    seen.push(owner.worker_id.0);
                }
            }
        }
    }
    let shared = workers_per_chat.values().filter(|w| w.len() > 1).count();
    println!("chats claimed by more than one worker process: {shared} of 20");
    assert!(shared > 0, "no chat changed hands between processes");
    let transitions: Vec<Transition> = run
        .committed
        .iter()
        .flat_map(|c| c.calls.iter().map(|call| call.input.transition()))
        .collect();
    for t in [
        Transition::Acquire,
        Transition::CommitStep,
        Transition::FinishTurn,
        Transition::SendMessage,
    ] {
        assert!(transitions.contains(&t), "no committed {t}");
    }
    assert!(
        verdict.updates_checked > 100,
        "{} Updates",
        verdict.updates_checked
    );
}

#[test]
fn processes_unfenced_workers_or_a_lost_record_fail_the_checks() {
    let run = scenario(&Scenario {
        name: "unfenced",
        workers: 2,
        chats: 8,
        duration: Duration::from_secs(4),
        kill_at: None,
        unfenced: true,
        seed: 12,
    });
    // Unfenced worker steps are what the interleaving check refuses.
    let fencing = interleavings(&run.committed, &run.maybe, &run.stored);
    assert!(!fencing.is_empty(), "unfenced worker steps went unnoticed");
    println!(
        "unfenced workers: {} findings, first: {}",
        fencing.len(),
        fencing[0]
    );
    // The records as written replay cleanly (the model lets unfenced
    // calls through); with one committed Update left out, the oracle's
    // gap check finds the commit nobody recorded.
    let verdict = run.verdict();
    assert!(verdict.violations.is_empty(), "{:?}", verdict.violations);
    let mut lossy = run;
    let dropped = lossy
        .committed
        .iter()
        .position(|c| {
            c.calls
                .iter()
                .any(|call| call.input.transition() == Transition::CommitStep)
        })
        .expect("a committed worker step");
    let gone = lossy.committed.remove(dropped);
    let verdict = lossy.verdict();
    assert!(
        verdict.violations.iter().any(|v| v.chat == gone.chat),
        "a dropped record of chat {} went unnoticed: {:?}",
        gone.chat,
        verdict.violations
    );
    println!("dropped record: {}", verdict.violations[0]);
}

/// Bad flags are refused with a clear error before the database or the
/// record file is touched.
#[test]
fn processes_work_refuses_bad_flags_before_starting() {
    let record = scratch("refused.jsonl");
    let record_arg = record.to_str().expect("a UTF-8 scratch path");
    let url = "postgres://nobody@localhost:1/none";
    for (flag, value, says) in [
        ("--heartbeat-stale-ms", "0", "heartbeat_stale"),
        ("--capacity", "0", "--capacity must be at least 1"),
        ("--worker-id", "not-a-uuid", "invalid value"),
    ] {
        let out = crate::chatstate(&[
            "work",
            "--database-url",
            url,
            "--record",
            record_arg,
            flag,
            value,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
        assert!(!record.exists(), "{flag} {value} created the record file");
    }
}

// ---------------------------------------------------------------------------
// The scenario

fn scenario(sc: &Scenario) -> Run {
    let cluster = Cluster::shared().expect("a throwaway Postgres cluster");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(run_scenario(cluster, sc))
}

async fn run_scenario(cluster: &'static Cluster, sc: &Scenario) -> Run {
    let database = cluster.create_database().await.expect("a test database");
    let connect = cluster.connect_options(&database);
    let url = format!(
        "postgres://{}@localhost:{}/{database}?host={}&sslmode=disable",
        connect.get_username(),
        connect.get_port(),
        connect.get_host()
    );
    let pool = chatstate_store_pg::pool_options()
        .connect_with(connect)
        .await
        .expect("connecting to the test database");
    let store = PgStore::new(pool);
    let options = Options {
        heartbeat_stale: STALE,
        ..Options::default()
    };

    let mut workers: Vec<Worker> = (0..sc.workers)
        .map(|i| {
            // The worker to be killed generates slowly, so that it holds
            // chats mid-turn most of the time.
            let step = if i == 0 && sc.kill_at.is_some() {
                VICTIM_STEP
            } else {
                STEP
            };
            Worker::spawn(
                &url,
                &scratch(&format!("{}-worker-{i}.jsonl", sc.name)),
                step,
                sc.unfenced,
            )
        })
        .collect();
    let api_record = scratch(&format!("{}-api.jsonl", sc.name));
    let recorder = Arc::new(Recorder::create(&api_record).expect("the API record file"));
    let api = Api {
        store: store.clone(),
        options,
        recorder: recorder.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        actions: Arc::new(AtomicU64::new(0)),
    };
    let mut chats = Vec::new();
    let mut rng = StdRng::seed_from_u64(sc.seed);
    for i in 0..sc.chats {
        chats.push(api.create(i, &mut rng).await);
    }
    let users: Vec<_> = (0..2u64)
        .map(|u| {
            let api = api.clone();
            let chats = chats.clone();
            let rng = StdRng::seed_from_u64(sc.seed * 100 + u);
            tokio::spawn(async move { api.act(chats, rng).await })
        })
        .collect();
    let started = Instant::now();

    let mut reowned_in = None;
    let mut all_owned_in = None;
    if let Some(kill_at) = sc.kill_at {
        tokio::time::sleep(kill_at).await;
        let victim = &mut workers[0];
        // Kill it while it holds chats (it should, with a few steps per
        // turn), so that there is something to re-own.
        let holds = Instant::now();
        let mut held = owned_by(&api, &chats, victim.id).await;
        while held.is_empty() && holds.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(HELD_POLL).await;
            held = owned_by(&api, &chats, victim.id).await;
        }
        victim.child.kill().expect("SIGKILL to a worker");
        let killed = Instant::now();
        let _ = victim.child.wait();
        // What it holds now it is dead (a commit it sent before dying may
        // have ended a turn meanwhile): the chats that need re-owning.
        if !held.is_empty() {
            held = owned_by(&api, &chats, victim.id).await;
        }
        println!(
            "killed worker {} holding {} runnable chats",
            victim.id,
            held.len()
        );
        assert!(
            !held.is_empty(),
            "the killed worker held no chat: nothing to re-own"
        );
        let live: Vec<uuid::Uuid> = workers[1..].iter().map(|w| w.id).collect();
        let limit = STALE + SWEEP + Duration::from_secs(3);
        // Each of its chats until a read finds it owned by a live worker
        // with a fresh lease (or no longer runnable); the time is taken
        // when that read returns, so it bounds the re-owning from above.
        let mut pending = held;
        let mut last = None;
        while !pending.is_empty() && killed.elapsed() < limit {
            let mut still = Vec::new();
            for chat in pending {
                let snap = api.snapshot(chat).await;
                if live_or_idle(&snap, &live) {
                    last = Some(killed.elapsed());
                } else {
                    still.push(chat);
                }
            }
            pending = still;
            tokio::time::sleep(HELD_POLL).await;
        }
        if pending.is_empty() {
            reowned_in = last;
        }
        // Then every runnable chat at once (users keep making chats
        // runnable meanwhile; a new one is claimed on its hint).
        while killed.elapsed() < limit {
            if all_runnable_owned(&api, &chats, &live).await {
                all_owned_in = Some(killed.elapsed());
                break;
            }
            tokio::time::sleep(POLL).await;
        }
    }
    if let Some(rest) = sc.duration.checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    api.stop.store(true, Ordering::SeqCst);
    for user in users {
        user.await.expect("a user task");
    }
    println!("users: {} actions", api.actions.load(Ordering::Relaxed));

    let mut stats = Vec::new();
    let live_from = usize::from(sc.kill_at.is_some());
    for w in &workers[live_from..] {
        w.terminate();
    }
    let mut records = vec![api_record];
    for (i, w) in workers.iter_mut().enumerate() {
        records.push(w.record.clone());
        let (stdout, stderr, ok) = w.finish();
        if i >= live_from {
            assert!(ok, "a worker failed:\n{stderr}");
            let line = stdout.lines().last().unwrap_or_default();
            stats
                .push(serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!("a worker's counters line {line:?}: {e}\n{stderr}")
                }));
        }
    }

    let mut created = Vec::new();
    let mut committed = Vec::new();
    let mut maybe = Vec::new();
    for path in &records {
        read_record(path, &mut created, &mut committed, &mut maybe);
        let _ = std::fs::remove_file(path);
    }
    let mut stored = BTreeMap::new();
    for chat in &chats {
        let r = api
            .machine(*chat)
            .load()
            .await
            .expect("reading a chat back");
        stored.insert(
            *chat,
            StoredChat {
                row: r.row,
                queue: r.queue,
                history: r.history,
            },
        );
    }
    drop(recorder);
    Run {
        options,
        created,
        committed,
        maybe,
        stored,
        stats,
        reowned_in,
        all_owned_in,
    }
}

// ---------------------------------------------------------------------------
// Worker processes

/// A `chatstate work` process; killed when dropped (a failing test
/// leaves no worker behind).
struct Worker {
    id: uuid::Uuid,
    child: Child,
    record: PathBuf,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Worker {
    fn spawn(url: &str, record: &Path, step: Duration, unfenced: bool) -> Worker {
        let id = uuid::Uuid::new_v4();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatstate"));
        cmd.args(["work", "--database-url", url, "--record"])
            .arg(record)
            .args(["--heartbeat-stale-ms", &STALE.as_millis().to_string()])
            .args(["--step-ms", &step.as_millis().to_string()])
            .args(["--worker-id", &id.to_string()]);
        if unfenced {
            cmd.arg("--unfenced");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the chatstate binary starts");
        let stdout = read_all(child.stdout.take().expect("piped stdout"));
        let (lines, said) = std::sync::mpsc::channel();
        let err = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = lines.send(line.clone());
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        let worker = Worker {
            id,
            child,
            record: record.to_owned(),
            stdout: Some(stdout),
            stderr: Some(stderr),
        };
        // Running means connected, listening and claiming; a worker that
        // cannot start says why before it exits.
        let mut early = Vec::new();
        loop {
            match said.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line.contains("running") => return worker,
                Ok(line) => early.push(line),
                Err(e) => panic!("worker {id} did not start ({e}): {}", early.join("\n")),
            }
        }
    }

    /// SIGTERM: a graceful stop.
    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit (bounded); its stdout, stderr and
    /// whether it exited successfully.
    fn finish(&mut self) -> (String, String, bool) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for a worker") {
                break status;
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                panic!("worker {} did not stop after SIGTERM", self.id);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = self.stdout.take().expect("read once");
        let stderr = self.stderr.take().expect("read once");
        let stdout = stdout.join().expect("stdout reader");
        let stderr = stderr.join().expect("stderr reader");
        (stdout, stderr, status.success())
    }
}

fn read_all(mut pipe: impl std::io::Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

// ---------------------------------------------------------------------------
// Users

#[derive(Clone)]
struct Api {
    store: PgStore,
    options: Options,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    actions: Arc<AtomicU64>,
}

impl Api {
    fn machine(&self, chat: ChatId) -> ChatMachine<PgStore> {
        let observer: Arc<dyn CommitObserver> = self.recorder.clone();
        ChatMachine::new(
            self.store.clone(),
            Notify::InTransaction,
            chat,
            self.options,
        )
        .observed(observer)
    }

    async fn create(&self, i: usize, rng: &mut StdRng) -> ChatId {
        let new = NewChat {
            id: ChatId::new_random(),
            owner_id: uuid::Uuid::from_u128(rng.random()),
            dynamic_tools: Default::default(),
            last_model_config_id: None,
            messages: vec![NewMessage::user(format!("chat {i} opens"))],
        };
        let created = create_chat(
            &self.store,
            &Notify::InTransaction,
            CreateChat::from(new.clone()),
        )
        .await
        .expect("creating a chat");
        self.recorder.created(&new, &created);
        new.id
    }

    /// Acts on random chats until told to stop: sends (queued or
    /// interrupting), interrupts, edits, deletes and promotes queued
    /// messages. Refusals are part of the game.
    async fn act(&self, chats: Vec<ChatId>, mut rng: StdRng) {
        let mut said = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            let chat = chats[rng.random_range(0..chats.len())];
            let roll = rng.random_range(0..100u32);
            let pick = rng.random::<u64>();
            said += 1;
            let text = format!("user says {said}");
            let result = self
                .machine(chat)
                .update(async |tx| {
                    let input = match roll {
                        0..45 => Input::SendMessage {
                            message: NewMessage::user(text),
                            busy_behavior: BusyBehavior::Queue,
                        },
                        45..55 => Input::SendMessage {
                            message: NewMessage::user(text),
                            busy_behavior: BusyBehavior::Interrupt,
                        },
                        55..70 => Input::Interrupt { reason: None },
                        70..85 => {
                            let record = tx.load().await?;
                            let users: Vec<_> = record
                                .active_history()
                                .filter(|m| m.role == Role::User)
                                .map(|m| m.id)
                                .collect();
                            let Some(&target) = users.last() else {
                                return Ok(());
                            };
                            Input::EditMessage {
                                message_id: target,
                                content: vec![Part::text(text)],
                                created_by: None,
                                model_config_id: None,
                            }
                        }
                        _ => {
                            let queue = tx.snapshot().queue.clone();
                            if queue.is_empty() {
                                return Ok(());
                            }
                            let id = queue[(pick % queue.len() as u64) as usize];
                            if roll < 92 {
                                Input::DeleteQueuedMessage { id }
                            } else {
                                Input::PromoteQueuedMessage { id }
                            }
                        }
                    };
                    tx.apply(input).await.map(|_| ())
                })
                .await;
            match result {
                Ok(()) => {
                    self.actions.fetch_add(1, Ordering::Relaxed);
                }
                Err(Error::Rejected(_)) => {}
                Err(e) => panic!("a user action failed: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))).await;
        }
    }

    async fn snapshot(&self, chat: ChatId) -> Snapshot {
        self.machine(chat)
            .read_lock(async |r| Ok(r.snapshot().clone()))
            .await
            .expect("reading a chat")
    }
}

/// The runnable chats `worker` owns now (an idle chat may still name
/// its owner until the runtime's Abandon; it needs no one).
async fn owned_by(api: &Api, chats: &[ChatId], worker: uuid::Uuid) -> Vec<ChatId> {
    let mut owned = Vec::new();
    for chat in chats {
        let snap = api.snapshot(*chat).await;
        if snap.state().is_runnable() && snap.row.owner.is_some_and(|o| o.worker_id.0 == worker) {
            owned.push(*chat);
        }
    }
    owned
}

/// True when every runnable chat is owned by one of `live` with a fresh
/// lease.
async fn all_runnable_owned(api: &Api, chats: &[ChatId], live: &[uuid::Uuid]) -> bool {
    for chat in chats {
        if !live_or_idle(&api.snapshot(*chat).await, live) {
            return false;
        }
    }
    true
}

/// Not runnable, or owned by one of `live` with a fresh lease.
fn live_or_idle(snap: &Snapshot, live: &[uuid::Uuid]) -> bool {
    !snap.state().is_runnable()
        || (snap.lease_fresh
            && snap
                .row
                .owner
                .is_some_and(|o| live.contains(&o.worker_id.0)))
}

// ---------------------------------------------------------------------------
// Reading and checking the records

/// Reads one process's record: creations; Updates settled as committed;
/// Updates whose commit is unknown or was never settled (the process was
/// killed between the two lines), as maybe committed. Settling lines are
/// paired with the earliest unsettled `maybe` line of the same chat and
/// snapshot version.
fn read_record(
    path: &Path,
    created: &mut Vec<CreatedChat>,
    committed: &mut Vec<Change>,
    maybe: &mut Vec<Change>,
) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut open: HashMap<(ChatId, i64), VecDeque<Vec<Change>>> = HashMap::new();
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .expect("reading a record");
    for (n, line) in lines.iter().enumerate() {
        let parsed = match serde_json::from_str::<Line>(line) {
            Ok(parsed) => parsed,
            // A process killed mid-write leaves at most a torn last line:
            // a torn `maybe` line means the commit was never sent, a torn
            // settling line leaves its Update maybe committed.
            Err(_) if n + 1 == lines.len() => break,
            Err(e) => panic!(
                "{}:{}: not a record line ({e}): {line}",
                path.display(),
                n + 1
            ),
        };
        match parsed {
            Line::Created {
                chat,
                ids,
                published,
            } => created.push(CreatedChat {
                new: chat,
                ids,
                published: published.iter().map(Note::oracle_form).collect(),
            }),
            Line::Maybe { changes } => {
                let first = changes.first().expect("an Update changes its chat");
                open.entry((first.chat, first.snapshot))
                    .or_default()
                    .push_back(changes);
            }
            Line::Committed { chat, snapshot } => {
                committed.extend(settle(&mut open, chat, snapshot, path));
            }
            Line::NotCommitted { chat, snapshot, .. } => {
                settle(&mut open, chat, snapshot, path);
            }
            Line::Unknown { chat, snapshot, .. } => {
                maybe.extend(settle(&mut open, chat, snapshot, path));
            }
        }
    }
    maybe.extend(open.into_values().flatten().flatten());
}

fn settle(
    open: &mut HashMap<(ChatId, i64), VecDeque<Vec<Change>>>,
    chat: ChatId,
    snapshot: i64,
    path: &Path,
) -> Vec<Change> {
    open.get_mut(&(chat, snapshot))
        .and_then(VecDeque::pop_front)
        .unwrap_or_else(|| {
            panic!(
                "{}: chat {chat} snapshot {snapshot} settled without a maybe line",
                path.display()
            )
        })
}

fn oracle_form(c: &Change) -> CommittedUpdate {
    CommittedUpdate {
        chat: c.chat,
        snapshot: c.snapshot,
        now: c.now,
        lease_fresh: c.lease_fresh,
        calls: c.calls.clone(),
        outcomes: c.outcomes.clone(),
        end: c.end.clone(),
        published: c.published.iter().map(Note::oracle_form).collect(),
    }
}

impl Note {
    fn oracle_form(&self) -> oracle::Published {
        oracle::Published {
            channel: self.channel.clone(),
            payload: self.payload.clone().into_bytes(),
        }
    }
}

/// Worker transitions that interleave between runners: in each chat's
/// committed Updates in snapshot order (maybe-committed ones the stored
/// snapshot version says committed included), every worker transition
/// must be fenced by the runner the preceding Acquire made the owner.
fn interleavings(
    committed: &[Change],
    maybe: &[Change],
    stored: &BTreeMap<ChatId, StoredChat>,
) -> Vec<String> {
    let mut by_chat: BTreeMap<ChatId, BTreeMap<i64, &Change>> = BTreeMap::new();
    for c in committed {
        by_chat.entry(c.chat).or_default().insert(c.snapshot, c);
    }
    for c in maybe {
        let reached = stored
            .get(&c.chat)
            .is_some_and(|s| c.snapshot <= s.row.versions.snapshot);
        if reached {
            by_chat
                .entry(c.chat)
                .or_default()
                .entry(c.snapshot)
                .or_insert(c);
        }
    }
    let mut found = Vec::new();
    for (chat, changes) in by_chat {
        let mut owner: Option<RunnerId> = None;
        for (snapshot, change) in changes {
            for call in &change.calls {
                let t = call.input.transition();
                match &call.input {
                    Input::Acquire { owner: o } => owner = Some(o.runner_id),
                    _ if is_user_transition(t) => {}
                    _ if call.fence.is_none() || call.fence != owner => found.push(format!(
                        "chat {chat} snapshot {snapshot}: {t} fenced by {:?} while {owner:?} \
                         owns the chat",
                        call.fence
                    )),
                    Input::Abandon => owner = None,
                    _ => {}
                }
            }
            owner = change.end.row.owner.map(|o| o.runner_id);
        }
    }
    found
}

/// Re-fences one worker transition with the runner that owned its chat
/// before the last Acquire (as if a worker that had lost the chat still
/// committed); returns the chat.
fn plant_stale_step(changes: &mut [Change]) -> Option<ChatId> {
    changes.sort_by_key(|c| (c.chat, c.snapshot));
    let mut previous: Option<(ChatId, RunnerId)> = None;
    let mut current: Option<(ChatId, RunnerId)> = None;
    for change in changes.iter_mut() {
        for call in &mut change.calls {
            match &call.input {
                Input::Acquire { owner } => {
                    if current.is_some_and(|(chat, _)| chat == change.chat) {
                        previous = current;
                    } else {
                        previous = None;
                    }
                    current = Some((change.chat, owner.runner_id));
                }
                _ if call.fence.is_some() => {
                    if let Some((chat, stale)) = previous
                        && chat == change.chat
                        && call.fence != Some(stale)
                    {
                        call.fence = Some(stale);
                        return Some(chat);
                    }
                }
                _ => {}
            }
        }
    }
    None
}

/// Transitions users make (anyone may, unfenced).
fn is_user_transition(t: Transition) -> bool {
    matches!(
        t,
        Transition::SetArchived
            | Transition::SendMessage
            | Transition::EditMessage
            | Transition::RequestCompaction
            | Transition::DeleteQueuedMessage
            | Transition::PromoteQueuedMessage
            | Transition::Interrupt
            | Transition::CompleteRequiresAction
            | Transition::ReconcileInvalidState
    )
}

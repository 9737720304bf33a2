//! Client-side time of each phase of an Update on Postgres: the opening
//! (`begin_update`: BEGIN, row lock, snapshot), the plan's writes
//! (`apply`) and the commit, for one client on one chat, next to the
//! Go-shaped sequence (`chatstate_testing::goshape`) on the same server; and the CPU time per
//! Update of this process and of the server's processes.
//!
//! ```sh
//! cargo run --release -p chatstate-store-pg --example phases            # throwaway cluster
//! cargo run --release -p chatstate-store-pg --example phases -- 20000    # Updates per case
//! ```
//!
//! Every phase is timed around the store call, so it includes the client's
//! encoding and decoding as well as the server's work and the round trip.
//! "machine" is the rest of an Update: deciding the plan with the model and
//! the publication after the commit. CPU times come from `/proc` (Linux):
//! "client" is this process, "server" every process named `postgres`.
//!
//! Environment: `DATABASE_URL` (a server of your own instead of a
//! throwaway cluster, for example to read its statement log),
//! `PHASES_CASE=Empty|CommitStep|SendQueue` (one case only),
//! `PHASES_NO_GO=1` (leave the Go shape out), `PHASES_WARM=n` (open `n`
//! pooled connections first).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatstate::{
    BusyBehavior, ChatId, ChatMachine, ChatMetadata, ChatRecord, CreateChat, CreateOutcome,
    LeaseStatus, LockMode, MetadataPatch, NewMessage, Notify, Options, Publisher, RunnerId, Store,
    StoreError, StoreTx, WorkerId, create_chat,
};
use chatstate_model::{Assigned, ChatRow, EditContext, MessageId, Notification, Plan, Snapshot};
use chatstate_store_pg::PgStore;
use chatstate_testing::goshape::GoShaped;
use chatstate_testing::throwaway::Cluster;

#[derive(Default)]
struct Phases {
    open: Vec<Duration>,
    apply: Vec<Duration>,
    commit: Vec<Duration>,
}

#[derive(Clone)]
struct Timed {
    inner: PgStore,
    phases: Arc<Mutex<Phases>>,
}

struct TimedTx {
    inner: <PgStore as Store>::Tx,
    phases: Arc<Mutex<Phases>>,
}

impl Store for Timed {
    type Tx = TimedTx;

    async fn begin_update(
        &self,
        chat: ChatId,
        options: &Options,
    ) -> Result<Option<(TimedTx, Snapshot)>, StoreError> {
        let started = Instant::now();
        let out = self.inner.begin_update(chat, options).await?;
        self.phases.lock().unwrap().open.push(started.elapsed());
        Ok(out.map(|(inner, snap)| {
            (
                TimedTx {
                    inner,
                    phases: self.phases.clone(),
                },
                snap,
            )
        }))
    }

    async fn begin_locked(
        &self,
        chat: ChatId,
        mode: LockMode,
        options: &Options,
    ) -> Result<Option<(TimedTx, Snapshot)>, StoreError> {
        let out = self.inner.begin_locked(chat, mode, options).await?;
        Ok(out.map(|(inner, snap)| {
            (
                TimedTx {
                    inner,
                    phases: self.phases.clone(),
                },
                snap,
            )
        }))
    }

    async fn create_chat(
        &self,
        row: &ChatRow,
        metadata: &ChatMetadata,
        messages: &[NewMessage],
        notify: &[Notification],
    ) -> Result<CreateOutcome, StoreError> {
        self.inner
            .create_chat(row, metadata, messages, notify)
            .await
    }

    async fn heartbeat(&self, chat: ChatId, runner: RunnerId) -> Result<LeaseStatus, StoreError> {
        self.inner.heartbeat(chat, runner).await
    }

    async fn claimable(&self, options: &Options, limit: usize) -> Result<Vec<ChatId>, StoreError> {
        self.inner.claimable(options, limit).await
    }

    async fn claimable_among(
        &self,
        chats: &[ChatId],
        options: &Options,
    ) -> Result<Vec<ChatId>, StoreError> {
        self.inner.claimable_among(chats, options).await
    }
}

impl StoreTx for TimedTx {
    async fn apply(&mut self, chat: ChatId, plan: &Plan) -> Result<Assigned, StoreError> {
        let started = Instant::now();
        let out = self.inner.apply(chat, plan).await;
        self.phases.lock().unwrap().apply.push(started.elapsed());
        out
    }

    async fn edit_context(
        &mut self,
        chat: ChatId,
        message: MessageId,
    ) -> Result<EditContext, StoreError> {
        self.inner.edit_context(chat, message).await
    }

    async fn begin_nested(
        &mut self,
        chat: ChatId,
        options: &Options,
    ) -> Result<Option<Snapshot>, StoreError> {
        self.inner.begin_nested(chat, options).await
    }

    async fn load(&mut self, chat: ChatId) -> Result<ChatRecord, StoreError> {
        self.inner.load(chat).await
    }

    async fn write_metadata(
        &mut self,
        chat: ChatId,
        patch: &MetadataPatch,
    ) -> Result<(), StoreError> {
        self.inner.write_metadata(chat, patch).await
    }

    async fn commit(self, notify: &[Notification]) -> Result<(), StoreError> {
        let started = Instant::now();
        let out = self.inner.commit(notify).await;
        self.phases.lock().unwrap().commit.push(started.elapsed());
        out
    }

    async fn rollback(self) -> Result<(), StoreError> {
        self.inner.rollback().await
    }
}

struct BlackHole;

impl Publisher for BlackHole {
    fn publish(&self, _: &str, _: &[u8]) -> Result<(), chatstate::PublishError> {
        Ok(())
    }
}

/// CPU time (user and system, ms) of this process and of every process
/// named `postgres` (the server: backends, WAL writer, autovacuum), from
/// `/proc` (Linux; zero elsewhere). Clock ticks of 10 ms: run enough
/// Updates per case.
fn cpu_ms() -> (f64, f64) {
    fn ticks(stat: &str) -> Option<(String, u64)> {
        let (head, rest) = stat.rsplit_once(") ")?;
        let comm = head.split_once(" (")?.1.to_owned();
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some((
            comm,
            f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
        ))
    }
    let own = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| ticks(&s))
        .map_or(0, |t| t.1);
    let mut server = 0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Ok(s) = std::fs::read_to_string(entry.path().join("stat"))
                && let Some((comm, t)) = ticks(&s)
                && comm == "postgres"
            {
                server += t;
            }
        }
    }
    (own as f64 * 10.0, server as f64 * 10.0)
}

fn median(v: &mut [Duration]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    v[v.len() / 2].as_secs_f64() * 1e3
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Case {
    Empty,
    CommitStep,
    SendQueue,
}

async fn chat(store: &Timed, notify: &Notify) -> (ChatId, RunnerId) {
    let created = create_chat(
        store,
        notify,
        CreateChat {
            messages: vec![NewMessage::user("phases")],
            ..CreateChat::default()
        },
    )
    .await
    .expect("create");
    let runner = RunnerId::new_random();
    ChatMachine::new(
        store.clone(),
        notify.clone(),
        created.chat_id,
        Options::default(),
    )
    .update(async |tx| tx.acquire(WorkerId::new_random(), runner).await)
    .await
    .expect("acquire");
    (created.chat_id, runner)
}

#[tokio::main]
async fn main() {
    // On a worker thread, as `chatstate bench` runs its clients: the future
    // `main` blocks on runs on a thread of its own, and every wakeup would
    // cross threads.
    tokio::spawn(run()).await.expect("the run panicked");
}

async fn run() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("a number of Updates"))
        .unwrap_or(5000);
    let pool = Cluster::shared()
        .expect("a throwaway cluster")
        .new_database()
        .await
        .expect("a database");
    let store = Timed {
        inner: PgStore::new(pool),
        phases: Arc::default(),
    };
    let notify = Notify::AfterCommit(Arc::new(BlackHole));
    let options = Options {
        max_queue_size: 1_000_000,
        ..Options::default()
    };
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>6} {:>6}",
        "case (p50 ms; CPU µs)",
        "Update",
        "open",
        "apply",
        "commit",
        "machine",
        "Go shape",
        "client",
        "server",
        "Go cl.",
        "Go sv."
    );
    if let Some(n) = std::env::var("PHASES_WARM")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(store.inner.pool().acquire().await.expect("a connection"));
        }
    }
    // PHASES_CASE=Empty|CommitStep|SendQueue runs one case only.
    let only = std::env::var("PHASES_CASE").ok();
    for case in [Case::Empty, Case::CommitStep, Case::SendQueue] {
        if only.as_ref().is_some_and(|o| *o != format!("{case:?}")) {
            continue;
        }
        let (id, runner) = chat(&store, &notify).await;
        let machine = ChatMachine::new(store.clone(), notify.clone(), id, options);
        let mut total = Vec::with_capacity(n);
        let mut cpu_before = (0.0, 0.0);
        // Warm-up, then measure.
        for round in 0..2 {
            *store.phases.lock().unwrap() = Phases::default();
            total.clear();
            let count = if round == 0 { n / 10 } else { n };
            cpu_before = cpu_ms();
            for i in 0..count {
                let started = Instant::now();
                match case {
                    Case::Empty => machine.update(async |_| Ok(())).await.unwrap(),
                    Case::CommitStep => machine
                        .update(async |tx| {
                            tx.fenced(runner)
                                .commit_step(vec![NewMessage::assistant("a step")], false)
                                .await
                        })
                        .await
                        .map(|_| ())
                        .unwrap(),
                    Case::SendQueue => {
                        machine
                            .update(async |tx| {
                                tx.send_message(NewMessage::user("one more"), BusyBehavior::Queue)
                                    .await
                            })
                            .await
                            .unwrap();
                    }
                }
                total.push(started.elapsed());
                // Keep the queue short, as the benchmark does (untimed).
                if case == Case::SendQueue && i % 64 == 63 {
                    let kept = std::mem::take(&mut *store.phases.lock().unwrap());
                    drain(&machine).await;
                    *store.phases.lock().unwrap() = kept;
                }
            }
        }
        let cpu_after = cpu_ms();
        let mut go = Vec::new();
        let mut go_cpu = (0.0, 0.0);
        if case != Case::Empty && std::env::var_os("PHASES_NO_GO").is_none() {
            let go_before = cpu_ms();
            let (go_chat, _) = chat(&store, &notify).await;
            let baseline = GoShaped::new(store.inner.pool().clone());
            for i in 0..n + n / 10 {
                let message = if case == Case::CommitStep {
                    NewMessage::assistant("a step")
                } else {
                    NewMessage::user("one more")
                };
                let started = Instant::now();
                match case {
                    Case::CommitStep => {
                        baseline
                            .commit_step(go_chat, &message, &options)
                            .await
                            .unwrap();
                    }
                    _ => {
                        baseline
                            .send_queued(go_chat, &message, &options)
                            .await
                            .unwrap();
                    }
                }
                if i >= n / 10 {
                    go.push(started.elapsed());
                }
                if case == Case::SendQueue && i % 64 == 63 {
                    let go_machine =
                        ChatMachine::new(store.clone(), notify.clone(), go_chat, options);
                    drain(&go_machine).await;
                }
            }
            let go_after = cpu_ms();
            go_cpu = (go_after.0 - go_before.0, go_after.1 - go_before.1);
        }
        let mut p = std::mem::take(&mut *store.phases.lock().unwrap());
        let (open, apply, commit) = (
            median(&mut p.open),
            median(&mut p.apply),
            median(&mut p.commit),
        );
        let update = median(&mut total);
        let per = |ms: f64, count: usize| ms * 1000.0 / count.max(1) as f64;
        let go_n = go.len();
        println!(
            "{:<24} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>6.0} {:>6.0} {:>6.0} {:>6.0}",
            format!("{case:?}"),
            update,
            open,
            apply,
            commit,
            update - open - apply - commit,
            median(&mut go),
            per(cpu_after.0 - cpu_before.0, n),
            per(cpu_after.1 - cpu_before.1, n),
            per(go_cpu.0, go_n),
            per(go_cpu.1, go_n),
        );
    }
}

/// Empties the queue with an edit of the first message.
async fn drain(machine: &ChatMachine<Timed>) {
    machine
        .update(async |tx| {
            let first = tx
                .load()
                .await?
                .active_history()
                .next()
                .map(|m| m.id)
                .expect("a chat has history");
            tx.apply(chatstate::Input::EditMessage {
                message_id: first,
                content: vec![chatstate::Part::text("phases")],
                created_by: None,
                model_config_id: None,
            })
            .await?;
            Ok(())
        })
        .await
        .unwrap();
}

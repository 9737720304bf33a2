//! What a server restart costs a running store, with and without the
//! pool's check on checkout (`test_before_acquire`), and what the check
//! costs when nothing goes wrong.
//!
//! ```sh
//! cargo run --release -p chatstate-store-pg --example restart          # throwaway cluster
//! cargo run --release -p chatstate-store-pg --example restart -- 4000  # Updates per latency run
//! ```
//!
//! For each setting: `CLIENTS` tasks run Updates on chats of their own;
//! half-way the throwaway server is restarted (`pg_ctl restart -m fast`);
//! every failed Update is counted by kind, and retried once the server is
//! back, so each task ends with the same number of commits. A third run
//! uses `update_with_retry` (default policy) without the check. Then one
//! client runs Updates back to back on a quiet server, to time the check.
//! Needs the throwaway cluster (it restarts it), not `DATABASE_URL`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use chatstate::{
    ChatMachine, CreateChat, Error, NewMessage, Notify, Options, RetryPolicy, create_chat,
};
use chatstate_store_pg::PgStore;
use chatstate_testing::throwaway::Cluster;

const CLIENTS: usize = 8;
const UPDATES_PER_CLIENT: usize = 200;

fn pg_ctl() -> String {
    let out = Command::new("pg_config").arg("--bindir").output();
    if let Ok(out) = out
        && out.status.success()
    {
        return format!("{}/pg_ctl", String::from_utf8_lossy(&out.stdout).trim());
    }
    let mut dirs: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("a PostgreSQL installation")
        .flatten()
        .map(|d| d.path().join("bin/pg_ctl"))
        .filter(|p| p.exists())
        .collect();
    dirs.sort();
    dirs.pop().expect("pg_ctl").display().to_string()
}

fn restart(cluster: &Cluster) {
    let data = cluster.data_dir().expect("a throwaway cluster");
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let mut cmd = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(pg_ctl());
        c
    } else {
        Command::new(pg_ctl())
    };
    let status = cmd
        .arg("-D")
        .arg(data)
        .args(["-m", "fast", "-w", "restart"])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("pg_ctl");
    assert!(status.success(), "pg_ctl restart failed");
}

async fn store(cluster: &Cluster, name: &str, check: bool) -> PgStore {
    let pool = chatstate_store_pg::pool_options()
        .test_before_acquire(check)
        .max_connections(16)
        .connect_with(cluster.connect_options(name))
        .await
        .expect("connect");
    PgStore::new(pool)
}

async fn chat(store: &PgStore) -> ChatMachine<PgStore> {
    let created = create_chat(
        store,
        &Notify::InTransaction,
        CreateChat {
            messages: vec![NewMessage::user("hello")],
            ..CreateChat::default()
        },
    )
    .await
    .expect("create");
    ChatMachine::new(
        store.clone(),
        Notify::InTransaction,
        created.chat_id,
        Options::default(),
    )
}

/// Failed Updates by kind name, across a restart.
async fn across_restart(
    cluster: &'static Cluster,
    name: &str,
    check: bool,
    retry: bool,
) -> BTreeMap<String, usize> {
    let store = store(cluster, name, check).await;
    let mut tasks = Vec::new();
    let (half_tx, mut half_rx) = tokio::sync::mpsc::channel::<()>(CLIENTS);
    let (restarted_tx, restarted_rx) = tokio::sync::watch::channel(false);
    for _ in 0..CLIENTS {
        let m = chat(&store).await;
        let half = half_tx.clone();
        let mut restarted = restarted_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut failures: BTreeMap<String, usize> = BTreeMap::new();
            let mut done = 0;
            while done < UPDATES_PER_CLIENT {
                if done == UPDATES_PER_CLIENT / 2 {
                    half.send(()).await.unwrap();
                    restarted.wait_for(|r| *r).await.unwrap();
                }
                let result = if retry {
                    m.update_with_retry(&RetryPolicy::default(), || async |_| Ok(()))
                        .await
                } else {
                    m.update(async |_| Ok(())).await
                };
                match result {
                    Ok(()) => done += 1,
                    Err(Error::Store(e)) => {
                        *failures.entry(format!("{:?}", e.kind)).or_default() += 1;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            failures
        }));
    }
    for _ in 0..CLIENTS {
        half_rx.recv().await.unwrap();
    }
    tokio::task::spawn_blocking(move || restart(cluster))
        .await
        .unwrap();
    restarted_tx.send(true).unwrap();
    let mut all = BTreeMap::new();
    for t in tasks {
        for (k, n) in t.await.unwrap() {
            *all.entry(k).or_default() += n;
        }
    }
    all
}

/// Mean latency of an Update, one client, quiet server.
async fn latency(cluster: &Cluster, name: &str, check: bool, n: usize) -> Duration {
    let store = store(cluster, name, check).await;
    let m = chat(&store).await;
    for _ in 0..200 {
        m.update(async |_| Ok(())).await.unwrap();
    }
    let start = Instant::now();
    for _ in 0..n {
        m.update(async |_| Ok(())).await.unwrap();
    }
    start.elapsed() / n as u32
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let cluster = Cluster::shared().expect("a throwaway cluster");
    let name = cluster.create_database().await.expect("database");
    println!(
        "{CLIENTS} clients x {UPDATES_PER_CLIENT} Updates, server restarted half-way; \
         failed Updates by kind:"
    );
    for (check, retry) in [(false, false), (true, false), (false, true)] {
        let failures = across_restart(cluster, &name, check, retry).await;
        let total: usize = failures.values().sum();
        let how = if retry { "update_with_retry" } else { "update" };
        println!("  test_before_acquire({check}), {how}: {total} failed {failures:?}");
    }
    println!("one client, {n} empty Updates back to back, mean latency:");
    for round in 0..2 {
        for check in [false, true] {
            let mean = latency(cluster, &name, check, n).await;
            println!("  round {round} test_before_acquire({check}): {mean:?}");
        }
    }
}

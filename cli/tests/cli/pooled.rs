//! `chatstate work` behind PgBouncer in transaction mode: with
//! `--pooling transaction` and its listener on the server's own URL it
//! takes chats and finishes their turns; a session-mode store or a
//! listener behind the pooler is refused at start-up, with the reason.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chatstate::{
    ChatMachine, CreateChat, ExecutionState, NewMessage, Notify, Options, create_chat,
};
use chatstate_store_pg::PgStore;
use chatstate_testing::pgbouncer::{PgBouncer, PoolMode};
use chatstate_testing::throwaway::Cluster;

/// The staleness the worker runs with (its intervals follow from it).
const STALE_MS: &str = "3000";

#[test]
fn work_behind_a_transaction_pooler() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let cluster = Cluster::shared().expect("a throwaway Postgres cluster");
    let database = rt
        .block_on(cluster.create_database())
        .expect("a test database");
    let connect = cluster.connect_options(&database);
    let direct = format!(
        "postgres://{}@localhost:{}/{database}?host={}&sslmode=disable",
        connect.get_username(),
        connect.get_port(),
        connect.get_host()
    );
    let bouncer = PgBouncer::start(cluster, PoolMode::Transaction, 4).expect("PgBouncer starts");
    let pooled = bouncer.url(&database);

    // Refused before any work: the default (session) pooling behind a
    // transaction pooler, and a listener behind it.
    let out = crate::chatstate(&[
        "work",
        "--database-url",
        &pooled,
        "--heartbeat-stale-ms",
        STALE_MS,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("use Pooling::Transaction"), "{stderr}");
    let out = crate::chatstate(&[
        "work",
        "--database-url",
        &pooled,
        "--pooling",
        "transaction",
        "--heartbeat-stale-ms",
        STALE_MS,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("probe notification"), "{stderr}");

    // The chats, created directly, running and unowned.
    let store = rt.block_on(async {
        let pool = chatstate_store_pg::pool_options()
            .connect_with(connect)
            .await
            .expect("connecting to the test database");
        PgStore::new(pool)
    });
    let chats: Vec<_> = (0..3)
        .map(|i| {
            rt.block_on(create_chat(
                &store,
                &Notify::InTransaction,
                CreateChat {
                    messages: vec![NewMessage::user(format!("chat {i}"))],
                    ..CreateChat::default()
                },
            ))
            .expect("creating a chat")
            .chat_id
        })
        .collect();

    let mut child = Command::new(env!("CARGO_BIN_EXE_chatstate"))
        .args([
            "work",
            "--database-url",
            &pooled,
            "--pooling",
            "transaction",
        ])
        .args(["--listen-url", &direct, "--heartbeat-stale-ms", STALE_MS])
        .args(["--step-ms", "10"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the chatstate binary starts");
    let stderr = child.stderr.take().expect("piped stderr");
    let (lines, said) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut early = Vec::new();
    loop {
        match said.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.contains("running") => break,
            Ok(line) => early.push(line),
            Err(e) => {
                let _ = child.kill();
                panic!("the worker did not start ({e}): {}", early.join("\n"));
            }
        }
    }

    // Every chat's turn is generated and finished through the pooler.
    let deadline = Instant::now() + Duration::from_secs(60);
    let finished = loop {
        let states: Vec<(ExecutionState, usize)> = chats
            .iter()
            .map(|chat| {
                let m = ChatMachine::new(
                    store.clone(),
                    Notify::InTransaction,
                    *chat,
                    Options::default(),
                );
                let record = rt.block_on(m.load()).expect("loading a chat");
                (record.state(), record.history.len())
            })
            .collect();
        if states
            .iter()
            .all(|(s, n)| *s == ExecutionState::W && *n > 1)
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("waiting for the worker");
    assert!(
        finished,
        "the worker behind the pooler did not finish every turn"
    );
    assert!(status.success(), "the worker stopped with {status}");
}

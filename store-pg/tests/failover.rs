//! A failover under a running workload: a primary with a synchronous
//! standby, PgBouncer (session mode) in front of the primary, four tasks
//! committing steps on their chats through it. The primary is killed
//! (`-m immediate`), the standby promoted, PgBouncer pointed at it and
//! reloaded; the tasks go on. Afterwards, read on the new primary:
//!
//! - every Update acknowledged as committed is there, exactly once;
//! - every Update whose outcome was unknown is there at most once;
//! - every Update reported as not committed is absent;
//! - each chat's snapshot version is its initial one plus the steps there:
//!   no bump lost or doubled;
//! - the failures in between were typed (connection, read-only, unknown),
//!   and Updates succeed again after the promotion;
//! - before the failover, an Update sent to the standby fails with the
//!   typed, retryable `StoreErrorKind::ReadOnly`;
//! - a listener (through the pooler) reports the gap with
//!   `ListenerEvent::Reconnected` and then hears the new primary's commits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chatstate::{
    ChatMachine, CommitState, CreateChat, Error, NewMessage, Notify, Options, StoreErrorKind,
    create_chat,
};
use chatstate_model::ChatId;
use chatstate_store_pg::{ListenerEvent, PgNotifyListener, PgStore, pool_options};
use chatstate_testing::failover::{PRIMARY_PORT, ReplicatedPair, STANDBY_PORT};
use chatstate_testing::pgbouncer::{PgBouncer, PoolMode};

const DATABASE: &str = "chatstate_failover";
const TASKS: usize = 4;

/// What one attempted step came to, as the task was told.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Told {
    Committed,
    NotCommitted(&'static str),
    Unknown,
}

/// One attempted step: its message text and what the task was told.
#[derive(Clone, Debug)]
struct Attempt {
    text: String,
    told: Told,
    at: Instant,
}

fn kind_name(e: &Error) -> &'static str {
    match e {
        Error::Store(s) => match s.kind {
            StoreErrorKind::Connection => "connection",
            StoreErrorKind::ReadOnly => "read-only",
            StoreErrorKind::Timeout => "timeout",
            _ => "other store error",
        },
        _ => "other",
    }
}

async fn work(
    store: PgStore,
    chat: ChatId,
    task: usize,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
) -> Vec<Attempt> {
    let machine = ChatMachine::new(store, Notify::InTransaction, chat, Options::default());
    let mut attempts = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let text = format!("task {task} step {n}");
        let result = machine
            .update(async |tx| {
                tx.commit_step(vec![NewMessage::assistant(text.clone())], false)
                    .await
            })
            .await;
        let told = match &result {
            Ok(_) => Told::Committed,
            Err(e) => match e.commit_state() {
                CommitState::Committed => Told::Committed,
                CommitState::Unknown => Told::Unknown,
                _ => Told::NotCommitted(kind_name(e)),
            },
        };
        let failed = told != Told::Committed;
        if !failed {
            acks.fetch_add(1, Ordering::SeqCst);
        }
        attempts.push(Attempt {
            text,
            told,
            at: Instant::now(),
        });
        if failed {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    attempts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commits_survive_a_failover_to_the_synchronous_standby() {
    let pair = tokio::task::spawn_blocking(ReplicatedPair::start)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    pair.create_database(DATABASE)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let socket = pair.socket_dir().to_owned();
    let bouncer = PgBouncer::start_in_front_of(&socket, PRIMARY_PORT, PoolMode::Session, 20)
        .unwrap_or_else(|e| panic!("{e}"));
    let pool = pool_options()
        .max_connections(8)
        .connect_with(bouncer.connect_options(DATABASE))
        .await
        .expect("connecting through PgBouncer");
    let store = PgStore::new(pool);

    let mut chats = Vec::new();
    for i in 0..TASKS {
        let created = create_chat(
            &store,
            &Notify::InTransaction,
            CreateChat {
                messages: vec![NewMessage::user(format!("chat {i}"))],
                ..CreateChat::default()
            },
        )
        .await
        .expect("creating a chat");
        chats.push(created.chat_id);
    }
    let mut before = BTreeMap::new();
    for chat in &chats {
        let m = ChatMachine::new(
            store.clone(),
            Notify::InTransaction,
            *chat,
            Options::default(),
        );
        before.insert(*chat, m.load().await.unwrap().row.versions.snapshot);
    }

    // A write sent to the standby is refused with a typed, retryable
    // error (after a failover, the promoted server takes it).
    let on_standby = PgStore::new(
        pool_options()
            .max_connections(1)
            .connect_with(pair.connect_options(STANDBY_PORT, DATABASE))
            .await
            .expect("connecting to the standby"),
    );
    let refused = ChatMachine::new(
        on_standby,
        Notify::InTransaction,
        chats[0],
        Options::default(),
    )
    .update(async |tx| {
        tx.commit_step(vec![NewMessage::assistant("to the standby")], false)
            .await
    })
    .await
    .unwrap_err();
    match &refused {
        Error::Store(e) => assert_eq!(e.kind, StoreErrorKind::ReadOnly, "{e}"),
        other => panic!("{other}"),
    }
    assert!(refused.is_retryable());
    assert_eq!(refused.commit_state(), CommitState::NotCommitted);

    // A listener through the pooler (session mode keeps its session).
    let listen_pool = pool_options()
        .max_connections(1)
        .connect_lazy_with(bouncer.connect_options(DATABASE));
    let mut listener = PgNotifyListener::connect(&listen_pool)
        .await
        .expect("a listener through PgBouncer in session mode");
    listener
        .listen_chats(chats.clone())
        .await
        .expect("listening on the chats");

    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = chats
        .iter()
        .enumerate()
        .map(|(i, chat)| {
            let (stop, acks) = (stop.clone(), acks.clone());
            tokio::spawn(work(store.clone(), *chat, i, stop, acks))
        })
        .collect();

    // Let the workload run, then fail over.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let failover = {
        let crash = tokio::task::spawn_blocking(move || {
            pair.crash_primary()?;
            pair.promote_standby()?;
            Ok::<_, chatstate_testing::throwaway::HarnessError>(pair)
        });
        crash.await.unwrap().unwrap_or_else(|e| panic!("{e}"))
    };
    let promoted = Instant::now();
    bouncer
        .retarget(&socket, STANDBY_PORT)
        .unwrap_or_else(|e| panic!("{e}"));
    // Run on until the tasks have committed again for a while (bounded:
    // the assertions below say what went wrong if they never do).
    let at_promotion = acks.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    while acks.load(Ordering::SeqCst) < at_promotion + 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The listener lost its connection with the primary: it reports the
    // gap once it is back (on the new primary), and hears the new
    // primary's commits after that.
    let (mut reconnected, mut heard_after) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(reconnected && heard_after) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), listener.recv()).await {
            Ok(Ok(ListenerEvent::Reconnected)) => reconnected = true,
            Ok(Ok(ListenerEvent::Notification(_))) => heard_after |= reconnected,
            Ok(Ok(_)) => {}
            // A reconnect before PgBouncer reached the new primary: again.
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => {}
        }
    }
    stop.store(true, Ordering::SeqCst);
    let mut attempts = Vec::new();
    for task in tasks {
        attempts.push(task.await.expect("a workload task"));
    }

    // Read everything on the new primary, directly.
    let direct = PgStore::new(
        pool_options()
            .max_connections(2)
            .connect_with(failover.connect_options(STANDBY_PORT, DATABASE))
            .await
            .expect("connecting to the new primary"),
    );
    let (mut acknowledged, mut unknown, mut unknown_committed, mut refused) = (0, 0, 0, 0);
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    let mut first_after: Option<Duration> = None;
    for (chat, tried) in chats.iter().zip(&attempts) {
        let m = ChatMachine::new(
            direct.clone(),
            Notify::InTransaction,
            *chat,
            Options::default(),
        );
        let record = m.load().await.expect("loading a chat on the new primary");
        let texts: Vec<String> = record
            .history
            .iter()
            .map(|msg| format!("{:?}", msg.content))
            .collect();
        let count = |text: &str| {
            texts
                .iter()
                .filter(|t| t.contains(&format!("\"{text}\"")))
                .count()
        };
        let mut present = 0i64;
        for a in tried {
            let n = count(&a.text);
            match &a.told {
                Told::Committed => {
                    acknowledged += 1;
                    assert_eq!(n, 1, "acknowledged {} is there {n} times", a.text);
                    if a.at > promoted {
                        let after = a.at - promoted;
                        first_after = Some(first_after.map_or(after, |f| f.min(after)));
                    }
                }
                Told::Unknown => {
                    unknown += 1;
                    assert!(n <= 1, "unknown {} is there {n} times", a.text);
                    unknown_committed += n;
                }
                Told::NotCommitted(kind) => {
                    refused += 1;
                    *kinds.entry(kind).or_default() += 1;
                    assert_eq!(n, 0, "{} was reported not committed ({kind})", a.text);
                }
            }
            present += n as i64;
        }
        assert_eq!(
            record.row.versions.snapshot,
            before[chat] + present,
            "chat {chat:?}: one bump per step that is there"
        );
    }
    assert!(reconnected, "the listener never reported its reconnect");
    assert!(
        heard_after,
        "the listener heard nothing from the new primary"
    );
    println!(
        "failover: {acknowledged} acknowledged (lost 0), {unknown} unknown ({unknown_committed} \
         found committed), {refused} not committed {kinds:?}; first acknowledged Update \
         {first_after:?} after the promotion"
    );
    assert!(acknowledged > 0);
    assert!(
        first_after.is_some(),
        "no Update succeeded after the promotion"
    );
    assert!(!kinds.contains_key("other"), "untyped failures: {kinds:?}");
}

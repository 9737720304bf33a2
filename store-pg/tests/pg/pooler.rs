//! Behind PgBouncer in transaction pooling mode: [`Pooling::Transaction`]
//! keeps every result of the direct store at one request more per
//! statement with parameters; a store in [`Pooling::Session`] mode is told
//! apart from it by [`PgStore::check_pooling`], and fails with typed
//! errors rather than wrong results when used there anyway.

use std::sync::Arc;

use chatstate::StoreErrorKind;
use chatstate_model::{NewMessage, Transition};
use chatstate_store_pg::{PgStore, PgStoreFault, Pooling, pool_options, pool_options_for};
use sqlx::PgPool;

use crate::common::{Fx, fx, fx_on};
use crate::round_trips::cases;
use chatstate_testing::pgbouncer::{PgBouncer, PoolMode};
use chatstate_testing::throwaway::Cluster;

fn cluster() -> &'static Cluster {
    Cluster::shared().unwrap_or_else(|e| panic!("{e}"))
}

/// A fresh migrated database, its name.
async fn database_name() -> String {
    cluster()
        .create_database()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A pool on `database` through `bouncer`, made for `pooling`.
async fn pool_through(bouncer: &PgBouncer, database: &str, pooling: Pooling) -> PgPool {
    let options = bouncer.connect_options(database);
    let pool_options = match pooling {
        Pooling::Transaction => pool_options_for(Pooling::Transaction),
        _ => pool_options(),
    };
    pool_options
        .max_connections(8)
        .connect_with(options)
        .await
        .expect("connect through PgBouncer")
}

/// A direct pool on `database`.
async fn direct_pool(database: &str) -> PgPool {
    pool_options()
        .max_connections(8)
        .connect_with(cluster().connect_options(database))
        .await
        .expect("connect to the test database")
}

/// Requests one Update of a transition costs behind a transaction pooler:
/// the opening and the commit are simple queries (one each); every
/// statement with parameters is parsed, then bound and executed (two).
fn expected_round_trips(t: Transition) -> u64 {
    if t == Transition::EditMessage { 6 } else { 4 }
}

/// Every transition of the model, from a state that allows it, through
/// PgBouncer in transaction mode (two server connections for eight client
/// connections): the same outcome as on a direct connection, the same
/// snapshot version, and the round trips of the transaction-pooling path.
#[tokio::test]
async fn every_transition_behind_a_transaction_pooler_matches_the_direct_store() {
    let bouncer =
        PgBouncer::start(cluster(), PoolMode::Transaction, 2).unwrap_or_else(|e| panic!("{e}"));
    let name = database_name().await;
    let pooled = PgStore::new(pool_through(&bouncer, &name, Pooling::Transaction).await)
        .with_pooling(Pooling::Transaction);
    pooled
        .check_pooling()
        .await
        .expect("transaction pooling fits");
    let pooled = fx_on(pooled);
    let direct = fx().await;
    let mut covered = Vec::new();
    for case in &cases() {
        let mut results = Vec::new();
        for fx in [&direct, &pooled] {
            let chat = fx.reach(case.setup, case.from).await;
            let input = (case.input)(fx, &chat);
            let t = input.transition();
            let before = fx.store.round_trips();
            let out = fx
                .machine_in_tx(chat.id)
                .update(async |tx| tx.apply(input).await)
                .await
                .unwrap_or_else(|e| panic!("{t} from {:?}: {e}", case.from));
            let spent = fx.store.round_trips() - before;
            let version = fx.machine(chat.id).load().await.unwrap().row.versions;
            results.push((t, out.from, out.to, version, spent));
        }
        let (t, from, to, version, spent) = results[1];
        assert_eq!(
            (results[0].0, results[0].1, results[0].2, results[0].3),
            (t, from, to, version),
            "{t} from {from:?}: direct and pooled differ"
        );
        assert_eq!(spent, expected_round_trips(t), "{t} from {from:?}");
        covered.push(t);
    }
    covered.sort();
    covered.dedup();
    assert_eq!(covered.len(), 19, "covered {covered:?}");
}

/// Eight tasks commit steps on four chats through two server connections:
/// every Update succeeds and is there afterwards, read directly.
#[tokio::test]
async fn concurrent_updates_behind_a_transaction_pooler_lose_nothing() {
    const TASKS: usize = 8;
    const STEPS: usize = 12;
    let bouncer =
        PgBouncer::start(cluster(), PoolMode::Transaction, 2).unwrap_or_else(|e| panic!("{e}"));
    let name = database_name().await;
    let store = PgStore::new(pool_through(&bouncer, &name, Pooling::Transaction).await)
        .with_pooling(Pooling::Transaction);
    let fx = Arc::new(fx_on(store));
    let mut chats = Vec::new();
    for _ in 0..4 {
        chats.push(fx.create().await.id);
    }
    let mut before = Vec::new();
    for chat in &chats {
        before.push(fx.machine(*chat).load().await.unwrap());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let fx = fx.clone();
        let chat = chats[task % chats.len()];
        tasks.spawn(async move {
            for step in 0..STEPS {
                let text = format!("task {task} step {step}");
                fx.machine(chat)
                    .update(async |tx| {
                        tx.commit_step(vec![NewMessage::assistant(text.clone())], false)
                            .await
                    })
                    .await
                    .unwrap_or_else(|e| panic!("task {task} step {step}: {e}"));
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task");
    }
    let direct = fx_on(PgStore::new(direct_pool(&name).await));
    for (chat, before) in chats.iter().zip(&before) {
        let after = direct.machine(*chat).load().await.unwrap();
        let steps = (TASKS / chats.len() * STEPS) as i64;
        assert_eq!(
            after.row.versions.snapshot,
            before.row.versions.snapshot + steps
        );
        assert_eq!(after.history.len(), before.history.len() + steps as usize);
    }
}

fn fault(e: &chatstate::StoreError) -> Option<&PgStoreFault> {
    PgStoreFault::of(e)
}

/// The start-up check tells the modes apart: a session-mode store behind a
/// transaction pooler is refused, the same store connected directly and a
/// transaction-mode store behind the pooler pass.
#[tokio::test]
async fn check_pooling_refuses_session_mode_behind_a_transaction_pooler() {
    let bouncer =
        PgBouncer::start(cluster(), PoolMode::Transaction, 2).unwrap_or_else(|e| panic!("{e}"));
    let name = database_name().await;
    let session_behind = PgStore::new(pool_through(&bouncer, &name, Pooling::Session).await);
    let err = session_behind.check_pooling().await.unwrap_err();
    assert!(
        matches!(fault(&err), Some(PgStoreFault::SessionChanged { .. })),
        "{err}"
    );
    assert_eq!(err.kind, StoreErrorKind::Other);
    PgStore::new(direct_pool(&name).await)
        .check_pooling()
        .await
        .expect("a direct session-mode store passes");
    PgStore::new(pool_through(&bouncer, &name, Pooling::Transaction).await)
        .with_pooling(Pooling::Transaction)
        .check_pooling()
        .await
        .expect("a transaction-mode store passes");
}

/// The same pooler with one server connection: the probe's second
/// connection has to wait for it, which only a pooler makes it do.
#[tokio::test]
async fn check_pooling_refuses_session_mode_behind_a_one_connection_pooler() {
    let bouncer =
        PgBouncer::start(cluster(), PoolMode::Transaction, 1).unwrap_or_else(|e| panic!("{e}"));
    let name = database_name().await;
    let store = PgStore::new(pool_through(&bouncer, &name, Pooling::Session).await);
    let err = store.check_pooling().await.unwrap_err();
    assert!(
        matches!(fault(&err), Some(PgStoreFault::SessionChanged { .. })),
        "{err}"
    );
}

/// Transaction pooling runs chat creation, heartbeats and claim queries as
/// single statements at the database's default isolation level: anything
/// but READ COMMITTED is refused by the check.
#[tokio::test]
async fn transaction_pooling_needs_read_committed() {
    let bouncer =
        PgBouncer::start(cluster(), PoolMode::Transaction, 2).unwrap_or_else(|e| panic!("{e}"));
    let name = database_name().await;
    let mut admin = direct_pool(&name).await.acquire().await.unwrap();
    // The name is the harness's own (digits and ASCII letters).
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{name}\" SET default_transaction_isolation = 'repeatable read'"
    )))
    .execute(&mut *admin)
    .await
    .unwrap();
    let store = PgStore::new(pool_through(&bouncer, &name, Pooling::Transaction).await)
        .with_pooling(Pooling::Transaction);
    let err = store.check_pooling().await.unwrap_err();
    match fault(&err) {
        Some(PgStoreFault::IsolationNotReadCommitted { level }) => {
            assert_eq!(level, "repeatable read")
        }
        other => panic!("{other:?}: {err}"),
    }
}

/// The broken variant: the session-mode store (statements prepared per
/// session, sqlx's named statements) used behind a transaction pooler
/// anyway. Its Updates fail, every failure is the typed
/// [`PgStoreFault::SessionChanged`] and wrote nothing, and every Update
/// that reports success is there. (Here every client prepares the same
/// statements; clients whose statement names collide with different texts
/// could run another statement, which is why the store must be told, and
/// [`PgStore::check_pooling`] run at start-up.)
#[tokio::test]
async fn session_mode_behind_a_transaction_pooler_fails_typed() {
    let bouncer =
        PgBouncer::start(cluster(), PoolMode::Transaction, 2).unwrap_or_else(|e| panic!("{e}"));
    let name = database_name().await;
    let store = PgStore::new(pool_through(&bouncer, &name, Pooling::Session).await);
    let setup = fx_on(PgStore::new(direct_pool(&name).await));
    let chat = setup.create().await.id;
    let before = setup.machine(chat).load().await.unwrap();
    let fx: Arc<Fx> = Arc::new(fx_on(store));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8 {
        let fx = fx.clone();
        tasks.spawn(async move {
            let mut ok = 0i64;
            let mut errors = Vec::new();
            for step in 0..10 {
                let text = format!("task {task} step {step}");
                match fx
                    .machine(chat)
                    .update(async |tx| {
                        tx.commit_step(vec![NewMessage::assistant(text.clone())], false)
                            .await
                    })
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(e) => errors.push(e),
                }
            }
            (ok, errors)
        });
    }
    let mut ok = 0;
    let mut errors = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (n, e) = done.expect("task");
        ok += n;
        errors.extend(e);
    }
    assert!(
        !errors.is_empty(),
        "a session-mode store behind a transaction pooler went unnoticed"
    );
    for e in &errors {
        let chatstate::Error::Store(se) = e else {
            panic!("untyped failure: {e}")
        };
        assert!(
            matches!(fault(se), Some(PgStoreFault::SessionChanged { .. })),
            "{e}"
        );
    }
    let after = setup.machine(chat).load().await.unwrap();
    assert_eq!(
        after.row.versions.snapshot,
        before.row.versions.snapshot + ok
    );
    assert_eq!(after.history.len() as i64, before.history.len() as i64 + ok);
}

/// A listener behind a transaction pooler would hear nothing, silently:
/// connecting it there fails with a typed error; the same listener on a
/// direct connection hears its notifications.
#[tokio::test]
async fn a_listener_behind_a_transaction_pooler_is_refused() {
    let bouncer =
        PgBouncer::start(cluster(), PoolMode::Transaction, 2).unwrap_or_else(|e| panic!("{e}"));
    let name = database_name().await;
    let behind = pool_through(&bouncer, &name, Pooling::Transaction).await;
    let err = chatstate_store_pg::PgNotifyListener::connect(&behind)
        .await
        .unwrap_err();
    assert!(
        matches!(fault(&err), Some(PgStoreFault::ListenerNotDelivered { .. })),
        "{err}"
    );
    chatstate_store_pg::PgNotifyListener::connect(&direct_pool(&name).await)
        .await
        .expect("a direct listener hears its probe");
}

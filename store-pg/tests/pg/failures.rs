//! Failure edges: every error a caller must match surfaces with its kind
//! (timeouts, a server-ended idle transaction, a read-only server), nothing
//! commits, and the retrying Update rides out the transient ones; a failed
//! `migrate` leaves no lock behind. (Serialization failures cannot reach an
//! Update: it runs READ COMMITTED whatever the session default, tested in
//! `commit.rs`; their SQLSTATE mapping is unit-tested in `src/error.rs`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use chatstate::{ChatMachine, Error, Notify, RetryPolicy, StoreErrorKind};
use chatstate_model::ChatId;
use chatstate_store_pg::{PgStore, PgStoreFault, migrate};
use sqlx::PgPool;
use tokio::sync::oneshot;

use crate::common::{GUARD, database, fx, snapshot_version};

/// A store on a pool of its own whose sessions run with `settings`.
async fn store_with(pool: &PgPool, settings: &[(&str, &str)]) -> PgStore {
    let options = (*pool.connect_options())
        .clone()
        .options(settings.iter().copied());
    let own = chatstate_store_pg::pool_options()
        .connect_with(options)
        .await
        .expect("connect");
    PgStore::new(own)
}

fn machine(store: &PgStore, chat: ChatId) -> ChatMachine<PgStore> {
    ChatMachine::new(
        store.clone(),
        Notify::InTransaction,
        chat,
        chatstate::Options::default(),
    )
}

/// An Update of `chat` that holds the row lock (after a write of the row)
/// until `go` is sent.
struct Holder {
    go: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

async fn hold(store: &PgStore, chat: ChatId) -> Holder {
    let (entered_tx, entered) = oneshot::channel();
    let (go, go_rx) = oneshot::channel::<()>();
    let m = machine(store, chat);
    let task = tokio::spawn(async move {
        m.update(async move |tx| {
            tx.record_generation_attempt().await?;
            entered_tx.send(()).unwrap();
            go_rx.await.unwrap();
            Ok(())
        })
        .await
    });
    entered.await.unwrap();
    Holder { go, task }
}

impl Holder {
    async fn release(self) {
        self.go.send(()).unwrap();
        self.task.await.unwrap().expect("the holder commits");
    }
}

fn store_kind(e: &Error) -> StoreErrorKind {
    match e {
        Error::Store(s) => s.kind,
        other => panic!("expected a store error, got {other}"),
    }
}

/// Waits (bounded by [`GUARD`]) until `condition` holds; it polls the
/// server's own view, so it fails only if the condition never comes.
async fn until(pool: &PgPool, sql: &'static str, what: &str) {
    let deadline = Instant::now() + GUARD;
    loop {
        let done: bool = sqlx::query_scalar(sql).fetch_one(pool).await.unwrap();
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const NOBODY_IDLE_IN_TRANSACTION: &str = "SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity \
     WHERE datname = current_database() AND state = 'idle in transaction')";

#[tokio::test]
async fn lock_and_statement_timeouts_fail_the_update_as_retryable_timeouts() {
    let fx = fx().await;
    let chat = fx.create().await;
    let pool = fx.store.pool().clone();
    for setting in ["lock_timeout", "statement_timeout"] {
        let impatient = store_with(&pool, &[(setting, "50ms")]).await;
        let holder = hold(&fx.store, chat.id).await;
        let before = snapshot_version(&pool, chat.id).await;
        let err = machine(&impatient, chat.id)
            .update(async |tx| tx.record_generation_attempt().await)
            .await
            .unwrap_err();
        assert_eq!(
            store_kind(&err),
            StoreErrorKind::Timeout,
            "{setting}: {err}"
        );
        assert!(err.is_retryable(), "{setting}");
        holder.release().await;
        assert_eq!(
            snapshot_version(&pool, chat.id).await,
            before + 1,
            "{setting}"
        );
    }
}

#[tokio::test]
async fn a_server_ended_idle_transaction_is_a_timeout_and_commits_nothing() {
    let fx = fx().await;
    let chat = fx.create().await;
    let pool = fx.store.pool().clone();
    let impatient = store_with(&pool, &[("idle_in_transaction_session_timeout", "50ms")]).await;
    let before = snapshot_version(&pool, chat.id).await;
    let (entered_tx, entered) = oneshot::channel();
    let (go, go_rx) = oneshot::channel::<()>();
    let m = machine(&impatient, chat.id);
    let task = tokio::spawn(async move {
        m.update(async move |tx| {
            tx.record_generation_attempt().await?;
            entered_tx.send(()).unwrap();
            go_rx.await.unwrap();
            Ok(())
        })
        .await
    });
    entered.await.unwrap();
    until(
        &pool,
        NOBODY_IDLE_IN_TRANSACTION,
        "the server ends the idle transaction",
    )
    .await;
    go.send(()).unwrap();
    let err = task.await.unwrap().unwrap_err();
    // The server says 25P03 (Timeout) as it closes the session; over the
    // Unix socket the harness uses, the COMMIT's write meets the closed
    // socket before that can be read (Connection). Both mean: not
    // committed, retryable.
    assert!(
        matches!(
            store_kind(&err),
            StoreErrorKind::Timeout | StoreErrorKind::Connection
        ),
        "{err}"
    );
    assert!(err.is_retryable());
    assert!(!err.is_committed());
    assert_eq!(
        snapshot_version(&pool, chat.id).await,
        before,
        "nothing committed"
    );
}

#[tokio::test]
async fn a_read_only_server_is_read_only() {
    let fx = fx().await;
    let chat = fx.create().await;
    let pool = fx.store.pool().clone();
    let read_only = store_with(&pool, &[("default_transaction_read_only", "on")]).await;
    let before = snapshot_version(&pool, chat.id).await;
    let err = machine(&read_only, chat.id)
        .update(async |tx| tx.record_generation_attempt().await)
        .await
        .unwrap_err();
    assert_eq!(store_kind(&err), StoreErrorKind::ReadOnly, "{err}");
    assert!(err.is_retryable());
    assert_eq!(snapshot_version(&pool, chat.id).await, before);
}

/// The retrying Update rides out a backend killed under its first
/// attempt: the attempt rolled back (Connection), the next one commits.
#[tokio::test]
async fn the_retrying_update_rides_out_a_killed_backend() {
    let fx = fx().await;
    let chat = fx.create().await;
    let pool = fx.store.pool().clone();
    let before = snapshot_version(&pool, chat.id).await;
    let (entered_tx, entered) = oneshot::channel();
    let (killed, killed_rx) = oneshot::channel::<()>();
    let mut signals = Some((entered_tx, killed_rx));
    let attempts = Arc::new(AtomicU32::new(0));
    let m = machine(&fx.store, chat.id);
    let counted = attempts.clone();
    let task = tokio::spawn(async move {
        m.update_with_retry(&RetryPolicy::default(), || {
            let first = signals.take();
            let counted = counted.clone();
            async move |tx| {
                counted.fetch_add(1, Ordering::SeqCst);
                tx.record_generation_attempt().await?;
                if let Some((entered, killed)) = first {
                    entered.send(()).unwrap();
                    killed.await.unwrap();
                }
                Ok(())
            }
        })
        .await
    });
    entered.await.unwrap();
    let gone: bool = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity \
          WHERE datname = current_database() AND state = 'idle in transaction'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(gone);
    killed.send(()).unwrap();
    task.await.unwrap().expect("the second attempt commits");
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    let rec = machine(&fx.store, chat.id).load().await.unwrap();
    assert_eq!(rec.row.versions.snapshot, before + 1, "one commit");
    assert_eq!(rec.row.generation_attempt, 1);
}

/// A binary older than the schema is refused with both versions named,
/// before anything runs; a migration that fails after taking the
/// migrator's advisory lock leaves no lock behind, so another
/// connection's `migrate` right after does not hang.
#[tokio::test]
async fn migrate_refuses_a_newer_schema_and_never_leaves_its_lock_held() {
    let pool = database().await;
    let other = || async {
        chatstate_store_pg::pool_options()
            .connect_with((*pool.connect_options()).clone())
            .await
            .unwrap()
    };
    let bounded = |p: PgPool| async move {
        tokio::time::timeout(Duration::from_secs(10), async move { migrate(&p).await })
            .await
            .expect("migrate hangs: a lock was left held")
    };

    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from the future', true, '\\x00'::bytea, 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    for p in [pool.clone(), other().await] {
        let err = bounded(p).await.unwrap_err();
        let Some(PgStoreFault::SchemaNewerThanBinary { database, binary }) = PgStoreFault::of(&err)
        else {
            panic!("expected SchemaNewerThanBinary, got {err:?}");
        };
        assert_eq!((*database, *binary), (9999, 2));
        let text = err.to_string();
        assert!(text.contains("9999") && text.contains(" 2"), "{text}");
    }
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 9999")
        .execute(&pool)
        .await
        .unwrap();

    // A dirty migration fails inside the migrator, after it took its lock.
    sqlx::query("UPDATE _sqlx_migrations SET success = false WHERE version = 2")
        .execute(&pool)
        .await
        .unwrap();
    for p in [pool.clone(), other().await] {
        let err = bounded(p).await.unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Other, "{err}");
        assert!(err.to_string().contains("partially applied"), "{err}");
    }
    sqlx::query("UPDATE _sqlx_migrations SET success = true WHERE version = 2")
        .execute(&pool)
        .await
        .unwrap();
    bounded(other().await).await.expect("a clean migrate works");
}

//! Migration tooling: the status of a database's migrations, the SQL of
//! the pending ones, and refusals, on databases in every condition.

use chatstate::{CreateChat, Notify, create_chat};
use chatstate_model::NewMessage;
use chatstate_store_pg::migrations::{
    MigrationError, MigrationState, migration_status, pending_script, pending_sql,
};
use chatstate_store_pg::{PgStore, PgStoreFault, migrate};
use sqlx::{AssertSqlSafe, PgPool};

use crate::common::database;

/// A new database with nothing in it (no migration applied), on the
/// harness's server.
async fn empty_database() -> PgPool {
    let migrated = database().await;
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&migrated)
        .await
        .unwrap();
    let empty = format!("{name}_empty");
    // The name is the harness's own (ASCII letters, digits, underscores).
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE DATABASE \"{empty}\" TEMPLATE template0"
    )))
    .execute(&migrated)
    .await
    .unwrap();
    migrated.close().await;
    chatstate_store_pg::pool_options()
        .connect_with((*migrated.connect_options()).clone().database(&empty))
        .await
        .unwrap()
}

/// The embedded migrations' files, by version.
const FILES: [(i64, &str, &str); 2] = [
    (
        1,
        "chat execution state",
        include_str!("../../migrations/0001_chat_execution_state.sql"),
    ),
    (
        2,
        "chat snapshot cache",
        include_str!("../../migrations/0002_chat_snapshot_cache.sql"),
    ),
];

/// Whether each embedded migration is applied (with the right checksum).
async fn applied(pool: &PgPool) -> Vec<(i64, bool)> {
    migration_status(pool)
        .await
        .unwrap()
        .migrations
        .iter()
        .map(|m| {
            let applied = match m.state {
                MigrationState::Pending => false,
                MigrationState::Applied {
                    checksum_matches, ..
                } => {
                    assert!(checksum_matches, "migration {}", m.version);
                    true
                }
                ref other => panic!("migration {}: {other:?}", m.version),
            };
            (m.version, applied)
        })
        .collect()
}

/// A chat can be created: the schema works for the store.
async fn store_works(pool: &PgPool) {
    create_chat(
        &PgStore::new(pool.clone()),
        &Notify::InTransaction,
        CreateChat {
            messages: vec![NewMessage::user("hello")],
            ..CreateChat::default()
        },
    )
    .await
    .expect("create a chat on the migrated schema");
}

#[tokio::test]
async fn status_and_pending_sql_before_and_after_migrate() {
    let pool = empty_database().await;
    let before = migration_status(&pool).await.unwrap();
    assert!(!before.is_current() && before.unknown.is_empty());
    assert!(before.refusal().is_none());
    assert_eq!(applied(&pool).await, [(1, false), (2, false)]);
    let pending = pending_sql(&pool).await.unwrap();
    let got: Vec<(i64, &str, &str)> = pending
        .iter()
        .map(|p| (p.version, p.description.as_str(), p.sql.as_str()))
        .collect();
    assert_eq!(got, FILES);
    assert!(pending.iter().all(|p| !p.no_transaction));

    migrate(&pool).await.unwrap();
    let after = migration_status(&pool).await.unwrap();
    assert!(after.is_current(), "{after:?}");
    assert_eq!(after.pending().count(), 0);
    assert_eq!(applied(&pool).await, [(1, true), (2, true)]);
    assert!(pending_sql(&pool).await.unwrap().is_empty());
    store_works(&pool).await;
}

/// The script `chatstate migrate sql` prints, run by other tooling, leaves
/// the database as `migrate` would: current, and `migrate` has nothing
/// left to do. Applied one migration at a time, the rest stays pending.
#[tokio::test]
async fn the_pending_script_applied_elsewhere_counts_as_migrated() {
    let pool = empty_database().await;
    let pending = pending_sql(&pool).await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(pending_script(&pending[..1])))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(applied(&pool).await, [(1, true), (2, false)]);
    let rest = pending_sql(&pool).await.unwrap();
    assert_eq!(rest.iter().map(|p| p.version).collect::<Vec<_>>(), [2]);
    sqlx::raw_sql(AssertSqlSafe(pending_script(&rest)))
        .execute(&pool)
        .await
        .unwrap();
    assert!(migration_status(&pool).await.unwrap().is_current());
    assert_eq!(pending_script(&[]).lines().count(), 2, "nothing to run");
    migrate(&pool).await.expect("nothing left for migrate");
    store_works(&pool).await;
}

#[tokio::test]
async fn a_database_newer_than_the_binary_is_reported_and_refused() {
    let pool = database().await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (3, 'from the future', true, '\\x00'::bytea, 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let status = migration_status(&pool).await.unwrap();
    assert!(!status.is_current());
    let unknown: Vec<(i64, &str)> = status
        .unknown
        .iter()
        .map(|u| (u.version, u.description.as_str()))
        .collect();
    assert_eq!(unknown, [(3, "from the future")]);
    let newer = |e: &MigrationError| {
        matches!(
            e,
            MigrationError::SchemaNewerThanBinary {
                database: 3,
                binary: 2
            }
        )
    };
    assert!(status.refusal().as_ref().is_some_and(newer), "{status:?}");
    let err = pending_sql(&pool).await.unwrap_err();
    assert!(newer(&err), "{err:?}");
    assert_eq!(
        err.to_string(),
        "the database schema is at migration 3, newer than this binary's 2"
    );
    let err = migrate(&pool).await.unwrap_err();
    assert!(
        matches!(
            PgStoreFault::of(&err),
            Some(PgStoreFault::SchemaNewerThanBinary {
                database: 3,
                binary: 2
            })
        ),
        "{err:?}"
    );
}

/// What each damaged record makes the tooling say: (what, the statement
/// that damages it, the refusal expected).
#[tokio::test]
async fn altered_and_failed_migrations_are_refused() {
    type Check = fn(&MigrationError) -> bool;
    let cases: [(&str, &str, Check); 2] = [
        (
            "altered",
            "UPDATE _sqlx_migrations SET checksum = '\\x00'::bytea WHERE version = 2",
            |e| matches!(e, MigrationError::ChecksumMismatch { version: 2 }),
        ),
        (
            "failed",
            "UPDATE _sqlx_migrations SET success = false WHERE version = 1",
            |e| matches!(e, MigrationError::Failed { version: 1 }),
        ),
    ];
    for (what, damage, expected) in cases {
        let pool = database().await;
        sqlx::query(damage).execute(&pool).await.unwrap();
        let status = migration_status(&pool).await.unwrap();
        assert!(!status.is_current(), "{what}");
        let refusal = status.refusal().expect(what);
        assert!(expected(&refusal), "{what}: {refusal:?}");
        let err = pending_sql(&pool).await.unwrap_err();
        assert!(expected(&err), "{what}: {err:?}");
        migrate(&pool).await.expect_err(what);
    }
}

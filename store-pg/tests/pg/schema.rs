//! The schema: what it accepts and what it refuses.

use chatstate_model::ChatStatus;
use chatstate_store_pg::LEGACY_STATUSES;

use crate::common::database;

/// The quoted values of a `CHECK (col IN (...))` definition.
fn quoted_values(def: &str) -> Vec<String> {
    def.split('\'')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn status_check_allows_exactly_the_model_statuses_and_the_legacy_ones() {
    let pool = database().await;
    let def: String = sqlx::query_scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint \
          WHERE conrelid = 'chats'::regclass AND contype = 'c' \
            AND pg_get_constraintdef(oid) LIKE '%status%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let mut allowed = quoted_values(&def);
    allowed.sort();
    let mut expected: Vec<String> = ChatStatus::KNOWN
        .iter()
        .map(|s| s.as_str().to_owned())
        .chain(LEGACY_STATUSES.iter().map(|s| (*s).to_owned()))
        .collect();
    expected.sort();
    assert_eq!(allowed, expected, "constraint: {def}");
}

/// The `DATABASE_URL` path: a harness on an existing server (here the
/// throwaway cluster itself, reached by URL) creates migrated databases.
#[tokio::test]
async fn a_harness_on_a_url_creates_migrated_databases() {
    use chatstate_testing::throwaway::Cluster;
    let shared = Cluster::shared().unwrap_or_else(|e| panic!("{e}"));
    let Some(socket) = shared.socket_dir() else {
        // The shared harness itself runs on DATABASE_URL: covered already.
        return;
    };
    let url = format!(
        "postgres://postgres@localhost:5432/postgres?host={}",
        socket.display()
    );
    let harness = Cluster::from_url(&url).unwrap();
    let pool = harness.new_database().await.unwrap();
    let chats: i64 = sqlx::query_scalar("SELECT count(*) FROM chats")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(chats, 0);
}

//! Where `--store pg` gets its database: `--database-url`, else
//! `DATABASE_URL`, else a fresh database on a throwaway cluster that this
//! process starts (and that disappears when it exits), like the tests do.

use anyhow::Context as _;
use chatstate_store_pg::{PgStore, Pooling};
use chatstate_testing::throwaway::Cluster;

/// A connected, migrated Postgres store and a description of where it is.
pub(crate) struct PgTarget {
    pub(crate) store: PgStore,
    pub(crate) description: String,
    /// True for a database the user named (it may hold earlier runs).
    pub(crate) external: bool,
}

/// The database URL from the flag or the environment, if any.
pub(crate) fn url(flag: Option<&str>) -> Option<String> {
    flag.map(str::to_owned).or_else(|| {
        std::env::var("DATABASE_URL")
            .ok()
            .filter(|url| !url.is_empty())
    })
}

/// Connects to the named database and migrates it, or starts a throwaway
/// cluster and makes a fresh database on it.
pub(crate) async fn connect(flag: Option<&str>) -> anyhow::Result<PgTarget> {
    if let Some(url) = url(flag) {
        let pool = chatstate_store_pg::pool_options()
            .connect(&url)
            .await
            .context("connecting to the database URL")?;
        chatstate_store_pg::migrate(&pool)
            .await
            .context("migrating the database")?;
        return Ok(PgTarget {
            store: PgStore::new(pool),
            description: "the database of --database-url / DATABASE_URL".to_owned(),
            external: true,
        });
    }
    // Starting a cluster blocks for initdb and the server start.
    let cluster = tokio::task::spawn_blocking(Cluster::shared)
        .await
        .context("starting the throwaway cluster")?
        .context("starting a throwaway PostgreSQL cluster")?;
    let pool = cluster
        .new_database()
        .await
        .context("creating a database on the throwaway cluster")?;
    let description = match cluster.socket_dir() {
        Some(dir) => format!("a throwaway cluster (socket in {})", dir.display()),
        None => "a throwaway database".to_owned(),
    };
    Ok(PgTarget {
        store: PgStore::new(pool),
        description,
        external: false,
    })
}

/// Connects to the database `url` names for a store with the given
/// pooling, and runs the store's start-up check (a session-mode store
/// behind a transaction pooler is refused before it writes anything).
/// With `Pooling::Session` it migrates the database; behind a transaction
/// pooler it cannot (the migrator holds a session-level lock), so the
/// database must have been migrated directly (`chatstate migrate up`).
pub(crate) async fn connect_pooled(url: &str, pooling: Pooling) -> anyhow::Result<PgStore> {
    let pool = chatstate_store_pg::pool_options_for(pooling)
        .connect(url)
        .await
        .context("connecting to the database URL")?;
    if pooling == Pooling::Session {
        chatstate_store_pg::migrate(&pool)
            .await
            .context("migrating the database")?;
    }
    let store = PgStore::new(pool).with_pooling(pooling);
    store
        .check_pooling()
        .await
        .context("checking the connection against --pooling")?;
    Ok(store)
}

/// Connects to a database the user named, without migrating it (for the
/// commands that report on a schema rather than use it).
pub(crate) async fn connect_only(url: &str) -> anyhow::Result<PgStore> {
    let pool = chatstate_store_pg::pool_options()
        .max_connections(2)
        .connect(url)
        .await
        .context("connecting to the database URL")?;
    Ok(PgStore::new(pool))
}

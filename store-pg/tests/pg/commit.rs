//! Commit outcomes: a connection lost around `COMMIT` (through
//! [`Proxy`]), a poisoned transaction, and the pinned isolation level.

use std::collections::BTreeMap;

use chatstate::{
    BusyBehavior, ChatMachine, CommitState, Error, MetadataPatch, NewMessage, Notify,
    StoreErrorKind,
};
use chatstate_model::ExecutionState;
use chatstate_store_pg::PgStore;
use chatstate_testing::throwaway::Cluster;
use sqlx::{Connection, PgPool};

use crate::common::{Fx, Step, fx, scalar_i64, snapshot_version};
use crate::proxy::{Proxy, Trap};

/// A test database reached two ways: directly (to set up and to look),
/// and through a proxy (the store under test).
struct Proxied {
    direct: Fx,
    proxy: Proxy,
    store: PgStore,
}

async fn proxied() -> Proxied {
    let cluster = Cluster::shared().unwrap_or_else(|e| panic!("{e}"));
    let name = cluster.create_database().await.unwrap();
    let direct_pool = chatstate_store_pg::pool_options()
        .connect_with(cluster.connect_options(&name))
        .await
        .unwrap();
    let proxy = Proxy::start(cluster.socket_dir().expect("a throwaway cluster")).await;
    let pool = chatstate_store_pg::pool_options()
        .max_connections(2)
        .connect_with(proxy.connect_options(&name))
        .await
        .unwrap();
    let mut direct = fx().await;
    direct.store = PgStore::new(direct_pool);
    Proxied {
        direct,
        proxy,
        store: PgStore::new(pool),
    }
}

impl Proxied {
    fn machine(&self, chat: chatstate_model::ChatId) -> ChatMachine<PgStore> {
        ChatMachine::new(
            self.store.clone(),
            Notify::AfterCommit(self.direct.publisher.clone()),
            chat,
            self.direct.options,
        )
    }

    fn pool(&self) -> &PgPool {
        self.direct.store.pool()
    }

    async fn queued(&self, chat: chatstate_model::ChatId) -> i64 {
        scalar_i64(
            self.pool(),
            "SELECT count(*) FROM chat_queued_messages WHERE chat_id = $1",
            chat,
        )
        .await
    }
}

/// One case: the trap, whether new connections are refused after it, and
/// what the Update must report and leave.
struct Case {
    trap: Trap,
    refuse_after: bool,
    /// `None`: the Update returns Ok.
    error: Option<(CommitState, StoreErrorKind)>,
    /// The change is in the database afterwards.
    landed: bool,
}

async fn check(case: Case) {
    let p = proxied().await;
    let chat = p.direct.create().await;
    let before = snapshot_version(p.pool(), chat.id).await;
    p.proxy.arm(case.trap, case.refuse_after);
    let got = p
        .machine(chat.id)
        .update(async |tx| {
            tx.send_message(NewMessage::user("once"), BusyBehavior::Queue)
                .await
        })
        .await;
    assert_eq!(p.proxy.fired(), 1, "the trap fired");
    match (&got, case.error) {
        (Ok(_), None) => {}
        (Err(e), Some((state, kind))) => {
            assert_eq!(e.commit_state(), state, "{e:?}");
            assert!(
                matches!(e, Error::Store(s) if s.kind == kind),
                "kind {kind:?}: {e:?}"
            );
        }
        (got, want) => panic!("{:?}: got {got:?}, want error {want:?}", case.trap),
    }
    let after = snapshot_version(p.pool(), chat.id).await;
    let queued = p.queued(chat.id).await;
    if case.landed {
        assert_eq!((after, queued), (before + 1, 1), "{:?}", case.trap);
    } else {
        assert_eq!((after, queued), (before, 0), "{:?}", case.trap);
    }
    // Published after commit exactly when the Update returned Ok.
    let published = p
        .direct
        .publisher
        .published()
        .iter()
        .any(|n| n.channel.starts_with("chat:update"));
    assert_eq!(published, got.is_ok(), "{:?}", case.trap);
}

#[tokio::test]
async fn connection_lost_before_commit_reached_the_server_did_not_commit() {
    check(Case {
        trap: Trap::DropBeforeCommit,
        refuse_after: false,
        error: Some((CommitState::NotCommitted, StoreErrorKind::Connection)),
        landed: false,
    })
    .await;
}

#[tokio::test]
async fn connection_lost_after_commit_resolves_as_committed() {
    check(Case {
        trap: Trap::DropAfterCommit,
        refuse_after: false,
        error: None,
        landed: true,
    })
    .await;
}

#[tokio::test]
async fn connection_lost_after_commit_with_no_way_to_ask_is_unknown() {
    check(Case {
        trap: Trap::DropAfterCommit,
        refuse_after: true,
        error: Some((CommitState::Unknown, StoreErrorKind::OutcomeUnknown)),
        // The proxy forwarded the commit, so it did land; the store could
        // not know.
        landed: true,
    })
    .await;
}

#[tokio::test]
async fn lock_commit_lost_after_commit_resolves_as_committed() {
    let p = proxied().await;
    let chat = p.direct.create().await;
    p.proxy.arm(Trap::DropAfterCommit, false);
    p.machine(chat.id)
        .lock(async |l| {
            l.write_metadata(MetadataPatch {
                title: Some("kept".to_owned()),
                ..MetadataPatch::default()
            })
            .await
        })
        .await
        .expect("resolved as committed");
    assert_eq!(p.proxy.fired(), 1);
    let title: String = sqlx::query_scalar("SELECT title FROM chats WHERE id = $1")
        .bind(chat.id.0)
        .fetch_one(p.pool())
        .await
        .unwrap();
    assert_eq!(title, "kept");
}

/// A queued row deleted behind the store's back makes the plan's write
/// touch fewer rows than it names (PlanMismatch, after writing the chat
/// row); a callback that carries on must not commit.
#[tokio::test]
async fn store_error_poisons_the_update_even_if_the_callback_carries_on() {
    let fx = fx().await;
    let mut chat = fx.reach(&[Step::Acquire], ExecutionState::R0).await;
    fx.step(&mut chat, Step::Queue).await;
    let pool = fx.store.pool();
    let queued = chat.queued[0];
    sqlx::query("DELETE FROM chat_queued_messages WHERE id = $1")
        .bind(queued.0)
        .execute(pool)
        .await
        .unwrap();
    let before = snapshot_version(pool, chat.id).await;
    let queue_version = scalar_i64(
        pool,
        "SELECT queue_version FROM chats WHERE id = $1",
        chat.id,
    )
    .await;
    let published = fx.publisher.published().len();
    let got = fx
        .machine(chat.id)
        .update(async |tx| {
            let failed = tx.delete_queued_message(queued).await;
            assert!(
                matches!(&failed, Err(Error::Store(e)) if e.kind == StoreErrorKind::Data),
                "{failed:?}"
            );
            // Carries on, as it may after a rejection.
            Ok(())
        })
        .await;
    assert!(
        matches!(
            got,
            Err(Error::Poisoned {
                kind: StoreErrorKind::Data,
                ..
            })
        ),
        "{got:?}"
    );
    assert_eq!(got.unwrap_err().commit_state(), CommitState::NotCommitted);
    assert_eq!(snapshot_version(pool, chat.id).await, before);
    assert_eq!(
        scalar_i64(
            pool,
            "SELECT queue_version FROM chats WHERE id = $1",
            chat.id
        )
        .await,
        queue_version
    );
    assert_eq!(
        fx.publisher.published().len(),
        published,
        "nothing published"
    );
}

/// With the database's default isolation at SERIALIZABLE (and REPEATABLE
/// READ), contended Updates, chat creations and heartbeats still run at
/// READ COMMITTED: none fails with a serialization error, and the lean
/// Update keeps its three round trips.
#[tokio::test]
async fn isolation_is_read_committed_whatever_the_database_default() {
    for level in ["serializable", "repeatable read"] {
        let cluster = Cluster::shared().unwrap_or_else(|e| panic!("{e}"));
        let name = cluster.create_database().await.unwrap();
        let mut admin = sqlx::PgConnection::connect_with(&cluster.connect_options(&name))
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE \"{name}\" SET default_transaction_isolation = '{level}'"
        )))
        .execute(&mut admin)
        .await
        .unwrap();
        // A new session of the database gets the default.
        let mut plain = sqlx::PgConnection::connect_with(&cluster.connect_options(&name))
            .await
            .unwrap();
        let default: String = sqlx::query_scalar("SHOW default_transaction_isolation")
            .fetch_one(&mut plain)
            .await
            .unwrap();
        assert_eq!(default, level);
        let pool = chatstate_store_pg::pool_options()
            .connect_with(cluster.connect_options(&name))
            .await
            .unwrap();
        let mut fx = fx().await;
        fx.store = PgStore::new(pool);
        let chat = fx.reach(&[Step::Acquire], ExecutionState::R0).await;
        let mut tasks = Vec::new();
        // Fewer than the queue's limit (20), all contending for one row.
        for i in 0..16 {
            let m = fx.machine(chat.id);
            let runner = fx.owner.runner_id;
            tasks.push(tokio::spawn(async move {
                if i % 4 == 0 {
                    m.heartbeat(runner).await?;
                }
                m.update(async |tx| {
                    tx.send_message(NewMessage::user(format!("m{i}")), BusyBehavior::Queue)
                        .await
                })
                .await
                .map(drop)
            }));
        }
        let mut failures = BTreeMap::new();
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                *failures.entry(e.to_string()).or_insert(0) += 1;
            }
        }
        assert!(failures.is_empty(), "{level}: {failures:?}");
        // Created at 1, acquired at 2, then one bump per Update.
        assert_eq!(
            snapshot_version(fx.store.pool(), chat.id).await,
            2 + 16,
            "{level}"
        );
        // The round trips of the lean path are unchanged.
        let before = fx.store.round_trips();
        fx.machine(chat.id)
            .update(async |tx| {
                tx.send_message(NewMessage::user("counted"), BusyBehavior::Queue)
                    .await
            })
            .await
            .unwrap();
        assert_eq!(fx.store.round_trips() - before, 3, "{level}");
    }
}

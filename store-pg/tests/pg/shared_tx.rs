//! The application's own writes in an Update's transaction (through the
//! lent connection and deferred into the commit), and chat creation in the
//! application's transaction: the application's row is there exactly when
//! the chat's change is.

use chatstate::{
    BusyBehavior, ChatMachine, CommitState, CreateChat, Error, NewMessage, Notify, StoreErrorKind,
    Tx,
};
use chatstate_model::{ChatId, ExecutionState};
use chatstate_store_pg::{
    ListenerEvent, PgNotifyListener, PgStore, PgStoreFault, app_error, create_chat_in, sql_literal,
    update_channel,
};
use sqlx::{AssertSqlSafe, PgPool};

use crate::commit::proxied;
use crate::common::{fx, next, scalar_i64, send_marker, snapshot_version};
use crate::proxy::Trap;

/// The application's own table: one billing row per worker step, the step
/// name unique.
async fn billing_table(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE billing (step text PRIMARY KEY, chat_id uuid NOT NULL, tokens int NOT NULL)",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// Billing rows of a chat.
async fn billed(pool: &PgPool, chat: ChatId) -> i64 {
    scalar_i64(
        pool,
        "SELECT count(*) FROM billing WHERE chat_id = $1",
        chat,
    )
    .await
}

/// Assistant messages of a chat (the steps committed).
async fn steps(pool: &PgPool, chat: ChatId) -> i64 {
    scalar_i64(
        pool,
        "SELECT count(*) FROM chat_messages WHERE chat_id = $1 AND role = 'assistant'",
        chat,
    )
    .await
}

/// How the application writes its row.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// A statement on the transaction's connection, now.
    Connection,
    /// A statement deferred into the commit message.
    Deferred,
}

/// Bills `step` for `chat` in the Update's transaction.
async fn bill(tx: &mut Tx<'_, PgStore>, via: Via, step: &str) -> Result<(), Error> {
    let chat = tx.chat_id();
    match via {
        Via::Connection => {
            sqlx::query("INSERT INTO billing (step, chat_id, tokens) VALUES ($1, $2, 42)")
                .bind(step)
                .bind(chat.0)
                .execute(tx.app().connection())
                .await
                .map_err(app_error)?;
        }
        Via::Deferred => {
            let text = format!(
                // The trailing comment must not swallow what follows.
                "INSERT INTO billing (step, chat_id, tokens) VALUES ({}, '{}', 42) -- at commit",
                sql_literal(step).unwrap(),
                chat.0
            );
            tx.app().defer(AssertSqlSafe(text));
        }
    }
    Ok(())
}

/// What the callback does around the billing.
#[derive(Clone, Copy, Debug)]
enum Then {
    /// Commit a step, bill it, end.
    Commit,
    /// Commit a step, bill it, then fail with an error of its own.
    CallbackFails,
    /// Commit a step, bill it, then a transition the matrix rejects
    /// (archiving a running chat), its rejection returned.
    LaterRejected,
    /// Commit a step and bill a step already billed (a unique violation),
    /// returning the error.
    Duplicate,
    /// As `Duplicate`, but the callback swallows the error and returns Ok.
    DuplicateSwallowed,
}

/// What the Update must report.
#[derive(Clone, Copy, Debug)]
enum Expect {
    Landed,
    Rejected,
    Callback,
    /// A store error of this kind (never committed).
    Store(StoreErrorKind),
    /// The commit found the transaction aborted.
    Aborted,
}

#[tokio::test]
async fn the_application_row_is_there_exactly_when_the_step_is() {
    let fx = fx().await;
    let pool = fx.store.pool().clone();
    billing_table(&pool).await;
    // The step every `Duplicate` case bills again, billed to another chat.
    sqlx::query("INSERT INTO billing VALUES ('taken', gen_random_uuid(), 1)")
        .execute(&pool)
        .await
        .unwrap();
    let cases = [
        (Via::Connection, Then::Commit, Expect::Landed),
        (Via::Deferred, Then::Commit, Expect::Landed),
        (Via::Connection, Then::CallbackFails, Expect::Callback),
        (Via::Deferred, Then::CallbackFails, Expect::Callback),
        (Via::Connection, Then::LaterRejected, Expect::Rejected),
        (Via::Deferred, Then::LaterRejected, Expect::Rejected),
        (
            Via::Connection,
            Then::Duplicate,
            Expect::Store(StoreErrorKind::Data),
        ),
        (Via::Connection, Then::DuplicateSwallowed, Expect::Aborted),
        // Deferred, the violation surfaces at commit, whatever the
        // callback does.
        (
            Via::Deferred,
            Then::Duplicate,
            Expect::Store(StoreErrorKind::Data),
        ),
    ];
    for (via, then, expect) in cases {
        let label = format!("{via:?} {then:?}");
        let chat = fx.create().await;
        let m = fx.machine(chat.id);
        let before = snapshot_version(&pool, chat.id).await;
        let got = m
            .update(async |tx| {
                tx.commit_step(vec![NewMessage::assistant("step")], false)
                    .await?;
                match then {
                    // A quote in the value: inlined deferred, it must be quoted.
                    Then::Commit => bill(tx, via, &format!("{label}'s step")).await,
                    Then::CallbackFails => {
                        bill(tx, via, &label).await?;
                        Err(Error::callback("the application changed its mind"))
                    }
                    Then::LaterRejected => {
                        bill(tx, via, &label).await?;
                        tx.set_archived(true).await.map(|_| ())
                    }
                    Then::Duplicate => bill(tx, via, "taken").await,
                    Then::DuplicateSwallowed => {
                        let failed = bill(tx, via, "taken").await;
                        assert!(failed.is_err(), "{label}: the duplicate fails");
                        Ok(())
                    }
                }
            })
            .await;
        let landed = matches!(expect, Expect::Landed);
        match (&got, expect) {
            (Ok(()), Expect::Landed) => {}
            (Err(e), Expect::Rejected) if e.rejection().is_some() => {}
            (Err(Error::Callback(_)), Expect::Callback) => {}
            (Err(Error::Store(e)), Expect::Store(kind)) if e.kind == kind => {}
            (Err(Error::Store(e)), Expect::Aborted)
                if matches!(PgStoreFault::of(e), Some(PgStoreFault::TransactionAborted)) => {}
            (got, want) => panic!("{label}: got {got:?}, want {want:?}"),
        }
        if let Err(e) = &got {
            assert_eq!(e.commit_state(), CommitState::NotCommitted, "{label}");
        }
        let after = snapshot_version(&pool, chat.id).await;
        assert_eq!(after, before + i64::from(landed), "{label}: snapshot");
        assert_eq!(steps(&pool, chat.id).await, i64::from(landed), "{label}");
        assert_eq!(billed(&pool, chat.id).await, i64::from(landed), "{label}");
        let published = fx
            .publisher
            .published()
            .iter()
            .any(|p| p.channel == update_channel(chat.id));
        assert_eq!(published, landed, "{label}: published");
        // Whatever happened, the chat takes the next Update.
        m.update(async |tx| tx.record_generation_attempt().await)
            .await
            .unwrap_or_else(|e| panic!("{label}: next update: {e}"));
    }
    assert_eq!(
        scalar_i64(
            &pool,
            "SELECT count(*) FROM billing WHERE chat_id <> $1",
            ChatId(uuid::Uuid::nil())
        )
        .await,
        3,
        "the 'taken' row and the two committed cases"
    );
}

#[tokio::test]
async fn a_lost_commit_reports_its_outcome_and_the_row_follows_it() {
    for via in [Via::Connection, Via::Deferred] {
        for (trap, refuse_after, state) in [
            (
                Trap::DropBeforeCommit,
                false,
                Some(CommitState::NotCommitted),
            ),
            (Trap::DropAfterCommit, false, None),
            (Trap::DropAfterCommit, true, Some(CommitState::Unknown)),
        ] {
            let label = format!("{via:?} {trap:?} refuse {refuse_after}");
            let p = proxied().await;
            billing_table(p.pool()).await;
            let chat = p.direct.create().await;
            let before = snapshot_version(p.pool(), chat.id).await;
            p.proxy.arm(trap, refuse_after);
            let got = p
                .machine(chat.id)
                .update(async |tx| {
                    tx.commit_step(vec![NewMessage::assistant("step")], false)
                        .await?;
                    bill(tx, via, "step").await
                })
                .await;
            assert_eq!(p.proxy.fired(), 1, "{label}: the trap fired");
            assert_eq!(
                got.as_ref().err().map(Error::commit_state),
                state,
                "{label}"
            );
            // Resolved or not, the proxy forwarded the commit exactly when
            // it dropped the connection after it.
            let landed = trap == Trap::DropAfterCommit;
            let after = snapshot_version(p.pool(), chat.id).await;
            assert_eq!(after, before + i64::from(landed), "{label}");
            assert_eq!(steps(p.pool(), chat.id).await, i64::from(landed), "{label}");
            assert_eq!(
                billed(p.pool(), chat.id).await,
                i64::from(landed),
                "{label}"
            );
        }
    }
}

#[tokio::test]
async fn an_application_commit_on_the_lent_connection_makes_the_outcome_unknown() {
    let fx = fx().await;
    let pool = fx.store.pool().clone();
    billing_table(&pool).await;
    let chat = fx.create().await;
    let m = fx.machine(chat.id);
    let err = m
        .update(async |tx| {
            tx.commit_step(vec![NewMessage::assistant("step")], false)
                .await?;
            bill(tx, Via::Connection, "step").await?;
            sqlx::raw_sql("COMMIT")
                .execute(tx.app().connection())
                .await
                .map_err(app_error)?;
            Ok(())
        })
        .await
        .unwrap_err();
    let Error::Store(e) = &err else {
        panic!("expected a store error, got {err:?}");
    };
    assert!(
        matches!(
            PgStoreFault::of(e),
            Some(PgStoreFault::TransactionEndedByCaller)
        ),
        "{e:?}"
    );
    assert_eq!(err.commit_state(), CommitState::Unknown);
    // Nothing was published for a change the store cannot vouch for.
    assert!(fx.publisher.published().is_empty());
    // The next Update runs on a sound connection.
    m.update(async |tx| tx.record_generation_attempt().await)
        .await
        .unwrap();
}

#[tokio::test]
async fn round_trips_of_an_update_with_one_application_statement() {
    let p = proxied().await;
    billing_table(p.pool()).await;
    let chat = p.direct.create().await;
    let m = p.machine(chat.id);
    let mut n = 0;
    let mut update = async |via: Option<Via>| {
        n += 1;
        let step = format!("step {n}");
        let (store, proxy) = (p.store.round_trips(), p.proxy.requests());
        m.update(async |tx| {
            tx.send_message(NewMessage::user("more"), BusyBehavior::Queue)
                .await?;
            match via {
                Some(via) => bill(tx, via, &step).await,
                None => Ok(()),
            }
        })
        .await
        .unwrap();
        (p.store.round_trips() - store, p.proxy.requests() - proxy)
    };
    // Warm: the connection exists and has prepared the statements.
    for via in [None, Some(Via::Connection), Some(Via::Deferred)] {
        update(via).await;
    }
    assert_eq!(update(None).await, (3, 3), "no application statement");
    assert_eq!(
        update(Some(Via::Deferred)).await,
        (3, 3),
        "deferred: rides in the commit message"
    );
    assert_eq!(
        update(Some(Via::Connection)).await,
        (3, 4),
        "on the connection: one round trip more, not counted by the store"
    );
}

#[tokio::test]
async fn create_chat_in_the_application_transaction_commits_or_rolls_back_with_it() {
    let fx = fx().await;
    let pool = fx.store.pool().clone();
    sqlx::query("CREATE TABLE conversations (chat_id uuid PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    let mut listener = PgNotifyListener::connect(&pool).await.unwrap();
    listener.listen_ownership().await.unwrap();
    let exists = async |id: ChatId| {
        let chats = scalar_i64(&pool, "SELECT count(*) FROM chats WHERE id = $1", id).await;
        let rows = scalar_i64(
            &pool,
            "SELECT count(*) FROM conversations WHERE chat_id = $1",
            id,
        )
        .await;
        assert_eq!(chats, rows, "the chat and the application row agree");
        chats == 1
    };
    for (marker, commit) in [(1, false), (2, true)] {
        let id = ChatId::new_random();
        listener.listen_chats([id]).await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        let pending = create_chat_in(
            &mut tx,
            &Notify::InTransaction,
            CreateChat {
                id: Some(id),
                messages: vec![NewMessage::user("hello")],
                ..CreateChat::default()
            },
        )
        .await
        .unwrap();
        assert!(pending.notifications.is_empty(), "sent with the commit");
        sqlx::query("INSERT INTO conversations VALUES ($1)")
            .bind(id.0)
            .execute(&mut *tx)
            .await
            .unwrap();
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        assert_eq!(exists(id).await, commit);
        if commit {
            let mut heard = Vec::new();
            for _ in 0..2 {
                let ListenerEvent::Notification(n) = next(&mut listener).await else {
                    panic!("reconnected");
                };
                assert_eq!(n.chat_id(), id);
                heard.push(n.channel());
            }
            heard.sort();
            assert_eq!(heard, ["chat:ownership".to_owned(), update_channel(id)]);
        }
        // Nothing else (nothing at all after a rollback): the marker is
        // what comes next.
        let marker = send_marker(&pool, marker).await;
        assert_eq!(
            next(&mut listener).await,
            ListenerEvent::Notification(marker)
        );
        if commit {
            let m = ChatMachine::new(fx.store.clone(), Notify::InTransaction, id, fx.options);
            assert_eq!(m.load().await.unwrap().state(), ExecutionState::R0);
        }
    }
}

#[tokio::test]
async fn create_chat_in_with_a_publisher_publishes_only_what_the_application_committed() {
    let fx = fx().await;
    let pool = fx.store.pool().clone();
    let notify = Notify::AfterCommit(fx.publisher.clone());
    for commit in [false, true] {
        let mut tx = pool.begin().await.unwrap();
        let pending = create_chat_in(
            &mut tx,
            &notify,
            CreateChat {
                messages: vec![NewMessage::user("hello")],
                ..CreateChat::default()
            },
        )
        .await
        .unwrap();
        let id = pending.created.chat_id;
        assert_eq!(pending.notifications.len(), 2, "an update and a hint");
        assert!(fx.publisher.published().is_empty(), "nothing before commit");
        if commit {
            tx.commit().await.unwrap();
            pending.publish(fx.publisher.as_ref()).unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        let chats = scalar_i64(&pool, "SELECT count(*) FROM chats WHERE id = $1", id).await;
        assert_eq!(chats, i64::from(commit));
        let published: Vec<String> = fx
            .publisher
            .published()
            .into_iter()
            .map(|p| p.channel)
            .collect();
        if commit {
            assert_eq!(published, [update_channel(id), "chat:ownership".to_owned()]);
        } else {
            assert!(published.is_empty());
        }
    }
}

#[tokio::test]
async fn create_chat_in_with_a_taken_id_is_rejected_and_the_transaction_goes_on() {
    let fx = fx().await;
    let pool = fx.store.pool().clone();
    let chat = fx.create().await;
    let mut tx = pool.begin().await.unwrap();
    let err = create_chat_in(
        &mut tx,
        &Notify::InTransaction,
        CreateChat {
            id: Some(chat.id),
            messages: vec![NewMessage::user("again")],
            ..CreateChat::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.rejection().map(|r| r.from), Some(ExecutionState::R0));
    // The application's transaction is intact: it still writes and commits.
    sqlx::query("CREATE TABLE after_rejection (x int)")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        scalar_i64(
            &pool,
            "SELECT count(*) FROM chat_messages WHERE chat_id = $1",
            chat.id
        )
        .await,
        1,
        "the existing chat is untouched"
    );
}

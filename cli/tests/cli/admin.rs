//! `chatstate migrate`, `inspect` and `chats` against databases on the
//! throwaway cluster, reached by URL as a user would.

use std::collections::BTreeSet;
use std::process::{Command, Output};

use chatstate::{BusyBehavior, ChatMachine, ChatMetadata, CreateChat, Notify, create_chat};
use chatstate_model::{ChatId, NewMessage, Options, Owner, RunnerId, WorkerId};
use chatstate_store_pg::PgStore;
use chatstate_testing::throwaway::Cluster;
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool};

/// Runs `chatstate` with `args`, never with a `DATABASE_URL` from the
/// environment (these commands read it).
fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatstate"))
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .expect("the chatstate binary runs")
}

/// Runs it and requires exit status `code`; returns stdout and stderr.
fn expect(code: i32, args: &[&str]) -> (String, String) {
    let out = run(args);
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 stdout");
    let stderr = String::from_utf8(out.stderr).expect("UTF-8 stderr");
    assert_eq!(
        out.status.code(),
        Some(code),
        "chatstate {args:?}:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    (stdout, stderr)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A database on the harness's server: its URL and a pool on it. Empty
/// (never migrated) unless `migrated`.
async fn database(migrated: bool) -> (String, PgPool) {
    let cluster = tokio::task::spawn_blocking(Cluster::shared)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut name = cluster.create_database().await.unwrap();
    if !migrated {
        let pool = PgPool::connect_with(cluster.connect_options(&name))
            .await
            .unwrap();
        name.push_str("_empty");
        // The harness's own name: ASCII letters, digits and underscores.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE DATABASE \"{name}\" TEMPLATE template0"
        )))
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let url = match cluster.socket_dir() {
        Some(socket) => format!(
            "postgres://postgres@localhost:5432/{name}?host={}",
            socket.display()
        ),
        // The harness runs on DATABASE_URL: the same server, another database.
        None => {
            let base = std::env::var("DATABASE_URL").unwrap();
            let (head, query) = base.split_once('?').unwrap_or((&base, ""));
            let (server, _) = head.rsplit_once('/').unwrap();
            let query = if query.is_empty() {
                String::new()
            } else {
                format!("?{query}")
            };
            format!("{server}/{name}{query}")
        }
    };
    let pool = chatstate_store_pg::pool_options()
        .connect_with(cluster.connect_options(&name))
        .await
        .unwrap();
    (url, pool)
}

#[test]
fn migrate_status_sql_and_up_on_a_new_database() {
    let rt = runtime();
    let (url, _pool) = rt.block_on(database(false));
    let url = url.as_str();

    let (text, _) = expect(1, &["migrate", "status", "--database-url", url]);
    assert!(
        text.contains("chat execution state") && text.contains("pending"),
        "{text}"
    );
    assert!(text.contains("pending: migrations 1, 2"), "{text}");
    let (text, _) = expect(1, &["migrate", "status", "--json", "--database-url", url]);
    let status = json(&text);
    assert_eq!(status["current"], false);
    let states: Vec<&str> = status["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["pending", "pending"]);

    let (script, _) = expect(0, &["migrate", "sql", "--database-url", url]);
    for needle in [
        "CREATE TABLE IF NOT EXISTS _sqlx_migrations",
        "-- Migration 1: chat execution state\nBEGIN;\n",
        "CREATE TABLE chats",
        "-- Migration 2: chat snapshot cache",
        "INSERT INTO _sqlx_migrations",
        "COMMIT;",
    ] {
        assert!(script.contains(needle), "{needle:?} missing from\n{script}");
    }
    let (text, _) = expect(0, &["migrate", "sql", "--json", "--database-url", url]);
    let pending = json(&text);
    let versions: Vec<i64> = pending
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2]);
    assert!(
        pending[0]["sql"]
            .as_str()
            .unwrap()
            .contains("CREATE TABLE chats")
    );
    assert!(
        pending[1]["record_sql"]
            .as_str()
            .unwrap()
            .starts_with("INSERT INTO")
    );

    let (text, _) = expect(0, &["migrate", "up", "--database-url", url]);
    assert!(text.starts_with("applied migrations 1, 2\n"), "{text}");
    assert!(text.contains("current"), "{text}");
    let (text, _) = expect(0, &["migrate", "status", "--database-url", url]);
    assert!(
        text.contains("current: the schema is this binary's"),
        "{text}"
    );
    let (text, _) = expect(0, &["migrate", "up", "--json", "--database-url", url]);
    let up = json(&text);
    assert_eq!(up["applied"], json("[]"));
    assert_eq!(up["status"]["current"], true);
    let (script, _) = expect(0, &["migrate", "sql", "--database-url", url]);
    assert!(script.contains("Nothing is pending"), "{script}");
}

#[test]
fn migrate_refuses_a_newer_database_and_a_missing_url() {
    let rt = runtime();
    let (url, pool) = rt.block_on(database(true));
    let url = url.as_str();
    rt.block_on(
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
             execution_time) VALUES (3, 'from the future', true, '\\x00'::bytea, 0)",
        )
        .execute(&pool),
    )
    .unwrap();
    let newer = "the database schema is at migration 3, newer than this binary's 2";
    let (text, _) = expect(1, &["migrate", "status", "--database-url", url]);
    assert!(
        text.contains("from the future") && text.contains("UNKNOWN"),
        "{text}"
    );
    assert!(text.contains(newer), "{text}");
    let (text, _) = expect(1, &["migrate", "status", "--json", "--database-url", url]);
    let status = json(&text);
    assert_eq!(status["unknown"][0]["version"], 3);
    assert_eq!(status["refusal"], newer);
    for action in ["up", "sql"] {
        let (out, err) = expect(2, &["migrate", action, "--database-url", url]);
        assert!(err.contains(newer), "{action}: {err}");
        assert!(out.is_empty(), "{action}: {out}");
    }

    let (_, err) = expect(2, &["migrate", "status"]);
    assert!(err.contains("--database-url or DATABASE_URL"), "{err}");
    let (_, err) = expect(2, &["chats"]);
    assert!(err.contains("--database-url or DATABASE_URL"), "{err}");
}

#[test]
fn inspect_and_chats_show_a_chat_with_a_queue_and_a_lease() {
    let rt = runtime();
    let (url, pool) = rt.block_on(database(true));
    let url = url.as_str();
    let store = PgStore::new(pool);
    let owner = Owner {
        worker_id: WorkerId::new_random(),
        runner_id: RunnerId::new_random(),
    };
    let (owned, unowned) = rt.block_on(async {
        let create = || async {
            create_chat(
                &store,
                &Notify::InTransaction,
                CreateChat {
                    metadata: ChatMetadata {
                        title: "support".to_owned(),
                        ..ChatMetadata::default()
                    },
                    messages: vec![NewMessage::user("hello")],
                    ..CreateChat::default()
                },
            )
            .await
            .unwrap()
            .chat_id
        };
        let owned = create().await;
        let unowned = create().await;
        ChatMachine::new(
            store.clone(),
            Notify::InTransaction,
            owned,
            Options::default(),
        )
        .update(async |tx| {
            tx.acquire(owner.worker_id, owner.runner_id).await?;
            tx.send_message(NewMessage::user("and another thing"), BusyBehavior::Queue)
                .await?;
            Ok(())
        })
        .await
        .unwrap();
        (owned, unowned)
    });
    let id = owned.0.to_string();

    let (text, _) = expect(0, &["inspect", &id, "--database-url", url]);
    for needle in [
        format!("chat {id}"),
        "state     R1 (status running, not archived)".to_owned(),
        "title     \"support\"".to_owned(),
        format!("worker {} runner {}", owner.worker_id.0, owner.runner_id.0),
        ", fresh".to_owned(),
        "not needed: the lease is fresh".to_owned(),
        "versions  snapshot 2, history 1, queue 2".to_owned(),
        "queue (1):".to_owned(),
        "\"and another thing\"".to_owned(),
        "history (1 rows, 1 active; the last 1):".to_owned(),
        "\"hello\"".to_owned(),
        "may do next (matrix row R1):".to_owned(),
        "FinishTurn               -> R0, R1".to_owned(),
        "Abandon                  -> R1".to_owned(),
    ] {
        assert!(text.contains(&needle), "{needle:?} missing from\n{text}");
    }
    let (text, _) = expect(
        0,
        &[
            "inspect",
            &id,
            "--json",
            "--history",
            "0",
            "--database-url",
            url,
        ],
    );
    let got = json(&text);
    assert_eq!(got["state"], "R1");
    assert_eq!(got["row"]["status"], "running");
    assert_eq!(got["lease"]["freshness"], "fresh");
    assert_eq!(got["needs_worker"], false);
    assert_eq!(got["queue"].as_array().unwrap().len(), 1);
    assert_eq!(got["recent_history"], json("[]"));
    assert_eq!(got["history_rows"], 1);
    assert!(
        got["next"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["transition"] == "PromoteQueuedMessage" && n["to"] == json(r#"["I1"]"#))
    );
    // A threshold shorter than the heartbeat's age: stale.
    let (text, _) = expect(
        0,
        &[
            "inspect",
            &id,
            "--json",
            "--heartbeat-stale-secs",
            "0.000001",
            "--database-url",
            url,
        ],
    );
    assert_eq!(json(&text)["lease"]["freshness"], "stale");
    assert_eq!(json(&text)["needs_worker"], true);

    let nobody = ChatId(uuid::Uuid::new_v4()).0.to_string();
    let (out, err) = expect(1, &["inspect", &nobody, "--database-url", url]);
    assert!(out.is_empty() && err.contains("not found"), "{err}");
    let (out, _) = expect(1, &["inspect", &nobody, "--json", "--database-url", url]);
    assert_eq!(json(&out), Value::Null);

    let listed = |args: &[&str]| -> BTreeSet<String> {
        let mut all = vec!["chats", "--json", "--database-url", url];
        all.extend_from_slice(args);
        let (text, _) = expect(0, &all);
        json(&text)
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let both: BTreeSet<String> = [owned, unowned].iter().map(|c| c.0.to_string()).collect();
    let only = |c: ChatId| BTreeSet::from([c.0.to_string()]);
    assert_eq!(listed(&[]), both);
    assert_eq!(listed(&["--state", "R0,R1"]), both);
    assert_eq!(listed(&["--state", "R1"]), only(owned));
    assert_eq!(listed(&["--state", "W,XW"]), BTreeSet::new());
    assert_eq!(
        listed(&["--status", "running", "--archived", "false"]),
        both
    );
    assert_eq!(listed(&["--stale-lease"]), only(unowned));
    assert_eq!(listed(&["--limit", "1"]).len(), 1);

    let (text, _) = expect(0, &["chats", "--stale-lease", "--database-url", url]);
    assert!(text.starts_with("chat "), "{text}");
    assert!(
        text.contains(&unowned.0.to_string()) && !text.contains(&id),
        "{text}"
    );
    assert!(text.contains(" R0 ") && text.contains("unowned"), "{text}");
    assert!(text.ends_with("1 chat\n"), "{text}");

    let (_, err) = expect(2, &["chats", "--state", "R7", "--database-url", url]);
    assert!(err.contains("unknown state \"R7\""), "{err}");
}

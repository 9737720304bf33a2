//! A throwaway primary with a synchronous streaming standby, for failover
//! tests: built from the installed server package (`initdb`,
//! `pg_basebackup`, `pg_ctl`), both listening on Unix sockets in one fresh
//! directory (primary on port 5432, standby on 5433), run as the
//! `postgres` system user under root like [`crate::throwaway`].
//!
//! The primary runs with `synchronous_standby_names = '*'` and
//! `synchronous_commit = on`: a COMMIT is acknowledged only once the
//! standby has flushed it, so every acknowledged commit survives the
//! primary's loss. [`ReplicatedPair::start`] returns once the standby
//! streams synchronously. A watchdog stops both servers and removes the
//! directory when the process exits, however it exits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::throwaway::{
    HarnessError, find_bindir, initdb, postgres_ids, run, running_as_root, server_command,
    spawn_watchdog, unavailable,
};

/// The primary's port (the socket's name).
pub const PRIMARY_PORT: u16 = 5432;
/// The standby's port.
pub const STANDBY_PORT: u16 = 5433;

/// How long the standby gets to stream synchronously.
const SYNC_WAIT: Duration = Duration::from_secs(60);

/// A primary and its synchronous standby.
#[derive(Debug)]
pub struct ReplicatedPair {
    bindir: PathBuf,
    as_postgres: bool,
    base: PathBuf,
    socket_dir: PathBuf,
    /// Stops both servers and removes `base` when this process exits.
    _watchdog: Child,
}

impl ReplicatedPair {
    /// Builds and starts the pair (a few seconds: `initdb`, a base backup
    /// with a fast checkpoint, two server starts). Blocks.
    pub fn start() -> Result<ReplicatedPair, HarnessError> {
        let bindir = find_bindir()?;
        let as_postgres = running_as_root();
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let base = std::env::temp_dir().join(format!(
            "chatstate-ha-{}-{}",
            std::process::id(),
            &suffix[..8]
        ));
        let socket_dir = base.join("socket");
        std::fs::create_dir_all(&socket_dir)
            .map_err(|e| unavailable(format!("cannot create {}: {e}", socket_dir.display())))?;
        if as_postgres {
            let (uid, gid) = postgres_ids()?;
            for dir in [&base, &socket_dir] {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                    .map_err(|e| unavailable(format!("chown {}: {e}", dir.display())))?;
            }
        }
        let data_dirs = [base.join("primary"), base.join("standby")];
        let watchdog = spawn_watchdog(&base, &data_dirs, &bindir, as_postgres)?;
        let pair = ReplicatedPair {
            bindir,
            as_postgres,
            base,
            socket_dir,
            _watchdog: watchdog,
        };
        initdb(&pair.bindir, pair.as_postgres, &pair.primary_dir())?;
        pair.start_node(&pair.primary_dir(), PRIMARY_PORT, true)?;
        let mut backup = pair.command("pg_basebackup");
        backup
            .arg("-h")
            .arg(&pair.socket_dir)
            .args(["-p", &PRIMARY_PORT.to_string(), "-U", "postgres", "-D"])
            .arg(pair.standby_dir())
            .args(["-R", "-X", "stream", "-c", "fast"]);
        run(backup, "pg_basebackup")?;
        pair.start_node(&pair.standby_dir(), STANDBY_PORT, false)?;
        pair.wait_for_sync()?;
        Ok(pair)
    }

    fn primary_dir(&self) -> PathBuf {
        self.base.join("primary")
    }

    fn standby_dir(&self) -> PathBuf {
        self.base.join("standby")
    }

    /// The directory of both servers' sockets.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    fn command(&self, binary: &str) -> Command {
        server_command(&self.bindir, self.as_postgres, binary)
    }

    fn start_node(&self, dir: &Path, port: u16, primary: bool) -> Result<(), HarnessError> {
        let socket = self.socket_dir.to_string_lossy();
        if socket.contains('\'') {
            return Err(unavailable(format!("{socket} holds a quote")));
        }
        // Durable enough for a process crash (the OS keeps what was
        // written), fast enough for a test; the standby inherits the
        // settings but sync names only matter on a primary.
        let mut options = format!(
            "-k '{socket}' -p {port} -c listen_addresses='' -c fsync=off \
             -c full_page_writes=off -c max_connections=100 -c synchronous_commit=on"
        );
        if primary {
            options.push_str(" -c synchronous_standby_names='*'");
        }
        let log = dir.with_extension("log");
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(dir)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "120", "-o", &options, "start"]);
        run(cmd, "pg_ctl start").map_err(|e| {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            unavailable(format!("{e}\n{text}"))
        })
    }

    fn wait_for_sync(&self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + SYNC_WAIT;
        loop {
            let mut psql = self.command("psql");
            psql.arg("-h")
                .arg(&self.socket_dir)
                .args(["-p", &PRIMARY_PORT.to_string(), "-U", "postgres", "-Atc"])
                .arg("SELECT sync_state FROM pg_stat_replication");
            let out = psql
                .stdin(Stdio::null())
                .output()
                .map_err(|e| unavailable(format!("psql: {e}")))?;
            if String::from_utf8_lossy(&out.stdout).trim() == "sync" {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(unavailable(
                    "the standby did not become synchronous in time",
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Connect options for `database` on the server at `port`.
    pub fn connect_options(&self, port: u16, database: &str) -> PgConnectOptions {
        PgConnectOptions::new_without_pgpass()
            .host(&self.socket_dir.to_string_lossy())
            .port(port)
            .username("postgres")
            .database(database)
            .ssl_mode(PgSslMode::Disable)
    }

    /// Creates `database` on the primary (it reaches the standby through
    /// replication) and migrates it.
    pub async fn create_database(&self, database: &str) -> Result<(), HarnessError> {
        let db_error = |context: &'static str| {
            move |e: sqlx::Error| HarnessError::Database {
                context,
                source: std::sync::Arc::new(e),
            }
        };
        let mut admin = PgConnection::connect_with(&self.connect_options(PRIMARY_PORT, "postgres"))
            .await
            .map_err(db_error("connect to the primary"))?;
        // The name is the caller's constant; refuse anything but a plain
        // identifier rather than quote it.
        if !database
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(unavailable(format!(
                "not a plain database name: {database}"
            )));
        }
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&mut admin)
            .await
            .map_err(db_error("create the database"))?;
        let _ = admin.close().await;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(self.connect_options(PRIMARY_PORT, database));
        chatstate_store_pg::migrate(&pool)
            .await
            .map_err(|e| HarnessError::Migrate(std::sync::Arc::new(e)))?;
        self.wait_for_replay().await
    }

    /// Waits until the standby has replayed everything the primary has
    /// written so far (a synchronous commit waits for the standby's flush,
    /// not for its replay: a database just created may not be there yet).
    pub async fn wait_for_replay(&self) -> Result<(), HarnessError> {
        let db_error = |context: &'static str| {
            move |e: sqlx::Error| HarnessError::Database {
                context,
                source: std::sync::Arc::new(e),
            }
        };
        let mut primary =
            PgConnection::connect_with(&self.connect_options(PRIMARY_PORT, "postgres"))
                .await
                .map_err(db_error("connect to the primary"))?;
        let written: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&mut primary)
            .await
            .map_err(db_error("read the primary's WAL position"))?;
        let _ = primary.close().await;
        let mut standby =
            PgConnection::connect_with(&self.connect_options(STANDBY_PORT, "postgres"))
                .await
                .map_err(db_error("connect to the standby"))?;
        let deadline = Instant::now() + SYNC_WAIT;
        loop {
            let replayed: bool =
                sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn")
                    .bind(&written)
                    .fetch_one(&mut standby)
                    .await
                    .map_err(db_error("read the standby's replay position"))?;
            if replayed {
                let _ = standby.close().await;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(unavailable("the standby did not replay in time"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the primary at once (`pg_ctl stop -m immediate`: no shutdown
    /// checkpoint, every connection cut, as in a crash). Blocks.
    pub fn crash_primary(&self) -> Result<(), HarnessError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.primary_dir())
            .args(["-m", "immediate", "-w", "stop"]);
        run(cmd, "pg_ctl stop -m immediate")
    }

    /// Promotes the standby to primary and returns once it accepts
    /// writes. Blocks.
    pub fn promote_standby(&self) -> Result<(), HarnessError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.standby_dir())
            .args(["-w", "-t", "60", "promote"]);
        run(cmd, "pg_ctl promote")
    }
}

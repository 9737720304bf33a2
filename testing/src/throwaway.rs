//! A throwaway PostgreSQL cluster for tests, benchmarks and the CLI.
//!
//! [`Cluster::shared`] starts one cluster per process, on first use: the
//! server binaries are found through `pg_config --bindir` (else
//! `/usr/lib/postgresql/*/bin`, else `PATH`), `initdb` writes a data
//! directory into a fresh temporary directory (trust authentication, no
//! fsync), and the server listens on a Unix socket in that directory only,
//! with durability switched off. [`Cluster::new_database`] then hands
//! each caller its own freshly migrated database, cloned from a template
//! database that is migrated once.
//!
//! When the process runs as root (as CI does), `initdb` refuses to run, so
//! the data directory is given to the `postgres` system user and every
//! server command runs through `runuser -u postgres --`.
//!
//! The cluster is stopped and its directory removed when the process
//! exits, however it exits: statics are never dropped, so a small watchdog
//! shell waits for end-of-file on a pipe whose only writer is this
//! process, then stops the server and deletes the directory.
//!
//! With `DATABASE_URL` set, no cluster is started: the test databases are
//! created on that server (the role needs CREATEDB) and are left behind,
//! so point it at a disposable server. Without either, every call fails
//! with an error naming both remedies; tests must fail with it, never
//! skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use chatstate::StoreError;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

/// Why the harness could not provide a database.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// No server could be started and `DATABASE_URL` is not set.
    #[error(
        "no PostgreSQL server for tests ({reason}); install the PostgreSQL server \
         package (initdb, postgres) or set DATABASE_URL"
    )]
    Unavailable {
        /// What went wrong.
        reason: String,
    },
    /// A statement of the harness failed.
    #[error("test database harness: {context}")]
    Database {
        /// What the harness was doing.
        context: &'static str,
        /// The error.
        #[source]
        source: Arc<sqlx::Error>,
    },
    /// Migrating the template database failed.
    #[error("test database harness: migrating the template database failed")]
    Migrate(#[source] Arc<StoreError>),
}

pub(crate) fn unavailable(reason: impl Into<String>) -> HarnessError {
    HarnessError::Unavailable {
        reason: reason.into(),
    }
}

fn db_error(context: &'static str) -> impl FnOnce(sqlx::Error) -> HarnessError {
    move |e| HarnessError::Database {
        context,
        source: Arc::new(e),
    }
}

/// A PostgreSQL server to create test databases on: a throwaway cluster
/// or the server of `DATABASE_URL`.
pub struct Cluster {
    /// Options for the maintenance database (where databases are created).
    admin: PgConnectOptions,
    /// The data directory of a throwaway cluster.
    data_dir: Option<PathBuf>,
    /// How to run the throwaway cluster's server (for a restart).
    server: Option<Server>,
    /// The watchdog that stops the throwaway cluster at process exit. Its
    /// stdin is a pipe nobody writes to; holding it open is its purpose.
    _watchdog: Option<Child>,
    template: tokio::sync::OnceCell<Result<String, HarnessError>>,
    /// Random, so database names never collide with those of another
    /// harness on the same server (another process, an earlier run).
    tag: String,
    next_database: AtomicU64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

static SHARED: OnceLock<Result<Cluster, HarnessError>> = OnceLock::new();

impl Cluster {
    /// The process's cluster, started on first use (or the server of
    /// `DATABASE_URL`). A failure is remembered: every later call returns
    /// the same error.
    ///
    /// Starting blocks the calling thread for the time `initdb` and the
    /// server start take (a few seconds, once per process).
    pub fn shared() -> Result<&'static Cluster, HarnessError> {
        match SHARED.get_or_init(Cluster::start) {
            Ok(cluster) => Ok(cluster),
            Err(e) => Err(e.clone()),
        }
    }

    fn start() -> Result<Cluster, HarnessError> {
        if let Ok(url) = std::env::var("DATABASE_URL")
            && !url.is_empty()
        {
            return Cluster::from_url(&url);
        }
        let bindir = find_bindir()?;
        let server = Server::new(bindir)?;
        let watchdog = server.spawn_watchdog().inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&server.base);
        })?;
        // From here on, dropping `watchdog` (any error below) cleans up.
        server.init()?;
        server.start()?;
        let admin = PgConnectOptions::new_without_pgpass()
            .host(&server.socket_dir.to_string_lossy())
            .port(PORT)
            .username("postgres")
            .database("postgres")
            .ssl_mode(PgSslMode::Disable);
        let mut cluster = Cluster::with_admin(admin, Some(server.data_dir.clone()), Some(watchdog));
        cluster.server = Some(server);
        Ok(cluster)
    }

    /// A harness on an existing server: test databases are created through
    /// the database `url` names (its role needs CREATEDB) and are left
    /// behind. [`Cluster::shared`] uses this for `DATABASE_URL`.
    pub fn from_url(url: &str) -> Result<Cluster, HarnessError> {
        let admin = PgConnectOptions::from_str(url)
            .map_err(|e| unavailable(format!("DATABASE_URL is not usable: {e}")))?;
        Ok(Cluster::with_admin(admin, None, None))
    }

    fn with_admin(
        admin: PgConnectOptions,
        data_dir: Option<PathBuf>,
        watchdog: Option<Child>,
    ) -> Cluster {
        Cluster {
            admin,
            data_dir,
            server: None,
            _watchdog: watchdog,
            template: tokio::sync::OnceCell::new(),
            tag: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            next_database: AtomicU64::new(1),
        }
    }

    /// The data directory, for a throwaway cluster.
    pub fn data_dir(&self) -> Option<&Path> {
        self.data_dir.as_deref()
    }

    /// The directory of the server's Unix socket, for a throwaway cluster
    /// (connect with `host=<dir>`, port 5432, user `postgres`).
    pub fn socket_dir(&self) -> Option<PathBuf> {
        let data = self.data_dir.as_deref()?;
        Some(data.parent()?.join("socket"))
    }

    /// Stops the throwaway cluster at once (`pg_ctl stop -m immediate`:
    /// every backend is killed without a shutdown checkpoint, as in a
    /// crash) and starts it again with the same options, returning once it
    /// accepts connections (after crash recovery). Every open connection is
    /// lost. Blocks the calling thread. Fails for the server of
    /// `DATABASE_URL`, which is not the harness's to stop.
    pub fn restart_immediately(&self) -> Result<(), HarnessError> {
        let server = self
            .server
            .as_ref()
            .ok_or_else(|| unavailable("only a throwaway cluster can be restarted"))?;
        let mut cmd = server.command("pg_ctl");
        cmd.arg("-D")
            .arg(&server.data_dir)
            .args(["-m", "immediate", "-w", "stop"]);
        run(cmd, "pg_ctl stop -m immediate")?;
        server.start()
    }

    /// Connect options for a database of this server.
    pub fn connect_options(&self, database: &str) -> PgConnectOptions {
        self.admin.clone().database(database)
    }

    /// A new, empty, migrated database of its own, and a pool on it (built
    /// with [`chatstate_store_pg::pool_options`]).
    pub async fn new_database(&self) -> Result<PgPool, HarnessError> {
        let name = self.create_database().await?;
        chatstate_store_pg::pool_options()
            .connect_with(self.connect_options(&name))
            .await
            .map_err(db_error("connect to the test database"))
    }

    /// Creates a new migrated database and returns its name.
    pub async fn create_database(&self) -> Result<String, HarnessError> {
        let template = self
            .template
            .get_or_init(|| self.create_template())
            .await
            .clone()?;
        let name = format!(
            "chatstate_t_{}_{}",
            self.tag,
            self.next_database.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = PgConnection::connect_with(&self.admin)
            .await
            .map_err(db_error("connect to the maintenance database"))?;
        // Both names are generated here from digits and ASCII letters.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""
        )))
        .execute(&mut admin)
        .await
        .map_err(db_error("create a test database"))?;
        let _ = admin.close().await;
        Ok(name)
    }

    /// Creates the template database and migrates it (once per process).
    async fn create_template(&self) -> Result<String, HarnessError> {
        let name = format!("chatstate_tmpl_{}", self.tag);
        let mut admin = PgConnection::connect_with(&self.admin)
            .await
            .map_err(db_error("connect to the maintenance database"))?;
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .map_err(db_error("create the template database"))?;
        let _ = admin.close().await;
        // `migrate` works on a connection of its own, made with the pool's
        // connect options and closed when it is done; the pool itself
        // never connects.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(self.connect_options(&name));
        let migrated = chatstate_store_pg::migrate(&pool).await;
        pool.close().await;
        migrated.map_err(|e| HarnessError::Migrate(Arc::new(e)))?;
        // CREATE DATABASE ... TEMPLATE refuses while anyone is connected to
        // the template; it waits a few seconds for backends that are
        // still exiting, which covers the migration's connection.
        Ok(name)
    }
}

/// The port in the socket file's name. The socket directory is private to
/// the cluster and TCP is off, so no other server can collide with it.
const PORT: u16 = 5432;

/// A throwaway cluster being set up.
struct Server {
    bindir: PathBuf,
    base: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    /// Run server commands as the `postgres` user (we are root).
    as_postgres: bool,
}

impl Server {
    fn new(bindir: PathBuf) -> Result<Server, HarnessError> {
        let as_postgres = running_as_root();
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let base = std::env::temp_dir().join(format!(
            "chatstate-pg-{}-{}",
            std::process::id(),
            &suffix[..8]
        ));
        let socket_dir = base.join("socket");
        std::fs::create_dir_all(&socket_dir)
            .map_err(|e| unavailable(format!("cannot create {}: {e}", socket_dir.display())))?;
        if as_postgres {
            let give = || -> Result<(), HarnessError> {
                let (uid, gid) = postgres_ids()?;
                for dir in [&base, &socket_dir] {
                    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(|e| {
                        unavailable(format!("cannot give {} to postgres: {e}", dir.display()))
                    })?;
                }
                Ok(())
            };
            give().inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&base);
            })?;
        }
        Ok(Server {
            bindir,
            data_dir: base.join("data"),
            base,
            socket_dir,
            as_postgres,
        })
    }

    /// A command for a server binary, as the right user.
    fn command(&self, binary: &str) -> Command {
        server_command(&self.bindir, self.as_postgres, binary)
    }

    /// Starts the watchdog of this cluster (see [`spawn_watchdog`]).
    fn spawn_watchdog(&self) -> Result<Child, HarnessError> {
        spawn_watchdog(
            &self.base,
            std::slice::from_ref(&self.data_dir),
            &self.bindir,
            self.as_postgres,
        )
    }

    /// Writes the data directory. `initdb` is the slow part of starting a
    /// cluster (seconds), and its output depends only on the binaries and
    /// the options, so the first process on a machine keeps a pristine copy
    /// in the temporary directory and later ones copy it. The copy is
    /// published by an atomic rename, so concurrent first runs are safe.
    fn init(&self) -> Result<(), HarnessError> {
        let cache = self.initdb_cache();
        if !cache.join("PG_VERSION").is_file() {
            let staging = self.base.join("initdb");
            self.initdb(&staging)?;
            // Losing the race to another process is fine: its copy is
            // equivalent to ours.
            let _ = std::fs::rename(&staging, &cache);
            if !cache.join("PG_VERSION").is_file() {
                // No cache could be published: use the fresh one directly.
                return std::fs::rename(&staging, &self.data_dir).map_err(|e| {
                    unavailable(format!("cannot move the initdb output into place: {e}"))
                });
            }
        }
        // `cp -a` keeps owner and modes (the server insists on 0700).
        let mut cp = Command::new("cp");
        cp.arg("-a").arg(&cache).arg(&self.data_dir);
        run(cp, "copying the initdb cache")
    }

    /// Where the pristine `initdb` output of these binaries is kept.
    fn initdb_cache(&self) -> PathBuf {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.bindir.hash(&mut h);
        self.as_postgres.hash(&mut h);
        // Per user: another user's copy is not readable (mode 0700).
        std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .ok()
            .hash(&mut h);
        std::env::temp_dir().join(format!("chatstate-pg-initdb-{:016x}", h.finish()))
    }

    fn initdb(&self, dir: &Path) -> Result<(), HarnessError> {
        initdb(&self.bindir, self.as_postgres, dir)
    }

    fn start(&self) -> Result<(), HarnessError> {
        let socket = self.socket_dir.to_string_lossy();
        if socket.contains('\'') {
            return Err(unavailable(format!(
                "the temporary directory {socket} holds a quote"
            )));
        }
        // pg_ctl passes -o through a shell, hence the quotes. `-w` waits
        // until the server accepts connections (pg_ctl polls for that).
        let options = format!(
            "-k '{socket}' -p {PORT} -c listen_addresses='' -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        );
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(self.base.join("server.log"))
            .args(["-w", "-t", "120", "-o", &options, "start"]);
        run(cmd, "pg_ctl start").map_err(|e| {
            let log = std::fs::read_to_string(self.base.join("server.log")).unwrap_or_default();
            match e {
                HarnessError::Unavailable { reason } => unavailable(format!("{reason}\n{log}")),
                other => other,
            }
        })
    }
}

/// A command for the server binary `binary` of `bindir`, run as the
/// `postgres` system user when `as_postgres` (we are root).
pub(crate) fn server_command(bindir: &Path, as_postgres: bool, binary: &str) -> Command {
    let path = bindir.join(binary);
    if as_postgres {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(path);
        cmd
    } else {
        Command::new(path)
    }
}

/// Writes a fresh data directory `dir` (trust authentication, UTF-8, no
/// locale, no sync: the harness's clusters are disposable).
pub(crate) fn initdb(bindir: &Path, as_postgres: bool, dir: &Path) -> Result<(), HarnessError> {
    let mut cmd = server_command(bindir, as_postgres, "initdb");
    cmd.arg("-D").arg(dir).args([
        "-A",
        "trust",
        "-U",
        "postgres",
        "-E",
        "UTF8",
        "--no-locale",
        "--no-sync",
        "--no-instructions",
    ]);
    run(cmd, "initdb")
}

/// Starts a watchdog: it waits for end-of-file on its stdin (this process
/// exiting closes the pipe), then stops the servers of `data_dirs` that
/// run and removes `base`. It ignores the terminal's signals so that a
/// Ctrl-C that kills the test run does not kill the cleanup too.
pub(crate) fn spawn_watchdog(
    base: &Path,
    data_dirs: &[PathBuf],
    bindir: &Path,
    as_postgres: bool,
) -> Result<Child, HarnessError> {
    const SCRIPT: &str = r#"trap '' INT TERM HUP
cat >/dev/null
base=$1 pg_ctl=$2 as_postgres=$3
shift 3
for d in "$@"; do
  if [ -f "$d/postmaster.pid" ]; then
    if [ "$as_postgres" = yes ]; then
      runuser -u postgres -- "$pg_ctl" -D "$d" -m immediate -w stop
    else
      "$pg_ctl" -D "$d" -m immediate -w stop
    fi
  fi
done >/dev/null 2>&1
rm -rf "$base""#;
    Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("chatstate-pg-watchdog")
        .arg(base)
        .arg(bindir.join("pg_ctl"))
        .arg(if as_postgres { "yes" } else { "no" })
        .args(data_dirs)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| unavailable(format!("cannot start the cleanup watchdog: {e}")))
}

/// Runs a setup command to completion; its failure is an Unavailable
/// error carrying its output.
pub(crate) fn run(mut cmd: Command, what: &str) -> Result<(), HarnessError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| unavailable(format!("cannot run {what}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(unavailable(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

pub(crate) fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective user; elsewhere ask `id`.
    match std::fs::metadata("/proc/self") {
        Ok(meta) => meta.uid() == 0,
        Err(_) => Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false),
    }
}

pub(crate) fn postgres_ids() -> Result<(u32, u32), HarnessError> {
    let id = |flag: &str| -> Result<u32, HarnessError> {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| unavailable(format!("cannot run id: {e}")))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                unavailable(
                    "running as root, but there is no `postgres` system user to run the server as",
                )
            })
    };
    Ok((id("-u")?, id("-g")?))
}

fn has_server(dir: &Path) -> bool {
    ["initdb", "postgres", "pg_ctl"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

/// Finds the directory holding `initdb`, `postgres` and `pg_ctl`.
pub(crate) fn find_bindir() -> Result<PathBuf, HarnessError> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    // Last resort: `initdb` on PATH, following symlinks to its real home
    // (where `postgres` and `pg_ctl` live too).
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let initdb = dir.join("initdb");
        if let Ok(real) = std::fs::canonicalize(&initdb)
            && let Some(parent) = real.parent()
            && has_server(parent)
        {
            return Ok(parent.to_path_buf());
        }
    }
    Err(unavailable(
        "no initdb/postgres/pg_ctl found via pg_config, /usr/lib/postgresql or PATH, \
         and DATABASE_URL is not set",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_names_both_remedies() {
        let text = unavailable("no initdb").to_string();
        assert!(text.contains("no initdb"));
        assert!(text.contains("install the PostgreSQL server package (initdb, postgres)"));
        assert!(text.contains("set DATABASE_URL"));
    }
}

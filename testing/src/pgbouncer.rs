//! A throwaway PgBouncer in front of the throwaway cluster, from the
//! installed `pgbouncer` package (Debian: `apt-get install pgbouncer`;
//! `.ci/run` installs it when missing).
//!
//! Each instance listens on a Unix socket in a fresh directory of its own
//! (so instances never collide), authenticates nobody (`auth_type = any`:
//! the cluster trusts local connections anyway) and connects to the
//! cluster as `postgres`. As root it runs as the `postgres` system user,
//! like the cluster's server. It stops when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::throwaway::{Cluster, HarnessError};

/// The port in the socket's name (`.s.PGSQL.6432`).
const PORT: u16 = 6432;

/// How long PgBouncer gets to start listening.
const START_WAIT: Duration = Duration::from_secs(10);

/// PgBouncer's `pool_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolMode {
    /// A server connection per client connection, for its lifetime.
    Session,
    /// A server connection per transaction.
    Transaction,
}

impl PoolMode {
    fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

/// A running PgBouncer.
#[derive(Debug)]
pub struct PgBouncer {
    dir: PathBuf,
    child: Option<Child>,
    mode: PoolMode,
    server_connections: u32,
}

fn unavailable(reason: impl Into<String>) -> HarnessError {
    HarnessError::Unavailable {
        reason: reason.into(),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The `pgbouncer` binary: Debian installs it in `/usr/sbin`, which is
/// not on every user's `PATH`.
fn binary() -> PathBuf {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("pgbouncer"))
}

impl PgBouncer {
    /// Starts PgBouncer in `mode` in front of `cluster` (a throwaway
    /// cluster: it connects through the cluster's socket), with at most
    /// `server_connections` server connections per database. Blocks until
    /// it listens.
    pub fn start(
        cluster: &Cluster,
        mode: PoolMode,
        server_connections: u32,
    ) -> Result<PgBouncer, HarnessError> {
        let socket = cluster
            .socket_dir()
            .ok_or_else(|| unavailable("PgBouncer runs in front of a throwaway cluster only"))?;
        PgBouncer::start_in_front_of(&socket, 5432, mode, server_connections)
    }

    /// Starts PgBouncer in `mode` in front of the server listening on the
    /// Unix socket `port` in `socket_dir` (user `postgres`, trusted).
    pub fn start_in_front_of(
        socket_dir: &Path,
        port: u16,
        mode: PoolMode,
        server_connections: u32,
    ) -> Result<PgBouncer, HarnessError> {
        let dir = std::env::temp_dir().join(format!(
            "chatstate-pgbouncer-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| unavailable(format!("creating {}: {e}", dir.display())))?;
        // From here on, dropping `bouncer` removes the directory.
        let mut bouncer = PgBouncer {
            dir,
            child: None,
            mode,
            server_connections,
        };
        bouncer.write_ini(socket_dir, port)?;
        let ini_path = bouncer.dir.join("pgbouncer.ini");
        let mut cmd = if is_root() {
            // PgBouncer refuses to run as root.
            let chown = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&bouncer.dir)
                .status()
                .map_err(|e| unavailable(format!("chown: {e}")))?;
            if !chown.success() {
                return Err(unavailable("chown of the PgBouncer directory failed"));
            }
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(binary());
            c
        } else {
            Command::new(binary())
        };
        let child = cmd
            .arg(&ini_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                unavailable(format!(
                    "cannot start pgbouncer ({e}); install it (Debian: apt-get install pgbouncer)"
                ))
            })?;
        bouncer.child = Some(child);
        bouncer.wait_until_listening()?;
        Ok(bouncer)
    }

    /// Writes `pgbouncer.ini` for a server on `port` in `socket_dir`.
    fn write_ini(&self, socket_dir: &Path, port: u16) -> Result<(), HarnessError> {
        let ini = format!(
            "[databases]\n\
             * = host={socket} port={port} user=postgres\n\
             [pgbouncer]\n\
             listen_addr =\n\
             unix_socket_dir = {dir}\n\
             listen_port = {PORT}\n\
             auth_type = any\n\
             pool_mode = {mode}\n\
             default_pool_size = {server_connections}\n\
             max_client_conn = 1000\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             server_login_retry = 1\n\
             pidfile = {dir}/pgbouncer.pid\n\
             logfile = {dir}/pgbouncer.log\n",
            socket = socket_dir.display(),
            dir = self.dir.display(),
            mode = self.mode.as_str(),
            server_connections = self.server_connections,
        );
        let path = self.dir.join("pgbouncer.ini");
        std::fs::write(&path, ini).map_err(|e| unavailable(format!("writing pgbouncer.ini: {e}")))
    }

    /// Points PgBouncer at the server on `port` in `socket_dir` (after a
    /// failover): rewrites its configuration and makes it reload
    /// (SIGHUP). Clients keep their connections to PgBouncer; new server
    /// connections go to the new server.
    pub fn retarget(&self, socket_dir: &Path, port: u16) -> Result<(), HarnessError> {
        self.write_ini(socket_dir, port)?;
        let pid = std::fs::read_to_string(self.dir.join("pgbouncer.pid"))
            .map_err(|e| unavailable(format!("reading pgbouncer.pid: {e}")))?;
        let status = Command::new("kill")
            .args(["-HUP", pid.trim()])
            .status()
            .map_err(|e| unavailable(format!("kill -HUP: {e}")))?;
        if !status.success() {
            return Err(unavailable("kill -HUP of PgBouncer failed"));
        }
        Ok(())
    }

    fn wait_until_listening(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + START_WAIT;
        let socket = self.dir.join(format!(".s.PGSQL.{PORT}"));
        while !socket.exists() {
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                _ => None,
            };
            if exited.is_some() || Instant::now() >= deadline {
                let log =
                    std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default();
                return Err(unavailable(format!(
                    "pgbouncer did not listen (exit: {}); its log: {log}",
                    exited.unwrap_or_else(|| "still running".to_owned())
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Connect options for `database` through this PgBouncer (user
    /// `postgres`).
    pub fn connect_options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new_without_pgpass()
            .host(&self.dir.to_string_lossy())
            .port(PORT)
            .username("postgres")
            .database(database)
            .ssl_mode(PgSslMode::Disable)
    }

    /// A connection URL for `database` through this PgBouncer (for child
    /// processes such as `chatstate work`).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@localhost:{PORT}/{database}?host={}&sslmode=disable",
            self.dir.display()
        )
    }

    /// The directory of its socket, configuration and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // runuser passes SIGTERM on to PgBouncer and waits for it (a
            // SIGKILL of runuser would leave PgBouncer behind).
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

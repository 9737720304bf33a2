//! A throwaway PgBouncer in front of the test cluster, from the installed
//! `pgbouncer` package (Debian: `apt-get install pgbouncer`; `.ci/run`
//! installs it). Each instance listens on a Unix socket in a fresh
//! directory of its own and is killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chatstate_store_pg::throwaway::Cluster;
use sqlx::postgres::{PgConnectOptions, PgSslMode};

/// The port in the socket's name (`.s.PGSQL.6432`); the socket lives in
/// the instance's own directory, so instances never collide.
const PORT: u16 = 6432;

/// The pooling mode PgBouncer runs in.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Mode {
    Transaction,
}

/// A running PgBouncer.
pub(crate) struct PgBouncer {
    dir: PathBuf,
    child: Child,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn binary() -> PathBuf {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("pgbouncer"))
}

impl PgBouncer {
    /// Starts PgBouncer in `mode` in front of `cluster`, with at most
    /// `server_connections` server connections per database.
    pub(crate) fn start(cluster: &Cluster, mode: Mode, server_connections: u32) -> PgBouncer {
        let socket = cluster
            .socket_dir()
            .expect("PgBouncer runs in front of the throwaway cluster");
        let dir = std::env::temp_dir().join(format!(
            "chatstate-pgbouncer-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("create the PgBouncer directory");
        let mode = match mode {
            Mode::Transaction => "transaction",
        };
        let ini = format!(
            "[databases]\n\
             * = host={socket} port=5432 user=postgres\n\
             [pgbouncer]\n\
             listen_addr =\n\
             unix_socket_dir = {dir}\n\
             listen_port = {PORT}\n\
             auth_type = any\n\
             pool_mode = {mode}\n\
             default_pool_size = {server_connections}\n\
             max_client_conn = 500\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {dir}/pgbouncer.log\n",
            socket = socket.display(),
            dir = dir.display(),
        );
        let ini_path = dir.join("pgbouncer.ini");
        std::fs::write(&ini_path, ini).expect("write pgbouncer.ini");
        let mut cmd = if is_root() {
            // PgBouncer refuses to run as root: as the cluster's server does,
            // it runs as the `postgres` system user.
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&dir)
                .status()
                .expect("chown the PgBouncer directory");
            assert!(status.success(), "chown the PgBouncer directory");
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
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start pgbouncer ({e}): install it (Debian: apt-get install pgbouncer)"
                )
            });
        let bouncer = PgBouncer { dir, child };
        bouncer.wait_for_socket();
        bouncer
    }

    fn socket(&self) -> PathBuf {
        self.dir.join(format!(".s.PGSQL.{PORT}"))
    }

    fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not listen within 10 s; its log: {}",
                std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Connect options for `database` through this PgBouncer.
    pub(crate) fn connect_options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new_without_pgpass()
            .host(&self.dir.to_string_lossy())
            .port(PORT)
            .username("postgres")
            .database(database)
            .ssl_mode(PgSslMode::Disable)
    }

    /// The directory of its socket and log.
    #[allow(dead_code)]
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser passes the signal on to PgBouncer; as a fallback, kill by
        // the socket's owner process is not needed: SIGKILL of runuser
        // would orphan it, so ask politely and wait.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

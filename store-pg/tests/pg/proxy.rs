//! A TCP proxy in front of the throwaway cluster's Unix socket that can
//! lose a connection at the worst moment: right before or right after it
//! forwards the message carrying `COMMIT`.
//!
//! It listens on 127.0.0.1 (an ephemeral port) and opens one server
//! connection per client connection. A client message is recognised as
//! the commit by the end of the simple query the store sends
//! (`...COMMIT` and the query's terminating NUL), which `BEGIN ISOLATION
//! LEVEL READ COMMITTED` never matches.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

/// What the proxy does with the next commit it sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Trap {
    /// Forward everything.
    None,
    /// Close both sides without forwarding the commit: the server sees the
    /// client go away inside the transaction and rolls back.
    DropBeforeCommit,
    /// Forward the commit, let the server finish it, and close the client
    /// side without its reply.
    DropAfterCommit,
}

#[derive(Debug)]
struct State {
    trap: Trap,
    /// After a trap fired: refuse every new connection.
    refuse_after_trap: bool,
    refusing: bool,
    /// Traps fired so far.
    fired: usize,
    /// Client writes forwarded so far: one per request, since the
    /// protocol waits for an answer before the client writes again.
    requests: usize,
}

/// The proxy; it runs until the test's runtime ends.
#[derive(Clone, Debug)]
pub(crate) struct Proxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Proxy {
    /// Starts a proxy to the server socket in `socket_dir` (port 5432).
    pub(crate) async fn start(socket_dir: PathBuf) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            trap: Trap::None,
            refuse_after_trap: false,
            refusing: false,
            fired: 0,
            requests: 0,
        }));
        let socket = socket_dir.join(".s.PGSQL.5432");
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if st.lock().unwrap().refusing {
                    drop(client);
                    continue;
                }
                let Ok(server) = UnixStream::connect(&socket).await else {
                    continue;
                };
                tokio::spawn(relay(client, server, st.clone()));
            }
        });
        Proxy { addr, state }
    }

    /// Connect options for `database` through the proxy.
    pub(crate) fn connect_options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new_without_pgpass()
            .host(&self.addr.ip().to_string())
            .port(self.addr.port())
            .username("postgres")
            .database(database)
            .ssl_mode(PgSslMode::Disable)
    }

    /// Arms a trap for the next commit; with `refuse_after`, every
    /// connection attempt after it fires is refused.
    pub(crate) fn arm(&self, trap: Trap, refuse_after: bool) {
        let mut st = self.state.lock().unwrap();
        st.trap = trap;
        st.refuse_after_trap = refuse_after;
    }

    /// How many client writes the proxy forwarded (round trips, once the
    /// connections are set up).
    pub(crate) fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }

    /// How many traps fired.
    pub(crate) fn fired(&self) -> usize {
        self.state.lock().unwrap().fired
    }
}

/// True if a client chunk ends a simple query with `COMMIT`.
fn is_commit(chunk: &[u8]) -> bool {
    chunk.windows(7).any(|w| w == b"COMMIT\0")
}

async fn relay(client: TcpStream, server: UnixStream, state: Arc<Mutex<State>>) {
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_rd, &mut client_wr).await;
        (server_rd, client_wr)
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client_rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        state.lock().unwrap().requests += 1;
        let trap = if is_commit(chunk) {
            let mut st = state.lock().unwrap();
            let trap = std::mem::replace(&mut st.trap, Trap::None);
            if trap != Trap::None {
                st.fired += 1;
                st.refusing = st.refuse_after_trap;
            }
            trap
        } else {
            Trap::None
        };
        match trap {
            Trap::None => {
                if server_wr.write_all(chunk).await.is_err() {
                    break;
                }
            }
            Trap::DropBeforeCommit => {
                // Both sides closed, the commit never sent.
                down.abort();
                return;
            }
            Trap::DropAfterCommit => {
                // Stop relaying replies, so the client never sees one.
                down.abort();
                let _ = down.await;
                if server_wr.write_all(chunk).await.is_err() {
                    return;
                }
                // End-of-file after the commit: the server runs it, then
                // sees the client gone and ends the session. Closing the
                // client side now loses the reply.
                let _ = server_wr.shutdown().await;
                drop(client_rd);
                return;
            }
        }
    }
    let _ = server_wr.shutdown().await;
    down.abort();
}

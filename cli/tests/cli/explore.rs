//! `chatstate explore`: the Explorer starts and answers HTTP, with
//! readable states.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

fn check(model: &str, expect_in_states: &str) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server(
        Command::new(env!("CARGO_BIN_EXE_chatstate"))
            .args(["explore", "--addr", &addr, "--model", model])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let page = loop {
        if let Some(page) = get(port, "/") {
            break page;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the Explorer never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("<html"), "{page}");
    let states = get(port, "/.states").expect("the initial states");
    assert!(states.contains(expect_in_states), "{states}");
    let next = get(port, "/.states/0").expect("the states after the first one");
    assert!(next.contains("\"action\""), "{next}");
}

#[test]
fn explorer_serves_the_single_chat_model() {
    check("single", "\"state\":\"N\"");
}

#[test]
fn explorer_serves_the_concurrency_model_readably() {
    // The state as its one-line Display, not a Debug struct dump.
    check("concurrency", "chat R0 unowned, snapshot 1");
}

//! The `chatstate` binary, driven as a user would: spawn it, read what it
//! prints, check its exit status.
//!
//! Postgres cases need no setup: the binary starts its own throwaway
//! cluster (as root too) unless `DATABASE_URL` is set.

mod admin;
mod bench;
mod check;
mod demo;
mod explore;
mod limits;
mod pooled;
mod processes;
mod replay;
mod simulate;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long one run of the binary may take before the test gives up.
const PATIENCE: Duration = Duration::from_secs(600);

/// Runs `chatstate` with `args` to completion.
fn chatstate(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatstate"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the chatstate binary starts");
    // Read both pipes on their own threads so that a chatty child never
    // blocks on a full pipe while we wait for it.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut buf).map(|_| buf)
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut buf).map(|_| buf)
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for chatstate") {
            break status;
        }
        if started.elapsed() > PATIENCE {
            let _ = child.kill();
            panic!("chatstate {args:?} ran longer than {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader").expect("stdout"),
        stderr: err.join().expect("stderr reader").expect("stderr"),
    }
}

/// Runs `chatstate` and requires success; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = chatstate(args);
    assert!(
        out.status.success(),
        "chatstate {args:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The workspace's `docs/` directory.
fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

/// A scratch file path unique to this test process.
fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("chatstate-cli-test-{}-{name}", std::process::id()))
}

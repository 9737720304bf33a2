//! Traces and arguments out of range: every one exits with status 2 and a
//! message naming what is wrong, never with a panic (101) or an abort
//! (134), and before anything runs.

use crate::{chatstate, scratch};

/// Replays `trace` with `args` and requires exit status 2, a message on
/// stderr containing every one of `says`, and no step output.
fn refused(name: &str, trace: &str, args: &[&str], says: &[&str]) {
    let path = scratch(&format!("limits-{name}.json"));
    std::fs::write(&path, trace).unwrap();
    let mut all = vec!["replay", path.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = chatstate(&all);
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{name}: {}\n{stderr}",
        out.status
    );
    for s in says {
        assert!(stderr.contains(s), "{name}: {s:?} missing from\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{name}:\n{stderr}");
    assert!(out.stdout.is_empty(), "{name}: steps ran");
}

const CREATE: &str =
    r#"{"create_chat": {"chat": "c", "messages": [{"role": "user", "content": "hi"}]}}"#;

fn advance(seconds: &str) -> String {
    format!(r#"{{"steps": [{CREATE}, {{"advance_clock": {{"seconds": {seconds}}}}}]}}"#)
}

#[test]
fn advance_clock_out_of_range_exits_2() {
    for (name, seconds) in [
        ("1e300", "1e300"),
        ("negative", "-1"),
        ("past 100 years", "3155760001"),
    ] {
        refused(
            name,
            &advance(seconds),
            &["--store", "model"],
            &[
                "step 1: advance_clock",
                "seconds must be a number from 0 to 3155760000",
            ],
        );
    }
    // The longest step is accepted.
    let path = scratch("limits-longest.json");
    std::fs::write(&path, advance("3155760000")).unwrap();
    let out = crate::ok(&["replay", path.to_str().unwrap(), "--store", "mem"]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.lines().count(), 2);
}

#[test]
fn huge_generate_counts_exit_2_without_allocating() {
    for (name, generate, says) in [
        (
            "chats",
            r#"{"chats": 1000000000000, "steps_per_chat": 2}"#,
            "chats must be at most 10000",
        ),
        (
            "steps",
            r#"{"chats": 2, "steps_per_chat": 1000000000000}"#,
            "steps_per_chat must be at most 10000",
        ),
        (
            "total",
            r#"{"chats": 10000, "steps_per_chat": 10000}"#,
            "chats * steps_per_chat must be at most 100000",
        ),
    ] {
        refused(
            name,
            &format!(r#"{{"generate": {generate}}}"#),
            &["--store", "mem"],
            &[says],
        );
    }
    let out = chatstate(&[
        "trace-gen",
        "--chats",
        "100000000",
        "--steps-per-chat",
        "100000000",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chats must be at most 10000"), "{stderr}");
}

#[test]
fn options_out_of_range_are_refused_before_any_store() {
    for (name, options, says) in [
        (
            "stale",
            r#"{"heartbeat_stale_secs": 18446744073709551615}"#,
            "heartbeat_stale of",
        ),
        (
            "timeout",
            r#"{"requires_action_timeout_secs": 9223372036854775807}"#,
            "requires_action_timeout of",
        ),
        (
            "zero stale",
            r#"{"heartbeat_stale_secs": 0}"#,
            "heartbeat_stale of 0ns",
        ),
        (
            "no queue",
            r#"{"max_queue_size": 0}"#,
            "max_queue_size 0 is out of range",
        ),
    ] {
        let trace = format!(r#"{{"options": {options}, "steps": [{CREATE}]}}"#);
        for args in [
            &["--store", "model"][..],
            &["--store", "pg"],
            &["--compare"],
        ] {
            refused(name, &trace, args, &["trace options", says]);
        }
    }
}

#[test]
fn json_nested_past_the_limit_is_refused() {
    let depth = chatstate_model::MAX_JSON_DEPTH + 1;
    let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let trace = format!(
        r#"{{"steps": [{{"create_chat": {{"chat": "c", "messages": [{{"role": "user", "content": [{{"type": "blob", "data": {deep}}}]}}]}}}}]}}"#
    );
    refused(
        "deep part",
        &trace,
        &["--store", "model"],
        &["nested 102 deep, past the limit of 100"],
    );
}

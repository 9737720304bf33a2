//! `chatstate simulate`: a workload with every commit re-checked finds no
//! violation, on both stores, and says what it did.

use crate::ok;

fn check(store: &str, extra: &[&str]) -> String {
    let mut args = vec!["simulate", "--store", store, "--seed", "7"];
    args.extend_from_slice(extra);
    let out = ok(&args);
    assert!(out.contains("seed 7"), "{out}");
    assert!(out.contains("invariant violations: 0 ("), "{out}");
    for expected in [
        "Updates/s",
        "p50",
        "p99",
        "hints sent",
        "claims won",
        "wasted claim ratio",
        "takeovers",
        "leases lost",
        "handed back",
        "runtime crashes",
        "heartbeats",
        "SendMessage",
        "Acquire",
    ] {
        assert!(out.contains(expected), "no {expected:?} in:\n{out}");
    }
    out
}

#[test]
fn simulate_in_memory_by_operations() {
    check(
        "mem",
        &["--ops", "4000", "--chats", "20", "--crash-rate", "0.01"],
    );
}

#[test]
fn simulate_on_postgres() {
    check("pg", &["--duration", "2", "--chats", "20"]);
}

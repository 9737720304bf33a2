//! `chatstate simulate`: a workload with every commit re-checked finds no
//! violation, on both stores, and says what it did.

use std::collections::BTreeMap;

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

/// The samples of a Prometheus text rendering: `name{labels}` to value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (key, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("a sample: {l:?}"));
            let value = value
                .parse()
                .unwrap_or_else(|e| panic!("{key}: value {value:?}: {e}"));
            (key.to_owned(), value)
        })
        .collect()
}

/// The number before `marker` on the summary line that contains it.
fn summary_number(summary: &str, marker: &str) -> f64 {
    let line = summary
        .lines()
        .find(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} in:\n{summary}"));
    let before = line[..line.find(marker).unwrap()].trim_end();
    let word = before.rsplit(' ').next().unwrap();
    word.parse()
        .unwrap_or_else(|e| panic!("{word:?} before {marker:?}: {e}"))
}

#[test]
fn simulate_prints_its_metrics() {
    // No crashes: every Update ends, so the counters match the summary's
    // own account exactly.
    let out = check(
        "mem",
        &[
            "--ops",
            "2000",
            "--chats",
            "10",
            "--crash-rate",
            "0",
            "--metrics",
        ],
    );
    let marker = "# metrics at the end of the run (Prometheus text format)\n";
    let (summary, metrics) = out
        .split_once(marker)
        .unwrap_or_else(|| panic!("no metrics section in:\n{out}"));
    for declared in [
        "# TYPE chatstate_updates_total counter",
        "# TYPE chatstate_transitions_total counter",
        "# TYPE chatstate_update_duration_seconds histogram",
        "# TYPE chatstate_lock_wait_seconds histogram",
        "# TYPE chatstate_worker_claims_total counter",
        "# TYPE chatstate_worker_leases_held gauge",
    ] {
        assert!(metrics.contains(declared), "no {declared:?} in:\n{metrics}");
    }
    let s = samples(metrics);
    let get = |key: &str| {
        *s.get(key)
            .unwrap_or_else(|| panic!("no sample {key} in:\n{metrics}"))
    };
    let committed = summary_number(summary, " committed Updates in");
    assert!(committed > 0.0, "{summary}");
    assert_eq!(get(r#"chatstate_updates_total{outcome="ok"}"#), committed);
    // Every Update that ended is counted once and timed once.
    let ended: f64 = s
        .iter()
        .filter(|(k, _)| k.starts_with("chatstate_updates_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(get("chatstate_update_duration_seconds_count"), ended);
    assert_eq!(
        get(r#"chatstate_update_duration_seconds_bucket{le="+Inf"}"#),
        ended
    );
    assert!(get("chatstate_update_duration_seconds_sum") > 0.0);
    assert!(get(r#"chatstate_lock_wait_seconds_count{operation="update"}"#) > 0.0);
    // A won claim is one committed Acquire.
    let won = summary_number(summary, ", lost:");
    assert!(won > 0.0, "{summary}");
    assert_eq!(get(r#"chatstate_worker_claims_total{outcome="won"}"#), won);
    assert_eq!(
        get(r#"chatstate_transitions_total{transition="Acquire",outcome="ok"}"#),
        won
    );
    // Every runtime has stopped: no lease is held any more.
    assert_eq!(get("chatstate_worker_leases_held"), 0.0);
}

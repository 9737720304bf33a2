//! `chatstate replay`: the example traces agree on every backend, the
//! output has the documented shape, divergences and bad traces fail.

use serde_json::Value;

use crate::{chatstate, docs, ok, scratch};

/// Replays a shipped trace on the model, the in-memory store and Postgres
/// and requires them to agree on every step.
fn check_compare(trace: &str) {
    let path = docs().join("traces").join(trace);
    let path = path.to_str().expect("a UTF-8 path");
    let out = chatstate(&["replay", path, "--compare"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{trace} diverged:\n{stderr}");
    assert!(
        stderr.contains("agree on the model, the in-memory store and Postgres"),
        "{stderr}"
    );
    let lines = String::from_utf8(out.stdout).expect("UTF-8");
    let steps: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!steps.is_empty());
    for (i, step) in steps.iter().enumerate() {
        assert_eq!(step["step"], i, "{trace}: steps are numbered in order");
    }
}

#[test]
fn happy_path_agrees_everywhere() {
    check_compare("happy-path.json");
}

#[test]
fn queue_and_promotion_agrees_everywhere() {
    check_compare("queue-and-promotion.json");
}

#[test]
fn requires_action_agrees_everywhere() {
    check_compare("requires-action.json");
}

#[test]
fn errors_and_invalid_rows_agree_everywhere() {
    check_compare("errors-and-invalid.json");
}

#[test]
fn many_chats_agree_everywhere() {
    check_compare("many-chats.json");
}

/// Replays a shipped trace on the model and returns its lines.
fn model_lines(trace: &str) -> Vec<Value> {
    let path = docs().join("traces").join(trace);
    ok(&["replay", path.to_str().unwrap(), "--store", "model"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn a_step_line_has_the_documented_fields() {
    let lines = model_lines("happy-path.json");
    let created = &lines[0];
    assert_eq!(created["ok"], true);
    assert_eq!(created["state"], "R0");
    assert_eq!(created["snapshot_version"], 1);
    assert_eq!(
        created["published"],
        serde_json::json!(["chat:update", "chat:ownership"])
    );
    let acquired = &lines[1];
    for key in [
        "step",
        "ok",
        "state",
        "owned",
        "snapshot_version",
        "history_version",
        "queue_version",
        "generation_attempt",
        "retry_state_version",
        "queue_len",
        "history_len",
        "published",
        "result",
    ] {
        assert!(acquired.get(key).is_some(), "missing {key}: {acquired}");
    }
    assert_eq!(acquired["owned"], true);
    assert_eq!(
        acquired["result"]["transitions"][0]["transition"],
        "Acquire"
    );
}

#[test]
fn a_failed_step_names_its_kind_transition_and_state() {
    let lines = model_lines("errors-and-invalid.json");
    let not_found = &lines[0];
    assert_eq!(not_found["ok"], false);
    assert_eq!(not_found["state"], "N");
    assert_eq!(not_found["error"]["kind"], "ChatNotFound");
    let invalid = lines
        .iter()
        .find(|l| l["error"]["kind"] == "InvalidState")
        .expect("the trace sends to an Invalid chat");
    assert_eq!(invalid["error"]["transition"], "SendMessage");
    assert_eq!(invalid["error"]["from"], "Invalid");
    let lost = lines
        .iter()
        .find(|l| l["error"]["kind"] == "LeaseLost")
        .expect("the trace uses a wrong fence");
    assert_eq!(lost["error"]["expected"], "nobody");
    // A failing step does not stop the trace.
    assert_eq!(lines.last().unwrap()["ok"], true);
}

#[test]
fn a_divergence_fails_and_prints_every_side() {
    // Postgres refuses a status outside its CHECK constraint; the model and
    // the in-memory store store it: the replays differ at step 1.
    let trace = scratch("divergent.json");
    std::fs::write(
        &trace,
        r#"{"steps": [
          {"create_chat": {"chat": "c", "messages": [{"role": "user", "content": "hi"}]}},
          {"set_raw_status": {"chat": "c", "status": "no-such-status"}}
        ]}"#,
    )
    .unwrap();
    let out = chatstate(&["replay", trace.to_str().unwrap(), "--compare"]);
    let _ = std::fs::remove_file(&trace);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("divergence at step 1"), "{stderr}");
    for side in ["model", "mem", "pg"] {
        assert!(
            stderr.contains(&format!("  {side} ")),
            "{side} missing:\n{stderr}"
        );
    }
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

#[test]
fn a_malformed_trace_is_refused_with_its_step() {
    let trace = scratch("malformed.json");
    std::fs::write(
        &trace,
        r#"{"steps": [{"update": {"chat": "c", "transitions": [{"DeleteQueuedMessage": {}}]}}]}"#,
    )
    .unwrap();
    let out = chatstate(&["replay", trace.to_str().unwrap()]);
    let _ = std::fs::remove_file(&trace);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("step 0") && stderr.contains("queue_index"),
        "{stderr}"
    );
}

#[test]
fn generated_traces_are_deterministic_and_replay() {
    let args = [
        "trace-gen",
        "--chats",
        "40",
        "--steps-per-chat",
        "12",
        "--seed",
        "9",
    ];
    let a = ok(&args);
    assert_eq!(a, ok(&args), "same seed, same trace");
    let trace = scratch("generated.json");
    std::fs::write(&trace, &a).unwrap();
    let lines = ok(&["replay", trace.to_str().unwrap(), "--store", "mem"]);
    let _ = std::fs::remove_file(&trace);
    let chat_steps = lines.lines().filter(|l| l.contains("\"chat\":")).count();
    assert_eq!(chat_steps, 40 * 12);
}

//! `chatstate bench`: runs every case and reports it (the figures
//! themselves belong in docs/performance.md, not in tests).

use serde_json::Value;

use crate::ok;

fn check(store: &str) -> Vec<Value> {
    let out = ok(&["bench", "--store", store, "--seconds", "0.05", "--json"]);
    let rows: Vec<Value> = serde_json::from_str(&out).expect("--json prints a JSON array");
    for r in &rows {
        assert!(r["updates"].as_u64().unwrap() > 0, "{r}");
        assert!(r["updates_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    }
    let cases = |shape: &str| rows.iter().filter(|r| r["shape"] == shape).count();
    assert_eq!(cases("ours"), 12, "4 transitions x (1, 8 distinct, 8 hot)");
    rows
}

#[test]
fn bench_in_memory() {
    let rows = check("mem");
    assert!(rows.iter().all(|r| r["shape"] == "ours"));
}

#[test]
fn bench_on_postgres_against_the_go_shape() {
    let rows = check("pg");
    let per_update = |shape: &str, transition: &str| {
        rows.iter()
            .find(|r| r["shape"] == shape && r["transition"] == transition && r["clients"] == 1)
            .map(|r| r["per_update"].as_f64().unwrap())
            .unwrap()
    };
    assert_eq!(per_update("go", "CommitStep (1 message)"), 10.0);
    assert!(per_update("ours", "CommitStep (1 message)") <= 4.0);
    assert_eq!(per_update("ours", "Update (no transition)"), 2.0);
}

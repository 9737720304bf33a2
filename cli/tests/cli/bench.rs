//! `chatstate bench`: runs every case and reports it (the figures
//! themselves belong in docs/performance.md, not in tests).

use serde_json::Value;

use crate::ok;

fn check(store: &str) -> Vec<Value> {
    // Long enough that every case commits something on a loaded machine.
    let out = ok(&["bench", "--store", store, "--seconds", "0.2", "--json"]);
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

/// `--pgbouncer`: CommitStep directly and through PgBouncer in both modes,
/// at the round trips each route costs.
#[test]
fn bench_by_route_through_pgbouncer() {
    let out = ok(&[
        "bench",
        "--store",
        "pg",
        "--seconds",
        "0.2",
        "--json",
        "--pgbouncer",
        "--repeat",
        "1",
    ]);
    let both: Value = serde_json::from_str(&out).expect("--json prints a JSON object");
    let routes = both["routes"].as_array().expect("routes");
    assert_eq!(routes.len(), 6, "3 routes x (1, 8 clients)");
    for r in routes {
        assert!(r["updates"].as_u64().unwrap() > 0, "{r}");
    }
    for (route, trips) in [
        ("direct", 3.0),
        ("pgbouncer session mode", 3.0),
        ("pgbouncer transaction mode", 4.0),
    ] {
        let one = routes
            .iter()
            .find(|r| r["route"] == route && r["clients"] == 1)
            .unwrap_or_else(|| panic!("no 1-client row for {route}"));
        assert_eq!(one["per_update"].as_f64(), Some(trips), "{route}");
    }
    assert_eq!(both["cases"].as_array().map(Vec::len), Some(18));
}

//! `chatstate demo`: the README's main job succeeds and prints both
//! summaries.

use crate::ok;

#[test]
fn demo_checks_the_models_then_simulates() {
    let out = ok(&["demo", "--seconds", "1", "--seed", "3"]);
    assert!(
        out.contains("single-chat: ") && out.contains("concurrency: "),
        "{out}"
    );
    assert!(!out.contains("FAIL"), "{out}");
    assert!(out.contains("invariant violations: 0 ("), "{out}");
    assert!(out.contains("demo: every property holds"), "{out}");
}

//! `chatstate check --model`: one model alone, with its pinned state count.

use crate::ok;

#[test]
fn check_model_single_runs_the_single_chat_model_alone() {
    let out = ok(&["check", "--model", "single", "--threads", "1"]);
    assert!(
        out.starts_with("single-chat: 31189 unique states, "),
        "{out}"
    );
    assert!(
        out.contains("single-chat: 104 properties, all hold"),
        "{out}"
    );
    assert!(!out.contains("concurrency: "), "{out}");
    assert!(!out.contains("FAIL"), "{out}");
}

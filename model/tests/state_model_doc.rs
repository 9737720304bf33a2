//! `docs/state-model.md` is generated from the matrix; this test fails when
//! the committed file differs from what the code renders.
//!
//! Regenerate it from the workspace root with
//! `cargo run -p chatstate-cli -- matrix --format doc > docs/state-model.md`,
//! or let this test rewrite it with
//! `CHATSTATE_BLESS=1 cargo test -p chatstate-model --test state_model_doc`.

use std::path::PathBuf;

use chatstate_model::Matrix;
use chatstate_model::render::{DOC_COMMAND, state_model_doc};

#[test]
fn committed_state_model_doc_is_current() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/state-model.md");
    let expected = state_model_doc(&Matrix::REFERENCE);
    if std::env::var_os("CHATSTATE_BLESS").is_some() {
        std::fs::write(&path, &expected).expect("docs/state-model.md is writable");
        return;
    }
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    if actual != expected {
        let first_difference = actual
            .lines()
            .zip(expected.lines())
            .position(|(a, e)| a != e)
            .unwrap_or_else(|| actual.lines().count().min(expected.lines().count()));
        panic!(
            "docs/state-model.md is stale (first difference at line {}).\n\
             Regenerate it from the workspace root with\n    {DOC_COMMAND}\n\
             or with\n    CHATSTATE_BLESS=1 cargo test -p chatstate-model --test state_model_doc",
            first_difference + 1
        );
    }
}

//! The direction of the trace modules (docs/architecture.md, `cli/`): the
//! trace format, its compiler, the step records and the model's reference
//! run (`src/trace/`) at the bottom; generation (`src/tracegen/`) above
//! it; replay (`src/replay/`) above both. A module names another through
//! `crate::`, so scanning the sources for those paths finds every edge.

use std::path::{Path, PathBuf};

/// Each layer and the modules of the crate its files may name.
const LAYERS: &[(&str, &[&str])] = &[
    ("trace", &["trace"]),
    ("tracegen", &["trace", "tracegen"]),
    ("replay", &["trace", "tracegen", "replay", "pg"]),
];

/// Items of the crate root (`main.rs`) any module may use.
const ROOT_ITEMS: &[&str] = &["error_chain"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The `.rs` files of a layer's folder, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The first segment of every path that starts at `crate::`, including
/// each top-level entry of a `crate::{...}` group.
fn crate_names(source: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("crate::") {
        let preceded_by_ident = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[at + "crate::".len()..];
        if preceded_by_ident {
            // `some_crate::`, not `crate::`.
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut entry_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => entry_start = true,
                    c if c.is_whitespace() => {}
                    _ if entry_start => {
                        out.push(ident(&group[i..]));
                        entry_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(rest));
        }
    }
    out
}

#[test]
fn the_scanner_finds_plain_and_grouped_paths() {
    let source = "use crate::trace::{Names, Op};\n\
                  use crate::{replay::run, tracegen::{expand, generate}, error_chain};\n\
                  let x = other_crate::ignored; crate::pg::connect()";
    assert_eq!(
        crate_names(source),
        ["trace", "replay", "tracegen", "error_chain", "pg"]
    );
}

#[test]
fn trace_modules_depend_only_downward() {
    for (layer, allowed) in LAYERS {
        let files = files(&src().join(layer));
        assert!(!files.is_empty(), "src/{layer}/ has no sources");
        for file in files {
            // Comments may name any module; only code makes an edge.
            let text: String = std::fs::read_to_string(&file)
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            let shown = file.strip_prefix(src()).unwrap().display();
            assert!(
                !text.contains("super::super"),
                "{shown} reaches out of its layer through super::super"
            );
            for name in crate_names(&text) {
                assert!(
                    allowed.contains(&name.as_str()) || ROOT_ITEMS.contains(&name.as_str()),
                    "{shown} names crate::{name}; the {layer} layer may name only {allowed:?}"
                );
            }
        }
    }
}

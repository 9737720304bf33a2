//! The dependency and purity invariants of docs/architecture.md.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The workspace crates a member depends on (normal and dev dependencies).
fn deps(member: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(member).join("Cargo.toml")).unwrap();
    let mut out = Vec::new();
    let mut in_deps = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]" || line == "[dev-dependencies]";
            continue;
        }
        if in_deps
            && let Some(name) = line.split(['=', '.', ' ']).next()
            && name.starts_with("chatstate")
        {
            out.push(name.to_owned());
        }
    }
    out.sort();
    out.dedup();
    out
}

fn normal_deps(member: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(member).join("Cargo.toml")).unwrap();
    let section = text
        .split("\n[")
        .find(|s| s.starts_with("dependencies]"))
        .unwrap_or("");
    let mut out: Vec<String> = section
        .lines()
        .skip(1)
        .filter_map(|l| l.split(['=', '.', ' ']).next())
        .filter(|n| n.starts_with("chatstate"))
        .map(str::to_owned)
        .collect();
    out.sort();
    out
}

#[test]
fn dependencies_point_one_way() {
    assert!(
        normal_deps("model").is_empty(),
        "model depends on no crate of ours"
    );
    assert_eq!(normal_deps("machine"), ["chatstate-model"]);
    for store in ["store-mem", "store-pg"] {
        assert_eq!(
            normal_deps(store),
            ["chatstate", "chatstate-model"],
            "{store}"
        );
    }
    for (store, other) in [
        ("store-mem", "chatstate-store-pg"),
        ("store-pg", "chatstate-store-mem"),
    ] {
        assert!(
            !deps(store).contains(&other.to_owned()),
            "{store} depends on {other}"
        );
    }
}

#[test]
fn worker_depends_on_machine_only() {
    let text = std::fs::read_to_string(root().join("worker/Cargo.toml")).unwrap();
    let section = text
        .split("\n[")
        .find(|s| s.starts_with("dependencies]"))
        .unwrap_or("");
    let ours = section
        .lines()
        .skip(1)
        .filter(|l| l.starts_with("chatstate"));
    let (optional, required): (Vec<&str>, Vec<&str>) =
        ours.partition(|l| l.contains("optional = true"));
    let names = |lines: Vec<&str>| -> Vec<String> {
        lines
            .iter()
            .filter_map(|l| l.split(['=', '.', ' ']).next())
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(names(required), ["chatstate"]);
    // The Postgres hint source is an adapter behind the `pg` feature.
    assert_eq!(names(optional), ["chatstate-store-pg"]);
    for member in ["model", "machine", "store-mem", "store-pg"] {
        assert!(
            !deps(member).contains(&"chatstate-worker".to_owned()),
            "{member} depends on the worker runtime"
        );
    }
}

fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((path.clone(), std::fs::read_to_string(&path).unwrap()));
        }
    }
    out
}

#[test]
fn model_performs_no_io() {
    let manifest = std::fs::read_to_string(root().join("model/Cargo.toml")).unwrap();
    for banned in ["tokio", "sqlx"] {
        assert!(
            !manifest.contains(banned),
            "model/Cargo.toml mentions {banned}"
        );
    }
    for (path, text) in sources(&root().join("model/src")) {
        for banned in ["std::fs", "std::net", "std::process", "tokio::", "sqlx::"] {
            assert!(!text.contains(banned), "{} uses {banned}", path.display());
        }
    }
}

#[test]
fn machine_never_names_sqlx() {
    let manifest = std::fs::read_to_string(root().join("machine/Cargo.toml")).unwrap();
    assert!(!manifest.contains("sqlx"));
    for (path, text) in sources(&root().join("machine/src")) {
        assert!(!text.contains("sqlx"), "{} names sqlx", path.display());
    }
}

/// The crates an application builds: none of them may carry the test and
/// tooling harness.
const PRODUCTION: [&str; 5] = ["model", "machine", "store-mem", "store-pg", "worker"];

/// The members a member's `[build-dependencies]` and target-specific
/// dependency tables name (none of ours may appear there either).
fn other_dependency_tables(member: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(member).join("Cargo.toml")).unwrap();
    text.split("\n[")
        .filter(|s| {
            let header = s.lines().next().unwrap_or("");
            header.starts_with("build-dependencies]")
                || (header.starts_with("target.") && header.contains("dependencies]"))
        })
        .flat_map(|s| s.lines().skip(1))
        .filter_map(|l| l.split(['=', '.', ' ']).next())
        .filter(|n| n.starts_with("chatstate"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn production_crates_do_not_depend_on_the_harness() {
    for member in PRODUCTION {
        assert!(
            !normal_deps(member).contains(&"chatstate-testing".to_owned()),
            "{member} depends on chatstate-testing"
        );
        assert!(
            !other_dependency_tables(member).contains(&"chatstate-testing".to_owned()),
            "{member} depends on chatstate-testing"
        );
    }
    // The harness is never published, and depends on no test-only crate.
    let manifest = std::fs::read_to_string(root().join("testing/Cargo.toml")).unwrap();
    assert!(manifest.contains("\npublish = false"));
    assert_eq!(
        normal_deps("testing"),
        ["chatstate", "chatstate-model", "chatstate-store-pg"]
    );
    // The harness and the benchmark baseline live there, not in store-pg.
    for module in ["throwaway", "goshape"] {
        assert!(
            root().join(format!("testing/src/{module}.rs")).is_file(),
            "testing/src/{module}.rs"
        );
        for (path, text) in sources(&root().join("store-pg/src")) {
            assert!(
                !text.contains(&format!("mod {module}")),
                "{} declares {module}",
                path.display()
            );
        }
    }
}

#[test]
fn sqlx_is_built_without_its_macros() {
    // The `macros` feature compiles sqlx and its driver a second time, for
    // the procedural macros; the migrations are embedded without it.
    let workspace = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let members = workspace
        .lines()
        .find_map(|l| l.strip_prefix("members = "))
        .expect("the workspace lists its members");
    let members: Vec<&str> = members
        .trim_matches(['[', ']'])
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .collect();
    assert!(members.contains(&"testing"), "{members:?}");
    for member in std::iter::once("").chain(members) {
        let text = std::fs::read_to_string(root().join(member).join("Cargo.toml")).unwrap();
        for line in text.lines().filter(|l| l.trim_start().starts_with("sqlx")) {
            assert!(
                !line.contains("\"macros\"") && !line.contains("\"derive\""),
                "{member}/Cargo.toml: {line}"
            );
        }
    }
}

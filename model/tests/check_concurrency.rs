//! Exhaustive check of the concurrency model, both variants: the fenced
//! model must satisfy every property; with fencing off, a stale worker must
//! be able to commit, and the trace that shows it is printed (run with
//! `--nocapture` to read it).

#![cfg(feature = "check")]

use chatstate_model::check::concurrency::{self, names};
use chatstate_model::check::{CheckReport, Expectation, PropertyVerdict};

/// Unique states of the fenced model (pinned: a change means the model
/// changed).
const FENCED_STATES: usize = 667_658;
/// Unique states of the unfenced model.
const UNFENCED_STATES: usize = 645_528;

fn print(report: &CheckReport) {
    println!(
        "model {}: {} unique states, depth {}, {:.2} s on {} thread(s)",
        report.model, report.unique_states, report.max_depth, report.seconds, report.threads
    );
    for p in &report.properties {
        let verdict = if p.holds { "holds" } else { "FAILS" };
        println!("  [{verdict}] {} {}", p.expectation, p.name);
    }
}

fn print_path(p: &PropertyVerdict) {
    println!("{} {}:", p.expectation, p.name);
    for (i, line) in p.path.iter().flatten().enumerate() {
        println!("  {i:>2}. {line}");
    }
}

fn verdict<'a>(report: &'a CheckReport, name: &str) -> &'a PropertyVerdict {
    report
        .property(name)
        .unwrap_or_else(|| panic!("{} has no property {name:?}", report.model))
}

const SAFETY: [&str; 9] = [
    names::LOCKS,
    names::SNAPSHOT,
    names::NOTIFY_AFTER_COMMIT,
    names::HWM_MONOTONE,
    names::HWM_CONVERGES,
    names::HINT,
    names::FENCE,
    names::RECOVERY,
    names::NOT_STRANDED,
];

const EXAMPLES: [&str; 7] = [
    names::SHARED_READS,
    names::FLUSH_RACE,
    names::HINTED,
    names::TAKEOVER,
    names::STALE_CALLBACK,
    names::LOST_FLUSH,
    names::RECOVERY_TIGHT,
];

/// What fencing buys: without it these fail, and nothing else does.
const NEED_FENCING: [&str; 3] = [names::FENCE, names::RECOVERY, names::NOT_STRANDED];

#[test]
fn fenced_model_holds_every_property() {
    let report = concurrency::run(1);
    print(&report);
    assert_eq!(report.model, "concurrency");
    for p in &report.properties {
        if !p.holds {
            print_path(p);
        }
        assert!(p.holds, "{} {} does not hold", p.expectation, p.name);
    }
    for name in SAFETY {
        assert_eq!(verdict(&report, name).expectation, Expectation::Always);
    }
    for name in EXAMPLES {
        assert_eq!(verdict(&report, name).expectation, Expectation::Sometimes);
    }
    assert_eq!(report.properties.len(), SAFETY.len() + EXAMPLES.len());
    assert!(report.property(names::STALE_COMMITS).is_none());
    assert!(report.ok());
    assert!(
        names::RECOVERY.contains(&format!("within {} steps", concurrency::RECOVERY_BOUND))
            && names::RECOVERY_TIGHT.contains(&format!("all {} ", concurrency::RECOVERY_BOUND)),
        "the property names state the recovery bound"
    );
    assert_eq!(report.unique_states, FENCED_STATES);
}

#[test]
fn unfenced_model_lets_a_stale_worker_commit() {
    let report = concurrency::run_unfenced(1);
    print(&report);
    assert_eq!(report.model, "concurrency (unfenced)");

    let stale = verdict(&report, names::STALE_COMMITS);
    assert_eq!(stale.expectation, Expectation::Sometimes);
    assert!(stale.holds, "a stale worker can commit without the fence");
    print_path(stale);
    let trace = stale.path.as_ref().expect("a found example has a path");
    assert!(
        trace
            .iter()
            .any(|line| line.contains("commits") && line.contains("lease lost, unfenced")),
        "the trace shows the stale commit"
    );

    // Without the fence, fencing and recovery fail (each with a trace);
    // everything else still holds.
    for name in NEED_FENCING {
        let p = verdict(&report, name);
        assert!(!p.holds, "{name} holds without fencing");
        print_path(p);
        assert!(p.path.is_some());
    }
    for p in &report.properties {
        if !NEED_FENCING.contains(&p.name.as_str()) {
            assert!(p.holds, "{} {} does not hold", p.expectation, p.name);
        }
    }
    assert_eq!(report.unique_states, UNFENCED_STATES);
}

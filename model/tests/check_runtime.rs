//! Exhaustive check of the runtime model: the runtime's protocol must
//! satisfy every property (with two workers and with three), and each
//! broken variant must fail the property that guards against it, with the
//! counterexample printed (run with `--nocapture` to read them).

#![cfg(feature = "check")]

use chatstate_model::check::runtime::{self, Config, Variant, names};
use chatstate_model::check::{CheckReport, Expectation, PropertyVerdict};

/// Unique states of the runtime model with two workers (pinned: a change
/// means the model changed).
const RUNTIME_STATES: usize = 60_366;
/// Unique states with three workers.
const THREE_WORKER_STATES: usize = 792_539;
/// Unique states of the broken variants.
const NO_HISTORY_STATES: usize = 96_937;
const LOUD_CLAIM_STATES: usize = 120_346;
const BLIND_CLAIM_STATES: usize = 129_274;
const NO_SWEEP_STATES: usize = 58_079;

const SAFETY: [&str; 4] = [
    names::MUTEX,
    names::QUIET_LOSS,
    names::NO_STEAL,
    names::NO_STALE_REPLY,
];

const EXAMPLES: [&str; 7] = [
    names::CLAIM_RACE,
    names::SKIPPED,
    names::HINT_LOST,
    names::TAKEOVER,
    names::STALE_GENERATION,
    names::CRASHED_OWNER,
    names::HAND_BACK,
];

const LIVENESS: [&str; 2] = [names::RECOVERY, names::HANDED_BACK];

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

/// Every property is there with its expectation.
fn check_shape(report: &CheckReport) {
    for name in SAFETY {
        assert_eq!(verdict(report, name).expectation, Expectation::Always);
    }
    for name in EXAMPLES {
        assert_eq!(verdict(report, name).expectation, Expectation::Sometimes);
    }
    for name in LIVENESS {
        assert_eq!(verdict(report, name).expectation, Expectation::Eventually);
    }
    assert_eq!(
        report.properties.len(),
        SAFETY.len() + EXAMPLES.len() + LIVENESS.len()
    );
}

fn check_holds(report: &CheckReport) {
    print(report);
    check_shape(report);
    for p in &report.properties {
        if !p.holds {
            print_path(p);
        }
        assert!(p.holds, "{} {} does not hold", p.expectation, p.name);
    }
    assert!(report.ok());
}

/// A broken variant: exactly `failing` fail, each with a counterexample
/// whose lines include every one of `shows`; everything else holds.
fn check_breaks(report: &CheckReport, failing: &[&str], shows: &[&str]) {
    print(report);
    check_shape(report);
    for p in &report.properties {
        if failing.contains(&p.name.as_str()) {
            assert!(!p.holds, "{} holds in {}", p.name, report.model);
            print_path(p);
            let trace = p.path.as_ref().expect("a failure has a counterexample");
            for needle in shows {
                assert!(
                    trace.iter().any(|line| line.contains(needle)),
                    "the counterexample of {} shows {needle:?}",
                    p.name
                );
            }
        } else {
            assert!(p.holds, "{} {} does not hold", p.expectation, p.name);
        }
    }
}

#[test]
fn the_runtime_protocol_holds_every_property() {
    let report = runtime::run(1);
    assert_eq!(report.model, "runtime");
    check_holds(&report);
    assert_eq!(report.unique_states, RUNTIME_STATES);
}

#[test]
fn the_runtime_protocol_holds_with_three_workers() {
    let report = runtime::run_three_workers(2);
    assert_eq!(report.model, "runtime (three workers)");
    check_holds(&report);
    assert_eq!(report.unique_states, THREE_WORKER_STATES);
}

#[test]
fn without_the_history_expectation_a_stale_reply_is_committed() {
    let report = runtime::check(Config::new(Variant::NoHistoryExpectation), 1);
    check_breaks(
        &report,
        &[names::NO_STALE_REPLY],
        &[
            "client commits EditMessage",
            "GENERATED FROM AN OLD HISTORY",
        ],
    );
    assert_eq!(report.unique_states, NO_HISTORY_STATES);
}

#[test]
fn a_loud_losing_claim_bumps_the_snapshot() {
    let report = runtime::check(Config::new(Variant::LoudClaims), 1);
    check_breaks(
        &report,
        &[names::QUIET_LOSS],
        &["the lease is fresh", "COMMITS its Update"],
    );
    assert_eq!(report.unique_states, LOUD_CLAIM_STATES);
}

#[test]
fn a_claim_without_the_check_under_the_lock_takes_a_fresh_lease() {
    let report = runtime::check(Config::new(Variant::BlindClaims), 1);
    check_breaks(&report, &[names::NO_STEAL], &["FRESH lease"]);
    assert_eq!(report.unique_states, BLIND_CLAIM_STATES);
}

#[test]
fn without_the_sweeper_a_lost_hint_strands_the_chat() {
    let report = runtime::check(Config::new(Variant::NoSweep), 1);
    check_breaks(
        &report,
        &[names::RECOVERY, names::HANDED_BACK],
        &["hint is lost", "the run may stay here forever"],
    );
    assert_eq!(report.unique_states, NO_SWEEP_STATES);
}

#[test]
fn the_state_count_does_not_depend_on_threads() {
    assert_eq!(runtime::run(2).unique_states, RUNTIME_STATES);
}

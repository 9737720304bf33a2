//! What a run reports: throughput and latency, the transitions by
//! outcome, what the worker runtimes did, and the oracle's verdict.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use chatstate::Transition;
use chatstate_model::oracle::Verdict;

use super::Args;
use super::shared::Tally;
use super::workers::Totals;

/// The result of a simulation.
pub(crate) struct Summary {
    pub(super) store: String,
    pub(super) seed: u64,
    pub(super) args: Args,
    pub(super) chats: usize,
    pub(super) elapsed: Duration,
    pub(super) committed: u64,
    /// Updates whose commit outcome stayed unknown.
    pub(super) maybe_committed: usize,
    pub(super) p50_us: u32,
    pub(super) p99_us: u32,
    pub(super) hints: u64,
    pub(super) tally: Tally,
    pub(super) workers: Totals,
    pub(super) takeovers: u64,
    /// Committed Updates whose observed notifications differ from what was
    /// published.
    pub(super) notifications_differing: u64,
    pub(super) verdict: Verdict,
}

impl Summary {
    /// No invariant violation, no store failure, and every observed
    /// Update announced what it published.
    pub(crate) fn ok(&self) -> bool {
        self.verdict.violations.is_empty()
            && self.tally.store_failures == 0
            && self.notifications_differing == 0
    }

    /// Claims that found nothing to take, of all claims made.
    pub(crate) fn wasted_claim_ratio(&self) -> f64 {
        let w = &self.workers;
        let all = w.claims_won + w.claims_lost;
        if all == 0 {
            0.0
        } else {
            w.claims_lost as f64 / all as f64
        }
    }

    pub(crate) fn render(&self) -> String {
        let mut s = String::new();
        let a = &self.args;
        let secs = self.elapsed.as_secs_f64();
        let _ = writeln!(
            s,
            "simulate: store {}, seed {}, {} chats, {} users, {} workers, crash rate {}",
            self.store, self.seed, self.chats, a.users, a.workers, a.crash_rate
        );
        let _ = writeln!(
            s,
            "  {} committed Updates in {secs:.2} s: {:.0} Updates/s, latency p50 {:.3} ms, p99 {:.3} ms",
            self.committed,
            self.committed as f64 / secs.max(1e-9),
            f64::from(self.p50_us) / 1000.0,
            f64::from(self.p99_us) / 1000.0,
        );
        self.render_transitions(&mut s);
        let w = &self.workers;
        let _ = writeln!(
            s,
            "  hints sent: {}, chats found by sweeps: {}, heartbeats: {}",
            self.hints, w.swept, w.heartbeats
        );
        let _ = writeln!(
            s,
            "  claims won: {}, lost: {} (wasted claim ratio {:.3}), failed: {}; takeovers of another runner's lapsed lease: {}",
            w.claims_won,
            w.claims_lost,
            self.wasted_claim_ratio(),
            w.claims_failed,
            self.takeovers
        );
        let _ = writeln!(
            s,
            "  leases lost: {}, handed back: {}, handlers errored: {}, runtime crashes: {}, stalls: {}",
            w.leases_lost, w.handed_back, w.errored, w.crashes, self.tally.stalls
        );
        if self.maybe_committed > 0 {
            let _ = writeln!(
                s,
                "  Updates whose commit outcome is unknown (settled by the check): {}",
                self.maybe_committed
            );
        }
        if self.notifications_differing > 0 {
            let _ = writeln!(
                s,
                "  committed Updates that announced other notifications than they published: {}",
                self.notifications_differing
            );
        }
        let t = &self.tally;
        if t.store_failures > 0 {
            let _ = writeln!(s, "  store failures: {}", t.store_failures);
            if t.unread_chats > 0 {
                let _ = writeln!(
                    s,
                    "  chats whose final read failed (not checked): {}",
                    t.unread_chats
                );
            }
            for e in t.store_errors.iter().take(5) {
                let _ = writeln!(s, "    {e}");
            }
        }
        let v = &self.verdict;
        let _ = writeln!(
            s,
            "  invariant violations: {} ({} committed Updates of {} chats replayed through the model)",
            v.violations.len(),
            v.updates_checked,
            v.chats_checked
        );
        for line in v.violations.iter().take(10) {
            let _ = writeln!(s, "    {line}");
        }
        s
    }

    /// One line per transition: committed, rolled back, rejected by kind.
    fn render_transitions(&self, s: &mut String) {
        let _ = writeln!(s, "  transitions (ok / rolled back / rejected):");
        let mut by_t: BTreeMap<Transition, Vec<(&'static str, u64)>> = BTreeMap::new();
        for ((t, outcome), n) in &self.tally.calls {
            by_t.entry(*t).or_default().push((outcome, *n));
        }
        for (t, outcomes) in by_t {
            let get = |k: &str| {
                outcomes
                    .iter()
                    .find(|(o, _)| *o == k)
                    .map_or(0, |(_, n)| *n)
            };
            let rejected: Vec<String> = outcomes
                .iter()
                .filter(|(o, _)| *o != "ok" && *o != "rolled back")
                .map(|(o, n)| format!("{o} {n}"))
                .collect();
            let _ = writeln!(
                s,
                "    {:<24} {:>8} {:>6}   {}",
                t.as_str(),
                get("ok"),
                get("rolled back"),
                if rejected.is_empty() {
                    "-".to_owned()
                } else {
                    rejected.join(", ")
                }
            );
        }
    }
}

pub(crate) fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

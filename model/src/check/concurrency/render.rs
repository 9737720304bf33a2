//! Rendering: one readable line per step, and a path as a list of them.

use stateright::Path;

use super::callback::CallbackOutcome;
use super::state::{Op, Phase, Runner, State, Tx, Who};
use super::{Action, ConcurrencyModel, WORKERS};
use crate::RejectionKind;

impl ConcurrencyModel {
    /// One readable line for a step from `before`.
    pub fn describe(&self, before: &State, action: Action) -> String {
        let after = self.step(before, action);
        match action {
            Action::Scan(who) => format!(
                "{who} scans: chat {} needs an owner ({}); requests the row lock to acquire",
                before.row.state,
                lease_words(before)
            ),
            Action::Begin(who, Op::ReadLock) => format!("{who} takes a shared row lock (ReadLock)"),
            Action::Begin(who, Op::Lock) => {
                format!("{who} takes the exclusive row lock (Lock: no bump)")
            }
            Action::Begin(who, op) => self.lock_and_bump(who, op, before),
            Action::Grant(who) => match before.actor(who).phase {
                Phase::Requesting(op) => self.lock_and_bump(who, op, before),
                _ => action.to_string(),
            },
            Action::Callback(who) => {
                let Phase::Locked(op, tx) = before.actor(who).phase else {
                    return action.to_string();
                };
                match self.callback(who, op, &tx) {
                    CallbackOutcome::Applied { tx: done, buffer } => {
                        let t = done.applied.expect("applied");
                        let what = match (op, who) {
                            (Op::Acquire, Who::Worker(w)) => {
                                format!("{who} acquires (runner {})", Runner(w))
                            }
                            _ => format!("{who} applies {t}{}", self.fence_words(who, op, &tx)),
                        };
                        format!(
                            "{what}: {} -> {}; buffers {buffer}",
                            tx.row.state, done.row.state
                        )
                    }
                    CallbackOutcome::NotCandidate => format!(
                        "{who} re-checks under the lock: no longer a candidate ({}, {}); \
                         rolls back",
                        tx.row.state,
                        lease_words_tx(&tx)
                    ),
                    CallbackOutcome::Rejected(r) => {
                        let learns = if matches!(r.kind, RejectionKind::LeaseLost { .. }) {
                            "; the worker drops its lease"
                        } else {
                            ""
                        };
                        format!(
                            "{who}'s {} from {} is rejected ({}); rolls back, bump undone{learns}",
                            r.transition,
                            r.from,
                            rejection_words(&r.kind)
                        )
                    }
                }
            }
            Action::Commit(who) => {
                let Phase::Called(_, tx, buffer) = before.actor(who).phase else {
                    return action.to_string();
                };
                let t = tx.applied.expect("applied");
                let mut notes = vec![format!("snapshot {}", tx.row.snapshot)];
                if let Who::Worker(w) = who
                    && t.is_worker()
                    && before.row.owner != Some(w)
                {
                    notes.push(if self.config.fenced {
                        "lease lost".to_owned()
                    } else {
                        "lease lost, unfenced".to_owned()
                    });
                }
                if buffer.hint {
                    notes.push("hint buffered".to_owned());
                }
                format!("{who} commits {t} ({})", notes.join("; "))
            }
            Action::CommitFails(who) => {
                format!("{who}'s commit fails: rolls back (bump undone), buffer discarded")
            }
            Action::Flush(who) => {
                let Phase::Committed(buffer) = before.actor(who).phase else {
                    return action.to_string();
                };
                let hwm = after.as_ref().map_or(before.hwm, |a| a.hwm);
                let fate = if hwm > before.hwm {
                    format!("receiver hwm {} -> {hwm}", before.hwm)
                } else {
                    format!("receiver drops it (hwm {})", before.hwm)
                };
                format!("{who} flushes {buffer}: {fate}")
            }
            Action::Release(who) => {
                let op = match before.actor(who).phase {
                    Phase::Held(op) => op.to_string(),
                    _ => "lock".to_owned(),
                };
                format!("{who} ends its {op} (no bump, nothing published)")
            }
            Action::Heartbeat(who) => match who {
                Who::Worker(w) => {
                    format!("{who} heartbeats runner {} (lease fresh again)", Runner(w))
                }
                Who::Client(_) => action.to_string(),
            },
            Action::Crash(who) => {
                let what = match before.actor(who).phase {
                    Phase::Committed(_) => "; its unflushed notifications are lost",
                    Phase::Locked(..) | Phase::Called(..) | Phase::Held(_) => {
                        "; its open transaction rolls back"
                    }
                    _ => "",
                };
                format!("{who} crashes (stops heartbeating for good){what}")
            }
            Action::Tick => {
                let Some(after) = after else {
                    return "the clock ticks".to_owned();
                };
                match after.row.owner {
                    Some(w) => format!(
                        "the clock ticks: heartbeat of {} is {} old ({})",
                        Runner(w),
                        after.lease_age,
                        if after.lease_fresh() {
                            "fresh"
                        } else {
                            "stale"
                        }
                    ),
                    None => "the clock ticks".to_owned(),
                }
            }
        }
    }

    fn lock_and_bump(&self, who: Who, op: Op, before: &State) -> String {
        format!(
            "{who} locks the row for {op}, bumping snapshot_version to {} in its transaction \
             (chat {}, {})",
            before.row.snapshot + 1,
            before.row.state,
            lease_words(before)
        )
    }

    fn fence_words(&self, who: Who, op: Op, tx: &Tx) -> String {
        let Who::Worker(w) = who else {
            return String::new();
        };
        if !op.is_fenceable() {
            return String::new();
        }
        let lost = tx.row.owner != Some(w);
        match (self.config.fenced, lost) {
            (true, _) => format!(" (fenced by {})", Runner(w)),
            (false, true) => " (lease lost, unfenced)".to_owned(),
            (false, false) => " (unfenced)".to_owned(),
        }
    }
    /// A path rendered one readable line per step, starting with the
    /// initial state.
    pub fn render_path(&self, path: &Path<State, Action>) -> Vec<String> {
        let steps = path.clone().into_vec();
        let mut lines = Vec::with_capacity(steps.len() + 1);
        if let Some((first, _)) = steps.first() {
            lines.push(format!("start: {first}"));
        }
        for (state, action) in &steps {
            if let Some(action) = action {
                lines.push(self.describe(state, *action));
            }
        }
        if let Some((last, _)) = steps.last() {
            lines.push(format!("end: {last}"));
        }
        lines
    }
}
fn lease_words(s: &State) -> String {
    match s.row.owner {
        None => "no lease".to_owned(),
        Some(w) if s.lease_fresh() => format!("lease of {} fresh", Runner(w)),
        Some(w) => format!("lease of {} stale", Runner(w)),
    }
}

fn lease_words_tx(tx: &Tx) -> String {
    match tx.row.owner {
        None => "no lease".to_owned(),
        Some(w) if tx.lease_fresh => format!("lease of {} fresh", Runner(w)),
        Some(w) => format!("lease of {} stale", Runner(w)),
    }
}

fn rejection_words(kind: &RejectionKind) -> String {
    match kind {
        RejectionKind::LeaseLost { actual, .. } => {
            let owner = actual
                .map(|r| {
                    (0..WORKERS)
                        .find(|w| ConcurrencyModel::runner_id(*w) == r)
                        .map_or_else(|| r.to_string(), |w| Runner(w).to_string())
                })
                .unwrap_or_else(|| "nobody".to_owned());
            format!("LeaseLost: the chat's runner is {owner}")
        }
        other => match other.reason() {
            Some(reason) => format!("{}: {reason}", other.name()),
            None => other.name().to_owned(),
        },
    }
}

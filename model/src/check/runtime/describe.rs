//! Readable trace lines for the runtime model's steps.

use super::Variant;
use super::model::{Decided, Refusal, RuntimeModel};
use super::state::{Action, Runner, State, Task, Work};
use crate::{Input, RejectionKind};

fn lease(s: &State) -> String {
    match s.row.owner {
        None => "no lease".to_owned(),
        Some(w) if s.lease_fresh() => format!("lease of {} fresh", Runner(w)),
        Some(w) => format!("lease of {} stale", Runner(w)),
    }
}

fn refusal(r: &Refusal) -> String {
    match r {
        Refusal::LeaseLost(rej) => match &rej.kind {
            RejectionKind::LeaseLost { actual, .. } => {
                let owner = actual
                    .map(|a| {
                        (0..super::MAX_WORKERS as u8)
                            .find(|w| RuntimeModel::runner_id(*w) == a)
                            .map_or_else(|| a.to_string(), |w| Runner(w).to_string())
                    })
                    .unwrap_or_else(|| "nobody".to_owned());
                format!("LeaseLost (the chat's runner is {owner})")
            }
            other => other.name().to_owned(),
        },
        Refusal::HistoryChanged { expected, actual } => {
            format!("HistoryChanged (expected history {expected}, the chat has {actual})")
        }
        Refusal::Other(rej) => format!("{} from {}", rej.kind.name(), rej.from),
    }
}

fn hint_words(hint: bool) -> &'static str {
    if hint { "; hint buffered" } else { "" }
}

fn receivers(model: &RuntimeModel, s: &State) -> String {
    let live: Vec<String> = model
        .workers()
        .filter(|w| s.worker(*w).live())
        .map(|w| format!("w{}", w + 1))
        .collect();
    if live.is_empty() {
        "nobody listens".to_owned()
    } else {
        format!("the hint reaches {}", live.join(", "))
    }
}

pub(super) fn line(model: &RuntimeModel, s: &State, action: Action) -> String {
    let variant = model.config.variant;
    match action {
        Action::Client(op) => {
            match model.decide(&s.row, s.lease_fresh(), &client_input(op), None, None) {
                Decided::Applied { row, hint, .. } => format!(
                    "client commits {op}: {} -> {} ({}){}",
                    s.row.state,
                    row.state,
                    lease(s),
                    hint_words(hint)
                ),
                Decided::Refused(r) => format!("client's {op} is refused: {}", refusal(&r)),
            }
        }
        Action::ClientFlush => format!("client flushes: {}", receivers(model, s)),
        Action::ClientFlushLost => {
            "client dies after commit, before its flush: the hint is lost".to_owned()
        }
        Action::Sweep(w) => format!(
            "w{} sweeps: claimable lists the chat ({}, {}, row not locked); claims it",
            w + 1,
            s.row.state,
            lease(s)
        ),
        Action::ReadHint(w) => {
            let wk = s.worker(w);
            if wk.live() && wk.task == Task::Idle && !wk.flush {
                format!("w{} reads the hint and claims", w + 1)
            } else {
                format!(
                    "w{} reads the hint and drops it (the chat is held or claimed locally)",
                    w + 1
                )
            }
        }
        Action::ClaimLock(w) => format!(
            "w{} try_acquire locks the row (store time: {}, {})",
            w + 1,
            s.row.state,
            lease(s)
        ),
        Action::ClaimEnd(w) => {
            let Task::Claiming { fresh } = s.worker(w).task else {
                return action.to_string();
            };
            let runnable = s.row.state.is_runnable();
            let wins = (runnable && !fresh) || variant == Variant::BlindClaims;
            if wins {
                let how = if variant == Variant::BlindClaims {
                    " without checking under the lock"
                } else {
                    ""
                };
                let taken = match s.row.owner {
                    Some(o) if fresh => format!(", taking over {}'s FRESH lease", Runner(o)),
                    Some(o) => format!(", taking over {}'s stale lease", Runner(o)),
                    None => String::new(),
                };
                format!(
                    "w{} acquires{how} with runner {}{taken}: heartbeat written, the handler starts generating",
                    w + 1,
                    Runner(w)
                )
            } else {
                let why = if runnable {
                    "the lease is fresh"
                } else {
                    "the chat is not runnable"
                };
                if variant == Variant::LoudClaims {
                    format!(
                        "w{} loses ({why}) but COMMITS its Update: snapshot_version bumped, an empty chat:update published",
                        w + 1
                    )
                } else {
                    format!(
                        "w{} loses ({why}): rolls back quietly (no bump, nothing published)",
                        w + 1
                    )
                }
            }
        }
        Action::Heartbeat(w) => {
            if s.row.owner == Some(w) {
                format!("w{} heartbeats {}: Held (fresh again)", w + 1, Runner(w))
            } else {
                let owner = s
                    .row
                    .owner
                    .map_or_else(|| "nobody".to_owned(), |o| Runner(o).to_string());
                format!(
                    "w{} heartbeats {}: Lost (the chat's runner is {owner}); its handler stops",
                    w + 1,
                    Runner(w)
                )
            }
        }
        Action::Work(w, work) => {
            let Task::Running { current } = s.worker(w).task else {
                return action.to_string();
            };
            let expect = (variant != Variant::NoHistoryExpectation)
                .then(|| RuntimeModel::expected_history(current));
            let input = work_input(work, s.row.state);
            let what = match expect {
                Some(v) => format!("fenced by {}, expecting history {v}", Runner(w)),
                None if current => format!("fenced by {}, no history expectation", Runner(w)),
                None => format!(
                    "fenced by {}, no history expectation, GENERATED FROM AN OLD HISTORY",
                    Runner(w)
                ),
            };
            match model.decide(&s.row, s.lease_fresh(), &input, Some(w), expect) {
                Decided::Applied {
                    row,
                    transition,
                    hint,
                    ..
                } => format!(
                    "w{} commits {transition} ({what}): {} -> {}{}",
                    w + 1,
                    s.row.state,
                    row.state,
                    hint_words(hint)
                ),
                Decided::Refused(r) => {
                    let then = match r {
                        Refusal::LeaseLost(_) => "; the handler stops",
                        Refusal::HistoryChanged { .. } => "; it regenerates from the new history",
                        Refusal::Other(_) => "; the handler ends",
                    };
                    format!(
                        "w{}'s {} ({what}) is refused: {}{then}",
                        w + 1,
                        input.transition(),
                        refusal(&r)
                    )
                }
            }
        }
        Action::GraceOver(w) => format!("w{}'s grace period ends: it hands the chat back", w + 1),
        Action::Abandon(w) => {
            match model.decide(&s.row, s.lease_fresh(), &Input::Abandon, Some(w), None) {
                Decided::Applied { row, hint, .. } => format!(
                    "w{} commits Abandon (fenced by {}): {} -> {} unowned{}",
                    w + 1,
                    Runner(w),
                    s.row.state,
                    row.state,
                    hint_words(hint)
                ),
                Decided::Refused(r) => format!("w{}'s Abandon is refused: {}", w + 1, refusal(&r)),
            }
        }
        Action::Flush(w) => format!("w{} flushes: {}", w + 1, receivers(model, s)),
        Action::Crash(w) => {
            let wk = s.worker(w);
            let mut what = Vec::new();
            if matches!(wk.task, Task::Claiming { .. }) {
                what.push("its claim rolls back");
            }
            if wk.flush {
                what.push("its unflushed hint is lost");
            }
            if wk.task.holds() {
                what.push("its heartbeats stop");
            }
            let what = if what.is_empty() {
                String::new()
            } else {
                format!(": {}", what.join(", "))
            };
            format!("w{} crashes{what}", w + 1)
        }
        Action::Shutdown(w) => {
            let wk = s.worker(w);
            let then = match wk.task {
                Task::Claiming { .. } => "; its claim rolls back",
                Task::Running { .. } => "; its handler gets a grace period",
                _ => "",
            };
            format!(
                "w{} begins a graceful shutdown: stops claiming{then}",
                w + 1
            )
        }
        Action::Tick => match s.row.owner {
            Some(w) => format!(
                "the clock ticks: {}'s heartbeat is {} old{}",
                Runner(w),
                s.lease_age + 1,
                if s.lease_age + 1 >= super::STALE_AFTER {
                    " (stale)"
                } else {
                    ""
                }
            ),
            None => "the clock ticks".to_owned(),
        },
    }
}

fn client_input(op: super::ClientOp) -> Input {
    RuntimeModel::client_input_of(op)
}

fn work_input(work: Work, state: crate::ExecutionState) -> Input {
    RuntimeModel::work_input_of(work, state)
}

//! The workers: `--workers` instances of the shipped worker runtime
//! (`chatstate_worker::Runtime`), each with a handler that runs turns the
//! way a model-driven worker would, and a supervisor that crashes a runtime
//! now and then and starts a fresh one in its place.
//!
//! A runtime hears ownership hints from the run's publisher, claims with
//! `try_acquire`, heartbeats, sweeps for lapsed leases and hands chats back;
//! every Update it makes is recorded through the run's observer. The
//! handler reads the history, picks a step from what it read, and commits
//! it through `Lease::update` (fenced, with the history expectation): a
//! step generated before a user's edit fails with `HistoryChanged`, and the
//! handler reads again and carries on.
//!
//! With `--crash-rate`, a handler may crash its runtime (`Runtime::abort`:
//! nothing is written, inside an Update or between two, and every chat the
//! runtime held keeps a lease nobody refreshes) or stall for longer than
//! the heartbeat staleness.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chatstate::{
    Error, ExecutionState, Fenced, Input, JsonText, NewMessage, Outcome, Part, Role, RunnerId,
    Store, Transition, WorkerId,
};
use chatstate_model::ToolState;
use chatstate_worker::{Handler, Lease, Released, Runtime, Stats};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use super::shared::Shared;
use super::users::DYNAMIC_TOOL;

/// What the runtimes of one worker slot did, summed over its restarts.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Totals {
    pub(super) claims_won: u64,
    /// Claims that found a fresh lease or a chat no longer runnable.
    pub(super) claims_lost: u64,
    pub(super) claims_failed: u64,
    pub(super) heartbeats: u64,
    pub(super) leases_lost: u64,
    pub(super) handed_back: u64,
    pub(super) errored: u64,
    pub(super) swept: u64,
    /// Runtimes aborted.
    pub(super) crashes: u64,
}

impl Totals {
    fn add_stats(&mut self, s: Stats) {
        self.claims_won += s.claims_won;
        self.claims_lost += s.claims_held + s.claims_not_runnable;
        self.claims_failed += s.claims_failed;
        self.heartbeats += s.heartbeats;
        self.leases_lost += s.leases_lost;
        self.handed_back += s.handed_back;
        self.errored += s.errored;
        self.swept += s.swept;
    }

    pub(super) fn add(&mut self, o: Totals) {
        self.claims_won += o.claims_won;
        self.claims_lost += o.claims_lost;
        self.claims_failed += o.claims_failed;
        self.heartbeats += o.heartbeats;
        self.leases_lost += o.leases_lost;
        self.handed_back += o.handed_back;
        self.errored += o.errored;
        self.swept += o.swept;
        self.crashes += o.crashes;
    }
}

/// One worker slot: runs a runtime until the run stops (then shuts it down
/// gracefully) or one of its handlers crashes it (then aborts it and, after
/// a restart's pause, starts a fresh one with a new worker id).
pub(super) async fn worker<S: Store>(
    sh: Arc<Shared<S>>,
    mut rng: StdRng,
) -> anyhow::Result<Totals> {
    let mut totals = Totals::default();
    while !sh.stopped() {
        let crash = CancellationToken::new();
        let handler = SimHandler {
            sh: sh.clone(),
            crash: crash.clone(),
            seeds: Mutex::new(StdRng::seed_from_u64(rng.random())),
        };
        let worker = WorkerId(uuid::Builder::from_random_bytes(rng.random()).into_uuid());
        let runtime = Runtime::builder(sh.store.clone(), sh.notify.clone(), handler)
            .options(sh.options)
            .worker_id(worker)
            .capacity(sh.args.worker_capacity)
            .hints(sh.publisher.subscribe())
            .observer(sh.recorder.clone())
            .spawn()
            .context("starting a worker runtime")?;
        tokio::select! {
            () = crash.cancelled() => {
                totals.add_stats(runtime.abort());
                totals.crashes += 1;
                // A restart takes a while.
                sh.sleep(sh.options.heartbeat_stale / 4).await;
            }
            () = sh.until_stopped() => totals.add_stats(runtime.shutdown().await),
        }
    }
    Ok(totals)
}

/// Runs turns on the chats a runtime claims.
struct SimHandler<S: Store> {
    sh: Arc<Shared<S>>,
    /// Cancelled to have the supervisor crash this runtime.
    crash: CancellationToken,
    /// Seeds each chat's choices.
    seeds: Mutex<StdRng>,
}

impl<S: Store> Handler<S> for SimHandler<S> {
    async fn handle(&self, lease: &Lease<S>) -> Released {
        let seed = self.seeds.lock().expect("seed lock").random();
        Chat {
            sh: &self.sh,
            crash: &self.crash,
            lease,
            rng: StdRng::seed_from_u64(seed),
            turn: Turn::default(),
        }
        .run()
        .await
    }
}

/// A worker's memory of the turn it runs.
#[derive(Default)]
struct Turn {
    steps: u32,
    calls: u64,
    /// Steps spent waiting for client tool results.
    waited: u32,
}

/// What a handler read before a step: what it generates the step from.
struct View {
    state: ExecutionState,
    compaction_requested: bool,
    /// Calls left open (by an interrupted step).
    open_calls: Vec<(String, String)>,
}

/// What a handler does after a committed step.
enum Next {
    Continue,
    Release(Released),
}

/// Where a crash strikes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Crash {
    /// With the step's transaction open: it rolls back.
    InsideUpdate,
    /// After the step's Update ended.
    BetweenUpdates,
}

/// One claimed chat.
struct Chat<'a, S: Store> {
    sh: &'a Shared<S>,
    crash: &'a CancellationToken,
    lease: &'a Lease<S>,
    rng: StdRng,
    turn: Turn,
}

impl<S: Store> Chat<'_, S> {
    /// Steps until the turn ends, the lease is lost, the runtime stops, or
    /// the step keeps failing.
    async fn run(mut self) -> Released {
        let sh = self.sh;
        let mut misses = 0;
        let mut carried: Option<View> = None;
        loop {
            // The history the step is generated from: read again unless
            // the last step was ours and left the chat running (a change
            // by anyone else since then fails the step with
            // `HistoryChanged`, and the next round reads it).
            let view = match carried.take() {
                Some(view) => view,
                None => match self.read().await {
                    Ok(view) => view,
                    Err(released) => return released,
                },
            };
            let roll = self.rng.random_range(0..100u32);
            let idle = self.nothing_to_do(&view, roll);
            // Generate (or wait), meanwhile users may edit or interrupt.
            let pause = sh.pause(&mut self.rng, sh.args.step_ms);
            tokio::select! {
                () = nap(pause) => {}
                () = self.lease.lost() => return Released::Finished,
                () = self.lease.stopping() => return Released::HandBack,
            }
            if idle {
                misses = 0;
                continue;
            }
            if self
                .rng
                .random_bool((sh.args.crash_rate / 2.0).clamp(0.0, 1.0))
            {
                // A stall (a generation that hangs) longer than the
                // staleness; the lease's own heartbeat carries on.
                sh.tally().stalls += 1;
                tokio::time::sleep(sh.options.heartbeat_stale * 3 / 2).await;
            }
            let crash = self
                .rng
                .random_bool(sh.args.crash_rate.clamp(0.0, 1.0))
                .then(|| {
                    if self.rng.random() {
                        Crash::InsideUpdate
                    } else {
                        Crash::BetweenUpdates
                    }
                });
            let runner = self.lease.runner();
            let started = Instant::now();
            let mut applied = Applied::default();
            let turn = &mut self.turn;
            let result = self
                .lease
                .update(async |tx| {
                    let next = worker_step(tx, &mut applied, &view, runner, roll, turn).await?;
                    if crash == Some(Crash::InsideUpdate) {
                        sh.tally().rolled_back(&applied.transitions);
                        match crash_now(self.crash).await {}
                    }
                    Ok(next)
                })
                .await;
            sh.settle(&applied.transitions, &result, started);
            if crash.is_some() {
                match crash_now(self.crash).await {}
            }
            match result {
                Ok(Next::Continue) => {
                    misses = 0;
                    carried = applied
                        .to
                        .filter(|to| matches!(to, ExecutionState::R0 | ExecutionState::R1))
                        .map(|state| View {
                            state,
                            // A request is consumed by the step it asks for.
                            compaction_requested: false,
                            open_calls: Vec::new(),
                        });
                    if self.rng.random_ratio(1, 40) {
                        // Another worker may carry on from here.
                        return Released::HandBack;
                    }
                }
                Ok(Next::Release(released)) => return released,
                Err(_) if self.lease.is_lost() => return Released::Finished,
                // HistoryChanged (a user edited: the next load reads the
                // new history) or a step the chat moved past meanwhile.
                Err(Error::Rejected(_)) => {
                    misses += 1;
                    if misses > 20 {
                        return Released::Errored;
                    }
                }
                Err(_) => return Released::Errored,
            }
        }
    }

    /// Reads the chat (setting the lease's history expectation) and sees
    /// what there is to do; `Err` says how to let go when it cannot.
    async fn read(&self) -> Result<View, Released> {
        let record = match self.lease.load().await {
            Ok(record) => record,
            Err(_) if self.lease.is_lost() => return Err(Released::Finished),
            Err(e) => {
                self.sh.tally().store_failure(&e);
                return Err(Released::Errored);
            }
        };
        Ok(View {
            state: record.state(),
            compaction_requested: record.row.compaction_requested_at.is_some(),
            open_calls: ToolState::from_history(
                record
                    .active_history()
                    .map(|m| (m.role, m.content.as_slice())),
            )
            .outstanding(None),
        })
    }

    /// Whether there is no step to take now: waiting for client tool
    /// results (until the deadline the worker enforces, here a number of
    /// steps), or, now and then, at rest without letting go yet.
    fn nothing_to_do(&mut self, view: &View, roll: u32) -> bool {
        use ExecutionState as St;
        match view.state {
            St::A0 | St::A1 => {
                self.turn.waited += 1;
                if self.turn.waited < 25 {
                    return true;
                }
                self.turn.waited = 0;
                false
            }
            St::R0 | St::R1 | St::I0 | St::I1 => false,
            _ => roll >= 90,
        }
    }
}

/// Sleeps for `d`; for no time at all, only lets other tasks run (a timer
/// would round up to its resolution).
async fn nap(d: Duration) {
    if d.is_zero() {
        tokio::task::yield_now().await;
    } else {
        tokio::time::sleep(d).await;
    }
}

/// Has the supervisor crash this runtime, and waits to be aborted.
async fn crash_now(crash: &CancellationToken) -> Infallible {
    crash.cancel();
    std::future::pending().await
}

/// The transitions a step applied, and where the last one left the chat.
#[derive(Default)]
struct Applied {
    transitions: Vec<Transition>,
    to: Option<ExecutionState>,
}

/// Applies one fenced transition and notes it.
async fn apply<S: Store>(
    tx: &mut Fenced<'_, '_, S>,
    applied: &mut Applied,
    input: Input,
) -> Result<Outcome, Error> {
    let t = input.transition();
    let outcome = tx.apply_input(input).await?;
    applied.transitions.push(t);
    applied.to = Some(outcome.to);
    Ok(outcome)
}

/// One step of a turn, generated from `view`, fenced by the lease.
async fn worker_step<S: Store>(
    tx: &mut Fenced<'_, '_, S>,
    applied: &mut Applied,
    view: &View,
    runner: RunnerId,
    roll: u32,
    turn: &mut Turn,
) -> Result<Next, Error> {
    use ExecutionState as St;
    let say = |text: String| NewMessage::assistant(text);
    match view.state {
        St::R0 | St::R1 => {
            turn.steps += 1;
            turn.waited = 0;
            if view.compaction_requested {
                let input = Input::CommitStep {
                    messages: vec![say("summary of the conversation".into())],
                    consume_compaction_request: true,
                };
                apply(tx, applied, input).await?;
                return Ok(Next::Continue);
            }
            match roll {
                0..15 => {
                    apply(tx, applied, Input::RecordGenerationAttempt).await?;
                    if roll < 5 {
                        let retry = Input::RecordRetryState {
                            retry_state: format!(
                                "{{\"attempt\": {}, \"delay_ms\": 250}}",
                                turn.steps
                            ),
                        };
                        apply(tx, applied, retry).await?;
                    }
                }
                15..45 => {
                    let input = Input::CommitStep {
                        messages: vec![say(format!("step {}", turn.steps))],
                        consume_compaction_request: false,
                    };
                    apply(tx, applied, input).await?;
                }
                45..55 => {
                    turn.calls += 1;
                    let id = format!("{runner}-ask-{}", turn.calls);
                    let input = Input::CommitStep {
                        messages: vec![NewMessage::new(
                            Role::Assistant,
                            vec![Part::text("a question"), Part::tool_call(id, DYNAMIC_TOOL)],
                        )],
                        consume_compaction_request: false,
                    };
                    apply(tx, applied, input).await?;
                    apply(tx, applied, Input::EnterRequiresAction).await?;
                }
                55..62 => {
                    turn.calls += 1;
                    let id = format!("{runner}-search-{}", turn.calls);
                    let result = Part::ToolResult {
                        tool_call_id: id.clone(),
                        tool_name: "web_search".into(),
                        result: JsonText::string("three hits"),
                        is_error: false,
                    };
                    let input = Input::CommitStep {
                        messages: vec![
                            NewMessage::new(
                                Role::Assistant,
                                vec![Part::tool_call(id, "web_search")],
                            ),
                            NewMessage::new(Role::Tool, vec![result]),
                        ],
                        consume_compaction_request: false,
                    };
                    apply(tx, applied, input).await?;
                }
                62..92 => {
                    let input = Input::CommitStep {
                        messages: vec![say("the answer".into())],
                        consume_compaction_request: false,
                    };
                    apply(tx, applied, input).await?;
                    let done = apply(tx, applied, Input::FinishTurn).await?;
                    turn.steps = 0;
                    if done.to == St::W {
                        return release(tx, applied, roll, 80, 89).await;
                    }
                }
                _ => {
                    let input = Input::FinishError {
                        last_error: Some(JsonText::string("the model is overloaded")),
                    };
                    apply(tx, applied, input).await?;
                    return release(tx, applied, roll, 97, 99).await;
                }
            }
            Ok(Next::Continue)
        }
        St::I0 | St::I1 => {
            // Answer the calls left open by the interrupted step, then stop.
            let partial: Vec<NewMessage> = view
                .open_calls
                .iter()
                .map(|(id, name)| {
                    NewMessage::new(
                        Role::Tool,
                        vec![Part::ToolResult {
                            tool_call_id: id.clone(),
                            tool_name: name.clone(),
                            result: JsonText::string("interrupted"),
                            is_error: true,
                        }],
                    )
                })
                .collect();
            let input = Input::FinishInterruption {
                partial_messages: partial,
            };
            let done = apply(tx, applied, input).await?;
            if done.to == St::W {
                return release(tx, applied, roll, 50, 100).await;
            }
            Ok(Next::Continue)
        }
        // The deadline the worker enforces has passed.
        St::A0 | St::A1 => {
            let input = Input::CancelRequiresAction { reason: None };
            apply(tx, applied, input).await?;
            Ok(Next::Continue)
        }
        // At rest, archived or invalid: nothing to run.
        _ => release(tx, applied, roll, 45, 100).await,
    }
}

/// How a handler lets go of a chat at the end of its work, by `roll`:
/// below `abandon` it abandons the chat itself in this Update; below
/// `finish` it leaves that to the runtime (`Finished`); otherwise it stops
/// heartbeating and lets the lease lapse (`Errored`).
async fn release<S: Store>(
    tx: &mut Fenced<'_, '_, S>,
    applied: &mut Applied,
    roll: u32,
    abandon: u32,
    finish: u32,
) -> Result<Next, Error> {
    if roll < abandon {
        apply(tx, applied, Input::Abandon).await?;
        Ok(Next::Release(Released::Finished))
    } else if roll < finish {
        Ok(Next::Release(Released::Finished))
    } else {
        Ok(Next::Release(Released::Errored))
    }
}

//! The runtime model's steps: which actions each state enables and what
//! they do, with every transition decided by the real [`decide`].

use std::collections::BTreeSet;

use uuid::Uuid;

use super::state::{
    Action, ClientOp, Flags, MAX_WORKERS, Row, STALE_AFTER, State, Status, Task, Work, Worker,
};
use super::{Config, Variant};
use crate::{
    Assigned, BusyBehavior, ChatId, ChatRow, ChatStatus, EditContext, EditTarget, Env,
    ExecutionState, Input, MessageId, NewMessage, Options, Owner, Part, QueuedMessageId, Rejection,
    RejectionKind, Role, RunnerId, Snapshot, Timestamp, ToolState, Transition, Versions,
    Visibility, WorkerId, decide,
};

/// The chat's `history_version` in every decision. The model does not
/// count versions (the row's history is unbounded); a handler whose
/// generation base is current expects this version, one generated before
/// the last history change expects the one before it.
const HISTORY_NOW: i64 = 7;

/// The queue cap the model runs with (`Options::max_queue_size`).
pub const QUEUE_CAP: u32 = 1;

/// What a decided Update did.
#[derive(Clone, Debug)]
pub(super) enum Decided {
    /// Applied: the row afterwards, whether it changed the history, and
    /// whether its notifications carry an ownership hint.
    Applied {
        row: Row,
        transition: Transition,
        history: bool,
        hint: bool,
    },
    /// Refused; nothing written.
    Refused(Refusal),
}

/// Why an Update's callback refused its transition.
#[derive(Clone, Debug)]
pub(super) enum Refusal {
    /// The fence: the caller's runner is not the chat's runner.
    LeaseLost(Rejection),
    /// The history expectation (`RejectionKind::HistoryChanged`): the
    /// chat's history changed since the caller generated from it.
    HistoryChanged {
        /// The version the caller generated from.
        expected: i64,
        /// The chat's version.
        actual: i64,
    },
    /// Any other rejection (matrix, inputs).
    Other(Rejection),
}

/// The runtime model (a stateright [`stateright::Model`]).
#[derive(Clone, Debug)]
pub struct RuntimeModel {
    /// Bounds and variant.
    pub config: Config,
    options: Options,
    edit: EditContext,
}

impl RuntimeModel {
    /// A model of `config`.
    pub fn new(config: Config) -> Self {
        assert!(
            (2..=MAX_WORKERS as u8).contains(&config.workers),
            "2 to {MAX_WORKERS} workers"
        );
        RuntimeModel {
            config,
            options: Options {
                max_queue_size: QUEUE_CAP,
                ..Options::default()
            },
            edit: EditContext {
                message_id: MessageId(1),
                target: Some(EditTarget {
                    role: Role::User,
                    visibility: Visibility::Both,
                    model_config_id: None,
                }),
                from_target: vec![MessageId(1)],
                tools_before: ToolState::default(),
            },
        }
    }

    /// The model's name in reports.
    pub fn name(&self) -> &'static str {
        self.config.variant.model_name(self.config.workers)
    }

    pub(super) fn workers(&self) -> impl Iterator<Item = u8> + use<> {
        0..self.config.workers
    }

    /// The initial state: right after CreateChat (R0, unowned); its hint
    /// waits in the client's buffer.
    pub fn init(&self) -> State {
        State {
            row: Row {
                state: ExecutionState::R0,
                owner: None,
            },
            lease_age: 0,
            lock: None,
            n: self.config.workers,
            workers: [Worker::default(); MAX_WORKERS],
            client_left: self.config.client_updates,
            client_flush: true,
            handed_back: false,
            flags: Flags::default(),
        }
    }

    // --- Real model glue -------------------------------------------------

    fn chat_id() -> ChatId {
        ChatId(Uuid::from_u128(0xc4a7))
    }

    pub(super) fn runner_id(w: u8) -> RunnerId {
        RunnerId(Uuid::from_u128(0x5200 + u128::from(w)))
    }

    fn owner(w: u8) -> Owner {
        Owner {
            worker_id: WorkerId(Uuid::from_u128(0x3000 + u128::from(w))),
            runner_id: Self::runner_id(w),
        }
    }

    fn worker_of(owner: &Owner) -> u8 {
        (0..MAX_WORKERS as u8)
            .find(|w| Self::runner_id(*w) == owner.runner_id)
            .expect("every runner in the model belongs to a worker")
    }

    /// The real snapshot an Update on `row` sees.
    fn snapshot(row: &Row, lease_fresh: bool) -> Snapshot {
        use ExecutionState as S;
        let status = match row.state {
            S::W => ChatStatus::Waiting,
            S::R0 | S::R1 => ChatStatus::Running,
            S::I0 | S::I1 => ChatStatus::Interrupting,
            other => unreachable!("the runtime model never reaches {other}"),
        };
        Snapshot {
            row: ChatRow {
                id: Self::chat_id(),
                owner_id: Uuid::from_u128(0x05e7),
                status,
                archived: false,
                owner: row.owner.map(Self::owner),
                last_error: None,
                retry_state: None,
                generation_attempt: 0,
                requires_action_deadline_at: None,
                compaction_requested_at: None,
                versions: Versions {
                    snapshot: 9,
                    history: HISTORY_NOW,
                    queue: 0,
                    retry_state: 0,
                },
                dynamic_tools: BTreeSet::new(),
                last_model_config_id: None,
            },
            queue: if row.state.queue_non_empty() {
                vec![QueuedMessageId(1)]
            } else {
                Vec::new()
            },
            tools: ToolState::default(),
            lease_fresh,
            now: Timestamp(0),
        }
    }

    pub(super) fn client_input_of(op: ClientOp) -> Input {
        match op {
            ClientOp::Send => Input::SendMessage {
                message: NewMessage::user("more"),
                busy_behavior: BusyBehavior::Queue,
            },
            ClientOp::Edit => Input::EditMessage {
                message_id: MessageId(1),
                content: vec![Part::text("edited")],
                created_by: None,
                model_config_id: None,
            },
            ClientOp::Interrupt => Input::Interrupt { reason: None },
        }
    }

    pub(super) fn work_input_of(work: Work, state: ExecutionState) -> Input {
        match (work, state) {
            (_, ExecutionState::I0 | ExecutionState::I1) => Input::FinishInterruption {
                partial_messages: Vec::new(),
            },
            (Work::Step, _) => Input::CommitStep {
                messages: vec![NewMessage::assistant("step")],
                consume_compaction_request: false,
            },
            (Work::Finish, _) => Input::FinishTurn,
        }
    }

    /// Runs an Update's callback on `row` the way the machine does: the
    /// real `decide` on the locked snapshot (fenced by `fence`'s runner as
    /// `Tx::fenced` does, with the history expectation `expect` as
    /// `Fenced::expect_history` does), the real `Snapshot::apply`, and the
    /// real `after_update`'s hint condition.
    pub(super) fn decide(
        &self,
        row: &Row,
        lease_fresh: bool,
        input: &Input,
        fence: Option<u8>,
        expect: Option<i64>,
    ) -> Decided {
        let mut snap = Self::snapshot(row, lease_fresh);
        let env = Env {
            fence: fence.map(Self::runner_id),
            history: expect,
            edit: Some(&self.edit),
            ..Env::new(&self.options)
        };
        let plan = match decide(&snap, input, &env) {
            Ok(plan) => plan,
            Err(r) => {
                return Decided::Refused(match r.kind {
                    RejectionKind::LeaseLost { .. } => Refusal::LeaseLost(r),
                    RejectionKind::HistoryChanged { expected, actual } => {
                        Refusal::HistoryChanged { expected, actual }
                    }
                    _ => Refusal::Other(r),
                });
            }
        };
        let assigned = Assigned {
            messages: (0..plan.inserted_len())
                .map(|i| MessageId(100 + i as i64))
                .collect(),
            queued: plan.append_queued.as_ref().map(|_| QueuedMessageId(2)),
        };
        let history = plan.changes_history();
        snap.apply(&plan, &assigned);
        Decided::Applied {
            row: Row {
                state: snap.state(),
                owner: snap.row.owner.as_ref().map(Self::worker_of),
            },
            transition: plan.transition,
            history,
            hint: snap.needs_hint(),
        }
    }

    /// The version a handler's expectation names.
    pub(super) fn expected_history(current: bool) -> i64 {
        if current {
            HISTORY_NOW
        } else {
            HISTORY_NOW - 1
        }
    }

    // --- Steps -----------------------------------------------------------

    fn crashes(&self, s: &State) -> u8 {
        self.workers()
            .filter(|w| s.worker(*w).status == Status::Crashed)
            .count() as u8
    }

    fn shutdowns(&self, s: &State) -> u8 {
        self.workers()
            .filter(|w| s.worker(*w).status == Status::Stopping)
            .count() as u8
    }

    pub(super) fn collect_actions(&self, s: &State, out: &mut Vec<Action>) {
        if s.client_flush {
            out.push(Action::ClientFlush);
            out.push(Action::ClientFlushLost);
        } else if s.client_left > 0 && s.lock.is_none() {
            let ops: &[ClientOp] = if self.config.interrupts {
                &[ClientOp::Send, ClientOp::Edit, ClientOp::Interrupt]
            } else {
                &[ClientOp::Send, ClientOp::Edit]
            };
            out.extend(ops.iter().map(|op| Action::Client(*op)));
        }
        let crashes = self.crashes(s);
        let shutdowns = self.shutdowns(s);
        for w in self.workers() {
            let wk = s.worker(w);
            if wk.status == Status::Crashed {
                continue;
            }
            let free = s.lock.is_none();
            match wk.task {
                Task::Idle if wk.live() && !wk.flush => out.push(Action::Sweep(w)),
                Task::Idle => {}
                Task::Wants => {
                    if free {
                        out.push(Action::ClaimLock(w));
                    }
                }
                Task::Claiming { .. } => out.push(Action::ClaimEnd(w)),
                Task::Running { .. } => {
                    if free && !wk.flush {
                        out.push(Action::Work(w, Work::Step));
                        out.push(Action::Work(w, Work::Finish));
                    }
                    if wk.status == Status::Stopping {
                        out.push(Action::GraceOver(w));
                    }
                }
                Task::Releasing => {
                    if free && !wk.flush {
                        out.push(Action::Abandon(w));
                    }
                }
            }
            if wk.task.holds() {
                out.push(Action::Heartbeat(w));
            }
            if wk.inbox {
                out.push(Action::ReadHint(w));
            }
            if wk.flush {
                out.push(Action::Flush(w));
            }
            if crashes < self.config.max_crashes && !wk.gone() {
                out.push(Action::Crash(w));
            }
            if shutdowns < self.config.max_shutdowns && wk.live() {
                out.push(Action::Shutdown(w));
            }
        }
        out.push(Action::Tick);
    }

    /// Delivers a flushed hint to every live worker (the hint channel fans
    /// out; a stopping worker no longer listens).
    fn deliver_hint(&self, n: &mut State) {
        for w in self.workers() {
            let wk = n.worker_mut(w);
            if wk.live() {
                wk.inbox = true;
            }
        }
    }

    /// After a committed history change, every other handler's
    /// generation base is old.
    fn history_changed(&self, n: &mut State, except: Option<u8>) {
        for w in self.workers() {
            if Some(w) == except {
                continue;
            }
            if let Task::Running { current } = &mut n.worker_mut(w).task {
                *current = false;
            }
        }
    }

    /// The task a worker falls back to when it learns it lost the lease.
    fn lost(n: &mut State, w: u8) {
        n.worker_mut(w).task = Task::Idle;
    }

    pub(super) fn step(&self, s: &State, action: Action) -> Option<State> {
        let mut n = s.clone();
        match action {
            Action::Client(op) => {
                let Decided::Applied {
                    row, history, hint, ..
                } = self.decide(
                    &s.row,
                    s.lease_fresh(),
                    &Self::client_input_of(op),
                    None,
                    None,
                )
                else {
                    // A rejected Update rolls back: nothing happened.
                    return None;
                };
                n.row = row;
                n.client_left -= 1;
                n.client_flush = hint;
                if history {
                    self.history_changed(&mut n, None);
                }
            }
            Action::ClientFlush => {
                n.client_flush = false;
                self.deliver_hint(&mut n);
            }
            Action::ClientFlushLost => n.client_flush = false,
            Action::Sweep(w) => {
                if self.config.variant == Variant::NoSweep {
                    return None;
                }
                // Store::claimable: FOR UPDATE SKIP LOCKED, so a row another
                // transaction holds locked is not seen at all (not waited for).
                let visible = s.lock.is_none();
                let candidate = s.row.state.is_runnable() && !s.lease_fresh();
                if !visible || !candidate {
                    return None;
                }
                n.worker_mut(w).task = Task::Wants;
            }
            Action::ReadHint(w) => {
                let wk = n.worker_mut(w);
                wk.inbox = false;
                // The cheap filter: a chat already held or being claimed
                // locally is skipped; otherwise the claim loop tries it.
                if wk.live() && wk.task == Task::Idle && !wk.flush {
                    wk.task = Task::Wants;
                }
            }
            Action::ClaimLock(w) => {
                n.lock = Some(w);
                n.worker_mut(w).task = Task::Claiming {
                    fresh: s.lease_fresh(),
                };
            }
            Action::ClaimEnd(w) => {
                let Task::Claiming { fresh } = s.worker(w).task else {
                    unreachable!("ClaimEnd without a claim")
                };
                n.lock = None;
                n.worker_mut(w).task = Task::Idle;
                // try_acquire's check under the lock: runnable, and the lease
                // missing or stale by store time.
                let snap = Self::snapshot(&s.row, fresh);
                let wins = snap.needs_hint() || self.config.variant == Variant::BlindClaims;
                if !wins {
                    if self.config.variant == Variant::LoudClaims {
                        // The losing Update commits anyway: a bump and an
                        // empty chat:update.
                        n.flags.set(Flags::LOUD_LOSS);
                    }
                } else {
                    let input = Input::Acquire {
                        owner: Self::owner(w),
                    };
                    let Decided::Applied { row, .. } =
                        self.decide(&s.row, fresh, &input, None, None)
                    else {
                        unreachable!("Acquire is allowed from every state")
                    };
                    if fresh && s.row.owner.is_some_and(|o| o != w) {
                        n.flags.set(Flags::STEAL);
                    }
                    n.row = row;
                    n.lease_age = 0;
                    n.handed_back = false;
                    n.worker_mut(w).task = Task::Running { current: true };
                }
            }
            Action::Heartbeat(w) => {
                if s.row.owner == Some(w) {
                    // LeaseStatus::Held: refreshed.
                    if s.lease_age == 0 {
                        return None;
                    }
                    n.lease_age = 0;
                } else {
                    // LeaseStatus::Lost: the heartbeat is not written; the
                    // guard's lost() resolves and the handler stops.
                    Self::lost(&mut n, w);
                }
            }
            Action::Work(w, work) => {
                let Task::Running { current } = s.worker(w).task else {
                    unreachable!("Work without a handler")
                };
                if work == Work::Step
                    && matches!(s.row.state, ExecutionState::I0 | ExecutionState::I1)
                {
                    // An interrupted turn only finishes.
                    return None;
                }
                let expect = (self.config.variant != Variant::NoHistoryExpectation)
                    .then(|| Self::expected_history(current));
                let input = Self::work_input_of(work, s.row.state);
                match self.decide(&s.row, s.lease_fresh(), &input, Some(w), expect) {
                    Decided::Refused(Refusal::LeaseLost(_)) => Self::lost(&mut n, w),
                    Decided::Refused(Refusal::HistoryChanged { .. }) => {
                        // Regenerate from the history the refusal names.
                        n.worker_mut(w).task = Task::Running { current: true };
                    }
                    Decided::Refused(Refusal::Other(_)) => {
                        n.worker_mut(w).task = Task::Releasing;
                    }
                    Decided::Applied {
                        row,
                        transition,
                        history,
                        hint,
                    } => {
                        if s.row.owner != Some(w) && transition.is_worker() {
                            n.flags.set(Flags::STALE_COMMIT);
                        }
                        if !current {
                            n.flags.set(Flags::STALE_REPLY);
                        }
                        n.row = row;
                        if history {
                            self.history_changed(&mut n, Some(w));
                        }
                        let wk = n.worker_mut(w);
                        wk.flush = hint;
                        wk.task = if row.state.is_runnable() {
                            Task::Running { current: true }
                        } else {
                            Task::Releasing
                        };
                    }
                }
            }
            Action::GraceOver(w) => n.worker_mut(w).task = Task::Releasing,
            Action::Abandon(w) => {
                match self.decide(&s.row, s.lease_fresh(), &Input::Abandon, Some(w), None) {
                    Decided::Refused(Refusal::LeaseLost(_)) => Self::lost(&mut n, w),
                    Decided::Refused(other) => {
                        unreachable!("a fenced Abandon of the owner is refused: {other:?}")
                    }
                    Decided::Applied { row, hint, .. } => {
                        n.row = row;
                        if s.worker(w).status == Status::Stopping && row.state.is_runnable() {
                            n.handed_back = true;
                        }
                        let wk = n.worker_mut(w);
                        wk.flush = hint;
                        wk.task = Task::Idle;
                    }
                }
            }
            Action::Flush(w) => {
                n.worker_mut(w).flush = false;
                self.deliver_hint(&mut n);
            }
            Action::Crash(w) => {
                if s.lock == Some(w) {
                    // The session dies: the store rolls the claim back.
                    n.lock = None;
                }
                n.worker_mut(w).status = Status::Crashed;
            }
            Action::Shutdown(w) => {
                if s.lock == Some(w) {
                    // A claim under way is cancelled: it rolls back.
                    n.lock = None;
                }
                let wk = n.worker_mut(w);
                wk.status = Status::Stopping;
                if matches!(wk.task, Task::Wants | Task::Claiming { .. }) {
                    wk.task = Task::Idle;
                }
            }
            Action::Tick => {
                if s.row.owner.is_none() || s.lease_age >= STALE_AFTER {
                    return None;
                }
                n.lease_age += 1;
            }
        }
        n.canonicalize();
        Some(n)
    }
}

//! The glue to the real rules: the snapshot, input and environment an
//! Update's callback hands to the real [`decide`], and the abstraction of
//! its result back to the model's row.

use std::collections::BTreeSet;

use uuid::Uuid;

use super::state::{Buffer, Op, Row, Tx, Who};
use super::{ConcurrencyModel, WORKERS};
use crate::{
    Assigned, BusyBehavior, ChatId, ChatRow, ChatStatus, Env, ExecutionState, Input, Matrix,
    MessageId, NewMessage, Notification, Owner, QueuedMessageId, Rejection, RunnerId, Snapshot,
    Timestamp, ToolState, Versions, WorkerId, after_update, decide,
};

/// What a callback did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum CallbackOutcome {
    /// The transition was applied; the transaction and buffer afterwards.
    Applied { tx: Tx, buffer: Buffer },
    /// Acquire's re-check under the lock found no candidate.
    NotCandidate,
    /// The transition was rejected.
    Rejected(Rejection),
}
impl ConcurrencyModel {
    fn chat_id() -> ChatId {
        ChatId(Uuid::from_u128(0xc4a7))
    }

    pub(super) fn runner_id(w: u8) -> RunnerId {
        RunnerId(Uuid::from_u128(0x5200 + u128::from(w)))
    }

    fn worker_id(w: u8) -> WorkerId {
        WorkerId(Uuid::from_u128(0x3000 + u128::from(w)))
    }

    fn worker_of(owner: &Owner) -> u8 {
        (0..WORKERS)
            .find(|w| Self::runner_id(*w) == owner.runner_id)
            .expect("every runner in the model belongs to a worker")
    }

    /// The real snapshot a transaction on `row` sees.
    fn snapshot(row: &Row, lease_fresh: bool) -> Snapshot {
        use ExecutionState as S;
        let status = match row.state {
            S::W => ChatStatus::Waiting,
            S::R0 | S::R1 => ChatStatus::Running,
            S::I0 | S::I1 => ChatStatus::Interrupting,
            other => unreachable!("the concurrency model never reaches {other}"),
        };
        Snapshot {
            row: ChatRow {
                id: Self::chat_id(),
                owner_id: Uuid::from_u128(0x05e7),
                status,
                archived: false,
                owner: row.owner.map(|w| Owner {
                    worker_id: Self::worker_id(w),
                    runner_id: Self::runner_id(w),
                }),
                last_error: None,
                retry_state: None,
                generation_attempt: 0,
                requires_action_deadline_at: None,
                compaction_requested_at: None,
                versions: Versions {
                    snapshot: i64::from(row.snapshot),
                    history: 1,
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

    fn input(op: Op, state: ExecutionState, who: Who) -> Input {
        match op {
            Op::Send => Input::SendMessage {
                message: NewMessage::user("more"),
                busy_behavior: BusyBehavior::Queue,
            },
            Op::Interrupt => Input::Interrupt { reason: None },
            Op::Acquire => {
                let Who::Worker(w) = who else {
                    unreachable!("only workers acquire")
                };
                Input::Acquire {
                    owner: Owner {
                        worker_id: Self::worker_id(w),
                        runner_id: Self::runner_id(w),
                    },
                }
            }
            Op::Work => match state {
                ExecutionState::R1 => Input::FinishTurn,
                ExecutionState::I0 | ExecutionState::I1 => Input::FinishInterruption {
                    partial_messages: Vec::new(),
                },
                _ => Input::CommitStep {
                    messages: vec![NewMessage::assistant("step")],
                    consume_compaction_request: false,
                },
            },
            Op::Abandon => Input::Abandon,
            Op::Lock | Op::ReadLock => unreachable!("Lock and ReadLock run no callback"),
        }
    }

    /// Runs an Update's callback the way `ChatMachine::update` does: the
    /// decision is the real `decide` on the locked snapshot, the snapshot
    /// moves on with the real `Snapshot::apply`, and the buffer is filled
    /// with the real `after_update`.
    pub(super) fn callback(&self, who: Who, op: Op, tx: &Tx) -> CallbackOutcome {
        let mut snap = Self::snapshot(&tx.row, tx.lease_fresh);
        // The worker's re-check of a candidate under the lock: runnable and
        // without a fresh lease (exactly the hint condition).
        if op == Op::Acquire && !snap.needs_hint() {
            return CallbackOutcome::NotCandidate;
        }
        let fence = match who {
            Who::Worker(w) if self.config.fenced && op.is_fenceable() => Some(Self::runner_id(w)),
            _ => None,
        };
        let input = Self::input(op, tx.row.state, who);
        let env = Env {
            options: &self.options,
            matrix: Matrix::REFERENCE,
            fence,
            history: None,
            edit: None,
        };
        let plan = match decide(&snap, &input, &env) {
            Ok(plan) => plan,
            Err(rejection) => return CallbackOutcome::Rejected(rejection),
        };
        // matrix: every landed state is in its cell (the machine asserts it
        // after every transition; so does the model).
        assert!(
            Matrix::REFERENCE.allows_landing(plan.transition, plan.from, plan.to),
            "{} from {} landed in {}",
            plan.transition,
            plan.from,
            plan.to
        );
        let assigned = Assigned {
            messages: (0..plan.inserted_len())
                .map(|i| MessageId(100 + i as i64))
                .collect(),
            queued: plan.append_queued.as_ref().map(|_| QueuedMessageId(2)),
        };
        snap.apply(&plan, &assigned);
        assert_eq!(
            snap.row.versions.snapshot,
            i64::from(tx.row.snapshot),
            "a transition never bumps; the Update did, once, at the lock"
        );
        let owner = snap.row.owner.as_ref().map(Self::worker_of);
        // The store's account of freshness at store time: a heartbeat upserted
        // by this transaction is fresh; a new or cleared owner without one is
        // not; otherwise what the store read at the grant still holds.
        let store_fresh = match owner {
            None => false,
            Some(w) if plan.heartbeat == Some(Self::runner_id(w)) => true,
            Some(_) if owner != tx.row.owner => false,
            Some(_) => tx.store_fresh,
        };
        let notes = after_update(&snap);
        let buffer = Buffer {
            snapshot: u8::try_from(notes[0].snapshot_version())
                .expect("snapshot versions stay small"),
            hint: notes
                .iter()
                .any(|n| matches!(n, Notification::Ownership(_))),
            committed: false,
        };
        assert!(matches!(notes[0], Notification::Update { .. }));
        CallbackOutcome::Applied {
            tx: Tx {
                row: Row {
                    state: snap.state(),
                    owner,
                    snapshot: tx.row.snapshot,
                },
                lease_fresh: snap.lease_fresh,
                store_fresh,
                since: tx.since,
                applied: Some(plan.transition),
            },
            buffer,
        }
    }
}

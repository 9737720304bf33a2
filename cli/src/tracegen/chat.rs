//! One generated chat: the next step chosen from the chat's state in the
//! model, mostly valid, sometimes a deliberate mistake.

use chatstate_model::{
    BusyBehavior, Chat, ExecutionState, Part, Role, ToolState, content_from_value,
};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::json;

use crate::trace::{
    ChatStep, Content, CreateStep, HeartbeatStep, ModelWorld, Names, RawStatusStep, Step,
    TraceMessage, TraceToolResult, TraceTransition as T, UpdateStep,
};

/// One generated chat: its name, the runner its worker holds, counters.
pub(super) struct ChatGen {
    index: usize,
    name: String,
    pub(super) slot: Option<usize>,
    pub(super) left: usize,
    /// The runner the generator's worker acquired last.
    runner: Option<String>,
    runners: usize,
    seq: usize,
}

impl ChatGen {
    pub(super) fn new(index: usize, steps: usize) -> Self {
        ChatGen {
            index,
            name: format!("g{index}"),
            slot: None,
            left: steps,
            runner: None,
            runners: 0,
            seq: 0,
        }
    }

    fn fresh(&mut self, what: &str) -> String {
        self.seq += 1;
        format!("{}-{what}{}", self.name, self.seq)
    }

    fn text(&mut self, role: Role) -> TraceMessage {
        let t = self.fresh("m");
        TraceMessage::text(role, &t)
    }

    fn update(&self, transitions: Vec<T>) -> Step {
        Step::Update(UpdateStep {
            chat: self.name.clone(),
            transitions,
        })
    }

    pub(super) fn next(
        &mut self,
        rng: &mut StdRng,
        chat: Option<&Chat>,
        names: &Names,
        world: &ModelWorld,
    ) -> Step {
        let Some(chat) = chat else {
            return self.create(rng);
        };
        let ours = match (&self.runner, chat.row.owner) {
            (Some(r), Some(o)) => names.name(o.runner_id.0) == *r,
            _ => false,
        };
        let fresh = chat.lease_fresh(world.now, &world.options);
        if rng.random_ratio(1, 16) {
            return self.mistake(rng, chat);
        }
        let mut c: Vec<(u32, Step)> = Vec::new();
        let state = chat.state();
        let queue = chat.queue.len();
        use ExecutionState as S;
        match state {
            S::Invalid => {
                c.push((
                    6,
                    self.update(vec![T::ReconcileInvalidState {
                        last_error: None,
                        cancellation_reason: None,
                    }]),
                ));
                c.push((
                    2,
                    self.update(vec![T::ReconcileInvalidState {
                        last_error: Some(json!({"message": "repaired"})),
                        cancellation_reason: Some("repair".into()),
                    }]),
                ));
            }
            S::W | S::E0 | S::E1 => {
                let send = self.send(BusyBehavior::Queue);
                c.push((6, self.update(vec![send])));
                c.push((1, self.update(vec![T::SetArchived { archived: true }])));
                if let Some(edit) = self.edit(rng, chat) {
                    c.push((2, self.update(vec![edit])));
                }
                if state == S::W {
                    c.push((1, self.update(vec![T::RequestCompaction {}])));
                    c.push((1, self.raw("paused")));
                }
                if queue > 0 {
                    let i = rng.random_range(0..queue);
                    c.push((
                        2,
                        self.update(vec![T::PromoteQueuedMessage {
                            queue_index: Some(i),
                            id: None,
                        }]),
                    ));
                    c.push((
                        2,
                        self.update(vec![T::DeleteQueuedMessage {
                            queue_index: Some(i),
                            id: None,
                        }]),
                    ));
                }
            }
            S::XW | S::XE0 | S::XE1 => {
                c.push((6, self.update(vec![T::SetArchived { archived: false }])));
                if state == S::XE1 {
                    c.push((1, self.raw("pending")));
                }
            }
            S::R0 | S::R1 | S::I0 | S::I1 | S::A0 | S::A1 if !ours => {
                // A worker takes the chat (over, if the lease lapsed).
                let runner = self.acquire_runner();
                let acquire = T::Acquire {
                    worker: format!("w{}", self.index % 5),
                    runner,
                };
                c.push((
                    if fresh { 2 } else { 8 },
                    self.update(vec![acquire.clone()]),
                ));
                if matches!(state, S::R0 | S::R1) {
                    let commit = self.commit_text();
                    c.push((3, self.update(vec![acquire, commit])));
                }
                self.user_moves(rng, chat, &mut c);
            }
            S::R0 | S::R1 => {
                let commit = self.commit_text();
                c.push((4, self.update(vec![commit])));
                let (call, enter) = self.commit_dynamic_call();
                c.push((2, self.update(vec![call.clone(), enter])));
                c.push((1, self.update(vec![call])));
                let server = self.commit_server_call();
                c.push((1, self.update(vec![server])));
                c.push((
                    1,
                    self.update(vec![T::RecordGenerationAttempt {
                        fence: self.runner.clone(),
                    }]),
                ));
                c.push((
                    1,
                    self.update(vec![T::RecordRetryState {
                        retry_state: Some(json!({"attempt": self.seq, "delay_ms": 500})),
                        retry_state_text: None,
                        fence: self.runner.clone(),
                    }]),
                ));
                if !outstanding_dynamic(chat).is_empty() {
                    c.push((
                        2,
                        self.update(vec![T::EnterRequiresAction {
                            fence: self.runner.clone(),
                        }]),
                    ));
                }
                c.push((
                    4,
                    self.update(vec![T::FinishTurn {
                        fence: self.runner.clone(),
                    }]),
                ));
                c.push((
                    1,
                    self.update(vec![T::FinishError {
                        last_error: Some(json!({"message": "model unavailable"})),
                        fence: self.runner.clone(),
                    }]),
                ));
                c.push((
                    1,
                    self.update(vec![T::Abandon {
                        fence: self.runner.clone(),
                    }]),
                ));
                c.push((1, self.heartbeat()));
                self.user_moves(rng, chat, &mut c);
            }
            S::I0 | S::I1 => {
                c.push((
                    5,
                    self.update(vec![T::FinishInterruption {
                        partial_messages: Vec::new(),
                        fence: self.runner.clone(),
                    }]),
                ));
                let partial = self.text(Role::Assistant);
                c.push((
                    2,
                    self.update(vec![T::FinishInterruption {
                        partial_messages: vec![partial],
                        fence: self.runner.clone(),
                    }]),
                ));
                c.push((1, self.heartbeat()));
                self.user_moves(rng, chat, &mut c);
            }
            S::A0 | S::A1 => {
                let results: Vec<TraceToolResult> = outstanding_dynamic(chat)
                    .into_iter()
                    .map(|id| TraceToolResult {
                        tool_call_id: id,
                        output: Some(json!({"answer": "yes"})),
                        output_text: None,
                        is_error: false,
                    })
                    .collect();
                c.push((
                    6,
                    self.update(vec![T::CompleteRequiresAction {
                        results,
                        created_by: Some(format!("u{}", self.index % 7)),
                    }]),
                ));
                c.push((
                    1,
                    self.update(vec![T::CancelRequiresAction {
                        reason: None,
                        fence: self.runner.clone(),
                    }]),
                ));
                c.push((1, self.heartbeat()));
                self.user_moves(rng, chat, &mut c);
            }
            S::N => unreachable!("an existing chat"),
        }
        pick(rng, c)
    }

    fn create(&mut self, rng: &mut StdRng) -> Step {
        // Once in a while a create without messages: rejected, retried.
        let messages = if rng.random_ratio(1, 40) {
            Vec::new()
        } else {
            (0..rng.random_range(1..=2))
                .map(|_| self.text(Role::User))
                .collect()
        };
        Step::CreateChat(CreateStep {
            chat: self.name.clone(),
            owner: Some(format!("u{}", self.index % 7)),
            dynamic_tools: vec!["ask_user".to_owned()],
            last_model_config: Some("cfg".to_owned()),
            messages,
        })
    }

    fn raw(&self, status: &str) -> Step {
        Step::SetRawStatus(RawStatusStep {
            chat: self.name.clone(),
            status: status.to_owned(),
            archived: None,
        })
    }

    fn heartbeat(&self) -> Step {
        Step::Heartbeat(HeartbeatStep {
            chat: self.name.clone(),
            runner: self.runner.clone().unwrap_or_else(|| "nobody".to_owned()),
        })
    }

    fn acquire_runner(&mut self) -> String {
        self.runners += 1;
        let r = format!("{}-r{}", self.name, self.runners);
        self.runner = Some(r.clone());
        r
    }

    fn send(&mut self, busy_behavior: BusyBehavior) -> T {
        T::SendMessage {
            message: self.text(Role::User),
            busy_behavior,
        }
    }

    fn commit_text(&mut self) -> T {
        T::CommitStep {
            messages: vec![self.text(Role::Assistant)],
            consume_compaction_request: true,
            fence: self.runner.clone(),
        }
    }

    /// A step calling the dynamic tool, and the EnterRequiresAction after it.
    fn commit_dynamic_call(&mut self) -> (T, T) {
        let id = self.fresh("call");
        let call = T::CommitStep {
            messages: vec![TraceMessage::new(
                Role::Assistant,
                vec![Part::text("let me ask"), Part::tool_call(id, "ask_user")],
            )],
            consume_compaction_request: false,
            fence: self.runner.clone(),
        };
        let enter = T::EnterRequiresAction {
            fence: self.runner.clone(),
        };
        (call, enter)
    }

    /// A server tool call and its result, in one step.
    fn commit_server_call(&mut self) -> T {
        let id = self.fresh("srv");
        let result = content_from_value(&json!([{
            "type": "tool-result", "tool_call_id": id, "tool_name": "web_search",
            "result": {"hits": 3}, "is_error": false
        }]))
        .expect("a shallow part is within the depth limit");
        T::CommitStep {
            messages: vec![
                TraceMessage::new(Role::Assistant, vec![Part::tool_call(&id, "web_search")]),
                TraceMessage::new(Role::Tool, result),
            ],
            consume_compaction_request: false,
            fence: self.runner.clone(),
        }
    }

    fn edit(&mut self, rng: &mut StdRng, chat: &Chat) -> Option<T> {
        let users: Vec<usize> = chat
            .active_history()
            .enumerate()
            .filter(|(_, m)| m.role == Role::User)
            .map(|(i, _)| i)
            .collect();
        if users.is_empty() {
            return None;
        }
        let i = users[rng.random_range(0..users.len())];
        let text = self.fresh("edit");
        Some(T::EditMessage {
            history_index: Some(i),
            id: None,
            content: Content::Text(text),
            created_by: None,
            model_config: None,
        })
    }

    /// What a user may do to a busy chat.
    fn user_moves(&mut self, rng: &mut StdRng, chat: &Chat, c: &mut Vec<(u32, Step)>) {
        let state = chat.state();
        let queue = chat.queue.len();
        let send = self.send(BusyBehavior::Queue);
        c.push((2, self.update(vec![send])));
        let interrupting = self.send(BusyBehavior::Interrupt);
        c.push((1, self.update(vec![interrupting])));
        if matches!(
            state,
            ExecutionState::R0 | ExecutionState::R1 | ExecutionState::A0 | ExecutionState::A1
        ) {
            c.push((1, self.update(vec![T::Interrupt { reason: None }])));
        }
        if queue > 0 {
            let i = rng.random_range(0..queue);
            c.push((
                1,
                self.update(vec![T::PromoteQueuedMessage {
                    queue_index: Some(i),
                    id: None,
                }]),
            ));
            c.push((
                1,
                self.update(vec![T::DeleteQueuedMessage {
                    queue_index: Some(i),
                    id: None,
                }]),
            ));
        }
        if rng.random_ratio(1, 3)
            && let Some(edit) = self.edit(rng, chat)
        {
            c.push((1, self.update(vec![edit])));
        }
        c.push((1, self.lock(rng)));
    }

    fn lock(&self, rng: &mut StdRng) -> Step {
        let chat = ChatStep {
            chat: self.name.clone(),
        };
        if rng.random_bool(0.5) {
            Step::Lock(chat)
        } else {
            Step::ReadLock(chat)
        }
    }

    /// A step that is wrong on purpose (most are rejected).
    fn mistake(&mut self, rng: &mut StdRng, chat: &Chat) -> Step {
        let wrong = match rng.random_range(0..12) {
            0 => T::FinishTurn { fence: None },
            1 => T::SetArchived {
                archived: chat.row.archived,
            },
            2 => T::PromoteQueuedMessage {
                queue_index: Some(chat.queue.len() + 2),
                id: None,
            },
            3 => T::EditMessage {
                history_index: Some(999),
                id: None,
                content: Content::Text("nope".into()),
                created_by: None,
                model_config: None,
            },
            4 => T::CompleteRequiresAction {
                results: vec![TraceToolResult {
                    tool_call_id: "no-such-call".into(),
                    output: None,
                    output_text: Some("{not json".into()),
                    is_error: false,
                }],
                created_by: None,
            },
            5 => T::CommitStep {
                messages: Vec::new(),
                consume_compaction_request: false,
                fence: None,
            },
            6 => T::RecordRetryState {
                retry_state: None,
                retry_state_text: Some("{".into()),
                fence: None,
            },
            7 => T::CommitStep {
                messages: vec![self.text(Role::Assistant)],
                consume_compaction_request: false,
                fence: Some(format!("{}-stale", self.name)),
            },
            8 => T::Abandon { fence: None },
            9 => T::ReconcileInvalidState {
                last_error: None,
                cancellation_reason: None,
            },
            10 => T::EnterRequiresAction { fence: None },
            _ => T::SendMessage {
                message: self.text(Role::Assistant),
                busy_behavior: BusyBehavior::Queue,
            },
        };
        // Half the time the mistake follows a valid transition in the same
        // Update, which must then roll back as a whole.
        if rng.random_bool(0.5) {
            let lock = T::Acquire {
                worker: "w-mistake".into(),
                runner: format!("{}-rm", self.name),
            };
            self.update(vec![lock, wrong])
        } else {
            self.update(vec![wrong])
        }
    }
}

/// The outstanding dynamic tool calls of a chat's active history.
fn outstanding_dynamic(chat: &Chat) -> Vec<String> {
    ToolState::from_history(
        chat.active_history()
            .map(|m| (m.role, m.content.as_slice())),
    )
    .outstanding(Some(&chat.row.dynamic_tools))
    .into_iter()
    .map(|(id, _)| id)
    .collect()
}

fn pick(rng: &mut StdRng, mut candidates: Vec<(u32, Step)>) -> Step {
    let total: u32 = candidates.iter().map(|(w, _)| w).sum();
    let mut x = rng.random_range(0..total);
    for i in 0..candidates.len() {
        if x < candidates[i].0 {
            return candidates.swap_remove(i).1;
        }
        x -= candidates[i].0;
    }
    unreachable!("x is below the total weight")
}

//! Fixtures: a store with a recording publisher, chats created with known
//! tools, and canned setups that bring a chat into every execution state.

use std::collections::BTreeSet;
use std::sync::Arc;

use chatstate::{
    BusyBehavior, ChatMachine, ChatRecord, CreateChat, Error, Notify, RecordingPublisher, Store,
    TestControl, create_chat,
};
use chatstate_model::{
    ChatId, ChatStatus, ExecutionState, JsonText, MessageId, NewMessage, Notification, Options,
    Owner, Part, QueuedMessageId, Role, RunnerId, ToolResultInput, WorkerId,
};

/// The dynamic (client-executed) tool of every test chat.
pub const DYNAMIC_TOOL: &str = "ask_user";
/// A server-side (non-dynamic) tool.
pub const SERVER_TOOL: &str = "web_search";

/// A store, a recording publisher and the options tests use.
pub struct Fx<S: Store> {
    /// The store.
    pub store: S,
    /// Records every notification published after commit.
    pub publisher: Arc<RecordingPublisher>,
    /// Options (queue cap 20, stale 30 s, timeout 5 min).
    pub options: Options,
    /// The worker that setups acquire chats with.
    pub worker: WorkerId,
    /// Its runner.
    pub runner: RunnerId,
}

/// One canned step of a setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupStep {
    /// Acquire with the fixture's worker and runner.
    Acquire,
    /// Queue a user message (SendMessage, queue).
    Queue,
    /// CommitStep of an assistant message calling the dynamic tool.
    CommitDynamicCall,
    /// CommitStep of an assistant message calling a server tool.
    CommitServerCall,
    /// EnterRequiresAction.
    Enter,
    /// Interrupt.
    Interrupt,
    /// FinishTurn.
    FinishTurn,
    /// FinishError.
    FinishError,
    /// SetArchived(true).
    Archive,
    /// Write a raw status and archived flag (to make Invalid rows).
    Raw(RawStatus, bool),
}

/// Raw statuses a setup can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawStatus {
    /// `waiting`
    Waiting,
    /// `running`
    Running,
    /// legacy `paused`
    Paused,
}

/// A named path from creation to a state.
#[derive(Clone, Debug)]
pub struct Setup {
    /// The state it reaches.
    pub state: ExecutionState,
    /// The steps after CreateChat.
    pub steps: Vec<SetupStep>,
}

/// Every setup: at least one per existing state, with variants that have
/// one or two queued messages and pending tool calls, so every matrix
/// output is reachable from some setup.
pub fn setups() -> Vec<Setup> {
    use ExecutionState as S;
    use SetupStep::*;
    let s = |state, steps: &[SetupStep]| Setup {
        state,
        steps: steps.to_vec(),
    };
    vec![
        s(S::W, &[FinishTurn]),
        s(S::E0, &[FinishError]),
        s(S::E1, &[Queue, FinishError]),
        s(S::E1, &[Queue, Queue, FinishError]),
        s(S::R0, &[]),
        s(S::R0, &[CommitDynamicCall]),
        s(S::R1, &[Queue]),
        s(S::R1, &[Queue, Queue]),
        s(S::R1, &[CommitDynamicCall, Queue]),
        s(S::I0, &[Interrupt]),
        s(S::I1, &[Queue, Interrupt]),
        s(S::I1, &[Queue, Queue, Interrupt]),
        s(S::A0, &[CommitDynamicCall, Enter]),
        s(S::A1, &[CommitDynamicCall, Queue, Enter]),
        s(S::A1, &[CommitDynamicCall, Queue, Queue, Enter]),
        s(S::XW, &[FinishTurn, Archive]),
        s(S::XE0, &[FinishError, Archive]),
        s(S::XE1, &[Queue, FinishError, Archive]),
        s(S::Invalid, &[Raw(RawStatus::Paused, false)]),
        s(S::Invalid, &[Queue, Raw(RawStatus::Waiting, false)]),
        s(S::Invalid, &[Raw(RawStatus::Running, true)]),
    ]
}

/// An assistant message calling one tool.
pub fn assistant_call(id: &str, tool: &str) -> NewMessage {
    NewMessage::new(
        Role::Assistant,
        vec![Part::text("calling a tool"), Part::tool_call(id, tool)],
    )
}

impl<S: Store + TestControl> Fx<S> {
    /// A fixture around a store.
    pub fn new(store: S) -> Self {
        Fx {
            store,
            publisher: Arc::new(RecordingPublisher::new()),
            options: Options::default(),
            worker: WorkerId::new_random(),
            runner: RunnerId::new_random(),
        }
    }

    /// Notifications go to the recording publisher after commit.
    pub fn notify(&self) -> Notify {
        Notify::AfterCommit(self.publisher.clone())
    }

    /// A machine on `chat`.
    pub fn machine(&self, chat: ChatId) -> ChatMachine<S> {
        ChatMachine::new(self.store.clone(), self.notify(), chat, self.options)
    }

    /// Creates a chat with one user message and the dynamic tool.
    pub async fn create(&self) -> ChatMachine<S> {
        let created = create_chat(
            &self.store,
            &self.notify(),
            CreateChat {
                owner_id: uuid::Uuid::new_v4(),
                dynamic_tools: BTreeSet::from([DYNAMIC_TOOL.to_owned()]),
                messages: vec![NewMessage::user("hello")],
                ..CreateChat::default()
            },
        )
        .await
        .expect("create chat");
        self.machine(created.chat_id)
    }

    /// Creates a chat and runs a setup on it; asserts the state reached.
    pub async fn reach(&self, setup: &Setup) -> ChatMachine<S> {
        let m = self.create().await;
        for step in &setup.steps {
            self.run_step(&m, *step).await;
        }
        let got = m.load().await.expect("load").state();
        assert_eq!(got, setup.state, "setup {:?} reached {got}", setup.steps);
        m
    }

    async fn run_step(&self, m: &ChatMachine<S>, step: SetupStep) {
        use SetupStep::*;
        if let Raw(status, archived) = step {
            let status = match status {
                RawStatus::Waiting => ChatStatus::Waiting,
                RawStatus::Running => ChatStatus::Running,
                RawStatus::Paused => ChatStatus::Other("paused".into()),
            };
            self.store
                .set_raw_state(m.chat_id(), &status, archived)
                .await
                .expect("raw state");
            return;
        }
        let (worker, runner) = (self.worker, self.runner);
        m.update(async |tx| {
            match step {
                Acquire => tx.acquire(worker, runner).await?,
                Queue => {
                    tx.send_message(NewMessage::user("queued"), BusyBehavior::Queue)
                        .await?
                }
                CommitDynamicCall => {
                    tx.commit_step(vec![assistant_call("call-dyn", DYNAMIC_TOOL)], false)
                        .await?
                }
                CommitServerCall => {
                    tx.commit_step(vec![assistant_call("call-srv", SERVER_TOOL)], false)
                        .await?
                }
                Enter => tx.enter_requires_action().await?,
                Interrupt => tx.interrupt(None).await?,
                FinishTurn => tx.finish_turn().await?,
                FinishError => tx.finish_error(Some(JsonText::string("boom"))).await?,
                Archive => tx.set_archived(true).await?,
                Raw(..) => unreachable!("handled above"),
            };
            Ok(())
        })
        .await
        .unwrap_or_else(|e| panic!("setup step {step:?} failed: {e}"));
    }

    /// The notifications published so far for one chat.
    pub fn published_for(&self, chat: ChatId) -> Vec<Notification> {
        self.publisher
            .notifications()
            .into_iter()
            .filter(|n| n.chat_id() == chat)
            .collect()
    }
}

/// Facts about a chat that sample inputs are built from.
#[derive(Clone, Debug)]
pub struct Facts {
    /// The queue's ids, head first.
    pub queue: Vec<QueuedMessageId>,
    /// The first active user message.
    pub first_user: Option<MessageId>,
    /// The pending dynamic tool calls.
    pub pending_dynamic: Vec<String>,
    /// Whether the chat is archived.
    pub archived: bool,
}

impl Facts {
    /// Reads the facts from a record.
    pub fn of(record: &ChatRecord) -> Facts {
        let snap_tools = chatstate_model::ToolState::from_history(
            record
                .active_history()
                .map(|m| (m.role, m.content.as_slice())),
        );
        Facts {
            queue: record.queue.iter().map(|q| q.id).collect(),
            first_user: record
                .active_history()
                .find(|m| m.role == Role::User)
                .map(|m| m.id),
            pending_dynamic: snap_tools
                .outstanding(Some(&record.row.dynamic_tools))
                .into_iter()
                .map(|(id, _)| id)
                .collect(),
            archived: record.row.archived,
        }
    }
}

/// Candidate inputs for a transition, given the facts of a chat: every
/// variant that can select a different output of a matrix cell.
pub fn candidates(
    t: chatstate_model::Transition,
    facts: &Facts,
    owner: Owner,
) -> Vec<chatstate_model::Input> {
    use chatstate_model::{Input, Transition as T};
    let unknown_queued = QueuedMessageId(i64::MAX);
    match t {
        T::CreateChat => Vec::new(),
        T::SetArchived => vec![Input::SetArchived {
            archived: !facts.archived,
        }],
        T::SendMessage => [BusyBehavior::Queue, BusyBehavior::Interrupt]
            .into_iter()
            .map(|b| Input::SendMessage {
                message: NewMessage::user("sent"),
                busy_behavior: b,
            })
            .collect(),
        T::EditMessage => vec![Input::EditMessage {
            message_id: facts.first_user.unwrap_or(MessageId(i64::MAX)),
            content: vec![Part::text("edited")],
            created_by: None,
            model_config_id: None,
        }],
        T::RequestCompaction => vec![Input::RequestCompaction],
        T::DeleteQueuedMessage => facts
            .queue
            .first()
            .map(|id| vec![Input::DeleteQueuedMessage { id: *id }])
            .unwrap_or_else(|| vec![Input::DeleteQueuedMessage { id: unknown_queued }]),
        T::PromoteQueuedMessage => {
            let mut ids: Vec<QueuedMessageId> = facts.queue.clone();
            ids.dedup();
            if ids.is_empty() {
                ids.push(unknown_queued);
            }
            ids.into_iter()
                .map(|id| Input::PromoteQueuedMessage { id })
                .collect()
        }
        T::Interrupt => vec![Input::Interrupt { reason: None }],
        T::CompleteRequiresAction => vec![Input::CompleteRequiresAction {
            results: facts
                .pending_dynamic
                .iter()
                .map(|id| ToolResultInput {
                    tool_call_id: id.clone(),
                    output: r#"{"answer":"yes"}"#.to_owned(),
                    is_error: false,
                })
                .collect(),
            created_by: None,
            model_config_id: None,
        }],
        T::RecordGenerationAttempt => vec![Input::RecordGenerationAttempt],
        T::RecordRetryState => vec![Input::RecordRetryState {
            retry_state: r#"{"attempt":1}"#.to_owned(),
        }],
        T::CommitStep => vec![Input::CommitStep {
            messages: vec![NewMessage::assistant("step")],
            consume_compaction_request: false,
        }],
        T::EnterRequiresAction => vec![Input::EnterRequiresAction],
        T::FinishInterruption => vec![Input::FinishInterruption {
            partial_messages: Vec::new(),
        }],
        T::FinishTurn => vec![Input::FinishTurn],
        T::FinishError => vec![Input::FinishError {
            last_error: Some(JsonText::string("failed")),
        }],
        T::CancelRequiresAction => vec![Input::CancelRequiresAction { reason: None }],
        T::ReconcileInvalidState => vec![Input::ReconcileInvalidState {
            last_error: None,
            cancellation_reason: None,
        }],
        T::Acquire => vec![Input::Acquire { owner }],
        T::Abandon => vec![Input::Abandon],
    }
}

/// Applies one input in its own Update and returns the outcome.
pub async fn apply_one<S: Store>(
    m: &ChatMachine<S>,
    input: chatstate_model::Input,
) -> Result<chatstate_model::Outcome, Error> {
    m.update(async move |tx| tx.apply(input).await).await
}

//! Bad input through the public API: unknown ids, ids of another chat, nil
//! UUIDs, malformed or too deeply nested JSON (retry state, tool outputs),
//! oversize content, duplicate tool results, a queue over its cap, strings
//! with every kind of character.
//!
//! Every case runs through the same comparison as the conformance tests, so
//! the store must do exactly what the model does: a typed error that
//! changes nothing and publishes nothing, or (for legal but large or odd
//! content) the identical success. The table also pins which of the two
//! each case is.

use std::sync::Mutex;

use chatstate_model::{
    BusyBehavior, ChatId, Input, JsonText, MAX_JSON_DEPTH, NewMessage, Part, Role, ToolResultInput,
};
use proptest::prelude::*;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngSeed, TestCaseError, TestError, TestRunner,
};
use uuid::Uuid;

use crate::Backend;
use crate::conformance::{self, Coverage, run_case, seed};
use crate::sut::{Sut, exact_time};
use crate::world::{
    CallSpec, DYNAMIC_TOOL, Expect, Json, Meta, Msg, MsgRef, Op, QRef, Spec, Text, World,
    default_ids,
};

/// One hostile input and what the model says it must come to.
pub struct Case {
    /// What it tries.
    pub name: &'static str,
    /// The chats it starts from (slot 0 is the target, slot 1 another chat).
    pub setup: Vec<Op>,
    /// The hostile operation.
    pub op: Op,
    /// `"ok"`, or the kind name of the error (`Error::kind_name`).
    pub expect: &'static str,
    /// Chat ids of the world (default: [`default_ids`]).
    pub ids: Option<Vec<ChatId>>,
}

const MIB: usize = 1 << 20;

fn user(text: Text) -> Msg {
    Msg::Text {
        role: Role::User,
        text,
        meta: Meta::default(),
    }
}

fn up(slot: u8, specs: Vec<Spec>) -> Op {
    Op::Update {
        slot,
        calls: specs.into_iter().map(CallSpec::from).collect(),
    }
}

fn one(spec: Spec) -> Op {
    up(0, vec![spec])
}

fn literal(input: Input) -> Spec {
    Spec::Literal(Box::new(input))
}

fn create(slot: u8) -> Op {
    Op::Create {
        slot,
        msgs: vec![user(Text::Canned(0))],
        dynamic: true,
        config: true,
    }
}

fn queue(slot: u8) -> Op {
    up(
        slot,
        vec![Spec::Send {
            msg: user(Text::Canned(1)),
            busy: BusyBehavior::Queue,
        }],
    )
}

fn commit(msgs: Vec<Msg>) -> Spec {
    Spec::Commit {
        msgs,
        consume: false,
    }
}

/// R0, one user message.
fn running() -> Vec<Op> {
    vec![create(0)]
}

/// W.
fn idle() -> Vec<Op> {
    vec![create(0), one(Spec::FinishTurn)]
}

/// R1 with one queued message, and another chat in R1 too.
fn both_queued() -> Vec<Op> {
    vec![create(0), create(1), queue(0), queue(1)]
}

/// A0, waiting for `call-1` of the dynamic tool.
fn requires_action() -> Vec<Op> {
    vec![
        create(0),
        up(
            0,
            vec![
                commit(vec![Msg::Call {
                    call: 1,
                    dynamic: true,
                    provider_executed: false,
                }]),
                Spec::Enter,
            ],
        ),
    ]
}

fn retry(text: impl Into<String>) -> Spec {
    Spec::RecordRetry(Json::Raw(text.into()))
}

fn results(rs: Vec<(&str, String)>) -> Spec {
    literal(Input::CompleteRequiresAction {
        results: rs
            .into_iter()
            .map(|(id, output)| ToolResultInput {
                tool_call_id: id.to_owned(),
                output,
                is_error: false,
            })
            .collect(),
        created_by: Some(Uuid::nil()),
        model_config_id: Some(Uuid::nil()),
    })
}

fn send_text(text: String) -> Spec {
    Spec::Send {
        msg: user(Text::Any(text)),
        busy: BusyBehavior::Queue,
    }
}

fn deep_json(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// The table.
pub fn cases() -> Vec<Case> {
    let case = |name, setup, op, expect| Case {
        name,
        setup,
        op,
        expect,
        ids: None,
    };
    let big = "x".repeat(MIB);
    let big_json = format!("\"{}\"", "y".repeat(MIB));
    let nil_first = Some(vec![ChatId(Uuid::nil()), default_ids()[1]]);
    vec![
        // Ids that name no row of this chat.
        case(
            "edit an unknown message id",
            running(),
            one(Spec::Edit {
                target: MsgRef::Unknown,
                text: Text::Canned(0),
                created_by: None,
                model_config: None,
            }),
            "MessageNotFound",
        ),
        case(
            "edit message id 0",
            running(),
            one(Spec::Edit {
                target: MsgRef::Raw(0),
                text: Text::Canned(0),
                created_by: None,
                model_config: None,
            }),
            "MessageNotFound",
        ),
        case(
            "edit message id i64::MIN",
            running(),
            one(Spec::Edit {
                target: MsgRef::Raw(i64::MIN),
                text: Text::Canned(0),
                created_by: None,
                model_config: None,
            }),
            "MessageNotFound",
        ),
        case(
            "edit a message of another chat",
            both_queued(),
            one(Spec::Edit {
                target: MsgRef::Foreign,
                text: Text::Canned(0),
                created_by: None,
                model_config: None,
            }),
            "MessageNotFound",
        ),
        case(
            "edit an assistant message",
            vec![
                create(0),
                one(commit(vec![Msg::Text {
                    role: Role::Assistant,
                    text: Text::Canned(1),
                    meta: Meta::default(),
                }])),
            ],
            one(Spec::Edit {
                target: MsgRef::LastAssistant,
                text: Text::Canned(0),
                created_by: None,
                model_config: None,
            }),
            "EditedMessageNotUser",
        ),
        case(
            "delete an unknown queued id",
            both_queued(),
            one(Spec::DeleteQueued(QRef::Unknown)),
            "QueuedMessageNotFound",
        ),
        case(
            "delete queued id -1",
            both_queued(),
            one(Spec::DeleteQueued(QRef::Raw(-1))),
            "QueuedMessageNotFound",
        ),
        case(
            "promote a queued message of another chat",
            both_queued(),
            one(Spec::PromoteQueued(QRef::Foreign)),
            "QueuedMessageNotFound",
        ),
        case(
            "delete a queued message of another chat",
            both_queued(),
            one(Spec::DeleteQueued(QRef::Foreign)),
            "QueuedMessageNotFound",
        ),
        // Nil UUIDs.
        Case {
            name: "update the nil chat id (no such chat)",
            setup: vec![create(1)],
            op: one(Spec::FinishTurn),
            expect: "ChatNotFound",
            ids: nil_first.clone(),
        },
        Case {
            name: "lock the nil chat id",
            setup: vec![],
            op: Op::Lock {
                slot: 0,
                shared: false,
            },
            expect: "ChatNotFound",
            ids: nil_first.clone(),
        },
        Case {
            name: "heartbeat on the nil chat id",
            setup: vec![],
            op: Op::Heartbeat { slot: 0, runner: 0 },
            expect: "ChatNotFound",
            ids: nil_first.clone(),
        },
        Case {
            name: "create a chat with the nil id",
            setup: vec![],
            op: create(0),
            expect: "TransitionNotAllowed",
            ids: nil_first,
        },
        case(
            "nil author, configuration and owner (legal)",
            running(),
            up(
                0,
                vec![
                    literal(Input::SendMessage {
                        message: NewMessage {
                            created_by: Some(Uuid::nil()),
                            model_config_id: Some(Uuid::nil()),
                            ..NewMessage::user("from nobody")
                        },
                        busy_behavior: BusyBehavior::Queue,
                    }),
                    literal(Input::Acquire {
                        owner: chatstate_model::Owner {
                            worker_id: chatstate_model::WorkerId(Uuid::nil()),
                            runner_id: chatstate_model::RunnerId(Uuid::nil()),
                        },
                    }),
                ],
            ),
            "ok",
        ),
        // Malformed JSON.
        case(
            "retry state empty",
            running(),
            one(retry("")),
            "TransitionNotAllowed",
        ),
        case(
            "retry state blank",
            running(),
            one(retry(" \n\t")),
            "TransitionNotAllowed",
        ),
        case(
            "retry state null",
            running(),
            one(retry("null")),
            "TransitionNotAllowed",
        ),
        case(
            "retry state not JSON",
            running(),
            one(retry("{\"a\":")),
            "TransitionNotAllowed",
        ),
        case(
            "retry state with trailing junk",
            running(),
            one(retry("{} {}")),
            "TransitionNotAllowed",
        ),
        case(
            "retry state number out of range",
            running(),
            one(retry("1e400")),
            "TransitionNotAllowed",
        ),
        case(
            "retry state nested past the parser's limit",
            running(),
            one(retry(deep_json(200))),
            "JsonTooDeep",
        ),
        case(
            "retry state nested one past the depth limit",
            running(),
            one(retry(deep_json(MAX_JSON_DEPTH + 1))),
            "JsonTooDeep",
        ),
        case(
            "retry state nested at the depth limit (legal)",
            running(),
            one(retry(deep_json(MAX_JSON_DEPTH))),
            "ok",
        ),
        case(
            "retry state with non-canonical numbers (legal)",
            running(),
            one(retry("[1.0, 1e2, 0.1, 12345678901234567890, 1.5e-7]")),
            "ok",
        ),
        case("retry state -0 (legal)", running(), one(retry("-0")), "ok"),
        case(
            "retry state -0.0 (legal)",
            running(),
            one(retry("-0.0")),
            "ok",
        ),
        case(
            "retry state 1e300 (legal)",
            running(),
            one(retry("1e300")),
            "ok",
        ),
        case(
            "retry state 5e-324 (legal)",
            running(),
            one(retry("5e-324")),
            "ok",
        ),
        case(
            "retry state 1E+2 (legal)",
            running(),
            one(retry("1E+2")),
            "ok",
        ),
        case(
            "retry state with an integer past u64 (legal)",
            running(),
            one(retry("123456789012345678901234567890")),
            "ok",
        ),
        case(
            "retry state with a float of 20 significant digits (legal)",
            running(),
            one(retry("3.1415926535897932384")),
            "ok",
        ),
        case(
            "retry state with duplicate keys (legal; the last wins)",
            running(),
            one(retry(r#"{"a":1,"a":2}"#)),
            "ok",
        ),
        case(
            "retry state of 1 MiB (legal)",
            running(),
            one(retry(big_json.clone())),
            "ok",
        ),
        case(
            "retry state with escaped NUL and control characters (legal)",
            running(),
            one(retry(
                r#"{"nul":"a\u0000b","ctl":"\u0001\u001f","bom":"\ufeff"}"#,
            )),
            "ok",
        ),
        // Tool results.
        case(
            "tool result output not JSON",
            requires_action(),
            one(results(vec![("call-1", "{oops".into())])),
            "ToolResultInvalidJson",
        ),
        case(
            "tool result output empty",
            requires_action(),
            one(results(vec![("call-1", String::new())])),
            "ToolResultInvalidJson",
        ),
        case(
            "duplicate tool results",
            requires_action(),
            one(results(vec![
                ("call-1", "1".into()),
                ("call-1", "2".into()),
            ])),
            "ToolResultDuplicate",
        ),
        case(
            "no tool results",
            requires_action(),
            one(results(vec![])),
            "ToolResultMissing",
        ),
        case(
            "tool result for a call nobody made",
            requires_action(),
            one(results(vec![
                ("call-1", "1".into()),
                ("call-9", "2".into()),
            ])),
            "ToolResultUnexpected",
        ),
        case(
            "tool results while running",
            running(),
            one(results(vec![("call-1", "1".into())])),
            "TransitionNotAllowed",
        ),
        case(
            "tool result output nested one past the depth limit",
            requires_action(),
            one(results(vec![("call-1", deep_json(MAX_JSON_DEPTH + 1))])),
            "JsonTooDeep",
        ),
        case(
            "tool result output nested past the parser's limit",
            requires_action(),
            one(results(vec![("call-1", deep_json(127))])),
            "JsonTooDeep",
        ),
        case(
            "tool result output nested at the depth limit (legal)",
            requires_action(),
            one(results(vec![("call-1", deep_json(MAX_JSON_DEPTH))])),
            "ok",
        ),
        case(
            "tool result of 1 MiB (legal)",
            requires_action(),
            one(results(vec![("call-1", big_json.clone())])),
            "ok",
        ),
        case(
            "tool call with an empty id, answered (legal)",
            vec![
                create(0),
                up(
                    0,
                    vec![
                        literal(Input::CommitStep {
                            messages: vec![NewMessage::new(
                                Role::Assistant,
                                vec![
                                    Part::tool_call("", DYNAMIC_TOOL),
                                    Part::tool_call("", DYNAMIC_TOOL),
                                ],
                            )],
                            consume_compaction_request: false,
                        }),
                        Spec::Enter,
                    ],
                ),
            ],
            one(results(vec![("", "{}".into())])),
            "ok",
        ),
        // Queue cap.
        case(
            "queue over the cap",
            vec![create(0), queue(0), queue(0), queue(0)],
            queue(0),
            "MessageQueueFull",
        ),
        // Oversize and odd content.
        case(
            "a 1 MiB message (legal)",
            idle(),
            one(send_text(big.clone())),
            "ok",
        ),
        case(
            "a 1 MiB queued message (legal)",
            running(),
            one(send_text(big.clone())),
            "ok",
        ),
        case(
            "a 1 MiB cancellation reason (legal)",
            requires_action(),
            one(Spec::Interrupt(Some(Text::Any(big.clone())))),
            "ok",
        ),
        case(
            "a 1 MiB error payload (legal)",
            running(),
            one(Spec::FinishError(Some(Json::Raw(big_json.clone())))),
            "ok",
        ),
        case(
            "a message with a NUL character (legal)",
            idle(),
            one(send_text("before\u{0}after".to_owned())),
            "ok",
        ),
        case(
            "a message with every kind of character (legal)",
            idle(),
            one(send_text(
                "\u{1}\u{7f}\u{85}\u{200b}\u{202e}\u{fffd}\u{10ffff}🦀 \\\" ' ` $1 %s {} \r\n"
                    .to_owned(),
            )),
            "ok",
        ),
        case(
            "a part nested at the depth limit (legal)",
            running(),
            one(literal(Input::CommitStep {
                messages: vec![NewMessage::new(
                    Role::Assistant,
                    vec![Part::Other(
                        JsonText::parse(&format!(
                            "{{\"type\":\"blob\",\"data\":{}}}",
                            deep_json(MAX_JSON_DEPTH - 1)
                        ))
                        .expect("valid JSON"),
                    )],
                )],
                consume_compaction_request: false,
            })),
            "ok",
        ),
        case(
            "send a tool message",
            idle(),
            one(Spec::Send {
                msg: Msg::Answer { is_error: false },
                busy: BusyBehavior::Queue,
            }),
            "TransitionNotAllowed",
        ),
        case(
            "commit no messages",
            running(),
            one(commit(vec![])),
            "TransitionNotAllowed",
        ),
        case(
            "abandon an unowned chat",
            running(),
            one(Spec::Abandon),
            "TransitionNotAllowed",
        ),
        case(
            "archive an archived chat",
            vec![
                create(0),
                one(Spec::FinishTurn),
                one(Spec::SetArchived(true)),
            ],
            one(Spec::SetArchived(true)),
            "TransitionNotAllowed",
        ),
        case(
            "fenced call by a runner that never owned the chat",
            vec![create(0), one(Spec::Acquire(0))],
            Op::Update {
                slot: 0,
                calls: vec![CallSpec {
                    spec: Spec::FinishTurn,
                    fence: Some(2),
                }],
            },
            "LeaseLost",
        ),
        case(
            "a bundle whose last call is hostile rolls back",
            running(),
            up(0, vec![send_text(big.clone()), retry("{")]),
            "TransitionNotAllowed",
        ),
    ]
}

fn kind(expect: &Expect) -> &'static str {
    match expect {
        Expect::Created { .. }
        | Expect::Committed { .. }
        | Expect::Locked(_)
        | Expect::Heartbeat(_)
        | Expect::Done => "ok",
        Expect::CreateRejected(r) | Expect::Rejected { rejection: r, .. } => r.kind.name(),
        Expect::ChatNotFound => "ChatNotFound",
    }
}

/// Runs every case of the table on a fresh store of the backend.
pub async fn hostile_inputs<B: Backend>(backend: &B) {
    let exact = exact_time(backend.name());
    let mut failures = Vec::new();
    for case in cases() {
        let store = backend.store().await;
        let mut world = World::with_ids(case.ids.clone().unwrap_or_else(default_ids));
        let mut sut = Sut::new(store, &world, exact);
        for op in &case.setup {
            let (next, expect) = world.step(op);
            assert_eq!(
                kind(&expect),
                "ok",
                "{}: setup {op:?} fails: {expect:?}",
                case.name
            );
            if let Err(e) = sut.check(op, &world, &next, &expect).await {
                panic!("{} store, {}: setup {op:?}: {e}", backend.name(), case.name);
            }
            world = next;
        }
        let (next, expect) = world.step(&case.op);
        assert_eq!(
            kind(&expect),
            case.expect,
            "{}: the model says {expect:?}",
            case.name
        );
        if let Err(e) = sut.check(&case.op, &world, &next, &expect).await {
            failures.push(format!("{}: {e}", case.name));
            continue;
        }
        // A rejection changed nothing anywhere: every chat reloads as before.
        if let Err(e) = sut.verify_all(&next).await {
            failures.push(format!("{}: afterwards: {e}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} store differs from the model on {} hostile input(s):\n{}",
        backend.name(),
        failures.len(),
        failures.join("\n")
    );
}

/// Arbitrary strings (every Unicode scalar, NUL and controls included) as
/// message text, queued text, retry payload and tool output, compared with
/// the model.
pub fn hostile_strings<B: Backend>(backend: &B, default_cases: u32) {
    let seed = seed();
    let mut runner = TestRunner::new(Config {
        cases: conformance::cases(default_cases),
        rng_seed: RngSeed::Fixed(seed),
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel(
            "proptest-regressions",
        ))),
        ..Config::default()
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let coverage = Mutex::new(Coverage::default());
    // Characters that break stores are rare in uniform Unicode: weight
    // NUL, controls, quotes, backslashes and non-BMP characters up.
    let nasty = proptest::collection::vec(
        prop_oneof![
            1 => Just('\u{0}'),
            1 => proptest::char::range('\u{1}', '\u{1f}'),
            1 => proptest::sample::select(vec!['"', '\\', '\'', '\u{7f}', '\u{2028}', '\u{feff}', '\u{fffd}', '🦀']),
            6 => any::<char>(),
        ],
        0..24,
    )
    .prop_map(|cs| cs.into_iter().collect::<String>());
    let result = runner.run(&(nasty.clone(), nasty), |(a, b)| {
        let ops = vec![
            create(0),
            one(send_text(a.clone())),
            up(
                0,
                vec![
                    retry(b.clone()),
                    commit(vec![Msg::Call {
                        call: 1,
                        dynamic: true,
                        provider_executed: false,
                    }]),
                    Spec::Enter,
                ],
            ),
            one(results(vec![("call-1", a.clone())])),
            one(results(vec![(
                "call-1",
                serde_json::to_string(&b).expect("string"),
            )])),
            one(Spec::FinishError(Some(Json::Raw(a.clone())))),
            one(send_text(b.clone())),
        ];
        rt.block_on(run_case(backend, &World::default(), &ops, None, &coverage))
            .map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, (a, b))) => panic!(
            "{} store (seed {seed}): {why}\nminimal strings: {a:?} and {b:?}",
            backend.name()
        ),
        Err(e) => panic!("{} store (seed {seed}): {e}", backend.name()),
    }
}

//! The model's input boundary on a real store: the JSON depth limit, option
//! bounds, the nil chat id, and the chat's last model configuration.
//!
//! Everything the model accepts must read back from the store unchanged;
//! everything it refuses must change nothing and publish nothing. Each
//! function is one named test; [`crate::boundary_suite!`] instantiates them
//! for a backend.

use std::time::Duration;

use chatstate::{BusyBehavior, ChatMachine, CreateChat, Error, Store, TestControl, create_chat};
use chatstate_model::{
    ChatId, ExecutionState, JsonError, JsonText, MAX_JSON_DEPTH, NewMessage, Options, OptionsError,
    Part, RejectionKind, Role, RunnerId, ToolResultInput, Transition, WorkerId, reasons,
};
use uuid::Uuid;

use crate::Backend;
use crate::fixture::{DYNAMIC_TOOL, Fx, SERVER_TOOL, assistant_call};

/// Instantiates every boundary test as a `#[tokio::test]` for a backend
/// expression.
#[macro_export]
macro_rules! boundary_suite {
    ($backend:expr) => {
        $crate::boundary_suite!(@tests $backend;
            json_at_the_depth_limit_reads_back,
            json_past_the_depth_limit_is_refused_without_trace,
            invalid_options_never_reach_the_store,
            options_at_their_bounds_work,
            nil_chat_id_is_refused,
            message_inserts_set_the_last_model_config,
        );
    };
    (@tests $backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::boundary::$name(&$backend).await;
            }
        )*
    };
}

/// JSON text nested `depth` deep: arrays in arrays.
fn deep_text(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// A JSON value nested `depth` deep.
fn deep_value(depth: usize) -> serde_json::Value {
    serde_json::from_str(&deep_text(depth)).expect("within serde_json's limit")
}

fn at_limit(text: &str) -> JsonText {
    JsonText::parse(text).expect("at the depth limit")
}

/// A chat created with parts at the depth limit: an unknown part, a part
/// shaped like a tool call whose id is a deep document (Postgres folds such
/// fields into its tool-call tail, two levels further in), and tool-call
/// arguments; then the user message an edit can target.
fn deep_history() -> Vec<NewMessage> {
    let limit = MAX_JSON_DEPTH;
    let other = serde_json::json!({"type": "blob", "data": deep_value(limit - 1)});
    assert_eq!(chatstate_model::json_depth(&other), limit);
    let other = JsonText::from_value(&other).unwrap();
    let call_shaped = serde_json::json!({
        "type": "tool-call",
        "tool_call_id": deep_value(limit - 1),
        "tool_name": "x",
    });
    assert_eq!(chatstate_model::json_depth(&call_shaped), limit);
    vec![
        NewMessage::user("start"),
        NewMessage::new(
            Role::Assistant,
            vec![
                Part::Other(other),
                Part::Other(JsonText::from_value(&call_shaped).unwrap()),
                Part::ToolCall {
                    tool_call_id: "srv-1".into(),
                    tool_name: SERVER_TOOL.into(),
                    args: at_limit(&deep_text(limit)),
                    provider_executed: true,
                },
            ],
        ),
        NewMessage::user("edit me"),
    ]
}

async fn create_with<S: Store + TestControl>(fx: &Fx<S>, messages: Vec<NewMessage>) -> ChatId {
    create_chat(
        &fx.store,
        &fx.notify(),
        CreateChat {
            owner_id: Uuid::new_v4(),
            dynamic_tools: [DYNAMIC_TOOL.to_owned()].into(),
            messages,
            ..CreateChat::default()
        },
    )
    .await
    .expect("create chat")
    .chat_id
}

/// Values nested exactly [`MAX_JSON_DEPTH`] deep at every place JSON
/// enters (create_chat messages, message parts and tool arguments, a tool
/// result's output, the retry payload, `last_error`, metadata) commit and
/// read back equal, through Update, Lock, ReadLock and an edit that folds
/// the deep parts into its tool bookkeeping.
pub async fn json_at_the_depth_limit_reads_back<B: Backend>(b: &B) {
    let fx = Fx::new(b.store().await);
    let limit = MAX_JSON_DEPTH;
    let history = deep_history();
    let m = fx.machine(create_with(&fx, history.clone()).await);
    let rec = m.load().await.expect("a chat at the limit loads");
    let contents: Vec<_> = rec.history.iter().map(|h| h.content.clone()).collect();
    let want: Vec<_> = history.iter().map(|h| h.content.clone()).collect();
    assert_eq!(contents, want);

    // An edit folds the history before its target, deep parts included.
    let target = rec.history[2].id;
    m.update(async |tx| {
        tx.edit_message(target, vec![Part::text("edited")], None)
            .await
    })
    .await
    .expect("edit over deep parts");

    // A client tool result, the retry payload, metadata and last_error.
    let deep = deep_text(limit);
    m.update(async |tx| {
        tx.commit_step(vec![assistant_call("d1", DYNAMIC_TOOL)], false)
            .await?;
        tx.enter_requires_action().await?;
        tx.complete_requires_action(
            vec![ToolResultInput {
                tool_call_id: "d1".into(),
                output: deep.clone(),
                is_error: false,
            }],
            None,
        )
        .await?;
        tx.record_retry_state(&deep).await?;
        tx.set_metadata(Some(at_limit(&deep))).await
    })
    .await
    .expect("deep tool output, retry state and metadata commit");
    m.update(async |tx| tx.finish_error(Some(at_limit(&deep))).await)
        .await
        .expect("a deep error payload commits");

    let rec = m.load().await.expect("reads back");
    let result = rec
        .active_history()
        .find_map(|h| match &h.content[..] {
            [Part::ToolResult { result, .. }] => Some(result.clone()),
            _ => None,
        })
        .expect("the tool result");
    assert_eq!(result, at_limit(&deep));
    assert_eq!(rec.row.last_error, Some(at_limit(&deep)));
    assert_eq!(rec.metadata.metadata, Some(at_limit(&deep)));
    assert_eq!(rec.row.retry_state, Some(at_limit(&deep)));
    m.lock(async |l| l.load().await.map(|_| ()))
        .await
        .expect("lock reads it");
}

/// One level past the limit is refused wherever JSON enters: a value built
/// in code cannot become a `JsonText` (so no part, error payload or
/// metadata can carry it), and text given to a transition is rejected with
/// `JsonTooDeep`: no bump, nothing published, the chat unchanged.
pub async fn json_past_the_depth_limit_is_refused_without_trace<B: Backend>(b: &B) {
    let fx = Fx::new(b.store().await);
    let over = MAX_JSON_DEPTH + 1;
    assert!(matches!(
        JsonText::from_value(&deep_value(over)),
        Err(JsonError::TooDeep { depth, max }) if depth == over && max == MAX_JSON_DEPTH
    ));
    let m = fx.create().await;
    m.update(async |tx| {
        tx.commit_step(vec![assistant_call("d1", DYNAMIC_TOOL)], false)
            .await?;
        tx.enter_requires_action().await
    })
    .await
    .unwrap();
    let running = fx.create().await;
    let before = m.load().await.unwrap();
    let running_before = running.load().await.unwrap();
    fx.publisher.clear();
    for depth in [over, 127, 128, 200] {
        let deep = deep_text(depth);
        let output = deep.clone();
        let err = m
            .update(async |tx| {
                tx.complete_requires_action(
                    vec![ToolResultInput {
                        tool_call_id: "d1".into(),
                        output,
                        is_error: false,
                    }],
                    None,
                )
                .await
            })
            .await
            .unwrap_err();
        assert_too_deep(
            &err,
            Transition::CompleteRequiresAction,
            ExecutionState::A0,
            depth,
        );
        let err = running
            .update(async |tx| tx.record_retry_state(&deep).await)
            .await
            .unwrap_err();
        assert_too_deep(
            &err,
            Transition::RecordRetryState,
            ExecutionState::R0,
            depth,
        );
        assert_eq!(m.load().await.unwrap(), before, "depth {depth}");
        assert_eq!(
            running.load().await.unwrap(),
            running_before,
            "depth {depth}"
        );
    }
    assert!(fx.publisher.published().is_empty());
}

fn assert_too_deep(err: &Error, transition: Transition, from: ExecutionState, depth: usize) {
    let r = err.rejection().unwrap_or_else(|| panic!("{err}"));
    assert_eq!((r.transition, r.from), (transition, from));
    assert_eq!(
        r.kind,
        RejectionKind::JsonTooDeep {
            depth,
            max: MAX_JSON_DEPTH
        }
    );
}

/// A machine built with options out of bounds refuses Update, Lock,
/// ReadLock and heartbeat with `InvalidOptions` before reaching the store
/// (Postgres would otherwise fail on an interval out of range): the chat
/// is unchanged and nothing is published.
pub async fn invalid_options_never_reach_the_store<B: Backend>(b: &B) {
    let fx = Fx::new(b.store().await);
    let m = fx.create().await;
    let before = m.load().await.unwrap();
    fx.publisher.clear();
    let huge = Duration::from_secs(u64::MAX);
    let bad = [
        Options {
            heartbeat_stale: huge,
            ..Options::default()
        },
        Options {
            requires_action_timeout: huge,
            ..Options::default()
        },
        Options {
            max_queue_size: 0,
            ..Options::default()
        },
        Options {
            heartbeat_stale: Duration::ZERO,
            ..Options::default()
        },
    ];
    for options in bad {
        let want = options.validate().unwrap_err();
        let bad = ChatMachine::new(fx.store.clone(), fx.notify(), m.chat_id(), options);
        let check = |e: Error| match e {
            Error::InvalidOptions(got) => assert_eq!(got, want),
            other => panic!("{options:?}: {other}"),
        };
        check(
            bad.update(async |tx| tx.finish_turn().await)
                .await
                .unwrap_err(),
        );
        check(bad.update(async |_| Ok(())).await.unwrap_err());
        check(bad.lock(async |_| Ok(())).await.unwrap_err());
        check(bad.read_lock(async |_| Ok(())).await.unwrap_err());
        check(bad.load().await.unwrap_err());
        check(bad.heartbeat(RunnerId::new_random()).await.unwrap_err());
        assert_eq!(m.load().await.unwrap(), before);
    }
    assert!(fx.publisher.published().is_empty());
    assert!(matches!(
        Options {
            heartbeat_stale: huge,
            ..Options::default()
        }
        .validate(),
        Err(OptionsError::Duration {
            field: "heartbeat_stale",
            ..
        })
    ));
}

/// Options at their bounds work on the store: the longest staleness and
/// requires-action timeout, the shortest staleness, the largest and the
/// smallest queue cap.
pub async fn options_at_their_bounds_work<B: Backend>(b: &B) {
    let mut fx = Fx::new(b.store().await);
    fx.options = Options {
        max_queue_size: Options::MAX_QUEUE_SIZE,
        heartbeat_stale: Options::MAX_DURATION,
        requires_action_timeout: Options::MAX_DURATION,
    };
    let (worker, runner) = (WorkerId::new_random(), RunnerId::new_random());
    let m = fx.create().await;
    let out = m
        .update(async |tx| {
            tx.acquire(worker, runner).await?;
            tx.send_message(NewMessage::user("queued"), BusyBehavior::Queue)
                .await?;
            tx.commit_step(vec![assistant_call("d1", DYNAMIC_TOOL)], false)
                .await?;
            tx.enter_requires_action().await
        })
        .await
        .expect("the longest timeout fits a timestamp");
    let deadline = out.requires_action_deadline.expect("a deadline");
    let rec = m.load().await.unwrap();
    assert_eq!(rec.state(), ExecutionState::A1);
    let fresh = m
        .read_lock(async |r| Ok(r.snapshot().lease_fresh))
        .await
        .unwrap();
    assert!(fresh, "a lease within the longest staleness is fresh");
    assert_eq!(rec.row.requires_action_deadline_at, Some(deadline));
    m.heartbeat(runner).await.unwrap();
    m.lock(async |_| Ok(())).await.unwrap();

    fx.options = Options {
        max_queue_size: Options::MIN_QUEUE_SIZE,
        heartbeat_stale: Options::MIN_DURATION,
        ..Options::default()
    };
    let m = fx.create().await;
    let err = m
        .update(async |tx| {
            tx.send_message(NewMessage::user("one"), BusyBehavior::Queue)
                .await?;
            tx.send_message(NewMessage::user("two"), BusyBehavior::Queue)
                .await
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.rejection().unwrap().kind,
        RejectionKind::MessageQueueFull { max: 1 }
    );
}

/// CreateChat with the nil UUID as its id is rejected (TransitionNotAllowed
/// from N with its reason), writes nothing and publishes nothing. Nil
/// owners are accepted: they are attributes, not identities.
pub async fn nil_chat_id_is_refused<B: Backend>(b: &B) {
    let fx = Fx::new(b.store().await);
    let err = create_chat(
        &fx.store,
        &fx.notify(),
        CreateChat {
            id: Some(ChatId(Uuid::nil())),
            messages: vec![NewMessage::user("hi")],
            ..CreateChat::default()
        },
    )
    .await
    .unwrap_err();
    let r = err.rejection().expect("a rejection");
    assert_eq!(
        (r.transition, r.from),
        (Transition::CreateChat, ExecutionState::N)
    );
    assert_eq!(
        r.kind,
        RejectionKind::TransitionNotAllowed {
            reason: Some(reasons::CREATE_NIL_ID)
        }
    );
    assert!(fx.publisher.published().is_empty());
    assert!(matches!(
        fx.machine(ChatId(Uuid::nil())).load().await,
        Err(Error::ChatNotFound(_))
    ));
    // A nil owner is an attribute like any other.
    let created = create_chat(
        &fx.store,
        &fx.notify(),
        CreateChat {
            owner_id: Uuid::nil(),
            messages: vec![NewMessage::user("hi")],
            ..CreateChat::default()
        },
    )
    .await
    .expect("a nil owner is accepted");
    let rec = fx.machine(created.chat_id).load().await.unwrap();
    assert_eq!(rec.row.owner_id, Uuid::nil());
}

/// Every message insert sets `last_model_config_id` to the batch's last
/// non-null model configuration (creation included), and synthetic
/// cancellations and promoted queue rows without one of their own then
/// carry it (a promotion: as the same plan's messages left it).
pub async fn message_inserts_set_the_last_model_config<B: Backend>(b: &B) {
    let fx = Fx::new(b.store().await);
    let (a, c, d) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let with = |m: NewMessage, config| NewMessage {
        model_config_id: config,
        ..m
    };
    let chat = create_with(
        &fx,
        vec![
            with(NewMessage::user("first"), Some(a)),
            with(NewMessage::user("second"), None),
        ],
    )
    .await;
    let m = fx.machine(chat);
    assert_eq!(m.load().await.unwrap().row.last_model_config_id, Some(a));

    // A step whose last configured message names c; then a turn ends with
    // the server call outstanding.
    m.update(async |tx| {
        tx.commit_step(
            vec![
                with(assistant_call("s1", SERVER_TOOL), Some(c)),
                with(
                    NewMessage::new(
                        Role::Tool,
                        vec![Part::tool_result("other", SERVER_TOOL, JsonText::null())],
                    ),
                    None,
                ),
            ],
            false,
        )
        .await?;
        tx.finish_turn().await
    })
    .await
    .unwrap();
    let rec = m.load().await.unwrap();
    assert_eq!(rec.row.last_model_config_id, Some(c));

    // A new user message cancels the outstanding call with c and then sets d.
    m.update(async |tx| {
        tx.send_message(with(NewMessage::user("next"), Some(d)), BusyBehavior::Queue)
            .await
    })
    .await
    .unwrap();
    let rec = m.load().await.unwrap();
    let tail: Vec<_> = rec
        .active_history()
        .rev()
        .take(2)
        .map(|h| (h.role, h.model_config_id))
        .collect();
    assert_eq!(tail, [(Role::User, Some(d)), (Role::Tool, Some(c))]);
    assert_eq!(rec.row.last_model_config_id, Some(d));

    // A queued row without a configuration is promoted with the chat's.
    m.update(async |tx| {
        tx.send_message(NewMessage::user("queued"), BusyBehavior::Queue)
            .await?;
        tx.finish_error(None).await
    })
    .await
    .unwrap();
    let queued = m.load().await.unwrap().queue[0].id;
    m.update(async |tx| tx.promote_queued_message(queued).await)
        .await
        .unwrap();
    let rec = m.load().await.unwrap();
    let last = rec.active_history().last().unwrap();
    assert_eq!((last.role, last.model_config_id), (Role::User, Some(d)));
    assert_eq!(rec.row.last_model_config_id, Some(d));

    // A promotion after messages of the same plan falls back to the
    // configuration those messages set.
    let e = Uuid::new_v4();
    m.update(async |tx| {
        tx.send_message(NewMessage::user("queued again"), BusyBehavior::Queue)
            .await?;
        tx.interrupt(None).await?;
        tx.finish_interruption(vec![with(NewMessage::assistant("partial"), Some(e))])
            .await
    })
    .await
    .unwrap();
    let rec = m.load().await.unwrap();
    let tail: Vec<_> = rec
        .active_history()
        .rev()
        .take(2)
        .map(|h| (h.role, h.model_config_id, h.queued_message_id.is_some()))
        .collect();
    assert_eq!(
        tail,
        [
            (Role::User, Some(e), true),
            (Role::Assistant, Some(e), false)
        ]
    );
    assert_eq!(rec.row.last_model_config_id, Some(e));
}

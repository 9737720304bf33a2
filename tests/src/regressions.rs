//! Shrunk failing sequences frozen as named cases, each with a one-line
//! postmortem. [`crate::model_suite!`] runs every one of them on its
//! backend through the conformance comparison ([`crate::conformance::replay`]).

use chatstate_model::{BusyBehavior, Role};

use crate::world::{CallSpec, Json, Meta, Msg, Op, Spec, Text};

fn create() -> Op {
    Op::Create {
        slot: 0,
        msgs: vec![Msg::Text {
            role: Role::User,
            text: Text::Canned(0),
            meta: Meta::default(),
        }],
        dynamic: true,
        config: false,
    }
}

fn update(spec: Spec) -> Op {
    Op::Update {
        slot: 0,
        calls: vec![CallSpec::from(spec)],
    }
}

/// Postmortem: JSON `-0` canonicalises to `-0.0` in the model (and the
/// in-memory store keeps it), Postgres `jsonb` has no negative zero and
/// reads back `0.0`; recording the same payload again then looks like a
/// change on Postgres only, so `retry_state_version` moves there and not
/// in the model. Found by the hostile-input table on Postgres.
pub fn negative_zero_retry_state() -> Vec<Op> {
    vec![
        create(),
        update(Spec::RecordRetry(Json::Raw("-0".into()))),
        update(Spec::RecordRetry(Json::Raw("-0".into()))),
    ]
}

/// Postmortem: a user message holding a NUL character is legal in the
/// model and the in-memory store, but Postgres `text`/`jsonb` cannot hold
/// NUL, so the Update fails there with a store error instead of
/// committing. Shrunk by `hostile_strings` on Postgres to the string "\0".
pub fn nul_in_message_text() -> Vec<Op> {
    vec![
        create(),
        update(Spec::FinishTurn),
        update(Spec::Send {
            msg: Msg::Text {
                role: Role::User,
                text: Text::Any("\0".into()),
                meta: Meta::default(),
            },
            busy: BusyBehavior::Queue,
        }),
    ]
}

/// Postmortem: as [`nul_in_message_text`], for an escaped NUL (`\u0000`)
/// inside a JSON payload, which `jsonb` rejects.
pub fn escaped_nul_in_retry_state() -> Vec<Op> {
    vec![
        create(),
        update(Spec::RecordRetry(Json::Raw(r#"{"s":"\u0000"}"#.into()))),
    ]
}

/// Instantiates the frozen regressions for a backend expression (part of
/// [`crate::model_suite!`]).
#[macro_export]
macro_rules! regression_tests {
    ($backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::conformance::replay(&$backend, &$crate::regressions::$name());
            }
        )*
    };
    ($backend:expr) => {
        $crate::regression_tests!($backend;
            negative_zero_retry_state,
            nul_in_message_text,
            escaped_nul_in_retry_state,
        );
    };
}

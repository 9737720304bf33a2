//! The properties: the step checks as always-properties, the state
//! predicates and one `sometimes` per state, all checked by stateright; the
//! matrix triples and the rejection kinds the run must produce are recorded
//! by the steps themselves (see [`SingleChat::triple_coverage`]).

use super::*;

/// The rejection kinds the representative inputs must produce.
pub(super) const EXPECTED_REJECTIONS: [&str; 11] = [
    "TransitionNotAllowed",
    "InvalidState",
    "ChatNotFound",
    "QueuedMessageNotFound",
    "MessageNotFound",
    "EditedMessageNotUser",
    "MessageQueueFull",
    "ToolResultDuplicate",
    "ToolResultInvalidJson",
    "ToolResultMissing",
    "ToolResultUnexpected",
];

pub(super) const QUEUE_CAP_NAME: &str = "queue never exceeds the cap";
pub(super) const RECONCILE_NAME: &str = "Invalid reconciles into E0/E1";
pub(super) const REST_NAME: &str = "idle or error reachable from runnable";

pub(super) fn properties() -> Vec<Property<SingleChat>> {
    let mut out: Vec<Property<SingleChat>> = vec![
        Property::always(
            Check::StaysValid.property_name(),
            holds::<{ Check::StaysValid as usize }>,
        ),
        Property::always(
            Check::Landing.property_name(),
            holds::<{ Check::Landing as usize }>,
        ),
        Property::always(
            Check::Rejection.property_name(),
            holds::<{ Check::Rejection as usize }>,
        ),
        Property::always(QUEUE_CAP_NAME, queue_within_cap),
        Property::always(
            Check::Snapshot.property_name(),
            holds::<{ Check::Snapshot as usize }>,
        ),
        Property::always(
            Check::Versions.property_name(),
            holds::<{ Check::Versions as usize }>,
        ),
        Property::always(
            Check::Notifications.property_name(),
            holds::<{ Check::Notifications as usize }>,
        ),
        Property::always(
            Check::NoPanic.property_name(),
            holds::<{ Check::NoPanic as usize }>,
        ),
        Property::always(RECONCILE_NAME, invalid_reconciles),
        Property::always(REST_NAME, rest_reachable),
    ];
    for (i, state) in ExecutionState::ALL.iter().enumerate() {
        if *state != ExecutionState::Invalid {
            out.push(Property::sometimes(
                intern(format!("reach {state}")),
                REACH_CONDITIONS[i],
            ));
        }
    }
    out
}

/// Property names must be `&'static str`; the state names are built at run
/// time, so each distinct name is leaked once and reused by every later
/// model (a few dozen bytes per name, thirteen names in all).
pub(super) fn intern(name: String) -> &'static str {
    static NAMES: OnceLock<Mutex<BTreeSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(known) = names.get(name.as_str()) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    names.insert(leaked);
    leaked
}

pub(super) fn holds<const CHECK: usize>(_: &SingleChat, s: &ChatState) -> bool {
    !s.violations.iter().any(|v| v.check as usize == CHECK)
}

pub(super) fn queue_within_cap(m: &SingleChat, s: &ChatState) -> bool {
    s.chat
        .as_ref()
        .is_none_or(|c| c.queue.len() <= m.options.max_queue_size as usize)
}

pub(super) fn invalid_reconciles(m: &SingleChat, s: &ChatState) -> bool {
    let Some(chat) = &s.chat else { return true };
    if chat.state() != ExecutionState::Invalid {
        return true;
    }
    let Some(input) = Op::ReconcileInvalidState.input(Some(chat)) else {
        return false;
    };
    let env = m.env();
    match catch_unwind(AssertUnwindSafe(|| {
        update(Some(chat), &[input.into()], &env)
    })) {
        Ok(Ok(done)) => {
            matches!(done.chat.state(), ExecutionState::E0 | ExecutionState::E1)
                && done.chat.queue.len() == chat.queue.len()
        }
        _ => false,
    }
}

/// The actions that end work, tried first: most runnable states reach rest
/// through one or two of them, so the full action set is searched only when
/// these do not suffice.
pub(super) const REST_ACTIONS: [Action; 9] = [
    Action::Update(Op::FinishTurn),
    Action::Update(Op::FinishError),
    Action::Update(Op::FinishInterruption(PartialPick::None)),
    Action::Update(Op::FinishInterruption(PartialPick::AnswerOutstanding)),
    Action::Update(Op::Interrupt),
    Action::Update(Op::CancelRequiresAction),
    Action::Update(Op::CompleteRequiresAction(ResultsPick::Exact)),
    Action::Update(Op::CommitStep(StepPick::ToolResults)),
    Action::Update(Op::EditMessage(EditPick::LastUser)),
];

pub(super) fn rest_reachable(m: &SingleChat, s: &ChatState) -> bool {
    if !s.violations.is_empty() || !s.state().is_runnable() {
        return true;
    }
    m.reaches_rest(s, |_, out| out.extend(REST_ACTIONS))
        || m.reaches_rest(s, |state, out| m.actions(state, out))
}

pub(super) fn state_reached<const I: usize>(_: &SingleChat, s: &ChatState) -> bool {
    s.state() == ExecutionState::ALL[I]
}

/// One function per index, since a stateright condition is a plain `fn`.
macro_rules! indexed {
    ($f:ident; $($i:literal)*) => { [$($f::<$i> as Condition),*] };
}

pub(super) const REACH_CONDITIONS: [Condition; 14] =
    indexed!(state_reached; 0 1 2 3 4 5 6 7 8 9 10 11 12 13);

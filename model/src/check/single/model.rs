//! The model itself: [`SingleChat`], its steps through the reference
//! Update, and the checks each step runs before normalisation.

use super::*;

pub(super) type Condition = fn(&SingleChat, &ChatState) -> bool;

/// The single-chat model over one matrix.
pub struct SingleChat {
    pub(super) matrix: Matrix,
    pub(super) options: Options,
    pub(super) triples: Vec<Triple>,
    /// The index in `triples` of each triple, at [`triple_slot`];
    /// [`NO_TRIPLE`] where the matrix has no such triple.
    pub(super) triple_index: Vec<u8>,
    /// Bit `i` is set once a committed step realised `triples[i]` (as the
    /// last execution transition of its Update). Written by `next_state` on
    /// any thread; read only after the run.
    pub(super) reached: [AtomicU64; 2],
    pub(super) initial: Vec<ChatState>,
    pub(super) properties: Vec<Property<SingleChat>>,
    /// Bit `i` is set once a step was rejected with `EXPECTED_REJECTIONS[i]`.
    /// Written by `next_state` on any thread; read only after the run.
    pub(super) rejections: AtomicU32,
}

impl SingleChat {
    /// The model over `matrix` (the reference one outside tests).
    ///
    /// # Panics
    ///
    /// If the matrix has more than 128 triples (the width of the bitset
    /// that records them; the reference matrix has 70).
    pub fn new(matrix: Matrix) -> Self {
        let triples = matrix.triples();
        assert!(
            triples.len() <= 128,
            "the single-chat model supports at most 128 matrix triples, got {}",
            triples.len()
        );
        let mut triple_index = vec![NO_TRIPLE; Transition::ALL.len() * STATES * STATES];
        for (i, &(t, from, to)) in triples.iter().enumerate().rev() {
            triple_index[triple_slot(t, from, to)] = i as u8;
        }
        let properties = properties();
        SingleChat {
            matrix,
            options: options(),
            triples,
            triple_index,
            reached: [AtomicU64::new(0), AtomicU64::new(0)],
            initial: initial_states(),
            properties,
            rejections: AtomicU32::new(0),
        }
    }

    /// The matrix the model gates on and checks landings against.
    pub fn matrix(&self) -> Matrix {
        self.matrix
    }

    pub(super) fn env(&self) -> StepEnv<'_> {
        StepEnv {
            now: NOW,
            options: &self.options,
            matrix: self.matrix,
            fence: None,
        }
    }

    pub(super) fn saw(&self, kind: &RejectionKind) {
        if let Some(i) = EXPECTED_REJECTIONS.iter().position(|n| *n == kind.name()) {
            self.rejections.fetch_or(1 << i, Ordering::Relaxed);
        }
    }

    /// Records that a committed step realised `(t, from, to)`.
    fn realised(&self, (t, from, to): Triple) {
        let i = self.triple_index[triple_slot(t, from, to)];
        if i != NO_TRIPLE {
            self.reached[usize::from(i / 64)].fetch_or(1 << (i % 64), Ordering::Relaxed);
        }
    }

    pub(super) fn create(&self, s: &ChatState, pick: CreatePick) -> Option<ChatState> {
        if s.chat.is_some() {
            return None;
        }
        let new = NewChat {
            id: CHAT_ID,
            owner_id: USER,
            dynamic_tools: [DYNAMIC_TOOL.to_owned()].into(),
            last_model_config_id: None,
            messages: match pick {
                CreatePick::UserMessage => vec![user_message()],
                CreatePick::NoMessages => Vec::new(),
            },
        };
        let created = match Chat::create(&new) {
            Ok(chat) => chat,
            Err(rejection) => {
                self.saw(&rejection.kind);
                let expected = pick == CreatePick::NoMessages
                    && rejection.transition == Transition::CreateChat
                    && rejection.from == ExecutionState::N
                    && matches!(
                        rejection.kind,
                        RejectionKind::TransitionNotAllowed { reason: Some(_) }
                    );
                return (!expected).then(|| {
                    s.with_violations(vec![Violation::new(
                        Check::Rejection,
                        format!("CreateChat({pick:?}) rejected unexpectedly: {rejection}"),
                    )])
                });
            }
        };
        let mut violations = Vec::new();
        let to = created.state();
        if !self
            .matrix
            .allows_landing(Transition::CreateChat, ExecutionState::N, to)
        {
            violations.push(self.landing_violation(Transition::CreateChat, ExecutionState::N, to));
        }
        if to == ExecutionState::Invalid {
            violations.push(Violation::new(
                Check::StaysValid,
                "CreateChat created an Invalid chat",
            ));
        }
        let v = created.row.versions;
        if v.snapshot != 1 {
            violations.push(Violation::new(
                Check::Snapshot,
                format!("CreateChat left snapshot {} (expected 1)", v.snapshot),
            ));
        }
        let revisions_ok = created.history.iter().all(|m| m.revision == 1);
        if (v.history, v.queue, v.retry_state) != (1, 0, 0)
            || created.row.generation_attempt != 0
            || !revisions_ok
        {
            violations.push(Violation::new(
                Check::Versions,
                format!(
                    "CreateChat left versions {v:?}, attempt {}, revisions ok: {revisions_ok} \
                     (expected history 1, queue 0, retry 0, attempt 0, revisions 1)",
                    created.row.generation_attempt
                ),
            ));
        }
        self.realised((Transition::CreateChat, ExecutionState::N, to));
        Some(ChatState {
            chat: Some(normalise(created, &self.options)),
            violations,
        })
    }

    pub(super) fn apply_update(&self, s: &ChatState, ops: &[Op]) -> Option<ChatState> {
        let chat = s.chat.as_ref();
        let calls: Vec<Call> = ops
            .iter()
            .map(|op| op.input(chat).map(Call::from))
            .collect::<Option<_>>()?;
        let env = self.env();
        let result = match catch_unwind(AssertUnwindSafe(|| update(chat, &calls, &env))) {
            Ok(result) => result,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                return Some(s.with_violations(vec![Violation::new(
                    Check::NoPanic,
                    format!("{} from {} panicked: {message}", ops_label(ops), s.state()),
                )]));
            }
        };
        match result {
            Err(rejected) => {
                self.saw(&rejected.rejection.kind);
                let violations = self.check_rejection(chat, &calls, &rejected);
                (!violations.is_empty()).then(|| s.with_violations(violations))
            }
            Ok(committed) => {
                let before = chat.expect("an Update commits only on an existing chat");
                let violations = self.check_committed(before, &committed);
                let last = committed
                    .outcomes
                    .iter()
                    .rev()
                    .find(|o| !o.transition.is_ownership())
                    .map(|o| (o.transition, o.from, o.to));
                let after = normalise(committed.chat, &self.options);
                if violations.is_empty() && after.history.len() > MAX_HISTORY {
                    // Bounded history: this Update is simply not offered.
                    return None;
                }
                if let Some(triple) = last {
                    self.realised(triple);
                }
                Some(ChatState {
                    chat: Some(after),
                    violations,
                })
            }
        }
    }

    /// Checks a rejected Update: the rejection names the failing call's
    /// transition and the state that call started from, and agrees with the
    /// matrix. The chat itself is kept as it was (the rollback).
    pub(super) fn check_rejection(
        &self,
        chat: Option<&Chat>,
        calls: &[Call],
        rejected: &UpdateRejected,
    ) -> Vec<Violation> {
        let UpdateRejected { index, rejection } = rejected;
        let bad = |detail: String| vec![Violation::new(Check::Rejection, detail)];
        let Some(call) = calls.get(*index) else {
            return bad(format!(
                "rejection names call {index} of an Update with {} calls",
                calls.len()
            ));
        };
        // The from-state of the failing call: the chat's own for the first
        // call; for a later one, replay the calls before it on a bumped
        // copy, as the Update did.
        let from = match chat {
            None => ExecutionState::N,
            Some(chat) if *index == 0 => chat.state(),
            Some(chat) => {
                let mut current = chat.clone();
                current.row.versions.snapshot += 1;
                let env = self.env();
                for (i, earlier) in calls[..*index].iter().enumerate() {
                    match step(&current, &earlier.input, &env) {
                        Ok((next, _)) => current = next,
                        Err(r) => {
                            return bad(format!(
                                "Update reported call {index} rejected, but call {i} already \
                                 fails alone: {r}"
                            ));
                        }
                    }
                }
                current.state()
            }
        };
        let transition = call.input.transition();
        let mut out = Vec::new();
        if rejection.transition != transition || rejection.from != from {
            out.push(Violation::new(
                Check::Rejection,
                format!(
                    "{transition} from {from} was rejected as {} from {}",
                    rejection.transition, rejection.from
                ),
            ));
        }
        let allowed = self.matrix.allows(transition, from);
        let kind = &rejection.kind;
        let plain = matches!(
            kind,
            RejectionKind::TransitionNotAllowed { reason: None }
                | RejectionKind::InvalidState
                | RejectionKind::ChatNotFound
        );
        if allowed && plain {
            out.push(Violation::new(
                Check::Rejection,
                format!(
                    "the matrix allows {transition} from {from}, yet it was rejected: {rejection}"
                ),
            ));
        }
        if !allowed {
            let expected = match from {
                ExecutionState::N => matches!(kind, RejectionKind::ChatNotFound),
                ExecutionState::Invalid
                    if !transition.is_ownership()
                        && transition != Transition::ReconcileInvalidState =>
                {
                    matches!(kind, RejectionKind::InvalidState)
                }
                // Reconcile from a valid state says why (spec invariant 13).
                _ if transition == Transition::ReconcileInvalidState => {
                    matches!(kind, RejectionKind::TransitionNotAllowed { .. })
                }
                _ => matches!(kind, RejectionKind::TransitionNotAllowed { reason: None }),
            };
            if !expected {
                out.push(Violation::new(
                    Check::Rejection,
                    format!(
                        "the matrix forbids {transition} from {from}, but the rejection is \
                         {}: {rejection}",
                        kind.name()
                    ),
                ));
            }
        }
        out
    }

    /// Checks a committed Update against the chat it started from, before
    /// normalisation.
    pub(super) fn check_committed(&self, before: &Chat, committed: &Committed) -> Vec<Violation> {
        let mut out = Vec::new();
        let after = &committed.chat;
        let (s0, s1) = (before.row.versions.snapshot, after.row.versions.snapshot);
        if s1 != s0 + 1 {
            out.push(Violation::new(
                Check::Snapshot,
                format!("snapshot went from {s0} to {s1}"),
            ));
        }
        if let Some(first) = committed.outcomes.first()
            && first.from != before.state()
        {
            out.push(Violation::new(
                Check::Landing,
                format!(
                    "{} reports from-state {} but the chat was {}",
                    first.transition,
                    first.from,
                    before.state()
                ),
            ));
        }
        for o in &committed.outcomes {
            if !self.matrix.allows_landing(o.transition, o.from, o.to) {
                out.push(self.landing_violation(o.transition, o.from, o.to));
            }
            if o.from != ExecutionState::Invalid && o.to == ExecutionState::Invalid {
                out.push(Violation::new(
                    Check::StaysValid,
                    format!("{} took {} into Invalid", o.transition, o.from),
                ));
            }
        }
        let reported = committed.outcomes.last().map_or(before.state(), |o| o.to);
        if after.state() != reported {
            out.push(Violation::new(
                Check::Landing,
                format!(
                    "the last outcome reports {reported}, but the chat classifies as {}",
                    after.state()
                ),
            ));
        }
        if let Some(detail) = version_mismatch(before, after) {
            out.push(Violation::new(Check::Versions, detail));
        }
        if let Some(detail) = self.notification_mismatch(committed) {
            out.push(Violation::new(Check::Notifications, detail));
        }
        out
    }

    pub(super) fn landing_violation(
        &self,
        transition: Transition,
        from: ExecutionState,
        to: ExecutionState,
    ) -> Violation {
        let detail = if transition.is_ownership() {
            format!("{transition} changed the state from {from} to {to}")
        } else {
            match self.matrix.cell(transition, from) {
                Some(cell) => format!(
                    "{transition} {from}->{to} is not in the matrix cell ({transition}, {from}) \
                     -> [{}]",
                    join(cell.to.iter())
                ),
                None => format!(
                    "{transition} landed {from}->{to}, but the matrix does not allow \
                     {transition} from {from}"
                ),
            }
        };
        Violation::new(Check::Landing, detail)
    }

    pub(super) fn notification_mismatch(&self, committed: &Committed) -> Option<String> {
        let chat = &committed.chat;
        let row = &chat.row;
        let needs_hint = chat.state().is_runnable() && !chat.lease_fresh(NOW, &self.options);
        let (update, rest) = match committed.notifications.as_slice() {
            [Notification::Update { chat_id, update }, rest @ ..] if *chat_id == row.id => {
                (update, rest)
            }
            other => {
                return Some(format!(
                    "expected a chat:update first, got {} notifications",
                    other.len()
                ));
            }
        };
        if *update != ChatUpdate::from_row(row) {
            return Some("the chat:update payload is not the committed row's".to_owned());
        }
        match rest {
            [] if !needs_hint => None,
            [] => Some(format!(
                "{} without a fresh lease published no hint",
                chat.state()
            )),
            [Notification::Ownership(hint)]
                if needs_hint
                    && hint.chat_id == row.id
                    && hint.snapshot_version == row.versions.snapshot =>
            {
                None
            }
            _ => Some(format!(
                "unexpected notifications after the chat:update ({} with lease {})",
                chat.state(),
                if needs_hint {
                    "missing or stale"
                } else {
                    "fresh or not needed"
                }
            )),
        }
    }

    pub(super) fn heartbeat(&self, s: &ChatState) -> Option<ChatState> {
        let chat = s.chat.as_ref()?;
        let owner = chat.row.owner?;
        if chat.lease_fresh(NOW, &self.options) {
            return None;
        }
        let mut next = chat.clone();
        next.heartbeats.insert(owner.runner_id, NOW);
        Some(ChatState {
            chat: Some(normalise(next, &self.options)),
            violations: Vec::new(),
        })
    }

    pub(super) fn lease_goes_stale(&self, s: &ChatState) -> Option<ChatState> {
        let chat = s.chat.as_ref()?;
        chat.row.owner?;
        if !chat.lease_fresh(NOW, &self.options) {
            return None;
        }
        // Store time moves just past the threshold; shifting every stored
        // instant back by the same amount puts store time at NOW again.
        let delta = self.options.heartbeat_stale + Duration::from_secs(1);
        let mut next = chat.clone();
        for beat in next.heartbeats.values_mut() {
            *beat = beat.minus(delta);
        }
        let row = &mut next.row;
        row.requires_action_deadline_at = row.requires_action_deadline_at.map(|t| t.minus(delta));
        row.compaction_requested_at = row.compaction_requested_at.map(|t| t.minus(delta));
        Some(ChatState {
            chat: Some(normalise(next, &self.options)),
            violations: Vec::new(),
        })
    }

    /// True if a state at rest (W, E0, E1) is reachable from `start` within
    /// [`REST_SEARCH_DEPTH`] steps of the actions `actions` offers.
    pub(super) fn reaches_rest(
        &self,
        start: &ChatState,
        actions: impl Fn(&ChatState, &mut Vec<Action>),
    ) -> bool {
        // The start is not copied: most searches end at its first successor.
        let mut seen: HashSet<ChatState> = HashSet::new();
        let mut frontier: Vec<ChatState> = Vec::new();
        let mut offered = Vec::new();
        for depth in 0..REST_SEARCH_DEPTH {
            let mut next = Vec::new();
            let states: Vec<&ChatState> = if depth == 0 {
                vec![start]
            } else {
                frontier.iter().collect()
            };
            for state in states {
                offered.clear();
                actions(state, &mut offered);
                for &action in &offered {
                    let Some(n) = self.next_state(state, action) else {
                        continue;
                    };
                    if !n.violations.is_empty() {
                        continue;
                    }
                    if n.state().is_at_rest() {
                        return true;
                    }
                    if n != *start && seen.insert(n.clone()) {
                        next.push(n);
                    }
                }
            }
            if next.is_empty() {
                break;
            }
            frontier = next;
        }
        false
    }

    /// One `sometimes` verdict per matrix triple: was it realised?
    pub(super) fn triple_coverage(&self) -> Vec<PropertyVerdict> {
        let reached = [0, 1].map(|w| self.reached[w].load(Ordering::Relaxed));
        self.triples
            .iter()
            .enumerate()
            .map(|(i, (t, from, to))| PropertyVerdict {
                name: format!("triple {t} {from}->{to}"),
                expectation: Expectation::Sometimes,
                holds: reached[i / 64] & (1 << (i % 64)) != 0,
                path: None,
            })
            .collect()
    }

    pub(super) fn rejection_coverage(&self) -> Vec<PropertyVerdict> {
        let seen = self.rejections.load(Ordering::Relaxed);
        EXPECTED_REJECTIONS
            .iter()
            .enumerate()
            .map(|(i, name)| PropertyVerdict {
                name: format!("rejects with {name}"),
                expectation: Expectation::Sometimes,
                holds: seen & (1 << i) != 0,
                path: None,
            })
            .collect()
    }
}

impl Model for SingleChat {
    type State = ChatState;
    type Action = Action;

    fn init_states(&self) -> Vec<ChatState> {
        self.initial.clone()
    }

    fn actions(&self, state: &ChatState, actions: &mut Vec<Action>) {
        if !state.violations.is_empty() {
            return;
        }
        // The matrix gate runs before any input is examined, so a pair the
        // matrix forbids is tried with the first op of its transition only.
        let from = state.state();
        let ops = Op::ALL.iter().enumerate().filter(|&(i, op)| {
            let t = op.transition();
            self.matrix.allows(t, from)
                || Op::ALL.iter().position(|o| o.transition() == t) == Some(i)
        });
        let Some(chat) = &state.chat else {
            actions.push(Action::CreateChat(CreatePick::UserMessage));
            actions.push(Action::CreateChat(CreatePick::NoMessages));
            // Every Update on a missing chat is rejected (ChatNotFound).
            actions.extend(ops.map(|(_, &op)| Action::Update(op)));
            return;
        };
        actions.extend(ops.map(|(_, &op)| Action::Update(op)));
        actions.extend(Op::BUNDLES.iter().map(|&(a, b)| Action::Bundle(a, b)));
        actions.push(Action::EmptyUpdate);
        if chat.row.owner.is_some() {
            actions.push(Action::Heartbeat);
            actions.push(Action::LeaseGoesStale);
        }
    }

    fn next_state(&self, state: &ChatState, action: Action) -> Option<ChatState> {
        if !state.violations.is_empty() {
            return None;
        }
        match action {
            Action::CreateChat(pick) => self.create(state, pick),
            Action::Update(op) => self.apply_update(state, &[op]),
            Action::Bundle(a, b) => self.apply_update(state, &[a, b]),
            Action::EmptyUpdate => {
                state.chat.as_ref()?;
                self.apply_update(state, &[])
            }
            Action::Heartbeat => self.heartbeat(state),
            Action::LeaseGoesStale => self.lease_goes_stale(state),
        }
    }

    fn format_action(&self, action: &Action) -> String {
        action.to_string()
    }

    fn format_step(&self, last_state: &ChatState, action: Action) -> Option<String> {
        self.next_state(last_state, action).map(|s| s.to_string())
    }

    fn properties(&self) -> Vec<Property<Self>> {
        self.properties.clone()
    }
}

/// Checks the version rules of design §3 on a committed Update, before
/// normalisation: a history change stamps `history_version`, resets the
/// attempt count and stamps every written message; a queue change stamps
/// `queue_version`; a retry-state change stamps `retry_state_version`; a
/// changed attempt count clears the retry state. Unchanged parts keep their
/// versions.
pub(super) fn version_mismatch(before: &Chat, after: &Chat) -> Option<String> {
    let s = after.row.versions.snapshot;
    let (b, a) = (&before.row.versions, &after.row.versions);
    // `before` is normalised, so it holds no soft-deleted message.
    let history_changed =
        after.history.len() != before.history.len() || after.history.iter().any(|m| m.deleted);
    let queue_ids = |c: &Chat| c.queue.iter().map(|q| q.id).collect::<Vec<_>>();
    let queue_changed = queue_ids(before) != queue_ids(after);
    let retry_changed = before.row.retry_state != after.row.retry_state;
    let expect = |changed: bool, old: i64| if changed { s } else { old };
    if a.history != expect(history_changed, b.history) {
        return Some(format!(
            "history_version {} after an Update that {} the history (snapshot {s})",
            a.history,
            if history_changed { "changed" } else { "kept" }
        ));
    }
    if a.queue != expect(queue_changed, b.queue) {
        return Some(format!(
            "queue_version {} after an Update that {} the queue (snapshot {s})",
            a.queue,
            if queue_changed { "changed" } else { "kept" }
        ));
    }
    if a.retry_state != expect(retry_changed, b.retry_state) {
        return Some(format!(
            "retry_state_version {} after an Update that {} the retry state (snapshot {s})",
            a.retry_state,
            if retry_changed { "changed" } else { "kept" }
        ));
    }
    if history_changed && after.row.generation_attempt != 0 {
        return Some(format!(
            "generation_attempt {} after a history change",
            after.row.generation_attempt
        ));
    }
    if after.row.generation_attempt != before.row.generation_attempt
        && after.row.retry_state.is_some()
    {
        return Some("the attempt count changed but the retry state survived".to_owned());
    }
    for m in &after.history {
        let old = before.history.iter().find(|o| o.id == m.id);
        let written = old.is_none() || m.deleted;
        let expected = if written {
            s
        } else {
            old.map_or(s, |o| o.revision)
        };
        if m.revision != expected {
            return Some(format!(
                "message {} has revision {} (expected {expected})",
                m.id, m.revision
            ));
        }
    }
    None
}

/// The number of execution states.
const STATES: usize = ExecutionState::ALL.len();

/// An entry of [`SingleChat::triple_index`] for a triple the matrix lacks.
pub(super) const NO_TRIPLE: u8 = u8::MAX;

/// Where a triple sits in [`SingleChat::triple_index`].
pub(super) fn triple_slot(t: Transition, from: ExecutionState, to: ExecutionState) -> usize {
    (t as usize * STATES + from as usize) * STATES + to as usize
}

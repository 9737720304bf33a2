//! Unit tests of the model's steps, checks and rendering.

use super::*;

#[test]
fn initial_states_are_n_and_twelve_invalid_combinations() {
    let init = initial_states();
    assert_eq!(init.len(), 13);
    assert_eq!(init[0].state(), ExecutionState::N);
    assert!(
        init[1..]
            .iter()
            .all(|s| s.state() == ExecutionState::Invalid)
    );
    let distinct: HashSet<_> = init.iter().collect();
    assert_eq!(distinct.len(), 13);
}

#[test]
fn normalisation_folds_ids_versions_and_time() {
    let m = SingleChat::new(Matrix::REFERENCE);
    let created = m
        .next_state(
            &initial_states()[0],
            Action::CreateChat(CreatePick::UserMessage),
        )
        .expect("CreateChat commits");
    let chat = created.chat.as_ref().expect("chat exists");
    assert_eq!(chat.row.versions, CANONICAL_VERSIONS);
    assert_eq!(chat.history[0].id, MessageId(1));
    // Acquire, go stale, heartbeat: back to a fresh lease, same chat.
    let owned = m
        .next_state(&created, Action::Update(Op::Acquire))
        .expect("Acquire commits");
    let stale = m
        .next_state(&owned, Action::LeaseGoesStale)
        .expect("the lease was fresh");
    assert_ne!(stale, owned);
    assert!(m.next_state(&stale, Action::LeaseGoesStale).is_none());
    let fresh = m
        .next_state(&stale, Action::Heartbeat)
        .expect("the lease was stale");
    assert_eq!(fresh, owned);
}

/// The chat right after CreateChat, normalised.
fn created(m: &SingleChat) -> Chat {
    m.next_state(
        &initial_states()[0],
        Action::CreateChat(CreatePick::UserMessage),
    )
    .and_then(|s| s.chat)
    .expect("CreateChat commits")
}

fn commit(m: &SingleChat, chat: &Chat, op: Op) -> Committed {
    let input = op.input(Some(chat)).expect("the op applies");
    update(Some(chat), &[input.into()], &m.env()).expect("the update commits")
}

#[test]
fn the_version_check_catches_a_missed_stamp() {
    let m = SingleChat::new(Matrix::REFERENCE);
    let chat = created(&m);
    let done = commit(&m, &chat, Op::CommitStep(StepPick::Text));
    assert_eq!(version_mismatch(&chat, &done.chat), None);
    let mut history_kept = done.chat.clone();
    history_kept.row.versions.history = chat.row.versions.history;
    assert!(version_mismatch(&chat, &history_kept).is_some());
    let mut queue_stamped = done.chat.clone();
    queue_stamped.row.versions.queue = queue_stamped.row.versions.snapshot;
    assert!(version_mismatch(&chat, &queue_stamped).is_some());
    let mut old_revision = done.chat.clone();
    old_revision.history.last_mut().expect("a message").revision = 0;
    assert!(version_mismatch(&chat, &old_revision).is_some());
}

#[test]
fn the_notification_check_catches_a_missing_hint() {
    let m = SingleChat::new(Matrix::REFERENCE);
    let chat = created(&m);
    // Unowned and running: the Update must hint.
    let mut done = commit(&m, &chat, Op::RecordGenerationAttempt);
    assert_eq!(m.notification_mismatch(&done), None);
    done.notifications.truncate(1);
    assert!(m.notification_mismatch(&done).is_some());
}

#[test]
fn the_rejection_check_catches_a_wrong_from_state() {
    let m = SingleChat::new(Matrix::REFERENCE);
    let chat = created(&m);
    let calls = [Call::from(Input::FinishTurn), Call::from(Input::FinishTurn)];
    let rejected = update(Some(&chat), &calls, &m.env()).expect_err("twice is too many");
    assert_eq!(rejected.index, 1);
    assert_eq!(rejected.rejection.from, ExecutionState::W);
    assert!(m.check_rejection(Some(&chat), &calls, &rejected).is_empty());
    let mut wrong = rejected.clone();
    wrong.rejection.from = ExecutionState::R0;
    assert_eq!(
        m.check_rejection(Some(&chat), &calls, &wrong)[0].check,
        Check::Rejection
    );
    // A plain matrix rejection of a pair the matrix allows is wrong too.
    let mut plain = rejected;
    plain.index = 0;
    plain.rejection.from = ExecutionState::R0;
    assert!(!m.check_rejection(Some(&chat), &calls, &plain).is_empty());
}

#[test]
fn display_is_one_readable_line() {
    let m = SingleChat::new(Matrix::REFERENCE);
    let created = m
        .next_state(
            &initial_states()[0],
            Action::CreateChat(CreatePick::UserMessage),
        )
        .expect("CreateChat commits");
    assert_eq!(created.to_string(), "R0 | history: user");
    assert_eq!(
        Action::Bundle(Op::CommitStep(StepPick::Text), Op::FinishTurn).to_string(),
        "CommitStep(text) + FinishTurn"
    );
    assert_eq!(
        format!("{:?}", Action::Update(Op::SendMessage(BusyBehavior::Queue))),
        "SendMessage(queue)"
    );
}

#[test]
fn a_committed_step_records_its_triple_and_nothing_else() {
    let m = SingleChat::new(Matrix::REFERENCE);
    let held = |m: &SingleChat| -> Vec<String> {
        m.triple_coverage()
            .into_iter()
            .filter(|v| v.holds)
            .map(|v| v.name)
            .collect()
    };
    assert!(held(&m).is_empty());
    let created = m
        .next_state(
            &initial_states()[0],
            Action::CreateChat(CreatePick::UserMessage),
        )
        .expect("CreateChat commits");
    assert_eq!(held(&m), ["triple CreateChat N->R0"]);
    // A bundle records the last execution transition of its Update only;
    // a rejected Update and an ownership-only one record nothing.
    m.next_state(
        &created,
        Action::Bundle(Op::CommitStep(StepPick::Text), Op::FinishTurn),
    )
    .expect("the bundle commits");
    assert!(
        m.next_state(&created, Action::Update(Op::SetArchived(true)))
            .is_none()
    );
    m.next_state(&created, Action::Update(Op::Acquire))
        .expect("Acquire commits");
    assert_eq!(
        held(&m),
        ["triple CreateChat N->R0", "triple FinishTurn R0->W"]
    );
}

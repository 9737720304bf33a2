//! The commit observer: what it is told matches what committed, and it is
//! told nothing about Updates that never reached their commit.

use std::sync::{Arc, Mutex};

use chatstate::{
    BusyBehavior, ChatChange, CommitObserver, CommitReport, Ending, Error, NewMessage,
};
use chatstate_model::{Notification, Transition};

use crate::Backend;
use crate::fixture::Fx;

/// One report: the changes and how the commit ended.
type Report = (Vec<ChatChange>, Result<(), String>);

/// Keeps every report, and what was announced before each commit.
#[derive(Default)]
struct Keep(Mutex<Vec<Report>>, Mutex<Vec<Vec<ChatChange>>>);

impl CommitObserver for Keep {
    fn before_commit(&self, changes: &[ChatChange]) {
        self.1.lock().expect("announced").push(changes.to_vec());
    }

    fn commit_ended(&self, report: &CommitReport<'_>) {
        let result = report.result.map_err(|e| e.to_string());
        self.0
            .lock()
            .expect("reports")
            .push((report.changes.to_vec(), result));
    }
}

impl Keep {
    /// The reports since the last call; each was announced, identically,
    /// before its commit.
    fn take(&self) -> Vec<Report> {
        let reports = std::mem::take(&mut *self.0.lock().expect("reports"));
        let announced = std::mem::take(&mut *self.1.lock().expect("announced"));
        let ended: Vec<_> = reports.iter().map(|(c, _)| c.clone()).collect();
        assert_eq!(announced, ended, "before_commit saw what commit_ended saw");
        reports
    }
}

/// An observed Update is reported once with its accepted transitions, the
/// snapshot it committed and the notifications that went out; a rejected
/// transition the callback carried on after is left out; a failed or
/// skipped Update is not reported; a nested Update is reported as a second
/// change of the same report.
pub async fn observer_reports_what_committed<B: Backend>(b: &B) {
    let fx = Fx::new(b.store().await);
    let keep = Arc::new(Keep::default());
    let m = fx.create().await.observed(keep.clone());
    let other = fx.create().await;
    let (worker, runner) = (fx.worker, fx.runner);
    fx.publisher.clear();

    m.update(async |tx| {
        tx.acquire(worker, runner).await?;
        // Rejected (archiving a running chat), and carried on after.
        assert!(tx.set_archived(true).await.is_err());
        tx.fenced(runner)
            .commit_step(vec![NewMessage::assistant("hi")], false)
            .await
    })
    .await
    .unwrap();
    let reports = keep.take();
    assert_eq!(reports.len(), 1, "one report per Update");
    let (changes, result) = &reports[0];
    assert_eq!(result, &Ok(()));
    assert_eq!(changes.len(), 1);
    let c = &changes[0];
    assert_eq!(c.chat_id, m.chat_id());
    let transitions: Vec<Transition> = c.calls.iter().map(|c| c.input.transition()).collect();
    assert_eq!(transitions, [Transition::Acquire, Transition::CommitStep]);
    assert_eq!(c.calls[0].fence, None);
    assert_eq!(c.calls[1].fence, Some(runner));
    assert_eq!(c.outcomes.len(), 2);
    let stored = m.load().await.unwrap();
    assert_eq!(c.snapshot_version, stored.row.versions.snapshot);
    assert_eq!(c.end.row, stored.row);
    assert!(c.lease_fresh.eq(&false), "no lease before the Acquire");
    assert_eq!(c.notifications, fx.publisher.notifications());
    let oracle = c.to_committed_update();
    assert_eq!(oracle.snapshot, c.snapshot_version);
    let sent: Vec<Vec<u8>> = fx
        .publisher
        .published()
        .into_iter()
        .map(|p| p.payload)
        .collect();
    let told: Vec<Vec<u8>> = oracle.published.into_iter().map(|p| p.payload).collect();
    assert_eq!(
        told, sent,
        "the oracle's record carries the bytes that went out"
    );

    // Failed in the callback, and skipped: nothing reported.
    let err = m
        .update(async |tx| {
            tx.send_message(NewMessage::user("x"), BusyBehavior::Queue)
                .await?;
            Err::<(), _>(Error::callback(std::io::Error::other("no")))
        })
        .await;
    assert!(err.is_err());
    let skipped = m
        .update_or_skip(async |tx| {
            tx.send_message(NewMessage::user("y"), BusyBehavior::Queue)
                .await?;
            Ok(Ending::Skip(()))
        })
        .await
        .unwrap();
    assert_eq!(skipped, Ending::Skip(()));
    assert!(
        keep.take().is_empty(),
        "rolled-back Updates are not reported"
    );

    // Nested: the handle's chat first, then the nested one.
    let other_id = other.chat_id();
    fx.publisher.clear();
    m.update(async |tx| {
        tx.update_nested(other_id, async |itx| {
            itx.send_message(NewMessage::user("nested"), BusyBehavior::Queue)
                .await
        })
        .await?;
        tx.fenced(runner).finish_turn().await
    })
    .await
    .unwrap();
    let reports = keep.take();
    assert_eq!(reports.len(), 1);
    let (changes, _) = &reports[0];
    let chats: Vec<_> = changes.iter().map(|c| c.chat_id).collect();
    assert_eq!(chats, [m.chat_id(), other_id]);
    assert_eq!(
        changes[1].calls[0].input.transition(),
        Transition::SendMessage
    );
    assert_eq!(
        changes[1].snapshot_version,
        other.load().await.unwrap().row.versions.snapshot
    );
    let mut told: Vec<Notification> = changes
        .iter()
        .flat_map(|c| c.notifications.iter().cloned())
        .collect();
    let mut sent = fx.publisher.notifications();
    told.sort_by_key(|n| n.channel());
    sent.sort_by_key(|n| n.channel());
    assert_eq!(told, sent);
}

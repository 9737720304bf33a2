//! The store backends of a replay: each chat's steps through its own
//! `ChatMachine`, chats concurrently, `advance_clock` as a barrier.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;
use chatstate::{
    ChatMachine, ChatRecord, Error, LockMode, Notify, RecordingPublisher, Store, TestControl,
    create_chat,
};
use chatstate_model::{MessageId, Notification};

use crate::trace::record::{advance_record, op_name, outcomes_value};
use crate::trace::{Compiled, ErrorView, Finish, Op, Record, Seen, StepResult};

/// Replays a trace on a store through `ChatMachine`.
pub(crate) async fn run_store<S: Store + TestControl>(
    store: S,
    c: Arc<Compiled>,
    parallel: usize,
) -> anyhow::Result<Vec<Record>> {
    let mut drivers: Vec<Option<Driver<S>>> = (0..c.chats.len())
        .map(|slot| Some(Driver::new(store.clone(), &c, slot)))
        .collect();
    let mut out: Vec<Option<Record>> = vec![None; c.ops.len()];
    let permits = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut i = 0;
    while i < c.ops.len() {
        if let Op::Advance(d) = c.ops[i] {
            let error = store
                .advance_clock(d)
                .await
                .err()
                .map(|e| ErrorView::error(&Error::Store(e), None, &c.names));
            out[i] = Some(advance_record(i, d, error));
            i += 1;
            continue;
        }
        let end = (i..c.ops.len())
            .find(|&j| matches!(c.ops[j], Op::Advance(_)))
            .unwrap_or(c.ops.len());
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for j in i..end {
            let slot = c.ops[j].chat().expect("only advance_clock has no chat");
            groups.entry(slot).or_default().push(j);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (slot, steps) in groups {
            let driver = drivers[slot].take().expect("one task per chat");
            let c = c.clone();
            let permit = permits.clone().acquire_owned().await?;
            tasks.spawn(async move {
                let mut records = Vec::with_capacity(steps.len());
                for j in steps {
                    records.push((j, driver.exec(j, &c).await));
                }
                drop(permit);
                (slot, driver, records)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let (slot, driver, records) = joined.context("a replay task panicked")?;
            drivers[slot] = Some(driver);
            for (j, r) in records {
                out[j] = Some(r);
            }
        }
        i = end;
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every step ran"))
        .collect())
}

/// One chat of a store replay: its machine and what it published.
struct Driver<S: Store> {
    store: S,
    machine: ChatMachine<S>,
    recorder: Arc<RecordingPublisher>,
    slot: usize,
}

impl<S: Store + TestControl> Driver<S> {
    fn new(store: S, c: &Compiled, slot: usize) -> Self {
        let recorder = Arc::new(RecordingPublisher::new());
        Driver {
            machine: ChatMachine::new(
                store.clone(),
                Notify::AfterCommit(recorder.clone()),
                c.chats[slot].0,
                c.options,
            ),
            store,
            recorder,
            slot,
        }
    }

    /// What the step published (and forgets it).
    fn published(&self) -> Vec<Notification> {
        let n = self.recorder.notifications();
        self.recorder.clear();
        n
    }

    /// Reads the chat under a shared lock: the record and lease freshness.
    async fn observe(&self) -> Result<Option<(ChatRecord, bool)>, Error> {
        let read = self
            .machine
            .read_lock(async |r| {
                let fresh = r.snapshot().lease_fresh;
                Ok((r.load().await?, fresh))
            })
            .await;
        match read {
            Ok(seen) => Ok(Some(seen)),
            Err(Error::ChatNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn exec(&self, i: usize, c: &Compiled) -> Record {
        let op = &c.ops[i];
        let finish = Finish {
            step: i,
            op: op_name(op),
            chat: &c.chats[self.slot].1,
            names: &c.names,
        };
        let names = &c.names;
        // Either the step read the chat itself (inside its transaction) or
        // it is read afterwards.
        let mut seen: Option<(ChatRecord, bool)> = None;
        let outcome: Result<Option<StepResult>, ErrorView> = match op {
            Op::Create { create, .. } => create_chat(
                &self.store,
                &Notify::AfterCommit(self.recorder.clone()),
                create.clone(),
            )
            .await
            .map(|created| {
                Some(StepResult::Create {
                    messages: created.messages.len(),
                })
            })
            .map_err(|e| ErrorView::error(&e, None, names)),
            Op::Update { calls, .. } => {
                let mut failed = None;
                let done = self
                    .machine
                    .update(async |tx| {
                        let mut outcomes = Vec::with_capacity(calls.len());
                        for (j, call) in calls.iter().enumerate() {
                            failed = Some(j);
                            let history: Vec<MessageId> = if call.input.needs_history() {
                                tx.load().await?.active_history().map(|m| m.id).collect()
                            } else {
                                Vec::new()
                            };
                            let input = call.input.resolve(&tx.snapshot().queue, &history);
                            let outcome = match call.fence {
                                Some(runner) => tx.fenced(runner).apply_input(input).await?,
                                None => tx.apply(input).await?,
                            };
                            outcomes.push(outcome);
                        }
                        failed = None;
                        let fresh = tx.snapshot().lease_fresh;
                        Ok((outcomes, tx.load().await?, fresh))
                    })
                    .await;
                match done {
                    Ok((outcomes, record, fresh)) => {
                        seen = Some((record, fresh));
                        Ok(Some(outcomes_value(&outcomes)))
                    }
                    Err(e) => Err(ErrorView::error(&e, failed, names)),
                }
            }
            Op::Heartbeat { runner, .. } => self
                .machine
                .heartbeat(*runner)
                .await
                .and_then(|status| match status {
                    // Traces record a heartbeat of a missing chat as
                    // ChatNotFound, whatever the lease status says.
                    chatstate::LeaseStatus::ChatGone => {
                        Err(Error::ChatNotFound(self.machine.chat_id()))
                    }
                    _ => Ok(None),
                })
                .map_err(|e| ErrorView::error(&e, None, names)),
            Op::SetRaw {
                status, archived, ..
            } => match self.observe().await {
                Ok(Some((record, _))) => self
                    .store
                    .set_raw_state(
                        self.machine.chat_id(),
                        status,
                        archived.unwrap_or(record.row.archived),
                    )
                    .await
                    .map(|()| None)
                    .map_err(|e| ErrorView::error(&Error::Store(e), None, names)),
                Ok(None) => Err(ErrorView::chat_not_found()),
                Err(e) => Err(ErrorView::error(&e, None, names)),
            },
            Op::Lock { mode, .. } => match mode {
                LockMode::Exclusive => self.machine.lock(async |_| Ok(())).await,
                LockMode::Shared => self.machine.read_lock(async |_| Ok(())).await,
            }
            .map(|()| None)
            .map_err(|e| ErrorView::error(&e, None, names)),
            Op::Advance(_) => unreachable!("advance_clock runs outside chat tasks"),
        };
        let published = self.published();
        if seen.is_none() {
            match self.observe().await {
                Ok(s) => seen = s,
                Err(e) => {
                    let err = ErrorView::error(&e, None, names);
                    return finish.record(None, &published, Err(err));
                }
            }
        }
        let seen = seen.as_ref().map(|(record, fresh)| Seen {
            row: &record.row,
            queue: &record.queue,
            history: &record.history,
            lease_fresh: *fresh,
        });
        finish.record(seen, &published, outcome)
    }
}

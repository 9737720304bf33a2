//! The claim loop: filters hints, sweeps, claims, runs one task per held
//! chat, and shuts down.
//!
//! Claiming is cheap on purpose. A hint first passes a local filter (a
//! chat already held or being claimed here is skipped; at capacity the hint
//! is dropped and a sweep follows when a slot frees), so of all the
//! runtimes that hear a hint only those with room try, and each try is one
//! `try_acquire`: on a lost race one rolled-back lock, no bump, no
//! publication.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chatstate::{
    ChatId, ChatMachine, Claim, CommitObserver, Notify, Options, Owner, RunnerId, Store, WorkerId,
};
use tokio::sync::mpsc;
use tokio::task::{self, JoinError, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::field::Empty;

use crate::handler::{Handler, Released};
use crate::hints::HintEvent;
use crate::lease::{self, Lease};
use crate::runtime::Timing;
use crate::stats::{Counters, add, bump};

/// What every task of a runtime shares.
pub(crate) struct Shared<S: Store, H> {
    pub(crate) store: S,
    pub(crate) notify: Notify,
    pub(crate) options: Options,
    pub(crate) worker: WorkerId,
    pub(crate) handler: H,
    pub(crate) timing: Timing,
    pub(crate) stop: CancellationToken,
    pub(crate) counters: Arc<Counters>,
    pub(crate) observer: Option<Arc<dyn CommitObserver>>,
}

impl<S: Store, H> Shared<S, H> {
    fn machine(&self, chat: ChatId) -> ChatMachine<S> {
        let machine = ChatMachine::new(self.store.clone(), self.notify.clone(), chat, self.options);
        match &self.observer {
            Some(observer) => machine.observed(observer.clone()),
            None => machine,
        }
    }
}

/// How a chat task ended.
struct ChatEnd {
    /// The chat was left runnable and unowned by this runtime's own
    /// release: offer it again (our own hint was filtered out while the
    /// task still held the chat).
    reoffer: bool,
}

/// One chat this runtime holds or is claiming.
struct Slot {
    chat: ChatId,
    runner: RunnerId,
}

pub(crate) struct ClaimLoop<S: Store, H> {
    shared: Arc<Shared<S, H>>,
    capacity: usize,
    hints: mpsc::Receiver<HintEvent>,
    sources: JoinSet<()>,
    tasks: JoinSet<ChatEnd>,
    slots: HashMap<task::Id, Slot>,
    held: HashSet<ChatId>,
    /// A hint was dropped at capacity, or a sweep found no room: sweep as
    /// soon as a slot frees.
    sweep_due: bool,
}

impl<S: Store, H: Handler<S>> ClaimLoop<S, H> {
    pub(crate) fn new(
        shared: Arc<Shared<S, H>>,
        capacity: usize,
        hints: mpsc::Receiver<HintEvent>,
        sources: JoinSet<()>,
    ) -> Self {
        ClaimLoop {
            shared,
            capacity,
            hints,
            sources,
            tasks: JoinSet::new(),
            slots: HashMap::new(),
            held: HashSet::new(),
            sweep_due: false,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut sweeps = tokio::time::interval(self.shared.timing.sweep_interval);
        sweeps.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let stop = self.shared.stop.clone();
        let mut hints_open = true;
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    if let Some((slot, Some(end))) = self.ended(done)
                        && end.reoffer
                    {
                        self.offer(slot.chat, Source::Hint);
                    }
                    if self.sweep_due && self.free() > 0 {
                        self.sweep().await;
                    }
                }
                event = self.hints.recv(), if hints_open => match event {
                    Some(HintEvent::Chat(chat)) => self.hint(chat),
                    Some(HintEvent::Missed) => self.sweep().await,
                    // Failures and the end of a source stay in its forwarder.
                    Some(_) => {}
                    None => hints_open = false,
                },
                _ = sweeps.tick() => self.sweep().await,
            }
        }
        self.drain().await;
    }

    fn free(&self) -> usize {
        self.capacity.saturating_sub(self.held.len())
    }

    fn hint(&mut self, chat: ChatId) {
        let counters = &self.shared.counters;
        bump(&counters.hints);
        if self.held.contains(&chat) {
            bump(&counters.hints_deduplicated);
        } else if self.free() == 0 {
            bump(&counters.hints_at_capacity);
            self.sweep_due = true;
        } else {
            self.claim(chat, Source::Hint);
        }
    }

    /// Claims `chat` unless it is held here or there is no room.
    fn offer(&mut self, chat: ChatId, source: Source) {
        if !self.held.contains(&chat) && self.free() > 0 {
            self.claim(chat, source);
        }
    }

    fn claim(&mut self, chat: ChatId, source: Source) {
        let runner = RunnerId::new_random();
        let id = self
            .tasks
            .spawn(chat_task(self.shared.clone(), chat, runner, source).in_current_span())
            .id();
        self.slots.insert(id, Slot { chat, runner });
        self.held.insert(chat);
    }

    /// Forgets a finished task's chat. `None` for the end output when the
    /// task panicked or was aborted.
    fn ended(
        &mut self,
        done: Result<(task::Id, ChatEnd), JoinError>,
    ) -> Option<(Slot, Option<ChatEnd>)> {
        let (id, end) = match done {
            Ok((id, end)) => (id, Some(end)),
            Err(e) => {
                if e.is_panic() {
                    // The handler panicked: its lease was dropped while
                    // unwinding, so it goes stale like an error's.
                    bump(&self.shared.counters.errored);
                }
                (e.id(), None)
            }
        };
        let slot = self.slots.remove(&id)?;
        self.held.remove(&slot.chat);
        Some((slot, end))
    }

    async fn sweep(&mut self) {
        let free = self.free();
        if free == 0 {
            self.sweep_due = true;
            return;
        }
        self.sweep_due = false;
        let counters = self.shared.counters.clone();
        let span = tracing::debug_span!(
            target: "chatstate_worker",
            "sweep",
            free,
            found = Empty,
            round_trips = Empty,
        );
        let found = self
            .shared
            .store
            .claimable(&self.shared.options, free)
            .instrument(span.clone())
            .await;
        if let Ok(chats) = &found {
            span.record("found", chats.len());
        }
        // Counted once the query has answered, so that whoever reads the
        // counters knows what this sweep saw is settled.
        bump(&counters.sweeps);
        match found {
            Ok(chats) => {
                add(&counters.swept, chats.len() as u64);
                for chat in chats {
                    self.offer(chat, Source::Sweep);
                }
            }
            // The next tick tries again.
            Err(_) => bump(&counters.source_errors),
        }
    }

    /// Graceful shutdown: stop hearing hints, give the handlers the grace
    /// period, abort the rest and abandon their chats.
    async fn drain(mut self) {
        self.hints.close();
        self.sources.abort_all();
        let deadline = Instant::now() + self.shared.timing.grace;
        while !self.tasks.is_empty() {
            match tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await {
                Ok(Some(done)) => {
                    self.ended(done);
                }
                Ok(None) | Err(_) => break,
            }
        }
        self.tasks.abort_all();
        let mut left = Vec::new();
        while let Some(done) = self.tasks.join_next_with_id().await {
            if let Some((slot, None)) = self.ended(done) {
                left.push(slot);
            }
        }
        // Each aborted task has dropped its lease (and so its heartbeat)
        // by now. The Abandon is fenced: a chat this runner never won, or
        // lost meanwhile, is left alone.
        for slot in left {
            let machine = self.shared.machine(slot.chat);
            if lease::abandon(&machine, slot.runner).await.is_ok() {
                bump(&self.shared.counters.handed_back);
            }
        }
    }
}

/// Where a chat to claim came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// A hint (every worker hears it) or our own release: ask
    /// `Store::claimable_among` first, which never waits for a row lock, so
    /// that a chat another worker holds or is claiming right now costs no
    /// claim transaction.
    Hint,
    /// A sweep that has just found it claimable.
    Sweep,
}

/// One chat: claim it, run the handler if the claim won, release it.
async fn chat_task<S: Store, H: Handler<S>>(
    shared: Arc<Shared<S, H>>,
    chat: ChatId,
    runner: RunnerId,
    source: Source,
) -> ChatEnd {
    let counters = &shared.counters;
    let quiet = ChatEnd { reoffer: false };
    if source == Source::Hint {
        match shared.store.claimable_among(&[chat], &shared.options).await {
            Ok(found) if found.is_empty() => {
                bump(&counters.claims_skipped);
                #[cfg(feature = "metrics")]
                metrics::counter!("chatstate_worker_claims_total", "outcome" => "skipped")
                    .increment(1);
                return quiet;
            }
            // Claimable, or the check failed: the claim decides.
            Ok(_) | Err(_) => {}
        }
    }
    let machine = shared.machine(chat);
    let span = tracing::info_span!(
        target: "chatstate_worker",
        "claim",
        chat_id = %chat,
        runner_id = %runner,
        outcome = Empty,
    );
    let claimed = machine
        .try_acquire(shared.worker, runner)
        .instrument(span.clone())
        .await;
    let (counter, outcome) = match &claimed {
        Ok(Claim::Won { .. }) => (&counters.claims_won, "won"),
        Ok(Claim::Held { .. }) => (&counters.claims_held, "held"),
        Ok(Claim::NotRunnable { .. }) => (&counters.claims_not_runnable, "not_runnable"),
        Ok(_) | Err(_) => (&counters.claims_failed, "failed"),
    };
    bump(counter);
    span.record("outcome", outcome);
    #[cfg(feature = "metrics")]
    metrics::counter!("chatstate_worker_claims_total", "outcome" => outcome).increment(1);
    let Ok(Claim::Won { snapshot }) = claimed else {
        return quiet;
    };
    let span = tracing::info_span!(
        target: "chatstate_worker",
        "lease",
        chat_id = %chat,
        runner_id = %runner,
        released = Empty,
    );
    hold(shared, chat, runner, snapshot).instrument(span).await
}

/// Holds a won chat: starts its lease, runs the handler, releases it.
async fn hold<S: Store, H: Handler<S>>(
    shared: Arc<Shared<S, H>>,
    chat: ChatId,
    runner: RunnerId,
    snapshot: chatstate::Snapshot,
) -> ChatEnd {
    let counters = &shared.counters;
    let machine = shared.machine(chat);
    let owner = Owner {
        worker_id: shared.worker,
        runner_id: runner,
    };
    let lease = Lease::start(
        machine,
        owner,
        snapshot,
        shared.timing.heartbeat_interval,
        shared.stop.clone(),
        counters.clone(),
    );
    // A claim that won after shutdown began goes straight back.
    let released = if shared.stop.is_cancelled() {
        Released::HandBack
    } else {
        shared.handler.handle(&lease).await
    };
    tracing::Span::current().record("released", released_name(released));
    release(&lease, released).await
}

/// How a lease span shows a [`Released`].
fn released_name(released: Released) -> &'static str {
    match released {
        Released::Finished => "finished",
        Released::Errored => "errored",
        Released::HandBack => "hand_back",
    }
}

/// Writes what the handler's [`Released`] asks for.
async fn release<S: Store>(lease: &Lease<S>, released: Released) -> ChatEnd {
    let counters = lease.counters();
    let quiet = ChatEnd { reoffer: false };
    match released {
        Released::Errored => {
            bump(&counters.errored);
            lease.stop_heartbeat();
            quiet
        }
        Released::Finished | Released::HandBack => {
            let finished = released == Released::Finished;
            if finished {
                bump(&counters.finished);
            }
            if lease.is_released() || lease.is_lost() {
                return quiet;
            }
            lease.stop_heartbeat();
            match lease.abandon().await {
                Ok(state) => {
                    if !finished {
                        bump(&counters.handed_back);
                    }
                    ChatEnd {
                        reoffer: finished && state.is_runnable(),
                    }
                }
                Err(e) => {
                    lease.learn(&e);
                    quiet
                }
            }
        }
    }
}

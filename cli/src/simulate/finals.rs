//! The end of a run: every created chat read once more, as the oracle
//! compares it with the replayed record.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chatstate::{ChatId, ChatMachine, Error, Store};
use chatstate_model::oracle::StoredChat;

use super::shared::Tally;

/// The chats as the store holds them at the end.
pub(super) struct Finals {
    pub(super) stored: BTreeMap<ChatId, StoredChat>,
    /// Chats the store failed to read (left out of the check).
    pub(super) unread: BTreeSet<ChatId>,
}

/// Reads every created chat once more at the end of a run.
///
/// A read the store fails (after [`final_read`]'s retries) is a failure of
/// the run, counted as a store failure, not a finding about the model: the
/// chat and its Updates are left out of the oracle's check rather than
/// reported as a violation.
pub(super) async fn read_finals<S: Store>(
    machine: impl Fn(ChatId) -> ChatMachine<S>,
    tally: &mut Tally,
) -> Finals {
    let mut finals = BTreeMap::new();
    let mut unread = BTreeSet::new();
    for c in &tally.created {
        match final_read(&machine(c.new.id)).await {
            Ok(record) => {
                let stored = StoredChat {
                    row: record.row,
                    queue: record.queue,
                    history: record.history,
                };
                finals.insert(c.new.id, stored);
            }
            // A created chat that is gone is the oracle's to report.
            Err(Error::ChatNotFound(_)) => {}
            Err(e) => {
                unread.insert(c.new.id);
                if tally.store_errors.len() < 5 {
                    tally.store_errors.push(crate::error_chain(&e));
                }
            }
        }
    }
    tally.store_failures += unread.len() as u64;
    tally.unread_chats += unread.len() as u64;
    tally.created.retain(|c| !unread.contains(&c.new.id));
    Finals {
        stored: finals,
        unread,
    }
}

/// How often the final read of a chat is tried before the store's failure
/// counts.
const FINAL_READ_ATTEMPTS: u32 = 5;

/// Reads a chat at the end of a run, retrying store failures (a transient
/// connection or timeout error must not fail the run) a bounded number of
/// times with a growing pause.
async fn final_read<S: Store>(machine: &ChatMachine<S>) -> Result<chatstate::ChatRecord, Error> {
    let mut attempt = 1;
    loop {
        match machine.load().await {
            Err(Error::Store(_)) if attempt < FINAL_READ_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                attempt += 1;
            }
            read => return read,
        }
    }
}

#[cfg(test)]
mod tests {
    use chatstate::{CreateChat, NewMessage, Notify, create_chat};
    use chatstate_model::oracle::{Config, CreatedChat, check};
    use chatstate_model::{NewChat, Options};
    use chatstate_store_mem::MemStore;

    use super::*;

    /// A store with one chat, and the record of its creation.
    async fn one_chat() -> (MemStore, CreatedChat, ChatMachine<MemStore>) {
        let store = MemStore::default();
        let new = NewChat {
            id: ChatId::new_random(),
            owner_id: uuid::Uuid::new_v4(),
            dynamic_tools: Default::default(),
            last_model_config_id: None,
            messages: vec![NewMessage::user("hi")],
        };
        let notify = Notify::InTransaction;
        let created = create_chat(&store, &notify, CreateChat::from(new.clone()))
            .await
            .expect("created");
        let machine = ChatMachine::new(store.clone(), notify, new.id, Options::default());
        let record = CreatedChat {
            new,
            ids: created.messages,
            published: Vec::new(),
        };
        (store, record, machine)
    }

    fn block_on<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn a_transient_failure_of_the_final_read_is_retried() {
        block_on(async {
            let (store, created, machine) = one_chat().await;
            store.fail_nth_call(1);
            let mut tally = Tally {
                created: vec![created],
                ..Tally::default()
            };
            let finals = read_finals(|_| machine.clone(), &mut tally).await;
            assert_eq!(store.injected_faults(), 1);
            assert_eq!(finals.stored.len(), 1);
            assert!(finals.unread.is_empty());
            assert_eq!((tally.store_failures, tally.unread_chats), (0, 0));
        });
    }

    #[test]
    fn a_final_read_the_store_keeps_failing_fails_the_run_not_the_oracle() {
        block_on(async {
            let (store, created, machine) = one_chat().await;
            store.fail_every_nth_call(1);
            let id = created.new.id;
            let mut tally = Tally {
                created: vec![created],
                ..Tally::default()
            };
            let finals = read_finals(|_| machine.clone(), &mut tally).await;
            assert_eq!(
                store.injected_faults(),
                u64::from(FINAL_READ_ATTEMPTS),
                "bounded retries"
            );
            assert!(finals.stored.is_empty());
            assert_eq!(finals.unread, BTreeSet::from([id]));
            assert_eq!((tally.store_failures, tally.unread_chats), (1, 1));
            assert_eq!(tally.store_errors.len(), 1);
            // The oracle is not asked about the chat it could not see.
            let config = Config {
                options: Options::default(),
                exact_time: true,
            };
            let verdict = check(&config, &tally.created, [], &finals.stored);
            assert!(verdict.violations.is_empty(), "{:?}", verdict.violations);
        });
    }
}

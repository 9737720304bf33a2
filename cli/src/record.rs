//! Commit records that survive a killed process: every Update that tries to
//! commit, and every created chat, as JSON lines in a file.
//!
//! A [`Recorder`] is a `CommitObserver`. Just before an Update sends its
//! commit it writes a `maybe` line holding everything the Update commits if
//! it commits; once the commit has ended it writes a settling line
//! (`committed`, `not committed` or `unknown`) naming the same chat and
//! snapshot version. Each line is written and flushed before the Update
//! goes on, so a process killed at any instant leaves at worst a `maybe`
//! line without its settlement: an Update whose commit may or may not have
//! reached the database, for the oracle to settle from the stored
//! snapshot versions. (A line is flushed to the kernel, not synced to
//! disk: the process is what dies, not the machine.)
//!
//! The lines carry the oracle's inputs (`model::oracle::CommittedUpdate`,
//! `CreatedChat`) in a serialisable form; notifications are kept as the
//! channel and payload text they go out as.

use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;

use chatstate::model::NewChat;
use chatstate::{
    Call, ChatChange, ChatId, CommitObserver, CommitReport, CommitState, Created, MessageId,
    Notification, Outcome, Snapshot, Timestamp,
};
use serde::{Deserialize, Serialize};

/// One line of a record file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub(crate) enum Line {
    /// A chat was created (its creation committed).
    #[serde(rename = "created")]
    Created {
        /// What it was created from.
        chat: NewChat,
        /// The ids its messages got.
        ids: Vec<MessageId>,
        /// What its creation published with the commit.
        published: Vec<Note>,
    },
    /// An Update is about to send its commit: what it commits if it does.
    /// The first change is the handle's own chat, whose snapshot version
    /// names the Update in its settling line.
    #[serde(rename = "maybe")]
    Maybe {
        /// One per chat the Update changed.
        changes: Vec<Change>,
    },
    /// The Update of `chat` at `snapshot` committed.
    #[serde(rename = "committed")]
    Committed {
        /// Its chat.
        chat: ChatId,
        /// Its snapshot version.
        snapshot: i64,
    },
    /// It did not commit: nothing of it is durable.
    #[serde(rename = "not committed")]
    NotCommitted {
        /// Its chat.
        chat: ChatId,
        /// Its snapshot version.
        snapshot: i64,
        /// Why.
        error: String,
    },
    /// Whether it committed is unknown (the connection was lost after the
    /// commit was sent).
    #[serde(rename = "unknown")]
    Unknown {
        /// Its chat.
        chat: ChatId,
        /// Its snapshot version.
        snapshot: i64,
        /// Why.
        error: String,
    },
}

/// What one Update did to one chat (`chatstate::ChatChange`, serialisable).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Change {
    /// The chat.
    pub(crate) chat: ChatId,
    /// The snapshot version the Update allocated.
    pub(crate) snapshot: i64,
    /// Store time of the transaction.
    pub(crate) now: Timestamp,
    /// Lease freshness when the row was locked.
    pub(crate) lease_fresh: bool,
    /// The accepted transitions with their fences.
    pub(crate) calls: Vec<Call>,
    /// Their outcomes.
    pub(crate) outcomes: Vec<Outcome>,
    /// The snapshot at the end of the callback.
    pub(crate) end: Snapshot,
    /// What it publishes for this chat if it commits.
    pub(crate) published: Vec<Note>,
}

impl From<&ChatChange> for Change {
    fn from(c: &ChatChange) -> Self {
        Change {
            chat: c.chat_id,
            snapshot: c.snapshot_version,
            now: c.now,
            lease_fresh: c.lease_fresh,
            calls: c.calls.clone(),
            outcomes: c.outcomes.clone(),
            end: c.end.clone(),
            published: c.notifications.iter().map(Note::from).collect(),
        }
    }
}

/// A notification as it goes out: channel and payload text.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Note {
    /// The channel.
    pub(crate) channel: String,
    /// The payload (JSON text).
    pub(crate) payload: String,
}

impl From<&Notification> for Note {
    fn from(n: &Notification) -> Self {
        Note {
            channel: n.channel(),
            payload: String::from_utf8_lossy(&n.payload()).into_owned(),
        }
    }
}

/// Writes a record file; see the module docs.
#[derive(Debug)]
pub(crate) struct Recorder {
    file: Mutex<File>,
}

impl Recorder {
    /// Creates (or truncates) the record file at `path`.
    pub(crate) fn create(path: &Path) -> std::io::Result<Recorder> {
        Ok(Recorder {
            file: Mutex::new(File::create(path)?),
        })
    }

    /// Records a created chat: `new` as given to `create_chat` with
    /// `Notify::InTransaction`, `created` as it returned. The creation
    /// published what the machine handed the store to send with the commit.
    #[allow(
        dead_code,
        reason = "the binary creates no chats; the process test, which shares this module, does"
    )]
    pub(crate) fn created(&self, new: &NewChat, created: &Created) {
        let published = chatstate::model::after_create(&created.row)
            .iter()
            .map(Note::from)
            .collect();
        self.write(&Line::Created {
            chat: new.clone(),
            ids: created.messages.clone(),
            published,
        });
    }

    /// Writes one line and flushes it: once this returns, the line
    /// survives the process being killed.
    fn write(&self, line: &Line) {
        let mut text = serde_json::to_string(line).expect("record lines serialise");
        text.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        // An observer must not panic; a record that cannot be written shows
        // up as a gap in the oracle's check, which fails the run.
        if let Err(e) = file.write_all(text.as_bytes()).and_then(|()| file.flush()) {
            eprintln!("error: cannot write the record file: {e}");
        }
    }
}

impl CommitObserver for Recorder {
    fn before_commit(&self, changes: &[ChatChange]) {
        self.write(&Line::Maybe {
            changes: changes.iter().map(Change::from).collect(),
        });
    }

    fn commit_ended(&self, report: &CommitReport<'_>) {
        let Some(first) = report.changes.first() else {
            return;
        };
        let (chat, snapshot) = (first.chat_id, first.snapshot_version);
        let line = match report.result {
            Ok(()) => Line::Committed { chat, snapshot },
            Err(e) => match e.commit_state() {
                CommitState::Committed => Line::Committed { chat, snapshot },
                CommitState::NotCommitted => Line::NotCommitted {
                    chat,
                    snapshot,
                    error: e.to_string(),
                },
                // Unknown, or a state this code does not know yet: the
                // oracle settles it from the stored snapshot versions.
                _ => Line::Unknown {
                    chat,
                    snapshot,
                    error: e.to_string(),
                },
            },
        };
        self.write(&line);
    }
}

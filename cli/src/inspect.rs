//! `chatstate inspect CHAT` and `chatstate chats`: read-only views of the
//! chats in a Postgres database (`--database-url` or `DATABASE_URL`),
//! through `chatstate_store_pg::inspect`. Text for a person by default,
//! one JSON document with `--json`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use chatstate_model::{ChatId, ChatStatus, ExecutionState, Options};
use chatstate_store_pg::inspect::{
    ChatFilter, ChatInspection, ChatSummary, LeaseFreshness, LeaseInfo, inspect_chat, list_chats,
};

use crate::pg;
use crate::show::{age, content, flat, utc};

/// Where the database is and how to judge leases, shared by both commands.
#[derive(Debug, clap::Args)]
pub(crate) struct Common {
    /// The database (else `DATABASE_URL`). Required.
    #[arg(long)]
    database_url: Option<String>,
    /// A lease whose heartbeat is older than this many seconds is stale
    /// (the workers' `Options::heartbeat_stale`).
    #[arg(long, default_value_t = Options::default().heartbeat_stale.as_secs_f64())]
    heartbeat_stale_secs: f64,
    /// Print JSON for tools instead of text.
    #[arg(long)]
    json: bool,
}

/// Arguments of `chatstate inspect`.
#[derive(Debug, clap::Args)]
pub(crate) struct InspectArgs {
    /// The chat's id (a UUID).
    chat: uuid::Uuid,
    /// How many of the last history rows to show.
    #[arg(long, default_value_t = 10)]
    history: usize,
    #[command(flatten)]
    common: Common,
}

/// Arguments of `chatstate chats`.
#[derive(Debug, clap::Args)]
pub(crate) struct ChatsArgs {
    /// Only these execution states (comma-separated: R0,R1,A0,Invalid...).
    #[arg(long, value_delimiter = ',', value_parser = parse_state)]
    state: Vec<ExecutionState>,
    /// Only these stored statuses (comma-separated: running,waiting...).
    #[arg(long, value_delimiter = ',')]
    status: Vec<String>,
    /// Only archived (`true`) or unarchived (`false`) chats.
    #[arg(long)]
    archived: Option<bool>,
    /// Only runnable chats whose lease is stale or missing (those a
    /// worker's sweep would claim).
    #[arg(long)]
    stale_lease: bool,
    /// At most this many, oldest first.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    #[command(flatten)]
    common: Common,
}

fn parse_state(s: &str) -> Result<ExecutionState, String> {
    match ExecutionState::parse(s) {
        Some(ExecutionState::N) => Err("N is the state of a chat that does not exist".to_owned()),
        Some(state) => Ok(state),
        None => {
            let known: Vec<&str> = ExecutionState::ALL[1..]
                .iter()
                .map(|s| s.as_str())
                .collect();
            Err(format!("unknown state {s:?}; one of {}", known.join(", ")))
        }
    }
}

impl Common {
    fn options(&self) -> anyhow::Result<Options> {
        let stale = Duration::try_from_secs_f64(self.heartbeat_stale_secs)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--heartbeat-stale-secs must be a positive number of seconds")?;
        Ok(Options {
            heartbeat_stale: stale,
            ..Options::default()
        })
    }

    /// Runs `query` on a connection to the named database, then prints what
    /// it returns.
    fn run<F>(&self, query: F) -> anyhow::Result<ExitCode>
    where
        F: AsyncFnOnce(
            &chatstate_store_pg::PgStore,
            &Options,
        ) -> anyhow::Result<(String, ExitCode)>,
    {
        let options = self.options()?;
        let url = pg::url(self.database_url.as_deref())
            .context("this command needs --database-url or DATABASE_URL")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let (text, code) = runtime.block_on(async {
            let store = pg::connect_only(&url).await?;
            query(&store, &options).await
        })?;
        std::io::stdout()
            .lock()
            .write_all(text.as_bytes())
            .context("writing the output")?;
        Ok(code)
    }
}

pub(crate) fn run_inspect(args: &InspectArgs) -> anyhow::Result<ExitCode> {
    let chat = ChatId(args.chat);
    let json = args.common.json;
    args.common.run(async |store, options| {
        let found = inspect_chat(store.pool(), chat, args.history, options)
            .await
            .map_err(flat("inspecting the chat"))?;
        match found {
            Some(inspection) if json => Ok((json_line(&inspection)?, ExitCode::SUCCESS)),
            Some(inspection) => Ok((inspection_text(&inspection, options), ExitCode::SUCCESS)),
            None => {
                eprintln!("chat {} not found", chat.0);
                let text = if json {
                    "null\n".to_owned()
                } else {
                    String::new()
                };
                Ok((text, ExitCode::from(1)))
            }
        }
    })
}

pub(crate) fn run_chats(args: &ChatsArgs) -> anyhow::Result<ExitCode> {
    let filter = ChatFilter {
        states: args.state.clone(),
        statuses: args.status.iter().map(|s| ChatStatus::parse(s)).collect(),
        archived: args.archived,
        stale_lease: args.stale_lease,
        limit: args.limit,
    };
    let json = args.common.json;
    args.common.run(async |store, options| {
        let chats = list_chats(store.pool(), &filter, options)
            .await
            .map_err(flat("listing chats"))?;
        let text = if json {
            json_line(&chats)?
        } else {
            chats_text(&chats)
        };
        Ok((text, ExitCode::SUCCESS))
    })
}

fn json_line(value: &impl serde::Serialize) -> anyhow::Result<String> {
    let mut text = serde_json::to_string(value).context("encoding JSON")?;
    text.push('\n');
    Ok(text)
}

fn lease_text(lease: &LeaseInfo) -> String {
    let Some(owner) = lease.owner else {
        return "none".to_owned();
    };
    let heartbeat = match lease.heartbeat_age_us {
        Some(us) => format!("heartbeat {} ago", age(us)),
        None => "no heartbeat".to_owned(),
    };
    format!(
        "worker {} runner {}, {heartbeat}, {}",
        owner.worker_id.0,
        owner.runner_id.0,
        freshness(lease.freshness)
    )
}

fn freshness(f: LeaseFreshness) -> &'static str {
    match f {
        LeaseFreshness::Unowned => "unowned",
        LeaseFreshness::Fresh => "fresh",
        LeaseFreshness::Stale => "stale",
        LeaseFreshness::Missing => "missing",
        _ => "unknown",
    }
}

fn or_none<T>(value: Option<T>, show: impl FnOnce(T) -> String) -> String {
    value.map_or_else(|| "none".to_owned(), show)
}

fn inspection_text(c: &ChatInspection, options: &Options) -> String {
    let row = &c.row;
    let v = &row.versions;
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "chat {}", row.id.0);
    let _ = writeln!(
        w,
        "  state     {} (status {}, {}archived)",
        c.state,
        row.status,
        if row.archived { "" } else { "not " }
    );
    let _ = writeln!(w, "  title     {:?}", c.metadata.title);
    if !c.metadata.labels.is_empty() {
        let labels: Vec<String> = c
            .metadata
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(w, "  labels    {}", labels.join(", "));
    }
    let _ = writeln!(w, "  owner id  {}", row.owner_id);
    let _ = writeln!(w, "  lease     {}", lease_text(&c.lease));
    let _ = writeln!(
        w,
        "  worker    {} (stale after {})",
        if c.needs_worker {
            "needed: runnable and the lease is not fresh"
        } else if c.state.is_runnable() {
            "not needed: the lease is fresh"
        } else {
            "not needed: not runnable"
        },
        age(i64::try_from(options.heartbeat_stale.as_micros()).unwrap_or(i64::MAX))
    );
    let _ = writeln!(
        w,
        "  versions  snapshot {}, history {}, queue {}, retry state {}",
        v.snapshot, v.history, v.queue, v.retry_state
    );
    let _ = writeln!(w, "  attempts  {}", row.generation_attempt);
    let _ = writeln!(
        w,
        "  error     {}",
        or_none(row.last_error.as_ref(), |e| e.as_str().to_owned())
    );
    let _ = writeln!(
        w,
        "  retry     {}",
        or_none(row.retry_state.as_ref(), |e| e.as_str().to_owned())
    );
    let _ = writeln!(
        w,
        "  deadline  {}",
        or_none(row.requires_action_deadline_at, utc)
    );
    let _ = writeln!(
        w,
        "  compact   {}",
        or_none(row.compaction_requested_at, |t| format!(
            "requested {}",
            utc(t)
        ))
    );
    let tools: Vec<&str> = row.dynamic_tools.iter().map(String::as_str).collect();
    let tools = if tools.is_empty() {
        "none".to_owned()
    } else {
        tools.join(", ")
    };
    let _ = writeln!(w, "  tools     {tools}");
    let _ = writeln!(
        w,
        "  times     created {}, updated {}, store time {}",
        utc(c.created_at),
        utc(c.updated_at),
        utc(c.store_time)
    );
    let _ = writeln!(w, "queue ({}):", c.queue.len());
    for q in &c.queue {
        let _ = writeln!(w, "  q{:<6} {}", q.id.0, content(&q.content, 60));
    }
    let _ = writeln!(
        w,
        "history ({} rows, {} active; the last {}):",
        c.history_rows,
        c.active_history_rows,
        c.recent_history.len()
    );
    for m in &c.recent_history {
        let _ = writeln!(
            w,
            "  #{:<6} rev {:<4} {:<9} {}{}",
            m.id.0,
            m.revision,
            m.role.as_str(),
            if m.deleted { "(deleted) " } else { "" },
            content(&m.content, 60)
        );
    }
    let _ = writeln!(w, "may do next (matrix row {}):", c.state);
    for n in &c.next {
        let to: Vec<&str> = n.to.iter().map(|s| s.as_str()).collect();
        let _ = writeln!(w, "  {:<24} -> {}", n.transition.as_str(), to.join(", "));
    }
    out
}

fn chats_text(chats: &[ChatSummary]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<36}  {:<7}  {:<15}  {:<8}  {:>5}  {:<9}  {:>14}  {:>8}  updated",
        "chat", "state", "status", "archived", "queue", "lease", "heartbeat age", "snapshot"
    );
    for c in chats {
        let _ = writeln!(
            out,
            "{:<36}  {:<7}  {:<15}  {:<8}  {:>5}  {:<9}  {:>14}  {:>8}  {}",
            c.id.0,
            c.state.as_str(),
            c.status.as_str(),
            c.archived,
            c.queue_len,
            freshness(c.lease.freshness),
            c.lease.heartbeat_age_us.map_or_else(|| "-".to_owned(), age),
            c.snapshot_version,
            utc(c.updated_at)
        );
    }
    let _ = writeln!(
        out,
        "{} chat{}",
        chats.len(),
        if chats.len() == 1 { "" } else { "s" }
    );
    out
}

//! `chatstate migrate status|up|sql`: the schema migrations of a named
//! database (`--database-url` or `DATABASE_URL`; never a throwaway
//! cluster, which would be migrated already and gone at exit).
//!
//! `status` exits 1 unless the schema is exactly this binary's, so a
//! deploy script can gate on it; `up` applies what is pending; `sql`
//! prints what `up` would run, each migration recorded as applied, for
//! teams that apply DDL through their own tooling.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use chatstate_store_pg::PgStore;
use chatstate_store_pg::migrations::{
    self, MigrationInfo, MigrationState, MigrationStatus, PendingMigration,
};
use serde::Serialize;

use crate::pg;
use crate::show::{flat, utc};

/// Arguments of `chatstate migrate`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    action: Action,
    /// The database to migrate (else `DATABASE_URL`). Required.
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Print JSON for tools instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// The embedded migrations, applied or pending, and any the database
    /// holds that this binary does not know; exits 1 unless the schema is
    /// exactly this binary's.
    Status,
    /// Apply the pending migrations.
    Up,
    /// Print the SQL of the pending migrations, each recorded as applied
    /// (`psql -v ON_ERROR_STOP=1 -f`), without running it.
    Sql,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let url = pg::url(args.database_url.as_deref()).context(
        "chatstate migrate needs --database-url or DATABASE_URL \
         (it never starts a throwaway cluster)",
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (text, code) = runtime.block_on(async {
        let store = pg::connect_only(&url).await?;
        match args.action {
            Action::Status => status(&store, args.json).await,
            Action::Up => up(&store, args.json).await,
            Action::Sql => sql(&store, args.json).await,
        }
    })?;
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("writing the output")?;
    Ok(code)
}

async fn read_status(store: &PgStore) -> anyhow::Result<MigrationStatus> {
    migrations::migration_status(store.pool())
        .await
        .map_err(flat("reading the migration status"))
}

async fn status(store: &PgStore, json: bool) -> anyhow::Result<(String, ExitCode)> {
    let status = read_status(store).await?;
    let code = if status.is_current() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    };
    let text = if json {
        json_line(&StatusJson::of(&status))?
    } else {
        status_text(&status)
    };
    Ok((text, code))
}

async fn up(store: &PgStore, json: bool) -> anyhow::Result<(String, ExitCode)> {
    let before = read_status(store).await?;
    chatstate_store_pg::migrate(store.pool())
        .await
        .map_err(flat("migrating the database"))?;
    let after = read_status(store).await?;
    let applied: Vec<i64> = before.pending().map(|m| m.version).collect();
    let text = if json {
        #[derive(Serialize)]
        struct Up<'a> {
            applied: &'a [i64],
            status: StatusJson<'a>,
        }
        json_line(&Up {
            applied: &applied,
            status: StatusJson::of(&after),
        })?
    } else {
        let mut out = match applied.as_slice() {
            [] => "nothing to apply: the schema is current\n".to_owned(),
            versions => format!("applied {}\n", list(versions)),
        };
        out.push_str(&status_text(&after));
        out
    };
    Ok((text, ExitCode::SUCCESS))
}

async fn sql(store: &PgStore, json: bool) -> anyhow::Result<(String, ExitCode)> {
    let pending = migrations::pending_sql(store.pool())
        .await
        .map_err(flat("reading the pending migrations"))?;
    let text = if json {
        #[derive(Serialize)]
        struct Sql<'a> {
            #[serde(flatten)]
            migration: &'a PendingMigration,
            record_sql: String,
        }
        let items: Vec<Sql<'_>> = pending
            .iter()
            .map(|migration| Sql {
                migration,
                record_sql: migration.record_sql(),
            })
            .collect();
        json_line(&items)?
    } else {
        migrations::pending_script(&pending)
    };
    Ok((text, ExitCode::SUCCESS))
}

/// The status as JSON: the library's rows plus the verdict.
#[derive(Serialize)]
struct StatusJson<'a> {
    current: bool,
    #[serde(flatten)]
    status: &'a MigrationStatus,
    refusal: Option<String>,
}

impl<'a> StatusJson<'a> {
    fn of(status: &'a MigrationStatus) -> Self {
        StatusJson {
            current: status.is_current(),
            status,
            refusal: status.refusal().map(|e| e.to_string()),
        }
    }
}

fn json_line(value: &impl Serialize) -> anyhow::Result<String> {
    let mut text = serde_json::to_string(value).context("encoding JSON")?;
    text.push('\n');
    Ok(text)
}

fn list(versions: &[i64]) -> String {
    let words: Vec<String> = versions.iter().map(i64::to_string).collect();
    format!(
        "migration{} {}",
        if versions.len() == 1 { "" } else { "s" },
        words.join(", ")
    )
}

fn state_text(m: &MigrationInfo) -> String {
    match &m.state {
        MigrationState::Pending => "pending".to_owned(),
        MigrationState::Applied {
            installed_on,
            checksum_matches: true,
        } => format!("applied {}", utc(*installed_on)),
        MigrationState::Applied {
            installed_on,
            checksum_matches: false,
        } => format!(
            "applied {} FROM DIFFERENT SQL (checksum mismatch)",
            utc(*installed_on)
        ),
        MigrationState::Failed { installed_on } => {
            format!("FAILED {} (partially applied)", utc(*installed_on))
        }
        // A state a newer library reports.
        other => format!("{other:?}"),
    }
}

fn status_text(status: &MigrationStatus) -> String {
    let mut out = String::new();
    for m in &status.migrations {
        let _ = writeln!(
            out,
            "{:>6}  {:<28}  {}",
            m.version,
            m.description,
            state_text(m)
        );
    }
    for u in &status.unknown {
        let _ = writeln!(
            out,
            "{:>6}  {:<28}  applied {}, UNKNOWN to this binary{}",
            u.version,
            u.description,
            utc(u.installed_on),
            if u.success { "" } else { " (failed)" }
        );
    }
    let pending: Vec<i64> = status.pending().map(|m| m.version).collect();
    let verdict = if let Some(refusal) = status.refusal() {
        format!("refused: {refusal}")
    } else if status.is_current() {
        "current: the schema is this binary's".to_owned()
    } else {
        format!("pending: {} (run `chatstate migrate up`)", list(&pending))
    };
    out.push_str(&verdict);
    out.push('\n');
    out
}

//! Migration tooling: what the database has applied compared with the
//! migrations this binary embeds, and the SQL of the pending ones for
//! teams that apply DDL with their own tooling.
//!
//! [`crate::migrate`] applies the migrations; this module only reads. The
//! bookkeeping is sqlx's: the `_sqlx_migrations` table, one row per applied
//! version with the checksum (SHA-384) of the SQL that ran. The SQL that
//! [`pending_script`] prints records each migration there too, so that a
//! later [`crate::migrate`] (or `chatstate migrate up`) sees it as applied
//! and does not run it again.

use chatstate::StoreError;
use chatstate_model::Timestamp;
use serde::Serialize;
use sqlx::PgPool;
use sqlx::migrate::Migration;

use crate::decode::get;
use crate::error::store_error;

/// The table in which sqlx records applied migrations.
pub const MIGRATIONS_TABLE: &str = "_sqlx_migrations";

/// The migrations this binary embeds, in version order (up migrations
/// only: the embedded ones are all simple, never reversible).
fn embedded() -> impl Iterator<Item = &'static Migration> {
    crate::embedded::MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
}

/// Why the migration tooling could not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// Reading the database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The database holds migrations this binary does not embed: it was
    /// migrated by a newer binary. Nothing can be applied by this one.
    #[error("the database schema is at migration {database}, newer than this binary's {binary}")]
    SchemaNewerThanBinary {
        /// The highest migration version applied to the database.
        database: i64,
        /// The highest migration version this binary embeds.
        binary: i64,
    },
    /// The database holds a migration this binary does not embed, older
    /// than its newest: the two come from different histories.
    #[error("migration {version} is applied to the database but unknown to this binary")]
    UnknownMigration {
        /// The version.
        version: i64,
    },
    /// A migration applied to the database is not the SQL this binary
    /// embeds under the same version (its checksum differs).
    #[error("migration {version} was applied with different SQL than this binary embeds")]
    ChecksumMismatch {
        /// The version.
        version: i64,
    },
    /// A migration is recorded as failed: it may be partially applied and
    /// needs repair by hand before anything else is applied.
    #[error("migration {version} is recorded as failed (partially applied)")]
    Failed {
        /// The version.
        version: i64,
    },
}

/// Where one embedded migration stands in the database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
#[non_exhaustive]
pub enum MigrationState {
    /// Not applied yet.
    Pending,
    /// Applied.
    Applied {
        /// When, by the database's clock.
        installed_on: Timestamp,
        /// True when the SQL applied is the SQL this binary embeds.
        checksum_matches: bool,
    },
    /// Recorded as failed: possibly partially applied.
    Failed {
        /// When it was attempted.
        installed_on: Timestamp,
    },
}

/// One embedded migration and its state in the database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MigrationInfo {
    /// The version (the number the file name starts with).
    pub version: i64,
    /// The description (the rest of the file name).
    pub description: String,
    /// Its state in the database.
    #[serde(flatten)]
    pub state: MigrationState,
}

/// A migration applied to the database that this binary does not embed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct UnknownMigration {
    /// The version.
    pub version: i64,
    /// The description the newer binary recorded.
    pub description: String,
    /// False when it is recorded as failed.
    pub success: bool,
    /// When it was applied.
    pub installed_on: Timestamp,
}

/// The migrations of this binary compared with the database's records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MigrationStatus {
    /// Every embedded migration, in version order.
    pub migrations: Vec<MigrationInfo>,
    /// Versions applied to the database that this binary does not know, in
    /// version order: the database is newer than the binary, and
    /// [`crate::migrate`] refuses it.
    pub unknown: Vec<UnknownMigration>,
}

impl MigrationStatus {
    /// The embedded migrations not applied yet.
    pub fn pending(&self) -> impl Iterator<Item = &MigrationInfo> {
        self.migrations
            .iter()
            .filter(|m| m.state == MigrationState::Pending)
    }

    /// True when every embedded migration is applied as embedded and the
    /// database holds nothing else: the schema is this binary's.
    pub fn is_current(&self) -> bool {
        self.unknown.is_empty()
            && self.migrations.iter().all(|m| {
                matches!(
                    m.state,
                    MigrationState::Applied {
                        checksum_matches: true,
                        ..
                    }
                )
            })
    }

    /// Why [`crate::migrate`] would refuse this database, if it would:
    /// a newer schema first, then a failed migration, then any other
    /// unknown one, then a checksum mismatch.
    pub fn refusal(&self) -> Option<MigrationError> {
        let binary = self.migrations.iter().map(|m| m.version).max().unwrap_or(0);
        if let Some(newest) = self.unknown.iter().map(|u| u.version).max()
            && newest > binary
        {
            return Some(MigrationError::SchemaNewerThanBinary {
                database: newest,
                binary,
            });
        }
        let failed = self.migrations.iter().find_map(|m| match m.state {
            MigrationState::Failed { .. } => Some(m.version),
            _ => None,
        });
        let failed = failed.or_else(|| self.unknown.iter().find(|u| !u.success).map(|u| u.version));
        if let Some(version) = failed {
            return Some(MigrationError::Failed { version });
        }
        if let Some(unknown) = self.unknown.first() {
            return Some(MigrationError::UnknownMigration {
                version: unknown.version,
            });
        }
        self.migrations.iter().find_map(|m| match m.state {
            MigrationState::Applied {
                checksum_matches: false,
                ..
            } => Some(MigrationError::ChecksumMismatch { version: m.version }),
            _ => None,
        })
    }
}

/// A row of `_sqlx_migrations`.
struct Applied {
    version: i64,
    description: String,
    success: bool,
    checksum: Vec<u8>,
    installed_on: Timestamp,
}

/// Reads the database's migration records (none before the first
/// migration), in one read-only transaction.
async fn applied(pool: &PgPool) -> Result<Vec<Applied>, StoreError> {
    const CONTEXT: &str = "read the migration records";
    let mut tx = pool
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|e| store_error(CONTEXT, e))?;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| store_error(CONTEXT, e))?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "SELECT version, description, success, checksum, \
                (extract(epoch FROM installed_on) * 1000000)::bigint AS installed_us \
           FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| store_error(CONTEXT, e))?;
    // Read only: ending it either way changes nothing.
    let _ = tx.rollback().await;
    rows.iter()
        .map(|r| {
            Ok(Applied {
                version: get(r, CONTEXT, "version")?,
                description: get(r, CONTEXT, "description")?,
                success: get(r, CONTEXT, "success")?,
                checksum: get(r, CONTEXT, "checksum")?,
                installed_on: Timestamp(get(r, CONTEXT, "installed_us")?),
            })
        })
        .collect()
}

/// Compares the embedded migrations with the database's records. It
/// reads only, and answers for any database: one never migrated (every
/// migration pending), one migrated by a newer binary (its versions in
/// [`MigrationStatus::unknown`]), one with a failed or altered migration.
pub async fn migration_status(pool: &PgPool) -> Result<MigrationStatus, StoreError> {
    let applied = applied(pool).await?;
    let migrations = embedded()
        .map(|m| {
            let record = applied.iter().find(|a| a.version == m.version);
            let state = match record {
                None => MigrationState::Pending,
                Some(a) if !a.success => MigrationState::Failed {
                    installed_on: a.installed_on,
                },
                Some(a) => MigrationState::Applied {
                    installed_on: a.installed_on,
                    checksum_matches: a.checksum == *m.checksum,
                },
            };
            MigrationInfo {
                version: m.version,
                description: m.description.to_string(),
                state,
            }
        })
        .collect();
    let unknown = applied
        .into_iter()
        .filter(|a| !embedded().any(|m| m.version == a.version))
        .map(|a| UnknownMigration {
            version: a.version,
            description: a.description,
            success: a.success,
            installed_on: a.installed_on,
        })
        .collect();
    Ok(MigrationStatus {
        migrations,
        unknown,
    })
}

/// An embedded migration the database has not applied, with its SQL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PendingMigration {
    /// The version.
    pub version: i64,
    /// The description.
    pub description: String,
    /// The migration's SQL, exactly as embedded (and checksummed).
    pub sql: String,
    /// True when the migration must not run inside a transaction.
    pub no_transaction: bool,
    /// The SHA-384 checksum sqlx records for it.
    #[serde(skip)]
    pub checksum: Vec<u8>,
}

impl PendingMigration {
    /// The statement that records this migration as applied in
    /// `_sqlx_migrations` (run it in the same transaction as [`Self::sql`]),
    /// so that [`crate::migrate`] does not apply it again. Its
    /// `execution_time` is -1, as sqlx writes for a migration it did not
    /// time itself.
    pub fn record_sql(&self) -> String {
        let checksum: String = self.checksum.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "INSERT INTO {MIGRATIONS_TABLE} (version, description, success, checksum, execution_time)\n\
             VALUES ({}, '{}', true, '\\x{checksum}'::bytea, -1);",
            self.version,
            self.description.replace('\'', "''"),
        )
    }
}

/// The statement that creates sqlx's bookkeeping table if it is missing,
/// exactly as sqlx creates it.
pub const CREATE_MIGRATIONS_TABLE: &str = "\
CREATE TABLE IF NOT EXISTS _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
    success BOOLEAN NOT NULL,
    checksum BYTEA NOT NULL,
    execution_time BIGINT NOT NULL
);";

/// The embedded migrations the database has not applied, in version
/// order, with their SQL. Refused, like [`crate::migrate`] would refuse
/// it, for a database newer than this binary, with a failed migration or
/// with one applied from different SQL.
pub async fn pending_sql(pool: &PgPool) -> Result<Vec<PendingMigration>, MigrationError> {
    let status = migration_status(pool).await?;
    if let Some(refusal) = status.refusal() {
        return Err(refusal);
    }
    Ok(embedded()
        .filter(|m| status.pending().any(|p| p.version == m.version))
        .map(|m| PendingMigration {
            version: m.version,
            description: m.description.to_string(),
            sql: m.sql.as_str().to_owned(),
            no_transaction: m.no_tx,
            checksum: m.checksum.to_vec(),
        })
        .collect())
}

/// One script that applies `pending` and records each as applied, for
/// `psql -v ON_ERROR_STOP=1 -f` or any tool that runs SQL text: the
/// bookkeeping table first, then every migration in a transaction of its
/// own (unless it must run outside one) together with its record.
pub fn pending_script(pending: &[PendingMigration]) -> String {
    let mut out = String::new();
    out.push_str("-- chatstate schema migrations, recorded in _sqlx_migrations as applied.\n");
    if pending.is_empty() {
        out.push_str("-- Nothing is pending.\n");
        return out;
    }
    out.push_str(CREATE_MIGRATIONS_TABLE);
    out.push('\n');
    for m in pending {
        out.push_str(&format!(
            "\n-- Migration {}: {}\n",
            m.version, m.description
        ));
        if !m.no_transaction {
            out.push_str("BEGIN;\n");
        }
        out.push_str(m.sql.trim_end());
        out.push('\n');
        out.push_str(&m.record_sql());
        out.push('\n');
        if !m.no_transaction {
            out.push_str("COMMIT;\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(description: &str, no_transaction: bool) -> PendingMigration {
        PendingMigration {
            version: 7,
            description: description.to_owned(),
            sql: "CREATE TABLE t (x int);\n\n".to_owned(),
            no_transaction,
            checksum: vec![0x00, 0xab, 0x10],
        }
    }

    #[test]
    fn records_quote_the_description_and_spell_the_checksum_in_hex() {
        assert_eq!(
            pending("it's new", false).record_sql(),
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)\n\
             VALUES (7, 'it''s new', true, '\\x00ab10'::bytea, -1);"
        );
    }

    #[test]
    fn scripts_wrap_each_migration_unless_it_runs_outside_a_transaction() {
        let wrapped = pending_script(&[pending("a", false)]);
        assert!(wrapped.contains("BEGIN;\nCREATE TABLE t (x int);\nINSERT INTO"));
        assert!(wrapped.ends_with("-1);\nCOMMIT;\n"), "{wrapped}");
        let bare = pending_script(&[pending("a", true)]);
        assert!(
            !bare.contains("BEGIN;") && !bare.contains("COMMIT;"),
            "{bare}"
        );
        assert!(!pending_script(&[]).contains("CREATE TABLE"));
    }

    #[test]
    fn the_embedded_migrations_are_numbered_from_one_without_gaps() {
        let versions: Vec<i64> = embedded().map(|m| m.version).collect();
        let expected: Vec<i64> = (1..=versions.len() as i64).collect();
        assert_eq!(versions, expected);
    }
}

//! The schema migrations this binary embeds (`store-pg/migrations/`).
//!
//! They are built at run time from the files' text, included at compile
//! time, rather than by sqlx's `migrate!` macro: the macro needs sqlx's
//! `macros` feature, which compiles sqlx and its database driver a second
//! time for the procedural macro. The result is what the macro made:
//! version and description read from the file name the way sqlx reads
//! them (`<version>_<description>.sql`, underscores in the description
//! read as spaces), the checksum (SHA-384 of the text) computed by sqlx
//! itself, and sqlx's default migrator (table `_sqlx_migrations`, advisory
//! lock), so databases migrated by earlier binaries see the same
//! migrations applied. The tests pin both.

use std::borrow::Cow;
use std::sync::LazyLock;

use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

/// One migration file: its name and its text.
macro_rules! migration {
    ($file:literal) => {
        ($file, include_str!(concat!("../migrations/", $file)))
    };
}

/// Every file of `store-pg/migrations/`, in version order. Append-only:
/// an applied migration's text never changes (its checksum is recorded).
const FILES: [(&str, &str); 2] = [
    migration!("0001_chat_execution_state.sql"),
    migration!("0002_chat_snapshot_cache.sql"),
];

/// The migrator of the embedded migrations.
pub(crate) static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    Migrator::with_migrations(FILES.iter().map(|&(f, sql)| parse(f, sql)).collect())
});

/// The migration of one file, named and read as sqlx's resolver does.
fn parse(file: &'static str, sql: &'static str) -> Migration {
    let (version, rest) = file
        .split_once('_')
        .expect("a migration file is named <version>_<description>.sql");
    let version = version
        .parse()
        .expect("a migration file name starts with its version");
    let migration_type = MigrationType::from_filename(rest);
    let description = rest
        .trim_end_matches(migration_type.suffix())
        .replace('_', " ");
    let no_tx = sql.starts_with("-- no-transaction");
    Migration::new(
        version,
        Cow::Owned(description),
        migration_type,
        sql.into_sql_str(),
        no_tx,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// What `sqlx::migrate!("./migrations")` embedded, and what every
    /// database migrated so far recorded in `_sqlx_migrations`: a change
    /// here makes those databases refuse this binary (checksum mismatch).
    #[test]
    fn the_embedded_migrations_are_those_databases_recorded() {
        let expected = [
            (
                1,
                "chat execution state",
                "dbc8c5ccbc0ef25c11a0beb8b23e626d4842d64608285fd2286b9aaa6eca8eb2\
                 fdd29f9af75394c5cbb08ab719917162",
            ),
            (
                2,
                "chat snapshot cache",
                "1cfed6ed219adb441cf5c74b6abbb30de8d15517a6f8bd5f528c2eea0f59d18f\
                 3b2dc06fd9a2df6ba1984a24438bb699",
            ),
        ];
        let embedded: Vec<(i64, &str, String)> = MIGRATOR
            .iter()
            .map(|m| (m.version, &*m.description, hex(&m.checksum)))
            .collect();
        let expected: Vec<(i64, &str, String)> = expected
            .iter()
            .map(|&(v, d, c)| (v, d, c.to_owned()))
            .collect();
        assert_eq!(embedded, expected);
        for m in MIGRATOR.iter() {
            assert_eq!(m.migration_type, MigrationType::Simple, "{}", m.version);
            assert!(!m.no_tx, "{}", m.version);
        }
        assert_eq!(MIGRATOR.table_name, "_sqlx_migrations");
        assert!(MIGRATOR.locking);
        assert!(!MIGRATOR.ignore_missing);
    }

    /// Every file of the migrations directory is embedded, and nothing else.
    #[test]
    fn every_migration_file_is_embedded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let embedded: Vec<&str> = FILES.iter().map(|(f, _)| *f).collect();
        assert_eq!(on_disk, embedded);
    }
}

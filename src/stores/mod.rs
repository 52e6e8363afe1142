//! Store adapters for real databases, over a generic key/value table.
//!
//! | adapter | feature | database |
//! | --- | --- | --- |
//! | `SqliteStore` | `sqlite` | embedded SQLite (bundled, nothing to install) |
//! | `PostgresStore` | `postgres` | a PostgreSQL server (or one speaking its protocol) |
//!
//! Both keep one row per key in a table they create if it is missing:
//!
//! | column | SQLite | PostgreSQL | meaning |
//! | --- | --- | --- | --- |
//! | `key` | `BLOB PRIMARY KEY` | `BYTEA PRIMARY KEY` | the key, through a key [`Codec`] |
//! | `value` | `BLOB` | `BYTEA` | the value through a value [`Codec`]; `NULL` once deleted |
//! | `version` | `INTEGER NOT NULL` | `BIGINT NOT NULL` | version of the last write applied |
//! | `deleted` | `INTEGER NOT NULL DEFAULT 0` | `BOOLEAN NOT NULL DEFAULT FALSE` | tombstone flag |
//!
//! Each cache built over a table takes the table's next generation
//! ([`Store::generation`](crate::Store::generation)) from a `writebehind_generations` table
//! in the same database (`name` the table's name, `generation` a `BIGINT`), created when
//! first needed: the cache's versions are fenced ([`crate::version`]).
//!
//! # Codecs
//! A [`Codec`] maps a Rust type to the bytes of a key or value column, both ways:
//!
//! | codec | types | bytes |
//! | --- | --- | --- |
//! | [`Raw`] | `Vec<u8>` | as they are |
//! | [`Raw`] | `String` | UTF-8 |
//! | [`Raw`] | `u64` | 8 bytes, big-endian (byte order is numeric order) |
//! | [`Raw`] | `i64` | 8 bytes, big-endian with the sign bit flipped (byte order is numeric order) |
//! | `SerdeJson` (feature `serde`) | any `Serialize + DeserializeOwned` | JSON text |
//!
//! Any other mapping is a small `impl Codec<T> for MyCodec`. Equal keys must encode to
//! equal bytes: the database compares bytes, not Rust values.
//!
//! # Guarantees shared by both adapters
//! * **Version guard.** A write is applied only if its version is newer than the row's, deletes
//!   included: a delete keeps a tombstone row with its version, so an older put delivered
//!   late is ignored. Redelivering a batch is therefore harmless (an equal version is the same
//!   write again and is skipped).
//! * **One transaction per batch.** `write_all` applies the batch atomically, except for
//!   records the database rejects: those are isolated and reported as
//!   [`BatchError::Partial`](crate::BatchError::Partial) while every other record commits.
//! * **Error mapping.** Busy, locked, I/O, disk-full, lost-connection and unknown errors are
//!   [`StoreError::Unavailable`](crate::StoreError::Unavailable) (nothing is lost: the cache
//!   retries). Constraint and data errors, codec failures and versions above `i64::MAX` are
//!   [`StoreError::Rejected`](crate::StoreError::Rejected), for that record only.
//!   A constraint checked at `COMMIT` (a deferred foreign key or constraint trigger) is
//!   isolated the same way. Deadlocks and serialization failures are `Unavailable`.
//! * **Key order.** A batch is applied in the order of its encoded key bytes, so two writers
//!   whose batches share keys lock them in the same order and do not deadlock each other.
//! * **Loads ignore tombstones.** `load` of a deleted key is `Ok(None)`; `load_all` runs one
//!   query (SQLite: one per 500 keys).
//! * **Schema check.** A table that already exists is checked when the store is opened or
//!   connected: one whose columns do not fit the layout above (a missing column, another
//!   type, a `key` that is not unique, a `NOT NULL` column the adapter does not write) is
//!   refused with [`StoreError::Rejected`](crate::StoreError::Rejected), naming the table and
//!   every mismatch.
//! * **Bounded calls (PostgreSQL).** A statement timeout, TCP keepalives and a TCP user
//!   timeout make a call on a dead connection, or one stuck behind another client's lock,
//!   fail as `Unavailable` instead of blocking; see `PostgresStoreBuilder` for the settings
//!   and their defaults.
//!
//! Tombstones stay until you remove them, with `purge_tombstones`, once no write older than
//! a given version can arrive any more.
//!
//! For an application's own typed schema (a column per field), write a small
//! [`Store`](crate::Store) by hand; `docs/ADAPTERS.md` and `examples/profiles_sqlite.rs` show
//! one, with the same version guard.

mod codec;
#[cfg(feature = "postgres")]
mod leases;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "postgres")]
pub use self::leases::{Leases, PgLeases};
#[cfg(feature = "postgres")]
pub use self::postgres::{
    PostgresStore, PostgresStoreBuilder, DEFAULT_CONNECT_TIMEOUT, DEFAULT_KEEPALIVES_IDLE,
    DEFAULT_KEEPALIVES_INTERVAL, DEFAULT_KEEPALIVES_RETRIES, DEFAULT_STATEMENT_TIMEOUT,
    DEFAULT_TCP_USER_TIMEOUT,
};
#[cfg(feature = "serde")]
pub use codec::SerdeJson;
pub use codec::{Codec, CodecError, Raw};
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteStore, SqliteStoreBuilder, DEFAULT_BUSY_TIMEOUT};

/// The table where both adapters keep each store table's last generation
/// ([`Store::generation`](crate::Store::generation)), and the statements that create it and
/// take the next one (one upsert: atomic, and serialized on the row).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
const GENERATIONS: &str = "writebehind_generations";
#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn generation_sql() -> (String, String) {
    let t = GENERATIONS;
    (
        format!(
            "CREATE TABLE IF NOT EXISTS {t} (name TEXT PRIMARY KEY, generation BIGINT NOT NULL)"
        ),
        format!(
            "INSERT INTO {t} (name, generation) VALUES ($1, 1) ON CONFLICT (name) \
             DO UPDATE SET generation = {t}.generation + 1 RETURNING generation"
        ),
    )
}

/// A generation as read back from a database's signed column.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn generation_from(g: i64) -> Result<Option<u64>, crate::StoreError> {
    u64::try_from(g).map(Some).map_err(|_| {
        crate::StoreError::rejected(format!(
            "table {GENERATIONS} holds a negative generation {g}"
        ))
    })
}

/// The error of a superseded row in a batch that also failed (`BatchError::Partial`).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
const SUPERSEDED: &str = "superseded: the table holds a newer version of this key";

/// A write's version as the signed 64-bit integer both databases store.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn db_version(version: u64) -> Result<i64, crate::StoreError> {
    i64::try_from(version).map_err(|_| {
        crate::StoreError::rejected(format!(
            "version {version} does not fit the database's signed 64-bit version column"
        ))
    })
}

/// `name` as an SQL identifier, each dot-separated part double-quoted (`schema.table` works).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn quote_ident(name: &str) -> String {
    name.split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(all(test, any(feature = "sqlite", feature = "postgres")))]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_per_part() {
        assert_eq!(quote_ident("kv"), "\"kv\"");
        assert_eq!(quote_ident("app.kv"), "\"app\".\"kv\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn versions_above_i64_max_are_rejected() {
        assert_eq!(db_version(5).ok(), Some(5));
        assert!(matches!(
            db_version(u64::MAX),
            Err(crate::StoreError::Rejected(_))
        ));
    }
}

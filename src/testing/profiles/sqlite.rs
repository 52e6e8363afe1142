//! The typed `profiles` adapter on SQLite: a version-guarded [`Store`] over real columns.

use std::path::Path;
use std::sync::Mutex;

use crate::{BatchError, Store, StoreError, Write};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use super::Profile;

/// A version-guarded [`Store`] over the typed `profiles` table.
pub struct ProfileStore {
    /// SQLite has one writer at a time; a mutex is all the concurrency it needs.
    conn: Mutex<Connection>,
}

const CREATE: &str = "
    CREATE TABLE IF NOT EXISTS profiles (
        user_id INTEGER PRIMARY KEY,
        name    TEXT    NOT NULL,
        theme   TEXT    NOT NULL CHECK (theme IN ('light', 'dark')),
        visits  INTEGER NOT NULL CHECK (visits >= 0),
        version INTEGER NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0
    )";

/// The version guard: the update happens only for a newer version.
const UPSERT: &str = "
    INSERT INTO profiles (user_id, name, theme, visits, version, deleted)
    VALUES (?1, ?2, ?3, ?4, ?5, 0)
    ON CONFLICT (user_id) DO UPDATE SET
        name = excluded.name, theme = excluded.theme, visits = excluded.visits,
        version = excluded.version, deleted = 0
    WHERE excluded.version > profiles.version";

/// A delete is a tombstone with its version, guarded the same way.
const DELETE: &str = "
    INSERT INTO profiles (user_id, name, theme, visits, version, deleted)
    VALUES (?1, '', 'light', 0, ?2, 1)
    ON CONFLICT (user_id) DO UPDATE SET deleted = 1, version = excluded.version
    WHERE excluded.version > profiles.version";

const LOAD: &str = "SELECT name, theme, visits FROM profiles WHERE user_id = ?1 AND deleted = 0";

/// One query for any number of keys: the ids travel as one JSON array.
const LOAD_ALL: &str = "
    SELECT user_id, name, theme, visits FROM profiles
    WHERE deleted = 0 AND user_id IN (SELECT value FROM json_each(?1))";

impl ProfileStore {
    /// Opens (or creates) the database and the table.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(StoreError::unavailable)?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
            .map_err(StoreError::unavailable)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(StoreError::unavailable)?;
        conn.busy_timeout(std::time::Duration::from_secs(2))
            .map_err(StoreError::unavailable)?;
        conn.execute_batch(CREATE)
            .map_err(StoreError::unavailable)?;
        Ok(ProfileStore {
            conn: Mutex::new(conn),
        })
    }

    /// Drops and recreates the table: the load driver starts every run from scratch.
    pub fn reset(&self) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute_batch("DROP TABLE IF EXISTS profiles")
            .map_err(classify)?;
        conn.execute_batch(CREATE).map_err(classify)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic mid-transaction leaves the connection usable: rusqlite rolls back on drop.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Constraint and type errors concern the record; everything else the database.
fn classify(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig
            ) =>
        {
            StoreError::rejected(e)
        }
        _ => StoreError::unavailable(e),
    }
}

/// Keys and versions are `u64` in the cache and signed 64-bit integers in SQL.
fn sql_int(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::rejected(format!("{what} {v} exceeds i64::MAX")))
}

impl Store<u64, Profile> for ProfileStore {
    fn load(&self, key: &u64) -> Result<Option<Profile>, StoreError> {
        let id = sql_int(*key, "user_id")?;
        let conn = self.conn();
        let mut st = conn.prepare_cached(LOAD).map_err(classify)?;
        st.query_row(params![id], |r| {
            Ok(Profile {
                name: r.get(0)?,
                theme: r.get(1)?,
                visits: r.get(2)?,
            })
        })
        .optional()
        .map_err(classify)
    }

    fn load_all(&self, keys: &[u64]) -> Result<Vec<(u64, Profile)>, StoreError> {
        let ids = format!(
            "[{}]",
            keys.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        let conn = self.conn();
        let mut st = conn.prepare_cached(LOAD_ALL).map_err(classify)?;
        let rows = st
            .query_map(params![ids], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    Profile {
                        name: r.get(1)?,
                        theme: r.get(2)?,
                        visits: r.get(3)?,
                    },
                ))
            })
            .map_err(classify)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, p) = row.map_err(classify)?;
            out.push((id as u64, p));
        }
        Ok(out)
    }

    fn write_all(&self, batch: &[Write<u64, Profile>]) -> Result<(), BatchError> {
        let mut conn = self.conn();
        // One transaction per batch; IMMEDIATE takes the write lock up front.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(BatchError::unavailable)?;
        let mut failed = Vec::new();
        {
            let mut upsert = tx.prepare_cached(UPSERT).map_err(BatchError::unavailable)?;
            let mut delete = tx.prepare_cached(DELETE).map_err(BatchError::unavailable)?;
            for (i, w) in batch.iter().enumerate() {
                let done = sql_int(*w.key(), "user_id").and_then(|id| {
                    let version = sql_int(w.version(), "version")?;
                    match w {
                        Write::Put { value: p, .. } => {
                            upsert.execute(params![id, p.name, p.theme, p.visits, version])
                        }
                        Write::Delete { .. } => delete.execute(params![id, version]),
                    }
                    .map_err(classify)
                });
                match done {
                    Ok(_) => {}
                    // SQLite undoes only the failed statement; the others stay in the
                    // transaction. (This schema has no ON CONFLICT ROLLBACK constraint, which
                    // would end the whole transaction: see SqliteStore for that case.)
                    Err(e @ StoreError::Rejected(_)) => failed.push((i, e)),
                    Err(StoreError::Unavailable(e)) => return Err(BatchError::Unavailable(e)),
                }
            }
        }
        tx.commit().map_err(BatchError::unavailable)?;
        if failed.is_empty() {
            Ok(())
        } else {
            Err(BatchError::Partial(failed))
        }
    }
}

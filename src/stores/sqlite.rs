//! [`SqliteStore`]: a version-guarded key/value table in an embedded SQLite database.

use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{params, params_from_iter, Connection, ErrorCode, OptionalExtension};
use rusqlite::{Transaction, TransactionBehavior};

use super::codec::{Codec, Raw};
use super::{db_version, quote_ident};
use crate::error::{BatchError, StoreError};
use crate::store::{Applied, Store, Write};

use super::SUPERSEDED;

/// How long a write waits for another connection's lock before the batch is reported
/// [`StoreError::Unavailable`] (and retried by the cache).
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// Keys per `load_all` query, well below SQLite's limit on bound variables.
const LOAD_CHUNK: usize = 500;

/// A [`Store`] over one table of an SQLite database file (feature `sqlite`).
///
/// * The database runs in WAL mode with `synchronous = NORMAL`: a committed batch survives a
///   process crash; the last batches before a power loss may not, which the cache's
///   at-least-once retry cannot help with either. `foreign_keys` is on, so constraints you
///   add are enforced. The writer keeps a 32 MiB page cache and checkpoints the WAL every
///   10,000 pages (so the `-wal` file grows to about 40 MiB between checkpoints): both pay
///   off for batches of keys dirtied at random.
/// * Writes go through one connection behind a mutex (SQLite has one writer at a time);
///   loads use a second connection, so a reader on a miss never waits for a batch.
/// * A batch is one `BEGIN IMMEDIATE` transaction of prepared, version-guarded upserts.
///   A record the database rejects (constraint or type error) is left out and reported in
///   [`BatchError::Partial`]; the others commit. If such an error makes SQLite roll back the
///   whole transaction (an `ON CONFLICT ROLLBACK` constraint) the batch is replayed without
///   the bad record; if the commit itself fails on a constraint (a deferred foreign key) the
///   batch is replayed one record per transaction to find it.
/// * `SQLITE_BUSY`, `SQLITE_LOCKED`, I/O, disk-full and every unclassified error are
///   [`BatchError::Unavailable`]: nothing was committed, the cache retries the batch.
/// * An existing table is checked when the store opens: one with a missing column, a
///   column of the wrong type or no unique `key` is refused then, with a message that
///   names the table and each mismatch (see [`SqliteStoreBuilder::open`]).
///
/// See the [module docs](crate::stores) for the table layout and the version guard.
///
/// # Examples
/// ```
/// use writebehind::stores::SqliteStore;
/// use writebehind::{Store, Write};
///
/// let dir = tempfile::tempdir().unwrap();
/// let store = SqliteStore::<u64, String>::open(dir.path().join("app.db"), "kv").unwrap();
///
/// store
///     .write_all(&[
///         Write::Put { key: 1, value: "one".to_string(), version: 10 },
///         Write::Put { key: 2, value: "two".to_string(), version: 10 },
///     ])
///     .unwrap();
/// // An older write delivered late changes nothing.
/// store.write_all(&[Write::Put { key: 1, value: "stale".to_string(), version: 9 }]).unwrap();
/// assert_eq!(store.load(&1).unwrap().as_deref(), Some("one"));
///
/// // A delete leaves a tombstone: the key is gone, and an older put cannot bring it back.
/// store.write_all(&[Write::Delete { key: 2, version: 11 }]).unwrap();
/// store.write_all(&[Write::Put { key: 2, value: "late".to_string(), version: 10 }]).unwrap();
/// assert_eq!(store.load(&2).unwrap(), None);
///
/// let found = store.load_all(&[1, 2, 3]).unwrap();
/// assert_eq!(found, vec![(1, "one".to_string())]);
/// ```
pub struct SqliteStore<K, V> {
    writer: Mutex<Connection>,
    /// `None` for an in-memory database, which a second connection would not see.
    reader: Option<Mutex<Connection>>,
    sql: Sql,
    path: PathBuf,
    table: String,
    key_codec: Arc<dyn Codec<K>>,
    value_codec: Arc<dyn Codec<V>>,
    _types: PhantomData<fn() -> (K, V)>,
}

/// The statements of one table, built once.
struct Sql {
    upsert: String,
    delete: String,
    load_one: String,
    /// The stored version of a key (live or deleted).
    version_of: String,
    /// `load_all` without the `IN (...)` list.
    load_many: String,
    purge: String,
}

impl Sql {
    fn new(table: &str) -> Self {
        let t = quote_ident(table);
        Sql {
            upsert: format!(
                "INSERT INTO {t} AS t (key, value, version, deleted) VALUES (?1, ?2, ?3, 0) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
                 version = excluded.version, deleted = 0 \
                 WHERE excluded.version > t.version"
            ),
            delete: format!(
                "INSERT INTO {t} AS t (key, value, version, deleted) VALUES (?1, NULL, ?2, 1) \
                 ON CONFLICT (key) DO UPDATE SET value = NULL, \
                 version = excluded.version, deleted = 1 \
                 WHERE excluded.version > t.version"
            ),
            load_one: format!("SELECT value FROM {t} WHERE key = ?1 AND deleted = 0"),
            version_of: format!("SELECT version FROM {t} WHERE key = ?1"),
            load_many: format!("SELECT key, value FROM {t} WHERE deleted = 0 AND key IN "),
            purge: format!("DELETE FROM {t} WHERE deleted = 1 AND version < ?1"),
        }
    }

    fn create(table: &str, constraints: &[String]) -> String {
        let mut sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (\n  key BLOB NOT NULL PRIMARY KEY,\n  value BLOB,\n  \
             version INTEGER NOT NULL,\n  deleted INTEGER NOT NULL DEFAULT 0",
            quote_ident(table)
        );
        for c in constraints {
            sql.push_str(",\n  ");
            sql.push_str(c);
        }
        sql.push_str("\n) WITHOUT ROWID");
        sql
    }
}

/// Options for [`SqliteStore`], from [`SqliteStore::builder`].
pub struct SqliteStoreBuilder<K, V> {
    path: PathBuf,
    table: String,
    key_codec: Arc<dyn Codec<K>>,
    value_codec: Arc<dyn Codec<V>>,
    busy_timeout: Duration,
    constraints: Vec<String>,
}

impl<K, V> SqliteStoreBuilder<K, V> {
    /// How long a statement waits for a lock held by another connection (another process
    /// writing the same file) before the batch fails as `Unavailable`.
    /// Default [`DEFAULT_BUSY_TIMEOUT`].
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Adds a table constraint (SQL, such as `CHECK (deleted = 1 OR length(value) <= 4096)`)
    /// to the `CREATE TABLE` statement. It has no effect on a table that already exists.
    /// A record that violates it is rejected on its own; the rest of its batch commits.
    pub fn table_constraint(mut self, sql: impl Into<String>) -> Self {
        self.constraints.push(sql.into());
        self
    }

    /// Opens (or creates) the database file and the table, and checks that an existing
    /// table has the columns the adapter writes: `key` (BLOB affinity, the primary key or
    /// unique on its own), `value` (BLOB affinity, nullable), `version` and `deleted`
    /// (INTEGER or NUMERIC affinity), and no other `NOT NULL` column without a default.
    /// Other columns, indexes and constraints are allowed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the file cannot be opened or created, switched to WAL
    /// mode, or the table cannot be created (a bad constraint among them);
    /// [`StoreError::Rejected`] when the table exists with a schema the adapter cannot use
    /// (it would fail at every write, or compare versions as text). Each message names the
    /// path and the table, and the second lists every mismatch.
    pub fn open(self) -> Result<SqliteStore<K, V>, StoreError> {
        let at = |what: &str, e: rusqlite::Error| {
            StoreError::unavailable(format!(
                "SQLite database {}: {what}: {e}",
                self.path.display()
            ))
        };
        let writer = connect(&self.path, self.busy_timeout).map_err(|e| at("open", e))?;
        writer
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
            .map_err(|e| at("switch to WAL mode", e))?;
        writer
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| at("set synchronous", e))?;
        // A 32 MiB page cache (the default is 2 MiB): batches of random keys into a large
        // table otherwise re-read most of their pages from the OS on every batch.
        writer
            .pragma_update(None, "cache_size", -32_768)
            .map_err(|e| at("set cache_size", e))?;
        // Checkpoint every 10,000 WAL pages (about 40 MiB) instead of every 1,000: a batch of
        // keys dirtied at random modifies hundreds of pages, and between two checkpoints the
        // same pages are modified again and again; copying them back ten times less often
        // makes a flush of 100,000 random keys about 1.6 times as fast
        // (`STORES_KEYS=100000 cargo bench --features sqlite,postgres --bench stores`).
        writer
            .pragma_update(None, "wal_autocheckpoint", 10_000)
            .map_err(|e| at("set wal_autocheckpoint", e))?;
        writer
            .execute_batch(&Sql::create(&self.table, &self.constraints))
            .map_err(|e| at(&format!("create table {}", self.table), e))?;
        let problems = schema_problems(&writer, &self.table)
            .map_err(|e| at(&format!("read the schema of table {}", self.table), e))?;
        if !problems.is_empty() {
            return Err(StoreError::rejected(format!(
                "SQLite database {}: table {} does not fit the adapter: {}; it needs {}",
                self.path.display(),
                self.table,
                problems.join("; "),
                NEEDED,
            )));
        }
        let reader = if in_memory(&self.path) {
            None
        } else {
            let r = connect(&self.path, self.busy_timeout).map_err(|e| at("open reader", e))?;
            r.pragma_update(None, "query_only", true)
                .map_err(|e| at("set query_only", e))?;
            Some(Mutex::new(r))
        };
        Ok(SqliteStore {
            writer: Mutex::new(writer),
            reader,
            sql: Sql::new(&self.table),
            path: self.path,
            table: self.table,
            key_codec: self.key_codec,
            value_codec: self.value_codec,
            _types: PhantomData,
        })
    }
}

/// The columns the adapter writes, as the message of a schema mismatch states them.
const NEEDED: &str = "key BLOB PRIMARY KEY (or UNIQUE), value BLOB (nullable), \
                      version INTEGER, deleted INTEGER, and no other NOT NULL column \
                      without a default";

/// A column's type affinity, from its declared type (SQLite's rules, in their order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Affinity {
    Integer,
    Text,
    Blob,
    Real,
    Numeric,
}

fn affinity(declared: &str) -> Affinity {
    let t = declared.to_ascii_uppercase();
    if t.contains("INT") {
        Affinity::Integer
    } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
        Affinity::Text
    } else if t.contains("BLOB") || t.trim().is_empty() {
        Affinity::Blob
    } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
        Affinity::Real
    } else {
        Affinity::Numeric
    }
}

/// One row of `PRAGMA table_info`.
struct Column {
    name: String,
    declared: String,
    not_null: bool,
    has_default: bool,
    /// Position in the primary key, from 1; 0 when not part of it.
    pk: i64,
}

/// What keeps table `table` (as the adapter names it, `schema.table` allowed) from working
/// with the adapter's statements; empty when it fits.
///
/// The adapter needs `key` with BLOB affinity and unique on its own (the `ON CONFLICT
/// (key)` target), `value` with BLOB affinity and nullable (a delete writes `NULL`),
/// `version` and `deleted` with INTEGER or NUMERIC affinity (the version guard compares
/// integers), and no other column it would have to fill.
fn schema_problems(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let (schema, name) = match table.split_once('.') {
        Some((schema, name)) => (schema, name),
        None => ("main", table),
    };
    let kind: Option<String> = conn
        .query_row(
            &format!(
                "SELECT type FROM {}.sqlite_schema WHERE name = ?1 COLLATE NOCASE \
                 AND type IN ('table', 'view')",
                quote_ident(schema)
            ),
            [name],
            |r| r.get(0),
        )
        .optional()?;
    if kind.as_deref() == Some("view") {
        return Ok(vec![format!("{table} is a view, not a table")]);
    }
    let columns: Vec<Column> = conn
        .prepare("SELECT name, type, \"notnull\", dflt_value IS NOT NULL, pk FROM pragma_table_info(?1, ?2)")?
        .query_map([name, schema], |r| {
            Ok(Column {
                name: r.get(0)?,
                declared: r.get(1)?,
                not_null: r.get(2)?,
                has_default: r.get(3)?,
                pk: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let pk_columns = columns.iter().filter(|c| c.pk > 0).count();
    let mut problems = Vec::new();
    let find = |n: &str| columns.iter().find(|c| c.name.eq_ignore_ascii_case(n));
    let mut check_type = |n: &str, ok: &[Affinity], needs: &str| match find(n) {
        None => problems.push(format!("no column {n}")),
        Some(c) if !ok.contains(&affinity(&c.declared)) => problems.push(format!(
            "column {n} has type {} ({:?} affinity), not {needs}",
            if c.declared.is_empty() {
                "(none)"
            } else {
                &c.declared
            },
            affinity(&c.declared),
        )),
        Some(_) => {}
    };
    check_type("key", &[Affinity::Blob], "BLOB");
    check_type("value", &[Affinity::Blob], "BLOB");
    check_type(
        "version",
        &[Affinity::Integer, Affinity::Numeric],
        "INTEGER",
    );
    check_type(
        "deleted",
        &[Affinity::Integer, Affinity::Numeric],
        "INTEGER",
    );
    if find("value").is_some_and(|c| c.not_null) {
        problems.push("column value is NOT NULL, but a delete writes NULL".to_string());
    }
    if let Some(key) = find("key") {
        let key_is_pk = key.pk > 0 && pk_columns == 1;
        if !key_is_pk && !unique_on_its_own(conn, schema, name, &key.name)? {
            problems
                .push("column key is neither the primary key nor unique on its own".to_string());
        }
    }
    for c in &columns {
        let needed = ["key", "value", "version", "deleted"]
            .iter()
            .any(|n| c.name.eq_ignore_ascii_case(n));
        // An INTEGER PRIMARY KEY of a rowid table is the rowid, filled in by SQLite.
        let rowid = c.pk > 0 && pk_columns == 1 && c.declared.eq_ignore_ascii_case("INTEGER");
        if !needed && !rowid && c.not_null && !c.has_default {
            problems.push(format!(
                "column {} is NOT NULL without a default, and the adapter does not write it",
                c.name
            ));
        }
    }
    Ok(problems)
}

/// `true` if a unique index that is not partial covers exactly `column` of the table.
fn unique_on_its_own(
    conn: &Connection,
    schema: &str,
    table: &str,
    column: &str,
) -> rusqlite::Result<bool> {
    let indexes: Vec<String> = conn
        .prepare("SELECT name FROM pragma_index_list(?1, ?2) WHERE \"unique\" = 1 AND partial = 0")?
        .query_map([table, schema], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for index in indexes {
        let columns: Vec<Option<String>> = conn
            .prepare("SELECT name FROM pragma_index_info(?1, ?2)")?
            .query_map([&index, schema], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if let [Some(only)] = &columns[..] {
            if only.eq_ignore_ascii_case(column) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn in_memory(path: &Path) -> bool {
    path.as_os_str().is_empty() || path.as_os_str() == ":memory:"
}

fn connect(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy_timeout)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(conn)
}

/// `true` for an error that concerns the record written, not the database.
fn is_record_error(e: &rusqlite::Error) -> bool {
    use rusqlite::Error as E;
    match e {
        E::SqliteFailure(f, _) => matches!(
            f.code,
            ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig
        ),
        E::ToSqlConversionFailure(_)
        | E::FromSqlConversionFailure(..)
        | E::IntegralValueOutOfRange(..)
        | E::Utf8Error(..)
        | E::InvalidColumnType(..) => true,
        _ => false,
    }
}

/// Maps an SQLite error to the cache's two outcomes (see [`SqliteStore`]).
fn store_error(e: rusqlite::Error) -> StoreError {
    if is_record_error(&e) {
        StoreError::rejected(e)
    } else {
        StoreError::unavailable(e)
    }
}

/// A write, encoded.
struct Row {
    key: Vec<u8>,
    /// `None` for a delete.
    value: Option<Vec<u8>>,
    version: i64,
}

/// How one attempt at a batch ended.
enum Attempt {
    Committed,
    /// A rejected record rolled back the whole transaction; it is marked failed, replay.
    Restart,
    /// `COMMIT` failed on a constraint: some record is bad, but which is unknown.
    CommitRejected,
}

impl<K: 'static, V: 'static> SqliteStore<K, V> {
    /// Opens (or creates) the database at `path` with a table `table` (created if missing),
    /// storing keys and values with the [`Raw`] codec. Use [`SqliteStore::builder`] for other
    /// codecs and options.
    ///
    /// `path` may be `":memory:"` for a private in-memory database (tests); loads then share
    /// the writer's connection.
    ///
    /// # Errors
    /// As [`SqliteStoreBuilder::open`].
    pub fn open(path: impl AsRef<Path>, table: &str) -> Result<Self, StoreError>
    where
        Raw: Codec<K> + Codec<V>,
    {
        Self::builder(path, table, Raw, Raw).open()
    }

    /// Options for a store at `path` over `table`, with the given key and value codecs.
    ///
    /// # Examples
    /// ```
    /// # #[cfg(feature = "serde")] {
    /// use std::time::Duration;
    /// use writebehind::stores::{Raw, SerdeJson, SqliteStore};
    /// use writebehind::{Store, Write};
    ///
    /// #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    /// struct Profile { name: String, visits: u64 }
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let store = SqliteStore::<u64, Profile>::builder(dir.path().join("p.db"), "profiles", Raw, SerdeJson)
    ///     .busy_timeout(Duration::from_millis(500))
    ///     .table_constraint("CHECK (deleted = 1 OR length(value) <= 4096)")
    ///     .open()
    ///     .unwrap();
    /// let ada = Profile { name: "ada".into(), visits: 1 };
    /// store.write_all(&[Write::Put { key: 7, value: ada, version: 1 }]).unwrap();
    /// assert_eq!(store.load(&7).unwrap().map(|p| p.visits), Some(1));
    /// # }
    /// ```
    pub fn builder(
        path: impl AsRef<Path>,
        table: &str,
        key_codec: impl Codec<K>,
        value_codec: impl Codec<V>,
    ) -> SqliteStoreBuilder<K, V> {
        SqliteStoreBuilder {
            path: path.as_ref().to_path_buf(),
            table: table.to_string(),
            key_codec: Arc::new(key_codec),
            value_codec: Arc::new(value_codec),
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            constraints: Vec::new(),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Removes tombstones (rows of deleted keys) older than `version`. Call it only when no
    /// write older than `version` can still arrive (no cache that could hold one is running),
    /// or a late put of a deleted key could reappear. Returns the number of rows removed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the database is busy or failing.
    pub fn purge_tombstones(&self, version: u64) -> Result<usize, StoreError> {
        let version = db_version(version).unwrap_or(i64::MAX);
        let conn = self.writer.lock();
        conn.execute(&self.sql.purge, params![version])
            .map_err(store_error)
    }

    fn reader(&self) -> &Mutex<Connection> {
        self.reader.as_ref().unwrap_or(&self.writer)
    }

    fn encode(&self, w: &Write<K, V>) -> Result<Row, StoreError> {
        let key = self
            .key_codec
            .encode(w.key())
            .map_err(StoreError::rejected)?;
        let value = match w.value() {
            Some(v) => Some(self.value_codec.encode(v).map_err(StoreError::rejected)?),
            None => None,
        };
        Ok(Row {
            key,
            value,
            version: db_version(w.version())?,
        })
    }

    fn decode_value(&self, bytes: &[u8]) -> Result<V, StoreError> {
        self.value_codec.decode(bytes).map_err(|e| {
            StoreError::rejected(format!(
                "table {}: a stored value does not decode: {e}",
                self.table
            ))
        })
    }

    /// Whether a row the version guard left alone (`changed == 0`) was superseded: the
    /// stored version is newer (an equal one is a redelivery, applied before).
    fn is_superseded(
        &self,
        tx: &Transaction<'_>,
        row: &Row,
        changed: usize,
    ) -> Result<bool, rusqlite::Error> {
        if changed > 0 {
            return Ok(false);
        }
        let stored: Option<i64> = tx
            .prepare_cached(&self.sql.version_of)?
            .query_row(params![row.key], |r| r.get(0))
            .optional()?;
        Ok(stored.is_some_and(|v| v > row.version))
    }

    /// One transaction over every row still in `rows`; a rejected row is moved to `failed`,
    /// and one the version guard ignored for a newer stored version is listed in
    /// `superseded`.
    fn attempt(
        &self,
        conn: &mut Connection,
        rows: &mut [Option<Row>],
        order: &[usize],
        failed: &mut Vec<(usize, StoreError)>,
        superseded: &mut Vec<usize>,
    ) -> Result<Attempt, rusqlite::Error> {
        superseded.clear();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut upsert = tx.prepare_cached(&self.sql.upsert)?;
            let mut delete = tx.prepare_cached(&self.sql.delete)?;
            for &i in order {
                let slot = &mut rows[i];
                let Some(row) = slot else { continue };
                let done = match &row.value {
                    Some(v) => upsert.execute(params![row.key, v, row.version]),
                    None => delete.execute(params![row.key, row.version]),
                };
                match done {
                    Ok(changed) => {
                        if self.is_superseded(&tx, row, changed)? {
                            superseded.push(i);
                        }
                    }
                    // Dropping `tx` rolls the whole batch back.
                    Err(e) if !is_record_error(&e) => return Err(e),
                    Err(e) => {
                        // SQLite undid this statement only; the transaction goes on,
                        // unless the constraint's conflict clause rolled it all back.
                        failed.push((i, StoreError::rejected(e)));
                        *slot = None;
                        if tx.is_autocommit() {
                            return Ok(Attempt::Restart);
                        }
                    }
                }
            }
        }
        match tx.commit() {
            Ok(()) => Ok(Attempt::Committed),
            Err(e) if is_record_error(&e) => Ok(Attempt::CommitRejected),
            Err(e) => Err(e),
        }
    }

    /// Applies each row in its own transaction, to find the rows a `COMMIT` rejects.
    fn one_by_one(
        &self,
        conn: &mut Connection,
        rows: &mut [Option<Row>],
        failed: &mut Vec<(usize, StoreError)>,
        superseded: &mut Vec<usize>,
    ) -> Result<(), rusqlite::Error> {
        superseded.clear();
        for (i, slot) in rows.iter_mut().enumerate() {
            let Some(row) = slot else { continue };
            let tx: Transaction<'_> =
                conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let done = match &row.value {
                Some(v) => tx
                    .prepare_cached(&self.sql.upsert)
                    .and_then(|mut s| s.execute(params![row.key, v, row.version])),
                None => tx
                    .prepare_cached(&self.sql.delete)
                    .and_then(|mut s| s.execute(params![row.key, row.version])),
            }
            .and_then(|changed| {
                let stale = self.is_superseded(&tx, row, changed)?;
                tx.commit().map(|()| stale)
            });
            match done {
                Ok(stale) => {
                    if stale {
                        superseded.push(i);
                    }
                }
                Err(e) if is_record_error(&e) => {
                    failed.push((i, StoreError::rejected(e)));
                    *slot = None;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl<K, V> Store<K, V> for SqliteStore<K, V>
where
    K: 'static,
    V: 'static,
{
    fn load(&self, key: &K) -> Result<Option<V>, StoreError> {
        let key = self.key_codec.encode(key).map_err(StoreError::rejected)?;
        let bytes: Option<Vec<u8>> = {
            let conn = self.reader().lock();
            let mut st = conn
                .prepare_cached(&self.sql.load_one)
                .map_err(store_error)?;
            st.query_row(params![key], |r| r.get(0))
                .optional()
                .map_err(store_error)?
        };
        bytes.map(|b| self.decode_value(&b)).transpose()
    }

    fn load_all(&self, keys: &[K]) -> Result<Vec<(K, V)>, StoreError>
    where
        K: Clone,
    {
        let mut encoded = Vec::with_capacity(keys.len());
        for k in keys {
            encoded.push(self.key_codec.encode(k).map_err(StoreError::rejected)?);
        }
        let mut found: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        {
            let conn = self.reader().lock();
            for chunk in encoded.chunks(LOAD_CHUNK) {
                let marks = vec!["?"; chunk.len()].join(",");
                let sql = format!("{}({marks})", self.sql.load_many);
                let mut st = conn.prepare_cached(&sql).map_err(store_error)?;
                let rows = st
                    .query_map(params_from_iter(chunk.iter()), |r| {
                        Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
                    })
                    .map_err(store_error)?;
                for row in rows {
                    found.push(row.map_err(store_error)?);
                }
            }
        }
        let mut out = Vec::with_capacity(found.len());
        for (k, v) in found {
            let key = self.key_codec.decode(&k).map_err(|e| {
                StoreError::rejected(format!(
                    "table {}: a stored key does not decode: {e}",
                    self.table
                ))
            })?;
            out.push((key, self.decode_value(&v)?));
        }
        Ok(out)
    }

    /// The next generation of this table, from the `writebehind_generations` table of the
    /// same database (created when first needed).
    fn generation(&self) -> Result<Option<u64>, StoreError> {
        let (create, next) = super::generation_sql();
        let conn = self.writer.lock();
        conn.execute_batch(&create).map_err(store_error)?;
        let g: i64 = conn
            .query_row(&next.replace("$1", "?1"), params![self.table], |r| r.get(0))
            .map_err(store_error)?;
        super::generation_from(g)
    }

    fn write_all(&self, batch: &[Write<K, V>]) -> Result<(), BatchError> {
        self.write_all_checked(batch).map(|_| ())
    }

    fn write_all_checked(&self, batch: &[Write<K, V>]) -> Result<Applied, BatchError> {
        if batch.is_empty() {
            return Ok(Applied::default());
        }
        let mut failed = Vec::new();
        let mut superseded = Vec::new();
        let mut rows: Vec<Option<Row>> = batch
            .iter()
            .enumerate()
            .map(|(i, w)| match self.encode(w) {
                Ok(row) => Some(row),
                Err(e) => {
                    failed.push((i, e));
                    None
                }
            })
            .collect();
        // Apply in key order: a batch arrives in hash order, and walking the B-tree in order
        // touches each page once instead of jumping around the file (several times faster on a
        // table larger than SQLite's page cache: docs/BENCHMARKS.md, "Stores").
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by(|&a, &b| {
            let key = |i: usize| rows[i].as_ref().map(|r| &r.key[..]);
            key(a).cmp(&key(b))
        });
        let mut conn = self.writer.lock();
        // Each restart removes at least one row, so this loop ends.
        loop {
            match self.attempt(&mut conn, &mut rows, &order, &mut failed, &mut superseded) {
                Ok(Attempt::Committed) => break,
                Ok(Attempt::Restart) => continue,
                Ok(Attempt::CommitRejected) => {
                    self.one_by_one(&mut conn, &mut rows, &mut failed, &mut superseded)
                        .map_err(BatchError::unavailable)?;
                    break;
                }
                Err(e) => return Err(BatchError::unavailable(e)),
            }
        }
        drop(conn);
        if failed.is_empty() {
            superseded.sort_unstable();
            Ok(Applied::superseded(superseded))
        } else {
            // A `Partial` cannot say which rows were superseded: they are reported failed
            // too, and the retry (in a batch without the bad rows) says it.
            failed.extend(
                superseded
                    .into_iter()
                    .map(|i| (i, StoreError::rejected(SUPERSEDED))),
            );
            failed.sort_by_key(|(i, _)| *i);
            Err(BatchError::Partial(failed))
        }
    }
}

impl<K, V> fmt::Debug for SqliteStore<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_follows_sqlites_rules_in_order() {
        for (declared, expected) in [
            ("INTEGER", Affinity::Integer),
            ("bigint", Affinity::Integer),
            ("UNSIGNED BIG INT", Affinity::Integer),
            ("TEXT", Affinity::Text),
            ("VARCHAR(10)", Affinity::Text),
            ("CLOB", Affinity::Text),
            ("BLOB", Affinity::Blob),
            ("", Affinity::Blob),
            ("REAL", Affinity::Real),
            ("DOUBLE PRECISION", Affinity::Real),
            ("NUMERIC", Affinity::Numeric),
            ("BOOLEAN", Affinity::Numeric),
            // "INT" comes first: a "FLOATING POINT" column has integer affinity.
            ("FLOATING POINT", Affinity::Integer),
        ] {
            assert_eq!(affinity(declared), expected, "{declared:?}");
        }
    }

    #[test]
    fn the_table_the_adapter_creates_fits_it() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&Sql::create("kv", &[])).unwrap();
        assert_eq!(schema_problems(&conn, "kv").unwrap(), Vec::<String>::new());
        assert_eq!(
            schema_problems(&conn, "main.kv").unwrap(),
            Vec::<String>::new()
        );
    }
}

//! [`PostgresStore`]: a version-guarded key/value table in a PostgreSQL database.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use postgres::{Client, Config, GenericClient, NoTls, Statement};

use super::codec::{Codec, Raw};
use super::{db_version, quote_ident};
use crate::error::{BatchError, StoreError};
use crate::store::{Store, Write};

/// How long connecting may take before the call fails as [`StoreError::Unavailable`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`Store`] over one table of a PostgreSQL database (feature `postgres`), through the
/// synchronous `postgres` client without TLS.
///
/// * A batch is **one statement**: the rows travel as four arrays and are merged with
///   `INSERT ... SELECT * FROM unnest($1, $2, $3, $4) ON CONFLICT (key) DO UPDATE ...
///   WHERE t.version < EXCLUDED.version`, one round trip and one (implicit) transaction
///   whatever the batch size. The rows are sent in the order of their encoded key bytes,
///   so two writers (two processes, or two caches over one table) whose batches share keys
///   lock those rows in the same order and do not deadlock each other.
/// * If PostgreSQL rejects the data (SQLSTATE class `22` data exception or `23` integrity
///   constraint violation), the batch is replayed in one transaction, one row per savepoint,
///   to find the bad rows: they are reported in [`BatchError::Partial`] as
///   [`StoreError::Rejected`] and every other row commits. The replay runs with
///   `SET CONSTRAINTS ALL IMMEDIATE`, so a deferred constraint (a `DEFERRABLE INITIALLY
///   DEFERRED` foreign key or constraint trigger) fails the row that broke it rather than
///   the `COMMIT`; should the `COMMIT` fail on a data error all the same, the rows are
///   applied one transaction each.
/// * Any other error (connection lost or refused, server shutting down, deadlock `40P01`,
///   serialization failure `40001`, statement timeout, ...) is [`StoreError::Unavailable`]:
///   the cache retries the batch. The connection is dropped and the next call opens a new
///   one, so the store recovers on its own when the server is back.
/// * Writes and loads use two connections, each behind its own mutex, so a read-through on
///   a miss never waits for a batch in flight.
///
/// See the [module docs](crate::stores) for the table layout and the version guard. For a
/// distributed database speaking the PostgreSQL protocol the same statements apply.
///
/// # Examples
/// ```no_run
/// use writebehind::stores::PostgresStore;
/// use writebehind::{Store, Write};
///
/// let store = PostgresStore::<u64, String>::connect(
///     "host=/tmp/pg port=5432 user=postgres dbname=writebehind",
///     "kv",
/// )?;
/// store.write_all(&[Write::Put { key: 1, value: "one".to_string(), version: 10 }]).unwrap();
/// assert_eq!(store.load(&1)?.as_deref(), Some("one"));
/// # Ok::<(), writebehind::StoreError>(())
/// ```
pub struct PostgresStore<K, V> {
    config: Config,
    writer: Mutex<Option<Conn>>,
    reader: Mutex<Option<Conn>>,
    sql: Sql,
    table: String,
    key_codec: Arc<dyn Codec<K>>,
    value_codec: Arc<dyn Codec<V>>,
    _types: PhantomData<fn() -> (K, V)>,
}

/// A connection with the store's statements prepared on it.
struct Conn {
    client: Client,
    upsert: Statement,
    load_one: Statement,
    load_many: Statement,
}

struct Sql {
    upsert: String,
    load_one: String,
    load_many: String,
    purge: String,
}

impl Sql {
    fn new(table: &str) -> Self {
        let t = quote_ident(table);
        Sql {
            upsert: format!(
                "INSERT INTO {t} AS t (key, value, version, deleted) \
                 SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::int8[], $4::bool[]) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, \
                 version = EXCLUDED.version, deleted = EXCLUDED.deleted \
                 WHERE t.version < EXCLUDED.version"
            ),
            load_one: format!("SELECT value FROM {t} WHERE key = $1 AND NOT deleted"),
            load_many: format!("SELECT key, value FROM {t} WHERE key = ANY($1) AND NOT deleted"),
            purge: format!("DELETE FROM {t} WHERE deleted AND version < $1"),
        }
    }

    fn create(table: &str, constraints: &[String]) -> String {
        let mut sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (\n  key BYTEA PRIMARY KEY,\n  value BYTEA,\n  \
             version BIGINT NOT NULL,\n  deleted BOOLEAN NOT NULL DEFAULT FALSE",
            quote_ident(table)
        );
        for c in constraints {
            sql.push_str(",\n  ");
            sql.push_str(c);
        }
        sql.push_str("\n)");
        sql
    }
}

/// Options for [`PostgresStore`], from [`PostgresStore::builder`].
pub struct PostgresStoreBuilder<K, V> {
    url: String,
    table: String,
    key_codec: Arc<dyn Codec<K>>,
    value_codec: Arc<dyn Codec<V>>,
    connect_timeout: Duration,
    constraints: Vec<String>,
}

impl<K: 'static, V: 'static> PostgresStoreBuilder<K, V> {
    /// How long opening a connection may take. Default [`DEFAULT_CONNECT_TIMEOUT`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Adds a table constraint (SQL, such as `CHECK (deleted OR length(value) <= 4096)`) to
    /// the `CREATE TABLE` statement. It has no effect on a table that already exists.
    pub fn table_constraint(mut self, sql: impl Into<String>) -> Self {
        self.constraints.push(sql.into());
        self
    }

    /// Connects, creates the table if it is missing and prepares the statements.
    ///
    /// # Errors
    /// [`StoreError::Rejected`] for a malformed connection string;
    /// [`StoreError::Unavailable`] when the server cannot be reached or the table cannot be
    /// created.
    pub fn connect(self) -> Result<PostgresStore<K, V>, StoreError> {
        let mut config: Config = self.url.parse().map_err(|e| {
            StoreError::rejected(format!("invalid PostgreSQL connection string: {e}"))
        })?;
        config.connect_timeout(self.connect_timeout);
        let store = PostgresStore {
            config,
            writer: Mutex::new(None),
            reader: Mutex::new(None),
            sql: Sql::new(&self.table),
            table: self.table,
            key_codec: self.key_codec,
            value_codec: self.value_codec,
            _types: PhantomData,
        };
        let mut client = store
            .config
            .connect(NoTls)
            .map_err(|e| StoreError::unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
        client
            .batch_execute(&Sql::create(&store.table, &self.constraints))
            .map_err(|e| {
                StoreError::unavailable(format!("cannot create table {}: {e}", store.table))
            })?;
        *store.writer.lock() = Some(store.prepare(client)?);
        *store.reader.lock() = Some(store.open()?);
        Ok(store)
    }
}

/// `true` for SQLSTATE class 22 (data exception) and 23 (integrity constraint violation):
/// the row is at fault, not the server.
fn is_record_error(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| is_record_state(c.code()))
}

/// `true` for an SQLSTATE of class 22 or 23. Every other code (deadlock `40P01`,
/// serialization failure `40001`, statement timeout `57014`, shutdown `57P01`, ...) says
/// nothing against the row: the batch is retried as it is.
fn is_record_state(code: &str) -> bool {
    code.starts_with("22") || code.starts_with("23")
}

/// Maps a client error to a store error. Anything but a record error drops the connection,
/// so the next call reconnects.
fn store_error(e: postgres::Error, slot: &mut Option<Conn>) -> StoreError {
    if is_record_error(&e) {
        StoreError::rejected(e)
    } else {
        *slot = None;
        StoreError::unavailable(e)
    }
}

/// An encoded row of the batch.
struct Row {
    /// The row's index in the batch slice, which [`BatchError::Partial`] reports.
    index: usize,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    version: i64,
}

impl Row {
    /// Runs the upsert for this row alone.
    fn upsert(
        &self,
        client: &mut impl GenericClient,
        upsert: &Statement,
    ) -> Result<u64, postgres::Error> {
        client.execute(
            upsert,
            &[
                &[&self.key[..]].as_slice(),
                &[self.value.as_deref()].as_slice(),
                &[self.version].as_slice(),
                &[self.value.is_none()].as_slice(),
            ],
        )
    }
}

/// Puts the rows of a batch in the order they are sent: by encoded key bytes, so that two
/// writers whose batches share keys lock those rows in the same order and cannot deadlock
/// each other. One statement cannot update a row twice, so of several writes of one key (a
/// batch holds one per key, but nothing enforces it) only the newest version is kept: the
/// version guard would ignore the others anyway. Each row keeps its batch index.
fn sort_and_dedup(rows: &mut Vec<Row>) {
    rows.sort_unstable_by(|a, b| {
        a.key
            .cmp(&b.key)
            .then(b.version.cmp(&a.version))
            .then(a.index.cmp(&b.index))
    });
    rows.dedup_by(|later, kept| later.key == kept.key);
}

impl<K: 'static, V: 'static> PostgresStore<K, V> {
    /// Connects to the server at `url` (a libpq key/value string such as
    /// `host=/tmp/pg port=5432 user=app dbname=app`, or a `postgresql://` URL) and uses table
    /// `table`, created if missing, with the [`Raw`] codec for keys and values.
    ///
    /// # Errors
    /// As [`PostgresStoreBuilder::connect`].
    pub fn connect(url: &str, table: &str) -> Result<Self, StoreError>
    where
        Raw: Codec<K> + Codec<V>,
    {
        Self::builder(url, table, Raw, Raw).connect()
    }

    /// Options for a store at `url` over `table` with the given key and value codecs.
    pub fn builder(
        url: &str,
        table: &str,
        key_codec: impl Codec<K>,
        value_codec: impl Codec<V>,
    ) -> PostgresStoreBuilder<K, V> {
        PostgresStoreBuilder {
            url: url.to_string(),
            table: table.to_string(),
            key_codec: Arc::new(key_codec),
            value_codec: Arc::new(value_codec),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            constraints: Vec::new(),
        }
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Removes tombstones (rows of deleted keys) older than `version`; see
    /// [`SqliteStore::purge_tombstones`](super::SqliteStore::purge_tombstones) for when that
    /// is safe. Returns the number of rows removed.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the server cannot be reached.
    pub fn purge_tombstones(&self, version: u64) -> Result<u64, StoreError> {
        let version = db_version(version).unwrap_or(i64::MAX);
        let mut slot = self.writer.lock();
        let conn = self.conn(&mut slot)?;
        match conn.client.execute(&self.sql.purge, &[&version]) {
            Ok(n) => Ok(n),
            Err(e) => Err(store_error(e, &mut slot)),
        }
    }

    fn open(&self) -> Result<Conn, StoreError> {
        let client = self
            .config
            .connect(NoTls)
            .map_err(|e| StoreError::unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
        self.prepare(client)
    }

    fn prepare(&self, mut client: Client) -> Result<Conn, StoreError> {
        let mut prep = |sql: &str| {
            client.prepare(sql).map_err(|e| {
                StoreError::unavailable(format!(
                    "cannot prepare statements for table {}: {e}",
                    self.table
                ))
            })
        };
        let upsert = prep(&self.sql.upsert)?;
        let load_one = prep(&self.sql.load_one)?;
        let load_many = prep(&self.sql.load_many)?;
        Ok(Conn {
            client,
            upsert,
            load_one,
            load_many,
        })
    }

    /// The live connection in `slot`, opening a new one if there is none or it was closed.
    fn conn<'a>(&self, slot: &'a mut Option<Conn>) -> Result<&'a mut Conn, StoreError> {
        if slot.as_ref().is_some_and(|c| c.client.is_closed()) {
            *slot = None;
        }
        let conn = match slot.take() {
            Some(c) => c,
            None => self.open()?,
        };
        Ok(slot.insert(conn))
    }

    /// Runs a read on the reader connection. Reads are idempotent, so when a connection that
    /// was already open fails as unavailable (the server restarted since its last use and
    /// the first query on it finds the old session gone) the read is tried once more on a
    /// fresh connection before the error reaches the caller.
    fn read<T>(
        &self,
        f: impl Fn(&mut Conn) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut slot = self.reader.lock();
        let reused = slot.as_ref().is_some_and(|c| !c.client.is_closed());
        let conn = self.conn(&mut slot)?;
        match f(conn) {
            Ok(t) => Ok(t),
            Err(e) => {
                let err = store_error(e, &mut slot);
                if !(reused && err.is_unavailable()) {
                    return Err(err);
                }
                let conn = self.conn(&mut slot)?;
                f(conn).map_err(|e| store_error(e, &mut slot))
            }
        }
    }

    fn decode_value(&self, bytes: Option<Vec<u8>>) -> Result<V, StoreError> {
        let bytes = bytes.ok_or_else(|| {
            StoreError::rejected(format!("table {}: a live row has a NULL value", self.table))
        })?;
        self.value_codec.decode(&bytes).map_err(|e| {
            StoreError::rejected(format!(
                "table {}: a stored value does not decode: {e}",
                self.table
            ))
        })
    }

    fn encode(&self, index: usize, w: &Write<K, V>) -> Result<Row, StoreError> {
        let key = self
            .key_codec
            .encode(w.key())
            .map_err(StoreError::rejected)?;
        let value = match w.value() {
            Some(v) => Some(self.value_codec.encode(v).map_err(StoreError::rejected)?),
            None => None,
        };
        Ok(Row {
            index,
            key,
            value,
            version: db_version(w.version())?,
        })
    }

    /// Replays `rows` in one transaction, one savepoint per row, collecting rejected rows.
    ///
    /// Deferred constraints (`DEFERRABLE INITIALLY DEFERRED` foreign keys and constraint
    /// triggers) would fire at `COMMIT`, where the row at fault cannot be told apart: the
    /// replay makes them immediate, so each fires at the end of its own row's statement,
    /// inside that row's savepoint. If the `COMMIT` still fails on a data error, the rows are
    /// applied one transaction each instead.
    fn isolate(
        conn: &mut Conn,
        rows: &[Row],
        failed: &mut Vec<(usize, StoreError)>,
    ) -> Result<(), postgres::Error> {
        let Conn { client, upsert, .. } = conn;
        let mut found = Vec::new();
        let mut tx = client.transaction()?;
        tx.batch_execute("SET CONSTRAINTS ALL IMMEDIATE")?;
        for row in rows {
            let mut sp = tx.savepoint("writebehind_row")?;
            match row.upsert(&mut sp, upsert) {
                Ok(_) => sp.commit()?,
                Err(e) if is_record_error(&e) => {
                    sp.rollback()?;
                    found.push((row.index, StoreError::rejected(e)));
                }
                Err(e) => return Err(e),
            }
        }
        match tx.commit() {
            Ok(()) => {
                failed.append(&mut found);
                Ok(())
            }
            Err(e) if is_record_error(&e) => Self::one_by_one(client, upsert, rows, failed),
            Err(e) => Err(e),
        }
    }

    /// Applies each row in its own (implicit) transaction, so that a constraint checked at
    /// commit fails the row that broke it and no other.
    fn one_by_one(
        client: &mut Client,
        upsert: &Statement,
        rows: &[Row],
        failed: &mut Vec<(usize, StoreError)>,
    ) -> Result<(), postgres::Error> {
        for row in rows {
            match row.upsert(client, upsert) {
                Ok(_) => {}
                Err(e) if is_record_error(&e) => failed.push((row.index, StoreError::rejected(e))),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl<K, V> Store<K, V> for PostgresStore<K, V>
where
    K: 'static,
    V: 'static,
{
    fn load(&self, key: &K) -> Result<Option<V>, StoreError> {
        let key = self.key_codec.encode(key).map_err(StoreError::rejected)?;
        let row = self.read(|conn| conn.client.query_opt(&conn.load_one, &[&key]))?;
        match row {
            None => Ok(None),
            Some(row) => {
                let bytes: Option<Vec<u8>> = row.try_get(0).map_err(StoreError::rejected)?;
                self.decode_value(bytes).map(Some)
            }
        }
    }

    fn load_all(&self, keys: &[K]) -> Result<Vec<(K, V)>, StoreError>
    where
        K: Clone,
    {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut encoded = Vec::with_capacity(keys.len());
        for k in keys {
            encoded.push(self.key_codec.encode(k).map_err(StoreError::rejected)?);
        }
        let rows = self.read(|conn| conn.client.query(&conn.load_many, &[&encoded]))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let k: Vec<u8> = row.try_get(0).map_err(StoreError::rejected)?;
            let v: Option<Vec<u8>> = row.try_get(1).map_err(StoreError::rejected)?;
            let key = self.key_codec.decode(&k).map_err(|e| {
                StoreError::rejected(format!(
                    "table {}: a stored key does not decode: {e}",
                    self.table
                ))
            })?;
            out.push((key, self.decode_value(v)?));
        }
        Ok(out)
    }

    fn write_all(&self, batch: &[Write<K, V>]) -> Result<(), BatchError> {
        let mut failed = Vec::new();
        let mut rows = Vec::with_capacity(batch.len());
        for (i, w) in batch.iter().enumerate() {
            match self.encode(i, w) {
                Ok(row) => rows.push(row),
                Err(e) => failed.push((i, e)),
            }
        }
        sort_and_dedup(&mut rows);
        if !rows.is_empty() {
            let keys: Vec<&[u8]> = rows.iter().map(|r| &r.key[..]).collect();
            let values: Vec<Option<&[u8]>> = rows.iter().map(|r| r.value.as_deref()).collect();
            let versions: Vec<i64> = rows.iter().map(|r| r.version).collect();
            let deleted: Vec<bool> = rows.iter().map(|r| r.value.is_none()).collect();

            let mut slot = self.writer.lock();
            let conn = self.conn(&mut slot).map_err(BatchError::from)?;
            let done = conn
                .client
                .execute(&conn.upsert, &[&keys, &values, &versions, &deleted]);
            match done {
                Ok(_) => {}
                Err(e) if is_record_error(&e) => {
                    if let Err(e) = Self::isolate(conn, &rows, &mut failed) {
                        return Err(BatchError::from(store_error(e, &mut slot)));
                    }
                }
                Err(e) => return Err(BatchError::from(store_error(e, &mut slot))),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            failed.sort_by_key(|(i, _)| *i);
            Err(BatchError::Partial(failed))
        }
    }
}

impl<K, V> fmt::Debug for PostgresStore<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(index: usize, key: &[u8], version: i64) -> Row {
        Row {
            index,
            key: key.to_vec(),
            value: Some(vec![index as u8]),
            version,
        }
    }

    #[test]
    fn rows_go_out_in_key_byte_order_with_their_batch_indices() {
        let mut rows = vec![
            row(0, &[9], 1),
            row(1, &[1, 0], 1),
            row(2, &[0, 255], 1),
            row(3, &[1], 1),
            row(4, &[], 1),
        ];
        sort_and_dedup(&mut rows);
        let order: Vec<(usize, Vec<u8>)> = rows.iter().map(|r| (r.index, r.key.clone())).collect();
        assert_eq!(
            order,
            vec![
                (4, vec![]),
                (2, vec![0, 255]),
                (3, vec![1]),
                (1, vec![1, 0]),
                (0, vec![9]),
            ]
        );
    }

    #[test]
    fn of_several_writes_of_a_key_the_newest_is_sent() {
        let mut rows = vec![
            row(0, b"b", 3),
            row(1, b"a", 1),
            row(2, b"b", 7),
            row(3, b"a", 1),
            row(4, b"b", 5),
        ];
        sort_and_dedup(&mut rows);
        let kept: Vec<(usize, i64)> = rows.iter().map(|r| (r.index, r.version)).collect();
        assert_eq!(kept, vec![(1, 1), (2, 7)]);
    }

    #[test]
    fn only_data_and_constraint_errors_blame_the_row() {
        for code in [
            "22001", "22021", "22P02", "23502", "23503", "23505", "23514",
        ] {
            assert!(is_record_state(code), "{code}");
        }
        // Deadlock, serialization failure, statement timeout, admin shutdown, undefined
        // table, out of memory: retried, never blamed on a row.
        for code in [
            "40P01", "40001", "57014", "57P01", "42P01", "53200", "08006",
        ] {
            assert!(!is_record_state(code), "{code}");
        }
    }
}

//! [`PostgresStore`]: a version-guarded key/value table in a PostgreSQL database.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use postgres::error::SqlState;
use postgres::{Client, Config, GenericClient, NoTls, Statement};

use super::codec::{Codec, Raw};
use super::{db_version, quote_ident};
use crate::error::{BatchError, StoreError};
use crate::store::{Applied, Store, Write};

/// How long connecting may take before the call fails as [`StoreError::Unavailable`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one statement (a batch's upsert, a load) may run before the server cancels it
/// and the call fails as [`StoreError::Unavailable`] (SQLSTATE `57014`). It bounds waits
/// for locks held by other clients too.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a TCP connection may be idle before the client sends the first keepalive probe.
pub const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(30);

/// Time between two keepalive probes that went unanswered.
pub const DEFAULT_KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);

/// Unanswered keepalive probes after which the connection is closed.
pub const DEFAULT_KEEPALIVES_RETRIES: u32 = 3;

/// How long data sent on a TCP connection may stay unacknowledged before the connection is
/// closed (the `TCP_USER_TIMEOUT` socket option; Linux only).
pub const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);

/// The `postgres` client's own `keepalives_idle` when the connection string sets none.
const CLIENT_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

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
/// * An existing table is checked at connect: one with a missing column, a column of the
///   wrong type or no unique `key` is refused then, with a message that names the table and
///   each mismatch (see [`PostgresStoreBuilder::connect`]).
/// * Every call is bounded in time: a statement timeout (30 s by default) on the server,
///   TCP keepalives (first probe after 30 s idle) and a TCP user timeout (60 s) on the
///   connection, and a connect timeout (5 s). A call that runs into one of them fails as
///   [`StoreError::Unavailable`]; see [`PostgresStoreBuilder`] for the settings.
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
    /// Run on every new connection before anything else (the statement timeout).
    on_connect: Option<String>,
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
    /// The upsert of no rows, planned and not run: the server resolves its `ON CONFLICT
    /// (key)` target then, so this fails (`42P10`) on a table where `key` is not unique.
    explain_upsert: String,
    load_one: String,
    load_many: String,
    /// The stored versions of some keys (live or deleted).
    versions_of: String,
    purge: String,
}

impl Sql {
    fn new(table: &str) -> Self {
        let t = quote_ident(table);
        let upsert = |rows: &str| {
            format!(
                "INSERT INTO {t} AS t (key, value, version, deleted) \
                 SELECT * FROM {rows} \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, \
                 version = EXCLUDED.version, deleted = EXCLUDED.deleted \
                 WHERE t.version < EXCLUDED.version"
            )
        };
        Sql {
            upsert: upsert("unnest($1::bytea[], $2::bytea[], $3::int8[], $4::bool[])"),
            explain_upsert: format!(
                "EXPLAIN {}",
                upsert("unnest('{}'::bytea[], '{}'::bytea[], '{}'::int8[], '{}'::bool[])")
            ),
            load_one: format!("SELECT value FROM {t} WHERE key = $1 AND NOT deleted"),
            load_many: format!("SELECT key, value FROM {t} WHERE key = ANY($1) AND NOT deleted"),
            versions_of: format!("SELECT key, version FROM {t} WHERE key = ANY($1)"),
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
///
/// # Timeouts
/// Without them, a connection whose server vanished without closing it (a host that lost
/// power, a network partition, a firewall dropping the flow) blocks the flusher and every
/// read-through until the operating system gives up, which takes hours. The defaults:
///
/// | setting | default | what it bounds |
/// | --- | --- | --- |
/// | [`connect_timeout`](Self::connect_timeout) | [`DEFAULT_CONNECT_TIMEOUT`], 5 s | opening a connection |
/// | [`statement_timeout`](Self::statement_timeout) | [`DEFAULT_STATEMENT_TIMEOUT`], 30 s | one statement on the server, lock waits included |
/// | [`keepalives_idle`](Self::keepalives_idle) | [`DEFAULT_KEEPALIVES_IDLE`], 30 s | idle time before the first TCP keepalive probe |
/// | [`keepalives_interval`](Self::keepalives_interval) | [`DEFAULT_KEEPALIVES_INTERVAL`], 10 s | time between unanswered probes |
/// | [`keepalives_retries`](Self::keepalives_retries) | [`DEFAULT_KEEPALIVES_RETRIES`], 3 | unanswered probes before the connection is closed |
/// | [`tcp_user_timeout`](Self::tcp_user_timeout) | [`DEFAULT_TCP_USER_TIMEOUT`], 60 s | data sent and not acknowledged (Linux) |
///
/// With these, a call on a dead connection fails as [`StoreError::Unavailable`] within
/// about a minute (the cache keeps the writes and retries), and the next call opens a new
/// connection. The keepalive and TCP settings apply to TCP connections, not to Unix
/// sockets.
///
/// Each setting can also come from the connection string (`connect_timeout=10`,
/// `keepalives_idle=60`, `keepalives=0`, `options='-c statement_timeout=5s'`, ...); a value
/// there is kept unless the builder method is called, which takes precedence. Setting the
/// statement timeout with a role's or database's default (`ALTER ROLE ... SET
/// statement_timeout`) needs `options` or the builder method too, as the store otherwise
/// sets its default on every connection.
///
/// # Examples
/// ```no_run
/// use std::time::Duration;
/// use writebehind::stores::{PostgresStore, Raw};
///
/// let store = PostgresStore::<u64, String>::builder(
///     "host=db.internal port=5432 user=app dbname=app",
///     "kv",
///     Raw,
///     Raw,
/// )
/// .connect_timeout(Duration::from_secs(3))
/// .statement_timeout(Duration::from_secs(10))
/// .keepalives_idle(Duration::from_secs(15))
/// .connect()?;
/// # Ok::<(), writebehind::StoreError>(())
/// ```
pub struct PostgresStoreBuilder<K, V> {
    url: String,
    table: String,
    key_codec: Arc<dyn Codec<K>>,
    value_codec: Arc<dyn Codec<V>>,
    connect_timeout: Option<Duration>,
    statement_timeout: Option<Duration>,
    keepalives: Option<bool>,
    keepalives_idle: Option<Duration>,
    keepalives_interval: Option<Duration>,
    keepalives_retries: Option<u32>,
    tcp_user_timeout: Option<Duration>,
    constraints: Vec<String>,
}

impl<K: 'static, V: 'static> PostgresStoreBuilder<K, V> {
    /// How long opening a connection may take before it fails as
    /// [`StoreError::Unavailable`]. Default [`DEFAULT_CONNECT_TIMEOUT`], or the connection
    /// string's `connect_timeout`.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// How long one statement may run on the server, waiting for locks included, before the
    /// server cancels it and the call fails as [`StoreError::Unavailable`] (SQLSTATE `57014`,
    /// retried by the cache). Default [`DEFAULT_STATEMENT_TIMEOUT`], or a `statement_timeout`
    /// in the connection string's `options`. [`Duration::ZERO`] turns the timeout off.
    ///
    /// It is PostgreSQL's `statement_timeout` setting, set on each new connection, in
    /// milliseconds (a nonzero duration shorter than 1 ms counts as 1 ms). Keep it well above
    /// the time the largest batch (the cache's `max_batch` rows) takes: a batch that always
    /// runs past it fails every time it is retried.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// Whether TCP keepalive probes are sent on idle connections. Default `true` (unless the
    /// connection string says `keepalives=0`).
    pub fn keepalives(mut self, on: bool) -> Self {
        self.keepalives = Some(on);
        self
    }

    /// How long a connection may be idle before the first keepalive probe. Default
    /// [`DEFAULT_KEEPALIVES_IDLE`] (the client library's own default is two hours), or the
    /// connection string's `keepalives_idle`.
    pub fn keepalives_idle(mut self, idle: Duration) -> Self {
        self.keepalives_idle = Some(idle);
        self
    }

    /// Time between keepalive probes that go unanswered. Default
    /// [`DEFAULT_KEEPALIVES_INTERVAL`], or the connection string's `keepalives_interval`.
    pub fn keepalives_interval(mut self, interval: Duration) -> Self {
        self.keepalives_interval = Some(interval);
        self
    }

    /// Unanswered keepalive probes after which the connection is closed. Default
    /// [`DEFAULT_KEEPALIVES_RETRIES`], or the connection string's `keepalives_retries`.
    pub fn keepalives_retries(mut self, retries: u32) -> Self {
        self.keepalives_retries = Some(retries);
        self
    }

    /// How long data sent may stay unacknowledged before the connection is closed (Linux
    /// `TCP_USER_TIMEOUT`; ignored elsewhere): it covers a server that vanishes while a
    /// batch is being sent, which keepalives do not. Default [`DEFAULT_TCP_USER_TIMEOUT`], or
    /// the connection string's `tcp_user_timeout`.
    pub fn tcp_user_timeout(mut self, timeout: Duration) -> Self {
        self.tcp_user_timeout = Some(timeout);
        self
    }

    /// Adds a table constraint (SQL, such as `CHECK (deleted OR length(value) <= 4096)`) to
    /// the `CREATE TABLE` statement. It has no effect on a table that already exists.
    pub fn table_constraint(mut self, sql: impl Into<String>) -> Self {
        self.constraints.push(sql.into());
        self
    }

    /// The client configuration: the connection string with the builder's settings and
    /// the defaults applied.
    fn config(&self) -> Result<Config, StoreError> {
        let mut config: Config = self.url.parse().map_err(|e| {
            StoreError::rejected(format!("invalid PostgreSQL connection string: {e}"))
        })?;
        if let Some(t) = self.connect_timeout.or(config
            .get_connect_timeout()
            .is_none()
            .then_some(DEFAULT_CONNECT_TIMEOUT))
        {
            config.connect_timeout(t);
        }
        if let Some(on) = self.keepalives {
            config.keepalives(on);
        }
        // The client reports its own two-hour default when the string sets none.
        if let Some(idle) = self
            .keepalives_idle
            .or((config.get_keepalives_idle() == CLIENT_KEEPALIVES_IDLE)
                .then_some(DEFAULT_KEEPALIVES_IDLE))
        {
            config.keepalives_idle(idle);
        }
        if let Some(interval) = self.keepalives_interval.or(config
            .get_keepalives_interval()
            .is_none()
            .then_some(DEFAULT_KEEPALIVES_INTERVAL))
        {
            config.keepalives_interval(interval);
        }
        if let Some(retries) = self.keepalives_retries.or(config
            .get_keepalives_retries()
            .is_none()
            .then_some(DEFAULT_KEEPALIVES_RETRIES))
        {
            config.keepalives_retries(retries);
        }
        if let Some(t) = self.tcp_user_timeout.or(config
            .get_tcp_user_timeout()
            .is_none()
            .then_some(DEFAULT_TCP_USER_TIMEOUT))
        {
            config.tcp_user_timeout(t);
        }
        Ok(config)
    }

    /// The statement run on each new connection, if any: `SET statement_timeout`, unless
    /// the connection string's `options` set it and the builder method was not called.
    fn on_connect(&self, config: &Config) -> Option<String> {
        let timeout = match self.statement_timeout {
            Some(t) => t,
            None if config
                .get_options()
                .is_some_and(|o| o.contains("statement_timeout")) =>
            {
                return None
            }
            None => DEFAULT_STATEMENT_TIMEOUT,
        };
        let ms = if timeout.is_zero() {
            0
        } else {
            timeout.as_millis().clamp(1, i32::MAX as u128)
        };
        Some(format!("SET statement_timeout = {ms}"))
    }

    /// Connects, creates the table if it is missing, checks that an existing table has the
    /// columns the adapter writes, and prepares the statements.
    ///
    /// The check wants `key bytea` (the primary key, or unique on its own through a
    /// constraint or an index), `value bytea` (nullable), `version bigint`, `deleted
    /// boolean`, and no other `NOT NULL` column without a default; other columns, indexes,
    /// constraints and triggers are allowed.
    ///
    /// # Errors
    /// [`StoreError::Rejected`] for a malformed connection string, or a table that exists
    /// with a schema the adapter cannot use (the message names the table and every
    /// mismatch); [`StoreError::Unavailable`] when the server cannot be reached or the table
    /// cannot be created or inspected.
    pub fn connect(self) -> Result<PostgresStore<K, V>, StoreError> {
        let config = self.config()?;
        let on_connect = self.on_connect(&config);
        let store = PostgresStore {
            config,
            on_connect,
            writer: Mutex::new(None),
            reader: Mutex::new(None),
            sql: Sql::new(&self.table),
            table: self.table,
            key_codec: self.key_codec,
            value_codec: self.value_codec,
            _types: PhantomData,
        };
        let mut client = store.client()?;
        client
            .batch_execute(&Sql::create(&store.table, &self.constraints))
            .map_err(|e| {
                StoreError::unavailable(format!("cannot create table {}: {e}", store.table))
            })?;
        let problems = schema_problems(&mut client, &store.table, &store.sql).map_err(|e| {
            StoreError::unavailable(format!(
                "cannot read the schema of table {}: {}",
                store.table,
                db_message(&e)
            ))
        })?;
        if !problems.is_empty() {
            return Err(StoreError::rejected(format!(
                "PostgreSQL table {} does not fit the adapter: {}; it needs {NEEDED}",
                store.table,
                problems.join("; ")
            )));
        }
        *store.writer.lock() = Some(store.prepare(client)?);
        *store.reader.lock() = Some(store.open()?);
        Ok(store)
    }
}

/// The columns the adapter writes, as the message of a schema mismatch states them.
const NEEDED: &str = "key bytea PRIMARY KEY (or UNIQUE), value bytea (nullable), \
                      version bigint, deleted boolean, and no other NOT NULL column without \
                      a default";

/// The server's message for a database error, the client's text for any other.
fn db_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// What keeps `table` (as the adapter names it, `schema.table` allowed) from working with
/// the adapter's statements; empty when it fits.
///
/// The adapter needs `key bytea` unique on its own (the `ON CONFLICT (key)` target),
/// `value bytea` nullable (a delete writes `NULL`), `version bigint` (the version guard
/// compares it) and `deleted boolean`, and no other column it would have to fill. The
/// columns come from `information_schema`; whether `key` is unique is asked of the
/// planner, which knows about unique indexes as well as constraints.
fn schema_problems(
    client: &mut Client,
    table: &str,
    sql: &Sql,
) -> Result<Vec<String>, postgres::Error> {
    let parts: Vec<&str> = table.split('.').collect();
    let name = parts[parts.len() - 1];
    let schema = parts.len().checked_sub(2).map(|i| parts[i]);
    let kind = client.query_opt(
        "SELECT table_type::text FROM information_schema.tables \
         WHERE table_schema = coalesce($1::text, current_schema()) AND table_name = $2",
        &[&schema, &name],
    )?;
    match kind.map(|r| r.try_get::<_, String>(0)).transpose()? {
        None => {
            return Ok(vec![format!(
                "{table} is not in information_schema.tables (is it visible to this user?)"
            )])
        }
        Some(kind) if kind != "BASE TABLE" => {
            return Ok(vec![format!(
                "{table} is a {}, not a table",
                kind.to_lowercase()
            )])
        }
        Some(_) => {}
    }
    let columns = client.query(
        "SELECT column_name::text, data_type::text, is_nullable = 'YES', \
         column_default IS NOT NULL OR is_identity = 'YES' OR is_generated <> 'NEVER' \
         FROM information_schema.columns \
         WHERE table_schema = coalesce($1::text, current_schema()) AND table_name = $2 \
         ORDER BY ordinal_position",
        &[&schema, &name],
    )?;
    let columns: Vec<(String, String, bool, bool)> = columns
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
        .collect::<Result<_, postgres::Error>>()?;
    let find = |n: &str| columns.iter().find(|c| c.0 == n);
    let mut problems = Vec::new();
    for (n, needed) in [
        ("key", "bytea"),
        ("value", "bytea"),
        ("version", "bigint"),
        ("deleted", "boolean"),
    ] {
        match find(n) {
            None => problems.push(format!("no column {n}")),
            Some(c) if c.1 != needed => {
                problems.push(format!("column {n} has type {}, not {needed}", c.1))
            }
            Some(_) => {}
        }
    }
    if find("value").is_some_and(|c| !c.2) {
        problems.push("column value is NOT NULL, but a delete writes NULL".to_string());
    }
    for (n, _, nullable, filled) in &columns {
        let needed = ["key", "value", "version", "deleted"].contains(&n.as_str());
        if !needed && !nullable && !filled {
            problems.push(format!(
                "column {n} is NOT NULL without a default, and the adapter does not write it"
            ));
        }
    }
    if find("key").is_some() {
        match client.batch_execute(&sql.explain_upsert) {
            Ok(()) => {}
            Err(e) if e.code() == Some(&SqlState::INVALID_COLUMN_REFERENCE) => problems
                .push("column key is neither the primary key nor unique on its own".to_string()),
            // Class 42 (syntax error or access rule violation): the upsert does not apply
            // to this table; the column problems above usually say why.
            Err(e) if e.code().is_some_and(|c| c.code().starts_with("42")) => {
                if problems.is_empty() {
                    problems.push(format!("the upsert does not apply: {}", db_message(&e)));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(problems)
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
            connect_timeout: None,
            statement_timeout: None,
            keepalives: None,
            keepalives_idle: None,
            keepalives_interval: None,
            keepalives_retries: None,
            tcp_user_timeout: None,
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
    /// The purge is one statement, under the store's statement timeout: on a table with
    /// many tombstones, purge in steps of increasing `version`, or give the store a longer
    /// timeout ([`PostgresStoreBuilder::statement_timeout`]).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the server cannot be reached or the statement runs
    /// past the statement timeout.
    pub fn purge_tombstones(&self, version: u64) -> Result<u64, StoreError> {
        let version = db_version(version).unwrap_or(i64::MAX);
        let mut slot = self.writer.lock();
        let conn = self.conn(&mut slot)?;
        match conn.client.execute(&self.sql.purge, &[&version]) {
            Ok(n) => Ok(n),
            Err(e) => Err(store_error(e, &mut slot)),
        }
    }

    /// A new connection, with the statement timeout set.
    fn client(&self) -> Result<Client, StoreError> {
        let mut client = self
            .config
            .connect(NoTls)
            .map_err(|e| StoreError::unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
        if let Some(sql) = &self.on_connect {
            client.batch_execute(sql).map_err(|e| {
                StoreError::unavailable(format!(
                    "cannot set the statement timeout on a new PostgreSQL connection: {e}"
                ))
            })?;
        }
        Ok(client)
    }

    /// A new connection with the statements prepared.
    fn open(&self) -> Result<Conn, StoreError> {
        self.prepare(self.client()?)
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
    /// fresh connection before the error reaches the caller. A read the server cancelled
    /// (statement timeout) is not tried again: it would only wait as long once more.
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
                let cancelled = e.code() == Some(&SqlState::QUERY_CANCELED);
                let err = store_error(e, &mut slot);
                if !(reused && err.is_unavailable()) || cancelled {
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

    /// The next generation of this table, from the `writebehind_generations` table of the
    /// database (created when first needed).
    fn generation(&self) -> Result<Option<u64>, StoreError> {
        let (create, next) = super::generation_sql();
        let mut slot = self.writer.lock();
        let conn = self.conn(&mut slot)?;
        let created = match conn.client.batch_execute(&create) {
            // Another process creating the table at the same moment: it exists now.
            Err(e)
                if e.code().is_some_and(|c| {
                    *c == SqlState::UNIQUE_VIOLATION
                        || *c == SqlState::DUPLICATE_TABLE
                        || *c == SqlState::DUPLICATE_OBJECT
                }) =>
            {
                Ok(())
            }
            other => other,
        };
        let row = created.and_then(|()| conn.client.query_one(&next, &[&self.table]));
        match row {
            Ok(row) => super::generation_from(row.get(0)),
            Err(e) => Err(store_error(e, &mut slot)),
        }
    }

    fn write_all(&self, batch: &[Write<K, V>]) -> Result<(), BatchError> {
        self.write_all_checked(batch).map(|_| ())
    }

    /// As `write_all`; when the upsert left rows alone (fewer rows changed than sent, or a
    /// record error made it go row by row), one more query reads the stored versions of the
    /// batch's keys, and a row whose stored version is newer is superseded.
    fn write_all_checked(&self, batch: &[Write<K, V>]) -> Result<Applied, BatchError> {
        let mut failed = Vec::new();
        let mut superseded = Vec::new();
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
            let left_alone = match done {
                Ok(changed) => changed < rows.len() as u64,
                Err(e) if is_record_error(&e) => {
                    if let Err(e) = Self::isolate(conn, &rows, &mut failed) {
                        return Err(BatchError::from(store_error(e, &mut slot)));
                    }
                    true
                }
                Err(e) => return Err(BatchError::from(store_error(e, &mut slot))),
            };
            if left_alone {
                let stored = match conn.client.query(&self.sql.versions_of, &[&keys]) {
                    Ok(stored) => stored,
                    Err(e) => return Err(BatchError::from(store_error(e, &mut slot))),
                };
                let stored: std::collections::HashMap<Vec<u8>, i64> =
                    stored.iter().map(|r| (r.get(0), r.get(1))).collect();
                for row in &rows {
                    let done = !failed.iter().any(|(i, _)| *i == row.index);
                    if done && stored.get(&row.key).is_some_and(|&v| v > row.version) {
                        superseded.push(row.index);
                    }
                }
            }
        }
        if failed.is_empty() {
            superseded.sort_unstable();
            Ok(Applied::superseded(superseded))
        } else {
            // A `Partial` cannot say which rows were superseded: they are reported failed
            // too, and the retry (in a batch without the bad rows) says it.
            failed.extend(
                superseded
                    .into_iter()
                    .map(|i| (i, StoreError::rejected(super::SUPERSEDED))),
            );
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

    fn builder(url: &str) -> PostgresStoreBuilder<u64, u64> {
        PostgresStore::builder(url, "kv", Raw, Raw)
    }

    const URL: &str = "host=/tmp port=5432 user=app dbname=app";

    #[test]
    fn timeouts_and_keepalives_default_to_the_documented_values() {
        let b = builder(URL);
        let c = b.config().unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&DEFAULT_CONNECT_TIMEOUT));
        assert!(c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), DEFAULT_KEEPALIVES_IDLE);
        assert_eq!(
            c.get_keepalives_interval(),
            Some(DEFAULT_KEEPALIVES_INTERVAL)
        );
        assert_eq!(c.get_keepalives_retries(), Some(DEFAULT_KEEPALIVES_RETRIES));
        assert_eq!(c.get_tcp_user_timeout(), Some(&DEFAULT_TCP_USER_TIMEOUT));
        assert_eq!(
            b.on_connect(&c).as_deref(),
            Some("SET statement_timeout = 30000")
        );
    }

    #[test]
    fn the_connection_string_wins_over_the_defaults() {
        let b = builder(
            "host=/tmp user=app connect_timeout=9 keepalives=0 keepalives_idle=7 \
             keepalives_interval=3 keepalives_retries=2 tcp_user_timeout=11 \
             options='-c statement_timeout=5s'",
        );
        let c = b.config().unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(9)));
        assert!(!c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(7));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(3)));
        assert_eq!(c.get_keepalives_retries(), Some(2));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(11)));
        assert_eq!(b.on_connect(&c), None);
    }

    #[test]
    fn the_builder_wins_over_the_connection_string() {
        let b = builder("host=/tmp user=app connect_timeout=9 keepalives=0 keepalives_idle=7 options='-c statement_timeout=5s'")
            .connect_timeout(Duration::from_secs(1))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(20))
            .keepalives_interval(Duration::from_secs(4))
            .keepalives_retries(6)
            .tcp_user_timeout(Duration::from_secs(25))
            .statement_timeout(Duration::from_millis(1500));
        let c = b.config().unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(1)));
        assert!(c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(20));
        assert_eq!(c.get_keepalives_interval(), Some(Duration::from_secs(4)));
        assert_eq!(c.get_keepalives_retries(), Some(6));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(25)));
        assert_eq!(
            b.on_connect(&c).as_deref(),
            Some("SET statement_timeout = 1500")
        );
    }

    #[test]
    fn statement_timeout_in_milliseconds_zero_turns_it_off() {
        let on_connect = |t: Duration| {
            let b = builder(URL).statement_timeout(t);
            let c = b.config().unwrap();
            b.on_connect(&c)
        };
        assert_eq!(
            on_connect(Duration::ZERO).as_deref(),
            Some("SET statement_timeout = 0")
        );
        assert_eq!(
            on_connect(Duration::from_micros(10)).as_deref(),
            Some("SET statement_timeout = 1")
        );
        assert_eq!(
            on_connect(Duration::from_secs(u64::MAX)).as_deref(),
            Some("SET statement_timeout = 2147483647")
        );
    }

    #[test]
    fn a_malformed_connection_string_is_rejected() {
        assert!(matches!(
            builder("host=/tmp port=notaport").config(),
            Err(StoreError::Rejected(_))
        ));
    }

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

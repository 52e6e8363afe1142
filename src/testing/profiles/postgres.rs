//! The typed `profiles` adapter on PostgreSQL: a version-guarded [`Store`] over real columns.
//!
//! A batch is one statement over typed arrays (`unnest`), so it costs one round trip
//! whatever its size. If PostgreSQL rejects a row (SQLSTATE class 22 or 23) the batch is
//! replayed one row per savepoint to isolate it. A lost connection is `Unavailable` and the
//! next call reconnects.

use std::sync::Mutex;
use std::time::Duration;

use crate::{BatchError, Store, StoreError, Write};
use postgres::{Client, Config, NoTls};

use super::Profile;

/// A version-guarded [`Store`] over the typed `profiles` table.
pub struct ProfileStore {
    /// The connection string, with keepalives that find a dead connection in about a
    /// minute (the client's own default waits two hours before the first probe).
    config: Config,
    /// `None` after a connection error: the next call reconnects.
    client: Mutex<Option<Client>>,
}

const CREATE: &str = "
    CREATE TABLE IF NOT EXISTS profiles (
        user_id BIGINT  PRIMARY KEY,
        name    TEXT    NOT NULL,
        theme   TEXT    NOT NULL CHECK (theme IN ('light', 'dark')),
        visits  BIGINT  NOT NULL CHECK (visits >= 0),
        version BIGINT  NOT NULL,
        deleted BOOLEAN NOT NULL DEFAULT FALSE
    )";

/// All rows of a batch in one statement; the `WHERE` is the version guard. Deletes travel
/// in the same arrays with `deleted = true` (their other columns are placeholders).
const UPSERT: &str = "
    INSERT INTO profiles AS p (user_id, name, theme, visits, version, deleted)
    SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::bool[])
    ON CONFLICT (user_id) DO UPDATE SET
        name    = CASE WHEN EXCLUDED.deleted THEN p.name   ELSE EXCLUDED.name   END,
        theme   = CASE WHEN EXCLUDED.deleted THEN p.theme  ELSE EXCLUDED.theme  END,
        visits  = CASE WHEN EXCLUDED.deleted THEN p.visits ELSE EXCLUDED.visits END,
        version = EXCLUDED.version,
        deleted = EXCLUDED.deleted
    WHERE p.version < EXCLUDED.version";

const LOAD: &str = "SELECT name, theme, visits FROM profiles WHERE user_id = $1 AND NOT deleted";
const LOAD_ALL: &str =
    "SELECT user_id, name, theme, visits FROM profiles WHERE user_id = ANY($1) AND NOT deleted";

/// SQLSTATE class 22 (data exception) and 23 (integrity constraint violation) concern the
/// row; everything else (connection lost, server shutting down, ...) the server.
fn is_row_error(e: &postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"))
}

fn sql_int(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::rejected(format!("{what} {v} exceeds i64::MAX")))
}

/// The batch as six column arrays.
#[derive(Default)]
struct Columns {
    ids: Vec<i64>,
    names: Vec<String>,
    themes: Vec<String>,
    visits: Vec<i64>,
    versions: Vec<i64>,
    deleted: Vec<bool>,
}

impl Columns {
    fn push(&mut self, id: i64, version: i64, p: Option<&Profile>) {
        self.ids.push(id);
        self.versions.push(version);
        self.deleted.push(p.is_none());
        self.names.push(p.map_or(String::new(), |p| p.name.clone()));
        self.themes
            .push(p.map_or("light".into(), |p| p.theme.clone()));
        self.visits.push(p.map_or(0, |p| p.visits));
    }

    fn execute(&self, client: &mut impl postgres::GenericClient) -> Result<u64, postgres::Error> {
        client.execute(
            UPSERT,
            &[
                &self.ids,
                &self.names,
                &self.themes,
                &self.visits,
                &self.versions,
                &self.deleted,
            ],
        )
    }
}

/// Set on every new connection: a statement (a batch, a load, a wait for another client's
/// lock) that runs longer fails as `Unavailable` instead of blocking.
const ON_CONNECT: &str = "SET statement_timeout = 30000";

impl ProfileStore {
    /// Connects and creates the table if it is missing.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let mut config: Config = url.parse().map_err(StoreError::rejected)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        let store = ProfileStore {
            config,
            client: Mutex::new(None),
        };
        store.with_client(|c| c.batch_execute(CREATE))?;
        Ok(store)
    }

    /// Drops and recreates the table: the load driver starts every run from scratch.
    pub fn reset(&self) -> Result<(), StoreError> {
        self.with_client(|c| {
            c.batch_execute("DROP TABLE IF EXISTS profiles")?;
            c.batch_execute(CREATE)
        })
    }

    /// Runs `f` on the connection, (re)connecting first if needed; drops the connection on
    /// any error that is not the row's fault.
    fn with_client<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut slot = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(Client::is_closed) {
            *slot = None;
        }
        let client = match slot.take() {
            Some(c) => c,
            None => {
                let mut c = self
                    .config
                    .connect(NoTls)
                    .map_err(StoreError::unavailable)?;
                c.batch_execute(ON_CONNECT)
                    .map_err(StoreError::unavailable)?;
                c
            }
        };
        let client = slot.insert(client);
        f(client).map_err(|e| {
            if is_row_error(&e) {
                StoreError::rejected(e)
            } else {
                *slot = None;
                StoreError::unavailable(e)
            }
        })
    }
}

fn profile(r: &postgres::Row, at: usize) -> Result<Profile, postgres::Error> {
    Ok(Profile {
        name: r.try_get(at)?,
        theme: r.try_get(at + 1)?,
        visits: r.try_get(at + 2)?,
    })
}

impl Store<u64, Profile> for ProfileStore {
    fn load(&self, key: &u64) -> Result<Option<Profile>, StoreError> {
        let id = sql_int(*key, "user_id")?;
        self.with_client(|c| {
            c.query_opt(LOAD, &[&id])?
                .map(|r| profile(&r, 0))
                .transpose()
        })
    }

    fn load_all(&self, keys: &[u64]) -> Result<Vec<(u64, Profile)>, StoreError> {
        let ids = keys
            .iter()
            .map(|k| sql_int(*k, "user_id"))
            .collect::<Result<Vec<i64>, _>>()?;
        self.with_client(|c| {
            c.query(LOAD_ALL, &[&ids])?
                .iter()
                .map(|r| Ok((r.try_get::<_, i64>(0)? as u64, profile(r, 1)?)))
                .collect()
        })
    }

    fn write_all(&self, batch: &[Write<u64, Profile>]) -> Result<(), BatchError> {
        let mut failed = Vec::new();
        let mut rows = Vec::new(); // (index in batch, id, version, value)
        for (i, w) in batch.iter().enumerate() {
            match sql_int(*w.key(), "user_id")
                .and_then(|id| Ok((id, sql_int(w.version(), "version")?)))
            {
                Ok((id, version)) => rows.push((i, id, version, w.value())),
                Err(e) => failed.push((i, e)),
            }
        }
        // In key order: two writers whose batches share rows lock them in the same order
        // and cannot deadlock each other. Each row keeps its index into the batch.
        rows.sort_unstable_by_key(|(_, id, _, _)| *id);
        let mut all = Columns::default();
        for (_, id, version, value) in &rows {
            all.push(*id, *version, *value);
        }
        match self.with_client(|c| all.execute(c)) {
            Ok(_) => {}
            Err(StoreError::Unavailable(e)) => return Err(BatchError::Unavailable(e)),
            // Some row is bad: replay one row per savepoint to find which.
            Err(StoreError::Rejected(_)) => {
                let isolated = self.with_client(|c| {
                    let mut tx = c.transaction()?;
                    // A deferred constraint fires at the end of its row's statement, inside
                    // the row's savepoint, rather than failing the COMMIT for every row.
                    tx.batch_execute("SET CONSTRAINTS ALL IMMEDIATE")?;
                    for (i, id, version, value) in &rows {
                        let mut one = Columns::default();
                        one.push(*id, *version, *value);
                        let mut sp = tx.savepoint("row")?;
                        match one.execute(&mut sp) {
                            Ok(_) => sp.commit()?,
                            Err(e) if is_row_error(&e) => {
                                sp.rollback()?;
                                failed.push((*i, StoreError::rejected(e)));
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    tx.commit()
                });
                isolated.map_err(BatchError::from)?;
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

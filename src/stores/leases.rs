//! [`PgLeases`]: partition leases in a PostgreSQL table, for deployments without a router
//! that assigns partitions (see docs/SCALING.md).

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use postgres::{Client, NoTls};

use crate::error::StoreError;

/// The lease table: a row per partition, its holder, when the lease expires (the server's
/// clock) and its fence (raised each time the partition changes hands).
const TABLE: &str = "writebehind_leases";

/// Leases on partitions, held by one named holder (an instance), in PostgreSQL.
///
/// A lease is granted by the server, on the server's clock: a partition is taken only when
/// it is free, expired, or already this holder's. A holder must stop serving a partition
/// before its lease can expire on the server: every answer says how long the leases it
/// returns can be trusted ([`Leases::valid_until`]), measured from before the request was
/// sent, on this process's monotonic clock, minus a margin for the two clocks' rates. Renew
/// well before that ([`PgLeases::renew`]); hand every partition it no longer holds to
/// [`Cache::release_partitions`](crate::Cache::release_partitions), and every new one to
/// [`Cache::acquire_partitions`](crate::Cache::acquire_partitions), which also takes a new
/// generation, so the new holder's writes outrank a late write of the last one.
///
/// # Examples
/// ```no_run
/// use std::time::Duration;
/// use writebehind::stores::PgLeases;
/// let leases = PgLeases::connect("host=/tmp user=postgres", "instance-a", Duration::from_secs(10))?;
/// let got = leases.acquire(&[0, 1, 2, 3])?;        // the ones free or expired
/// // ... cache.acquire_partitions(&got.partitions) ...
/// let kept = leases.renew()?;                      // every few seconds
/// // ... cache.release_partitions(the ones missing from kept.partitions) ...
/// # Ok::<(), writebehind::StoreError>(())
/// ```
pub struct PgLeases {
    client: Mutex<Client>,
    holder: String,
    ttl: Duration,
}

/// What [`PgLeases::acquire`] or [`PgLeases::renew`] left this holder with.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Leases {
    /// The partitions this holder leases now, sorted.
    pub partitions: Vec<u32>,
    /// Until when (this process's monotonic clock) the leases may be trusted: the lease time
    /// counted from before the request, less a tenth for clock-rate differences.
    pub valid_until: Instant,
}

impl std::fmt::Debug for PgLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLeases")
            .field("holder", &self.holder)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::unavailable(format!("lease table {TABLE}: {}", db.message())),
        None => StoreError::unavailable(format!("lease table {TABLE}: {e}")),
    }
}

impl PgLeases {
    /// Connects as `holder` (a name unique to the instance), with leases lasting `ttl` on the
    /// server, and creates the lease table if it is missing.
    ///
    /// # Errors
    /// [`StoreError::Rejected`] for an empty holder name or a lease time under 100 ms;
    /// [`StoreError::Unavailable`] when the server cannot be reached.
    pub fn connect(url: &str, holder: &str, ttl: Duration) -> Result<Self, StoreError> {
        if holder.is_empty() {
            return Err(StoreError::rejected("a lease holder needs a name"));
        }
        if ttl < Duration::from_millis(100) {
            return Err(StoreError::rejected(format!(
                "a lease time of {ttl:?} is too short to renew in time; use 100 ms or more"
            )));
        }
        let mut client = Client::connect(url, NoTls)
            .map_err(|e| StoreError::unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (partition INTEGER PRIMARY KEY, \
             holder TEXT NOT NULL, expires_at TIMESTAMPTZ NOT NULL, fence BIGINT NOT NULL)"
        );
        if let Err(e) = client.batch_execute(&create) {
            // Another holder creating the table at the same moment: it exists now.
            let raced = e.code().is_some_and(|c| {
                *c == postgres::error::SqlState::UNIQUE_VIOLATION
                    || *c == postgres::error::SqlState::DUPLICATE_TABLE
                    || *c == postgres::error::SqlState::DUPLICATE_OBJECT
            });
            if !raced {
                return Err(unavailable(e));
            }
        }
        Ok(PgLeases {
            client: Mutex::new(client),
            holder: holder.to_string(),
            ttl,
        })
    }

    /// The lease time as the server's interval, in microseconds.
    fn micros(&self) -> i64 {
        i64::try_from(self.ttl.as_micros()).unwrap_or(i64::MAX)
    }

    /// How long an answer to a request sent at `sent` may be trusted.
    fn valid_until(&self, sent: Instant) -> Instant {
        sent + self.ttl.mul_f64(0.9)
    }

    /// Takes the partitions of `parts` that are free, expired or already this holder's
    /// (renewing those), and renews every other lease this holder has; returns all it holds.
    /// A partition that changes hands gets a higher fence.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the server cannot be reached: then trust no lease
    /// past the last answer's `valid_until`.
    pub fn acquire(&self, parts: &[u32]) -> Result<Leases, StoreError> {
        let sent = Instant::now();
        let parts: Vec<i32> = parts.iter().map(|&p| p as i32).collect();
        let take = format!(
            "INSERT INTO {TABLE} AS l (partition, holder, expires_at, fence) \
             SELECT p, $2, now() + make_interval(secs => $3::float8 / 1e6), 1 FROM unnest($1::int4[]) AS p \
             ON CONFLICT (partition) DO UPDATE SET holder = EXCLUDED.holder, \
             expires_at = EXCLUDED.expires_at, \
             fence = CASE WHEN l.holder = EXCLUDED.holder THEN l.fence ELSE l.fence + 1 END \
             WHERE l.holder = EXCLUDED.holder OR l.expires_at < now()"
        );
        let mut client = self.client.lock();
        let mut tx = client.transaction().map_err(unavailable)?;
        tx.execute(&take, &[&parts, &self.holder, &(self.micros() as f64)])
            .map_err(unavailable)?;
        let held = Self::renew_in(&mut tx, &self.holder, self.micros())?;
        tx.commit().map_err(unavailable)?;
        Ok(Leases {
            partitions: held,
            valid_until: self.valid_until(sent),
        })
    }

    /// Extends this holder's unexpired leases; returns the partitions it still holds. A lease
    /// that expired is not renewed (another holder may have it by now): stop serving it.
    ///
    /// # Errors
    /// As [`PgLeases::acquire`].
    pub fn renew(&self) -> Result<Leases, StoreError> {
        let sent = Instant::now();
        let mut client = self.client.lock();
        let mut tx = client.transaction().map_err(unavailable)?;
        let held = Self::renew_in(&mut tx, &self.holder, self.micros())?;
        tx.commit().map_err(unavailable)?;
        Ok(Leases {
            partitions: held,
            valid_until: self.valid_until(sent),
        })
    }

    fn renew_in(
        tx: &mut postgres::Transaction<'_>,
        holder: &str,
        micros: i64,
    ) -> Result<Vec<u32>, StoreError> {
        let renew = format!(
            "UPDATE {TABLE} SET expires_at = now() + make_interval(secs => $2::float8 / 1e6) \
             WHERE holder = $1 AND expires_at >= now() RETURNING partition"
        );
        let rows = tx
            .query(&renew, &[&holder, &(micros as f64)])
            .map_err(unavailable)?;
        let mut held: Vec<u32> = rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect();
        held.sort_unstable();
        Ok(held)
    }

    /// Gives up this holder's leases of `parts` at once (after
    /// [`Cache::release_partitions`](crate::Cache::release_partitions) returned), so another
    /// holder need not wait for them to expire.
    ///
    /// # Errors
    /// As [`PgLeases::acquire`].
    pub fn release(&self, parts: &[u32]) -> Result<(), StoreError> {
        let parts: Vec<i32> = parts.iter().map(|&p| p as i32).collect();
        let sql = format!(
            "UPDATE {TABLE} SET expires_at = '-infinity' WHERE holder = $1 AND partition = ANY($2)"
        );
        self.client
            .lock()
            .execute(&sql, &[&self.holder, &parts])
            .map_err(unavailable)?;
        Ok(())
    }

    /// The fence of each partition this holder leases (raised each time a partition changes
    /// hands), for diagnostics and for stores that check a fence of their own.
    ///
    /// # Errors
    /// As [`PgLeases::acquire`].
    pub fn fences(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        let sql = format!(
            "SELECT partition, fence FROM {TABLE} WHERE holder = $1 AND expires_at >= now() \
             ORDER BY partition"
        );
        let rows = self
            .client
            .lock()
            .query(&sql, &[&self.holder])
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i32>(0) as u32, r.get::<_, i64>(1) as u64))
            .collect())
    }
}

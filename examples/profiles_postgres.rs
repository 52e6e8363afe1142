//! A `Store` for an application's own typed schema, on PostgreSQL.
//!
//! ```sql
//! profiles(user_id BIGINT PRIMARY KEY, name TEXT, theme TEXT, visits BIGINT,
//!          version BIGINT NOT NULL, deleted BOOLEAN NOT NULL DEFAULT FALSE)
//! ```
//!
//! A batch is one statement over typed arrays (`unnest`), so it costs one round trip
//! whatever its size. If PostgreSQL rejects a row (SQLSTATE class 22 or 23) the batch is
//! replayed one row per savepoint to isolate it. A lost connection is `Unavailable` and the
//! next call reconnects. The adapter is `src/testing/profiles/postgres.rs`, the one the load
//! driver (`cargo run --release --features demo -- --postgres URL`) runs; see
//! docs/ADAPTERS.md. This example exercises it the way a cache's flusher would, in a fresh
//! `profiles` table.
//!
//! Run: `source .ci/pg.sh && pg_start && cargo run --example profiles_postgres --features demo`

use postgres::{Client, NoTls};
use writebehind::testing::profiles::{exercise, postgres::ProfileStore};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("WRITEBEHIND_PG_URL")
        .map_err(|_| "set WRITEBEHIND_PG_URL (source .ci/pg.sh && pg_start)")?;
    Client::connect(&url, NoTls)?.batch_execute("DROP TABLE IF EXISTS profiles")?;
    let store = ProfileStore::connect(&url)?;
    exercise(&store)
}

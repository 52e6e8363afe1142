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
//! next call reconnects. The adapter is in `src/bin/writebehind-demo/pg_profiles.rs`. See
//! docs/ADAPTERS.md.
//!
//! Run: `source .ci/pg.sh && pg_start && cargo run --example profiles_postgres --features postgres`

// The adapter lives with the load driver (`cargo run --release`), which uses it; this example
// includes the same files, so the code shown here is the code that runs there.
#[allow(dead_code)]
#[path = "../src/bin/writebehind-demo/pg_profiles.rs"]
mod pg_profiles;
#[allow(dead_code)] // the driver uses more of it than this example does
#[path = "../src/bin/writebehind-demo/profile.rs"]
mod profile;

pub use pg_profiles::ProfileStore;
pub use profile::Profile;
#[path = "common/profile_checks.rs"]
mod profile_checks;

use postgres::{Client, NoTls};

/// Exercises the adapter against the server at `url`, in a fresh `profiles` table.
pub fn demo(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    Client::connect(url, NoTls)?.batch_execute("DROP TABLE IF EXISTS profiles")?;
    let store = ProfileStore::connect(url)?;
    profile_checks::exercise(&store)
}

#[allow(dead_code)] // also compiled into tests/postgres_store.rs, which calls `demo`
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("WRITEBEHIND_PG_URL")
        .map_err(|_| "set WRITEBEHIND_PG_URL (source .ci/pg.sh && pg_start)")?;
    demo(&url)
}

//! A `Store` for an application's own typed schema, on SQLite.
//!
//! The generic adapters in `writebehind::stores` keep opaque bytes. An application that
//! wants real columns (to query them, index them, join them) writes a small adapter like the
//! one this example runs, for its table:
//!
//! ```sql
//! profiles(user_id INTEGER PRIMARY KEY, name TEXT, theme TEXT, visits INTEGER,
//!          version INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0)
//! ```
//!
//! The `version` column and its guard make redelivered and reordered batches harmless; the
//! `deleted` column keeps a tombstone so a late, older put cannot resurrect a deleted user.
//! The adapter is `src/testing/profiles/sqlite.rs`, the one the load driver
//! (`cargo run --release --features demo`) runs; see docs/ADAPTERS.md for the checklist
//! every adapter follows. This example exercises it the way a cache's flusher would:
//! version guard, rejected-record isolation, tombstones and `load_all`.
//!
//! Run: `cargo run --example profiles_sqlite --features demo`

use writebehind::testing::profiles::{exercise, sqlite::ProfileStore};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = ProfileStore::open(&dir.path().join("profiles.db"))?;
    exercise(&store)
}

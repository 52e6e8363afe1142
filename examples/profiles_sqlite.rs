//! A `Store` for an application's own typed schema, on SQLite.
//!
//! The generic adapters in `writebehind::stores` keep opaque bytes. An application that
//! wants real columns (to query them, index them, join them) writes a small adapter like this
//! one for its table:
//!
//! ```sql
//! profiles(user_id INTEGER PRIMARY KEY, name TEXT, theme TEXT, visits INTEGER,
//!          version INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0)
//! ```
//!
//! The `version` column and its guard make redelivered and reordered batches harmless; the
//! `deleted` column keeps a tombstone so a late, older put cannot resurrect a deleted user.
//! The adapter is in `src/bin/writebehind-demo/sqlite_profiles.rs`. See docs/ADAPTERS.md for the checklist every adapter follows.
//!
//! Run: `cargo run --example profiles_sqlite --features sqlite`

// The adapter lives with the load driver (`cargo run --release`), which uses it; this example
// includes the same files, so the code shown here is the code that runs there.
#[allow(dead_code)] // the driver uses more of it than this example does
#[path = "../src/bin/writebehind-demo/profile.rs"]
mod profile;
#[allow(dead_code)]
#[path = "../src/bin/writebehind-demo/sqlite_profiles.rs"]
mod sqlite_profiles;

pub use profile::Profile;
pub use sqlite_profiles::ProfileStore;
#[path = "common/profile_checks.rs"]
mod profile_checks;

use std::path::Path;

/// Exercises the adapter the way a cache's flusher would; `main` runs it.
pub fn demo(path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let store = ProfileStore::open(path)?;
    profile_checks::exercise(&store)
}

#[allow(dead_code)] // also compiled into tests/typed_schema.rs, which calls `demo`
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    demo(&dir.path().join("profiles.db"))
}

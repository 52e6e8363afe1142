//! The typed `profiles` adapter on SQLite, which the load driver runs and
//! examples/profiles_sqlite.rs shows, passes the example's checks against a real SQLite file.
#![cfg(feature = "demo")]

use writebehind::testing::profiles::{exercise, sqlite::ProfileStore};

#[test]
fn typed_profiles_adapter_example_holds() {
    let dir = tempfile::tempdir().unwrap();
    let store = ProfileStore::open(&dir.path().join("profiles.db")).unwrap();
    exercise(&store).unwrap();
}

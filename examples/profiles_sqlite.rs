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

use std::path::Path;

use writebehind::{BatchError, Store, Write};

/// Exercises the adapter the way a cache's flusher would; `main` runs it.
pub fn demo(path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let store = ProfileStore::open(path)?;
    let ada = Profile {
        name: "Ada".into(),
        theme: "dark".into(),
        visits: 1,
    };
    let bob = Profile {
        name: "Bob".into(),
        theme: "light".into(),
        visits: 7,
    };
    store.write_all(&[
        Write::Put {
            key: 1,
            value: ada.clone(),
            version: 100,
        },
        Write::Put {
            key: 2,
            value: bob.clone(),
            version: 100,
        },
    ])?;

    // A redelivered, older batch changes nothing.
    let stale = Profile {
        visits: 0,
        ..ada.clone()
    };
    store.write_all(&[Write::Put {
        key: 1,
        value: stale,
        version: 99,
    }])?;
    assert_eq!(store.load(&1)?, Some(ada.clone()));

    // A record the schema rejects is isolated; the rest of its batch commits.
    let bad = Profile {
        theme: "neon".into(),
        ..bob.clone()
    };
    let more = Profile {
        visits: 8,
        ..bob.clone()
    };
    match store.write_all(&[
        Write::Put {
            key: 3,
            value: bad,
            version: 101,
        },
        Write::Put {
            key: 2,
            value: more.clone(),
            version: 101,
        },
    ]) {
        Err(BatchError::Partial(failed)) => {
            assert_eq!(failed.len(), 1);
            assert_eq!(failed[0].0, 0);
            println!("rejected as expected: {}", failed[0].1);
        }
        other => return Err(format!("expected a partial failure, got {other:?}").into()),
    }
    assert_eq!(store.load(&2)?, Some(more.clone()));

    // Deletes leave a tombstone that an older put cannot undo.
    store.write_all(&[Write::Delete {
        key: 1,
        version: 102,
    }])?;
    store.write_all(&[Write::Put {
        key: 1,
        value: ada,
        version: 101,
    }])?;
    assert_eq!(store.load(&1)?, None);

    let mut all = store.load_all(&[1, 2, 3])?;
    all.sort_by_key(|(k, _)| *k);
    assert_eq!(all, vec![(2, more)]);
    println!("profiles: {all:?}");
    Ok(())
}

#[allow(dead_code)] // also compiled into tests/typed_schema.rs, which calls `demo`
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    demo(&dir.path().join("profiles.db"))
}

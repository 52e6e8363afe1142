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

use postgres::{Client, NoTls};
use writebehind::{BatchError, Store, Write};

/// Exercises the adapter against the server at `url`, in a fresh `profiles` table.
pub fn demo(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    Client::connect(url, NoTls)?.batch_execute("DROP TABLE IF EXISTS profiles")?;
    let store = ProfileStore::connect(url)?;
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
            assert_eq!(failed.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0]);
            println!("rejected as expected: {}", failed[0].1);
        }
        other => return Err(format!("expected a partial failure, got {other:?}").into()),
    }
    assert_eq!(store.load(&2)?, Some(more.clone()));

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

#[allow(dead_code)] // also compiled into tests/postgres_store.rs, which calls `demo`
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("WRITEBEHIND_PG_URL")
        .map_err(|_| "set WRITEBEHIND_PG_URL (source .ci/pg.sh && pg_start)")?;
    demo(&url)
}

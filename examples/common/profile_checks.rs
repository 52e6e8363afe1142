//! The checks both typed-schema examples run against their adapter, the way a cache's flusher
//! would use it: included as a child module of each example (`super::Profile` is the
//! example's profile type).

use writebehind::{BatchError, Store, Write};

use super::Profile;

/// Version guard, rejected-record isolation, tombstones and `load_all` on `store`, which
/// starts with an empty `profiles` table.
pub fn exercise(store: &impl Store<u64, Profile>) -> Result<(), Box<dyn std::error::Error>> {
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

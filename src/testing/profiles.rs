//! The typed `profiles` schema of the portal-personalization case: the value type
//! ([`Profile`]), a version-guarded adapter for it on SQLite ([`sqlite::ProfileStore`]) and on
//! PostgreSQL ([`postgres::ProfileStore`]), and the checks such an adapter must pass
//! ([`exercise`]).
//!
//! Support code of the load driver, compiled with the `demo` feature only and not part of the
//! API: the driver (`src/bin/writebehind-demo`) runs its load against these adapters, the
//! examples `profiles_sqlite` and `profiles_postgres` run [`exercise`] on them, and so do the
//! tests. Each adapter is a model for an application's own typed adapter (see
//! docs/ADAPTERS.md): real columns, a version guard, tombstones, and rejected rows isolated.

pub mod postgres;
pub mod sqlite;

use crate::{BatchError, Store, Write};

/// One row of `profiles`, without its key (`user_id`) and version: the value type of the
/// cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// Display name.
    pub name: String,
    /// `light` or `dark` (the table's CHECK constraint rejects anything else).
    pub theme: String,
    /// Visit counter, never negative (also a CHECK constraint).
    pub visits: i64,
}

/// A [`Codec`](crate::stores::Codec) for [`Profile`], for the load driver's journal: the
/// visits (8 bytes, big-endian), the name's length (4 bytes) and the name, then the theme.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProfileCodec;

impl crate::stores::Codec<Profile> for ProfileCodec {
    fn encode(&self, p: &Profile) -> Result<Vec<u8>, crate::stores::CodecError> {
        let name_len = u32::try_from(p.name.len()).map_err(|_| "a name of 4 GiB or more")?;
        let mut out = Vec::with_capacity(12 + p.name.len() + p.theme.len());
        out.extend_from_slice(&p.visits.to_be_bytes());
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(p.name.as_bytes());
        out.extend_from_slice(p.theme.as_bytes());
        Ok(out)
    }

    fn decode(&self, b: &[u8]) -> Result<Profile, crate::stores::CodecError> {
        let short = || "a profile record shorter than its header".to_string();
        let visits = i64::from_be_bytes(b.get(..8).ok_or_else(short)?.try_into()?);
        let name_len = u32::from_be_bytes(b.get(8..12).ok_or_else(short)?.try_into()?) as usize;
        let name = b.get(12..12 + name_len).ok_or_else(short)?;
        let theme = &b[12 + name_len..];
        Ok(Profile {
            name: String::from_utf8(name.to_vec())?,
            theme: String::from_utf8(theme.to_vec())?,
            visits,
        })
    }
}

/// What [`exercise`] can fail with.
type CheckError = Box<dyn std::error::Error>;

/// Version guard, rejected-record isolation, tombstones and `load_all` on `store`, which
/// starts with an empty `profiles` table: what a cache's flusher relies on.
pub fn exercise(store: &impl Store<u64, Profile>) -> Result<(), CheckError> {
    let (ada, bob) = (profile("Ada", "dark", 1), profile("Bob", "light", 7));
    store.write_all(&[put(1, &ada, 100), put(2, &bob, 100)])?;
    older_versions_change_nothing(store, &ada)?;
    let bob = rejected_records_are_isolated(store, &bob)?;
    deletes_leave_a_tombstone(store, &ada)?;

    let mut all = store.load_all(&[1, 2, 3])?;
    all.sort_by_key(|(k, _)| *k);
    assert_eq!(all, vec![(2, bob)]);
    println!("profiles: {all:?}");
    Ok(())
}

fn profile(name: &str, theme: &str, visits: i64) -> Profile {
    Profile {
        name: name.into(),
        theme: theme.into(),
        visits,
    }
}

fn put(key: u64, value: &Profile, version: u64) -> Write<u64, Profile> {
    Write::Put {
        key,
        value: value.clone(),
        version,
    }
}

/// A redelivered, older batch for user 1 (`ada` at version 100) changes nothing.
fn older_versions_change_nothing(
    store: &impl Store<u64, Profile>,
    ada: &Profile,
) -> Result<(), CheckError> {
    let stale = Profile {
        visits: 0,
        ..ada.clone()
    };
    store.write_all(&[put(1, &stale, 99)])?;
    assert_eq!(store.load(&1)?, Some(ada.clone()));
    Ok(())
}

/// A record the schema rejects (a theme outside its CHECK constraint) is isolated; the rest
/// of its batch, an update of user 2 (`bob`), commits. Returns user 2's new profile.
fn rejected_records_are_isolated(
    store: &impl Store<u64, Profile>,
    bob: &Profile,
) -> Result<Profile, CheckError> {
    let bad = Profile {
        theme: "neon".into(),
        ..bob.clone()
    };
    let more = Profile {
        visits: 8,
        ..bob.clone()
    };
    match store.write_all(&[put(3, &bad, 101), put(2, &more, 101)]) {
        Err(BatchError::Partial(failed)) => {
            assert_eq!(failed.len(), 1);
            assert_eq!(failed[0].0, 0);
            println!("rejected as expected: {}", failed[0].1);
        }
        other => return Err(format!("expected a partial failure, got {other:?}").into()),
    }
    assert_eq!(store.load(&2)?, Some(more.clone()));
    Ok(more)
}

/// Deleting user 1 leaves a tombstone that an older put of `ada` cannot undo.
fn deletes_leave_a_tombstone(
    store: &impl Store<u64, Profile>,
    ada: &Profile,
) -> Result<(), CheckError> {
    store.write_all(&[Write::Delete {
        key: 1,
        version: 102,
    }])?;
    store.write_all(&[put(1, ada, 101)])?;
    assert_eq!(store.load(&1)?, None);
    Ok(())
}

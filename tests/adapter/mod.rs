//! What the tests of the two database adapters (`sqlite_store.rs`, `postgres_store.rs`)
//! share: their records, a codec that refuses one value, and the checks every adapter passes
//! whatever its database (each test file adds what only its database can show, such as the
//! raw row).
#![allow(dead_code)]

use writebehind::stores::{Codec, CodecError, Raw};
use writebehind::{BatchError, Store, StoreError, Write};

pub fn put(key: u64, value: &str, version: u64) -> Write<u64, String> {
    Write::Put {
        key,
        value: value.to_string(),
        version,
    }
}

pub fn del(key: u64, version: u64) -> Write<u64, String> {
    Write::Delete { key, version }
}

/// The indices of a `Partial` failure, all of them rejected records.
pub fn failed_indices(e: BatchError) -> Vec<usize> {
    match e {
        BatchError::Partial(f) => {
            assert!(
                f.iter().all(|(_, e)| matches!(e, StoreError::Rejected(_))),
                "{f:?}"
            );
            f.into_iter().map(|(i, _)| i).collect()
        }
        other => panic!("expected Partial, got {other:?}"),
    }
}

/// A value codec that cannot encode `"poison"`.
pub struct Picky;

impl Codec<String> for Picky {
    fn encode(&self, value: &String) -> Result<Vec<u8>, CodecError> {
        if value == "poison" {
            return Err("cannot encode poison".into());
        }
        Raw.encode(value)
    }
    fn decode(&self, bytes: &[u8]) -> Result<String, CodecError> {
        Raw.decode(bytes)
    }
}

/// The version guard: an older put or delete of key 1, written at version 10, changes
/// nothing.
pub fn older_writes_are_ignored(store: &impl Store<u64, String>) {
    store.write_all(&[put(1, "new", 10)]).unwrap();
    store.write_all(&[put(1, "old", 9)]).unwrap();
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("new"));
    store.write_all(&[del(1, 5)]).unwrap();
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("new"));
}

/// A batch delivered again (a retry after an unknown outcome) changes nothing.
pub fn redelivered_batches_change_nothing(store: &impl Store<u64, String>) {
    let batch = vec![put(1, "a", 5), put(2, "b", 5), del(3, 5)];
    store.write_all(&batch).unwrap();
    store.write_all(&[put(2, "b2", 6)]).unwrap();
    store.write_all(&batch).unwrap();
    store.write_all(&batch).unwrap();
    let mut all = store.load_all(&[1, 2, 3]).unwrap();
    all.sort();
    assert_eq!(all, vec![(1, "a".to_string()), (2, "b2".to_string())]);
}

/// On a store whose value codec is [`Picky`]: a value the codec refuses and a version past
/// `i64::MAX` are rejected records, and the rest of their batch commits.
pub fn unencodable_records_are_rejected(store: &impl Store<u64, String>) {
    let err = store
        .write_all(&[put(1, "poison", 1), put(2, "b", u64::MAX), put(3, "c", 1)])
        .unwrap_err();
    assert_eq!(failed_indices(err), vec![0, 1]);
    assert_eq!(store.load(&3).unwrap().as_deref(), Some("c"));
    assert_eq!(store.load(&1).unwrap(), None);
}

/// Puts, deletes and loads work on a table the application made itself.
pub fn writes_and_reads_back(store: &impl Store<u64, String>) {
    store.write_all(&[put(1, "a", 1), del(2, 1)]).unwrap();
    store.write_all(&[put(1, "b", 2)]).unwrap();
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("b"));
    assert_eq!(store.load(&2).unwrap(), None);
}

//! `SqliteStore` against real SQLite database files.
#![cfg(feature = "sqlite")]

mod adapter;

use std::path::Path;
use std::time::Duration;

use adapter::{del, failed_indices, put, Picky};
use rusqlite::Connection;
use writebehind::stores::{Raw, SqliteStore};
use writebehind::{BatchError, Store, StoreError, Write};

fn open(dir: &Path) -> SqliteStore<u64, String> {
    SqliteStore::open(dir.join("t.db"), "kv").expect("open store")
}

/// (value or None if tombstoned, version, deleted) straight from the file.
fn raw_row(path: &Path, table: &str, key: u64) -> Option<(Option<Vec<u8>>, i64, i64)> {
    let conn = Connection::open(path).unwrap();
    conn.query_row(
        &format!("SELECT value, version, deleted FROM {table} WHERE key = ?1"),
        [key.to_be_bytes().to_vec()],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .ok()
}

#[test]
fn upserts_load_and_survive_reopen_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .write_all(&[put(1, "a", 1), put(2, "b", 1)])
        .expect("batch");
    store.write_all(&[put(1, "a2", 2)]).expect("update");
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("a2"));
    assert_eq!(store.load(&2).unwrap().as_deref(), Some("b"));
    assert_eq!(store.load(&3).unwrap(), None);
    drop(store);

    let conn = Connection::open(dir.path().join("t.db")).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    drop(conn);

    let store = open(dir.path());
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("a2"));
    assert_eq!(raw_row(store.path(), "kv", 1).map(|r| r.1), Some(2));
}

#[test]
fn version_guard_ignores_older_puts_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    adapter::older_writes_are_ignored(&store);
    assert_eq!(raw_row(store.path(), "kv", 1).map(|r| r.1), Some(10));
}

#[test]
fn delete_keeps_a_tombstone_that_blocks_older_puts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.write_all(&[put(1, "a", 1)]).unwrap();
    store.write_all(&[del(1, 3)]).unwrap();
    assert_eq!(store.load(&1).unwrap(), None);
    assert_eq!(raw_row(store.path(), "kv", 1), Some((None, 3, 1)));

    // A put older than the delete, delivered late, stays deleted.
    store.write_all(&[put(1, "late", 2)]).unwrap();
    assert_eq!(store.load(&1).unwrap(), None);
    assert_eq!(store.load_all(&[1]).unwrap(), vec![]);

    // A delete of a key never written also leaves a tombstone.
    store.write_all(&[del(7, 5), put(7, "older", 4)]).unwrap();
    assert_eq!(store.load(&7).unwrap(), None);

    // A newer put revives the key.
    store.write_all(&[put(1, "again", 4)]).unwrap();
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("again"));
    assert_eq!(
        raw_row(store.path(), "kv", 1),
        Some((Some(b"again".to_vec()), 4, 0))
    );
}

#[test]
fn redelivered_batches_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    adapter::redelivered_batches_change_nothing(&open(dir.path()));
}

#[test]
fn load_all_spans_several_queries_and_skips_missing_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let batch: Vec<_> = (0..1_200u64).map(|k| put(k, &k.to_string(), 1)).collect();
    store.write_all(&batch).unwrap();
    store.write_all(&[del(5, 2)]).unwrap();
    let keys: Vec<u64> = (0..1_300).collect();
    let mut all = store.load_all(&keys).unwrap();
    all.sort();
    assert_eq!(all.len(), 1_199);
    assert!(all.iter().all(|(k, v)| *k != 5 && *v == k.to_string()));
    assert_eq!(store.load_all(&[]).unwrap(), vec![]);
}

#[test]
fn a_check_violation_is_isolated_and_the_rest_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::<u64, String>::builder(dir.path().join("t.db"), "kv", Raw, Raw)
        .table_constraint("CHECK (deleted = 1 OR length(value) <= 8)")
        .open()
        .unwrap();
    store.write_all(&[put(3, "three", 1)]).unwrap();
    let err = store
        .write_all(&[
            put(1, "ok", 2),
            put(2, "far too long", 2),
            del(3, 2),
            put(4, "also way too long", 2),
            put(5, "fine", 2),
        ])
        .unwrap_err();
    assert_eq!(failed_indices(err), vec![1, 3]);
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("ok"));
    assert_eq!(store.load(&2).unwrap(), None);
    assert_eq!(store.load(&3).unwrap(), None);
    assert_eq!(store.load(&5).unwrap().as_deref(), Some("fine"));
}

#[test]
fn a_record_that_rolls_back_the_transaction_is_isolated_on_replay() {
    let dir = tempfile::tempdir().unwrap();
    // ON CONFLICT ROLLBACK makes SQLite abort the whole transaction, not one statement.
    let store = SqliteStore::<u64, String>::builder(dir.path().join("t.db"), "kv", Raw, Raw)
        .table_constraint("UNIQUE (value) ON CONFLICT ROLLBACK")
        .open()
        .unwrap();
    let err = store
        .write_all(&[
            put(1, "a", 1),
            put(2, "b", 1),
            put(3, "a", 1),
            put(4, "c", 1),
        ])
        .unwrap_err();
    assert_eq!(failed_indices(err), vec![2]);
    let mut all = store.load_all(&[1, 2, 3, 4]).unwrap();
    all.sort();
    assert_eq!(all, vec![(1, "a".into()), (2, "b".into()), (4, "c".into())]);
}

#[test]
fn a_deferred_constraint_failing_at_commit_is_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE parents (id BLOB PRIMARY KEY); INSERT INTO parents VALUES (x'01');",
    )
    .unwrap();
    drop(conn);
    let store = SqliteStore::<u64, Vec<u8>>::builder(&path, "kv", Raw, Raw)
        .table_constraint(
            "FOREIGN KEY (value) REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED",
        )
        .open()
        .unwrap();
    let err = store
        .write_all(&[
            Write::Put {
                key: 1,
                value: vec![1],
                version: 1,
            },
            Write::Put {
                key: 2,
                value: vec![2],
                version: 1,
            },
            Write::Delete { key: 3, version: 1 },
        ])
        .unwrap_err();
    assert_eq!(failed_indices(err), vec![1]);
    assert_eq!(store.load(&1).unwrap(), Some(vec![1]));
    assert_eq!(store.load(&2).unwrap(), None);
}

/// Fails to encode the value "poison".

#[test]
fn codec_failures_and_oversized_versions_are_rejected_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::<u64, String>::builder(dir.path().join("t.db"), "kv", Raw, Picky)
        .open()
        .unwrap();
    adapter::unencodable_records_are_rejected(&store);
}

#[test]
fn a_stored_value_that_does_not_decode_is_rejected_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let conn = Connection::open(store.path()).unwrap();
    conn.execute(
        "INSERT INTO kv (key, value, version) VALUES (?1, x'fffe', 1)",
        [9u64.to_be_bytes().to_vec()],
    )
    .unwrap();
    assert!(matches!(store.load(&9), Err(StoreError::Rejected(_))));
    assert!(matches!(store.load_all(&[9]), Err(StoreError::Rejected(_))));
}

#[test]
fn a_locked_database_is_unavailable_and_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::<u64, String>::builder(dir.path().join("t.db"), "kv", Raw, Raw)
        .busy_timeout(Duration::from_millis(50))
        .open()
        .unwrap();
    store.write_all(&[put(1, "a", 1)]).unwrap();

    // Another process (here: connection) holds the write lock.
    let other = Connection::open(store.path()).unwrap();
    other
        .execute_batch(
            "BEGIN IMMEDIATE; INSERT INTO kv (key, value, version) VALUES (x'00', x'00', 1);",
        )
        .unwrap();
    let err = store.write_all(&[put(1, "b", 2)]).unwrap_err();
    assert!(matches!(err, BatchError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("locked"), "{err}");
    // WAL: readers are not blocked by the writer.
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("a"));

    other.execute_batch("ROLLBACK").unwrap();
    store.write_all(&[put(1, "b", 2)]).unwrap();
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("b"));
}

#[test]
fn an_unopenable_path_is_unavailable_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/t.db");
    let err = SqliteStore::<u64, String>::open(&path, "kv").unwrap_err();
    assert!(err.is_unavailable());
    assert!(err.to_string().contains("no/such/dir"), "{err}");
}

#[test]
fn purge_tombstones_removes_only_old_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .write_all(&[put(1, "a", 1), del(2, 5), del(3, 20)])
        .unwrap();
    assert_eq!(store.purge_tombstones(10).unwrap(), 1);
    assert_eq!(raw_row(store.path(), "kv", 2), None);
    assert!(raw_row(store.path(), "kv", 3).is_some());
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("a"));
}

#[test]
fn in_memory_database_works() {
    let store = SqliteStore::<String, Vec<u8>>::open(":memory:", "kv").unwrap();
    store
        .write_all(&[Write::Put {
            key: "k".into(),
            value: vec![1, 2],
            version: 1,
        }])
        .unwrap();
    assert_eq!(store.load(&"k".to_string()).unwrap(), Some(vec![1, 2]));
}

/// Opens a store over table `kv` of a database where `ddl` made the table beforehand, and
/// returns the error message (or panics if the open succeeds).
fn open_err(ddl: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    Connection::open(&path).unwrap().execute_batch(ddl).unwrap();
    match SqliteStore::<u64, String>::open(&path, "kv") {
        Ok(_) => panic!("opened a table made by {ddl:?}"),
        Err(e) => {
            assert!(matches!(e, StoreError::Rejected(_)), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains("table kv"), "{msg}");
            msg
        }
    }
}

#[test]
fn a_table_with_the_wrong_schema_is_refused_at_open() {
    let cases = [
        // (table, what the message must say)
        (
            "CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB, version INTEGER NOT NULL)",
            "no column deleted",
        ),
        (
            "CREATE TABLE kv (k BLOB PRIMARY KEY, v BLOB, version INTEGER, deleted INTEGER)",
            "no column key",
        ),
        (
            "CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB, version INTEGER, deleted INTEGER)",
            "column key has type TEXT",
        ),
        (
            "CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB, version TEXT, deleted INTEGER)",
            "column version has type TEXT",
        ),
        (
            "CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB, version INTEGER, deleted BOOLEAN_TEXT)",
            "column deleted has type BOOLEAN_TEXT",
        ),
        (
            "CREATE TABLE kv (key BLOB, value BLOB, version INTEGER, deleted INTEGER)",
            "key is neither the primary key nor unique",
        ),
        (
            "CREATE TABLE kv (key BLOB, value BLOB, version INTEGER, deleted INTEGER, \
             PRIMARY KEY (key, version))",
            "key is neither the primary key nor unique",
        ),
        (
            "CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB NOT NULL, version INTEGER, \
             deleted INTEGER)",
            "column value is NOT NULL",
        ),
        (
            "CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB, version INTEGER, \
             deleted INTEGER, owner TEXT NOT NULL)",
            "column owner is NOT NULL without a default",
        ),
        (
            "CREATE TABLE other (x); CREATE VIEW kv AS SELECT x AS key, x AS value, \
             x AS version, x AS deleted FROM other",
            "is a view",
        ),
    ];
    for (ddl, expected) in cases {
        let msg = open_err(ddl);
        assert!(
            msg.contains(expected),
            "{ddl}\n=> {msg}\n(expected {expected:?})"
        );
    }
    // Several problems are all named at once.
    let msg = open_err("CREATE TABLE kv (key INTEGER, value TEXT NOT NULL, version REAL)");
    for part in [
        "column key has type INTEGER",
        "column value has type TEXT",
        "column value is NOT NULL",
        "column version has type REAL",
        "no column deleted",
    ] {
        assert!(msg.contains(part), "{msg} (expected {part:?})");
    }
}

#[test]
fn a_compatible_table_made_by_hand_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            // A rowid table, key unique through an index, other type names of the same
            // affinity, and extra columns the adapter does not write.
            "CREATE TABLE app_kv (id INTEGER PRIMARY KEY, key BLOB NOT NULL, value, \
             version BIGINT NOT NULL, deleted NUMERIC NOT NULL DEFAULT 0, \
             note TEXT, created INTEGER NOT NULL DEFAULT 0); \
             CREATE UNIQUE INDEX app_kv_key ON app_kv (key);",
        )
        .unwrap();
    let store = SqliteStore::<u64, String>::open(&path, "main.app_kv").unwrap();
    adapter::writes_and_reads_back(&store);
}

//! `PostgresStore` against a real PostgreSQL server.
//!
//! The server comes from `WRITEBEHIND_PG_URL` (`source .ci/pg.sh && pg_start` sets it up).
//! Without it the tests print a skip message and pass, except under `CI`, where they fail:
//! CI must not go green without having talked to a server. The outage test also needs
//! `WRITEBEHIND_PG_CTL` (a pg_ctl command prefix) to stop and start the server.
#![cfg(feature = "postgres")]

mod adapter;

mod pg;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use adapter::{del, failed_indices, put, Picky};
use pg::{need, Outage};
use postgres::{Client, NoTls};
use writebehind::stores::{PostgresStore, Raw};
use writebehind::{BatchError, Store, StoreError, Write};

/// The tests share one server and one of them stops it: run them one at a time.
static SERVER: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERVER.lock().unwrap_or_else(|e| e.into_inner())
}

fn drop_table(url: &str, table: &str) {
    let mut c = Client::connect(url, NoTls).expect("connect for setup");
    c.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .expect("drop table");
}

fn fresh(url: &str, table: &str) -> PostgresStore<u64, String> {
    drop_table(url, table);
    PostgresStore::connect(url, table).expect("connect store")
}

/// (value, version, deleted) straight from the table.
fn raw_row(url: &str, table: &str, key: u64) -> Option<(Option<Vec<u8>>, i64, bool)> {
    let mut c = Client::connect(url, NoTls).expect("connect for inspection");
    c.query_opt(
        &format!("SELECT value, version, deleted FROM {table} WHERE key = $1"),
        &[&key.to_be_bytes().to_vec()],
    )
    .expect("select")
    .map(|r| (r.get(0), r.get(1), r.get(2)))
}

#[test]
fn upserts_and_loads_in_one_statement_per_batch() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let store = fresh(&url, "wb_test_upserts");
    let batch: Vec<_> = (0..2_000u64).map(|k| put(k, &k.to_string(), 1)).collect();
    store.write_all(&batch).expect("batch");
    store
        .write_all(&[put(1, "one", 2), del(2, 2)])
        .expect("update");
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("one"));
    assert_eq!(store.load(&2).unwrap(), None);
    assert_eq!(store.load(&5_000).unwrap(), None);
    let keys: Vec<u64> = (0..2_100).collect();
    let mut all = store.load_all(&keys).unwrap();
    all.sort();
    assert_eq!(all.len(), 1_999);
    assert_eq!(all[0], (0, "0".to_string()));
    assert_eq!(all[1], (1, "one".to_string()));
    assert_eq!(store.load_all(&[]).unwrap(), vec![]);
    assert_eq!(
        raw_row(&url, "wb_test_upserts", 1),
        Some((Some(b"one".to_vec()), 2, false))
    );
}

#[test]
fn version_guard_ignores_older_puts_and_deletes() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let store = fresh(&url, "wb_test_guard");
    adapter::older_writes_are_ignored(&store);
    assert_eq!(raw_row(&url, "wb_test_guard", 1).map(|r| r.1), Some(10));
}

#[test]
fn delete_keeps_a_tombstone_that_blocks_older_puts() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let store = fresh(&url, "wb_test_tombstone");
    store.write_all(&[put(1, "a", 1)]).unwrap();
    store.write_all(&[del(1, 3)]).unwrap();
    assert_eq!(raw_row(&url, "wb_test_tombstone", 1), Some((None, 3, true)));
    store.write_all(&[put(1, "late", 2)]).unwrap();
    assert_eq!(store.load(&1).unwrap(), None);
    assert_eq!(store.load_all(&[1]).unwrap(), vec![]);

    store.write_all(&[del(7, 5)]).unwrap();
    store.write_all(&[put(7, "older", 4)]).unwrap();
    assert_eq!(store.load(&7).unwrap(), None);

    store.write_all(&[put(1, "again", 4)]).unwrap();
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("again"));

    assert_eq!(store.purge_tombstones(6).unwrap(), 1);
    assert_eq!(raw_row(&url, "wb_test_tombstone", 7), None);
}

#[test]
fn redelivered_batches_are_idempotent() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    adapter::redelivered_batches_change_nothing(&fresh(&url, "wb_test_redeliver"));
}

#[test]
fn duplicate_keys_in_a_batch_keep_the_newest() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let store = fresh(&url, "wb_test_dupes");
    store
        .write_all(&[put(1, "v3", 3), put(1, "v1", 1), del(2, 1), put(2, "v2", 2)])
        .unwrap();
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("v3"));
    assert_eq!(store.load(&2).unwrap().as_deref(), Some("v2"));
}

#[test]
fn class_22_and_23_errors_reject_only_their_rows() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let table = "wb_test_rejected";
    drop_table(&url, table);
    let store = PostgresStore::<u64, Vec<u8>>::builder(&url, table, Raw, Raw)
        // 23514 check_violation
        .table_constraint("CHECK (deleted OR length(value) <= 8)")
        // 22021 character_not_in_repertoire for bytes that are not UTF-8
        .table_constraint("CHECK (deleted OR convert_from(value, 'UTF8') IS NOT NULL)")
        .connect()
        .unwrap();
    store
        .write_all(&[Write::Put {
            key: 3,
            value: b"three".to_vec(),
            version: 1,
        }])
        .unwrap();
    let err = store
        .write_all(&[
            Write::Put {
                key: 1,
                value: b"ok".to_vec(),
                version: 2,
            },
            Write::Put {
                key: 2,
                value: b"far too long".to_vec(),
                version: 2,
            },
            Write::Put {
                key: 4,
                value: vec![0xff, 0xfe],
                version: 2,
            },
            Write::Delete { key: 3, version: 2 },
            Write::Put {
                key: 5,
                value: b"fine".to_vec(),
                version: 2,
            },
        ])
        .unwrap_err();
    let BatchError::Partial(failed) = err else {
        panic!("expected Partial, got {err:?}")
    };
    let codes: Vec<(usize, String)> = failed
        .iter()
        .map(|(i, e)| {
            assert!(matches!(e, StoreError::Rejected(_)), "{e:?}");
            let code = e
                .source_error()
                .downcast_ref::<postgres::Error>()
                .and_then(|pe| pe.code())
                .map(|c| c.code().to_string())
                .unwrap_or_default();
            (*i, code)
        })
        .collect();
    assert_eq!(codes, vec![(1, "23514".into()), (2, "22021".into())]);
    assert_eq!(store.load(&1).unwrap(), Some(b"ok".to_vec()));
    assert_eq!(store.load(&2).unwrap(), None);
    assert_eq!(store.load(&3).unwrap(), None);
    assert_eq!(store.load(&4).unwrap(), None);
    assert_eq!(store.load(&5).unwrap(), Some(b"fine".to_vec()));
}

/// Fails to encode the value "poison".

#[test]
fn codec_failures_and_oversized_versions_are_rejected_records() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    drop_table(&url, "wb_test_codec");
    let store = PostgresStore::<u64, String>::builder(&url, "wb_test_codec", Raw, Picky)
        .connect()
        .unwrap();
    adapter::unencodable_records_are_rejected(&store);

    // A stored value the codec cannot read is a rejected load.
    let mut c = Client::connect(&url, NoTls).unwrap();
    c.execute(
        "INSERT INTO wb_test_codec (key, value, version) VALUES ($1, '\\xfffe', 1)",
        &[&9u64.to_be_bytes().to_vec()],
    )
    .unwrap();
    assert!(matches!(store.load(&9), Err(StoreError::Rejected(_))));
    assert!(matches!(store.load_all(&[9]), Err(StoreError::Rejected(_))));
}

#[test]
fn a_stopped_server_is_unavailable_and_the_store_reconnects() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let ctl = need!("WRITEBEHIND_PG_CTL");
    let store = fresh(&url, "wb_test_outage");
    store.write_all(&[put(1, "before", 1)]).unwrap();
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("before"));

    let mut outage = Outage::begin(ctl);
    let err = store.write_all(&[put(1, "during", 2)]).unwrap_err();
    assert!(matches!(err, BatchError::Unavailable(_)), "{err:?}");
    // Reconnecting while the server is down fails the same way.
    let err = store.write_all(&[put(1, "during", 2)]).unwrap_err();
    assert!(matches!(err, BatchError::Unavailable(_)), "{err:?}");
    assert!(store.load(&1).unwrap_err().is_unavailable());
    assert!(store.load_all(&[1]).unwrap_err().is_unavailable());
    outage.end();

    // The same store object reconnects on its next call.
    store
        .write_all(&[put(1, "during", 2), put(2, "after", 2)])
        .unwrap();
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("during"));
    let mut all = store.load_all(&[1, 2]).unwrap();
    all.sort();
    assert_eq!(all, vec![(1, "during".into()), (2, "after".into())]);
}

#[test]
fn bad_connection_strings_fail_clearly() {
    // No server needed: nothing listens on port 1.
    let err = PostgresStore::<u64, String>::builder(
        "host=127.0.0.1 port=1 user=postgres dbname=nope",
        "kv",
        Raw,
        Raw,
    )
    .connect_timeout(Duration::from_secs(2))
    .connect()
    .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().contains("cannot connect"), "{err}");

    let err = PostgresStore::<u64, String>::connect("host=/tmp port=notaport", "kv").unwrap_err();
    assert!(matches!(err, StoreError::Rejected(_)), "{err:?}");
}

/// The typed `profiles` adapter on PostgreSQL, which the load driver runs and
/// examples/profiles_postgres.rs shows, passes the example's checks in a fresh table.
#[cfg(feature = "demo")]
#[test]
fn typed_profiles_adapter_example_holds() {
    use writebehind::testing::profiles::{exercise, postgres::ProfileStore};
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    drop_table(&url, "profiles");
    exercise(&ProfileStore::connect(&url).unwrap()).unwrap();
}

/// The SQLSTATE of a rejected record's error, or "" if it carries none.
fn sqlstate(e: &StoreError) -> String {
    e.source_error()
        .downcast_ref::<postgres::Error>()
        .and_then(|pe| pe.code())
        .map(|c| c.code().to_string())
        .unwrap_or_default()
}

#[test]
fn a_deferred_foreign_key_failing_at_commit_is_isolated() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let table = "wb_test_deferred_fk";
    drop_table(&url, table);
    let mut c = Client::connect(&url, NoTls).unwrap();
    c.batch_execute(
        "DROP TABLE IF EXISTS wb_test_parents; \
         CREATE TABLE wb_test_parents (id BYTEA PRIMARY KEY); \
         INSERT INTO wb_test_parents VALUES ('\\x01');",
    )
    .unwrap();
    let store = PostgresStore::<u64, Vec<u8>>::builder(&url, table, Raw, Raw)
        .table_constraint(
            "FOREIGN KEY (value) REFERENCES wb_test_parents (id) DEFERRABLE INITIALLY DEFERRED",
        )
        .connect()
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
    let BatchError::Partial(failed) = err else {
        panic!("expected Partial, got {err:?}")
    };
    let codes: Vec<(usize, String)> = failed
        .iter()
        .map(|(i, e)| {
            assert!(matches!(e, StoreError::Rejected(_)), "{e:?}");
            (*i, sqlstate(e))
        })
        .collect();
    assert_eq!(codes, vec![(1, "23503".to_string())]);
    assert_eq!(store.load(&1).unwrap(), Some(vec![1]));
    assert_eq!(store.load(&2).unwrap(), None);
    assert!(
        raw_row(&url, table, 3).is_some_and(|r| r.2),
        "tombstone of 3"
    );
    c.batch_execute(&format!("DROP TABLE {table}; DROP TABLE wb_test_parents"))
        .unwrap();
}

#[test]
fn a_deferred_constraint_trigger_failing_at_commit_is_isolated() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let table = "wb_test_deferred_trigger";
    let store = fresh(&url, table);
    let mut c = Client::connect(&url, NoTls).unwrap();
    c.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION wb_test_no_bad() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           IF NEW.value = 'bad'::bytea THEN \
             RAISE EXCEPTION 'value bad is not allowed' USING ERRCODE = 'check_violation'; \
           END IF; \
           RETURN NULL; \
         END $$; \
         CREATE CONSTRAINT TRIGGER wb_test_no_bad AFTER INSERT OR UPDATE ON {table} \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION wb_test_no_bad();"
    ))
    .unwrap();
    let err = store
        .write_all(&[put(1, "good", 1), put(2, "bad", 1), put(3, "fine", 1)])
        .unwrap_err();
    let BatchError::Partial(failed) = err else {
        panic!("expected Partial, got {err:?}")
    };
    let codes: Vec<(usize, String)> = failed.iter().map(|(i, e)| (*i, sqlstate(e))).collect();
    assert_eq!(codes, vec![(1, "23514".to_string())]);
    assert!(failed
        .iter()
        .all(|(_, e)| matches!(e, StoreError::Rejected(_))));
    let mut all = store.load_all(&[1, 2, 3]).unwrap();
    all.sort();
    assert_eq!(all, vec![(1, "good".into()), (3, "fine".into())]);
    // An update of a good row to the bad value is isolated the same way.
    let err = store
        .write_all(&[put(1, "bad", 2), put(3, "fine2", 2)])
        .unwrap_err();
    assert_eq!(failed_indices(err), vec![0]);
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("good"));
    assert_eq!(store.load(&3).unwrap().as_deref(), Some("fine2"));
}

#[test]
fn a_commit_that_still_fails_after_the_savepoint_replay_is_isolated_row_by_row() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let table = "wb_test_commit_fallback";
    drop_table(&url, table);
    let mut c = Client::connect(&url, NoTls).unwrap();
    c.batch_execute(
        "DROP TABLE IF EXISTS wb_test_parents2; \
         CREATE TABLE wb_test_parents2 (id BYTEA PRIMARY KEY); \
         INSERT INTO wb_test_parents2 VALUES ('\\x01'), ('\\x03');",
    )
    .unwrap();
    let store = PostgresStore::<u64, Vec<u8>>::builder(&url, table, Raw, Raw)
        .table_constraint(
            "FOREIGN KEY (value) REFERENCES wb_test_parents2 (id) DEFERRABLE INITIALLY DEFERRED",
        )
        .connect()
        .unwrap();
    // A trigger that defers every constraint again, so the foreign key is checked at COMMIT
    // even in the savepoint replay.
    c.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION wb_test_defer() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN SET CONSTRAINTS ALL DEFERRED; RETURN NEW; END $$; \
         CREATE TRIGGER wb_test_defer BEFORE INSERT OR UPDATE ON {table} \
         FOR EACH ROW EXECUTE FUNCTION wb_test_defer();"
    ))
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
            Write::Put {
                key: 3,
                value: vec![3],
                version: 1,
            },
        ])
        .unwrap_err();
    let BatchError::Partial(failed) = err else {
        panic!("expected Partial, got {err:?}")
    };
    let codes: Vec<(usize, String)> = failed.iter().map(|(i, e)| (*i, sqlstate(e))).collect();
    assert_eq!(codes, vec![(1, "23503".to_string())]);
    let mut all = store.load_all(&[1, 2, 3]).unwrap();
    all.sort();
    assert_eq!(all, vec![(1, vec![1]), (3, vec![3])]);
    c.batch_execute(&format!("DROP TABLE {table}; DROP TABLE wb_test_parents2"))
        .unwrap();
}

#[test]
fn a_batch_reaches_the_table_in_key_order() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let table = "wb_test_key_order";
    let store = fresh(&url, table);
    let mut c = Client::connect(&url, NoTls).unwrap();
    // Logs every row the upsert proposes, in the order the statement processes them.
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS wb_test_order_log; \
         CREATE TABLE wb_test_order_log (n BIGSERIAL PRIMARY KEY, key BYTEA NOT NULL); \
         CREATE OR REPLACE FUNCTION wb_test_log_order() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN INSERT INTO wb_test_order_log (key) VALUES (NEW.key); RETURN NEW; END $$; \
         CREATE TRIGGER wb_test_log_order BEFORE INSERT ON {table} \
         FOR EACH ROW EXECUTE FUNCTION wb_test_log_order();"
    ))
    .unwrap();
    // Descending, then a scramble that also straddles byte boundaries (255/256, 65535/65536).
    let mut keys: Vec<u64> = (0..300u64).rev().collect();
    keys.extend([65_536, 7_000_000, 65_535, 1 << 40, 256 + 300, 1_000]);
    let batch: Vec<_> = keys.iter().map(|&k| put(k, "v", 1)).collect();
    store.write_all(&batch).unwrap();
    store
        .write_all(&[del(200, 2), put(5, "w", 2), del(100, 2)])
        .unwrap();

    let logged: Vec<u64> = c
        .query("SELECT key FROM wb_test_order_log ORDER BY n", &[])
        .unwrap()
        .iter()
        .map(|r| {
            let b: Vec<u8> = r.get(0);
            u64::from_be_bytes(b.try_into().unwrap())
        })
        .collect();
    let mut first = keys.clone();
    first.sort();
    let mut expected = first;
    expected.extend([5, 100, 200]);
    assert_eq!(logged, expected);
    c.batch_execute(&format!("DROP TABLE {table}; DROP TABLE wb_test_order_log"))
        .unwrap();
}

#[test]
fn rejected_rows_of_a_reordered_batch_keep_their_batch_indices() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let table = "wb_test_reorder_indices";
    drop_table(&url, table);
    let store = PostgresStore::<u64, String>::builder(&url, table, Raw, Raw)
        .table_constraint("CHECK (deleted OR length(value) <= 8)")
        .connect()
        .unwrap();
    let err = store
        .write_all(&[
            put(9, "far too long", 1),
            put(7, "ok", 1),
            del(5, 1),
            put(3, "also far too long", 1),
            put(1, "fine", 1),
            put(8, "more than eight", 1),
        ])
        .unwrap_err();
    assert_eq!(failed_indices(err), vec![0, 3, 5]);
    let mut all = store.load_all(&[1, 3, 5, 7, 8, 9]).unwrap();
    all.sort();
    assert_eq!(all, vec![(1, "fine".into()), (7, "ok".into())]);
}

#[test]
fn two_stores_writing_overlapping_keys_in_opposite_orders_do_not_deadlock() {
    use std::sync::{Arc, Barrier};

    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let table = "wb_test_no_deadlock";
    drop(fresh(&url, table));
    const KEYS: u64 = 2_000;
    const ROUNDS: u64 = 8;
    let barrier = Arc::new(Barrier::new(2));
    let writers: Vec<_> = [false, true]
        .into_iter()
        .map(|reverse| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                let store = PostgresStore::<u64, String>::connect(&url, table).unwrap();
                let mut errors = Vec::new();
                for round in 1..=ROUNDS {
                    let mut batch: Vec<_> = (0..KEYS)
                        .map(|k| put(k, &format!("r{round}"), round))
                        .collect();
                    if reverse {
                        batch.reverse();
                    }
                    barrier.wait();
                    if let Err(e) = store.write_all(&batch) {
                        errors.push(format!("{e:?}"));
                    }
                }
                errors
            })
        })
        .collect();
    let errors: Vec<String> = writers
        .into_iter()
        .flat_map(|h| h.join().expect("writer thread"))
        .collect();
    assert!(
        errors.is_empty(),
        "{} failed batches: {errors:?}",
        errors.len()
    );
    let store = PostgresStore::<u64, String>::connect(&url, table).unwrap();
    let all = store.load_all(&(0..KEYS).collect::<Vec<_>>()).unwrap();
    assert_eq!(all.len() as u64, KEYS);
    assert!(all.iter().all(|(_, v)| *v == format!("r{ROUNDS}")));
}

/// The SQLSTATE of a batch that failed as a whole.
fn batch_sqlstate(e: &BatchError) -> String {
    match e {
        BatchError::Unavailable(s) => s
            .downcast_ref::<postgres::Error>()
            .and_then(|pe| pe.code())
            .map(|c| c.code().to_string())
            .unwrap_or_default(),
        BatchError::Partial(_) => panic!("expected Unavailable, got {e:?}"),
    }
}

/// Waits until a statement on `table`, from any connection, waits for a lock.
fn wait_for_lock_wait(url: &str, table: &str) {
    let mut watcher = Client::connect(url, NoTls).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'",
                &[&table],
            )
            .unwrap()
            .get(0);
        if waiting > 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no statement on {table} waits for a lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_deadlock_is_unavailable_and_the_retry_applies_the_batch() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let table = "wb_test_deadlock";
    let store = fresh(&url, table);
    store.write_all(&[put(1, "a", 1), put(2, "b", 1)]).unwrap();

    // Another client locks key 2; the batch locks key 1 and waits for key 2; then the other
    // client asks for key 1. The batch waited first, so its deadlock check runs first and
    // PostgreSQL aborts it.
    let mut other = Client::connect(&url, NoTls).unwrap();
    let mut tx = other.transaction().unwrap();
    let lock = format!("UPDATE {table} SET version = version WHERE key = $1");
    tx.execute(&lock, &[&2u64.to_be_bytes().to_vec()]).unwrap();
    std::thread::scope(|s| {
        let writer = s.spawn(|| store.write_all(&[put(1, "a2", 2), put(2, "b2", 2)]));
        wait_for_lock_wait(&url, table);
        let _ = tx.execute(&lock, &[&1u64.to_be_bytes().to_vec()]);
        let err = writer.join().unwrap().unwrap_err();
        assert!(matches!(err, BatchError::Unavailable(_)), "{err:?}");
        assert_eq!(batch_sqlstate(&err), "40P01", "{err:?}");
    });
    tx.rollback().unwrap();
    store
        .write_all(&[put(1, "a2", 2), put(2, "b2", 2)])
        .unwrap();
    assert_eq!(store.load(&2).unwrap().as_deref(), Some("b2"));
}

/// Runs `f` on a scoped thread and waits up to `limit` for it; past that, calls `unblock`
/// (which must make `f` return) and fails the test.
fn within<T: Send>(limit: Duration, unblock: impl FnOnce(), f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        s.spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(limit) {
            Ok(t) => t,
            Err(_) => {
                unblock();
                panic!("still blocked after {limit:?}");
            }
        }
    })
}

#[test]
fn a_statement_blocked_past_the_statement_timeout_is_unavailable() {
    use std::time::Instant;

    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let table = "wb_test_statement_timeout";
    drop_table(&url, table);
    let timeout = Duration::from_millis(500);
    let store = PostgresStore::<u64, String>::builder(&url, table, Raw, Raw)
        .statement_timeout(timeout)
        .connect()
        .unwrap();
    store.write_all(&[put(1, "a", 1)]).unwrap();

    // Another client takes the table's strongest lock and keeps it: every statement of the
    // store on the table waits for it.
    let mut other = Client::connect(&url, NoTls).unwrap();
    other
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
        ))
        .unwrap();
    let other = Mutex::new(other);
    let release = || {
        let _ = other.lock().unwrap().batch_execute("ROLLBACK");
    };

    let (err, took) = within(Duration::from_secs(15), release, || {
        let t = Instant::now();
        (store.write_all(&[put(1, "b", 2)]), t.elapsed())
    });
    let err = err.unwrap_err();
    assert!(matches!(err, BatchError::Unavailable(_)), "{err:?}");
    assert_eq!(batch_sqlstate(&err), "57014", "{err:?}");
    assert!(took >= timeout && took < Duration::from_secs(5), "{took:?}");

    // A read-through gives up as well (and is not tried a second time).
    let (err, took) = within(Duration::from_secs(15), release, || {
        let t = Instant::now();
        (store.load(&1), t.elapsed())
    });
    let err = err.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(sqlstate(&err), "57014", "{err:?}");
    assert!(took >= timeout && took < timeout * 2, "{took:?}");

    release();
    store.write_all(&[put(1, "b", 2)]).unwrap();
    assert_eq!(store.load(&1).unwrap().as_deref(), Some("b"));
}

/// The keepalive timers (time left, from `/proc/net/tcp`) of the established TCP
/// connections to `port` on this machine.
#[cfg(target_os = "linux")]
fn keepalive_timers(port: u16) -> Vec<Duration> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let remote_port = u16::from_str_radix(f[2].rsplit(':').next()?, 16).ok()?;
            let (timer, left) = f[5].split_once(':')?;
            // State 01 is ESTABLISHED; timer 2 is the keepalive timer, in 1/100 s.
            (remote_port == port && f[3] == "01" && timer == "02").then(|| {
                Duration::from_millis(u64::from_str_radix(left, 16).unwrap_or(u64::MAX) * 10)
            })
        })
        .collect()
}

#[cfg(target_os = "linux")]
#[test]
fn tcp_connections_send_keepalives_after_the_configured_idle_time() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    // The same server over TCP on the loopback address instead of its Unix socket.
    let config: postgres::Config = url.parse().unwrap();
    let port = config.get_ports()[0];
    let tcp = format!("host=127.0.0.1 port={port} user=postgres dbname=writebehind");
    let table = "wb_test_keepalive";
    drop_table(&url, table);

    for idle in [None, Some(Duration::from_secs(12))] {
        let mut builder = PostgresStore::<u64, String>::builder(&tcp, table, Raw, Raw);
        if let Some(idle) = idle {
            builder = builder.keepalives_idle(idle);
        }
        let store = builder.connect().unwrap();
        let idle = idle.unwrap_or(writebehind::stores::DEFAULT_KEEPALIVES_IDLE);
        store.write_all(&[put(1, "a", 1)]).unwrap();
        let timers = keepalive_timers(port);
        // The writer's and the reader's connection.
        assert_eq!(timers.len(), 2, "{timers:?}");
        assert!(
            timers.iter().all(|t| *t <= idle),
            "keepalive timers {timers:?}, idle time {idle:?}"
        );
        drop(store);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Connects a store over `table` after `ddl` made it, and returns the error message (or
/// panics if the connection succeeds).
fn connect_err(url: &str, table: &str, ddl: &str) -> String {
    let mut c = Client::connect(url, NoTls).unwrap();
    c.batch_execute(&format!(
        "DO $$ BEGIN \
           IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('{table}')) = 'v' THEN \
             DROP VIEW {table}; \
           END IF; \
         END $$; \
         DROP TABLE IF EXISTS {table}; {ddl}"
    ))
    .unwrap();
    match PostgresStore::<u64, String>::connect(url, table) {
        Ok(_) => panic!("connected over a table made by {ddl:?}"),
        Err(e) => {
            assert!(matches!(e, StoreError::Rejected(_)), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains(&format!("table {table}")), "{msg}");
            msg
        }
    }
}

#[test]
fn a_table_with_the_wrong_schema_is_refused_at_connect() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let t = "wb_test_schema";
    let cases = [
        (
            "CREATE TABLE wb_test_schema (key BYTEA PRIMARY KEY, value BYTEA, version BIGINT NOT NULL)",
            "no column deleted",
        ),
        (
            "CREATE TABLE wb_test_schema (key TEXT PRIMARY KEY, value BYTEA, version BIGINT, deleted BOOLEAN)",
            "column key has type text",
        ),
        (
            "CREATE TABLE wb_test_schema (key BYTEA PRIMARY KEY, value BYTEA, version INTEGER, deleted BOOLEAN)",
            "column version has type integer",
        ),
        (
            "CREATE TABLE wb_test_schema (key BYTEA PRIMARY KEY, value BYTEA, version TEXT, deleted BOOLEAN)",
            "column version has type text",
        ),
        (
            "CREATE TABLE wb_test_schema (key BYTEA PRIMARY KEY, value BYTEA, version BIGINT, deleted SMALLINT)",
            "column deleted has type smallint",
        ),
        (
            "CREATE TABLE wb_test_schema (key BYTEA PRIMARY KEY, value BYTEA NOT NULL, version BIGINT, deleted BOOLEAN)",
            "column value is NOT NULL",
        ),
        (
            "CREATE TABLE wb_test_schema (key BYTEA, value BYTEA, version BIGINT, deleted BOOLEAN)",
            "key is neither the primary key nor unique",
        ),
        (
            "CREATE TABLE wb_test_schema (key BYTEA, value BYTEA, version BIGINT, deleted BOOLEAN, \
             PRIMARY KEY (key, version))",
            "key is neither the primary key nor unique",
        ),
        (
            "CREATE TABLE wb_test_schema (key BYTEA PRIMARY KEY, value BYTEA, version BIGINT, \
             deleted BOOLEAN, owner TEXT NOT NULL)",
            "column owner is NOT NULL without a default",
        ),
    ];
    for (ddl, expected) in cases {
        let msg = connect_err(&url, t, ddl);
        assert!(
            msg.contains(expected),
            "{ddl}\n=> {msg}\n(expected {expected:?})"
        );
    }
    let msg = connect_err(
        &url,
        t,
        "CREATE TABLE wb_test_schema (key INTEGER, value TEXT NOT NULL, version REAL)",
    );
    for part in [
        "column key has type integer",
        "column value has type text",
        "column value is NOT NULL",
        "column version has type real",
        "no column deleted",
    ] {
        assert!(msg.contains(part), "{msg} (expected {part:?})");
    }
    let msg = connect_err(
        &url,
        t,
        "DROP TABLE IF EXISTS wb_test_schema_base; \
         CREATE TABLE wb_test_schema_base (key BYTEA PRIMARY KEY, value BYTEA, version BIGINT, \
         deleted BOOLEAN); CREATE VIEW wb_test_schema AS SELECT * FROM wb_test_schema_base",
    );
    assert!(msg.contains("is a view"), "{msg}");
    let mut c = Client::connect(&url, NoTls).unwrap();
    c.batch_execute("DROP VIEW wb_test_schema; DROP TABLE wb_test_schema_base")
        .unwrap();
}

#[test]
fn a_compatible_table_made_by_hand_is_accepted() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let mut c = Client::connect(&url, NoTls).unwrap();
    // Its own schema, a mixed-case name, key unique through an index rather than a
    // constraint, and extra columns the adapter does not write.
    c.batch_execute(
        "DROP SCHEMA IF EXISTS wb_test_app CASCADE; CREATE SCHEMA wb_test_app; \
         CREATE TABLE wb_test_app.\"App KV\" (id BIGINT GENERATED ALWAYS AS IDENTITY, \
           key BYTEA NOT NULL, value BYTEA, version BIGINT NOT NULL, \
           deleted BOOLEAN NOT NULL DEFAULT FALSE, note TEXT, \
           created TIMESTAMPTZ NOT NULL DEFAULT now()); \
         CREATE UNIQUE INDEX ON wb_test_app.\"App KV\" (key);",
    )
    .unwrap();
    let store = PostgresStore::<u64, String>::connect(&url, "wb_test_app.App KV").unwrap();
    adapter::writes_and_reads_back(&store);
    c.batch_execute("DROP SCHEMA wb_test_app CASCADE").unwrap();
}

#[test]
fn generations_grow_per_table_and_fence_a_cache_built_later() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let a = fresh(&url, "wb_test_gen_a");
    let b = fresh(&url, "wb_test_gen_b");
    let first = a.generation().unwrap().unwrap();
    assert_eq!(a.generation().unwrap(), Some(first + 1));
    // Another connection to the same table continues the sequence; another table has its own.
    let again = PostgresStore::<u64, String>::connect(&url, "wb_test_gen_a").unwrap();
    assert_eq!(again.generation().unwrap(), Some(first + 2));
    let other = b.generation().unwrap().unwrap();
    assert_eq!(b.generation().unwrap(), Some(other + 1));
    // A cache over the store writes versions of a newer generation than any before.
    let cache = writebehind::Cache::builder(again).build().unwrap();
    let v = cache.put(1, "x".to_string()).unwrap();
    assert_eq!(writebehind::version::generation_of(v), Some(first + 3));
    cache.flush().unwrap();
    assert_eq!(raw_row(&url, "wb_test_gen_a", 1).unwrap().1, v as i64);
}

#[test]
fn superseded_writes_are_reported_and_redeliveries_are_not() {
    let _s = serial();
    let url = need!("WRITEBEHIND_PG_URL");
    let store = fresh(&url, "wb_test_superseded");
    let applied = store
        .write_all_checked(&[put(1, "new", 10), put(2, "two", 10)])
        .unwrap();
    assert!(applied.superseded.is_empty());
    let applied = store
        .write_all_checked(&[
            put(1, "old", 5),
            put(2, "two", 10),
            put(3, "three", 1),
            del(4, 2),
        ])
        .unwrap();
    assert_eq!(applied.superseded, vec![0]);
    assert_eq!(raw_row(&url, "wb_test_superseded", 1).unwrap().1, 10);
    assert_eq!(raw_row(&url, "wb_test_superseded", 3).unwrap().1, 1);
}

//! The load driver never prints the password of its `--postgres` connection string: not in
//! URL form (`postgres://user:password@host/db`), not in key/value form (`password=...`),
//! whether the server is unreachable or the string does not parse.
#![cfg(feature = "demo")]

use std::process::Command;

/// Runs the demo against `conn` and returns its stderr; the run must fail.
fn stderr_of(conn: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_writebehind-demo"))
        .args(["-n", "10", "--duration", "0.1", "--postgres", conn])
        .output()
        .expect("run writebehind-demo");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{conn}: should fail\n{stderr}");
    stderr
}

fn assert_hidden(conn: &str, secret: &str, message: &str) {
    let stderr = stderr_of(conn);
    assert!(
        stderr.contains(message),
        "expected {message:?} in:\n{stderr}"
    );
    assert!(
        !stderr.contains(secret),
        "the password {secret:?} is in the error output:\n{stderr}"
    );
    assert!(stderr.contains("***"), "no redaction mark in:\n{stderr}");
}

#[test]
fn an_unreachable_server_is_reported_without_the_password() {
    // Nothing listens on port 1 of the loopback address; the connection is refused at once.
    assert_hidden(
        "postgres://wbuser:S3cretUrlPass@127.0.0.1:1/none?connect_timeout=2",
        "S3cretUrlPass",
        "cannot reach PostgreSQL",
    );
    assert_hidden(
        "postgresql://wbuser:p%40ss%2Fw0rdX@127.0.0.1:1/none?connect_timeout=2",
        "p%40ss%2Fw0rdX",
        "cannot reach PostgreSQL",
    );
    assert_hidden(
        "postgres://127.0.0.1:1/none?user=wbuser&password=QueryPassw0rd&connect_timeout=2",
        "QueryPassw0rd",
        "cannot reach PostgreSQL",
    );
    assert_hidden(
        "host=127.0.0.1 port=1 user=postgres password=KvPassw0rd dbname=none connect_timeout=2",
        "KvPassw0rd",
        "cannot reach PostgreSQL",
    );
    assert_hidden(
        "host=127.0.0.1 port=1 password = 'quoted Passw0rd' dbname=none connect_timeout=2",
        "quoted Passw0rd",
        "cannot reach PostgreSQL",
    );
}

#[test]
fn a_malformed_connection_string_is_reported_without_the_password() {
    assert_hidden(
        "postgres://wbuser:BadPortPassw0rd@127.0.0.1:notaport/none",
        "BadPortPassw0rd",
        "not a valid connection string",
    );
    assert_hidden(
        "host=127.0.0.1 port=notaport password=KvBadPortPassw0rd",
        "KvBadPortPassw0rd",
        "not a valid connection string",
    );
}

//! The load driver (`writebehind-demo`, the package's default binary) end to end: a tiny run
//! on SQLite passes its consistency check, and bad input exits non-zero with a message.
#![cfg(feature = "demo")]

use std::process::{Command, Output};

fn demo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_writebehind-demo"))
        .args(args)
        .output()
        .expect("run writebehind-demo")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tiny_run_on_sqlite_is_consistent_in_both_modes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("profiles.db");
    let svg = dir.path().join("report.svg");
    let out = demo(&[
        "-n",
        "2000",
        "--duration",
        "1",
        "--db",
        db.to_str().unwrap(),
        "--write-delay-ms",
        "100",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("consistency (DB = cache)"))
        .unwrap_or_else(|| panic!("no consistency line in:\n{stdout}"));
    assert_eq!(
        line.matches("OK, 2,000 compared").count(),
        2,
        "both modes must compare all 2000 profiles: {line}"
    );
    for row in [
        "throughput (ops/s)",
        "write latency p50/p99/p99.9",
        "DB rows written",
        "conflation (updates/row)",
        "oldest unflushed write",
    ] {
        assert!(stdout.contains(row), "missing {row:?} in:\n{stdout}");
    }
    assert!(stdout.contains("write-through") && stdout.contains("write-behind"));
    let chart = std::fs::read_to_string(&svg).expect("the chart was written");
    assert!(chart.starts_with("<svg") && chart.contains("write-behind"));
}

#[test]
fn one_mode_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p.db");
    let out = demo(&[
        "-n",
        "500",
        "--duration",
        "0.3",
        "--mode",
        "behind",
        "--db",
        db.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let header = stdout
        .lines()
        .find(|l| l.contains(" | ") && l.contains("write-behind"))
        .unwrap_or_else(|| panic!("no table header in:\n{stdout}"));
    assert!(!header.contains("write-through"), "{header}");
    assert_eq!(stdout.matches("OK, 500 compared").count(), 1, "{stdout}");
}

#[test]
fn the_write_behind_run_can_be_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("p.db");
    let journal = dir.path().join("journal");
    let out = demo(&[
        "-n",
        "500",
        "--duration",
        "0.3",
        "--mode",
        "behind",
        "--db",
        db.to_str().unwrap(),
        "--journal",
        journal.to_str().unwrap(),
        "--journal-sync",
        "every",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "{stdout}
{stderr}"
    );
    assert!(stdout.contains("journaled in"), "{stdout}");
    assert_eq!(stdout.matches("OK, 500 compared").count(), 1, "{stdout}");
    // The journal was used and locked while the cache ran.
    assert!(journal.join("LOCK").exists(), "no journal in {journal:?}");
    // A sync mode needs a journal.
    assert_fails(&["--journal-sync", "os"], "--journal");
}

fn assert_fails(args: &[&str], message: &str) {
    let out = demo(args);
    let (stdout, stderr) = text(&out);
    assert!(
        !out.status.success(),
        "{args:?} should fail\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains(message),
        "{args:?}: stderr should mention {message:?}:\n{stderr}"
    );
}

#[test]
fn unknown_flag_is_refused() {
    assert_fails(&["--no-such-flag"], "unexpected argument '--no-such-flag'");
}

#[test]
fn bad_values_are_refused() {
    assert_fails(&["--read-ratio", "1.5"], "not a fraction");
    assert_fails(&["--mode", "sideways"], "invalid value 'sideways'");
    assert_fails(&["-t", "0"], "invalid value '0'");
    assert_fails(&["--duration", "-1"], "--duration");
}

#[test]
fn unwritable_database_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("profiles.db");
    assert_fails(
        &[
            "-n",
            "10",
            "--duration",
            "0.1",
            "--db",
            path.to_str().unwrap(),
        ],
        "cannot open the SQLite database",
    );
}

#[test]
fn unreachable_postgres_is_refused() {
    // Nothing listens on port 1 of the loopback address; the connection is refused at once.
    assert_fails(
        &[
            "-n",
            "10",
            "--duration",
            "0.1",
            "--postgres",
            "host=127.0.0.1 port=1 user=postgres dbname=none connect_timeout=2",
        ],
        "cannot reach PostgreSQL",
    );
    assert_fails(
        &["--postgres", "host=127.0.0.1 port=notaport"],
        "not a valid connection string",
    );
}

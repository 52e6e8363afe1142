//! What the PostgreSQL tests share: the server they need from the environment (or a skip),
//! and an outage of it.
//!
//! `WRITEBEHIND_PG_URL` names the server and `WRITEBEHIND_PG_CTL` a pg_ctl command prefix
//! that stops and starts it (`source .ci/pg.sh && pg_start` sets both). Without them a test
//! prints SKIPPED and passes, except under `CI`, where it fails: CI must not go green without
//! having talked to a server.
#![allow(dead_code)]

use std::process::{Command, Stdio};

/// The value of `var`, or `None` after printing why the test skips (failing under `CI`).
pub fn env_or_skip(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{var} is not set but CI is: the PostgreSQL tests must run in CI. \
                 Start a server first: `source .ci/pg.sh && pg_start`"
            );
            eprintln!(
                "SKIPPED: {var} is not set; start a server with `source .ci/pg.sh && pg_start`"
            );
            None
        }
    }
}

/// The value of the variable, or a return from the test (see [`env_or_skip`]).
macro_rules! need {
    ($var:expr) => {
        match $crate::pg::env_or_skip($var) {
            Some(v) => v,
            None => return,
        }
    };
}
pub(crate) use need;

/// Stops the server on creation and makes sure it is started again, even if the test fails.
pub struct Outage {
    ctl: String,
    down: bool,
}

impl Outage {
    fn run(&self, action: &str) {
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("{} {action}", self.ctl))
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl");
        assert!(status.success(), "`{} {action}` failed", self.ctl);
    }

    pub fn begin(ctl: String) -> Self {
        let mut o = Outage { ctl, down: false };
        o.run("stop -m fast");
        o.down = true;
        o
    }

    pub fn end(&mut self) {
        self.run("start");
        self.down = false;
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if self.down {
            self.end();
        }
    }
}

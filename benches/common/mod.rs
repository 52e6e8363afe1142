//! Shared by the criterion benches (`peers.rs`) and the ratio report (`ratio.rs`): the
//! contenders behind one interface, the workloads, and a runner that starts N threads at a
//! barrier and times a fixed number of operations on each.
//!
//! Every contender gets the same operations, the same keys (drawn from
//! `writebehind::testing`'s seeded generators) and the same in-memory store
//! (`writebehind::MemoryStore`, a mutex around a `HashMap`, reached through the `Store` trait).
//!
//! | file | holds |
//! | --- | --- |
//! | `value.rs` | the values put: 8 or 256 bytes |
//! | `workload.rs` | operation mixes, key distributions, each thread's precomputed plan |
//! | `contender.rs` | the interface the runner times; a synchronous cache's threads |
//! | `contenders/` | writebehind and its peers, one file each, and `Kind`, which builds them |
//! | `floors.rs` | the shard-lock floors of the get workload |
//! | `runner.rs` | fresh or reused instances, and the wait for a quiet process |
// Each bench uses a part of it.
#![allow(dead_code, unused_imports)]

mod contender;
mod contenders;
mod floors;
mod runner;
mod value;
mod workload;

pub use contender::*;
pub use contenders::*;
pub use floors::*;
pub use runner::*;
pub use value::*;
pub use workload::*;

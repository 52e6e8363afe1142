//! The contenders, one file each, and [`Kind`], which names them and builds them.

mod dashmap;
mod hand_rolled;
mod moka;
mod quick_cache;
mod read_through;
mod wb_cache;
mod writebehind;

pub use self::dashmap::Dash;
pub use self::writebehind::{Wb, WB_NICE};
pub use hand_rolled::{Hand, Msg, HAND_CHANNEL, HAND_WRITER};
pub use moka::Moka;
pub use quick_cache::Quick;
pub use read_through::{PeerMap, ReadThrough};
pub use wb_cache::{Rec, WbCache, WbcController};

use super::contender::{Contender, SharedStore};
use super::floors::{DesignFloor, MapFloor};
use super::value::Val;
use ::writebehind::journal::JournalSync;

/// Capacity of the bounded peers: large enough that nothing the benches put is evicted.
pub const PEER_CAPACITY: usize = 1 << 22;

/// The contenders, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Writebehind,
    /// writebehind with `flusher_nice(WB_NICE)`.
    WritebehindNice,
    Dashmap,
    QuickCache,
    Moka,
    HandRolled,
    WbCache,
    /// [`LockFloor`] with a [`MapEntry`]: not a peer, the least a get costs under the
    /// design's shard lock. Not in [`Kind::ALL`]; the ratio report adds both floors to its
    /// get workload.
    MapFloor,
    /// [`LockFloor`] with a [`DesignEntry`], the least entry the design allows.
    DesignFloor,
    /// writebehind with a journal, `JournalSync::Os`. Not in [`Kind::ALL`]: the ratio
    /// report adds the journaled contenders to its Zipf put workload.
    JournalOs,
    /// writebehind with a journal, `JournalSync::Interval(10 ms)`.
    JournalInterval,
}

impl Kind {
    /// The two shard-lock floors ([`LockFloor`]), which the ratio report adds to its get
    /// workload.
    pub const FLOORS: [Kind; 2] = [Kind::MapFloor, Kind::DesignFloor];

    /// The journaled writebehinds, which the ratio report adds to its Zipf put workload.
    pub const JOURNALED: [Kind; 2] = [Kind::JournalOs, Kind::JournalInterval];

    pub const ALL: [Kind; 7] = [
        Kind::Writebehind,
        Kind::WritebehindNice,
        Kind::Dashmap,
        Kind::QuickCache,
        Kind::Moka,
        Kind::HandRolled,
        Kind::WbCache,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Writebehind => "writebehind",
            Kind::WritebehindNice => "writebehind-nice10",
            Kind::Dashmap => "dashmap",
            Kind::QuickCache => "quick_cache",
            Kind::Moka => "moka",
            Kind::HandRolled => "hand-rolled",
            Kind::WbCache => "wb-cache",
            Kind::MapFloor => "lock floor 16B",
            Kind::DesignFloor => "lock floor 32B",
            Kind::JournalOs => "writebehind-journal-os",
            Kind::JournalInterval => "writebehind-journal-10ms",
        }
    }

    /// Does an instance keep a core busy between its runs? wb-cache 0.1.0's background
    /// task flushes its whole update pool on every tick once the prefill has filled it, and
    /// the pool does not empty (a tokio worker measured at 100 % of a core from the
    /// prefill on, through every other contender's runs). Where other contenders' instances
    /// stay alive (the ratio report), such a contender gets a fresh instance for each run,
    /// dropped (its runtime shut down) before the next contender runs ([`Runner::timed_run`]).
    pub fn busy_between_runs(self) -> bool {
        self == Kind::WbCache
    }

    /// A new contender on `store`, for `threads` benchmark threads.
    pub fn build<V: Val>(self, store: SharedStore<V>, threads: usize) -> Box<dyn Contender<V>> {
        match self {
            Kind::Writebehind => Box::new(Wb::new(store)),
            Kind::WritebehindNice => Box::new(Wb::niced(store)),
            Kind::Dashmap => Box::new(Dash::new(store)),
            Kind::QuickCache => Box::new(Quick::new(store)),
            Kind::Moka => Box::new(Moka::new(store)),
            Kind::HandRolled => Box::new(Hand::new(store)),
            Kind::WbCache => Box::new(WbCache::new(store, threads)),
            Kind::MapFloor => Box::new(MapFloor::new(store)),
            Kind::DesignFloor => Box::new(DesignFloor::new(store)),
            Kind::JournalOs => Box::new(Wb::journaled(store, JournalSync::Os, self)),
            Kind::JournalInterval => Box::new(Wb::journaled(
                store,
                JournalSync::Interval(std::time::Duration::from_millis(10)),
                self,
            )),
        }
    }
}

//! Versions: how a cache numbers its writes, and how a store's generations fence them.
//!
//! Every write takes a version from its shard's counter; a store applies a write only if its
//! version is above the one it holds for the key. Where the counters start decides which of
//! two caches over one store wins a key they both write:
//!
//! * **Fenced** (the store hands out generations, [`Store::generation`](crate::Store::generation)):
//!   the first version of generation `g` is `2^62 + g × 2^38`, and a shard counts up from
//!   there. Every version of a later generation is above every version of an earlier one
//!   (a shard would need 2^38 writes to reach the next generation's range), so the cache
//!   built later wins, whatever the hosts' clocks say. Fenced versions are also above every
//!   wall-clock version until the year 2116, so a store can move from the wall clock to
//!   generations without its rows outranking the new writes.
//! * **Wall clock** (no generations): a cache starts at its clock's nanoseconds since the
//!   Unix epoch ([`Clock::since_unix_epoch`](crate::Clock::since_unix_epoch)). A restarted
//!   process writes above its predecessor as long as the clock did not go back; two
//!   processes at once, or hosts whose clocks disagree, can lose the newer write.
//!
//! ```
//! use writebehind::version;
//! let v = version::first_of_generation(7).unwrap();
//! assert_eq!(version::generation_of(v), Some(7));
//! assert_eq!(version::generation_of(v + 1_000), Some(7));
//! assert!(version::first_of_generation(8).unwrap() > v + 1_000_000);
//! assert_eq!(version::generation_of(1_800_000_000_000_000_000), None); // a wall-clock version
//! ```

/// The bit every fenced version has (and no wall-clock version before 2116).
pub const FENCED: u64 = 1 << 62;

/// Where the generation starts in a fenced version: below it, a shard's count.
pub const GENERATION_SHIFT: u32 = 38;

/// The largest generation a fenced version can hold.
pub const MAX_GENERATION: u64 = (1 << (62 - GENERATION_SHIFT)) - 1;

/// The first version of generation `g`; `None` above [`MAX_GENERATION`].
pub fn first_of_generation(g: u64) -> Option<u64> {
    (g <= MAX_GENERATION).then_some(FENCED | (g << GENERATION_SHIFT))
}

/// The generation of a fenced version; `None` for a wall-clock one.
pub fn generation_of(version: u64) -> Option<u64> {
    (version & FENCED != 0).then_some((version & !FENCED) >> GENERATION_SHIFT)
}

/// The first version of a cache whose store handed out no generation: the clock's
/// nanoseconds since the Unix epoch (at least 1, and below [`FENCED`]).
pub(crate) fn wall_clock_first(clock: &dyn crate::Clock) -> u64 {
    let nanos = crate::guard::catch(|| clock.since_unix_epoch())
        .unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
        })
        .as_nanos();
    u64::try_from(nanos)
        .unwrap_or(FENCED - 1)
        .clamp(1, FENCED - 1)
}

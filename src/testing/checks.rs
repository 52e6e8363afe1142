//! Checks and waits that tests of a cache over a [`FaultyStore`] share.

use std::fmt::Debug;
use std::hash::Hash;
use std::time::{Duration, Instant};

use super::FaultyStore;

/// Polls `cond` every millisecond until it holds or `timeout` passes; returns whether it
/// held (asked once more at the deadline).
///
/// ```
/// use std::time::Duration;
/// use writebehind::testing::eventually;
///
/// let start = std::time::Instant::now();
/// assert!(eventually(Duration::from_secs(5), || start.elapsed() >= Duration::from_millis(5)));
/// ```
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

/// Asserts per-key order: the versions `store` received for each key, over every
/// `write_all` call so far, never go down (a redelivered batch may repeat one).
///
/// ```
/// use std::sync::Arc;
/// use writebehind::{Cache, testing::{assert_versions_grow, FaultyStore}};
///
/// let store = Arc::new(FaultyStore::<u64, u64>::new());
/// let cache = Cache::builder(store.clone()).manual_flushing().build().unwrap();
/// store.fail_next(1);
/// cache.put(1, 10).unwrap();
/// cache.put(1, 11).unwrap();
/// cache.flush().unwrap();
/// assert_versions_grow(&store);
/// ```
pub fn assert_versions_grow<K, V>(store: &FaultyStore<K, V>)
where
    K: Hash + Eq + Clone + Debug,
    V: Clone,
{
    for (key, versions) in store.received_versions() {
        if let Some(i) = versions.windows(2).position(|w| w[0] > w[1]) {
            panic!(
                "key {key:?}: the store received version {} after {} (receipt {} of {})",
                versions[i + 1],
                versions[i],
                i + 2,
                versions.len()
            );
        }
    }
}

//! The write-behind users build by hand: dashmap, a channel and one writer thread.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use writebehind::{Store, Write};

use super::dashmap::Dash;
use crate::common::contender::{SharedStore, SyncCache};
use crate::common::value::Val;

/// Channel capacity of the hand-rolled write-behind: bounded, as a service would run it so a
/// slow store applies back-pressure instead of growing memory without limit.
pub const HAND_CHANNEL: usize = 1 << 16;

pub enum Msg<V> {
    Put(u64, V),
    /// Answered once every earlier record is written.
    Sync(crossbeam_channel::Sender<()>),
}

/// The hand-rolled write-behind's writer thread's name (15 bytes, all of it in `comm`).
pub const HAND_WRITER: &str = "hand-rolled-wrt";

/// What users write by hand: a dashmap for reads, every write also sent over a channel to one
/// writer thread that calls the store once per record.
pub struct Hand<V: Val> {
    /// The reads: dashmap in front of the store, as the `dashmap` contender.
    reads: Arc<Dash<V>>,
    tx: Option<crossbeam_channel::Sender<Msg<V>>>,
    writer: Option<JoinHandle<()>>,
    pub written: Arc<AtomicU64>,
}

impl<V: Val> Hand<V> {
    pub fn new(store: SharedStore<V>) -> Arc<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<Msg<V>>(HAND_CHANNEL);
        let written = Arc::new(AtomicU64::new(0));
        let (s2, w2) = (store.clone(), written.clone());
        // Named, so a diagnostic can find it (`put_layout`'s `PUT_HAND_NICE`).
        let writer = std::thread::Builder::new().name(HAND_WRITER.into());
        let writer = writer.spawn(move || {
            let mut version = 1u64;
            for msg in rx {
                let (key, value) = match msg {
                    Msg::Put(k, v) => (k, v),
                    Msg::Sync(done) => {
                        let _ = done.send(());
                        continue;
                    }
                };
                let w = Write::Put {
                    key,
                    value,
                    version,
                };
                version += 1;
                let _ = s2.write_all(std::slice::from_ref(&w));
                w2.fetch_add(1, Ordering::Relaxed);
            }
        });
        let writer = writer.expect("the hand-rolled writer thread starts");
        Arc::new(Hand {
            reads: Dash::new(store),
            tx: Some(tx),
            writer: Some(writer),
            written,
        })
    }
}

impl<V: Val> Drop for Hand<V> {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl<V: Val> SyncCache<V> for Hand<V> {
    const NAME: &'static str = "hand-rolled";
    #[inline]
    fn get(&self, k: u64) -> Option<V> {
        self.reads.get(k)
    }
    #[inline]
    fn put(&self, k: u64, v: V) {
        self.reads.put(k, v.clone());
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Put(k, v));
        }
    }
    fn settle(&self) {
        let (done, wait) = crossbeam_channel::bounded(1);
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Sync(done));
            let _ = wait.recv();
        }
    }
}

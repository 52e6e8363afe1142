//! writebehind (work in progress)
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod error;
mod store;
pub mod stores;
pub(crate) mod sync;

pub use error::{BatchError, Error, Source, StoreError};
pub use store::{MemoryStore, Store, Write};

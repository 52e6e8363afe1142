//! writebehind (work in progress)
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub(crate) mod sync;
mod error;
mod store;
pub mod stores;

pub use error::{BatchError, Error, Source, StoreError};
pub use store::{MemoryStore, Store, Write};

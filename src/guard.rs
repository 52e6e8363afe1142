//! Calls into user code, guarded: the `Store`, the callbacks, and the `Clone`/`Drop` of keys
//! and values that the engine runs on its own threads or while it holds a flusher's core.
//!
//! Two things are tracked per thread:
//! * **in a store call** ([`call_store`]): the thread runs `Store` or callback code on the
//!   cache's behalf. A `flush`/`close` from there would wait for the call it is in.
//! * **in the engine** ([`EngineScope`]): the thread is a flusher/keeper/loader thread, or holds
//!   a flusher's core (a manual flush, `flush_key`). User code that runs there (a value's `Drop`,
//!   a tracing subscriber) must not block on a core or join a thread: `close` then stops the
//!   cache without waiting, and `flush` is refused.
//!
//! [`catch`] turns a panic into its message; [`drop_quietly`] drops a value whose `Drop` may
//! panic. docs/ARCHITECTURE.md, "When user code panics", lists every call and what the engine
//! does when it panics.

use std::panic::{catch_unwind, AssertUnwindSafe};

// Through the facade: under loom its green threads share one OS thread, and the thread-locals
// must be loom's (whose macro takes no `const` initializer).
#[allow(clippy::missing_const_for_thread_local)]
mod local {
    use std::cell::Cell;

    crate::sync::thread_local! {
        /// Set while this thread is inside a store call or callback made by the cache.
        pub(super) static IN_STORE_CALL: Cell<bool> = Cell::new(false);
        /// How many engine scopes this thread is in (see the module docs).
        pub(super) static ENGINE_DEPTH: Cell<u32> = Cell::new(0);
    }
}

use local::{ENGINE_DEPTH, IN_STORE_CALL};

/// `true` when the calling thread is inside a store call or callback made by a cache.
pub(crate) fn in_store_call() -> bool {
    IN_STORE_CALL.with(|f| f.get())
}

/// `true` when the calling thread runs inside the engine: a cache's background thread, a
/// holder of a flusher's core, or a store call. A `flush` or `close` from there could wait
/// for itself.
pub(crate) fn in_engine() -> bool {
    in_store_call() || ENGINE_DEPTH.with(|d| d.get()) > 0
}

/// Marks the current thread as inside the engine while it lives.
pub(crate) struct EngineScope(());

impl EngineScope {
    pub(crate) fn enter() -> Self {
        ENGINE_DEPTH.with(|d| d.set(d.get() + 1));
        EngineScope(())
    }
}

impl Drop for EngineScope {
    fn drop(&mut self) {
        ENGINE_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// The message of a caught panic.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_string())
}

/// Runs `f`, turning a panic into its message.
pub(crate) fn catch<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(&*p))
}

/// Calls the store (or a callback) on the cache's behalf: marks the thread as inside a store
/// call (so a re-entrant `flush`/`close` is refused instead of deadlocking) and turns a panic
/// into an error message.
pub(crate) fn call_store<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            IN_STORE_CALL.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(IN_STORE_CALL.with(|c| c.replace(true)));
    catch(f)
}

/// Drops `value`; a panic in its `Drop` is logged and swallowed (what the value owned that its
/// `Drop` did not release leaks). Returns `false` if it panicked.
pub(crate) fn drop_quietly<T>(value: T) -> bool {
    match catch(move || drop(value)) {
        Ok(()) => true,
        Err(msg) => {
            tracing::error!(message = %msg, "a key's or value's Drop panicked; the cache goes on");
            false
        }
    }
}

/// Empties `v`, dropping each element with [`drop_quietly`] (one at a time: two panicking
/// drops in one unwind would abort the process). Returns `false` if any panicked.
pub(crate) fn clear_quietly<T>(v: &mut Vec<T>) -> bool {
    if !std::mem::needs_drop::<T>() {
        v.clear();
        return true;
    }
    let mut quiet = true;
    for x in v.drain(..) {
        quiet &= drop_quietly(x);
    }
    quiet
}

#[cfg(all(test, not(writebehind_loom)))]
mod tests {
    use super::*;

    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("boom");
        }
    }

    #[test]
    fn drop_quietly_swallows_a_panicking_drop() {
        assert!(!drop_quietly(Bomb));
        assert!(drop_quietly(1u64));
        let mut v = vec![Bomb, Bomb];
        assert!(!clear_quietly(&mut v));
        assert!(v.is_empty());
    }

    #[test]
    fn scopes_nest() {
        assert!(!in_engine());
        {
            let _a = EngineScope::enter();
            let _b = EngineScope::enter();
            assert!(in_engine());
        }
        assert!(!in_engine());
        assert_eq!(call_store(in_store_call), Ok(true));
        assert!(!in_store_call());
        assert_eq!(call_store(|| -> u8 { panic!("x") }), Err("x".to_string()));
    }
}

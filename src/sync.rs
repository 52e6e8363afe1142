//! The one place that names `std::sync`, `parking_lot`, `loom`, `UnsafeCell` and threads.
//!
//! Everything concurrent in the crate imports from here, so that building with
//! `RUSTFLAGS="--cfg writebehind_loom"` swaps every atomic, lock and cell for loom's
//! model-checked versions. The cfg is prefixed so that dependencies which also
//! support loom (crossbeam, for one) do not switch with us.
//!
//! Under loom the background flusher threads and timed parking are not modeled: models
//! build caches in manual-flushing mode and drive flusher steps from their own threads.

#[cfg(not(writebehind_loom))]
pub(crate) use std::sync::Arc;

#[cfg(writebehind_loom)]
pub(crate) use loom::sync::Arc;

pub(crate) mod atomic {
    #[cfg(not(writebehind_loom))]
    pub(crate) use std::sync::atomic::{
        fence, AtomicBool, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering,
    };

    #[cfg(writebehind_loom)]
    pub(crate) use loom::sync::atomic::{
        fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
    };
}

pub(crate) use crossbeam_utils::CachePadded;

/// Thread-locals: loom's under the model checker, whose threads share one OS thread.
#[cfg(not(writebehind_loom))]
pub(crate) use std::thread_local;

#[cfg(writebehind_loom)]
pub(crate) use loom::thread_local;

// ---------------------------------------------------------------------------------------
// Mutex and Condvar: parking_lot in production, loom's under the model checker.
// ---------------------------------------------------------------------------------------

#[cfg(not(writebehind_loom))]
pub(crate) use parking_lot::{Condvar, Mutex, MutexGuard};

#[cfg(writebehind_loom)]
pub(crate) use self::loom_lock::{Condvar, Mutex, MutexGuard};

#[cfg(writebehind_loom)]
mod loom_lock {
    use std::ops::{Deref, DerefMut};
    use std::time::Duration;

    /// A loom mutex with parking_lot's panic-free `lock()` signature.
    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    /// Holds the loom guard in an `Option` so [`Condvar::wait_for`] can move it.
    pub(crate) struct MutexGuard<'a, T>(Option<loom::sync::MutexGuard<'a, T>>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(Some(self.0.lock().unwrap_or_else(|e| e.into_inner())))
        }

        /// The guard if the lock is free now (parking_lot's signature).
        pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
            match self.0.try_lock() {
                Ok(g) => Some(MutexGuard(Some(g))),
                Err(std::sync::TryLockError::Poisoned(e)) => Some(MutexGuard(Some(e.into_inner()))),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        }

        #[allow(dead_code)] // parity with parking_lot::Mutex
        pub(crate) fn into_inner(self) -> T {
            self.0.into_inner().unwrap_or_else(|e| e.into_inner())
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            self.0.as_ref().expect("guard present outside wait")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.0.as_mut().expect("guard present outside wait")
        }
    }

    #[derive(Debug, Default)]
    pub(crate) struct Condvar(loom::sync::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Self {
            Condvar(loom::sync::Condvar::new())
        }

        /// Loom cannot model time: this waits for a notification, which models must send.
        pub(crate) fn wait_for<T>(&self, guard: &mut MutexGuard<'_, T>, _timeout: Duration) {
            let inner = guard.0.take().expect("guard present");
            guard.0 = Some(self.0.wait(inner).unwrap_or_else(|e| e.into_inner()));
        }

        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
    }
}

// ---------------------------------------------------------------------------------------
// UnsafeCell with loom's closure-based API, so access is tracked under the model.
// ---------------------------------------------------------------------------------------

#[cfg(writebehind_loom)]
pub(crate) use loom::cell::UnsafeCell;

/// `std::cell::UnsafeCell` behind loom's `with` / `with_mut` API.
#[cfg(not(writebehind_loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(writebehind_loom))]
impl<T> UnsafeCell<T> {
    pub(crate) fn new(value: T) -> Self {
        UnsafeCell(std::cell::UnsafeCell::new(value))
    }

    #[inline]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    #[inline]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

// ---------------------------------------------------------------------------------------
// Threads: named flusher threads, parking, and the handle writers use to wake them.
// ---------------------------------------------------------------------------------------

pub(crate) mod thread {
    use std::io;
    use std::time::Duration;

    /// Spawns a named OS thread (the flushers).
    #[cfg(not(writebehind_loom))]
    pub(crate) fn spawn_named<F>(name: String, f: F) -> io::Result<std::thread::JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
    {
        std::thread::Builder::new().name(name).spawn(f)
    }

    /// Lowers the calling thread's CPU priority by `levels` nice levels, capped at 19 (the
    /// flushers, `Builder::flusher_nice`). On Linux the nice value belongs to the thread, so
    /// the rest of the process keeps its priority.
    #[cfg(all(target_os = "linux", not(writebehind_loom), not(miri)))]
    pub(crate) fn lower_priority(levels: u8) -> io::Result<()> {
        if levels == 0 {
            return Ok(());
        }
        // SAFETY: `gettid` has no preconditions and always succeeds.
        let tid = unsafe { libc::gettid() };
        let who = libc::id_t::try_from(tid).map_err(|_| io::Error::other("negative thread id"))?;
        // `getpriority` may return -1 as a nice value: errno, cleared first, tells an error.
        // SAFETY: `__errno_location` returns this thread's errno, valid for the thread's life.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: plain system call on this thread's own id; no memory is passed.
        let current = unsafe { libc::getpriority(libc::PRIO_PROCESS, who) };
        if current == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(0) {
                return Err(e);
            }
        }
        let target = current.saturating_add(i32::from(levels)).min(19);
        // SAFETY: as above; raising one's own nice value needs no privilege.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, who, target) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Elsewhere (and under loom and Miri) the flushers keep the builder's priority.
    #[cfg(not(all(target_os = "linux", not(writebehind_loom), not(miri))))]
    pub(crate) fn lower_priority(_levels: u8) -> io::Result<()> {
        Ok(())
    }

    /// Background threads are not modeled under loom: models use manual flushing.
    #[cfg(writebehind_loom)]
    pub(crate) fn spawn_named<F>(_name: String, _f: F) -> io::Result<std::thread::JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
    {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "background flushers are not modeled under loom; build with manual_flushing()",
        ))
    }

    pub(crate) type JoinHandle = std::thread::JoinHandle<()>;

    /// Parks the calling flusher until unparked or `timeout` passes.
    #[cfg(not(writebehind_loom))]
    pub(crate) fn park_timeout(timeout: Duration) {
        std::thread::park_timeout(timeout);
    }

    #[cfg(writebehind_loom)]
    pub(crate) fn park_timeout(_timeout: Duration) {
        loom::thread::yield_now();
    }

    /// Gives the CPU away (waiting for a producer that was preempted mid-push).
    pub(crate) fn yield_now() {
        #[cfg(not(writebehind_loom))]
        std::thread::yield_now();
        #[cfg(writebehind_loom)]
        loom::thread::yield_now();
    }

    /// The id of the calling thread, to refuse joining oneself.
    pub(crate) fn current_id() -> std::thread::ThreadId {
        std::thread::current().id()
    }

    /// A thread's identity as the model sees it: loom's green threads share one OS thread.
    #[cfg(not(writebehind_loom))]
    pub(crate) type ThreadId = std::thread::ThreadId;
    #[cfg(writebehind_loom)]
    pub(crate) type ThreadId = loom::thread::ThreadId;

    /// The calling thread's [`ThreadId`].
    pub(crate) fn model_id() -> ThreadId {
        #[cfg(not(writebehind_loom))]
        return std::thread::current().id();
        #[cfg(writebehind_loom)]
        return loom::thread::current().id();
    }

    /// A slot for a flusher's thread handle, set once the thread runs; writers use it to
    /// wake the flusher. Empty (and waking is a no-op) in manual-flushing mode.
    #[derive(Debug, Default)]
    pub(crate) struct Unparker(std::sync::OnceLock<std::thread::Thread>);

    impl Unparker {
        pub(crate) fn set(&self, thread: std::thread::Thread) {
            let _ = self.0.set(thread);
        }

        #[inline]
        pub(crate) fn unpark(&self) {
            if let Some(t) = self.0.get() {
                t.unpark();
            }
        }
    }
}

/// Called in every retry loop: a CPU hint normally, a yield under loom (which must see
/// spinning threads give way to explore the schedules in which they make progress).
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(not(writebehind_loom))]
    std::hint::spin_loop();
    #[cfg(writebehind_loom)]
    loom::thread::yield_now();
}

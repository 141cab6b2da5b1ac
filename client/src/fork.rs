//! Noticing `fork()`: which process generation a client was made in.
//!
//! A forked child gets a copy of every client of its parent, leased bases
//! included, while the parent goes on handing those bases out: if the copy
//! used them, child and parent would hand out the same rooms. The copy
//! cannot lease afresh either: its connections are driven by tasks of the
//! parent's tokio runtime, whose threads do not exist in the child (and a
//! tokio runtime does not survive `fork()`), so its calls would wait forever.
//! So a client refuses to work in any process but the one that made it.
//!
//! A `pthread_atfork` child handler, registered when the first client is
//! made, counts the forks this process descends through; a client records
//! the count when it is made, and differs from the current count only in a
//! forked child. Reading the count is one relaxed atomic load, cheap enough
//! for the allocation hot path (`getpid()` would be a system call per room).
//! Forks that bypass `pthread_atfork` handlers (a raw `clone` system call)
//! are not seen; `vfork` and `posix_spawn` children only `exec`.

use std::sync::atomic::{AtomicU64, Ordering};

/// Forks between the first process of this program and this one.
static FORKS: AtomicU64 = AtomicU64::new(0);

/// The fork generation of the calling process, and makes sure later forks
/// are counted: call it when a client is made.
pub(crate) fn register_and_get() -> u64 {
    #[cfg(unix)]
    {
        static REGISTER: std::sync::Once = std::sync::Once::new();
        REGISTER.call_once(register_child_handler);
    }
    generation()
}

/// The fork generation of the calling process (see the module docs).
pub(crate) fn generation() -> u64 {
    FORKS.load(Ordering::Relaxed)
}

#[cfg(unix)]
extern "C" fn count_fork_in_child() {
    // Runs in the child inside fork(), single-threaded: an atomic add is
    // async-signal-safe.
    FORKS.fetch_add(1, Ordering::Relaxed);
}

#[cfg(unix)]
fn register_child_handler() {
    extern "C" {
        fn pthread_atfork(
            prepare: Option<extern "C" fn()>,
            parent: Option<extern "C" fn()>,
            child: Option<extern "C" fn()>,
        ) -> std::os::raw::c_int;
    }
    // SAFETY: registers a handler with the C signature pthread_atfork
    // expects, which only adds to an atomic; it is never unregistered, and
    // it lives as long as the program (a static function).
    let status = unsafe { pthread_atfork(None, None, Some(count_fork_in_child)) };
    if status != 0 {
        // ENOMEM: forks go unnoticed, as they did before this guard.
        tracing::warn!(
            status,
            "pthread_atfork failed: a client copied into a forked child is not refused; build clients after fork()"
        );
    }
}

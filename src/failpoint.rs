//! Failpoints: named steps of every durable write where a test makes the step
//! fail or the process die, compiled in only with the `failpoints` feature
//! (the test command builds with it; release builds have none).
//!
//! Configure them with the `FAILPOINTS` environment variable, as the `fail`
//! crate reads it: `FAILPOINTS='embedded::log_fsync=3*off->return'` fails the
//! fourth log fsync, `...=return(crash)` kills the process there with SIGKILL,
//! as `kill -9` would, and `...=sleep(200)` stalls the step. RELIABILITY.md
//! lists every failpoint and the tests that use it.

/// Fails the enclosing step at failpoint `$name`: returns `Err($error)` from
/// the enclosing function (or, without an error, skips the rest of a
/// function returning `()`), or kills the process when configured with
/// `return(crash)`.
#[macro_export]
macro_rules! failpoint {
    // In a function returning (): the step is skipped.
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |action: Option<String>| {
            $crate::failpoint::act($name, action.as_deref());
        });
    };
    ($name:expr, $error:expr) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |action: Option<String>| {
            $crate::failpoint::act($name, action.as_deref());
            Err($error)
        });
        // Without the feature: type-checked, never run, so both builds see
        // the same names in use.
        #[cfg(not(feature = "failpoints"))]
        let _ = || $error;
    };
}

/// Kills the process for `return(crash)`; otherwise lets the step fail.
#[cfg(feature = "failpoints")]
pub fn act(name: &str, action: Option<&str>) {
    if action == Some("crash") {
        eprintln!("failpoint {name}: crashing (SIGKILL)");
        // SAFETY: signalling our own process; SIGKILL cannot be caught, so
        // nothing runs after this line, exactly as with `kill -9`.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Reads `FAILPOINTS` once at start; a no-op without the feature.
pub fn setup() {
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
}

/// An I/O error a failpoint injects, as a failing disk would report it.
pub fn io_error(step: &'static str) -> std::io::Error {
    std::io::Error::other(format!("failpoint {step} injected an I/O error"))
}

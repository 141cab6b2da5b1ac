//! The one retry policy: exponential backoff, capped, with jitter.
//!
//! The client waits by it between connection attempts and skips an
//! unreachable endpoint for as long as it says; the server's etcd store
//! pauses by it between reservations that lost a race to another replica.
//! One policy, so that every retry in the system spreads out the same way
//! and a fix to it (an overflow, a bias) is made once.
//!
//! Why jitter: clients (or replicas) that failed together would otherwise
//! retry together, in lockstep, and meet the same overload or the same
//! contended key again at every step.
//!
//! The randomness is std's per-thread keyed SipHash (`RandomState`, seeded
//! from the operating system): no dependency, a different sequence in every
//! process and thread, and cheap next to any pause it computes.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// How the pause before a retry is drawn below its ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Anywhere in `[0, ceiling)`: spreads retries the most; for contention,
    /// where waiting at all matters less than not colliding again.
    Full,
    /// In `[ceiling / 2, ceiling]`: spreads retries but keeps half the
    /// pause, so a peer that is down is not retried much sooner than the
    /// ceiling says.
    Equal,
}

/// Exponential backoff: the pause before retry `attempt` (0 for the first)
/// is drawn below `first * 2^attempt`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// Pauses from `first`, doubling, up to `max` (a `max` below `first`
    /// caps every pause at `max`).
    pub const fn new(first: Duration, max: Duration, jitter: Jitter) -> Self {
        Self { first, max, jitter }
    }

    /// The ceiling of the pause before retry `attempt`: `first * 2^attempt`,
    /// capped at `max` (no overflow for any `attempt`).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
        self.first.saturating_mul(factor).min(self.max)
    }

    /// The pause before retry `attempt`, drawn below [`ceiling`](Self::ceiling)
    /// as the jitter says.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.draw(attempt, random())
    }

    /// The pause for `attempt` at the random number `random`.
    fn draw(&self, attempt: u32, random: u64) -> Duration {
        let ceiling = u64::try_from(self.ceiling(attempt).as_nanos()).unwrap_or(u64::MAX);
        // The bias of `%` is below ceiling / 2^64: nothing for a pause.
        let nanos = match self.jitter {
            Jitter::Full => random % ceiling.max(1),
            Jitter::Equal => {
                let floor = ceiling - ceiling / 2;
                floor + random % (ceiling / 2).saturating_add(1)
            }
        };
        Duration::from_nanos(nanos)
    }
}

/// A random number, different at every call.
fn random() -> u64 {
    // Each `RandomState::new()` on a thread uses the next key of that
    // thread's randomly seeded sequence, so hashing nothing still differs.
    RandomState::new().build_hasher().finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceilings_double_from_the_first_up_to_the_max_and_never_overflow() {
        let backoff = Backoff::new(2 * MS, 20 * MS, Jitter::Full);
        let ceilings: Vec<Duration> = (0..7).map(|a| backoff.ceiling(a)).collect();
        assert_eq!(
            ceilings,
            [2 * MS, 4 * MS, 8 * MS, 16 * MS, 20 * MS, 20 * MS, 20 * MS]
        );
        let huge = Backoff::new(Duration::MAX, Duration::MAX, Jitter::Equal);
        assert_eq!(huge.ceiling(u32::MAX), Duration::MAX);
        // Pauses are drawn in nanoseconds as u64: some 584 years at most.
        assert!(huge.delay(u32::MAX) >= Duration::from_nanos(u64::MAX / 2));
    }

    #[test]
    fn full_jitter_stays_below_the_ceiling_and_equal_jitter_keeps_half() {
        let full = Backoff::new(50 * MS, 2000 * MS, Jitter::Full);
        let equal = Backoff::new(50 * MS, 2000 * MS, Jitter::Equal);
        for attempt in 0..8 {
            for random in [0, 1, u64::MAX / 3, u64::MAX - 1, u64::MAX] {
                let ceiling = full.ceiling(attempt);
                assert!(full.draw(attempt, random) < ceiling);
                let pause = equal.draw(attempt, random);
                assert!(pause >= ceiling / 2 && pause <= ceiling, "{pause:?}");
            }
        }
        assert_eq!(
            Backoff::new(MS, MS, Jitter::Full).draw(0, 0),
            Duration::ZERO
        );
        assert_eq!(
            Backoff::new(Duration::ZERO, MS, Jitter::Full).delay(3),
            Duration::ZERO
        );
    }

    #[test]
    fn pauses_are_spread_not_in_lockstep() {
        let backoff = Backoff::new(50 * MS, 2000 * MS, Jitter::Equal);
        let pauses: std::collections::HashSet<Duration> =
            (0..64).map(|_| backoff.delay(4)).collect();
        assert!(pauses.len() > 32, "{} distinct pauses of 64", pauses.len());
    }
}

//! The deregistration's one decision, apart from its I/O: after the record
//! is written, whether the ranges found by the second look outlive the
//! lease the record was granted, and if so the TTL a new lease needs.
//! `deregister_worker` calls it with an `Instant`'s elapsed seconds, the
//! model checker (`core/src/model/`) with its logical clock: one implementation.
//!
//! Invariant: the record's lease outlives every range of the worker the
//! second look found. The record's lease was granted some time after the
//! moment `elapsed_secs` is measured from, so at least `granted_secs -
//! elapsed_secs` of it is left; a range whose remaining TTL etcd reported
//! as `late_secs` (rounded down) expires within `late_secs + 1` of the
//! look. The TTL granted is not what is left of it: comparing against it
//! let a range whose bucket lease was granted after the record's outlive
//! the record by up to the grant-to-write latency (defect 41).

/// The TTL (seconds) the deregistered record must be re-granted with so
/// that it outlives every range the second look found, or `None` when the
/// lease it holds already does.
///
/// - `granted_secs`: the TTL the record's lease was granted with;
/// - `elapsed_secs`: the time since before that grant was sent, rounded up
///   to whole seconds (so what is left of the lease is not overestimated);
/// - `late_secs`: the longest remaining TTL etcd reported among the
///   worker's ranges found by the second look (0 if none).
pub fn extension_secs(granted_secs: u64, elapsed_secs: u64, late_secs: u64) -> Option<u64> {
    let left = granted_secs.saturating_sub(elapsed_secs);
    // etcd rounds a remaining TTL down: a second more covers the rest.
    let needed = late_secs.saturating_add(1);
    (needed > left).then_some(needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_left_longer_than_every_late_range_is_kept() {
        assert_eq!(extension_secs(21, 0, 0), None);
        assert_eq!(extension_secs(21, 5, 15), None);
    }

    #[test]
    fn a_late_range_longer_than_the_ttl_granted_extends_the_record() {
        assert_eq!(extension_secs(21, 0, 7650), Some(7651));
        assert_eq!(extension_secs(21, 0, 21), Some(22));
    }

    /// Defect 41: a range within the TTL granted but beyond what is left
    /// of it (its bucket lease granted after the record's).
    #[test]
    fn a_late_range_beyond_what_is_left_of_the_lease_extends_the_record() {
        assert_eq!(extension_secs(3, 1, 3), Some(4));
        assert_eq!(extension_secs(21, 5, 16), Some(17));
        assert_eq!(extension_secs(21, 30, 0), Some(1));
    }

    #[test]
    fn extreme_inputs_do_not_overflow() {
        assert_eq!(extension_secs(u64::MAX, 0, u64::MAX), None);
        assert_eq!(extension_secs(0, u64::MAX, u64::MAX), Some(u64::MAX));
    }
}

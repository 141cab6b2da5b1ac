//! Switches that re-introduce past defects into the pure core, so the
//! checker shows it finds each one. Compiled only with the `model-check`
//! feature: a release binary has neither the switches nor the code they
//! turn on.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A past defect, as a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mutant {
    /// A reserved range is served although a realignment overtook the
    /// reservation (no epoch check when it arrives).
    RealignOvertakesReservation,
    /// A replica whose --max-room lies below the mark takes a chunk ending
    /// at its own bounds, writing the mark down.
    MarkWrittenDown,
    /// A mark read below the chunks and ranges announced is accepted.
    MarkLoweredAccepted,
    /// Ranges are carved from a chunk under a later lease than the
    /// chunk's announcement, so they outlive it.
    RangeOutlivesChunkLease,
    /// A progress notification confirms the view without a quorum read
    /// (a member without a leader answers from its stale revision).
    ConfirmWithoutLeader,
    /// A progress notification moves the revision a new watch resumes
    /// from, past catch-up events it overtook.
    ResumePastUnappliedEvents,
    /// A chunk whose compare-and-swap had an unknown outcome is used.
    UnknownOutcomeReused,
    /// A new watch owes no catch-up read, so a progress notification that
    /// overtook its catch-up events confirms a view without them (defect
    /// 40, etcd before 3.4.25).
    ProgressOvertakesCatchUp,
    /// A deregistration does not look again, after its write, at ranges
    /// reserved between its read of their leases and the write (defect
    /// 25's last part), so the record may expire before such a range. The
    /// one switch outside the production's code: the decision is the
    /// production's (`store::etcd::deregistration::extension_secs`), the
    /// switch drops its answer in the model's deregistration step, which
    /// re-expresses `deregister_worker`'s I/O.
    DeregistrationWithoutSecondLook,
}

impl Mutant {
    pub const ALL: [Mutant; 9] = [
        Mutant::RealignOvertakesReservation,
        Mutant::MarkWrittenDown,
        Mutant::MarkLoweredAccepted,
        Mutant::RangeOutlivesChunkLease,
        Mutant::ConfirmWithoutLeader,
        Mutant::ResumePastUnappliedEvents,
        Mutant::UnknownOutcomeReused,
        Mutant::ProgressOvertakesCatchUp,
        Mutant::DeregistrationWithoutSecondLook,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutant::RealignOvertakesReservation => "realign-overtakes-reservation",
            Mutant::MarkWrittenDown => "mark-written-down",
            Mutant::MarkLoweredAccepted => "mark-lowered-accepted",
            Mutant::RangeOutlivesChunkLease => "range-outlives-chunk-lease",
            Mutant::ConfirmWithoutLeader => "confirm-without-leader",
            Mutant::ResumePastUnappliedEvents => "resume-past-unapplied-events",
            Mutant::UnknownOutcomeReused => "unknown-outcome-reused",
            Mutant::ProgressOvertakesCatchUp => "progress-overtakes-catch-up",
            Mutant::DeregistrationWithoutSecondLook => "deregistration-without-second-look",
        }
    }

    pub fn from_name(name: &str) -> Option<Mutant> {
        Mutant::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// 0: none; otherwise the index in [`Mutant::ALL`] plus one. Process-wide:
/// one check at a time per process (the checker's threads all see it).
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Turns `mutant` on (or every mutant off).
pub fn set(mutant: Option<Mutant>) {
    let value = mutant.map_or(0, |m| {
        Mutant::ALL
            .iter()
            .position(|&x| x == m)
            .map_or(0, |i| i + 1)
    });
    ACTIVE.store(value, Ordering::SeqCst);
}

/// True if `mutant` is on.
pub fn active(mutant: Mutant) -> bool {
    let value = ACTIVE.load(Ordering::Relaxed);
    value != 0 && Mutant::ALL.get(value - 1) == Some(&mutant)
}

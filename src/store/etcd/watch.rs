//! What a registration watch has proved, apart from the I/O that drives it:
//! when the replica's view is confirmed fresh, and where a new watch resumes.
//!
//! Two facts, kept apart because etcd can report them out of order:
//! - **Applied**: the last revision whose events the replica applied. A new
//!   watch resumes right after it; events delivered again are harmless (the
//!   allocator applies a registration by its revision).
//! - **Confirmed**: a linearizable read (a quorum read: a member without a
//!   leader cannot answer it) says which revision the cluster had reached
//!   when it was sent; a progress request sent after it returns is answered
//!   with the revision up to which the watch delivered everything (as the
//!   answering member knows it). At or above the read's revision, the view
//!   is confirmed as of when the read was sent; below it (a member cut off
//!   from its cluster answers from its own, stale revision) it is not. The
//!   read goes first: under a steady write load a read made after the
//!   progress request nearly always sees a later revision than the answer
//!   carries, and would never confirm.
//!
//! Confirmation never moves the resume point: on etcd 3.4.23 (Debian's) a
//! progress notification can overtake the catch-up events of a new watch
//! (created at revision 7, progress at 7, then the event of revision 2), and
//! resuming past it after a break would skip that event forever.

/// One watch stream's progress: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct WatchProgress {
    applied: i64,
    ask: Option<Ask>,
}

/// An outstanding request for confirmation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Ask {
    /// When the quorum read was sent (ms since the store's epoch).
    sent_ms: u64,
    /// The revision it answered, once it did (then the progress request
    /// is sent).
    quorum: Option<i64>,
}

impl WatchProgress {
    /// A watch that starts after `applied` (the revision of the snapshot or
    /// of the last event the replica applied).
    pub(crate) fn new(applied: i64) -> Self {
        Self { applied, ask: None }
    }

    /// Where a new watch resumes: right after the last revision applied.
    pub(crate) fn resume_after(&self) -> i64 {
        self.applied
    }

    /// The replica applied an event of `revision`.
    pub(crate) fn applied(&mut self, revision: i64) {
        self.applied = self.applied.max(revision);
    }

    /// When the outstanding request began, if one is.
    pub(crate) fn asked_at(&self) -> Option<u64> {
        self.ask.map(|ask| ask.sent_ms)
    }

    /// A quorum read was sent at `now_ms`.
    pub(crate) fn asked(&mut self, now_ms: u64) {
        self.ask = Some(Ask {
            sent_ms: now_ms,
            quorum: None,
        });
    }

    /// The quorum read failed: this request confirms nothing.
    pub(crate) fn quorum_failed(&mut self) {
        self.ask = None;
    }

    /// The quorum read saw `revision`; the progress request goes next.
    pub(crate) fn quorum_read(&mut self, revision: i64) {
        if let Some(ask) = &mut self.ask {
            ask.quorum = Some(revision);
        }
    }

    /// A progress notification at `revision`. Returns when the view is
    /// confirmed as of, if it is; it ends the request either way (one
    /// below the read's revision: the next request tries again). It never
    /// moves the resume point.
    pub(crate) fn progress(&mut self, revision: i64) -> Option<u64> {
        #[cfg(feature = "model-check")]
        if crate::model::mutants::active(crate::model::mutants::Mutant::ResumePastUnappliedEvents) {
            self.applied = self.applied.max(revision);
        }
        let ask = self.ask?;
        #[cfg(feature = "model-check")]
        if crate::model::mutants::active(crate::model::mutants::Mutant::ConfirmWithoutLeader) {
            self.ask = None;
            return Some(ask.sent_ms);
        }
        // Not the answer to a request sent after this read.
        let quorum = ask.quorum?;
        self.ask = None;
        (revision >= quorum).then_some(ask.sent_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_that_overtakes_catch_up_events_never_moves_the_resume_revision_past_them() {
        // A watch resumed after revision 1; etcd 3.4.23 answers the progress
        // request at revision 7 before the catch-up event of revision 2.
        let mut watch = WatchProgress::new(1);
        watch.asked(1000);
        watch.quorum_read(7);
        assert_eq!(watch.progress(7), Some(1000));
        // The stream breaks here: the next watch must deliver revision 2.
        assert_eq!(watch.resume_after(), 1, "resumes past an unapplied event");
        watch.applied(2);
        assert_eq!(watch.resume_after(), 2);
    }

    #[test]
    fn a_progress_below_the_quorum_read_confirms_nothing() {
        // A member cut off from its cluster answers from revision 5 while
        // the cluster is at 9.
        let mut watch = WatchProgress::new(5);
        watch.asked(1000);
        watch.quorum_read(9);
        assert_eq!(watch.progress(5), None, "stale progress confirmed");
        assert_eq!(watch.asked_at(), None, "the next request tries again");
        watch.asked(2000);
        watch.quorum_read(9);
        assert_eq!(watch.progress(9), Some(2000));
    }

    #[test]
    fn only_a_progress_after_the_quorum_read_confirms() {
        let mut watch = WatchProgress::new(3);
        watch.asked(2000);
        assert_eq!(watch.progress(4), None, "no quorum read yet");
        assert_eq!(watch.asked_at(), Some(2000), "still waiting");
        watch.quorum_read(4);
        assert_eq!(watch.progress(6), Some(2000));
        // A failed quorum read confirms nothing, whatever progress says.
        watch.asked(3000);
        watch.quorum_failed();
        assert_eq!(watch.progress(10), None);
        assert_eq!(watch.asked_at(), None);
    }

    #[test]
    fn progress_without_a_request_confirms_nothing() {
        let mut watch = WatchProgress::new(3);
        assert_eq!(watch.progress(8), None);
        watch.quorum_read(8);
        assert_eq!(watch.progress(8), None);
    }
}

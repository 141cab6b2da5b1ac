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
//!
//! Nor may such a notification confirm the view: a watch that starts at
//! revision S, created when etcd was at C >= S, delivers the events of
//! S..=C later (etcd's catch-up), and an etcd before 3.4.25 and 3.5.8 may
//! answer a progress request at or above the quorum read before them (a
//! realignment or deregistration not yet applied; if the stream then
//! breaks, the replica would serve by the old view until that confirmation
//! plus the staleness window, however old the event). So a watch created at
//! C >= S owes a **catch-up read**: a linearizable read of the keys modified
//! at or after S, applied as events; until one at or above C is applied, no
//! progress notification confirms anything. The stream's catch-up events
//! are then replays, which the allocator ignores by revision. The read
//! never moves the resume point: it cannot see keys deleted since S, which
//! a later watch still delivers.

/// One watch stream's progress: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchProgress {
    applied: i64,
    ask: Option<Ask>,
    catch_up: Option<CatchUp>,
}

/// A catch-up read the watch owes before anything is confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct CatchUp {
    /// The revision etcd created the watch at: the read must reach it.
    created: i64,
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
    pub fn new(applied: i64) -> Self {
        Self {
            applied,
            ask: None,
            catch_up: None,
        }
    }

    /// Where a new watch resumes: right after the last revision applied.
    pub fn resume_after(&self) -> i64 {
        self.applied
    }

    /// The replica applied an event of `revision`.
    pub fn applied(&mut self, revision: i64) {
        self.applied = self.applied.max(revision);
    }

    /// etcd created the watch (which starts right after `resume_after()`)
    /// at `revision`. Returns the revision a catch-up read starts from, if
    /// one is owed.
    pub fn created(&mut self, revision: i64) -> Option<i64> {
        if revision <= self.applied {
            // Nothing committed since the watch's start: no catch-up.
            return None;
        }
        #[cfg(feature = "model-check")]
        if crate::model::mutants::active(crate::model::mutants::Mutant::ProgressOvertakesCatchUp) {
            return None;
        }
        self.catch_up = Some(CatchUp { created: revision });
        Some(self.applied.saturating_add(1))
    }

    /// The catch-up read, at `revision`, is applied: progress may confirm
    /// again if it reached the revision the watch was created at.
    pub fn caught_up(&mut self, revision: i64) {
        if self.catch_up.is_some_and(|c| revision >= c.created) {
            self.catch_up = None;
        }
    }

    /// Whether a catch-up read is still owed.
    pub fn catching_up(&self) -> bool {
        self.catch_up.is_some()
    }

    /// When the outstanding request began, if one is.
    pub fn asked_at(&self) -> Option<u64> {
        self.ask.map(|ask| ask.sent_ms)
    }

    /// A quorum read was sent at `now_ms`.
    pub fn asked(&mut self, now_ms: u64) {
        self.ask = Some(Ask {
            sent_ms: now_ms,
            quorum: None,
        });
    }

    /// The quorum read failed: this request confirms nothing.
    pub fn quorum_failed(&mut self) {
        self.ask = None;
    }

    /// The quorum read saw `revision`; the progress request goes next.
    pub fn quorum_read(&mut self, revision: i64) {
        if let Some(ask) = &mut self.ask {
            ask.quorum = Some(revision);
        }
    }

    /// A progress notification at `revision`. Returns when the view is
    /// confirmed as of, if it is; it ends the request either way (one
    /// below the read's revision: the next request tries again). It never
    /// moves the resume point.
    pub fn progress(&mut self, revision: i64) -> Option<u64> {
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
        if self.catch_up.is_some() {
            // Maybe ahead of catch-up events not yet applied (see the
            // module docs).
            return None;
        }
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
        assert_eq!(watch.created(7), Some(2));
        // The catch-up read applied what 2..=7 left (not a deletion).
        watch.caught_up(7);
        watch.asked(1000);
        watch.quorum_read(7);
        assert_eq!(watch.progress(7), Some(1000));
        // The stream breaks here: the next watch must deliver revision 2.
        assert_eq!(watch.resume_after(), 1, "resumes past an unapplied event");
        watch.applied(2);
        assert_eq!(watch.resume_after(), 2);
    }

    #[test]
    fn a_progress_ahead_of_catch_up_events_confirms_nothing_until_the_catch_up_read() {
        // A replica back from a partition resumes after revision 1; etcd
        // creates the watch at revision 7, so the events of 2..=7 (a
        // realignment at 2) come later, and etcd 3.4.23 may answer the
        // progress request at 7 before them.
        let mut watch = WatchProgress::new(1);
        let catch_up_from = watch.created(7);
        watch.asked(1000);
        watch.quorum_read(7);
        assert_eq!(
            watch.progress(7),
            None,
            "confirmed a view that lacks the catch-up events"
        );
        assert_eq!(watch.asked_at(), None, "the next request tries again");
        assert_eq!(catch_up_from, Some(2), "no catch-up read owed");
        assert!(watch.catching_up());
        // A read that did not reach the watch's creation covers too little.
        watch.caught_up(6);
        watch.asked(2000);
        watch.quorum_read(8);
        assert_eq!(watch.progress(8), None, "confirmed after a short read");
        // Once the read of revisions 2..=8 is applied, progress confirms.
        watch.caught_up(8);
        assert!(!watch.catching_up());
        watch.asked(3000);
        watch.quorum_read(8);
        assert_eq!(watch.progress(8), Some(3000));
        assert_eq!(watch.resume_after(), 1, "the read moved the resume point");
    }

    #[test]
    fn a_watch_created_before_any_new_revision_owes_no_catch_up_read() {
        // Resumed after 7 (starts at 8), created at 7: nothing to catch up.
        let mut watch = WatchProgress::new(7);
        assert_eq!(watch.created(7), None);
        assert!(!watch.catching_up());
        watch.asked(1000);
        watch.quorum_read(7);
        assert_eq!(watch.progress(7), Some(1000));
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

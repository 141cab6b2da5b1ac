//! Registration sync, the decisions: given what happened (a watch message,
//! a quorum or catch-up read's answer, a reread after compaction, a broken
//! stream, a tick, the end of a backoff), what the replica does next (apply
//! these registrations, forget that worker, send a quorum read or a progress
//! request, confirm its view as of a time, open a watch from a revision,
//! back off). No I/O, no clock, no async: the driver in
//! [`super::registration`] does the I/O and feeds the answers in, and the
//! tests here drive every decision directly.
//!
//! What a watch proves (confirmation, the resume revision, the catch-up read
//! a new watch owes) is [`WatchProgress`]'s, the same code the model check
//! explores; this module adds the round around it:
//! - **Watching**: one watch from the revision after the last one applied.
//!   Every tick without a request outstanding sends a quorum read (unless a
//!   catch-up read is owed: nothing confirms before it is applied); its
//!   answer sends the progress request; a request unanswered past the store
//!   timeout breaks the watch.
//! - A broken watch (ended, failed, cancelled, a catch-up read that failed)
//!   marks etcd unreachable and backs off (100 ms doubling to 2 s, back to
//!   100 ms after a round longer than 10 s; the driver waits between half
//!   and all of each pause, jittered), then watches again from the
//!   revision after the last one applied: never from one only confirmed.
//! - A watch etcd compacted past **rereads** every registration: those read
//!   are applied, the known workers the read lacks are forgotten, and the
//!   view is confirmed as of when the read was sent (a linearizable read);
//!   the next watch starts after the read's revision.
//!
//! Invariants: every registration change reaches the allocator before a
//! confirmation that covers it (actions run in order); a confirmation
//! never moves the resume revision; etcd is marked reachable only by a
//! confirmation, unreachable only by a failure, and each change is reported
//! once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::client::pb;
use super::keys::worker_record;
use super::watch::WatchProgress;
use crate::store::{StoreUpdate, WorkerRecord};

/// The first pause after a broken watch.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause between watches: etcd back up is noticed within it.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A round (a watch, and its reread if any) that lasted this long was
/// healthy: the next failure backs off from [`MIN_BACKOFF`] again.
const HEALTHY_ROUND_MS: u64 = 10_000;

/// A registration key as a watch event or a read delivered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Change {
    /// Its mod revision (0 for an event without a key-value, which etcd
    /// never sends: applying 0 moves nothing).
    pub(super) revision: i64,
    pub(super) kind: ChangeKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ChangeKind {
    /// The worker's registration, as written.
    Put(WorkerRecord),
    /// The worker's key was deleted (its deregistration's lease expired).
    Deleted(Arc<str>),
    /// The worker's key holds a value this binary cannot read: ignored.
    Unreadable(Arc<str>),
    /// Not a registration key.
    Foreign,
}

impl Change {
    /// Decodes a key-value under `workers` (the registrations' prefix);
    /// `deleted` for a delete event. `None` kv: see [`Change::revision`].
    pub(super) fn decode(workers: &str, deleted: bool, kv: Option<&pb::KeyValue>) -> Self {
        let Some(kv) = kv else {
            return Self {
                revision: 0,
                kind: ChangeKind::Foreign,
            };
        };
        let name = std::str::from_utf8(&kv.key)
            .ok()
            .and_then(|key| key.strip_prefix(workers))
            .map(Arc::<str>::from);
        let kind = match name {
            None => ChangeKind::Foreign,
            Some(name) if deleted => ChangeKind::Deleted(name),
            Some(name) => match worker_record(name.clone(), kv) {
                Some(record) => ChangeKind::Put(record),
                None => ChangeKind::Unreadable(name),
            },
        };
        Self {
            revision: kv.mod_revision,
            kind,
        }
    }
}

/// One message of the watch stream, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct WatchMessage {
    /// etcd compacted past the revision the watch needed.
    pub(super) compacted: bool,
    /// etcd cancelled the watch, for this reason.
    pub(super) canceled: Option<String>,
    /// The answer to the create request.
    pub(super) created: bool,
    /// The response header's revision, if it had a header.
    pub(super) header_revision: Option<i64>,
    pub(super) events: Vec<Change>,
}

impl WatchMessage {
    pub(super) fn decode(workers: &str, response: &pb::WatchResponse) -> Self {
        Self {
            compacted: response.compact_revision > 0,
            canceled: response.canceled.then(|| response.cancel_reason.clone()),
            created: response.created,
            header_revision: response.header.as_ref().map(|h| h.revision),
            events: response
                .events
                .iter()
                .map(|event| {
                    let deleted = event.r#type == pb::event::EventType::Delete as i32;
                    Change::decode(workers, deleted, event.kv.as_ref())
                })
                .collect(),
        }
    }
}

/// The registrations a linearizable read returned, at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Read {
    pub(super) changes: Vec<Change>,
    pub(super) revision: i64,
}

/// What happened, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Event {
    /// The progress ticker fired (it runs while a watch is open).
    Tick,
    /// A message of the open watch.
    Message(WatchMessage),
    /// The watch could not be opened, or broke; why.
    WatchFailed(String),
    /// The quorum read of the outstanding request answered.
    QuorumRead(Result<i64, String>),
    /// The catch-up read the watch owes answered.
    CatchUpRead(Result<Read, String>),
    /// The reread after a compaction answered.
    Reread(Result<Read, String>),
    /// The backoff after a broken watch is over.
    BackoffOver,
}

/// What the driver does next, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// Hand the allocator a registration change.
    Apply(StoreUpdate),
    /// Log that this worker's registration could not be read (ignored).
    IgnoreUnreadable(Arc<str>),
    /// The view is confirmed as of this time (ms since the store's epoch).
    Confirm { as_of_ms: u64 },
    /// etcd answered again after a failure.
    Reachable,
    /// etcd failed after answering: serve only from reserved ranges.
    Unreachable { error: String },
    /// Open a watch of the registrations from this revision on.
    OpenWatch { start_revision: i64 },
    /// Close the watch, and drop its reads in flight.
    CloseWatch,
    /// Send a linearizable read of the cluster's revision.
    ReadQuorum,
    /// Ask the open watch for a progress notification.
    RequestProgress,
    /// Read the registrations modified at or after this revision.
    ReadCatchUp { min_mod_revision: i64 },
    /// Read every registration.
    Reread,
    /// Wait this long, then report [`Event::BackoffOver`].
    Sleep(Duration),
}

/// Where the round stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A watch is being opened, or is open.
    Watching,
    /// The reread after a compaction, sent at `asked_ms`, is in flight.
    Rereading { asked_ms: u64 },
    /// Waiting out the backoff before the next watch.
    BackingOff,
}

/// The replica's registration sync: see the module docs.
#[derive(Debug, Clone)]
pub(super) struct SyncState {
    /// Workers the allocator knows of: a reread that lacks one forgets it.
    known: HashSet<Arc<str>>,
    /// The current watch's progress (between watches: the resume revision).
    watch: WatchProgress,
    phase: Phase,
    /// Whether etcd answered last (as last reported to the driver).
    reachable: bool,
    /// The next backoff.
    backoff: Duration,
    /// How long a progress request may go unanswered.
    timeout: Duration,
    /// When the current round began (ms since the store's epoch).
    round_started_ms: u64,
}

impl SyncState {
    /// Follows the registrations after revision `applied` (the snapshot's),
    /// which hold the workers in `known`.
    pub(super) fn new(known: HashSet<Arc<str>>, applied: i64, timeout: Duration) -> Self {
        Self {
            known,
            watch: WatchProgress::new(applied),
            phase: Phase::BackingOff,
            reachable: true,
            backoff: MIN_BACKOFF,
            timeout,
            round_started_ms: 0,
        }
    }

    /// The first actions: open the first watch.
    pub(super) fn start(&mut self, now_ms: u64) -> Vec<Action> {
        self.open_watch(now_ms)
    }

    /// The revision the next watch resumes after.
    #[cfg(test)]
    fn resume_after(&self) -> i64 {
        self.watch.resume_after()
    }

    /// Decides what follows `event`, which happened at `now_ms`. An event
    /// that does not belong to the current phase (none does, from the
    /// driver) changes nothing.
    pub(super) fn handle(&mut self, now_ms: u64, event: Event) -> Vec<Action> {
        match (self.phase, event) {
            (Phase::Watching, Event::Tick) => self.tick(now_ms),
            (Phase::Watching, Event::Message(message)) => self.message(now_ms, message),
            (Phase::Watching, Event::WatchFailed(error)) => self.fail(now_ms, error),
            (Phase::Watching, Event::QuorumRead(Ok(revision))) => {
                self.watch.quorum_read(revision);
                vec![Action::RequestProgress]
            }
            (Phase::Watching, Event::QuorumRead(Err(_))) => {
                // This request confirms nothing; the next tick asks again.
                self.watch.quorum_failed();
                Vec::new()
            }
            (Phase::Watching, Event::CatchUpRead(Ok(read))) => {
                // As events, older than the stream's replays of them; the
                // resume revision stays (the read misses deletions).
                let mut actions = Vec::new();
                for change in read.changes {
                    self.apply(change, &mut actions);
                }
                self.watch.caught_up(read.revision);
                actions
            }
            (Phase::Watching, Event::CatchUpRead(Err(error))) => self.fail(
                now_ms,
                format!("the catch-up read of the registrations failed: {error}"),
            ),
            (Phase::Rereading { asked_ms }, Event::Reread(read)) => {
                let mut actions = match read {
                    Ok(read) => self.reread(asked_ms, read),
                    Err(error) => self.unreachable(error),
                };
                actions.extend(self.back_off(now_ms));
                actions
            }
            (Phase::BackingOff, Event::BackoffOver) => self.open_watch(now_ms),
            _ => Vec::new(),
        }
    }

    fn open_watch(&mut self, now_ms: u64) -> Vec<Action> {
        self.phase = Phase::Watching;
        self.round_started_ms = now_ms;
        // A new watch: no request outstanding, no catch-up owed yet.
        self.watch = WatchProgress::new(self.watch.resume_after());
        vec![Action::OpenWatch {
            start_revision: self.watch.resume_after().saturating_add(1),
        }]
    }

    fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        if let Some(sent_ms) = self.watch.asked_at() {
            let waited = Duration::from_millis(now_ms.saturating_sub(sent_ms));
            if waited > self.timeout {
                let error = format!(
                    "the watch did not confirm progress within {:?}",
                    self.timeout
                );
                return self.fail(now_ms, error);
            }
            return Vec::new();
        }
        if self.watch.catching_up() {
            // Nothing confirms before the catch-up read is applied, and
            // that read ends in its timeout.
            return Vec::new();
        }
        self.watch.asked(now_ms);
        vec![Action::ReadQuorum]
    }

    fn message(&mut self, now_ms: u64, message: WatchMessage) -> Vec<Action> {
        if message.compacted {
            self.phase = Phase::Rereading { asked_ms: now_ms };
            return vec![Action::CloseWatch, Action::Reread];
        }
        if let Some(reason) = message.canceled {
            return self.fail(now_ms, format!("etcd cancelled the watch: {reason}"));
        }
        let mut actions = Vec::new();
        if message.created {
            // A response without a header confirms nothing.
            let revision = message.header_revision.unwrap_or(i64::MAX);
            if let Some(min_mod_revision) = self.watch.created(revision) {
                actions.push(Action::ReadCatchUp { min_mod_revision });
            }
        }
        let progress = message.events.is_empty() && !message.created;
        for change in message.events {
            let revision = change.revision;
            self.apply(change, &mut actions);
            self.watch.applied(revision);
        }
        if progress {
            // The watch delivered every change up to its revision (as the
            // answering member knows it).
            let revision = message.header_revision.unwrap_or(0);
            if let Some(asked_ms) = self.watch.progress(revision) {
                actions.extend(self.confirm(asked_ms));
            }
        }
        actions
    }

    /// Applies every registration read, forgets the known workers the read
    /// lacks, and confirms the view as of when the read was sent.
    fn reread(&mut self, asked_ms: u64, read: Read) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut seen = HashSet::new();
        for change in read.changes {
            match &change.kind {
                ChangeKind::Put(record) => seen.insert(record.prefill_worker.clone()),
                ChangeKind::Unreadable(name) => seen.insert(name.clone()),
                ChangeKind::Deleted(_) | ChangeKind::Foreign => false,
            };
            self.apply(change, &mut actions);
        }
        let mut gone: Vec<Arc<str>> = self.known.difference(&seen).cloned().collect();
        gone.sort();
        for name in gone {
            let forgotten = Change {
                revision: read.revision,
                kind: ChangeKind::Deleted(name),
            };
            self.apply(forgotten, &mut actions);
        }
        actions.extend(self.confirm(asked_ms));
        self.watch = WatchProgress::new(read.revision);
        actions
    }

    fn apply(&mut self, change: Change, actions: &mut Vec<Action>) {
        match change.kind {
            ChangeKind::Put(record) => {
                self.known.insert(record.prefill_worker.clone());
                actions.push(Action::Apply(StoreUpdate::Registration(record)));
            }
            ChangeKind::Deleted(name) => {
                self.known.remove(&name);
                actions.push(Action::Apply(StoreUpdate::Forgotten {
                    prefill_worker: name,
                    revision: change.revision,
                }));
            }
            ChangeKind::Unreadable(name) => actions.push(Action::IgnoreUnreadable(name)),
            ChangeKind::Foreign => {}
        }
    }

    fn confirm(&mut self, as_of_ms: u64) -> Vec<Action> {
        let mut actions = vec![Action::Confirm { as_of_ms }];
        if !self.reachable {
            self.reachable = true;
            actions.push(Action::Reachable);
        }
        actions
    }

    fn unreachable(&mut self, error: String) -> Vec<Action> {
        if !self.reachable {
            return Vec::new();
        }
        self.reachable = false;
        vec![Action::Unreachable { error }]
    }

    /// The watch broke: close it, report etcd unreachable, back off; the
    /// next watch resumes after the last revision applied.
    fn fail(&mut self, now_ms: u64, error: String) -> Vec<Action> {
        let mut actions = vec![Action::CloseWatch];
        actions.extend(self.unreachable(error));
        actions.extend(self.back_off(now_ms));
        actions
    }

    fn back_off(&mut self, now_ms: u64) -> Vec<Action> {
        if now_ms.saturating_sub(self.round_started_ms) > HEALTHY_ROUND_MS {
            self.backoff = MIN_BACKOFF;
        }
        self.phase = Phase::BackingOff;
        let sleep = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        vec![Action::Sleep(sleep)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::DpSize;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn record(name: &str, dp_size: u32, revision: i64) -> WorkerRecord {
        WorkerRecord {
            prefill_worker: Arc::from(name),
            dp_size: DpSize::try_new(dp_size).expect("a valid dp_size"),
            registered: true,
            rooms_issued: 0,
            revision,
        }
    }

    fn put(name: &str, dp_size: u32, revision: i64) -> Change {
        Change {
            revision,
            kind: ChangeKind::Put(record(name, dp_size, revision)),
        }
    }

    fn deleted(name: &str, revision: i64) -> Change {
        Change {
            revision,
            kind: ChangeKind::Deleted(Arc::from(name)),
        }
    }

    fn registration(name: &str, dp_size: u32, revision: i64) -> Action {
        Action::Apply(StoreUpdate::Registration(record(name, dp_size, revision)))
    }

    fn forgotten(name: &str, revision: i64) -> Action {
        Action::Apply(StoreUpdate::Forgotten {
            prefill_worker: Arc::from(name),
            revision,
        })
    }

    fn created(revision: i64) -> Event {
        Event::Message(WatchMessage {
            created: true,
            header_revision: Some(revision),
            ..WatchMessage::default()
        })
    }

    fn progress(revision: i64) -> Event {
        Event::Message(WatchMessage {
            header_revision: Some(revision),
            ..WatchMessage::default()
        })
    }

    fn events(changes: Vec<Change>) -> Event {
        Event::Message(WatchMessage {
            header_revision: changes.iter().map(|c| c.revision).max(),
            events: changes,
            ..WatchMessage::default()
        })
    }

    /// A sync after revision `applied` whose first watch is open and was
    /// created with nothing to catch up.
    fn watching(applied: i64) -> SyncState {
        let mut sync = SyncState::new(HashSet::new(), applied, TIMEOUT);
        assert_eq!(
            sync.start(0),
            vec![Action::OpenWatch {
                start_revision: applied + 1
            }]
        );
        assert_eq!(sync.handle(0, created(applied)), vec![]);
        sync
    }

    /// Sends a quorum read at `now_ms` that answers `quorum`.
    fn ask(sync: &mut SyncState, now_ms: u64, quorum: i64) {
        assert_eq!(sync.handle(now_ms, Event::Tick), vec![Action::ReadQuorum]);
        assert_eq!(
            sync.handle(now_ms, Event::QuorumRead(Ok(quorum))),
            vec![Action::RequestProgress]
        );
    }

    #[test]
    fn a_progress_at_or_above_the_quorum_read_confirms_as_of_when_the_read_was_sent() {
        let mut sync = watching(5);
        ask(&mut sync, 1000, 9);
        assert_eq!(
            sync.handle(1500, progress(9)),
            vec![Action::Confirm { as_of_ms: 1000 }]
        );
        ask(&mut sync, 2000, 9);
        assert_eq!(
            sync.handle(2100, progress(12)),
            vec![Action::Confirm { as_of_ms: 2000 }]
        );
        assert_eq!(
            sync.resume_after(),
            5,
            "a confirmation moved the resume revision"
        );
    }

    #[test]
    fn a_leaderless_members_progress_never_confirms_without_a_quorum_read() {
        // A member cut off from its cluster answers progress from its own,
        // stale revision 5; the cluster is at 9.
        // (case, the quorum read's answer if any, the progress revision)
        type Case = (&'static str, Option<Result<i64, String>>, i64);
        let cases: [Case; 4] = [
            ("no quorum read answered yet", None, 5),
            ("the quorum read failed", Some(Err("no leader".into())), 5),
            ("progress below the quorum read", Some(Ok(9)), 5),
            ("progress just below the quorum read", Some(Ok(9)), 8),
        ];
        for (case, quorum, at) in cases {
            let mut sync = watching(5);
            assert_eq!(sync.handle(1000, Event::Tick), vec![Action::ReadQuorum]);
            if let Some(read) = quorum {
                let sent_progress = read.is_ok();
                let actions = sync.handle(1000, Event::QuorumRead(read));
                assert_eq!(
                    actions.contains(&Action::RequestProgress),
                    sent_progress,
                    "{case}"
                );
            }
            assert_eq!(sync.handle(1500, progress(at)), vec![], "{case}: confirmed");
        }
    }

    #[test]
    fn a_request_unanswered_past_the_timeout_breaks_the_watch() {
        let mut sync = watching(5);
        assert_eq!(sync.handle(1000, Event::Tick), vec![Action::ReadQuorum]);
        // Within the timeout: no second request.
        assert_eq!(sync.handle(2000, Event::Tick), vec![]);
        assert_eq!(sync.handle(6000, Event::Tick), vec![]);
        assert_eq!(
            sync.handle(6001, Event::Tick),
            vec![
                Action::CloseWatch,
                Action::Unreachable {
                    error: "the watch did not confirm progress within 5s".into()
                },
                Action::Sleep(MIN_BACKOFF),
            ]
        );
    }

    #[test]
    fn a_progress_ahead_of_unapplied_catch_up_events_never_confirms_nor_moves_the_resume_revision()
    {
        // Defect 40: a replica resumes after revision 1; etcd creates the
        // watch at 7, so the events of 2..=7 (a realignment at 2) come
        // later, and etcd 3.4.23 may answer progress at 7 before them.
        let mut sync = SyncState::new(HashSet::new(), 1, TIMEOUT);
        sync.start(0);
        // The first tick can go before the creation is answered.
        assert_eq!(sync.handle(10, Event::Tick), vec![Action::ReadQuorum]);
        assert_eq!(
            sync.handle(20, created(7)),
            vec![Action::ReadCatchUp {
                min_mod_revision: 2
            }]
        );
        assert_eq!(
            sync.handle(30, Event::QuorumRead(Ok(7))),
            vec![Action::RequestProgress]
        );
        assert_eq!(
            sync.handle(40, progress(7)),
            vec![],
            "confirmed a view that lacks the catch-up events"
        );
        // While the catch-up read is owed, no request goes out.
        assert_eq!(sync.handle(1000, Event::Tick), vec![]);
        // The read is applied first, as events; it does not move the resume
        // revision (it cannot see deletions).
        let read = Read {
            changes: vec![put("a", 4, 2)],
            revision: 7,
        };
        assert_eq!(
            sync.handle(1100, Event::CatchUpRead(Ok(read))),
            vec![registration("a", 4, 2)]
        );
        assert_eq!(
            sync.resume_after(),
            1,
            "the catch-up read moved the resume revision"
        );
        ask(&mut sync, 2000, 7);
        assert_eq!(
            sync.handle(2100, progress(7)),
            vec![Action::Confirm { as_of_ms: 2000 }]
        );
        assert_eq!(
            sync.resume_after(),
            1,
            "a progress moved the resume revision"
        );
        // The stream's replay of revision 2 moves it.
        assert_eq!(
            sync.handle(2200, events(vec![put("a", 4, 2)])),
            vec![registration("a", 4, 2)]
        );
        assert_eq!(sync.resume_after(), 2);
    }

    #[test]
    fn a_catch_up_read_short_of_the_watchs_creation_confirms_nothing() {
        let mut sync = SyncState::new(HashSet::new(), 1, TIMEOUT);
        sync.start(0);
        sync.handle(0, created(7));
        let short = Read {
            changes: vec![],
            revision: 6,
        };
        assert_eq!(sync.handle(10, Event::CatchUpRead(Ok(short))), vec![]);
        assert_eq!(
            sync.handle(1000, Event::Tick),
            vec![],
            "asked while catching up"
        );
    }

    #[test]
    fn a_failed_catch_up_read_breaks_the_watch_and_the_next_resumes_after_the_last_event() {
        let mut sync = SyncState::new(HashSet::new(), 1, TIMEOUT);
        sync.start(0);
        sync.handle(0, created(7));
        sync.handle(5, events(vec![put("a", 4, 3)]));
        assert_eq!(
            sync.handle(10, Event::CatchUpRead(Err("timed out".into()))),
            vec![
                Action::CloseWatch,
                Action::Unreachable {
                    error: "the catch-up read of the registrations failed: timed out".into()
                },
                Action::Sleep(MIN_BACKOFF),
            ]
        );
        assert_eq!(
            sync.handle(200, Event::BackoffOver),
            vec![Action::OpenWatch { start_revision: 4 }]
        );
    }

    #[test]
    fn watch_events_are_applied_in_order_and_move_the_resume_revision() {
        let mut sync = watching(5);
        let unreadable = Change {
            revision: 8,
            kind: ChangeKind::Unreadable(Arc::from("c")),
        };
        assert_eq!(
            sync.handle(
                10,
                events(vec![put("a", 4, 6), deleted("b", 7), unreadable])
            ),
            vec![
                registration("a", 4, 6),
                forgotten("b", 7),
                Action::IgnoreUnreadable(Arc::from("c")),
            ]
        );
        assert_eq!(sync.resume_after(), 8);
        // Events confirm nothing, whatever a request outstanding.
        ask(&mut sync, 1000, 8);
        assert_eq!(
            sync.handle(1100, events(vec![put("a", 2, 9)])),
            vec![registration("a", 2, 9)]
        );
    }

    #[test]
    fn a_broken_watch_reports_etcd_unreachable_once_and_a_confirmation_reachable_once() {
        let mut sync = watching(5);
        for (why, event) in [
            ("ended", Event::WatchFailed("etcd ended the watch".into())),
            (
                "cancelled",
                Event::Message(WatchMessage {
                    canceled: Some("no leader".into()),
                    ..WatchMessage::default()
                }),
            ),
        ] {
            let actions = sync.handle(100, event);
            let reported = actions
                .iter()
                .filter(|a| matches!(a, Action::Unreachable { .. }))
                .count();
            assert_eq!(actions.first(), Some(&Action::CloseWatch), "{why}");
            assert_eq!(reported, usize::from(why == "ended"), "{why}");
            if why == "cancelled" {
                assert_eq!(actions.len(), 2, "{why}: {actions:?}");
            }
            assert_eq!(
                sync.handle(5000, Event::BackoffOver),
                vec![Action::OpenWatch { start_revision: 6 }]
            );
        }
        sync.handle(5000, created(5));
        ask(&mut sync, 6000, 5);
        assert_eq!(
            sync.handle(6100, progress(5)),
            vec![Action::Confirm { as_of_ms: 6000 }, Action::Reachable]
        );
        ask(&mut sync, 7000, 5);
        assert_eq!(
            sync.handle(7100, progress(5)),
            vec![Action::Confirm { as_of_ms: 7000 }]
        );
    }

    #[test]
    fn a_compacted_watch_rereads_forgets_workers_gone_and_resumes_after_the_read() {
        let known = ["a", "b", "c"].into_iter().map(Arc::<str>::from).collect();
        let mut sync = SyncState::new(known, 5, TIMEOUT);
        sync.start(0);
        let compacted = Event::Message(WatchMessage {
            compacted: true,
            ..WatchMessage::default()
        });
        assert_eq!(
            sync.handle(1000, compacted),
            vec![Action::CloseWatch, Action::Reread]
        );
        // Watch events no longer count.
        assert_eq!(sync.handle(1001, progress(50)), vec![]);
        let read = Read {
            changes: vec![
                put("a", 8, 40),
                Change {
                    revision: 41,
                    kind: ChangeKind::Unreadable(Arc::from("b")),
                },
            ],
            revision: 50,
        };
        assert_eq!(
            sync.handle(1200, Event::Reread(Ok(read))),
            vec![
                registration("a", 8, 40),
                Action::IgnoreUnreadable(Arc::from("b")),
                forgotten("c", 50),
                Action::Confirm { as_of_ms: 1000 },
                Action::Sleep(MIN_BACKOFF),
            ]
        );
        assert_eq!(
            sync.handle(1400, Event::BackoffOver),
            vec![Action::OpenWatch { start_revision: 51 }]
        );
        // "c" is forgotten for good: a later reread lacking it says nothing.
        sync.handle(1500, compacted_message());
        let read = Read {
            changes: vec![],
            revision: 60,
        };
        assert_eq!(
            sync.handle(1600, Event::Reread(Ok(read))),
            vec![
                forgotten("a", 60),
                forgotten("b", 60),
                Action::Confirm { as_of_ms: 1500 },
                Action::Sleep(MIN_BACKOFF * 2),
            ]
        );
    }

    fn compacted_message() -> Event {
        Event::Message(WatchMessage {
            compacted: true,
            ..WatchMessage::default()
        })
    }

    #[test]
    fn a_failed_reread_reports_etcd_unreachable_and_the_next_watch_resumes_where_it_was() {
        let mut sync = watching(5);
        sync.handle(10, events(vec![put("a", 4, 6)]));
        sync.handle(20, compacted_message());
        assert_eq!(
            sync.handle(30, Event::Reread(Err("timed out".into()))),
            vec![
                Action::Unreachable {
                    error: "timed out".into()
                },
                Action::Sleep(MIN_BACKOFF),
            ]
        );
        assert_eq!(
            sync.handle(200, Event::BackoffOver),
            vec![Action::OpenWatch { start_revision: 7 }]
        );
    }

    #[test]
    fn backoff_doubles_to_two_seconds_and_resets_after_a_healthy_round() {
        let mut sync = watching(5);
        let mut now = 0;
        let mut pauses = Vec::new();
        for _ in 0..6 {
            let actions = sync.handle(now, Event::WatchFailed("refused".into()));
            let Some(Action::Sleep(pause)) = actions.last() else {
                panic!("no backoff in {actions:?}");
            };
            pauses.push(pause.as_millis());
            now += 10;
            sync.handle(now, Event::BackoffOver);
        }
        assert_eq!(pauses, [100, 200, 400, 800, 1600, 2000]);
        // A round of more than 10 s was healthy.
        now += HEALTHY_ROUND_MS + 1;
        let actions = sync.handle(now, Event::WatchFailed("refused".into()));
        assert_eq!(actions.last(), Some(&Action::Sleep(MIN_BACKOFF)));
    }

    #[test]
    fn events_of_another_phase_change_nothing() {
        let mut sync = watching(5);
        sync.handle(0, Event::WatchFailed("refused".into()));
        for event in [
            Event::Tick,
            progress(9),
            Event::QuorumRead(Ok(9)),
            Event::Reread(Ok(Read {
                changes: vec![],
                revision: 9,
            })),
        ] {
            assert_eq!(sync.handle(10, event), vec![]);
        }
        assert_eq!(sync.resume_after(), 5);
        assert_eq!(
            sync.handle(100, Event::BackoffOver),
            vec![Action::OpenWatch { start_revision: 6 }]
        );
        assert_eq!(sync.handle(100, Event::BackoffOver), vec![]);
    }

    #[test]
    fn a_watch_response_decodes_into_changes_of_the_registrations() {
        let workers = "/p/v1/workers/";
        let kv = |key: &str, value: &str, revision: i64| pb::KeyValue {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            mod_revision: revision,
            ..pb::KeyValue::default()
        };
        let event = |deleted: bool, kv: Option<pb::KeyValue>| pb::Event {
            r#type: if deleted {
                pb::event::EventType::Delete as i32
            } else {
                pb::event::EventType::Put as i32
            },
            kv,
            ..pb::Event::default()
        };
        let response = pb::WatchResponse {
            header: Some(pb::ResponseHeader {
                revision: 12,
                ..pb::ResponseHeader::default()
            }),
            events: vec![
                event(
                    false,
                    Some(kv(
                        "/p/v1/workers/a",
                        r#"{"dp_size":4,"registered":true}"#,
                        10,
                    )),
                ),
                event(true, Some(kv("/p/v1/workers/b", "", 11))),
                event(false, Some(kv("/p/v1/workers/c", "{", 12))),
                event(false, Some(kv("/q/other", "", 12))),
                event(false, None),
            ],
            ..pb::WatchResponse::default()
        };
        let message = WatchMessage::decode(workers, &response);
        assert_eq!(message.header_revision, Some(12));
        assert!(!message.compacted && !message.created && message.canceled.is_none());
        assert_eq!(
            message.events,
            vec![
                put("a", 4, 10),
                deleted("b", 11),
                Change {
                    revision: 12,
                    kind: ChangeKind::Unreadable(Arc::from("c"))
                },
                Change {
                    revision: 12,
                    kind: ChangeKind::Foreign
                },
                Change {
                    revision: 0,
                    kind: ChangeKind::Foreign
                },
            ]
        );
        let canceled = pb::WatchResponse {
            canceled: true,
            cancel_reason: "no leader".into(),
            compact_revision: 0,
            ..pb::WatchResponse::default()
        };
        assert_eq!(
            WatchMessage::decode(workers, &canceled).canceled.as_deref(),
            Some("no leader")
        );
    }

    /// A registration under a name the contract refuses (written by hand
    /// or by another tool) is unreadable, as at start-up: applied, it would
    /// make the name known, and a known worker's name is not checked again
    /// before it gets rooms.
    #[test]
    fn a_registration_under_an_invalid_name_is_unreadable() {
        let workers = "/p/v1/workers/";
        let value = crate::store::etcd::keys::encode_worker(DpSize::try_new(2).unwrap(), true);
        for name in ["a\u{7}b", &"w".repeat(254), ""] {
            let kv = pb::KeyValue {
                key: format!("{workers}{name}").into_bytes(),
                value: value.clone().into_bytes(),
                mod_revision: 5,
                ..Default::default()
            };
            assert_eq!(
                Change::decode(workers, false, Some(&kv)).kind,
                ChangeKind::Unreadable(Arc::from(name)),
                "{name:?}"
            );
        }
    }
}

//! Registration sync, the driver: follows `v1/workers/` with a watch for
//! promptness, progress requests to confirm the view is caught up, and a
//! full reread when the watch broke past what etcd still has (see the
//! store's docs, "Registrations"). Every decision is [`SyncState`]'s
//! ([`super::sync`]); this task only does the I/O its actions ask for and
//! reports what came back as events.
//!
//! Invariants: actions run in the order decided (so a registration reaches
//! the allocator before the confirmation that covers it); an action that
//! fails (a watch that cannot be opened, a request that cannot be sent)
//! reports its failure as the next event, after the rest of its batch;
//! every read and the watch's opening are bounded by the store timeout, and
//! closing a watch drops its reads in flight.
//!
//! Why the catch-up read may miss a deleted worker key, and why that is
//! safe: a worker key is deleted only when the lease of its deregistration
//! expires, at least `2 * retention` after the deregistration, so a
//! deletion the read misses with no later put of the key means a
//! deregistration missed too, at least that long ago. By then no range the
//! replica holds for the worker can serve (each was reserved before the
//! deregistration, whose revision the reservation compared, and serves for
//! at most `retention`), and a new reservation compares the registration's
//! revision and fails (`StaleRegistration`): the stale view hands out
//! nothing, and the stream still delivers both events.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use room_allocator_client::backoff::{Backoff, Jitter};
use tokio::sync::mpsc;
use tonic::Streaming;
use tracing::{debug, info, warn};

use super::client::{pb, prefix_end, EtcdError};
use super::sync::{Action, Change, Event, Read, SyncState, WatchMessage};
use super::{Shared, PAGE_KEYS, PROGRESS_INTERVAL};
use crate::store::{StoreError, StoreUpdate};

/// A read of the registrations in flight.
type RegistrationRead = Pin<Box<dyn Future<Output = Result<Read, StoreError>> + Send>>;

/// A linearizable read in flight, answering the cluster's revision.
type QuorumRead = Pin<Box<dyn Future<Output = Result<i64, StoreError>> + Send>>;

/// Follows the registrations: see the module docs.
pub(super) struct RegistrationSync {
    shared: Arc<Shared>,
    updates: mpsc::UnboundedSender<StoreUpdate>,
    state: SyncState,
}

/// The I/O in flight: each is `Some` only while its action is.
#[derive(Default)]
struct InFlight {
    /// The open watch's requests (create, then progress requests).
    requests: Option<mpsc::Sender<pb::WatchRequest>>,
    stream: Option<Streaming<pb::WatchResponse>>,
    /// Ticks while a watch is open.
    ticker: Option<tokio::time::Interval>,
    quorum: Option<QuorumRead>,
    catch_up: Option<RegistrationRead>,
    reread: Option<RegistrationRead>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl RegistrationSync {
    /// A sync of the registrations after revision `applied` (the
    /// snapshot's), which hold the workers in `known`.
    pub(super) fn new(
        shared: Arc<Shared>,
        updates: mpsc::UnboundedSender<StoreUpdate>,
        known: HashSet<Arc<str>>,
        applied: i64,
    ) -> Self {
        let state = SyncState::new(known, applied, shared.timeout);
        Self {
            shared,
            updates,
            state,
        }
    }

    /// Follows the registrations, until the store aborts the task.
    pub(super) async fn run(mut self) {
        let mut io = InFlight::default();
        let mut actions: VecDeque<Action> = self.state.start(self.shared.elapsed_ms()).into();
        loop {
            // One decision's actions, then the events their failures
            // reported: each failure ends the watch, so this settles after
            // a few rounds.
            while let Some(action) = actions.pop_front() {
                if let Some(event) = self.execute(action, &mut io).await {
                    let now = self.shared.elapsed_ms();
                    actions.extend(self.state.handle(now, event));
                }
            }
            let event = self.next_event(&mut io).await;
            actions.extend(self.state.handle(self.shared.elapsed_ms(), event));
        }
    }

    /// Waits for whatever in flight answers first. Something always is:
    /// each phase's actions start its I/O (a watch, then its ticker; a
    /// reread; a backoff), and a failure to start one ends in a backoff. If
    /// nothing were, `select!` would panic and end the task, and the
    /// replica would turn stale (UNAVAILABLE), never serve a stale view.
    async fn next_event(&self, io: &mut InFlight) -> Event {
        let workers = self.shared.keys.workers();
        tokio::select! {
            message = async { io.stream.as_mut().expect("polled only while a watch is open").message().await }, if io.stream.is_some() => {
                match message {
                    Ok(Some(response)) => Event::Message(WatchMessage::decode(&workers, &response)),
                    Ok(None) => Event::WatchFailed("etcd ended the watch".into()),
                    Err(status) => Event::WatchFailed(EtcdError::from(status).to_string()),
                }
            }
            read = async { io.quorum.as_mut().expect("polled only while a read is in flight").await }, if io.quorum.is_some() => {
                io.quorum = None;
                Event::QuorumRead(read.map_err(|error| {
                    debug!(%error, "the quorum read that confirms the view failed; it stays unconfirmed");
                    error.to_string()
                }))
            }
            read = async { io.catch_up.as_mut().expect("polled only while a read is in flight").await }, if io.catch_up.is_some() => {
                io.catch_up = None;
                Event::CatchUpRead(read.map_err(|error| error.to_string()))
            }
            read = async { io.reread.as_mut().expect("polled only while a read is in flight").await }, if io.reread.is_some() => {
                io.reread = None;
                Event::Reread(read.map_err(|error| error.to_string()))
            }
            () = async { io.sleep.as_mut().expect("polled only while backing off").await }, if io.sleep.is_some() => {
                io.sleep = None;
                Event::BackoffOver
            }
            _ = async { io.ticker.as_mut().expect("polled only while a watch is open").tick().await }, if io.ticker.is_some() => {
                Event::Tick
            }
        }
    }

    /// Does what `action` asks; returns the failure it ran into, if any.
    async fn execute(&mut self, action: Action, io: &mut InFlight) -> Option<Event> {
        match action {
            Action::Apply(update) => {
                let _ = self.updates.send(update);
            }
            Action::IgnoreUnreadable(worker) => {
                warn!(worker = %worker.escape_debug(), "ignoring an unreadable registration in etcd");
            }
            Action::Confirm { as_of_ms } => {
                self.shared
                    .confirmed_ms
                    .fetch_max(as_of_ms, Ordering::AcqRel);
            }
            Action::Reachable => {
                self.shared.reachable.store(true, Ordering::Release);
                info!("etcd is reachable again");
            }
            Action::Unreachable { error } => {
                self.shared.reachable.store(false, Ordering::Release);
                warn!(%error, "etcd is unreachable; serving only from reserved ranges until the staleness window ends");
            }
            Action::OpenWatch { start_revision } => {
                return self
                    .open_watch(start_revision, io)
                    .await
                    .err()
                    .map(Event::WatchFailed);
            }
            Action::CloseWatch => {
                io.requests = None;
                io.stream = None;
                io.ticker = None;
                io.quorum = None;
                io.catch_up = None;
            }
            Action::ReadQuorum => {
                io.quorum = Some(Box::pin(quorum_revision(self.shared.clone())));
            }
            Action::RequestProgress => {
                let request = pb::WatchRequest {
                    request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
                        pb::WatchProgressRequest {},
                    )),
                };
                let sent = match &io.requests {
                    Some(requests) => requests.send(request).await.is_ok(),
                    None => false,
                };
                if !sent {
                    return Some(Event::WatchFailed("the watch request stream closed".into()));
                }
            }
            Action::ReadCatchUp { min_mod_revision } => {
                io.catch_up = Some(Box::pin(read_workers(
                    self.shared.clone(),
                    min_mod_revision,
                )));
            }
            Action::Reread => {
                io.reread = Some(Box::pin(read_workers(self.shared.clone(), 0)));
            }
            Action::Sleep(pause) => {
                // Replicas that lost etcd together come back spread out:
                // between half and all of the pause the decisions chose.
                let pause = Backoff::new(pause, pause, Jitter::Equal).delay(0);
                io.sleep = Some(Box::pin(tokio::time::sleep(pause)));
            }
        }
        None
    }

    /// Opens a watch of the registrations from `start_revision` on.
    async fn open_watch(&self, start_revision: i64, io: &mut InFlight) -> Result<(), String> {
        let prefix = self.shared.keys.workers();
        let (requests, request_stream) = mpsc::channel(4);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: prefix.clone().into_bytes(),
                    range_end: prefix_end(prefix.as_bytes()),
                    start_revision,
                    ..Default::default()
                },
            )),
        };
        if requests.send(create).await.is_err() {
            return Err("the watch request stream closed".into());
        }
        let opened = tokio::time::timeout(
            self.shared.timeout,
            self.shared.client.watch(request_stream),
        )
        .await;
        let stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(error.to_string()),
            Err(_) => return Err("no answer to the watch".into()),
        };
        // Its first tick is at once: a quorum read goes out right away.
        let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        io.requests = Some(requests);
        io.stream = Some(stream);
        io.ticker = Some(ticker);
        Ok(())
    }
}

/// The registrations modified at or after `min_mod_revision` (0: all), by
/// a linearizable read in pages at one revision; with that revision.
/// Deleted keys are not seen: only a deregistered worker's key is deleted
/// (its lease expired), and see the module docs for why the catch-up read
/// may miss that.
async fn read_workers(shared: Arc<Shared>, min_mod_revision: i64) -> Result<Read, StoreError> {
    let workers = shared.keys.workers();
    let end = prefix_end(workers.as_bytes());
    let mut from = workers.clone().into_bytes();
    let mut revision = 0;
    let mut kvs = Vec::new();
    loop {
        let page = shared
            .timed(
                "read the registrations",
                shared.client.range(pb::RangeRequest {
                    key: from.clone(),
                    range_end: end.clone(),
                    limit: PAGE_KEYS,
                    revision,
                    min_mod_revision,
                    ..Default::default()
                }),
            )
            .await?;
        if revision == 0 {
            // A response without a header: a read at "now" again would
            // not be one view, so take none.
            revision = page.header.as_ref().map_or(0, |h| h.revision);
            if revision == 0 {
                return Err(StoreError::Etcd {
                    operation: "read the registrations",
                    message: "the answer carried no revision; retrying".into(),
                });
            }
        }
        if let Some(last) = page.kvs.last() {
            from = last.key.clone();
            from.push(0);
        }
        let more = page.more && !page.kvs.is_empty();
        kvs.extend(page.kvs);
        if !more {
            let changes = kvs
                .iter()
                .map(|kv| Change::decode(&workers, false, Some(kv)))
                .collect();
            return Ok(Read { changes, revision });
        }
    }
}

/// The cluster's current revision, by a linearizable read (etcd's default
/// for Range: the member checks with the leader, so a member cut off from
/// its cluster cannot answer).
async fn quorum_revision(shared: Arc<Shared>) -> Result<i64, StoreError> {
    let request = pb::RangeRequest {
        key: shared.keys.high_water().into_bytes(),
        count_only: true,
        ..Default::default()
    };
    let response = shared
        .timed("read the cluster's revision", shared.client.range(request))
        .await?;
    // A response without a header confirms nothing.
    Ok(response.header.map_or(i64::MAX, |h| h.revision))
}

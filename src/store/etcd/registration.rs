//! Registration sync: following `v1/workers/` so every replica applies
//! every registration change, and confirming that view fresh (see the
//! store's docs, "Registrations", and [`super::watch`] for what a watch
//! proves).
//!
//! Invariants: a replica's view is confirmed only by a progress
//! notification at or above a quorum read sent before it, and never while
//! a new watch's catch-up read is unapplied; the revision a broken watch
//! resumes from moves only with applied events; a reread after compaction
//! forgets the workers it no longer finds.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::client::{pb, prefix_end, EtcdError};
use super::keys::worker_record;
use super::watch::WatchProgress;
use super::{Shared, PAGE_KEYS, PROGRESS_INTERVAL};
use crate::store::{StoreError, StoreUpdate};

/// Follows `v1/workers/`: a watch for promptness, progress requests to
/// confirm the view is caught up, and a full reread when the watch broke
/// past what etcd still has.
pub(super) struct RegistrationSync {
    pub(super) shared: Arc<Shared>,
    pub(super) updates: mpsc::UnboundedSender<StoreUpdate>,
    /// Workers the allocator knows of: a reread that lacks one forgets it.
    pub(super) known: HashSet<Arc<str>>,
}

impl RegistrationSync {
    /// Follows the registrations applied up to `applied` (the snapshot's
    /// revision), forever.
    pub(super) async fn run(mut self, mut applied: i64) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            match self.watch(applied).await {
                WatchEnd::Compacted => match self.reread().await {
                    Ok(seen) => applied = seen,
                    Err(error) => self.unreachable(&error),
                },
                WatchEnd::Failed(error, seen) => {
                    applied = applied.max(seen);
                    self.unreachable(&error);
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    pub(super) fn unreachable(&self, error: &str) {
        if self.shared.reachable.swap(false, Ordering::AcqRel) {
            warn!(%error, "etcd is unreachable; serving only from reserved ranges until the staleness window ends");
        }
    }

    /// Watches from `applied + 1` until the watch breaks; returns how, with
    /// the last revision applied.
    ///
    /// A watch etcd created at a revision at or past its start owes a
    /// catch-up read before progress may confirm the view ([`watch`]): the
    /// registrations modified since the start, read linearizably and applied
    /// as events. That read misses a worker key deleted since the start,
    /// which is safe: a worker key is deleted only when the lease of its
    /// deregistration expires, at least `2 * retention` after the
    /// deregistration, so a deletion the read misses with no later put of
    /// the key means a deregistration missed too, at least that long ago.
    /// By then no range the replica holds for the worker can serve (each
    /// was reserved before the deregistration, whose revision the
    /// reservation compared, and serves for at most `retention`), and a new
    /// reservation compares the registration's revision and fails
    /// (`StaleRegistration`): the stale view hands out nothing, and the
    /// stream still delivers both events.
    pub(super) async fn watch(&mut self, applied: i64) -> WatchEnd {
        let mut progress = WatchProgress::new(applied);
        let failed = |error: String, progress: &WatchProgress| {
            WatchEnd::Failed(error, progress.resume_after())
        };
        let prefix = self.shared.keys.workers();
        let (requests, request_stream) = mpsc::channel(4);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: prefix.clone().into_bytes(),
                    range_end: prefix_end(prefix.as_bytes()),
                    start_revision: applied + 1,
                    ..Default::default()
                },
            )),
        };
        if requests.send(create).await.is_err() {
            return failed("the watch request stream closed".into(), &progress);
        }
        let opened = tokio::time::timeout(
            self.shared.timeout,
            self.shared.client.watch(request_stream),
        )
        .await;
        let mut stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return failed(error.to_string(), &progress),
            Err(_) => return failed("no answer to the watch".into(), &progress),
        };
        let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The quorum read of the outstanding request, while in flight.
        let mut quorum: Option<QuorumRead> = None;
        // The catch-up read the watch owes (see `watch`), while in flight.
        let mut catch_up: Option<CatchUpRead> = None;
        loop {
            tokio::select! {
                message = stream.message() => {
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => return failed("etcd ended the watch".into(), &progress),
                        Err(status) => return failed(EtcdError::from(status).to_string(), &progress),
                    };
                    if response.compact_revision > 0 {
                        return WatchEnd::Compacted;
                    }
                    if response.canceled {
                        return failed(format!("etcd cancelled the watch: {}", response.cancel_reason), &progress);
                    }
                    if response.created {
                        // A response without a header confirms nothing.
                        let revision = response.header.as_ref().map_or(i64::MAX, |h| h.revision);
                        if let Some(from) = progress.created(revision) {
                            catch_up = Some(Box::pin(read_workers(self.shared.clone(), from)));
                        }
                    }
                    for event in &response.events {
                        if let Some(kv) = &event.kv {
                            self.apply(event.r#type, kv);
                            progress.applied(kv.mod_revision);
                        }
                    }
                    if response.events.is_empty() && !response.created {
                        // A progress notification: the watch delivered every
                        // change up to its revision (as the member knows it).
                        let revision = response.header.as_ref().map_or(0, |h| h.revision);
                        if let Some(asked) = progress.progress(revision) {
                            self.confirm(asked);
                        }
                    }
                }
                read = async { quorum.as_mut().expect("polled only while a read is in flight").await }, if quorum.is_some() => {
                    quorum = None;
                    match read {
                        Ok(revision) => {
                            progress.quorum_read(revision);
                            let request = pb::WatchRequest {
                                request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
                                    pb::WatchProgressRequest {},
                                )),
                            };
                            if requests.send(request).await.is_err() {
                                return failed("the watch request stream closed".into(), &progress);
                            }
                        }
                        Err(error) => {
                            debug!(%error, "the quorum read that confirms the view failed; it stays unconfirmed");
                            progress.quorum_failed();
                        }
                    }
                }
                read = async { catch_up.as_mut().expect("polled only while a read is in flight").await }, if catch_up.is_some() => {
                    catch_up = None;
                    match read {
                        Ok((kvs, revision)) => {
                            // As events, older than the stream's replays
                            // of them; the resume point stays (see `watch`).
                            for kv in &kvs {
                                self.apply(pb::event::EventType::Put as i32, kv);
                            }
                            progress.caught_up(revision);
                        }
                        Err(error) => return failed(format!("the catch-up read of the registrations failed: {error}"), &progress),
                    }
                }
                _ = ticker.tick() => {
                    if let Some(sent) = progress.asked_at() {
                        let waited = Duration::from_millis(self.shared.elapsed_ms().saturating_sub(sent));
                        if waited > self.shared.timeout {
                            return failed(format!("the watch did not confirm progress within {:?}", self.shared.timeout), &progress);
                        }
                        continue;
                    }
                    if progress.catching_up() {
                        // Nothing confirms before the catch-up read is
                        // applied, and that read ends in its timeout.
                        continue;
                    }
                    progress.asked(self.shared.elapsed_ms());
                    quorum = Some(Box::pin(quorum_revision(self.shared.clone())));
                }
            }
        }
    }

    pub(super) fn confirm(&self, asked_ms: u64) {
        self.shared
            .confirmed_ms
            .fetch_max(asked_ms, Ordering::AcqRel);
        if !self.shared.reachable.swap(true, Ordering::AcqRel) {
            info!("etcd is reachable again");
        }
    }

    pub(super) fn apply(&mut self, kind: i32, kv: &pb::KeyValue) {
        let prefix = self.shared.keys.workers();
        let Some(name) = std::str::from_utf8(&kv.key)
            .ok()
            .and_then(|key| key.strip_prefix(&prefix))
        else {
            return;
        };
        let name: Arc<str> = Arc::from(name);
        if kind == pb::event::EventType::Delete as i32 {
            self.known.remove(&name);
            let _ = self.updates.send(StoreUpdate::Forgotten {
                prefill_worker: name,
                revision: kv.mod_revision,
            });
            return;
        }
        match worker_record(name.clone(), kv) {
            Some(record) => {
                self.known.insert(name);
                let _ = self.updates.send(StoreUpdate::Registration(record));
            }
            None => {
                warn!(worker = %name.escape_debug(), "ignoring an unreadable registration in etcd")
            }
        }
    }

    /// Rereads every registration (the watch fell behind a compaction);
    /// workers no longer there are forgotten. Returns the read's revision.
    pub(super) async fn reread(&mut self) -> Result<i64, String> {
        let asked = self.shared.elapsed_ms();
        let prefix = self.shared.keys.workers();
        let (kvs, revision) = read_workers(self.shared.clone(), 0)
            .await
            .map_err(|e| e.to_string())?;
        let mut seen = HashSet::new();
        for kv in &kvs {
            if let Some(name) = std::str::from_utf8(&kv.key)
                .ok()
                .and_then(|key| key.strip_prefix(&prefix))
            {
                seen.insert(Arc::<str>::from(name));
            }
            self.apply(pb::event::EventType::Put as i32, kv);
        }
        let gone: Vec<Arc<str>> = self.known.difference(&seen).cloned().collect();
        for name in gone {
            self.known.remove(&name);
            let _ = self.updates.send(StoreUpdate::Forgotten {
                prefill_worker: name,
                revision,
            });
        }
        self.confirm(asked);
        Ok(revision)
    }
}

/// Why a watch ended.
pub(super) enum WatchEnd {
    /// etcd compacted past the revision the watch needed: reread everything.
    Compacted,
    /// The watch broke; the last revision applied, to resume after.
    Failed(String, i64),
}

/// The registrations modified at or after `min_mod_revision` (0: all), by
/// a linearizable read in pages at one revision; with that revision.
/// Deleted keys are not seen: only a deregistered worker's key is deleted
/// (its lease expired), and see `RegistrationSync::watch` for why the
/// catch-up read may miss that.
pub(super) async fn read_workers(
    shared: Arc<Shared>,
    min_mod_revision: i64,
) -> Result<(Vec<pb::KeyValue>, i64), StoreError> {
    let prefix = shared.keys.workers();
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.into_bytes();
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
            return Ok((kvs, revision));
        }
    }
}

/// A catch-up read in flight (see `RegistrationSync::watch`).
pub(super) type CatchUpRead = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(Vec<pb::KeyValue>, i64), StoreError>> + Send>,
>;

/// A linearizable read in flight, answering the cluster's revision.
pub(super) type QuorumRead =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<i64, StoreError>> + Send>>;

/// The cluster's current revision, by a linearizable read (etcd's default
/// for Range: the member checks with the leader, so a member cut off from
/// its cluster cannot answer).
pub(super) async fn quorum_revision(shared: Arc<Shared>) -> Result<i64, StoreError> {
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

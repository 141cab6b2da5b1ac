//! One owner for every background task of the server, the allocator and the
//! stores, and the one way they end (tokio-util's `CancellationToken` and
//! `TaskTracker`, as mini-redis's `shutdown.rs`: tasks end when told, and
//! whoever shuts down waits for them).
//!
//! Invariants:
//! - Every task is spawned with [`Lifecycle::spawn`] (it watches
//!   [`Lifecycle::token`] itself, at the points where it waits) or
//!   [`Lifecycle::spawn_until_cancelled`] (dropped at cancellation: only for
//!   tasks whose every await is a wait that is safe to give up, never a
//!   durable write).
//! - No task is aborted: a task told to stop finishes the write it is in and
//!   ends at its next wait. A task spawned after cancellation never runs its
//!   body, so nothing starts once shutdown has begun.
//! - [`Lifecycle::shutdown`] returns once every task spawned through it has
//!   ended: after it, no task of this process reaches the store, only its
//!   owner (which persists the counters and closes it). A gRPC call still
//!   running past the drain timeout is tonic's, not a task of ours: it may
//!   still reach the store, which then answers `Closed` (embedded) or
//!   writes a registration (etcd); see the README's "Shutdown".

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The token every task watches and the tracker that joins them; clones
/// share both.
#[derive(Clone, Debug, Default)]
pub struct Lifecycle {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Lifecycle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `task`, which watches [`Self::token`] at its waits and ends
    /// soon after cancellation. Spawned after cancellation, it never runs
    /// (its handle yields `None`).
    pub fn spawn<F>(&self, task: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let token = self.token.clone();
        self.tracker.spawn(async move {
            if token.is_cancelled() {
                return None;
            }
            Some(task.await)
        })
    }

    /// Spawns `task` and drops it where it waits once cancelled: only for a
    /// task whose every await is safe to give up (a timer, an accept, a
    /// watch), never one inside a durable write.
    pub fn spawn_until_cancelled<F>(&self, task: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let token = self.token.clone();
        self.tracker
            .spawn(async move { token.run_until_cancelled(task).await })
    }

    /// Cancelled when shutdown begins; tasks end at their next wait.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Tells every task to stop and waits until each has ended. Idempotent:
    /// a second call waits for the same tasks.
    pub async fn shutdown(&self) {
        self.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn shutdown_waits_for_a_task_to_finish_its_write_and_stop_at_its_next_wait() {
        let lifecycle = Lifecycle::new();
        let wrote = Arc::new(AtomicBool::new(false));
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let task = lifecycle.spawn({
            let token = lifecycle.token().clone();
            let wrote = wrote.clone();
            async move {
                let _ = started_tx.send(());
                // The "write": not interrupted by the cancellation.
                tokio::time::sleep(Duration::from_millis(50)).await;
                wrote.store(true, Ordering::Release);
                // The wait: ends at cancellation.
                token.cancelled().await;
            }
        });
        started.await.expect("the task starts");
        tokio::time::timeout(Duration::from_secs(10), lifecycle.shutdown())
            .await
            .expect("shutdown returns once the task ended");
        assert!(wrote.load(Ordering::Acquire), "the write was finished");
        assert!(task.is_finished());
    }

    #[tokio::test]
    async fn a_task_spawned_after_shutdown_never_runs() {
        let lifecycle = Lifecycle::new();
        lifecycle.shutdown().await;
        let ran = Arc::new(AtomicBool::new(false));
        let task = lifecycle.spawn({
            let ran = ran.clone();
            async move { ran.store(true, Ordering::Release) }
        });
        let output = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the task ends at once")
            .expect("the task does not panic");
        assert_eq!(output, None);
        assert!(!ran.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn a_waiting_task_is_dropped_at_cancellation() {
        let lifecycle = Lifecycle::new();
        let task = lifecycle.spawn_until_cancelled(std::future::pending::<()>());
        tokio::time::timeout(Duration::from_secs(10), lifecycle.shutdown())
            .await
            .expect("shutdown returns: the pending task was dropped");
        assert!(task.is_finished());
    }
}

//! A worker's registration as a store persisted it: what the stores write
//! and read, and what the allocator's worker state starts from.

use std::sync::Arc;

use crate::space::DpSize;

/// A worker as last persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRecord {
    pub prefill_worker: Arc<str>,
    pub dp_size: DpSize,
    /// False once deregistered: its ranges still resolve, no new rooms.
    pub registered: bool,
    pub rooms_issued: u64,
    /// Store revision of this registration (etcd's mod revision; the log
    /// position for the embedded store). Newer wins.
    pub revision: i64,
}

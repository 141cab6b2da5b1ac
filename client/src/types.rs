//! What the client's calls return: the server's answers as plain Rust
//! types, and what the outage fallback reports.

use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;
use crate::pb;

/// A worker as the server has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub prefill_worker: String,
    pub dp_size: u32,
    /// Rooms from AllocateRoom plus bases from LeaseRooms issued for it.
    pub rooms_issued: u64,
}

/// Who a room was issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub prefill_worker: String,
    /// `room % dp_size`: the prefill rank SGLang's decode side pulls from.
    pub dp_rank: u32,
    /// The dp_size in force when the room was issued.
    pub dp_size: u32,
}

/// The part of the room space a server hands out (GetRoomSpace): its
/// `--min-room` and `--max-room`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomSpace {
    pub min_room: u64,
    pub max_room: u64,
}

/// What the outage fallback callback is told about each fallback room (or
/// block, or batch item): see
/// [`RoomClientBuilder::outage_fallback`](crate::RoomClientBuilder::outage_fallback).
#[derive(Debug)]
pub struct FallbackRoom<'a> {
    pub prefill_worker: &'a str,
    /// The rank of the room (of the block's first room).
    pub dp_rank: u32,
    pub dp_size: u32,
    pub room: u64,
    /// Consecutive numbers the room starts: 1, or `num` of `allocate_block`.
    pub num: u64,
    /// Why the allocator gave no room: unreachable, UNAVAILABLE, or no
    /// answer within the allocation deadline.
    pub cause: &'a Error,
}

/// Called for every fallback room; must be cheap and must not block.
pub(crate) type FallbackCallback = Arc<dyn Fn(&FallbackRoom<'_>) + Send + Sync>;

/// A raw block of bases from LeaseRooms: `first_base + i * dp_size` for `i <
/// count`; the room for rank `r` is `base + r`. Use each base once, within
/// `valid_for`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub first_base: u64,
    pub count: u32,
    pub dp_size: u32,
    pub valid_for: Duration,
}

impl From<pb::WorkerInfo> for WorkerInfo {
    fn from(info: pb::WorkerInfo) -> Self {
        Self {
            prefill_worker: info.prefill_worker,
            dp_size: info.dp_size,
            rooms_issued: info.rooms_issued,
        }
    }
}

//! The contract's limits, shared by the server and its clients.

/// Largest room: SGLang masks bootstrap rooms to 63 bits; 0 means "not ready".
pub const MAX_ROOM: u64 = (1 << 63) - 1;
/// Largest dp_size accepted.
pub const MAX_DP_SIZE: u32 = 65536;
/// Longest prefill_worker, in bytes: a DNS name, the longest name routers use.
pub const MAX_WORKER_LEN: usize = 253;
/// Most bases one LeaseRooms call may take...
pub const MAX_LEASE_COUNT: u32 = 1_000_000;
/// ...and most numbers of the room space (`count * dp_size`): a caller
/// looping on LeaseRooms then needs 2^39 calls to use up the space.
pub const MAX_LEASE_NUMBERS: u64 = 1 << 24;
/// ListWorkers page size when the request says 0...
pub const DEFAULT_PAGE_SIZE: i32 = 1000;
/// ...and the most a page holds whatever it says.
pub const MAX_PAGE_SIZE: i32 = 10_000;

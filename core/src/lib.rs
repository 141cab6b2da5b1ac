//! The pure core of room-allocator: everything that decides which room is
//! whose, with no I/O, no clock reads and no async. The server
//! (`room-allocator`) and the client (`room-allocator-client`) both build on
//! it, and the model checker ([`model`], feature `model-check`) drives the
//! same code, so a decision it checks is the one production runs.
//!
//! Its own crate so the model check compiles it and the checker alone, not
//! the server's gRPC and storage stack.
//!
//! Modules:
//! - [`limits`]: the contract's limits, shared by the server and its clients.
//! - [`cursor`]: the unissued rest of a run of bases, for the server's ranges
//!   and the client's leases alike.
//! - [`space`]: rooms, bases, ranges, bounds and the range table.
//! - [`record`]: a worker's registration as a store persisted it.
//! - [`worker`]: one worker's state in the allocator: epoch, ranges, sizing.
//! - [`etcd`]: the etcd store's decisions: the chunk carver, what a watch
//!   proved, the deregistration's second look.

pub mod cursor;
pub mod etcd;
pub mod limits;
#[cfg(feature = "model-check")]
pub mod model;
pub mod record;
pub mod space;
pub mod worker;

pub use record::WorkerRecord;

//! room-allocator hands out SGLang/Dynamo bootstrap rooms aligned to prefill
//! data-parallel ranks (`room % dp_size == dp_rank`), never the same room
//! twice, for every router process and replica that shares it.
//!
//! Modules, from the arithmetic up:
//! - [`space`]: rooms, bases, ranges and the range table; pure arithmetic.
//! - [`store`]: durable registrations and range reservations ([`store::EmbeddedStore`]).
//! - [`allocator`]: the contract's rules over a store.
//! - [`service`]: the gRPC glue, and the one mapping of errors to statuses.
//! - [`server`]: health, reflection, metrics endpoint, graceful shutdown.
//! - [`client`]: `RoomClient`, rooms for routers with no RPC on the hot path.
//! - [`config`], [`metrics`], [`cli`], [`bench`]: flags, metric definitions,
//!   client commands, the load generator.

pub mod allocator;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod metrics;
pub mod server;
pub mod service;
pub mod space;
pub mod store;

/// Generated gRPC types and the descriptor set that reflection serves.
pub mod pb {
    tonic::include_proto!("room_allocator.v1");

    /// Encoded `FileDescriptorSet` of `room_allocator.v1`, with comments.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("room_allocator_descriptor");
}

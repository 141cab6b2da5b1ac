//! room-allocator hands out SGLang/Dynamo bootstrap rooms aligned to prefill
//! data-parallel ranks (`room % dp_size == dp_rank`), never the same room
//! twice, for every router process and replica that shares it.
//!
//! Modules, from the arithmetic up:
//! - [`space`]: rooms, bases, ranges, bounds and the range table; pure arithmetic.
//! - [`names`]: which prefill_worker names are valid, for the stores and the
//!   allocator alike.
//! - [`store`]: durable registrations and range reservations: the embedded
//!   log ([`store::EmbeddedStore`]) or etcd ([`store::EtcdStore`]).
//! - [`allocator`]: the contract's rules over a store.
//! - [`lifecycle`]: one owner for every background task and the shutdown
//!   that ends them.
//! - [`service`]: the gRPC glue, and the one mapping of errors to statuses.
//! - [`server`]: health, reflection, metrics endpoint, TLS and token reload,
//!   graceful shutdown.
//! - [`config`], [`metrics`], [`cli`], [`bench`]: flags, metric definitions,
//!   client commands, the load generator; [`failpoint`]: test-only faults;
//!   [`secret`]: tokens and passwords kept out of `Debug`.
//!
//! The Rust client is its own crate, `room-allocator-client` (`client/`);
//! [`client`] re-exports it.

pub mod allocator;
pub mod bench;
pub mod cli;
pub mod config;
pub mod failpoint;
pub mod lifecycle;
pub mod metrics;
pub mod names;
pub mod secret;
pub mod server;
pub mod service;
pub use room_allocator_core::space;
pub mod store;

#[cfg(test)]
mod fuzz;

pub use room_allocator_client as client;

/// gRPC types: the messages and client of `room-allocator-client`, the
/// server stubs, and the descriptor set that reflection serves.
pub mod pb {
    pub use room_allocator_client::pb::*;

    tonic::include_proto!("room_allocator.v1");

    /// Encoded `FileDescriptorSet` of `room_allocator.v1`, with comments.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("room_allocator_descriptor");
}

#[cfg(test)]
mod tests {
    /// The client crate checks in its generated code (so it builds with no
    /// protoc); it must be exactly what the proto generates now. To update:
    /// copy `$OUT_DIR/client_pb/room_allocator.v1.rs` over it.
    #[test]
    fn the_client_crates_checked_in_code_matches_the_proto() {
        let fresh = include_str!(concat!(env!("OUT_DIR"), "/client_pb/room_allocator.v1.rs"));
        let checked_in = include_str!("../client/src/room_allocator.v1.rs");
        assert!(
            fresh == checked_in,
            "client/src/room_allocator.v1.rs is stale: copy {}/client_pb/room_allocator.v1.rs over it",
            env!("OUT_DIR")
        );
    }
}

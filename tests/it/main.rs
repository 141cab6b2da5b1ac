//! Every integration test in one binary, so the crate links once (issue 18).
//! Each module is one suite against the real `room-allocator` binary; the
//! helpers they share are in `common`. A quick loop: `cargo test --test it
//! cli::` runs one module, `cargo test --features failpoints --test it
//! failpoints::log_fsync_fails` one failpoint.
//!
//! Tests that start child processes re-run this binary with a test's full
//! name (`routers::router_process`), so renaming a module means updating the
//! name its spawn passes.

mod common;

mod cli;
mod client;
mod crash;
mod disk_full;
mod etcd;
mod etcd_auth;
mod etcd_lookup;
mod etcd_tls;
#[cfg(feature = "failpoints")]
mod failpoints;
mod fault_harness;
mod grpc_api;
mod grpcurl;
mod lifecycle;
mod migrate;
mod operations;
mod readonly_root;
mod retention;
mod router_rooms;
mod routers;
mod security;

//! Compiles the protos with protox (pure Rust), so building needs no system
//! `protoc` from any directory (`cargo install --path` too):
//! - `room_allocator.v1`: the server stubs over the message types of the
//!   `room-allocator-client` crate, and the descriptor set reflection serves;
//!   also the client crate's checked-in code afresh, which a test compares;
//! - `etcdserverpb`: the subset of etcd's API the etcd store speaks.

use std::{env, fs, path::PathBuf};

use prost::Message;

const ROOM_ALLOCATOR_PROTO: &str = "proto/room_allocator/v1/room_allocator.proto";
const ETCD_PROTO: &str = "proto/etcd/rpc.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    // protox keeps the comments, so `grpcurl describe` shows the docs.
    let file_descriptors = protox::compile([ROOM_ALLOCATOR_PROTO], ["proto"])?;
    fs::write(
        out_dir.join("room_allocator_descriptor.bin"),
        file_descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(false)
        .extern_path(".room_allocator.v1", "::room_allocator_client::pb")
        .compile_fds(file_descriptors.clone())?;
    let client_code = out_dir.join("client_pb");
    fs::create_dir_all(&client_code)?;
    tonic_prost_build::configure()
        .build_server(false)
        .out_dir(&client_code)
        .compile_fds(file_descriptors)?;

    let etcd = protox::compile([ETCD_PROTO], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}

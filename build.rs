//! Compiles the gRPC contract with protox (pure Rust), so building needs no
//! system `protoc`, and writes the descriptor set that reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO: &str = "proto/room_allocator/v1/room_allocator.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // protox keeps the comments, so `grpcurl describe` shows the docs.
    let file_descriptors = protox::compile([PROTO], ["proto"])?;
    fs::write(
        out_dir.join("room_allocator_descriptor.bin"),
        file_descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(file_descriptors)?;
    Ok(())
}

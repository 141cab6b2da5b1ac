#!/usr/bin/env bash
# Builds a throwaway crate that depends on the client crate by path, as a
# downstream router would, with no protoc anywhere (PROTOC points nowhere):
# the client's generated gRPC code is checked in, so it must build without.
#
# Offline: the workspace's Cargo.lock is copied in, so every crate comes from
# the local registry cache (the workspace already depends on all of them).
# CARGO_TARGET_DIR is target, so reruns only rebuild what changed.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"

crate="$(mktemp -d "${TMPDIR:-/tmp}/room-allocator-downstream.XXXXXX")"
trap 'rm -rf "$crate"' EXIT

mkdir -p "$crate/src"
cat >"$crate/Cargo.toml" <<EOF
[package]
name = "downstream-router"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
room-allocator-client = { path = "$REPO/client" }
tokio = { version = "1", features = ["macros", "rt-multi-thread"] }

# Not part of the repository's workspace.
[workspace]
EOF
cat >"$crate/src/main.rs" <<'EOF'
//! A router's use of the client crate: connect, register, allocate, resolve.
use room_allocator_client::{Error, Resolved, RoomClient};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:50051".to_owned());
    let client = RoomClient::connect(&url).await?;
    client.register("prefill-0", 4).await?;
    let room: u64 = client.allocate("prefill-0", 3, 4).await?;
    let Resolved {
        prefill_worker,
        dp_rank,
        dp_size,
    } = client.resolve(room).await?;
    println!("{room} {prefill_worker} {dp_rank} {dp_size}");
    Ok(())
}
EOF
cp "$REPO/Cargo.lock" "$crate/Cargo.lock"

export CARGO_TARGET_DIR="$REPO/target"
export PROTOC=/nonexistent/protoc
unset PROTOC_INCLUDE
# `cargo check`: it runs every build script (where a missing protoc would
# fail) and compiles the client and the crate; linking proves nothing more.
if ! (cd "$crate" && cargo check --offline --quiet); then
  echo "downstream_build.sh: FAILED: a crate depending on room-allocator-client (path $REPO/client) does not compile offline without protoc; see the errors above" >&2
  exit 1
fi
echo "downstream_build.sh: ok: a crate depending on room-allocator-client compiles with PROTOC=$PROTOC, offline"

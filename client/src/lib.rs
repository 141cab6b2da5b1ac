//! Rust client for [room-allocator]: SGLang/Dynamo bootstrap rooms aligned to
//! the prefill data-parallel rank a router chose (`room % dp_size ==
//! dp_rank`), never the same room twice, with no RPC per room.
//!
//! [`RoomClient`] leases blocks of bases from the server (LeaseRooms) and
//! makes each room locally as `base + dp_rank`. A background task refills a
//! worker's lease before it runs out, so `allocate` almost never waits; a
//! lease is used only within the lifetime the server gives it (and at most
//! [`RoomClientBuilder::max_lease_age`]), and every refill tells the server
//! which dp_size the router expects, so a realignment made by another router
//! reaches this one at its next refill.
//!
//! The crate depends on tonic, prost and tokio only; the generated gRPC code
//! is checked in, so it builds with no `protoc`.
//!
//! # Connecting
//!
//! ```no_run
//! # async fn demo() -> Result<(), room_allocator_client::Error> {
//! use room_allocator_client::RoomClient;
//!
//! let client = RoomClient::connect("http://127.0.0.1:50051").await?;
//! client.register("prefill-0:8998", 4).await?;
//! let room = client.allocate("prefill-0:8998", 3, 4).await?;
//! assert_eq!(room % 4, 3);
//! let owner = client.resolve(room).await?;
//! assert_eq!((owner.prefill_worker.as_str(), owner.dp_rank, owner.dp_size), ("prefill-0:8998", 3, 4));
//! # Ok(()) }
//! ```
//!
//! With options (several replicas, a bearer token, mutual TLS, deadlines):
//!
//! ```no_run
//! # async fn demo() -> Result<(), room_allocator_client::Error> {
//! use std::time::Duration;
//! use room_allocator_client::RoomClient;
//!
//! let client = RoomClient::builder(["https://allocator-0:50051", "https://allocator-1:50051"])
//!     .bearer_token(std::fs::read_to_string("/var/run/secrets/room-allocator/token").unwrap())
//!     .ca_certificate_pem(std::fs::read("ca.pem").unwrap())
//!     .client_identity_pem(std::fs::read("client.pem").unwrap(), std::fs::read("client.key").unwrap())
//!     .timeout(Duration::from_secs(2))
//!     .keep_alive(Duration::from_secs(10), Duration::from_secs(5))
//!     .connect()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # Batches, and SGLang's `room + i`
//!
//! [`RoomClient::allocate_many`] returns one room per rank of a batch, in
//! order, from one take of the lease. But SGLang turns a single
//! `bootstrap_room` for a request of `num` items (batch size times
//! `sampling_params.n`) into `room + i` for each item
//! (`GenerateReqInput._normalize_bootstrap_params` in
//! `python/sglang/srt/managers/io_struct.py`), and a room list repeats each
//! room once per sample. Allocator rooms are dense, so `room + 1` is most
//! likely another request's room. So a request with `n > 1`, or any request
//! sent with one room for `num > 1` items, takes
//! [`RoomClient::allocate_block`]: the first room of `num` consecutive
//! numbers no one else gets, item `i` on rank `(first_rank + i) % dp_size`.
//! It holds because a lease's bases `first_base + j * dp_size` (`j < count`)
//! cover `[first_base, first_base + count * dp_size)` with no gap, and a
//! block is cut from one lease.
//!
//! ```no_run
//! # async fn demo(client: room_allocator_client::RoomClient) -> Result<(), room_allocator_client::Error> {
//! // A batch of three prompts with n = 1: a room per item, each on its rank.
//! let rooms = client.allocate_many("prefill-0:8998", &[0, 1, 2], 4).await?;
//! // One prompt with n = 3: SGLang sends items to rooms room, room+1, room+2.
//! let room = client.allocate_block("prefill-0:8998", 3, 3, 4).await?;
//! assert_eq!(room % 4, 3); // items on ranks 3, 0, 1
//! # Ok(()) }
//! ```
//!
//! # Outage fallback
//!
//! Opt-in with [`RoomClientBuilder::outage_fallback`]: when no leased room
//! is left and the allocator gives none within the allocation deadline
//! (default 50 ms, apart from the per-call timeout), the client returns a
//! rank-aligned random room from a region the allocator never hands out.
//! `connect` learns the server's bounds (GetRoomSpace) and refuses a region
//! that overlaps them; the default bounds `1..=2^63-1` leave no room for one,
//! so run the server with e.g. `--max-room 4611686018427387903` and fall
//! back from `2^62`. Fallback rooms are counted
//! ([`RoomClient::fallback_rooms`], export it e.g. as
//! `room_allocator_client_fallback_rooms_total`) and reported to
//! [`RoomClientBuilder::on_fallback`]; ResolveRank does not know them.
//!
//! Odds of a collision: fallback rooms can only meet other fallback rooms,
//! and only of the same rank. With `N = region_size / dp_size` aligned
//! numbers, `k` fallback rooms of one rank in flight at once collide with
//! probability at most `k^2 / (2 N)`; blocks of `num` numbers at most `k^2 *
//! (2 num - 1) / (2 N)`. For the region `2^62..=2^63-1`, `dp_size = 8` and a
//! million fallback rooms of one rank: under one in a million.
//!
//! ```no_run
//! # async fn demo() -> Result<(), room_allocator_client::Error> {
//! use std::time::Duration;
//! use room_allocator_client::RoomClient;
//!
//! let client = RoomClient::builder(["http://allocator:50051"])
//!     .outage_fallback((1 << 62)..=room_allocator_client::limits::MAX_ROOM)
//!     .allocation_deadline(Duration::from_millis(30))
//!     .on_fallback(|fallback| eprintln!("fallback room {} ({})", fallback.room, fallback.cause))
//!     .connect()
//!     .await?;
//! // Before traffic: connect every endpoint and lease for the known workers,
//! // so the first request takes a leased room with no RPC.
//! client.warm_up(&[("prefill-0:8998", 4)]).await?;
//! # Ok(()) }
//! ```
//!
//! # Errors a router acts on
//!
//! - [`Error::DpSizeMismatch`]: the worker is registered with another
//!   dp_size (another router realigned it). Refresh the router's view of the
//!   worker (`registered` is the size in force) or realign it with
//!   [`RoomClient::register`].
//! - [`Error::Deregistered`]: the worker was deregistered; stop routing to it.
//! - [`Error::Status`] with `UNAVAILABLE`: the server cannot reserve rooms
//!   right now; retry with backoff (another endpoint is tried first when the
//!   client has several).
//!
//! # Guarantees
//!
//! Every room the client returns lies in `1..=2^63-1`, satisfies `room %
//! dp_size == dp_rank` for the dp_size the caller passed, and is never
//! returned twice by any client or server sharing the room space. Bases
//! leased but never used (a restart, an expired lease, a realignment) are
//! skipped, never reissued.
//!
//! # Processes that fork
//!
//! Do not use a client across `fork()`; build a new one, on a runtime of its
//! own, in the child. A forked child gets a copy of the parent's clients,
//! leased bases included, which the parent goes on handing out; and the
//! copy's connections are driven by the parent's tokio runtime, whose
//! threads are not in the child (a tokio runtime does not survive `fork()`).
//! So a copy refuses to work: in the child, [`RoomClient::try_allocate`]
//! returns `None` and every other call fails at once with
//! [`Error::Status`] `FAILED_PRECONDITION`, never handing out the parent's
//! rooms and never waiting on the parent's runtime. Clients built in the
//! child work as anywhere else. The copy is noticed through a
//! `pthread_atfork` handler, registered when the first client is made, so
//! forks made through `fork()` (libc's, and everything built on it) are
//! noticed; a raw `clone` system call is not. A child that `exec`s right
//! away (`std::process::Command`) is not concerned.
//!
//! [room-allocator]: https://github.com/room-allocator/room-allocator

pub mod backoff;
mod builder;
mod client;
mod error;
mod fallback;
mod fork;
mod lease;
mod transport;
mod types;

#[doc(hidden)]
pub use room_allocator_core::cursor;
/// The contract's limits, shared with the server (from the pure core,
/// `room-allocator-core`).
pub use room_allocator_core::limits;

pub use builder::RoomClientBuilder;
pub use client::RoomClient;
pub use error::{cause_chain, code_name, Error, ERROR_REASON, REGISTERED_DP_SIZE};
pub use types::{FallbackRoom, Lease, Resolved, RoomSpace, WorkerInfo};

/// The gRPC types of `room_allocator.v1`, generated from
/// `proto/room_allocator/v1/room_allocator.proto` (checked in: no protoc).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!("room_allocator.v1.rs");
}

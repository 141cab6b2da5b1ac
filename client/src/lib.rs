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

mod client;
mod error;
mod fork;
mod lease;
pub mod limits;

pub use client::{Lease, Resolved, RoomClient, RoomClientBuilder, WorkerInfo};
pub use error::{cause_chain, code_name, Error, ERROR_REASON, REGISTERED_DP_SIZE};

/// The gRPC types of `room_allocator.v1`, generated from
/// `proto/room_allocator/v1/room_allocator.proto` (checked in: no protoc).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!("room_allocator.v1.rs");
}

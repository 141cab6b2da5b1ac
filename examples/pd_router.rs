//! A toy prefill/decode router on `RoomClient`: for each request it picks a
//! prefill rank, takes a room for it with no RPC on the hot path, and then
//! plays the decode side, which recovers the rank as SGLang does:
//! `room % prefill_dp_size`.
//!
//! Run a server (`cargo run --release -- serve`), then:
//! `cargo run --example pd_router -- http://127.0.0.1:50051`

use std::collections::HashSet;

use room_allocator::client::RoomClient;

const PREFILL_WORKER: &str = "prefill-0.example:8998";
const PREFILL_DP_SIZE: u32 = 4;
const REQUESTS: u32 = 12;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:50051".to_owned());
    let client = RoomClient::connect(&url).await?;
    client.register(PREFILL_WORKER, PREFILL_DP_SIZE).await?;

    let mut rooms = HashSet::new();
    for request in 0..REQUESTS {
        // The router balances prefill ranks; here, round robin.
        let prefill_rank = request % PREFILL_DP_SIZE;
        let room = client
            .allocate(PREFILL_WORKER, prefill_rank, PREFILL_DP_SIZE)
            .await?;
        // Both halves of the request carry `bootstrap_room = room`. The
        // decode side pulls the KV cache from this prefill rank:
        let decode_sees = room % u64::from(PREFILL_DP_SIZE);
        assert_eq!(decode_sees, u64::from(prefill_rank));
        assert!(rooms.insert(room), "a room is never reused");
        println!("request {request:2}: prefill rank {prefill_rank} -> bootstrap_room {room} -> decode pulls from rank {decode_sees}");
    }
    let resolved = client
        .resolve(*rooms.iter().next().expect("a room"))
        .await?;
    println!(
        "ResolveRank: worker {} rank {} dp_size {}",
        resolved.prefill_worker, resolved.dp_rank, resolved.dp_size
    );
    Ok(())
}

//! Four router processes share one allocator on the embedded store: each
//! allocates for workers with dp sizes 1, 2, 3, 4, 8 and 16, through
//! AllocateRoom and LeaseRooms, and a "decode side" checks every room:
//! `room % dp_size` gives back the rank the router chose, and no room appears
//! twice across all processes.

use crate::common;

use common::{router, timed, ServerProcess};
use room_allocator::pb;

#[tokio::test]
#[ignore = "a child process of four_router_processes_get_unique_rank_aligned_rooms"]
async fn router_process() {
    router::run_child().await;
}

#[tokio::test]
async fn four_router_processes_get_unique_rank_aligned_rooms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let routers = (0..4)
        .map(|id| router::spawn("routers::router_process", &server.url(), id))
        .collect();
    let owner_of_room = router::collect(routers).await;

    let mut client = server.client().await;
    for (room, (worker, dp_size)) in owner_of_room.iter().step_by(53) {
        let resolved = timed(client.resolve_rank(pb::ResolveRankRequest { room: *room }))
            .await
            .expect("resolve")
            .into_inner();
        assert_eq!(&resolved.prefill_worker, worker);
        assert_eq!(resolved.dp_size, *dp_size);
        assert_eq!(u64::from(resolved.dp_rank), room % u64::from(*dp_size));
    }
}

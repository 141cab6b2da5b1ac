//! Retention on the embedded store: rooms resolve while young, their ranges
//! are pruned (the log compacted) once twice `--retention` old, a pruned room
//! gets NOT_FOUND saying so, also after a restart, and new rooms never repeat.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use common::{timed, ServerProcess};
use room_allocator::pb;
use tonic::Code;

async fn allocate(client: &mut common::Client) -> u64 {
    timed(client.allocate_room(pb::AllocateRoomRequest {
        prefill_worker: "retained".into(),
        dp_rank: 1,
        dp_size: 2,
    }))
    .await
    .expect("allocate")
    .into_inner()
    .room
}

async fn resolve(
    client: &mut common::Client,
    room: u64,
) -> Result<pb::ResolveRankResponse, tonic::Status> {
    timed(client.resolve_rank(pb::ResolveRankRequest { room }))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn old_ranges_are_pruned_after_twice_the_retention_and_say_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::start(dir.path(), &["--retention", "1s"]);
    let mut client = server.client().await;
    let old = allocate(&mut client).await;
    assert_eq!(
        resolve(&mut client, old).await.expect("young room").dp_rank,
        1
    );

    let mut seen = HashSet::from([old]);
    let mut pruned = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Keep allocating: rooms come from fresh ranges once a range expires.
        assert!(seen.insert(allocate(&mut client).await));
        if let Err(status) = resolve(&mut client, old).await {
            pruned = Some(status);
            break;
        }
    }
    let status = pruned.expect("the old room's range was pruned within 10 s");
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("retention"), "{status:?}");
    let young = allocate(&mut client).await;
    assert!(seen.insert(young));
    assert_eq!(resolve(&mut client, young).await.expect("young").dp_size, 2);
    assert!(server.terminate().success());

    let server = ServerProcess::start(dir.path(), &["--retention", "1h"]);
    let mut client = server.client().await;
    let status = resolve(&mut client, old).await.expect_err("still pruned");
    assert!(status.message().contains("pruned"), "{status:?}");
    let after = allocate(&mut client).await;
    assert!(
        seen.iter().all(|room| *room < after),
        "resumes past every range, pruned or not"
    );
}

//! A store that cannot write (here: a file-size limit, which fails writes
//! like a full disk) gives UNAVAILABLE, keeps serving what is already
//! reserved, never hands out a room twice, and recovers after a restart.

mod common;

use std::collections::HashSet;
use std::os::unix::process::CommandExt;

use common::{timed, ServerProcess};
use room_allocator::pb;
use tonic::Code;

fn allocate(worker: &str, dp_size: u32) -> pb::AllocateRoomRequest {
    pb::AllocateRoomRequest {
        prefill_worker: worker.into(),
        dp_rank: 0,
        dp_size,
    }
}

#[tokio::test]
async fn a_store_that_cannot_write_gives_unavailable_and_never_a_duplicate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rooms = HashSet::new();
    {
        let mut server = ServerProcess::start(dir.path(), &[]);
        let mut client = server.client().await;
        let room = timed(client.allocate_room(allocate("steady", 1)))
            .await
            .expect("allocate")
            .into_inner()
            .room;
        rooms.insert(room);
        assert!(server.terminate().success());
    }
    let log_len = std::fs::metadata(dir.path().join("rooms.log"))
        .expect("log")
        .len();
    // The commit file is 1024 bytes; past that the log has room for a few
    // more records, then every write that extends it fails with EFBIG.
    let limit = log_len.max(1024) + 300;
    let mut server = ServerProcess::try_start_with(dir.path(), &[], |command| {
        // SAFETY: setrlimit is async-signal-safe; it only limits the child.
        unsafe {
            command.pre_exec(move || {
                let rlimit = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    })
    .unwrap_or_else(|failure| panic!("start: {}", failure.log));
    let mut client = server.client().await;

    // "steady" reserves a range while there is still room for it.
    let steady = timed(client.allocate_room(allocate("steady", 1)))
        .await
        .expect("allocate")
        .into_inner()
        .room;
    assert!(rooms.insert(steady));

    let mut unavailable = None;
    for i in 0..50 {
        match timed(client.allocate_room(allocate(&format!("new-{i}"), 2))).await {
            Ok(response) => assert!(rooms.insert(response.into_inner().room)),
            Err(status) => {
                unavailable = Some(status);
                break;
            }
        }
    }
    let status = unavailable.expect("the file-size limit was reached");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("cannot write"), "{status:?}");
    assert!(status.message().contains("rooms.log"), "{status:?}");
    assert!(status.message().contains("retry"), "{status:?}");

    // Rooms already reserved in memory are still served, and are new.
    for _ in 0..100 {
        let room = timed(client.allocate_room(allocate("steady", 1)))
            .await
            .expect("the reserved range still serves")
            .into_inner()
            .room;
        assert!(rooms.insert(room), "room {room} twice");
    }
    assert!(server.terminate().success());

    // Without the limit, everything resumes past what was reserved.
    let server = ServerProcess::start(dir.path(), &[]);
    let mut client = server.client().await;
    for i in 0..60 {
        let room = timed(client.allocate_room(allocate(&format!("new-{i}"), 2)))
            .await
            .expect("allocate after recovery")
            .into_inner()
            .room;
        assert!(rooms.insert(room), "room {room} twice after recovery");
    }
    let resolved = timed(client.resolve_rank(pb::ResolveRankRequest { room: steady }))
        .await
        .expect("resolve")
        .into_inner();
    assert_eq!(resolved.prefill_worker, "steady");
}

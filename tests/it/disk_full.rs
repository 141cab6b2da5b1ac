//! A store that cannot write (here: a file-size limit, which fails writes
//! like a full disk) gives UNAVAILABLE, keeps serving what is already
//! reserved, never hands out a room twice, and recovers after a restart.

use crate::common;

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

/// `rooms.commit`: two commit slots 4 KiB apart (format version 2).
const COMMIT_FILE_LEN: u64 = 8192;

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
    // The commit file is 8 KiB (two slots 4 KiB apart); the limit lets it
    // be written, then the log has room for some more records, then every
    // write that extends it fails with EFBIG.
    let limit = log_len.max(COMMIT_FILE_LEN) + 300;
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
    for i in 0..1000 {
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

async fn readiness(server: &ServerProcess) -> i32 {
    use tonic_health::pb::health_client::HealthClient;
    let mut health = HealthClient::new(server.channel().await);
    timed(health.check(tonic_health::pb::HealthCheckRequest {
        service: "room_allocator.v1.RoomAllocatorService".into(),
    }))
    .await
    .expect("health")
    .into_inner()
    .status
}

/// Review defect 9: readiness says whether this replica can hand out rooms.
/// While every write fails it is NOT_SERVING; once the disk takes writes
/// again (here: the file-size limit raised on the running process) the store
/// notices by itself and readiness returns, with no restart.
#[tokio::test]
async fn readiness_turns_off_while_writes_fail_and_returns_when_they_succeed() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::tempdir().expect("tempdir");
    // The commit file is 8 KiB and the log starts at 16: room for some
    // records, then every write that extends the log fails with EFBIG.
    let limit: u64 = COMMIT_FILE_LEN + 400;
    let server = ServerProcess::try_start_with(dir.path(), &[], |command| {
        // SAFETY: setrlimit is async-signal-safe; it only limits the child.
        unsafe {
            command.pre_exec(move || {
                let rlimit = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: libc::RLIM_INFINITY,
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
    assert_eq!(readiness(&server).await, ServingStatus::Serving as i32);
    let mut client = server.client().await;
    let mut rooms = HashSet::new();
    let mut failed = false;
    for i in 0..1000 {
        match timed(client.allocate_room(allocate(&format!("fill-{i}"), 2))).await {
            Ok(response) => assert!(rooms.insert(response.into_inner().room)),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the file-size limit was reached");
    let mut not_ready = false;
    for _ in 0..40 {
        if readiness(&server).await == ServingStatus::NotServing as i32 {
            not_ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(not_ready, "readiness turned NOT_SERVING while writes fail");

    // Space returns: lift the limit on the running server.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    let pid = i32::try_from(server.pid()).expect("pid");
    // SAFETY: prlimit on a child this test started; the struct outlives the call.
    let lifted =
        unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &unlimited, std::ptr::null_mut()) };
    assert_eq!(lifted, 0, "{}", std::io::Error::last_os_error());
    let mut ready = false;
    for _ in 0..100 {
        if readiness(&server).await == ServingStatus::Serving as i32 {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        ready,
        "readiness came back once writes succeed:\n{}",
        server.log()
    );
    for i in 0..20 {
        let room = timed(client.allocate_room(allocate(&format!("after-{i}"), 2)))
            .await
            .expect("new workers get rooms again, no restart")
            .into_inner()
            .room;
        assert!(rooms.insert(room), "room {room} twice");
    }
}

//! The container image runs with a read-only root file system and only the
//! data dir writable (the Helm chart sets readOnlyRootFilesystem). This runs
//! the real binary that way, in a private mount namespace where `/` is
//! remounted read-only and only the data dir is a writable bind mount.

use crate::common;

use std::process::Command;

use common::{timed, ServerProcess, BIN};
use room_allocator::pb;

#[tokio::test]
async fn the_server_runs_with_a_read_only_root_and_only_the_data_dir_writable() {
    if common::require_tool("unshare").is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    let data = data.to_str().expect("utf-8").to_owned();
    let script = format!(
        "set -e; mount --make-rprivate /; mount --bind {data} {data}; \
         mount -o remount,bind,ro /; \
         if touch /room-allocator-write-probe 2>/dev/null; then echo 'root is writable' >&2; exit 97; fi; \
         exec {BIN} serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --data-dir {data}"
    );
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "sh", "-c", &script])
        .env("RUST_LOG", "info");
    let mut server = match ServerProcess::spawn(command) {
        Ok(server) => server,
        Err(failure) => {
            assert!(
                !common::in_ci(),
                "cannot run with a read-only root here: {}",
                failure.log
            );
            eprintln!(
                "SKIP: no private read-only mount namespace here: {}",
                failure.log
            );
            return;
        }
    };
    let mut client = server.client().await;
    for rank in 0..4 {
        let room = timed(client.allocate_room(pb::AllocateRoomRequest {
            prefill_worker: "read-only".into(),
            dp_rank: rank,
            dp_size: 4,
        }))
        .await
        .expect("allocate with a read-only root")
        .into_inner()
        .room;
        assert_eq!(room % 4, u64::from(rank));
    }
    let status = server.terminate();
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(std::path::Path::new(&data).join("rooms.log").exists());
}

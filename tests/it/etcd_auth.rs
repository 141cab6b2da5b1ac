//! The etcd password as a file that rotates while a replica runs (issue 21
//! item 1): the replica rereads `--etcd-password-file` at every
//! authentication, so once etcd's password and the file change, the next
//! token refresh uses the new one and no restart is needed. An unreadable
//! file keeps the last password read and shows as
//! `room_allocator_reload_last_success{file="etcd_password"} 0`; a file that
//! changed before etcd did falls back to the password etcd accepted before.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use room_allocator::pb;
use room_allocator::secret::Secret;
use room_allocator::store::etcd::client::{ConnectOptions, EtcdClient};

use crate::common::{http_get, timed, unique_prefix, EtcdProcess, ServerProcess};

const USER: &str = "root";

/// Writes `text` to `path` through a rename, as the kubelet swaps a Secret.
fn replace(path: &Path, text: &str) {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, text).expect("write");
    std::fs::rename(&temp, path).expect("rename");
}

/// A client of `etcd` as root with `password` (a new one each time: a
/// password change makes every token stale).
async fn root(etcd: &EtcdProcess, password: &str) -> EtcdClient {
    timed(EtcdClient::connect(&ConnectOptions {
        endpoints: vec![etcd.endpoint.clone()],
        user: Some((USER.into(), Secret::new(password))),
        timeout: Duration::from_secs(5),
        ..Default::default()
    }))
    .await
    .expect("connect to etcd as root")
}

/// Sets root's password to the one it has: etcd drops every token of the
/// user, so the replica must authenticate again at its next call.
async fn stale_every_token(etcd: &EtcdProcess, password: &str) {
    root(etcd, password)
        .await
        .user_change_password(USER, password)
        .await
        .expect("set the same password");
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn password_reload_success(server: &ServerProcess) -> Option<f64> {
    sample(
        &http_get(server.metrics_addr, "/metrics"),
        "room_allocator_reload_last_success{file=\"etcd_password\"}",
    )
}

/// The rooms a test got, checked as it goes: never twice, always aligned.
#[derive(Default)]
struct Issued(HashMap<u64, String>);

impl Issued {
    /// Allocates rooms for a new worker (its registration and its first
    /// range are etcd writes, so they need a valid token), retrying for up
    /// to `limit` while the replica re-authenticates.
    async fn allocate_new_worker(
        &mut self,
        server: &ServerProcess,
        worker: &str,
        limit: Duration,
    ) -> Result<(), String> {
        const DP_SIZE: u32 = 4;
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        while Instant::now() < deadline {
            let mut client = server.client().await;
            let mut failed = false;
            for dp_rank in 0..DP_SIZE {
                match timed(client.allocate_room(pb::AllocateRoomRequest {
                    prefill_worker: worker.into(),
                    dp_rank,
                    dp_size: DP_SIZE,
                }))
                .await
                {
                    Ok(response) => {
                        let room = response.into_inner().room;
                        assert_eq!(room % u64::from(DP_SIZE), u64::from(dp_rank), "aligned");
                        if let Some(first) = self.0.insert(room, worker.to_owned()) {
                            panic!("room {room} issued twice: to {first} and {worker}");
                        }
                    }
                    Err(status) => {
                        last = format!("{status:?}");
                        failed = true;
                        break;
                    }
                }
            }
            if !failed {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(last)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_keeps_reaching_etcd_after_its_password_rotates_in_the_file() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let admin = etcd.admin().await;
    admin.user_add(USER, "first-pass").await.expect("add root");
    admin
        .user_grant_role(USER, "root")
        .await
        .expect("grant root");
    admin.auth_enable().await.expect("enable auth");

    let dir = tempfile::tempdir().expect("tempdir");
    let password_file = dir.path().join("password");
    // `kubectl create secret --from-file` of an `echo`ed file: one newline.
    replace(&password_file, "first-pass\n");
    let prefix = unique_prefix("password-file");
    let server = ServerProcess::start(
        &dir.path().join("data"),
        &[
            "--etcd-endpoints",
            &etcd.endpoint,
            "--etcd-prefix",
            &prefix,
            "--etcd-username",
            USER,
            "--etcd-password-file",
            password_file.to_str().expect("utf-8"),
        ],
    );
    let mut issued = Issued::default();
    issued
        .allocate_new_worker(&server, "before", Duration::from_secs(10))
        .await
        .expect("allocate with the password from the file");
    assert_eq!(password_reload_success(&server), Some(1.0));

    // Rotation: etcd's password changes (every token goes stale with it),
    // then the Secret. The replica's next authentication must use the file's
    // new content; with the password read once, it fails for good.
    root(&etcd, "first-pass")
        .await
        .user_change_password(USER, "second-pass")
        .await
        .expect("change the password in etcd");
    replace(&password_file, "second-pass\n");
    issued
        .allocate_new_worker(&server, "after-rotation", Duration::from_secs(20))
        .await
        .expect("the replica authenticates with the rotated password");

    // The file goes missing (a Secret deleted by mistake): the gauge says so
    // within seconds, and the last password read keeps working, even through
    // a re-authentication (a password change, even to the same password,
    // drops the user's tokens; an etcd restart does not reliably: it replays
    // the tokens it issued since its last snapshot).
    std::fs::remove_file(&password_file).expect("remove the password file");
    let deadline = Instant::now() + Duration::from_secs(10);
    while password_reload_success(&server) != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "an unreadable password file shows as a failed reload"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stale_every_token(&etcd, "second-pass").await;
    issued
        .allocate_new_worker(&server, "file-missing", Duration::from_secs(20))
        .await
        .expect("the last password read still authenticates");
    assert!(
        server.log().contains("cannot read the etcd password file"),
        "a failed read is logged: {}",
        server.log()
    );

    // The Secret changes before etcd's user does: the new password is
    // refused, the one etcd accepted before still works.
    replace(&password_file, "third-pass");
    stale_every_token(&etcd, "second-pass").await;
    issued
        .allocate_new_worker(&server, "file-ahead", Duration::from_secs(20))
        .await
        .expect("the password etcd accepted before is tried again");
    assert!(
        server.log().contains("etcd refused the password just read"),
        "the fallback to the accepted password is logged: {}",
        server.log()
    );
    // The file is readable again: the gauge says so at the next reread.
    let deadline = Instant::now() + Duration::from_secs(10);
    while password_reload_success(&server) != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "a readable password file shows as a successful reload"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    root(&etcd, "second-pass")
        .await
        .user_change_password(USER, "third-pass")
        .await
        .expect("change the password in etcd");
    issued
        .allocate_new_worker(&server, "etcd-caught-up", Duration::from_secs(20))
        .await
        .expect("the file's password once etcd has it");

    let log = server.log();
    for password in ["first-pass", "second-pass", "third-pass"] {
        assert!(!log.contains(password), "a password reached the log: {log}");
    }
}

#[test]
fn a_missing_password_file_refuses_the_start_and_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-password");
    // No etcd is needed: the file is read before connecting.
    let failure = ServerProcess::try_start(
        &dir.path().join("data"),
        &[
            "--etcd-endpoints",
            "http://127.0.0.1:9",
            "--etcd-username",
            USER,
            "--etcd-password-file",
            missing.to_str().expect("utf-8"),
        ],
    )
    .err()
    .expect("no start without the password file");
    assert!(
        failure.log.contains(missing.to_str().expect("utf-8")),
        "the error names the file: {}",
        failure.log
    );
}

#[test]
fn a_password_and_a_password_file_together_are_refused() {
    let (code, _, stderr) = crate::common::run_cli(&[
        "serve",
        "--etcd-endpoints",
        "http://127.0.0.1:9",
        "--etcd-username",
        USER,
        "--etcd-password",
        "p",
        "--etcd-password-file",
        "/dev/null",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--etcd-password-file"), "{stderr}");
    let (code, _, stderr) = crate::common::run_cli(&[
        "serve",
        "--etcd-endpoints",
        "http://127.0.0.1:9",
        "--etcd-username",
        USER,
    ]);
    assert_eq!(code, 2, "a user needs a password: {stderr}");
}

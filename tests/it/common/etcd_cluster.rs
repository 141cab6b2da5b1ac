//! A three-member etcd cluster on loopback ports, in a temp dir, for tests
//! of a member cut off from the others: members are paused (SIGSTOP) and
//! resumed (SIGCONT) by index, and all are killed by PID on drop.

use std::process::Child;
use std::time::{Duration, Instant};

use super::{etcd_healthy, etcd_member_args, free_port, require_tool, spawn_etcd, START_TIMEOUT};

/// Members in the cluster: the smallest that keeps a quorum with one lost.
const MEMBERS: usize = 3;

struct Member {
    child: Child,
    client_port: u16,
    /// The flags it was started with, to restart it the same way.
    args: Vec<String>,
}

/// Three etcd processes forming one cluster; `None` (SKIP) if etcd is not
/// installed outside CI.
pub struct EtcdCluster {
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    pub fn start() -> Option<Self> {
        require_tool("etcd")?;
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<(u16, u16)> = (0..MEMBERS).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::with_capacity(MEMBERS);
        for (i, &(client_port, peer_port)) in ports.iter().enumerate() {
            let client = format!("http://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{peer_port}");
            let mut args = etcd_member_args(
                &format!("m{i}"),
                &dir.path().join(format!("m{i}")),
                &client,
                &peer,
                &initial_cluster,
            );
            args.extend([
                "--initial-cluster-state=new".to_owned(),
                "--initial-cluster-token=room-allocator-test".to_owned(),
                // Elections within a second, so a paused majority is noticed
                // well inside a test's staleness window.
                "--heartbeat-interval=50".to_owned(),
                "--election-timeout=500".to_owned(),
            ]);
            let child = spawn_etcd(&args);
            members.push(Member {
                child,
                client_port,
                args,
            });
        }
        let cluster = Self { members, _dir: dir };
        cluster.wait_healthy(START_TIMEOUT);
        Some(cluster)
    }

    /// Waits until every member reports a leader (etcd's /health).
    pub fn wait_healthy(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.members.iter().all(|m| etcd_healthy(m.client_port)) {
            assert!(
                Instant::now() < deadline,
                "the etcd cluster did not become healthy within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Where clients reach member `index`.
    pub fn endpoint(&self, index: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[index].client_port)
    }

    /// Sends `signal` to member `index` (SIGSTOP pauses it, SIGCONT resumes).
    pub fn signal(&self, index: usize, signal: i32) {
        let pid = i32::try_from(self.members[index].child.id()).expect("pid fits");
        // SAFETY: signalling an etcd this harness started and has not reaped.
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "signal etcd member {index}"
        );
    }
}

impl EtcdCluster {
    /// Kills member `index` with SIGKILL, as `kill -9` would.
    pub fn kill9(&mut self, index: usize) {
        let member = &mut self.members[index];
        member.child.kill().expect("kill etcd member");
        member.child.wait().expect("reap etcd member");
    }

    /// Restarts member `index` on its data dir and ports (after
    /// [`Self::kill9`]) and waits until every member has a leader again.
    pub fn restart(&mut self, index: usize) {
        let member = &mut self.members[index];
        member.child = spawn_etcd(&member.args);
        self.wait_healthy(START_TIMEOUT);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            // SIGKILL ends a paused process too.
            let _ = member.child.kill();
            let _ = member.child.wait();
        }
    }
}

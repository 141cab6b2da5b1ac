//! The fault harness: three replicas on a real etcd, router processes of
//! every kind (AllocateRoom, LeaseRooms, RoomClient over all replicas, and
//! one realigning workers), and a schedule of faults: `kill -9` of a replica,
//! SIGSTOP/SIGCONT of a replica and of etcd, etcd killed and restarted, and a
//! network partition between one replica and etcd (a TCP proxy that holds
//! every byte, or cuts every connection).
//!
//! Then a checker proves, over every room every router received:
//! - no room was handed out twice;
//! - every room is aligned to the dp_size it came with (`room % dp_size ==
//!   rank`), ResolveRank agrees on worker and dp_size, and that dp_size was
//!   in force when the room was issued (registered then, or changed less
//!   than the staleness window before; a RoomClient lease adds its lease age);
//! - every acknowledged room resolves;
//! - after each fault, every kind of router gets rooms again within a bound.
//!
//! It runs twice: on one etcd (the faults above), and on a three-member etcd
//! cluster, where replica 2 reaches only member 2 and the faults are members
//! killed and restarted, a member paused, and member 2 cut off from the other
//! two (they are paused, so member 2 has no leader): then no replica may hand
//! out a room past the staleness window, however fresh member 2's answers
//! look (an etcd member without a leader still answers reads and progress
//! requests from its stale state).
//!
//! `HARNESS_SECONDS` sets the length of each run (the test command: 45 s);
//! `scripts/fault-harness.sh --long SECONDS` runs them as long as asked.

use crate::common;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::etcd_cluster::EtcdCluster;
use common::proxy::Proxy;
use common::router::Lcg;
use common::{EtcdProcess, ServerProcess};
use room_allocator::client::{Error as ClientError, RoomClient};
use room_allocator::pb;
use room_allocator::pb::room_allocator_service_client::RoomAllocatorServiceClient;
use tonic::transport::Channel;

/// Workers whose dp_size never changes.
const STABLE: [(&str, u32); 3] = [("h-dp1", 1), ("h-dp3", 3), ("h-dp8", 8)];
/// Workers the realigning router moves through [`REALIGN_SIZES`].
const REALIGNED: [&str; 2] = ["h-realign-a", "h-realign-b"];
const REALIGN_SIZES: [u32; 3] = [2, 4, 8];
/// `--etcd-staleness-secs` of the replicas: how long a realignment may go
/// unseen by a replica cut off from etcd.
const STALENESS: Duration = Duration::from_secs(3);
/// The RoomClient routers' `max_lease_age`.
const CLIENT_LEASE_AGE: Duration = Duration::from_secs(2);
/// After a fault ends, every kind of router gets a room within this.
const RECOVERY_BOUND: Duration = Duration::from_secs(15);
/// Each router call's deadline.
const CALL_DEADLINE: Duration = Duration::from_secs(2);
/// How long member 2 stays cut off: well past the staleness window, so the
/// window's end is seen with time to spare.
const ISOLATION: Duration = Duration::from_secs(7);
/// Past the last confirmation, a replica stops within the staleness window;
/// this much more covers the progress interval and a call in flight.
const STOP_SLACK: Duration = Duration::from_secs(2);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn harness_seconds() -> u64 {
    std::env::var("HARNESS_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(45)
}

/// The two harness runs share the machine's two cores: one at a time.
static ONE_HARNESS_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn all_workers() -> Vec<&'static str> {
    STABLE
        .iter()
        .map(|(w, _)| *w)
        .chain(REALIGNED.iter().copied())
        .collect()
}

fn initial_beliefs() -> HashMap<&'static str, u32> {
    STABLE
        .iter()
        .copied()
        .chain(REALIGNED.iter().map(|w| (*w, REALIGN_SIZES[0])))
        .collect()
}

/// The registered dp_size a mismatch status carries.
fn registered_dp_size(status: &tonic::Status) -> Option<u32> {
    status
        .metadata()
        .get("registered-dp-size")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A router process's body: `HARNESS_MODE` says which kind it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of three_replicas_under_faults_never_repeat_or_misalign_a_room"]
async fn harness_router() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let mode = var("HARNESS_MODE");
    let servers: Vec<String> = var("HARNESS_SERVERS")
        .split(',')
        .map(str::to_owned)
        .collect();
    let until_ms: u64 = var("HARNESS_UNTIL_MS").parse().expect("deadline");
    let id: u64 = var("HARNESS_ID").parse().expect("id");
    let mut out =
        std::io::BufWriter::new(std::fs::File::create(var("HARNESS_OUT")).expect("output"));
    let mut rng = Lcg(id * 7919 + 1);
    let mut beliefs = initial_beliefs();
    let workers = all_workers();
    let clients: Vec<RoomAllocatorServiceClient<Channel>> = servers
        .iter()
        .map(|url| {
            let channel = Channel::from_shared(url.clone())
                .expect("url")
                .timeout(CALL_DEADLINE)
                .connect_timeout(CALL_DEADLINE)
                .connect_lazy();
            RoomAllocatorServiceClient::new(channel)
        })
        .collect();
    let room_client = if mode == "client" {
        Some(
            RoomClient::builder(&servers)
                .timeout(CALL_DEADLINE)
                .max_lease_age(CLIENT_LEASE_AGE)
                .connect_patience(Duration::from_secs(20))
                .connect()
                .await
                .expect("connect the room client"),
        )
    } else {
        None
    };
    let mut server = usize::try_from(id).expect("id") % servers.len();
    let mut call = 0u64;
    let mut realigned = 0usize;
    while unix_ms() < until_ms && call < 2_000_000 {
        call += 1;
        let worker = workers[usize::try_from(call).expect("fits") % workers.len()];
        let believed = beliefs[worker];
        let rank = rng.below(believed);
        let mut client = clients[server].clone();
        match mode.as_str() {
            "allocate" => {
                let request = pb::AllocateRoomRequest {
                    prefill_worker: worker.into(),
                    dp_rank: rank,
                    dp_size: believed,
                };
                match client.allocate_room(request).await {
                    Ok(response) => {
                        let r = response.into_inner();
                        writeln!(
                            out,
                            "ROOM allocate {worker} {rank} {} {} {}",
                            r.room,
                            r.dp_size,
                            unix_ms()
                        )
                        .expect("write");
                    }
                    Err(status) => match registered_dp_size(&status) {
                        Some(registered) => {
                            beliefs.insert(worker, registered);
                        }
                        None => {
                            writeln!(
                                out,
                                "ERR allocate {server} {:?} {}",
                                status.code(),
                                unix_ms()
                            )
                            .expect("write");
                            server = (server + 1) % servers.len();
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    },
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            "lease" => {
                let request = pb::LeaseRoomsRequest {
                    prefill_worker: worker.into(),
                    count: 8,
                    dp_size: believed,
                };
                match client.lease_rooms(request).await {
                    Ok(response) => {
                        let lease = response.into_inner();
                        let now = unix_ms();
                        for i in 0..u64::from(lease.count) {
                            let rank = rng.below(lease.dp_size);
                            let room =
                                lease.first_base + i * u64::from(lease.dp_size) + u64::from(rank);
                            writeln!(
                                out,
                                "ROOM lease {worker} {rank} {room} {} {now}",
                                lease.dp_size
                            )
                            .expect("write");
                        }
                    }
                    Err(status) => match registered_dp_size(&status) {
                        Some(registered) => {
                            beliefs.insert(worker, registered);
                        }
                        None => {
                            writeln!(out, "ERR lease {server} {:?} {}", status.code(), unix_ms())
                                .expect("write");
                            server = (server + 1) % servers.len();
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    },
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            "client" => {
                let client = room_client.as_ref().expect("a room client");
                match client.allocate(worker, rank, believed).await {
                    Ok(room) => {
                        writeln!(
                            out,
                            "ROOM client {worker} {rank} {room} {believed} {}",
                            unix_ms()
                        )
                        .expect("write");
                    }
                    Err(ClientError::DpSizeMismatch { registered, .. }) => {
                        beliefs.insert(worker, registered);
                    }
                    Err(error) => {
                        writeln!(out, "ERR client - {:?} {}", error.code(), unix_ms())
                            .expect("write");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                // Leased rooms come without an RPC: pace them like traffic,
                // so the checker can resolve every one.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            "realign" => {
                tokio::time::sleep(Duration::from_millis(2500)).await;
                let worker = REALIGNED[realigned % REALIGNED.len()];
                let dp_size =
                    REALIGN_SIZES[(realigned / REALIGNED.len() + 1) % REALIGN_SIZES.len()];
                realigned += 1;
                let sent = unix_ms();
                // Through whichever replica answers: a router would retry.
                let mut acked = None;
                for attempt in 0..30 {
                    let mut client = clients[(server + attempt) % clients.len()].clone();
                    let request = pb::RegisterWorkerRequest {
                        prefill_worker: worker.into(),
                        dp_size,
                    };
                    if client.register_worker(request).await.is_ok() {
                        acked = Some(unix_ms());
                        break;
                    }
                    if unix_ms() > until_ms {
                        break;
                    }
                }
                // Unacknowledged realignments count too: they may have landed.
                let acked = acked.map_or("none".to_owned(), |a| a.to_string());
                writeln!(out, "REALIGN {worker} {dp_size} {sent} {acked}").expect("write");
                out.flush().expect("flush");
            }
            other => panic!("unknown HARNESS_MODE {other}"),
        }
    }
    out.flush().expect("flush");
}

/// One fault, and when it began and ended.
#[derive(Debug, Clone)]
struct Fault {
    name: String,
    began_ms: u64,
    ended_ms: u64,
    /// etcd had no quorum any replica could reach: past the staleness window
    /// no replica may hand out a room until the fault ends.
    quorum_lost: bool,
}

/// Where the replicas' etcd runs, and the faults it can suffer.
enum EtcdUnderTest {
    /// One etcd; replica 2 reaches it through a TCP proxy the test controls.
    Single { etcd: EtcdProcess, proxy: Proxy },
    /// Three members: replica 0 knows all three, replica 1 members 0 and 1,
    /// replica 2 only member 2.
    Cluster(EtcdCluster),
}

impl EtcdUnderTest {
    /// `--etcd-endpoints` of replica `i`.
    fn endpoints(&self, i: usize) -> String {
        match self {
            Self::Single { etcd, proxy } => {
                if i == 2 {
                    proxy.url()
                } else {
                    etcd.endpoint.clone()
                }
            }
            Self::Cluster(cluster) => {
                let members: &[usize] = match i {
                    0 => &[0, 1, 2],
                    1 => &[0, 1],
                    _ => &[2],
                };
                members
                    .iter()
                    .map(|&m| cluster.endpoint(m))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        }
    }

    /// How many kinds of fault [`Self::inject`] cycles through.
    fn kinds(&self) -> usize {
        match self {
            Self::Single { .. } => 6,
            Self::Cluster(_) => 5,
        }
    }

    /// Injects the `round`th fault and waits for it to end: its name, and
    /// whether etcd had no reachable quorum meanwhile.
    async fn inject(&mut self, round: usize, replicas: &mut Replicas) -> (String, bool) {
        // Each kind of fault hits a different replica each time around.
        let victim = (round / self.kinds() + round) % 3;
        match self {
            Self::Single { etcd, proxy } => match round % 6 {
                kind @ (0 | 1) => (replicas.fault(victim, kind).await, false),
                2 => {
                    proxy.hold();
                    tokio::time::sleep(STALENESS + Duration::from_secs(2)).await;
                    proxy.pass();
                    (
                        "partition replica 2 from etcd (bytes held) 5 s".to_owned(),
                        false,
                    )
                }
                3 => {
                    etcd.signal(libc::SIGSTOP);
                    tokio::time::sleep(Duration::from_millis(2000)).await;
                    etcd.signal(libc::SIGCONT);
                    ("SIGSTOP etcd 2 s".to_owned(), false)
                }
                4 => {
                    proxy.cut();
                    tokio::time::sleep(Duration::from_millis(2000)).await;
                    proxy.pass();
                    (
                        "cut replica 2's etcd connections, refuse new ones 2 s".to_owned(),
                        false,
                    )
                }
                _ => {
                    etcd.kill9();
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    etcd.resume();
                    ("kill -9 etcd, restart".to_owned(), false)
                }
            },
            Self::Cluster(cluster) => {
                let member = (round / 5) % 3;
                match round % 5 {
                    kind @ (0 | 1) => (replicas.fault(victim, kind).await, false),
                    2 => {
                        // Member 2 is cut off from the other two and loses
                        // its leader; replica 2 reaches only member 2.
                        cluster.signal(0, libc::SIGSTOP);
                        cluster.signal(1, libc::SIGSTOP);
                        tokio::time::sleep(ISOLATION).await;
                        cluster.signal(0, libc::SIGCONT);
                        cluster.signal(1, libc::SIGCONT);
                        (
                            format!(
                                "member 2 isolated (members 0 and 1 paused) {} s",
                                ISOLATION.as_secs()
                            ),
                            true,
                        )
                    }
                    3 => {
                        cluster.kill9(member);
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        cluster.restart(member);
                        (format!("kill -9 etcd member {member}, restart"), false)
                    }
                    _ => {
                        cluster.signal(member, libc::SIGSTOP);
                        tokio::time::sleep(Duration::from_millis(2000)).await;
                        cluster.signal(member, libc::SIGCONT);
                        (format!("SIGSTOP etcd member {member} 2 s"), false)
                    }
                }
            }
        }
    }
}

/// The replicas, restartable on their ports.
struct Replicas {
    processes: Vec<ServerProcess>,
    args: Vec<Vec<String>>,
    dirs: Vec<tempfile::TempDir>,
}

impl Replicas {
    fn restart(&mut self, i: usize) {
        let args: Vec<&str> = self.args[i].iter().map(String::as_str).collect();
        self.processes[i] = ServerProcess::start(self.dirs[i].path(), &args);
    }

    fn signal(&self, i: usize, signal: i32) {
        self.processes[i].signal(signal);
    }

    /// The replica faults both topologies share: `kill -9` and a restart
    /// (kind 0), or a pause (kind 1).
    async fn fault(&mut self, victim: usize, kind: usize) -> String {
        if kind == 0 {
            self.processes[victim].kill9();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            self.restart(victim);
            format!("kill -9 replica {victim}, restart")
        } else {
            self.signal(victim, libc::SIGSTOP);
            tokio::time::sleep(Duration::from_millis(2500)).await;
            self.signal(victim, libc::SIGCONT);
            format!("SIGSTOP replica {victim} 2.5 s")
        }
    }
}

fn spawn_router(
    mode: &str,
    id: usize,
    servers: &str,
    until_ms: u64,
    out: &std::path::Path,
) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "fault_harness::harness_router",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("HARNESS_MODE", mode)
        .env("HARNESS_ID", id.to_string())
        .env("HARNESS_SERVERS", servers)
        .env("HARNESS_UNTIL_MS", until_ms.to_string())
        .env("HARNESS_OUT", out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn a router process")
}

#[derive(Debug, Clone)]
struct Issued {
    mode: String,
    worker: String,
    rank: u32,
    room: u64,
    dp_size: u32,
    at_ms: u64,
}

#[derive(Debug, Clone)]
struct Realignment {
    worker: String,
    dp_size: u32,
    sent_ms: u64,
    /// When RegisterWorker answered OK; `None` when no replica did (it may
    /// still have landed).
    acked_ms: Option<u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_under_faults_never_repeat_or_misalign_a_room() {
    let _one = ONE_HARNESS_AT_A_TIME.lock().await;
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let proxy = Proxy::start(etcd.addr()).await;
    run_harness(EtcdUnderTest::Single { etcd, proxy }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_a_three_member_etcd_never_repeat_misalign_or_serve_past_a_lost_quorum() {
    let _one = ONE_HARNESS_AT_A_TIME.lock().await;
    let Some(cluster) = EtcdCluster::start() else {
        return;
    };
    run_harness(EtcdUnderTest::Cluster(cluster)).await;
}

async fn run_harness(mut etcd: EtcdUnderTest) {
    let seconds = harness_seconds();
    let topology = match etcd {
        EtcdUnderTest::Single { .. } => "one etcd",
        EtcdUnderTest::Cluster(_) => "a three-member etcd",
    };
    let prefix = common::unique_prefix("harness");
    let staleness = STALENESS.as_secs().to_string();
    let mut replicas = Replicas {
        processes: Vec::new(),
        args: Vec::new(),
        dirs: Vec::new(),
    };
    for i in 0..3 {
        let endpoint = etcd.endpoints(i);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args: Vec<String> = [
            "--etcd-endpoints",
            &endpoint,
            "--etcd-prefix",
            &prefix,
            "--etcd-staleness-secs",
            &staleness,
            "--store-timeout-secs",
            "2",
            "--request-timeout-secs",
            "5",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let args_now: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = ServerProcess::start(dir.path(), &args_now);
        // Restarts come back on the same port: routers know only that one.
        args.extend(["--listen".to_owned(), server.grpc_addr.to_string()]);
        replicas.processes.push(server);
        replicas.args.push(args);
        replicas.dirs.push(dir);
    }
    {
        let mut client = replicas.processes[0].client().await;
        for (worker, dp_size) in initial_beliefs() {
            common::timed(client.register_worker(pb::RegisterWorkerRequest {
                prefill_worker: worker.into(),
                dp_size,
            }))
            .await
            .expect("register");
        }
    }
    let servers: Vec<String> = replicas.processes.iter().map(ServerProcess::url).collect();
    let outputs = tempfile::tempdir().expect("tempdir");
    let started_ms = unix_ms();
    let until_ms = started_ms + seconds * 1000;
    let modes = [
        "allocate", "allocate", "lease", "client", "client", "realign",
    ];
    let mut routers = Vec::new();
    for (id, mode) in modes.iter().enumerate() {
        let out = outputs.path().join(format!("router-{id}.txt"));
        routers.push((
            spawn_router(mode, id, &servers.join(","), until_ms, &out),
            out,
        ));
    }

    // The fault schedule, round after round until 10 s before the end.
    let mut faults: Vec<Fault> = Vec::new();
    let mut round = 0usize;
    tokio::time::sleep(Duration::from_secs(3)).await;
    while unix_ms() + 10_000 < until_ms {
        let began_ms = unix_ms();
        let (name, quorum_lost) = etcd.inject(round, &mut replicas).await;
        eprintln!("fault harness: {name} ({} ms)", unix_ms() - began_ms);
        faults.push(Fault {
            name,
            began_ms,
            ended_ms: unix_ms(),
            quorum_lost,
        });
        round += 1;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }

    eprintln!("fault harness: faults done; waiting for the routers");
    // Collect.
    let mut issued: Vec<Issued> = Vec::new();
    let mut realignments: Vec<Realignment> = Vec::new();
    let mut errors = 0usize;
    // (replica, when): calls a replica refused, to show a quiet window was
    // asked, not merely unreached.
    let mut refusals: Vec<(usize, u64)> = Vec::new();
    for (router, out) in routers {
        let output = tokio::task::spawn_blocking(move || router.wait_with_output())
            .await
            .expect("join")
            .expect("router output");
        assert!(
            output.status.success(),
            "a router failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = std::fs::read_to_string(&out).expect("router output file");
        for line in text.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            match fields[..] {
                ["ROOM", mode, worker, rank, room, dp_size, at] => issued.push(Issued {
                    mode: mode.to_owned(),
                    worker: worker.to_owned(),
                    rank: rank.parse().expect("rank"),
                    room: room.parse().expect("room"),
                    dp_size: dp_size.parse().expect("dp_size"),
                    at_ms: at.parse().expect("time"),
                }),
                ["REALIGN", worker, dp_size, sent, acked] => realignments.push(Realignment {
                    worker: worker.to_owned(),
                    dp_size: dp_size.parse().expect("dp_size"),
                    sent_ms: sent.parse().expect("time"),
                    acked_ms: acked.parse().ok(),
                }),
                ["ERR", _, server, _, at] => {
                    errors += 1;
                    if let (Ok(server), Ok(at)) = (server.parse::<usize>(), at.parse::<u64>()) {
                        refusals.push((server, at));
                    }
                }
                _ => panic!("bad router line {line:?}"),
            }
        }
    }

    // 1. No room twice; 2. aligned to the dp_size it came with.
    let mut owner: HashMap<u64, &Issued> = HashMap::new();
    for room in &issued {
        assert!((1..=(1u64 << 63) - 1).contains(&room.room));
        assert_eq!(
            room.room % u64::from(room.dp_size),
            u64::from(room.rank),
            "misaligned: {room:?}"
        );
        if let Some(other) = owner.insert(room.room, room) {
            panic!(
                "room {} handed out twice: {other:?} and {room:?}",
                room.room
            );
        }
    }
    // 3. The dp_size was in force when the room was issued.
    for room in issued
        .iter()
        .filter(|r| REALIGNED.contains(&r.worker.as_str()))
    {
        let window = match room.mode.as_str() {
            "client" => STALENESS + CLIENT_LEASE_AGE + Duration::from_secs(1),
            _ => STALENESS + Duration::from_secs(1),
        };
        let window_ms = u64::try_from(window.as_millis()).expect("fits");
        // The realignments of this worker, the initial registration first:
        // (dp_size, sent, acknowledged). A dp_size is in force from when its
        // registration was sent (it cannot commit earlier) until a later one
        // was acknowledged (it committed by then), plus the window; an
        // unacknowledged one may never have landed, so it ends nothing.
        let mut history = vec![(REALIGN_SIZES[0], 0u64, Some(0u64))];
        history.extend(
            realignments
                .iter()
                .filter(|r| r.worker == room.worker)
                .map(|r| (r.dp_size, r.sent_ms, r.acked_ms)),
        );
        let in_force = history.iter().enumerate().any(|(k, (dp_size, sent, _))| {
            let superseded = history[k + 1..]
                .iter()
                .filter_map(|(_, _, acked)| *acked)
                .min()
                .unwrap_or(u64::MAX);
            *dp_size == room.dp_size
                && *sent <= room.at_ms
                && room.at_ms <= superseded.saturating_add(window_ms)
        });
        assert!(
            in_force,
            "{room:?} came with a dp_size not in force then (history {history:?})"
        );
    }
    // 4. No room while etcd had no quorum a replica could reach, once the
    // staleness window ran out (a leaderless member's answers are stale).
    for fault in faults.iter().filter(|f| f.quorum_lost) {
        let window_ms = u64::try_from((STALENESS + STOP_SLACK).as_millis()).expect("fits");
        let quiet = (fault.began_ms + window_ms)..fault.ended_ms;
        assert!(
            refusals
                .iter()
                .any(|(replica, at)| *replica == 2 && quiet.contains(at)),
            "no router call reached replica 2 (which reaches only the cut-off member) in {quiet:?} of {fault:?}: the check below would hold vacuously"
        );
        for room in &issued {
            let after = match room.mode.as_str() {
                "client" => STALENESS + STOP_SLACK + CLIENT_LEASE_AGE,
                _ => STALENESS + STOP_SLACK,
            };
            let stop_ms = fault.began_ms + u64::try_from(after.as_millis()).expect("fits");
            assert!(
                !(stop_ms..fault.ended_ms).contains(&room.at_ms),
                "{room:?} was handed out {} ms into {fault:?}, past the staleness window: a replica kept confirming from a member without a quorum",
                room.at_ms - fault.began_ms
            );
        }
    }
    eprintln!(
        "fault harness: {} rooms collected; resolving them",
        issued.len()
    );
    // 5. Every acknowledged room resolves, to its worker and dp_size.
    let mut channels = Vec::new();
    for replica in &replicas.processes {
        channels.push(replica.channel().await);
    }
    let rooms: Arc<Vec<(u64, String, u32)>> = Arc::new(
        issued
            .iter()
            .map(|r| (r.room, r.worker.clone(), r.dp_size))
            .collect(),
    );
    let lanes = 48;
    let mut lanes_done = Vec::new();
    for lane in 0..lanes {
        let rooms = rooms.clone();
        // Spread over every replica: any replica resolves any room.
        let mut client = RoomAllocatorServiceClient::new(channels[lane % channels.len()].clone());
        lanes_done.push(tokio::spawn(async move {
            for (room, worker, dp_size) in rooms.iter().skip(lane).step_by(lanes) {
                let resolved =
                    common::timed(client.resolve_rank(pb::ResolveRankRequest { room: *room }))
                        .await
                        .unwrap_or_else(|status| {
                            panic!("acknowledged room {room} does not resolve: {status:?}")
                        })
                        .into_inner();
                assert_eq!(
                    (&resolved.prefill_worker, resolved.dp_size),
                    (worker, *dp_size),
                    "room {room}"
                );
            }
        }));
    }
    for lane in lanes_done {
        lane.await.expect("resolve lane");
    }
    // 6. Service back within the bound after each fault.
    let mut worst = Duration::ZERO;
    for fault in &faults {
        if fault.ended_ms + u64::try_from(RECOVERY_BOUND.as_millis()).expect("fits") > until_ms {
            continue;
        }
        for mode in ["allocate", "lease", "client"] {
            let next = issued
                .iter()
                .filter(|r| r.mode == mode && r.at_ms >= fault.ended_ms)
                .map(|r| r.at_ms)
                .min()
                .unwrap_or_else(|| panic!("no {mode} room after {fault:?}"));
            let recovery = Duration::from_millis(next - fault.ended_ms);
            assert!(
                recovery <= RECOVERY_BOUND,
                "{mode} routers got no room for {recovery:?} after {fault:?}"
            );
            worst = worst.max(recovery);
        }
    }
    if seconds >= 40 {
        assert!(
            faults.len() >= etcd.kinds(),
            "every kind of fault ran: {faults:?}"
        );
    }
    if let EtcdUnderTest::Cluster(_) = etcd {
        assert!(
            faults.iter().any(|f| f.quorum_lost),
            "member 2 was cut off at least once: {faults:?}"
        );
    }
    assert!(
        realignments.len() >= 4,
        "realignments ran: {realignments:?}"
    );
    let downtime: u64 = faults.iter().map(|f| f.ended_ms - f.began_ms).sum();
    let summary = format!(
        "fault harness on {}: {} s ({} s under a fault), {} faults ({}), {} rooms checked (unique, aligned, in force, none past a lost quorum, resolved), {} realignments, {} router errors (all retried), worst recovery {:?}, 0 duplicates",
        topology,
        seconds,
        downtime / 1000,
        faults.len(),
        faults.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join("; "),
        issued.len(),
        realignments.len(),
        errors,
        worst
    );
    println!("{summary}");
    if let Ok(path) = std::env::var("HARNESS_REPORT") {
        let mut report = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("report");
        writeln!(report, "{summary}").expect("report");
    }
}

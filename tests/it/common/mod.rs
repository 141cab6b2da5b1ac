//! Test harness: runs the real `room-allocator` binary on loopback ports the
//! kernel picks, reads the bound addresses from its log, and kills it (by
//! PID, only processes we started) when the guard drops.

pub mod etcd_cluster;
pub mod load;
pub mod peers;
pub mod pki;
pub mod proxy;
pub mod router;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use room_allocator::pb::room_allocator_service_client::RoomAllocatorServiceClient;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_room-allocator");
/// Long enough for a debug build on a loaded 2-core CI machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Starts of a test etcd tried on new ports when it exits before it is ready.
const ETCD_START_ATTEMPTS: usize = 3;
/// Bound on any single await in a test.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);

pub type Client = RoomAllocatorServiceClient<Channel>;

/// A running server; killed with SIGKILL when dropped.
pub struct ServerProcess {
    child: Option<Child>,
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    /// Set by the reader thread once stderr is closed: every line is in `log`.
    log_closed: Arc<AtomicBool>,
}

/// The server exited before it listened; what it printed.
#[derive(Debug)]
pub struct StartFailure {
    pub status: Option<ExitStatus>,
    pub log: String,
}

/// Reads `name=VALUE` (text logs) or `"name":"VALUE"` (JSON logs).
fn field(line: &str, name: &str) -> Option<SocketAddr> {
    let (start, stop): (usize, &[char]) = if let Some(at) = line.find(&format!("{name}=")) {
        (at + name.len() + 1, &[' ', '\t'])
    } else {
        (
            line.find(&format!("\"{name}\":\""))? + name.len() + 4,
            &['"'],
        )
    };
    let rest = &line[start..];
    let end = rest.find(stop).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl ServerProcess {
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> Self {
        Self::try_start(data_dir, extra_args).unwrap_or_else(|failure| {
            panic!(
                "server did not start ({:?}):\n{}",
                failure.status, failure.log
            )
        })
    }

    pub fn try_start(data_dir: &Path, extra_args: &[&str]) -> Result<Self, StartFailure> {
        Self::try_start_with(data_dir, extra_args, |_| {})
    }

    /// Starts the server; `adjust` may change the command (env, limits).
    pub fn try_start_with(
        data_dir: &Path,
        extra_args: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Result<Self, StartFailure> {
        let mut command = Command::new(BIN);
        command.arg("serve");
        for (flag, default) in [
            ("--listen", "127.0.0.1:0"),
            ("--metrics-listen", "127.0.0.1:0"),
        ] {
            if !extra_args.contains(&flag) {
                command.args([flag, default]);
            }
        }
        command
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra_args)
            .env("RUST_LOG", "info")
            .env_remove("ROOM_ALLOCATOR_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        adjust(&mut command);
        Self::spawn(command)
    }

    /// Spawns a prepared command (which must run `serve` with loopback
    /// listeners and piped stderr) and waits until it logs its addresses.
    pub fn spawn(mut command: Command) -> Result<Self, StartFailure> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn room-allocator");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_closed = Arc::new(AtomicBool::new(false));
        let (addrs_tx, addrs_rx) = mpsc::channel();
        {
            let log = log.clone();
            let log_closed = log_closed.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("listening") {
                        if let (Some(grpc), Some(metrics)) =
                            (field(&line, "grpc_addr"), field(&line, "metrics_addr"))
                        {
                            let _ = addrs_tx.send((grpc, metrics));
                        }
                    }
                    log.lock().expect("log lock").push(line);
                }
                log_closed.store(true, Ordering::Release);
            });
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok((grpc_addr, metrics_addr)) = addrs_rx.recv_timeout(Duration::from_millis(20))
            {
                return Ok(Self {
                    child: Some(child),
                    grpc_addr,
                    metrics_addr,
                    log,
                    log_closed,
                });
            }
            let exited = child.try_wait().expect("try_wait");
            if exited.is_some() || Instant::now() > deadline {
                if exited.is_none() {
                    let _ = child.kill();
                }
                let status = child.wait().ok();
                wait_log_closed(&log_closed);
                let text = log.lock().expect("log lock").join("\n");
                return Err(StartFailure { status, log: text });
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.pid()).expect("pid fits");
        // SAFETY: signalling the server this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal the server");
    }

    /// SIGSTOP freezes the server: its kernel still accepts and acknowledges
    /// bytes, but nothing answers (a hung process, a stalled VM). Returns
    /// once every thread is stopped, as a loaded machine may take a moment.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
        let tasks = format!("/proc/{}/task", self.pid());
        let stopped = || {
            std::fs::read_dir(&tasks).expect("/proc").all(|task| {
                let stat = std::fs::read_to_string(task.expect("task").path().join("stat"))
                    .unwrap_or_default();
                // The state follows the parenthesised command name.
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !stopped() {
            assert!(Instant::now() < deadline, "the server did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGCONT: undoes [`Self::freeze`].
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    pub async fn client(&self) -> Client {
        let channel = tokio::time::timeout(
            CALL_TIMEOUT,
            Channel::from_shared(self.url())
                .expect("url")
                .timeout(CALL_TIMEOUT)
                .connect(),
        )
        .await
        .expect("connect in time")
        .expect("connect");
        RoomAllocatorServiceClient::new(channel)
    }

    /// A client that connects at its first call (the server may be gone).
    // Only the failpoint tests call it; without the feature it would be dead.
    #[cfg(feature = "failpoints")]
    pub fn lazy_client(&self) -> Client {
        let channel = Channel::from_shared(self.url())
            .expect("url")
            .timeout(CALL_TIMEOUT)
            .connect_lazy();
        RoomAllocatorServiceClient::new(channel)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect")
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Waits up to `limit` for the process to exit by itself (a failpoint
    /// killed it, say); its status, or `None` if it still runs.
    #[cfg(feature = "failpoints")]
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                // The process is gone, but the reader thread may not have
                // taken its last lines yet (seen: a crash's "crashing" line
                // missing from the log under load).
                wait_log_closed(&self.log_closed);
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash or the OOM killer would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
    }

    /// SIGTERM, and the exit status it leads to.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = i32::try_from(child.id()).expect("pid fits");
        // SAFETY: signalling a child we spawned and have not reaped.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM sent");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                wait_log_closed(&self.log_closed);
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not exit within {START_TIMEOUT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits (up to 5 s) until a server's stderr reader has taken every line:
/// once the process exited, its stderr closes and the reader ends.
fn wait_log_closed(closed: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !closed.load(Ordering::Acquire) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Awaits `future` or fails the test after [`CALL_TIMEOUT`].
pub async fn timed<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CALL_TIMEOUT, future)
        .await
        .expect("call finished in time")
}

/// Runs the binary as a client command and returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    run_cli_env(args, &[])
}

/// As [`run_cli`], with extra environment variables.
pub fn run_cli_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(BIN)
        .args(args)
        .env_remove("ROOM_ALLOCATOR_SERVER")
        .envs(env.iter().copied())
        .output()
        .expect("run room-allocator");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// True when running under CI, where a missing tool is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Finds a tool on PATH, or says SKIP (failing under CI).
pub fn require_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        assert!(
            !in_ci(),
            "{name} is not on PATH; the test command installs it"
        );
        eprintln!("SKIP: {name} is not on PATH; run scripts/test.sh to install it");
    }
    found
}

/// A real etcd server on free loopback ports in a temp dir, killed (by PID)
/// on drop. Returns `None` (SKIP) if etcd is not installed outside CI.
pub struct EtcdProcess {
    child: Option<Child>,
    pub endpoint: String,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl EtcdProcess {
    /// A plain client of this etcd, to look at or change keys directly.
    pub async fn admin(&self) -> room_allocator::store::etcd::client::EtcdClient {
        room_allocator::store::etcd::client::EtcdClient::connect(
            &room_allocator::store::etcd::client::ConnectOptions {
                endpoints: vec![self.endpoint.clone()],
                timeout: Duration::from_secs(5),
                ..Default::default()
            },
        )
        .await
        .expect("connect to etcd")
    }

    /// Every key-value under `prefix`.
    pub async fn read_under(
        &self,
        prefix: &str,
    ) -> Vec<room_allocator::store::etcd::client::pb::KeyValue> {
        let key = prefix.as_bytes().to_vec();
        self.admin()
            .await
            .range(room_allocator::store::etcd::client::pb::RangeRequest {
                range_end: room_allocator::store::etcd::client::prefix_end(&key),
                key,
                ..Default::default()
            })
            .await
            .expect("read the prefix")
            .kvs
    }

    /// The key-value at exactly `key`, if any.
    pub async fn get(
        &self,
        key: &str,
    ) -> Option<room_allocator::store::etcd::client::pb::KeyValue> {
        self.admin()
            .await
            .range(room_allocator::store::etcd::client::pb::RangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            })
            .await
            .expect("read the key")
            .kvs
            .pop()
    }

    /// Deletes exactly `key`.
    pub async fn delete(&self, key: &str) {
        self.admin()
            .await
            .delete(
                room_allocator::store::etcd::client::pb::DeleteRangeRequest {
                    key: key.as_bytes().to_vec(),
                    ..Default::default()
                },
            )
            .await
            .expect("delete the key");
    }

    /// Deletes every key under `prefix`.
    pub async fn delete_under(&self, prefix: &str) {
        let key = prefix.as_bytes().to_vec();
        self.admin()
            .await
            .delete(
                room_allocator::store::etcd::client::pb::DeleteRangeRequest {
                    range_end: room_allocator::store::etcd::client::prefix_end(&key),
                    key,
                    ..Default::default()
                },
            )
            .await
            .expect("delete the prefix");
    }

    /// What is left of `kv`'s lease, in seconds; 0 for a key with none.
    pub async fn lease_ttl(&self, kv: &room_allocator::store::etcd::client::pb::KeyValue) -> i64 {
        if kv.lease == 0 {
            return 0;
        }
        self.admin()
            .await
            .lease_time_to_live(kv.lease)
            .await
            .expect("lease TTL")
            .ttl
    }

    /// The longest lease left among `worker`'s range records under `prefix`.
    // Only the failpoint tests ask; without the feature it would be dead.
    #[cfg(feature = "failpoints")]
    pub async fn longest_range_ttl(&self, prefix: &str, worker: &str) -> i64 {
        let mut longest = 0;
        for kv in self.read_under(&format!("{prefix}v1/ranges/")).await {
            if String::from_utf8_lossy(&kv.value).contains(&format!("\"{worker}\"")) {
                longest = longest.max(self.lease_ttl(&kv).await);
            }
        }
        longest
    }

    /// Puts `key` = `value`, with no lease.
    pub async fn put(&self, key: &str, value: &str) {
        self.admin()
            .await
            .put(room_allocator::store::etcd::client::pb::PutRequest {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                ..Default::default()
            })
            .await
            .expect("put the key");
    }

    pub fn start() -> Option<Self> {
        require_tool("etcd")?;
        // A port picked free can be taken by another test's process before
        // etcd binds it (seen with four test threads: etcd exited, "etcd did
        // not become ready"): a start whose etcd exits is tried again on new
        // ports, in a new data dir.
        for attempt in 1..=ETCD_START_ATTEMPTS {
            let client_port = free_port();
            let peer_port = std::iter::repeat_with(free_port)
                .take(16)
                .find(|&port| port != client_port)
                .expect("two distinct free ports");
            let mut etcd = Self {
                child: None,
                endpoint: format!("http://127.0.0.1:{client_port}"),
                client_port,
                peer_port,
                dir: tempfile::tempdir().expect("tempdir"),
            };
            match etcd.try_resume() {
                Ok(()) => return Some(etcd),
                Err(status) if attempt < ETCD_START_ATTEMPTS => {
                    eprintln!(
                        "etcd on ports {client_port}/{peer_port} exited ({status}) before it was ready; again on new ports"
                    );
                }
                Err(status) => panic!(
                    "etcd exited ({status}) before it was ready, {ETCD_START_ATTEMPTS} times on new ports"
                ),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts (again) on the same ports and data dir.
    pub fn resume(&mut self) {
        if let Err(status) = self.try_resume() {
            panic!("etcd exited ({status}) before it was ready");
        }
    }

    /// Starts etcd and waits until it is ready; the exit status if it ends
    /// first. Panics if it is neither ready nor ended within START_TIMEOUT.
    fn try_resume(&mut self) -> Result<(), std::process::ExitStatus> {
        assert!(self.child.is_none(), "etcd is running");
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let args = etcd_member_args(
            "test",
            &self.dir.path().join("data"),
            &client,
            &peer,
            &format!("test={peer}"),
        );
        let mut child = spawn_etcd(&args);
        let deadline = Instant::now() + START_TIMEOUT;
        // Ready when etcd's /health endpoint says so (it checks for a leader).
        loop {
            if etcd_healthy(self.client_port) {
                self.child = Some(child);
                return Ok(());
            }
            if let Some(status) = child.try_wait().expect("try_wait on etcd") {
                return Err(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("etcd did not become ready within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` (e.g. SIGSTOP to freeze etcd, SIGCONT to thaw it).
    /// Where etcd's clients connect.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    pub fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("etcd is running");
        let pid = i32::try_from(child.id()).expect("pid fits");
        // SAFETY: signalling the etcd this harness started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal etcd");
    }

    /// SIGKILL; the data dir stays for `resume`.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL etcd");
            child.wait().expect("reap etcd");
        }
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The flags every etcd a test starts has: its name, data dir, client and
/// peer URLs on loopback, the members it starts with, quiet logs. Callers
/// add what their test needs (TLS, auth, election timing).
pub fn etcd_member_args(
    name: &str,
    data_dir: &Path,
    client: &str,
    peer: &str,
    initial_cluster: &str,
) -> Vec<String> {
    vec![
        format!("--name={name}"),
        format!("--data-dir={}", data_dir.display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster={initial_cluster}"),
        "--logger=zap".to_owned(),
        "--log-level=error".to_owned(),
    ]
}

/// Starts `etcd` with `args`, its output discarded; the caller ends it by
/// PID (its `Child`).
pub fn spawn_etcd(args: &[String]) -> Child {
    Command::new("etcd")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn etcd")
}

fn etcd_healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}

/// A unique key prefix, so tests sharing one etcd never share a room space.
pub fn unique_prefix(test: &str) -> String {
    format!("/test-{test}-{}/", std::process::id())
}

/// libfaketime's preload library, if installed (Debian package `faketime`).
pub fn faketime_library() -> Option<PathBuf> {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ];
    let found = candidates.iter().map(PathBuf::from).find(|p| p.is_file());
    if found.is_none() {
        assert!(
            !in_ci(),
            "libfaketime is missing; the test command installs it"
        );
        eprintln!("SKIP clock skew: libfaketime is not installed (apt-get install faketime)");
    }
    found
}

/// A plain HTTP/1.0 GET (the metrics endpoint); the whole response.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    stream
        .set_read_timeout(Some(CALL_TIMEOUT))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

/// The newest modification time under `path`.
fn newest(path: &Path) -> std::time::SystemTime {
    let meta = std::fs::metadata(path).expect("source metadata");
    let mut newest = meta.modified().expect("mtime");
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).expect("read_dir") {
            newest = newest.max(self::newest(&entry.expect("entry").path()));
        }
    }
    newest
}

/// The example `name` of `package` (`room-allocator` or
/// `room-allocator-client`). `cargo test` builds the examples, but not when
/// only some test targets are asked for (`--test it`); then an example older
/// than the sources is built here first, so old code is never tested.
pub fn example(package: &str, name: &str) -> PathBuf {
    // The test binary is in <target>/<profile>/deps.
    let profile_dir = std::env::current_exe()
        .expect("test binary")
        .parent()
        .and_then(|deps| deps.parent())
        .expect("profile dir")
        .to_path_buf();
    let path = profile_dir.join("examples").join(name);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = [
        "src",
        "examples",
        "Cargo.toml",
        "client/src",
        "client/examples",
        "client/Cargo.toml",
    ]
    .iter()
    .map(|source| newest(&root.join(source)))
    .max()
    .expect("sources");
    let built = std::fs::metadata(&path).and_then(|meta| meta.modified());
    if built.is_ok_and(|built| built >= sources) {
        return path;
    }
    let target_dir = profile_dir.parent().expect("target dir");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args([
            "build",
            "--quiet",
            "-p",
            package,
            "--example",
            name,
            "--target-dir",
        ])
        .arg(target_dir)
        .current_dir(root);
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    if package == "room-allocator" && cfg!(feature = "failpoints") {
        build.args(["--features", "failpoints"]);
    }
    let status = build.status().expect("run cargo build --example");
    assert!(status.success(), "cargo build --example {name}: {status}");
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

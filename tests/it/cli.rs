//! The `room-allocator` command line against the real binary: the client
//! commands' output and errors (status code names, connection causes, TLS),
//! every flag's environment variable, and `serve --check-config`.

use crate::common;

use std::collections::{BTreeSet, HashSet};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::{peers, ServerProcess, BIN};
use serde_json::Value;

/// Bound on one run of the binary; client commands give up well before.
const RUN_LIMIT: Duration = Duration::from_secs(30);

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    /// Exited non-zero with one error line on stderr, nothing on stdout.
    fn failed(&self) -> &str {
        assert_ne!(self.code, 0, "stdout: {}", self.stdout);
        assert!(self.stdout.is_empty(), "stdout: {}", self.stdout);
        self.stderr.trim_end()
    }

    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
            .collect()
    }

    fn json(&self) -> Value {
        let mut lines = self.json_lines();
        assert_eq!(lines.len(), 1, "one JSON line: {}", self.stdout);
        lines.remove(0)
    }
}

/// Runs the binary with `args` and `env` (and no ROOM_ALLOCATOR_* variable
/// from the test's own environment), killing it past [`RUN_LIMIT`].
fn run_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(BIN);
    command.args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("ROOM_ALLOCATOR_") {
            command.env_remove(name);
        }
    }
    command
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("run room-allocator");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("room-allocator {args:?} ran over {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        code: status.code().unwrap_or(-1),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn run(args: &[&str]) -> Run {
    run_env(args, &[])
}

fn start(dir: &Path, args: &[String]) -> ServerProcess {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ServerProcess::start(dir, &args)
}

/// `host:port` of a server: plaintext unless a CA is given.
fn host_port(server: &ServerProcess) -> String {
    server.grpc_addr.to_string()
}

#[test]
fn deregister_prints_a_json_line_and_allocation_is_then_refused_with_failed_precondition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let addr = host_port(&server);
    let registered = run(&[
        "register",
        "--server",
        &addr,
        "--worker",
        "w",
        "--dp-size",
        "4",
    ]);
    assert_eq!(
        registered.ok().json(),
        serde_json::json!({"prefill_worker": "w", "dp_size": 4, "rooms_issued": 0})
    );
    let allocated = run(&[
        "allocate", "--server", &addr, "--worker", "w", "--rank", "3", "--count", "2",
    ]);
    let rooms: Vec<u64> = allocated
        .ok()
        .json_lines()
        .iter()
        .map(|line| {
            assert_eq!(line["dp_size"], 4);
            assert_eq!(line["dp_rank"], 3);
            line["room"].as_u64().expect("room")
        })
        .collect();
    assert_eq!(rooms.len(), 2);
    assert!(rooms.iter().all(|room| room % 4 == 3) && rooms[0] != rooms[1]);

    let deregistered = run(&["deregister", "--server", &addr, "--worker", "w"]);
    assert_eq!(
        deregistered.ok().json(),
        serde_json::json!({"prefill_worker": "w", "deregistered": true})
    );
    for args in [
        &[
            "allocate", "--server", &addr, "--worker", "w", "--rank", "1",
        ][..],
        &["lease", "--server", &addr, "--worker", "w", "--count", "4"][..],
    ] {
        let refused = run(args);
        let message = refused.failed();
        assert!(
            message.starts_with("room-allocator: FAILED_PRECONDITION: "),
            "{message}"
        );
        assert!(message.contains("deregistered"), "{message}");
        assert_eq!(message.lines().count(), 1, "{message}");
    }
    // Its rooms still resolve; it is no longer listed.
    let resolved = run(&["resolve", "--server", &addr, &rooms[1].to_string()]);
    assert_eq!(
        resolved.ok().json(),
        serde_json::json!({"room": rooms[1], "prefill_worker": "w", "dp_rank": 3, "dp_size": 4})
    );
    let workers = run(&["workers", "--server", &addr]);
    assert!(workers.ok().stdout.is_empty(), "{}", workers.stdout);
    let unknown = run(&["deregister", "--server", &addr, "--worker", "never"]);
    assert!(
        unknown.failed().starts_with("room-allocator: NOT_FOUND: "),
        "{}",
        unknown.stderr
    );
}

#[test]
fn lease_prints_one_aligned_json_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let url = server.url();
    run(&[
        "register",
        "--server",
        &url,
        "--worker",
        "p",
        "--dp-size",
        "3",
    ])
    .ok();
    let first = run(&["lease", "--server", &url, "--worker", "p", "--count", "5"]);
    let lease = first.ok().json();
    let keys: BTreeSet<&str> = lease
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "count",
            "dp_size",
            "first_base",
            "prefill_worker",
            "valid_for_ms"
        ])
    );
    let first_base = lease["first_base"].as_u64().expect("first_base");
    assert_eq!(lease["count"], 5);
    assert_eq!(lease["dp_size"], 3);
    assert_eq!(lease["prefill_worker"], "p");
    assert_eq!(first_base % 3, 0, "{lease}");
    assert!(first_base > 0);
    assert!(lease["valid_for_ms"].as_u64().expect("valid_for_ms") > 60_000);

    let second = run(&[
        "lease",
        "--server",
        &url,
        "--worker",
        "p",
        "--count",
        "1",
        "--dp-size",
        "3",
    ]);
    let next = second.ok().json()["first_base"].as_u64().expect("base");
    assert!(next >= first_base + 5 * 3, "{first_base} then {next}");
    // A base resolves to rank 0; base + 2 to rank 2.
    let resolved = run(&["resolve", "--server", &url, &(first_base + 2).to_string()]);
    assert_eq!(resolved.ok().json()["dp_rank"], 2);

    let stale = run(&[
        "lease",
        "--server",
        &url,
        "--worker",
        "p",
        "--count",
        "1",
        "--dp-size",
        "4",
    ]);
    let message = stale.failed();
    assert!(
        message.starts_with("room-allocator: FAILED_PRECONDITION: ")
            && message.contains("dp_size 3"),
        "{message}"
    );
}

#[test]
fn a_count_of_zero_is_refused_before_anything_is_sent() {
    let dead = peers::dead_addr().to_string();
    for command in ["allocate", "lease"] {
        let mut args = vec![command, "--server", &dead, "--worker", "w", "--count", "0"];
        if command == "allocate" {
            args.extend(["--rank", "0"]);
        }
        let refused = run(&args);
        assert_eq!(refused.code, 2, "a usage error: {}", refused.stderr);
        assert!(refused.stdout.is_empty());
        assert!(
            refused.stderr.contains("'0'") && refused.stderr.contains("--count"),
            "{}",
            refused.stderr
        );
        assert!(
            !refused.stderr.contains("connect"),
            "nothing was sent: {}",
            refused.stderr
        );
    }
}

#[test]
fn connection_errors_name_the_real_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let refused = peers::dead_addr().to_string();
    let http1 = peers::http1_peer().to_string();
    let metrics = server.metrics_addr.to_string();
    let cases: Vec<(String, &[&str])> = vec![
        (refused, &["connection refused", "nothing listens there"]),
        ("no-such-host.invalid:1".to_owned(), &["dns"]),
        (http1.clone(), &["does not speak grpc (http/2)"]),
        (format!("http://{http1}"), &["does not speak grpc (http/2)"]),
        // The metrics port is HTTP/1 too (hyper).
        (metrics, &["does not speak grpc (http/2)"]),
    ];
    // Connection errors take the CLI's connect patience: run them together.
    let runs: Vec<_> = cases
        .into_iter()
        .map(|(server, expected)| {
            let handle = std::thread::spawn({
                let server = server.clone();
                move || {
                    run(&[
                        "allocate",
                        "--server",
                        &server,
                        "--worker",
                        "w",
                        "--rank",
                        "0",
                        "--dp-size",
                        "1",
                    ])
                }
            });
            (server, expected, handle)
        })
        .collect();
    for (server, expected, handle) in runs {
        let result = handle.join().expect("run");
        let message = result.failed().to_ascii_lowercase();
        for needle in expected {
            assert!(message.contains(needle), "{server}: {message}");
        }
        assert!(message.starts_with("room-allocator: "), "{message}");
        assert!(
            !message.contains("transport error: transport error"),
            "said once: {message}"
        );
    }
}

#[test]
fn mutual_tls_works_with_a_client_certificate_and_says_tls_without_one() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), &pki.server_args(true));
    // host:port means https once a CA is given.
    let addr = format!("localhost:{}", server.grpc_addr.port());
    let (ca, cert, key) = (
        pki.path("ca.crt"),
        pki.path("client.crt"),
        pki.path("client.key"),
    );
    let tls = ["--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    let with = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--server", &addr]);
        all.extend(tls);
        run(&all)
    };
    with(&["register", "--worker", "m", "--dp-size", "2"]).ok();
    let room = with(&["allocate", "--worker", "m", "--rank", "1"])
        .ok()
        .json()["room"]
        .as_u64()
        .expect("room");
    assert_eq!(room % 2, 1);
    with(&["lease", "--worker", "m", "--count", "2"]).ok();
    assert_eq!(
        with(&["resolve", &room.to_string()]).ok().json()["prefill_worker"],
        "m"
    );
    assert_eq!(with(&["workers"]).ok().json_lines().len(), 1);
    assert_eq!(with(&["health"]).ok().json()["status"], "SERVING");

    // Without the certificate: refused, and the message says it is TLS.
    for command in [
        &["allocate", "--worker", "m", "--rank", "1"][..],
        &["register", "--worker", "m", "--dp-size", "2"][..],
        &["workers"][..],
    ] {
        let mut args = command.to_vec();
        args.extend(["--server", &addr, "--tls-ca", &ca]);
        let refused = run(&args);
        let message = refused.failed();
        assert!(message.contains("certificate"), "{message}");
        assert!(
            !message.ends_with("transport error"),
            "names the cause: {message}"
        );
    }
    // The certificate without its key is a usage error.
    let partial = run(&[
        "workers",
        "--server",
        &addr,
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
    ]);
    assert_eq!(partial.code, 2, "{}", partial.stderr);
    assert!(partial.stderr.contains("--tls-key"), "{}", partial.stderr);
}

#[test]
fn client_commands_take_every_setting_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "env-token\n").expect("write");
    let server = start(
        &dir.path().join("data"),
        &[
            "--auth-token-file".into(),
            token_file.to_str().expect("utf-8").into(),
        ],
    );
    let addr = host_port(&server);
    let env = [
        ("ROOM_ALLOCATOR_SERVER", addr.as_str()),
        ("ROOM_ALLOCATOR_TOKEN", "env-token"),
        ("ROOM_ALLOCATOR_WORKER", "from-env"),
        ("ROOM_ALLOCATOR_DP_SIZE", "2"),
    ];
    let registered = run_env(&["register"], &env);
    assert_eq!(
        registered.ok().json(),
        serde_json::json!({"prefill_worker": "from-env", "dp_size": 2, "rooms_issued": 0})
    );
    // Registering is an admin call: without the token it is refused.
    let anonymous = run_env(&["register"], &[env[0], env[2], env[3]]);
    assert!(
        anonymous
            .failed()
            .starts_with("room-allocator: UNAUTHENTICATED: "),
        "{}",
        anonymous.stderr
    );
    let allocated = run_env(
        &["allocate"],
        &[
            env[0],
            env[1],
            env[2],
            env[3],
            ("ROOM_ALLOCATOR_RANK", "1"),
            ("ROOM_ALLOCATOR_COUNT", "3"),
        ],
    );
    let lines = allocated.ok().json_lines();
    assert_eq!(lines.len(), 3);
    for line in lines {
        assert_eq!(
            (line["prefill_worker"].as_str(), line["dp_rank"].as_u64()),
            (Some("from-env"), Some(1))
        );
        assert_eq!(line["room"].as_u64().expect("room") % 2, 1);
    }
    // The env's dp_size is checked against the registered one.
    let stale = run_env(
        &["allocate", "--rank", "0"],
        &[env[0], env[1], env[2], ("ROOM_ALLOCATOR_DP_SIZE", "4")],
    );
    assert!(
        stale.failed().contains("FAILED_PRECONDITION"),
        "{}",
        stale.stderr
    );
    // Flags win over the environment.
    let flagged = run_env(
        &["deregister", "--worker", "from-env"],
        &[env[0], env[1], ("ROOM_ALLOCATOR_WORKER", "nobody")],
    );
    assert_eq!(flagged.ok().json()["prefill_worker"], "from-env");

    // ROOM_ALLOCATOR_TLS_CA: host:port then means https.
    let pki = Pki::new();
    let tls_dir = tempfile::tempdir().expect("tempdir");
    let tls_server = start(tls_dir.path(), &pki.server_args(false));
    let tls_addr = format!("localhost:{}", tls_server.grpc_addr.port());
    let ca = pki.path("ca.crt");
    let tls_env = [
        ("ROOM_ALLOCATOR_SERVER", tls_addr.as_str()),
        ("ROOM_ALLOCATOR_TLS_CA", ca.as_str()),
        ("ROOM_ALLOCATOR_WORKER", "tls-env"),
        ("ROOM_ALLOCATOR_DP_SIZE", "1"),
    ];
    run_env(&["register"], &tls_env).ok();
    assert_eq!(
        run_env(&["workers"], &tls_env).ok().json()["prefill_worker"],
        "tls-env"
    );
    let (cert, key) = (pki.path("client.crt"), pki.path("client.key"));
    let mtls_dir = tempfile::tempdir().expect("tempdir");
    let mtls_server = start(mtls_dir.path(), &pki.server_args(true));
    let mtls_addr = format!("localhost:{}", mtls_server.grpc_addr.port());
    run_env(
        &["register"],
        &[
            ("ROOM_ALLOCATOR_SERVER", mtls_addr.as_str()),
            ("ROOM_ALLOCATOR_TLS_CA", ca.as_str()),
            ("ROOM_ALLOCATOR_TLS_CERT", cert.as_str()),
            ("ROOM_ALLOCATOR_TLS_KEY", key.as_str()),
            ("ROOM_ALLOCATOR_WORKER", "mtls-env"),
            ("ROOM_ALLOCATOR_DP_SIZE", "1"),
        ],
    )
    .ok();
}

#[test]
fn serve_takes_its_settings_from_the_environment() {
    // ROOM_ALLOCATOR_CHECK_CONFIG=true checks and exits; it does not serve.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_dir = data.to_str().expect("utf-8");
    let listen = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir,
    ];
    let checked = run_env(&listen, &[("ROOM_ALLOCATOR_CHECK_CONFIG", "true")]);
    checked.ok();
    assert!(
        checked.stderr.contains("configuration accepted") && !checked.stderr.contains("listening"),
        "{}",
        checked.stderr
    );
    let bad = run_env(
        &listen,
        &[
            ("ROOM_ALLOCATOR_CHECK_CONFIG", "true"),
            ("ROOM_ALLOCATOR_AUTH_TOKEN_FILE", "/nonexistent/token"),
        ],
    );
    assert!(bad.failed().contains("--auth-token-file"), "{}", bad.stderr);

    // ROOM_ALLOCATOR_MAX_WORKERS and ROOM_ALLOCATOR_MIN_ROOM.
    let server = ServerProcess::try_start_with(&data, &[], |command| {
        command
            .env("ROOM_ALLOCATOR_MAX_WORKERS", "2")
            .env("ROOM_ALLOCATOR_MIN_ROOM", "1000000");
    })
    .unwrap_or_else(|failure| panic!("{}", failure.log));
    let addr = host_port(&server);
    for worker in ["a", "b"] {
        run(&[
            "register",
            "--server",
            &addr,
            "--worker",
            worker,
            "--dp-size",
            "4",
        ])
        .ok();
    }
    let third = run(&[
        "register",
        "--server",
        &addr,
        "--worker",
        "c",
        "--dp-size",
        "4",
    ]);
    let message = third.failed();
    assert!(
        message.starts_with("room-allocator: RESOURCE_EXHAUSTED: ")
            && message.contains("--max-workers"),
        "{message}"
    );
    let room = run(&[
        "allocate", "--server", &addr, "--worker", "a", "--rank", "3",
    ])
    .ok()
    .json()["room"]
        .as_u64()
        .expect("room");
    assert!(room >= 1_000_000 && room % 4 == 3, "{room}");
}

/// Flags whose variable is not `ROOM_ALLOCATOR_<FLAG>`: (command, flag,
/// variable). None.
const ENV_EXCEPTIONS: &[(&str, &str, &str)] = &[];

/// Every flag of every command but `bench` shows `[env: ROOM_ALLOCATOR_<FLAG>]`.
#[test]
fn help_shows_the_environment_variable_of_every_flag() {
    let commands: &[&[&str]] = &[
        &["serve"],
        &["register"],
        &["deregister"],
        &["allocate"],
        &["lease"],
        &["resolve"],
        &["workers"],
        &["health"],
        &["migrate"],
        &["retention"],
    ];
    for command in commands {
        let mut args = command.to_vec();
        args.push("--help");
        let help = run(&args);
        help.ok();
        let flags = flags_and_env(&help.stdout);
        assert!(
            flags.len() >= if command[0] == "serve" { 25 } else { 8 },
            "{command:?}: parsed only {flags:?}"
        );
        for (flag, env) in flags {
            // `retention --set` changes the fleet, and `migrate --allow-empty`
            // overrides a safety check for one run: never from the environment.
            if flag == "help"
                || flag == "version"
                || (command[0] == "retention" && flag == "set")
                || (command[0] == "migrate" && flag == "allow-empty")
            {
                continue;
            }
            let expected = ENV_EXCEPTIONS
                .iter()
                .find(|(c, f, _)| *c == command[0] && *f == flag)
                .map_or_else(
                    || format!("ROOM_ALLOCATOR_{}", flag.to_uppercase().replace('-', "_")),
                    |(_, _, env)| (*env).to_owned(),
                );
            assert_eq!(
                env.as_deref(),
                Some(expected.as_str()),
                "{command:?} --{flag}"
            );
        }
    }
    // bench's own flags have none (only the global --log-format).
    let bench = run(&["bench", "--help"]);
    let flags = flags_and_env(&bench.ok().stdout);
    assert!(flags.len() > 5, "{flags:?}");
    for (flag, env) in flags {
        if flag != "log-format" {
            assert_eq!(env, None, "bench --{flag}");
        }
    }
}

/// (flag, env variable) for each `--flag` of a clap help text.
fn flags_and_env(help: &str) -> Vec<(String, Option<String>)> {
    let mut flags: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let long = trimmed
            .strip_prefix("--")
            .or_else(|| trimmed.split_once(", --").map(|(_, rest)| rest))
            .filter(|_| trimmed.starts_with('-'));
        match long {
            Some(rest) => {
                let name = rest.split([' ', '=']).next().expect("a name").to_owned();
                flags.push((name, String::new()));
            }
            None => {
                if let Some((_, text)) = flags.last_mut() {
                    text.push_str(line);
                }
            }
        }
    }
    flags
        .into_iter()
        .map(|(flag, text)| {
            let env = text.split_once("[env: ").map(|(_, rest)| {
                rest.split(['=', ']'])
                    .next()
                    .expect("a variable")
                    .to_owned()
            });
            (flag, env)
        })
        .collect()
}

#[test]
fn check_config_names_the_flag_and_says_the_cause_once_as_a_start_would() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("blank");
    std::fs::write(&empty, "\n").expect("write");
    let empty = empty.to_str().expect("utf-8").to_owned();
    let (cert, other_key) = (pki.path("server.crt"), pki.path("other.key"));
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["--auth-token-file", "/nonexistent/token"],
            "--auth-token-file",
            "No such file",
        ),
        (
            vec!["--auth-token-file", &empty],
            "--auth-token-file",
            "empty",
        ),
        (
            vec!["--etcd-endpoints", "http://[::1"],
            "--etcd-endpoints",
            "http://[::1",
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &other_key],
            "--tls-key",
            "do not go together",
        ),
        (
            vec!["--min-room", "100", "--max-room", "10"],
            "--min-room",
            "above --max-room",
        ),
    ];
    for (i, (flags, flag, cause)) in cases.into_iter().enumerate() {
        let data = dir.path().join(format!("data-{i}"));
        let data_dir = data.to_str().expect("utf-8");
        let mut args = vec![
            "serve",
            "--check-config",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir,
        ];
        args.extend(&flags);
        let checked = run(&args);
        assert_eq!(checked.code, 1, "{flags:?}: {}", checked.stderr);
        let message = checked.failed();
        assert_eq!(message.lines().count(), 1, "{flags:?}: one line: {message}");
        assert!(message.starts_with("room-allocator: "), "{message}");
        assert!(message.contains(flag), "{flags:?} names {flag}: {message}");
        assert_eq!(
            message.matches(cause).count(),
            1,
            "{flags:?}: the cause once: {message}"
        );
        let mut parts = HashSet::new();
        for part in message.split(": ") {
            assert!(parts.insert(part), "{part:?} twice in {message}");
        }
        // A start refuses the same configuration with the same words.
        let started = ServerProcess::try_start(&data, &flags);
        let failure = match started {
            Ok(_) => panic!("{flags:?}: the server started"),
            Err(failure) => failure,
        };
        assert!(
            failure
                .log
                .contains(message.trim_start_matches("room-allocator: ")),
            "{flags:?}: check said {message:?}, the start said:\n{}",
            failure.log
        );
    }

    // A good configuration, with TLS and a token, is accepted.
    let token = dir.path().join("token");
    std::fs::write(&token, "t\n").expect("write");
    let data = dir.path().join("data-ok");
    let mut args = vec![
        "serve".to_owned(),
        "--check-config".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        data.to_str().expect("utf-8").into(),
        "--auth-token-file".into(),
        token.to_str().expect("utf-8").into(),
    ];
    args.extend(pki.server_args(true));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let accepted = run(&args);
    accepted.ok();
    assert!(
        accepted.stderr.contains("configuration accepted"),
        "{}",
        accepted.stderr
    );
}

/// Issue 16, item 11: on etcd `--max-workers` is checked by each replica
/// against what it knows, not fleet-wide; the help says so.
#[test]
fn max_workers_help_says_the_limit_is_per_replica_on_etcd() {
    let help = run(&["serve", "--help"]).ok().stdout.clone();
    let at = help
        .find("--max-workers")
        .expect("--max-workers in the help");
    let text: String = help[at..]
        .lines()
        .skip(1)
        .take_while(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        text.contains("per replica") && text.contains("not fleet-wide"),
        "--max-workers help: {text}"
    );
}

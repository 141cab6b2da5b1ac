//! The etcd store over mutual TLS whose certificates rotate while a replica
//! runs (issue 21 item 1): etcd requires client certificates, the CA is
//! rotated in the usual two phases, and the replica keeps writing to etcd
//! after the old CA is gone, because it rereads its etcd TLS files. The
//! certificates' expiry is exported as
//! `room_allocator_certificate_not_after_seconds{file}`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

use crate::common::{self, etcd_member_args, http_get, spawn_etcd, timed, ServerProcess};

/// A CA: its certificate (PEM) and what signs with it.
struct Ca {
    pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

fn ca() -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer =
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
    Ca {
        pem: issuer.pem(),
        issuer,
    }
}

/// A certificate for `names` signed by `ca`, valid until `not_after_year`.
fn leaf(ca: &Ca, names: &[&str], not_after_year: i32) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("params");
    params.not_after = rcgen::date_time_ymd(not_after_year, 1, 1);
    let cert = params.signed_by(&key, &ca.issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

/// Writes `text` to `path` through a rename, as the kubelet swaps a Secret.
fn replace(path: &Path, text: &str) {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, text).expect("write");
    std::fs::rename(&temp, path).expect("rename");
}

/// One etcd member on loopback that serves clients over TLS and requires
/// client certificates; restarted with other certificates on the same data.
struct TlsEtcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl TlsEtcd {
    fn new() -> Self {
        Self {
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            client_port: free_port(),
            peer_port: free_port(),
        }
    }

    fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.client_port)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    /// (Re)starts etcd presenting `server` and trusting `trusted` CAs.
    fn start(&mut self, server: &(String, String), trusted: &str) {
        self.stop();
        let cert = self.file("server.crt", &server.0);
        let key = self.file("server.key", &server.1);
        let ca = self.file("trusted-ca.crt", trusted);
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut args = etcd_member_args(
            "tls",
            &self.dir.path().join("data"),
            &client,
            &peer,
            &format!("tls={peer}"),
        );
        args.extend([
            format!("--cert-file={}", cert.display()),
            format!("--key-file={}", key.display()),
            "--client-cert-auth".to_owned(),
            format!("--trusted-ca-file={}", ca.display()),
        ]);
        let child = spawn_etcd(&args);
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            assert!(Instant::now() < deadline, "etcd did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        // A single member elects itself at once; give it that moment.
        std::thread::sleep(Duration::from_millis(1000));
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Registers `worker`, retrying for up to `limit` (etcd restarts meanwhile).
async fn register_within(
    server: &ServerProcess,
    worker: &str,
    limit: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < deadline {
        let mut client = server.client().await;
        match timed(
            client.register_worker(room_allocator::pb::RegisterWorkerRequest {
                prefill_worker: worker.into(),
                dp_size: 1,
            }),
        )
        .await
        {
            Ok(_) => return Ok(()),
            Err(status) => last = format!("{status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_keeps_reaching_etcd_after_its_client_certificate_and_the_ca_rotate() {
    if common::require_tool("etcd").is_none() {
        return;
    }
    let (old_ca, new_ca) = (ca(), ca());
    let mut etcd = TlsEtcd::new();
    etcd.start(&leaf(&old_ca, &["127.0.0.1"], 2040), &old_ca.pem);

    let files = tempfile::tempdir().expect("tempdir");
    let (ca_file, cert_file, key_file) = (
        files.path().join("ca.crt"),
        files.path().join("tls.crt"),
        files.path().join("tls.key"),
    );
    let client = leaf(&old_ca, &["room-allocator"], 2040);
    replace(&ca_file, &old_ca.pem);
    replace(&cert_file, &client.0);
    replace(&key_file, &client.1);
    let path = |p: &PathBuf| p.to_str().expect("utf-8").to_owned();
    let endpoint = etcd.endpoint();
    let args = [
        "--etcd-endpoints".to_owned(),
        endpoint,
        "--etcd-ca".into(),
        path(&ca_file),
        "--etcd-cert".into(),
        path(&cert_file),
        "--etcd-key".into(),
        path(&key_file),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = ServerProcess::start(&files.path().join("data"), &args);
    register_within(&server, "before", Duration::from_secs(10))
        .await
        .expect("register over mutual TLS");
    let metrics = http_get(server.metrics_addr, "/metrics");
    assert_eq!(
        sample(
            &metrics,
            "room_allocator_certificate_not_after_seconds{file=\"etcd_client\"}"
        ),
        Some(2_208_988_800.0),
        "2040-01-01: {metrics}"
    );
    assert!(
        sample(
            &metrics,
            "room_allocator_certificate_not_after_seconds{file=\"etcd_ca\"}"
        )
        .is_some(),
        "{metrics}"
    );

    // Phase 1: etcd trusts both CAs (same server certificate).
    let bundle = format!("{}{}", old_ca.pem, new_ca.pem);
    etcd.start(&leaf(&old_ca, &["127.0.0.1"], 2040), &bundle);
    // Phase 2: the replica's Secret gets a client certificate from the new
    // CA and trusts both; it rereads them within seconds.
    let client = leaf(&new_ca, &["room-allocator"], 2031);
    replace(&ca_file, &bundle);
    replace(&key_file, &client.1);
    replace(&cert_file, &client.0);
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Phase 3: the old CA is gone from etcd: a new server certificate, only
    // the new CA trusted. A replica still dialling with the old files fails
    // every handshake from here on.
    etcd.start(&leaf(&new_ca, &["127.0.0.1"], 2040), &new_ca.pem);
    register_within(&server, "after", Duration::from_secs(20))
        .await
        .expect("the replica reaches etcd with the rotated certificates");
    let metrics = http_get(server.metrics_addr, "/metrics");
    assert_eq!(
        sample(
            &metrics,
            "room_allocator_certificate_not_after_seconds{file=\"etcd_client\"}"
        ),
        Some(1_924_992_000.0),
        "2031-01-01, the rotated certificate: {metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "room_allocator_reload_last_success{file=\"etcd_tls\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

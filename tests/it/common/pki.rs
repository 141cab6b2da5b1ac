//! Certificates for TLS tests, made with rcgen in a temp dir: a CA, a server
//! certificate for `localhost` and `127.0.0.1`, a client certificate, and a
//! key that belongs to neither (for mismatched pairs). Keys are P-256 in
//! PKCS#8 PEM.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Writes `ca.crt`, `server.crt`/`server.key`, `client.crt`/`client.key`
    /// and `other.key`.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca =
            CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
        let write =
            |name: &str, text: String| std::fs::write(dir.path().join(name), text).expect("write");
        write("ca.crt", ca.pem());
        for (name, sans) in [
            (
                "server",
                vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            ),
            ("client", vec!["router-0".to_owned()]),
        ] {
            let key = KeyPair::generate().expect("key");
            let cert = CertificateParams::new(sans)
                .expect("params")
                .signed_by(&key, &ca)
                .expect("sign");
            write(&format!("{name}.crt"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        write(
            "other.key",
            KeyPair::generate().expect("key").serialize_pem(),
        );
        Self { dir }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The file's path as a flag value.
    pub fn path(&self, name: &str) -> String {
        self.file(name)
            .to_str()
            .expect("utf-8 temp path")
            .to_owned()
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.file(name)).expect("read PEM")
    }

    /// `serve` flags for TLS, and with `mutual` for required client certificates.
    pub fn server_args(&self, mutual: bool) -> Vec<String> {
        let mut args = vec![
            "--tls-cert".to_owned(),
            self.path("server.crt"),
            "--tls-key".to_owned(),
            self.path("server.key"),
        ];
        if mutual {
            args.extend(["--tls-client-ca".to_owned(), self.path("ca.crt")]);
        }
        args
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

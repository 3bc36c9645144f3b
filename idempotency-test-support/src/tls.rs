//! A `redis-server` that speaks only TLS, with a throwaway CA.

use std::path::Path;

use crate::process::{ServerProcess, binary, free_port, run_tool};
use crate::redis_server::redis_args;

/// Makes a test CA and a server certificate for `127.0.0.1`/`localhost`
/// in `dir` with the `openssl` command: `ca.crt`, `server.crt`,
/// `server.key`, and a second, unrelated `other-ca.crt`.
fn make_certificates(dir: &Path) {
    let openssl = binary("openssl", "openssl");
    let run = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|&a| a.to_owned()).collect();
        run_tool(&openssl, &args, Some(dir));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "other-ca"] {
        let (key, crt) = (format!("{ca}.key"), format!("{ca}.crt"));
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "2",
            "-subj",
            "/CN=idempotency test CA",
        ]);
        run(&args);
    }
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&args);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("write san.ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
}

/// A `redis-server` that speaks only TLS, with a certificate from a test CA
/// made for it.
#[derive(Debug)]
pub struct TlsRedisServer(ServerProcess);

impl TlsRedisServer {
    /// Makes the certificates and starts the server; it is ready once its
    /// port accepts connections (the TLS handshake is the client's job).
    pub fn start() -> Self {
        let args = |port: u16, dir: &Path| {
            make_certificates(dir);
            let mut args = redis_args(port, dir);
            // The plain port is off; the TLS port is the one we picked.
            args[1] = "0".into();
            let file = |name: &str| dir.join(name).into_os_string();
            args.extend([
                "--tls-port".into(),
                port.to_string().into(),
                "--tls-cert-file".into(),
                file("server.crt"),
                "--tls-key-file".into(),
                file("server.key"),
                "--tls-ca-cert-file".into(),
                file("ca.crt"),
                "--tls-auth-clients".into(),
                "no".into(),
            ]);
            args
        };
        Self(ServerProcess::start(
            "redis-server",
            5,
            free_port,
            &args,
            |_| true,
        ))
    }

    /// `rediss://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.0.port)
    }

    /// The PEM of the CA that signed the server's certificate.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.0.dir.join("ca.crt")).expect("read ca.crt")
    }

    /// The PEM of a CA that signed nothing here.
    pub fn other_ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.0.dir.join("other-ca.crt")).expect("read other-ca.crt")
    }

    /// The loopback port it listens on (TLS only).
    pub fn port(&self) -> u16 {
        self.0.port
    }
}

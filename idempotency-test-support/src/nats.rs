//! A `nats-server` with JetStream on loopback.

use std::ffi::OsString;
use std::io::Read;
use std::net::TcpStream;
use std::path::Path;

use crate::process::{ServerProcess, free_port};

/// A `nats-server -js` on a free loopback port with a temporary store
/// directory, killed when dropped.
#[derive(Debug)]
pub struct NatsServer(ServerProcess);

impl NatsServer {
    /// Starts the server and waits until it greets with `INFO`.
    pub fn start() -> Self {
        let args = |port: u16, dir: &Path| {
            let mut args: Vec<OsString> =
                ["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"]
                    .map(Into::into)
                    .to_vec();
            args.push(dir.into());
            args
        };
        let ready = |stream: &mut TcpStream| {
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).is_ok() && &buf == b"INFO"
        };
        Self(ServerProcess::start(
            "nats-server",
            5,
            free_port,
            &args,
            ready,
        ))
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.0.port)
    }
}

//! One `redis-server` (or `valkey-server`) on a free loopback port.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

use crate::ServerKind;
use crate::process::{ServerProcess, binary, free_port, run_tool};

/// A `redis-server` (or `valkey-server`, see [`ServerKind`]) on a free
/// loopback port (no persistence), killed when dropped.
#[derive(Debug)]
pub struct RedisServer(ServerProcess, ServerKind);

/// The arguments every server here starts with: loopback, no persistence,
/// files in `dir`.
pub(crate) fn redis_args(port: u16, dir: &Path) -> Vec<OsString> {
    let port = port.to_string();
    let mut args: Vec<OsString> = [
        "--port",
        port.as_str(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
    ]
    .map(Into::into)
    .to_vec();
    args.push(dir.into());
    args
}

/// Ready: answers `PING` with `+PONG`.
pub(crate) fn redis_ready(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut buf).is_ok()
        && &buf == b"+PONG\r\n"
}

/// Ready: answers `PING` at all (`-NOAUTH` from a server with a password).
fn redis_answers(stream: &mut TcpStream) -> bool {
    let mut first = [0u8; 1];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut first).is_ok()
        && matches!(&first, b"+" | b"-")
}

/// Runs `redis-cli` with `args`, returning its stdout; panics on failure.
pub(crate) fn redis_cli(args: &[String]) -> String {
    run_tool(&binary("redis-cli", "redis-tools"), args, None)
}

/// `redis-cli -p <port> <command...>`.
pub(crate) fn redis_cli_at(port: u16, command: &[&str]) -> String {
    let mut args = vec!["-p".to_owned(), port.to_string()];
    args.extend(command.iter().map(|&a| a.to_owned()));
    redis_cli(&args)
}

impl RedisServer {
    /// Starts a fresh server and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_kind(ServerKind::Redis)
    }

    /// Starts a fresh server of `kind` and waits until it answers PING.
    pub fn start_kind(kind: ServerKind) -> Self {
        Self(kind.start(5, free_port, &redis_args, redis_ready), kind)
    }

    /// Starts a fresh server with extra command-line settings, e.g.
    /// `["--requirepass", "secret"]`; it is ready once it answers at all
    /// (a server with a password answers PING with `-NOAUTH`).
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_kind_with(ServerKind::Redis, extra)
    }

    /// [`start_with`](Self::start_with) on a server of `kind`.
    pub fn start_kind_with(kind: ServerKind, extra: &[&str]) -> Self {
        let extra: Vec<OsString> = extra.iter().map(Into::into).collect();
        let args = move |port, dir: &Path| {
            let mut args = redis_args(port, dir);
            args.extend(extra.iter().cloned());
            args
        };
        Self(kind.start(5, free_port, &args, redis_answers), kind)
    }

    /// Starts a server on `port` (e.g. to restart one that was killed).
    pub fn start_on(port: u16) -> Self {
        Self::start_kind_on(ServerKind::Redis, port)
    }

    /// [`start_on`](Self::start_on) for a server of `kind`.
    pub fn start_kind_on(kind: ServerKind, port: u16) -> Self {
        Self(kind.start(50, || port, &redis_args, redis_ready), kind)
    }

    /// Which server this is.
    pub fn kind(&self) -> ServerKind {
        self.1
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.0.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.0.port)
    }

    /// A plain client connection for inspecting what the store wrote.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        self.0.kill();
    }
}

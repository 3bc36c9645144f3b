//! Test support: real servers started per test, and the store conformance suite.
#![allow(dead_code, unreachable_pub)]

pub mod conformance;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process on a free loopback port with its own temporary
/// directory, killed (and the directory removed) when dropped.
struct ServerProcess {
    child: Child,
    port: u16,
    dir: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

fn binary(name: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{name} was not found on PATH. These tests run against a real server: install it \
             with `apt-get install {package}`, or run `bash scripts/check.sh`, which installs \
             it when missing."
        )
    })
}

impl ServerProcess {
    /// Starts `name` with `args(port, dir)` on the ports `port()` gives, up to
    /// `tries` times, until `ready` says a fresh connection answers.
    fn start(
        name: &str,
        tries: usize,
        mut port: impl FnMut() -> u16,
        args: impl Fn(u16, &std::path::Path) -> Vec<std::ffi::OsString>,
        ready: fn(&mut TcpStream) -> bool,
    ) -> Self {
        let binary = binary(name, name);
        let mut last_error = String::new();
        for attempt in 0..tries {
            let port = port();
            let dir = std::env::temp_dir().join(format!(
                "idem-{name}-{}-{port}-{attempt}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let child = Command::new(&binary)
                .args(args(port, &dir))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("could not start {}: {e}", binary.display()));
            let mut server = Self { child, port, dir };
            match server.wait_ready(ready) {
                Ok(()) => return server,
                Err(e) => {
                    last_error = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        panic!("{name} did not start: {last_error}");
    }

    fn wait_ready(&mut self, ready: fn(&mut TcpStream) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}"));
            }
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                if ready(&mut stream) {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("timed out waiting for it to answer".into())
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-server` on a free loopback port (no persistence), killed when dropped.
pub struct RedisServer(ServerProcess);

fn redis_args(port: u16, dir: &std::path::Path) -> Vec<std::ffi::OsString> {
    let port = port.to_string();
    let mut args: Vec<std::ffi::OsString> = [
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

fn redis_ready(stream: &mut TcpStream) -> bool {
    use std::io::{Read, Write};
    let mut buf = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut buf).is_ok()
        && &buf == b"+PONG\r\n"
}

fn redis_answers(stream: &mut TcpStream) -> bool {
    use std::io::{Read, Write};
    let mut first = [0u8; 1];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut first).is_ok()
        && matches!(&first, b"+" | b"-")
}

impl RedisServer {
    /// Starts a fresh server and waits until it answers PING.
    pub fn start() -> Self {
        Self(ServerProcess::start(
            "redis-server",
            5,
            free_port,
            redis_args,
            redis_ready,
        ))
    }

    /// Starts a fresh server with extra command-line settings, e.g.
    /// `["--requirepass", "secret"]`; it is ready once it answers at all
    /// (a server with a password answers PING with `-NOAUTH`).
    pub fn start_with(extra: &[&str]) -> Self {
        let extra: Vec<std::ffi::OsString> = extra.iter().map(Into::into).collect();
        Self(ServerProcess::start(
            "redis-server",
            5,
            free_port,
            move |port, dir| {
                let mut args = redis_args(port, dir);
                args.extend(extra.iter().cloned());
                args
            },
            redis_answers,
        ))
    }

    /// Starts a server on `port` (e.g. to restart one that was killed).
    pub fn start_on(port: u16) -> Self {
        Self(ServerProcess::start(
            "redis-server",
            50,
            || port,
            redis_args,
            redis_ready,
        ))
    }

    pub fn port(&self) -> u16 {
        self.0.port
    }

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

/// A `nats-server -js` on a free loopback port with a temporary store
/// directory, killed when dropped.
pub struct NatsServer(ServerProcess);

impl NatsServer {
    pub fn start() -> Self {
        let args = |port: u16, dir: &std::path::Path| {
            let mut args: Vec<std::ffi::OsString> =
                ["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"]
                    .map(Into::into)
                    .to_vec();
            args.push(dir.into());
            args
        };
        let ready = |stream: &mut TcpStream| {
            use std::io::Read;
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).is_ok() && &buf == b"INFO"
        };
        Self(ServerProcess::start(
            "nats-server",
            5,
            free_port,
            args,
            ready,
        ))
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.0.port)
    }
}

/// A store wrapper for tests: counts the calls that reach the store, and can
/// make `claim` fail with `StoreUnavailable` *after* applying it, as a
/// timed-out command that still landed does.
#[derive(Debug)]
pub struct Instrumented {
    pub inner: std::sync::Arc<dyn idempotency::IdempotencyStore>,
    pub calls: std::sync::atomic::AtomicUsize,
    pub lose_claim_replies: std::sync::atomic::AtomicBool,
}

impl Instrumented {
    pub fn new(inner: std::sync::Arc<dyn idempotency::IdempotencyStore>) -> Self {
        Self {
            inner,
            calls: Default::default(),
            lose_claim_replies: Default::default(),
        }
    }

    fn count(&self) {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl idempotency::IdempotencyStore for Instrumented {
    fn name(&self) -> &'static str {
        "instrumented"
    }
    async fn claim(
        &self,
        request: &idempotency::ClaimRequest<'_>,
    ) -> idempotency::Result<idempotency::ClaimOutcome> {
        self.count();
        let outcome = self.inner.claim(request).await?;
        if self
            .lose_claim_replies
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(idempotency::IdempotencyError::store_unavailable(
                "instrumented",
                "the reply was lost after the claim was applied",
            ));
        }
        Ok(outcome)
    }
    async fn renew(
        &self,
        lease: &idempotency::Lease,
        d: Duration,
    ) -> idempotency::Result<idempotency::Lease> {
        self.count();
        self.inner.renew(lease, d).await
    }
    async fn complete(
        &self,
        lease: &idempotency::Lease,
        result: &serde_json::Value,
        ttl: Duration,
    ) -> idempotency::Result<()> {
        self.count();
        self.inner.complete(lease, result, ttl).await
    }
    async fn fail(
        &self,
        lease: &idempotency::Lease,
        error: &str,
        ttl: Duration,
    ) -> idempotency::Result<()> {
        self.count();
        self.inner.fail(lease, error, ttl).await
    }
    async fn get(&self, key: &str) -> idempotency::Result<Option<idempotency::IdempotencyRecord>> {
        self.count();
        self.inner.get(key).await
    }
    async fn delete(&self, key: &str) -> idempotency::Result<bool> {
        self.count();
        self.inner.delete(key).await
    }
    async fn health(&self) -> idempotency::Result<()> {
        self.count();
        self.inner.health().await
    }
    async fn mark(&self, keys: &[&str], ttl: Duration) -> idempotency::Result<Vec<bool>> {
        self.count();
        self.inner.mark(keys, ttl).await
    }
    async fn contains(&self, keys: &[&str]) -> idempotency::Result<Vec<bool>> {
        self.count();
        self.inner.contains(keys).await
    }
}

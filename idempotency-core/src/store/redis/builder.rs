//! [`RedisStoreBuilder`]: the connection's options, and the checks that
//! run at connect.

use std::sync::Arc;
use std::time::Duration;

use super::conn::{Connections, OpenError, Settings};
use super::retry::refused_credentials;
use super::scripts::Scripts;
use super::{RedisStore, STORE};
use crate::error::{IdempotencyError, Result};

impl RedisStore {
    /// Connects to `url` with the default timeouts; the scheme picks the
    /// topology (see [`RedisStore`]).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::builder(url).connect().await
    }

    /// A builder for `url`.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            max_retries: 2,
            allow_eviction: false,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

/// Builder of [`RedisStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisStoreBuilder {
    url: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    max_retries: u32,
    allow_eviction: bool,
    #[cfg(feature = "tls")]
    tls: Option<super::conn::TlsMaterial>,
}

impl RedisStoreBuilder {
    /// How long one connection attempt may take. Default 1s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one command may wait for its answer. Default 1s.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How many times an operation is retried after a timeout or a dropped
    /// connection (with backoff and jitter). Default 2. Retrying is safe:
    /// every script recognises its own earlier, applied try by the fencing
    /// token.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// Accepts a Redis whose `maxmemory-policy` may evict records (anything
    /// but `noeviction`; the `volatile-*` policies too, since every record
    /// has a TTL). Default `false`: [`connect`](Self::connect) refuses such a
    /// Redis with [`Config`](IdempotencyError::Config) naming the policy.
    ///
    /// An evicted record is a forgotten event: its next delivery runs the
    /// handler again. With this on, the store still logs the policy at
    /// `ERROR` on connect and on every
    /// [`health_check`](crate::IdempotencyChecker::health_check).
    pub fn allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }

    /// Connects and returns the store, after checks that fail here
    /// rather than on the first event:
    ///
    /// - Redis answers: else [`StoreUnavailable`](IdempotencyError::StoreUnavailable),
    ///   fast;
    /// - the credentials are accepted: else [`Config`](IdempotencyError::Config);
    /// - the user may read `INFO`: else
    ///   [`StoreRefused`](IdempotencyError::StoreRefused) with
    ///   [`PermissionDenied`](crate::error::StoreRefusal::PermissionDenied) (see
    ///   [`RedisStore::ACL_COMMANDS`]);
    /// - no node (every master of a cluster) may evict records
    ///   (`maxmemory-policy noeviction`, read from `INFO memory`): else
    ///   [`Config`](IdempotencyError::Config) naming the policy, unless
    ///   [`allow_eviction`](Self::allow_eviction) is on.
    ///
    /// It also finds out whether the server has `SET ... IFEQ` (Valkey 8.1
    /// and later, Redis 8.4 and later) by trying it on a scratch key
    /// (`idempotency:capability-probe`, never created): completions then
    /// take one plain `SET ... IFEQ`, else the finish script. When the probe
    /// cannot tell (an ACL user whose key patterns exclude the scratch key),
    /// the first completion decides.
    pub async fn connect(self) -> Result<RedisStore> {
        let settings = Settings {
            connect_timeout: self.connect_timeout,
            response_timeout: self.response_timeout,
            #[cfg(feature = "tls")]
            certificates: self.tls,
        };
        let connected = async {
            let conns = Connections::open(&self.url, settings).await?;
            // A server that wants a password lets the connection in and
            // refuses commands: ask once, so bad credentials fail here.
            let _: String = redis::cmd("PING")
                .query_async(&mut conns.get())
                .await
                .map_err(OpenError::Redis)?;
            Ok::<_, OpenError>(conns)
        };
        let conns = tokio::time::timeout(self.connect_timeout * 2, connected)
            .await
            .map_err(|elapsed| IdempotencyError::store_unavailable(STORE, elapsed))?
            .map_err(|e| match e {
                OpenError::Config(e) => e,
                OpenError::Redis(e) if refused_credentials(&e) => IdempotencyError::config(
                    "url",
                    format!("Redis refused the credentials (user and password in the URL): {e}"),
                ),
                OpenError::Redis(e) => IdempotencyError::store_unavailable(STORE, e),
            })?;
        let store = RedisStore {
            conns,
            scripts: Arc::new(Scripts::new()),
            max_retries: self.max_retries,
            op_timeout: self.response_timeout * (self.max_retries + 1)
                + Duration::from_millis(200) * self.max_retries,
            allow_eviction: self.allow_eviction,
            ifeq: Arc::default(),
        };
        store.check_eviction("connect").await?;
        store.probe_ifeq().await;
        Ok(store)
    }

    /// Trusts the CA certificate `pem` (PEM) for `rediss` connections,
    /// instead of the system's roots. Needs the `tls` feature.
    #[cfg(feature = "tls")]
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.get_or_insert_with(Default::default).root = Some(pem.into());
        self
    }

    /// Presents this client certificate and key (both PEM) on `rediss`
    /// connections, for servers that require mutual TLS
    /// (`tls-auth-clients yes`). Needs the `tls` feature.
    #[cfg(feature = "tls")]
    pub fn tls_client_certificate(
        mut self,
        certificate_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.get_or_insert_with(Default::default).client =
            Some((certificate_pem.into(), key_pem.into()));
        self
    }
}

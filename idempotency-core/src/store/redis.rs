//! [`RedisStore`]: the shared store for fleets of workers.
//!
//! # Schema
//! - Key: `{prefix}{idempotency_key}` (prefix default `idempotency:events:`; with
//!   key hashing on, the key part is the SHA-256 hex digest of the raw key).
//! - Value: one JSON document, the serialized [`IdempotencyRecord`]. Timestamps
//!   are integer milliseconds since the Unix epoch from Redis `TIME`.
//! - Expiry: the key's own TTL (`PX`): `max(ttl, lease)` while `PROCESSING`,
//!   `ttl` from the moment it becomes `COMPLETED` or `FAILED`.
//!
//! A claim is first tried as one plain `SET key doc NX PX max(ttl, lease) GET`
//! (Redis 7.0 or later): an absent key is claimed, and a COMPLETED record
//! comes back as a duplicate, each in one command with no script. Since only
//! a script can read the store's clock, that claim document holds its lease
//! relative to the key's expiry (`lease_ms`, and the `claim_px` it was set
//! with: claimed at `expiry - claim_px`); every script settles it into
//! `first_seen_at` and `lease_expires_at` when it reads the record. A
//! `COMPLETED` document carries `ttl_ms`, so the replay knows when it
//! expires. Every other case (a live or expired lease, a FAILED record)
//! goes to the claim script.
//!
//! Claim, renew, complete, fail and read are Lua scripts run with `EVALSHA`
//! (loaded once, reloaded transparently after a `SCRIPT FLUSH`): one round
//! trip each, every one touching a single key, so Redis Cluster works
//! unchanged. Where the server has `SET ... IFEQ` (Valkey 8.1 and later,
//! Redis 8.4 and later; found at connect), a completion is one plain
//! `SET ... IFEQ` instead (see the `ifeq` module).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::{RedisError, Script, Value};

use super::{ClaimRequest, IdempotencyStore};
use crate::error::{IdempotencyError, Result, StoreRefusal};
use crate::record::{
    ClaimDecision, ClaimOutcome, IdempotencyRecord, Lease, ProcessingStatus, RecordView,
    decide_claim,
};

mod conn;
mod dedup;
mod ifeq;
mod ops;
use conn::{Conn, Connections, OpenError, Settings};

const STORE: &str = "redis";

/// Shared by every script: the store's clock and the record loader, which
/// refuses exactly what the reader (serde's [`IdempotencyRecord`]) refuses,
/// so no script claims, renews or overwrites a value `get` calls corrupt.
const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- a field's value, with JSON null (written by older versions) read as absent
local function val(x) if x == cjson.null then return nil end return x end
local function int_in(x, lo, hi)
  return type(x) == 'number' and x == math.floor(x) and x >= lo and x <= hi
end
-- Why `rec` is not a record, as the reader sees it, or nil. Optional strings
-- and times may be null; `attempts` may not; timestamps are whole
-- milliseconds in chrono's range; unknown fields are ignored.
local function invalid(rec)
  local st = rec.status
  if st ~= 'PROCESSING' and st ~= 'COMPLETED' and st ~= 'FAILED' then
    return 'unknown status'
  end
  if rec.idempotency_key ~= nil and type(rec.idempotency_key) ~= 'string' then
    return '`idempotency_key` is not a string'
  end
  for _, f in ipairs({'event_id', 'event_type', 'error', 'lease_token', 'fingerprint'}) do
    local v = val(rec[f])
    if v ~= nil and type(v) ~= 'string' then return '`' .. f .. '` is not a string' end
  end
  for _, f in ipairs({'first_seen_at', 'completed_at', 'lease_expires_at'}) do
    local v = val(rec[f])
    if v ~= nil and not int_in(v, -8334601228800000, 8210266876799999) then
      return '`' .. f .. '` is not a time in milliseconds'
    end
  end
  if rec.attempts ~= nil and not int_in(rec.attempts, 0, 4294967295) then
    return '`attempts` is not a count'
  end
  for _, f in ipairs({'lease_ms', 'claim_px', 'ttl_ms'}) do
    if rec[f] ~= nil and not int_in(rec[f], 0, 8210266876799999) then
      return '`' .. f .. '` is not a duration in milliseconds'
    end
  end
  return nil
end
-- returns raw, record | raw, nil (absent) | reason, false (not a record);
-- `raw` may be passed in when the caller already read the key
local function load(key, raw)
  if raw == nil then raw = redis.pcall('GET', key) end
  if type(raw) == 'table' and raw.err then return raw.err, false end
  if not raw then return nil, nil end
  local ok, rec = pcall(cjson.decode, raw)
  if not ok then return 'value is not JSON', false end
  if type(rec) ~= 'table' then return 'value is not a JSON object', false end
  local bad = invalid(rec)
  if bad then return bad, false end
  -- A claim written by the client's plain `SET NX` keeps its times relative
  -- to the key's expiry: it was claimed at (expiry - claim_px), by the
  -- store's clock. Settle them into absolute fields (a key without expiry
  -- counts as claimed a whole lease ago).
  -- PEXPIRETIME is absolute, so every read settles the same times (PTTL
  -- plus TIME could drift by a millisecond between two reads).
  if rec.claim_px ~= nil then
    local lease_ms = tonumber(rec.lease_ms) or 0
    local expires = redis.call('PEXPIRETIME', key)
    local at = now_ms() - lease_ms
    if expires >= 0 then at = expires - (tonumber(rec.claim_px) or 0) end
    rec.first_seen_at, rec.lease_expires_at = at, at + lease_ms
    rec.lease_ms, rec.claim_px = nil, nil
    raw = cjson.encode(rec)
  end
  return raw, rec
end
-- when the key expires, in ms since the epoch, or -1 when it does not
local function expiry(key)
  local expires = redis.call('PEXPIRETIME', key)
  if expires < 0 then return -1 end
  return expires
end
local function opt(s) if s == '' then return nil end return s end
-- an integer as JSON text (never `1e+15` or `3.0`)
local function int(n) return string.format('%d', n) end
"#;

/// KEYS[1] key; ARGV token, lease_ms, ttl_ms, fingerprint, members.
/// `acquired` replies end with the document now stored (for `SET ... IFEQ`).
///
/// `members` is the record's descriptive fields (`idempotency_key`,
/// `event_id`, `event_type`) already encoded by the client as JSON object
/// members, each followed by a comma (or empty): the script only
/// concatenates, so writing a claim costs no `cjson` call.
const CLAIM: &str = r#"
local key, token = KEYS[1], ARGV[1]
local lease_ms, ttl_ms, fp = tonumber(ARGV[2]), tonumber(ARGV[3]), opt(ARGV[4])
local got = redis.pcall('GET', key)
-- The hot duplicate path: a COMPLETED record whose status is its first
-- member (as every completion writes it), so the status is the top-level
-- one, and no fingerprint to compare: answer without decoding. The client
-- parses and checks the record.
if not fp and type(got) == 'string' and string.sub(got, 1, 22) == '{"status":"COMPLETED",' then
  return {'duplicate', got, expiry(key)}
end
local now = now_ms()
local attempts, first_seen, taken_over = 0, now, 0
if got then
  local raw, rec = load(key, got)
  if rec == false then return {'corrupt', raw} end
  local theirs = val(rec.fingerprint)
  if fp and type(theirs) == 'string' and theirs ~= fp then return {'mismatch'} end
  if rec.status == 'COMPLETED' then return {'duplicate', raw, expiry(key)} end
  if rec.status == 'PROCESSING' then
    if rec.lease_token == token then
      return {'acquired', tonumber(rec.attempts) or 1, tonumber(rec.lease_expires_at) or now, 0, got}
    end
    if type(rec.lease_expires_at) == 'number' and rec.lease_expires_at > now then
      return {'in_progress', raw, expiry(key)}
    end
    taken_over = 1
  end
  attempts = tonumber(rec.attempts) or 0
  first_seen = tonumber(val(rec.first_seen_at)) or now
  if not fp and type(theirs) == 'string' then fp = theirs end
end
local expires = now + lease_ms
local doc = '{' .. ARGV[5] .. '"status":"PROCESSING","first_seen_at":' .. int(first_seen)
  .. ',"attempts":' .. int(attempts + 1) .. ',"lease_token":' .. cjson.encode(token)
  .. ',"lease_expires_at":' .. int(expires)
if fp then doc = doc .. ',"fingerprint":' .. cjson.encode(fp) end
doc = doc .. '}'
redis.call('SET', key, doc, 'PX', math.max(ttl_ms, lease_ms))
-- the document as written: a completion by `SET ... IFEQ` compares it
return {'acquired', attempts + 1, expires, taken_over, doc}
"#;

/// KEYS[1] key; ARGV token, lease_ms
const RENEW: &str = r#"
local raw, rec = load(KEYS[1])
if rec == false then return {'corrupt', raw} end
if not rec or rec.lease_token ~= ARGV[1] or rec.status ~= 'PROCESSING' then return {'lost'} end
local lease_ms = tonumber(ARGV[2])
rec.lease_expires_at = now_ms() + lease_ms
local pttl = redis.call('PTTL', KEYS[1])
local doc = cjson.encode(rec)
redis.call('SET', KEYS[1], doc, 'PX', math.max(pttl, lease_ms))
-- the document as written: a completion by `SET ... IFEQ` compares it
return {'ok', rec.lease_expires_at, doc}
"#;

/// KEYS[1] key; ARGV token, ttl_ms, status ('COMPLETED' | 'FAILED'), payload
/// (the result's JSON text, or the error text), retried ('1' when an earlier
/// try of this same call may have been applied).
///
/// A `COMPLETED` record keeps only `status`, `completed_at`, `attempts`
/// (left out when 1), `ttl_ms` (so a replay knows when the record expires
/// without asking), `fingerprint` and `result`: no token. So a second
/// `complete` by the same holder is recognised only when it is flagged as a
/// retry.
const FINISH_HOT: &str = r#"
local token, target = ARGV[1], ARGV[3]
-- An empty result payload completes without a result (it could not be stored).
local function result_field(json)
  if json == '' then return '' end
  return ',"result":' .. json
end
-- The hot path, ahead of the prelude so that a call taking it does not pay
-- for defining the helpers: completing a PROCESSING record we hold, with no
-- fingerprint, written by a claim (the client's `SET NX` or the claim
-- script) and untouched since. It is recognised by its exact shape: the
-- descriptive members in their order, as plain strings, then the status, the
-- attempts, our token and the lease, and nothing else. So every field is one
-- the reader accepts, and the status is the top-level one. Anything else
-- (renewed, fingerprinted, escaped text, altered) takes the decoding path,
-- which validates; the COMPLETED record is written without decoding.
if target == 'COMPLETED' and not string.find(token, '[%c"\\]') then
  local raw = redis.pcall('GET', KEYS[1])
  if type(raw) == 'string' and string.byte(raw, 1) == 123 then
    local pos, rank = 2, 0
    while pos do
      local name, after = string.match(raw, '^"([a-z_]+)":"[^%c"\\]*",()', pos)
      if not name or name == 'status' then break end
      local r = (name == 'idempotency_key' and 1) or (name == 'event_id' and 2)
        or (name == 'event_type' and 3) or 0
      if r <= rank then pos = nil else pos, rank = after, r end
    end
    local attempts
    if pos then
      local tok = string.gsub(token, '%p', '%%%0')
      attempts = string.match(raw, '^"status":"PROCESSING","attempts":(%d+),"lease_token":"'
          .. tok .. '","lease_ms":%d+,"claim_px":%d+}$', pos)
        or string.match(raw, '^"status":"PROCESSING","first_seen_at":%d+,"attempts":(%d+),"lease_token":"'
          .. tok .. '","lease_expires_at":%d+}$', pos)
    end
    if attempts and #attempts <= 9 and string.byte(attempts, 1) ~= 48 then
      if attempts == '1' then attempts = '' else attempts = ',"attempts":' .. attempts end
      local t = redis.call('TIME')
      redis.call('SET', KEYS[1], '{"status":"COMPLETED","completed_at":'
        .. string.format('%s%03d', t[1], math.floor(tonumber(t[2]) / 1000))
        .. attempts .. ',"ttl_ms":' .. ARGV[2] .. result_field(ARGV[4]) .. '}',
        'PX', tonumber(ARGV[2]))
      return redis.status_reply('OK')
    end
  end
end
"#;

/// The rest of the finish script, after the prelude.
const FINISH: &str = r#"
local raw, rec = load(KEYS[1])
if rec == false then return {'corrupt', raw} end
if not rec then return {'lost'} end
local held = rec.lease_token == token
if rec.status ~= 'PROCESSING' or not held then
  if rec.status == target and (held or (ARGV[5] == '1' and val(rec.lease_token) == nil)) then
    return redis.status_reply('OK')
  end
  return {'lost'}
end
local doc
if target == 'COMPLETED' then
  -- The status first (the claim script's duplicate test reads it there),
  -- and the result spliced in verbatim as the last field, so Lua never
  -- re-encodes, and never rounds, the handler's numbers.
  local attempts = tonumber(rec.attempts) or 1
  doc = '{"status":"COMPLETED","completed_at":' .. int(now_ms())
  if attempts ~= 1 then doc = doc .. ',"attempts":' .. int(attempts) end
  doc = doc .. ',"ttl_ms":' .. int(tonumber(ARGV[2]))
  local fp = val(rec.fingerprint)
  if fp then doc = doc .. ',"fingerprint":' .. cjson.encode(fp) end
  doc = doc .. result_field(ARGV[4]) .. '}'
else
  rec.status = 'FAILED'
  rec.error = ARGV[4]
  rec.lease_expires_at = nil
  rec.result = nil
  doc = cjson.encode(rec)
end
redis.call('SET', KEYS[1], doc, 'PX', tonumber(ARGV[2]))
return redis.status_reply('OK')
"#;

/// KEYS[1] key: the record, when it expires, and the store's clock (a
/// claim on a full Redis decides from it whether a lease is live).
const READ: &str = r#"
local raw, rec = load(KEYS[1])
if rec == false then return {'corrupt', raw} end
if not rec then return {'absent'} end
return {'found', raw, expiry(KEYS[1]), now_ms()}
"#;

/// KEYS[1] key: which of the commands the scripts send on `key` the
/// connection's user may not run (a script's permission error does not
/// name it). Every probe has its command's full arity: Redis 7.0 crashes on
/// a key-less probe of a key command for a user with key patterns.
const ACL_PROBE: &str = r"
local key, missing = KEYS[1], {}
local probes = {{'GET', key}, {'SET', key, 'v'}, {'PTTL', key}, {'PEXPIRETIME', key}, {'TIME'}}
for _, p in ipairs(probes) do
  local ok, allowed = pcall(redis.acl_check_cmd, unpack(p))
  if ok and not allowed then table.insert(missing, '+' .. string.lower(p[1])) end
end
return missing
";
/// The read script's whole text.
fn read_script() -> String {
    format!("{PRELUDE}{READ}")
}

/// `EVALSHA <script> 1 <key>`, for the caller to add the script's arguments:
/// built directly, since `ScriptInvocation` copies every argument twice.
fn evalsha(script: &Script, key: &str) -> redis::Cmd {
    let mut cmd = redis::Cmd::with_capacity(8, 128 + key.len());
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(1).arg(key);
    cmd
}

/// Runs an [`evalsha`] command; when the server does not have the script
/// (a restart or a `SCRIPT FLUSH`), loads it and sends the command once more.
async fn eval<T: redis::FromRedisValue>(
    conn: &mut Conn,
    script: &Script,
    cmd: &redis::Cmd,
) -> redis::RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        result => result,
    }
}

#[derive(Debug)]
struct Scripts {
    claim: Script,
    renew: Script,
    finish: Script,
    read: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            claim: Script::new(&format!("{PRELUDE}{CLAIM}")),
            renew: Script::new(&format!("{PRELUDE}{RENEW}")),
            finish: Script::new(&format!("{FINISH_HOT}{PRELUDE}{FINISH}")),
            read: Script::new(&read_script()),
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
    tls: Option<conn::TlsMaterial>,
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
    ///   [`PermissionDenied`](StoreRefusal::PermissionDenied) (see
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

/// The Redis store: a single node, a Redis Cluster or a Sentinel-managed
/// master, chosen by the URL scheme.
///
/// | URL | topology |
/// |---|---|
/// | `redis://[user:password@]host:port[/db]` | one node |
/// | `rediss://...` | one node over TLS (feature `tls`) |
/// | `redis+cluster://[user:password@]host:port,host:port,...` | Redis Cluster, from any of its nodes |
/// | `redis+sentinel://[user:password@]host:port,.../SERVICE[/db]` | the master of a Sentinel service |
///
/// Run Redis with `maxmemory-policy noeviction`: an evicted record is a
/// forgotten event whose next delivery runs again, and every record has a
/// TTL, so the `volatile-*` policies evict them too. [`connect`](Self::connect)
/// refuses any other policy unless
/// [`allow_eviction`](RedisStoreBuilder::allow_eviction) is on. When a
/// `noeviction` Redis is full, duplicates are still replayed (a read answers
/// them) and writes fail with
/// [`StoreRefused`](IdempotencyError::StoreRefused) /
/// [`OutOfMemory`](StoreRefusal::OutOfMemory). A least-privilege ACL user
/// needs [`ACL_COMMANDS`](Self::ACL_COMMANDS) on the key prefix.
///
/// Every operation touches one key, so a cluster needs no hash tags. A
/// Sentinel store finds the new master by itself after a failover. The
/// credentials in the URL are for the data nodes; sentinels are asked
/// without credentials.
///
/// Cheap to clone: clones share one multiplexed connection.
///
/// ```no_run
/// # async fn run() -> Result<(), idempotency_core::IdempotencyError> {
/// use idempotency_core::{IdempotencyChecker, RedisStore};
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let checker = IdempotencyChecker::new(store);
/// # let _ = checker; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conns: Connections,
    scripts: Arc<Scripts>,
    max_retries: u32,
    op_timeout: Duration,
    allow_eviction: bool,
    ifeq: Arc<ifeq::Ifeq>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("topology", &self.conns)
            .field("max_retries", &self.max_retries)
            .field("op_timeout", &self.op_timeout)
            .field("allow_eviction", &self.allow_eviction)
            .field("set_ifeq", &self.ifeq.supported())
            .finish_non_exhaustive()
    }
}

/// The server's error code, for a pipeline too (whose `code()` is `None`
/// for codes redis-rs does not know, such as `OOM`). Error paths only.
fn error_code(e: &RedisError) -> Option<String> {
    if let Some(code) = e.code() {
        return Some(code.to_owned());
    }
    let errors = e.clone().into_server_errors()?;
    errors.first().map(|(_, error)| error.code().to_owned())
}

/// `NOPERM` from a command, or its form inside a script (`ERR The user
/// executing the script can't run this command ...`).
fn permission_denied(e: &RedisError) -> bool {
    error_code(e).as_deref() == Some("NOPERM")
        || e.detail()
            .is_some_and(|d| d.starts_with("The user executing the script can't"))
}

fn refused_credentials(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
}

/// Worth another try: the connection broke or timed out, or the server (a
/// cluster or Sentinel setup in the middle of a failover) asks to retry.
fn transient(e: &RedisError) -> bool {
    e.is_timeout()
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.code(),
            Some("READONLY" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "LOADING")
        )
        || matches!(
            e.kind(),
            redis::ErrorKind::ClusterConnectionNotFound
                | redis::ErrorKind::MasterNameNotFoundBySentinel
        )
}

fn unavailable(e: impl Into<crate::error::BoxError>) -> IdempotencyError {
    IdempotencyError::store_unavailable(STORE, e)
}

/// Redis answered with a reply of a shape the store does not expect.
fn unexpected(e: impl Into<crate::error::BoxError>) -> IdempotencyError {
    IdempotencyError::protocol(STORE, e)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::UNIX_EPOCH)
}

/// A script reply: `{tag, ...}`.
struct Reply {
    tag: String,
    rest: Vec<Value>,
}

impl Reply {
    fn parse(key: &str, value: Value) -> Result<Self> {
        let Value::Array(mut items) = value else {
            return Err(unexpected(format!("unexpected script reply {value:?}")));
        };
        if items.is_empty() {
            return Err(unexpected("empty script reply"));
        }
        let rest = items.split_off(1);
        let tag = text(key, items.remove(0))?;
        if tag == "corrupt" {
            let reason = rest.into_iter().next().map(|v| text(key, v)).transpose()?;
            return Err(IdempotencyError::corrupt(
                key,
                reason.unwrap_or_else(|| "unreadable value".to_owned()),
            ));
        }
        Ok(Self { tag, rest })
    }

    fn int(&self, i: usize) -> Result<i64> {
        match self.rest.get(i) {
            Some(Value::Int(n)) => Ok(*n),
            other => Err(unexpected(format!("expected an integer, got {other:?}"))),
        }
    }

    /// `{tag, raw, expires_ms}`: the record with its expiry.
    fn record(self, key: &str) -> Result<IdempotencyRecord> {
        let expires_ms = self.int(1)?;
        let raw = self.rest.into_iter().next().unwrap_or(Value::Nil);
        let mut record = parse_record(key, &text(key, raw)?)?;
        record.expires_at = (expires_ms >= 0).then(|| ms_to_time(expires_ms));
        Ok(record)
    }
}

/// Appends `value` as a JSON string. Text that needs no escaping (keys,
/// ids, tokens, hex fingerprints almost always) is copied as it is.
fn push_json_str(out: &mut String, value: &str) -> Result<()> {
    if value.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(&serde_json::to_string(value)?);
    } else {
        out.push('"');
        out.push_str(value);
        out.push('"');
    }
    Ok(())
}

/// The claim's descriptive fields as JSON object members, each followed by a
/// comma; absent and empty fields are left out.
fn members(request: &ClaimRequest<'_>) -> Result<String> {
    let mut out = String::with_capacity(
        32 + request.recorded_key.len()
            + request.event_id.map_or(0, str::len)
            + request.event_type.map_or(0, str::len),
    );
    for (name, value) in [
        ("idempotency_key", Some(request.recorded_key)),
        ("event_id", request.event_id),
        ("event_type", request.event_type),
    ] {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            out.push('"');
            out.push_str(name);
            out.push_str("\":");
            push_json_str(&mut out, value)?;
            out.push(',');
        }
    }
    Ok(out)
}

/// The claim document the fast path writes with `SET NX`: the descriptive
/// fields, attempt 1, the token, and the lease relative to the key's expiry
/// (`lease_ms` and the `claim_px` it was set with), since only a script can
/// read the store's clock. Every script settles these into `first_seen_at`
/// and `lease_expires_at` when it reads the record.
fn fast_claim(request: &ClaimRequest<'_>, px: u64) -> Result<String> {
    let mut doc = String::with_capacity(160 + request.recorded_key.len());
    doc.push('{');
    doc.push_str(&members(request)?);
    doc.push_str("\"status\":\"PROCESSING\",\"attempts\":1,\"lease_token\":");
    push_json_str(&mut doc, request.token)?;
    // Writing to a String cannot fail.
    let _ = write!(
        doc,
        ",\"lease_ms\":{},\"claim_px\":{px}",
        millis(request.lease)
    );
    if let Some(fingerprint) = request.fingerprint.filter(|f| !f.is_empty()) {
        doc.push_str(",\"fingerprint\":");
        push_json_str(&mut doc, fingerprint)?;
    }
    doc.push('}');
    Ok(doc)
}

/// When a COMPLETED record expires: `completed_at + ttl_ms`. The finish
/// script writes `ttl_ms` before the result, which it splices in last, so
/// the first `"ttl_ms":` ahead of the first `"result":` is the record's own.
fn completed_expiry(raw: &str, record: &IdempotencyRecord) -> Option<DateTime<Utc>> {
    let head = &raw[..raw.find("\"result\":").unwrap_or(raw.len())];
    let at = head.find("\"ttl_ms\":")? + "\"ttl_ms\":".len();
    let digits = head[at..].split(|c: char| !c.is_ascii_digit()).next()?;
    let ttl = chrono::TimeDelta::try_milliseconds(digits.parse().ok()?)?;
    record.completed_at?.checked_add_signed(ttl)
}

fn text(key: &str, value: Value) -> Result<String> {
    match value {
        Value::BulkString(bytes) => {
            String::from_utf8(bytes).map_err(|e| IdempotencyError::corrupt(key, e))
        }
        Value::SimpleString(s) => Ok(s),
        other => Err(unexpected(format!("expected a string, got {other:?}"))),
    }
}

fn parse_record(key: &str, raw: &str) -> Result<IdempotencyRecord> {
    serde_json::from_str(raw).map_err(|e| IdempotencyError::corrupt(key, e))
}

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

    /// Runs `op` with bounded retries on transient errors, all within the
    /// operation timeout.
    ///
    /// `op` gets a connection and whether this is a retry (an earlier try may
    /// have been applied).
    async fn run<T, F, Fut>(&self, key: &str, op: F) -> Result<T>
    where
        F: Fn(Conn, bool) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let attempts = async {
            let mut tries = 0;
            loop {
                match op(self.conns.get(), tries > 0).await {
                    Ok(v) => return Ok(v),
                    Err(e) if transient(&e) && tries < self.max_retries => {
                        tries += 1;
                        self.conns.recover().await;
                        let base = 25u64 << tries.min(6);
                        let jitter = uuid::Uuid::new_v4().as_u128() as u64 % base;
                        tracing::debug!(error = %e, tries, "retrying a Redis operation");
                        tokio::time::sleep(Duration::from_millis(base + jitter)).await;
                    }
                    // WRONGTYPE: something that is not a record lives at the key.
                    Err(e) if e.code() == Some("WRONGTYPE") => {
                        return Err(IdempotencyError::corrupt(key, e));
                    }
                    // Redis answered, and refused: no outage.
                    Err(e) if error_code(&e).as_deref() == Some("OOM") => {
                        return Err(IdempotencyError::store_refused(
                            STORE,
                            StoreRefusal::OutOfMemory,
                            e,
                        ));
                    }
                    Err(e) if permission_denied(&e) => {
                        return Err(self.permission_error(key, e).await);
                    }
                    Err(e) => return Err(unavailable(e)),
                }
            }
        };
        tokio::time::timeout(self.op_timeout, attempts)
            .await
            .map_err(unavailable)?
    }
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    fn name(&self) -> &'static str {
        STORE
    }

    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome> {
        // The common cases in one plain command: `SET NX GET` writes the
        // claim when the key is absent, and otherwise returns the record
        // untouched. A COMPLETED record (a duplicate) or our own claim (a
        // retried try) is answered from that reply; anything else (a live or
        // expired lease, a FAILED record, a legacy or unreadable value) goes to
        // the claim script, which decides it atomically.
        let px = millis(request.ttl).max(millis(request.lease));
        let doc = fast_claim(request, px)?;
        let sent_at = Utc::now();
        let existing: Result<Option<Vec<u8>>> = self
            .run(request.key, |mut conn, _| {
                let doc = &doc;
                async move {
                    redis::cmd("SET")
                        .arg(request.key)
                        .arg(doc)
                        .arg("NX")
                        .arg("PX")
                        .arg(px)
                        .arg("GET")
                        .query_async(&mut conn)
                        .await
                }
            })
            .await;
        let existing = match existing {
            // A full Redis refuses every write, `SET NX GET` included; a read
            // still answers duplicates and live claims.
            Err(
                refused @ IdempotencyError::StoreRefused {
                    reason: StoreRefusal::OutOfMemory,
                    ..
                },
            ) => return self.claim_when_full(request, refused).await,
            other => other?,
        };
        let lease = |attempt: u32| Lease {
            key: request.key.to_owned(),
            token: request.token.to_owned(),
            attempt,
            expires_at: super::after(sent_at, request.lease),
            taken_over: false,
        };
        let Some(existing) = existing else {
            let lease = lease(1);
            self.ifeq.remember(
                request.key,
                request.token,
                ifeq::HeldDoc {
                    doc,
                    fingerprint: request
                        .fingerprint
                        .filter(|f| !f.is_empty())
                        .map(str::to_owned),
                    attempts: 1,
                    expires_at: lease.expires_at,
                },
            );
            return Ok(ClaimOutcome::Acquired(lease));
        };
        let record = std::str::from_utf8(&existing)
            .ok()
            .and_then(|raw| Some((raw, serde_json::from_str::<IdempotencyRecord>(raw).ok()?)));
        if let Some((raw, mut record)) = record {
            match record.status {
                ProcessingStatus::Completed => {
                    if let (Some(ours), Some(theirs)) = (request.fingerprint, &record.fingerprint)
                        && !ours.is_empty()
                        && ours != theirs
                    {
                        return Err(IdempotencyError::FingerprintMismatch {
                            key: request.key.to_owned(),
                        });
                    }
                    // Records written before `ttl_ms` existed get their
                    // expiry from the script (PEXPIRETIME).
                    if let Some(expires_at) = completed_expiry(raw, &record) {
                        record.expires_at = Some(expires_at);
                        return Ok(ClaimOutcome::Duplicate(record));
                    }
                }
                ProcessingStatus::Processing
                    if record.lease_token.as_deref() == Some(request.token) =>
                {
                    let lease = lease(record.attempts);
                    self.ifeq.remember(
                        request.key,
                        request.token,
                        ifeq::HeldDoc {
                            doc: raw.to_owned(),
                            fingerprint: record.fingerprint,
                            attempts: record.attempts,
                            expires_at: lease.expires_at,
                        },
                    );
                    return Ok(ClaimOutcome::Acquired(lease));
                }
                _ => {}
            }
        }
        self.claim_script(request).await
    }

    async fn renew(&self, lease: &Lease, lease_duration: Duration) -> Result<Lease> {
        let mut cmd = evalsha(&self.scripts.renew, &lease.key);
        cmd.arg(&lease.token).arg(millis(lease_duration));
        let value: Value = self
            .run(&lease.key, |mut conn, _| {
                let cmd = &cmd;
                async move { eval(&mut conn, &self.scripts.renew, cmd).await }
            })
            .await?;
        let reply = Reply::parse(&lease.key, value)?;
        match reply.tag.as_str() {
            "ok" => {
                let renewed = Lease {
                    expires_at: ms_to_time(reply.int(0)?),
                    ..lease.clone()
                };
                if let Some(doc) = reply.rest.into_iter().nth(1) {
                    self.ifeq.renewed(
                        &lease.key,
                        &lease.token,
                        text(&lease.key, doc)?,
                        renewed.expires_at,
                        lease.attempt,
                    );
                }
                Ok(renewed)
            }
            _ => {
                self.ifeq.take(&lease.key, &lease.token);
                Err(IdempotencyError::LeaseLost {
                    key: lease.key.clone(),
                })
            }
        }
    }

    async fn complete(
        &self,
        lease: &Lease,
        result: Option<&serde_json::Value>,
        ttl: Duration,
    ) -> Result<()> {
        // An empty payload completes the record without a `result` field.
        let result = match result {
            Some(result) => serde_json::to_string(result)?,
            None => String::new(),
        };
        let mut retried = false;
        if let Some(held) = self.ifeq.take(&lease.key, &lease.token) {
            match self.complete_ifeq(lease, &held, ttl, &result).await? {
                IfeqReply::Applied => return Ok(()),
                IfeqReply::Unsupported => self.ifeq.set_supported(false),
                // Not our document (any more): the finish script decides,
                // told whether an earlier try may have been applied.
                IfeqReply::Mismatch { retried: r } => retried = r,
            }
        }
        self.finish(lease, ttl, "COMPLETED", &result, retried).await
    }

    async fn fail(&self, lease: &Lease, error: &str, ttl: Duration) -> Result<()> {
        self.ifeq.take(&lease.key, &lease.token);
        self.finish(lease, ttl, "FAILED", error, false).await
    }

    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>> {
        let cmd = evalsha(&self.scripts.read, key);
        let value: Value = self
            .run(key, |mut conn, _| {
                let cmd = &cmd;
                async move { eval(&mut conn, &self.scripts.read, cmd).await }
            })
            .await?;
        let reply = Reply::parse(key, value)?;
        match reply.tag.as_str() {
            "found" => reply.record(key).map(Some),
            _ => Ok(None),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let removed: i64 = self
            .run(key, |mut conn, _| async move {
                redis::cmd("DEL").arg(key).query_async(&mut conn).await
            })
            .await?;
        Ok(removed > 0)
    }

    /// Reads `INFO memory` from the node (every master of a cluster): an
    /// error when Redis does not answer, and when a node's
    /// `maxmemory-policy` may evict records (logged at `ERROR`; only logged
    /// with [`allow_eviction`](RedisStoreBuilder::allow_eviction) on).
    async fn health(&self) -> Result<()> {
        self.check_eviction("health").await
    }
}

#[async_trait]
impl super::SeenSet for RedisStore {
    async fn mark(&self, keys: &[&str], ttl: Duration) -> Result<Vec<bool>> {
        self.mark_keys(keys, ttl).await
    }

    async fn contains(&self, keys: &[&str]) -> Result<Vec<bool>> {
        self.contains_keys(keys).await
    }
}

#[async_trait]
impl super::StoreAdmin for RedisStore {
    async fn stuck(&self, prefix: &str) -> Result<Vec<(String, IdempotencyRecord)>> {
        self.stuck_records(prefix).await
    }

    async fn summary(&self, prefix: &str) -> Result<super::StoreSummary> {
        self.summarize(prefix).await
    }

    async fn clear_prefix(&self, prefix: &str) -> Result<u64> {
        super::check_clear_prefix(prefix)?;
        self.unlink_prefix(prefix).await
    }
}

impl RedisStore {
    /// The ACL rules for every command the store sends (its scripts' own
    /// included), for a least-privilege user; add a key pattern for the
    /// prefix (`~idempotency:*`). A command refused by the ACL is
    /// [`StoreRefused`](IdempotencyError::StoreRefused) with
    /// [`PermissionDenied`](StoreRefusal::PermissionDenied), naming the
    /// command. The admin operations ([`StoreAdmin`](super::StoreAdmin)'s
    /// `stuck`, `summary` and `clear_prefix`) also need
    /// `+scan +unlink +memory|usage`, and a cluster `+cluster|slots
    /// +cluster|nodes`.
    pub const ACL_COMMANDS: &'static str =
        "+ping +info +evalsha +eval +script|load +get +set +del +exists +pttl +pexpiretime +time";

    /// The script commands the connection's user may not run on `key`.
    async fn missing_permissions(&self, key: &str) -> Vec<String> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(ACL_PROBE).arg(1).arg(key);
        let mut conn = self.conns.get();
        let probe = cmd.query_async::<Vec<String>>(&mut conn);
        match tokio::time::timeout(self.op_timeout, probe).await {
            Ok(Ok(missing)) => missing,
            _ => Vec::new(),
        }
    }

    /// A `PermissionDenied` refusal for `e` on `key`. Redis names the
    /// command a user may not run, except inside a script: then the store
    /// asks which of the scripts' commands are missing.
    async fn permission_error(&self, key: &str, e: RedisError) -> IdempotencyError {
        let in_script = error_code(&e).as_deref() != Some("NOPERM");
        let missing = if in_script && !key.is_empty() {
            self.missing_permissions(key).await
        } else {
            Vec::new()
        };
        let named = if missing.is_empty() {
            String::new()
        } else {
            format!("the Redis user may not run {}: ", missing.join(" "))
        };
        IdempotencyError::store_refused(
            STORE,
            StoreRefusal::PermissionDenied,
            format!("{named}{e}; the store needs `{}`", Self::ACL_COMMANDS),
        )
    }

    /// Reads every node's `maxmemory-policy`; when one may evict records,
    /// logs it at `ERROR` and, unless eviction was allowed, fails with
    /// `Config` naming it.
    async fn check_eviction(&self, when: &'static str) -> Result<()> {
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

    /// A claim on a Redis too full to write: the read script decides what
    /// a read can answer (a duplicate, a live claim, our own claim, a
    /// fingerprint mismatch); a claim that would have to write is
    /// `refused`.
    async fn claim_when_full(
        &self,
        request: &ClaimRequest<'_>,
        refused: IdempotencyError,
    ) -> Result<ClaimOutcome> {
        let cmd = evalsha(&self.scripts.read, request.key);
        let value: Value = self
            .run(request.key, |mut conn, _| {
                let cmd = &cmd;
                async move { eval(&mut conn, &self.scripts.read, cmd).await }
            })
            .await?;
        let reply = Reply::parse(request.key, value)?;
        if reply.tag != "found" {
            return Err(refused);
        }
        let now = ms_to_time(reply.int(2)?);
        let record = reply.record(request.key)?;
        let view = RecordView {
            status: record.status,
            attempts: record.attempts,
            lease_token: record.lease_token.as_deref(),
            lease_expires_at: record.lease_expires_at,
            fingerprint: record.fingerprint.as_deref(),
        };
        let fingerprint = request.fingerprint.filter(|f| !f.is_empty());
        match decide_claim(Some(view), fingerprint, request.token, now) {
            ClaimDecision::Duplicate => Ok(ClaimOutcome::Duplicate(record)),
            ClaimDecision::InProgress => Ok(ClaimOutcome::InProgress(record)),
            ClaimDecision::AlreadyHeld => Ok(ClaimOutcome::Acquired(Lease {
                key: request.key.to_owned(),
                token: request.token.to_owned(),
                attempt: record.attempts,
                expires_at: record.lease_expires_at.unwrap_or(now),
                taken_over: false,
            })),
            ClaimDecision::FingerprintMismatch => Err(IdempotencyError::FingerprintMismatch {
                key: request.key.to_owned(),
            }),
            ClaimDecision::Acquire { .. } => Err(refused),
        }
    }

    /// The claim script: every case, decided atomically in Redis.
    async fn claim_script(&self, request: &ClaimRequest<'_>) -> Result<ClaimOutcome> {
        let mut cmd = evalsha(&self.scripts.claim, request.key);
        cmd.arg(request.token)
            .arg(millis(request.lease))
            .arg(millis(request.ttl))
            .arg(request.fingerprint.unwrap_or(""))
            .arg(members(request)?);
        let value: Value = self
            .run(request.key, |mut conn, _| {
                let cmd = &cmd;
                async move { eval(&mut conn, &self.scripts.claim, cmd).await }
            })
            .await?;
        let reply = Reply::parse(request.key, value)?;
        match reply.tag.as_str() {
            "acquired" => {
                let lease = Lease {
                    key: request.key.to_owned(),
                    token: request.token.to_owned(),
                    attempt: u32::try_from(reply.int(0)?).unwrap_or(u32::MAX),
                    expires_at: ms_to_time(reply.int(1)?),
                    taken_over: reply.int(2)? == 1,
                };
                if self.ifeq.may_use()
                    && let Some(doc) = reply.rest.into_iter().nth(3)
                {
                    let doc = text(request.key, doc)?;
                    if let Ok(parsed) = serde_json::from_str::<ifeq::FingerprintOnly>(&doc) {
                        self.ifeq.remember(
                            request.key,
                            request.token,
                            ifeq::HeldDoc {
                                doc,
                                fingerprint: parsed.fingerprint,
                                attempts: lease.attempt,
                                expires_at: lease.expires_at,
                            },
                        );
                    }
                }
                Ok(ClaimOutcome::Acquired(lease))
            }
            "duplicate" => {
                let record = reply.record(request.key)?;
                if record.status != ProcessingStatus::Completed {
                    return Err(IdempotencyError::corrupt(
                        request.key,
                        "answered as a duplicate, but the record is not COMPLETED",
                    ));
                }
                Ok(ClaimOutcome::Duplicate(record))
            }
            "in_progress" => Ok(ClaimOutcome::InProgress(reply.record(request.key)?)),
            "mismatch" => Err(IdempotencyError::FingerprintMismatch {
                key: request.key.to_owned(),
            }),
            other => Err(unexpected(format!("unexpected claim reply `{other}`"))),
        }
    }

    /// The finish script; `retried_before`: an earlier try of this call
    /// (a `SET ... IFEQ`) may have been applied.
    async fn finish(
        &self,
        lease: &Lease,
        ttl: Duration,
        status: &str,
        payload: &str,
        retried_before: bool,
    ) -> Result<()> {
        let value: Value = self
            .run(&lease.key, |mut conn, retried| {
                let mut cmd = evalsha(&self.scripts.finish, &lease.key);
                cmd.arg(&lease.token)
                    .arg(millis(ttl))
                    .arg(status)
                    .arg(payload)
                    .arg(if retried || retried_before { "1" } else { "" });
                async move { eval(&mut conn, &self.scripts.finish, &cmd).await }
            })
            .await?;
        // `OK` (a status reply), or `{'lost'}` or `{'corrupt', reason}`.
        if value == Value::Okay {
            return Ok(());
        }
        Reply::parse(&lease.key, value)?;
        Err(IdempotencyError::LeaseLost {
            key: lease.key.clone(),
        })
    }

    /// Completes with `SET key <COMPLETED doc> IFEQ <held doc> PX ttl`: one
    /// plain command, applied only when the key still holds exactly the
    /// document the claim (or the last renewal) wrote. `completed_at` is
    /// this host's clock (only a script can read the store's).
    async fn complete_ifeq(
        &self,
        lease: &Lease,
        held: &ifeq::HeldDoc,
        ttl: Duration,
        result: &str,
    ) -> Result<IfeqReply> {
        let ttl_ms = millis(ttl);
        let doc = ifeq::completed_doc(Utc::now().timestamp_millis(), held, ttl_ms, result)?;
        let mut cmd =
            redis::Cmd::with_capacity(7, 64 + lease.key.len() + doc.len() + held.doc.len());
        cmd.arg("SET")
            .arg(&lease.key)
            .arg(&doc)
            .arg("IFEQ")
            .arg(&held.doc)
            .arg("PX")
            .arg(ttl_ms);
        let retried = std::sync::atomic::AtomicBool::new(false);
        let reply = self
            .run(&lease.key, |mut conn, again| {
                if again {
                    retried.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                let cmd = &cmd;
                async move {
                    match cmd.query_async::<Value>(&mut conn).await {
                        Ok(Value::Okay) => Ok(IfeqReply::Applied),
                        Ok(_) => Ok(IfeqReply::Mismatch { retried: false }),
                        Err(e) if ifeq::unknown_option(&e) => Ok(IfeqReply::Unsupported),
                        Err(e) => Err(e),
                    }
                }
            })
            .await?;
        Ok(match reply {
            IfeqReply::Applied => {
                self.ifeq.set_supported(true);
                IfeqReply::Applied
            }
            IfeqReply::Mismatch { .. } => {
                self.ifeq.set_supported(true);
                IfeqReply::Mismatch {
                    retried: retried.load(std::sync::atomic::Ordering::Relaxed),
                }
            }
            IfeqReply::Unsupported => IfeqReply::Unsupported,
        })
    }

    /// Whether the server has `SET ... IFEQ`, by trying it on a key that
    /// does not exist (`IFEQ` never creates one). `ERR syntax error`: no;
    /// any other refusal (an ACL user's key patterns) leaves it to the
    /// first completion.
    async fn probe_ifeq(&self) {
        let mut cmd = redis::cmd("SET");
        cmd.arg("idempotency:capability-probe")
            .arg("x")
            .arg("IFEQ")
            .arg("never stored")
            .arg("PX")
            .arg(1000);
        let mut conn = self.conns.get();
        let probe = cmd.query_async::<Value>(&mut conn);
        match tokio::time::timeout(self.op_timeout, probe).await {
            Ok(Ok(_)) => self.ifeq.set_supported(true),
            Ok(Err(e)) if ifeq::unknown_option(&e) => self.ifeq.set_supported(false),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "SET IFEQ probe refused; the first completion decides");
            }
            Err(_) => tracing::debug!("SET IFEQ probe timed out; the first completion decides"),
        }
    }

    /// Whether completions take `SET ... IFEQ` (`Some(true)`), the finish
    /// script (`Some(false)`), or are not known yet (`None`: the first
    /// completion decides).
    #[doc(hidden)]
    pub fn completes_with_set_ifeq(&self) -> Option<bool> {
        self.ifeq.supported()
    }
}

/// What a `SET ... IFEQ` completion found.
enum IfeqReply {
    /// Written.
    Applied,
    /// The key does not hold the remembered document; `retried`: an earlier
    /// try of this call may have been applied.
    Mismatch { retried: bool },
    /// The server has no `IFEQ`.
    Unsupported,
}

#[cfg(test)]
mod tests {
    use super::{PRELUDE, Reply, push_json_str};

    /// A reply of a shape the store does not expect is a protocol error,
    /// not an outage (it must not open the breaker or trigger fail-open).
    #[test]
    fn unexpected_replies_are_protocol_errors() {
        for value in [
            redis::Value::Int(7),
            redis::Value::Array(Vec::new()),
            redis::Value::Okay,
        ] {
            let error = Reply::parse("k", value).err().expect("an error");
            assert!(
                matches!(
                    error,
                    crate::IdempotencyError::Protocol { store: "redis", .. }
                ),
                "{error:?}"
            );
        }
    }
    use crate::record::IdempotencyRecord;

    /// The scripts' range for timestamps is the reader's: chrono's, in
    /// milliseconds, exactly.
    #[test]
    fn the_scripts_accept_the_timestamps_the_reader_accepts() {
        let (min, max) = (
            chrono::DateTime::<chrono::Utc>::MIN_UTC.timestamp_millis(),
            chrono::DateTime::<chrono::Utc>::MAX_UTC.timestamp_millis(),
        );
        assert!(PRELUDE.contains(&format!("int_in(v, {min}, {max})")));
        let read = |ms: i64| {
            serde_json::from_str::<IdempotencyRecord>(&format!(
                r#"{{"status":"FAILED","first_seen_at":{ms}}}"#
            ))
        };
        assert!(read(min).is_ok() && read(max).is_ok());
        assert!(read(min - 1).is_err() && read(max + 1).is_err());
    }

    #[test]
    fn json_strings_are_written_as_serde_json_writes_them() {
        for text in [
            "",
            "order-42",
            "a\"quote",
            "back\\slash",
            "new\nline\t\u{1}",
            "ünï€ode/slash\u{7f}",
            r#""status":"COMPLETED""#,
        ] {
            let mut out = String::from("x");
            push_json_str(&mut out, text).expect("a string");
            assert_eq!(
                out,
                format!("x{}", serde_json::to_string(text).expect("serializable"))
            );
        }
    }
}

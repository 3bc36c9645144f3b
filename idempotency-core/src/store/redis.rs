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
//! unchanged.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::{RedisError, Script, Value};

use super::{ClaimRequest, IdempotencyStore};
use crate::error::{IdempotencyError, Result};
use crate::record::{ClaimOutcome, IdempotencyRecord, Lease, ProcessingStatus};

mod conn;
mod dedup;
mod ops;
use conn::{Conn, Connections, OpenError, Settings};
pub use ops::PrefixSummary;

const STORE: &str = "redis";

/// Shared by every script: the store's clock and a tolerant record loader.
const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- a field's value, with JSON null (written by older versions) read as absent
local function val(x) if x == cjson.null then return nil end return x end
-- returns raw, record | raw, nil (absent) | reason, false (not a record);
-- `raw` may be passed in when the caller already read the key
local function load(key, raw)
  if raw == nil then raw = redis.pcall('GET', key) end
  if type(raw) == 'table' and raw.err then return raw.err, false end
  if not raw then return nil, nil end
  local ok, rec = pcall(cjson.decode, raw)
  if not ok then return 'value is not JSON', false end
  if type(rec) ~= 'table' then return 'value is not a JSON object', false end
  local st = rec.status
  if st ~= 'PROCESSING' and st ~= 'COMPLETED' and st ~= 'FAILED' then
    return 'unknown status', false
  end
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

/// KEYS[1] key; ARGV token, lease_ms, ttl_ms, fingerprint, members
///
/// `members` is the record's descriptive fields (`idempotency_key`,
/// `event_id`, `event_type`) already encoded by the client as JSON object
/// members, each followed by a comma (or empty): the script only
/// concatenates, so writing a claim costs no `cjson` call.
const CLAIM: &str = r#"
local key, token = KEYS[1], ARGV[1]
local lease_ms, ttl_ms, fp = tonumber(ARGV[2]), tonumber(ARGV[3]), opt(ARGV[4])
local got = redis.pcall('GET', key)
-- The hot duplicate path: a COMPLETED record (its top-level status is the
-- only place this text can appear unescaped) and no fingerprint to compare:
-- answer without decoding. The record is parsed and checked by the client.
if not fp and type(got) == 'string' and string.find(got, '"status":"COMPLETED"', 1, true) then
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
      return {'acquired', tonumber(rec.attempts) or 1, tonumber(rec.lease_expires_at) or now, 0}
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
redis.call('SET', key, doc .. '}', 'PX', math.max(ttl_ms, lease_ms))
return {'acquired', attempts + 1, expires, taken_over}
"#;

/// KEYS[1] key; ARGV token, lease_ms
const RENEW: &str = r#"
local raw, rec = load(KEYS[1])
if rec == false then return {'corrupt', raw} end
if not rec or rec.lease_token ~= ARGV[1] or rec.status ~= 'PROCESSING' then return {'lost'} end
local lease_ms = tonumber(ARGV[2])
rec.lease_expires_at = now_ms() + lease_ms
local pttl = redis.call('PTTL', KEYS[1])
redis.call('SET', KEYS[1], cjson.encode(rec), 'PX', math.max(pttl, lease_ms))
return {'ok', rec.lease_expires_at}
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
-- fingerprint, is decided by finding our token and the status in the text
-- (quotes inside JSON strings are escaped, so neither can be forged by a
-- key or an event type), and the COMPLETED record is written without
-- decoding the old one.
if target == 'COMPLETED' then
  local raw = redis.pcall('GET', KEYS[1])
  if type(raw) == 'string'
    and string.find(raw, '"status":"PROCESSING"', 1, true)
    and string.find(raw, '"lease_token":' .. cjson.encode(token), 1, true)
    and not string.find(raw, '"fingerprint":', 1, true) then
    local attempts = string.match(raw, '"attempts":(%d+)')
    if attempts then
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
  doc = cjson.encode({ status = 'COMPLETED', completed_at = now_ms(),
    attempts = (tonumber(rec.attempts) ~= 1) and rec.attempts or nil,
    ttl_ms = tonumber(ARGV[2]), fingerprint = val(rec.fingerprint) })
  -- The result is spliced in verbatim (as the last field), so Lua never
  -- re-encodes, and never rounds, the handler's numbers.
  doc = string.sub(doc, 1, -2) .. result_field(ARGV[4]) .. '}'
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

/// KEYS[1] key: the record and when it expires.
const READ: &str = r#"
local raw, rec = load(KEYS[1])
if rec == false then return {'corrupt', raw} end
if not rec then return {'absent'} end
return {'found', raw, expiry(KEYS[1])}
"#;

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

    /// Connects (failing fast with
    /// [`StoreUnavailable`](IdempotencyError::StoreUnavailable) when Redis
    /// does not answer) and returns the store.
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
                OpenError::Redis(e) if refused_credentials(&e) => IdempotencyError::Config(
                    format!("Redis refused the credentials (user and password in the URL): {e}"),
                ),
                OpenError::Redis(e) => IdempotencyError::store_unavailable(STORE, e),
            })?;
        Ok(RedisStore {
            conns,
            scripts: Arc::new(Scripts::new()),
            max_retries: self.max_retries,
            op_timeout: self.response_timeout * (self.max_retries + 1)
                + Duration::from_millis(200) * self.max_retries,
        })
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
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("topology", &self.conns)
            .field("max_retries", &self.max_retries)
            .field("op_timeout", &self.op_timeout)
            .finish_non_exhaustive()
    }
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
            return Err(unavailable(format!("unexpected script reply {value:?}")));
        };
        if items.is_empty() {
            return Err(unavailable("empty script reply"));
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
            other => Err(unavailable(format!("expected an integer, got {other:?}"))),
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
        other => Err(unavailable(format!("expected a string, got {other:?}"))),
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
        let existing: Option<Vec<u8>> = self
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
            .await?;
        let lease = |attempt: u32| Lease {
            key: request.key.to_owned(),
            token: request.token.to_owned(),
            attempt,
            expires_at: super::after(sent_at, request.lease),
            taken_over: false,
        };
        let Some(existing) = existing else {
            return Ok(ClaimOutcome::Acquired(lease(1)));
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
                    return Ok(ClaimOutcome::Acquired(lease(record.attempts)));
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
            "ok" => Ok(Lease {
                expires_at: ms_to_time(reply.int(0)?),
                ..lease.clone()
            }),
            _ => Err(IdempotencyError::LeaseLost {
                key: lease.key.clone(),
            }),
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
        self.finish(lease, ttl, "COMPLETED", &result).await
    }

    async fn fail(&self, lease: &Lease, error: &str, ttl: Duration) -> Result<()> {
        self.finish(lease, ttl, "FAILED", error).await
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

    async fn health(&self) -> Result<()> {
        let _: String = self
            .run("", |mut conn, _| async move {
                redis::cmd("PING").query_async(&mut conn).await
            })
            .await?;
        Ok(())
    }

    async fn mark(&self, keys: &[&str], ttl: Duration) -> Result<Vec<bool>> {
        self.mark_keys(keys, ttl).await
    }

    async fn contains(&self, keys: &[&str]) -> Result<Vec<bool>> {
        self.contains_keys(keys).await
    }
}

impl RedisStore {
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
            "acquired" => Ok(ClaimOutcome::Acquired(Lease {
                key: request.key.to_owned(),
                token: request.token.to_owned(),
                attempt: u32::try_from(reply.int(0)?).unwrap_or(u32::MAX),
                expires_at: ms_to_time(reply.int(1)?),
                taken_over: reply.int(2)? == 1,
            })),
            "duplicate" => Ok(ClaimOutcome::Duplicate(reply.record(request.key)?)),
            "in_progress" => Ok(ClaimOutcome::InProgress(reply.record(request.key)?)),
            "mismatch" => Err(IdempotencyError::FingerprintMismatch {
                key: request.key.to_owned(),
            }),
            other => Err(unavailable(format!("unexpected claim reply `{other}`"))),
        }
    }

    async fn finish(
        &self,
        lease: &Lease,
        ttl: Duration,
        status: &str,
        payload: &str,
    ) -> Result<()> {
        let value: Value = self
            .run(&lease.key, |mut conn, retried| {
                let mut cmd = evalsha(&self.scripts.finish, &lease.key);
                cmd.arg(&lease.token)
                    .arg(millis(ttl))
                    .arg(status)
                    .arg(payload)
                    .arg(if retried { "1" } else { "" });
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
}

#[cfg(test)]
mod tests {
    use super::push_json_str;

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

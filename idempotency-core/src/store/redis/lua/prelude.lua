-- Shared by every script (concatenated ahead of it): the store's clock and
-- the record loader, which refuses exactly what the reader (serde's
-- `IdempotencyRecord`) refuses, so no script claims, renews or overwrites a
-- value `get` calls corrupt.
-- One instant per script run, read once: a script is one atomic step, and
-- two reads of TIME a millisecond apart would judge one lease twice (a
-- claim without expiry, settled a whole lease before the second read,
-- would look live).
local clock
local function now_ms()
  if clock == nil then
    local t = redis.call('TIME')
    clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return clock
end
-- a field's value, with JSON null read as absent (the reader reads a null
-- optional field as absent)
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

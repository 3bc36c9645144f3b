-- The claim script (after the prelude): every case of a claim, decided
-- atomically.
-- KEYS[1] key; ARGV token, lease_ms, ttl_ms, fingerprint, members.
-- `acquired` replies end with the document now stored (for `SET ... IFEQ`).
--
-- `members` is the record's descriptive fields (`idempotency_key`,
-- `event_id`, `event_type`) already encoded by the client as JSON object
-- members, each followed by a comma (or empty): the script only
-- concatenates, so writing a claim costs no `cjson` call.
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

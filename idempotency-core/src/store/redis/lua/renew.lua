-- The renew script (after the prelude).
-- KEYS[1] key; ARGV token, lease_ms.
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

-- The finish script (after the prelude): fails a held lease, or completes
-- one whose document the client could not compare (not remembered, or not
-- equal: a retried try whose first one was applied, a rewritten document, a
-- lost lease).
-- KEYS[1] key; ARGV token, ttl_ms, status ('COMPLETED' | 'FAILED'), payload
-- (the result's JSON text, or the error text), retried ('1' when an earlier
-- try of this same call may have been applied), completed_at (ms since the
-- epoch by the completing host's clock, as every completion path writes it;
-- COMPLETED only).
--
-- A `COMPLETED` record keeps only `status`, `completed_at`, `attempts`
-- (left out when 1), `ttl_ms` (so a replay knows when the record expires
-- without asking), `fingerprint` and `result`: no token. So a second
-- `complete` by the same holder is recognised only when it is flagged as a
-- retry.
local token, target = ARGV[1], ARGV[3]
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
  doc = '{"status":"COMPLETED","completed_at":' .. int(tonumber(ARGV[6]) or now_ms())
  if attempts ~= 1 then doc = doc .. ',"attempts":' .. int(attempts) end
  doc = doc .. ',"ttl_ms":' .. int(tonumber(ARGV[2]))
  local fp = val(rec.fingerprint)
  if fp then doc = doc .. ',"fingerprint":' .. cjson.encode(fp) end
  -- An empty result payload completes without a result (it could not be
  -- stored).
  if ARGV[4] ~= '' then doc = doc .. ',"result":' .. ARGV[4] end
  doc = doc .. '}'
else
  rec.status = 'FAILED'
  rec.error = ARGV[4]
  rec.lease_expires_at = nil
  rec.result = nil
  doc = cjson.encode(rec)
end
redis.call('SET', KEYS[1], doc, 'PX', tonumber(ARGV[2]))
return redis.status_reply('OK')

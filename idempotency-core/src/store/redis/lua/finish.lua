-- The rest of the finish script, after finish_hot.lua and the prelude.
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

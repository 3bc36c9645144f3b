-- The finish script's head, ahead of the prelude (see finish.lua).
-- KEYS[1] key; ARGV token, ttl_ms, status ('COMPLETED' | 'FAILED'), payload
-- (the result's JSON text, or the error text), retried ('1' when an earlier
-- try of this same call may have been applied).
--
-- A `COMPLETED` record keeps only `status`, `completed_at`, `attempts`
-- (left out when 1), `ttl_ms` (so a replay knows when the record expires
-- without asking), `fingerprint` and `result`: no token. So a second
-- `complete` by the same holder is recognised only when it is flagged as a
-- retry.
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

-- `SET key doc IFEQ expected PX ttl_ms` for servers without `IFEQ`.
-- KEYS[1] key; ARGV expected (the document the lease last wrote), tail (the
-- COMPLETED document after its `completed_at` milliseconds), ttl_ms. OK
-- when written; nil when the key holds anything else (the finish script
-- then decides). Nothing is decoded: equal bytes are the lease's own claim,
-- which the reader accepts. `completed_at` is the store's clock.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[1], '{"status":"COMPLETED","completed_at":'
    .. string.format('%s%03d', t[1], math.floor(tonumber(t[2]) / 1000)) .. ARGV[2],
    'PX', ARGV[3])
  return redis.status_reply('OK')
end
return false

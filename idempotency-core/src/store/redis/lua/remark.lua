-- The retried form of one seen-set mark. KEYS[1] key; ARGV doc, ttl_ms.
-- 1 when the key is now marked by this call (written now, or by the
-- earlier try: the stored document is this call's own), else 0.
local ok, v = pcall(redis.call, 'GET', KEYS[1])
if not ok then return 0 end
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == ARGV[1] then return 1 end
return 0

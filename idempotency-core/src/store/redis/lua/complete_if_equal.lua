-- `SET key doc IFEQ expected PX ttl_ms` for servers without `IFEQ`.
-- KEYS[1] key; ARGV expected (the document the lease last wrote), doc (the
-- COMPLETED document, `completed_at` from the completing host's clock, as
-- with `IFEQ`), ttl_ms. OK when written; nil when the key holds anything
-- else (the finish script then decides). Nothing is decoded: equal bytes are
-- the lease's own claim, which the reader accepts.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return redis.status_reply('OK')
end
return false

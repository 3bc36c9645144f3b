-- KEYS[1] key: which of the commands the scripts send on `key` the
-- connection's user may not run (a script's permission error does not
-- name it). Every probe has its command's full arity: Redis 7.0 crashes on
-- a key-less probe of a key command for a user with key patterns.
local key, missing = KEYS[1], {}
local probes = {{'GET', key}, {'SET', key, 'v'}, {'PTTL', key}, {'PEXPIRETIME', key}, {'TIME'}}
for _, p in ipairs(probes) do
  local ok, allowed = pcall(redis.acl_check_cmd, unpack(p))
  if ok and not allowed then table.insert(missing, '+' .. string.lower(p[1])) end
end
return missing

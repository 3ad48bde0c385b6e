-- renew.lua: push the lease deadline while the owner waits for the backend.
--
-- KEYS[1]  the record
-- ARGV[1]  owner token
-- ARGV[2]  lease in milliseconds from now (Redis TIME)
--
-- Returns 1 when the caller still owns a CLAIMED or SENT record; 0 when fenced
-- (taken over, turned UNKNOWN by a duplicate after the lease expired, or gone).
-- Never changes the state or the TTL.
local r = redis.call('HMGET', KEYS[1], 'state', 'token')
if r[2] ~= ARGV[1] or (r[1] ~= 'CLAIMED' and r[1] ~= 'SENT') then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'lease', now + tonumber(ARGV[2]))
return 1

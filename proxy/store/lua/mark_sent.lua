-- mark_sent.lua: CLAIMED -> SENT, just before the first byte goes to the backend.
--
-- KEYS[1]  the record
-- ARGV[1]  owner token
-- ARGV[2]  lease in milliseconds (the deadline restarts from Redis TIME)
-- ARGV[3]  the route's status-check target for this request ('' when none), kept for
--          check_claim should the record turn UNKNOWN
--
-- Returns 1 when the caller owns the record and it is now SENT (also when a retried
-- call finds it already SENT by this token); 0 when fenced: another owner took over,
-- or the record is gone. On 0 the caller must not send.
--
-- The record's TTL restarts at the retention the claim stored: the request runs from
-- now, and its record must not expire under it (a duplicate would execute again).
-- It is never shortened.
local r = redis.call('HMGET', KEYS[1], 'state', 'token', 'retention')
if r[2] ~= ARGV[1] then
  return 0
end
if r[1] == 'SENT' then
  return 1
end
if r[1] ~= 'CLAIMED' then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'state', 'SENT', 'lease', now + tonumber(ARGV[2]))
if ARGV[3] and ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'check', ARGV[3])
end
local retention = tonumber(r[3])
if retention and redis.call('PTTL', KEYS[1]) < retention then
  redis.call('PEXPIRE', KEYS[1], retention)
end
return 1

-- mark_unknown.lua: SENT -> UNKNOWN, when the backend may or may not have executed it
-- (timeout, reset or protocol error after sending).
--
-- KEYS[1]  the record
-- ARGV[1]  owner token
-- ARGV[2]  the status duplicates get (504 after a timeout, 502 otherwise)
-- ARGV[3]  reason (timeout | reset | protocol | ...)
--
-- Wakes the record's waiting duplicates on every replica (PUBLISH idem:settled <key>)
-- when claim.lua marked it 'waiters'; a lost message only costs them a poll, so the
-- PUBLISH is a pcall: a user whose ACL lacks it still settles the record.
--
-- Returns 1 when the record is UNKNOWN for this token (also on a retried call); 0 when
-- fenced. UNKNOWN stays until an operator resolves it or the retention expires.
local r = redis.call('HMGET', KEYS[1], 'state', 'token', 'waiters')
if r[2] ~= ARGV[1] then
  return 0
end
if r[1] == 'UNKNOWN' then
  return 1
end
if r[1] ~= 'SENT' and r[1] ~= 'CLAIMED' then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'UNKNOWN', 'status', ARGV[2], 'reason', ARGV[3])
redis.call('HDEL', KEYS[1], 'lease')
if r[3] then
  redis.pcall('PUBLISH', 'idem:settled', KEYS[1])
end
return 1

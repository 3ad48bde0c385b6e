-- complete.lua: SENT -> COMPLETED, storing the response every duplicate will get.
--
-- KEYS[1]  the record
-- ARGV[1]  owner token
-- ARGV[2]  HTTP status
-- ARGV[3]  allow-listed headers (JSON, opaque here)
-- ARGV[4]  raw body bytes (empty when not replayable)
-- ARGV[5]  '1' replayable, '0' over the stored-response cap
-- ARGV[6]  how the answer came, shown by `records show` ('' on time, 'late-answer' when
--          it arrived after the client's timeout, during the route's outcome_wait)
--
-- Wakes the record's waiting duplicates on every replica (PUBLISH idem:settled <key>)
-- when claim.lua marked it 'waiters'; a lost message only costs them a poll, so the
-- PUBLISH is a pcall: a user whose ACL lacks it still settles the record.
--
-- Returns 1 when stored (or already stored by this token: a retried call); 0 when
-- fenced. The TTL set at claim time is kept: retention runs from the first write.
local r = redis.call('HMGET', KEYS[1], 'state', 'token', 'waiters')
if r[2] ~= ARGV[1] then
  return 0
end
if r[1] == 'COMPLETED' then
  return 1
end
if r[1] ~= 'SENT' then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'COMPLETED', 'status', ARGV[2], 'headers', ARGV[3],
           'body', ARGV[4], 'replayable', ARGV[5])
redis.call('HDEL', KEYS[1], 'lease')
if ARGV[6] and ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'reason', ARGV[6])
end
if r[3] then
  redis.pcall('PUBLISH', 'idem:settled', KEYS[1])
end
return 1

-- release.lua: CLAIMED or SENT -> (absent), when the backend provably did not act
-- (connection refused before sending, or a status in the route's release_statuses).
--
-- KEYS[1]  the record
-- ARGV[1]  owner token
--
-- Wakes the record's waiting duplicates on every replica (PUBLISH idem:settled <key>)
-- when claim.lua marked it 'waiters'; a lost message only costs them a poll, so the
-- PUBLISH is a pcall: a user whose ACL lacks it still settles the record.
--
-- Returns 1 when deleted, or when the record is already gone (a retried call);
-- 0 when fenced: the record belongs to another owner or has reached a final state.
local r = redis.call('HMGET', KEYS[1], 'state', 'token', 'waiters')
if not r[1] and redis.call('EXISTS', KEYS[1]) == 0 then
  return 1
end
if r[2] ~= ARGV[1] or (r[1] ~= 'CLAIMED' and r[1] ~= 'SENT') then
  return 0
end
redis.call('DEL', KEYS[1])
if r[3] then
  redis.pcall('PUBLISH', 'idem:settled', KEYS[1])
end
return 1

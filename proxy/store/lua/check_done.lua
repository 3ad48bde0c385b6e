-- check_done.lua: record what the status check learned, if the caller still holds it.
--
-- KEYS[1]  the record
-- ARGV[1]  checker token (from check_claim)
-- ARGV[2]  result: executed | not_executed | unknown
-- ARGV[3]  HTTP status duplicates get (executed)
-- ARGV[4]  headers (JSON, executed)
-- ARGV[5]  body bytes (executed)
-- ARGV[6]  milliseconds before the next check may start (unknown)
--
-- Returns 1 when applied; 0 when fenced (the record left UNKNOWN, e.g. an operator
-- resolved or released it, or another checker claimed the check since).
-- Transitions allowed (UNKNOWN, own check token only):
--   executed      -> COMPLETED with the given response, reason 'status-check'
--   not_executed  -> (absent): the backend provably never executed it, so a retry may
--   unknown       -> UNKNOWN, the check released, the next one due after ARGV[6]
-- The TTL is kept.
local key = KEYS[1]
local r = redis.call('HMGET', key, 'state', 'check_token')
if r[1] ~= 'UNKNOWN' or r[2] ~= ARGV[1] then
  return 0
end
local result = ARGV[2]
if result == 'executed' then
  redis.call('HSET', key, 'state', 'COMPLETED', 'status', ARGV[3], 'headers', ARGV[4],
             'body', ARGV[5], 'replayable', '1', 'reason', 'status-check')
  redis.call('HDEL', key, 'lease', 'check', 'check_token', 'check_lease', 'check_next')
  return 1
end
if result == 'not_executed' then
  redis.call('DEL', key)
  return 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', key, 'check_next', now + tonumber(ARGV[6]))
redis.call('HDEL', key, 'check_token', 'check_lease')
return 1

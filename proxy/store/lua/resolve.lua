-- resolve.lua: operator tool. UNKNOWN -> COMPLETED with the response an operator
-- reconstructed after checking the payment system's ledger.
--
-- KEYS[1]  the record
-- ARGV[1]  HTTP status
-- ARGV[2]  headers (JSON)
-- ARGV[3]  body bytes
-- ARGV[4]  '1' to allow any state (--force), '0' for UNKNOWN only
--
-- Returns 1 when resolved, 0 when the record is in another state and not forced,
-- -1 when there is no record. The TTL is kept.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return -1
end
if state ~= 'UNKNOWN' and ARGV[4] ~= '1' then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'COMPLETED', 'status', ARGV[1], 'headers', ARGV[2],
           'body', ARGV[3], 'replayable', '1', 'reason', 'resolved')
redis.call('HDEL', KEYS[1], 'lease')
return 1

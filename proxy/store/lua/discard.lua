-- discard.lua: operator tool. UNKNOWN -> (absent), after the operator checked that the
-- backend did not execute the request, so the client's retry executes it.
--
-- KEYS[1]  the record
-- ARGV[1]  '1' to allow any state (--force), '0' for UNKNOWN only
--
-- Returns 1 when deleted, 0 when the record is in another state and not forced,
-- -1 when there is no record.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return -1
end
if state ~= 'UNKNOWN' and ARGV[1] ~= '1' then
  return 0
end
redis.call('DEL', KEYS[1])
return 1

-- discard.lua: operator tool. UNKNOWN -> (absent), after the operator checked that the
-- backend did not execute the request, so the client's retry executes it.
--
-- KEYS[1]  the record
-- ARGV[1]  '1' to allow any state (--force), '0' for UNKNOWN only
--
-- Returns 1 when deleted, 0 when the record is in another state and not forced,
-- -1 when there is no record. A key the proxy could not have written (not a hash, or
-- a hash without a state) is deleted only when forced.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local state = nil
if redis.call('TYPE', KEYS[1]).ok == 'hash' then
  state = redis.call('HGET', KEYS[1], 'state')
end
if state ~= 'UNKNOWN' and ARGV[1] ~= '1' then
  return 0
end
redis.call('DEL', KEYS[1])
return 1

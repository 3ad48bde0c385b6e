-- check_claim.lua: one replica at a time may ask the backend whether an UNKNOWN
-- record's request was executed (the route's status check).
--
-- KEYS[1]  the record
-- ARGV[1]  checker token, unique per check
-- ARGV[2]  check lease in milliseconds (how long this checker holds the check)
-- ARGV[3]  the most checks a record gets
-- ARGV[4]  the least age in milliseconds, from the claim, before the first check
--
-- Returns one of:
--   {'claimed', target, attempt}   the caller checks now (attempt counts from 1)
--   {'later', wait_ms}             another checker holds the check, or the next one
--                                  is not due yet (too young, or backing off)
--   {'none'}                       nothing to check: not UNKNOWN (a SENT record is
--                                  still its owner's, waiting for a late answer), no
--                                  status-check target stored, or the limit reached
-- Transitions allowed: UNKNOWN -> UNKNOWN with check_token, check_lease set and
-- checks + 1. The state itself never changes here.
local key = KEYS[1]
local r = redis.call('HMGET', key, 'state', 'check', 'checks', 'check_lease', 'check_next',
                     'created')
if r[1] ~= 'UNKNOWN' or not r[2] or r[2] == '' then
  return {'none'}
end
local checks = tonumber(r[3] or '0')
if checks >= tonumber(ARGV[3]) then
  return {'none'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = math.max(tonumber(r[4] or '0'), tonumber(r[5] or '0'),
                     tonumber(r[6] or '0') + tonumber(ARGV[4]))
if due > now then
  return {'later', due - now}
end
redis.call('HSET', key, 'check_token', ARGV[1], 'check_lease', now + tonumber(ARGV[2]),
           'checks', checks + 1)
return {'claimed', r[2], checks + 1}

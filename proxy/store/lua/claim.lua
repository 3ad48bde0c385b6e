-- claim.lua: take the record for one request, or report what stands in its way.
--
-- KEYS[1]  the record (idem:{hash})
-- ARGV[1]  owner token, unique per request attempt
-- ARGV[2]  request fingerprint
-- ARGV[3]  lease in milliseconds
-- ARGV[4]  retention in milliseconds (the record's TTL from creation; kept in the record,
--          because mark_sent restarts it when the request is sent)
-- ARGV[5]  '1' when the caller will wait for the record to settle (in_flight: wait): an
--          'in_flight' answer then marks the record 'waiters', so that the transition
--          that settles it publishes on idem:settled
--
-- Returns one of:
--   {'claimed', fence}                                   the caller owns the record
--   {'completed', status, headers, body, replayable, pttl}
--   {'unknown', status, reason}
--   {'in_flight', retry_after_ms}
--   {'mismatch'}
--
-- Transitions allowed:
--   (absent)                     -> CLAIMED (fence 1, full retention TTL)
--   CLAIMED, same token          -> unchanged ('claimed': a retried claim that already won)
--   CLAIMED, lease expired       -> CLAIMED with the caller's token, fence + 1 (take-over:
--                                   nothing was sent)
--   SENT, lease expired          -> UNKNOWN (the owner died after it may have sent)
-- The fingerprint is compared before the state, so a mismatch is 422 even while the
-- first request is in flight. A record that cannot be read is treated as alive.
local key = KEYS[1]
local token, fp = ARGV[1], ARGV[2]
local lease, retention = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local r = redis.call('HMGET', key, 'state', 'fp', 'token', 'fence', 'lease', 'waiters')
local state = r[1]
if not state then
  if redis.call('EXISTS', key) == 1 then
    return {'in_flight', lease}
  end
  redis.call('HSET', key, 'state', 'CLAIMED', 'token', token, 'fence', 1, 'fp', fp,
             'lease', now + lease, 'created', now, 'retention', retention)
  redis.call('PEXPIRE', key, retention)
  return {'claimed', 1}
end
if not r[2] then
  return {'in_flight', lease}
end
if r[2] ~= fp then
  return {'mismatch'}
end
if state == 'COMPLETED' then
  local c = redis.call('HMGET', key, 'status', 'headers', 'body', 'replayable')
  return {'completed', c[1], c[2], c[3], c[4], redis.call('PTTL', key)}
end
if state == 'UNKNOWN' then
  local u = redis.call('HMGET', key, 'status', 'reason')
  return {'unknown', u[1] or '502', u[2] or ''}
end
local deadline = tonumber(r[5])
if not deadline then
  return {'in_flight', lease}
end
if state == 'CLAIMED' then
  if r[3] == token then
    return {'claimed', tonumber(r[4])}
  end
  if deadline <= now then
    local fence = redis.call('HINCRBY', key, 'fence', 1)
    redis.call('HSET', key, 'token', token, 'lease', now + lease)
    return {'claimed', fence}
  end
elseif state == 'SENT' then
  if deadline <= now then
    redis.call('HSET', key, 'state', 'UNKNOWN', 'status', 502, 'reason', 'owner-lost')
    redis.call('HDEL', key, 'lease')
    if r[6] then
      redis.pcall('PUBLISH', 'idem:settled', key)  -- a hint: never fails the claim
    end
    return {'unknown', '502', 'owner-lost'}
  end
end
if ARGV[5] == '1' then
  redis.call('HSET', key, 'waiters', 1)
end
return {'in_flight', deadline - now}

-- transition(keys=[job, counts, outbox, queued indexes...],
--            args=[status, ttl, guard, n, allowed..., m, set..., k, set_if_absent..., p, prefixes..., event, event_from,
--                  job id])
-- (announce.lua's source is put before this one)
--
-- Moves a job to a new status only when its current status allows it, so a terminal status is never overwritten: a
-- job redelivered after it succeeded cannot be dragged back to running. The counters move in the same script, so
-- they move exactly when the status does. One round trip answers what a worker starting a shard needs: whether to
-- run it, and whether it is the job's first start.
--
-- KEYS[1]: the job hash (genq:job:<id>)
-- KEYS[2]: the jobs-by-status counters (a hash: status -> jobs)
-- KEYS[3]: the callback outbox stream (genq:callbacks:outbox)
-- KEYS[4..]: queued-job indexes (genq:queued:<queue>, sorted sets of job ids) to drop the job from when the
--   transition applies: given for a terminal status, so a job that ended never stays listed as queued
--
-- ARGV[1]: the new status
-- ARGV[2]: the job hash's TTL in seconds, set again on every applied transition
-- ARGV[3]: a guard field: refuse when the job has it ("" for none)
-- ARGV[4]: n, the number of statuses the job may be in, then those n statuses
-- then m, the number of fields to set, then m field, value pairs (HSET)
-- then k, the number of fields to set only if the job lacks them, then k field, value pairs (HSETNX)
-- then p, the number of field prefixes to drop, then those p prefixes: every field starting with one is deleted
-- The groups are applied in that order: set, set if absent, then drop.
-- then the event to announce when the transition applies ("" for none; announce.lua)
-- then the status the job must have come from for the event to be announced ("" for any): a shard's start
--   re-enters running, and only the job's first start is news
-- then the job's id: its member in the queued-job indexes, and the outbox entry's job
--
-- Returns: the status the job had when the transition applied; 0 when its current status or the guard forbids it;
-- -1 when the job does not exist. An error, before anything is written, when ARGV does not match its counts.

local job = KEYS[1]
local counts = KEYS[2]

local status = ARGV[1]
local ttl = ARGV[2]
local guard = ARGV[3]

-- Where each counted group starts in ARGV.
local allowed_at = 4
local set_at = allowed_at + tonumber(ARGV[allowed_at]) + 1
local keep_at = set_at + 2 * tonumber(ARGV[set_at]) + 1
local drop_at = keep_at + 2 * tonumber(ARGV[keep_at]) + 1
local event_at = drop_at + tonumber(ARGV[drop_at]) + 1
if event_at + 2 ~= #ARGV then
  return redis.error_reply('transition: ARGV does not match its group counts')
end

local current = redis.call('HGET', job, 'status')
if not current then return -1 end
local allowed = false
for i = allowed_at + 1, set_at - 1 do
  if ARGV[i] == current then allowed = true end
end
if not allowed then return 0 end
if guard ~= '' and redis.call('HEXISTS', job, guard) == 1 then return 0 end

redis.call('HSET', job, 'status', status)
if current ~= status then
  redis.call('HINCRBY', counts, current, -1)
  redis.call('HINCRBY', counts, status, 1)
end
for i = set_at + 1, keep_at - 1, 2 do
  redis.call('HSET', job, ARGV[i], ARGV[i + 1])
end
for i = keep_at + 1, drop_at - 1, 2 do
  redis.call('HSETNX', job, ARGV[i], ARGV[i + 1])
end
for i = drop_at + 1, event_at - 1 do
  local prefix = ARGV[i]
  for _, field in ipairs(redis.call('HKEYS', job)) do
    if string.sub(field, 1, #prefix) == prefix then redis.call('HDEL', job, field) end
  end
end
for i = 4, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[#ARGV])
end
redis.call('EXPIRE', job, ttl)
local event, event_from = ARGV[event_at], ARGV[event_at + 1]
if event ~= '' and (event_from == '' or event_from == current) then announce(job, KEYS[3], ARGV[#ARGV], event) end
return current

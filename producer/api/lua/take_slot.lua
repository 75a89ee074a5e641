-- take_slot(keys=[active], args=[job_prefix, limit, job_id, now, grace, ttl])
--
-- The queued-jobs quota: counts the key's jobs still queued or running and takes a slot for one more. Members are
-- pruned when their job record says terminal (or is gone), so the count heals itself without workers knowing about
-- keys. A member with no job record yet is a submit in flight: kept for `grace` seconds.
--
-- Reads each member's job record by a key name it is not handed in KEYS (ARGV[1] .. id): fine on one Redis, not on
-- Redis Cluster.
--
-- KEYS[1]: the key's active-job sorted set (member = job id, score = when the slot was taken)
--
-- ARGV[1]: the job key prefix ("genq:job:")
-- ARGV[2]: the key's most jobs queued or running at once
-- ARGV[3]: the id of the job asking for a slot
-- ARGV[4]: now, Unix seconds
-- ARGV[5]: grace in seconds for a member with no job record yet
-- ARGV[6]: the sorted set's TTL in seconds
--
-- Returns: the number of active jobs before this one, or -(that number) when the limit refused it (nothing taken).

local active_jobs = KEYS[1]

local job_prefix = ARGV[1]
local limit = tonumber(ARGV[2])
local job_id = ARGV[3]
local now = tonumber(ARGV[4])
local grace = tonumber(ARGV[5])
local ttl = ARGV[6]

local active = 0
local members = redis.call('ZRANGE', active_jobs, 0, -1, 'WITHSCORES')
for i = 1, #members, 2 do
  local id, since = members[i], tonumber(members[i + 1])
  local status = redis.call('HGET', job_prefix .. id, 'status')
  if status == 'queued' or status == 'running' or (not status and now - since < grace) then
    active = active + 1
  else
    redis.call('ZREM', active_jobs, id)
  end
end
if active >= limit then return -active end
redis.call('ZADD', active_jobs, now, job_id)
redis.call('EXPIRE', active_jobs, ttl)
return active

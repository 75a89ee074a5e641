-- undelivered(keys=[job], args=[])
--
-- What the sweeper needs to know of one job in one read: its status, and which of its shards no worker has started
-- yet (no delivery counted), to send again the messages the broker lost.
--
-- KEYS[1]: the job hash (genq:job:<id>)
--
-- ARGV: none
--
-- Returns: {} for a job with no record; else {status, shards, shard_size or "", then the index of every shard with
-- no delivery counted while the job is queued or running}, all strings.

local job = KEYS[1]

local status = redis.call('HGET', job, 'status')
if not status then return {} end
local shards = tonumber(redis.call('HGET', job, 'shards') or '1')
local out = {status, tostring(shards), redis.call('HGET', job, 'shard_size') or ''}
if status == 'queued' or status == 'running' then
  for k = 0, shards - 1 do
    if redis.call('HEXISTS', job, 'deliveries:' .. k) == 0 then table.insert(out, tostring(k)) end
  end
end
return out

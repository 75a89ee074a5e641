-- complete_shard(keys=[job], args=[field, outputs])
--
-- Records a finished shard's outputs once: a redelivered shard that finishes again changes nothing.
--
-- KEYS[1]: the job hash (genq:job:<id>)
--
-- ARGV[1]: the shard's field, "shard:<k>"
-- ARGV[2]: the shard's outputs, as JSON
--
-- Returns: how many of the job's shards are now finished, or -1 when this shard was already recorded (a redelivery).

local job = KEYS[1]

local field = ARGV[1]
local outputs = ARGV[2]

if redis.call('HSETNX', job, field, outputs) == 0 then return -1 end
return redis.call('HINCRBY', job, 'shards_done', 1)

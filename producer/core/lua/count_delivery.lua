-- count_delivery(keys=[job], args=[field])
--
-- Counts one more delivery of a shard's task, only for a job that has a record: HINCRBY alone would create a record
-- without spec or TTL for a job that expired.
--
-- KEYS[1]: the job hash (genq:job:<id>)
--
-- ARGV[1]: the shard's delivery counter field, "deliveries:<k>"
--
-- Returns: the shard's deliveries so far, this one included, or -1 when the job has no record.

local job = KEYS[1]

local field = ARGV[1]

if redis.call('EXISTS', job) == 0 then return -1 end
return redis.call('HINCRBY', job, field, 1)

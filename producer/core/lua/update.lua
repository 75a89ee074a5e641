-- update(keys=[job, outbox], args=[event, job id, field, value, ...])  (announce.lua's source is put before it)
--
-- Sets fields of a running job's record (a shard's progress, a fine-tune's latest state) and, when asked, announces
-- an event in the same step.
--
-- KEYS[1]: the job hash (genq:job:<id>)
-- KEYS[2]: the callback outbox stream (genq:callbacks:outbox)
--
-- ARGV[1]: the event to announce ("progress"), or "" for none
-- ARGV[2]: the job's id
-- ARGV[3..]: field, value pairs to set (HSET)
--
-- Returns: 1 when the job exists (the fields are set), 0 when it does not (nothing is written: a record that
-- expired is not brought back as a hash of progress fields alone).

local job = KEYS[1]
local outbox = KEYS[2]

if #ARGV < 4 or #ARGV % 2 ~= 0 then
  return redis.error_reply('update: ARGV must be an event, a job id and field, value pairs')
end
if redis.call('EXISTS', job) == 0 then return 0 end
redis.call('HSET', job, unpack(ARGV, 3))
if ARGV[1] ~= '' then announce(job, outbox, ARGV[2], ARGV[1]) end
return 1

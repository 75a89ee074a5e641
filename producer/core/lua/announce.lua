-- announce(job, outbox, job_id, event): a function for other scripts, not a script. Its source is put before the
-- scripts that announce an event in the same step as the change it announces (transition.lua, progress.lua), so an event is
-- written exactly when its change is, and the worker that made the change sends nothing itself: a relay in the
-- callbacks workers turns outbox entries into deliveries (producer.core.callbacks.outbox).
--
-- job: the job hash (genq:job:<id>); outbox: the outbox stream (genq:callbacks:outbox)
-- job_id: the job's id; event: the event type (running, progress, succeeded, failed, canceled)
--
-- Appends one entry {job, event, seq, record} to the outbox: seq is the job's next event sequence number (the
-- same counter the cancel call's canceled event takes; a job's queued event is seq 1, written with its record by
-- JobStore.create), record the job hash as it is now, as a JSON object.
-- Shards' output lists (shard:*, partial:*) are left out unless the job failed or was canceled: only those views
-- list them, and a running bulk job's would make every progress event hundreds of kB.
-- Returns: the sequence number.

local function announce(job, outbox, job_id, event)
  local seq = redis.call('HINCRBY', job, 'event_seq', 1)
  local fields = redis.call('HGETALL', job)
  local status = nil
  for i = 1, #fields, 2 do
    if fields[i] == 'status' then status = fields[i + 1] end
  end
  local lists_outputs = status == 'failed' or status == 'canceled'
  local record = {}
  for i = 1, #fields, 2 do
    local name = fields[i]
    if lists_outputs or not (string.sub(name, 1, 6) == 'shard:' or string.sub(name, 1, 8) == 'partial:') then
      record[name] = fields[i + 1]
    end
  end
  redis.call('XADD', outbox, '*', 'job', job_id, 'event', event, 'seq', seq, 'record', cjson.encode(record))
  return seq
end

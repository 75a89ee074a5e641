-- allocate_version(keys=[counter], args=[floor])
--
-- Gives out the next version number of a model. The counter is first raised to the highest version already
-- published (the floor), in the same atomic step: two publishers starting at once on a counter Redis lost (or never
-- had) still get distinct numbers above the floor.
--
-- KEYS[1]: the model's version counter (genq:model:<name>:versions)
--
-- ARGV[1]: the floor, the highest version number already published (0 for none)
--
-- Returns: the version number given out.

local counter = KEYS[1]

local floor = tonumber(ARGV[1])

local current = tonumber(redis.call('GET', counter) or '0')
if current < floor then
    redis.call('SET', counter, floor)
end
return redis.call('INCR', counter)

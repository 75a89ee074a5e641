-- take_images(keys=[counter], args=[images, limit, ttl])
--
-- The images-per-day quota: takes a job's images from the key's allowance for the day, or nothing when they do not
-- fit.
--
-- KEYS[1]: the key's counter for one UTC day
--
-- ARGV[1]: images the job needs
-- ARGV[2]: the key's images per day
-- ARGV[3]: the counter's TTL in seconds, set when the day's first images are taken
--
-- Returns: the day's new total, or -(the total it would have reached) when the limit refused it (nothing taken).

local counter = KEYS[1]

local n = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local ttl = ARGV[3]

local total = redis.call('INCRBY', counter, n)
if total == n then redis.call('EXPIRE', counter, ttl) end
if total > limit then
  redis.call('DECRBY', counter, n)
  return -total
end
return total

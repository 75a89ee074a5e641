-- take_dataset(keys=[expiries, sizes, total], args=[reference, bytes, limit, expires_at, ttl])
--
-- The data set bytes quota: records one upload with its size and expiry when it fits in the key's allowance, before
-- a byte of it is stored, so uploads sent at once can never store more than the limit between them.
--
-- KEYS[1]: the key's data sets, a sorted set (member = reference, score = when it expires, Unix seconds)
-- KEYS[2]: the key's data set sizes, a hash (reference -> bytes)
-- KEYS[3]: the key's counter of bytes stored (the sum of KEYS[2])
--
-- ARGV[1]: the upload's reference ("<upload id>/<file name>")
-- ARGV[2]: its size in bytes
-- ARGV[3]: the key's most bytes stored at once
-- ARGV[4]: when the upload expires, Unix seconds
-- ARGV[5]: TTL of the three keys in seconds, renewed here (longer than any upload lives)
--
-- Returns: {1, bytes stored before it} when taken, {0, bytes stored} when the limit refused it (nothing taken).

local expiries = KEYS[1]
local sizes = KEYS[2]
local total = KEYS[3]

local reference = ARGV[1]
local n = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local expires_at = ARGV[4]
local ttl = ARGV[5]

local used = tonumber(redis.call('GET', total) or '0')
if used + n > limit then return {0, used} end
redis.call('ZADD', expiries, expires_at, reference)
redis.call('HSET', sizes, reference, n)
redis.call('INCRBY', total, n)
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ttl) end
return {1, used}

-- forget_datasets(keys=[expiries, sizes, total], args=[reference, ...])
--
-- Gives back the bytes of data sets that are gone: deleted from object storage after they expired, or never stored
-- (their upload failed). A reference not recorded (forgotten already by a concurrent call) frees nothing.
--
-- KEYS[1]: the key's data sets, a sorted set (member = reference, score = when it expires, Unix seconds)
-- KEYS[2]: the key's data set sizes, a hash (reference -> bytes)
-- KEYS[3]: the key's counter of bytes stored (the sum of KEYS[2])
--
-- ARGV: the references to forget, one or more
--
-- Returns: the bytes freed.

local expiries = KEYS[1]
local sizes = KEYS[2]
local total = KEYS[3]

local freed = 0
for _, reference in ipairs(ARGV) do
  local n = tonumber(redis.call('HGET', sizes, reference) or '0')
  redis.call('ZREM', expiries, reference)
  redis.call('HDEL', sizes, reference)
  freed = freed + n
end
if freed > 0 then redis.call('DECRBY', total, freed) end
return freed

-- take_token(keys=[bucket], args=[rate, burst])
--
-- The request rate limit: a token bucket per API key, clocked by Redis TIME so API processes with skewed clocks
-- agree.
--
-- KEYS[1]: the key's bucket, a hash {tokens, ts}
--
-- ARGV[1]: tokens refilled per second
-- ARGV[2]: the bucket's size (the burst)
--
-- Returns: "0" when a token was taken, else the seconds until one is available, as a string: Lua numbers returned
-- to Redis are truncated to integers.

local bucket = KEYS[1]

local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', bucket, 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
if tokens < 1 then
  return tostring((1 - tokens) / rate)
end
redis.call('HSET', bucket, 'tokens', tostring(tokens - 1), 'ts', tostring(now))
redis.call('EXPIRE', bucket, math.ceil(burst / rate) + 1)
return '0'

-- release(keys=[lease], args=[token])
--
-- Deletes a lease only while we still hold it: a holder that lost its lease must not free the one another worker
-- holds now.
--
-- KEYS[1]: the lease (a string holding its holder's token)
--
-- ARGV[1]: our token
--
-- Returns: 1 when deleted, 0 when the lease is gone or held by another token.

local lease = KEYS[1]

local token = ARGV[1]

if redis.call('GET', lease) == token then return redis.call('DEL', lease) end
return 0

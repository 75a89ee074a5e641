-- renew(keys=[lease], args=[token, ttl_ms])
--
-- Extends a lease only while we still hold it: a holder that stalled past its TTL must not extend the lease another
-- worker has taken over since.
--
-- KEYS[1]: the lease (a string holding its holder's token)
--
-- ARGV[1]: our token
-- ARGV[2]: the new TTL in milliseconds
--
-- Returns: 1 when extended, 0 when the lease is gone or held by another token.

local lease = KEYS[1]

local token = ARGV[1]
local ttl_ms = ARGV[2]

if redis.call('GET', lease) == token then return redis.call('PEXPIRE', lease, ttl_ms) end
return 0

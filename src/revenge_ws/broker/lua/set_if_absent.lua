-- KEYS: key. ARGV: value, ttl ms. Returns the existing value, or nil after storing.
local old = redis.call('GET', KEYS[1])
if old then return old end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false

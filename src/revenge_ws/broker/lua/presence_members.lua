-- KEYS: presence zset, presence info hash. Prunes expired entries, returns
-- {client id, info, client id, info, ...} of the live ones.
local _t = redis.call('TIME')
local now = tonumber(_t[1]) * 1000 + math.floor(tonumber(_t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #dead > 0 then
  for i = 1, #dead do redis.call('HDEL', KEYS[2], dead[i]) end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
local alive = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for i = 1, #alive do
  local info = redis.call('HGET', KEYS[2], alive[i])
  if info then
    out[#out + 1] = alive[i]
    out[#out + 1] = info
  end
end
return out

-- A channel's position and the publications after `since`, never a partial list.
-- KEYS: meta, history. ARGV: fresh epoch, since epoch ('' = no since), since seq, limit,
-- default history ttl ms, meta ttl ms. Returns {epoch, top seq, recovered 0/1, payloads...}.
local _t = redis.call('TIME')
local now = tonumber(_t[1]) * 1000 + math.floor(tonumber(_t[2]) / 1000)
-- Who assigns seqs: this server's run id and replication id. A promoted replica (failover),
-- a restart or a master that synced from another one has another id than the server that
-- wrote a channel's meta, and may have lost that server's last writes (replication is
-- asynchronous): the channel then starts a new epoch rather than hand out a seq again.
-- '' when INFO is not available to scripts: then the check is off.
local mid = ''
local _info = redis.pcall('INFO', 'server', 'replication')
if type(_info) == 'string' then
  mid = (string.match(_info, 'run_id:(%w+)') or '') .. ':'
    .. (string.match(_info, 'master_replid:(%w+)') or '')
end
local meta, hist = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'epoch', 'seq', 'ttl', 'rid')
local epoch, top, httl = m[1], tonumber(m[2]), tonumber(m[3])
if not epoch or (m[4] or '') ~= mid then
  -- Persist the new epoch now: the next publish must continue it, or every subscriber
  -- that read this position would see a second, spurious epoch change.
  epoch, top, httl = ARGV[1], 0, tonumber(ARGV[5])
  redis.call('DEL', hist)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'ttl', ARGV[5], 'rid', mid)
end
top = top or 0
httl = httl or tonumber(ARGV[5])
redis.call('PEXPIRE', meta, math.max(tonumber(ARGV[6]), httl))
local cutoff = now - httl
local limit = tonumber(ARGV[4])
if ARGV[2] == '' then
  local out = {epoch, top, 1}
  if limit > 0 then
    local entries = redis.call('XREVRANGE', hist, '+', '-', 'COUNT', limit)
    for i = #entries, 1, -1 do
      local f = entries[i][2]
      if tonumber(f[2]) >= cutoff then out[#out + 1] = f[4] end
    end
  end
  return out
end
local since = tonumber(ARGV[3])
if ARGV[2] ~= epoch or since > top then return {epoch, top, 0} end
local missed = top - since
if missed == 0 then return {epoch, top, 1} end
if limit > 0 and missed > limit then return {epoch, top, 0} end
local entries = redis.call('XRANGE', hist, string.format('%d', since + 1), '+', 'COUNT', missed)
-- ids are distinct seqs in [since+1, top]: exactly `missed` of them means no gap.
if #entries ~= missed then return {epoch, top, 0} end
local out = {epoch, top, 1}
for i = 1, #entries do
  local f = entries[i][2]
  if tonumber(f[2]) < cutoff then return {epoch, top, 0} end
  out[#out + 1] = f[4]
end
return out

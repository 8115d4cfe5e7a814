-- Publish one publication: idempotency check, seq, history, PUBLISH — all or nothing.
-- KEYS: meta, history[, idempotency]. ARGV: fresh epoch, payload head, payload tail,
-- size, history ttl ms, meta ttl ms, idempotency ttl ms, pub/sub channel.
-- Returns {1, epoch, seq} for a new publication, {0, epoch, seq, payload|nil} for a
-- repeated idempotency key (nothing written, nothing published).
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
local m = redis.call('HMGET', meta, 'epoch', 'rid')
local epoch = m[1]
if not epoch or (m[2] or '') ~= mid then
  -- No meta: a new channel, or Redis lost it (flush, restart, expiry); or another server
  -- assigned its seqs (see mid). Start a new epoch, and drop any history left from the
  -- old one so the two never mix.
  epoch = ARGV[1]
  redis.call('DEL', hist)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'rid', mid)
end
if KEYS[3] then
  local first = redis.call('GET', KEYS[3])
  if first then
    local sep = string.find(first, ':', 1, true)
    local e, s = string.sub(first, 1, sep - 1), string.sub(first, sep + 1)
    local payload = false
    if e == epoch then
      local found = redis.call('XRANGE', hist, s, s)
      if #found > 0 then payload = found[1][2][4] end
    end
    return {0, e, tonumber(s), payload}
  end
end
local seq = redis.call('HINCRBY', meta, 'seq', 1)
local sseq = string.format('%d', seq)
local payload = ARGV[2] .. sseq .. ',"epoch":"' .. epoch .. '"' .. ARGV[3]
local size, httl, mttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('HSET', meta, 'ttl', ARGV[5])
if size > 0 and httl > 0 then
  local id = sseq .. '-0'
  local stamp = string.format('%d', now)
  local ok = redis.pcall('XADD', hist, 'MAXLEN', size, id, 't', stamp, 'p', payload)
  if type(ok) == 'table' and ok.err then
    -- A stream left with higher ids than this epoch's seq: it cannot be ours.
    redis.call('DEL', hist)
    redis.call('XADD', hist, 'MAXLEN', size, id, 't', stamp, 'p', payload)
  end
  redis.call('PEXPIRE', hist, httl)
else
  redis.call('DEL', hist)
end
redis.call('PEXPIRE', meta, math.max(mttl, httl))
if KEYS[3] then
  redis.call('SET', KEYS[3], epoch .. ':' .. sseq, 'PX', ARGV[7])
end
redis.call('PUBLISH', ARGV[8], payload)
return {1, epoch, seq}

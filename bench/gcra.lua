-- GCRA (a token bucket kept as a theoretical arrival time, TAT) over one or
-- more rates, decided atomically: a denial by any rate consumes from none.
-- This is the script a user writes by hand for a redis.asyncio limiter; the
-- benchmark uses it for the `python-redis` case and for `redis-benchmark`.
--
-- KEYS[i]       bucket key of rate i, e.g. rg:{user:42}:10/1000
-- ARGV[1]       cost (>= 0; 0 = peek, nothing is written)
-- ARGV[2i]      emission interval of rate i in microseconds (period / limit)
-- ARGV[2i+1]    burst of rate i (bucket size in tokens)
-- Time comes from Redis TIME, so every app server agrees.
--
-- Returns {allowed 0|1, limit (burst), remaining, reset_after_us,
--          retry_after_us, index (0-based) of the reported rate}:
-- the denying rate with the longest wait, or else the rate with the fewest
-- tokens left.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local n = #KEYS
local new_tats = {}
local deny_i, deny_wait = 0, -1
local best_i, best_left = 0, nil
for i = 1, n do
  local T = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local tau = T * burst
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new_tat = tat + cost * T
  new_tats[i] = new_tat
  local allow_at = new_tat - tau
  if allow_at > now then
    if allow_at - now > deny_wait then deny_i, deny_wait = i, allow_at - now end
  else
    local left = math.floor((now - allow_at) / T)
    if best_left == nil or left < best_left then best_i, best_left = i, left end
  end
end
if deny_i > 0 then
  local T = tonumber(ARGV[2 * deny_i])
  local burst = tonumber(ARGV[2 * deny_i + 1])
  local tat = new_tats[deny_i] - cost * T
  local left = math.floor((now - (tat - T * burst)) / T)
  if left < 0 then left = 0 end
  return {0, burst, left, math.ceil(tat - now), math.ceil(deny_wait), deny_i - 1}
end
if cost > 0 then
  for i = 1, n do
    local ttl = math.ceil((new_tats[i] - now) / 1000)
    if ttl < 1 then ttl = 1 end
    -- '%.3f': Lua's default number format (%.14g) would round a TAT in µs.
    redis.call('SET', KEYS[i], string.format('%.3f', new_tats[i]), 'PX', ttl)
  end
end
return {1, tonumber(ARGV[2 * best_i + 1]), best_left, math.ceil(new_tats[best_i] - now), 0, best_i - 1}

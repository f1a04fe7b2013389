/*
 * script.c: the Lua script that Redis runs for a batch of checks.
 * Loop-thread side only in that it is sent by the connection; it is plain
 * data and touches nothing.
 */
#include "script.h"

/*
 * The batched GCRA script: one call decides many checks, each over several
 * rates, with the same arithmetic as gcra.c (keep them in step).
 *
 * KEYS: for each check, one key per rate.
 * ARGV: [1] number of checks; then per check: cost (-1: reset, i.e.
 *       delete the check's keys), number of rates, then per rate: T and tau
 *       in microseconds ("%.17g").  (The body reads them as K and A.)
 * Reply: per check six integers: allowed, reported rate (0-based),
 *       remaining, reset_us, retry_us, block_us (see rg_result); a reset
 *       answers 1 and zeros.  allowed is -1 when Redis refused one of the
 *       check's commands (a key of the wrong type, OOM): redis.pcall keeps
 *       that from failing the other checks of the batch, which are decided
 *       as usual, and Redis's own error text (the first) follows the
 *       integers as one more element, so the cause is not lost.  allowed
 *       is -2 when a key is not this cluster node's (rg_script_xslot only).
 *
 * Time is Redis's TIME, counted from 2023-11-14 (1.7e9 s) so that
 * microseconds stay far below 2^53.  A TAT is stored with 17 significant
 * digits (Lua's default tostring keeps only 14), with a TTL of the time
 * until the bucket is full: a full bucket leaves no key behind.
 */
#define RG_SCRIPT_BODY \
    "if redis.replicate_commands then redis.replicate_commands() end\n" \
    "local t = redis.call('TIME')\n" \
    "local now = (tonumber(t[1]) - 1700000000) * 1000000 + tonumber(t[2])\n" \
    "local out, a, k, why = {}, 2, 1, nil\n" \
    "local floor, ceil, pcall = math.floor, math.ceil, redis.pcall\n" \
    "local function failed(e)\n" \
    "  if type(e) == 'table' and e.err then\n" \
    "    if string.find(e.err, 'non local key', 1, true) then return -2 end\n" \
    "    why = why or e.err; return -1\n" \
    "  end\n" \
    "  return nil\n" \
    "end\n" \
    "for c = 1, tonumber(A[1]) do\n" \
    "  local cost, nr = tonumber(A[a]), tonumber(A[a + 1])\n" \
    "  a = a + 2\n" \
    "  local rate, rem, reset, retry, block, allowed = 1, -1, 0, 0, 0, 1\n" \
    "  if cost < 0 then\n" \
    "    for j = 1, nr do\n" \
    "      local f = failed(pcall('DEL', K[k + j - 1])); if f then allowed = f end\n" \
    "    end\n" \
    "    a = a + 2 * nr\n" \
    "  else\n" \
    "  local T, tau, sl, t0, nw = {}, {}, {}, {}, {}\n" \
    "  for j = 1, nr do\n" \
    "    T[j], tau[j] = tonumber(A[a]), tonumber(A[a + 1])\n" \
    "    sl[j] = T[j] < 2 and T[j] / 2 or 1\n" \
    "    a = a + 2\n" \
    "    local v = pcall('GET', K[k + j - 1])\n" \
    "    local f = failed(v); if f then allowed = f; v = 0 end\n" \
    "    v = tonumber(v) or 0\n" \
    "    if v < now then v = now end\n" \
    "    t0[j], nw[j] = v, v + cost * T[j]\n" \
    "    if allowed == 1 and nw[j] - now > tau[j] + sl[j] then allowed = 0 end\n" \
    "  end\n" \
    "  if allowed == 1 then\n" \
    "    for j = 1, nr do\n" \
    "      local r = floor((tau[j] - (nw[j] - now) + sl[j]) / T[j])\n" \
    "      if r < 0 then r = 0 end\n" \
    "      if rem < 0 or r < rem then rem, rate, reset = r, j, ceil(nw[j] - now) end\n" \
    "      if cost > 0 then\n" \
    "        local ttl = ceil((nw[j] - now) / 1000)\n" \
    "        if ttl < 1 then ttl = 1 end\n" \
    "        local f = failed(pcall('SET', K[k + j - 1], string.format('%.17g', nw[j]), 'PX', ttl))\n" \
    "        if f then\n" \
    "          allowed = f\n" \
    "        end\n" \
    "      end\n" \
    "    end\n" \
    "  elseif allowed == 0 then\n" \
    "    local worst = -1\n" \
    "    for j = 1, nr do\n" \
    "      local w = nw[j] - now - tau[j]\n" \
    "      local b = t0[j] + T[j] - now - tau[j] - sl[j]\n" \
    "      if w > worst then worst, rate = w, j end\n" \
    "      if b > block then block = b end\n" \
    "    end\n" \
    "    rem = floor((tau[rate] - (t0[rate] - now) + sl[rate]) / T[rate])\n" \
    "    if rem < 0 then rem = 0 end\n" \
    "    reset, retry, block = ceil(t0[rate] - now), ceil(worst), floor(block)\n" \
    "  end\n" \
    "  end\n" \
    "  if rem < 0 then rem = 0 end\n" \
    "  if reset > 9e15 then reset = 9e15 end\n" \
    "  if retry > 9e15 then retry = 9e15 end\n" \
    "  if block > 9e15 then block = 9e15 end\n" \
    "  local o = #out\n" \
    "  out[o + 1], out[o + 2], out[o + 3] = allowed, rate - 1, rem\n" \
    "  out[o + 4], out[o + 5], out[o + 6] = reset, retry, block\n" \
    "  k = k + nr\n" \
    "end\n" \
    "if why then out[#out + 1] = why end\n" \
    "return out\n"
const char rg_script[] = "local K, A = KEYS, ARGV\n" RG_SCRIPT_BODY;
const size_t rg_script_len = sizeof(rg_script) - 1;

/*
 * Cluster, Redis >= 7.0: the same, for checks of several slots that one
 * node serves, in one call.  Redis refuses declared keys of several slots
 * even with allow-cross-slot-keys (CROSSSLOT), so the keys travel
 * undeclared: ARGV[1] is their number, then the keys, then the arguments
 * above.  Redis then checks each key as the script touches it: a key this
 * node does not serve (a slot moved, or half-migrated and the key already
 * gone) fails that command with "non local key", and its check answers -2
 * (nothing written): the engine sends it again in a call of its own slot
 * with declared keys, which gets MOVED or ASK before anything runs.
 */
const char rg_script_xslot[] =
    "#!lua flags=allow-cross-slot-keys\n"
    "local nk = tonumber(ARGV[1])\n"
    "local K, A = {}, {}\n"
    "for i = 1, nk do K[i] = ARGV[i + 1] end\n"
    "for i = nk + 2, #ARGV do A[#A + 1] = ARGV[i] end\n" RG_SCRIPT_BODY;
const size_t rg_script_xslot_len = sizeof(rg_script_xslot) - 1;

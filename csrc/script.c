/*
 * script.c: the Lua script that Redis runs for a batch of checks.
 * Loop-thread side only in that it is sent by the connection; it is plain
 * data and touches nothing.
 */
#include "script.h"

/*
 * The batched GCRA script: one call decides many checks, each over several
 * rates and optionally a concurrency limit, with the same arithmetic as
 * gcra.c (keep them in step).
 *
 * KEYS: for each check, one key per rate, then its concurrency key if it
 *       has a concurrency part.  (The body reads KEYS and ARGV as K and A,
 *       so that rg_script_xslot below can run it on undeclared keys.)
 * ARGV: [1] number of checks; [2] "1": read every key with one MGET first
 *       (no key appears twice in the call, and it is not rg_script_xslot);
 *       [3] number of specs m, then per spec: its name (a string that is
 *       not a number, "=1", "=2", ...), T and tau in microseconds ("%.17g")
 *       and the TTL in milliseconds of a full bucket's hit of cost 1
 *       (ceil(T / 1000), at least 1).  Then per check, either
 *       - the common check (a hit of one rate, no concurrency, no lease):
 *         its spec's name and the cost; or
 *       - any check: op (enum rg_op, plus RG_OP_CONC_FLAG (4) when a
 *         concurrency part follows), cost, number of rates, then per rate:
 *         T and tau in microseconds ("%.17g"); then, with the flag: the
 *         concurrency limit, the slot ttl in microseconds and the slot id.
 * Ops: 0 hit (decide; if allowed consume cost and, with the flag, take a
 *       slot: if either the rates or the concurrency limit deny, nothing is
 *       consumed), 1 reset (delete the rate keys), 2 charge (consume cost,
 *       which may be negative, without denying: a bucket may go into debt,
 *       up to RG_MAX_DEBT_US, and a refund stops at a full bucket), 3 release
 *       (remove the slot id from the concurrency key).  A hit plus
 *       RG_OP_LEASE_FLAG (8) takes a lease (lease.h): the cost is lowered
 *       to what every rate's bucket holds (at least 1, which then denies),
 *       and an allowed answer is the number of tokens taken.
 * Reply: per check first H = (allowed + 2) * 32 + rate (the reported rate,
 *       0-based; the number of rates means the concurrency limit), then
 *       remaining and reset_us; and when not allowed (allowed < 1) also
 *       retry_us and block_us (see rg_result): three integers for an
 *       allowed check, five otherwise.  A reset or a release answers
 *       allowed (1) and zeros.  allowed is -1 when Redis refused one of the
 *       check's reads (a key of the wrong type): redis.pcall keeps that from
 *       failing the other checks of the batch, which are decided as usual,
 *       and Redis's own error text (the first) follows the integers as one
 *       more element, so the cause is not lost.  allowed is -2 when a key is
 *       not this cluster node's (rg_script_xslot only: nothing was written).
 *       Writes after a read of the same key use redis.call: SET cannot meet
 *       a wrong type, and a write refused for memory (OOM) fails the call
 *       (Redis refuses every write then anyway).  The commands that come
 *       first for their key (DEL of a reset, the sorted set's) use pcall.
 *
 * Concurrency: a sorted set of slot ids scored by their expiry (now + ttl);
 * expired slots are pruned before counting, so a process that died holding
 * slots leaks them for at most ttl; the key itself expires with its last
 * slot.
 *
 * Time is Redis's TIME, counted from 2023-11-14 (1.7e9 s) so that
 * microseconds stay far below 2^53.  A TAT is stored with 17 significant
 * digits (Lua's default tostring keeps only 14, but a number given to
 * redis.call is written by Redis itself with "%.17g", exactly, with no
 * Lua string made), with a TTL of the time until the bucket is full: a
 * full bucket leaves no key behind.
 *
 * Cost per check (issues 13 and 20; measured with bench/script_cost.py and
 * INFO commandstats): Redis's own work per redis.call (about 1 us: an argv
 * built, the command looked up and run, its reply turned into Lua) and
 * per number handed to it ("%.17g", about 0.25 us) dominate, then each
 * integer of the reply (about 0.1 us) and each ARGV string made a number.
 * So the common check
 * - is read by the one MGET of the call (a wrong type reads as nil there:
 *   a key that seemed absent is written with NX, and a NX that does not
 *   write means another type, reported as GET would; the rare branches
 *   that write nothing ask GET), and then from W, the values this call has
 *   written (a key may come several times in one call: a hot key, or one
 *   client's burst), which get() of the other checks reads too;
 * - writes a key that existed once, at the end of the call, with its last
 *   value (nobody sees the values in between: a script is atomic), so a
 *   call of many checks of one key costs one SET; a key that seemed absent
 *   is written at once (SET NX, see above);
 * - takes two ARGV strings (its spec's T and tau are made numbers once per
 *   call; a cost of "1" is compared, not converted), and the first hit of
 *   cost 1 on an absent key (the usual one of a new client) takes its TTL
 *   as that string;
 * - answers three integers when allowed;
 * - allocates no Lua table and calls no Lua function (W grows).
 * Numbers written are handed to redis.call as numbers (see above).
 */
#define RG_SCRIPT_BODY \
    "local t = redis.call('TIME')\n" \
    "local now = (t[1] - 1700000000) * 1000000 + t[2]\n" \
    "local out, o, a, k, why = {}, 0, 4, 1, nil\n" \
    "local floor, ceil, call, pcall, type, tonumber =" \
    " math.floor, math.ceil, redis.call, redis.pcall, type, tonumber\n" \
    "local M = A[2] == '1' and call('MGET', unpack(K)) or nil\n" \
    "local S, W, D, dk, nd = {}, {}, {}, {}, 0\n" \
    "for _ = 1, A[3] + 0 do\n" \
    "  local T = A[a + 1] + 0\n" \
    "  S[A[a]] = {T, A[a + 2] + 0, T < 2 and T / 2 or 1, A[a + 3]}\n" \
    "  a = a + 4\n" \
    "end\n" \
    "local function err(e)\n" \
    "  if string.find(e.err, 'non local key', 1, true) then return -2 end\n" \
    "  why = why or e.err\n" \
    "  return -1\n" \
    "end\n" \
    "local function get(key)\n" \
    "  local v = W[key]\n" \
    "  if v then return v end\n" \
    "  v = pcall('GET', key)\n" \
    "  if type(v) == 'table' then return nil, err(v) end\n" \
    "  v = tonumber(v) or now\n" \
    "  if v < now then v = now end\n" \
    "  return v\n" \
    "end\n" \
    "local function put(key, v)\n" \
    "  local ms = ceil((v - now) / 1000)\n" \
    "  if ms < 1 then ms = 1 end\n" \
    "  call('SET', key, v, 'PX', ms)\n" \
    "  W[key] = v\n" \
    "end\n" \
    "for _ = 1, A[1] + 0 do\n" \
    "  local s = S[A[a]]\n" \
    "  local rate, rem, reset, retry, block, allowed = 0, 0, 0, 0, 0, 1\n" \
    "  if s then\n" \
    /* the common check: a hit of one rate, no concurrency, no lease */ \
    "    local c = A[a + 1]\n" \
    "    local cost, T, tau, sl = c == '1' and 1 or c + 0, s[1], s[2], s[3]\n" \
    "    local key, unseen = K[k], false\n" \
    "    local v = W[key]\n" \
    "    a = a + 2\n" \
    "    if not v then\n" \
    "      if M then\n" \
    /* not v: absent, or another type (seen when writing, or by GET) */ \
    "        v = M[k]\n" \
    "        unseen = not v\n" \
    "      else\n" \
    "        v = pcall('GET', key)\n" \
    "        if type(v) == 'table' then allowed = err(v) end\n" \
    "      end\n" \
    "      if allowed == 1 then\n" \
    "        v = tonumber(v) or now\n" \
    "        if v < now then v = now end\n" \
    "      end\n" \
    "    end\n" \
    "    if allowed == 1 then\n" \
    "      local nw = v + cost * T\n" \
    "      if nw - now > tau + sl then\n" \
    "        allowed, retry = 0, ceil(nw - now - tau)\n" \
    "        block = floor(v + T - now - tau - sl)\n" \
    "        if block < 0 then block = 0 end\n" \
    "        rem, reset = floor((tau - (v - now) + sl) / T), ceil(v - now)\n" \
    "      else\n" \
    /* floor and ceil without a call: x - x % 1 and x - x % -1 */ \
    "        local d = nw - now\n" \
    "        local q = (tau - d + sl) / T\n" \
    "        rem, reset = q - q % 1, d - d % -1\n" \
    "      end\n" \
    "      if allowed == 0 or cost == 0 then\n" \
    "        if unseen then\n" \
    /* nothing to write: GET tells absent from another type */ \
    "          local e = pcall('GET', key)\n" \
    "          if type(e) == 'table' then allowed = err(e) end\n" \
    "        end\n" \
    "      elseif unseen then\n" \
    "        local ms = s[4]\n" \
    "        if cost ~= 1 then\n" \
    "          ms = ceil((nw - now) / 1000)\n" \
    "          if ms < 1 then ms = 1 end\n" \
    "        end\n" \
    "        if call('SET', key, nw, 'PX', ms, 'NX') then W[key] = nw else\n" \
    "          allowed = err({err = 'WRONGTYPE Operation against a key holding the wrong kind of value'})\n" \
    "        end\n" \
    "      else\n" \
    "        W[key] = nw\n" \
    "        if not D[key] then D[key] = true; nd = nd + 1; dk[nd] = key end\n" \
    "      end\n" \
    "    end\n" \
    "    k = k + 1\n" \
    "  else\n" \
    "    local op, cost, nr = A[a] + 0, A[a + 1] + 0, A[a + 2] + 0\n" \
    "    local lease = op == 8\n" \
    "    a = a + 3\n" \
    "    if lease then op = 0 end\n" \
    "    local conc = op >= 4\n" \
    "    if conc then op = op - 4 end\n" \
    "    local T, tau, t0, nw = {}, {}, {}, {}\n" \
    "    if lease then\n" \
    /* take what every bucket holds, up to cost (a key of the wrong type is \
     * left to the loop below) */ \
    "      for j = 1, nr do\n" \
    "        local T1 = A[a + 2 * j - 2] + 0\n" \
    "        local v = get(K[k + j - 1])\n" \
    "        if v then\n" \
    "          local n = floor((A[a + 2 * j - 1] + (T1 < 2 and T1 / 2 or 1) - (v - now)) / T1)\n" \
    "          if n < cost then cost = n < 1 and 1 or n end\n" \
    "        end\n" \
    "      end\n" \
    "    end\n" \
    "    if op == 1 then\n" \
    "      for j = 1, nr do\n" \
    "        local r = pcall('DEL', K[k + j - 1])\n" \
    "        if type(r) == 'table' then allowed = err(r) else W[K[k + j - 1]] = now end\n" \
    "      end\n" \
    "      a = a + 2 * nr\n" \
    "    elseif op ~= 3 then\n" \
    "      for j = 1, nr do\n" \
    "        T[j], tau[j] = A[a] + 0, A[a + 1] + 0\n" \
    "        a = a + 2\n" \
    "        local v, e = get(K[k + j - 1])\n" \
    "        if v == nil then allowed = e; v = now end\n" \
    "        t0[j], nw[j] = v, v + cost * T[j]\n" \
    "        if op == 2 then\n" \
    "          if nw[j] < now then nw[j] = now end\n" \
    "          if nw[j] - now > 1e15 then nw[j] = now + 1e15 end\n" \
    "        elseif allowed == 1 and nw[j] - now > tau[j] + (T[j] < 2 and T[j] / 2 or 1) then\n" \
    "          allowed = 0\n" \
    "        end\n" \
    "      end\n" \
    "    end\n" \
    "    if conc then\n" \
    "      local lim, ttl, sid, ck = A[a] + 0, A[a + 1] + 0, A[a + 2], K[k + nr]\n" \
    "      a = a + 3\n" \
    "      if op == 3 then\n" \
    "        local r = pcall('ZREM', ck, sid)\n" \
    "        if type(r) == 'table' then allowed = err(r) end\n" \
    "      elseif allowed == 1 then\n" \
    "        local r = pcall('ZREMRANGEBYSCORE', ck, '-inf', now)\n" \
    "        if type(r) == 'table' then\n" \
    "          allowed = err(r)\n" \
    "        else\n" \
    "          local n = call('ZCARD', ck)\n" \
    "          if n >= lim then\n" \
    /* denied by the concurrency limit: reported as rate nr, retry in 1 s \
     * (a slot is usually given back long before its ttl) */ \
    "            allowed, rate, retry = 0, nr, 1000000\n" \
    "          else\n" \
    "            call('ZADD', ck, now + ttl, sid)\n" \
    "            local ms = ceil(ttl / 1000)\n" \
    "            if call('PTTL', ck) < ms then call('PEXPIRE', ck, ms) end\n" \
    "            if nr == 0 then rate, rem = 0, lim - n - 1 end\n" \
    "          end\n" \
    "        end\n" \
    "      end\n" \
    "    end\n" \
    "    if op == 1 or op == 3 or allowed < 0 or nr == 0 then\n" \
    "    elseif allowed == 1 then\n" \
    "      rem = -1\n" \
    "      for j = 1, nr do\n" \
    "        local d = nw[j] - now\n" \
    "        local r = floor((tau[j] - d + (T[j] < 2 and T[j] / 2 or 1)) / T[j])\n" \
    "        if r < 0 then r = 0 end\n" \
    "        if rem < 0 or r < rem then rem, rate, reset = r, j - 1, ceil(d) end\n" \
    "        if op == 2 and d <= 0 then call('DEL', K[k + j - 1]); W[K[k + j - 1]] = now\n" \
    "        elseif cost ~= 0 then put(K[k + j - 1], nw[j]) end\n" \
    "      end\n" \
    "    elseif rate < nr then\n" \
    "      local worst, w = -1, 1\n" \
    "      for j = 1, nr do\n" \
    "        local sl = T[j] < 2 and T[j] / 2 or 1\n" \
    "        local x = nw[j] - now - tau[j]\n" \
    "        local b = t0[j] + T[j] - now - tau[j] - sl\n" \
    "        if x > worst then worst, w = x, j end\n" \
    "        if b > block then block = b end\n" \
    "      end\n" \
    "      rate = w - 1\n" \
    "      rem = floor((tau[w] - (t0[w] - now) + (T[w] < 2 and T[w] / 2 or 1)) / T[w])\n" \
    "      reset, retry, block = ceil(t0[w] - now), ceil(worst), floor(block)\n" \
    "    end\n" \
    "    if conc then k = k + 1 end\n" \
    "    if lease and allowed == 1 then allowed = cost end\n" \
    "    k = k + nr\n" \
    "  end\n" \
    "  if rem < 0 then rem = 0 end\n" \
    "  if reset > 9e15 then reset = 9e15 end\n" \
    "  out[o + 1], out[o + 2], out[o + 3] = (allowed + 2) * 32 + rate, rem, reset\n" \
    "  if allowed < 1 then\n" \
    "    if retry > 9e15 then retry = 9e15 end\n" \
    "    if block > 9e15 then block = 9e15 end\n" \
    "    out[o + 4], out[o + 5] = retry, block\n" \
    "    o = o + 5\n" \
    "  else\n" \
    "    o = o + 3\n" \
    "  end\n" \
    "end\n" \
    /* the common checks' writes, one per key (the last value; a reset or a \
     * refund to full in this call may have emptied it since) */ \
    "for i = 1, nd do\n" \
    "  local key = dk[i]\n" \
    "  local v = W[key]\n" \
    "  if v > now then\n" \
    "    local ms = ceil((v - now) / 1000)\n" \
    "    call('SET', key, v, 'PX', ms < 1 and 1 or ms)\n" \
    "  end\n" \
    "end\n" \
    "if why then out[o + 1] = why end\n" \
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

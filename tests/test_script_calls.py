"""The script's calling convention and what one call costs Redis (issue 20):
the common check's form, one read for the call (MGET), one write per key and
call, and the reply's shape; the same decisions as one check per call."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import rategate
from rategate import _core
from redisserver import RedisServer

T, TAU = 6e6, 5.4e7  # 10/minute: T 6 s, burst 9 ... tau = 9 T (limit 10: tau = 10 T below)


def common(n: int, spec: tuple[float, float], costs: list[int]) -> list[Any]:
    """ARGV of n common checks of one spec (csrc/script.c)."""
    t, tau = spec
    return [n, 1, 1, "=1", repr(t), repr(tau), max(1, int(-(-t // 1000))), *[x for c in costs for x in ("=1", c)]]


def decode(out: list[Any], n: int) -> list[tuple[int, int, int, int, int, int]]:
    """[(allowed, rate, remaining, reset, retry, block)] from a reply of n checks."""
    res, at = [], 0
    for _ in range(n):
        h = out[at]
        allowed = h // 32 - 2
        if allowed >= 1:
            res.append((allowed, h % 32, out[at + 1], out[at + 2], 0, 0))
            at += 3
        else:
            res.append((allowed, h % 32, *out[at + 1:at + 5]))
            at += 5
    assert at == len(out) or (at == len(out) - 1 and isinstance(out[-1], bytes))
    return res


@pytest.fixture
def rc(redis_server: RedisServer, redis_url: str) -> Any:
    return redis_server.client()


def calls(rc: Any, cmd: str) -> int:
    return int(rc.info("commandstats").get(f"cmdstat_{cmd}", {}).get("calls", 0))


def test_one_key_many_times_in_one_call_is_written_once(rc: Any) -> None:
    # A hot key (or one client's burst): 12 checks of one key of 10/minute in
    # one call: the first 10 allowed in turn, then denied.  The key existed:
    # one SET at the end; absent, its first write is at once (NX), then one.
    key = "rg:{hot}:10/60000"
    for existed in (False, True):
        rc.set(key, 0) if existed else rc.delete(key)
        rc.config_resetstat()
        out = decode(rc.eval(_core.SCRIPT, 12, *[key] * 12, *common(12, (T, 10 * T), [1] * 12)), 12)
        assert [d[0] for d in out] == [1] * 10 + [0, 0]
        assert [d[2] for d in out[:10]] == list(range(9, -1, -1))
        assert calls(rc, "set") == (1 if existed else 2) and calls(rc, "mget") == 1 and calls(rc, "get") == 0
        assert 59_000 <= rc.pttl(key) <= 60_000  # the last value's TTL: the bucket is empty
    # the same checks one per call decide the same
    rc.delete(key)
    one = [decode(rc.eval(_core.SCRIPT, 1, key, *common(1, (T, 10 * T), [1])), 1)[0][:3] for _ in range(12)]
    assert one == [d[:3] for d in out]


def test_distinct_keys_one_read_and_a_set_each(rc: Any) -> None:
    keys = [f"rg:{{d{i}}}:10/60000" for i in range(20)]
    rc.config_resetstat()
    out = decode(rc.eval(_core.SCRIPT, 20, *keys, *common(20, (T, 10 * T), [1] * 20)), 20)
    assert all(d[0] == 1 and d[2] == 9 for d in out)
    assert calls(rc, "mget") == 1 and calls(rc, "get") == 0 and calls(rc, "set") == 20
    # a denied check writes nothing, and asks nothing more of Redis
    rc.config_resetstat()
    out = decode(rc.eval(_core.SCRIPT, 20, *keys, *common(20, (T, 10 * T), [11] * 20)), 20)
    assert all(d[0] == 0 for d in out)
    assert calls(rc, "set") == 0 and calls(rc, "get") == 0


def test_a_reset_between_hits_of_one_key_in_one_call(rc: Any) -> None:
    # hit, hit, reset (general form: op 1, cost 0, 1 rate), hit, hit: the
    # hits after the reset see a full bucket; then a reset last: no key left.
    key = "rg:{r}:10/60000"
    av = [5, 1, 1, "=1", repr(T), repr(10 * T), 6000, "=1", 1, "=1", 1, 1, 0, 1, repr(T), repr(10 * T),
          "=1", 1, "=1", 1]
    out = decode(rc.eval(_core.SCRIPT, 5, *[key] * 5, *av), 5)
    assert [d[2] for d in out] == [9, 8, 0, 9, 8]  # the reset answers allowed, zeros
    assert rc.exists(key) == 1
    av = [3, 1, 1, "=1", repr(T), repr(10 * T), 6000, "=1", 1, "=1", 1, 1, 0, 1, repr(T), repr(10 * T)]
    out = decode(rc.eval(_core.SCRIPT, 3, *[key] * 3, *av), 3)
    assert [d[0] for d in out] == [1, 1, 1]
    assert rc.exists(key) == 0


def test_wrong_type_seen_through_mget(rc: Any) -> None:
    # MGET reads another type as nil: the NX write finds it, and only that
    # check fails, with Redis's word for it.
    rc.rpush("rg:{w}:10/60000", "x")
    keys = ["rg:{ok}:10/60000", "rg:{w}:10/60000", "rg:{ok2}:10/60000"]
    raw = rc.eval(_core.SCRIPT, 3, *keys, *common(3, (T, 10 * T), [1, 1, 1]))
    out = decode(raw, 3)
    assert [d[0] for d in out] == [1, -1, 1]
    assert b"WRONGTYPE" in raw[-1]
    assert rc.type("rg:{w}:10/60000") == b"list"
    # the same for a check that writes nothing (a peek)
    raw = rc.eval(_core.SCRIPT, 1, keys[1], *common(1, (T, 10 * T), [0]))
    assert decode(raw, 1)[0][0] == -1 and b"WRONGTYPE" in raw[-1]


async def test_limiter_batch_of_one_key(redis_url: str, rc: Any, make_limiter: Any) -> None:
    # Through the engine: many checks of one key submitted together ride in
    # few calls, each writing the key at most twice (once if it existed),
    # and decide exactly the limit.
    lim = make_limiter(redis_url, timeout=5.0, deny_cache=False)
    spec = lim.compile("50/minute")
    rc.config_resetstat()
    futs = [lim.submit("one", spec, 1) for _ in range(80)]
    ds = await asyncio.wait_for(asyncio.gather(*(f for f in futs if not isinstance(f, rategate.Decision))), 10)
    assert sum(d.allowed for d in ds) == 50 and all(d.error is None for d in ds)
    st = rc.info("commandstats")
    scripts = st["cmdstat_evalsha"]["calls"] + st.get("cmdstat_eval", {}).get("calls", 0)
    assert st["cmdstat_set"]["calls"] <= scripts + 1 < 80

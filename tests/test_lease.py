"""Token leases for hot keys (issue 13): ``lease=True`` answers checks of cost 1
from blocks of tokens taken from Redis, in C, without a round trip.

What is asserted, against a real redis-server:

- never over the limit: several processes' worth of Limiters (each its own
  engine and lease table) and, in test_uvicorn_lease, ``uvicorn --workers 4``
  hammering one key admit at most burst + rate * elapsed;
- bounded under-admission: at least burst - processes * (burst // 16);
- a take gets what the bucket holds, up to the block (never a denial while a
  token is left), a denial is cached like any other, leftovers of an expired
  lease go back to Redis, reset() and fork() drop the local tokens;
- the options are checked (``lease`` with ``concurrency`` is refused).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

import rategate
from rategate import Rule
from rategate.middleware import RateLimitMiddleware


async def _peek(url: str, key: str, rates: str) -> int:
    """The bucket's tokens as Redis has them (a peek from a Limiter without leases)."""
    lim = rategate.Limiter(url, timeout=5.0)
    try:
        d = await lim.hit(key, rates, 0)
        assert d.error is None
        return int(d.remaining)
    finally:
        await lim.aclose()


def _remaining(url: str, key: str, rates: str) -> int:
    """The bucket's tokens as Redis has them (from sync code)."""
    return asyncio.run(_peek(url, key, rates))


# -- options ----------------------------------------------------------------------
def test_spec_lease_flag_and_its_checks() -> None:
    lim = rategate.Limiter("memory://")
    assert lim.compile("10/second").lease is False
    assert lim.compile("10/second", lease=True).lease is True
    assert lim.compile("10/second", lease=True) is lim.compile("10/second", lease=True)
    assert lim.compile("10/second") is not lim.compile("10/second", lease=True)
    assert rategate.Limiter("memory://", lease=True).compile("10/second").lease is True
    with pytest.raises(ValueError, match="lease must be True or False"):
        rategate.Limiter("memory://", lease="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lease must be True or False"):
        lim.compile("10/second", lease=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lease=True cannot go with a concurrency limit"):
        lim.compile("10/second", concurrency=2, lease=True)
    # A leasing limiter's concurrency specs simply do not lease.
    assert rategate.Limiter("memory://", lease=True).compile("10/second", concurrency=2).lease is False
    with pytest.raises(TypeError, match="lease must be True, False or None"):
        Rule("/a", "1/second", lease="on")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lease=True cannot go with concurrency"):
        Rule("/a", "1/second", lease=True, concurrency=2)


def test_rules_take_lease(redis_url: str) -> None:
    lim = rategate.Limiter(redis_url)

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - not called
        pass

    mw = RateLimitMiddleware(app, limiter=lim, limits="100/minute",
                             rules={"/hot": {"limits": "1000/second", "lease": True}},
                             exempt=["/health"])
    rules = {r.name: r for r in mw.rules}
    assert rules["/hot"].spec.lease is True
    assert mw.default is not None and mw.default.spec.lease is False
    mw2 = RateLimitMiddleware(app, limiter=lim, rules=[Rule("/hot", "1000/second", lease=True)])
    assert mw2.rules[0].spec.lease is True
    from rategate.fastapi import RateLimit

    assert RateLimit("1000/second", limiter=lim, lease=True)._spec.lease is True
    assert RateLimit("1000/second", limiter=lim)._spec.lease is False
    with pytest.raises(ValueError, match="lease=True cannot go with concurrency"):
        RateLimit("1000/second", limiter=lim, lease=True, concurrency=2)
    lim.close()


# -- one process ------------------------------------------------------------------
async def test_hot_key_is_answered_locally_and_counts_stay_exact(redis_url: str, make_limiter: Any) -> None:
    lim = make_limiter(redis_url, lease=True, timeout=5.0)
    # 1000/day: the bucket does not refill during the test, so the counts are exact.
    ds = [await lim.hit("hot", "1000/day") for _ in range(300)]
    assert all(d.allowed and d.error is None for d in ds)
    st = lim.stats()
    assert st["checks"] == 300 and st["allowed"] == 300
    # The blocks grow from 10 to the cap (1000 // 16 = 62): most are local.
    assert st["leased"] >= 250, st
    # Redis counted the 300 plus what the lease holds (at most one block).
    held = await _peek(redis_url, "hot", "1000/day")
    assert 1000 - 300 - 62 <= held <= 1000 - 300
    # The reported remaining counts what Redis has and what this process holds.
    assert 1000 - 300 - 1 <= ds[-1].remaining <= 1000 - 300 + 1


async def test_a_take_gets_what_the_bucket_holds(redis_url: str, make_limiter: Any) -> None:
    plain = make_limiter(redis_url, timeout=5.0)
    lim = make_limiter(redis_url, lease=True, timeout=5.0)
    assert (await plain.hit("p", "400/day", 395)).allowed
    # The first take asks for 10; 5 are left: 5 allowed (one take, four
    # local), then denied, and the denial is cached like any other.
    got = [(await lim.hit("p", "400/day")).allowed for _ in range(10)]
    assert got == [True] * 5 + [False] * 5
    st = lim.stats()
    assert st["leased"] == 4 and st["cached_denials"] >= 4, st


async def test_several_rates_lease_the_smallest(redis_url: str, make_limiter: Any) -> None:
    lim = make_limiter(redis_url, lease=True, timeout=5.0)
    t0 = time.monotonic()
    ok = sum([(await lim.hit("m", "1000/hour; 48/minute")).allowed for _ in range(100)])
    elapsed = time.monotonic() - t0
    assert 48 <= ok <= 48 + int(elapsed * 48 / 60) + 1
    assert lim.stats()["leased"] > 0


async def test_expired_leftovers_go_back_to_redis(redis_url: str, make_limiter: Any) -> None:
    lim = make_limiter(redis_url, lease=True, timeout=5.0)
    # 1000/day refills one token every 86 s: nothing comes back by itself.
    assert (await lim.hit("r", "1000/day")).allowed  # a take of 10, one used
    assert await _peek(redis_url, "r", "1000/day") == 990
    await asyncio.sleep(1.1)  # the lease is usable for at most 1 s
    assert (await lim.hit("r", "1000/day")).allowed  # 9 back, a take of 1
    assert await _peek(redis_url, "r", "1000/day") == 998


async def test_reset_drops_the_lease(redis_url: str, make_limiter: Any) -> None:
    lim = make_limiter(redis_url, lease=True, timeout=5.0)
    assert (await lim.hit("z", "1000/day")).allowed  # holds 9
    assert await lim.reset("z", "1000/day")
    assert (await lim.hit("z", "1000/day")).allowed  # a new take, not the old tokens
    assert lim.stats()["leased"] == 0
    assert await _peek(redis_url, "z", "1000/day") < 1000


async def test_redis_down_answers_the_failure_mode_and_recovers(own_redis: Any, make_limiter: Any) -> None:
    lim = make_limiter(own_redis.url, lease=True, timeout=0.2, connect_timeout=0.2)
    assert (await lim.hit("d", "5/day")).allowed  # 5 // 16: blocks of 1, nothing held
    own_redis.stop()
    d = await lim.hit("d", "5/day")
    assert not d.allowed and d.error is not None
    own_redis.start()
    for _ in range(100):
        d = await lim.hit("d", "5/day")
        if d.error is None:
            break
        await asyncio.sleep(0.05)
    assert d.allowed and d.error is None  # a fresh server: a full bucket


# -- many processes' worth -----------------------------------------------------------
async def test_four_lease_holders_never_exceed_the_limit(redis_url: str, make_limiter: Any) -> None:
    """Four Limiters (four engines, four lease tables: what four workers
    have) hammer one key; admitted <= burst + rate * elapsed, and the tokens
    parked in the others' leases cost at most 4 * (burst // 16)."""
    rates, burst, per_s = "200/minute", 200, 200 / 60
    lims = [make_limiter(redis_url, lease=True, timeout=5.0) for _ in range(4)]
    for lim in lims:  # connected, so the measured window is the checks'
        assert (await lim.hit("warm", "10/second")).allowed

    async def worker(lim: Any, n: int) -> int:
        ok = 0
        for _ in range(n):
            d = await lim.hit("global", rates)
            assert d.error is None
            ok += d.allowed
        return ok

    t0 = time.monotonic()
    counts = await asyncio.gather(*(worker(lims[i % 4], 150) for i in range(16)))
    elapsed = time.monotonic() - t0
    admitted = sum(counts)
    assert admitted <= burst + int(elapsed * per_s), (admitted, elapsed)
    assert admitted >= burst - 4 * (burst // 16), (admitted, elapsed)
    assert sum(lim.stats()["leased"] for lim in lims) > 0


# -- fork -------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_a_forked_child_does_not_spend_the_parents_lease(redis_url: str) -> None:
    from test_limiter_concurrency import _run_in_child

    lim = rategate.Limiter(redis_url, lease=True, timeout=5.0)
    try:
        taken = time.monotonic()
        assert asyncio.run(lim.hit("f", "1000/day")).allowed  # a take of 10: holds 9

        def child() -> list:
            async def go() -> list:
                d = await asyncio.wait_for(lim.hit("f", "1000/day"), 10)
                return [d.allowed, lim.stats()["leased"]]
            return asyncio.run(go())

        # The child's first check is a take of its own, not the parent's 9.
        assert _run_in_child(child) == [True, 0]
        assert _remaining(redis_url, "f", "1000/day") == 990 - 10
        # The parent still holds its 9 (while its lease lives: 1 s from the take).
        fresh = time.monotonic() - taken < 0.9
        assert asyncio.run(lim.hit("f", "1000/day")).allowed
        if fresh:
            assert lim.stats()["leased"] == 1
    finally:
        lim.close()


def test_memory_accepts_lease_and_answers_as_ever() -> None:
    lim = rategate.Limiter("memory://", lease=True)

    async def go() -> list:
        return [(await lim.hit("k", "3/minute")).allowed for _ in range(4)]

    assert asyncio.run(go()) == [True, True, True, False]
    assert lim.stats()["leased"] == 0


async def test_leased_checks_are_a_metric(redis_url: str, make_limiter: Any) -> None:
    import httpx
    from prometheus_client import CollectorRegistry

    from rategate.metrics import PrometheusMetrics

    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    reg = CollectorRegistry()
    m = PrometheusMetrics(registry=reg)
    lim = make_limiter(redis_url, timeout=5.0)
    mw = RateLimitMiddleware(ok, limiter=lim, rules=[Rule("/", "1000/minute", key=lambda s: "all", lease=True)],
                             metrics=m)
    transport = httpx.ASGITransport(app=mw, client=("203.0.113.9", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert [(await c.get("/")).status_code for _ in range(50)] == [200] * 50
    m.render()  # a scrape reads stats()
    leased = lim.stats()["leased"]
    assert leased >= 30
    assert reg.get_sample_value("rategate_leased_checks_total") == leased

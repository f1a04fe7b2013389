"""Property tests: the GCRA of every store against a plain-Python model.

The model is gcra.h's algorithm written out in Python floats (the same IEEE
doubles, the same order of operations), plus the Decision's rule for a cost
that can never be allowed (cost above a bucket: retry_after = inf).

- The C algorithm itself (``_core._gcra_check``) is driven with explicit
  times: allowed, rate, remaining, reset, retry and block must be equal.
- ``memory://`` and Redis run on real clocks; their rates have an emission
  interval of at least a second, so the milliseconds a sequence of checks
  takes cannot move a token: allowed and remaining must be equal, the
  durations equal within the elapsed time.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rategate
from rategate import _core
from redisserver import RedisServer

MAX_US = 9e15


def slack(T: float) -> float:
    return T / 2.0 if T < 2.0 else 1.0


def clamp(v: float) -> int:
    return int(MAX_US) if v > MAX_US else int(v)


def model(rates: tuple[rategate.Rate, ...], now: float, cost: int, tats: list[float]) -> tuple[Any, ...]:
    """(allowed, rate, remaining, reset_us, retry_us, block_us), updating tats."""
    Ts = [r.period * 1e6 / r.limit for r in rates]
    taus = [float(r.burst or r.limit) * T for r, T in zip(rates, Ts)]
    tat0 = [tat if tat >= now else now for tat in tats]
    nw = [v + float(cost) * T for v, T in zip(tat0, Ts)]
    allowed = all(nw[j] - now <= taus[j] + slack(Ts[j]) for j in range(len(rates)))
    if allowed:
        best = None
        for j in range(len(rates)):
            rem = max(0, int(math.floor((taus[j] - (nw[j] - now) + slack(Ts[j])) / Ts[j])))
            if best is None or rem < best[1]:
                best = (j, rem, clamp(math.ceil(nw[j] - now)))
        assert best is not None
        if cost > 0:
            tats[:] = nw
        return (1, best[0], best[1], best[2], 0, 0)
    worst, block, r = -1.0, 0.0, 0
    for j in range(len(rates)):
        w = nw[j] - now - taus[j]
        b = tat0[j] + Ts[j] - now - taus[j] - slack(Ts[j])
        if w > worst:
            worst, r = w, j
        if b > block:
            block = b
    rem = max(0, int(math.floor((taus[r] - (tat0[r] - now) + slack(Ts[r])) / Ts[r])))
    return (0, r, rem, clamp(math.ceil(tat0[r] - now)), clamp(math.ceil(worst)), clamp(math.floor(block)))


MAX_DEBT_US = 1e15


def model_charge(rates: tuple[rategate.Rate, ...], now: float, cost: int, tats: list[float]) -> tuple[Any, ...]:
    """A charge (issue 12 #3): every bucket takes cost * T (a negative cost
    refunds), never above full, at most MAX_DEBT_US into debt; the reported
    rate is the one with the fewest tokens left.  Updates tats."""
    best = None
    for j, rt in enumerate(rates):
        T = rt.period * 1e6 / rt.limit
        tau = float(rt.burst or rt.limit) * T
        v = (tats[j] if tats[j] >= now else now) + float(cost) * T
        if v < now:
            v = now
        if v - now > MAX_DEBT_US:
            v = now + MAX_DEBT_US
        tats[j] = v
        rem = max(0, int(math.floor((tau - (v - now) + slack(T)) / T)))
        if best is None or rem < best[1]:
            best = (j, rem, clamp(math.ceil(v - now)))
    assert best is not None
    return (1, best[0], best[1], best[2], 0, 0)


def never(rates: tuple[rategate.Rate, ...], cost: int) -> bool:
    return any(cost > (r.burst or r.limit) for r in rates)


# -- strategies -----------------------------------------------------------------------------
def rate_strategy(min_interval: float) -> st.SearchStrategy[rategate.Rate]:
    @st.composite
    def build(draw: Any) -> rategate.Rate:
        limit = draw(st.integers(1, 1000))
        period = draw(st.sampled_from([0.001, 0.5, 1.0, 7.0, 60.0, 3600.0, 86400.0, 366 * 86400.0]))
        period = max(period, limit * min_interval)
        burst = draw(st.one_of(st.none(), st.integers(1, 3 * limit)))
        try:
            return rategate.Rate(limit, period, burst=burst)
        except ValueError:  # too fast, or too slow to refill: out of the domain
            return rategate.Rate(1, 60.0)
    return build()


def rates_strategy(min_interval: float) -> st.SearchStrategy[tuple[rategate.Rate, ...]]:
    return st.lists(rate_strategy(min_interval), min_size=1, max_size=3,
                    unique_by=lambda r: r.key_id).map(tuple)


steps = st.lists(st.tuples(st.integers(0, 5_000_000), st.sampled_from([0, 1, 1, 1, 2, 3, 5, 100])),
                 min_size=1, max_size=25)

COMMON = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# -- the C algorithm, explicit time -----------------------------------------------------------
@settings(COMMON, max_examples=300)
@given(rates=rates_strategy(1e-6), seq=steps, start=st.integers(0, 10**15))
def test_c_gcra_equals_the_model(rates: tuple[rategate.Rate, ...], seq: list[tuple[int, int]], start: int) -> None:
    try:
        spec = rategate.Spec(rates)
    except ValueError:
        return  # a rate faster than 1 per us
    now = float(start)
    c_tats = [0.0] * len(rates)
    m_tats = [0.0] * len(rates)
    for dt, cost in seq:
        now += dt
        got = _core._gcra_check(spec, now, cost, c_tats)
        want = model(rates, now, cost, m_tats)
        assert got[:6] == want, (rates, now, cost)
        c_tats = got[6]
        assert c_tats == m_tats


charge_steps = st.lists(
    st.tuples(st.integers(0, 5_000_000), st.sampled_from([0, 1, 1, 2, 100]),
              st.sampled_from([0, 0, 1, -1, -3, 5, 2000, -2000, 10**12])),
    min_size=1, max_size=25)


@settings(COMMON, max_examples=300)
@given(rates=rates_strategy(1e-6), seq=charge_steps, start=st.integers(0, 10**15))
def test_c_charge_equals_the_model(rates: tuple[rategate.Rate, ...], seq: list[tuple[int, int, int]],
                                   start: int) -> None:
    """Checks and charges interleaved: debt denies later checks, refunds stop at full."""
    try:
        spec = rategate.Spec(rates)
    except ValueError:
        return
    now = float(start)
    c_tats = [0.0] * len(rates)
    m_tats = [0.0] * len(rates)
    for dt, cost, charge in seq:
        now += dt
        got = _core._gcra_check(spec, now, cost, c_tats)
        assert got[:6] == model(rates, now, cost, m_tats), (rates, now, cost)
        c_tats = got[6]
        if charge:
            got = _core._gcra_check(spec, now, charge, c_tats, True)
            assert got[:6] == model_charge(rates, now, charge, m_tats), (rates, now, charge)
            c_tats = got[6]
        assert c_tats == m_tats


# -- the stores, real time --------------------------------------------------------------------
_keys = itertools.count()


def check_store(lim: Any, loop: asyncio.AbstractEventLoop, rates: tuple[rategate.Rate, ...],
                costs: list[int]) -> None:
    key = f"prop{next(_keys)}"
    tats = [0.0] * len(rates)
    t0 = time.monotonic()
    for cost in costs:
        d = loop.run_until_complete(lim.hit(key, rates, cost=cost))
        elapsed = time.monotonic() - t0
        allowed, r, rem, reset_us, retry_us, _ = model(rates, 0.0, cost, tats)
        assert d.error is None
        assert (d.allowed, d.rate, d.remaining) == (bool(allowed), r, rem), (rates, costs)
        assert d.limit == (rates[r].burst or rates[r].limit)
        assert abs(d.reset_after - reset_us / 1e6) <= elapsed + 0.01
        if allowed:
            assert d.retry_after == 0.0
        elif never(rates, cost):
            assert d.retry_after == math.inf
        else:
            assert abs(d.retry_after - retry_us / 1e6) <= elapsed + 0.01


costs_strategy = st.lists(st.sampled_from([0, 1, 1, 1, 2, 3, 7, 2000]), min_size=1, max_size=12)


@settings(COMMON, max_examples=60)
@given(rates=rates_strategy(1.0), costs=costs_strategy)
def test_memory_equals_the_model(loop: asyncio.AbstractEventLoop, rates: tuple[rategate.Rate, ...],
                                 costs: list[int]) -> None:
    lim = rategate.Limiter("memory://")
    try:
        check_store(lim, loop, rates, costs)
    finally:
        lim.close()


@pytest.fixture(scope="module")
def redis_limiter(redis_server: RedisServer, loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    # No deny cache: every check goes to Redis, the subject of the test.
    lim = rategate.Limiter(redis_server.url, timeout=2.0, deny_cache=False)
    yield lim
    lim.close()


@settings(COMMON, max_examples=25)
@given(rates=rates_strategy(1.0), costs=costs_strategy)
def test_redis_equals_the_model(redis_limiter: Any, loop: asyncio.AbstractEventLoop,
                                rates: tuple[rategate.Rate, ...], costs: list[int]) -> None:
    check_store(redis_limiter, loop, rates, costs)


ops_strategy = st.lists(st.tuples(st.sampled_from(["hit", "charge"]),
                                  st.sampled_from([0, 1, 1, 3, 2000, -1, -5, -2000, 10**12])),
                        min_size=1, max_size=12)


def check_store_charges(lim: Any, loop: asyncio.AbstractEventLoop, rates: tuple[rategate.Rate, ...],
                        ops: list[tuple[str, int]]) -> None:
    """Hits and charges against the model: a charge is always allowed and
    reports the bucket after it; the hits after it see the debt or refund."""
    key = f"propc{next(_keys)}"
    tats = [0.0] * len(rates)
    t0 = time.monotonic()
    for op, cost in ops:
        if op == "hit":
            cost = max(cost, 0)
            d = loop.run_until_complete(lim.hit(key, rates, cost=cost))
            want = model(rates, 0.0, cost, tats)
        else:
            d = loop.run_until_complete(lim.charge(key, rates, cost))
            want = model_charge(rates, 0.0, cost, tats)
        elapsed = time.monotonic() - t0
        assert d.error is None
        assert (d.allowed, d.rate, d.remaining) == (bool(want[0]), want[1], want[2]), (rates, ops, op, cost)
        assert abs(d.reset_after - want[3] / 1e6) <= elapsed + 0.01


@settings(COMMON, max_examples=60)
@given(rates=rates_strategy(1.0), ops=ops_strategy)
def test_memory_charges_equal_the_model(loop: asyncio.AbstractEventLoop, rates: tuple[rategate.Rate, ...],
                                        ops: list[tuple[str, int]]) -> None:
    lim = rategate.Limiter("memory://")
    try:
        check_store_charges(lim, loop, rates, ops)
    finally:
        lim.close()


@settings(COMMON, max_examples=25)
@given(rates=rates_strategy(1.0), ops=ops_strategy)
def test_redis_charges_equal_the_model(redis_limiter: Any, loop: asyncio.AbstractEventLoop,
                                       rates: tuple[rategate.Rate, ...], ops: list[tuple[str, int]]) -> None:
    check_store_charges(redis_limiter, loop, rates, ops)

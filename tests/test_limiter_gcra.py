"""The GCRA arithmetic, against "memory://" and a real Redis alike.

Slow rates (N/hour) make the refill negligible while a test runs, so counts
are exact; the refill itself is tested with short periods and only ever as
"after waiting at least X, Y is allowed" (a lower bound on elapsed time, which
a slow machine cannot break).  Each check is bounded by ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import rategate
from rategate import Rate

BOUND = 10.0  # seconds: no single check may take longer, whatever the machine
TIMEOUT = 5.0  # the limiters' own deadline: generous, these tests are not about it


async def hit(lim: Any, key: Any, rates: Any, cost: int = 1) -> Any:
    d = await asyncio.wait_for(lim.hit(key, rates, cost=cost), BOUND)
    assert type(d) is rategate.Decision
    assert d.error is None, f"unexpected failure decision {d.error!r}"
    return d


async def submit(lim: Any, key: Any, spec: Any, cost: int = 1) -> Any:
    r = lim.submit(key, spec, cost)
    d = r if type(r) is rategate.Decision else await asyncio.wait_for(r, BOUND)
    assert type(d) is rategate.Decision
    assert d.error is None, f"unexpected failure decision {d.error!r}"
    return d


async def peek(lim: Any, key: Any, rates: Any) -> Any:
    return await hit(lim, key, rates, cost=0)


@pytest.fixture
async def lim(storage_url: str, make_limiter: Any) -> Any:
    return make_limiter(storage_url, timeout=TIMEOUT)


# -- one rate ----------------------------------------------------------------------
async def test_decision_fields_and_types(lim: Any) -> None:
    d = await hit(lim, "user:42", "10/hour")
    assert d.allowed is True
    assert type(d.limit) is int and d.limit == 10
    assert type(d.remaining) is int and d.remaining == 9
    assert type(d.reset_after) is float and d.reset_after == pytest.approx(360.0, abs=2.0)
    assert type(d.retry_after) is float and d.retry_after == 0.0
    assert type(d.rate) is int and d.rate == 0
    assert d.error is None


async def test_burst_exactly_then_denied(lim: Any) -> None:
    for i in range(10):
        d = await hit(lim, "k", "10/hour")
        assert d.allowed is True, f"hit {i + 1} of a burst of 10 was denied"
        assert d.remaining == 9 - i
        assert d.limit == 10
        assert d.reset_after == pytest.approx(360.0 * (i + 1), abs=2.0)
        assert d.retry_after == 0.0
    for _ in range(3):
        d = await hit(lim, "k", "10/hour")
        assert d.allowed is False
        assert d.limit == 10
        assert d.remaining == 0
        assert d.retry_after == pytest.approx(360.0, abs=2.0)
        assert d.reset_after == pytest.approx(3600.0, abs=2.0)
        assert d.rate == 0


async def test_burst_larger_than_limit(lim: Any) -> None:
    rate = Rate(10, 3600.0, burst=25)
    allowed = [(await hit(lim, "b", rate)).allowed for _ in range(27)]
    assert allowed == [True] * 25 + [False] * 2
    d = await hit(lim, "b", rate)
    assert d.limit == 25  # limit is the burst, not the rate's limit
    assert d.retry_after == pytest.approx(360.0, abs=2.0)  # T = period / limit


async def test_cost_consumes_that_many_tokens(lim: Any) -> None:
    d = await hit(lim, "c", "10/hour", cost=4)
    assert (d.allowed, d.remaining) == (True, 6)
    assert d.reset_after == pytest.approx(4 * 360.0, abs=2.0)
    # More than is left: denied, nothing consumed, wait for the missing token.
    d = await hit(lim, "c", "10/hour", cost=7)
    assert d.allowed is False
    assert d.remaining == 6
    assert d.retry_after == pytest.approx(360.0, abs=2.0)
    d = await hit(lim, "c", "10/hour", cost=6)
    assert (d.allowed, d.remaining) == (True, 0)
    d = await hit(lim, "c", "10/hour", cost=1)
    assert d.allowed is False


async def test_cost_above_burst_is_always_denied(lim: Any) -> None:
    d = await hit(lim, "big", "5/hour", cost=6)
    assert d.allowed is False
    assert d.limit == 5
    assert d.retry_after > 0
    # Nothing consumed: the bucket is still full.
    assert (await peek(lim, "big", "5/hour")).remaining == 5
    assert (await hit(lim, "big", "5/hour", cost=5)).allowed is True


async def test_cost_zero_peeks_without_consuming(lim: Any) -> None:
    d = await peek(lim, "p", "10/hour")
    assert (d.allowed, d.remaining, d.limit) == (True, 10, 10)
    assert d.reset_after == 0.0
    assert d.retry_after == 0.0
    await hit(lim, "p", "10/hour", cost=3)
    for _ in range(5):
        d = await peek(lim, "p", "10/hour")
        assert (d.allowed, d.remaining) == (True, 7)
        assert d.reset_after == pytest.approx(3 * 360.0, abs=2.0)
    await hit(lim, "p", "10/hour", cost=7)
    # A peek needs no token, so it is allowed even on an empty bucket
    # (GCRA: 0 tokens always fit); it reports the empty bucket.
    d = await peek(lim, "p", "10/hour")
    assert (d.allowed, d.remaining) == (True, 0)
    assert (await hit(lim, "p", "10/hour")).allowed is False


async def test_refill_after_the_period(lim: Any) -> None:
    # 10 per 0.2 s: empty it in one check, wait a whole period, full again.
    assert (await hit(lim, "r", "10/0.2s", cost=10)).allowed is True
    await asyncio.sleep(0.3)
    d = await peek(lim, "r", "10/0.2s")
    assert d.remaining == 10
    assert d.reset_after == 0.0
    assert (await hit(lim, "r", "10/0.2s", cost=10)).allowed is True


async def test_retry_after_and_reset_after_are_honest(lim: Any) -> None:
    # 2 per second: T = 0.5 s.  Empty it, be denied, wait retry_after: allowed.
    d = await hit(lim, "h", "2/s", cost=2)
    assert d.allowed is True
    assert 0.0 < d.reset_after <= 1.0
    d = await hit(lim, "h", "2/s")
    assert d.allowed is False, "a 2/s bucket refilled a token in no time"
    assert 0.0 < d.retry_after <= 0.5
    await asyncio.sleep(d.retry_after + 0.05)
    d = await hit(lim, "h", "2/s")
    assert d.allowed is True
    assert d.remaining == 0
    await asyncio.sleep(d.reset_after + 0.05)
    d = await peek(lim, "h", "2/s")
    assert d.remaining == 2


# -- several rates -------------------------------------------------------------------
async def test_multi_rate_denial_consumes_none(lim: Any) -> None:
    # The denying rate comes *second*: a store that consumed rate by rate
    # would have taken a token from 10/hour before seeing 3/hour deny.
    both = "10/hour; 3/hour"
    for i in range(3):
        d = await hit(lim, "m", both)
        assert d.allowed is True
        assert d.rate == 1  # 3/hour has the fewest tokens left
        assert (d.limit, d.remaining) == (3, 2 - i)
    for _ in range(4):
        d = await hit(lim, "m", both)
        assert d.allowed is False
        assert (d.rate, d.limit, d.remaining) == (1, 3, 0)
        assert d.retry_after == pytest.approx(1200.0, abs=2.0)
    # The same buckets checked alone: 10/hour lost exactly 3 tokens.
    assert (await peek(lim, "m", "10/hour")).remaining == 7
    assert (await peek(lim, "m", "3/hour")).remaining == 0


async def test_multi_rate_denial_by_cost(lim: Any) -> None:
    rates = [Rate(5, 3600.0), Rate(10, 3600.0)]
    d = await hit(lim, "mc", rates, cost=4)
    assert (d.allowed, d.rate, d.remaining) == (True, 0, 1)
    d = await hit(lim, "mc", rates, cost=2)
    assert (d.allowed, d.rate, d.limit, d.remaining) == (False, 0, 5, 1)
    assert (await peek(lim, "mc", Rate(10, 3600.0))).remaining == 6
    assert (await peek(lim, "mc", Rate(5, 3600.0))).remaining == 1


async def test_multi_rate_denial_reports_the_longest_wait(lim: Any) -> None:
    # Both rates deny; the hour is the longer wait, whatever its position.
    for key, rates, slow in (("w1", [Rate(1, 3600.0), Rate(1, 60.0)], 0),
                             ("w2", [Rate(1, 60.0), Rate(1, 3600.0)], 1)):
        assert (await hit(lim, key, rates)).allowed is True
        d = await hit(lim, key, rates)
        assert d.allowed is False
        assert d.rate == slow
        assert d.retry_after == pytest.approx(3600.0, abs=2.0)
        assert d.reset_after == pytest.approx(3600.0, abs=2.0)


async def test_multi_rate_reports_the_fewest_remaining(lim: Any) -> None:
    rates = "100/day; 5/minute; 1000/hour"
    d = await hit(lim, "f", rates)
    assert (d.rate, d.limit, d.remaining) == (1, 5, 4)
    assert d.reset_after == pytest.approx(12.0, abs=1.0)  # 60 s / 5 per token


async def test_rate_forms_share_buckets(lim: Any) -> None:
    # A string, a Rate, a list and a compiled spec of the same rate are the
    # same bucket (the key is built from Rate.key_id).
    spec = lim.compile("10/hour")
    assert spec.rates == (Rate(10, 3600.0),)
    seen = [
        (await hit(lim, "same", "10/hour")).remaining,
        (await hit(lim, "same", Rate(10, 3600.0))).remaining,
        (await hit(lim, "same", ["10/hour"])).remaining,
        (await hit(lim, "same", [Rate.parse("10 per hour")])).remaining,
        (await submit(lim, "same", spec)).remaining,
    ]
    assert seen == [9, 8, 7, 6, 5]


async def test_different_rates_are_different_buckets(lim: Any) -> None:
    await hit(lim, "dr", "10/hour", cost=10)
    assert (await peek(lim, "dr", "11/hour")).remaining == 11
    assert (await peek(lim, "dr", Rate(10, 3600.0, burst=20))).remaining == 20
    assert (await peek(lim, "dr", "10/hour")).remaining == 0


# -- keys ------------------------------------------------------------------------------
async def test_keys_are_independent_and_binary_safe(lim: Any) -> None:
    keys = [b"a", b"a\x00b", b"a\x00c", b"a{b}", b"{a}", b"}{", b"a b", b"\xff\xfe", b"\x00"]
    for i, k in enumerate(keys):
        d = await hit(lim, k, "10/hour", cost=i + 1)
        assert d.remaining == 10 - (i + 1), f"key {k!r} shares a bucket with an earlier key"
    for i, k in enumerate(keys):
        assert (await peek(lim, k, "10/hour")).remaining == 10 - (i + 1)


async def test_str_key_is_its_utf8_bytes(lim: Any) -> None:
    await hit(lim, "user:42", "10/hour")
    assert (await hit(lim, b"user:42", "10/hour")).remaining == 8
    await hit(lim, "ключ", "10/hour")
    assert (await hit(lim, "ключ".encode(), "10/hour")).remaining == 8


async def test_long_key(lim: Any) -> None:
    k1, k2 = b"x" * 5000 + b"1", b"x" * 5000 + b"2"
    assert (await hit(lim, k1, "10/hour", cost=3)).remaining == 7
    assert (await hit(lim, k2, "10/hour")).remaining == 9
    assert (await hit(lim, k1, "10/hour")).remaining == 6


async def test_deny_cache_agrees_with_the_store(storage_url: str, make_limiter: Any) -> None:
    # The same sequence with and without the local over-limit cache gives the
    # same decisions (the cache may only answer what the store would).
    out = []
    for cache in (False, True):
        lim = make_limiter(storage_url, timeout=TIMEOUT, deny_cache=cache)
        key = f"dc-{cache}"
        seq = []
        for cost in (3, 1, 1, 2, 3, 1, 0, 3):
            d = await hit(lim, key, "5/hour", cost=cost)
            seq.append((d.allowed, d.remaining, d.limit, d.rate,
                        round(d.retry_after / 720.0), round(d.reset_after / 720.0)))
        out.append(seq)
    assert out[0] == out[1]
    assert [a for a, *_ in out[0]] == [True, True, True, False, False, False, True, False]
    # A denied cost of 3 waits for 3 tokens (the cache knows only cost 1).
    assert [r for _, _, _, _, r, _ in out[0]] == [0, 0, 0, 2, 3, 1, 0, 3]


async def test_two_limiters_share_redis_but_not_memory(storage_url: str, make_limiter: Any) -> None:
    a = make_limiter(storage_url, timeout=TIMEOUT)
    b = make_limiter(storage_url, timeout=TIMEOUT)
    await hit(a, "shared", "10/hour", cost=4)
    d = await hit(b, "shared", "10/hour")
    if storage_url == "memory://":
        assert d.remaining == 9  # in-process store: one per Limiter
    else:
        assert d.remaining == 5  # every app server shares the limits

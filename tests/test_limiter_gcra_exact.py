"""The GCRA to the microsecond, with time under the test's control.

``rategate._core._gcra_check(spec, now_us, cost, tats)`` runs the C algorithm
(the one memory:// uses, mirrored by the Redis script) on a given clock, so
refill and boundaries are checked exactly, without sleeping.  A differential
test then drives memory:// and Redis (the Lua twin) with the same random
sequence and requires the same decisions.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from rategate import Rate, _core

NOW = 1e12  # microseconds: any instant far from 0
SLACK = 1.0  # RG_SLACK_US: a bucket admits a hit up to 1 us early


def spec(*rates: Rate) -> Any:
    return _core.Spec(tuple(rates))


class Bucket:
    """A sequence of checks on one (key, spec) with explicit times."""

    def __init__(self, *rates: Rate) -> None:
        self.spec = spec(*rates)
        self.tats = [0.0] * len(rates)

    def check(self, now: float, cost: int = 1) -> tuple:
        allowed, rate, remaining, reset, retry, block, tats = _core._gcra_check(
            self.spec, now, cost, list(self.tats)
        )
        if allowed and cost > 0:
            self.tats = tats
        else:
            assert tats == self.tats, "a denied check or a peek changed the state"
        return bool(allowed), rate, remaining, reset, retry, block


def T_us(r: Rate) -> float:
    return r.period * 1e6 / r.limit


@pytest.mark.parametrize(
    "rate",
    [Rate(10, 1.0), Rate(3, 1.0), Rate(7, 3.0), Rate(999, 1.0), Rate(1000, 7.0),
     Rate(12345, 60.0), Rate(1, 0.001), Rate(5, 86400.0 * 366), Rate(10, 60.0, burst=37)],
)
def test_burst_is_exact_at_one_instant(rate: Rate) -> None:
    b = Bucket(rate)
    got = [b.check(NOW)[0] for _ in range(rate.burst + 2)]
    assert got == [True] * rate.burst + [False, False]


@pytest.mark.parametrize("rate", [Rate(10, 1.0), Rate(3, 1.0), Rate(7, 3.0), Rate(100, 60.0, burst=5)])
def test_sustained_rate_is_exact(rate: Rate) -> None:
    # Hits every T/2, offset by T/4 from the token boundaries: by time t the
    # bucket has handed out exactly burst + floor(t / T) tokens.
    T = T_us(rate)
    allowed = 0
    b = Bucket(rate)
    for k in range(400):
        t = k * T / 2 + T / 4
        allowed += b.check(NOW + t)[0]
    last = 399 * T / 2 + T / 4
    assert allowed == rate.burst + int(last // T)


def test_hits_exactly_T_apart_are_all_allowed() -> None:
    # Repeated addition of a fractional T must not drift past the slack.
    rate = Rate(3, 1.0)
    T = T_us(rate)
    b = Bucket(rate)
    for _ in range(3):
        assert b.check(NOW)[0]
    assert all(b.check(NOW + k * T)[0] for k in range(1, 3001))
    assert not b.check(NOW + 3000 * T)[0]


def test_retry_reset_and_block_are_exact() -> None:
    rate = Rate(10, 1.0)  # T = 100 ms
    b = Bucket(rate)
    allowed, _, remaining, reset, retry, _ = b.check(NOW, cost=7)
    assert (allowed, remaining, reset, retry) == (True, 3, 700_000, 0)
    allowed, rate_i, remaining, reset, retry, block = b.check(NOW, cost=5)
    assert (allowed, rate_i, remaining) == (False, 0, 3)
    assert reset == 700_000
    assert retry == 200_000  # two more tokens
    assert block == 0  # a cost of 1 would pass now
    # retry_after is when this cost passes: not a microsecond (plus slack) before.
    assert not b.check(NOW + retry - SLACK - 1, cost=5)[0]
    assert b.check(NOW + retry, cost=5)[0]


def test_block_is_when_cost_one_passes() -> None:
    b = Bucket(Rate(10, 1.0))
    b.check(NOW, cost=10)
    allowed, _, _, _, retry, block = b.check(NOW, cost=1)
    assert not allowed
    assert retry == 100_000
    assert block == 100_000 - SLACK  # what the deny cache may cache: never longer
    probe = Bucket(Rate(10, 1.0))
    probe.tats = list(b.tats)
    assert not probe.check(NOW + block - 1)[0]
    assert probe.check(NOW + block)[0]


def test_reset_is_when_full() -> None:
    r = Rate(10, 1.0)
    b = Bucket(r)
    reset = b.check(NOW, cost=4)[3]
    assert reset == 400_000
    full = Bucket(r)
    full.tats = list(b.tats)
    assert full.check(NOW + reset, cost=0)[2] == 10
    assert full.check(NOW + reset - 100_000, cost=0)[2] == 9


def test_refill_one_token_per_T() -> None:
    r = Rate(4, 2.0)  # T = 0.5 s
    b = Bucket(r)
    b.check(NOW, cost=4)
    for k in range(5):
        assert b.check(NOW + k * 500_000, cost=0)[2] == k
    assert b.check(NOW + 10_000_000, cost=0)[2] == 4  # never more than the burst


def test_cost_zero_and_above_burst() -> None:
    b = Bucket(Rate(5, 60.0))
    assert b.check(NOW, cost=0)[:3] == (True, 0, 5)
    assert b.check(NOW, cost=6)[0] is False
    assert b.check(NOW, cost=5)[:3] == (True, 0, 0)
    assert b.check(NOW, cost=0)[:3] == (True, 0, 0)


def test_multi_rate_atomic_and_reporting() -> None:
    slow, fast = Rate(3, 3600.0), Rate(10, 1.0)
    b = Bucket(fast, slow)
    for i in range(3):
        allowed, rate_i, remaining, *_ = b.check(NOW + i)
        assert (allowed, rate_i, remaining) == (True, 1, 2 - i)
    before = list(b.tats)
    allowed, rate_i, remaining, reset, retry, block = b.check(NOW + 3)
    assert (allowed, rate_i, remaining) == (False, 1, 0)
    assert b.tats == before  # fast kept its 7 tokens
    assert retry == pytest.approx(1_200_000_000, abs=5)
    alone = Bucket(fast)
    alone.tats = [before[0]]
    assert alone.check(NOW + 3, cost=0)[2] == 7


def test_spec_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="1 to 16 rates"):
        _core.Spec(())
    with pytest.raises(ValueError, match="1 to 16 rates"):
        _core.Spec(tuple(Rate(i, 60.0) for i in range(1, 18)))


# -- memory:// and Redis agree -----------------------------------------------------------------
async def test_memory_and_redis_agree(redis_url: str, make_limiter: Any) -> None:
    # Slow rates: nothing refills while the test runs, so both stores see the
    # same sequence of states and must give the same answers.
    mem = make_limiter("memory://")
    red = make_limiter(redis_url, timeout=5.0)
    specs = ["7/hour", "5/hour; 20/day", Rate(3, 3600.0, burst=9), "2/day; 50/day; 9/hour"]
    keys = ["a", "b", b"c\x00", "d"]
    rnd = random.Random(20240607)
    for step in range(300):
        key, rates, cost = rnd.choice(keys), rnd.choice(specs), rnd.choice([0, 1, 1, 1, 2, 3, 10])
        dm = await asyncio.wait_for(mem.hit(key, rates, cost=cost), 10)
        dr = await asyncio.wait_for(red.hit(key, rates, cost=cost), 10)
        assert dr.error is None
        assert (dm.allowed, dm.rate, dm.limit, dm.remaining) == (dr.allowed, dr.rate, dr.limit, dr.remaining), (
            step, key, rates, cost)
        where = (step, key, rates, cost)
        assert dm.retry_after == pytest.approx(dr.retry_after, abs=1.0), where
        assert dm.reset_after == pytest.approx(dr.reset_after, abs=1.0), where

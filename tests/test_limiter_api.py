"""The Limiter's surface: argument checking, compile/submit, stats()."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import rategate
from rategate import Rate
from redisserver import RedisServer, free_port

BOUND = 10.0


def test_public_names() -> None:
    for name in ("Limiter", "Decision", "Rate", "parse_rates"):
        assert hasattr(rategate, name), name
    assert rategate.Rate is Rate
    assert rategate.parse_rates("10/s; 1000/hour") == (Rate(10, 1.0), Rate(1000, 3600.0))


# -- constructor errors name the bad part -------------------------------------------------
@pytest.mark.parametrize(
    ("url", "must_name"),
    [
        ("http://127.0.0.1:6379/0", "http"),
        ("redis2://127.0.0.1/0", "redis2"),
        ("127.0.0.1:6379", "127.0.0.1:6379"),
        ("", "''"),
        ("redis://127.0.0.1:notaport/0", "notaport"),
        ("redis://127.0.0.1:99999/0", "99999"),
        ("redis://127.0.0.1:0/0", "port"),
        ("redis://127.0.0.1:-1/0", "-1"),
        ("redis://127.0.0.1:6379/abc", "abc"),
        ("redis://127.0.0.1:6379/-1", "-1"),
        ("redis://127.0.0.1:6379/1/2", "1/2"),
        ("redis://:6379/0", "host"),
        ("unix://", "path"),
        ("unix:///tmp/r.sock?db=x", "x"),
        ("unix:///tmp/r.sock?db=-2", "-2"),
        ("unix:///tmp/r.sock?color=blue", "color"),
        ("memory://somewhere", "somewhere"),
    ],
)
def test_bad_url(url: str, must_name: str) -> None:
    with pytest.raises(ValueError) as info:
        rategate.Limiter(url)
    assert must_name in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "redis://127.0.0.1",
        "redis://127.0.0.1:6380",
        "redis://localhost:6380/15",
        "redis://:pass@127.0.0.1:6380/1",
        "unix:///tmp/no-such-dir/redis.sock",
        "unix:///tmp/no-such-dir/redis.sock?db=3",
    ],
)
async def test_good_urls_construct_without_connecting(url: str) -> None:
    # Construction validates and does nothing else: the engine starts lazily,
    # so nothing here contacts a server.
    lim = rategate.Limiter(url)
    await asyncio.wait_for(lim.aclose(), BOUND)


@pytest.mark.parametrize(
    ("kwargs", "must_name"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1.0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"failure_mode": "maybe"}, "maybe"),
        ({"failure_mode": "CLOSED "}, "CLOSED "),
        ({"threads": 0}, "threads"),
        ({"threads": -1}, "threads"),
        ({"max_pending": 0}, "max_pending"),
        ({"max_pending": -5}, "max_pending"),
    ],
)
def test_bad_options(kwargs: dict, must_name: str) -> None:
    with pytest.raises(ValueError) as info:
        rategate.Limiter("memory://", **kwargs)
    assert must_name in str(info.value)


def test_default_options_are_accepted() -> None:
    for kw in ({}, {"timeout": 0.05}, {"timeout": 1}, {"failure_mode": "closed"},
               {"failure_mode": "open"}, {"threads": 2}, {"max_pending": 1}, {"deny_cache": False},
               {"deny_cache": True}):
        lim = rategate.Limiter("memory://", **kw)
        asyncio.run(asyncio.wait_for(lim.aclose(), BOUND))


# -- check errors --------------------------------------------------------------------------
@pytest.fixture
async def mem(make_limiter: Any) -> Any:
    return make_limiter("memory://")


@pytest.mark.parametrize(
    ("rates", "must_name"),
    [
        ("10/fortnight", "fortnight"),
        ("ten/second", "ten/second"),
        ("", "empty"),
        ([], "no rate"),
        ("10/s; 10/second", "twice"),
        ([5], "5"),
    ],
)
async def test_bad_rates(mem: Any, rates: Any, must_name: str) -> None:
    with pytest.raises(ValueError) as info:
        await mem.hit("k", rates)
    assert must_name in str(info.value)
    with pytest.raises(ValueError) as info:
        mem.compile(rates)
    assert must_name in str(info.value)


async def test_negative_cost(mem: Any) -> None:
    with pytest.raises(ValueError, match="cost") as info:
        await mem.hit("k", "10/s", cost=-1)
    assert "-1" in str(info.value)
    spec = mem.compile("10/s")
    with pytest.raises(ValueError, match="cost"):
        mem.submit("k", spec, -1)


@pytest.mark.parametrize("cost", [1.5, "1", None])
async def test_cost_must_be_an_int(mem: Any, cost: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="cost"):
        await mem.hit("k", "10/s", cost=cost)


async def test_cost_too_big_names_cost(mem: Any) -> None:
    with pytest.raises(ValueError, match="cost"):
        await mem.hit("k", "10/s", cost=2**64)
    d = await mem.hit("k", "10/s", cost=10**12)  # merely more than the burst
    assert (d.allowed, d.error) == (False, None)


async def test_key_length_limit(mem: Any) -> None:
    from rategate import _core

    d = await mem.hit(b"x" * _core.MAX_KEY, "10/s")
    assert d.allowed is True
    with pytest.raises(ValueError, match="key") as info:
        await mem.hit(b"x" * (_core.MAX_KEY + 1), "10/s")
    assert str(_core.MAX_KEY) in str(info.value)


@pytest.mark.parametrize("key", ["", b""])
async def test_empty_key(mem: Any, key: Any) -> None:
    with pytest.raises(ValueError, match="key"):
        await mem.hit(key, "10/s")


@pytest.mark.parametrize("key", [42, None, ["k"], bytearray(b"k")])
async def test_key_must_be_str_or_bytes(mem: Any, key: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="key"):
        await mem.hit(key, "10/s")


async def test_errors_consume_nothing(mem: Any) -> None:
    with pytest.raises(ValueError):
        await mem.hit("k", "10/hour", cost=-1)
    d = await mem.hit("k", "10/hour", cost=0)
    assert d.remaining == 10
    assert mem.stats()["checks"] == 1  # the peek; refused calls are not checks


# -- compile and submit -------------------------------------------------------------------
async def test_compile_gives_rates(mem: Any) -> None:
    spec = mem.compile("10/minute; 200/day")
    assert spec.rates == (Rate(10, 60.0), Rate(200, 86400.0))
    assert mem.compile(Rate(5, 1.0)).rates == (Rate(5, 1.0),)
    assert mem.compile(["5/s", Rate(7, 60.0)]).rates == (Rate(5, 1.0), Rate(7, 60.0))


async def test_submit_memory_answers_at_once(mem: Any) -> None:
    spec = mem.compile("3/hour")
    rs = [mem.submit(b"k", spec, 1) for _ in range(4)]
    assert all(type(r) is rategate.Decision for r in rs)
    assert [r.allowed for r in rs] == [True, True, True, False]
    assert [r.remaining for r in rs[:3]] == [2, 1, 0]


async def test_submit_redis_gives_a_future(redis_url: str, make_limiter: Any) -> None:
    lim = make_limiter(redis_url, timeout=5.0)
    spec = lim.compile("3/hour")
    r = lim.submit("k", spec, 1)
    assert isinstance(r, asyncio.Future)
    d = await asyncio.wait_for(r, BOUND)
    assert type(d) is rategate.Decision
    assert (d.allowed, d.remaining, d.error) == (True, 2, None)


async def test_hit_without_await_is_harmless(redis_url: str, make_limiter: Any) -> None:
    # A submitted future nobody awaits: resolved later, nothing logged, no leak
    # of in-flight counts.
    lim = make_limiter(redis_url, timeout=5.0)
    spec = lim.compile("3/hour")
    futs = [lim.submit(f"k{i}", spec, 1) for i in range(5)]
    await asyncio.wait_for(asyncio.wait(futs), BOUND)
    assert all(f.done() and f.result().error is None for f in futs)
    assert lim.stats()["in_flight"] == 0


async def test_deny_cache_answers_at_once_and_expires(redis_url: str, make_limiter: Any) -> None:
    lim = make_limiter(redis_url, timeout=5.0, deny_cache=True)
    spec = lim.compile("2/1.2s")  # T = 0.6 s
    d = await asyncio.wait_for(lim.submit("dc", spec, 2), BOUND)
    assert d.allowed is True
    first = lim.submit("dc", spec, 1)  # Redis denies and teaches the cache
    d = first if type(first) is rategate.Decision else await asyncio.wait_for(first, BOUND)
    assert (d.allowed, d.error) == (False, None)
    cached = lim.submit("dc", spec, 1)
    assert type(cached) is rategate.Decision, "a known-denied key went to Redis"
    assert (cached.allowed, cached.error, cached.limit) == (False, None, 2)
    assert 0.0 < cached.retry_after <= d.retry_after
    assert lim.stats()["cached_denials"] >= 1
    # A peek is never denied, cache or not.
    p = lim.submit("dc", spec, 0)
    p = p if type(p) is rategate.Decision else await asyncio.wait_for(p, BOUND)
    assert p.allowed is True
    # The cache never outlives the real block.
    await asyncio.sleep(cached.retry_after + 0.05)
    r = lim.submit("dc", spec, 1)
    d = r if type(r) is rategate.Decision else await asyncio.wait_for(r, BOUND)
    assert (d.allowed, d.error) == (True, None)


# -- stats ------------------------------------------------------------------------------------
def _consistent(st: dict) -> None:
    for name in ("checks", "allowed", "denied", "cached_denials", "errors", "in_flight",
                 "reconnects", "connected"):
        assert name in st, name
    assert isinstance(st["errors"], dict)
    assert all(isinstance(v, int) and v >= 0 for v in st["errors"].values())
    # Every check is allowed or denied; errors break down the failure
    # decisions (counted as allowed or denied by the failure mode).
    assert st["checks"] == st["allowed"] + st["denied"]
    assert sum(st["errors"].values()) <= st["checks"]
    assert st["cached_denials"] <= st["denied"]


async def test_stats_counts(storage_url: str, make_limiter: Any) -> None:
    lim = make_limiter(storage_url, timeout=5.0, deny_cache=False)
    st = lim.stats()
    _consistent(st)
    assert (st["checks"], st["allowed"], st["denied"], st["in_flight"]) == (0, 0, 0, 0)
    for _ in range(5):
        await asyncio.wait_for(lim.hit("s", "3/hour"), BOUND)
    st = lim.stats()
    _consistent(st)
    assert (st["checks"], st["allowed"], st["denied"], st["cached_denials"]) == (5, 3, 2, 0)
    assert sum(st["errors"].values()) == 0
    assert st["in_flight"] == 0
    assert st["reconnects"] == 0
    if storage_url != "memory://":
        assert st["connected"] is True


async def test_stats_cached_denials(redis_url: str, make_limiter: Any) -> None:
    lim = make_limiter(redis_url, timeout=5.0, deny_cache=True)
    spec = lim.compile("2/hour")
    for _ in range(6):
        r = lim.submit("s", spec, 1)
        if type(r) is not rategate.Decision:
            await asyncio.wait_for(r, BOUND)
    st = lim.stats()
    _consistent(st)
    assert st["allowed"] == 2
    assert st["cached_denials"] == 3  # the first denial came from Redis


async def test_stats_in_flight(own_redis: RedisServer, make_limiter: Any) -> None:
    lim = make_limiter(own_redis.url, timeout=5.0)
    await asyncio.wait_for(lim.hit("warm", "10/hour"), BOUND)
    pause = own_redis.pause(0.5)
    spec = lim.compile("10/hour")
    futs = [lim.submit(f"f{i}", spec, 1) for i in range(5)]
    assert lim.stats()["in_flight"] == 5
    ds = await asyncio.wait_for(asyncio.gather(*futs), BOUND)
    pause.wait()
    assert [d.error for d in ds] == [None] * 5
    st = lim.stats()
    _consistent(st)
    assert st["in_flight"] == 0
    assert st["checks"] == 6


async def test_stats_counts_errors_by_kind(make_limiter: Any) -> None:
    # Nothing listens there: every check fails, counted as "unavailable" (or
    # "timeout" if the connect attempt outlived the deadline).
    lim = make_limiter(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    for _ in range(3):
        d = await asyncio.wait_for(lim.hit("x", "10/hour"), BOUND)
        assert d.error in ("unavailable", "timeout")
    st = lim.stats()
    _consistent(st)
    assert sum(st["errors"].values()) == 3
    assert set(k for k, v in st["errors"].items() if v) <= {"unavailable", "timeout"}
    assert st["connected"] is False
    assert (st["checks"], st["allowed"], st["denied"]) == (3, 0, 3)


async def test_stats_open_mode_errors_count_as_allowed(make_limiter: Any) -> None:
    lim = make_limiter(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2, failure_mode="open")
    for _ in range(2):
        d = await asyncio.wait_for(lim.hit("x", "10/hour"), BOUND)
        assert (d.allowed, d.error in ("unavailable", "timeout")) == (True, True)
    st = lim.stats()
    _consistent(st)
    assert (st["checks"], st["allowed"], st["denied"], sum(st["errors"].values())) == (2, 2, 0, 2)

"""What only Redis storage has: the key layout, TTLs, URLs, scripts, errors."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

import rategate
from rategate import Rate
from redisserver import RedisServer

BOUND = 10.0
TIMEOUT = 5.0


async def hit(lim: Any, key: Any, rates: Any, cost: int = 1, *, ok: bool = True) -> Any:
    d = await asyncio.wait_for(lim.hit(key, rates, cost=cost), BOUND)
    assert type(d) is rategate.Decision
    if ok:
        assert d.error is None, f"unexpected failure decision {d.error!r}"
    return d


@pytest.fixture
def rc(redis_server: RedisServer, redis_url: str) -> Any:
    """A redis-py client on the (flushed) session server."""
    return redis_server.client()


@pytest.fixture
async def lim(redis_url: str, make_limiter: Any) -> Any:
    return make_limiter(redis_url, timeout=TIMEOUT)


# -- key layout ----------------------------------------------------------------------
async def test_key_layout(lim: Any, rc: Any) -> None:
    await hit(lim, "user:42", "10/second; 1000/hour")
    assert set(rc.keys("*")) == {b"rg:{user:42}:10/1000", b"rg:{user:42}:1000/3600000"}
    await hit(lim, "k", Rate(100, 60.0, burst=150))
    assert rc.exists(b"rg:{k}:100/60000b150") == 1


async def test_state_is_one_integer_per_key(lim: Any, rc: Any) -> None:
    await hit(lim, "i", "10/hour", cost=2)
    raw = rc.get(b"rg:{i}:10/3600000")
    assert raw is not None
    int(raw)  # DESIGN: "state in a single integer"
    assert rc.type(b"rg:{i}:10/3600000") == b"string"


def fnv1a64(b: bytes) -> int:
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


async def test_binary_keys_are_sent_verbatim(lim: Any, rc: Any) -> None:
    # A '}' in the key would end the hash tag early: such keys are tagged by
    # a stable hash of the key instead (and carry the key verbatim after it).
    key = b"a\x00b{c}d\xff\r\n*1"
    await hit(lim, key, "10/hour")
    tag = b"~%016x" % fnv1a64(key)
    assert rc.keys("*") == [b"rg:{" + tag + b"}~" + key + b":10/3600000"]
    await hit(lim, "ключ", "10/hour")
    assert rc.exists(b"rg:{" + "ключ".encode() + b"}:10/3600000") == 1


async def test_ttl_is_the_time_until_full(lim: Any, rc: Any) -> None:
    key = b"rg:{t}:10/3600000"
    await hit(lim, "t", "10/hour")
    assert rc.pttl(key) == pytest.approx(360_000, abs=3_000)
    await hit(lim, "t", "10/hour", cost=2)
    assert rc.pttl(key) == pytest.approx(1_080_000, abs=3_000)
    await hit(lim, "t", "10/hour", cost=7)
    assert rc.pttl(key) == pytest.approx(3_600_000, abs=3_000)
    before = rc.pttl(key)
    d = await hit(lim, "t", "10/hour")
    assert d.allowed is False
    assert rc.pttl(key) <= before  # a denial extends nothing


async def test_each_rate_key_has_its_own_ttl(lim: Any, rc: Any) -> None:
    await hit(lim, "two", "10/hour; 100/day")
    assert rc.pttl(b"rg:{two}:10/3600000") == pytest.approx(360_000, abs=3_000)
    assert rc.pttl(b"rg:{two}:100/86400000") == pytest.approx(864_000, abs=3_000)


async def test_multi_rate_denial_leaves_redis_untouched(lim: Any, rc: Any) -> None:
    keys = [b"rg:{a}:10/3600000", b"rg:{a}:3/3600000"]
    for _ in range(3):
        await hit(lim, "a", "10/hour; 3/hour")
    before = [(rc.get(k), rc.pttl(k)) for k in keys]
    d = await hit(lim, "a", "10/hour; 3/hour")
    assert d.allowed is False
    after = [(rc.get(k), rc.pttl(k)) for k in keys]
    assert [v for v, _ in after] == [v for v, _ in before]
    assert all(a <= b for (_, a), (_, b) in zip(after, before))


async def test_keys_expire_when_full(lim: Any, rc: Any) -> None:
    await hit(lim, "e", "5/0.2s; 50/2s", cost=2)
    assert rc.exists(b"rg:{e}:5/200", b"rg:{e}:50/2000") == 2
    assert 0 < rc.pttl(b"rg:{e}:5/200") <= 80
    assert 0 < rc.pttl(b"rg:{e}:50/2000") <= 80
    await asyncio.sleep(0.3)
    assert rc.exists(b"rg:{e}:5/200", b"rg:{e}:50/2000") == 0
    assert rc.keys("*") == []


async def test_nothing_written_without_consumption(lim: Any, rc: Any) -> None:
    d = await hit(lim, "peek", "10/hour", cost=0)
    assert d.allowed is True
    d = await hit(lim, "huge", "10/hour", cost=11)
    assert d.allowed is False
    assert rc.keys("*") == []


async def test_limiters_share_buckets_through_redis(redis_url: str, make_limiter: Any) -> None:
    a = make_limiter(redis_url, timeout=TIMEOUT)
    b = make_limiter(redis_url, timeout=TIMEOUT)
    for i in range(10):
        await hit(a if i % 2 else b, "both", "10/hour")
    assert (await hit(a, "both", "10/hour")).allowed is False
    assert (await hit(b, "both", "10/hour")).allowed is False


# -- scripts and errors ---------------------------------------------------------------
async def test_script_flush_is_healed(lim: Any, rc: Any) -> None:
    # EVALSHA -> NOSCRIPT -> load and retry, invisibly to the caller.
    assert (await hit(lim, "s", "10/hour")).remaining == 9
    rc.script_flush()
    assert (await hit(lim, "s", "10/hour")).remaining == 8
    rc.script_flush()
    ds = await asyncio.wait_for(asyncio.gather(*(lim.hit(f"s{i}", "10/hour") for i in range(50))), BOUND)
    assert [d.error for d in ds] == [None] * 50
    assert [d.remaining for d in ds] == [9] * 50


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_redis_error_is_reported_for_that_check_only(
    redis_url: str, rc: Any, make_limiter: Any, mode: str
) -> None:
    lim = make_limiter(redis_url, timeout=TIMEOUT, failure_mode=mode)
    # Someone else's data under our key: the script's GET fails (WRONGTYPE).
    rc.hset(b"rg:{poisoned}:10/3600000", "x", "y")
    d = await hit(lim, "poisoned", "10/hour", ok=False)
    assert d.error == "redis_error"
    assert d.allowed is (mode == "open")
    assert lim.stats()["errors"].get("redis_error") == 1
    # In a crowd: the neighbours of a failing check (which may share its
    # script call) are answered normally, and consumed exactly once.
    spec = lim.compile("10/hour")
    for round_ in range(3):
        keys = [f"n{round_}-{i}" for i in range(60)]
        keys.insert(30, "poisoned")
        rs = [lim.submit(k, spec, 1) for k in keys]  # no await: one burst
        ds = await asyncio.wait_for(asyncio.gather(*rs), BOUND)
        for k, d in zip(keys, ds):
            if k == "poisoned":
                assert d.error == "redis_error"
            else:
                assert (k, d.error, d.remaining) == (k, None, 9)
        for k in keys[:3] + keys[-3:]:
            if k != "poisoned":
                assert (await hit(lim, k, "10/hour", cost=0)).remaining == 9


# -- URLs ------------------------------------------------------------------------------
async def test_db_in_url(redis_server: RedisServer, redis_url: str, make_limiter: Any) -> None:
    lim = make_limiter(redis_server.url_for(3), timeout=TIMEOUT)
    await hit(lim, "db", "10/hour")
    assert redis_server.client(db=3).exists(b"rg:{db}:10/3600000") == 1
    assert redis_server.client(db=0).keys("*") == []


@pytest.mark.parametrize("db", [0, 2])
async def test_unix_socket(redis_unix_server: RedisServer, redis_unix_url: str, make_limiter: Any, db: int) -> None:
    url = redis_unix_server.url_for(db)
    assert url.startswith("unix:///")
    lim = make_limiter(url, timeout=TIMEOUT)
    for i in range(3):
        assert (await hit(lim, "u", "10/hour")).remaining == 9 - i
    assert redis_unix_server.client(db=db).exists(b"rg:{u}:10/3600000") == 1
    if db:
        assert redis_unix_server.client(db=0).keys("*") == []


async def test_password(make_limiter: Any) -> None:
    with RedisServer(password="s3cr3t") as server:
        lim = make_limiter(server.url, timeout=TIMEOUT)
        assert server.url.startswith("redis://:s3cr3t@")
        assert (await hit(lim, "pw", "10/hour")).remaining == 9
        assert server.client().exists(b"rg:{pw}:10/3600000") == 1

        bad = make_limiter(f"redis://:wrong@127.0.0.1:{server.port}/0", timeout=0.3)
        d = await hit(bad, "pw", "10/hour", ok=False)
        assert d.error in ("unavailable", "redis_error", "timeout")
        assert d.allowed is False
        assert server.client().get(b"rg:{pw}:10/3600000") is not None


# -- one hash slot per check (Redis Cluster) ----------------------------------------------------
@pytest.fixture(scope="module")
def keyslot() -> Any:
    """CLUSTER KEYSLOT of a real (cluster-enabled, slot-less) redis-server."""
    from redisserver import RedisServer

    with RedisServer(extra_args=["--cluster-enabled", "yes",
                                 "--cluster-config-file", "nodes.conf"]) as srv:
        c = srv.client()
        yield lambda k: int(c.execute_command("CLUSTER", "KEYSLOT", k))


@pytest.mark.skipif(__import__("redisserver").OLD_SERVER, reason="Redis < 7.0 has no --cluster-port")
def test_a_cluster_node_starts_on_a_port_above_55535() -> None:
    """bind(0) hands out ports up to 60999; Redis refuses a cluster node above
    55535 unless its bus port is given, so the fixture gives one (CI hit it)."""
    import socket

    from redisserver import RedisServer

    for port in range(60999, 55535, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        break
    with RedisServer(port=port, extra_args=["--cluster-enabled", "yes",
                                            "--cluster-config-file", "nodes.conf"]) as srv:
        assert srv.client().execute_command("CLUSTER", "KEYSLOT", "x") == 16287


@pytest.mark.parametrize("key", [b"}", b"}x", b"a}", b"{}", b"{", b"x{y}z", b"}{a}", b"plain",
                                 b"\xff}\x00", "ключ}".encode()])
async def test_every_rate_of_a_check_is_in_one_slot(lim: Any, rc: Any, keyslot: Any, key: bytes) -> None:
    rc.flushdb()
    rates = "1/second; 10/minute; 100/hour; 1000/day"
    await hit(lim, key, rates)
    keys = rc.keys("*")
    assert len(keys) == 4
    # The key travels verbatim inside every Redis key of the check.
    assert all(key in k for k in keys)
    slots = {keyslot(k) for k in keys}
    assert len(slots) == 1, (keys, slots)
    # The tag is never empty: {} would hash the whole key (one slot per rate).
    assert all(not k.startswith(b"rg:{}") for k in keys)
    # Stable across processes: the same key always lands in the same slot.
    assert (await hit(lim, key, rates)).error is None
    assert set(rc.keys("*")) == set(keys)


# -- reset (the script's side of Limiter.reset) ----------------------------------------------
def test_script_reset_deletes_the_checks_keys_in_the_same_call(rc: Any) -> None:
    # One call: a hit on "a" (2 rates), a reset of "b" (2 rates), a hit on "c"
    # (the common form: its spec's name and the cost; csrc/script.c).  ARGV:
    # checks, MGET or not, specs (name, T, tau, TTL of a hit in ms); per check
    # op (0 hit, 1 reset), cost, number of rates, T and tau per rate.  A
    # reset answers allowed with zeros; an allowed check three integers.
    from rategate import _core

    rc.set(b"rg:{b}:10/60000", b"123")
    rc.set(b"rg:{b}:100/3600000", b"456")
    rc.set(b"rg:{other}:10/60000", b"789")
    keys = [b"rg:{a}:10/60000", b"rg:{a}:100/3600000", b"rg:{b}:10/60000", b"rg:{b}:100/3600000",
            b"rg:{c}:10/60000"]
    argv = [3, 1, 1, "=1", 6e6, 5.4e7, 6000, 0, 1, 2, 6e6, 5.4e7, 3.6e7, 3.564e9, 1, 0, 2, 6e6, 5.4e7, 3.6e7,
            3.564e9, "=1", 1]
    out = rc.eval(_core.SCRIPT, len(keys), *keys, *argv)
    assert len(out) == 9
    assert out[0] // 32 - 2 == 1 and out[6] // 32 - 2 == 1  # the hits are allowed
    assert out[3:6] == [3 * 32, 0, 0]  # the reset
    assert rc.exists(b"rg:{b}:10/60000", b"rg:{b}:100/3600000") == 0
    assert rc.exists(b"rg:{a}:10/60000", b"rg:{c}:10/60000", b"rg:{other}:10/60000") == 3


# -- Redis's own error text is kept (issue 8 #13) ----------------------------------------------
async def test_oom_error_text_reaches_last_error(own_redis: RedisServer, make_limiter: Any) -> None:
    c = own_redis.client()
    lim = make_limiter(own_redis.url, timeout=TIMEOUT)
    await hit(lim, "warm", "10/hour")
    c.config_set("maxmemory-policy", "noeviction")
    c.config_set("maxmemory", "1")
    try:
        d = await hit(lim, "k", "10/hour", ok=False)
        assert d.error == "redis_error"
        err = lim.stats()["last_error"]
        assert "OOM" in err, err
    finally:
        c.config_set("maxmemory", "0")


# -- memory after a burst of huge keys (issue 8 #10) -------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(bool(os.environ.get("RATEGATE_SANITIZED")),
                    reason="ASan's quarantine holds freed memory: RSS says nothing there")
async def test_buffers_shrink_after_a_burst_of_huge_keys(redis_url: str, make_limiter: Any) -> None:
    # 100 checks x 16 rates x 64 KiB keys in one script call is about 100 MB
    # of command; once written, none of it may stay with the engine.
    lim = make_limiter(redis_url, timeout=30.0)
    rates = "; ".join(f"{1000 + i}/day" for i in range(16))
    await hit(lim, "warm", rates)
    before = _rss_mb()
    for r in range(2):
        keys = [bytes([65 + r]) * 65000 + b"%03d" % i for i in range(100)]
        ds = await asyncio.wait_for(asyncio.gather(*(lim.hit(k, rates) for k in keys)), 60)
        assert all(d.error is None for d in ds), lim.stats()["last_error"]
    del keys, ds
    grown = _rss_mb() - before
    assert grown < 60, f"RSS grew {grown:.0f} MB after the burst"

"""The denial summary in C (csrc/topk.c) against Python models of the same algorithms.

- Space-Saving (stream-summary form): the C summary and :class:`SpaceSaving`
  below agree exactly (keys, counts, errors, order) on random streams, with
  evictions, ties and keys longer than the 256 bytes kept.
- The distinct-client estimate (a ring of HyperLogLogs): :func:`hll_estimate`
  reproduces the C hash and registers; the two agree on random input, the
  estimate is within its error of the truth, and a slot older than a minute
  no longer counts.
- Both engines feed it where they decide: memory://, and Redis (denials from
  Redis and from the local over-limit cache alike).
"""

from __future__ import annotations

import math
import os
import random
from typing import Any

import pytest

import rategate
from rategate import _core

K = 64
KEYMAX = 256
HLL_P = 10
SLOTS = 14
SLOT_SHIFT = 32
M64 = (1 << 64) - 1


class SpaceSaving:
    """The model: K counters; a new key replaces the least count, the one
    that has held its count longest (smallest ``since``)."""

    def __init__(self, k: int = K) -> None:
        self.k = k
        self.items: dict[bytes, list[int]] = {}  # key -> [count, error, since]
        self.seq = 0

    def add(self, key: bytes) -> None:
        self.seq += 1
        it = self.items.get(key)
        if it is not None:
            it[0] += 1
            it[2] = self.seq
            return
        if len(self.items) < self.k:
            self.items[key] = [1, 0, self.seq]
            return
        victim = min(self.items, key=lambda x: (self.items[x][0], self.items[x][2]))
        c = self.items.pop(victim)[0]
        self.items[key] = [c + 1, c, self.seq]

    def top(self, n: int) -> list[dict[str, Any]]:
        order = sorted(self.items.items(), key=lambda kv: (-kv[1][0], kv[1][2]))[:n]
        return [{"key": k[:KEYMAX].decode("utf-8", "backslashreplace"), "denials": c, "overcount": e,
                 "truncated": len(k) > KEYMAX} for k, (c, e, _) in order]


def client_hash(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & M64
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & M64
    h ^= h >> 31
    return h


def client_part(key: bytes) -> bytes:
    for i, b in enumerate(key):
        if b in b"|#":
            return key[i + 1:]
    return key


def hll_estimate(keys: list[bytes], times: list[int], now: int) -> int:
    """The model of the C estimate at ``now``, after feeding ``keys`` at ``times``."""
    m = 1 << HLL_P
    epochs = [0] * SLOTS
    regs = [[0] * m for _ in range(SLOTS)]
    for key, t in zip(keys, times):
        h = client_hash(client_part(key))
        epoch = t >> SLOT_SHIFT
        s = epoch % SLOTS
        if epochs[s] != epoch:
            regs[s] = [0] * m
            epochs[s] = epoch
        idx = h >> (64 - HLL_P)
        w = ((h << HLL_P) & M64) | (1 << (HLL_P - 1))
        rho = 64 - w.bit_length() + 1
        regs[s][idx] = max(regs[s][idx], rho)
    cur = now >> SLOT_SHIFT
    live = [s for s in range(SLOTS) if epochs[s] <= cur and cur - epochs[s] < SLOTS]
    total = 0.0
    zeros = 0
    for j in range(m):
        mx = max((regs[s][j] for s in live), default=0)
        total += math.ldexp(1.0, -mx)
        zeros += mx == 0
    e = 0.7213 / (1.0 + 1.079 / m) * m * m / total
    if e <= 2.5 * m and zeros > 0:
        e = m * math.log(m / zeros)
    return int(e + 0.5)


def c_summary(keys: list[bytes], times: list[int] | None = None, n: int = K) -> dict[str, Any]:
    if times is None:
        times = [10**12] * len(keys)
    out: dict[str, Any] = _core._denials(keys, times, n)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_top_keys_agree_with_the_model(seed: int) -> None:
    rnd = random.Random(seed)
    # A skewed stream over more keys than counters: heavy keys, a long
    # tail that keeps evicting, some keys past the 256 bytes kept.
    population = [f"rule|10.0.{i // 256}.{i % 256}".encode() for i in range(rnd.choice([50, 200, 3000]))]
    population += [b"r|" + bytes([65 + i]) * 300 for i in range(5)]  # long keys, distinct past byte 256
    population += [b"r|" + b"x" * 300 + bytes([65 + i]) for i in range(3)]  # the same first 256 bytes
    weights = [1.0 / (i + 1) ** rnd.choice([0.8, 1.2, 2.0]) for i in range(len(population))]
    rnd.shuffle(weights)
    stream = rnd.choices(population, weights, k=rnd.choice([30, 5000, 20000]))
    model = SpaceSaving()
    for key in stream:
        model.add(key)
    got = c_summary(stream)
    assert got["denials_summarized"] == len(stream)
    assert got["top_denied"] == model.top(K)
    # and the first n are the first n
    assert c_summary(stream, n=5)["top_denied"] == model.top(5)


def test_space_saving_guarantees() -> None:
    rnd = random.Random(7)
    heavy = [f"api|heavy-{i}".encode() for i in range(5)]
    stream = [f"api|10.{i // 65536}.{i // 256 % 256}.{i % 256}".encode() for i in range(10_000)]
    stream += heavy * 400  # each heavy key 400 of 12,000: over 12,000 / 64
    rnd.shuffle(stream)
    top = c_summary(stream, n=5)["top_denied"]
    assert sorted(e["key"] for e in top) == sorted(k.decode() for k in heavy)
    for e in top:
        # the count over-estimates by at most its error
        assert e["denials"] - e["overcount"] <= 400 <= e["denials"]


@pytest.mark.parametrize("seed", range(4))
def test_distinct_estimate_agrees_with_the_model(seed: int) -> None:
    rnd = random.Random(seed)
    n = rnd.choice([3, 100, 2000, 20_000])
    t0 = rnd.randrange(10**12, 10**15)
    keys = [f"r{rnd.randrange(3)}|c{rnd.randrange(n)}".encode() for _ in range(n * 2)]
    times = sorted(t0 + rnd.randrange(0, 120 * 10**9) for _ in keys)  # two minutes: slots expire
    got = c_summary(keys, times)["denied_clients_1m"]
    assert abs(got - hll_estimate(keys, times, times[-1])) <= 1


def test_distinct_estimate_is_close_and_forgets_after_a_minute() -> None:
    t0 = 10**13
    clients = [f"default|198.51.{i // 256}.{i % 256}".encode() for i in range(10_000)]
    times = [t0 + i * 1000 for i in range(len(clients))]
    est = c_summary(clients, times)["denied_clients_1m"]
    assert abs(est - 10_000) <= 0.1 * 10_000  # 3 standard errors
    # One client under several rules is one client; small counts are exact-ish.
    few = [b"a|1.2.3.4", b"b|1.2.3.4", b"%ws:a|1.2.3.4", b"a|5.6.7.8", b"a#" + b"f" * 40]
    assert c_summary(few, [t0] * len(few))["denied_clients_1m"] == 3
    # Denials a minute old no longer count; the new ones do.
    later = t0 + 61 * 10**9
    got = c_summary(clients + [b"default|9.9.9.9"], times + [later])
    assert got["denied_clients_1m"] == 1
    assert c_summary([], [], 5) == {"top_denied": [], "denials_summarized": 0, "denied_clients_1m": 0}


@pytest.mark.parametrize("store", ["memory", "shm"])
async def test_the_local_engines_feed_it(store: str, make_limiter: Any) -> None:
    name = f"rg-topk-{os.getpid()}"
    lim = make_limiter("memory://" if store == "memory" else f"shm://{name}")
    try:
        for i in range(50):
            for _ in range(3 if i else 30):
                await lim.hit(f"default|10.0.0.{i}", "1/minute")
        st = lim.stats()
        assert st["top_denied"][0] == {"rule": "default", "client": "10.0.0.0", "denials": 29, "overcount": 0}
        assert st["denials_summarized"] == st["denied"] == 29 + 49 * 2
        assert st["denied_clients_1m"] == 50
        assert len(st["top_denied"]) == 16
    finally:
        if store == "shm":
            rategate.shm_unlink(name)


async def test_redis_engine_feeds_it_from_redis_and_from_the_cache(redis_url: str, make_limiter: Any) -> None:
    lim = make_limiter(redis_url, timeout=1.0)
    spec = lim.compile("1/minute")
    for i in range(20):
        for _ in range(2 if i else 40):
            await lim.hit(f"api|k{i}", spec)
    st = lim.stats()
    # the first denial of each key came from Redis, the others from the cache
    assert st["cached_denials"] >= 38
    assert st["top_denied"][0] == {"rule": "api", "client": "k0", "denials": 39, "overcount": 0}
    assert st["denials_summarized"] == st["denied"] == 39 + 19
    assert st["denied_clients_1m"] == 20
    # A failure decision is not a denial of the client.
    await lim.aclose()


def test_fork_forgets_the_parents_denials(redis_url: str) -> None:
    import asyncio
    import os

    lim = rategate.Limiter(redis_url, timeout=1.0)
    try:
        async def deny() -> None:
            for _ in range(3):
                await lim.hit("x|y", "1/minute")

        asyncio.run(deny())
        assert lim.stats()["denials_summarized"] == 2
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                asyncio.run(lim.hit("other|z", "100/minute"))
                os.write(w, str(lim.stats()["denials_summarized"]).encode())
            finally:
                os._exit(0)
        os.close(w)
        got = os.read(r, 100)
        os.waitpid(pid, 0)
        os.close(r)
        assert got == b"0"
    finally:
        lim.close()

"""shm://NAME (csrc/shmstore.c, csrc/pylocal.c): the buckets of every process of
one host in a shared memory segment.

In one process: the URL and its mistakes, the segment file, the same
decisions as the plain-Python GCRA model and as memory:// (hypothesis, as
for Redis in test_gcra_property.py), Seam 2 (clear, entries) on memory://
and shm://, capacity (fill, eviction, overloaded, logged), segments that
must be refused (another user's, open to others, wrong magic, version,
layout, damaged, never initialised), and the middleware counting an shm://
denial as the store's.  With other processes (tests/shm_worker.py): two
creators at once, an opener waiting for its creator, fork.  Exactness
across processes and crashes: test_shm_procs.py; uvicorn: test_uvicorn_shm.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import rategate
from rategate import _core
from test_gcra_property import (COMMON, check_store, check_store_charges, costs_strategy, ops_strategy,
                                rates_strategy)

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "shm_worker.py")
_names = itertools.count()


def fresh_name(tag: str = "t") -> str:
    return f"{tag}{os.getpid()}-{next(_names)}"


def path(name: str) -> str:
    return f"/dev/shm/rategate.{name}"


@pytest.fixture
def shm_name() -> Iterator[str]:
    """A segment name of this test alone, removed afterwards."""
    name = fresh_name()
    yield name
    rategate.shm_unlink(name)


def worker(*args: str, uid: int | None = None, timeout: float = 30) -> list[str]:
    """Run a tests/shm_worker.py command in a fresh interpreter; its output lines."""
    argv = [sys.executable, WORKER] + (["--uid", str(uid)] if uid is not None else []) + list(args)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


# -- the URL ---------------------------------------------------------------------------------
@pytest.mark.parametrize("url, says", [
    ("shm://", "no NAME after shm://"),
    ("shm:///x", "no NAME after shm://"),
    ("shm://a/b", "takes one NAME and no path"),
    ("shm://a%2Fb", "bad shm name 'a/b'"),
    ("shm://" + "a" * 101, "1 to 100 letters"),
    ("shm://.hidden", "starting with a letter or digit"),
    ("shm://-x", "starting with a letter or digit"),
    ("shm://a%20b", "bad shm name 'a b'"),
    ("shm://a:1", "bad shm name 'a:1'"),
    ("shm://user@a", "bad shm name 'user@a'"),
    ("shm://caf%C3%A9", "bad shm name"),
    ("shm://a?capacity=0", "capacity='0' must be a number of buckets from 1 to 100,000,000"),
    ("shm://a?capacity=-5", "capacity='-5'"),
    ("shm://a?capacity=lots", "capacity='lots'"),
    ("shm://a?capacity=100000001", "capacity='100000001'"),
    ("shm://a?size=3", "unknown option 'size'; shm:// takes capacity"),
])
def test_bad_urls_name_the_mistake(url: str, says: str) -> None:
    with pytest.raises(ValueError, match="bad storage URL") as e:
        rategate.Limiter(url)
    assert says in str(e.value)


@pytest.mark.parametrize("name", ["", "a/b", "../x", "x" * 101, ".x", "a\x00b", 7])
def test_bad_names_are_refused_everywhere(name: Any) -> None:
    with pytest.raises(ValueError, match="bad shm name"):
        rategate.shm_unlink(name)
    if isinstance(name, str):
        with pytest.raises(ValueError, match="bad shm name|embedded null"):
            _core.ShmEngine(name)  # the C side checks it again
        with pytest.raises(ValueError, match="bad shm name"):
            _core.shm_unlink(name)
    with pytest.raises(ValueError, match="timeout must be a number of seconds from 1e-06 to 86400, got 0.0"):
        _core.ShmEngine("x", timeout=0.0)


def test_the_segment_file(shm_name: str) -> None:
    lim = rategate.Limiter(f"shm://{shm_name}?capacity=1_000")
    st = os.stat(path(shm_name))
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, os.geteuid())
    assert st.st_size == _core.shm_size(1000) == lim.stats()["shm"]["bytes"]
    info = lim.stats()["shm"]
    assert info["name"] == shm_name and info["path"] == path(shm_name)
    assert info["capacity"] == 1000 and info["slots"] >= 1250
    # Memory per bucket of capacity, as docs/shm.md says: about 335 bytes.
    assert 330 <= _core.shm_size(65536) / 65536 <= 345
    assert _core.SHM_DEFAULT_CAPACITY == 65536
    # Another Limiter of the same NAME without capacity takes the segment's;
    # with another capacity it is refused, naming both and the fix.
    other = rategate.Limiter(f"shm://{shm_name}")
    assert other.stats()["shm"]["capacity"] == 1000
    with pytest.raises(ValueError, match=r"created with capacity=1000, and this Limiter asks for capacity=2000"):
        rategate.Limiter(f"shm://{shm_name}?capacity=2000")
    assert lim.unlink() is True
    assert not os.path.exists(path(shm_name))
    assert lim.unlink() is False and rategate.shm_unlink(shm_name) is False
    # Both keep the unlinked segment (and share it); a new Limiter makes a new one.
    spec = lim.compile("10/hour")
    assert [lim.submit("k", spec, 1).remaining, other.submit("k", spec, 1).remaining] == [9, 8]
    fresh = rategate.Limiter(f"shm://{shm_name}")
    assert fresh.submit("k", spec, 1).remaining == 9
    for x in (lim, other, fresh):
        x.close()
    with pytest.raises(RuntimeError, match="closed"):
        lim.submit("k", spec, 1)
    with pytest.raises(ValueError, match="unlink\\(\\) is for shm://"):
        rategate.Limiter("memory://").unlink()


# -- the same decisions ------------------------------------------------------------------------
async def test_answers_at_once_with_the_same_fields(shm_name: str) -> None:
    lim = rategate.Limiter(f"shm://{shm_name}")
    spec = lim.compile("5/minute; 100/hour")
    ds = [lim.submit("client", spec, 1) for _ in range(6)]
    assert all(type(d) is rategate.Decision for d in ds)  # never a future
    assert [(d.allowed, d.rate, d.limit, d.remaining) for d in ds] == (
        [(True, 0, 5, r) for r in (4, 3, 2, 1, 0)] + [(False, 0, 5, 0)])
    assert ds[-1].retry_after == pytest.approx(12.0, abs=0.1) and ds[-1].latency is None
    assert ds[-1].error is None
    assert (await lim.hit("client", spec, cost=0)).remaining == 0  # a peek
    d = await lim.hit("big", "5/minute", cost=6)  # more than the bucket: never
    assert not d.allowed and d.retry_after == math.inf
    assert await lim.reset("client", spec) is True
    assert (await lim.hit("client", "5/minute")).remaining == 4
    assert (await lim.hit("client", "100/hour", cost=0)).remaining == 100  # reset both of spec's rates
    c = await lim.charge("client", "5/minute", 10)  # into debt
    assert c.allowed and c.remaining == 0
    assert not (await lim.hit("client", "5/minute")).allowed
    st = lim.stats()
    assert (st["checks"], st["errors"]["overloaded"], st["cached_denials"]) == (11, 0, 0)
    lim.close()


def _concurrency_sequence(url: str) -> list[Any]:
    lim = rategate.Limiter(url)
    out: list[Any] = []
    spec = lim.compile("3/minute", concurrency=2, ttl=30)
    only = lim.compile(None, concurrency=1, ttl=30)
    for sid in (b"a", b"b", b"c", b"a"):  # a third denied; "a" again: renewed, not a new slot
        d = lim.submit("u", spec, 1, sid)
        out.append((d.allowed, d.rate, d.limit, d.remaining, d.retry_after))
    out.append(lim._engine.release("u", spec, b"a"))
    d = lim.submit("u", spec, 1, b"c")
    out.append((d.allowed, d.rate, d.limit, d.remaining))
    out.append(sorted((k, i) for k, i, _ in lim._engine.entries(b"u")))
    for sid in (b"x", b"y"):
        d = lim.submit("v", only, 1, sid)
        out.append((d.allowed, d.rate, d.limit, d.remaining))
    lim.release("v", only, b"x")
    d = lim.submit("v", only, 1, b"y")
    out.append((d.allowed, d.remaining))
    lim.close()
    return out


def test_concurrency_as_memory(shm_name: str) -> None:
    got = _concurrency_sequence(f"shm://{shm_name}")
    assert got == _concurrency_sequence("memory://")
    assert got[2][0] is False and got[2][4] == 1.0  # the limit of 2 slots, retry in a second


def test_expired_slots_are_not_counted(shm_name: str) -> None:
    lim = rategate.Limiter(f"shm://{shm_name}")
    spec = lim.compile(None, concurrency=2, ttl=0.2)
    assert lim.submit("k", spec, 1, b"dead1").allowed and lim.submit("k", spec, 1, b"dead2").allowed
    assert not lim.submit("k", spec, 1, b"x").allowed
    time.sleep(0.3)  # both holders "died": their slots expire
    assert [lim.submit("k", spec, 1, s).remaining for s in (b"x", b"y")] == [1, 0]
    assert not lim.submit("k", spec, 1, b"z").allowed
    assert lim._engine.release("k", spec, b"dead1") is True  # long gone: nothing changes
    assert not lim.submit("k", spec, 1, b"z").allowed
    lim.release("k", spec, b"x")
    assert lim.submit("k", spec, 1, b"z").remaining == 0


@pytest.fixture(scope="module")
def shm_limiter() -> Iterator[rategate.Limiter]:
    name = fresh_name("prop")
    lim = rategate.Limiter(f"shm://{name}?capacity=20000", timeout=2.0)
    yield lim
    lim.close()
    rategate.shm_unlink(name)


@settings(COMMON, max_examples=60)
@given(rates=rates_strategy(1.0), costs=costs_strategy)
def test_shm_equals_the_model(shm_limiter: rategate.Limiter, loop: asyncio.AbstractEventLoop,
                              rates: tuple[rategate.Rate, ...], costs: list[int]) -> None:
    check_store(shm_limiter, loop, rates, costs)


@settings(COMMON, max_examples=60)
@given(rates=rates_strategy(1.0), ops=ops_strategy)
def test_shm_charges_equal_the_model(shm_limiter: rategate.Limiter, loop: asyncio.AbstractEventLoop,
                                     rates: tuple[rategate.Rate, ...], ops: list[tuple[str, int]]) -> None:
    check_store_charges(shm_limiter, loop, rates, ops)


store_ops = st.lists(st.one_of(
    st.tuples(st.just("hit"), st.integers(0, 2), st.sampled_from([0, 1, 1, 1, 2, 5, 2000])),
    st.tuples(st.just("charge"), st.integers(0, 2), st.sampled_from([1, 3, -1, -4, 1000])),
    st.tuples(st.just("reset"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("take"), st.integers(0, 2), st.integers(0, 3)),
    st.tuples(st.just("give"), st.integers(0, 2), st.integers(0, 3)),
), min_size=1, max_size=30)


@settings(COMMON, max_examples=80)
@given(rates=rates_strategy(1.0), limit=st.integers(1, 3), ops=store_ops)
def test_shm_equals_memory(shm_limiter: rategate.Limiter, rates: tuple[rategate.Rate, ...], limit: int,
                           ops: list[tuple[str, int, int]]) -> None:
    """Every operation, on both stores in lockstep: the same decisions (the
    durations within the time the sequence took)."""
    mem = rategate.Limiter("memory://")
    try:
        tag = next(_names)
        t0 = time.monotonic()
        specs = [(lim, lim.compile(rates), lim.compile(rates, concurrency=limit, ttl=60))
                 for lim in (mem, shm_limiter)]
        for op, k, arg in ops:
            key = f"eq{tag}-{k}"
            got = []
            for lim, spec, cspec in specs:
                if op == "hit":
                    r: Any = lim.submit(key, spec, arg)
                elif op == "charge":
                    r = lim._engine.charge(key, spec, arg)
                elif op == "reset":
                    r = lim._engine.reset(key, spec)
                elif op == "take":
                    r = lim.submit(key, cspec, 1, b"slot%d" % arg)
                else:
                    r = lim._engine.release(key, cspec, b"slot%d" % arg)
                got.append(r)
            a, b = got
            if isinstance(a, bool):
                assert a is b is True
                continue
            assert (a.allowed, a.rate, a.limit, a.remaining, a.error) == (
                b.allowed, b.rate, b.limit, b.remaining, b.error), (op, k, arg, a, b)
            slack = time.monotonic() - t0 + 0.01
            assert abs(a.reset_after - b.reset_after) <= slack
            assert a.retry_after == b.retry_after or abs(a.retry_after - b.retry_after) <= slack
    finally:
        mem.close()


# -- Seam 2: clear() and entries() --------------------------------------------------------------
@pytest.mark.parametrize("store", ["memory", "shm"])
def test_clear_and_entries(store: str, shm_name: str) -> None:
    lim = rategate.Limiter("memory://" if store == "memory" else f"shm://{shm_name}")
    e = lim._engine
    both = lim.compile("10/minute; 100/hour")
    lim.submit("app|1.2.3.4", both, 3)
    lim.submit("app|1.2.3.5", lim.compile("10/minute"), 1)
    lim.submit("other|1.2.3.4", lim.compile(rategate.Rate(10, 60, burst=15)), 1)
    lim.submit("app|1.2.3.4", lim.compile("10/minute", concurrency=3), 1, b"s1")
    lim.submit("app|1.2.3.4", lim.compile("10/minute", concurrency=3), 1, b"s2")
    lim.submit("full|x", lim.compile("10/minute"), 0)  # a peek leaves no bucket behind
    got = sorted(e.entries())
    assert [(k, i) for k, i, _ in got] == [
        (b"app|1.2.3.4", b"10/60000"), (b"app|1.2.3.4", b"100/3600000"), (b"app|1.2.3.4", b"c"),
        (b"app|1.2.3.5", b"10/60000"), (b"other|1.2.3.4", b"10/60000b15")]
    us = {(k, i): v for k, i, v in got}
    # microseconds until full: 5 tokens of 10/minute = 30 s (less the time since)
    assert 29e6 < us[(b"app|1.2.3.4", b"10/60000")] <= 30e6
    assert 107e6 < us[(b"app|1.2.3.4", b"100/3600000")] <= 108e6  # 3 tokens of 36 s
    assert us[(b"app|1.2.3.4", b"c")] == 2.0  # live slots
    assert sorted(k for k, _, _ in e.entries(b"app|")) == [b"app|1.2.3.4"] * 3 + [b"app|1.2.3.5"]
    assert [i for _, i, _ in e.entries("other|")] == [b"10/60000b15"]  # str works too
    assert e.entries(b"nobody") == []
    lim.release("app|1.2.3.4", lim.compile("10/minute", concurrency=3), b"s1")
    assert {(k, i): v for k, i, v in e.entries(b"app|1.2.3.4")}[(b"app|1.2.3.4", b"c")] == 1.0
    with pytest.raises(TypeError, match="prefix must be bytes or str"):
        e.entries(3)
    assert e.clear() == 5
    assert e.entries() == [] and e.clear() == 0
    assert lim.submit("app|1.2.3.4", both, 1).remaining == 9  # full again
    lim.close()


def test_long_keys(shm_name: str) -> None:
    """Keys past 172 bytes are stored as their first 140 bytes and a SHA-256:
    two that share the first 140 bytes are still two buckets."""
    lim = rategate.Limiter(f"shm://{shm_name}")
    spec = lim.compile("3/hour")
    a, b = b"p" * 150 + b"a" * 100, b"p" * 150 + b"b" * 100
    assert [lim.submit(a, spec, 1).remaining for _ in range(2)] == [2, 1]
    assert lim.submit(b, spec, 1).remaining == 2
    big = b"q" * 65536
    assert lim.submit(big, spec, 3).remaining == 0 and not lim.submit(big, spec, 1).allowed
    assert sorted((k, i) for k, i, _ in lim._engine.entries(b"p" * 10)) == [(b"p" * 140, b"3/3600000")] * 2
    assert [k for k, _, _ in lim._engine.entries(a)] == [b"p" * 140]  # the whole key: found
    assert lim._engine.entries(a[:-1]) == []
    # A prefix longer than what is kept (140 bytes) matches the whole key only.
    assert lim._engine.entries(b"p" * 141) == [] and lim._engine.entries(b"p" * 140 + b"x") == []
    lim.close()


# -- capacity -------------------------------------------------------------------------------------
def fill(lim: rategate.Limiter, spec: Any, tag: str, bound: int) -> tuple[int, Any]:
    """Distinct keys until a check is overloaded: (allowed, that decision)."""
    for i in range(bound):
        d = lim.submit(f"{tag}{i}", spec, 1)
        if d.error is not None:
            return i, d
        assert d.allowed
    raise AssertionError(f"{bound} buckets and no overload")


def test_default_capacity_fits_its_buckets(shm_name: str) -> None:
    lim = rategate.Limiter(f"shm://{shm_name}")
    n, d = fill(lim, lim.compile("1/hour"), "k", 200_000)
    print(f"\nfirst overload after {n} live buckets: {n / 65536:.3f} x capacity")
    assert n >= 65536 and d.error == "overloaded"
    lim.close()


def test_capacity_evicts_full_buckets_and_overloads_when_all_live(
        shm_name: str, caplog: pytest.LogCaptureFixture) -> None:
    lim = rategate.Limiter(f"shm://{shm_name}?capacity=64")
    slow = lim.compile("1/hour")
    with caplog.at_level(logging.WARNING, logger="rategate"):
        n, d = fill(lim, slow, "a", 1000)
    assert n >= 64
    assert (d.allowed, d.error, d.retry_after) == (False, "overloaded", 1.0)
    st = lim.stats()
    slots = st["shm"]["slots"]
    assert st["errors"]["overloaded"] == 1 and st["shm"]["overloaded"] == 1
    assert st["keys"] == st["shm"]["live"] == n  # every bucket is live
    assert "is full" in st["overloaded_cause"] and "capacity=64" in st["overloaded_cause"]
    lines = [r.getMessage() for r in caplog.records if r.name == "rategate"]
    assert len(lines) == 1 and path(shm_name) in lines[0] and "capacity=64" in lines[0]
    # An existing bucket is still answered: only a new one needs room.
    assert lim.submit("a0", slow, 1).error is None
    # failure_mode="open" lets the overloaded check through, flagged.
    opened = rategate.Limiter(f"shm://{shm_name}", failure_mode="open")
    d = opened.submit(f"a{n}", slow, 1)
    assert (d.allowed, d.error) == (True, "overloaded")
    opened.close()

    # Buckets that are full again hold nothing: new ones take their place.
    assert lim._engine.clear() == n
    quick = lim.compile(rategate.Rate(1, 0.3))  # full again 0.3 s after a hit
    nq, _ = fill(lim, quick, "b", 1000)
    time.sleep(0.4)
    m, _ = fill(lim, slow, "c", 1000)
    assert m >= 64
    assert lim.stats()["shm"]["evicted"] >= m - (slots - nq)  # all but the free slots evicted one
    # Another overload within the minute is counted, not logged again.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rategate"):
        assert lim.submit(f"c{m}", slow, 1).error == "overloaded"
    assert [r for r in caplog.records if r.name == "rategate"] == []
    assert lim.stats()["errors"]["overloaded"] == 4
    assert lim.stats()["shm"]["overloaded"] == 5  # this process's 4 and `opened`'s one
    lim.close()


# -- refused segments ------------------------------------------------------------------------------
def patch(name: str, offset: int, data: bytes) -> None:
    with open(path(name), "r+b") as f:
        f.seek(offset)
        f.write(data)


# The header (shmstore.h rg_shm_header): magic u64 at 0, version u32 at 8,
# header/stripe/set/entry/mutex sizes u32 at 12..28, ..., total_size u64 at 64.
@pytest.mark.parametrize("offset, data, says", [
    (0, b"NOTRGATE", "is not a rategate segment (it starts with 0x4554414752544f4e)"),
    (8, struct.pack("<I", 99), "was made by another version of rategate (layout version 99; this one reads version 1)"),
    (24, struct.pack("<I", 300), "has a layout this build of rategate cannot read"),
    (64, struct.pack("<Q", 1 << 40), "is damaged"),
])
def test_foreign_layouts_are_refused(shm_name: str, offset: int, data: bytes, says: str) -> None:
    rategate.Limiter(f"shm://{shm_name}?capacity=100").close()
    patch(shm_name, offset, data)
    with pytest.raises(ValueError) as e:
        rategate.Limiter(f"shm://{shm_name}")
    assert says in str(e.value) and path(shm_name) in str(e.value)
    assert "rm " + path(shm_name) in str(e.value) or "shm_unlink" in str(e.value)


def test_entries_scribbled_on_are_never_read_past(shm_name: str) -> None:
    """Another program of the same user writes into a live segment: lengths
    past an entry are skipped by every walk, never followed (ASan checks)."""
    lim = rategate.Limiter(f"shm://{shm_name}?capacity=64")
    spec = lim.compile("10/hour; 20/hour", concurrency=2)
    assert lim.submit("k", spec, 1, b"s").allowed
    with open(path(shm_name), "rb") as f:
        head = f.read(96)
    entries_off, = struct.unpack_from("<Q", head, 88)
    slots = lim.stats()["shm"]["slots"]
    for i in range(slots):  # every entry's klen (a u16 at 28) and idlen (a u8 at 32)
        patch(shm_name, entries_off + i * 256 + 28, struct.pack("<H", 0xFFFF))
        patch(shm_name, entries_off + i * 256 + 32, b"\xff")
    assert lim._engine.entries() == []
    d = lim.submit("k", spec, 1, b"t")  # its old entries no longer match: new ones
    assert d.allowed and d.error is None
    assert lim._engine.clear() >= 1
    lim.close()


def test_a_file_that_is_not_a_segment_is_refused(shm_name: str) -> None:
    fd = os.open(path(shm_name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.write(fd, b"#!/bin/sh\necho hello\n" + b"\0" * 8192)
    os.close(fd)
    with pytest.raises(ValueError, match="is not a rategate segment"):
        rategate.Limiter(f"shm://{shm_name}")


def test_a_segment_never_initialised_is_refused(shm_name: str) -> None:
    # Its creator "died" before writing the magic: openers wait 5 s, then say so.
    fd = os.open(path(shm_name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, 8192)
    os.close(fd)
    with pytest.raises(ValueError, match="was never initialised .*Remove it"):
        rategate.Limiter(f"shm://{shm_name}")


def test_a_segment_open_to_others_is_refused(shm_name: str) -> None:
    rategate.Limiter(f"shm://{shm_name}").close()
    os.chmod(path(shm_name), 0o644)
    with pytest.raises(PermissionError, match=r"is open to other users \(mode 0644; rategate makes it 0600\)"):
        rategate.Limiter(f"shm://{shm_name}")


def test_another_users_segment_is_refused_faked_owner(shm_name: str) -> None:
    rategate.Limiter(f"shm://{shm_name}").close()
    other = os.geteuid() + 4242
    _core._shm_test_euid(other)  # this process plays user `other`
    try:
        with pytest.raises(PermissionError) as e:
            rategate.Limiter(f"shm://{shm_name}")
    finally:
        _core._shm_test_euid(-1)
    assert f"belongs to another user (uid {os.geteuid()}; this process runs as uid {other})" in str(e.value)
    rategate.Limiter(f"shm://{shm_name}").close()  # and as itself, it opens


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_another_users_segment_is_refused(shm_name: str) -> None:
    nobody = 65534
    assert worker("open", shm_name, "k", "10/minute", uid=nobody) == ["9"]
    assert os.stat(path(shm_name)).st_uid == nobody
    with pytest.raises(PermissionError, match=rf"belongs to another user \(uid {nobody}; this process runs as uid 0\)"):
        rategate.Limiter(f"shm://{shm_name}")  # even root is refused it
    rategate.shm_unlink(shm_name)
    rategate.Limiter(f"shm://{shm_name}").close()  # root's now: nobody cannot open it
    r = subprocess.run([sys.executable, WORKER, "--uid", str(nobody), "open", shm_name, "k", "10/minute"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert f"PermissionError: the shm segment {path(shm_name)} belongs to another user (uid 0" in r.stderr


# -- creating, fork --------------------------------------------------------------------------------
def test_creators_racing_make_one_segment(shm_name: str) -> None:
    procs = [subprocess.Popen([sys.executable, WORKER, "open", shm_name, "k", "100/hour"], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "START": "1"})
             for _ in range(8)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        for p in procs:  # all at once: every one tries O_EXCL first
            assert p.stdin is not None
            p.stdin.write("\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=30)[0].split() for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs)
    assert sorted(int(o[0]) for o in outs) == list(range(92, 100))  # one shared bucket


def test_an_opener_waits_for_its_creator(shm_name: str) -> None:
    # A creator that is slow to finish, played by this test: the bytes of a
    # real segment written in two steps, the magic (the first 8 bytes) last.
    tmpl = fresh_name("tmpl")
    _core.ShmEngine(tmpl, 100).close()
    with open(path(tmpl), "rb") as f:
        data = f.read()
    rategate.shm_unlink(tmpl)
    fd = os.open(path(shm_name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    got: dict[str, Any] = {}

    def opener() -> None:
        try:
            got["engine"] = _core.ShmEngine(shm_name)
        except Exception as e:  # noqa: BLE001 - reported below
            got["error"] = e

    t = threading.Thread(target=opener)
    t.start()
    try:
        time.sleep(0.3)
        assert t.is_alive()  # an empty file: waiting (up to 5 s)
        os.ftruncate(fd, len(data))
        os.pwrite(fd, data[8:], 8)
        time.sleep(0.3)
        assert t.is_alive()  # everything but the magic: still waiting
        os.pwrite(fd, data[:8], 0)
    finally:
        t.join(10)
        os.close(fd)
    assert "error" not in got, got.get("error")
    e = got["engine"]
    spec = rategate.Limiter("memory://").compile("10/hour")
    assert e.submit("k", spec, 1).remaining == 9 and e.stats()["shm"]["capacity"] == 100
    e.close()


def test_fork_children_share_the_limiter_opened_before(shm_name: str) -> None:
    # The parent hits once, 3 children of fork() once each, then the parent.
    out = worker("fork", shm_name, "k", "100/hour", "3")
    assert out[0] == "99" and out[-1] == "95" and sorted(out[1:4]) == ["96", "97", "98"]


# -- the middleware ------------------------------------------------------------------------------
async def _ok(request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


@pytest.mark.parametrize("store", ["memory", "shm"])
async def test_middleware_counts_a_local_denial_as_the_stores(store: str, shm_name: str) -> None:
    """An shm:// (or memory://) denial is answered at once, but by the store:
    "denied", not "denied_cached" (which is the Redis engine's local cache)."""
    lim = rategate.Limiter("memory://" if store == "memory" else f"shm://{shm_name}")
    app = Starlette(routes=[Route("/", _ok)],
                    middleware=[Middleware(rategate.RateLimitMiddleware, limiter=lim, limits="3/minute")])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        codes = [(await c.get("/")).status_code for _ in range(5)]
    assert codes == [200] * 3 + [429] * 2
    counts = lim.stats()["rules"]["default"]
    assert (counts["allowed"], counts["denied"], counts["denied_cached"]) == (3, 2, 0)
    lim.close()


async def test_dependency_counts_a_shm_denial_as_the_stores(shm_name: str) -> None:
    from fastapi import Depends, FastAPI

    lim = rategate.Limiter(f"shm://{shm_name}")
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(rategate.RateLimit("2/minute", limiter=lim))])
    async def x() -> dict[str, str]:
        return {}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        codes = [(await c.get("/x")).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    (counts,) = lim.stats()["rules"].values()
    assert (counts["denied"], counts["denied_cached"]) == (1, 0)
    lim.close()


async def test_middleware_log_names_a_full_segment(shm_name: str, caplog: pytest.LogCaptureFixture) -> None:
    lim = rategate.Limiter(f"shm://{shm_name}?capacity=16")
    fill(lim, lim.compile("1/hour"), "x", 1000)
    app = Starlette(routes=[Route("/", _ok)],
                    middleware=[Middleware(rategate.RateLimitMiddleware, limiter=lim, limits="3/minute")])
    with caplog.at_level(logging.WARNING, logger="rategate"):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.get("/")
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    text = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "failed (overloaded: the shm segment " + path(shm_name) + " is full" in text
    assert "max_pending" not in text
    lim.close()

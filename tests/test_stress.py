"""Stress: one Limiter, many threads and event loops, close() racing them.

Several Python threads, each with its own event loop, submit to one Redis
Limiter while another thread calls stats(), close() and aclose(); some loops
are closed with checks in flight and replaced by new ones.  Required: every
awaited check is answered exactly once (a Decision, or the RuntimeError of a
closed limiter), nothing hangs, nothing leaks, and under `make test-asan`
no sanitizer report.  Kept to a few seconds; RATEGATE_STRESS_ROUNDS scales it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

import rategate
from rategate import _core
from redisserver import RedisServer

ROUNDS = int(os.environ.get("RATEGATE_STRESS_ROUNDS", "6"))
THREADS = 4
PER_LOOP = 150
LOOPS = 3
HANG = 30.0  # seconds: past this a thread is hung, the test fails

OK_ERRORS = {None, "closed", "timeout", "overloaded", "unavailable"}


class Tally:
    """What every thread saw, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.submitted = 0      # awaited checks handed to hit()
        self.answered = 0       # ... that came back with a Decision
        self.refused = 0        # ... that raised "closed"
        self.bad: list[str] = []

    def add(self, submitted: int, answered: int, refused: int, bad: list[str]) -> None:
        with self.lock:
            self.submitted += submitted
            self.answered += answered
            self.refused += refused
            self.bad += bad


async def awaited_checks(lim: Any, spec: Any, tally: Tally, tag: str) -> None:
    async def one(i: int) -> Any:
        try:
            return await lim.hit(f"{tag}:{i % 37}", spec)
        except RuntimeError as e:
            return e

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(PER_LOOP))), HANG)
    answered = refused = 0
    bad = []
    for r in results:
        if isinstance(r, rategate.Decision):
            answered += 1
            if r.error not in OK_ERRORS:
                bad.append(f"error {r.error!r}")
        elif isinstance(r, RuntimeError) and "closed" in str(r):
            refused += 1
        else:
            bad.append(repr(r))
    tally.add(len(results), answered, refused, bad)


async def abandoned_checks(lim: Any, spec: Any, tag: str) -> None:
    # Submitted and never awaited: the loop closes with them in flight.
    for i in range(PER_LOOP):
        try:
            lim.submit(f"{tag}:{i}", spec, 1)
        except RuntimeError:
            return
    await asyncio.sleep(0)


def worker(lim: Any, spec: Any, tally: Tally, idx: int, abandon: bool) -> None:
    for n in range(LOOPS):
        loop = asyncio.new_event_loop()
        try:
            if abandon and n % 2 == 1:
                loop.run_until_complete(abandoned_checks(lim, spec, f"t{idx}"))
            else:
                loop.run_until_complete(awaited_checks(lim, spec, tally, f"t{idx}"))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            tally.add(0, 0, 0, [f"thread {idx}: {e!r}"])
        finally:
            loop.close()


def closer(lim: Any, delay: float, use_aclose: bool, stop: threading.Event) -> None:
    t_end = time.monotonic() + delay
    while time.monotonic() < t_end:
        lim.stats()
        time.sleep(0.0005)
    if use_aclose:
        asyncio.run(lim.aclose())
    else:
        lim.close()
    while not stop.is_set():
        st = lim.stats()  # reads no freed shard
        assert st["connected"] is False
        time.sleep(0.001)


def run_round(url: str, r: int) -> Tally:
    abandon = r % 2 == 1
    lim = rategate.Limiter(url, threads=2, timeout=2.0, deny_cache_ttl=0.05)
    spec = lim.compile("50/second; 1000/minute")
    tally = Tally()
    stop = threading.Event()
    workers = [threading.Thread(target=worker, args=(lim, spec, tally, i, abandon)) for i in range(THREADS)]
    # Rounds alternate: the close lands early, mid-way or after the work.
    c = threading.Thread(target=closer, args=(lim, (0.002, 0.02, 0.2)[r % 3], r % 2 == 0, stop))
    for t in workers:
        t.start()
    c.start()
    for t in workers:
        t.join(HANG)
        assert not t.is_alive(), "a submitting thread hung"
    stop.set()
    c.join(HANG)
    assert not c.is_alive(), "close() hung"
    lim.close()
    if not abandon:
        # Every decided check counted once: none lost, none answered twice.
        st = lim.stats()
        assert st["allowed"] + st["denied"] == st["checks"], st
    return tally


def test_threads_loops_and_close_race(redis_url: str) -> None:
    total = Tally()
    # Switch threads every few microseconds: far more interleavings of
    # submit(), close() and stats() per round than the default 5 ms.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for r in range(ROUNDS):
            t = run_round(redis_url, r)
            assert t.bad == [], t.bad[:5]
            assert t.submitted == t.answered + t.refused  # each exactly once
            total.add(t.submitted, t.answered, t.refused, [])
    finally:
        sys.setswitchinterval(interval)
    assert total.answered > 0 and total.refused > 0  # both sides of the race were hit
    deadline = time.monotonic() + 10
    while True:
        gc.collect()
        live = _core._live()
        if live == {"checks": 0, "ports": 0, "conns": 0} or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert live == {"checks": 0, "ports": 0, "conns": 0}


def test_loops_replaced_with_checks_in_flight(own_redis: RedisServer) -> None:
    # A slow Redis keeps checks in flight while their loop closes; the next
    # loop's first submit shuts the dead port while the loop thread pushes.
    lim = rategate.Limiter(own_redis.url, timeout=1.0)
    spec = lim.compile("1000/second")
    try:
        for n in range(20):
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(abandoned_checks(lim, spec, f"l{n}"))
                if n % 5 == 0:
                    own_redis.pause(0.02).wait()
            finally:
                loop.close()
        d = asyncio.run(lim.hit("last", spec))
        assert d.allowed and d.error is None
    finally:
        lim.close()
    gc.collect()
    assert _core._live()["checks"] == 0


FORK_CHILD = textwrap.dedent(
    """
    import asyncio, os, sys, time
    import rategate

    lim = rategate.Limiter(sys.argv[1], timeout=0.2, connect_timeout=0.2)
    async def hit():
        return await lim.hit("k", "5/second")
    asyncio.run(hit())          # started, then Redis dies: reconnects every ~500 ms
    time.sleep(float(sys.argv[2]))
    for _ in range(5):
        pid = os.fork()
        if pid == 0:
            d = asyncio.run(hit())  # the child's first error and stats() must not block
            lim.stats()
            os._exit(0 if d.error in ("unavailable", "timeout") else 3)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            sys.exit(status)
        time.sleep(0.05)
    lim.close()
    """
)


def test_fork_during_outage(own_redis: RedisServer) -> None:
    url = own_redis.url
    # Run in a fresh interpreter: a deadlocked child must not hang pytest.
    proc = subprocess.Popen([sys.executable, "-c", FORK_CHILD, url, "0.6"], cwd=os.path.dirname(os.path.dirname(__file__)))
    time.sleep(0.3)
    own_redis.stop()
    try:
        rc = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("a child forked during an outage hung (err_mu held across fork?)")
    assert rc == 0

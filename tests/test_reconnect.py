"""A healthy connection that drops is replaced at once (issue 8 #12).

Redis's idle ``timeout``, a proxy or a load balancer resetting connections,
``CLIENT KILL``: Redis is up, only one connection went.  Checks queued
meanwhile wait for the new connection within their own deadline, and the
checks of the lost call are sent again once, so none gets a failure
decision.  Only a reconnect that fails (Redis really down) answers at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from redisserver import RedisServer


@pytest.mark.parametrize("transport", ["plain", "tls"])
async def test_client_kill_under_traffic_gives_no_failure_decisions(
    request: pytest.FixtureRequest, make_limiter: Any, transport: str
) -> None:
    srv: RedisServer = request.getfixturevalue("redis_server" if transport == "plain" else "redis_tls_server")
    srv.flushall()
    lim = make_limiter(srv.url, timeout=2.0, threads=2)
    admin = srv.client()
    errors: Counter[Any] = Counter()
    done = asyncio.Event()

    async def traffic(i: int) -> None:
        n = 0
        while not done.is_set():
            d = await lim.hit(f"user{i}-{n % 7}", "1000000/second")
            errors[d.error] += 1
            n += 1

    assert (await lim.hit("warm", "10/second")).error is None
    tasks = [asyncio.create_task(traffic(i)) for i in range(20)]
    killed = 0
    for _ in range(20):
        await asyncio.sleep(0.03)
        killed += int(await asyncio.to_thread(admin.execute_command, "CLIENT", "KILL", "TYPE", "normal"))
    await asyncio.sleep(0.05)
    done.set()
    await asyncio.gather(*tasks)
    st = lim.stats()
    assert killed >= 20
    assert set(errors) == {None}, (dict(errors), st["last_error"])
    assert errors[None] > 100
    assert st["reconnects"] >= 10
    assert st["connected"] is True


async def test_redis_really_down_is_still_answered_at_once(own_redis: RedisServer, make_limiter: Any) -> None:
    lim = make_limiter(own_redis.url, timeout=5.0)
    assert (await lim.hit("k", "10/second")).error is None
    own_redis.stop()
    # The drop is seen, the immediate reconnect is refused: from then on
    # every check is answered at once, not after its 5 s deadline.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and lim.stats()["connected"]:
        await asyncio.sleep(0.01)
    t0 = time.monotonic()
    ds = [await lim.hit("k", "10/second") for _ in range(20)]
    elapsed = time.monotonic() - t0
    assert all(d.error == "unavailable" for d in ds), [d.error for d in ds]
    assert elapsed < 2.0  # 20 checks against a 5 s deadline each: none waited
    # The cause is named (the first attempt may race the dying server's
    # socket; the next ones are refused).
    for _ in range(300):
        if "connection refused" in lim.stats()["last_error"]:
            break
        await asyncio.sleep(0.01)
    assert f"connect failed: 127.0.0.1:{own_redis.port}: connection refused" in lim.stats()["last_error"]

"""Nothing retained by the C request path (issue 20): a million requests
through RateLimitMiddleware's gate (allowed with headers through the C send,
denied with the 429 built in C, exempt), then RSS and tracemalloc say what
stayed.  A debug CPython's sys.gettotalrefcount is used when there is one
(this project's CI runs a release build: then RSS and tracemalloc only)."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import tracemalloc
from typing import Any

import pytest
from asgi_call import ok_app

import rategate
from rategate.middleware import PYTHON_PATH

pytestmark = [
    pytest.mark.skipif(PYTHON_PATH, reason="RATEGATE_PYTHON_PATH is set: no C path"),
    pytest.mark.skipif(bool(os.environ.get("RATEGATE_SANITIZED")),
                       reason="a million requests under a sanitizer take minutes; ASan runs test_gate.py"),
]


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def _send(message: Any) -> None:
    pass


def scope(i: int) -> dict[str, Any]:
    path = ("/", "/", "/", "/flood", "/health")[i % 5]
    return {"type": "http", "method": "GET", "path": path, "headers": [(b"x-forwarded-for", b"203.0.113.9")],
            "client": (f"10.0.{i >> 8 & 255}.{i & 255}" if i % 7 else f"2001:db8::{i & 0xffff:x}", 1234)}


async def requests(mw: Any, first: int, n: int) -> None:
    for i in range(first, first + n):
        await mw(scope(i), _receive, _send)


def test_a_million_requests_retain_nothing() -> None:
    lim = rategate.Limiter("memory://")
    mw = rategate.RateLimitMiddleware(ok_app, limiter=lim, limits="1000000/second", rules={"/flood": "1/hour"},
                                      exempt=["/health"], headers="draft-11",
                                      key=rategate.client_ip(trusted_proxies=["10.0.0.0/8"], ipv6_prefix=64))
    assert mw._gate is not None
    loop = asyncio.new_event_loop()
    try:
        for p in ("/", "/flood"):
            mw.rule_for(p, "GET")
        before_counts = lim.stats()["checks"]
        loop.run_until_complete(requests(mw, 0, 100_000))
        gc.collect()
        rss_100k = rss_kb()
        total = sys.gettotalrefcount() if hasattr(sys, "gettotalrefcount") else None  # type: ignore[attr-defined]
        loop.run_until_complete(requests(mw, 100_000, 700_000))
        tracemalloc.start()
        loop.run_until_complete(requests(mw, 0, 10_000))  # reach every allocation the path makes once
        gc.collect()
        snap0 = tracemalloc.take_snapshot()
        loop.run_until_complete(requests(mw, 800_000, 200_000))
        gc.collect()
        snap1 = tracemalloc.take_snapshot()
        tracemalloc.stop()
        rss_1m = rss_kb()
        grown = sum(s.size_diff for s in snap1.compare_to(snap0, "filename") if s.size_diff > 0)
        checks = lim.stats()["checks"] - before_counts
        print(f"\nRSS after 100k {rss_100k} KB, after 1M {rss_1m} KB; tracemalloc growth over the last 200k "
              f"{grown} B; {checks} checks")
        assert checks >= 780_000  # the exempt fifth is not checked
        # the route cache and the key caches are bounded; the limiter's own
        # table holds one entry per key it has seen (about 60,000 here)
        assert rss_1m - rss_100k <= 4096, (rss_100k, rss_1m)
        assert grown <= 64 * 1024, snap1.compare_to(snap0, "lineno")[:10]
        if total is not None:
            gc.collect()
            assert sys.gettotalrefcount() - total <= 10_000  # type: ignore[attr-defined]
    finally:
        loop.close()
        lim.close()


def test_a_redis_backed_stretch_retains_nothing(redis_url: str) -> None:
    # the future path (Pending, resume) and the C send, 100,000 requests
    async def go() -> tuple[int, int]:
        lim = rategate.Limiter(redis_url, timeout=5.0)
        mw = rategate.RateLimitMiddleware(ok_app, limiter=lim, limits="1000000/hour")
        mw.rule_for("/", "GET")

        async def batch(first: int, n: int) -> None:
            for k in range(first, first + n, 100):
                await asyncio.gather(*(mw(scope(i * 5), _receive, _send) for i in range(k, k + 100)))

        await batch(0, 20_000)
        gc.collect()
        a = rss_kb()
        await batch(20_000, 80_000)
        gc.collect()
        b = rss_kb()
        await lim.aclose()
        return a, b

    a, b = asyncio.run(go())
    print(f"\nRSS after 20k {a} KB, after 100k {b} KB")
    assert b - a <= 2048, (a, b)
    assert rategate._core._live()["checks"] == 0

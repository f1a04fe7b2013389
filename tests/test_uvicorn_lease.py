"""Leases across processes: ``uvicorn --workers 4``, one global limit
(200/minute) leased by every worker, 1200 requests from 100 connections.

The promise, asserted exactly: never more admitted than the limit allows
(burst + rate * elapsed, from a full bucket), and no more than 4 * (200 // 16)
tokens lost to leases parked in the other workers.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_uvicorn import Uvicorn  # noqa: E402

BURST, PER_S, WORKERS, N, CONNS = 200, 200 / 60, 4, 1200, 100


async def _hammer(url: str, bucket: str) -> tuple[list[httpx.Response], float]:
    limits = httpx.Limits(max_connections=CONNS, max_keepalive_connections=CONNS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as c:
        sem = asyncio.Semaphore(CONNS)

        async def one() -> httpx.Response:
            async with sem:
                return await c.get("/global?" + bucket)

        t0 = time.monotonic()
        rs = await asyncio.gather(*(one() for _ in range(N)))
        return list(rs), time.monotonic() - t0


async def _stats(url: str) -> dict[int, Any]:
    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=40), timeout=30) as c:
        rs = await asyncio.gather(*(c.get("/stats") for _ in range(80)))
    return {r.json()["pid"]: r.json() for r in rs}


def test_four_workers_leasing_one_global_limit(redis_server: Any) -> None:
    redis_server.flushall()
    srv = Uvicorn("lease_app:app", workers=WORKERS, env={"RATEGATE_REDIS_URL": redis_server.url})
    try:
        # The kernel hands each connection to whichever worker accepts first;
        # on a busy machine one worker can take a whole burst.  Each run is a
        # fresh key (its own full bucket); runs repeat (bounded) until the
        # admitted requests came from several workers.
        for run in range(5):
            rs, elapsed = asyncio.run(_hammer(srv.url, f"run{run}"))
            admitted = [r for r in rs if r.status_code == 200]
            assert all(r.status_code in (200, 429) for r in rs)
            assert len(admitted) <= BURST + int(elapsed * PER_S), (run, len(admitted), elapsed)
            assert len(admitted) >= BURST - WORKERS * (BURST // 16), (run, len(admitted), elapsed)
            if len({r.text for r in admitted}) >= 2:
                break
        # Several workers admitted, each from its own leases.
        assert len({r.text for r in admitted}) >= 2, {r.text for r in admitted}
        stats = asyncio.run(_stats(srv.url))
    finally:
        srv.stop()
    assert max(int(r.headers["x-leased"]) for r in admitted) > 0
    assert all(not any(s["errors"].values()) for s in stats.values()), stats

"""Across processes: ``uvicorn --workers 4`` on a 5/minute route, 100 concurrent requests
from one client: exactly 5 answered 200 and 95 answered 429, in every run.

As a test it does RUNS runs (``RATEGATE_WORKER_RUNS``, default 3); as a script it
does the issue's full ten against its own throwaway redis-server::

    python tests/test_uvicorn_workers.py            # 10 runs
    python tests/test_uvicorn_workers.py --runs 25 --workers 4 --requests 100

Each run is "one client" with a fresh identity: its own loopback source address
(127.0.0.40, .41, ...), so runs do not share counters and nothing is flushed
behind the workers' backs.  The server is ``examples/fastapi_app.py`` as
written; ``/limited`` is its 5/minute route.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import time
from typing import Any

import httpx
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_uvicorn import Uvicorn  # noqa: E402

RUNS = int(os.environ.get("RATEGATE_WORKER_RUNS", "3"))


async def _burst(url: str, source: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    transport = httpx.AsyncHTTPTransport(local_address=source, limits=limits)
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=30) as c:
        return list(await asyncio.gather(*(c.get("/limited") for _ in range(n))))


def one_run(srv: Uvicorn, source: str, n: int = 100) -> collections.Counter[Any]:
    """Fire ``n`` concurrent requests from ``source``; count (status, Retry-After) pairs."""
    responses = asyncio.run(_burst(srv.url, source, n))
    return collections.Counter((r.status_code, r.headers.get("retry-after")) for r in responses)


def check(counts: collections.Counter[Any], n: int = 100, limit: int = 5) -> None:
    ok = sum(v for (status, _), v in counts.items() if status == 200)
    denied = sum(v for (status, _), v in counts.items() if status == 429)
    # A failure decision (Redis unreachable or past its deadline) is a 429
    # with Retry-After: 1; a real denial of 5/minute says 12 or more.
    failures = sum(v for (status, ra), v in counts.items() if status == 429 and ra == "1")
    assert (ok, denied, failures) == (limit, n - limit, 0), dict(counts)


def start(redis_url: str, workers: int) -> Uvicorn:
    srv = Uvicorn("examples.fastapi_app:app", workers=workers, env={"RATEGATE_REDIS_URL": redis_url})
    # Warm every worker's engine (it starts on first use) from an unrelated
    # client, so the measured runs see running engines, as in production.
    # The example's "/" answers with the worker's pid: the connections must
    # really be spread over several processes, or this proves nothing.
    # The kernel hands each connection to whichever worker accepts first; on
    # a busy machine one worker can take a whole burst.  Repeat the burst
    # (bounded) until at least two workers have answered.
    try:
        warm_workers(srv, "127.0.0.39", workers)
    except BaseException:
        srv.stop()
        raise
    return srv


def warm_workers(srv: Uvicorn, source: str, workers: int) -> set[int]:
    """Bursts from ``source`` until every request of one was allowed and (with
    several workers) at least two workers have answered; the pids seen."""
    pids: set[int] = set()
    for _ in range(20):
        got, warm = warm_up(srv, source, 40)
        pids |= got
        if warm and (workers == 1 or len(pids) >= 2):
            return pids
        time.sleep(0.2)
    if workers > 1:
        assert len(pids) >= 2, f"20 bursts of 40 warm-up requests were all served by one worker: {pids}"
    return pids


def warm_up(srv: Uvicorn, source: str, n: int) -> tuple[set[int], bool]:
    """The pids that answered, and whether every request was allowed.

    A worker's first checks wait for its connection within their deadline
    (50 ms); a slow first connect (TLS under the sanitizer build) answers
    them with the failure decision (429, Retry-After: 1): the burst is then
    repeated.  Anything else fails.
    """
    async def go() -> tuple[set[int], bool]:
        transport = httpx.AsyncHTTPTransport(local_address=source, limits=httpx.Limits(max_connections=n))
        async with httpx.AsyncClient(base_url=srv.url, transport=transport, timeout=30) as c:
            rs = await asyncio.gather(*(c.get("/") for _ in range(n)))
        assert all(r.status_code == 200 or (r.status_code == 429 and r.headers.get("retry-after") == "1")
                   for r in rs), [r.status_code for r in rs]
        return {r.json()["pid"] for r in rs if r.status_code == 200}, all(r.status_code == 200 for r in rs)

    return asyncio.run(go())


@pytest.mark.parametrize("transport", ["plain", "tls"])
def test_four_workers_share_one_limit(request: pytest.FixtureRequest, transport: str) -> None:
    redis_server = request.getfixturevalue("redis_server" if transport == "plain" else "redis_tls_server")
    redis_server.flushall()
    srv = start(redis_server.url, 4)
    try:
        for i in range(RUNS):
            check(one_run(srv, f"127.0.0.{40 + i}"))
    finally:
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    import argparse

    from redisserver import RedisServer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--requests", type=int, default=100)
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 200:
        p.error("--runs must be from 1 to 200 (one loopback address per run)")
    failed = 0
    with RedisServer() as redis_srv:
        srv = start(redis_srv.url, args.workers)
        try:
            for i in range(args.runs):
                counts = one_run(srv, f"127.0.0.{40 + i}", args.requests)
                try:
                    check(counts, args.requests)
                    verdict = "ok"
                except AssertionError:
                    verdict = "FAIL"
                    failed += 1
                summary = ", ".join(f"{s} (Retry-After {ra}): {v}" for (s, ra), v in sorted(
                    counts.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))))
                print(f"run {i + 1:2d}/{args.runs}: {verdict}  {summary}", flush=True)
        finally:
            srv.stop()
    print(f"{args.runs - failed}/{args.runs} runs had exactly 5 x 200 and {args.requests - 5} x 429 "
          f"with {args.workers} workers")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

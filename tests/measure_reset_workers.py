"""Issue 8 #4's measurement (a program, not a test): a reset seen by every worker.

4 uvicorn workers, a route limited to ``5/hour`` per client IP, one client:

1. the flood: the client sends requests for ``--flood`` seconds (new
   connection each, so they spread over the workers); after its 5, every
   answer is 429, mostly from each worker's local deny cache.  Each worker's
   own ``stats()`` (an exempt ``/stats`` route) says how many of its checks
   went to Redis: the flood's cost per key per process per second;
2. the reset: the client's keys are deleted in Redis (``DEL`` of its
   ``rg:{...}`` keys, as an operator would) while the flood goes on; for each
   worker, the time from the delete to its first question to Redis (when it
   sees the reset: until then it answers from its cache), and the first 200s
   (the bucket's 5 tokens go to the workers that ask first).

    .venv/bin/python tests/measure_reset_workers.py [--flood 5] [--pace 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from redisserver import RedisServer  # noqa: E402
from test_uvicorn import Uvicorn  # noqa: E402

APP = '''
import os
import rategate
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

limiter = rategate.Limiter(os.environ["RATEGATE_REDIS_URL"])

async def ok(request):
    return JSONResponse({"pid": os.getpid()})

async def stats(request):
    return JSONResponse({"pid": os.getpid(), "stats": limiter.stats()})

app = rategate.RateLimitMiddleware(
    Starlette(routes=[Route("/", ok), Route("/stats", stats)]),
    limiter=limiter, limits="5/hour", exempt=["/stats"])
'''
WORKERS = 4
CLIENT = "127.0.0.77"


async def get(url: str) -> httpx.Response:
    transport = httpx.AsyncHTTPTransport(local_address=CLIENT)
    async with httpx.AsyncClient(transport=transport, timeout=10) as c:
        return await c.get(url)


async def worker_stats(url: str) -> dict[int, dict]:
    """Each worker's stats(), asking until all have answered (bounded)."""
    seen: dict[int, dict] = {}
    for _ in range(400):
        r = (await get(url + "/stats")).json()
        seen[r["pid"]] = r["stats"]
        if len(seen) == WORKERS:
            break
    return seen


async def measure(url: str, redis_srv: RedisServer, flood: float, pace: float) -> None:
    codes: dict[int, int] = {}

    async def burst_until(t_end: float) -> None:
        while time.monotonic() < t_end:
            rs = await asyncio.gather(*(get(url + "/") for _ in range(20)))
            for r in rs:
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

    # The first second: the 5 allowed, then each worker's first denial puts
    # the key in its cache.  Measured: the flood after that.
    await burst_until(time.monotonic() + 1.0)
    before = await worker_stats(url)
    t0 = time.monotonic()
    n0 = sum(codes.values())
    await burst_until(t0 + flood)
    took = time.monotonic() - t0
    after = await worker_stats(url)
    print(f"flood: {sum(codes.values()) - n0} requests measured in {took:.1f} s (after a first second); "
          f"all answers: {codes}")
    for pid, st in sorted(after.items()):
        b = before.get(pid, {"checks": 0, "cached_denials": 0})
        redis_checks = (st["checks"] - b["checks"]) - (st["cached_denials"] - b["cached_denials"])
        print(f"  worker {pid}: {st['checks'] - b['checks']} checks, {redis_checks} to Redis "
              f"= {redis_checks / took:.2f} Redis checks per second for the one key")
    # The reset, with the flood going on: for each worker, when it first
    # asks Redis again after the delete (its stats: checks not answered from
    # the cache), which is when it sees the reset, and when it first lets
    # the client through (5 tokens: the first workers to ask take them).
    admin = redis_srv.client()
    keys = [k for k in admin.scan_iter("rg:*")]
    base = await worker_stats(url)
    t_del = time.monotonic()
    admin.delete(*keys)
    asked: dict[int, float] = {}
    let_through: dict[int, float] = {}
    while time.monotonic() - t_del < 3.0 and len(asked) < WORKERS:
        rs = await asyncio.gather(*(get(url + "/") for _ in range(8)))
        now = time.monotonic() - t_del
        for r in rs:
            if r.status_code == 200:
                let_through.setdefault(r.json()["pid"], now)
        for pid, st in (await worker_stats(url)).items():
            b = base[pid]
            if st["checks"] - st["cached_denials"] > b["checks"] - b["cached_denials"]:
                asked.setdefault(pid, now)
        await asyncio.sleep(pace)
    print(f"reset: deleted {len(keys)} keys with the flood going on")
    print("  each worker asked Redis again after: "
          + ", ".join(f"{pid}: {t:.3f} s" for pid, t in sorted(asked.items(), key=lambda x: x[1]))
          + f"  ({len(asked)} of {WORKERS} workers; the slowest {max(asked.values()):.3f} s)")
    print("  first 200 after the delete: "
          + ", ".join(f"{pid}: {t:.3f} s" for pid, t in sorted(let_through.items(), key=lambda x: x[1])))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flood", type=float, default=5.0)
    p.add_argument("--pace", type=float, default=0.05)
    a = p.parse_args()
    d = tempfile.mkdtemp(prefix="rategate-measure-")
    with open(os.path.join(d, "reset_app.py"), "w") as f:
        f.write(APP)
    with RedisServer() as redis_srv:
        srv = Uvicorn("reset_app:app", workers=WORKERS, env={"RATEGATE_REDIS_URL": redis_srv.url, "PYTHONPATH": d})
        try:
            asyncio.run(measure(srv.url, redis_srv, a.flood, a.pace))
        finally:
            srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

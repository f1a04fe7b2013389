"""Cases `rategate`, `rategate-flood`, `redis-down`, `rategate-tls`, `hot-key`
and `hot-key-lease`: the same route behind rategate's RateLimitMiddleware,
one Redis check per request (unless leased), headers on, the default
fail-closed mode.

BENCH_KEY=global: every request shares one key (one global limit) instead of
the client's address; BENCH_LEASE=1: the limiter leases (lease=True)."""

import os

from fastapi import FastAPI

import rategate
from rategate.middleware import RateLimitMiddleware

from bench.apps.common import RATE, REDIS_URL, bench_lifespan

limiter = rategate.Limiter(REDIS_URL, lease=os.environ.get("BENCH_LEASE") == "1")
KEY = {"key": lambda scope: "global"} if os.environ.get("BENCH_KEY") == "global" else {}

app = FastAPI(lifespan=bench_lifespan(shutdown=limiter.aclose, stats_hook=limiter.stats))
app.add_middleware(RateLimitMiddleware, limiter=limiter, limits=RATE, **KEY)  # key: client IP; headers: draft-6


@app.get("/ping")
async def ping():
    return {"ok": True}

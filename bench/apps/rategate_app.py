"""Cases `rategate`, `rategate-flood` and `redis-down`: the same route behind
rategate's RateLimitMiddleware, one Redis check per request, headers on,
the default fail-closed mode."""

from fastapi import FastAPI

import rategate
from rategate.middleware import RateLimitMiddleware

from bench.apps.common import RATE, REDIS_URL, bench_lifespan

limiter = rategate.Limiter(REDIS_URL)

app = FastAPI(lifespan=bench_lifespan(shutdown=limiter.aclose, stats_hook=limiter.stats))
app.add_middleware(RateLimitMiddleware, limiter=limiter, limits=RATE)  # key: client IP; headers: draft-6


@app.get("/ping")
async def ping():
    return {"ok": True}

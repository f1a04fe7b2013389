"""Case `python-redis` (and `python-redis-flood`): the limiter a user writes by hand,
redis.asyncio + the GCRA Lua script, as a pure-ASGI middleware (bench/pyredis_limiter.py)."""

from fastapi import FastAPI

from bench.apps.common import RATE, REDIS_URL, bench_lifespan
from bench.pyredis_limiter import PyRedisLimiter, PyRedisRateLimitMiddleware

limiter = PyRedisLimiter(REDIS_URL, RATE)

app = FastAPI(lifespan=bench_lifespan(shutdown=limiter.aclose))
app.add_middleware(PyRedisRateLimitMiddleware, limiter=limiter)


@app.get("/ping")
async def ping():
    return {"ok": True}

"""Case `fastapi-limiter`: configured as its documentation shows (a `RateLimiter`
dependency holding a pyrate-limiter `Limiter`), with the Redis backend that
pyrate-limiter documents for async use: `RedisBucket` over a redis.asyncio pool,
created at startup because its `init` is a coroutine with an async client."""

from fastapi import Depends, FastAPI
from fastapi_limiter.depends import RateLimiter
from pyrate_limiter import Duration, Limiter, Rate, RedisBucket
from redis.asyncio import ConnectionPool, Redis

from bench.apps.common import LIMIT, PERIOD, REDIS_URL, bench_lifespan

rate_limiter = RateLimiter(limiter=None)  # the Limiter is made at startup, below
redis_db = Redis(connection_pool=ConnectionPool.from_url(REDIS_URL))


async def startup() -> None:
    rates = [Rate(LIMIT, int(Duration.SECOND * PERIOD))]
    bucket = await RedisBucket.init(rates, redis_db, "bench-fastapi-limiter")
    rate_limiter.limiter = Limiter(bucket)


async def shutdown() -> None:
    await redis_db.aclose()


app = FastAPI(lifespan=bench_lifespan(startup, shutdown))


@app.get("/ping", dependencies=[Depends(rate_limiter)])
async def ping():
    return {"ok": True}

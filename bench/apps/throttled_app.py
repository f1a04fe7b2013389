"""Case `throttled-py`: throttled-py 3.5 through its FastAPI integration
(`throttled.asyncio.contrib.fastapi`), as its documentation shows: a `Limiter`
with the Redis store and its GCRA, `@limiter.limit()` on the route keyed by
`get_remote_address`, the 429 handler, and its `RateLimitMiddleware` for the
RateLimit headers."""

from fastapi import FastAPI, Request
from throttled.asyncio import RedisStore
from throttled.asyncio.contrib.fastapi import (
    Limiter,
    RateLimitExceededError,
    RateLimitMiddleware,
    get_remote_address,
    rate_limit_exceeded_handler,
)

from bench.apps.common import LIMIT, PERIOD, REDIS_URL, bench_lifespan

limiter = Limiter(quota=f"{LIMIT}/{'s' if PERIOD == 1 else 'm'}", store=RedisStore(server=REDIS_URL),
                  using="gcra", key_func=get_remote_address)

app = FastAPI(lifespan=bench_lifespan())
app.add_exception_handler(RateLimitExceededError, rate_limit_exceeded_handler)
app.add_middleware(RateLimitMiddleware)


@app.get("/ping")
@limiter.limit()
async def ping(request: Request):
    return {"ok": True}

"""Case `traffik`: Traffik 1.2 configured as its README shows for production: the
Redis backend over redis.asyncio (`traffik.backends.redis.aioredis.RedisBackend`,
`pip install "traffik[aioredis]"`), initialized at startup and given to an `HTTPThrottle`
dependency on the route keyed by client IP (its default identifier), with its
default strategy (FixedWindow)."""

from fastapi import Depends, FastAPI
from traffik import HTTPThrottle
from traffik.backends.redis.aioredis import RedisBackend

from bench.apps.common import LIMIT, PERIOD, REDIS_URL, bench_lifespan

backend = RedisBackend(REDIS_URL, namespace="bench-traffik")
throttle = HTTPThrottle(uid="ping", rate=f"{LIMIT}/{int(PERIOD)}s", backend=backend)


async def startup() -> None:
    await backend.initialize()


async def shutdown() -> None:
    await backend.close()


app = FastAPI(lifespan=bench_lifespan(startup, shutdown))


@app.get("/ping", dependencies=[Depends(throttle)])
async def ping():
    return {"ok": True}

"""Case `slowapi`: configured as its documentation shows, with Redis storage
(`storage_uri`, which slowapi hands to `limits`; slowapi is synchronous, so each
check is a blocking Redis call on the event loop - that is how it works)."""

from fastapi import FastAPI, Request
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address

from bench.apps.common import RATE, REDIS_URL, bench_lifespan

limiter = Limiter(key_func=get_remote_address, storage_uri=REDIS_URL)

app = FastAPI(lifespan=bench_lifespan())
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)


@app.get("/ping")
@limiter.limit(RATE)
async def ping(request: Request):
    return {"ok": True}

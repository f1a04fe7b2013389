"""Case `limits`: limits 5.8's async Redis storage (`limits.aio`, the
`async+redis://` storage on redis.asyncio) and its moving window, behind a
minimal pure-ASGI middleware written the usual way: one `hit()` per request
keyed by the client address, a 429 with Retry-After when it says no, the
RateLimit headers from `get_window_stats()` otherwise (as slowapi does)."""

import math
import time

from fastapi import FastAPI
from limits import parse
from limits.storage import storage_from_string
from limits.aio.strategies import MovingWindowRateLimiter

from bench.apps.common import RATE, REDIS_URL, bench_lifespan

storage = storage_from_string("async+" + REDIS_URL)
moving = MovingWindowRateLimiter(storage)
item = parse(RATE)
BODY = b'{"detail":"Too Many Requests"}'


class LimitsMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        key = client[0] if client else "unknown"
        allowed = await moving.hit(item, "ping", key)
        reset, remaining = await moving.get_window_stats(item, "ping", key)
        headers = [(b"ratelimit-limit", b"%d" % item.amount), (b"ratelimit-remaining", b"%d" % remaining),
                   (b"ratelimit-reset", b"%d" % max(0, math.ceil(reset - time.time())))]
        if not allowed:
            headers += [(b"retry-after", headers[2][1]), (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(BODY))]
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": BODY})
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


app = FastAPI(lifespan=bench_lifespan())
app.add_middleware(LimitsMiddleware)


@app.get("/ping")
async def ping():
    return {"ok": True}
